"""The public surface: exported names, the exception tree, backend selection and Machine arguments."""

from __future__ import annotations

import numpy as np
import pytest

import dmamig
from dmamig import (
    AddressFault,
    BackendUnavailable,
    DmaError,
    DmamigError,
    InvalidArgument,
    Machine,
    MigrateMode,
    MigratePfn,
    OutOfMemory,
    PageFlag,
    PteFlag,
)
from dmamig.backends.cuda import status as cuda_probe

DESIGN_NAMES = {
    "Machine", "MigrateMode", "MigrateVma", "MigratePfn", "DmamigError", "InvalidArgument", "AddressFault",
    "OutOfMemory", "DmaError", "BackendUnavailable", "MigrateResult", "AddressSpace", "Node", "PageFlag",
    "PteFlag",
}


def small(**kw) -> Machine:
    kw.setdefault("host_pages", 1024)
    kw.setdefault("device_pages", 1024)
    kw.setdefault("backend", "cpu")
    return Machine(**kw)


# -- exported names ------------------------------------------------------------------------------------------
def test_every_exported_name_exists():
    missing = [name for name in dmamig.__all__ if not hasattr(dmamig, name)]
    assert missing == []


def test_all_is_sorted_and_unique():
    assert list(dmamig.__all__) == sorted(dmamig.__all__)
    assert len(set(dmamig.__all__)) == len(dmamig.__all__)


def test_design_names_are_exported():
    assert DESIGN_NAMES <= set(dmamig.__all__)


def test_star_import_gives_exactly_all():
    ns: dict = {}
    exec("from dmamig import *", ns)
    assert {k for k in ns if k != "__builtins__"} == set(dmamig.__all__)


def test_version_is_a_string():
    assert isinstance(dmamig.__version__, str) and dmamig.__version__


# -- exception tree --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, builtin", [
    (InvalidArgument, ValueError),
    (OutOfMemory, MemoryError),
    (BackendUnavailable, RuntimeError),
])
def test_errors_are_also_builtin_errors(cls, builtin):
    assert issubclass(cls, builtin)
    assert issubclass(cls, DmamigError)


@pytest.mark.parametrize("cls", [InvalidArgument, AddressFault, OutOfMemory, DmaError, BackendUnavailable])
def test_every_error_is_a_dmamig_error(cls):
    assert issubclass(cls, DmamigError)
    assert issubclass(DmamigError, Exception)


def test_address_fault_and_dma_error_are_not_value_errors():
    assert not issubclass(AddressFault, ValueError)
    assert not issubclass(DmaError, ValueError)


def test_invalid_argument_is_caught_as_value_error():
    with pytest.raises(ValueError):
        small(page_size=1000)


# -- flags -----------------------------------------------------------------------------------------------------
def test_migrate_mode_is_a_flag_with_no_copy_modifier():
    mode = MigrateMode.SYNC | MigrateMode.NO_COPY
    assert MigrateMode.NO_COPY in mode and MigrateMode.SYNC in mode
    assert MigrateMode.ASYNC not in mode
    assert {MigrateMode.ASYNC, MigrateMode.SYNC_LIGHT, MigrateMode.SYNC, MigrateMode.NO_COPY} <= set(MigrateMode)


def test_migrate_pfn_values_follow_the_kernel():
    assert MigratePfn.VALID == 1 << 0
    assert MigratePfn.MIGRATE == 1 << 1
    assert MigratePfn.WRITE == 1 << 3
    assert MigratePfn.COMPOUND == 1 << 4


def test_page_and_pte_flags_are_distinct_bits():
    for enum_cls in (PageFlag, PteFlag):
        values = [int(f) for f in enum_cls]
        assert all(v and v & (v - 1) == 0 for v in values)
        assert len(set(values)) == len(values)


# -- backend selection ----------------------------------------------------------------------------------------
def test_cpu_machine_properties():
    with small(devices=2, page_size=1024, channels=2) as m:
        assert m.backend_name == "cpu"
        assert m.page_size == 1024
        assert [n.id for n in m.nodes] == [0, 1, 2]
        assert [n.kind for n in m.nodes] == ["host", "device", "device"]
        assert [n.total_pages for n in m.nodes] == [1024, 1024, 1024]
        assert [n.free_pages for n in m.nodes] == [1024, 1024, 1024]
        assert {"pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
                "thp_migration_split", "migrate_tlb_flush"} <= set(m.vmstat)
        assert all(v == 0 for v in m.vmstat.values())


