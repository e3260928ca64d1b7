"""Which machine made a result, and which commit: what results.json and ``dmamig info`` record about the host,
the GPUs and the git commit, and how ``dmamig report`` refuses to compare two machines' runs."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmamig.bench.results import (
    OtherMachine,
    check_same_machine,
    load_results,
    machine_identity,
    write_csv,
    write_json,
)
from dmamig.cli import main
from dmamig.sweep.hardware import gpu_facts, host_facts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
H200 = RESULTS / "cuda-h200-2026-11-25"
EPYC_1G = RESULTS / "cpu-epyc-2core-1G-2026-11-25"
EPYC = RESULTS / "cpu-epyc-2core-2026-11-26"


# -- dmamig report across machines ---------------------------------------------------------------------------------

def test_report_refuses_committed_results_of_two_machines_and_names_the_fields(capsys):
    assert main(["report", str(H200), str(EPYC_1G)]) == 2
    err = capsys.readouterr().err
    assert "different machines" in err
    assert "CPU model 'Intel(R) Xeon(R) Processor' vs baseline 'AMD EPYC'" in err
    assert "GPU 'NVIDIA H200' vs baseline 'none'" in err
    assert "--allow-other-machine" in err


def test_report_compares_two_machines_with_allow_other_machine(capsys):
    rc = main(["report", str(H200), str(EPYC_1G), "--allow-other-machine"])
    out, err = capsys.readouterr()
    assert rc in (0, 1)  # compared: a verdict, not a refusal
    assert "Against baseline" in out
    assert "comparing runs of different machines on purpose" in err and "backend cuda vs baseline cpu" in err


def test_report_of_one_machine_is_not_refused(capsys):
    assert main(["report", str(EPYC), str(EPYC)]) == 0
    assert "different machines" not in capsys.readouterr().err


def test_unknown_machine_fields_do_not_count_as_different_and_are_said(tmp_path, capsys):
    # An older result that records no GPU list and an unreadable CPU model: nothing to tell the machines apart.
    doc = json.loads((EPYC / "results.json").read_text())
    old = copy.deepcopy(doc)
    old["machine"]["cpu"] = "unknown"
    old["machine"].pop("gpus", None)
    write_json(old, tmp_path / "old.json")
    assert machine_identity(old) == {"cpu_model": None, "gpus": None}
    assert check_same_machine(doc, old) == ["CPU model", "GPU"]
    assert main(["report", str(EPYC), str(tmp_path / "old.json")]) == 0
    assert "not checked whether both runs come from the same machine: CPU model, GPU unknown" in \
        capsys.readouterr().err


def test_cluster_workers_cpu_models_are_what_is_compared():
    doc = load_results(EPYC)
    other = copy.deepcopy(doc)
    other["machine"]["workers"] = [{"host": "a", "cpu": "Neoverse-V2", "pid": 1, "gpus": []}]
    with pytest.raises(OtherMachine) as exc:
        check_same_machine(other, doc)
    assert exc.value.fields == ["CPU model"] and "'Neoverse-V2' vs baseline 'AMD EPYC'" in str(exc.value)


# -- what a result records ----------------------------------------------------------------------------------------

def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Grace Test CPU\n")
    (root / "proc" / "meminfo").write_text("MemTotal:       8388608 kB\nMemFree: 1 kB\n")
    (root / "proc" / "self" / "status").write_text("Name:\tx\nCpus_allowed_list:\t0-1,4\n")
    cpu = root / "sys" / "devices" / "system" / "cpu"
    (cpu / "smt").mkdir(parents=True)
    (cpu / "smt" / "active").write_text("1\n")
    (cpu / "cpu0" / "topology").mkdir(parents=True)
    (cpu / "cpu0" / "topology" / "thread_siblings_list").write_text("0,4\n")
    (cpu / "online").write_text("0-7\n")
    for n, cpus in ((0, "0-3"), (1, "4-7")):
        node = root / "sys" / "devices" / "system" / "node" / f"node{n}"
        node.mkdir(parents=True)
        (node / "cpulist").write_text(cpus + "\n")
        (node / "meminfo").write_text(f"Node {n} MemTotal:       4194304 kB\n")
    return root


def test_host_facts_read_cpu_affinity_smt_numa_and_memory(tmp_path):
    h = host_facts(_fake_root(tmp_path))
    assert h == {"cpu_model": "Grace Test CPU", "cpus_online": 8, "cpus_available": 3, "affinity": "0-1,4",
                 "smt": "on", "threads_per_core": 2,
                 "numa_nodes": [{"node": 0, "cpus": "0-3", "memory_bytes": 4 << 30},
                                {"node": 1, "cpus": "4-7", "memory_bytes": 4 << 30}],
                 "memory_bytes": 8 << 30}


def test_host_facts_say_unknown_where_sys_is_missing(tmp_path):
    root = tmp_path / "bare"
    root.mkdir()
    h = host_facts(root)
    assert h["smt"].startswith("unknown") and h["numa_nodes"].startswith("unknown")
    assert h["memory_bytes"].startswith("unknown") and h["cpus_available"].startswith("unknown")


SMI = """#!/bin/sh
cat <<'EOF'
0, GPU-aaaa-0000, 00000000:18:00.0, NVIDIA H100 80GB HBM3, 550.54.15, Default, Enabled, 1980, 2619
1, GPU-bbbb-1111, 00000000:2A:00.0, NVIDIA H100 80GB HBM3, 550.54.15, Exclusive_Process, Disabled, [N/A], 2619
EOF
"""


@pytest.fixture()
def fake_smi(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    return bin_dir


def test_gpu_facts_record_uuid_bus_driver_modes_and_clocks_of_the_gpu_used(fake_smi, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    [g] = gpu_facts([{"id": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 80 << 30}], cuda_runtime="12.8")
    assert g["uuid"] == "GPU-bbbb-1111" and g["pci_bus_id"] == "00000000:2A:00.0"
    assert g["driver"] == "550.54.15" and g["cuda_runtime"] == "12.8"
    assert g["compute_mode"] == "Exclusive_Process" and g["persistence_mode"] == "Disabled"
    assert g["app_clock_graphics_mhz"].startswith("unknown (nvidia-smi: [N/A]")
    assert g["app_clock_memory_mhz"] == 2619 and g["smi_match"] == "CUDA_VISIBLE_DEVICES index"


def test_gpu_facts_do_not_guess_between_two_alike_gpus(fake_smi, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    [g] = gpu_facts([{"id": 0, "name": "NVIDIA H100 80GB HBM3"}], cuda_runtime="12.8")
    assert g["uuid"].startswith("unknown (device 0 cannot be told apart among 2 GPUs")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    [g] = gpu_facts([{"id": 0, "name": "NVIDIA H100 80GB HBM3"}], cuda_runtime="12.8")
    assert g["uuid"] == "GPU-aaaa-0000" and g["persistence_mode"] == "Enabled"


def test_gpu_facts_without_nvidia_smi_say_so(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi there
    [g] = gpu_facts([{"id": 0, "name": "Some GPU"}], cuda_runtime="12.8")
    assert g["uuid"] == "unknown (nvidia-smi not found)" and g["driver"] == "unknown (nvidia-smi not found)"


def test_bench_records_the_host_and_no_gpu_here(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["bench", "--quick", "--backend", "cpu", "--no-plots", "--out", str(out)]) == 0
    capsys.readouterr()
    m = json.loads((out / "results.json").read_text())["machine"]
    assert m["gpus"] == []
    assert m["host"]["cpus_available"] == len(os.sched_getaffinity(0))
    assert m["host"]["cpu_model"] == m["cpu"] and isinstance(m["host"]["memory_bytes"], int)
    assert m["git_commit_source"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert rows[0]["host"] == m["hostname"] and rows[0]["cpu_model"] == m["cpu"] and rows[0]["gpu"] == ""


def test_info_shows_the_host_and_the_commit(capsys):
    assert main(["info", "--backend", "cpu", "--json"]) in (0, 1)
    info = json.loads(capsys.readouterr().out)
    assert info["host"]["cpus_available"] == len(os.sched_getaffinity(0))
    assert "git_dirty" in info and info["git_commit_source"]
    main(["info", "--backend", "cpu"])
    out = capsys.readouterr().out
    assert "CPUs available" in out and "NUMA node" in out and "SMT" in out


def test_results_csv_carries_each_cluster_workers_host_and_gpu(tmp_path, capsys):
    doc = load_results(EPYC)
    who = [{"host": f"node{i}", "cpu": "AMD EPYC", "address": f"tcp://10.0.0.{i}:4000", "pid": 10 + i,
            "gpus": [{"index": i, "name": "NVIDIA H200", "uuid": f"GPU-{i}", "pci_bus_id": f"0000:{i}:00.0"}]}
           for i in range(2)]
    for k, sc in enumerate(doc["scenarios"]):
        sc["worker"] = who[k % 2]
    write_json(doc, tmp_path / "results.json")
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [r["host"] for r in rows[:2]] == ["node0", "node1"]
    assert rows[1]["worker"] == "tcp://10.0.0.1:4000" and rows[1]["gpu"] == "NVIDIA H200"
    assert rows[1]["gpu_uuid"] == "GPU-1" and rows[1]["gpu_pci_bus_id"] == "0000:1:00.0"
    write_csv(doc, tmp_path / "again.csv")  # the writer alone gives the same rows
    assert list(csv.DictReader((tmp_path / "again.csv").open())) == rows


# -- the git commit of an installed copy ---------------------------------------------------------------------------

def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def _installed_copy(tmp_path: Path, direct_url: dict | None) -> Path:
    """dmamig as ``pip install .`` leaves it: the package in a site folder, no git metadata, a dist-info."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "dmamig", site / "dmamig", ignore=shutil.ignore_patterns("__pycache__"))
    info = site / "dmamig-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dmamig\nVersion: 0.1.0\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))
    return site


