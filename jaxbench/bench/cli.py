"""`python -m jaxbench.bench`: flags, the data, and the command's start and stop.

A bad flag, a trainer refusing a config, an --out holding results or data that will not
load stop with one line and exit 2 before any run; SIGTERM and Ctrl-C end the race with
bench.json written (exit 143 / 130); the watchdog ending it is exit 0.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from jaxbench import configs, report
from jaxbench.bench import frameworks
from jaxbench.bench.budget import Budget, BudgetExceeded
from jaxbench.bench.frameworks import FRAMEWORKS, LOOPS
from jaxbench.bench.race import Bench, Options

DEFAULT_RUNS = 5  # rounds when neither --runs nor --max-seconds is given
BENCH_FILES: tuple[str, ...] = ("bench.json", "bench-*.png")
PROG = "python -m jaxbench.bench"


def build_parser() -> argparse.ArgumentParser:
    p = configs.OneLineErrorParser(
        prog=PROG,
        description="Race jaxbench against torch_ref: per preset a warm-up each, then rounds "
        "of one timed run per contender (alternating order) until --runs or --max-seconds; "
        "statistics, verdicts, bench.json and plots in --out.",
        allow_abbrev=False,
    )
    p.add_argument(
        "--config",
        default="resnet9",
        help=f"comma list of presets to race ({', '.join(configs.PRESETS)}); default resnet9",
    )
    p.add_argument("--frameworks", default="jax,torch", help="comma list of jax, torch")
    p.add_argument(
        "--loop",
        dest="loops",
        default="auto",
        help="JAX loop(s): auto (scan on GPU, step on CPU), scan, step, or scan,step to race both",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=None,
        help=f"timed runs per contender and preset (default {DEFAULT_RUNS}; with --max-seconds: "
        "as many as fit)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="wall-clock budget of the whole command; rounds are planned from measured run "
        "times and the command stops in time with its results written",
    )
    p.add_argument("--target", type=float, default=0.94, help="accuracy target in (0, 1]")
    p.add_argument("--out", default=None, help="output folder (default bench-out/<presets>)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace bench.json and bench-*.png already in --out",
    )
    p.add_argument("--stream", default="fast", choices=("fast", "shared"), help="batch stream")
    p.add_argument(
        "--torch-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the PyTorch model (default: the trainer's choice: on for CUDA)",
    )
    p.add_argument(
        "--torch-compile-mode",
        default=None,
        help="torch.compile mode (default: the trainer's; max-autotune on CUDA)",
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="after the timed rounds, one profiled run per contender: traces in DIR and a "
        "top-operations table per framework in the report",
    )
    p.add_argument(
        "--vmap-seeds",
        type=int,
        default=0,
        metavar="K",
        help="after the rounds, train K JAX seeds in one vmapped program per preset and add "
        'a row "K seeds, one program": time per seed against a run alone',
    )
    # Every other Config field overrides every preset; --out and --seed belong to the bench.
    configs.add_config_args(p, skip=("name", "out", "seed", "config", "loop"))
    return p


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _preset_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """One Config per --config preset, every other flag applied on top."""
    presets = _comma_list(args.config)
    if not presets or len(set(presets)) != len(presets):
        parser.error(
            f"--config takes distinct preset names, e.g. tiny,speedrun; got {args.config!r}"
        )
    cfgs = []
    for name in presets:
        if name not in configs.PRESETS:
            parser.error(
                f"unknown preset {name!r} in --config; choose from {', '.join(configs.PRESETS)}"
            )
        try:
            cfgs.append(
                configs.config_from_args(argparse.Namespace(**{**vars(args), "config": name}))
            )
        except ValueError as e:
            parser.error(f"{name}: {e}")
    return cfgs


def _check_race_flags(
    parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]
) -> tuple[str, ...]:
    """Refuse flags that make no race; returns the JAX loops."""
    if len(set(names)) != len(names):
        parser.error(f"--frameworks lists a framework twice: {args.frameworks}")
    loops = tuple(_comma_list(args.loops))
    if not loops or any(lp not in LOOPS for lp in loops) or len(set(loops)) != len(loops):
        parser.error(f"--loop takes distinct values from {', '.join(LOOPS)}; got {args.loops!r}")
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.max_seconds is not None and not (
        args.max_seconds > 0 and math.isfinite(args.max_seconds)
    ):
        parser.error(f"--max-seconds must be a positive number of seconds, got {args.max_seconds}")
    if not 0.0 < args.target <= 1.0:
        parser.error(f"--target is an accuracy in (0, 1], e.g. 0.94; got {args.target}")
    if args.vmap_seeds < 0 or args.vmap_seeds == 1:
        parser.error(f"--vmap-seeds takes K >= 2 seeds (0: off), got {args.vmap_seeds}")
    if args.vmap_seeds and "jax" not in names:
        parser.error("--vmap-seeds is a JAX row: add jax to --frameworks")
    return loops


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Flags -> Options; any bad value exits 2 with one line naming the fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfgs = _preset_configs(parser, args)
    names = tuple(_comma_list(args.frameworks))
    bad = [f for f in names if f not in FRAMEWORKS]
    if not names or bad:
        parser.error(f"--frameworks takes a comma list of {', '.join(FRAMEWORKS)}; got {bad}")
    # A race is on one device unless --devices says otherwise: the trainers' own default
    # (every local device) would set several GPUs of JAX against one of PyTorch.
    devices = getattr(args, "devices", 1)
    if devices != 1 and "torch" in names:
        parser.error(
            f"--devices {devices}: PyTorch races one device per process here; race JAX alone "
            "(--frameworks jax) and PyTorch under torchrun (see docs/scaling.md)"
        )
    cfgs = [c.replace(devices=devices) for c in cfgs]
    loops = _check_race_flags(parser, args, names)
    runs = args.runs if args.runs is not None or args.max_seconds is not None else DEFAULT_RUNS
    out = Path(args.out) if args.out else Path("bench-out") / "+".join(_comma_list(args.config))
    return Options(
        cfgs=tuple(cfgs),
        frameworks=names,
        loops=loops,
        runs=runs,
        target=args.target,
        out=out,
        stream=args.stream,
        torch_compile=args.torch_compile,
        torch_compile_mode=args.torch_compile_mode,
        max_seconds=args.max_seconds,
        profile=Path(args.profile) if args.profile else None,
        overwrite=args.overwrite,
        vmap_seeds=args.vmap_seeds,
    )


def fail(message: str) -> NoReturn:
    """One line on stderr naming the problem, exit 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_data(cfgs: Sequence[configs.Config]) -> dict[str, Any]:
    """Each preset's data, from one load per dataset (host memory); a problem is exit 2."""
    from jaxbench.data import load_dataset, take_subsets

    full: dict[tuple[str, Any], Any] = {}
    out = {}
    for cfg in cfgs:
        key = (cfg.dataset, cfg.data_dir)
        try:
            if key not in full:
                full[key] = load_dataset(cfg.replace(subset=None, test_subset=None))
            out[cfg.name] = take_subsets(full[key], cfg.subset, cfg.test_subset)
        except (OSError, ValueError, KeyError) as e:
            fail(f"cannot load {cfg.dataset}: {e}")
    return out


