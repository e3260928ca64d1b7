"""Output folders of ``dmamig bench`` and ``dmamig report``: unique, writable, never overwriting results.

Two runs started in the same second must not share a folder: the default folder is created atomically
(``mkdir`` without ``exist_ok``), with a ``-2``, ``-3`` ... suffix when the timestamp is taken. A folder
given with ``--out`` that already holds a ``results.json`` is refused.
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
import tempfile
from pathlib import Path

__all__ = ["OutputError", "bench_folder", "check_writable", "remove_if_empty"]


class OutputError(ValueError):
    """An output folder that cannot be used; the message names the argument, the folder and the fix."""


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_writable(folder: Path, arg: str = "--out") -> bool:
    """Create ``folder`` if needed and check that files can be written into it.

    Returns
    -------
    bool
        True when this call created the folder (so that a caller can remove it again if it stays empty).

    Raises
    ------
    OutputError
        When ``folder`` is a file, cannot be created or cannot be written.
    """
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"argument {arg}: {str(folder)!r} is a file, not a folder; give a folder path")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"argument {arg}: cannot create folder {str(folder)!r}: {_why(exc)}; give a "
                          f"writable folder") from None
    try:
        # Probe with a real file: permission bits alone do not tell (root, read-only mounts, /proc).
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dmamig-probe-"):
            pass
    except OSError as exc:
        if created:
            remove_if_empty(folder)
        raise OutputError(f"argument {arg}: cannot write into {str(folder)!r}: {_why(exc)}; give a writable "
                          f"folder") from None
    return created


def bench_folder(out: Path | None, now: _dt.datetime | None = None) -> tuple[Path, bool]:
    """The folder a ``dmamig bench`` run writes into, created; and whether this call created it.

    Parameters
    ----------
    out : Path or None
        The ``--out`` argument; None for ``./dmamig-results/<timestamp>/`` made unique with a suffix.
    now : datetime, optional
        The timestamp (the current time by default).

    Raises
    ------
    OutputError
        When the folder cannot be used, or already holds results (they are never overwritten).
    """
    if out is not None:
        if (out / "results.json").exists():
            raise OutputError(f"argument --out: {str(out)!r} already holds a results.json; results are never "
                              f"overwritten: give a new folder, or leave --out out for a fresh one")
        return out, check_writable(out)
    root = Path("dmamig-results")
    check_writable(root, "--out (default ./dmamig-results)")
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    for n in range(1, 10_000):
        folder = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir()  # atomic: of two runs racing for one name, exactly one gets it
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"argument --out: cannot create folder {str(folder)!r}: {_why(exc)}") from None
        return folder, True
    raise OutputError(f"argument --out: {str(root)!r} has 10000 folders for {stamp}; give --out")


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if it is empty (a run that wrote nothing leaves nothing behind)."""
    try:
        os.rmdir(folder)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise
