"""Comparing a run with its baseline: the compared metric, per-scenario verdicts and the comparison table.

A scenario regresses when it is slower beyond a threshold and significantly so (:mod:`dmamig.bench.stats`),
when its data failed verification, when its settings differ, or when the run lacks it; runs whose settings
differ are not compared at all, nor runs from different machines (another CPU model or GPU) unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.table import Table

from .naming import batching_class, format_number, format_rate, format_size
from .schema import ResultsError
from .stats import ratio_interval

__all__ = [
    "COMPARED_IF_RECORDED",
    "COMPARED_SETTINGS",
    "MACHINE_FIELDS",
    "METRICS",
    "Comparison",
    "NotComparable",
    "OtherMachine",
    "check_comparable",
    "check_same_machine",
    "compare_results",
    "comparison_table",
    "machine_identity",
    "primary_metric",
    "regressions",
]

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
#: Settings compared only when both runs record them (older files predate them).
COMPARED_IF_RECORDED = ("access_bytes", "pair_bytes", "topology", "dma_poll_us")


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
             if k in ns and k in bs and ns[k] != bs[k]]
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
    bootstrap interval of the ratio of median wall times (see :mod:`dmamig.bench.stats`) lies below 1. With
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
