"""Figures of a device-access scenario (:mod:`dmamig.bench.access`): its record, and the report's table.

Throughput counts the distinct pages an access touches. Fault-servicing figures come from the accessor's
:class:`~dmamig.uvm.UvmStats` of each timed access; ``bytes_migrated_per_byte_touched`` counts the bytes
migrated onto the device and those evicted back to make room, over the distinct bytes touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..migrate.options import FAITHFUL
from ..uvm.options import SERVICE_PHASES, UvmStats
from .naming import format_number, format_rate
from .parsing import PAGE_SIZE
from .timing import median, timing_fields

__all__ = ["PATTERN_WORDS", "Sample", "access_record", "access_table", "add_access_speedups"]

#: Short names of the access patterns, for tables and plots.
PATTERN_WORDS = {"stream": "streaming read", "random": "random 4K reads", "strided": "strided read",
                 "stencil": "stencil"}


@dataclass
class Sample:
    """One timed repetition: wall and thread CPU time of the faulting access, wall time of its ceiling, and
    the accessor's counters of the faulting access."""

    wall: int
    cpu: int
    ceiling: int
    stats: UvmStats


# -- figures ---------------------------------------------------------------------------------------------------

def access_record(sc: Any, samples: list[Sample]) -> dict[str, Any]:
    """The record of an :class:`~dmamig.bench.access.AccessScenario` from its timed samples.

    The fields every bench record has (``gbps`` and ``pages_per_s`` count the distinct pages one access
    touches; ``phase_ns`` holds the fault-service phases, :data:`~dmamig.uvm.SERVICE_PHASES`), then the
    device-access figures, each the median over the repetitions.
    """
    pages = sc.touched_pages
    nbytes = pages * PAGE_SIZE
    walls = [s.wall for s in samples]
    wall = median(walls)
    ceiling = median([s.ceiling for s in samples])
    secs, csecs = wall / 1e9, ceiling / 1e9
    stats = [s.stats for s in samples]
    batches = median([st.batches for st in stats])
    per_batch = [st.service_total_ns / st.batches for st in stats if st.batches]
    phase_ns = {p: median([st.service_ns.get(p, 0) for st in stats]) for p in SERVICE_PHASES}
    phase_batch = {p: median([st.service_ns.get(p, 0) / st.batches for st in stats if st.batches])
                   for p in SERVICE_PHASES} if per_batch else {}
    service = median([st.service_total_ns for st in stats])
    ceiling_method = ("the same stencil on a device that holds the range, pre-migrated (same run)"
                      if sc.pattern == "stencil" else "the same access, range pre-migrated (same run)")
    timing = timing_fields(nbytes, pages, walls, [s.cpu for s in samples], [],
                           nbytes / csecs / 1e9 if csecs > 0 else 0.0, ceiling_method)
    # Phases are the fault-service phases, and outside them is the access itself and its bookkeeping.
    timing.update(phase_ns=phase_ns, phase_share={p: v / wall for p, v in phase_ns.items()} if wall > 0 else {},
                  outside_phases_ns=median([max(0, s.wall - s.stats.service_total_ns) for s in samples]))
    return {
        "id": sc.id,
        "name": sc.name,
        "kind": "access",
        "mode": sc.mode,
        "direction": "h2d",
        "direction_name": "host->device",
        "layout": "",
        "folio_bytes": PAGE_SIZE,
        "folio_order": 0,
        "channels": sc.channels,
        "options": FAITHFUL.as_dict(),
        "batching": "faithful",
        "bytes": nbytes,
        "pages": pages,
        **timing,
        "verified": True,
        "pattern": sc.pattern,
        "fault_batch_size": sc.fault_batch,
        "oversubscription": sc.oversubscription,
        "working_set_bytes": sc.working_bytes,
        "device_bytes": sc.device_pages * PAGE_SIZE if sc.device_pages else None,
        "uvm_options": sc.uvm_options().as_dict(),
        "ceiling_wall_ns": [int(s.ceiling) for s in samples],
        "ceiling_pages_per_s": pages / csecs if csecs > 0 else 0.0,
        "fault_batches": batches,
        "faults": median([st.faults for st in stats]),
        "fault_batches_per_s": batches / secs if secs > 0 else 0.0,
        "service_ns_per_batch": median(per_batch) if per_batch else None,
        "service_phase_ns_per_batch": phase_batch,
        "service_pages_per_s": pages / (service / 1e9) if service > 0 else None,
        "bytes_migrated": median([st.bytes_migrated for st in stats]),
        "bytes_evicted": median([st.bytes_evicted for st in stats]),
        "pages_prefetched": median([st.pages_prefetched for st in stats]),
        "pages_remote": median([st.pages_remote for st in stats]),
        "bytes_migrated_per_byte_touched": median([(st.bytes_migrated + st.bytes_evicted) / nbytes
                                                    for st in stats]),
    }


