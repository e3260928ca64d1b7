"""The failure rules of mm/migrate.c that the core mirrors, each test named after the kernel code it follows."""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest
from support import WAIT, delta, filled

import dmamig.migrate.batch_loops as batch_loops
import dmamig.migrate.core as core
from dmamig import InvalidArgument, MigrateMode, MigrateOptions, PageFlag
from dmamig.check import check_machine

EAGAIN, ENOMEM = -errno.EAGAIN, -errno.ENOMEM
HOST = DEV = 4096
NR = 512


# -- batching -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_faithful_default_runs_one_batch_at_a_time(m, mm, monkeypatch, fused):
    """migrate_pages(): batch N is unmapped, copied and moved before batch N+1 is unmapped (also where one
    compiled call moves batch N and unmaps batch N+1: fused no-copy batches)."""
    ps = m.page_size
    n = 3 * NR
    addr, data = filled(m, mm, n)
    events = []
    real_unmap, real_move = core._Migration._unmap_pass, core._Migration._move_pass
    real_fused = batch_loops.fused_batch
    if fused and real_fused is None:
        pytest.skip(f"fused batches cannot run here: {batch_loops.FUSED_ERROR}")

    def unmap(self, todo, mode):
        events.append(("unmap", todo.size))
        return real_unmap(self, todo, mode)

    def move(self, moving):
        events.append(("move", moving.size))
        return real_move(self, moving)

    def fused_batch(table, rings, prev_lo, prev_hi, nxt_lo, nxt_hi, seq):  # moves prev, then unmaps nxt
        moved, unmapped = prev_hi - prev_lo, nxt_hi - nxt_lo
        events.extend([("move", moved)] * bool(moved) + [("unmap", unmapped)] * bool(unmapped))
        return real_fused(table, rings, prev_lo, prev_hi, nxt_lo, nxt_hi, seq)

    monkeypatch.setattr(core._Migration, "_unmap_pass", unmap)
    monkeypatch.setattr(core._Migration, "_move_pass", move)
    monkeypatch.setattr(batch_loops, "fused_batch", fused_batch if fused else None)
    res = mm.migrate(addr, n * ps, 1, engine=m.dma)
    assert res.ok and res.options.faithful
    assert events == [("unmap", NR), ("move", NR)] * 3
    assert res.stats.nr_tlb_flush == 3
    assert np.array_equal(mm.read(addr, n * ps), data)


@pytest.mark.parametrize("options", [MigrateOptions(batches_per_step=4), MigrateOptions(pipeline_depth=1),
                                     MigrateOptions(batch_pages=2048, batches_per_step=2, pipeline_depth=2),
                                     MigrateOptions(batch_pages=64)])
