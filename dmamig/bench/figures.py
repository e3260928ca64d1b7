"""Figures of a migration, state-only or DMA-copy scenario: its record, and the speedups between records.

A record holds a scenario's medians of the timed repetitions (:mod:`dmamig.bench.scenario_runs` times them),
its phases, and its ratio to the same run's copy ceiling; :func:`add_speedups` pairs the records of a sweep
once they are all in.
"""

from __future__ import annotations

from typing import Any

from .access import add_access_speedups
from .naming import DIRECTIONS, describe_options, options_of
from .pairs import add_pair_speedups
from .scenarios import Scenario
from .timing import timing_fields

__all__ = ["add_speedups", "scenario_record"]


def scenario_record(sc: Scenario, walls: list[int], cpus: list[int], phases: list[dict[str, int]],
                    ceiling: dict[str, Any] | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of scenario ``sc`` from its timed repetitions: medians of ``walls`` and ``cpus`` (ns) and of
    each phase, throughput, and the ratio to ``ceiling`` (the same run's copy ceiling, or None); ``extra``
    adds fields of its kind. Speedups stay None until :func:`add_speedups` pairs the sweep's records."""
    rec: dict[str, Any] = {
        "id": sc.id,
        "name": sc.name,
        "kind": sc.kind,
        "mode": sc.mode,
        "direction": sc.direction,
        "direction_name": DIRECTIONS[sc.direction],
        "layout": sc.layout,
        "folio_bytes": sc.folio_bytes,
        "folio_order": sc.order,
        "channels": sc.channels,
        "options": sc.options.as_dict() if sc.options is not None else None,
        "batching": describe_options(sc.options),
        "bytes": sc.total_bytes,
        "pages": sc.pages,
        **timing_fields(sc.total_bytes, sc.pages, walls, cpus, phases,
                        ceiling["gbps"] if ceiling else None, ceiling["method"] if ceiling else None),
        "verified": True,
    }
    rec.update(extra or {})
    return rec


def add_speedups(records: list[dict[str, Any]], copy_baseline: str = "cpu") -> None:
    """Fill ``speedup_vs_copy``, ``speedup_vs`` and ``speedup_vs_faithful_copy`` of every no-copy migration,
    and ``copy_baseline`` (what copy mode measured: :data:`~dmamig.bench.naming.COPY_BASELINES`) of every
    migration.

    Like is compared with like: a no-copy record is divided by the copy record of the same direction, folio
    size, batch size and batches per step (copy has no DMA to pipeline, so the pipeline depth does not
    count), and ``speedup_vs`` names that copy record's id. Without such a copy record it falls back to the
    faithful copy. ``speedup_vs_faithful_copy`` always divides by the faithful copy. Device-access records are
    paired by
    :func:`~dmamig.bench.access.add_access_speedups`, device-pair records by
    :func:`~dmamig.bench.pairs.add_pair_speedups`.
    """
    def key(r: dict[str, Any]) -> tuple:
        o = options_of(r)
        return (r["direction"], r["folio_bytes"], o.batch_pages if o else 512, o.batches_per_step if o else 1)

    copies = {key(r): r for r in records if r["kind"] == "migrate" and r["mode"] == "copy"}
    for r in records:
        if r["kind"] == "migrate":
            r["copy_baseline"] = copy_baseline
        if r["kind"] != "migrate" or r["mode"] != "nocopy":
            continue
        faithful = copies.get((r["direction"], r["folio_bytes"], 512, 1))
        base = copies.get(key(r)) or faithful
        if base is not None and base["gbps"] > 0:
            r["speedup_vs_copy"] = r["gbps"] / base["gbps"]
            r["speedup_vs"] = base["id"]
        if faithful is not None and faithful["gbps"] > 0:
            r["speedup_vs_faithful_copy"] = r["gbps"] / faithful["gbps"]
    add_access_speedups(records)
    add_pair_speedups(records)