def add_access_speedups(records: list[dict[str, Any]]) -> None:
    """Fill ``speedup_vs_copy`` (pages/s over the copy record's) of every no-copy access record.

    Like is compared with like: the copy record of the same pattern, fault batch and oversubscription.
    """
    def key(r: dict[str, Any]) -> tuple:
        return r.get("pattern"), r.get("fault_batch_size"), r.get("oversubscription")

    copies = {key(r): r for r in records if r["kind"] == "access" and r["mode"] == "copy"}
    for r in records:
        base = copies.get(key(r)) if r["kind"] == "access" and r["mode"] == "nocopy" else None
        if base is not None and base["pages_per_s"] > 0:
            r["speedup_vs_copy"] = r["speedup_vs_faithful_copy"] = r["pages_per_s"] / base["pages_per_s"]
            r["speedup_vs"] = base["id"]




def _split(rec: dict[str, Any], top: int = 4) -> str:
    # Microseconds per batch of the biggest phases, then the others together (every phase is in the CSV and
    # the JSON); a no-break space keeps each phase with its figure when the column wraps.
    per = rec.get("service_phase_ns_per_batch") or {}
    parts = sorted(((v / 1e3, p) for p, v in per.items() if v > 0), reverse=True)
    words = [f"{p}\u00a0{us:.0f}" for us, p in parts[:top]]
    rest = sum(us for us, _p in parts[top:])
    if rest >= 0.5:
        words.append(f"others\u00a0{rest:.0f}")
    return " ".join(words) or "-"


def access_table(records: list[dict[str, Any]]) -> Any:
    """A rich table of device-access records: throughput against the same access pre-migrated, fault batches,
    service time per batch and its split by phase, and the traffic per byte touched."""
    from rich.table import Table

    t = Table(title="Device access (UVM-style faults; ceiling: the same access pre-migrated, same run)",
              title_justify="left")
    # Short headers: the phase split needs the width (pages/s columns are pages touched per second).
    for col in ("access", "batch", "mode", "DMA ch.", "pages/s", "ceiling", "x ceiling", "÷ copy",
                "batches/s", "us/batch", "us per batch by phase", "moved ÷ touched", "ok"):
        wrap = col in ("access", "us per batch by phase")
        t.add_column(col, justify="left" if col in ("access", "mode", "us per batch by phase") else "right",
                     no_wrap=not wrap, min_width=30 if col == "us per batch by phase" else None)
    for r in records:
        what = PATTERN_WORDS.get(r.get("pattern", ""), r.get("pattern") or r["id"])
        if r.get("oversubscription") is not None:
            what += f", {r['oversubscription']:g}x device memory"
        per_batch = r.get("service_ns_per_batch")
        t.add_row(what, format_number(r.get("fault_batch_size"), "{}"), "no-copy" if r["mode"] == "nocopy" else "copy",
                  format_number(r["channels"], "{}"), format_rate(r["pages_per_s"]), format_rate(r.get("ceiling_pages_per_s")),
                  format_number(r["ceiling_ratio"]), format_number(r.get("speedup_vs_copy")), format_rate(r.get("fault_batches_per_s")),
                  format_number(None if per_batch is None else per_batch / 1e3, "{:.0f}"), _split(r),
                  format_number(r.get("bytes_migrated_per_byte_touched")), "yes" if r["verified"] else "[red]NO[/red]")
    return t