def _info_from(site: Path, cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "dmamig", "info", "--backend", "cpu", "--json"], cwd=cwd,
                         env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_installed_copy_records_the_commit_of_the_clone_it_was_installed_from(tmp_path):
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "dmamig", clone / "dmamig", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "pyproject.toml").write_text('[project]\nname = "dmamig"\n')
    _git(clone, "init", "-q")
    _git(clone, "add", "-A")
    _git(clone, "commit", "-q", "-m", "c")
    head = _git(clone, "rev-parse", "HEAD")
    site = _installed_copy(tmp_path, {"url": clone.as_uri(), "dir_info": {}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    info = _info_from(site, elsewhere)
    assert info["git_commit"] == head and info["git_dirty"] is False
    assert info["git_commit_source"] == f"the clone dmamig was installed from, {clone} (the installed files " \
                                        f"match its HEAD)"
    # The clone moved on after the install: its HEAD is not what is installed, and the record says so.
    (clone / "dmamig" / "flags.py").write_text("# changed\n")
    _git(clone, "commit", "-q", "-am", "d")
    info = _info_from(site, elsewhere)
    assert info["git_commit"] == _git(clone, "rev-parse", "HEAD") and info["git_dirty"] is True
    assert "the installed files differ from its HEAD" in info["git_commit_source"]


def test_installed_copy_from_a_git_url_records_pips_commit(tmp_path):
    site = _installed_copy(tmp_path, {"url": "https://example.invalid/dmamig.git",
                                      "vcs_info": {"vcs": "git", "commit_id": "ab" * 20}})
    info = _info_from(site, tmp_path)
    assert info["git_commit"] == "ab" * 20 and "the commit pip recorded" in info["git_commit_source"]


def test_installed_copy_without_a_source_says_why_the_commit_is_unknown(tmp_path):
    site = _installed_copy(tmp_path, {"url": (tmp_path / "gone").as_uri(), "dir_info": {}})
    info = _info_from(site, tmp_path)
    assert info["git_commit"] is None and info["git_dirty"] is None
    src = info["git_commit_source"]
    assert src.startswith("unknown: dmamig runs from") and "is not a git checkout" in src and "gone" in src


# -- the documentation of it ---------------------------------------------------------------------------------------

def test_docs_name_every_machine_field_a_result_records(tmp_path):
    from dmamig.bench.environment import machine_info
    from dmamig.sweep.hardware import SMI_FIELDS

    docs = (ROOT / "docs" / "results.md").read_text()
    info = machine_info("cpu")
    fields = [k for k in info if k != "note"] + [f"host.{k}" for k in info["host"]]
    fields += [key for _, key in SMI_FIELDS if not key.startswith("smi_")] + ["cuda_runtime", "smi_match"]
    def said(f: str) -> bool:
        return any(form in docs for form in (f"`{f}`", f"`{f.split('.')[-1]}`", f"`gpus[].{f}`"))

    missing = [f for f in fields if not said(f)]
    assert not missing, f"docs/results.md does not describe {missing}"
    reading = (ROOT / "docs" / "reading-results.md").read_text()
    assert "docs/results.md" in reading and "--allow-other-machine" in reading
    assert "### What a result records about its machine" in reading
