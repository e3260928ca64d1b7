"""Device-private memory (``Machine(device_memory="private")``): non-present CPU entries, CPU access always
migrating, long-term pins migrating device pages back first (coherent device pages too)."""

from __future__ import annotations

import numpy as np
import pytest

from dmamig import AddressFault, DeviceAccessor, InvalidArgument, Machine, PteFlag, UvmOptions

PS = 4096


def _machine(mode: str, host_pages: int = 2048) -> Machine:
    return Machine(host_pages=host_pages, device_pages=2048, devices=1, backend="cpu", channels=2,
                   device_memory=mode)


def test_device_page_pte_is_a_non_present_device_private_entry():
    with _machine("private") as m:
        assert m.device_private
        mm = m.address_space()
        a = mm.mmap(4 * PS)
        mm.write(a, np.arange(4 * PS, dtype=np.uint8))
        assert mm.pte_flags(a) & PteFlag.PRESENT
        DeviceAccessor(mm, 1).write(a, b"\x01")
        f = mm.pte_flags(a)
        assert f & PteFlag.DEVICE_PRIVATE and not f & PteFlag.PRESENT and f & PteFlag.DIRTY
        mm.read(a, 1)
        f = mm.pte_flags(a)
        assert f & PteFlag.PRESENT and not f & PteFlag.DEVICE_PRIVATE


def test_coherent_device_pages_stay_present():
    with _machine("coherent") as m:
        assert not m.device_private
        mm = m.address_space()
        a = mm.mmap(PS)
        DeviceAccessor(mm, 1).touch(a, PS, write=True)
        assert mm.node_of(a) == 1
        f = mm.pte_flags(a)
        assert f & PteFlag.PRESENT and not f & PteFlag.DEVICE_PRIVATE


@pytest.mark.parametrize("mode", ["coherent", "private"])
def test_cpu_access_to_a_pinned_device_page(mode):
    """A pinned device page cannot migrate: coherent memory is read in place, device-private cannot be."""
    with _machine(mode) as m:
        mm = m.address_space()
        a = mm.mmap(2 * PS)
        mm.write(a, np.full(2 * PS, 9, np.uint8))
        DeviceAccessor(mm, 1, UvmOptions(prefetch="none")).read(a, 2 * PS)
        m.page_controls.get_page(mm.pfn_of(a))  # a transient reference that outlives every retry
        if mode == "coherent":
            assert (mm.read(a, PS) == 9).all()
            assert mm.node_of(a) == 1
        else:
            with pytest.raises(AddressFault, match="device-private"):
                mm.read(a, PS)
        assert (mm.read(a + PS, PS) == 9).all() and mm.node_of(a + PS) == 0
        m.page_controls.put_page(mm.pfn_of(a))
        assert (mm.read(a, PS) == 9).all() and mm.node_of(a) == 0


def test_private_cpu_access_always_migrates_and_counts():
    with _machine("private") as m:
        mm = m.address_space()
        n = 300
        a = mm.mmap(n * PS)
        data = np.random.default_rng(0).integers(0, 256, n * PS, dtype=np.uint8)
        mm.write(a, data)
        acc = DeviceAccessor(mm, 1)
        for _ in range(2):
            assert (acc.read(a, n * PS) == data).all()
            assert (mm.nodes_of(a, n * PS) == 1).all()
            assert (mm.read(a, n * PS) == data).all()
            assert (mm.nodes_of(a, n * PS) == 0).all()
        assert m.vmstat["migrate_to_ram"] == 2 * n


@pytest.mark.parametrize("mode", ["coherent", "private"])
def test_long_term_pin_of_device_pages(mode):
    """FOLL_LONGTERM: device-private and device-coherent pages alike are not long-term pinnable
    (folio_is_longterm_pinnable), so the pinned pages come back to host memory first."""
    with _machine(mode) as m:
        mm = m.address_space()
        a = mm.mmap(8 * PS)
        mm.write(a, np.full(8 * PS, 3, np.uint8))
        DeviceAccessor(mm, 1, UvmOptions(prefetch="none")).read(a, 8 * PS)
        before = m.vmstat["migrate_to_ram"]
        mm.pin(a, 4 * PS)
        nodes = mm.nodes_of(a, 8 * PS)
        assert (nodes[:4] == 0).all() and (nodes[4:] == 1).all()
        assert m.vmstat["migrate_to_ram"] == before + 4
        assert (mm.read(a, 8 * PS) == 3).all()
        mm.unpin(a, 4 * PS)
        mm.close()
        assert [nd.free_pages for nd in m.nodes] == [2048, 2048]


def test_device_memory_setting_is_checked():
    with pytest.raises(InvalidArgument, match="device_memory"):
        Machine(host_pages=64, device_pages=64, backend="cpu", device_memory="shared")


def test_private_pin_fails_when_the_host_is_full():
    with _machine("private", host_pages=64) as m:
        mm = m.address_space()
        a = mm.mmap(4 * PS)
        DeviceAccessor(mm, 1).touch(a, 4 * PS, write=True)
        held = m.alloc_pages(0, m.nodes[0].free_pages)
        from dmamig import OutOfMemory

        with pytest.raises(OutOfMemory, match="long-term pin"):
            mm.pin(a, PS)
        m.put_pages(held)
        mm.pin(a, PS)
        assert mm.node_of(a) == 0
        mm.unpin(a, PS)
