"""Cost models: presets load and validate, the modelled clock charges what the core did (hand-computed cases),
modelled and measured never mix, and ``dmamig model`` prices the RFC's benchmark."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from dmamig import InvalidArgument, Machine, MigrateMode
from dmamig.cost_model import PRESETS, CostModel, CpuCopy, DmaCosts, KernelCosts, MtCopy, load_model, preset
from dmamig.cost_model.clock import CallCharge, ModelClock, MoveCharge, UnmapCharge, replay, scale_charges
from dmamig.migrate.options import MigrateOptions
from dmamig.migrate.result import PHASES

PS = 4096

# Round, distinct prices so that every hand-computed total names its terms.
KERNEL = KernelCosts(call_ns=100_000, isolate_ns=1, alloc_ns=2, alloc_page_ns=0.5, lock_ns=3, rmap_ns=5,
                     unmap_ns=7, entry_install_ns=11, entry_remove_ns=13, tlb_flush_ns=1000, ipi_ns=500, cpus=3,
                     freeze_ns=17, mapping_ns=19, state_ns=23, putback_ns=29, free_page_ns=0.25)
COPY = CpuCopy(bw_4k=4.096e9, bw_2m=4.096e9, call_ns=31, cached_bw=4.096e9)  # 1000 ns per 4 KiB page
DMA = DmaCosts(channels=2, channel_bw=4.096e9, cap_bw=0, call_ns=10_000, channel_call_ns=1_000, desc_ns=37,
               desc_hw_ns=41, completion="interrupt", irq_ns=5_000, poll_ns=2_000, split="even")
MT = MtCopy(threads=0, thread_bw=4.096e9, cap_bw=0, dispatch_ns=0, split="folio")
TINY = CostModel(name="tiny", kernel=KERNEL, copy=COPY, dma=DMA, mtcopy=MT)

#: What one base page mapped once costs the kernel from lock to putback, with no copy and no flush.
PAGE = 1 + 2 + 0.5 + 3 + 5 + 7 + 11 + 17 + 19 + 23 + 13 + 29 + 0.25
FLUSH = 1000 + 500 * 2


def _machine(**kw):
    kw.setdefault("cost_model", TINY)
    return Machine(host_pages=4096, device_pages=4096, devices=1, backend="cpu", channels=2, **kw)


def _migrate(m, pages, order=0, **kw):
    mm = m.address_space()
    addr = mm.mmap(pages * PS, order=order)
    data = np.random.default_rng(pages).integers(0, 256, pages * PS, dtype=np.uint8)
    mm.write(addr, data)
    res = mm.migrate(addr, pages * PS, 1, **kw)
    assert np.array_equal(mm.read(addr, pages * PS), data)
    return mm, addr, res


# -- presets -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_loads_validates_and_round_trips_through_its_file(name, tmp_path):
    model = preset(name)
    assert model.name == name and model.sources
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(model.as_dict()))
    again = load_model(str(path))
    assert again == model and again.parameters() == model.parameters()
    assert load_model(name) == model and load_model(model) is model


@pytest.mark.parametrize("change, words", [
    ({"kernel.lock_ns": -1.0}, "kernel.lock_ns must be >= 0"),
    ({"dma.channels": 0}, "dma.channels must be an integer >= 1"),
    ({"dma.channel_bw": 0.0}, "dma.channel_bw must be > 0"),
    ({"dma.split": "random"}, "dma.split must be one of even, balance"),
    ({"dma.completion": "hope"}, "dma.completion must be one of interrupt, poll"),
    ({"copy.residency": 1.5}, "copy.residency must be a fraction from 0 to 1"),
    ({"mtcopy.split": "even"}, "mtcopy.split must be one of folio, part"),
    ({"kernel.cpus": "two"}, "kernel.cpus takes a number"),
    ({"dma.nope": 1}, "unknown cost model parameter 'dma.nope'"),
])
def test_a_bad_parameter_is_an_error_naming_it_and_what_is_allowed(change, words):
    with pytest.raises(InvalidArgument, match=words.replace("(", r"\(").replace(")", r"\)")):
        preset("zen3-ptdma").with_set(**change)


def test_a_changed_model_is_named_after_its_changes_and_a_bad_file_is_an_error(tmp_path):
    m = preset("zen3-ptdma").with_set(**{"dma.channels": "8", "dma.desc_hw_ns": "250"})
    assert m.dma.channels == 8 and m.dma.desc_hw_ns == 250.0
    assert m.name == "zen3-ptdma[dma.channels=8,dma.desc_hw_ns=250]"
    bad = tmp_path / "bad.json"
    doc = preset("e5-ioat").as_dict()
    doc["dma"]["speed"] = 3
    bad.write_text(json.dumps(doc))
    with pytest.raises(InvalidArgument, match="unknown parameter dma.speed"):
        load_model(str(bad))
    with pytest.raises(InvalidArgument, match="neither a preset"):
        Machine(host_pages=64, device_pages=64, backend="cpu", cost_model="no-such-preset")


# -- the clock, on hand-computed cases ----------------------------------------------------------------------------
def test_one_batch_of_copy_migration_charges_each_operation_once_per_folio():
    m = _machine()
    try:
        _, _, res = _migrate(m, 4)
    finally:
        m.close()
    t = res.modelled
    copy = 4 * (31 + 1000)
    assert t.model == "tiny" and t.pages == 4
    assert t.ops_ns["tlb_flush"] == FLUSH and t.ops_ns["copy"] == pytest.approx(copy)
    assert t.wall_ns == pytest.approx(100_000 + 4 * PAGE + FLUSH + copy)
    assert t.cpu_ns == t.wall_ns and t.dma_busy_ns == 0


def test_a_retried_folio_pays_a_freeze_per_pass_and_its_undo():
    m = _machine()
    try:
        mm = m.address_space()
        addr = mm.mmap(2 * PS)
        mm.write(addr, b"x" * 2 * PS)
        mm.pin(addr + PS, PS, longterm=False)  # a transient reference: -EAGAIN on every move pass
        res = mm.migrate(addr, 2 * PS, 1, mode=MigrateMode.ASYNC)
    finally:
        m.close()
    assert res.nr_succeeded == 1 and res.nr_failed == 1
    t = res.modelled
    # Unmap: both pages; move: pass 1 freezes 2, passes 2-10 freeze the pinned one; one moves (and is copied),
    # the other is undone (its entry removed, its lock dropped, its one mapping restored).
    assert t.ops_ns["ref_freeze"] == 17 * (2 + 9)
    assert t.ops_ns["undo"] == 13 + 3 + 13
    expected = (100_000 + 2 * (1 + 2 + 0.5 + 3 + 5 + 7 + 11) + FLUSH + 17 * 11 + (31 + 1000)
                + (19 + 23 + 13 + 29 + 0.25) + (13 + 3 + 13))
    assert t.wall_ns == pytest.approx(expected)


def test_a_split_large_folio_pays_its_failed_attempt_then_its_pieces():
    m = _machine()
    try:
        # Node 1 keeps one frame taken in each 2 MiB block: no order-9 destination, plenty of base pages.
        got = m.alloc_pages(1, 4096)
        keep = got[(got - got.min()) % 512 == 0]
        m.put_pages(got[~np.isin(got, keep)])
        _, _, res = _migrate(m, 512, order=9)
    finally:
        m.close()
    assert res.nr_thp_split == 1 and res.nr_succeeded == 512
    t = res.modelled
    # The call isolates one folio; the THP's attempt allocates nothing but is tried (alloc and lock); then 512
    # base pages, one batch, one flush, each copied.
    attempt = 2 + 3
    pieces = 512 * (PAGE - 1) + FLUSH + 512 * (31 + 1000)
    assert t.wall_ns == pytest.approx(100_000 + 1 + attempt + pieces)


def test_a_failed_dma_copy_is_charged_as_the_cpu_copy_that_replaces_it():
    m = _machine()
    try:
        m.dma.inject_errors(1)
        _, _, res = _migrate(m, 4, engine=m.dma)
    finally:
        m.close()
    assert res.stats.nr_dma_fallback == 4 and res.ok
    t = res.modelled
    # Submission: call, 2 channels, 4 descriptors; each channel 2 descriptors of 4 KiB (2 * (41 + 1000)); the
    # waiter wakes 5 us after; then the migrating thread copies the 4 pages the failure hit.
    submit = 10_000 + 2 * 1_000 + 4 * 37
    assert t.ops_ns["dma_submit"] == submit
    assert t.ops_ns["dma_wait"] == pytest.approx(2 * (41 + 1000) + 5_000)
    assert t.ops_ns["copy"] == pytest.approx(4 * (31 + 1000))
    assert t.dma_busy_ns == pytest.approx(4 * (41 + 1000))
    assert t.wall_ns == pytest.approx(100_000 + 4 * PAGE + FLUSH + submit + 2 * 1041 + 5_000 + 4 * 1031)


def test_a_pipelined_step_overlaps_its_dma_with_the_next_unmap_on_the_modelled_clock():
    # Only two prices: 2000 ns to allocate a folio, 3000 ns of engine time per descriptor (one channel).
    zero = {f"kernel.{k}": 0.0 for k in ("call_ns", "isolate_ns", "alloc_page_ns", "lock_ns", "rmap_ns", "unmap_ns",
                                         "entry_install_ns", "entry_remove_ns", "tlb_flush_ns", "ipi_ns",
                                         "freeze_ns", "mapping_ns", "state_ns", "putback_ns", "free_page_ns")}
    model = TINY.with_set(**zero, **{"kernel.alloc_ns": 2000.0, "dma.channels": 1, "dma.call_ns": 0.0,
                                     "dma.channel_call_ns": 0.0, "dma.desc_ns": 0.0, "dma.desc_hw_ns": 3000.0,
                                     "dma.channel_bw": 1e30, "dma.completion": "poll", "dma.poll_ns": 0.0})
    walls = {}
    for depth in (0, 1):
        m = _machine(cost_model=model)
        try:
            _, _, res = _migrate(m, 1024, engine=m.dma, options=MigrateOptions(pipeline_depth=depth))
        finally:
            m.close()
        walls[depth] = res.modelled.wall_ns
    u, d = 512 * 2000, 512 * 3000
    assert walls[0] == pytest.approx(2 * u + 2 * d)  # unmap, copy, unmap, copy
    assert walls[1] == pytest.approx(u + 2 * d)  # the second unmap runs while the first copy does


def test_charges_replay_and_scale_like_a_larger_run():
    runs = {}
    for pages in (512, 1024):
        m = _machine()
        try:
            runs[pages] = _migrate(m, pages)[2].modelled
        finally:
            m.close()
    # Twice the batches: the same modelled time as the run twice as large (the call's own cost once).
    assert replay(scale_charges(runs[512].charges, 2, bigger_batches=False), TINY).wall_ns == \
        pytest.approx(runs[1024].wall_ns)
    assert replay(runs[512].charges, TINY).wall_ns == pytest.approx(runs[512].wall_ns)


def test_the_even_split_deals_folios_by_count_and_balance_splits_bytes():
    c = UnmapCharge(0, (), 0, 0, dma_folios=((1, 3), (512, 1)), dma_runs=((515, 1),))
    for split, busiest in (("even", 1 * PS + 1 * 512 * PS), ("balance", 515 * PS / 2)):
        model = TINY.with_set(**{"dma.split": split, "dma.desc_hw_ns": 0.0})
        clock = ModelClock(model)
        clock.charge(CallCharge(0))
        clock.charge(c)
        clock.charge(MoveCharge(0, (), 0, (), waited=True))
        assert clock.pending == type(clock.pending)()
        t = clock.result()
        submit = t.ops_ns["dma_submit"]
        assert t.wall_ns == pytest.approx(100_000 + submit + busiest / 4.096 + 5_000)


# -- modelled and measured never mix ------------------------------------------------------------------------------
def test_modelled_time_is_labelled_and_apart_from_the_measured_fields():
    m = _machine(cost_model="zen3-ptdma")
    try:
        _, _, res = _migrate(m, 8)
        assert m.cost_model.name == "zen3-ptdma"
    finally:
        m.close()
    assert set(res.phase_ns) == set(PHASES)
    doc = res.modelled.as_dict()
    assert doc["model"] == "zen3-ptdma"
    assert all(k == "model" or k.startswith("modelled_") for k in doc)
    plain = Machine(host_pages=64, device_pages=64, backend="cpu")
    try:
        _, _, res = _migrate(plain, 8)
    finally:
        plain.close()
    assert res.modelled is None and plain.cost_model is None


def test_dmamig_model_prints_modelled_figures_and_the_published_rows_beside_them(capsys, tmp_path):
    from dmamig.cli import main

    assert main(["model", "--real-size", "8M", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "zen3-ptdma" and doc["modelled"] is True and doc["scaled"]["real_bytes"] == 8 << 20
    assert all(set(row) == {"kind", "folio", "lanes", "batch_pages", "modelled_gbps"} for row in doc["grid"])
    for row in doc["published"]:
        assert "published" in row and "modelled" in row and row["model"] == "zen3-ptdma"
        if row["calibration"]:
            assert abs(row["error_pct"]) < 10, row
    f = doc["findings"]
    assert f["one_channel_loses_below_2m"]["holds"] and f["first_channels_beating_cpu_at_4k"]["holds"]
    assert f["gain_8_to_16"]["per_folio"]["4K"] < 1.5
    assert main(["model", "--real-size", "4M", "--preset", "e5-ioat", "--set", "dma.channels=4", "--out",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MODELLED GB/s under cost model e5-ioat[dma.channels=4]" in out
    assert {p.name for p in tmp_path.iterdir()} == {"model.json", "throughput_vs_folio.png",
                                                   "offload_heat_map.png"}
    assert main(["model", "--set", "kernel.lock_ns=-3"]) == 2


def test_calibrating_on_this_machine_writes_a_preset_and_compares_measured_with_modelled(tmp_path):
    from dmamig.bench.model_study import calibrate_here, compare_here

    model, measured = calibrate_here(real_bytes=4 << 20, repeat=1, name="here")
    assert model.name == "here" and measured["copy_ns_per_folio"][0] > 0
    path = tmp_path / "here.json"
    path.write_text(json.dumps(model.as_dict()))
    rows = compare_here(load_model(str(path)), real_bytes=4 << 20, repeat=1)
    assert {(r["folio"], r["mode"]) for r in rows} == {("4K", "copy"), ("4K", "no-copy"), ("2M", "copy"),
                                                       ("2M", "no-copy")}
    for r in rows:
        assert r["model"] == "here" and r["measured_gbps"] > 0 and r["modelled_gbps"] > 0


def test_a_model_needs_its_four_sections():
    with pytest.raises(InvalidArgument, match="dma must be a DmaCosts"):
        replace(TINY, dma=KERNEL)


@pytest.mark.parametrize("split, busiest", [("folio", (1 + 2) * PS), ("part", 5 * PS / 2)])
def test_the_multithreaded_copy_takes_its_busiest_thread_or_its_cap(split, busiest):
    # Three folios (1, 2 and 2 pages) over 2 threads at 1 byte/ns each, 500 ns to dispatch a thread. By folio, the
    # folios are dealt round robin by count (smallest first): one thread gets 1 + 2 pages; by part, each half.
    model = TINY.with_set(**{"mtcopy.threads": 2, "mtcopy.split": split, "mtcopy.thread_bw": 1e9,
                             "mtcopy.dispatch_ns": 500.0})
    moved = ((1, 1), (2, 2))
    t = replay([MoveCharge(0, moved, 0, moved)], model)
    assert t.ops_ns["copy"] == pytest.approx(2 * 500 + busiest)
    capped = replay([MoveCharge(0, moved, 0, moved)], model.with_set(**{"mtcopy.cap_bw": 0.25e9}))
    assert capped.ops_ns["copy"] == pytest.approx(2 * 500 + 5 * PS / 0.25)
