"""The benchmark sweep: scenario generation, figures, ceilings, and ``dmamig bench --quick`` end to end."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from support import check_results_schema

from dmamig import MigrateOptions
from dmamig.bench.access import access_scenarios, access_tasks
from dmamig.bench.environment import cpu_copy_ceiling, measure_ceilings
from dmamig.bench.migration import PIPELINED, Scenario, scenario_record
from dmamig.bench.results import load_results
from dmamig.bench.runner import add_speedups, build_sweep, sweep_steps
from dmamig.bench.settings import BenchSettings, default_settings
from dmamig.cli import main
from dmamig.migrate.options import FAITHFUL


def test_default_cpu_sweep_covers_sizes_modes_directions_channels():
    s = default_settings("cpu")
    assert s.sizes == [4096, 65536, 2 << 20] and s.total_bytes == 256 << 20 and s.channels == [1, 2]
    groups, engine = build_sweep(s)
    # Headline first, with the kernel's batching: copy once per size (the CPU copies: no channels), no-copy
    # once per channel count.
    faithful = [g for g in groups if g.options.faithful]
    assert groups[:len(faithful)] == faithful and len(faithful) == 3 * (1 + 2)
    ids = [sc.id for g in groups for sc in g.scenarios]
    assert len(ids) == len(set(ids))
    assert "migrate/h2d/4k/copy" in ids and "migrate/d2h/2m/nocopy/ch2" in ids and "migrate/h2d/64k/nocopy/ch1" in ids
    # Then the default experiment, at 4K only: pipelined no-copy per channel count, beside copy at the same
    # batches per step so that its ratio compares like with like.
    exp = groups[len(faithful):]
    assert [(g.mode, g.folio_bytes, g.channels, g.options) for g in exp] == [
        ("copy", 4096, None, MigrateOptions(batches_per_step=16)),
        ("nocopy", 4096, 1, PIPELINED), ("nocopy", 4096, 2, PIPELINED)]
    assert "migrate/h2d/4k/nocopy/ch2/steps16-pipe1" in ids and "migrate/d2h/4k/copy/steps16" in ids
    assert [e.id for e in engine] == ["state/4k", "state/2m", "dma/random/4k/ch2", "dma/contiguous/4k/ch2"]
    assert all(e.options == MigrateOptions() for e in engine if e.kind == "state")
    assert all(e.options is None for e in engine if e.kind == "dma")
    assert sweep_steps(s) == (len(ids) + len(engine)) * (s.warmup + s.repeat) + sum(t.steps for t in access_tasks(s))


def test_without_variants_only_the_kernels_batching_runs():
    s = dataclasses.replace(default_settings("cpu"), variants=False)
    groups, engine = build_sweep(s)
    assert len(groups) == 9 and all(g.options.faithful for g in groups)
    assert all(sc.options.faithful for g in groups for sc in g.scenarios)


def test_sweep_axes_add_experiments_at_every_size_and_skip_pipelines_for_copy():
    s = BenchSettings(backend="cpu", sizes=[4096, 2 << 20], total_bytes=8 << 20, channels=[2],
                      batch_pages=[512, 2048], pipeline=[0, 1], variants=False)
    assert s.option_sets() == [MigrateOptions(), MigrateOptions(pipeline_depth=1), MigrateOptions(batch_pages=2048),
                               MigrateOptions(batch_pages=2048, pipeline_depth=1)]
    groups, engine = build_sweep(s)
    copy = {(g.folio_bytes, g.options) for g in groups if g.mode == "copy"}
    nocopy = {(g.folio_bytes, g.options) for g in groups if g.mode == "nocopy"}
    # A pipeline depth means nothing without a DMA copy to overlap: copy runs each batch size once.
    assert copy == {(f, MigrateOptions(batch_pages=b)) for f in (4096, 2 << 20) for b in (512, 2048)}
    assert nocopy == {(f, o) for f in (4096, 2 << 20) for o in s.option_sets()}
    assert groups[0].options.faithful and groups[1].options.faithful  # the headline comes first
    state = [e for e in engine if e.kind == "state"]
    assert {(e.folio_bytes, e.options) for e in state} == {
        (f, MigrateOptions(batch_pages=b)) for f in (4096, 2 << 20) for b in (512, 2048)}
    assert "state/4k/batch2048" in [e.id for e in state]


def test_two_devices_add_device_to_device_legs():
    s = default_settings("cuda", gpus=4)
    assert s.devices == 2 and s.channels == [1, 2, 4] and s.total_bytes == 1 << 30
    groups, _ = build_sweep(s)
    assert all(g.path == ("h2d", "d2d", "d2h") for g in groups)
    assert default_settings("cuda", gpus=1).devices == 1


def test_quick_sweep_is_small():
    s = default_settings("cpu", quick=True)
    assert s.quick and s.total_bytes <= 16 << 20 and s.repeat == 1 and s.access_bytes <= 16 << 20
    # 32 steps of migration and engine scenarios, 24 of device access (12 scenarios, warm-up and one timed),
    # 32 of the file-backed scenarios (8 tasks of two legs, warm-up and one timed).
    assert sweep_steps(s) <= 90


def test_scenario_ids_and_orders():
    assert Scenario("migrate", 65536, 1 << 20, "nocopy", "d2d", 4).id == "migrate/d2d/64k/nocopy/ch4"
    assert Scenario("migrate", 2 << 20, 1 << 20, "copy", "h2d").order == 9
    assert Scenario("state", 4096, 1 << 20, "state").id == "state/4k"
    assert Scenario("dma", 4096, 1 << 20, "dma", "h2d", 2, "random").pages == 256
    exp = MigrateOptions(batch_pages=2048, batches_per_step=4, pipeline_depth=2)
    assert Scenario("migrate", 4096, 1 << 20, "nocopy", "h2d", 2, options=exp).id == \
        "migrate/h2d/4k/nocopy/ch2/batch2048-steps4-pipe2"


@pytest.mark.parametrize("sc, name", [
    (Scenario("migrate", 4096, 1 << 20, "nocopy", "h2d", 2), "host->device, 4K pages, no-copy, 2 DMA channels"),
    (Scenario("migrate", 4096, 1 << 20, "nocopy", "d2h", 1), "device->host, 4K pages, no-copy, 1 DMA channel"),
    (Scenario("migrate", 2 << 20, 1 << 20, "copy", "d2d"), "device->device, 2M folios, copy"),
    (Scenario("migrate", 4096, 1 << 20, "nocopy", "h2d", 2, options=PIPELINED),
     "host->device, 4K pages, no-copy, 2 DMA channels, pipelined (16 batches/step, DMA overlaps next unmap)"),
    (Scenario("migrate", 65536, 1 << 20, "copy", "h2d", options=MigrateOptions(batch_pages=2048)),
     "host->device, 64K folios, copy, experiment (2048-page batches)"),
    (Scenario("state", 2 << 20, 1 << 20, "state"), "state-only migration (NO_COPY), 2M folios"),
    (Scenario("dma", 4096, 1 << 20, "dma", "h2d", 2, "random", options=None),
     "DMA copy, random 4K pages, 2 DMA channels"),
])
def test_scenario_names_are_words(sc, name):
    assert sc.name == name
    assert "/" not in sc.name.replace("batches/step", "")


def test_figures_use_medians_and_ratios():
    sc = Scenario("migrate", 4096, 1 << 30, "nocopy", "h2d", 2)
    walls = [3_000_000_000, 1_000_000_000, 2_000_000_000]
    ceiling = {"gbps": 2.0, "method": "np.copyto"}
    phases = [{"unmap": 100, "dma_wait": 10}, {"unmap": 300, "dma_wait": 30}, {"unmap": 200, "dma_wait": 20}]
    r = scenario_record(sc, walls, [262144 * 100] * 3, phases, ceiling)
    assert r["median_wall_ns"] == 2e9
    assert r["gbps"] == pytest.approx((1 << 30) / 2 / 1e9)
    assert r["ceiling_ratio"] == pytest.approx(r["gbps"] / 2.0)
    assert r["cpu_ns_per_page"] == pytest.approx(100)
    assert r["pages_per_cpu_s"] == pytest.approx(1e7)
    assert r["phase_ns"]["unmap"] == 200 and r["phase_ns"]["copy"] == 0
    assert r["phase_share"]["unmap"] == pytest.approx(1e-7)
    assert r["wall_ns"] == walls and r["verified"]
    # Outside the phases: per repetition, then the median (3e9 - 330, 1e9 - 110, 2e9 - 220).
    assert r["outside_phases_ns"] == 2e9 - 220
    assert r["options"] == {"batch_pages": 512, "batches_per_step": 1, "pipeline_depth": 0, "faithful": True}
    assert r["batching"] == "faithful" and r["name"] == "host->device, 4K pages, no-copy, 2 DMA channels"


def test_figures_keep_phases_the_schema_does_not_name():
    sc = Scenario("migrate", 4096, 1 << 20, "copy", "h2d", options=PIPELINED)
    r = scenario_record(sc, [1000], [500], [{"unmap": 100, "dma_submit": 50}], None)
    assert r["phase_ns"]["dma_submit"] == 50 and r["outside_phases_ns"] == 850
    assert r["options"]["pipeline_depth"] == 1 and not r["options"]["faithful"]
    assert r["batching"] == "pipelined (16 batches/step, DMA overlaps next unmap)"


def _rec(mode, gbps, options=FAITHFUL, ch=2, folio=4096, direction="h2d"):
    sc = Scenario("migrate", folio, 1 << 20, mode, direction, ch if mode == "nocopy" else None, options=options)
    r = scenario_record(sc, [1000], [1000], [], None)
    r["gbps"] = gbps
    return r


def test_speedups_compare_like_with_like():
    copy, copy16 = _rec("copy", 2.0), _rec("copy", 4.0, MigrateOptions(batches_per_step=16))
    nocopy, piped = _rec("nocopy", 3.0), _rec("nocopy", 10.0, PIPELINED)
    big = _rec("nocopy", 5.0, MigrateOptions(batch_pages=2048))
    other = _rec("nocopy", 9.0, direction="d2h")
    recs = [copy, copy16, nocopy, piped, big, other]
    add_speedups(recs)
    assert nocopy["speedup_vs_copy"] == 1.5 and nocopy["speedup_vs"] == copy["id"]
    # Pipelined runs 16 batches per step: it divides by copy at 16 batches per step, and says so.
    assert piped["speedup_vs_copy"] == 2.5 and piped["speedup_vs"] == "migrate/h2d/4k/copy/steps16"
    assert piped["speedup_vs_faithful_copy"] == 5.0
    # No copy ran with 2048-page batches: the faithful copy stands in, named.
    assert big["speedup_vs_copy"] == 2.5 and big["speedup_vs"] == copy["id"]
    assert other["speedup_vs_copy"] is None and copy["speedup_vs_copy"] is None


def test_cpu_ceiling_is_measured_once_for_every_direction():
    secs = cpu_copy_ceiling(4 << 20, repeat=2)
    assert 0 < secs < 1
    out = measure_ceilings(object(), "cpu", 4 << 20, ["h2d", "d2h"], repeat=2)
    assert [c["direction"] for c in out] == ["h2d", "d2h"]
    assert out[0]["gbps"] == out[1]["gbps"] > 0 and "np.copyto" in out[0]["method"]


def test_backend_ceiling_is_used_when_offered():
    class Fake:
        def copy_ceiling(self, direction, nbytes, repeat):
            return {"h2d": 0.1, "d2h": 0.2, "d2d": 0.01}[direction]

    out = measure_ceilings(Fake(), "cuda", 10**9, ["h2d", "d2h", "d2d"])
    assert [c["gbps"] for c in out] == pytest.approx([10.0, 5.0, 100.0])
    assert "pinned H2D" in out[0]["method"] and "CUDA events" in out[2]["method"]


def test_bench_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["bench", "--quick", "--backend", "cpu", "--out", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["access_fault_batch.png", "access_oversubscription.png", "access_service.png",
                     "copy_vs_nocopy.png", "phases.png", "results.csv", "results.json", "throughput_vs_folio.png"]
    doc = json.loads((out / "results.json").read_text())
    check_results_schema(doc)
    load_results(out / "results.json")
    scs = doc["scenarios"]
    assert all(s["verified"] and s["gbps"] > 0 for s in scs)
    mig = [s for s in scs if s["kind"] == "migrate"]
    faithful = [s for s in mig if s["options"]["faithful"]]
    assert {(s["direction"], s["mode"], s["folio_bytes"]) for s in faithful} == {
        (d, m, f) for d in ("h2d", "d2h") for m in ("copy", "nocopy") for f in (4096, 2 << 20)}
    assert all(s["batching"] == "faithful" and s["options"] == MigrateOptions().as_dict() for s in faithful)
    # The default experiment, labelled as one: pipelined no-copy at 4K, against copy at 16 batches/step.
    piped = [s for s in mig if s["options"]["pipeline_depth"]]
    assert {s["direction"] for s in piped} == {"h2d", "d2h"} and all(s["folio_bytes"] == 4096 for s in piped)
    for s in piped:
        assert s["options"] == PIPELINED.as_dict() and s["batching"].startswith("pipelined (16 batches/step")
        assert s["id"].endswith("/steps16-pipe1") and "pipelined" in s["name"]
        assert s["speedup_vs"] == f"migrate/{s['direction']}/4k/copy/steps16"
    for s in mig:
        assert s["ceiling_gbps"] > 0 and s["ceiling_ratio"] == pytest.approx(s["gbps"] / s["ceiling_gbps"])
        assert s["nr_failed"] == 0 and s["nr_succeeded"] == s["pages"]
        assert (s["speedup_vs_copy"] is None) == (s["mode"] == "copy")
        assert s["outside_phases_ns"] is not None and s["outside_phases_ns"] >= 0
    for s in faithful:
        if s["mode"] == "nocopy":  # the headline ratio: faithful no-copy over faithful copy
            assert s["speedup_vs"] == f"migrate/{s['direction']}/{s['id'].split('/')[2]}/copy"
            assert s["speedup_vs_copy"] == s["speedup_vs_faithful_copy"]
    assert all(s["options"] is None for s in scs if s["kind"] == "dma")
    state = [s for s in scs if s["kind"] == "state"]
    assert state and all(s["pages_per_cpu_s"] > 0 for s in state)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(scs)
    captured = capsys.readouterr()
    printed = captured.out
    assert "Migration, faithful" in printed and "Migration, experiment settings" in printed
    assert "x ceiling" in printed and "DMA channels" in printed
    assert doc["settings"]["dma_poll_us"] == 1000.0 and "DMA waits poll 1000 us" in printed
    assert "faithful batching + experiments: pipelined (16 batches/step" in captured.err
    # The written file re-renders and compares with itself without a regression.
    assert main(["report", str(out / "results.json"), str(out / "results.json")]) == 0


def test_selftest_cpu_passes(capsys):
    assert main(["selftest", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "no frames leaked" in out


def test_quick_settings_can_be_overridden_from_the_command_line(tmp_path):
    out = tmp_path / "r"
    assert main(["bench", "--quick", "--backend", "cpu", "--sizes", "64k", "--total", "1M", "--channels", "1",
                 "--no-engine", "--no-access", "--no-files", "--no-plots", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["sizes"] == [65536] and doc["settings"]["total_bytes"] == 1 << 20
    assert {s["kind"] for s in doc["scenarios"]} == {"migrate"}
    assert not list(out.glob("*.png"))


def test_a_poll_window_is_a_recorded_setting(tmp_path, capsys, monkeypatch):
    from dmamig.machine import Machine

    made = []
    real = Machine.__init__

    def spy(self, *a, **kw):
        made.append(kw.get("dma_poll_us"))
        real(self, *a, **kw)

    monkeypatch.setattr(Machine, "__init__", spy)
    out = tmp_path / "r"
    assert main(["bench", "--quick", "--backend", "cpu", "--sizes", "4k", "--total", "1M", "--channels", "1",
                 "--dma-poll-us", "0", "--no-engine", "--no-access", "--no-plots", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    check_results_schema(doc)
    assert doc["settings"]["dma_poll_us"] == 0.0 and made and set(made) == {0.0}
    assert "DMA waits sleep at once" in capsys.readouterr().out


def test_the_rfc_preset_runs_beside_the_faithful_figure_and_every_ratio_names_its_copy_baseline(tmp_path, capsys):
    from dmamig.migrate.options import RFC_DMA_OFFLOAD_BATCH_PAGES

    out = tmp_path / "r"
    with pytest.raises(SystemExit) as exc:  # the preset is an experiment setting
        main(["bench", "--quick", "--backend", "cpu", "--rfc-preset", "--faithful-only", "--out", str(out)])
    assert exc.value.code == 2 and "--rfc-preset" in capsys.readouterr().err
    assert main(["bench", "--quick", "--backend", "cpu", "--sizes", "4k", "--total", "1M", "--channels", "1",
                 "--rfc-preset", "--no-engine", "--no-access", "--no-plots", "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    check_results_schema(doc)
    assert doc["settings"]["copy_baseline"] == "cpu"
    assert RFC_DMA_OFFLOAD_BATCH_PAGES in doc["settings"]["batch_pages"]
    mig = [s for s in doc["scenarios"] if s["kind"] == "migrate"]
    rfc = [s for s in mig if s["options"]["batch_pages"] == RFC_DMA_OFFLOAD_BATCH_PAGES]
    assert {s["mode"] for s in rfc} == {"copy", "nocopy"} and any(s["options"]["faithful"] for s in mig)
    assert all(s["batching"].startswith("DMA-offload RFC preset") for s in rfc)
    assert {s["copy_baseline"] for s in mig} == {"cpu"}
    text = capsys.readouterr().out
    assert "copy baseline cpu" in text and "faithful copy (cpu)" in text
    with open(out / "results.csv") as fh:
        assert {row["copy_baseline"] for row in csv.DictReader(fh) if row["kind"] == "migrate"} == {"cpu"}


def test_copy_mode_on_cuda_is_named_the_sync_dma_baseline():
    assert default_settings("cuda", gpus=1).copy_baseline() == "sync-dma"
    assert default_settings("cpu").copy_baseline() == "cpu"


@pytest.mark.parametrize("bad", ["-1", "x", "nan", "2e6", "²"])
def test_a_bad_poll_window_is_a_usage_error(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--backend", "cpu", "--dma-poll-us", bad])
    assert exc.value.code == 2 and "--dma-poll-us" in capsys.readouterr().err


def test_machine_info_makes_device_descriptions_json():
    from dmamig.bench.environment import machine_info

    info = machine_info("cuda", [{"name": "GPU", "memory_bytes": np.int64(80 << 30), "compute_capability": (9, 0),
                                  "peers": [1], "handle": object()}])
    gpu = json.loads(json.dumps(info))["gpus"][0]
    assert gpu["compute_capability"] == [9, 0] and gpu["memory_bytes"] == 80 << 30 and gpu["peers"] == [1]
    assert isinstance(gpu["handle"], str)


@pytest.mark.gpu
def test_bench_quick_on_cuda(tmp_path):
    out = tmp_path / "gpu"
    assert main(["bench", "--quick", "--backend", "cuda", "--out", str(out)]) == 0
    doc = load_results(out / "results.json")
    assert doc["machine"]["backend"] == "cuda" and doc["machine"]["gpus"]
    assert all(s["verified"] for s in doc["scenarios"])
    assert {c["direction"] for c in doc["ceilings"]} >= {"h2d", "d2h"}


@pytest.mark.gpu
def test_selftest_cuda_passes(capsys):
    assert main(["selftest", "--backend", "cuda"]) == 0
    assert "FAIL" not in capsys.readouterr().out


@pytest.fixture
def corrupting_cpu_copy(monkeypatch):
    """The CPU copy path of copy migration flips one byte of every batch it copies: fast and wrong."""
    from dmamig.backends.cpu.backend import CpuBackend

    real = CpuBackend.copy_folios

    def corrupt(self, src, src_idx, dst, dst_idx, nr_pages):
        real(self, src, src_idx, dst, dst_idx, nr_pages)
        dst[int(np.asarray(dst_idx)[0]), 17] ^= 0xFF

    monkeypatch.setattr(CpuBackend, "copy_folios", corrupt)


def test_bench_fails_loudly_on_wrong_data(tmp_path, capsys, corrupting_cpu_copy):
    assert main(["bench", "--quick", "--backend", "cpu", "--no-engine", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "verification FAILED" in err and "migrate/h2d/4k/copy" in err and "wrong content" in err
    assert not (tmp_path / "r" / "results.json").exists()


def test_selftest_fails_on_wrong_data(capsys, corrupting_cpu_copy):
    assert main(["selftest", "--backend", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL copy migration, 4K folios" in out and "wrong content" in out
    assert "PASS no-copy migration, 4K folios" in out  # the DMA path does not use the corrupted copy


def test_the_sweep_is_a_list_of_tasks_with_unique_ids_and_all_its_steps():
    from dmamig.bench.runner import build_tasks, sweep_directions

    s = default_settings("cpu")
    tasks = build_tasks(s)
    groups, engine = build_sweep(s)
    assert [t.id for t in tasks] == [g.id for g in groups] + [e.id for e in engine] + [
        a.id for a in access_scenarios(s)]
    assert len({t.id for t in tasks}) == len(tasks)
    assert sum(t.steps for t in tasks) == sweep_steps(s)
    assert sweep_directions(tasks) == ["h2d", "d2h"]
    assert tasks[0].id == "group/4k/copy" and "group/4k/nocopy/ch2/steps16-pipe1" in [t.id for t in tasks]


def test_run_sweep_reports_each_finished_task_and_skips_the_ones_named():
    import pickle

    from dmamig.bench.runner import build_tasks, run_sweep

    s = default_settings("cpu", quick=True)
    s = dataclasses.replace(s, sizes=[4096], extras=False, variants=False, access=False, files=False)
    tasks = build_tasks(s)
    assert pickle.loads(pickle.dumps(tasks)) == tasks  # tasks travel to other processes
    done = []
    doc = run_sweep(s, on_task_done=lambda t, recs: done.append((t.id, [r["id"] for r in recs])))
    assert [d[0] for d in done] == [t.id for t in tasks]
    assert [r["id"] for r in doc["scenarios"]] == [i for _, ids in done for i in ids]
    again = run_sweep(s, skip={tasks[0].id})
    assert [r["id"] for r in again["scenarios"]] == done[1][1]
