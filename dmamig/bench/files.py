"""File-backed scenarios: page-cache, shared-memory and private-file folios migrated with ``mm.migrate``.

Each case maps a working set of 4 KiB pages one way and migrates it host -> device -> host with the kernel's
batching, in SYNC mode, in copy mode (the migrating thread copies) and in no-copy mode (the DMA engine
copies, ``engine=m.dma``); each leg of each mode is a record of kind ``files``. File folios go through their
mapping's migrate callback (``filemap_migrate_folio`` on the generic filesystem), shared memory and the
anonymous copies of a private mapping through ``migrate_folio``:

- ``clean``: a file written on disk, read into the page cache through a shared mapping, never written again;
- ``dirty``: before each host -> device leg the whole range is written through a shared mapping, so the
  migration meets folios that are dirty or that the flusher is writing back (SYNC waits for the writeback,
  as the kernel's SYNC mode does); the record says how many it met;
- ``shmem``: shared anonymous memory (``nr_shmem`` moves with it);
- ``private-cow``: a private mapping of a file, written through, so that its pages are anonymous copies over
  a page cache that stays on the host.

Timing and ratios follow :mod:`dmamig.bench.migration`: each leg's first repetition is a warm-up, figures are
medians, and the ratio divides by the same run's copy ceiling of the leg's direction. Every repetition is
verified (status codes, every page on the target node, per-page checksums against the source, the page-cache
counters of both nodes); at the end the file is synced and its bytes on disk are read with plain ``os`` reads:
they must equal the bytes written through the shared mapping, or, for the private mapping, the file's original
bytes while the mapping still reads what was written through it. No frame may leak.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.table import Table

from ..migrate.options import FAITHFUL
from ..sweep.tasks import ProgressFn, Task
from .migration import Scenario, check_options, repetition, result_phases, scenario_record
from .naming import DIRECTIONS, format_number, format_size
from .settings import PAGE_SIZE, BenchSettings
from .timing import median, timed_call
from .verify import (
    bench_machine,
    check,
    random_bytes,
    range_pfns,
    verify_no_leak,
    verify_pages,
    verify_result,
)

__all__ = [
    "FILE_CASES",
    "FileScenario",
    "add_file_speedups",
    "file_scenarios",
    "file_table",
    "file_tasks",
    "run_file_case",
]

#: The cases in sweep order, each with what it maps in words.
FILE_CASES = {
    "clean": "clean page cache (shared file mapping)",
    "dirty": "dirty page cache (written through a shared mapping)",
    "shmem": "shared anonymous memory (shmem)",
    "private-cow": "private file mapping after COW (anonymous copies)",
}
_PATH = ("h2d", "d2h")
_TARGET = {"h2d": 1, "d2h": 0}
_MODES = ("copy", "nocopy")


@dataclass(frozen=True)
class FileScenario:
    """One case in one mode: what :func:`run_file_case` runs for a ``"files"`` task.

    Attributes
    ----------
    case : str
        A key of :data:`FILE_CASES`.
    mode : str
        ``"copy"`` or ``"nocopy"``.
    channels : int or None
        DMA channels of no-copy (None for copy).
    total_bytes : int
        The working set (whole 4 KiB pages).
    """

    case: str
    mode: str
    channels: int | None
    total_bytes: int

    @property
    def id(self) -> str:
        """The task's id, e.g. ``files/dirty/nocopy/ch2``; its records insert the direction."""
        return f"files/{self.case}/{self.mode}" + (f"/ch{self.channels}" if self.channels else "")

    def record_id(self, direction: str) -> str:
        """The id of one leg's record, e.g. ``files/dirty/h2d/nocopy/ch2``."""
        return f"files/{self.case}/{direction}/{self.mode}" + (f"/ch{self.channels}" if self.channels else "")

    def leg(self, direction: str) -> Scenario:
        """The leg as a migration :class:`~dmamig.bench.migration.Scenario` (its timing record's fields)."""
        return Scenario("migrate", PAGE_SIZE, self.total_bytes, self.mode, direction, self.channels,
                        options=FAITHFUL)

    @property
    def label(self) -> str:
        """A short progress label."""
        how = "copy" if self.mode == "copy" else f"no-copy, {self.channels} DMA ch."
        return f"files: {self.case}, {how}"

    @property
    def pages(self) -> int:
        """Base pages of the working set."""
        return self.total_bytes // PAGE_SIZE


