"""``dmamig stress`` over files: the un-audited filesystem's lost writes with the no-copy experiment, none
without it, and the files of every filesystem model among the anonymous regions."""

from __future__ import annotations

import pytest

from dmamig import InvalidArgument
from dmamig.cli import main
from dmamig.stress import StressConfig, run_stress

ROLES = ("writer", "reader", "migrator", "dma")


def files_only(**kw) -> StressConfig:
    kw.setdefault("ops", 3000)
    kw.setdefault("threads", 4)
    kw.setdefault("check_every", 500)
    kw.setdefault("fault_rate", 0.0)
    return StressConfig(files="unaudited", anon=False, roles=ROLES, **kw)


def test_unaudited_no_copy_loses_writes_and_the_verification_catches_every_one():
    lost = 0
    for seed in (7, 8, 9, 10):
        report = run_stress(files_only(seed=seed, unaudited_no_copy=True))
        # Every page that lost a write is one the filesystem wrote while a migration held it locked;
        # anything else would be a violation.
        assert report.ok, "\n".join(report.lines())
        assert report.lost_writes <= report.unlocked_writes
        lost += report.lost_writes
        if lost:
            break
    assert lost > 0
    assert "file writes lost" in "\n".join(report.lines())


def test_without_the_experiment_the_unaudited_filesystem_loses_nothing():
    report = run_stress(files_only(seed=7, ops=6000))
    assert report.ok, "\n".join(report.lines())
    assert report.lost_writes == 0
    assert report.op_counts.get("pwrite", 0) > 0
    assert any(k.startswith("migrate-dma") for k in report.op_counts)


@pytest.mark.parametrize("fs", ["generic", "buffer", "blockdev", "no-callback"])
def test_files_among_anonymous_memory_with_faults(fs):
    report = run_stress(StressConfig(ops=1000, threads=5, seed=3, files=fs, check_every=500, host_pages=2048,
                                     device_pages=2048, roles=("writer", "reader", "migrator", "dma", "pinner")))
    assert report.ok, "\n".join(report.lines())
    assert report.lost_writes == 0


def test_bad_file_settings():
    with pytest.raises(InvalidArgument, match="files must be"):
        StressConfig(files="ntfs").validate()
    with pytest.raises(InvalidArgument, match="nothing to stress"):
        StressConfig(anon=False).validate()


def test_the_command_line(capsys):
    rc = main(["stress", "--ops", "600", "--threads", "3", "--seed", "1", "--fault-rate", "0", "--roles",
               "writer,reader,dma", "--files", "unaudited", "--files-only", "--unaudited-no-copy"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "file writes lost:" in out
