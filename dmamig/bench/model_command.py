"""The ``dmamig model`` command: its parser and its body (the study is :mod:`dmamig.bench.model_study`).

Every figure it prints is modelled and says under which cost model; the published rows beside them are labelled
as published, and measured times (``--calibrate``) as measured.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..cost_model import PRESETS, CostModel, load_model
from ..cost_model.presets import RFC_BYTES
from ..errors import InvalidArgument

__all__ = ["add_model_parser", "cmd_model"]

_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _setting(text: str) -> tuple[str, str]:
    name, eq, value = text.partition("=")
    if not eq or not name or not value:
        raise ValueError(f"--set takes name=value (e.g. dma.channels=8), got {text!r}")
    return name.strip(), value.strip()


def _size(text: str) -> int:
    t = text.strip().upper()
    mult = _SIZE_UNITS.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in _SIZE_UNITS else t
    if not digits.isdigit() or int(digits) <= 0:
        raise ValueError(f"a size is a positive number with K, M or G, got {text!r}")
    return int(digits) * mult


def add_model_parser(sub: Any, argtype: Callable[[Callable[[str], Any]], Callable[[str], Any]]) -> None:
    """Add the ``model`` subcommand to ``sub`` (an argparse subparsers object)."""
    p = sub.add_parser(
        "model", help="price the DMA-offload RFC's benchmark with a cost model (modelled, not measured)",
        description="Run the DMA-offload RFC's benchmark (move_pages of 1 GiB between two nodes, folios 4K to 2M; "
                    "the vanilla kernel, DMA offload over 1-16 channels, the multi-threaded copy over 1-16 "
                    "threads) through the emulator on a smaller real buffer, scale its charges to 1 GiB and price "
                    "them with a cost model. Prints the modelled table in the RFC's shape and the published rows "
                    "beside it. With --calibrate, measures this machine and writes a preset file.")
    p.add_argument("--preset", default="zen3-ptdma", metavar="NAME|FILE",
                   help=f"cost model: {', '.join(PRESETS)}, or a preset file (default zen3-ptdma)")
    p.add_argument("--set", dest="settings", action="append", type=argtype(_setting),
                   metavar="NAME=VALUE", help="change one parameter, e.g. dma.channels=8 or dma.cap_bw=7e10 "
                                              "(repeatable)")
    p.add_argument("--json", action="store_true", help="print the study as JSON")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write model.json and the plots (throughput_vs_folio.png, offload_heat_map.png) into DIR")
    p.add_argument("--real-size", type=argtype(_size), default=32 << 20, metavar="SIZE",
                   help="bytes each real migration moves before its charges are scaled to 1 GiB (default 32M; "
                        "1G runs the benchmark at full size)")
    p.add_argument("--calibrate", type=Path, metavar="FILE",
                   help="measure this machine's emulator, write a preset file, and print measured beside "
                        "modelled-on-this-machine for copy and no-copy at 4K and 2M")


def _model(args: argparse.Namespace) -> CostModel:
    model = load_model(args.preset)
    return model.with_set(**dict(args.settings)) if args.settings else model


def cmd_model(args: argparse.Namespace, console_factory: Callable[..., Any]) -> int:
    """Run ``dmamig model``; return the exit code (2 for a bad preset, setting or size)."""
    con = console_factory()
    try:
        if args.calibrate is not None:
            return _calibrate(args, con)
        model = _model(args)
        from .model_study import LANES, run_study, trace_runs

        charges = trace_runs(args.real_size, presets=tuple(PRESETS))
        study = run_study(model, charges, args.real_size, LANES)
    except InvalidArgument as exc:
        console_factory(stderr=True).print(f"dmamig model: {' '.join(str(exc).split())}", markup=False,
                                           highlight=False, soft_wrap=True)
        return 2
    doc = study.as_dict()
    if args.out is not None:
        doc["plots"] = _write_out(study, charges, args.out)
    if args.json:
        print(json.dumps(doc, indent=2, default=_plain))
        return 0
    _print_study(con, study, doc)
    return 0


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return str(value)


def _write_out(study: Any, charges: dict, out: Path) -> list[str]:
    from .model_plots import plot_heat_map, plot_throughput
    from .model_study import LANES, heat_map

    out.mkdir(parents=True, exist_ok=True)
    model = study.model
    desc = np.geomspace(10, 10_000, 13)
    bw = np.geomspace(0.25e9, 64e9, 13)
    ratios = {f: heat_map(model, charges, f, desc, bw) for f in ("4K", "2M")}
    paths = [plot_throughput(study, out / "throughput_vs_folio.png", LANES),
             plot_heat_map(model.name, ratios, desc, bw, model.dma.channels, out / "offload_heat_map.png",
                           (model.dma.channel_bw, model.dma.desc_hw_ns))]
    doc = study.as_dict()
    doc["heat_map"] = {"model": model.name, "modelled": True, "desc_hw_ns": desc.tolist(),
                       "channel_bw": bw.tolist(), "no_copy_over_copy": {f: r.tolist() for f, r in ratios.items()}}
    (out / "model.json").write_text(json.dumps(doc, indent=2, default=_plain))
    return [str(p) for p in paths] + [str(out / "model.json")]


def _print_study(con: Any, study: Any, doc: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .model_study import FOLIOS, LANES

    name = escape(study.model.name)  # a changed model's name holds [...]: text, not markup
    t = Table(title=f"MODELLED GB/s under cost model {name}: move_pages of 1 GiB (real runs of "
                    f"{study.real_bytes >> 20} MiB in the emulator, charges scaled to 1 GiB)")
    t.add_column("run")
    t.add_column("batch")
    for f in FOLIOS:
        t.add_column(f, justify="right")
    t.add_row("vanilla kernel", "512 pages", *[f"{study.value('vanilla', f, 0):.2f}" for f in FOLIOS])
    for kind, word in (("dma", "DMA offload"), ("mtcopy", "multi-threaded copy")):
        for n in LANES:
            t.add_row(f"{word}, {n} {'channels' if kind == 'dma' else 'threads'}", "1 GiB",
                      *[f"{study.value(kind, f, n):.2f}" for f in FOLIOS])
    con.print(t)
    p = Table(title=f"Published rows ({name.split('[')[0]}'s machine) beside the model")
    for col in ("source", "run", "folio", "lanes", "published", f"modelled ({name})", "error", "role"):
        p.add_column(col, justify="right" if col in ("lanes", "published", "error") else "left")
    for r in doc["published"]:
        pub = f"{r['published']:.4g}" + (f" ({r['span'][0]:g}-{r['span'][1]:g})" if r["span"] else "")
        mod = "-" if r["modelled"] is None else f"{r['modelled']:.4g}"
        err = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        p.add_row(r["table"], r["kind"], r["folio"], str(r["lanes"]), pub, mod, err,
                  "calibration input" if r["calibration"] else "check (not fitted)")
    con.print(p)
    f = doc["findings"]
    con.print(f"Findings of the RFC, on the modelled grid ({name}; none fitted):")
    one = f["one_channel_loses_below_2m"]
    con.print(f"  one channel loses to the CPU below 2M: {'holds' if one['holds'] else 'does not hold'}")
    first = f["first_channels_beating_cpu_at_4k"]
    con.print(f"  offload passes the CPU at 4K from {first['channels']} channels on: "
              f"{'holds' if first['holds'] else 'does not hold'} (several: 4 or more)")
    gain = f["gain_8_to_16"]
    words = ", ".join(f"{k} {v:.2f}x" for k, v in gain["per_folio"].items())
    con.print(f"  returns diminish beyond 8-12 channels (16 over 8 channels: {words}): "
              f"{'holds' if gain['holds'] else 'holds only where the gain is under 1.5x'}")
    share = ", ".join(f"{k} {v * 100:.0f}%" for k, v in study.shares.items())
    con.print(f"  modelled copy share of the vanilla kernel's migration: {share}")
    con.print(f"Scaled, not run at full size: each figure prices {RFC_BYTES >> 30} GiB of charges counted on a "
              f"{study.real_bytes >> 20} MiB real migration (--real-size 1G runs the full size).")


def _calibrate(args: argparse.Namespace, con: Any) -> int:
    from rich.markup import escape
    from rich.table import Table

    from .model_study import calibrate_here, compare_here

    model, measured = calibrate_here()
    model = model.with_name(args.calibrate.stem)
    args.calibrate.parent.mkdir(parents=True, exist_ok=True)
    args.calibrate.write_text(json.dumps(model.as_dict(), indent=2))
    rows = compare_here(model)
    if args.json:
        print(json.dumps({"tool": "dmamig model --calibrate", "preset_file": str(args.calibrate),
                          "model": model.as_dict(), "measured_for_calibration": measured, "compare": rows},
                         indent=2, default=_plain))
        return 0
    name = escape(model.name)
    con.print(f"Wrote preset {name} to {escape(str(args.calibrate))} (measured on this machine).")
    t = Table(title=f"This machine: MEASURED beside MODELLED ({name}) on fresh 32 MiB runs, faithful batches")
    for col in ("folio", "mode", "measured GB/s", f"modelled GB/s ({name})", "modelled ÷ measured GB/s",
                "largest modelled terms"):
        t.add_column(col)
    for r in rows:
        ops = ", ".join(f"{k} {v / 1e3:.0f} us" for k, v in list(r["modelled_ops_ns"].items())[:3])
        t.add_row(r["folio"], r["mode"], f"{r['measured_gbps']:.2f}", f"{r['modelled_gbps']:.2f}",
                  f"{r['modelled_over_measured_gbps']:.2f}", ops)
    con.print(t)
    return 0
