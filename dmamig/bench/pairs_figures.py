"""Figures of the device-pair matrix (:mod:`dmamig.bench.pairs`): its records, matrices and the report's tables.

A pair record has every field a bench record has (kind ``pairs``, direction ``d2d``; ``gbps`` is the working
set over the median wall time of one migration from ``src_device`` to ``dst_device``), and says where it ran:
the link class, peer access or staged, and the topology's name. ``ceiling_gbps`` is that pair's own ceiling,
measured in the same task: a direct peer copy, or the copy staged through host memory (``ceiling_route``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..migrate.options import FAITHFUL
from ..topology import LINK_CODES, Topology
from .parsing import PAGE_SIZE
from .timing import timing_fields

__all__ = ["PAIR_FOLIO", "PairSample", "add_pair_speedups", "pair_groups", "pair_matrix", "pair_record",
           "pair_table", "pair_topology", "pairs_of"]

#: Folio size every pair migrates: PMD-sized folios, one per kernel batch, so that the figure is the link's.
PAIR_FOLIO = 2 << 20
_CHANNELS_WORDS = {1: "1 DMA channel"}


@dataclass
class PairSample:
    """One timed migration of a pair: wall and migrating-thread CPU time, its result and the DMA counters."""

    wall: int
    cpu: int
    result: Any
    stats: Any


def _channels(n: int) -> str:
    return _CHANNELS_WORDS.get(n, f"{n} DMA channels")


def pair_record(sc: Any, mode: str, samples: list[PairSample], ceiling: tuple[float, str],
                where: dict[str, Any]) -> dict[str, Any]:
    """The record of one mode of a :class:`~dmamig.bench.pairs.PairScenario` from its timed samples.

    Parameters
    ----------
    sc : PairScenario
        The pair.
    mode : str
        ``"copy"`` or ``"nocopy"``.
    samples : list of PairSample
        The timed repetitions.
    ceiling : tuple
        Best seconds of the pair's plain copy, and how it was measured.
    where : dict
        ``src_device``, ``dst_device``, ``link``, ``peer``, ``staged``, ``topology``.
    """
    pages, nbytes = sc.pages, sc.pair_bytes
    ceil_s, method = ceiling
    ceil_gbps = nbytes / ceil_s / 1e9 if ceil_s > 0 else 0.0
    timing = timing_fields(nbytes, pages, [s.wall for s in samples], [s.cpu for s in samples],
                           [getattr(s.result, "phase_ns", None) or {} for s in samples], ceil_gbps, method)
    last = samples[-1]
    how = "copy" if mode == "copy" else f"no-copy, {_channels(sc.channels)}"
    route = "staged through host memory" if where["staged"] else f"peer, {where['link']}"
    rec: dict[str, Any] = {
        "id": sc.record_id(mode),
        "name": f"device {sc.src} -> device {sc.dst} ({route}), 2M folios, {how}",
        "kind": "pairs",
        "mode": mode,
        "direction": "d2d",
        "direction_name": f"device {sc.src}->device {sc.dst}",
        "layout": "",
        "folio_bytes": PAIR_FOLIO,
        "folio_order": (PAIR_FOLIO // PAGE_SIZE).bit_length() - 1,
        "channels": sc.channels if mode == "nocopy" else None,
        "options": FAITHFUL.as_dict(),
        "batching": "faithful",
        "bytes": nbytes,
        "pages": pages,
        **timing,
        "ceiling_route": "staged" if where["staged"] else "peer",
        "ceiling_seconds": ceil_s,
        "nr_succeeded": int(last.result.nr_succeeded),
        "nr_failed": int(last.result.nr_failed),
        "nr_thp_split": int(getattr(last.result, "nr_thp_split", 0)),
        "dma_peer_bytes": int(last.stats.peer_bytes),
        "dma_staged_bytes": int(last.stats.staged_bytes),
        "verified": True,
    }
    rec.update(where)
    return rec


def add_pair_speedups(records: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_copy`` (and ``speedup_vs``, ``speedup_vs_faithful_copy``) of every no-copy pair
    record: its GB/s over the copy record of the same pair (both run the kernel's batching)."""
    copies = {(r["src_device"], r["dst_device"]): r for r in records
              if r["kind"] == "pairs" and r["mode"] == "copy"}
    for r in records:
        if r["kind"] != "pairs" or r["mode"] != "nocopy":
            continue
        base = copies.get((r["src_device"], r["dst_device"]))
        if base is not None and base["gbps"] > 0:
            r["speedup_vs_copy"] = r["speedup_vs_faithful_copy"] = r["gbps"] / base["gbps"]
            r["speedup_vs"] = base["id"]


