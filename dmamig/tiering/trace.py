"""Access traces: a columnar record of (epoch, actor, offset, length, write), saved compressed.

Format
------
A trace is five columns of equal length, one row per access, plus a little metadata:

========  ========  ===============================================================================
column    dtype     meaning
========  ========  ===============================================================================
epoch     int32     the policy interval the access falls in; non-decreasing down the trace
actor     int16     who accesses: ``0 .. actors - 1`` (a CPU thread of the workload)
offset    int64     first byte, relative to the start of the traced region (``0 .. region_bytes``)
length    int32     bytes accessed, > 0; ``offset + length <= region_bytes``
write     bool      True for a store, False for a load
========  ========  ===============================================================================

Metadata: ``region_bytes`` (the size of the one mapping the trace addresses), ``actors``, ``name`` and
``page_size`` (the page size the region was laid out with; replay may use another).

Two containers hold the same columns: Parquet (``.parquet``, zstd-compressed, metadata in the schema's
key-value metadata) when ``pyarrow`` is installed (``pip install dmamig[traces]``), and compressed numpy
(``.npz``) always. Offsets are relative so that a trace replays into a fresh mapping anywhere.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgument

__all__ = ["COLUMNS", "Trace", "TraceError", "have_pyarrow", "load_trace", "save_trace"]

#: Column names and dtypes, in file order.
COLUMNS = {"epoch": np.int32, "actor": np.int16, "offset": np.int64, "length": np.int32, "write": np.bool_}


class TraceError(InvalidArgument):
    """A trace that cannot be replayed: a bad record (named by its index), a truncated or foreign file."""


@dataclass
class Trace:
    """An access trace (see the module docstring for the format).

    Attributes
    ----------
    epoch, actor, offset, length, write : numpy.ndarray
        The columns, one row per access.
    region_bytes : int
        Size of the traced region; every access lies inside it.
    actors : int
        Number of actors; ``actor`` values lie in ``0 .. actors - 1``.
    name : str
        Where the trace came from (a workload name, a converted file).
    page_size : int
        Page size the trace was made with.
    meta : dict
        Free-form provenance (workload parameters, seed); saved with the trace.
    """

    epoch: np.ndarray
    actor: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    write: np.ndarray
    region_bytes: int
    actors: int = 1
    name: str = "trace"
    page_size: int = 4096
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for col, dt in COLUMNS.items():
            setattr(self, col, _column(col, getattr(self, col), dt, self.name))

    def __len__(self) -> int:
        return int(self.epoch.size)

    @property
    def epochs(self) -> int:
        """Number of epochs (last epoch + 1; 0 for an empty trace)."""
        return int(self.epoch[-1]) + 1 if len(self) else 0

    def columns(self) -> dict[str, np.ndarray]:
        """The five columns by name."""
        return {c: getattr(self, c) for c in COLUMNS}

    def equals(self, other: Trace) -> bool:
        """Same records and the same region, actors and page size."""
        return (self.region_bytes == other.region_bytes and self.actors == other.actors
                and self.page_size == other.page_size
                and all(np.array_equal(a, b) for a, b in zip(self.columns().values(), other.columns().values())))

    def validate(self) -> Trace:
        """Check every record; raise :class:`TraceError` naming the first bad one. Returns ``self``.

        Checked: equal column lengths, non-decreasing epochs starting at >= 0, known actors, positive lengths,
        accesses inside ``[0, region_bytes)``.
        """
        n = len(self)
        if any(getattr(self, c).size != n for c in COLUMNS):
            raise TraceError(f"trace {self.name!r}: columns have different lengths "
                             f"{ {c: int(getattr(self, c).size) for c in COLUMNS} }")
        if self.region_bytes <= 0 or self.actors <= 0 or self.page_size <= 0:
            raise TraceError(f"trace {self.name!r}: region_bytes, actors and page_size must be > 0, got "
                             f"{self.region_bytes}, {self.actors}, {self.page_size}")
        checks = [
            (self.epoch < 0, "epoch is negative"),
            (np.concatenate([[False], np.diff(self.epoch) < 0]), "epoch goes backwards (epochs must be sorted)"),
            ((self.actor < 0) | (self.actor >= self.actors), f"unknown actor (actors are 0..{self.actors - 1})"),
            (self.length <= 0, "length must be > 0"),
            ((self.offset < 0) | (self.offset + self.length > self.region_bytes),
             f"access lies outside the mapping of {self.region_bytes} bytes"),
        ]
        for bad, why in checks:
            idx = np.flatnonzero(bad)
            if idx.size:
                i = int(idx[0])
                raise TraceError(f"trace {self.name!r}, record {i} (epoch {int(self.epoch[i])}, actor "
                                 f"{int(self.actor[i])}, offset {int(self.offset[i])}, length "
                                 f"{int(self.length[i])}): {why}")
        return self


def _column(name: str, values: Any, dtype: Any, trace: str) -> np.ndarray:
    """``values`` as the column ``name`` of its format's ``dtype``: refused (naming the column) when it is not
    one-dimensional, or when the conversion would change a value (a fraction, an overflow, a non-number)."""
    arr = np.asarray(values)
    want = np.dtype(dtype)
    if arr.ndim != 1:
        raise TraceError(f"trace {trace!r}: column {name!r} has shape {arr.shape}; a trace column is "
                         f"one-dimensional, one value per access")
    if arr.dtype == want:
        return np.ascontiguousarray(arr)
    wrong = TraceError(f"trace {trace!r}: column {name!r} has dtype {arr.dtype}, which does not convert to its "
                       f"format's {want} without changing values; give {name} as {want}")
    if arr.dtype.kind not in "biuf":  # text, objects, dates: not numbers
        raise wrong
    with np.errstate(all="ignore"):
        out = arr.astype(want)
    if arr.size and not np.array_equal(out, arr):
        raise wrong
    return np.ascontiguousarray(out)


def _check_file_dtypes(cols: dict[str, np.ndarray], path: Path) -> None:
    """A trace file's columns must hold their format's dtypes (or one that converts to it safely)."""
    for name, dt in COLUMNS.items():
        got = np.asarray(cols[name]).dtype
        if not np.can_cast(got, dt, "safe"):
            raise TraceError(f"{path}: column {name!r} has dtype {got}; a trace's {name} is {np.dtype(dt)} "
                             f"(see the format in dmamig.tiering.trace); this file was not written by dmamig "
                             f"or was changed since")


def _meta(trace: Trace) -> dict[str, Any]:
    return {"format": "dmamig-trace/1", "region_bytes": trace.region_bytes, "actors": trace.actors,
            "name": trace.name, "page_size": trace.page_size, "meta": trace.meta}


def _from_meta(cols: dict[str, np.ndarray], meta: dict[str, Any], path: Path) -> Trace:
    if meta.get("format") != "dmamig-trace/1":
        raise TraceError(f"{path}: not a dmamig trace (format {meta.get('format')!r}, expected 'dmamig-trace/1')")
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        raise TraceError(f"{path}: trace lacks columns {missing}")
    _check_file_dtypes(cols, path)
    return Trace(**{c: cols[c] for c in COLUMNS}, region_bytes=int(meta["region_bytes"]),
                 actors=int(meta["actors"]), name=str(meta["name"]), page_size=int(meta["page_size"]),
                 meta=dict(meta.get("meta", {}))).validate()


def have_pyarrow() -> bool:
    """True when Parquet traces can be read and written (``pyarrow`` importable)."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def _need_pyarrow(path: Path) -> None:
    if not have_pyarrow():
        raise TraceError(f"{path}: Parquet traces need pyarrow (pip install 'dmamig[traces]'); without it, "
                         f"use a .npz trace, which holds the same columns")


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` to ``path``: ``.parquet`` (needs pyarrow) or ``.npz`` (compressed numpy).

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    trace.validate()
    if path.suffix == ".parquet":
        _need_pyarrow(path)
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(trace.columns()).replace_schema_metadata({"dmamig": json.dumps(_meta(trace))})
        pq.write_table(table, path, compression="zstd")
    elif path.suffix == ".npz":
        np.savez_compressed(path, **trace.columns(), meta=np.array(json.dumps(_meta(trace))))
    else:
        raise TraceError(f"{path}: a trace file ends in .parquet or .npz")
    return path


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace written by :func:`save_trace`.

    Raises
    ------
    TraceError
        Unknown suffix, truncated or foreign file, or a bad record (named by its index).
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    try:
        if path.suffix == ".parquet":
            _need_pyarrow(path)
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            meta = json.loads((table.schema.metadata or {}).get(b"dmamig", b"{}"))
            cols = {c: table.column(c).to_numpy() for c in table.column_names}
        elif path.suffix == ".npz":
            if not zipfile.is_zipfile(path):  # else numpy tries it as a pickle and advises allow_pickle
                raise TraceError(f"{path}: not a trace: a .npz trace is a zip archive of columns (what "
                                 f"dmamig replay --record writes), and this file is not one")
            with np.load(path, allow_pickle=False) as z:
                cols = {k: z[k] for k in z.files}
            meta = json.loads(str(cols.pop("meta", np.array("{}"))))
        else:
            raise TraceError(f"{path}: a trace file ends in .parquet or .npz")
    except TraceError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise TraceError(f"{path}: unreadable or truncated trace ({type(exc).__name__}: {exc})") from None
    return _from_meta(cols, meta, path)
