"""Reading and writing a results document: ``results.json`` (validated when read) and ``results.csv``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from .schema import PHASES, ResultsError, validate_results

__all__ = ["CSV_FIELDS", "load_results", "wall_spread", "who_ran", "write_csv", "write_json"]

#: Columns of results.csv, in order; phase columns are ``phase_<name>_ns`` and ``share_<name>``.
#: ``batch_pages``, ``batches_per_step``, ``pipeline_depth`` and ``faithful`` come from the scenario's options
#: (empty for raw DMA copies and for results that predate recorded settings).
CSV_FIELDS = (
    ["id", "name", "kind", "mode", "direction", "layout", "folio_bytes", "folio_order", "channels", "batching",
     "batch_pages", "batches_per_step", "pipeline_depth", "faithful", "bytes", "pages", "repeat",
     "median_wall_ns", "min_wall_ns", "max_wall_ns", "iqr_wall_ns", "gbps", "gbps_min", "gbps_max", "pages_per_s", "thread_time_ns", "cpu_ns_per_page", "pages_per_cpu_s",
     "ceiling_gbps", "ceiling_ratio", "ceiling_method", "speedup_vs_copy", "speedup_vs",
     "speedup_vs_faithful_copy", "copy_baseline", "nr_failed", "verified"]
    + [f"phase_{p}_ns" for p in PHASES]
    + ["outside_phases_ns"]
    + [f"share_{p}" for p in PHASES]
    # Device-access records (empty for the others).
    + ["pattern", "fault_batch_size", "oversubscription", "fault_batches", "fault_batches_per_s",
       "service_ns_per_batch", "bytes_migrated_per_byte_touched", "ceiling_pages_per_s"]
    # Device-pair records (empty for the others).
    + ["src_device", "dst_device", "link", "peer", "staged", "ceiling_route"]
    # Who ran it (every run; on a cluster each row its own worker): see :func:`who_ran`.
    + ["host", "worker", "cpu_model", "gpu", "gpu_uuid", "gpu_pci_bus_id"]
)


def load_results(path: str | Path) -> dict[str, Any]:
    """Read and validate a results.json file, or the one in the folder ``path`` names.

    Raises
    ------
    ResultsError
        When the file is missing, not JSON, or does not follow the schema.
    """
    p = Path(path)
    if p.is_dir():  # the folder dmamig bench printed as its result
        if not (p / "results.json").is_file():
            raise ResultsError(f"folder {str(p)!r} holds no results.json; give a folder dmamig bench wrote, or "
                               f"its results.json")
        p = p / "results.json"
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ResultsError(f"cannot read results file {str(p)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ResultsError(f"{str(p)!r} is not a results file: it is binary, not JSON text; give the "
                           f"results.json that dmamig bench wrote") from None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ResultsError(f"{str(p)!r} is not JSON: {exc}; give the results.json that dmamig bench wrote") \
            from None
    try:
        validate_results(doc)
    except ResultsError as exc:
        raise ResultsError(f"{str(p)!r}: {exc}") from None
    return doc


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    """Write a results document as indented JSON."""
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def wall_spread(sc: dict[str, Any]) -> dict[str, float | None]:
    """The spread of a scenario's timed repetitions: min, max and interquartile range of ``wall_ns``, and the
    GB/s they give (the slowest repetition is ``gbps_min``); None where the record has no GB/s or no times."""
    walls = np.asarray(sc.get("wall_ns") or [], dtype=np.float64)
    if walls.size == 0 or not (walls > 0).all():
        return {"min_wall_ns": None, "max_wall_ns": None, "iqr_wall_ns": None, "gbps_min": None, "gbps_max": None}
    q1, q3 = np.percentile(walls, [25, 75])
    gbps, med = sc.get("gbps"), sc.get("median_wall_ns")
    scale = gbps * med if gbps and med else None  # GB/s x ns: the same bytes over another repetition's time
    return {"min_wall_ns": float(walls.min()), "max_wall_ns": float(walls.max()), "iqr_wall_ns": float(q3 - q1),
            "gbps_min": scale / float(walls.max()) if scale else None,
            "gbps_max": scale / float(walls.min()) if scale else None}


def who_ran(sc: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    """The CSV's columns of who ran a scenario: ``host``, ``worker`` (the Dask worker's address, else the
    process id), ``cpu_model``, and the ``gpu`` names, ``gpu_uuid`` and ``gpu_pci_bus_id`` of the GPUs it used
    (several joined by ``;``). A record without a worker (one process ran the whole sweep) takes the machine's.
    """
    who = sc.get("worker") or {}
    gpus = who.get("gpus") if who else machine.get("gpus")
    gpus = gpus or []

    def joined(key: str) -> str | None:
        vals = [str(g.get(key)) for g in gpus if g.get(key) is not None]
        return ";".join(vals) or None

    address = who.get("address") or (f"pid {who['pid']}" if who.get("pid") is not None else None)
    return {"host": who.get("host") or machine.get("hostname"), "worker": address,
            "cpu_model": who.get("cpu") or (machine.get("host") or {}).get("cpu_model") or machine.get("cpu"),
            "gpu": joined("name"), "gpu_uuid": joined("uuid"), "gpu_pci_bus_id": joined("pci_bus_id")}


def write_csv(doc: dict[str, Any], path: str | Path) -> None:
    """Write one CSV row per scenario with the columns of :data:`CSV_FIELDS`."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for sc in doc["scenarios"]:
            row = {k: sc.get(k) for k in CSV_FIELDS}
            row.update(wall_spread(sc))
            row.update(who_ran(sc, doc.get("machine") or {}))
            row.update(sc.get("options") or {})
            for p in PHASES:
                row[f"phase_{p}_ns"] = (sc.get("phase_ns") or {}).get(p)
                row[f"share_{p}"] = (sc.get("phase_share") or {}).get(p)
            w.writerow({k: "" if v is None else v for k, v in row.items()})