def test_vmstat_is_a_snapshot():
    with small() as m:
        snap = m.vmstat
        snap["pgmigrate_success"] = 99
        assert m.vmstat["pgmigrate_success"] == 0


def test_cuda_without_gpu_raises_backend_unavailable_with_reason():
    reason = cuda_probe.cuda_unavailable_reason()
    if reason is None:
        pytest.skip("a GPU is usable here; the no-GPU error path cannot be exercised")
    with pytest.raises(BackendUnavailable) as exc:
        small(backend="cuda")
    assert isinstance(exc.value, RuntimeError)
    assert reason in str(exc.value)


def test_cuda_error_when_reason_is_forced(monkeypatch):
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: "no device for this test")
    with pytest.raises(BackendUnavailable, match="no device for this test"):
        small(backend="cuda")


def test_env_override_picks_cpu_even_when_a_gpu_looks_usable(monkeypatch):
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: None)
    monkeypatch.setenv("DMAMIG_BACKEND", "cpu")
    with small(backend="auto") as m:
        assert m.backend_name == "cpu"


def test_env_override_cuda_is_honoured_by_auto(monkeypatch):
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: "pretend there is no GPU")
    monkeypatch.setenv("DMAMIG_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="pretend there is no GPU"):
        small(backend="auto")


def test_auto_without_env_falls_back_to_cpu(monkeypatch):
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: "pretend there is no GPU")
    monkeypatch.delenv("DMAMIG_BACKEND", raising=False)
    with small(backend="auto") as m:
        assert m.backend_name == "cpu"


def test_env_override_does_not_change_an_explicit_backend(monkeypatch):
    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: "pretend there is no GPU")
    monkeypatch.setenv("DMAMIG_BACKEND", "cuda")
    with small(backend="cpu") as m:
        assert m.backend_name == "cpu"


def test_bad_env_value_is_invalid_argument(monkeypatch):
    monkeypatch.setenv("DMAMIG_BACKEND", "tpu")
    with pytest.raises(InvalidArgument, match="DMAMIG_BACKEND"):
        small(backend="auto")


@pytest.mark.parametrize("name", ["gpu", "CPU", "", None, 3])
def test_bad_backend_name_is_invalid_argument(name):
    with pytest.raises(InvalidArgument, match="backend"):
        small(backend=name)


# -- Machine arguments ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {"host_pages": 0}, {"host_pages": -1}, {"device_pages": 0}, {"host_pages": 1.5}, {"host_pages": True},
    {"devices": -1}, {"devices": 1.0}, {"page_size": 1000}, {"page_size": 32}, {"page_size": 0},
    {"channels": 0},
])
def test_bad_machine_arguments(kw):
    with pytest.raises(InvalidArgument):
        small(**kw)


def test_machine_without_devices():
    with small(devices=0) as m:
        assert len(m.nodes) == 1 and m.nodes[0].kind == "host"


def test_closed_machine_refuses_work():
    m = small()
    m.close()
    m.close()  # idempotent
    with pytest.raises(InvalidArgument, match="closed"):
        m.address_space()
    with pytest.raises(InvalidArgument, match="closed"):
        m.alloc_pages(0, 1)


def test_machine_close_closes_its_address_spaces():
    m = small()
    mm = m.address_space()
    addr = mm.mmap(8 * m.page_size)
    mm.write(addr, np.ones(8 * m.page_size, np.uint8))
    assert m.nodes[0].free_pages == 1024 - 8
    m.close()
    assert m.nodes[0].free_pages == 1024
    with pytest.raises(InvalidArgument, match="closed"):
        mm.read(addr, 1)


def test_fault_injection_is_public():
    assert {"FaultAttr", "FaultPoints"} <= set(dmamig.__all__)
    assert {"Policy", "ReplayResult", "Trace", "TraceError", "replay"} <= set(dmamig.__all__)
    with small() as m:
        assert isinstance(m.faults, dmamig.FaultPoints)
        assert set(m.faults.points) == {"alloc", "channel_crash", "dma_complete", "dma_copy", "dma_submit",
                                         "writeback", "disk_full"}