def file_scenarios(settings: BenchSettings) -> list[FileScenario]:
    """Every case in copy and in no-copy mode (the sweep's largest channel count); none without
    ``settings.files``."""
    if not settings.files:
        return []
    ch = max(settings.channels)
    return [FileScenario(case, mode, ch if mode == "nocopy" else None, settings.files_bytes)
            for case in FILE_CASES for mode in _MODES]


def file_tasks(settings: BenchSettings) -> list[Task]:
    """One task per :func:`file_scenarios` entry; their ratios use the sweep's host->device and device->host
    ceilings."""
    reps = settings.warmup + settings.repeat
    return [Task(sc.id, sc.label, "files", len(_PATH) * reps, _PATH, sc, 5000 + i)
            for i, sc in enumerate(file_scenarios(settings))]


# -- the cases -------------------------------------------------------------------------------------------------

@dataclass
class Mapped:
    """A case's working set: where it is mapped, its file (None for shmem), and the bytes each side must hold.

    ``expect`` is what the mapping reads; ``disk`` what the file must hold on disk after ``fsync`` (None: no
    file). ``before_leg`` runs, untimed, before each leg's migration (the dirty case writes there).
    """

    addr: int
    file: Any
    expect: np.ndarray
    disk: np.ndarray | None
    before_leg: Callable[[str, int], None] | None = None


def _file_on_disk(m: Any, data: np.ndarray) -> Any:
    """A new file whose bytes were written on disk (not through the page cache), opened through it."""
    f = m.open(size=data.size)
    fd = os.open(f.path, os.O_WRONLY)
    try:
        os.pwrite(fd, data.tobytes(), 0)
    finally:
        os.close(fd)
    return f


def _map_clean(m: Any, mm: Any, nbytes: int, seed: int) -> Mapped:
    data = random_bytes(nbytes, seed)
    f = _file_on_disk(m, data)
    addr = mm.mmap(nbytes, file=f, shared=True)
    got = mm.read(addr, nbytes)  # read faults fill the page cache from disk: clean, uptodate folios
    check(np.array_equal(got, data), "files/clean: read into the page cache", "the bytes read differ from the file's")
    return Mapped(addr, f, data, data)


def _map_dirty(m: Any, mm: Any, nbytes: int, seed: int) -> Mapped:
    original = random_bytes(nbytes, seed)
    f = _file_on_disk(m, original)
    addr = mm.mmap(nbytes, file=f, shared=True)
    mapped = Mapped(addr, f, original, original)

    def write(direction: str, rep: int) -> None:
        if direction != "h2d":
            return  # a write to device-resident pages would fault them back: the leg migrates what is left dirty
        data = random_bytes(nbytes, seed + 2 + rep)  # new bytes each time: a stale page cannot pass
        mm.write(addr, data)
        mapped.expect = mapped.disk = data

    mapped.before_leg = write
    return mapped


def _map_shmem(m: Any, mm: Any, nbytes: int, seed: int) -> Mapped:
    data = random_bytes(nbytes, seed)
    addr = mm.mmap(nbytes, shared=True)
    mm.write(addr, data)
    return Mapped(addr, None, data, None)


def _map_private_cow(m: Any, mm: Any, nbytes: int, seed: int) -> Mapped:
    original = random_bytes(nbytes, seed)
    f = _file_on_disk(m, original)
    addr = mm.mmap(nbytes, file=f, shared=False)
    data = random_bytes(nbytes, seed + 1)
    mm.write(addr, data)  # every page copied on write: anonymous pages over the page cache
    return Mapped(addr, f, data, original)


_MAP = {"clean": _map_clean, "dirty": _map_dirty, "shmem": _map_shmem, "private-cow": _map_private_cow}


