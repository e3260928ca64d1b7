"""The results document: its schema, reading and writing it, and comparing a run with its baseline.

``results.json`` is the file ``dmamig bench`` writes and ``dmamig report`` reads (validated when read), with
``results.csv`` beside it. The schema lives in code (not a data file) so that every install has it;
``dmamig schema`` prints it.

Units: sizes in bytes, times in nanoseconds, throughput in GB/s (10**9 bytes per second), rates per second.
Every figure of a scenario is the median over its timed repetitions; ``wall_ns`` keeps every repetition.

Schema 2 records each scenario's name in words and the batching it ran with (``options``: the
:class:`~dmamig.MigrateOptions`, ``null`` for a raw DMA copy). Files of another ``schema_version`` are refused
with a message that says which version the file has, which one is read, and what to do. Device-access records
(kind ``access``), device-pair records (kind ``pairs``), file-backed records (kind ``files``) and their settings
came later within schema 2; every field they add is optional.

Comparing: a scenario regresses when it is slower beyond a threshold and significantly so, when its data
failed verification, when its settings differ, or when the run lacks it; runs whose settings differ are not
compared at all, nor runs from different machines (another CPU model or GPU) unless asked. Benchmark timings
on a shared machine are noisy (two runs of unchanged code differ by 10 % and more in single scenarios), so a
change counts only when it is beyond the threshold and the bootstrap interval of the ratio of median wall
times (resampling each run's repetitions, ``wall_ns``) lies entirely below 1. The resampling is seeded, so a
comparison always gives the same verdict.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from .naming import batching_class, format_number, format_rate, format_size

__all__ = [
    "COMPARED_IF_RECORDED",
    "COMPARED_SETTINGS",
    "CSV_FIELDS",
    "Comparison",
    "MACHINE_FIELDS",
    "METRICS",
    "MIN_REPEATS",
    "NotComparable",
    "OtherMachine",
    "PHASES",
    "RESULTS_SCHEMA",
    "RatioInterval",
    "ResultsError",
    "SCHEMA_VERSION",
    "check_comparable",
    "check_same_machine",
    "compare_results",
    "comparison_table",
    "load_results",
    "machine_identity",
    "primary_metric",
    "ratio_interval",
    "regressions",
    "validate_results",
    "wall_spread",
    "who_ran",
    "write_csv",
    "write_json",
]


#: The version of the results document ``dmamig bench`` writes, and the only one ``dmamig report`` reads.
SCHEMA_VERSION = 2

#: Migration phases timed in ``MigrateResult.phase_ns``, in pipeline order (older results hold a subset).
PHASES = ("isolate", "unmap", "copy", "submit", "dma_wait", "move", "undo", "putback")

_num = {"type": "number", "minimum": 0}
_num_or_null = {"type": ["number", "null"], "minimum": 0}
_int = {"type": "integer", "minimum": 0}
_phase_map = {
    "type": "object",
    "properties": {p: _num for p in PHASES},
    "additionalProperties": _num,
}

#: Fields of device-access records (kind ``access``), each optional: older files have no such record. Their
#: ``bytes``/``pages``/``gbps``/``pages_per_s`` count the distinct pages one access touches, and ``phase_ns``
#: holds the fault-service phases (fetch, prefetch, evict, populate, the migration core's, replay).
_ACCESS_FIELDS = {
    "pattern": {"enum": ["stream", "random", "strided", "stencil"],
                "description": "Access pattern: streaming read, random 4K reads, strided read, tiled stencil."},
    "fault_batch_size": {"type": "integer", "minimum": 1, "description": "Faults serviced per batch."},
    "oversubscription": {**_num_or_null, "description": "Stencil: working set over device memory."},
    "working_set_bytes": _int,
    "device_bytes": {**_num_or_null, "description": "Stencil: device memory; null when it holds the range."},
    "uvm_options": {"type": "object", "description": "UvmOptions the device serviced its faults with."},
    "ceiling_wall_ns": {"type": "array", "items": _int,
                        "description": "Wall time of the same access pre-migrated, each repetition."},
    "ceiling_pages_per_s": _num,
    "fault_batches": {**_num, "description": "Fault batches serviced per access."},
    "faults": {**_num, "description": "Fault-buffer entries per access."},
    "fault_batches_per_s": _num,
    "service_ns_per_batch": {**_num_or_null, "description": "Service time of a fault batch; null: no fault."},
    "service_phase_ns_per_batch": {**_phase_map, "description": "service_ns_per_batch by service phase."},
    "service_pages_per_s": {**_num_or_null, "description": "Pages touched per second of fault servicing."},
    "bytes_migrated": {**_num, "description": "Bytes migrated onto the device per access."},
    "bytes_evicted": {**_num, "description": "Bytes evicted back to host memory per access."},
    "pages_prefetched": _num,
    "pages_remote": _num,
    "bytes_migrated_per_byte_touched": {**_num, "description": "(bytes_migrated + bytes_evicted) / bytes."},
}

#: Fields of device-pair records (kind ``pairs``: a migration from one device to another), each optional.
#: ``ceiling_*`` of such a record is the pair's own ceiling, measured in its task: peer or staged.
_PAIR_FIELDS = {
    "src_device": {**_int, "description": "Device (not node) the pages migrate from."},
    "dst_device": {**_int, "description": "Device the pages migrate to."},
    "link": {"enum": ["nvlink", "pcie-switch", "pcie-host"], "description": "Link class of the pair."},
    "peer": {"type": "boolean", "description": "The pair has peer access: copies go straight over the link."},
    "staged": {"type": "boolean", "description": "No peer access: copies are staged through host memory."},
    "topology": {"type": "string", "description": "Name of the machine's topology (a preset, cuda-runtime)."},
    "ceiling_route": {"enum": ["peer", "staged"],
                      "description": "The pair's ceiling: a direct peer copy, or the copy staged through host "
                                     "memory (pairs without peer access)."},
    "ceiling_seconds": _num,
    "dma_peer_bytes": {**_int, "description": "Bytes the DMA engine copied peer-to-peer (last repetition)."},
    "dma_staged_bytes": {**_int, "description": "Bytes the DMA engine staged through host memory (last "
                                                "repetition)."},
}

#: Fields of file-backed records (kind ``files``: ``mm.migrate`` of page-cache, shmem or private-file pages),
#: each optional. Their other fields are a migration record's.
_FILE_FIELDS = {
    "file_case": {"enum": ["clean", "dirty", "shmem", "private-cow"],
                  "description": "clean page cache (shared file mapping), dirty page cache (written through a "
                                 "shared mapping), shared anonymous memory, or a private file mapping after COW."},
    "source_dirty_pages": {**_num, "description": "Median dirty page-cache pages on the source node when the "
                                                  "migration started."},
    "source_writeback_pages": {**_num, "description": "Median page-cache pages under writeback on the source "
                                                      "node when the migration started."},
}

#: Who ran a scenario or measured a ceiling. Recorded when a sweep ran in more than one process (on a Dask
#: cluster, or resumed): a ratio divides by the ceiling of the same worker.
_WORKER = {
    "type": "object",
    "properties": {
        "host": {"type": "string"},
        "cpu": {"type": "string", "description": "The worker's CPU model (absent in older results)."},
        "address": {"type": ["string", "null"], "description": "Dask worker address; null: no cluster."},
        "name": {"type": ["string", "null"]},
        "pid": {"type": "integer"},
        "run": {"type": "string", "description": "In-process sweeps: when the run that measured started."},
        "gpus": {"type": "array", "description": "GPUs its tasks used: index, name, uuid, pci_bus_id, driver and "
                                                "the rest of machine.gpus (none on cpu).",
                 "items": {"type": "object", "properties": {"index": {"type": ["integer", "null"]},
                                                            "name": {"type": "string"},
                                                            "uuid": {"type": ["string", "null"]}}}},
    },
}

_SCENARIO = {
    "type": "object",
    "description": "One measured scenario; every figure is a median over the timed repetitions.",
    "required": ["id", "name", "kind", "mode", "direction", "folio_bytes", "folio_order", "channels", "options",
                 "batching", "bytes", "pages", "repeat", "wall_ns", "median_wall_ns", "gbps", "pages_per_s",
                 "thread_time_ns", "cpu_ns_per_page", "ceiling_gbps", "ceiling_ratio", "verified"],
    "properties": {
        "worker": _WORKER,
        "id": {"type": "string", "description": "Stable key, e.g. migrate/h2d/2m/nocopy/ch2; matches baselines. "
                                                "Experiment settings append a suffix, e.g. /steps16-pipe1."},
        "name": {"type": "string",
                 "description": "The scenario in words, e.g. host->device, 4K pages, no-copy, 2 DMA channels."},
        "options": {
            "type": ["object", "null"],
            "description": "MigrateOptions the migration ran with; null for a raw DMA copy (no migration).",
            "required": ["batch_pages", "batches_per_step", "pipeline_depth", "faithful"],
            "properties": {
                "batch_pages": {"type": "integer", "minimum": 1,
                                "description": "Base pages per batch (the kernel's: 512)."},
                "batches_per_step": {"type": "integer", "minimum": 1,
                                     "description": "Batches whose phases run together (the kernel's: 1)."},
                "pipeline_depth": {"type": "integer", "minimum": 0,
                                   "description": "Steps whose DMA copy overlaps the next unmap (kernel: 0)."},
                "faithful": {"type": "boolean", "description": "True for the kernel's batching."},
            },
        },
        "batching": {"type": "string",
                     "description": "options in words: faithful, pipelined (...) or experiment (...)."},
        "kind": {"enum": ["migrate", "state", "dma", "access", "pairs", "files"],
                 "description": "migrate: mm.migrate end to end; state: NO_COPY m.migrate_pages (page state "
                                "only); dma: m.dma.copy of pages; access: a device reading (and writing) host "
                                "memory through faults, UVM-style; pairs: mm.migrate from one device to "
                                "another, for every ordered device pair; files: mm.migrate of page-cache, "
                                "shmem or private-file pages."},
        "mode": {"enum": ["copy", "nocopy", "state", "dma"]},
        "direction": {"enum": ["h2d", "d2h", "d2d"]},
        "direction_name": {"type": "string"},
        "layout": {"type": "string", "description": "dma scenarios: random or contiguous pages."},
        "folio_bytes": {"type": "integer", "minimum": 4096},
        "folio_order": {"type": "integer", "minimum": 0, "maximum": 9},
        "channels": {"type": ["integer", "null"], "minimum": 1,
                     "description": "DMA channels; null for copy migration (the CPU copies)."},
        "bytes": _int,
        "pages": _int,
        "repeat": {"type": "integer", "minimum": 1},
        "wall_ns": {"type": "array", "items": _int, "minItems": 1,
                    "description": "Wall time of every timed repetition."},
        "median_wall_ns": _num,
        "gbps": _num,
        "pages_per_s": _num,
        "thread_time_ns": {**_num, "description": "CPU time of the migrating thread (time.thread_time_ns)."},
        "cpu_ns_per_page": _num,
        "pages_per_cpu_s": {**_num_or_null, "description": "Base pages per second of migrating-thread CPU time."},
        "ceiling_gbps": {**_num_or_null, "description": "Plain copy of the same bytes, measured in this run."},
        "ceiling_method": {"type": ["string", "null"]},
        "ceiling_ratio": {**_num_or_null, "description": "gbps / ceiling_gbps."},
        "speedup_vs_copy": {**_num_or_null,
                            "description": "no-copy gbps / gbps of the copy scenario named by speedup_vs: same "
                                           "direction, folio size, batch size and batches per step."},
        "speedup_vs": {"type": ["string", "null"], "description": "id of the copy scenario compared with."},
        "copy_baseline": {"type": ["string", "null"],
                          "description": "What copy mode measured, the divisor of every no-copy / copy ratio: "
                                         "'cpu' (the migrating thread's memcpy; on cuda into host-mapped device "
                                         "frames, a proxy for a cache-coherent link where the card is on PCIe) "
                                         "or 'sync-dma' (one synchronous DMA per folio, a driver without "
                                         "batching)."},
        "speedup_vs_faithful_copy": {**_num_or_null,
                                     "description": "no-copy gbps / the faithful copy's, same direction and "
                                                    "folio size."},
        "outside_phases_ns": {**_num_or_null,
                              "description": "Median wall time outside every named phase: argument checks, "
                                             "collecting and isolating folios, putting them back, the result."},
        "phase_ns": {**_phase_map, "description": "Median wall time per migration phase."},
        "phase_share": {**_phase_map, "description": "phase_ns / median_wall_ns."},
        "nr_succeeded": _int,
        "nr_failed": _int,
        "nr_thp_split": _int,
        "verified": {"type": "boolean", "description": "Every repetition's data was checked after it ran."},
        **_ACCESS_FIELDS,
        **_PAIR_FIELDS,
        **_FILE_FIELDS,
    },
}

_CEILING = {
    "type": "object",
    "required": ["direction", "method", "bytes", "seconds", "gbps"],
    "properties": {
        "direction": {"enum": ["h2d", "d2h", "d2d"]},
        "method": {"type": "string", "description": "e.g. np.copyto contiguous, cudaMemcpyAsync pinned H2D."},
        "bytes": _int,
        "seconds": _num,
        "gbps": _num,
        "worker": _WORKER,
    },
}

RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://dmamig.invalid/results.schema.json",
    "title": "dmamig bench results",
    "type": "object",
    "required": ["schema_version", "created", "machine", "settings", "ceilings", "scenarios"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "created": {"type": "string", "description": "ISO 8601 time the run started (UTC)."},
        "wall_s": {**_num, "description": "Wall time of the whole sweep (of all its parts, when resumed)."},
        "machine": {
            "type": "object",
            "required": ["backend", "cpu", "cpu_count", "python", "numpy", "dmamig"],
            "properties": {
                "backend": {"enum": ["cpu", "cuda"]},
                "hostname": {"type": "string"},
                "platform": {"type": "string"},
                "cpu": {"type": "string"},
                "cpu_count": {"type": "integer", "minimum": 1},
                "host": {"type": "object",
                         "description": "The host (dmamig.sweep.hardware.host_facts): cpu_model, cpus_online, "
                                        "cpus_available and affinity (the cores the process may use), smt, "
                                        "threads_per_core, numa_nodes, memory_bytes; a fact that could not be "
                                        "read is the text 'unknown (why)'. Absent in older results."},
                "gpus": {"type": "array",
                         "description": "The GPUs the run used: name, index, uuid, pci_bus_id, driver, cuda_runtime, "
                                        "compute_mode, persistence_mode, app_clock_graphics_mhz, "
                                        "app_clock_memory_mhz (older results: name, memory and compute "
                                        "capability only); a field that could not be read says 'unknown (why)'.",
                         "items": {"type": "object", "required": ["name"],
                                   "properties": {"name": {"type": "string"}}}},
                "python": {"type": "string"},
                "numpy": {"type": "string"},
                "numba": {"type": ["string", "null"]},
                "cupy": {"type": ["string", "null"]},
                "dmamig": {"type": "string"},
                "git_commit": {"type": ["string", "null"],
                               "description": "The commit dmamig was made from; null when unknown (then "
                                              "git_commit_source says where it was looked for)."},
                "git_dirty": {"type": ["boolean", "null"],
                              "description": "Whether tracked files differed from git_commit; null: unknown."},
                "git_commit_source": {"type": "string",
                                      "description": "Where git_commit was found, or 'unknown: ...'."},
                "note": {"type": "string"},
                "workers": {"type": "array", "items": _WORKER,
                            "description": "Who ran the scenarios, when more than one process did."},
                "cluster": {"type": "object", "description": "--cluster value, scheduler address, workers."},
                "topology": {"type": "object", "required": ["name", "devices", "links", "peer"],
                             "description": "The devices' Topology.as_dict(): a setting on cpu, the runtime's "
                                            "on cuda (recorded with two devices or more)."},
            },
        },
        "settings": {
            "type": "object",
            "required": ["backend", "page_size", "sizes", "total_bytes", "channels", "repeat", "warmup"],
            "properties": {
                "backend": {"enum": ["cpu", "cuda"]},
                "page_size": {"type": "integer", "minimum": 1},
                "sizes": {"type": "array", "items": _int, "minItems": 1},
                "total_bytes": _int,
                "channels": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
                "devices": {"type": "integer", "minimum": 1},
                "repeat": {"type": "integer", "minimum": 1},
                "warmup": _int,
                "quick": {"type": "boolean"},
                "batch_pages": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "batches_per_step": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "pipeline": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "variants": {"type": "boolean"},
                "access": {"type": "boolean"},
                "access_bytes": _int,
                "fault_batches": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "oversubscription": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}},
                "files": {"type": "boolean", "description": "File-backed scenarios run."},
                "files_bytes": _int,
                "pairs": {"type": "boolean", "description": "Device pairs run (with two devices or more)."},
                "pair_bytes": _int,
                "topology": {"type": "string",
                             "description": "Topology preset (cpu: nvswitch, pcie, two-socket, dgx1) or runtime "
                                            "(cuda)."},
                "dma_poll_us": {"type": "number", "minimum": 0,
                                "description": "Microseconds a DMA wait (and a cpu channel's idle worker) polls "
                                               "before sleeping; 0: they sleep at once."},
                "dma_engine": {"enum": ["launch", "persistent", None],
                               "description": "What consumed the DMA rings on cuda: 'launch' (one kernel launch "
                                              "per submission, the default) or 'persistent' (a resident consumer "
                                              "kernel per device, an experiment); null on cpu."},
                "copy_baseline": {"enum": ["cpu", "sync-dma"],
                                  "description": "What copy mode measured (dmamig bench --copy-baseline): 'cpu', "
                                                 "the migrating CPU's memcpy (on cuda into host-mapped device "
                                                 "frames: a proxy for a cache-coherent link where the card is on "
                                                 "PCIe), or 'sync-dma', one synchronous DMA per folio (cuda's "
                                                 "default)."},
                "copy_device_frames": {"enum": ["device", "host-mapped", None],
                                       "description": "Where the device frames of the migration and file "
                                                      "scenarios' copy mode lived on cuda "
                                                      "(Machine(device_frames=)): 'device', or 'host-mapped' under "
                                                      "the cpu baseline; no-copy mode always ran on device memory. "
                                                      "null on cpu."},
            },
        },
        "ceilings": {"type": "array", "items": _CEILING},
        "scenarios": {"type": "array", "items": _SCENARIO},
        "resumed": {"type": "object", "required": ["parts", "runs"],
                    "description": "A sweep run in several parts (interrupted, then --resume): runs lists each "
                                   "part's start and wall time; wall_s is their sum.",
                    "properties": {"parts": {"type": "integer", "minimum": 2},
                                   "runs": {"type": "array", "items": {
                                       "type": "object", "required": ["started", "wall_s"],
                                       "properties": {"started": {"type": "string"}, "wall_s": _num}}}}},
        "partial": {"type": "boolean",
                    "description": "true when the run was interrupted: only the scenarios that finished"},
        "failed": {"type": "array", "description": "Cluster tasks that failed twice: their scenarios are missing.",
                   "items": {"type": "object", "required": ["id", "error"],
                             "properties": {"id": {"type": "string"}, "error": {"type": "string"}}}},
    },
}


class ResultsError(ValueError):
    """A results file does not follow the schema."""


def check_schema_version(doc: Any) -> None:
    """Refuse a results document of another ``schema_version`` than :data:`SCHEMA_VERSION`.

    Raises
    ------
    ResultsError
        Saying which version the document has, which one is read, and what to do.
    """
    if not isinstance(doc, dict) or "schema_version" not in doc:
        return  # not a results document at all: the schema says what is missing
    version = doc["schema_version"]
    if version == SCHEMA_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
        raise ResultsError(f"results file has schema_version {version}, from an older dmamig; this dmamig reads "
                           f"schema_version {SCHEMA_VERSION} only; rerun dmamig bench to make a results file "
                           f"of this version")
    if isinstance(version, int) and not isinstance(version, bool):
        raise ResultsError(f"results file has schema_version {version}, from a newer dmamig; this dmamig reads "
                           f"schema_version {SCHEMA_VERSION} only; read it with the dmamig that wrote it")
    raise ResultsError(f"results file has schema_version {version!r}; this dmamig reads schema_version "
                       f"{SCHEMA_VERSION} only; give the results.json that dmamig bench wrote")


def validate_results(doc: Any) -> None:
    """Check ``doc`` against :data:`RESULTS_SCHEMA`.

    Uses ``jsonschema`` when it is installed (the ``test`` extra); otherwise checks the top-level structure
    and the fields the report needs, so that ``dmamig report`` gives a clear error on a wrong file anyway.

    Raises
    ------
    ResultsError
        Naming the first offending field, or (:func:`check_schema_version`) saying that the document has
        another schema version than the one read.
    """
    check_schema_version(doc)
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validate(doc, RESULTS_SCHEMA)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
            raise ResultsError(f"results file is not valid at {where}: {exc.message}") from None
        return
    if not isinstance(doc, dict):
        raise ResultsError("results file is not valid: the top level must be an object")
    for key in RESULTS_SCHEMA["required"]:
        if key not in doc:
            raise ResultsError(f"results file is not valid: missing {key!r}")
    required = _SCENARIO["required"]
    for i, sc in enumerate(doc["scenarios"]):
        missing = [k for k in required if k not in sc]
        if missing:
            raise ResultsError(f"results file is not valid at scenarios/{i}: missing {missing}")


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
    # File-backed records (empty for the others).
    + ["file_case", "source_dirty_pages", "source_writeback_pages"]
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


#: Metrics ``dmamig report`` can compare: ``throughput`` (GB/s; pages per CPU-second for state-only
#: scenarios) or ``ceiling-ratio`` (throughput over the same run's ceiling, which factors out machine speed).
METRICS = ("throughput", "ceiling-ratio")


def primary_metric(sc: dict[str, Any], metric: str = "throughput") -> float | None:
    """The figure compared between runs: GB/s (pages per CPU-second for state-only, pages per second for
    device access), or its ceiling ratio.

    With ``metric="ceiling-ratio"`` a scenario without a ceiling (state-only) falls back to throughput.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "ceiling-ratio" and sc.get("ceiling_ratio") is not None:
        return sc["ceiling_ratio"]
    if sc["kind"] == "state":
        return sc.get("pages_per_cpu_s")
    if sc["kind"] == "access":
        return sc.get("pages_per_s")
    return sc.get("gbps")


