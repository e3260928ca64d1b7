"""The file-backed scenarios of ``dmamig bench``: tasks, a tiny verified sweep, the bytes on disk, the report."""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import pytest
from rich.console import Console
from support import check_results_schema

from dmamig.bench import files as bench_files
from dmamig.bench.files import FILE_CASES, FileScenario, file_scenarios, file_tasks, run_file_case
from dmamig.bench.report import render_tables
from dmamig.bench.results import load_results, write_csv, write_json
from dmamig.bench.runner import build_tasks, run_sweep
from dmamig.bench.settings import default_settings
from dmamig.bench.verify import VerificationError
from dmamig.cli import main

MIB = 1 << 20
#: Only the file-backed scenarios, as small as they get: one timed repetition after a warm-up, 1 MiB each.
TINY = dict(sizes=[2 * MIB], total_bytes=2 * MIB, channels=[1], variants=False, extras=False, access=False,
            repeat=1, warmup=1, files=True, files_bytes=MIB)
CEILINGS = {d: {"direction": d, "gbps": 10.0, "method": "np.copyto (test)"} for d in ("h2d", "d2h")}


def _settings(**over):
    return dataclasses.replace(default_settings("cpu", quick=True), **{**TINY, **over})


def _noop(label, steps):
    pass


# -- the sweep -------------------------------------------------------------------------------------------------

def test_every_case_runs_in_copy_and_no_copy_in_quick_and_only_with_files_in_the_default():
    quick = default_settings("cpu", quick=True)
    ids = [sc.id for sc in file_scenarios(quick)]
    assert ids == [f"files/{case}/{mode}" for case in FILE_CASES for mode in ("copy", "nocopy/ch2")]
    assert quick.files_bytes == 4 * MIB
    full = default_settings("cpu")
    assert not full.files and file_scenarios(full) == []
    assert file_scenarios(dataclasses.replace(full, files=True))[0].total_bytes == 32 * MIB
    tasks = build_tasks(_settings())
    kinds = [t.kind for t in tasks]
    assert kinds.count("files") == 2 * len(FILE_CASES)
    assert all(t.directions == ("h2d", "d2h") for t in tasks if t.kind == "files")
    assert len({t.id for t in tasks}) == len(tasks)


@pytest.fixture(scope="module")
def tiny_doc():
    return run_sweep(_settings())


def test_a_tiny_sweep_verifies_every_case_and_records_it(tiny_doc, tmp_path):
    recs = [r for r in tiny_doc["scenarios"] if r["kind"] == "files"]
    assert len(recs) == 2 * 2 * len(FILE_CASES)  # two legs, two modes
    assert {r["file_case"] for r in recs} == set(FILE_CASES)
    for r in recs:
        assert r["verified"] and r["nr_failed"] == 0 and r["nr_succeeded"] == r["pages"] == MIB // 4096
        assert r["batching"] == "faithful" and r["options"]["faithful"]
        assert r["ceiling_gbps"] and r["ceiling_ratio"] == pytest.approx(r["gbps"] / r["ceiling_gbps"])
        assert r["copy_baseline"] == "cpu"
        if r["mode"] == "nocopy":
            assert r["speedup_vs"] == r["id"].replace("/nocopy/ch1", "/copy")
            assert r["speedup_vs_copy"] > 0
    ids = [r["id"] for r in recs]
    assert len(set(ids)) == len(ids)
    # What the flusher left dirty or under writeback when each migration started: a race with the flusher,
    # recorded as it fell (the bytes on disk are checked whatever it was). Not a partition of the pages: a page
    # redirtied while it is written back is both.
    for r in recs:
        assert 0 <= r["source_dirty_pages"] <= r["pages"] and 0 <= r["source_writeback_pages"] <= r["pages"]
    check_results_schema(tiny_doc)
    write_json(tiny_doc, tmp_path / "results.json")
    write_csv(tiny_doc, tmp_path / "results.csv")
    again = load_results(tmp_path)
    assert [r["id"] for r in again["scenarios"]] == [r["id"] for r in tiny_doc["scenarios"]]
    assert "file_case" in (tmp_path / "results.csv").read_text().splitlines()[0]
    assert tiny_doc["settings"]["files"] is True and tiny_doc["settings"]["files_bytes"] == MIB


