"""The main job's guarantees: unique output folders, a sound regression gate, clean CLI errors, Ctrl-C."""

from __future__ import annotations

import copy
import datetime as dt
import json
import os

import numpy as np
import pytest
from support import interrupt_bench_after
from test_bench_report import make_doc

from dmamig.bench.results import NotComparable, compare_results, ratio_interval, regressions, write_json
from dmamig.cli import OutputError, bench_folder, main

TINY = ["bench", "--quick", "--backend", "cpu", "--no-plots", "--sizes", "64k", "--total", "1M",
        "--channels", "1", "--no-engine", "--faithful-only"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("dmamig", "usage")) and len(last) > 20
    return last


# -- output folders -------------------------------------------------------------------------------------------
def test_two_runs_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = dt.datetime(2026, 11, 25, 12, 0, 0)
    folders = [bench_folder(None, now)[0] for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() for f in folders)
    assert [f.name for f in folders] == ["20261125-120000", "20261125-120000-2", "20261125-120000-3"]


def test_results_are_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    before = (out / "results.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--out", str(out)])
    assert exc.value.code == 2 and "never overwritten" in one_line_error(capsys)
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize("target, words", [("file", "is a file"), ("/proc", "cannot write"),
                                           ("/proc/dmamig", "cannot create")])
def test_unusable_out_is_a_usage_error(tmp_path, capsys, target, words):
    path = tmp_path / "f" if target == "file" else target
    if target == "file":
        path.write_text("x")
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--out", str(path)])
    assert exc.value.code == 2 and words in one_line_error(capsys)


