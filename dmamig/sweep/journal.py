"""The journal of a sweep: ``tasks.jsonl`` in its output folder, one JSON line per finished task.

The first line is a header naming the tool, the settings and their fingerprint; every later line is one
finished task: its ``id``, the settings ``fingerprint`` and whatever the tool keeps to rebuild its results
(records, the ceilings they were divided by, the worker that ran it), or the end of a run that was
interrupted (``run_ended``, with its start and wall time, so that a resumed sweep's wall time covers it). Lines are appended and flushed to disk
as each task finishes, by the one process that merges results (in-process or the cluster's client), so that
a sweep stopped at any point (Ctrl-C, a lost connection, a killed client) resumes from its folder: the ids
found here are not run again.

A line cut short by a crash is not a finished task: it is dropped (and the file trimmed to its last whole
line) when the journal is resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["JOURNAL_NAME", "Journal", "ResumeError", "fingerprint"]

#: File name of the journal inside an output folder.
JOURNAL_NAME = "tasks.jsonl"
_VERSION = 1


class ResumeError(ValueError):
    """A folder that cannot be resumed: no journal, another tool's, or other settings. The message says
    which and what to do."""


def _canonical(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(settings: dict[str, Any]) -> str:
    """A short, stable hash of ``settings`` (JSON with sorted keys): equal settings, equal fingerprints."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:16]


def _differences(here: dict[str, Any], there: dict[str, Any]) -> str:
    # Name each setting that differs, so that the user sees which option to change back.
    keys = sorted(set(here) | set(there), key=str)
    diffs = [f"{k}: {json.dumps(here.get(k), default=str)} here, {json.dumps(there.get(k), default=str)} there"
             for k in keys if _canonical({"v": here.get(k)}) != _canonical({"v": there.get(k)})]
    return "; ".join(diffs[:4]) + (f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else "")


