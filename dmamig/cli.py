"""The ``dmamig`` command: ``bench``, ``report``, ``info``, ``selftest``, ``schema``, ``stress``, ``replay`` and
``replay-report``.

Exit codes: 0 success; 1 a failure the command found (a significant regression beyond the threshold or a
missing scenario, a benchmark whose data failed verification, a failed self-test); 2 a usage error, told in
one line (a bad argument, an output folder that cannot be used, a file that is not a results file, runs
whose settings differ); 130 after Ctrl-C (``bench`` keeps the scenarios that finished, marked partial).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_parser", "main"]


# -- argument types: each names what was wrong and what is allowed ---------------------------------------------

def _argtype(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    wrapped.__name__ = fn.__name__
    return wrapped


def _whole(text: str) -> bool:
    # ASCII digits only: str.isdigit() also accepts '²' and the like, which int() refuses.
    return text.strip().isascii() and text.strip().isdigit()


def _positive(text: str) -> int:
    if not _whole(text) or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive whole number, e.g. 3")
    return int(text)


def _nonnegative(text: str) -> int:
    if not _whole(text):
        raise ValueError(f"{text!r} is not a whole number >= 0, e.g. 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``dmamig`` command."""
    p = argparse.ArgumentParser(
        prog="dmamig",
        description="Emulated Linux page migration with a device DMA engine: copy vs no-copy benchmarks.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    from .bench.arguments import add_bench_parser, add_report_parser

    add_bench_parser(sub, _argtype, _positive, _nonnegative)
    add_report_parser(sub, _argtype)

    from .tiering.commands import add_replay_parser, add_replay_report_parser

    add_replay_parser(sub, _argtype, _positive, _nonnegative)
    add_replay_report_parser(sub)

    i = sub.add_parser("info", help="backend, devices, versions and kernel build status")
    i.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")

    s = sub.add_parser("selftest", help="quick correctness pass of a backend; exit 1 on any failure")
    s.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")

    sub.add_parser("schema", help="print the JSON schema of results.json")

    st = sub.add_parser("stress", help="bounded stress with fault injection and invariant checks; exit 1 on a "
                                       "violation",
                        description="Run readers, writers, migrators (every mode, copy and no-copy), MigrateVma "
                                    "drivers and fork/munmap churn together on one machine for N operations, "
                                    "with faults injected at rate R; check bytes, refcounts, mapcounts, frames "
                                    "and vmstat every K operations and at the end.")
    st.add_argument("--ops", type=_argtype(_positive), default=10_000, metavar="N",
                    help="operations in all (default 10000)")
    st.add_argument("--threads", type=_argtype(_positive), default=6, metavar="T", help="worker threads (6)")
    st.add_argument("--fault-rate", type=_argtype(_rate), default=0.02, metavar="R",
                    help="chance that each DMA share fails (submission, mid-copy, completion); worker crashes "
                         "and allocation failures at R/4 (default 0.02; 0 injects nothing)")
    st.add_argument("--seed", type=_argtype(_nonnegative), metavar="S", help="seed (default: random, printed)")
    st.add_argument("--check-every", type=_argtype(_positive), default=1000, metavar="K",
                    help="operations between invariant checks (1000)")
    st.add_argument("--stall-timeout", type=_argtype(_seconds), default=60.0, metavar="SECONDS",
                    help="fail when no thread progresses for this long (60)")
    st.add_argument("--roles", type=_argtype(_roles), metavar="LIST",
                    help="roles to deal to the threads, comma-separated among writer, reader, migrator, dma, "
                         "driver, churn, pinner (default: all)")
    st.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="cpu")
    return p


# -- commands --------------------------------------------------------------------------------------------------

def _console(stderr: bool = False):
    from rich.console import Console

    con = Console(stderr=stderr)
    # Piped into a CI log, rich would fall back to 80 columns and fold every table; logs can be wide.
    return con if con.is_terminal else Console(stderr=stderr, width=180)


