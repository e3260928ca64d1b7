"""Traces: the round trip through a file, bad traces named by record, and the Valgrind Lackey converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dmamig.tiering import (
    Trace,
    TraceError,
    have_pyarrow,
    lackey_to_trace,
    load_trace,
    make_workload,
    save_trace,
)

DATA = Path(__file__).parent / "data"


def tiny(**kw) -> Trace:
    cols = {"epoch": [0, 0, 1, 2], "actor": [0, 1, 0, 1], "offset": [0, 4096, 100, 8000], "length": [64, 64, 8, 100],
            "write": [True, False, False, True]}
    cols.update(kw)
    return Trace(**{k: np.array(v) for k, v in cols.items()}, region_bytes=3 * 4096, actors=2, name="tiny")


@pytest.mark.parametrize("suffix", [".npz", pytest.param(".parquet", marks=pytest.mark.skipif(
    not have_pyarrow(), reason="pyarrow is not installed (pip install dmamig[traces])"))])
def test_workload_trace_round_trip(tmp_path, suffix):
    t = make_workload("kvstore", pages=64, epochs=4, per_epoch=32, actors=2, seed=3)
    back = load_trace(save_trace(t, tmp_path / f"t{suffix}"))
    assert back.equals(t) and back.name == "kvstore" and back.meta["seed"] == 3
    assert back.offset.dtype == np.int64 and back.write.dtype == np.bool_


def test_parquet_without_pyarrow_says_what_to_do(tmp_path):
    if have_pyarrow():
        pytest.skip("pyarrow is installed")
    with pytest.raises(TraceError, match=r"dmamig\[traces\].*\.npz"):
        save_trace(tiny(), tmp_path / "t.parquet")


@pytest.mark.parametrize("change, why, record", [
    ({"epoch": [0, 2, 1, 2]}, "epoch goes backwards", 2),
    ({"actor": [0, 1, 5, 1]}, "unknown actor", 2),
    ({"offset": [0, 4096, 100, 3 * 4096 - 10]}, "outside the mapping", 3),
    ({"length": [64, 0, 8, 100]}, "length must be > 0", 1),
    ({"epoch": [-1, 0, 1, 2]}, "epoch is negative", 0),
])
def test_bad_records_are_named(change, why, record):
    with pytest.raises(TraceError, match=f"record {record} .*{why}"):
        tiny(**change).validate()


@pytest.mark.parametrize("suffix", [".npz", pytest.param(".parquet", marks=pytest.mark.skipif(
    not have_pyarrow(), reason="pyarrow is not installed (pip install dmamig[traces])"))])
def test_truncated_and_foreign_files_are_refused(tmp_path, suffix):
    path = save_trace(tiny(), tmp_path / f"t{suffix}")
    raw = path.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TraceError, match="truncated"):
        load_trace(tmp_path / f"cut{suffix}")
    np.savez(tmp_path / "other.npz", x=np.arange(3))
    with pytest.raises(TraceError, match="not a dmamig trace"):
        load_trace(tmp_path / "other.npz")
    with pytest.raises(TraceError, match=r"\.parquet or \.npz"):
        save_trace(tiny(), tmp_path / "t.csv")


def test_lackey_sample_converts_data_accesses():
    t = lackey_to_trace(DATA / "lackey_sample.txt", per_epoch=4)
    assert len(t) == 11 and t.actors == 1 and t.region_bytes == 5 * 4096
    # Pages 0x4021, 0x4022, 0x4023, 0x4a00 and 0x1ffefff pack, in address order, into pages 0..4.
    assert t.offset.tolist() == [4 * 4096 + 0xD78, 0xE70, 0xE78, 4096 + 0x40, 4096 + 0xFFC, 4 * 4096 + 0xD78, 0xE70,
                                 4 * 4096 + 0xD80, 3 * 4096, 3 * 4096 + 0x10, 4096 + 0x40]
    assert t.length.tolist() == [8, 8, 8, 4, 8, 8, 8, 8, 16, 16, 4]
    assert t.write.tolist() == [True, False, False, True, True, False, False, True, True, False, False]
    assert t.epoch.tolist() == [0] * 4 + [1] * 4 + [2] * 3


def test_lackey_with_instructions_and_empty_file(tmp_path):
    assert len(lackey_to_trace(DATA / "lackey_sample.txt", instructions=True)) == 11 + 4
    (tmp_path / "empty.txt").write_text("==1== nothing here\n")
    with pytest.raises(TraceError, match="no Lackey access lines"):
        lackey_to_trace(tmp_path / "empty.txt")


# -- typed columns ---------------------------------------------------------------------------------------------

def _npz_with(tmp_path: Path, name: str, value) -> Path:
    t = tiny()
    cols = t.columns()
    cols[name] = value
    path = tmp_path / f"bad-{name}.npz"
    np.savez_compressed(path, **cols, meta=np.load(save_trace(t, tmp_path / "good.npz"))["meta"])
    return path


@pytest.mark.parametrize("name, value, said", [
    ("offset", np.array([0.0, 4096.0, 100.0, 8000.0]), "column 'offset' has dtype float64; a trace's offset is int64"),
    ("epoch", np.array([0, 0, 1, 2], dtype=np.int64), "column 'epoch' has dtype int64; a trace's epoch is int32"),
    ("write", np.array([1, 0, 0, 1], dtype=np.uint8), "column 'write' has dtype uint8; a trace's write is bool"),
    ("length", np.array([[64], [64], [8], [100]], dtype=np.int32), "column 'length' has shape (4, 1)"),
])
def test_replay_refuses_a_trace_file_whose_column_has_the_wrong_dtype(tmp_path, capsys, name, value, said):
    from dmamig.cli import main

    path = _npz_with(tmp_path, name, value)
    assert main(["replay", str(path), "--no-plots", "--out", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert said in err and not (tmp_path / "out").exists()


def test_trace_columns_that_would_change_in_conversion_are_refused_by_name():
    with pytest.raises(TraceError, match=r"column 'offset' has dtype float64, which does not convert to its "
                                         r"format's int64 without changing values"):
        tiny(offset=[0.5, 4096, 100, 8000])
    with pytest.raises(TraceError, match="column 'epoch' has dtype int64"):
        tiny(epoch=[0, 0, 1, 2**40])  # beyond int32
    with pytest.raises(TraceError, match="column 'actor' has dtype <U1"):
        tiny(actor=["0", "1", "0", "1"])
    assert tiny(epoch=np.array([0, 0, 1, 2], dtype=np.int64)).epoch.dtype == np.int32  # lossless: converted


def test_replay_digest_covers_dtypes_and_shapes_not_only_bytes():
    from dmamig.tiering.sweep import trace_digest

    t = tiny()
    base = trace_digest(t)
    assert trace_digest(tiny()) == base
    t.write = t.write.view(np.uint8)  # the same bytes, another dtype
    assert trace_digest(t) != base
    t = tiny()
    t.offset = t.offset.reshape(2, 2)  # the same bytes, another shape
    assert trace_digest(t) != base