def _check_counters(m: Any, sc: FileScenario, target: int, what: str) -> None:
    """The page-cache counters after a leg: the folios' counts moved with them (or, private, stayed)."""
    pages, source = sc.pages, 1 - target
    st, src = m.node_page_state(target), m.node_page_state(source)
    if sc.case in ("clean", "dirty"):
        check(st["nr_file_pages"] == pages and src["nr_file_pages"] == 0, what,
              f"nr_file_pages {st['nr_file_pages']} on node {target} and {src['nr_file_pages']} on node {source}; "
              f"the page cache's {pages} pages must have moved with their folios")
    elif sc.case == "shmem":
        check(st["nr_shmem"] == pages and src["nr_shmem"] == 0, what,
              f"nr_shmem {st['nr_shmem']} on node {target} and {src['nr_shmem']} on node {source}, expected "
              f"{pages} and 0")
    else:
        host = m.node_page_state(0)
        check(host["nr_file_pages"] == pages and host["nr_file_dirty"] == 0, what,
              f"the page cache under the private mapping holds {host['nr_file_pages']} pages on the host "
              f"({host['nr_file_dirty']} dirty); it must stay there, clean, with its {pages} pages")
    bad = m.page_cache.check_counters()
    check(not bad, what, f"page-cache counters disagree with the page state: {bad[:2]}")


def _read_disk(path: str, nbytes: int) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        return np.frombuffer(os.pread(fd, nbytes, 0), dtype=np.uint8)
    finally:
        os.close(fd)


def _check_bytes(mm: Any, sc: FileScenario, mapped: Mapped) -> None:
    """At the end: the mapping reads what was written; the file on disk, after fsync, holds what it must."""
    what = f"{sc.id}: read-back"
    got = mm.read(mapped.addr, sc.total_bytes)
    bad = np.flatnonzero(got != mapped.expect)
    check(bad.size == 0, what, f"{bad.size} bytes of the mapping differ from the bytes written (first at offset "
                               f"{bad[:1].tolist()})")
    if mapped.file is None:
        return
    err = mapped.file.fsync()
    check(err == 0, f"{sc.id}: fsync", f"fsync returned {err}")
    disk = _read_disk(mapped.file.path, sc.total_bytes)
    bad = np.flatnonzero(disk != mapped.disk)
    whose = "the file's original bytes" if sc.case == "private-cow" else "the bytes written through the mapping"
    check(disk.size == sc.total_bytes and bad.size == 0, f"{sc.id}: the file on disk",
          f"{bad.size} bytes on disk differ from {whose} (first at offset {bad[:1].tolist()})")
    if sc.case == "private-cow":
        cached = mapped.file.pread(0, sc.total_bytes)
        check(np.array_equal(cached, mapped.disk), f"{sc.id}: the page cache",
              "the page cache under the private mapping changed; a private mapping never writes the file")


def _source_state(m: Any, source: int) -> tuple[int, int]:
    st = m.node_page_state(source)
    return int(st["nr_file_dirty"]), int(st["nr_writeback"])


def run_file_case(sc: FileScenario, settings: BenchSettings, ceilings: dict[str, dict], progress: ProgressFn,
                  seed: int) -> list[dict[str, Any]]:
    """Map the case's working set and migrate it host -> device -> host ``warmup + repeat`` times; one record
    per leg.

    Raises
    ------
    VerificationError
        A page that did not migrate, lies on another node or holds other bytes; counters that did not follow
        the folios; a file whose bytes on disk are wrong after ``fsync``; a leaked frame.
    """
    from ..flags import MigrateMode

    pages, nbytes = sc.pages, sc.total_bytes
    # The private mapping's copies sit beside the page cache on the host: room for both.
    room = 2 * pages if sc.case == "private-cow" else pages
    samples = {d: {"wall": [], "cpu": [], "phase": [], "dirty": [], "writeback": [], "res": None} for d in _PATH}
    with bench_machine(settings, room, sc.channels or 1, devices=1, mode=sc.mode) as m:
        mm = m.address_space()
        mapped = None
        try:
            mapped = _MAP[sc.case](m, mm, nbytes, seed)
            engine = m.dma if sc.mode == "nocopy" else None
            for rep in range(settings.warmup + settings.repeat):
                for direction in _PATH:
                    leg = sc.leg(direction)
                    what = f"{sc.case}: {repetition(leg, rep)}"
                    target = _TARGET[direction]
                    if mapped.before_leg is not None:
                        mapped.before_leg(direction, rep)
                    src = range_pfns(mm, mapped.addr, pages)
                    verify_pages(m, src, 1 - target, None, f"{what}, before")
                    ref = np.asarray(m.dma.checksum(src))
                    dirty, writeback = _source_state(m, 1 - target)
                    res, wall, cpu = timed_call(mm.migrate, mapped.addr, nbytes, target, mode=MigrateMode.SYNC,
                                                engine=engine, options=FAITHFUL)
                    verify_result(res, pages, what)
                    check_options(res, leg, what)
                    verify_pages(m, range_pfns(mm, mapped.addr, pages), target, ref, what)
                    _check_counters(m, sc, target, what)
                    if rep >= settings.warmup:
                        s = samples[direction]
                        s["wall"].append(wall)
                        s["cpu"].append(cpu)
                        s["phase"].append(result_phases(res))
                        s["dirty"].append(dirty)
                        s["writeback"].append(writeback)
                        s["res"] = res
                    progress(sc.label, 1)
            _check_bytes(mm, sc, mapped)
        finally:
            mm.close()
            if mapped is not None and mapped.file is not None:
                mapped.file.close()
        verify_no_leak(m, sc.id)
    return [file_record(sc, d, samples[d], ceilings.get(d)) for d in _PATH]


