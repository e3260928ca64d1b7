"""Placement policies: observe each epoch's accesses and hint faults, return the migrations to make.

A policy is a small class with two methods, both fed numpy arrays (never a Python object per page):

- ``start(tiers)`` once, with the :class:`Tiers` of the machine (which node is fast, which slow, sizes);
- ``epoch(obs)`` after every epoch, with an :class:`Observation`; it returns a list of
  :class:`Migration` (page indices of the region and a target node), made while the next epoch runs.

Device actors of a trace (``trace.meta["device_actors"]``) access memory through a
:class:`~dmamig.DeviceAccessor`; :meth:`Policy.uvm_options` says how their faults are serviced (UVM's demand
faults with LRU eviction, or access-counter migration).

``numa-balancing`` and ``tpp`` run the kernel's paths by default (``path="hint-faults"``): the replay makes
the region ``PROT_NONE`` each scan period, promotes one folio per hint fault with ``migrate_misplaced_folio``
under the kernel's hot threshold and rate limit, and (tpp) demotes from kswapd's reclaim past the watermarks;
see :mod:`dmamig.tiering.numa`. Their ``epoch()`` is the experiment ``path="move_pages"``: a user-space
daemon's decision after each epoch, migrated in ``move_pages`` SYNC batches. For it, and in
:class:`Observation`, a hint fault is an access to a page on a slow node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgument
from ..uvm import UvmOptions
from .numa import NumaSettings

__all__ = ["POLICIES", "FirstTouch", "Lru", "Migration", "NumaBalancing", "Observation", "Policy", "Tiers", "Tpp",
           "UvmCounters", "UvmFaults", "make_policy"]


@dataclass(frozen=True)
class Tiers:
    """The memory a policy places pages in.

    Attributes
    ----------
    fast, slow : int
        Node ids of the fast tier (DRAM) and the slow tier (CXL).
    capacity : dict
        Frames of each node.
    pages : int
        Pages of the replayed region (policies index pages ``0 .. pages - 1``).
    """

    fast: int
    slow: int
    capacity: dict[int, int]
    pages: int


@dataclass(frozen=True)
class Observation:
    """What a policy sees of one epoch.

    Attributes
    ----------
    epoch : int
        The epoch that just ended.
    pages, counts : numpy.ndarray
        The distinct pages accessed in the epoch (sorted) and how often each was.
    written : numpy.ndarray
        Bool per entry of ``pages``: stored to at least once.
    hint : numpy.ndarray
        Bool per entry of ``pages``: the page was on a slow node when accessed (a NUMA hint fault).
    placement : numpy.ndarray
        Node of every page of the region at the start of the epoch (-1: not populated).
    free : dict
        Free frames of each node now.
    """

    epoch: int
    pages: np.ndarray
    counts: np.ndarray
    written: np.ndarray
    hint: np.ndarray
    placement: np.ndarray
    free: dict[int, int]


@dataclass(frozen=True)
class Migration:
    """Move ``pages`` (indices into the region) to ``node``; ``kind`` labels it in results."""

    pages: np.ndarray
    node: int
    kind: str = "promote"


class Policy:
    """Base class: keeps nothing and moves nothing (first touch). Subclasses override :meth:`epoch`."""

    name = "first-touch"

    def start(self, tiers: Tiers) -> None:
        """Called once before the first epoch."""
        self.tiers = tiers

    def epoch(self, obs: Observation) -> list[Migration]:
        """Decide the migrations after ``obs.epoch``; they run while the next epoch runs."""
        return []

    def params(self) -> dict[str, object]:
        """Settings recorded with results."""
        return {k: v for k, v in vars(self).items() if k != "tiers" and not k.startswith("_")}

    def kernel_paths(self) -> NumaSettings | None:
        """The kernel's NUMA-balancing and demotion settings when the policy runs the kernel's paths (hint faults
        and reclaim, :mod:`dmamig.tiering.numa`) instead of returning migrations from :meth:`epoch`."""
        return None

    def uvm_options(self, no_copy: bool) -> UvmOptions:
        """How device actors of a trace service their faults: UVM's defaults (demand faults, density
        prefetch, LRU eviction of 2 MiB blocks when the device is oversubscribed)."""
        return UvmOptions(no_copy=no_copy)


class FirstTouch(Policy):
    """Pages stay where first touch put them (the kernel without NUMA balancing or demotion)."""

    name = "first-touch"


class NumaBalancing(Policy):
    """NUMA-balancing tiering promotion (``numa_balancing=2``), without demotion.

    By default (``path="hint-faults"``) the kernel's path runs: scanner, hint faults, one folio per fault with
    ``migrate_misplaced_folio``, the hot threshold ``hot_threshold_ms`` and the rate limit
    ``promote_rate_limit_mbps`` (the kernel's sysctls, their defaults), and promotion stops once the top tier
    reaches its high watermark (nothing demotes). ``path="move_pages"`` is an experiment: after each epoch the
    slow pages that took ``threshold`` hint faults (accumulated, halved each epoch with ``decay``) are promoted,
    at most ``rate_limit`` per epoch, the hottest first, into free fast frames, in ``move_pages`` SYNC batches.
    """

    name = "numa-balancing"
    demotion = False
    PATHS = ("hint-faults", "move_pages")

    def __init__(self, threshold: int = 2, rate_limit: int = 64, decay: bool = True, path: str = "hint-faults",
                 hot_threshold_ms: int = 1000, promote_rate_limit_mbps: int = 65536, scan_size_mb: int = 256):
        if threshold < 1 or rate_limit < 1:
            raise InvalidArgument(f"threshold and rate_limit must be >= 1, got {threshold}, {rate_limit}")
        if path not in self.PATHS:
            raise InvalidArgument(f"path must be 'hint-faults' (the kernel's) or 'move_pages' (epoch batches, an "
                                  f"experiment), got {path!r}")
        self.threshold, self.rate_limit, self.decay = int(threshold), int(rate_limit), bool(decay)
        self.path = path
        self._numa = NumaSettings(hot_threshold_ms=hot_threshold_ms, promote_rate_limit_mbps=promote_rate_limit_mbps,
                                  scan_size_mb=scan_size_mb, demotion=self.demotion)

    def params(self) -> dict[str, object]:
        out = super().params()
        if self.path == "hint-faults":  # the epoch path's settings do not apply; the rest is in numa_settings
            out = {"path": self.path, "hot_threshold_ms": self._numa.hot_threshold_ms,
                   "promote_rate_limit_mbps": self._numa.promote_rate_limit_mbps}
        return out

    def kernel_paths(self) -> NumaSettings | None:
        return self._numa if self.path == "hint-faults" else None

    def start(self, tiers: Tiers) -> None:
        super().start(tiers)
        self._faults = np.zeros(tiers.pages, dtype=np.int64)

    def _hot(self, obs: Observation) -> np.ndarray:
        """Slow pages past the threshold, hottest first (ties: lower page first)."""
        if self.decay:
            self._faults >>= 1
        np.add.at(self._faults, obs.pages[obs.hint], obs.counts[obs.hint])
        slow = obs.placement == self.tiers.slow
        cand = np.flatnonzero(slow & (self._faults >= self.threshold))
        return cand[np.argsort(-self._faults[cand], kind="stable")]

    def epoch(self, obs: Observation) -> list[Migration]:
        cand = self._hot(obs)
        room = min(self.rate_limit, obs.free.get(self.tiers.fast, 0))
        chosen = cand[:max(room, 0)]
        self._faults[chosen] = 0
        return [Migration(chosen, self.tiers.fast)] if chosen.size else []


class Tpp(NumaBalancing):
    """TPP-style tiering: NUMA-balancing promotion plus demotion.

    By default (``path="hint-faults"``) the kernel's paths run: promotion as :class:`NumaBalancing`'s, and
    demotion from kswapd's reclaim (``demotion_enabled``) when the top tier passes its watermarks, coldest
    pages first, ``MR_DEMOTION``. ``path="move_pages"`` is an experiment: after each epoch, when the fast
    tier's free frames fall below ``low`` (a fraction of its size), the coldest fast pages (least recently
    accessed) are demoted until ``high`` is free again, and promotion may use the room down to ``low``.
    """

    name = "tpp"
    demotion = True

    def __init__(self, threshold: int = 2, rate_limit: int = 64, low: float = 0.05, high: float = 0.10,
                 decay: bool = True, path: str = "hint-faults", hot_threshold_ms: int = 1000,
                 promote_rate_limit_mbps: int = 65536, scan_size_mb: int = 256):
        super().__init__(threshold, rate_limit, decay, path, hot_threshold_ms, promote_rate_limit_mbps,
                         scan_size_mb)
        if not 0.0 <= low <= high < 1.0:
            raise InvalidArgument(f"watermarks need 0 <= low <= high < 1, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)
    def start(self, tiers: Tiers) -> None:
        super().start(tiers)
        self._last = np.full(tiers.pages, -1, dtype=np.int64)  # last epoch each page was accessed

    def epoch(self, obs: Observation) -> list[Migration]:
        self._last[obs.pages] = obs.epoch
        cand = self._hot(obs)
        size = self.tiers.capacity[self.tiers.fast]
        free = obs.free.get(self.tiers.fast, 0)
        low, high = int(size * self.low), int(size * self.high)
        out = []
        promote = cand[:max(0, min(self.rate_limit, free - low))]
        free -= promote.size
        if free < low or (cand.size > promote.size):
            # Demote enough cold pages to be back at the high watermark after this epoch's promotions.
            want = high - free
            fast = np.flatnonzero(obs.placement == self.tiers.fast)
            fast = fast[self._last[fast] < obs.epoch]  # never demote what was just used
            cold = fast[np.argsort(self._last[fast], kind="stable")][:max(want, 0)]
            if cold.size:
                out.append(Migration(cold, self.tiers.slow, "demote"))
        if promote.size:
            self._faults[promote] = 0
            out.append(Migration(promote, self.tiers.fast))
        return out


class Lru(Policy):
    """Demand placement with LRU eviction, as a device driver manages its memory: every page accessed on
    the slow tier is brought to the fast tier, evicting the least recently used fast pages when it is full
    (at most ``rate_limit`` pages per epoch)."""

    name = "lru"

    def __init__(self, rate_limit: int = 256):
        if rate_limit < 1:
            raise InvalidArgument(f"rate_limit must be >= 1, got {rate_limit}")
        self.rate_limit = int(rate_limit)

    def start(self, tiers: Tiers) -> None:
        super().start(tiers)
        self._last = np.full(tiers.pages, -1, dtype=np.int64)

    def epoch(self, obs: Observation) -> list[Migration]:
        self._last[obs.pages] = obs.epoch
        want = obs.pages[obs.hint & (obs.placement[obs.pages] == self.tiers.slow)][:self.rate_limit]
        out = []
        short = want.size - obs.free.get(self.tiers.fast, 0)
        if short > 0:
            fast = np.flatnonzero(obs.placement == self.tiers.fast)
            fast = fast[self._last[fast] < obs.epoch]
            victims = fast[np.argsort(self._last[fast], kind="stable")][:short]
            out.append(Migration(victims, self.tiers.slow, "demote"))
            want = want[:obs.free.get(self.tiers.fast, 0) + victims.size]
        if want.size:
            out.append(Migration(want, self.tiers.fast))
        return out


class UvmFaults(Policy):
    """Device memory as UVM manages it: every device access to a page elsewhere faults it in (batched, with
    density prefetch), and an oversubscribed device evicts its least recently used 2 MiB blocks. Host tiers
    stay as first touch left them."""

    name = "uvm-lru"

    def __init__(self, eviction: str = "lru", prefetch: str = "density"):
        self.eviction, self.prefetch = eviction, prefetch
        UvmOptions(eviction=eviction, prefetch=prefetch)  # refuse bad settings now, not mid-replay

    def uvm_options(self, no_copy: bool) -> UvmOptions:
        return UvmOptions(no_copy=no_copy, eviction=self.eviction, prefetch=self.prefetch)


class UvmCounters(Policy):
    """UVM access-counter migration: a device accesses host pages remotely, in place, and migrates a page
    once it accessed it ``threshold`` times."""

    name = "uvm-counters"

    def __init__(self, threshold: int = 4):
        if threshold < 1:
            raise InvalidArgument(f"threshold must be >= 1, got {threshold}")
        self.threshold = int(threshold)

    def uvm_options(self, no_copy: bool) -> UvmOptions:
        return UvmOptions(no_copy=no_copy, access_counter_threshold=self.threshold)


#: Built-in policies by name.
POLICIES: dict[str, type[Policy]] = {"first-touch": FirstTouch, "lru": Lru, "numa-balancing": NumaBalancing,
                                     "tpp": Tpp, "uvm-counters": UvmCounters, "uvm-lru": UvmFaults}


def make_policy(name: str, **kw: object) -> Policy:
    """A new built-in policy ``name`` (one of :data:`POLICIES`) with settings ``kw``."""
    if name not in POLICIES:
        raise InvalidArgument(f"unknown policy {name!r}; built-in policies: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kw)