def _resolve_backend(parser: argparse.ArgumentParser, name: str) -> str:
    from .backends import cuda_unavailable_reason, resolve_backend
    from .errors import InvalidArgument

    try:
        resolved = resolve_backend(name)
    except InvalidArgument as exc:
        parser.error(str(exc))
    if resolved == "cuda":
        reason = cuda_unavailable_reason()
        if reason is not None:
            parser.error(f"argument --backend: cuda cannot run here: {reason}; use --backend cpu")
    return resolved


def _gpu_count(backend: str) -> int:
    if backend != "cuda":
        return 0
    from .backends import open_backend

    be = open_backend("cuda")
    try:
        return len(be.devices())
    finally:
        be.close()


def _kernel_status() -> Any:
    """``kernel_build_status()`` of the CUDA backend, or why it could not be asked."""
    try:
        from .backends import cuda
    except Exception as exc:  # the module may be absent or fail to import without a GPU stack
        return f"unavailable ({type(exc).__name__}: {exc})"
    fn = getattr(cuda, "kernel_build_status", None)
    if fn is None:
        return "unavailable (dmamig.backends.cuda has no kernel_build_status)"
    try:
        return fn()
    except Exception as exc:
        return f"error ({type(exc).__name__}: {exc})"


def info_dict(backend_arg: str = "auto") -> dict[str, Any]:
    """Everything ``dmamig info`` shows, as a dict.

    ``cuda`` says whether the CUDA backend can run (``usable``, ``absent: ...`` or ``UNUSABLE: ...`` where a GPU
    is present but CUDA cannot use it, which is also an ``error``); ``cuda_driver``, ``cuda_runtime`` (the CUDA
    version cupy was built for), ``nvrtc`` and ``batch_copy`` are shown wherever cupy imports.
    """
    from .backends import cuda_status, open_backend, resolve_backend
    from .bench.environment import machine_info

    status = cuda_status()
    reason = status.reason
    try:
        backend = resolve_backend(backend_arg)
    except Exception as exc:
        backend, err = "cpu", str(exc)
    else:
        err = None
    devices: list[dict[str, Any]] = []
    batch_reason = None
    topology: Any = ("a Machine setting on the cpu backend: Machine(topology=...), by default "
                     "Topology.nvswitch(devices) (every device pair NVLink with peer access)")
    if backend == "cuda" and reason is not None:
        err = f"cuda requested but unusable: {reason}"
    else:
        try:
            be = open_backend(backend)
            try:
                devices = [dict(d) for d in be.devices()]
                batch_reason = getattr(be, "batch_copy_reason", None)
                if hasattr(be, "runtime_topology"):
                    topology = be.runtime_topology().as_dict()
            finally:
                be.close()
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
    if status.state == "unusable" and err is None:
        err = f"a GPU is present but CUDA is not usable: {reason}"
    info = machine_info(backend, devices)
    info["devices"] = devices
    info["topology"] = topology
    info["cuda"] = {"usable": "usable", "absent": f"absent: {reason}"}.get(status.state, f"UNUSABLE: {reason}")
    if status.state != "absent" or "cupy is not installed" not in (reason or ""):
        from .backends.cuda import cuda_environment

        env = cuda_environment()
        env.pop("cupy", None)  # the installed version is already there, from the package metadata
        info.update(env)
        if batch_reason is not None:
            info["batch_copy"] = "on" if batch_reason == "available" else f"off: {batch_reason}"
    info["kernel_build_status"] = _kernel_status()
    if err:
        info["error"] = err
    return info


def _info_text(key: str, v: Any, info: dict[str, Any]) -> str:
    """One ``dmamig info`` value in words: what a missing one means, and a reason said once, not per kernel."""
    if key == "git_commit":
        if v is None:
            return str(info.get("git_commit_source") or "unknown")
        dirty = {True: ", dirty: tracked files changed", False: ", clean"}.get(info.get("git_dirty"), "")
        return f"{v}{dirty} (from {info.get('git_commit_source', 'unknown')})"
    if key == "host" and isinstance(v, dict):
        return host_text(v)
    if v is None:
        return "not installed"
    if key == "kernel_build_status" and isinstance(v, dict) and str(info.get("cuda", "")).startswith("absent"):
        return f"not built ({', '.join(v)}): CUDA is absent here, see cuda"
    return json.dumps(v, default=str) if isinstance(v, dict | list) else str(v)


