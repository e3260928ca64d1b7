"""check_machine finds what it is meant to find: here, free frames that still hold a folio's state."""

from __future__ import annotations

import numpy as np
import pytest

from dmamig import Machine
from dmamig.check import check_machine


@pytest.fixture
def machine():
    m = Machine(host_pages=2048, device_pages=1024, devices=1, backend="cpu", channels=1)
    yield m
    m.close()


def test_a_clean_machine_after_migrations_passes(machine: Machine) -> None:
    mm = machine.address_space()
    addr = mm.mmap(1024 * machine.page_size, order=9)
    data = np.random.default_rng(3).integers(0, 256, 1024 * machine.page_size, dtype=np.uint8)
    mm.write(addr, data)
    for node in (1, 0, 1):
        assert mm.migrate(addr, 1024 * machine.page_size, node).ok
    assert check_machine(machine) == []
    assert np.array_equal(mm.read(addr, 1024 * machine.page_size), data)


@pytest.mark.parametrize("field, value", [("mapping", 7), ("index", 3), ("refcount", 1), ("head", 0),
                                          ("last_cpupid", 5), ("order", 2)])
def test_a_free_frame_left_with_state_is_reported(machine: Machine, field: str, value: int) -> None:
    # Allocation sets up a folio's head and its tails' head pointers only, trusting the free state of the rest.
    pfn = machine.nodes[1].base_pfn + 600  # free: nothing was allocated on node 1
    getattr(machine.pages, field)[pfn] = value
    found = check_machine(machine)
    assert any("free frames hold state" in line and str(pfn) in line for line in found), found


def test_a_large_folio_allocated_over_freed_frames_is_clean(machine: Machine) -> None:
    mm = machine.address_space()
    addr = mm.mmap(512 * machine.page_size, order=9)
    mm.write(addr, b"x")
    old = mm.pfn_of(addr)
    assert mm.migrate(addr, 512 * machine.page_size, 1).ok  # frees the old folio's frames on node 0
    new = machine.frames.alloc_folios(0, 1, order=9)
    assert new.tolist() == [old]  # the same frames, set up again
    p = machine.pages
    tails = old + np.arange(1, 512)
    assert (p.head[tails] == old).all() and (p.mapping[tails] == -1).all() and (p.refcount[tails] == 0).all()
    assert int(p.refcount[old]) == 1 and int(p.order[old]) == 9
    machine.frames.free_folios(new)
    assert check_machine(machine) == []
