"""`python -m jaxbench.bench`: flags, the data, and the command's start and stop.

Bad input stops with one line and exit 2 before any run, leaving no folder; SIGTERM and
Ctrl-C end the race with bench.json written (exit 143 / 130); the watchdog's end is exit 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxbench import configs
from jaxbench.bench import frameworks
from jaxbench.bench.budget import Budget, BudgetExceeded
from jaxbench.bench.frameworks import FRAMEWORKS, LOOPS
from jaxbench.bench.race import Bench, Options
from jaxbench.command import Command, run_command

DEFAULT_RUNS = 5  # rounds when neither --runs nor --max-seconds is given
# The ranges of the bench's own numbers, checked at parse time.
MAX_RUNS = 1000  # rounds: more says nothing a thousand do not
MAX_SECONDS = 7 * 24 * 3600.0  # a week of wall clock
MAX_VMAP_SEEDS = configs.MAX_VMAP_SEEDS
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
        default=None,
        metavar="K",
        help=f"after the rounds, train K (2 to {MAX_VMAP_SEEDS}) JAX seeds in one vmapped "
        'program per preset and add a row "K seeds, one program": time per seed against a '
        "run alone (default: no such row)",
    )
    # Every other Config field overrides every preset; --out and --seed belong to the bench,
    # and its runs keep no run folder, so there is nothing to checkpoint.
    configs.add_config_args(p, skip=("name", "out", "seed", "config", "loop", "checkpoint_every"))
    p.add_argument(
        "--checkpoint-every", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
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
        preset_args = argparse.Namespace(**{**vars(args), "config": name})
        try:
            cfgs.append(configs.config_from_args(preset_args))
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
    if args.runs is not None and not 1 <= args.runs <= MAX_RUNS:
        parser.error(f"--runs takes 1 to {MAX_RUNS} rounds, got {args.runs}")
    if args.max_seconds is not None and not 0 < args.max_seconds <= MAX_SECONDS:  # NaN too
        parser.error(
            f"--max-seconds must be a number of seconds in (0, {MAX_SECONDS:.0f}] (a week), "
            f"got {args.max_seconds}"
        )
    if not 0.0 < args.target <= 1.0:
        parser.error(f"--target is an accuracy in (0, 1], e.g. 0.94; got {args.target}")
    if args.vmap_seeds is not None and not 2 <= args.vmap_seeds <= MAX_VMAP_SEEDS:
        parser.error(
            f"--vmap-seeds takes K from 2 to {MAX_VMAP_SEEDS} seeds (leave it out for no "
            f"such row), got {args.vmap_seeds}"
        )
    if args.vmap_seeds and "jax" not in names:
        parser.error("--vmap-seeds is a JAX row: add jax to --frameworks")
    if "torch" not in names and (args.torch_compile is not None or args.torch_compile_mode):
        flag = ("--torch-compile-mode" if args.torch_compile_mode
                else "--torch-compile" if args.torch_compile else "--no-torch-compile")  # fmt: skip
        parser.error(f"{flag} applies to the PyTorch contender: add torch to --frameworks")
    if getattr(args, "checkpoint_every", 0):
        parser.error(
            "--checkpoint-every: the bench's runs keep no run folder, so there is nothing to "
            "checkpoint or resume; drop the flag (a stopped bench keeps bench.json)"
        )
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
        vmap_seeds=args.vmap_seeds or 0,
    )


def load_data(cfgs: Sequence[configs.Config]) -> dict[str, Any]:
    """Each preset's data, from one load per dataset (host memory); a problem is bad input."""
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
            raise ValueError(f"cannot load {cfg.dataset}: {e}") from None
    return out


def race(b: Bench) -> bool:
    """Every phase of the race, the files written however it ends; whether the watchdog cut
    it short. Ctrl-C and SIGTERM propagate, for `stopped` to write the files."""
    try:
        b.race()
    except BudgetExceeded as e:
        b.doc["stop_reason"] = f"watchdog: {e}"
        b.close(complete=False)
        return True
    except KeyboardInterrupt:
        raise
    except BaseException:
        b.doc["stop_reason"] = b.doc["stop_reason"] or "stopped by an error"
        b.close(complete=False)
        raise
    b.close(complete=True)
    return False


def stopped(b: Bench, word: str) -> str:
    """Ctrl-C or SIGTERM during the race: the files from what finished, and where they are."""
    reason = "terminated (SIGTERM)" if word == "terminated" else "interrupted (Ctrl-C)"
    b.doc["stop_reason"] = reason
    b.close(complete=False)
    return f"{word}; partial results in {b.opts.out / 'bench.json'}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the race, print the tables, write bench.json and bench-<preset>.png to --out."""
    budget = Budget()  # the clock starts first; the limit is set after parsing
    return run_command(lambda cmd: _main(cmd, argv, budget))


def _main(cmd: Command, argv: Sequence[str] | None, budget: Budget) -> int:
    """The command's body: every input checked before the race, then the race."""
    opts = parse_args(argv)
    if opts.max_seconds is not None:
        budget.seconds = opts.max_seconds
    # Before JAX is imported: let both frameworks allocate GPU memory on demand.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    command = " ".join([PROG, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    cmd.on_stop = lambda word: f"{word} before the race started; nothing written to {opts.out}"
    # Trainers, output places and data (cheapest refusal first); --profile before --out, so
    # a refused --profile leaves the old results in place.
    trainers = frameworks.load_trainers(opts.frameworks, opts.cfgs, opts.torch_compile_mode)
    if opts.profile is not None:
        cmd.prepare_out(opts.profile, (), overwrite=False, flag="--profile")
    cmd.prepare_out(opts.out, BENCH_FILES, overwrite=opts.overwrite)
    data = load_data(opts.cfgs)
    b = Bench(opts, trainers, data, command, budget, log=lambda m: print(m, flush=True))
    cmd.on_stop = lambda word: stopped(b, word)
    cmd.inputs_checked()
    names = ", ".join(e.name for e in b.entries)
    plan = f"{opts.runs} rounds" if opts.runs is not None else "rounds while they fit"
    limit = f" within {opts.max_seconds:.0f} s" if opts.max_seconds is not None else ""
    print(
        f"bench {', '.join(c.name for c in opts.cfgs)}: {names}; a warm-up each (one untimed "
        f"training run, compilation included), then {plan}{limit} -> {opts.out}",
        flush=True,
    )
    if race(b):
        # A run cut off mid-way can leave compilation or device work in flight, whose
        # teardown at interpreter exit is not safe (XLA:CPU has crashed there). Every
        # result is written and flushed, so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
