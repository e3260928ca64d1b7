"""Device-access scenarios of ``dmamig bench``: the tasks, a tiny verified sweep, its figures, report and plots."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pickle

import numpy as np
import pytest
from rich.console import Console
from support import check_results_schema

from dmamig.bench.access import (
    AccessScenario,
    access_scenarios,
    access_tasks,
    parse_fault_batches,
    parse_oversubscription,
    run_access,
)
from dmamig.bench.report import render_tables, write_plots
from dmamig.bench.results import (
    NotComparable,
    check_comparable,
    compare_results,
    load_results,
    regressions,
    validate_results,
    write_csv,
    write_json,
)
from dmamig.bench.runner import build_tasks, run_sweep, run_task
from dmamig.bench.settings import default_settings
from dmamig.bench.verify import VerificationError
from dmamig.cli import main
from dmamig.uvm import SERVICE_PHASES

PAGE = 4096


# -- the sweep ---------------------------------------------------------------------------------------------------

def test_default_sweep_has_every_access_scenario_in_both_modes():
    s = default_settings("cpu")
    tasks = build_tasks(s)
    assert len({t.id for t in tasks}) == len(tasks)
    access = [t for t in tasks if t.kind == "access"]
    assert tasks[-len(access):] == access  # after the migration and engine scenarios
    ids = [t.id for t in access]
    assert ids == [f"access/{what}/{mode}" for what in (
        "stream/b32", "stream/b256", "stream/b1024", "random/b256", "strided/b256", "stencil/0.5x/b256",
        "stencil/1x/b256", "stencil/1.5x/b256", "stencil/2x/b256") for mode in ("copy", "nocopy/ch2")]
    # Their ceiling is the same access pre-migrated, measured inside the task: no direction ceiling needed.
    assert all(t.directions == () for t in access)
    assert all(t.payload.working_bytes == 32 << 20 for t in access)
    assert {t.steps for t in access if t.payload.pattern != "stencil"} == {s.warmup + s.repeat}
    assert pickle.loads(pickle.dumps(access)) == access  # tasks travel to other processes
    assert default_settings("cuda", gpus=1).access_bytes > s.access_bytes
    assert [sc.id for sc in access_scenarios(default_settings("cuda", gpus=1))][1] == \
        "access/stream/b32/nocopy/ch4"


def test_without_access_the_sweep_has_none():
    s = dataclasses.replace(default_settings("cpu"), access=False)
    assert not access_scenarios(s) and not [t for t in build_tasks(s) if t.kind == "access"]
    assert s.to_json()["access"] is False


def test_uvms_batch_always_runs_and_names_read_as_words():
    s = dataclasses.replace(default_settings("cpu", quick=True), fault_batches=[64], oversubscription=[3.0])
    ids = [sc.id for sc in access_scenarios(s)]
    assert "access/stream/b64/copy" in ids and "access/stream/b256/copy" in ids
    assert "access/stencil/3x/b256/nocopy/ch2" in ids
    sc = AccessScenario("stencil", "nocopy", 256, 8 << 20, 2, 2.0)
    assert sc.name == "device access, stencil over 2x device memory, fault batch 256, no-copy, 2 DMA channels"
    assert sc.device_pages == 1024 and sc.touched_pages == 2048
    assert AccessScenario("strided", "copy", 256, 8 << 20, None).touched_pages == 128
    assert AccessScenario("random", "copy", 256, 8 << 20, None).uvm_options().no_copy is False


@pytest.mark.parametrize("fn, text, words", [
    (parse_fault_batches, "0", "not a fault batch size"),
    (parse_fault_batches, "", "comma-separated"),
    (parse_oversubscription, "0", "not an oversubscription factor"),
    (parse_oversubscription, "nan", "not an oversubscription factor"),
    (parse_oversubscription, "x", "e.g. 0.5,1,2"),
])
def test_bad_axes_say_what_is_allowed(fn, text, words):
    with pytest.raises(ValueError, match=words):
        fn(text)
    assert parse_oversubscription("2,0.5,2") == [0.5, 2.0] and parse_fault_batches("1024,32") == [32, 1024]


def test_factors_that_read_alike_in_ids_are_refused():
    # Ids name a factor in 6 significant digits: 1 and 1.0000001 would be one scenario id twice.
    with pytest.raises(ValueError, match="'1' and '1.0000001' are one oversubscription factor"):
        parse_oversubscription("1,1.0000001")
    assert parse_oversubscription("1,1.0,1.5") == [1.0, 1.5]
    s = dataclasses.replace(default_settings("cpu", quick=True), oversubscription=[1.0, 1.0000001])
    with pytest.raises(ValueError, match="two tasks the id 'access/stencil/1x/b256/copy'"):
        build_tasks(s)


@pytest.mark.parametrize("argv, words", [
    (["--fault-batch", "0"], "--fault-batch"),
    (["--oversubscription", "-1"], "--oversubscription"),
    (["--oversubscription", "0.5,0.50000001"], "--oversubscription: '0.5' and '0.50000001'"),
    (["--access-total", "3M"], "2 MiB blocks"),
])
def test_bad_access_arguments_are_usage_errors(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--backend", "cpu", *argv, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


# -- a tiny sweep, run once --------------------------------------------------------------------------------------

TINY = dict(sizes=[2 << 20], total_bytes=2 << 20, channels=[2], variants=False, extras=False, repeat=3,
            access_bytes=8 << 20, fault_batches=[32, 1024], oversubscription=[1.0, 2.0])


@pytest.fixture(scope="module")
def doc():
    s = dataclasses.replace(default_settings("cpu", quick=True), **TINY)
    return run_sweep(s)


def _access(doc):
    return {r["id"]: r for r in doc["scenarios"] if r["kind"] == "access"}


def test_tiny_sweep_runs_every_access_verified_in_both_modes(doc):
    acc = _access(doc)
    assert len(acc) == 2 * 7
    assert {r["mode"] for r in acc.values()} == {"copy", "nocopy"}
    for r in acc.values():
        assert r["verified"] and r["repeat"] == 3 and len(r["wall_ns"]) == len(r["ceiling_wall_ns"]) == 3
        assert r["channels"] == (2 if r["mode"] == "nocopy" else None)
        assert r["options"]["faithful"] and r["batching"] == "faithful"
        assert r["uvm_options"]["fault_batch_size"] == r["fault_batch_size"]
        assert r["uvm_options"]["no_copy"] == (r["mode"] == "nocopy")
        assert r["pages_per_s"] > 0 and r["ceiling_pages_per_s"] > 0 and r["gbps"] > 0
        assert r["pages_remote"] == 0
    settings = doc["settings"]
    assert settings["access"] and settings["access_bytes"] == 8 << 20
    assert settings["fault_batches"] == [32, 1024] and settings["oversubscription"] == [1.0, 2.0]


def test_access_figures_hold_their_invariants(doc):
    acc = _access(doc)
    pages = (8 << 20) // PAGE
    faulting = [r for r in acc.values() if r["fault_batches"] > 0]
    for r in faulting:
        # A ratio of two timings: only its definition is checked here, never its size (a loaded machine can
        # slow either side). The figure itself is the benchmark's to report.
        assert r["ceiling_ratio"] == pytest.approx(r["pages_per_s"] / r["ceiling_pages_per_s"])
        assert r["fault_batches_per_s"] > 0 and r["service_ns_per_batch"] > 0
        assert r["faults"] <= r["fault_batches"] * r["fault_batch_size"]
        split = r["service_phase_ns_per_batch"]
        assert set(split) == set(SERVICE_PHASES)
        if r["mode"] == "copy":  # the faulting thread copies; no DMA
            assert split["copy"] > 0 and split["submit"] == split["dma_wait"] == 0
        else:  # the DMA engine copies; the CPU copy only runs on a DMA failure
            assert split["copy"] == 0 and split["submit"] + split["dma_wait"] > 0
    for mode in ("copy", "nocopy/ch2"):
        for b in (32, 256, 1024):
            r = acc[f"access/stream/b{b}/{mode}"]
            # Every page comes from host memory once; density prefetch stays inside the (block-aligned) range.
            assert r["pages"] == pages and r["bytes_migrated_per_byte_touched"] == 1.0
            assert r["bytes_migrated"] == 8 << 20 and r["bytes_evicted"] == 0
        assert acc[f"access/stream/b32/{mode}"]["fault_batches"] > acc[f"access/stream/b1024/{mode}"]["fault_batches"]
        strided = acc[f"access/strided/b256/{mode}"]
        assert strided["pages"] == pages // 16 and strided["bytes_migrated_per_byte_touched"] == 1.0
        rnd = acc[f"access/random/b256/{mode}"]
        assert rnd["pages"] == pages // 4 and rnd["bytes_migrated_per_byte_touched"] >= 1.0
        fits, over = acc[f"access/stencil/1x/b256/{mode}"], acc[f"access/stencil/2x/b256/{mode}"]
        # Steady state: a device that holds the range faults no more; at 2x LRU moves every page in and out.
        assert fits["fault_batches"] == 0 and fits["bytes_migrated_per_byte_touched"] == 0
        assert fits["service_ns_per_batch"] is None and fits["device_bytes"] == 8 << 20
        assert over["device_bytes"] == 4 << 20 and over["bytes_evicted"] > 0
        assert over["bytes_migrated_per_byte_touched"] >= 1.0 and over["pages"] == pages
    for r in acc.values():
        if r["mode"] == "nocopy":
            base = acc[r["speedup_vs"]]
            assert base["mode"] == "copy" and base["pattern"] == r["pattern"]
            assert base["fault_batch_size"] == r["fault_batch_size"]
            assert r["speedup_vs_copy"] == pytest.approx(r["pages_per_s"] / base["pages_per_s"])


def test_results_validate_and_report_renders(doc, tmp_path):
    check_results_schema(doc)
    write_json(doc, tmp_path / "results.json")
    again = load_results(tmp_path / "results.json")
    con = Console(file=io.StringIO(), width=220)
    render_tables(again, con)
    text = con.file.getvalue()
    assert "Device access" in text and "streaming read" in text and "stencil, 2x device memory" in text
    assert "random 4K reads" in text and "strided read" in text
    engine = text.split("Device access")[0]
    assert "access/" not in engine and "stencil" not in engine  # not in the migration or engine tables
    write_csv(again, tmp_path / "results.csv")
    header = (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "fault_batches_per_s" in header and "bytes_migrated_per_byte_touched" in header


def test_plots_are_written(doc, tmp_path):
    paths = write_plots(doc, tmp_path)
    ours = {"access_oversubscription.png", "access_fault_batch.png", "access_service.png"}
    assert ours <= {p.name for p in paths}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_access = dict(doc, scenarios=[r for r in doc["scenarios"] if r["kind"] != "access"])
    assert not {p.name for p in write_plots(no_access, tmp_path / "b")} & ours
    only_access = dict(doc, scenarios=[r for r in doc["scenarios"] if r["kind"] == "access"])
    assert {p.name for p in write_plots(only_access, tmp_path / "c")} == ours


def test_comparison_uses_pages_per_second_and_older_baselines_still_compare(doc):
    assert not regressions(compare_results(doc, doc))
    slow = copy.deepcopy(doc)
    r = next(r for r in slow["scenarios"] if r["id"] == "access/stream/b256/copy")
    r["pages_per_s"] /= 2
    r["wall_ns"] = [w * 2 for w in r["wall_ns"]]
    bad = regressions(compare_results(slow, doc))
    assert [c.id for c in bad] == ["access/stream/b256/copy"] and bad[0].ratio == pytest.approx(0.5)
    # A baseline from before device access: no access settings, no access records; still comparable.
    old = copy.deepcopy(doc)
    old["scenarios"] = [r for r in old["scenarios"] if r["kind"] != "access"]
    for k in ("access", "access_bytes", "fault_batches", "oversubscription"):
        del old["settings"][k]
    validate_results(old)
    comps = compare_results(doc, old)
    assert not regressions(comps)
    assert all(c.note == "not in baseline" for c in comps if c.id.startswith("access/"))
    other = copy.deepcopy(doc)
    other["settings"]["access_bytes"] = 64 << 20
    with pytest.raises(NotComparable, match="access_bytes"):
        check_comparable(doc, other)


# -- verification ------------------------------------------------------------------------------------------------

@pytest.fixture
def corrupting_device_reads(monkeypatch):
    """The device's in-place reads flip one byte of the first page they return: fast and wrong."""
    import dmamig.uvm.access as access

    real = access.load

    def corrupt(m, node, pfns):
        out = real(m, node, pfns)
        out[0, 5] ^= 0xFF
        return out

    monkeypatch.setattr(access, "load", corrupt)


