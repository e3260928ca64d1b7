"""The policy study and the replay comparison: rows for every replay, the report command's exit codes."""

from __future__ import annotations

import json

from dmamig.cli import main
from dmamig.tiering.study import ROW_FIELDS, compare, run_study


def test_study_writes_rows_table_and_figure(tmp_path):
    rows = run_study(tmp_path, workloads=("zipf", "sequential"), policies=("first-touch", "tpp"),
                     workload_kw={"pages": 64, "epochs": 3, "per_epoch": 64})
    assert [(r["workload"], r["policy"], r["mode"]) for r in rows][:3] == [
        ("zipf", "first-touch", "copy"), ("zipf", "first-touch", "no-copy"), ("zipf", "tpp", "copy")]
    assert len(rows) == 8 and all(r["verified"] for r in rows) and set(rows[0]) == set(ROW_FIELDS)
    assert (tmp_path / "study.png").stat().st_size > 1000
    assert (tmp_path / "study.md").read_text().count("\n") == 2 + 8
    assert compare([tmp_path / "study.json"]) == rows


def test_replay_report_compares_and_fails_on_unverified(tmp_path, capsys):
    assert main(["replay", "uniform", "--pages", "48", "--epochs", "2", "--per-epoch", "32", "--no-plots",
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["replay-report", str(tmp_path / "a"), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| uniform | tpp | copy |" in out and "| uniform | tpp | no-copy |" in out
    doc = json.loads((tmp_path / "a" / "results.json").read_text())
    doc["runs"][1]["summary"]["verified"] = False
    (tmp_path / "a" / "results.json").write_text(json.dumps(doc))
    assert main(["replay-report", str(tmp_path / "a")]) == 1
    assert main(["replay-report", str(tmp_path / "missing.json")]) == 1


def test_report_compares_replays_as_it_compares_benches(capsys):
    """``dmamig report`` given results of ``dmamig replay`` prints the replay comparison."""
    from pathlib import Path

    from dmamig.cli import main

    result = Path(__file__).parent.parent / "benchmarks" / "results" / "policy-study-cpu-2026-11-25" / "phases-tpp"
    assert main(["report", str(result / "results.json"), str(result)]) == 0
    out = capsys.readouterr().out
    assert "replay-report" in out and "tpp" in out and "no-copy" in out