def test_the_report_shows_a_table_of_the_file_records(tiny_doc):
    out = io.StringIO()
    render_tables(tiny_doc, Console(file=out, width=220))
    text = out.getvalue()
    assert "File-backed and shared memory" in text
    for words in FILE_CASES.values():
        assert words in text


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_each_case_leaves_the_right_bytes_on_disk(case, monkeypatch):
    """The end check reads the file on disk after fsync: spy on it and compare with what each case wrote."""
    seen = {}
    real = bench_files._read_disk

    def spy(path, nbytes):
        got = real(path, nbytes)
        seen["disk"] = got.copy()
        seen["path"] = path
        return got

    monkeypatch.setattr(bench_files, "_read_disk", spy)
    sc = FileScenario(case, "nocopy", 1, MIB)
    recs = run_file_case(sc, _settings(), CEILINGS, _noop, seed=7)
    assert [r["direction"] for r in recs] == ["h2d", "d2h"]
    if case == "shmem":
        assert not seen  # no file: the mapping's bytes are read back instead
        return
    if case in ("clean", "private-cow"):
        # The file was never written through a shared mapping: its bytes are the ones it was made with.
        assert np.array_equal(seen["disk"], bench_files.random_bytes(MIB, 7))
    else:
        # The last write before the last host->device leg (seed + 2 + repetition) reached the disk.
        assert np.array_equal(seen["disk"], bench_files.random_bytes(MIB, 7 + 2 + 1))
    assert not os.path.exists(seen["path"])  # the machine's temporary files are gone with it


def test_a_file_whose_disk_bytes_are_wrong_fails_verification(monkeypatch):
    monkeypatch.setattr(bench_files, "_read_disk", lambda path, n: np.zeros(n, dtype=np.uint8))
    with pytest.raises(VerificationError, match="on disk differ"):
        run_file_case(FileScenario("dirty", "copy", None, MIB), _settings(), CEILINGS, _noop, seed=3)


def test_a_private_mapping_that_wrote_the_page_cache_fails_verification(monkeypatch):
    real = bench_files._check_bytes

    def scribble(mm, sc, mapped):
        mapped.file.pwrite(b"\xff" * 16, 0)  # as a private mapping that leaked into the file would
        real(mm, sc, mapped)

    monkeypatch.setattr(bench_files, "_check_bytes", scribble)
    with pytest.raises(VerificationError):
        run_file_case(FileScenario("private-cow", "copy", None, MIB), _settings(), CEILINGS, _noop, seed=3)


def test_file_tasks_follow_the_settings():
    s = _settings(channels=[1, 2], files_bytes=2 * MIB)
    tasks = file_tasks(s)
    assert [t.payload.channels for t in tasks][:2] == [None, 2]
    assert all(t.payload.total_bytes == 2 * MIB for t in tasks)
    assert file_tasks(_settings(files=False)) == []


# -- the command line ------------------------------------------------------------------------------------------

def test_files_total_needs_files_outside_quick(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--backend", "cpu", "--files-total", "4M", "--out", "/nonexistent-folder/x"])
    assert exc.value.code == 2
    assert "--files-total" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--backend", "cpu", "--files", "--files-total", "4097", "--out", "/nonexistent-folder/x"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--backend", "cpu", "--files", "--no-files", "--out", "/nonexistent-folder/x"])
    assert exc.value.code == 2


def test_no_files_drops_them_from_a_quick_sweep(tmp_path):
    out = tmp_path / "r"
    assert main(["bench", "--quick", "--backend", "cpu", "--no-plots", "--sizes", "64k", "--total", "1M",
                 "--channels", "1", "--no-engine", "--no-access", "--no-files", "--out", str(out)]) == 0
    doc = load_results(out)
    assert {s["kind"] for s in doc["scenarios"]} == {"migrate"} and doc["settings"]["files"] is False


def test_files_adds_them_to_a_sweep_at_the_size_asked(tmp_path):
    out = tmp_path / "r"
    assert main(["bench", "--backend", "cpu", "--no-plots", "--sizes", "64k", "--total", "1M", "--channels", "1",
                 "--repeat", "1", "--faithful-only", "--no-engine", "--no-access", "--files", "--files-total", "1M",
                 "--out", str(out)]) == 0
    doc = load_results(out)
    recs = [s for s in doc["scenarios"] if s["kind"] == "files"]
    assert len(recs) == 16 and all(r["bytes"] == MIB and r["verified"] for r in recs)