@dataclass(frozen=True)
class Comparison:
    """One scenario of a run against its baseline; ``ratio`` is new / baseline (higher is better).

    ``id`` is the stable key both runs share; ``name`` says the scenario in words.
    """

    id: str
    baseline: float | None
    new: float | None
    ratio: float | None
    regressed: bool
    note: str = ""
    name: str = ""
    low: float | None = None
    high: float | None = None
    inconclusive: bool = False  # beyond the threshold, but too few repetitions to test whether it is noise


class NotComparable(ResultsError):
    """Two runs whose settings differ: their figures measure different things and must not be compared."""


#: Run settings that change what a scenario measures; runs that differ in any of them are not compared.
COMPARED_SETTINGS = ("backend", "page_size", "total_bytes", "quick")
#: Settings compared only when both runs record them (older files predate them; null: not the backend's setting).
COMPARED_IF_RECORDED = ("access_bytes", "files_bytes", "pair_bytes", "topology", "dma_poll_us", "dma_engine")


def check_comparable(new: dict[str, Any], baseline: dict[str, Any], other_machine: bool = False) -> None:
    """Refuse to compare runs whose settings differ (quick vs full, another working set, backend, page size).

    With ``other_machine`` (runs known to come from different machines, compared on purpose) the backend may
    differ: a machine without a GPU runs only the CPU backend.

    Raises
    ------
    NotComparable
        Naming every differing setting and its two values.
    """
    ns, bs = new["settings"], baseline["settings"]

    def said(k: str, v: Any) -> str:  # sizes as every other message gives them (8M, not 8388608)
        return format_size(v) if k.endswith("_bytes") and isinstance(v, int) and v > 0 else repr(v)

    diff = [f"{k} {said(k, ns.get(k, False if k == 'quick' else None))} vs baseline "
            f"{said(k, bs.get(k, False if k == 'quick' else None))}"
            for k in COMPARED_SETTINGS if not (other_machine and k == "backend") and ns.get(k, False if k == "quick" else None)
            != bs.get(k, False if k == "quick" else None)]
    diff += [f"{k} {said(k, ns[k])} vs baseline {said(k, bs[k])}" for k in COMPARED_IF_RECORDED
             if ns.get(k) is not None and bs.get(k) is not None and ns[k] != bs[k]]
    # Another copy baseline divides every no-copy / copy ratio by another copy; between backends (other_machine)
    # the baselines differ by nature, and the backend already says so.
    if ns.get("backend") == bs.get("backend") and None not in (ns.get("copy_baseline"), bs.get("copy_baseline")) \
            and ns["copy_baseline"] != bs["copy_baseline"]:
        diff.append(f"copy_baseline {ns['copy_baseline']!r} vs baseline {bs['copy_baseline']!r}")
    if diff:
        raise NotComparable(f"the runs are not comparable, their settings differ: {'; '.join(diff)}; compare "
                            f"with a baseline run with the same settings")


