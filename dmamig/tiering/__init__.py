"""Migration-policy experiments: tiered memory, workloads, traces, policies and their replay.

See :mod:`dmamig.tiering.replay` for how a replay runs and what it measures, and
:mod:`dmamig.tiering.trace` for the trace format.
"""

from .lackey import lackey_to_trace
from .policies import (
    POLICIES,
    FirstTouch,
    Lru,
    Migration,
    NumaBalancing,
    Observation,
    Policy,
    Tiers,
    Tpp,
    UvmCounters,
    UvmFaults,
    make_policy,
)
from .replay import EPOCH_FIELDS, ReplayResult, replay
from .trace import Trace, TraceError, have_pyarrow, load_trace, save_trace
from .workloads import WORKLOADS, kvstore, make_workload, phases, sequential, stencil, uniform, zipf

__all__ = [
    "EPOCH_FIELDS",
    "POLICIES",
    "WORKLOADS",
    "FirstTouch",
    "Lru",
    "Migration",
    "NumaBalancing",
    "Observation",
    "Policy",
    "ReplayResult",
    "Tiers",
    "Tpp",
    "Trace",
    "TraceError",
    "UvmCounters",
    "UvmFaults",
    "have_pyarrow",
    "kvstore",
    "lackey_to_trace",
    "load_trace",
    "make_policy",
    "make_workload",
    "phases",
    "replay",
    "save_trace",
    "sequential",
    "stencil",
    "uniform",
    "zipf",
]
