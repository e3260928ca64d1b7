"""The plots as a user gets them from ``dmamig report --out`` and ``dmamig replay``: error bars over the
repetitions' spread, labels that neither run together nor cross the axes, replay figures that say what they
show. Each figure is inspected as it is saved."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=True)

import pytest  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dmamig.bench.results import load_results, wall_spread  # noqa: E402
from dmamig.cli import main  # noqa: E402

EPYC = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu-epyc-2core-2026-11-26"


@pytest.fixture()
def saved(monkeypatch):
    """Every figure saved while the test runs, by file name, drawn as it was written."""
    figs: dict[str, Figure] = {}
    real = Figure.savefig

    def savefig(self, fname, *a, **k):
        real(self, fname, *a, **k)
        figs[Path(fname).name] = self

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figs


def _renderer(fig: Figure):
    canvas = FigureCanvasAgg(fig)  # the figure was closed once saved: draw it again, as it was laid out
    canvas.draw()
    return canvas.get_renderer()


def _boxes(fig: Figure, artists) -> list:
    renderer = _renderer(fig)
    return [a.get_window_extent(renderer) for a in artists if a.get_text()]


def test_report_plots_carry_error_bars_from_the_repetitions_spread(tmp_path, saved, capsys):
    assert main(["report", str(EPYC), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    doc = load_results(EPYC)
    # throughput_vs_folio: each faithful line has error bars from its slowest to its fastest repetition.
    ax = saved["throughput_vs_folio.png"].axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    copy = next(c for c in bars if c.get_label() == "copy")
    rec = next(s for s in doc["scenarios"] if s["kind"] == "migrate" and s["mode"] == "copy"
               and s["direction"] == "h2d" and s["folio_bytes"] == 4096 and s["options"]["faithful"])
    sp = wall_spread(rec)
    (segment, *_), = [lc.get_segments() for lc in copy.lines[2]]
    assert sorted(segment[:, 1]) == pytest.approx([sp["gbps_min"], sp["gbps_max"]])
    assert sp["gbps_max"] > sp["gbps_min"]  # a spread to draw, not a bar of zero length
    # copy_vs_nocopy: both bars of every pair carry error bars.
    ax = saved["copy_vs_nocopy.png"].axes[0]
    assert [c.errorbar is not None for c in ax.containers if isinstance(c, BarContainer)] == [True, True]
    # access_fault_batch: the device-access lines too.
    ax = saved["access_fault_batch.png"].axes[0]
    assert len([c for c in ax.containers if isinstance(c, ErrorbarContainer)]) == 2
    for name in ("throughput_vs_folio.png", "copy_vs_nocopy.png", "access_fault_batch.png"):
        assert "slowest to fastest repetition" in saved[name].axes[0].get_ylabel()


def test_fault_batch_labels_stay_inside_the_axes(tmp_path, saved, capsys):
    assert main(["report", str(EPYC), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    fig = saved["access_fault_batch.png"]
    ax = fig.axes[0]
    frame = ax.get_window_extent(_renderer(fig))
    labels = _boxes(fig, ax.texts)
    assert len(labels) == 3
    for box in labels:
        assert frame.x0 < box.x0 and box.x1 < frame.x1


def test_service_breakdown_tick_labels_do_not_run_together(tmp_path, saved, capsys):
    assert main(["report", str(EPYC), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    fig = saved["access_service.png"]
    boxes = _boxes(fig, fig.axes[0].get_xticklabels())
    assert len(boxes) == 14
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 < right.x0, "two tick labels overlap"


def test_replay_plots_label_their_axes_and_name_their_settings(tmp_path, saved, capsys):
    out = tmp_path / "r"
    assert main(["replay", "uniform", "--pages", "64", "--epochs", "3", "--per-epoch", "64", "--seed", "5",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert set(saved) == {"migrations.png", "occupancy.png", "stall_cpu.png"}
    for name, fig in saved.items():
        title = fig._suptitle.get_text()
        assert "policy tpp (" in title and "64 pages of 4K" in title and "seed 5" in title, name
        assert "3 epochs" in title and "DMA channels" in title, name
        firsts = [ax for ax in fig.axes if ax.get_subplotspec().colspan.start == 0]
        assert firsts and all(ax.get_ylabel() for ax in firsts), name
    assert saved["stall_cpu.png"].axes[0].get_ylabel() == "accessor stall, ms per epoch"