def prepare(opts: Options, command: str, budget: Budget) -> Bench:
    """Trainers, --out and data, in that order (cheapest refusal first), then the race's
    state; Ctrl-C here leaves nothing behind."""
    created = not opts.out.exists()
    try:
        try:  # a trainer refusing the config: before any file
            trainers = frameworks.load_trainers(opts.frameworks, opts.cfgs, opts.torch_compile_mode)
        except ValueError as e:
            fail(str(e))
        try:  # before the data loads: a bad --out costs nothing
            report.prepare_output(opts.out, BENCH_FILES, overwrite=opts.overwrite)
        except report.OutputError as e:
            fail(str(e))
        try:
            data = load_data(opts.cfgs)
        except SystemExit:
            if created:  # leave no empty folder behind a command that did nothing
                report.remove_if_empty(opts.out)
            raise
        return Bench(opts, trainers, data, command, budget, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        if created:
            report.remove_if_empty(opts.out)
        report.exit_interrupted(
            f"interrupted before the race started; nothing written to {opts.out}"
        )


class Terminated(SystemExit):
    """SIGTERM (a timeout, a closing terminal), raised where the main thread runs."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


def race(b: Bench) -> int | None:
    """Every phase of the race; the files are written however it ends. Returns the exit
    status a signal or the watchdog calls for (None: it ran to the end)."""
    opts = b.opts
    previous = signal.signal(signal.SIGTERM, _terminate)
    complete = False
    hard_exit: int | None = None
    try:
        b.record_environment()
        b.watchdog.arm()
        b.warmups()
        b.doc["stop_reason"] = b.rounds()
        if opts.vmap_seeds:
            b.vmapped()
        if opts.profile is not None:
            b.profiles()
        complete = True
    except BudgetExceeded as e:
        b.doc["stop_reason"] = f"watchdog: {e}"
        hard_exit = 0
    except KeyboardInterrupt:
        b.doc["stop_reason"] = "interrupted (Ctrl-C)"
        hard_exit = 130
    except Terminated as e:
        b.doc["stop_reason"] = "terminated (SIGTERM)"
        hard_exit = int(e.code or 143)
    finally:
        if b.doc["stop_reason"] is None:
            b.doc["stop_reason"] = "stopped by an error"
        b.finish(complete)
        signal.signal(signal.SIGTERM, previous)
        print(b.table(), flush=True)
        print(f"wrote {', '.join(str(opts.out / f) for f in b.doc['files'])}", flush=True)
    return hard_exit


def main(argv: Sequence[str] | None = None) -> None:
    """Run the race, print the tables, write bench.json and bench-<preset>.png to --out."""
    budget = Budget()  # the clock starts first; the limit is set after parsing
    opts = parse_args(argv)
    if opts.max_seconds is not None:
        budget.seconds = opts.max_seconds
    # Before JAX is imported: let both frameworks allocate GPU memory on demand.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    command = " ".join([PROG, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    b = prepare(opts, command, budget)
    names = ", ".join(e.name for e in b.entries)
    plan = f"{opts.runs} rounds" if opts.runs is not None else "rounds while they fit"
    limit = f" within {opts.max_seconds:.0f} s" if opts.max_seconds is not None else ""
    print(
        f"bench {', '.join(c.name for c in opts.cfgs)}: {names}; a warm-up each (one untimed "
        f"training run, compilation included), then {plan}"
        f"{limit} -> {opts.out}",
        flush=True,
    )
    hard_exit = race(b)
    if hard_exit == 130:
        report.exit_interrupted(f"interrupted; partial results in {opts.out / 'bench.json'}")
    if hard_exit is not None:
        # A run cut off mid-way can leave compilation or device work in flight, whose
        # teardown at interpreter exit is not safe (XLA:CPU has crashed there). Every
        # result is written and flushed, so leave without it.
        sys.stderr.flush()
        os._exit(hard_exit)
