"""Built-in workloads: seeded, deterministic generators of access traces.

Each generator returns a :class:`~dmamig.tiering.Trace` over one region of ``pages`` pages; the same
arguments give the same trace, record for record. With several actors, no two actors store to one page
(each stores only to pages it owns, ``page % actors == actor``; in the stencil only the device stores), so
that threads replaying one epoch concurrently leave the same bytes behind in any interleaving, and data can
be verified exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidArgument
from .trace import Trace

__all__ = ["WORKLOADS", "kvstore", "make_workload", "phases", "sequential", "stencil", "uniform", "zipf"]


def _check(pages: int, epochs: int, per_epoch: int, actors: int, write_ratio: float, length: int,
           page_size: int) -> None:
    for name, v in (("pages", pages), ("epochs", epochs), ("per_epoch", per_epoch), ("actors", actors),
                    ("length", length), ("page_size", page_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise InvalidArgument(f"{name} must be an integer >= 1, got {v!r}")
    if not 0.0 <= write_ratio <= 1.0:
        raise InvalidArgument(f"write_ratio must be in [0, 1], got {write_ratio!r}")
    if length > page_size:
        raise InvalidArgument(f"length must be at most page_size ({page_size}), got {length}")


def _build(name: str, page: np.ndarray, rng: np.random.Generator, *, pages: int, epochs: int, per_epoch: int,
           actors: int, write_ratio: float, length: int, page_size: int, **meta: object) -> Trace:
    """Turn a page per access (epoch-major, ``epochs * per_epoch`` of them) into a trace."""
    n = epochs * per_epoch
    epoch = np.repeat(np.arange(epochs, dtype=np.int32), per_epoch)
    actor = (np.arange(n) % actors).astype(np.int16)
    write = rng.random(n) < write_ratio
    page = page.astype(np.int64) % pages
    if actors > 1:  # a store goes to a page of the storing actor (see the module docstring)
        owned = page - page % actors + actor
        owned = np.where(owned >= pages, owned - actors, owned)
        page = np.where(write, owned, page)
    slots = page_size // length
    offset = page * page_size + rng.integers(0, slots, n) * length
    return Trace(epoch, actor, offset, np.full(n, length, dtype=np.int32), write, region_bytes=pages * page_size,
                 actors=actors, name=name, page_size=page_size,
                 meta={"workload": name, "pages": pages, "epochs": epochs, "per_epoch": per_epoch,
                       "actors": actors, "write_ratio": write_ratio, "length": length, **meta})


def sequential(pages: int = 512, epochs: int = 16, per_epoch: int = 256, actors: int = 1, seed: int = 0,
               write_ratio: float = 0.2, length: int = 256, page_size: int = 4096) -> Trace:
    """A scan: each actor walks the region page after page and wraps around (streaming, no reuse)."""
    _check(pages, epochs, per_epoch, actors, write_ratio, length, page_size)
    rng = np.random.default_rng(seed)
    page = np.arange(epochs * per_epoch, dtype=np.int64)
    return _build("sequential", page, rng, pages=pages, epochs=epochs, per_epoch=per_epoch, actors=actors,
                  write_ratio=write_ratio, length=length, page_size=page_size, seed=seed)


def uniform(pages: int = 512, epochs: int = 16, per_epoch: int = 256, actors: int = 1, seed: int = 0,
            write_ratio: float = 0.2, length: int = 256, page_size: int = 4096) -> Trace:
    """Every access picks a page uniformly at random (no hot set: the worst case for any policy)."""
    _check(pages, epochs, per_epoch, actors, write_ratio, length, page_size)
    rng = np.random.default_rng(seed)
    page = rng.integers(0, pages, epochs * per_epoch)
    return _build("uniform", page, rng, pages=pages, epochs=epochs, per_epoch=per_epoch, actors=actors,
                  write_ratio=write_ratio, length=length, page_size=page_size, seed=seed)


def zipf(pages: int = 512, epochs: int = 16, per_epoch: int = 256, actors: int = 1, seed: int = 0,
         write_ratio: float = 0.2, length: int = 256, page_size: int = 4096, skew: float = 1.1) -> Trace:
    """A Zipfian hot set: page of rank ``r`` is drawn with probability ``~ 1 / r**skew``.

    Ranks are shuffled over the region so that hot pages are scattered, not packed at its start (where
    first touch would put them in the fast tier by luck).
    """
    _check(pages, epochs, per_epoch, actors, write_ratio, length, page_size)
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, pages + 1, dtype=np.float64) ** skew
    rank = rng.choice(pages, size=epochs * per_epoch, p=p / p.sum())
    page = rng.permutation(pages)[rank]
    return _build("zipf", page, rng, pages=pages, epochs=epochs, per_epoch=per_epoch, actors=actors,
                  write_ratio=write_ratio, length=length, page_size=page_size, seed=seed, skew=skew)


def phases(pages: int = 512, epochs: int = 16, per_epoch: int = 256, actors: int = 1, seed: int = 0,
           write_ratio: float = 0.2, length: int = 256, page_size: int = 4096, hot_fraction: float = 0.2,
           phase_epochs: int = 4) -> Trace:
    """A working set of ``hot_fraction`` of the pages that moves to another random part every
    ``phase_epochs`` epochs; 90 % of accesses go to the working set, the rest anywhere."""
    _check(pages, epochs, per_epoch, actors, write_ratio, length, page_size)
    if not 0.0 < hot_fraction <= 1.0 or phase_epochs < 1:
        raise InvalidArgument(f"hot_fraction must be in (0, 1] and phase_epochs >= 1, got {hot_fraction}, "
                              f"{phase_epochs}")
    rng = np.random.default_rng(seed)
    n = epochs * per_epoch
    hot = max(1, int(pages * hot_fraction))
    nphases = -(-epochs // phase_epochs)
    start = rng.integers(0, pages, nphases)[np.arange(n) // (per_epoch * phase_epochs)]
    page = np.where(rng.random(n) < 0.9, start + rng.integers(0, hot, n), rng.integers(0, pages, n))
    return _build("phases", page, rng, pages=pages, epochs=epochs, per_epoch=per_epoch, actors=actors,
                  write_ratio=write_ratio, length=length, page_size=page_size, seed=seed,
                  hot_fraction=hot_fraction, phase_epochs=phase_epochs)


def kvstore(pages: int = 512, epochs: int = 16, per_epoch: int = 256, actors: int = 1, seed: int = 0,
            write_ratio: float = 0.1, length: int = 256, page_size: int = 4096, hot_keys: float = 0.1,
            hot_share: float = 0.9) -> Trace:
    """A key-value store: an index (the first 1/16 of the region) and values of ``length`` bytes.

    Each operation reads one index slot and then gets (reads) or puts (writes, ``write_ratio``) one value;
    ``hot_share`` of operations go to the ``hot_keys`` fraction of keys. Two accesses per operation, so an
    epoch holds ``per_epoch`` accesses of ``per_epoch // 2`` operations.
    """
    _check(pages, epochs, per_epoch, actors, write_ratio, length, page_size)
    if pages < 32:
        raise InvalidArgument(f"kvstore needs pages >= 32 (an index and values), got {pages}")
    rng = np.random.default_rng(seed)
    ops = epochs * per_epoch // 2
    index_pages = pages // 16
    per_page = page_size // length
    keys = (pages - index_pages) * per_page
    nhot = max(1, int(keys * hot_keys))
    hot = rng.permutation(keys)[:nhot]
    key = np.where(rng.random(ops) < hot_share, hot[rng.integers(0, nhot, ops)], rng.integers(0, keys, ops))
    slot = key * 8  # an 8-byte index entry per key
    idx_off = slot % (index_pages * page_size) // length * length
    val_off = index_pages * page_size + key * length
    n = 2 * ops
    offset = np.empty(n, dtype=np.int64)
    offset[0::2], offset[1::2] = idx_off, val_off
    write = np.zeros(n, dtype=bool)
    write[1::2] = rng.random(ops) < write_ratio
    epoch = np.repeat(np.arange(epochs, dtype=np.int32), per_epoch)[:n]
    actor = ((np.arange(n) // 2) % actors).astype(np.int16)
    if actors > 1:  # puts stay on the putting actor's pages (see the module docstring)
        page = offset // page_size
        owned = page - page % actors + actor
        owned = np.where(owned >= pages, owned - actors, owned)
        offset = np.where(write, owned * page_size + offset % page_size, offset)
    return Trace(epoch, actor, offset, np.full(n, length, dtype=np.int32), write, region_bytes=pages * page_size,
                 actors=actors, name="kvstore", page_size=page_size,
                 meta={"workload": "kvstore", "pages": pages, "epochs": epochs, "per_epoch": per_epoch,
                       "actors": actors, "write_ratio": write_ratio, "length": length, "seed": seed,
                       "hot_keys": hot_keys, "hot_share": hot_share})


def stencil(pages: int = 1024, epochs: int = 8, per_epoch: int = 768, actors: int = 2, seed: int = 0,
            write_ratio: float = 1 / 3, length: int = 1024, page_size: int = 4096, halo_share: float = 0.05) -> Trace:
    """A GPU stencil: the device (actor 0) sweeps the grid, reading the pages either side of each page and
    writing the page itself; the CPU (actor 1) reads back ``halo_share`` of the pages just written (a halo
    exchange, which brings them back to host memory). Replay gives the device fewer frames than the grid
    has pages, so the sweep oversubscribes device memory. ``actors`` must be 2; ``write_ratio`` is fixed by
    the pattern (one store in three device accesses) and only checked."""
    _check(pages, epochs, per_epoch, actors, write_ratio, length, page_size)
    if actors != 2 or pages < 3:
        raise InvalidArgument(f"stencil needs actors == 2 (device 0, CPU 1) and pages >= 3, got {actors}, {pages}")
    rng = np.random.default_rng(seed)
    ops = max(1, epochs * per_epoch // 3)
    center = np.arange(ops, dtype=np.int64) % pages
    halo = rng.random(ops) < halo_share
    per_op = 3 + halo.astype(np.int64)  # left, right, center (+ a CPU read of the center)
    op = np.repeat(np.arange(ops), per_op)
    k = np.arange(op.size) - np.repeat(np.cumsum(per_op) - per_op, per_op)  # record number within its op
    page = np.select([k == 0, k == 1], [(center[op] - 1) % pages, (center[op] + 1) % pages], center[op])
    slot = rng.integers(0, page_size // length, op.size)
    return Trace((op * epochs // ops).astype(np.int32), (k == 3).astype(np.int16), page * page_size + slot * length,
                 np.full(op.size, length, dtype=np.int32), k == 2, region_bytes=pages * page_size, actors=2,
                 name="stencil", page_size=page_size,
                 meta={"workload": "stencil", "pages": pages, "epochs": epochs, "per_epoch": per_epoch,
                       "actors": 2, "length": length, "seed": seed, "halo_share": halo_share,
                       "device_actors": [0]})


#: The built-in workloads by name.
WORKLOADS: dict[str, Callable[..., Trace]] = {
    "kvstore": kvstore, "phases": phases, "sequential": sequential, "stencil": stencil, "uniform": uniform,
    "zipf": zipf}


def make_workload(name: str, **kw: object) -> Trace:
    """The trace of the built-in workload ``name`` (one of :data:`WORKLOADS`) with keyword arguments ``kw``."""
    if name not in WORKLOADS:
        raise InvalidArgument(f"unknown workload {name!r}; built-in workloads: {', '.join(sorted(WORKLOADS))}")
    return WORKLOADS[name](**kw)
