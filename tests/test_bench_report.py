"""Results documents: schema validation, CSV, tables, plots and the baseline comparison of ``dmamig report``."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from support import check_results_schema, jsonschema_or_skip

from dmamig.bench import migration
from dmamig.bench.environment import machine_info
from dmamig.bench.migration import scenario_record
from dmamig.bench.report import render_tables, write_plots
from dmamig.bench.results import (
    CSV_FIELDS,
    RESULTS_SCHEMA,
    SCHEMA_VERSION,
    ResultsError,
    compare_results,
    load_results,
    primary_metric,
    regressions,
    validate_results,
    write_csv,
    write_json,
)
from dmamig.bench.runner import add_speedups, build_sweep
from dmamig.bench.settings import BenchSettings
from dmamig.cli import main

#: A results file of schema 1 (before settings were recorded), kept from an earlier sample run: it is refused.
LEGACY = Path(__file__).resolve().parent / "data" / "results_schema1.json"

CEIL = {"h2d": 10.0, "d2h": 10.0, "d2d": 10.0}


def make_doc(scale: float = 1.0, devices: int = 1) -> dict:
    """A synthetic but schema-complete results document built with the runner's own record builder."""
    settings = BenchSettings(backend="cpu", sizes=[4096, 2 << 20], total_bytes=8 << 20, channels=[1, 2],
                             devices=devices, repeat=3, warmup=1)
    groups, engine = build_sweep(settings)
    ceilings = [{"direction": d, "method": "np.copyto contiguous, host RAM", "bytes": settings.total_bytes,
                 "seconds": settings.total_bytes / (g * 1e9), "gbps": g} for d, g in CEIL.items()]
    cmap = {c["direction"]: c for c in ceilings}
    recs = []
    for g in groups:
        for sc in g.scenarios:
            # Faster for larger folios and for no-copy, so plots and speedups have a shape.
            gbps = scale * (2.0 if sc.mode == "copy" else 4.0) * (1 + sc.order / 9)
            wall = int(sc.total_bytes / (gbps * 1e9) * 1e9)
            phases = [{"unmap": wall // 10, "copy": wall // 2 if sc.mode == "copy" else 0, "move": wall // 10,
                       "undo": 0, "dma_wait": 0 if sc.mode == "copy" else wall // 2}] * 3
            recs.append(scenario_record(sc, [wall] * 3, [wall // 2] * 3, phases, cmap[sc.direction],
                                        {"nr_succeeded": sc.pages, "nr_failed": 0, "nr_thp_split": 0}))
    for sc in engine:
        wall = int(sc.pages * 50 / scale)
        recs.append(scenario_record(sc, [wall] * 3, [wall] * 3, [], cmap["h2d"] if sc.kind == "dma" else None))
    add_speedups(recs)
    return {"schema_version": SCHEMA_VERSION, "created": "2026-01-01T00:00:00+00:00", "wall_s": 1.0,
            "machine": machine_info("cpu", []), "settings": settings.to_json(), "ceilings": ceilings,
            "scenarios": recs}


def test_synthetic_document_validates_against_schema():
    doc = make_doc(devices=2)
    jsonschema_or_skip().Draft202012Validator.check_schema(RESULTS_SCHEMA)
    check_results_schema(doc)
    validate_results(json.loads(json.dumps(doc)))
    assert {s["direction"] for s in doc["scenarios"]} == {"h2d", "d2d", "d2h"}


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d.pop("scenarios"), "scenarios"),
    (lambda d: d["scenarios"][0].update(gbps=-1.0), "scenarios/0/gbps"),
    (lambda d: d["scenarios"][0].update(kind="teleport"), "scenarios/0/kind"),
    (lambda d: d["settings"].update(channels=[]), "settings/channels"),
    (lambda d: d.update(schema_version=99), "schema_version"),
])
def test_invalid_documents_are_rejected_naming_the_field(mutate, where):
    doc = make_doc()
    mutate(doc)
    with pytest.raises(ResultsError, match="not valid|schema_version|scenarios"):
        validate_results(doc)
    try:
        validate_results(doc)
    except ResultsError as exc:
        assert where.split("/")[0] in str(exc)


def test_load_results_errors_are_clear(tmp_path):
    with pytest.raises(ResultsError, match="cannot read"):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ResultsError, match="is not JSON"):
        load_results(bad)