class OtherMachine(NotComparable):
    """Two runs from different machines (another CPU model or other GPUs): their figures measure the machines
    as much as the code. ``fields`` names what differs."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


#: What says which machine made a run, compared by :func:`check_same_machine`, and its words.
MACHINE_FIELDS = {"cpu_model": "CPU model", "gpus": "GPU"}


def _known(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and value.startswith("unknown"))


def machine_identity(doc: dict[str, Any]) -> dict[str, Any]:
    """The fields of :data:`MACHINE_FIELDS` of a results document; None where the document does not say.

    ``cpu_model`` is the CPU model of every process that ran a scenario (a cluster's workers, when they
    recorded theirs; else the machine's). ``gpus`` is the set of names of the GPUs the run used, ``"none"``
    on the CPU backend. A field missing from an older result, or recorded as ``"unknown ..."``, is None.
    """
    m = doc.get("machine") or {}
    workers = [w for w in m.get("workers") or [] if _known(w.get("cpu"))]
    if workers:
        cpu: Any = " + ".join(sorted({str(w["cpu"]) for w in workers}))
    else:
        cpu = (m.get("host") or {}).get("cpu_model") or m.get("cpu")
    gpus: Any = None
    if "gpus" in m:
        names = sorted({str(g.get("name")) for g in m["gpus"] if _known(g.get("name"))})
        gpus = " + ".join(names) if names else ("none" if not m["gpus"] and m.get("backend") == "cpu" else None)
    return {"cpu_model": cpu if _known(cpu) else None, "gpus": gpus}


def check_same_machine(new: dict[str, Any], baseline: dict[str, Any]) -> list[str]:
    """Refuse to compare runs made on different machines: another CPU model, or other GPUs.

    A field that either run does not record (older results, or a fact that could not be read) is *unknown*
    and does not count as a difference: the refusal needs evidence. Such fields are returned, so that the
    report can say which ones it could not check.

    Returns
    -------
    list of str
        The fields (in words) that one of the runs does not record.

    Raises
    ------
    OtherMachine
        Naming every field that differs and its two values.
    """
    a, b = machine_identity(new), machine_identity(baseline)
    unknown = [MACHINE_FIELDS[k] for k in MACHINE_FIELDS if a[k] is None or b[k] is None]
    diff = [k for k in MACHINE_FIELDS if a[k] is not None and b[k] is not None and a[k] != b[k]]
    if diff:
        said = "; ".join(f"{MACHINE_FIELDS[k]} {a[k]!r} vs baseline {b[k]!r}" for k in diff)
        raise OtherMachine(f"the runs come from different machines: {said}; their figures would compare the "
                           f"machines, not the code. Compare with a baseline made on the same machine, or "
                           f"give --allow-other-machine to compare them anyway", [MACHINE_FIELDS[k] for k in diff])
    return unknown


def _settings_note(new: dict[str, Any], base: dict[str, Any]) -> tuple[str, bool]:
    """A note on the scenarios' recorded settings, and whether they differ (which fails the gate)."""
    n, b = batching_class(new), batching_class(base)
    if n == b or "n/a" in (n, b):
        if new.get("options") and base.get("options") and new["options"] != base["options"]:
            return f"options differ: {new['options']} vs baseline {base['options']}", True
        return "", False
    return f"batching differs: {new['batching']} vs baseline {base['batching']}", True


def compare_results(new: dict[str, Any], baseline: dict[str, Any], threshold: float = 0.1,
                    metric: str = "throughput", other_machine: bool = False) -> list[Comparison]:
    """Compare two runs scenario by scenario.

    A scenario regresses when ``new / baseline < 1 - threshold`` *and* the change is significant: the 95 %
    bootstrap interval of the ratio of median wall times (see :func:`ratio_interval`) lies below 1. With
    fewer than 3 repetitions on a side there is nothing to resample: a scenario beyond the threshold is then
    *inconclusive* (``Comparison.inconclusive``, and the note says so), not a regression. A scenario also regresses when its data failed verification in the new run, when its
    recorded options differ from the baseline's, or when the baseline has it and the new run does not (a
    partial or smaller run never passes the gate). Scenarios only the new run has are listed with a note and
    do not regress, so that a sweep can grow without breaking its baseline.

    Parameters
    ----------
    new, baseline : dict
        Results documents.
    threshold : float
        Allowed relative slowdown, e.g. ``0.1`` for 10 %.
    metric : str
        One of :data:`METRICS`.
    other_machine : bool
        The runs come from different machines and are compared on purpose (see :func:`check_comparable`);
        the machine itself is checked by :func:`check_same_machine`, which the caller asks.

    Returns
    -------
    list of Comparison
        In the new run's scenario order, then baseline-only scenarios.

    Raises
    ------
    NotComparable
        When the runs' settings differ (:func:`check_comparable`).
    """
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    check_comparable(new, baseline, other_machine)
    base = {s["id"]: s for s in baseline["scenarios"]}
    seen = set()
    out = []
    for s in new["scenarios"]:
        seen.add(s["id"])
        nv = primary_metric(s, metric)
        unverified = "data NOT verified" if not s["verified"] else ""
        b = base.get(s["id"])
        if b is None:
            out.append(Comparison(s["id"], None, nv, None, not s["verified"],
                                  "; ".join(x for x in ("not in baseline", unverified) if x), s["name"]))
            continue
        bv = primary_metric(b, metric)
        ratio = nv / bv if (nv is not None and bv) else None
        differs_note, differs = _settings_note(s, b)
        lo = hi = None
        untested = ""
        slow = False
        if ratio is not None:
            ci = ratio_interval(s["wall_ns"], b["wall_ns"], ratio)
            lo, hi = ci.low, ci.high
            beyond = ratio < 1.0 - threshold
            slow = beyond and ci.slower
            if beyond and not ci.tested:
                untested = (f"inconclusive: {min(len(s['wall_ns']), len(b['wall_ns']))} repetition(s), too few "
                            f"to test significance (use --repeat 3 or more)")
            elif beyond and not slow:
                untested = "within noise (not significant)"
        note = "; ".join(x for x in (unverified, differs_note, untested) if x)
        out.append(Comparison(s["id"], bv, nv, ratio, slow or differs or not s["verified"], note, s["name"],
                              lo, hi, inconclusive=bool(ratio is not None and ratio < 1.0 - threshold
                                                        and lo is None)))
    for sid, b in base.items():
        if sid not in seen:
            out.append(Comparison(sid, primary_metric(b, metric), None, None, True,
                                  "missing from this run" + (" (partial run)" if new.get("partial") else ""),
                                  b["name"]))
    return out


def regressions(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons that regressed."""
    return [c for c in comparisons if c.regressed]


def comparison_table(comparisons: list[Comparison], threshold: float, metric: str) -> Table:
    """A rich table of a comparison, regressions in red."""
    unit = "ratio to ceiling" if metric == "ceiling-ratio" else "GB/s, pages/CPU-s or device-access pages/s"
    t = Table(title=f"Against baseline ({metric}: {unit}; regression: below {1 - threshold:.2f}x and "
                    f"significant)",
              title_justify="left")
    for col in ("scenario", "id", "baseline", "new", "new/baseline", "95% interval", "", "note"):
        t.add_column(col, justify="left" if col in ("scenario", "id", "note") else "right")
    for c in comparisons:
        fmt = format_rate if (c.new or c.baseline or 0) >= 1e4 else format_number
        verdict = "[red]REGRESSED[/red]" if c.regressed else (
            "[yellow]inconclusive[/yellow]" if c.inconclusive else ("ok" if c.ratio is not None else ""))
        ci = "-" if c.low is None else f"{c.low:.3f}-{c.high:.3f}"
        t.add_row(c.name or c.id, c.id, fmt(c.baseline), fmt(c.new), format_number(c.ratio, "{:.3f}"), ci, verdict, c.note)
    return t


#: Fewer repetitions than this on either side leave nothing to resample: significance is not tested.
MIN_REPEATS = 3


@dataclass(frozen=True)
class RatioInterval:
    """A confidence interval of ``new / baseline`` (higher is better), or ``None`` bounds when untestable.

    Attributes
    ----------
    low, high : float or None
        The interval's bounds; ``None`` when either run has fewer than :data:`MIN_REPEATS` repetitions.
    level : float
        The confidence level, e.g. 0.95.
    """

    low: float | None
    high: float | None
    level: float

    @property
    def tested(self) -> bool:
        """True when the interval could be computed."""
        return self.low is not None

    @property
    def slower(self) -> bool:
        """True when the whole interval lies below 1: the new run is significantly slower."""
        return self.high is not None and self.high < 1.0


def ratio_interval(new_walls: Sequence[float], base_walls: Sequence[float], point: float, *,
                   level: float = 0.95, resamples: int = 2000, seed: int = 0) -> RatioInterval:
    """Bootstrap interval of a scenario's speed ratio from the repetitions' wall times.

    Each run's repetitions are resampled with replacement, and ``median(base) / median(new)`` (a speed ratio:
    time goes the other way) is taken for each resample. The percentile interval of that ratio, rescaled so
    that its centre is ``point`` (the ratio of the compared metric, which may divide by a ceiling or count
    CPU time), is returned.

    Parameters
    ----------
    new_walls, base_walls : sequence of float
        Wall time of every timed repetition of the scenario in each run.
    point : float
        The metric's ratio new / baseline.
    level : float
        Confidence level in (0, 1).
    resamples : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling generator (a fixed seed makes the verdict reproducible).

    Returns
    -------
    RatioInterval
    """
    new = np.asarray(new_walls, dtype=np.float64)
    base = np.asarray(base_walls, dtype=np.float64)
    if new.size < MIN_REPEATS or base.size < MIN_REPEATS or not (new > 0).all() or not (base > 0).all():
        return RatioInterval(None, None, level)
    rng = np.random.default_rng(seed)
    nb = np.median(new[rng.integers(0, new.size, (resamples, new.size))], axis=1)
    bb = np.median(base[rng.integers(0, base.size, (resamples, base.size))], axis=1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(bb / nb, [tail, 1.0 - tail])
    # Express the interval in the compared metric's terms: the same relative spread around its own ratio.
    scale = point / (float(np.median(base)) / float(np.median(new)))
    return RatioInterval(float(lo * scale), float(hi * scale), level)