class Journal:
    """The journal of one sweep in ``folder`` (see the module docstring).

    Parameters
    ----------
    folder : Path
        The sweep's output folder.
    tool : str
        The tool that writes it, e.g. ``"dmamig bench"``; a journal of another tool is not resumed.
    settings : dict
        JSON-ready settings of the sweep; their :func:`fingerprint` is written into every line.

    Attributes
    ----------
    done : dict
        Finished tasks read from an existing journal (:meth:`resume`), by id; empty for a fresh one.
    """

    def __init__(self, folder: Path, tool: str, settings: dict[str, Any]):
        self.folder = Path(folder)
        self.path = self.folder / JOURNAL_NAME
        self.tool = tool
        self.settings = settings
        self.fingerprint = fingerprint(settings)
        self.done: dict[str, dict[str, Any]] = {}
        #: Earlier runs of this sweep that ended (interrupted): ``{"run": started, "wall_s": ...}`` each.
        self.runs: list[dict[str, Any]] = []
        # A fresh journal starts its file at the first finished task: a sweep stopped before any task finished
        # leaves no file (and its folder can be removed as empty).
        self._started = False

    @classmethod
    def fresh(cls, folder: Path, tool: str, settings: dict[str, Any], arg: str = "--out") -> Journal:
        """The journal of a new sweep in ``folder``.

        Raises
        ------
        ResumeError
            When ``folder`` already holds a journal: an unfinished sweep is resumed, never overwritten.
        """
        j = cls(folder, tool, settings)
        if j.exists():
            raise ResumeError(f"argument {arg}: {str(j.folder)!r} holds the journal of an unfinished sweep "
                              f"({JOURNAL_NAME}); continue it with --resume {j.folder}, or give a new folder")
        return j

    @classmethod
    def resume(cls, folder: Path, tool: str, settings: dict[str, Any], arg: str = "--resume") -> Journal:
        """Open the journal in ``folder`` to continue its sweep.

        Raises
        ------
        ResumeError
            When ``folder`` holds no journal, one of another tool, or one whose settings differ from
            ``settings`` (the message names the settings that differ).
        """
        j = cls(folder, tool, settings)
        if not Path(folder).exists():
            raise ResumeError(f"argument {arg}: {str(folder)!r} does not exist; give the folder of a sweep that "
                              f"was interrupted (the --out folder it printed)")
        if not Path(folder).is_dir():
            raise ResumeError(f"argument {arg}: {str(folder)!r} is a file, not a folder; give the folder of a "
                              f"sweep that was interrupted (the --out folder it printed)")
        if not j.path.is_file():
            raise ResumeError(f"argument {arg}: {str(folder)!r} holds no {JOURNAL_NAME}: nothing to resume "
                              f"(a sweep journals each task as it finishes); give the folder of a sweep that "
                              f"was interrupted")
        lines = j._read_lines()
        if not lines and not j.path.stat().st_size:
            # The header is written with the first finished task, in one write: a crash during it leaves no
            # whole line (trimmed away above). Nothing finished; the first task to finish starts the file again.
            return j
        try:
            head = json.loads(lines[0]) if lines else None
        except ValueError:
            head = None
        if not isinstance(head, dict) or head.get("journal") != _VERSION:
            raise ResumeError(f"argument {arg}: {str(j.path)!r} is not a dmamig journal; give the folder of a "
                              f"sweep that was interrupted")
        if head.get("tool") != tool:
            raise ResumeError(f"argument {arg}: {str(folder)!r} holds a sweep of {head.get('tool')!r}, not "
                              f"{tool!r}; resume it with that command")
        if head.get("fingerprint") != j.fingerprint:
            raise ResumeError(f"argument {arg}: the settings differ from those of the sweep in {str(folder)!r} "
                              f"({_differences(settings, head.get('settings') or {})}); rerun with the options "
                              f"it was started with")
        for line in lines[1:]:
            entry = json.loads(line)
            if not isinstance(entry, dict) or entry.get("fingerprint") != j.fingerprint:
                continue
            if "id" in entry:
                j.done.setdefault(str(entry["id"]), entry)
            elif "run_ended" in entry:
                j.runs.append(entry)
        j._started = True
        return j

    def _read_lines(self) -> list[str]:
        """The whole lines of the file; a torn last line (a crash mid-write) is cut off the file."""
        raw = self.path.read_bytes()
        cut = raw.rfind(b"\n") + 1
        if cut != len(raw):
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
        lines = []
        for line in raw[:cut].decode("utf-8", errors="replace").splitlines():
            try:
                json.loads(line)
            except ValueError:
                continue  # not a finished task: it runs again
            lines.append(line)
        return lines

    def exists(self) -> bool:
        """Whether the folder already holds a journal file."""
        return self.path.is_file()

    def discard(self) -> None:
        """Remove the journal file: its sweep completed and wrote every result (nothing is left to resume)."""
        self.path.unlink(missing_ok=True)

    def record(self, task_id: str, **fields: Any) -> None:
        """Append the finished task ``task_id`` with ``fields`` (JSON-ready) and flush it to disk."""
        entry = {"id": task_id, "fingerprint": self.fingerprint, **fields}
        self._append(entry)
        self.done[task_id] = entry

    def end_run(self, run: str, wall_s: float) -> None:
        """Append that the run started at ``run`` (ISO time) ended after ``wall_s`` seconds, unfinished (Ctrl-C),
        so that the resumed sweep's wall time covers it. Nothing is written for a run that finished no task:
        its folder holds no journal."""
        if not self._started:
            return
        entry = {"run_ended": True, "run": run, "wall_s": float(wall_s), "fingerprint": self.fingerprint}
        self._append(entry)
        self.runs.append(entry)

    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, default=_plain) + "\n"
        if not self._started:
            self.folder.mkdir(parents=True, exist_ok=True)
            head = {"journal": _VERSION, "tool": self.tool, "fingerprint": self.fingerprint,
                    "settings": self.settings}
            line = json.dumps(head, default=str) + "\n" + line
            mode = "w"  # a fresh sweep starts a fresh journal
            self._started = True
        else:
            mode = "a"
        with open(self.path, mode, encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def _plain(obj: Any) -> Any:
    # numpy scalars and arrays that slipped into a record: JSON wants plain numbers and lists.
    fn = getattr(obj, "tolist", None)
    return fn() if callable(fn) else str(obj)