def test_csv_has_one_row_per_scenario(tmp_path):
    doc = make_doc()
    write_csv(doc, tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == len(doc["scenarios"])
    assert list(rows[0]) == CSV_FIELDS
    assert float(rows[0]["gbps"]) == pytest.approx(doc["scenarios"][0]["gbps"])
    assert rows[0]["phase_unmap_ns"] != "" and rows[0]["outside_phases_ns"] != ""
    assert rows[0]["batching"] == "faithful" and rows[0]["batch_pages"] == "512" and rows[0]["faithful"] == "True"
    piped = next(r for r in rows if r["pipeline_depth"] == "1")
    assert piped["batches_per_step"] == "16" and piped["speedup_vs"].endswith("/copy/steps16")


def test_tables_render_every_scenario():
    doc = make_doc()
    buf = io.StringIO()
    render_tables(doc, Console(file=buf, width=250, color_system=None))
    out = buf.getvalue()
    assert "host->device" in out and "device->host" in out
    assert "state-only migration (NO_COPY), 4K pages" in out and "DMA copy, random 4K pages, 2 DMA channels" in out
    assert "Ceilings (same run)" in out and "10.00 GB/s" in out
    assert "NO" not in out.replace("no-copy", "").replace("NO_COPY", "")


def test_plots_are_png(tmp_path):
    paths = write_plots(make_doc(devices=2), tmp_path)
    assert [p.name for p in paths] == ["throughput_vs_folio.png", "copy_vs_nocopy.png", "phases.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


@pytest.fixture
def figures(monkeypatch):
    """Every figure the plots save, by file name, kept open for inspection."""
    saved = {}
    real = migration.save_figure

    def keep(plt, fig, path, rect=(0, 0, 1, 1)):
        saved[path.name] = fig
        fig.canvas.draw()  # lay out as the real save does, so tick labels exist
        real(plt, fig, path, rect)

    monkeypatch.setattr(migration, "save_figure", keep)
    return saved


def _texts(fig) -> str:
    parts = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        parts.append(ax.get_title())
        parts += [t.get_text() for t in ax.get_xticklabels()]
        if ax.get_legend():
            parts += [t.get_text() for t in ax.get_legend().get_texts()]
    for leg in fig.legends:
        parts += [t.get_text() for t in leg.get_texts()]
    return "\n".join(parts)


def test_plot_titles_name_backend_working_set_and_settings(tmp_path, figures):
    write_plots(make_doc(), tmp_path)
    assert set(figures) == {"throughput_vs_folio.png", "copy_vs_nocopy.png", "phases.png"}
    for name, fig in figures.items():
        title = fig._suptitle.get_text()
        assert "cpu backend" in title and "8M working set" in title and "median of 3" in title, name
        assert "faithful" in title, name
        assert " ch" not in _texts(fig).replace(" channel", ""), name  # "DMA channels", never "ch"
    # The pipelined experiment is in the throughput and phase plots, named, never in the headline bars.
    assert "experiment: no-copy, 2 DMA channels, 16 batches/step, DMA overlaps next unmap" in \
        _texts(figures["throughput_vs_folio.png"])
    assert "hatched bars experiment settings" in figures["phases.png"]._suptitle.get_text()
    assert "16 batches/step" not in _texts(figures["copy_vs_nocopy.png"])


def test_throughput_axes_start_at_zero(tmp_path, figures):
    write_plots(make_doc(devices=2), tmp_path)
    for name in ("throughput_vs_folio.png", "copy_vs_nocopy.png", "phases.png"):
        for ax in figures[name].axes:
            assert ax.get_ylim()[0] == 0, name


def test_phase_plot_stacks_ns_per_page_and_explains_outside(tmp_path, figures):
    doc = make_doc()
    write_plots(doc, tmp_path)
    fig = figures["phases.png"]
    assert "nanoseconds per base page" in fig._suptitle.get_text()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    # Isolation and put-back are phases of their own (or, in older results, named in the grey's legend).
    assert any(t.startswith("isolate:") for t in legend) or \
        any(t.startswith("outside phases: validation, isolation, put-back") for t in legend)
    assert any(t.startswith("outside phases:") and "result" in t for t in legend)
    assert any(t.startswith("unmap: lock") for t in legend) and any(t.startswith("dma_wait") for t in legend)
    # Heights are ns per page, not shares: the copy bar of host->device 4K sums to wall / pages.
    rec = next(s for s in doc["scenarios"] if s["id"] == "migrate/h2d/4k/copy")
    ax = fig.axes[0]
    first_bar_top = max(p.get_y() + p.get_height() for p in ax.patches if abs(p.get_x() + p.get_width() / 2) < 0.01)
    assert first_bar_top == pytest.approx(rec["median_wall_ns"] / rec["pages"])
    assert "copy" in [t.get_text() for t in ax.get_xticklabels()][0]


def test_older_schema_results_are_refused_saying_what_to_do(tmp_path, capsys):
    with pytest.raises(ResultsError) as err:
        load_results(LEGACY)
    msg = str(err.value)
    assert "schema_version 1" in msg and f"schema_version {SCHEMA_VERSION} only" in msg
    assert "rerun dmamig bench" in msg
    # As a baseline too: dmamig report says so and exits 2, before comparing anything.
    new = tmp_path / "new.json"
    write_json(make_doc(), new)
    assert main(["report", str(new), str(LEGACY)]) == 2
    assert "schema_version 1" in capsys.readouterr().err
    doc = make_doc()
    doc["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ResultsError, match="newer dmamig"):
        validate_results(doc)


def test_tables_say_faithful_or_experiment_per_row():
    doc = make_doc()
    buf = io.StringIO()
    render_tables(doc, Console(file=buf, width=300, color_system=None))
    out = buf.getvalue()
    faithful, rest = out.split("Migration, experiment settings", 1)
    assert "Migration, faithful" in faithful and "pipelined" not in faithful
    assert "DMA channels" in faithful and "faithful copy" in faithful
    experiments = rest.split("Engine", 1)[0]
    rows = [ln for ln in experiments.splitlines() if "host->device" in ln or "device->host" in ln]
    assert rows and all("pipelined" in ln or "experiment" in ln for ln in rows)
    assert "copy with 16 batches/step" in experiments  # what the pipelined ratio divides by


def test_schema_2_requires_recorded_settings_and_schema_1_is_refused():
    doc = make_doc()
    del doc["scenarios"][0]["options"]
    with pytest.raises(ResultsError, match="options"):
        validate_results(doc)
    doc["schema_version"] = 1
    for s in doc["scenarios"]:
        s.pop("options", None), s.pop("name"), s.pop("batching")
    with pytest.raises(ResultsError, match="schema_version 1"):
        validate_results(doc)


def test_compare_same_run_has_no_regression():
    doc = make_doc()
    comps = compare_results(doc, doc, 0.1)
    assert len(comps) == len(doc["scenarios"])
    assert all(c.ratio == pytest.approx(1.0) for c in comps)
    assert regressions(comps) == []


def test_compare_flags_only_scenarios_beyond_threshold():
    base = make_doc()
    new = copy.deepcopy(base)
    slow = new["scenarios"][3]
    slow["gbps"] *= 0.85
    bit_slow = new["scenarios"][4]
    bit_slow["gbps"] *= 0.95
    bad = regressions(compare_results(new, base, 0.1))
    assert [c.id for c in bad] == [slow["id"]]
    assert bad[0].ratio == pytest.approx(0.85)
    # A tighter threshold catches both; a looser one neither.
    assert len(regressions(compare_results(new, base, 0.01))) == 2
    assert regressions(compare_results(new, base, 0.2)) == []


def test_compare_state_scenarios_use_cpu_rate_and_missing_scenarios_regress():
    base = make_doc()
    new = copy.deepcopy(base)
    state = next(s for s in new["scenarios"] if s["kind"] == "state")
    assert primary_metric(state) == state["pages_per_cpu_s"]
    state["pages_per_cpu_s"] *= 0.5
    dropped = new["scenarios"].pop(0)
    comps = compare_results(new, base, 0.1)
    assert [c.id for c in regressions(comps)] == [state["id"], dropped["id"]]
    missing = next(c for c in comps if c.id == dropped["id"])
    assert missing.note == "missing from this run" and missing.regressed


def test_compare_unverified_scenario_regresses():
    base = make_doc()
    new = copy.deepcopy(base)
    new["scenarios"][0]["verified"] = False
    assert [c.id for c in regressions(compare_results(new, base, 0.1))] == [new["scenarios"][0]["id"]]


def test_ceiling_ratio_metric_factors_out_machine_speed():
    base = make_doc()
    new = make_doc(scale=0.5)  # everything half as fast ...
    for s in new["scenarios"]:  # ... on a machine whose ceiling is also half
        if s["ceiling_gbps"]:
            s["ceiling_gbps"] /= 2
            s["ceiling_ratio"] = s["gbps"] / s["ceiling_gbps"]
    assert regressions(compare_results(new, base, 0.1, "throughput"))
    comps = compare_results(new, base, 0.1, "ceiling-ratio")
    # State-only scenarios have no ceiling and fall back to throughput: only they regress.
    assert {c.id.split("/")[0] for c in regressions(comps)} == {"state"}


def test_comparison_names_scenarios_in_words():
    doc = make_doc()
    comps = compare_results(doc, copy.deepcopy(doc), 0.1)
    assert comps[0].name == doc["scenarios"][0]["name"] and comps[0].note == ""


def test_report_command_exit_codes(tmp_path, capsys):
    base = make_doc()
    new = copy.deepcopy(base)
    victim = new["scenarios"][1]
    victim["gbps"] *= 0.5
    write_json(base, tmp_path / "base.json")
    write_json(new, tmp_path / "new.json")
    assert main(["report", str(tmp_path / "base.json")]) == 0
    assert main(["report", str(tmp_path / "base.json"), str(tmp_path / "base.json")]) == 0
    capsys.readouterr()
    assert main(["report", str(tmp_path / "new.json"), str(tmp_path / "base.json"), "--threshold", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "1 scenario(s) regressed" in err and victim["id"] in err and "0.500x baseline" in err
    assert victim["name"] in err
    assert main(["report", str(tmp_path / "new.json"), str(tmp_path / "base.json"), "--threshold", "0.6"]) == 0


def test_report_out_writes_csv_and_plots(tmp_path):
    write_json(make_doc(), tmp_path / "r.json")
    assert main(["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "copy_vs_nocopy.png", "phases.png", "results.csv", "throughput_vs_folio.png"]


def test_report_on_invalid_file_exits_2(tmp_path, capsys):
    doc = make_doc()
    del doc["scenarios"][0]["gbps"]
    write_json(doc, tmp_path / "r.json")
    assert main(["report", str(tmp_path / "r.json")]) == 2
    assert "gbps" in capsys.readouterr().err


def test_report_takes_the_folder_bench_wrote(tmp_path, capsys):
    """bench prints its folder as its result: report takes that folder, and names what an empty one lacks."""
    run = tmp_path / "run"
    run.mkdir()
    write_json(make_doc(), run / "results.json")
    assert main(["report", str(run), str(run)]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "holds no results.json" in err and "Is a directory" not in err


def test_report_calls_a_slowdown_with_too_few_repetitions_inconclusive(tmp_path, capsys):
    """With one repetition a side nothing can be resampled: a slowdown beyond the threshold is reported as
    inconclusive, by name, and the comparison exits 0; the same slowdown with 3 repetitions regresses."""
    base = make_doc()
    new = copy.deepcopy(base)
    for doc in (base, new):
        for s in doc["scenarios"]:
            s["wall_ns"] = s["wall_ns"][:1]
    victim = new["scenarios"][1]
    victim["gbps"] *= 0.5
    comps = compare_results(new, base, 0.1)
    assert regressions(comps) == []
    unsure = [c for c in comps if c.inconclusive]
    assert [c.id for c in unsure] == [victim["id"]] and "inconclusive" in unsure[0].note
    write_json(base, tmp_path / "base.json")
    write_json(new, tmp_path / "new.json")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "new.json"), str(tmp_path / "base.json")]) == 0
    err = capsys.readouterr().err
    assert "1 scenario(s) inconclusive" in err and victim["id"] in err and "0.500x baseline" in err
    assert "1 inconclusive" in err


def test_report_help_prints_a_plain_percent(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    out = capsys.readouterr().out
    assert "95% bootstrap" in out and "%%" not in out


def test_a_refusal_gives_sizes_as_sizes(tmp_path, capsys):
    """Runs of other working sets are refused naming the setting, in the units every other message uses."""
    base = make_doc()
    new = copy.deepcopy(base)
    new["settings"]["total_bytes"] = 16 << 20
    write_json(base, tmp_path / "base.json")
    write_json(new, tmp_path / "new.json")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "new.json"), str(tmp_path / "base.json")]) == 2
    err = capsys.readouterr().err
    assert "total_bytes 16M vs baseline 8M" in err and "8388608" not in err


def test_csv_and_tables_carry_the_spread_of_the_repetitions(tmp_path, capsys):
    """Medians alone hide noise: the CSV has min, max and IQR of the repetitions' wall times and the GB/s
    of the slowest and fastest; the migration tables show that GB/s range."""
    import csv

    doc = make_doc()
    sc = doc["scenarios"][0]
    w = sc["median_wall_ns"]
    sc["wall_ns"] = [w / 2, w, 2 * w]
    write_json(doc, tmp_path / "r.json")
    assert main(["report", str(tmp_path / "r.json"), "--out", str(tmp_path / "o")]) == 0
    row = next(csv.DictReader(open(tmp_path / "o" / "results.csv")))
    assert float(row["min_wall_ns"]) == w / 2 and float(row["max_wall_ns"]) == 2 * w
    assert float(row["iqr_wall_ns"]) == pytest.approx(0.75 * w)
    assert float(row["gbps_min"]) == pytest.approx(sc["gbps"] / 2)
    assert float(row["gbps_max"]) == pytest.approx(sc["gbps"] * 2)
    out = capsys.readouterr().out
    assert "min-max" in out and f"{sc['gbps'] / 2:.2f}-{sc['gbps'] * 2:.2f}" in out