def test_read_only_out_is_a_usage_error(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anywhere: make the probe meet what a read-only folder gives
        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr("dmamig.cli.tempfile.NamedTemporaryFile", denied)
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--out", str(ro / "sub")])
    assert exc.value.code == 2 and "Permission denied" in one_line_error(capsys)
    assert main(["report", str(_doc_file(tmp_path)), "--out", str(ro)]) == 2
    assert "Permission denied" in one_line_error(capsys)


def test_total_beyond_memory_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([*TINY[:-6], "--total", "100T"])
    assert exc.value.code == 2 and "does not fit" in one_line_error(capsys)


def test_out_error_names_the_folder():
    with pytest.raises(OutputError, match="/proc"):
        bench_folder(__import__("pathlib").Path("/proc/x"))


# -- report on bad files ------------------------------------------------------------------------------------------
def _doc_file(tmp_path, doc=None, name="r.json"):
    p = tmp_path / name
    write_json(doc or make_doc(), p)
    return p


@pytest.mark.parametrize("content, words", [(bytes(range(256)) * 4, "binary"), (b'{"a":', "not JSON"),
                                            (b"[1, 2]", "not valid"), (b"", "not JSON")])
def test_report_on_a_bad_file_is_one_line_and_exit_2(tmp_path, capsys, content, words):
    (tmp_path / "bad.json").write_bytes(content)
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    assert words in one_line_error(capsys)


# -- the regression gate ---------------------------------------------------------------------------------------
def test_a_run_without_scenarios_fails_the_gate(tmp_path, capsys):
    base = make_doc()
    empty = copy.deepcopy(base)
    empty["scenarios"] = []
    comps = compare_results(empty, base, 0.1)
    assert len(regressions(comps)) == len(base["scenarios"])
    assert all(c.note == "missing from this run" for c in comps)
    assert main(["report", str(_doc_file(tmp_path, empty, "n.json")), str(_doc_file(tmp_path, base))]) == 1


def test_a_partial_run_says_so(tmp_path):
    base = make_doc()
    part = copy.deepcopy(base)
    part["scenarios"] = part["scenarios"][:2]
    part["partial"] = True
    missing = [c for c in compare_results(part, base, 0.1) if c.regressed]
    assert len(missing) == len(base["scenarios"]) - 2 and "partial" in missing[0].note


@pytest.mark.parametrize("key, value", [("quick", True), ("total_bytes", 16 << 20), ("backend", "cuda"),
                                        ("page_size", 65536)])
def test_runs_with_other_settings_are_refused(tmp_path, capsys, key, value):
    base = make_doc()
    new = copy.deepcopy(base)
    new["settings"][key] = value
    with pytest.raises(NotComparable, match=key):
        compare_results(new, base, 0.1)
    assert main(["report", str(_doc_file(tmp_path, new, "n.json")), str(_doc_file(tmp_path, base))]) == 2
    assert "not comparable" in one_line_error(capsys)


def test_runs_whose_dma_waits_differ_are_refused_once_both_record_it():
    base = make_doc()
    base["settings"]["dma_poll_us"] = 1000.0
    new = copy.deepcopy(base)
    new["settings"]["dma_poll_us"] = 0.0  # channels that sleep: another engine's timing
    with pytest.raises(NotComparable, match="dma_poll_us"):
        compare_results(new, base, 0.1)
    del base["settings"]["dma_poll_us"]  # a baseline from before the setting was recorded
    assert not [c for c in compare_results(new, base, 0.1) if c.regressed]


def test_scenario_options_that_differ_fail_the_gate():
    base = make_doc()
    new = copy.deepcopy(base)
    sc = next(s for s in new["scenarios"] if s.get("options"))
    sc["options"] = {**sc["options"], "batch_pages": 2048}
    bad = regressions(compare_results(new, base, 0.1))
    assert [c.id for c in bad] == [sc["id"]] and "differs" in bad[0].note


def _noisy(doc, rng, spread, slow=1.0):
    """Give every scenario 5 repetitions with relative noise ``spread``, all ``slow`` times slower."""
    for s in doc["scenarios"]:
        med = s["median_wall_ns"] * slow
        walls = (med * (1 + spread * rng.standard_normal(5))).clip(med * 0.5).astype(int)
        s["wall_ns"] = walls.tolist()
        factor = s["median_wall_ns"] / float(np.median(walls))
        for k in ("gbps", "pages_per_cpu_s", "ceiling_ratio"):
            if s.get(k) is not None:
                s[k] *= factor
        s["median_wall_ns"] = float(np.median(walls))


def test_noise_beyond_the_threshold_is_rarely_flagged():
    """Repetitions 20 % apart: many medians differ by more than 10 %, few changes are significant."""
    beyond = flagged = total = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        base, new = make_doc(), make_doc()
        _noisy(base, rng, 0.2)
        _noisy(new, rng, 0.2)
        comps = compare_results(new, base, 0.1)
        total += len(comps)
        beyond += sum(c.ratio < 0.9 for c in comps)
        flagged += sum(c.regressed for c in comps)
        assert all("not significant" in c.note for c in comps if c.ratio < 0.9 and not c.regressed)
    assert beyond > 0.1 * total and flagged <= 0.05 * total


def test_a_real_slowdown_is_flagged():
    rng = np.random.default_rng(4)
    base, new = make_doc(), make_doc()
    _noisy(base, rng, 0.02)
    _noisy(new, rng, 0.02, slow=1.5)
    comps = compare_results(new, base, 0.1)
    assert all(c.regressed and c.high < 1 for c in comps)


def test_ratio_interval_is_seeded_and_needs_three_repetitions():
    a, b = [100, 110, 105, 98, 120], [150, 149, 160, 155, 151]
    assert ratio_interval(b, a, 0.7) == ratio_interval(b, a, 0.7)
    ci = ratio_interval(b, a, 0.7)
    assert ci.low < 0.7 < ci.high < 1 and ci.slower
    assert not ratio_interval([1, 2], a, 0.5).tested


def test_a_quick_run_is_refused_against_a_full_baseline(tmp_path, capsys):
    base = make_doc()
    quick = copy.deepcopy(base)
    quick["settings"]["quick"] = True
    assert main(["report", str(_doc_file(tmp_path, quick, "q.json")), str(_doc_file(tmp_path, base))]) == 2
    assert "quick True vs baseline False" in one_line_error(capsys)


# -- Ctrl-C -----------------------------------------------------------------------------------------------------
def test_ctrl_c_keeps_the_finished_scenarios_marked_partial(tmp_path, capsys, monkeypatch):
    interrupt_bench_after(monkeypatch, 1)
    out = tmp_path / "run"
    assert main([*TINY[:-4], "--channels", "1,2", "--faithful-only", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1]
    doc = json.loads((out / "results.json").read_text())
    assert doc["partial"] is True and doc["scenarios"]
    assert all(s["verified"] for s in doc["scenarios"])
    assert main(["report", str(out / "results.json")]) == 0
    assert "PARTIAL" in capsys.readouterr().out


def test_ctrl_c_before_anything_finished_leaves_no_folder(tmp_path, capsys, monkeypatch):
    interrupt_bench_after(monkeypatch, 0)
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 130
    assert "nothing written" in capsys.readouterr().err
    assert not out.exists()