@pytest.mark.parametrize("engine", [False, True])
def test_experiment_settings_move_the_same_data(m, mm, options, engine):
    """Experiment settings change how batches are grouped and overlapped, never what ends where."""
    ps = m.page_size
    n = 3 * NR + 17
    addr, data = filled(m, mm, n, seed=3)
    res = mm.migrate(addr, n * ps, 1, engine=m.dma if engine else None, options=options)
    assert res.ok and res.options == options and not options.faithful
    batches = -(-n // options.batch_pages)
    assert res.stats.nr_tlb_flush == batches  # still one flush per batch, however many run together
    assert np.array_equal(mm.read(addr, n * ps), data)


def test_pipelined_steps_overlap_unmap_with_the_previous_copy(m, mm, monkeypatch):
    """pipeline_depth=1: the next step is unmapped before the previous step moves."""
    ps = m.page_size
    addr, _ = filled(m, mm, 3 * NR)
    events = []
    real_unmap, real_move = core._Migration._unmap_pass, core._Migration._move_pass
    monkeypatch.setattr(core._Migration, "_unmap_pass",
                        lambda self, t, mode: (events.append("unmap"), real_unmap(self, t, mode))[1])
    monkeypatch.setattr(core._Migration, "_move_pass", lambda self, mv: (events.append("move"), real_move(self, mv))[1])
    res = mm.migrate(addr, 3 * NR * ps, 1, engine=m.dma, options=MigrateOptions(pipeline_depth=1))
    assert res.ok
    assert events == ["unmap", "unmap", "move", "unmap", "move", "move"]


def test_options_are_validated():
    with pytest.raises(InvalidArgument, match="batch_pages"):
        MigrateOptions(batch_pages=0)
    with pytest.raises(InvalidArgument, match="pipeline_depth"):
        MigrateOptions(pipeline_depth=-1)
    with pytest.raises(InvalidArgument, match="batches_per_step"):
        MigrateOptions(batches_per_step=1.5)


def test_bad_options_argument_is_refused(m, mm):
    addr, _ = filled(m, mm, 1)
    with pytest.raises(InvalidArgument, match="options must be a MigrateOptions"):
        mm.migrate(addr, m.page_size, 1, options={"batch_pages": 4})


def test_options_label_names_the_experiment():
    assert MigrateOptions().label == "faithful"
    assert MigrateOptions(batches_per_step=16, pipeline_depth=1).label == "16 batches/step, pipeline 1"
    assert MigrateOptions(batch_pages=2048).as_dict() == {"batch_pages": 2048, "batches_per_step": 1,
                                                          "pipeline_depth": 0, "faithful": False}


# -- -ENOMEM ----------------------------------------------------------------------------------------------------
def test_enomem_ends_the_call_across_batches(m, mm):
    """migrate_pages(): rc < 0 from one batch ends the call; later batches are never tried."""
    ps = m.page_size
    n = 2 * NR
    addr, data = filled(m, mm, n)
    held = m.alloc_pages(1, DEV - 100)
    before = m.vmstat
    res = mm.migrate(addr, n * ps, 1, mode=MigrateMode.SYNC)
    assert res.rc == ENOMEM
    assert (res.status[:100] == 0).all() and (res.status[100:] == ENOMEM).all()
    assert res.nr_succeeded == 100 and res.nr_failed == 1 and res.stats.nr_untried_pages == n - 101
    assert res.stats.nr_tlb_flush == 1  # the second batch was never unmapped
    assert delta(m, before) == {"pgmigrate_success": 100, "pgmigrate_fail": 1, "migrate_tlb_flush": 1}
    assert np.array_equal(mm.read(addr, n * ps), data)
    m.put_pages(held)


def test_thp_counters_count_pmd_sized_folios_only(m, mm):
    """count_vm_events(THP_MIGRATION_*): an order-4 folio is large but not a THP."""
    ps = m.page_size
    addr, data = filled(m, mm, 64, order=4)
    before = m.vmstat
    res = mm.migrate(addr, 64 * ps, 1)
    assert res.ok and res.nr_succeeded == 64
    assert res.nr_thp_succeeded == 0 and res.stats.nr_large_succeeded == 4
    assert delta(m, before) == {"pgmigrate_success": 64, "migrate_tlb_flush": 1}
    big, _ = filled(m, mm, NR, order=9)
    res = mm.migrate(big, NR * ps, 1)
    assert res.nr_thp_succeeded == 1 and res.stats.nr_large_succeeded == 1
    assert np.array_equal(mm.read(addr, 64 * ps), data)


def test_split_thp_whose_pieces_all_migrated_returns_zero(m, mm):
    """migrate_pages(): a split counts as one failed THP in the statistics, but the return value is 0 when
    every split piece migrated and nothing is left on the list ('Return 0 in case all split folios of
    fail-to-migrate large folios are migrated successfully', 03e5f82ea632; the function's header comment
    still says otherwise)."""
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    # Free frames, but no free pageblock: the THP cannot get a 2 MiB destination.
    held = m.alloc_pages(1, DEV)
    m.put_pages(held[::2])
    res = mm.migrate(addr, NR * ps, 1)
    assert res.ok and res.nr_thp_split == 1 and res.nr_thp_failed == 1 and res.rc == 0
    assert res.nr_succeeded == NR and res.nr_failed == 0
    assert np.array_equal(mm.read(addr, NR * ps), data)
    m.put_pages(held[1::2])


# -- the move loop ----------------------------------------------------------------------------------------------
def test_busy_folio_stays_unmapped_between_move_passes(m, mm):
    """migrate_pages_batch(): -EAGAIN from migrate_folio_move keeps the folio on unmap_folios; only the final
    undo restores its mapping."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    pfn = mm.pfn_of(addr + ps)
    m.page_controls.get_page(pfn)
    res = mm.migrate(addr, 4 * ps, 1, mode=MigrateMode.ASYNC)
    assert res.status.tolist() == [0, EAGAIN, 0, 0]
    assert res.stats.nr_unmap_passes == 1 and res.stats.nr_move_passes == core.NR_MAX_MIGRATE_PAGES_RETRY
    assert res.rc == 1
    st = m.page_controls.page_state(pfn)
    assert PageFlag.LOCKED not in st["flags"] and PageFlag.LRU in st["flags"] and st["mapcount"] == 1
    m.page_controls.put_page(pfn)
    assert np.array_equal(mm.read(addr, 4 * ps), data)


# -- DMA fallback -----------------------------------------------------------------------------------------------
def test_dma_fallback_is_counted_per_submission(m, mm):
    """The batch-offload RFC: the folios a failed DMA copy hit are copied by the CPU; nothing else is."""
    ps = m.page_size
    addr, data = filled(m, mm, 2 * NR)
    m.dma.inject_errors(1)
    res = mm.migrate(addr, 2 * NR * ps, 1, engine=m.dma)
    # The refused share is one channel's half of the first batch; the other half and the second batch
    # were copied by the engine.
    assert res.ok and res.stats.nr_dma_fallback == NR // 2 and res.stats.nr_no_copy == 2 * NR
    assert np.array_equal(mm.read(addr, 2 * NR * ps), data)


# -- stale NO_COPY destinations ---------------------------------------------------------------------------------
@pytest.mark.parametrize("copier", ["dma", "cpu"])
def test_write_after_the_callers_copy_is_not_lost(m, mm, copier):
    """A NO_COPY destination copied before a write to its source is stale: the core copies it again."""
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    src = np.array([mm.pfn_of(addr + i * ps) for i in range(8)])
    dst = m.alloc_pages(1, 8)
    if copier == "dma":
        m.dma.copy(src, dst).wait()
    else:
        m.frames.copy_pages(src, dst)
    mm.write(addr + 3 * ps, b"written after the copy")
    res = m.migrate_pages(src, 1, mode=MigrateMode.SYNC | MigrateMode.NO_COPY, dst_pfns=dst)
    assert res.ok and res.stats.nr_no_copy == 7  # the written page was copied again by the CPU
    data[3 * ps: 3 * ps + 22] = np.frombuffer(b"written after the copy", np.uint8)
    assert np.array_equal(mm.read(addr, 8 * ps), data)


@pytest.mark.parametrize("path", ["compiled", "python"])
@pytest.mark.parametrize("copier", ["dma", "caller"])
@pytest.mark.parametrize("when", ["before the first move pass", "between move passes"])
def test_a_write_through_a_pin_is_not_lost_on_the_move_retry(m, mm, monkeypatch, path, copier, when):
    """migrate_folio_move(): a copy is good for the pass that made it. The holder of an extra reference writes
    the unmapped source through it and drops it; the next freeze succeeds. The kernel copies again there
    (folio_mc_copy inside migrate_folio since 6.11; the batch-offload RFC consumes its "copied" mark on first
    use): moving state over the copy taken before the write would lose it."""
    monkeypatch.setattr(batch_loops, "USE_BATCH_LOOPS", path == "compiled")
    ps = m.page_size
    n = 8
    addr, data = filled(m, mm, n)
    mm.pin(addr + 2 * ps, ps)
    written = b"written through the pin"
    real_move = core._Migration._move_pass
    passes = []

    def holder_writes_and_unpins():
        mm.write_pinned(addr + 2 * ps + 100, written)  # never waits for the migration entry
        mm.unpin(addr + 2 * ps, ps)  # nor does the unpin

    def move(self, moving):
        if not passes and when == "before the first move pass":
            holder_writes_and_unpins()
        out = real_move(self, moving)
        passes.append(out.size)
        if len(passes) == 1 and when == "between move passes":
            assert out.size == 1  # the pinned folio is busy: it stays unmapped for the next pass
            holder_writes_and_unpins()
        return out

    monkeypatch.setattr(core._Migration, "_move_pass", move)
    if copier == "dma":
        res = mm.migrate(addr, n * ps, 1, mode=MigrateMode.SYNC, engine=m.dma)
    else:
        src = mm.pfns_of(addr, n * ps)
        dst = m.alloc_pages(1, n)
        m.frames.copy_pages(src, dst)
        res = m.migrate_pages(src, 1, mode=MigrateMode.SYNC | MigrateMode.NO_COPY, dst_pfns=dst)
    assert res.ok and (mm.nodes_of(addr, n * ps) == 1).all()
    assert res.stats.nr_no_copy == n - 1  # the written page was copied again by the CPU
    assert len(passes) == 2 and passes[-1] == 0
    data[2 * ps + 100: 2 * ps + 100 + len(written)] = np.frombuffer(written, np.uint8)
    assert np.array_equal(mm.read(addr, n * ps), data)
    assert PageFlag.DIRTY in m.page_controls.page_flags(mm.pfn_of(addr + 2 * ps))


def test_a_copy_no_write_overtook_survives_a_move_retry(m, mm, monkeypatch):
    """The fresh mark is dropped only by a write: a folio busy for a pass without one still moves uncopied."""
    ps = m.page_size
    addr, data = filled(m, mm, 4)
    mm.pin(addr, ps)
    real_move = core._Migration._move_pass
    passes = []

    def move(self, moving):
        out = real_move(self, moving)
        passes.append(out.size)
        if len(passes) == 1:
            mm.unpin(addr, ps)
        return out

    monkeypatch.setattr(core._Migration, "_move_pass", move)
    res = mm.migrate(addr, 4 * ps, 1, mode=MigrateMode.SYNC, engine=m.dma)
    assert res.ok and res.stats.nr_no_copy == 4 and passes == [1, 0]
    assert np.array_equal(mm.read(addr, 4 * ps), data)


def test_write_racing_a_no_copy_migration_is_never_lost(m, mm):
    """Writers hammer the sources while NO_COPY migrations run on copies taken earlier: no write is lost."""
    ps = m.page_size
    n = 64
    addr, _ = filled(m, mm, n)
    stop = threading.Event()
    last = {}

    def writer():
        k = 0
        while not stop.is_set():
            page = k % n
            mm.write(addr + page * ps, k.to_bytes(8, "little"))
            last[page] = k
            k += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for rnd in range(20):
            node = 1 + rnd % 2
            # Destinations first: a source read before them may be freed by a write that brings its device page
            # back, and then be handed out as a destination (a page both read and written: not a copy).
            dst = m.alloc_pages(node, n)
            src = np.array([mm.pfn_of(addr + i * ps) for i in range(n)])
            m.dma.copy(src, dst).wait()
            res = m.migrate_pages(src, node, mode=MigrateMode.SYNC | MigrateMode.NO_COPY, dst_pfns=dst)
            # A write to a device page brings it back to the host first, so a listed pfn may be gone (-ENOENT)
            # or taken by that migration (-EBUSY) by the time this call isolates it.
            assert set(res.status.tolist()) <= {0, EAGAIN, -errno.EBUSY, -errno.ENOENT}
    finally:
        stop.set()
        t.join(WAIT)
    assert not t.is_alive()
    got = mm.read(addr, n * ps).reshape(n, ps)
    for page, k in last.items():
        assert int.from_bytes(got[page, :8].tobytes(), "little") == k


# -- SWAPCACHE and writeback ------------------------------------------------------------------------------------
def test_swapcache_moves_to_the_new_folio(m, mm):
    """folio_migrate_mapping(): a swap-cache folio's new folio is in the swap cache."""
    addr, _ = filled(m, mm, 1)
    m.page_controls.set_page_flags(mm.pfn_of(addr), PageFlag.SWAPCACHE)
    assert mm.migrate(addr, m.page_size, 1).ok
    assert PageFlag.SWAPCACHE in m.page_controls.page_flags(mm.pfn_of(addr))


def test_add_to_swap_cache_takes_a_reference_per_base_page(m, mm):
    """add_to_swap_cache / delete_from_swap_cache: the swap cache holds one reference per base page of the
    folio; shared memory (in its page cache) cannot enter it."""
    ps = m.page_size
    addr, _ = filled(m, mm, 1)
    thp, _ = filled(m, mm, NR, order=9)
    for a, nr in ((addr, 1), (thp, NR)):
        pfn = mm.pfn_of(a)
        before = m.page_controls.page_state(pfn)["refcount"]
        m.page_controls.set_page_flags(pfn, PageFlag.SWAPCACHE)
        m.page_controls.set_page_flags(pfn, PageFlag.SWAPCACHE)  # already there: nothing more
        assert m.page_controls.page_state(pfn)["refcount"] == before + nr and not check_machine(m)
        m.page_controls.clear_page_flags(pfn, PageFlag.SWAPCACHE)
        assert m.page_controls.page_state(pfn)["refcount"] == before and not check_machine(m)
    shm = mm.mmap(ps, shared=True)
    mm.write(shm, b"s")
    with pytest.raises(InvalidArgument, match="swap cache"):
        m.page_controls.set_page_flags(mm.pfn_of(shm), PageFlag.SWAPCACHE)


@pytest.mark.parametrize("order", [0, 9], ids=["base", "thp"])
def test_folio_expected_refs_counts_the_swap_cache(m, mm, order):
    """folio_expected_refs: a folio in the swap cache has a mapping, so its expected count is the isolation
    reference plus one per base page; it migrates, and the new folio holds the swap cache's references. One
    more reference (a transient pin) is -EAGAIN as for any folio."""
    ps = m.page_size
    n = NR if order else 1
    addr, data = filled(m, mm, n, order=order)
    m.page_controls.set_page_flags(mm.pfn_of(addr), PageFlag.SWAPCACHE)
    assert mm.migrate(addr, n * ps, 1).ok
    st = m.page_controls.page_state(mm.pfn_of(addr))
    assert PageFlag.SWAPCACHE in st["flags"] and st["refcount"] == n + n  # PTEs + the swap cache
    assert not check_machine(m)
    m.page_controls.get_page(mm.pfn_of(addr))
    res = mm.migrate(addr, n * ps, 2, mode=MigrateMode.ASYNC)
    assert (res.status == EAGAIN).all()
    m.page_controls.put_page(mm.pfn_of(addr))
    assert mm.migrate(addr, n * ps, 2).ok and not check_machine(m)
    assert np.array_equal(mm.read(addr, n * ps), data)


def test_split_thp_in_the_swap_cache_gives_each_piece_its_reference(m, mm):
    """split_folio of a THP in the swap cache (migrate_pages_batch on -ENOMEM): each base page keeps one swap
    cache reference, and the pieces migrate with it."""
    ps = m.page_size
    addr, data = filled(m, mm, NR, order=9)
    m.page_controls.set_page_flags(mm.pfn_of(addr), PageFlag.SWAPCACHE)
    held = m.alloc_pages(1, DEV)
    m.put_pages(held[::2])  # free frames, but no free pageblock
    res = mm.migrate(addr, NR * ps, 1)
    assert res.ok and res.nr_thp_split == 1
    for i in (0, 1, NR - 1):
        st = m.page_controls.page_state(mm.pfn_of(addr + i * ps))
        assert st["order"] == 0 and PageFlag.SWAPCACHE in st["flags"] and st["refcount"] == 2
    m.put_pages(held[1::2])
    assert not check_machine(m)
    assert np.array_equal(mm.read(addr, NR * ps), data)


def test_free_swap_cache_when_the_last_mapping_goes(m, mm):
    """zap_pte_range -> free_pages_and_swap_cache: a folio in the swap cache that nothing maps any more leaves
    it, so munmap and close give every frame back; while another process maps it, it stays."""
    ps = m.page_size
    addr, _ = filled(m, mm, 2)
    pfn = mm.pfn_of(addr)
    m.page_controls.set_page_flags(pfn, PageFlag.SWAPCACHE)
    assert m.page_controls.page_state(pfn)["refcount"] == 2
    child = mm.fork()
    mm.munmap(addr, 2 * ps)
    assert PageFlag.SWAPCACHE in m.page_controls.page_flags(pfn) and m.page_controls.page_state(pfn)["refcount"] == 2
    child.close()
    mm.close()
    assert not check_machine(m)
    assert [n.free_pages for n in m.nodes] == [HOST, DEV, DEV]


def test_wp_can_reuse_anon_folio_takes_a_swap_cache_page_out(m, mm):
    """wp_can_reuse_anon_folio: a write to a read-only page this process alone maps takes it out of the swap
    cache (folio_free_swap) and reuses it, without a copy."""
    addr, _ = filled(m, mm, 1)
    child = mm.fork()  # both map it read-only
    pfn = mm.pfn_of(addr)
    m.page_controls.set_page_flags(pfn, PageFlag.SWAPCACHE)
    child.close()
    mm.write(addr, b"w")
    assert mm.pfn_of(addr) == pfn and PageFlag.SWAPCACHE not in m.page_controls.page_flags(pfn)
    assert m.page_controls.page_state(pfn)["refcount"] == 1 and not check_machine(m)


def test_writeback_cannot_start_on_a_folio_a_migration_holds(m, mm):
    """folio_start_writeback() needs the folio lock, which a migration holds from unmap to move."""
    addr, _ = filled(m, mm, 1)
    pfn = mm.pfn_of(addr)
    m.page_controls.lock_page(pfn)  # as a migration would hold it
    assert m.page_controls.start_writeback(pfn, blocking=False) is False
    assert PageFlag.WRITEBACK not in m.page_controls.page_flags(pfn)
    done = threading.Event()
    t = threading.Thread(target=lambda: (m.page_controls.start_writeback(pfn), done.set()), daemon=True)
    t.start()
    assert not done.wait(0.05)  # blocked on the lock
    m.page_controls.unlock_page(pfn)
    assert done.wait(WAIT)
    assert PageFlag.WRITEBACK in m.page_controls.page_flags(pfn)
    m.page_controls.end_writeback(pfn)


# -- interrupts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("phase", ["_unmap_pass", "_submit", "_wait", "_move_pass"])
@pytest.mark.parametrize("engine", [False, True])
def test_keyboard_interrupt_between_phases_restores_every_page(m, mm, monkeypatch, phase, engine):
    """An interrupt between phases: unmapped folios are restored, nothing stays locked or isolated, no frame
    leaks, and the machine migrates normally afterwards."""
    if phase in ("_submit", "_wait") and not engine:
        pytest.skip("copy migration has no DMA phases")
    ps = m.page_size
    n = 2 * NR + 40
    addr, data = filled(m, mm, n, seed=5)
    calls = []
    real = getattr(core._Migration, phase)

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 2:  # the second batch, after the first one moved
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(core._Migration, phase, interrupted)
    # The general path's phases (fused batches make them in one compiled call: see test_migrate_fused.py).
    monkeypatch.setattr(batch_loops, "fused_batch", None)
    with pytest.raises(KeyboardInterrupt):
        mm.migrate(addr, n * ps, 1, engine=m.dma if engine else None)
    monkeypatch.undo()
    nodes = mm.nodes_of(addr, n * ps)
    assert (nodes[:NR] == 1).all() and (nodes[NR:] == 0).all()
    for pfn in mm.pfns_of(addr, n * ps).tolist()[::97]:
        st = m.page_controls.page_state(pfn)
        assert not st["flags"] & (PageFlag.LOCKED | PageFlag.ISOLATED) and PageFlag.LRU in st["flags"]
        assert st["refcount"] == st["mapcount"] == 1
    assert np.array_equal(mm.read(addr, n * ps), data)
    assert mm.migrate(addr, n * ps, 2, engine=m.dma if engine else None).ok
    assert np.array_equal(mm.read(addr, n * ps), data)
    mm.close()
    assert [nd.free_pages for nd in m.nodes] == [HOST, DEV, DEV]


@pytest.mark.parametrize("fused", [False, True])
def test_sigint_inside_a_phase_is_held_until_the_phase_ends(m, mm, monkeypatch, fused):
    """A real SIGINT in the middle of installing migration entries is delivered at the next phase boundary (for
    fused batches, after the compiled call that moves one batch and unmaps the next)."""
    import signal

    ps = m.page_size
    addr, data = filled(m, mm, 2 * NR, seed=6)
    name = "fused_batch" if fused else "unmap_one_vma"
    real = getattr(batch_loops, name)
    if real is None:
        pytest.skip(f"fused batches cannot run here: {batch_loops.FUSED_ERROR}")
    seen = []

    def unmap(*args):  # the compiled unmap pass (or the fused call that makes it), in the middle of the phase
        if not seen:
            signal.raise_signal(signal.SIGINT)  # arrives while this phase is half done
        seen.append(args[5] - args[4] if fused else args[0].size)  # (fused: the batch it unmaps, a range)
        return real(*args)

    monkeypatch.setattr(batch_loops, name, unmap)
    if not fused:
        monkeypatch.setattr(batch_loops, "fused_batch", None)
    with pytest.raises(KeyboardInterrupt):
        mm.migrate(addr, 2 * NR * ps, 1)
    monkeypatch.undo()
    assert seen == [NR]  # the phase finished; the interrupt came before the move
    assert (mm.nodes_of(addr, 2 * NR * ps) == 0).all()
    assert np.array_equal(mm.read(addr, 2 * NR * ps), data)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_dma_copy_after_the_last_write_is_current(m, mm):
    """A source written before the caller's DMA copy, but after its destination was allocated: the copy is
    current, so the migration moves state only."""
    ps = m.page_size
    addr, data = filled(m, mm, 8)
    src = np.array([mm.pfn_of(addr + i * ps) for i in range(8)])
    dst = m.alloc_pages(1, 8)
    mm.write(addr, b"written after the allocation, before the copy")
    m.dma.copy(src, dst).wait()
    res = m.migrate_pages(src, 1, mode=MigrateMode.SYNC | MigrateMode.NO_COPY, dst_pfns=dst)
    assert res.ok and res.stats.nr_no_copy == 8
    data[:45] = np.frombuffer(b"written after the allocation, before the copy", np.uint8)
    assert np.array_equal(mm.read(addr, 8 * ps), data)


@pytest.mark.parametrize("point", ["dma_submit", "dma_copy", "dma_complete"])
def test_a_dma_fault_costs_at_most_the_folios_it_hit(m, mm, point):
    """A fault on one channel's share: the CPU copies that share's folios only, none fails, data intact."""
    ps = m.page_size
    addr, data = filled(m, mm, NR, seed=8)
    with m.faults.injecting(point, times=1, probability=1.0):
        res = mm.migrate(addr, NR * ps, 1, engine=m.dma)
    assert res.ok and res.nr_failed == 0
    assert 0 < res.stats.nr_dma_fallback <= NR // 2  # one share of two
    assert np.array_equal(mm.read(addr, NR * ps), data)
