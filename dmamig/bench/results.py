"""The JSON schema of ``results.json``, the file ``dmamig bench`` writes and ``dmamig report`` reads.

The schema lives in code (not a data file) so that every install has it; ``dmamig schema`` prints it.

Units: sizes in bytes, times in nanoseconds, throughput in GB/s (10**9 bytes per second), rates per second.
Every figure of a scenario is the median over its timed repetitions; ``wall_ns`` keeps every repetition.

Schema 2 records each scenario's name in words and the batching it ran with (``options``: the
:class:`~dmamig.MigrateOptions`, ``null`` for a raw DMA copy). Files of another ``schema_version`` are refused
with a message that says which version the file has, which one is read, and what to do. Device-access records
(kind ``access``), device-pair records (kind ``pairs``) and their settings came later within schema 2; every
field they add is optional.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PHASES", "RESULTS_SCHEMA", "SCHEMA_VERSION", "ResultsError", "validate_results"]

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
        "kind": {"enum": ["migrate", "state", "dma", "access", "pairs"],
                 "description": "migrate: mm.migrate end to end; state: NO_COPY m.migrate_pages (page state "
                                "only); dma: m.dma.copy of pages; access: a device reading (and writing) host "
                                "memory through faults, UVM-style; pairs: mm.migrate from one device to "
                                "another, for every ordered device pair."},
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
                                         "'cpu' (the migrating thread's memcpy) or 'sync-dma' (one synchronous "
                                         "DMA per folio, a driver without batching)."},
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
                "pairs": {"type": "boolean", "description": "Device pairs run (with two devices or more)."},
                "pair_bytes": _int,
                "topology": {"type": "string",
                             "description": "Topology preset (cpu: nvswitch, pcie, two-socket, dgx1) or runtime "
                                            "(cuda)."},
                "dma_poll_us": {"type": "number", "minimum": 0,
                                "description": "Microseconds a DMA wait (and a cpu channel's idle worker) polls "
                                               "before sleeping; 0: they sleep at once."},
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
