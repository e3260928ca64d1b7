"""Replay: verified data, no leaked frame, determinism through a trace file, bad traces refused, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dmamig.cli import main
from dmamig.errors import InvalidArgument
from dmamig.tiering import (
    Migration,
    Policy,
    Trace,
    TraceError,
    load_trace,
    make_policy,
    make_workload,
    replay,
    save_trace,
)

#: Series that depend on decisions only, not on timing.
DECIDED = ("accesses", "fast_hits", "hint_faults", "promoted", "demoted", "migrate_failed", "fast_pages",
           "slow_pages", "access_cost")


def small(name="zipf", **kw):
    kw = {"pages": 96, "epochs": 5, "per_epoch": 96, "seed": 4, **kw}
    return make_workload(name, **kw)


@pytest.mark.parametrize("mode", ["copy", "no-copy"])
@pytest.mark.parametrize("policy", ["first-touch", "numa-balancing", "tpp", "lru"])
def test_replay_verifies_data_and_frees_every_frame(policy, mode):
    # Half the fast tier free: the kernel's paths promote only above the tier's high watermark.
    r = replay(small("phases"), make_policy(policy), mode, first_touch_fill=0.5)
    s = r.summary
    assert s["verified"] and s["final_bytes_ok"] and s["mismatches"] == 0 and s["leaked_frames"] == 0
    assert s["reads_verified"] == int((~small("phases").write).sum())
    assert s["accesses"] == 5 * 96 and len(r.epochs["promoted"]) == 5
    if policy == "first-touch":
        assert s["promoted"] == s["demoted"] == 0 and s["migrate_cpu_ns"] == 0
    else:
        assert s["promoted"] > 0 and s["migrate_cpu_ns"] > 0 and s["bytes_migrated"] > 0


def test_promotion_raises_fast_hits_over_first_touch():
    t = small("zipf", epochs=8, pages=512)
    base = replay(t, make_policy("first-touch"), first_touch_fill=0.5).summary["fast_hit_share"]
    for policy in ("numa-balancing", "tpp"):
        assert replay(t, make_policy(policy), first_touch_fill=0.5).summary["fast_hit_share"] > base, policy
        moved = replay(t, make_policy(policy, path="move_pages"), first_touch_fill=0.5)  # the experiment
        assert moved.summary["fast_hit_share"] > base and moved.config["paths"] == "move_pages", policy


def test_recorded_trace_replays_identically(tmp_path):
    t = small("kvstore", actors=2)
    back = load_trace(save_trace(t, tmp_path / "kv.npz"))
    a = replay(t, make_policy("tpp"), "no-copy")
    b = replay(back, make_policy("tpp"), "no-copy")
    for k in DECIDED:
        assert a.epochs[k] == b.epochs[k], k


def test_several_accessor_threads_verify_too():
    r = replay(small("uniform", actors=4), make_policy("lru"), "copy", threads=2)
    assert r.summary["verified"] and r.summary["reads_verified"] > 0


def test_bad_trace_is_refused_before_anything_runs():
    started = []

    class Spy(Policy):
        def start(self, tiers):
            started.append(tiers)

    t = small()
    bad = Trace(t.epoch[::-1].copy(), t.actor, t.offset, t.length, t.write, region_bytes=t.region_bytes)
    with pytest.raises(TraceError, match=r"record 96 .*epoch goes backwards"):
        replay(bad, Spy())
    assert started == []


def test_migrations_from_a_policy_outside_the_region_fail_per_page():
    class Wild(Policy):
        def epoch(self, o):
            return [Migration(np.array([0, 1]), 1, "demote")]

    r = replay(small(), Wild(), "copy")
    assert r.summary["verified"] and r.summary["demoted"] >= 1


def test_a_second_replay_never_overwrites_the_first(tmp_path, monkeypatch, capsys):
    """The default folder is taken by the first run: the second writes beside it; an --out that holds results
    is refused (exit 2), and the first run's results stay as they were."""
    monkeypatch.chdir(tmp_path)
    small = ["replay", "zipf", "--policy", "tpp", "--pages", "64", "--epochs", "2", "--per-epoch", "32",
             "--no-plots"]
    assert main(small) == 0
    first = (tmp_path / "replay-results" / "zipf-tpp" / "results.json").read_bytes()
    assert main(small) == 0
    assert (tmp_path / "replay-results" / "zipf-tpp-2" / "results.json").exists()
    capsys.readouterr()
    assert main([*small, "--out", "replay-results/zipf-tpp"]) == 2
    assert "already holds a results.json" in capsys.readouterr().err
    assert (tmp_path / "replay-results" / "zipf-tpp" / "results.json").read_bytes() == first