# -- matrices --------------------------------------------------------------------------------------------------

def pairs_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pair records among ``records``."""
    return [r for r in records if r["kind"] == "pairs"]


def pair_matrix(records: list[dict[str, Any]], field: str) -> list[list[Any]]:
    """``out[a][b]``: ``field`` of the record of the pair ``(a, b)`` among ``records`` (one mode), ``None``
    where there is none (the diagonal, pairs that did not run). Sized by the largest device id seen."""
    n = 1 + max((max(r["src_device"], r["dst_device"]) for r in records), default=-1)
    out: list[list[Any]] = [[None] * n for _ in range(n)]
    for r in records:
        out[r["src_device"]][r["dst_device"]] = r.get(field)
    return out


def pair_topology(records: list[dict[str, Any]], source: str = "setting") -> Topology | None:
    """The topology the pair records ran on, rebuilt from their link and peer fields (``None`` without a
    complete matrix); ``source`` says where the records' machines had it from."""
    recs = pairs_of(records)
    if not recs:
        return None
    links, peer = pair_matrix(recs, "link"), pair_matrix(recs, "peer")
    n = len(links)
    if any(links[a][b] is None for a in range(n) for b in range(n) if a != b):
        return None
    return Topology(links, [[a == b or bool(peer[a][b]) for b in range(n)] for a in range(n)],
                    name=recs[0].get("topology") or "custom", source=source)


def pair_groups(records: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The pair records by mode (copy first, then no-copy by channel count), titled."""
    out = []
    keys = sorted({(r["mode"] != "copy", r.get("channels") or 0) for r in records})
    for nocopy, ch in keys:
        rows = [r for r in records if (r["mode"] != "copy", r.get("channels") or 0) == (nocopy, ch)]
        out.append((f"no-copy, {_channels(ch)}" if nocopy else "copy", rows))
    return out


def pair_table(records: list[dict[str, Any]]) -> list[Any]:
    """What the report prints of the pair records: per mode a rich table, the matrix of GB/s and ratio to
    the pair's ceiling (source device per row, destination per column; ``*`` staged through host memory), then
    the ceilings with each pair's link class, then a line saying how to read them (empty without pairs)."""
    from rich.table import Table

    recs = pairs_of(records)
    if not recs:
        return []
    tables = []
    size = ", ".join(sorted({f"{r['bytes'] >> 20} MiB" for r in recs}))
    for title, rows in pair_groups(recs):
        gbps, ratio, staged = (pair_matrix(rows, f) for f in ("gbps", "ceiling_ratio", "staged"))
        ok = all(r["verified"] for r in rows)
        t = Table(title=f"Device pairs, {title}: GB/s, x the pair's ceiling"
                        + ("" if ok else " [red]UNVERIFIED records[/red]"), title_justify="left")
        t.add_column("from \\ to", justify="left")
        n = len(gbps)
        for b in range(n):
            t.add_column(f"d{b}", justify="right", no_wrap=True)
        for a in range(n):
            cells = []
            for b in range(n):
                if gbps[a][b] is None:
                    cells.append("-")
                    continue
                x = "" if ratio[a][b] is None else f" {ratio[a][b]:.2f}x"
                cells.append(f"{gbps[a][b]:.2f}{x}{'*' if staged[a][b] else ''}")
            t.add_row(f"d{a}", *cells)
        tables.append(t)
    first = pair_groups(recs)[0][1]
    ceil, link, staged = (pair_matrix(first, f) for f in ("ceiling_gbps", "link", "staged"))
    t = Table(title="Device pair ceilings: link, GB/s", title_justify="left")
    t.add_column("from \\ to", justify="left")
    for b in range(len(ceil)):
        t.add_column(f"d{b}", justify="right", no_wrap=True)
    for a in range(len(ceil)):
        t.add_row(f"d{a}", *("-" if ceil[a][b] is None else
                             f"{LINK_CODES.get(link[a][b], '?')}{'*' if staged[a][b] else ''} {ceil[a][b]:.2f}"
                             for b in range(len(ceil))))
    tables.append(t)
    tables.append(f"Device pairs: {size} of 2M folios each, the kernel's batching; rows: source device, columns: "
                  f"destination; * no peer access, copies staged through host memory; NV nvlink, PS pcie-switch, "
                  f"PH pcie-host; each pair's ceiling is its plain copy (peer, or staged), measured in its task")
    return tables