def file_record(sc: FileScenario, direction: str, s: dict[str, Any], ceiling: dict[str, Any] | None
                ) -> dict[str, Any]:
    """The record of one leg: a migration record (:func:`~dmamig.bench.migration.scenario_record`) of kind
    ``files`` with the case, and the dirty and writeback folios the migration met on its source node."""
    rec = scenario_record(sc.leg(direction), s["wall"], s["cpu"], s["phase"], ceiling, {
        "nr_succeeded": int(s["res"].nr_succeeded),
        "nr_failed": int(s["res"].nr_failed),
        "nr_thp_split": 0,
    })
    how = "copy" if sc.mode == "copy" else f"no-copy, {sc.channels} DMA channel" + ("" if sc.channels == 1 else "s")
    rec.update({
        "id": sc.record_id(direction),
        "name": f"{FILE_CASES[sc.case]}, {DIRECTIONS[direction]}, 4K pages, {how}",
        "kind": "files",
        "file_case": sc.case,
        "source_dirty_pages": median(s["dirty"]),
        "source_writeback_pages": median(s["writeback"]),
    })
    return rec


def add_file_speedups(records: list[dict[str, Any]], copy_baseline: str = "cpu") -> None:
    """Fill ``speedup_vs_copy`` (and ``speedup_vs``, ``speedup_vs_faithful_copy``) of every no-copy file
    record: its GB/s over the copy record of the same case and direction (both the kernel's batching); every
    file record gets ``copy_baseline``."""
    copies = {(r["file_case"], r["direction"]): r for r in records if r["kind"] == "files" and r["mode"] == "copy"}
    for r in records:
        if r["kind"] != "files":
            continue
        r["copy_baseline"] = copy_baseline
        base = copies.get((r["file_case"], r["direction"]))
        if r["mode"] == "nocopy" and base is not None and base["gbps"] > 0:
            r["speedup_vs_copy"] = r["speedup_vs_faithful_copy"] = r["gbps"] / base["gbps"]
            r["speedup_vs"] = base["id"]


def file_table(records: list[dict[str, Any]]) -> Table | None:
    """The report's table of the file records (None without any)."""
    recs = [r for r in records if r["kind"] == "files"]
    if not recs:
        return None
    size = ", ".join(sorted({format_size(r["bytes"]) for r in recs}))
    t = Table(title=f"File-backed and shared memory, faithful, SYNC ({size} of 4K pages; ceiling: the same run's "
                    f"plain copy)", title_justify="left")
    for col in ("mapping", "direction", "mode", "DMA channels", "GB/s", "CPU ns/page", "x ceiling",
                "no-copy ÷ copy", "dirty / writeback met", "ok"):
        t.add_column(col, justify="left" if col in ("mapping", "direction", "mode") else "right",
                     no_wrap=col != "mapping")
    for r in recs:
        # Two counts, not a sum: a page redirtied while it is written back is both.
        met = f"{r.get('source_dirty_pages', 0):.0f} / {r.get('source_writeback_pages', 0):.0f}"
        t.add_row(FILE_CASES.get(r.get("file_case", ""), r["id"]), DIRECTIONS.get(r["direction"], r["direction"]),
                  "no-copy" if r["mode"] == "nocopy" else "copy", format_number(r["channels"], "{}"),
                  format_number(r["gbps"]), format_number(r["cpu_ns_per_page"], "{:.0f}"),
                  format_number(r["ceiling_ratio"]), format_number(r.get("speedup_vs_copy")),
                  f"{met} of {r['pages']}" if r.get("file_case") == "dirty" else "-",
                  "yes" if r["verified"] else "[red]NO[/red]")
    return t
