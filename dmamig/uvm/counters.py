"""Access-counter migration: a device maps remote pages first and migrates them once used enough.

UVM can leave a page where it is and let the GPU access it over the interconnect, counting the accesses in
hardware; once a region's count crosses a threshold, a notification migrates it. Here each page accessed
remotely has a count, kept in two sorted numpy arrays (page address, count); pages whose count reaches the
threshold are serviced as faults are, and lose their count when they migrate.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AccessCounters"]


class AccessCounters:
    """Remote-access counts of one device's pages of one address space.

    Parameters
    ----------
    threshold : int
        Accesses after which a page migrates (``UvmOptions.access_counter_threshold``).
    """

    def __init__(self, threshold: int):
        self.threshold = threshold
        self._addrs = np.empty(0, dtype=np.int64)
        self._counts = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._addrs.size)

    def count(self, addrs: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Add ``times[i]`` accesses to page ``addrs[i]`` (sorted, distinct); return which reached the threshold.

        Pages that reached it are forgotten: they are about to migrate, and a page that comes back to host
        memory later starts counting again.
        """
        pos = np.searchsorted(self._addrs, addrs)
        found = pos < self._addrs.size
        found[found] = self._addrs[pos[found]] == addrs[found]
        total = times.astype(np.int64).copy()
        total[found] += self._counts[pos[found]]
        reached = total >= self.threshold
        keep_old = np.ones(self._addrs.size, dtype=bool)
        keep_old[pos[found]] = False  # rewritten below (or dropped when they reached the threshold)
        stay = ~reached
        merged_a = np.concatenate([self._addrs[keep_old], addrs[stay]])
        merged_c = np.concatenate([self._counts[keep_old], total[stay]])
        order = np.argsort(merged_a, kind="stable")
        self._addrs, self._counts = merged_a[order], merged_c[order]
        return reached

    def counts_of(self, addrs: np.ndarray) -> np.ndarray:
        """Current counts of ``addrs`` (0 where none)."""
        addrs = np.asarray(addrs, dtype=np.int64)
        out = np.zeros(addrs.size, dtype=np.int64)
        if self._addrs.size:
            pos = np.minimum(np.searchsorted(self._addrs, addrs), self._addrs.size - 1)
            hit = self._addrs[pos] == addrs
            out[hit] = self._counts[pos[hit]]
        return out
