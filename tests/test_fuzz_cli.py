"""CLI fuzzing: bad arguments and bad input files give exit code 2 (1 where a command documents it) and one
clear line, never a traceback. Only parsing and validation paths run: every generated ``bench``, ``stress``
and ``replay`` argument list carries at least one invalid value, so nothing is benchmarked."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmamig.cli import main

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Values no option of these commands accepts for the option it is paired with.
_BAD_NUMBER = st.sampled_from(["", "x", "-1", "1e999", "nan", "1.5", "0x10", "--", " ", "1 2", "+-3", "\u00b2"])
_BAD_SIZE = st.sampled_from(["", "1", "3k", "4q", "-4k", "100T", "1.2345k", "1e3", "k", "2m2"])
_BAD_LIST = st.sampled_from(["", ",", "x", "-1", "1;2", "3k", "1.5", "2,x"])
_TEXT = st.text(min_size=0, max_size=12)
#: --cluster and --resume values refused before anything connects or runs (Dask installed or not).
_BAD_SWEEP = st.one_of(st.tuples(st.just("--cluster"), st.sampled_from(["", " ", "local:", "local:0", "local:x",
                                                                        "local:-2", "local:\u00b2"])),
                       st.tuples(st.just("--resume"), st.sampled_from(["no-such-sweep-folder", "/"])))

BENCH_BAD = st.one_of(
    st.tuples(st.sampled_from(["--total"]), _BAD_SIZE),
    st.tuples(st.sampled_from(["--sizes", "--channels", "--batch", "--batches-per-step", "--pipeline"]),
              _BAD_LIST),
    st.tuples(st.sampled_from(["--repeat", "--warmup", "--devices"]), _BAD_NUMBER),
    st.tuples(st.sampled_from(["--repeat", "--devices"]), st.just("0")),
    st.tuples(st.sampled_from(["--backend"]), _TEXT.filter(lambda t: t not in ("auto", "cpu", "cuda"))),
    st.tuples(st.sampled_from(["--no-such-option", "--quick=1", "-z"]), st.just("1")),
    _BAD_SWEEP,
)
BENCH_ANY = st.one_of(BENCH_BAD, st.tuples(st.sampled_from(["--sizes", "--channels", "--repeat", "--total"]),
                                           st.sampled_from(["4k", "2", "1", "1M", "64k,2m"])))
STRESS_BAD = st.one_of(
    st.tuples(st.sampled_from(["--ops", "--threads", "--seed", "--check-every"]), _BAD_NUMBER),
    st.tuples(st.sampled_from(["--fault-rate", "--stall-timeout"]),
              st.sampled_from(["-0.1", "x", "", "-inf", "-5"])),
    st.tuples(st.just("--fault-rate"), st.sampled_from(["2", "nan", "1.01"])),
    st.tuples(st.just("--roles"), st.sampled_from(["", ",", "writer,writer", "nobody", "reader;writer"])),
    st.tuples(st.just("--backend"), _TEXT.filter(lambda t: t not in ("auto", "cpu", "cuda"))),
)
REPLAY_BAD = st.one_of(
    st.tuples(st.sampled_from(["--channels", "--threads", "--pages", "--epochs", "--per-epoch", "--actors",
                               "--seed"]), _BAD_NUMBER),
    st.tuples(st.sampled_from(["--device-fraction", "--fast-fraction", "--slow-cost"]),
              st.sampled_from(["x", "", "-1", "nan", "-inf"])),
    st.tuples(st.sampled_from(["--policy", "--mode", "--format"]), _TEXT),
    _BAD_SWEEP,
)


def run(argv: list[str]) -> tuple[int, str]:
    """``dmamig.cli.main(argv)`` in-process: its exit code and what it wrote to stderr."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
    return rc, err.getvalue()


def assert_clear(rc: int, err: str, argv: list[str], codes: tuple[int, ...] = (2,)) -> None:
    assert rc in codes, f"{argv}: exit {rc}\n{err}"
    assert "Traceback" not in err, f"{argv}: a traceback\n{err}"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith("dmamig") and ("error" in last or ":" in last), f"{argv}: no clear last line\n{err}"


