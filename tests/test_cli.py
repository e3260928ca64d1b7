"""The ``dmamig`` command line: argument errors name the option and what is allowed; schema, info."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import jsonschema_or_skip

from dmamig.bench.settings import parse_channels, parse_folio_sizes, parse_size
from dmamig.cli import build_parser, main


def _usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, expect", [
    (["bench", "--sizes", "3x"], ["--sizes", "'3x' is not a size", "4k, 2m"]),
    (["bench", "--sizes", "12k"], ["--sizes", "'12k' is not a folio size", "allowed: 4K, 8K", "2M"]),
    (["bench", "--sizes", "4m"], ["--sizes", "not a folio size"]),
    (["bench", "--sizes", ","], ["--sizes", "comma-separated list"]),
    (["bench", "--total", "lots"], ["--total", "not a size"]),
    (["bench", "--total", "1000"], ["--total", "whole number of 4 KiB pages"]),
    (["bench", "--channels", "0"], ["--channels", "'0' is not a channel count", "1 to 64"]),
    (["bench", "--channels", "two"], ["--channels", "'two'"]),
    (["bench", "--repeat", "0"], ["--repeat", "positive whole number"]),
    (["bench", "--warmup", "-1"], ["--warmup", "whole number >= 0"]),
    (["bench", "--backend", "tpu"], ["--backend", "invalid choice", "'cpu'", "'cuda'"]),
    (["report", "r.json", "--threshold", "2"], ["--threshold", "out of range", "[0, 1)"]),
    (["report", "r.json", "--threshold", "ten"], ["--threshold", "not a number"]),
    (["report", "r.json", "--metric", "speed"], ["--metric", "invalid choice", "ceiling-ratio"]),
    (["report"], ["RESULTS"]),
    (["bench", "--total", "-8M"], ["--total", "'-8M'"]),
    (["bench", "--warmup", "-1"], ["--warmup", "'-1'", "whole number >= 0"]),
    (["bench", "--topology", "dgx1"], ["--topology", "dgx1 has 8 devices", "--devices 8"]),
    (["bench", "--resume", "/nonexistent/sweep"], ["--resume", "does not exist"]),
    (["bench", "--resume", __file__], ["--resume", "is a file, not a folder"]),
    ([], ["COMMAND"]),
    (["frobnicate"], ["invalid choice", "bench"]),
])
def test_argument_errors_name_option_and_allowed_values(argv, expect, capsys):
    err = _usage_error(argv, capsys)
    for piece in expect:
        assert piece in err, (piece, err)


def test_total_must_be_a_multiple_of_the_largest_folio(capsys):
    err = _usage_error(["bench", "--backend", "cpu", "--sizes", "4k,2m", "--total", "3M"], capsys)
    assert "--total" in err and "multiple of the largest folio size 2M" in err


def test_cuda_backend_without_gpu_is_a_clear_usage_error(capsys, monkeypatch):
    from dmamig.backends.cuda import status as cuda_probe

    monkeypatch.setattr(cuda_probe, "cuda_unavailable_reason", lambda: "no CUDA device is visible")
    for cmd in ("bench", "selftest"):
        err = _usage_error([cmd, "--backend", "cuda"], capsys)
        assert "--backend" in err and "no CUDA device is visible" in err and "--backend cpu" in err


@pytest.mark.parametrize("text, value", [
    ("4k", 4096), ("4K", 4096), ("4KiB", 4096), ("64k", 65536), ("2m", 2 << 20), ("2MB", 2 << 20),
    ("256M", 256 << 20), ("1G", 1 << 30), ("1.5g", 3 << 29), ("4096", 4096),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "3x", "k", "-4k", "0", "1.3k", "4kk"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_lists_sort_and_deduplicate():
    assert parse_folio_sizes("2m, 4k,64k,4k") == [4096, 65536, 2 << 20]
    assert parse_channels("4,1,2,2") == [1, 2, 4]
    with pytest.raises(ValueError, match="65"):
        parse_channels("65")


def test_defaults_parse():
    args = build_parser().parse_args(["bench"])
    assert args.backend == "auto" and args.sizes is None and not args.quick
    args = build_parser().parse_args(["report", "a.json", "b.json"])
    assert args.threshold == 0.1 and args.metric == "throughput"


def test_schema_command_prints_a_valid_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema_or_skip().Draft202012Validator.check_schema(schema)
    assert "scenarios" in schema["required"]


def test_info_json_reports_versions_and_backend(capsys):
    rc = main(["info", "--backend", "cpu", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0, info.get("error")
    assert info["backend"] == "cpu"
    assert info["python"] and info["numpy"] and info["cpu_count"] >= 1
    assert "kernel_build_status" in info and "cuda" in info


def test_info_table(capsys):
    assert main(["info", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and "numpy" in out and "devices" in out


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "dmamig", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for cmd in ("bench", "report", "info", "selftest", "schema"):
        assert cmd in out.stdout


def test_readme_keeps_the_ci_commands_and_its_quick_tour_runs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    lines = readme.splitlines()
    # CI runs these two lines verbatim (.ci/run greps the test command out of the README).
    assert "python3 -m pip install . && dmamig bench" in lines
    assert "python3 -m pip install '.[test]' && python3 -m pytest" in lines
    api = (root / "docs" / "api.md").read_text()
    tour = api.split("## Python API quick tour", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(tour, "docs/api.md quick tour", "exec"), {})
    # The experiment settings' snippet runs on its own too.
    guide = (root / "docs" / "guide.md").read_text()
    snippet = guide.split("The same settings in Python:", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(snippet, "docs/guide.md experiment settings", "exec"), {})


@pytest.mark.parametrize("argv", [["bench", "--resume", "/nonexistent/sweep"], ["bench", "--topology", "dgx1"],
                                  ["bench", "--total", "lots"], ["stress", "--threads", "0"]])
def test_usage_errors_name_their_command_in_one_style(argv, capsys):
    """Whether argparse or a later check refuses it, a usage error reads 'dmamig COMMAND: error: ...'."""
    err = _usage_error(argv, capsys).strip().splitlines()[-1]
    assert err.startswith(f"dmamig {argv[0]}: error: argument "), err
