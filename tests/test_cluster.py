"""Sweeps on Dask and resumable sweeps: a LocalCluster sweep equals the in-process one, lost workers and failed
tasks, resume after an interrupt, and no Dask at all without ``--cluster``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import interrupt_bench_after

from dmamig.bench import runner
from dmamig.bench.results import validate_results
from dmamig.bench.runner import BenchSweep, SweepFailed, SweepInterrupted, build_tasks
from dmamig.bench.settings import BenchSettings, default_settings
from dmamig.cli import build_parser, main
from dmamig.sweep.journal import JOURNAL_NAME, Journal, ResumeError
from dmamig.sweep.tasks import Task

HAVE_DASK = importlib.util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAVE_DASK, reason="Dask is not installed (pip install 'dmamig[dask]')")


def _bench_flags() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {o for a in sub.choices["bench"]._actions for o in a.option_strings}


# The device-access scenarios, where this version has them, are not what these tests are about.
NO_ACCESS = ["--no-access"] if "--no-access" in _bench_flags() else []


def tiny(channels: str = "1", total: str = "1M") -> list[str]:
    return ["bench", "--quick", "--backend", "cpu", "--no-plots", "--sizes", "4k", "--total", total, "--channels",
            channels, "--faithful-only", *NO_ACCESS]


TINY = tiny()
REPLAY = ["replay", "uniform", "--pages", "64", "--epochs", "3", "--per-epoch", "64", "--no-plots"]


def tiny_settings(**over):
    s = default_settings("cpu", quick=True)
    extra = {"access": False, "files": False}
    return dataclasses.replace(s, sizes=[4096], total_bytes=1 << 20, channels=[1], variants=False,
                               **extra, **over)


def journal_ids(folder: Path) -> list[str]:
    lines = (folder / JOURNAL_NAME).read_text().splitlines()
    return [e["id"] for e in map(json.loads, lines[1:]) if "id" in e]  # not the ends of interrupted runs


def journal_tasks(folder: Path) -> list[Task]:
    """The tasks of the sweep journalled in ``folder`` (its header holds every setting)."""
    head = json.loads((folder / JOURNAL_NAME).read_text().splitlines()[0])
    return build_tasks(BenchSettings(**head["settings"]))


def scenario_ids(tasks: list[Task]) -> list[str]:
    return [sc.id for t in tasks for sc in (t.payload.scenarios if t.kind == "group" else [t.payload])]


@pytest.fixture(scope="module")
def session():
    if not HAVE_DASK:
        pytest.skip("Dask is not installed (pip install 'dmamig[dask]')")
    from dmamig.sweep.cluster import connect

    with connect("local:2", backend="cpu") as s:
        s.client.wait_for_workers(2, timeout=30)
        yield s


# -- without --cluster ---------------------------------------------------------------------------------------

def test_without_cluster_nothing_imports_dask(tmp_path):
    code = ("import sys\nfrom dmamig.cli import main\n"
            f"assert main({[*TINY, '--no-engine', '--out', str(tmp_path / 'b')]!r}) == 0\n"
            f"assert main({[*REPLAY, '--out', str(tmp_path / 'r')]!r}) == 0\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed', 'dask_cuda'))\n"
            "print('IMPORTED', bad)\nsys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # A sweep that completed leaves its folder as it always was: the journal goes once results.json holds all.
    assert not (tmp_path / "b" / JOURNAL_NAME).exists() and not (tmp_path / "r" / JOURNAL_NAME).exists()


@pytest.mark.parametrize("argv", [TINY, REPLAY])
def test_cluster_without_dask_is_a_one_line_usage_error(argv, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed"
                        else real(name, *a))
    try:
        rc = main([*argv, "--out", str(tmp_path / "o"), "--cluster", "local"])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "pip install 'dmamig[dask]'" in err[-1]
    assert not (tmp_path / "o").exists()


# -- the journal ------------------------------------------------------------------------------------------------

def test_journal_drops_a_torn_line_and_refuses_other_settings_or_tools(tmp_path):
    j = Journal(tmp_path, "dmamig bench", {"total_bytes": 1, "sizes": [4096]})
    assert not j.exists()  # nothing is written before a task finished
    j.record("a", records=[1])
    j.record("b", records=[2])
    with open(j.path, "a") as fh:
        fh.write('{"id": "c", "fingerp')  # a crash mid-write
    again = Journal.resume(tmp_path, "dmamig bench", {"total_bytes": 1, "sizes": [4096]})
    assert list(again.done) == ["a", "b"] and again.path.read_text().endswith("\n")
    again.record("c", records=[3])
    assert list(Journal.resume(tmp_path, "dmamig bench", {"total_bytes": 1, "sizes": [4096]}).done) == \
        ["a", "b", "c"]
    with pytest.raises(ResumeError, match=r"total_bytes: 2 here, 1 there"):
        Journal.resume(tmp_path, "dmamig bench", {"total_bytes": 2, "sizes": [4096]})
    with pytest.raises(ResumeError, match="dmamig bench"):
        Journal.resume(tmp_path, "dmamig replay", {"total_bytes": 1, "sizes": [4096]})
    with pytest.raises(ResumeError, match="does not exist"):
        Journal.resume(tmp_path / "empty", "dmamig bench", {})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResumeError, match="nothing to resume"):
        Journal.resume(tmp_path / "empty", "dmamig bench", {})


@pytest.mark.parametrize("torn", ['{"journal": 1, "tool": "dmamig bench", "fing', ""])
def test_a_journal_torn_in_its_first_write_resumes_with_nothing_finished(tmp_path, torn):
    # The header goes out with the first finished task: a crash in that write leaves no whole line. Such a
    # folder must still resume (a fresh sweep refuses it, as it holds a journal).
    settings = {"total_bytes": 1}
    (tmp_path / JOURNAL_NAME).write_text(torn)
    j = Journal.resume(tmp_path, "dmamig bench", settings)
    assert j.done == {} and j.path.read_text() == ""
    j.record("a", records=[1])
    again = Journal.resume(tmp_path, "dmamig bench", settings)
    assert list(again.done) == ["a"]
    with pytest.raises(ResumeError, match="total_bytes"):
        Journal.resume(tmp_path, "dmamig bench", {"total_bytes": 2})


# -- resume -------------------------------------------------------------------------------------------------------

def test_resume_after_an_interrupt_reruns_nothing_that_finished(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = [*tiny(channels="1,2"), "--out", str(out)]
    interrupt_bench_after(monkeypatch, 2)
    assert main(argv) == 130
    assert f"--resume {out}" in capsys.readouterr().err
    before = json.loads((out / "results.json").read_text())
    ids = [t.id for t in journal_tasks(out)]
    assert before["partial"] and journal_ids(out) == ids[:2]
    monkeypatch.undo()
    ran = []
    real = runner.run_task
    monkeypatch.setattr(runner, "run_task", lambda task, *a, **k: ran.append(task.id) or real(task, *a, **k))
    assert main([*argv[:-2], "--resume", str(out)]) == 0
    assert ran == ids[2:]  # only what had not finished
    assert not (out / JOURNAL_NAME).exists()  # complete: nothing left to resume
    doc = json.loads((out / "results.json").read_text())
    validate_results(doc)
    assert "partial" not in doc and all(s["verified"] for s in doc["scenarios"])
    kept = {s["id"]: s["wall_ns"] for s in before["scenarios"]}
    assert [s["wall_ns"] for s in doc["scenarios"] if s["id"] in kept] == list(kept.values())
    # Two processes ran this sweep: every scenario and ceiling says which.
    assert len({s["worker"]["run"] for s in doc["scenarios"]}) == 2
    assert len({c["worker"]["run"] for c in doc["ceilings"]}) == 2


def test_a_resumed_run_counts_its_whole_time_says_so_and_counts_tasks_alike(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = [*tiny(channels="1,2"), "--out", str(out)]
    interrupt_bench_after(monkeypatch, 2)
    assert main(argv) == 130
    err = capsys.readouterr().err
    n = len(journal_tasks(out))
    assert f"interrupted after 2 of {n} tasks finished" in err
    first = json.loads((out / "results.json").read_text())
    monkeypatch.undo()
    from rich.progress import Progress

    added, real_add = [], Progress.add_task
    monkeypatch.setattr(Progress, "add_task", lambda self, *a, **k: added.append((a, k)) or real_add(self, *a, **k))
    assert main([*argv[:-2], "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"resuming: 2 of {n} tasks finished before, {n - 2} to run" in err
    # From its first moment the bar has its description, counts the tasks that finished before, and says
    # what it is doing (measuring the ceilings, before the first repetition reports anything).
    [(args, kw)] = added
    assert args == ("dmamig bench",) and kw["tasks"] == f"2 of {n} tasks" and kw["completed"] > 0
    assert kw["scenario"].startswith("measuring the copy ceilings, then ")
    # The bar counts the same tasks, has an ETA and its description.
    assert re.search(rf"dmamig bench .*{n} of {n} tasks .*ETA", err)
    doc = json.loads((out / "results.json").read_text())
    validate_results(doc)
    runs = doc["resumed"]["runs"]
    assert doc["resumed"]["parts"] == 2 and len(runs) == 2
    assert runs[0]["wall_s"] >= first["wall_s"]  # the first part up to Ctrl-C, not only to its last task
    assert doc["wall_s"] == pytest.approx(runs[0]["wall_s"] + runs[1]["wall_s"])
    assert main(["report", str(out)]) == 0
    assert "RESUMED: ran in 2 parts" in capsys.readouterr().out


def test_ceilings_of_two_processes_are_two_labelled_lines():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from dmamig.bench import migration

    who = [{"host": "vm", "address": None, "pid": 7, "run": f"2026-12-06T0{i}:00:00.000000+00:00", "gpus": []}
           for i in (1, 2)]
    doc = {"ceilings": [{"direction": "h2d", "gbps": g, "worker": w, "method": "np.copyto", "bytes": 1,
                         "seconds": 1.0} for g, w in ((9.5, who[0]), (7.25, who[1]))]}
    fig, ax = plt.subplots()
    top = migration._ceiling_line(ax, doc, "h2d")
    labels = [label for label in ax.get_legend_handles_labels()[1] if label.startswith("ceiling")]
    plt.close(fig)
    assert top == 9.5 and len(ax.lines) == 2
    assert labels == ["ceiling 9.5 GB/s (plain copy, run of 2026-12-06 01:00:00)",
                      "ceiling 7.2 GB/s (plain copy, run of 2026-12-06 02:00:00)"]


def test_resume_is_refused_for_other_settings_a_missing_journal_or_a_finished_sweep(tmp_path, capsys,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    interrupt_bench_after(monkeypatch, 1)
    assert main([*TINY, "--no-engine", "--out", str(out)]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    cases = [([*tiny(total="2M"), "--no-engine", "--resume", str(out)],
              "total_bytes: 2097152 here, 1048576 there"),
             ([*TINY, "--no-engine", "--resume", str(tmp_path)], "nothing to resume"),
             ([*TINY, "--no-engine", "--resume", str(out), "--out", str(tmp_path / "x")], "drop --out"),
             ([*TINY, "--no-engine", "--out", str(tmp_path / "new"), "--resume", str(out), "--out",
               str(tmp_path / "y")], "drop --out")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert words in capsys.readouterr().err.strip().splitlines()[-1]
    (out / "results.json").unlink()  # a crash leaves a journal without results: --out does not overwrite it
    with pytest.raises(SystemExit):
        main([*TINY, "--no-engine", "--out", str(out)])
    assert f"--resume {out}" in capsys.readouterr().err
    assert main([*TINY, "--no-engine", "--resume", str(out)]) == 0
    with pytest.raises(SystemExit):
        main([*TINY, "--no-engine", "--resume", str(out)])
    assert "nothing to resume" in capsys.readouterr().err.strip().splitlines()[-1]


def test_replay_resumes_only_the_mode_that_did_not_finish(tmp_path, monkeypatch, capsys):
    from dmamig.tiering import sweep as rsweep

    out = tmp_path / "r"
    real, calls = rsweep.run_replay_task, []

    def once(task, *a, **k):
        calls.append(task.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task, *a, **k)

    monkeypatch.setattr(rsweep, "run_replay_task", once)
    assert main([*REPLAY, "--out", str(out)]) == 130
    doc = json.loads((out / "results.json").read_text())
    assert doc["partial"] and [r["config"]["mode"] for r in doc["runs"]] == ["copy"]
    capsys.readouterr()
    assert main([*REPLAY, "--seed", "3", "--resume", str(out)]) == 2
    assert "seed: 3 here, 0 there" in capsys.readouterr().err
    # The unfinished replay's journal is not overwritten by a fresh one into its folder (as for bench).
    journal = (out / JOURNAL_NAME).read_bytes()
    calls.clear()
    assert main([*REPLAY, "--out", str(out)]) == 2
    assert f"--resume {out}" in capsys.readouterr().err and calls == []
    assert (out / JOURNAL_NAME).read_bytes() == journal
    calls.clear()
    assert main([*REPLAY, "--resume", str(out)]) == 0
    assert calls == ["no-copy"]
    doc = json.loads((out / "results.json").read_text())
    assert "partial" not in doc and [r["config"]["mode"] for r in doc["runs"]] == ["copy", "no-copy"]
    assert len({r["worker"]["run"] for r in doc["runs"]}) == len(doc["machine"]["workers"]) == 2


# -- on a cluster ---------------------------------------------------------------------------------------------

@needs_dask
def test_a_local_cluster_sweep_equals_the_in_process_sweep(tmp_path, session):
    s = tiny_settings()
    here = BenchSweep(s, tmp_path / "here").run()
    there = BenchSweep(s, tmp_path / "there").run(session=session)
    validate_results(there)
    assert [r["id"] for r in there["scenarios"]] == [r["id"] for r in here["scenarios"]]
    assert all(r["verified"] for r in there["scenarios"]) and "partial" not in there
    assert sorted(journal_ids(tmp_path / "there")) == sorted(t.id for t in build_tasks(s))  # as they finished
    workers = set(session.workers())
    assert {r["worker"]["address"] for r in there["scenarios"]} <= workers
    assert {w["address"] for w in there["machine"]["workers"]} <= workers
    assert there["machine"]["cluster"]["spec"] == "local:2"
    # Each ratio divides by the ceiling its own worker measured; one ceiling per worker and direction.
    ceil = {(c["worker"]["address"], c["direction"]): c for c in there["ceilings"]}
    assert len(ceil) == len(there["ceilings"])
    for r in there["scenarios"]:
        if r["ceiling_gbps"] is not None:
            assert r["ceiling_gbps"] == ceil[(r["worker"]["address"], r["direction"])]["gbps"]
    assert all(r["worker"]["gpus"] == [] for r in there["scenarios"])  # the CPU backend has none


@needs_dask
def test_a_worker_killed_mid_task_is_retried(tmp_path, session):
    from dmamig.bench.runner import run_on_worker

    s = tiny_settings(extras=False)
    tasks = build_tasks(s)
    victim, marker = tasks[1].id, str(tmp_path / "killed")

    def kill_once(task, settings):
        if task.id == victim and not os.path.exists(marker):
            with open(marker, "w") as fh:
                fh.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies in the middle of its task
        return run_on_worker(task, settings)

    doc = BenchSweep(s, tmp_path / "o").run(session=session, worker_fn=kill_once)
    killed = int(Path(marker).read_text())
    assert sorted(journal_ids(tmp_path / "o")) == sorted(t.id for t in tasks)
    again = [r["worker"]["pid"] for r in doc["scenarios"] if r["id"] in scenario_ids([tasks[1]])]
    assert again and killed not in again  # it ran again, in another worker process
    assert [r["id"] for r in doc["scenarios"]] == scenario_ids(tasks)
    assert all(r["verified"] for r in doc["scenarios"]) and "failed" not in doc


@needs_dask
def test_tasks_that_fail_twice_are_reported_and_the_rest_kept(tmp_path, session):
    from dmamig.bench.runner import run_on_worker

    s = tiny_settings(extras=False)
    good = build_tasks(s)[:2]
    tasks = [good[0], Task("broken", "broken", "no-such-kind", 1, (), None), good[1],
             Task("crashing", "crashing", "group", 1, (), None)]
    tries = tmp_path / "tries"

    def flaky(task, settings):
        with open(tries, "a") as fh:
            fh.write(task.id + "\n")
        if task.id == "crashing":
            os.kill(os.getpid(), signal.SIGKILL)
        return run_on_worker(task, settings)

    with pytest.raises(SweepFailed) as exc:
        BenchSweep(s, tmp_path / "o", tasks=tasks).run(session=session, worker_fn=flaky)
    fails = {f.id: f.error for f in exc.value.failures}
    assert set(fails) == {"broken", "crashing"}
    assert "unknown kind 'no-such-kind'" in fails["broken"] and "KilledWorker" in fails["crashing"]
    assert sorted(tries.read_text().split()).count("broken") == 2  # run, retried once, reported
    assert sorted(tries.read_text().split()).count("crashing") == 2
    doc = exc.value.doc
    assert doc["partial"] and [f["id"] for f in doc["failed"]] == [f.id for f in exc.value.failures]
    assert [r["id"] for r in doc["scenarios"]] == scenario_ids(good)
    assert journal_ids(tmp_path / "o") and set(journal_ids(tmp_path / "o")) == {t.id for t in good}


@needs_dask
def test_an_interrupted_cluster_sweep_resumes_without_rerunning_what_finished(tmp_path, session):
    s = tiny_settings()
    tasks = build_tasks(s)
    seen = []

    def stop_after_two(label, steps):
        seen.append(label)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(SweepInterrupted) as exc:
        BenchSweep(s, tmp_path / "o").run(progress=stop_after_two, session=session)
    assert exc.value.doc["partial"] and len(journal_ids(tmp_path / "o")) == 2
    first = journal_ids(tmp_path / "o")
    resumed = BenchSweep(s, tmp_path / "o", resume=True)
    assert [t.id for t in resumed.todo] == [t.id for t in tasks if t.id not in first]
    doc = resumed.run(session=session)
    ids = journal_ids(tmp_path / "o")
    assert ids[:2] == first and sorted(ids) == sorted(t.id for t in tasks)  # nothing ran twice
    assert [r["id"] for r in doc["scenarios"]] == scenario_ids(tasks)  # in sweep order, whatever ran when


@needs_dask
def test_bench_cli_on_a_local_cluster_reports_a_failing_task(tmp_path, capsys, monkeypatch):
    from dmamig.bench import runner as cluster

    real = cluster.run_on_worker
    victim = build_tasks(tiny_settings(extras=False))[0].id

    def failing(task, settings):
        if task.id == victim:
            raise RuntimeError("injected failure")
        return real(task, settings)

    monkeypatch.setattr(cluster, "run_on_worker", failing)
    out = tmp_path / "o"
    assert main([*TINY, "--no-engine", "--out", str(out), "--cluster", "local:2"]) == 1
    err = capsys.readouterr().err
    # Which workers, on which hosts, ran it (both workers of local:2 may not have had a task: 1 or 2).
    assert re.search(rf"dmamig bench: ran on [12] worker\(s\) on 1 host\(s\): {re.escape(platform.node())}", err)
    assert "failed twice" in err and f"{victim}: RuntimeError: injected failure" in err
    doc = json.loads((out / "results.json").read_text())
    assert doc["failed"] == [{"id": victim, "error": "RuntimeError: injected failure"}] and doc["scenarios"]


@needs_dask
def test_local_cluster_beyond_the_cores_is_a_usage_error_naming_the_limit(tmp_path, capsys):
    cores = len(os.sched_getaffinity(0))
    for argv in ([*TINY, "--no-engine"], REPLAY):
        with pytest.raises(SystemExit) as exc:
            rc = main([*argv, "--out", str(tmp_path / "o"), "--cluster", f"local:{cores + 1}"])
            raise SystemExit(rc)
        assert exc.value.code == 2
        err = capsys.readouterr()
        text = " ".join((err.err + err.out).split())
        assert f"'local:{cores + 1}' asks for {cores + 1} workers, but this machine allows at most {cores} " \
               f"({cores} core(s) available to this process, one per worker)" in text
        assert not (tmp_path / "o").exists()


@needs_dask
def test_local_cluster_beyond_the_gpus_is_refused_before_any_worker_starts():
    from dmamig.sweep.cluster import ClusterError, connect, local_worker_limit

    assert local_worker_limit("cuda", 4, 2) == (2, "4 GPU(s) here, 2 per worker")
    with pytest.raises(ClusterError, match=r"'local:2' asks for 2 workers, but this machine allows at most 1 "
                                           r"\(1 GPU\(s\) here, one per worker\)"):
        connect("local:2", backend="cuda", gpus=1)


def test_workers_summary_names_the_hosts():
    from dmamig.sweep.cluster import workers_summary

    who = [{"host": "b", "address": "tcp://b:1"}, {"host": "a", "address": "tcp://a:1"},
           {"host": "b", "address": "tcp://b:2"}]
    assert workers_summary(who) == "3 worker(s) on 2 host(s): a (1), b (2)"


@needs_dask
def test_replay_on_a_local_cluster(tmp_path, capsys):
    assert main([*REPLAY, "--out", str(tmp_path / "here")]) == 0
    assert "ran on" not in capsys.readouterr().out
    assert main([*REPLAY, "--out", str(tmp_path / "there"), "--cluster", "local:2"]) == 0
    assert f"dmamig replay: ran on 2 worker(s) on 1 host(s): {platform.node()} (2)" in capsys.readouterr().out
    here, there = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("here", "there"))
    assert [r["config"] for r in there["runs"]] == [r["config"] for r in here["runs"]]
    assert all(r["summary"]["verified"] for r in there["runs"])
    assert all(r["worker"]["address"].startswith("tcp://") for r in there["runs"])
    assert "worker" not in here["runs"][0] and there["machine"]["cluster"]["spec"] == "local:2"


@needs_dask
def test_gpu_workers_each_see_only_their_own_gpus():
    from distributed import Client

    from dmamig.sweep.cluster import RESOURCE, gpu_spec_cluster, local_gpu_groups

    assert local_gpu_groups(4, 1) == [[0], [1], [2], [3]]
    assert local_gpu_groups(4, 2) == [[0, 1], [2, 3]] and local_gpu_groups(3, 2) == [[0, 1]]
    with gpu_spec_cluster([[0, 1], [2, 3]]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=30)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0,1", "2,3"]
        info = client.scheduler_info()["workers"].values()
        assert all(w["resources"] == {RESOURCE: 1} and w["nthreads"] == 1 for w in info)


@needs_dask
def test_bench_cli_on_a_scheduler_address_resolves_the_backend_on_its_workers(tmp_path, session):
    out = tmp_path / "o"
    assert main([*tiny(), "--no-engine", "--out", str(out), "--cluster", session.address]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["machine"]["cluster"]["spec"] == session.address and doc["settings"]["backend"] == "cpu"
    assert {r["worker"]["address"] for r in doc["scenarios"]} <= set(session.workers())


@needs_dask
def test_a_scheduler_without_usable_workers_is_a_usage_error():
    from distributed import LocalCluster

    from dmamig.sweep.cluster import ClusterError, connect

    with pytest.raises(ClusterError, match="cannot reach a Dask scheduler"):
        connect("tcp://127.0.0.1:9", timeout=1)
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as plain:
        with pytest.raises(ClusterError, match="--resources bench=1"):
            connect(plain.scheduler_address)


class _InterruptedSession:
    """A session whose scheduler questions meet Ctrl-C: whoever opened it must still close it."""

    address = "tcp://127.0.0.1:1"

    def __init__(self):
        self.closed = 0

    def workers(self):
        raise KeyboardInterrupt

    describe = workers

    def close(self):
        self.closed += 1


@needs_dask
@pytest.mark.parametrize("argv", [[*TINY, "--no-engine"], REPLAY])
def test_ctrl_c_before_the_first_task_closes_the_session(argv, tmp_path, capsys, monkeypatch):
    from dmamig.sweep import cli as sweep_cli

    fake = _InterruptedSession()
    monkeypatch.setattr(sweep_cli, "connect_or_exit", lambda parser, spec, **options: fake)
    out = tmp_path / "o"
    assert main([*argv, "--out", str(out), "--cluster", "local"]) == 130
    assert fake.closed >= 1
    said = capsys.readouterr()
    assert "interrupted before any" in said.err + said.out
    assert not (out / "results.json").exists()


@needs_dask
@pytest.mark.parametrize("stop", [KeyboardInterrupt, TimeoutError])
def test_a_connection_that_fails_after_the_client_started_closes_it(stop, monkeypatch):
    import distributed

    from dmamig.sweep.cluster import ClusterError, connect

    clients = []

    class Client:
        def __init__(self, *a, **k):
            self.closed = False
            clients.append(self)

        def wait_for_workers(self, n, timeout=None):
            raise stop

        def close(self):
            self.closed = True

    monkeypatch.setattr(distributed, "Client", Client)
    with pytest.raises(ClusterError if stop is TimeoutError else KeyboardInterrupt):
        connect("tcp://127.0.0.1:1", wait=0.1)
    assert len(clients) == 1 and clients[0].closed


@needs_dask
def test_a_replay_task_that_fails_twice_is_reported_and_the_other_kept(tmp_path, session, monkeypatch):
    from dmamig.tiering import make_workload
    from dmamig.tiering import sweep as rsweep

    real = rsweep.run_on_worker

    def no_copy_fails(task, job):
        if task.id == "no-copy":
            raise RuntimeError("injected failure")
        return real(task, job)

    monkeypatch.setattr(rsweep, "run_on_worker", no_copy_fails)
    job = rsweep.ReplayJob(make_workload("uniform", pages=64, epochs=3, per_epoch=64), "tpp")
    sweep = rsweep.ReplaySweep(job, rsweep.replay_tasks(job, ["copy", "no-copy"]), tmp_path, job.settings("u", []))
    failures = sweep.run(session=session)
    assert [(f.id, f.error) for f in failures] == [("no-copy", "RuntimeError: injected failure")]
    runs = sweep.runs()
    assert [r["config"]["mode"] for r in runs] == ["copy"] and runs[0]["worker"]["address"] in session.workers()