def host_text(host: dict[str, Any]) -> str:
    """A host record (:func:`dmamig.sweep.hardware.host_facts`) in one line of words."""
    numa = host.get("numa_nodes")
    if isinstance(numa, list):
        nodes = "; ".join(f"node {n.get('node')}: CPUs {n.get('cpus')}" for n in numa)
        numa_text = f"{len(numa)} NUMA node(s) ({nodes})"
    else:
        numa_text = str(numa)
    mem = host.get("memory_bytes")
    mem_text = f"{mem / (1 << 30):.1f} GiB" if isinstance(mem, int) else str(mem)
    tpc = host.get("threads_per_core")
    return (f"{host.get('cpu_model')}; {host.get('cpus_available')} of {host.get('cpus_online')} CPUs available "
            f"to this process ({host.get('affinity')}); SMT {host.get('smt')}"
            + (f" ({tpc} thread(s) per core)" if tpc else "") + f"; {numa_text}; memory {mem_text}")


def _cmd_info(args: argparse.Namespace) -> int:
    info = info_dict(args.backend)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 1 if "error" in info else 0
    from rich.markup import escape
    from rich.table import Table

    con = _console()
    t = Table(title="dmamig info", show_header=False, title_justify="left")
    t.add_column("key", style="bold")
    t.add_column("value")
    for key in ("backend", "cuda", "cuda_driver", "cuda_runtime", "nvrtc", "batch_copy", "dmamig", "git_commit",
                "python", "numpy", "numba", "cupy", "host", "platform", "kernel_build_status",
                "error"):
        if key in info:
            t.add_row(key, escape(_info_text(key, info[key], info)))
    con.print(t)
    if info["devices"]:
        d = Table(title="devices", title_justify="left")
        for col in ("#", "name", "memory", "peers", "UUID", "PCI bus", "driver", "CUDA runtime", "compute mode",
                    "persistence", "app clocks MHz (SM, memory)"):
            d.add_column(col)
        for k, dev in enumerate(info.get("gpus") or info["devices"]):
            mem = dev.get("memory_bytes")
            d.add_row(str(k), escape(str(dev.get("name", "?"))), f"{mem / (1 << 30):.1f} GiB" if mem else "?",
                      ", ".join(map(str, dev.get("peers", []))) or "none",
                      *(escape(str(dev.get(key, "unknown"))) for key in ("uuid", "pci_bus_id", "driver",
                                                                        "cuda_runtime", "compute_mode",
                                                                        "persistence_mode")),
                      escape(f"{dev.get('app_clock_graphics_mhz', 'unknown')}, "
                             f"{dev.get('app_clock_memory_mhz', 'unknown')}"))
        con.print(d)
    else:
        con.print("devices: none (the cpu backend emulates device nodes with host-RAM buffers)")
    topo = info.get("topology")
    if isinstance(topo, dict):
        from .topology import Topology

        con.print(f"topology: {escape(str(topo.get('name')))} (read from the CUDA runtime)")
        con.print(escape(Topology.from_dict(topo).format()))
    elif topo:
        con.print(f"topology: {escape(str(topo))}")
    return 1 if "error" in info else 0


