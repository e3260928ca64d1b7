"""The all-pairs device-to-device matrix of ``dmamig bench``: tasks, a tiny verified sweep, report and plots."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pickle
from types import SimpleNamespace

import pytest
from rich.console import Console
from support import check_results_schema

from dmamig import Topology
from dmamig.bench.pairs import (
    PairScenario,
    _check_route,
    pair_scenarios,
    pair_tasks,
    run_pair,
    write_pair_plots,
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
from dmamig.cli import build_parser, cmd_bench, main

MIB = 1 << 20
#: Everything but the pairs as small as a sweep gets: one 2M group per mode, no engine, no device access.
TINY = dict(sizes=[2 * MIB], total_bytes=2 * MIB, channels=[1], variants=False, extras=False, access=False,
            repeat=1, warmup=0, pair_bytes=2 * MIB)


def _settings(devices: int, topology: str = "nvswitch", **over):
    return dataclasses.replace(default_settings("cpu", quick=True), devices=devices, topology=topology,
                               **{**TINY, **over})


# -- the sweep -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("topology", ["two-socket", "pcie", "nvswitch"])
def test_one_task_per_ordered_pair_with_unique_ids(topology):
    s = _settings(4, topology, channels=[1, 2])
    tasks = build_tasks(s)
    assert len({t.id for t in tasks}) == len(tasks)
    pairs = [t for t in tasks if t.kind == "pairs"]
    assert tasks[-len(pairs):] == pairs  # after every other scenario
    assert [t.id for t in pairs] == [f"pairs/d{a}-d{b}" for a in range(4) for b in range(4) if a != b]
    # Each measures its own pair's ceiling, in the task: no direction ceiling; copy and no-copy per repetition.
    assert all(t.directions == () and t.steps == 2 * (s.warmup + s.repeat) for t in pairs)
    sc = pairs[3].payload
    assert (sc.src, sc.dst, sc.devices, sc.channels, sc.pair_bytes) == (1, 0, 4, 2, 2 * MIB)
    assert [sc.record_id(m) for m in ("copy", "nocopy")] == ["pairs/d1-d0/copy", "pairs/d1-d0/nocopy/ch2"]
    assert pickle.loads(pickle.dumps(pairs)) == pairs  # tasks travel to cluster workers
    assert len(pair_tasks(_settings(8, "dgx1"))) == 56


def test_one_device_or_no_pairs_adds_none_and_the_default_sweep_is_unchanged():
    s = default_settings("cpu")
    assert s.devices == 1 and not pair_scenarios(s)
    assert not [t for t in build_tasks(s) if t.kind == "pairs"]
    assert not pair_tasks(dataclasses.replace(_settings(4), pairs=False))
    js = _settings(4, "two-socket").to_json()
    assert (js["pairs"], js["pair_bytes"], js["topology"]) == (True, 2 * MIB, "two-socket")
    assert default_settings("cuda", gpus=2).topology == "runtime"
    assert default_settings("cuda", gpus=2).pair_bytes > s.pair_bytes


def test_the_sweeps_topology_is_the_preset_of_all_its_devices():
    s = _settings(4, "two-socket")
    assert s.machine_topology(4) == Topology.two_socket(4)
    assert s.machine_topology(2) == Topology.two_socket(4).subset(2)  # the migration groups' first two
    assert s.machine_topology(1) is None
    assert _settings(8, "dgx1").machine_topology(8) == Topology.dgx1()
    assert dataclasses.replace(s, topology="runtime").machine_topology(4) is None  # cuda: the runtime's


# -- a tiny sweep, run once ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def doc():
    return run_sweep(_settings(4, "two-socket"))


def _pairs(doc):
    return {r["id"]: r for r in doc["scenarios"] if r["kind"] == "pairs"}


def test_every_pair_runs_verified_in_both_modes_staged_where_the_topology_says(doc):
    recs = _pairs(doc)
    topo = Topology.two_socket(4)
    assert len(recs) == 2 * 12
    for a, b in topo.pairs():
        staged = topo.staged(a, b)
        for mode in ("copy", "nocopy/ch1"):
            r = recs[f"pairs/d{a}-d{b}/{mode}"]
            assert (r["src_device"], r["dst_device"], r["direction"]) == (a, b, "d2d")
            assert r["verified"] and r["nr_failed"] == 0 and r["nr_succeeded"] == r["pages"] == 512
            assert r["staged"] is staged and r["peer"] is not staged and r["link"] == topo.link(a, b)
            assert r["ceiling_route"] == ("staged" if staged else "peer")
            assert r["gbps"] > 0 and r["ceiling_gbps"] > 0
            assert r["ceiling_ratio"] == pytest.approx(r["gbps"] / r["ceiling_gbps"])
            assert r["options"]["faithful"] and r["batching"] == "faithful" and r["folio_bytes"] == 2 * MIB
            moved = (r["dma_peer_bytes"], r["dma_staged_bytes"])
            if r["mode"] == "copy":
                assert moved == (0, 0) and r["channels"] is None  # the migrating thread copies
            else:
                assert moved == ((0, 2 * MIB) if staged else (2 * MIB, 0)) and r["channels"] == 1
                assert r["speedup_vs"] == f"pairs/d{a}-d{b}/copy" and r["speedup_vs_copy"] > 0
    assert sum(r["staged"] for r in recs.values()) == 2 * len(topo.pairs(peer=False)) == 16
    assert doc["settings"]["topology"] == "two-socket" and doc["settings"]["pair_bytes"] == 2 * MIB
    assert doc["machine"]["topology"] == topo.as_dict()


def test_results_validate_and_report_renders_the_matrices(doc, tmp_path):
    check_results_schema(doc)
    write_json(doc, tmp_path / "results.json")
    again = load_results(tmp_path / "results.json")
    con = Console(file=io.StringIO(), width=200)
    render_tables(again, con)
    text = con.file.getvalue()
    assert "Device pairs, copy" in text and "Device pairs, no-copy, 1 DMA channel" in text
    assert "Device pair ceilings" in text and "PH*" in text and "PS " in text
    r = _pairs(again)["pairs/d0-d2/copy"]
    assert f"{r['gbps']:.2f} {r['ceiling_ratio']:.2f}x*" in text  # a staged cell
    write_csv(again, tmp_path / "results.csv")
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert "src_device" in rows[0] and "ceiling_route" in rows[0]
    assert sum(row.startswith("pairs/") for row in rows) == 24


def test_heat_maps_are_written(doc, tmp_path):
    names = {p.name: p for p in write_plots(doc, tmp_path)}
    assert {"pairs_gbps.png", "pairs_ceiling_ratio.png"} <= set(names)
    for name in ("pairs_gbps.png", "pairs_ceiling_ratio.png"):
        assert names[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    without = dict(doc, scenarios=[r for r in doc["scenarios"] if r["kind"] != "pairs"])
    assert write_pair_plots(without, tmp_path / "b") == [] and not (tmp_path / "b").exists()


def test_pairs_compare_against_a_baseline(doc):
    assert not regressions(compare_results(doc, doc))
    slow = copy.deepcopy(doc)
    r = next(r for r in slow["scenarios"] if r["id"] == "pairs/d3-d0/nocopy/ch1")
    r["gbps"] /= 2
    r["wall_ns"] = [w * 2 for w in r["wall_ns"]]
    # One repetition a side (this run's): too few to test, so inconclusive; with three, a regression.
    comps = compare_results(slow, doc)
    assert not regressions(comps) and [c.id for c in comps if c.inconclusive] == ["pairs/d3-d0/nocopy/ch1"]
    base3 = copy.deepcopy(doc)
    for d in (slow, base3):
        for rec in d["scenarios"]:
            rec["wall_ns"] = rec["wall_ns"] * 3
    bad = regressions(compare_results(slow, base3))
    assert [c.id for c in bad] == ["pairs/d3-d0/nocopy/ch1"] and bad[0].ratio == pytest.approx(0.5)
    # A baseline from before the pairs: no pair settings or records; still comparable, pairs are new.
    old = copy.deepcopy(doc)
    old["scenarios"] = [r for r in old["scenarios"] if r["kind"] != "pairs"]
    for k in ("pairs", "pair_bytes", "topology"):
        del old["settings"][k]
    del old["machine"]["topology"]
    validate_results(old)
    comps = compare_results(doc, old)
    assert not regressions(comps)
    assert all(c.note == "not in baseline" for c in comps if c.id.startswith("pairs/"))
    other = copy.deepcopy(doc)
    other["settings"]["topology"] = "nvswitch"
    with pytest.raises(NotComparable, match="topology"):
        check_comparable(doc, other)


# -- verification ----------------------------------------------------------------------------------------------

def test_a_wrong_byte_fails_verification(monkeypatch):
    from dmamig.backends.cpu.backend import CpuBackend

    real = CpuBackend.copy_folios

    def corrupt(self, src, src_idx, dst, dst_idx, nr_pages, **kw):
        real(self, src, src_idx, dst, dst_idx, nr_pages, **kw)
        dst[int(dst_idx[0]), 5] ^= 0xFF

    monkeypatch.setattr(CpuBackend, "copy_folios", corrupt)
    s = _settings(2)
    with pytest.raises(VerificationError, match="wrong content"):
        run_pair(PairScenario(0, 1, 2, 2 * MIB, 1), s, lambda label, n: None, seed=1)


def test_a_leaked_frame_fails_verification():
    from dmamig import Machine
    from dmamig.bench.verify import verify_no_leak

    with Machine(host_pages=64, device_pages=64, devices=2, backend="cpu") as m:
        verify_no_leak(m, "pair")
        held = m.alloc_pages(2, 3)
        with pytest.raises(VerificationError, match=r"pair: frames still in use .*\(2, 3\)"):
            verify_no_leak(m, "pair")
        m.put_pages(held)
        verify_no_leak(m, "pair")


@pytest.mark.parametrize("mode, staged, stats, words", [
    ("nocopy", True, dict(bytes=4, peer_bytes=4, staged_bytes=0, peer_runs=1, staged_runs=0), "topology says staged"),
    ("nocopy", False, dict(bytes=4, peer_bytes=0, staged_bytes=4, peer_runs=0, staged_runs=1), "says peer"),
    ("copy", False, dict(bytes=4, peer_bytes=4, staged_bytes=0, peer_runs=1, staged_runs=0), "DMA engine"),
])
def test_dma_counters_off_the_topologys_route_fail_verification(mode, staged, stats, words):
    with pytest.raises(VerificationError, match=words):
        _check_route(SimpleNamespace(**stats), PairScenario(0, 1, 2, 4, 1), mode, staged, "pair")


def test_pair_tasks_run_through_run_task_on_a_mixed_topology():
    s = _settings(3, "pcie")  # d0, d1 under one switch; d2 under another, without peer access
    task = next(t for t in build_tasks(s) if t.id == "pairs/d2-d0")
    steps = []
    recs = run_task(task, s, {}, lambda label, n: steps.append(n))
    assert [r["id"] for r in recs] == ["pairs/d2-d0/copy", "pairs/d2-d0/nocopy/ch1"]
    assert sum(steps) == task.steps and all(r["staged"] and r["link"] == "pcie-host" for r in recs)


# -- the command line ------------------------------------------------------------------------------------------

SMALL = ["bench", "--quick", "--backend", "cpu", "--sizes", "2m", "--total", "2M", "--channels", "1",
         "--no-engine", "--no-access", "--faithful-only", "--repeat", "1", "--warmup", "0"]


def test_devices_topology_and_pair_total_reach_the_results(tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*SMALL, "--devices", "3", "--topology", "pcie", "--pair-total", "2M", "--out", str(out)]) == 0
    doc = load_results(out / "results.json")
    assert len(_pairs(doc)) == 12 and doc["settings"]["topology"] == "pcie"
    assert doc["machine"]["topology"]["name"].startswith("pcie(3")
    assert (out / "pairs_gbps.png").exists() and (out / "pairs_ceiling_ratio.png").exists()
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "device pairs: 3 devices (6 ordered pairs, topology pcie), 2M each" in err
    out2 = tmp_path / "r2"
    assert main([*SMALL, "--devices", "2", "--no-pairs", "--no-plots", "--out", str(out2)]) == 0
    assert not _pairs(json.loads((out2 / "results.json").read_text()))


@pytest.mark.parametrize("argv, words", [
    (["--devices", "9"], "--devices: '9' is not a device count"),
    (["--devices", "0"], "from 1 to 8"),
    (["--topology", "pcie"], "needs --devices 2 or more"),
    (["--devices", "4", "--topology", "dgx1"], "dgx1 has 8 devices"),
    (["--devices", "4", "--topology", "ring"], "invalid choice"),
    (["--devices", "2", "--pair-total", "3M"], "2 MiB folios"),
    (["--pair-total", "4M"], "need --devices 2 or more"),
    (["--devices", "2", "--no-pairs", "--pair-total", "4M"], "--no-pairs"),
])
def test_bad_pair_arguments_are_usage_errors(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main([*SMALL, *argv, "--out", str(tmp_path / "never")])
    assert exc.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("argv, words", [
    (["--devices", "4"], "--devices: 4 devices, but 2 GPU(s) are visible"),
    (["--devices", "2", "--topology", "nvswitch"], "--topology: a cpu-backend setting"),
])
def test_cuda_pair_arguments_are_usage_errors(argv, words, capsys, tmp_path):
    parser = build_parser()
    args = parser.parse_args(["bench", *argv, "--out", str(tmp_path / "never")])
    with pytest.raises(SystemExit) as exc:
        cmd_bench(args, parser, "cuda", 2, lambda stderr=False: Console(file=io.StringIO()))
    assert exc.value.code == 2 and words in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