def _ordered(pairs: list[tuple[str, str]]) -> list[str]:
    # "--opt=value" keeps values that start with "-" attached to their option.
    return [f"{k}={v}" for k, v in pairs]


@FAST
@given(bad=BENCH_BAD, rest=st.lists(BENCH_ANY, max_size=3), quick=st.booleans(), data=st.data())
def test_bench_arguments(bad, rest, quick, data):
    pairs = data.draw(st.permutations([bad, *rest]))
    argv = ["bench", *(["--quick"] if quick else []), *_ordered(pairs)]
    with tempfile.TemporaryDirectory() as tmp:
        argv += ["--out", str(Path(tmp) / "never")]
        rc, err = run(argv)
        assert not (Path(tmp) / "never").exists(), f"{argv}: a folder was created"
    assert_clear(rc, err, argv)


@pytest.mark.parametrize("argv, option", [
    (["bench", "--repeat=\u00b2"], "--repeat"),
    (["bench", "--devices=\u00b2"], "--devices"),
    (["bench", "--channels=1,\u00b2"], "--channels"),
    (["bench", "--fault-batch=\u00b3"], "--fault-batch"),
    (["bench", "--cluster=local:\u00b2"], "--cluster"),
    (["replay", "uniform", "--pages=\u00b2"], "--pages"),
    (["replay", "uniform", "--cluster=local:\u00b9"], "--cluster"),
])
def test_digits_that_are_not_whole_numbers_are_refused_by_name(argv, option, tmp_path):
    # str.isdigit() accepts superscripts, which int() refuses: the check must not let them through.
    argv = [*argv, "--out", str(tmp_path / "never")]
    rc, err = run(argv)
    assert_clear(rc, err, argv)
    last = err.strip().splitlines()[-1]
    assert option in last and "invalid literal" not in last, last
    assert not (tmp_path / "never").exists()


@FAST
@given(bad=STRESS_BAD)
def test_stress_arguments(bad):
    argv = ["stress", "--ops", "1", *_ordered([bad])]
    assert_clear(*run(argv), argv)


@FAST
@given(bad=REPLAY_BAD)
def test_replay_arguments(bad):
    argv = ["replay", *_ordered([bad]), "uniform"]
    assert_clear(*run(argv), argv)


FILES = st.one_of(
    st.binary(min_size=0, max_size=200),
    st.text(max_size=200).map(lambda t: t.encode()),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                 max_leaves=8).map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"{}", b'{"schema_version": 2}', b"[" * 5000, b'{"scenarios": []}']),
)


@FAST
@given(content=FILES, with_baseline=st.booleans())
def test_report_input_files(content, with_baseline):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "r.json"
        f.write_bytes(content)
        argv = ["report", str(f), *([str(f)] if with_baseline else [])]
        rc, err = run(argv)
    assert_clear(rc, err, argv)


@FAST
@given(content=st.one_of(st.binary(min_size=1, max_size=200), st.text(min_size=1, max_size=200)
                         .map(lambda t: t.encode())), suffix=st.sampled_from([".npz", ".parquet", ".log", ""]))
def test_replay_input_files(content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / f"trace{suffix}"
        f.write_bytes(content)
        argv = ["replay", "--no-plots", "--out", str(Path(tmp) / "o"), str(f)]
        rc, err = run(argv)
    # An unreadable trace is a usage error: exit 2 and one line.
    assert rc == 2 and "Traceback" not in err, f"{argv}: exit {rc}\n{err}"
    assert err.startswith("dmamig replay") and len(err.strip().splitlines()) == 1, f"{argv}: not one line\n{err}"


@FAST
@given(bad=st.sampled_from(["--threshold=x", "--threshold=1", "--threshold=-0.1", "--threshold=nan",
                            "--metric=speed", "--nope"]))
def test_report_arguments(bad):
    argv = ["report", "r.json", bad]
    assert_clear(*run(argv), argv)
