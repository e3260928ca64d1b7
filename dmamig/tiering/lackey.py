"""Convert the text traces of Valgrind's Lackey tool (``valgrind --tool=lackey --trace-mem=yes``).

Lackey prints one line per memory access::

    I  0400d7d4,8        an instruction fetch
     S 7ff000398,8       a store
     L 04222cac,8        a load
     M 0421c7f0,4        a modify (a load and a store of the same bytes)

with the address in hex and the size in decimal; other lines (Valgrind's ``==pid==`` banners) are skipped.
Data accesses become trace records (``M`` as a store); instruction fetches are kept only when asked. Lackey's
addresses span a whole process (stack, heap, libraries, far apart), so the distinct pages touched are packed
into one dense region in address order: neighbouring pages stay neighbours, the gaps between mappings go.
Every ``per_epoch`` accesses form an epoch; there is one actor (Lackey traces one thread's view).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .trace import Trace, TraceError

__all__ = ["lackey_to_trace"]

_LINE = re.compile(r"^(I| [LSM]) +([0-9a-fA-F]+),(\d+)\s*$")


def lackey_to_trace(path: str | Path, per_epoch: int = 1000, page_size: int = 4096,
                    instructions: bool = False) -> Trace:
    """Read a Lackey ``--trace-mem=yes`` log into a :class:`~dmamig.tiering.Trace`.

    Parameters
    ----------
    path : str or Path
        The text log (Lackey writes it to stderr, or to ``--log-file``).
    per_epoch : int
        Accesses per epoch.
    page_size : int
        Page size for packing the touched pages into a dense region.
    instructions : bool
        Keep instruction fetches (``I`` lines) as loads.

    Raises
    ------
    TraceError
        No access line in the file, or an access that does not fit one page.
    """
    path = Path(path)
    kinds, addrs, sizes = [], [], []
    skipped = 0  # lines that are neither an access nor a Valgrind banner: counted, never dropped silently
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            mt = _LINE.match(line)
            if mt is None:
                skipped += 0 if (not line.strip() or line.startswith("==")) else 1
                continue
            if mt.group(1) == "I" and not instructions:
                continue
            kinds.append(mt.group(1).strip())
            addrs.append(int(mt.group(2), 16))
            sizes.append(int(mt.group(3)))
    if not addrs:
        raise TraceError(f"{path}: no Lackey access lines (' L addr,size', ' S ...', ' M ...', 'I ...') found")
    a = np.array(addrs, dtype=np.int64)
    n = np.array(sizes, dtype=np.int64)
    if (n <= 0).any() or (n > page_size).any():
        i = int(np.flatnonzero((n <= 0) | (n > page_size))[0])
        raise TraceError(f"{path}: access {i} has size {int(n[i])}, outside 1..{page_size}")
    first, last = a // page_size, (a + n - 1) // page_size
    touched = np.unique(np.concatenate([first, last]))
    dense = np.searchsorted(touched, first)
    # An access that straddles two pages keeps its length: the next page packs right after when it is the
    # neighbour in the process; when it is not (impossible for a real access), the store is cut at the page end.
    offset = dense * page_size + a % page_size
    straddle = (last != first) & (np.searchsorted(touched, last) != dense + 1)
    n = np.where(straddle, page_size - a % page_size, n)
    write = np.array([k in ("S", "M") for k in kinds], dtype=bool)
    epoch = (np.arange(a.size) // per_epoch).astype(np.int32)
    return Trace(epoch, np.zeros(a.size, dtype=np.int16), offset, n, write,
                 region_bytes=int(touched.size) * page_size, actors=1, name=f"lackey:{path.name}",
                 page_size=page_size, meta={"source": "valgrind-lackey", "file": path.name,
                                            "pages": int(touched.size), "per_epoch": per_epoch,
                                            "unparsed_lines": skipped}).validate()
