"""Is a change between two runs real? A bootstrap confidence interval of the ratio of medians.

Benchmark timings on a shared machine are noisy: two runs of unchanged code differ by 10 % and more in single
scenarios. ``dmamig report`` therefore flags a scenario only when its change is both beyond the threshold and
significant: the bootstrap interval of the ratio of median wall times (resampling each run's repetitions,
``wall_ns``) lies entirely below 1. The resampling is seeded, so a comparison always gives the same verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_REPEATS", "RatioInterval", "ratio_interval"]

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