def _cmd_selftest(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from rich.markup import escape

    from .backends import cuda_status
    from .bench.selftest import run_selftest

    con = _console()
    status = cuda_status()
    # A GPU that CUDA cannot use (an insufficient driver, say) is a failure, never a quiet fallback to the CPU.
    # (No GPU at all with --backend cuda is a usage error, below.)
    if status.state == "unusable" and args.backend in ("cuda", "auto"):
        con.print(f"[bold red]FAIL[/bold red] CUDA backend: a GPU is present but CUDA is not usable: "
                  f"{escape(status.reason or '')}")
        con.print(f"[bold red]selftest ({args.backend}): CUDA is not usable on this GPU machine[/bold red]")
        return 1
    backend = _resolve_backend(parser, args.backend)
    failed = 0
    for name, ok, detail in run_selftest(backend):
        failed += not ok
        mark = "[green]PASS[/green]" if ok else "[bold red]FAIL[/bold red]"
        con.print(f"{mark} {escape(name)}" + (f": {escape(detail)}" if detail else ""))
    if failed:
        con.print(f"[bold red]selftest ({backend}): {failed} check(s) failed[/bold red]")
        return 1
    con.print(f"selftest ({backend}): all checks passed")
    return 0


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number; use a fraction such as 0.01") from None
    if not 0 <= v <= 1:
        raise ValueError(f"{text!r} is out of range; use a fraction in [0, 1], such as 0.01")
    return v


def _roles(text: str) -> tuple[str, ...]:
    from .stress_ops import ROLES

    roles = tuple(r.strip() for r in text.split(",") if r.strip())
    bad = [r for r in roles if r not in ROLES]
    if not roles or bad or len(set(roles)) != len(roles):
        raise ValueError(f"{text!r} is not a list of distinct roles among {','.join(ROLES)}")
    return roles


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds, e.g. 60") from None
    if not v > 0:
        raise ValueError(f"{text!r} must be > 0 seconds, e.g. 60")
    return v


def _cmd_stress(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .errors import InvalidArgument
    from .stress import StressConfig, run_stress

    backend = _resolve_backend(parser, args.backend)
    cfg = StressConfig(ops=args.ops, threads=args.threads, fault_rate=args.fault_rate, seed=args.seed,
                       check_every=args.check_every, stall_timeout=args.stall_timeout, backend=backend,
                       **({"roles": args.roles} if args.roles else {}))
    print(f"dmamig stress: {cfg.ops} ops, {cfg.threads} threads, fault rate {cfg.fault_rate:g}, backend "
          f"{backend}", flush=True)
    try:
        cfg.validate()
    except InvalidArgument as exc:
        parser.error(str(exc))
    report = run_stress(cfg, out=lambda line: print(line, flush=True))
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1


def _check_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse option values argparse let through unconverted.

    ``--opt=--`` reaches the namespace as ``[]`` without the option's type ever seeing it (an argparse
    quirk); every option here takes one value, so an empty list is always a usage error.
    """
    cmd = _command_parser(parser, args.command)
    for action in cmd._actions:
        if action.option_strings and action.nargs is None and getattr(args, action.dest, None) == []:
            cmd.error(f"argument {'/'.join(action.option_strings)}: expected one value, got '--'")


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The subcommand's own parser: its usage errors read ``dmamig COMMAND: error: ...``, as argparse's do."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _attach_negative_values(argv: list[str]) -> list[str]:
    """``--total -8M`` as ``--total=-8M``: argparse takes a value starting with ``-`` for an option and says
    "expected one argument"; attached, the value reaches its option's check, which says what is allowed."""
    out: list[str] = []
    for tok in argv:
        if out and re.match(r"^-\d", tok) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={tok}"
        else:
            out.append(tok)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dmamig`` command line; return its exit code.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (``sys.argv[1:]`` by default).
    """
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    _check_parsed(parser, args)
    cmd = _command_parser(parser, args.command)
    if args.command == "bench":
        from .bench.commands import cmd_bench
        from .sweep.cli import is_remote

        if is_remote(args.cluster):  # the workers decide the backend: this machine may have no GPU
            return cmd_bench(args, cmd, None, 0, _console)
        backend = _resolve_backend(cmd, args.backend)
        return cmd_bench(args, cmd, backend, _gpu_count(backend), _console)
    if args.command == "report":
        from .bench.commands import cmd_report

        return cmd_report(args, _console)
    if args.command == "info":
        return _cmd_info(args)
    if args.command == "selftest":
        return _cmd_selftest(args, cmd)
    if args.command == "stress":
        return _cmd_stress(args, cmd)
    if args.command == "replay":
        from .tiering.commands import cmd_replay

        return cmd_replay(args, _console)
    if args.command == "replay-report":
        from .tiering.commands import cmd_replay_report

        return cmd_replay_report(args, _console)
    from .bench.results import RESULTS_SCHEMA

    print(json.dumps(RESULTS_SCHEMA, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