@pytest.mark.parametrize("pattern", ["stream", "random", "stencil"])
def test_a_wrong_byte_read_fails_verification(pattern, corrupting_device_reads):
    s = dataclasses.replace(default_settings("cpu", quick=True), access_bytes=4 << 20)
    sc = AccessScenario(pattern, "nocopy", 256, 4 << 20, 2, 2.0 if pattern == "stencil" else None)
    with pytest.raises(VerificationError, match="differ from"):
        run_access(sc, s, lambda label, n: None, seed=1)


def test_access_tasks_run_through_run_task():
    s = dataclasses.replace(default_settings("cpu", quick=True), access_bytes=2 << 20, fault_batches=[256],
                            oversubscription=[1.0])
    task = next(t for t in access_tasks(s) if t.id == "access/strided/b256/copy")
    steps = []
    recs = run_task(task, s, {}, lambda label, n: steps.append(n))
    assert [r["id"] for r in recs] == [task.id] and sum(steps) == task.steps
    assert recs[0]["pages"] == 32 and recs[0]["verified"]


# -- the command line --------------------------------------------------------------------------------------------

SMALL = ["bench", "--quick", "--backend", "cpu", "--no-plots", "--sizes", "64k", "--total", "1M", "--channels",
         "1", "--no-engine", "--no-files"]


def test_no_access_drops_them(tmp_path):
    out = tmp_path / "r"
    assert main([*SMALL, "--no-access", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert {s["kind"] for s in doc["scenarios"]} == {"migrate"} and doc["settings"]["access"] is False


def test_faithful_only_keeps_access_and_the_axes_reach_the_sweep(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*SMALL, "--faithful-only", "--access-total", "4M", "--fault-batch", "1024",
                 "--oversubscription", "1", "--out", str(out)]) == 0
    doc = load_results(out / "results.json")
    ids = {r["id"] for r in doc["scenarios"] if r["kind"] == "access"}
    assert {"access/stream/b256/copy", "access/stream/b1024/nocopy/ch1", "access/stencil/1x/b256/copy"} <= ids
    assert all(r["bytes"] <= 4 << 20 for r in doc["scenarios"] if r["kind"] == "access")
    assert doc["settings"]["access_bytes"] == 4 << 20
    err = capsys.readouterr().err
    assert "device access 4M, fault batches 256,1024, stencil at 1x device memory" in err
    assert np.all([r["verified"] for r in doc["scenarios"]])
