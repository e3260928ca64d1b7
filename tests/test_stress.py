"""``dmamig stress``: a small run with faults, its command line, and the detection of a stuck thread."""

from __future__ import annotations

import threading

import pytest

from dmamig import InvalidArgument
from dmamig.cli import main
from dmamig.stress import StressConfig, run_stress
from dmamig.stress_ops import Worker


def small(**kw) -> StressConfig:
    kw.setdefault("ops", 3000)
    kw.setdefault("threads", 6)
    kw.setdefault("check_every", 500)
    kw.setdefault("host_pages", 2048)
    kw.setdefault("device_pages", 2048)
    return StressConfig(**kw)


def test_a_small_run_with_faults_holds_every_invariant():
    report = run_stress(small(fault_rate=0.05, seed=11, roles=("writer", "reader", "migrator", "dma", "driver")))
    assert report.ok, "\n".join(report.lines())
    assert report.ops == 3000 and report.checks >= 6
    assert sum(report.faults_injected.values()) > 20
    assert report.faults_survived == sum(report.faults_injected.values())
    assert report.bytes_verified > 0 and report.pages_migrated > 0
    kinds = set(report.op_counts)
    assert {"read", "write", "migrate-vma", "migrate-pfns"} <= kinds
    assert any(k.startswith("migrate-dma") for k in kinds) and any(k.startswith("migrate-copy") for k in kinds)
    assert f"--seed {report.seed}" in "\n".join(report.lines())


def test_a_small_run_without_faults_runs_fused_batches_among_the_other_threads(monkeypatch):
    # Without fault points the no-copy migrations of the run take the fused batches (a call of one batch included),
    # racing the writers, readers, MigrateVma drivers and the other migrations: every invariant still holds.
    import dmamig.migrate.batch_loops as batch_loops

    if batch_loops.fused_batch is None:
        pytest.skip(f"fused batches cannot run here: {batch_loops.FUSED_ERROR}")
    codes: list[int] = []
    real = batch_loops.fused_batch

    def fused(*args):
        got = real(*args)
        codes.append(got[0])
        return got

    monkeypatch.setattr(batch_loops, "fused_batch", fused)
    report = run_stress(small(fault_rate=0.0, seed=21, roles=("writer", "reader", "migrator", "dma", "driver")))
    assert report.ok, "\n".join(report.lines())
    assert codes.count(batch_loops.FUSED_SUBMITTED) > 10 and batch_loops.FUSED_MOVED in codes


def test_a_small_run_with_fork_and_munmap_churn():
    report = run_stress(small(fault_rate=0.05, seed=12))
    assert report.ok, "\n".join(report.lines())
    assert {"fork", "mmap", "munmap"} <= set(report.op_counts)


def test_one_thread_mixes_every_role():
    report = run_stress(small(ops=600, threads=1, seed=3, check_every=200))
    assert report.ok, "\n".join(report.lines())
    assert report.checks >= 3


def test_the_command_prints_figures_and_the_seed(capsys):
    assert main(["stress", "--ops", "400", "--threads", "3", "--fault-rate", "0.05", "--seed", "7",
                 "--check-every", "200", "--roles", "writer,reader,migrator,dma,driver"]) == 0
    out = capsys.readouterr().out
    for word in ("ops/s", "faults injected", "bytes verified", "seed: 7", "OK"):
        assert word in out


@pytest.mark.parametrize("args", [["--ops", "0"], ["--fault-rate", "2"], ["--fault-rate", "x"],
                                  ["--seed", "-1"], ["--threads", "1.5"], ["--stall-timeout", "0"],
                                  ["--roles", "reader,nope"], ["--roles", ","]])
def test_bad_arguments_exit_2_with_one_line(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["stress", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1]


@pytest.mark.parametrize("kw", [{"ops": 0}, {"threads": -1}, {"fault_rate": 1.5}, {"seed": -3},
                                {"stall_timeout": 0}, {"roles": ()}, {"roles": ("reader", "nope")},
                                {"roles": ("reader", "reader")}])
def test_bad_settings_are_invalid_arguments(kw):
    with pytest.raises(InvalidArgument):
        run_stress(small(**kw))


def test_a_stuck_thread_fails_the_run_and_is_named(monkeypatch):
    release = threading.Event()
    real = Worker._reader

    def stuck_reader(self):
        if self.name.startswith("stress-1"):
            self.doing = "a read that never ends"
            release.wait(60)
        return real(self)

    monkeypatch.setattr(Worker, "_reader", stuck_reader)
    try:
        report = run_stress(small(ops=600, seed=5, stall_timeout=1.0, check_every=100,
                                  roles=("writer", "reader", "migrator", "dma", "driver")))
    finally:
        release.set()
    assert not report.ok
    text = "\n".join(report.violations)
    assert "stress-1" in text and "a read that never ends" in text and "waits in" in text