def test_cli_replay_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["replay", "zipf", "--policy", "tpp", "--pages", "64", "--epochs", "4", "--per-epoch", "64",
               "--out", str(out), "--record", str(tmp_path / "z.npz")])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["config"]["mode"] for r in doc["runs"]] == ["copy", "no-copy"]
    assert all(r["summary"]["verified"] for r in doc["runs"])
    for f in ("migrations.png", "occupancy.png", "stall_cpu.png"):
        assert (out / f).stat().st_size > 1000
    assert "verified" in capsys.readouterr().out
    # The recorded trace replays through the CLI too, in one mode.
    assert main(["replay", str(tmp_path / "z.npz"), "--policy", "lru", "--mode", "copy", "--no-plots",
                 "--out", str(tmp_path / "again")]) == 0


def test_cli_replays_a_lackey_log_and_refuses_a_bad_source(tmp_path, capsys):
    from pathlib import Path

    sample = Path(__file__).parent / "data" / "lackey_sample.txt"
    assert main(["replay", str(sample), "--policy", "numa-balancing", "--per-epoch", "4", "--no-plots",
                 "--out", str(tmp_path / "l")]) == 0
    assert main(["replay", "no-such-workload", "--out", str(tmp_path / "x")]) == 2
    assert "neither a file nor a built-in workload" in capsys.readouterr().err
    t = small()
    t.offset[3] = t.region_bytes + 5
    np.savez_compressed(tmp_path / "bad.npz", **t.columns(), meta=np.array(json.dumps(
        {"format": "dmamig-trace/1", "region_bytes": t.region_bytes, "actors": 1, "name": "bad",
         "page_size": 4096})))
    assert main(["replay", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "b")]) == 2
    assert "record 3" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("policy", ["uvm-lru", "uvm-counters"])
@pytest.mark.parametrize("mode", ["copy", "no-copy"])
def test_gpu_stencil_oversubscribes_the_device_and_verifies(policy, mode):
    t = make_workload("stencil", pages=1024, epochs=4, per_epoch=384, seed=2, halo_share=0.1)
    # Each page sees three device accesses per sweep (left, centre, right): a threshold of 2 migrates it.
    r = replay(t, make_policy(policy, **({"threshold": 2} if policy == "uvm-counters" else {})), mode,
               device_fraction=0.5)
    s = r.summary
    assert s["verified"] and s["leaked_frames"] == 0 and r.config["device_pages"] == 512
    assert max(r.epochs["device_pages"]) <= 512
    assert s["uvm_migrated"] > 0
    if policy == "uvm-counters":  # pages are first accessed remotely, where they are
        assert s["uvm_remote"] > 0


def test_device_actors_must_be_known():
    t = make_workload("stencil", pages=64, epochs=2, per_epoch=30)
    t.meta["device_actors"] = [5]
    with pytest.raises(TraceError, match="device_actors"):
        replay(t, make_policy("uvm-lru"))


def test_cli_counts_unparsed_lackey_lines_and_names_a_text_file_posing_as_npz(tmp_path, capsys):
    """Lines of a Lackey log that are neither accesses nor Valgrind banners are counted and reported, not
    dropped silently; a text file named .npz is 'not a trace' (exit 2), without numpy's pickle advice."""
    from pathlib import Path

    sample = (Path(__file__).parent / "data" / "lackey_sample.txt").read_text()
    log = tmp_path / "log.txt"
    log.write_text(sample + "garbage line one\n L zz,4\n")
    assert main(["replay", str(log), "--policy", "lru", "--mode", "copy", "--per-epoch", "4", "--no-plots",
                 "--out", str(tmp_path / "l")]) == 0
    assert "2 line(s) of" in capsys.readouterr().out
    fake = tmp_path / "fake.npz"
    fake.write_text("this is not a trace\n")
    assert main(["replay", str(fake), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert "not a trace" in err and "allow_pickle" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("backing", ["shmem", "file"])
def test_replay_over_shared_memory_and_a_file_keeps_every_byte(backing):
    # The region as shared anonymous memory, or as a shared mapping of a real file: its folios migrate through
    # the page cache's callback while the flusher writes them back, and the file on disk ends up holding the
    # region's bytes (final_ok checks the mapping and the disk).
    # Every migration of a replay may meet its folios under writeback (ASYNC: -EBUSY) when the flusher's rounds
    # fall that way, so each mode must try to migrate, and the two modes together must move something.
    trace = make_workload("phases", pages=256, epochs=4, per_epoch=128, seed=3)
    moved = 0
    for mode in ("copy", "no-copy"):
        res = replay(trace, make_policy("tpp"), mode, backing=backing)
        s = res.summary
        assert s["verified"] and s["final_bytes_ok"]
        assert s["promoted"] + s["demoted"] + s["migrate_failed"] > 0
        moved += s["promoted"] + s["demoted"]
        assert res.config["backing"] == backing
    assert moved > 0


def test_replay_refuses_an_unknown_backing():
    with pytest.raises(InvalidArgument, match="backing must be one of anon, shmem, file"):
        replay(make_workload("phases", pages=64, epochs=1, per_epoch=8), make_policy("tpp"), backing="disk")
