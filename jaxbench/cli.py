"""The command line both trainers share (`jaxbench.train`, `torch_ref.train`): flags, checks,
the last line. Exit codes: 0 done, 1 diverged, 2 bad input, 130 Ctrl-C, 143 SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxbench import checkpoint, configs, driver
from jaxbench.command import BAD_INPUT, EXIT_FAILED, Command, run_command
from jaxbench.configs import Config
from jaxbench.report import RUN_FILES


def trainer_parser(
    prog: str, description: str, *, vmap_seeds: bool = False
) -> argparse.ArgumentParser:
    """Config flags plus the run flags every trainer takes (`vmap_seeds`: `--vmap-seeds K`)."""
    parser = configs.OneLineErrorParser(prog=prog, description=description)
    configs.add_config_args(parser)
    parser.set_defaults(config=None)  # None: not given (the default preset, or a resumed run's)
    parser.add_argument(
        "--stream",
        choices=("fast", "shared"),
        help="fast (default): augmentation plan drawn on the device from the seed; shared: the "
        "framework-neutral numpy plan of jaxbench.stream (the same batches in both trainers)",
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the stopped run in DIR (its --out) from its latest checkpoint "
        "(see --checkpoint-every), with the config saved there; DIR becomes --out. A "
        "finished run is left as it is; one still running on this machine is refused",
    )
    parser.add_argument(
        "--re-evaluate",
        action="store_true",
        help="with --resume of a finished run: run it again from its latest checkpoint "
        "(the epochs after it and the final evaluation) and rewrite its files",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar within each epoch"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run files (config.json, metrics.jsonl, status.json, summary.json, "
        "seeds.json, checkpoints) already in --out",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="write a profiler trace of the timed epochs to DIR (open it in Perfetto or "
        "TensorBoard) and add a table of the top operations by time to the summary",
    )
    if vmap_seeds:
        parser.add_argument(
            "--vmap-seeds",
            type=int,
            default=1,
            metavar="K",
            help=f"train K (1 to {configs.MAX_VMAP_SEEDS}) seeds (--seed, --seed + 1, ...) in "
            "one vmapped program and print each seed's final accuracy and their mean; --out "
            "then gets config.json, status.json and seeds.json",
        )
    return parser


def run_trainer(
    args: argparse.Namespace,
    *,
    check_supported: Callable[[Config], None],
    train: Callable[..., dict[str, Any]],
    compile_label: str,
    train_seeds: Callable[..., dict[str, Any]] | None = None,
    join: Callable[[argparse.Namespace], None] | None = None,
    **train_kwargs: Any,
) -> int:
    """Check the flags and output places, load the data, train, print the last line; 0, or
    SystemExit(1 diverged, 2 bad input). `join(args)` starts several processes first;
    `train_seeds(cfg, seeds, data, workdir)` serves `--vmap-seeds K`."""

    def body(cmd: Command) -> int:
        """Every check and output place first, then the data and the run."""
        if join is not None:
            join(args)
        k = getattr(args, "vmap_seeds", 1)
        if not 1 <= k <= configs.MAX_VMAP_SEEDS:
            raise ValueError(
                f"--vmap-seeds {k}: give K in [1, {configs.MAX_VMAP_SEEDS}] seeds per program"
            )
        if k > 1 and (args.resume is not None or args.profile is not None):
            raise ValueError("--vmap-seeds runs without --resume and --profile")
        if args.re_evaluate and args.resume is None:
            raise ValueError("--re-evaluate goes with --resume DIR: drop it, or name the run")
        try:
            cfg, stream = _config(cmd, args, check_supported)
        except driver.Finished as e:  # --resume of a finished run: nothing to do
            if not args.quiet:
                print(e)
            return 0
        if k > 1 and cfg.checkpoint_every:
            raise ValueError("--vmap-seeds writes no checkpoints; drop --checkpoint-every")
        if cfg.seed + k > configs.SEEDS:
            raise ValueError(
                f"--vmap-seeds {k} from --seed {cfg.seed} goes past the largest seed, "
                f"{configs.SEEDS - 1}; lower --seed"
            )
        if args.profile is not None:  # before --out, whose --overwrite removes files
            cmd.prepare_out(args.profile, (), overwrite=False, flag="--profile")
        if cfg.out is not None and args.resume is None:  # a run's files, or --vmap-seeds' seeds
            cmd.prepare_out(cfg.out, (*RUN_FILES, "seeds.json"), overwrite=args.overwrite)
        cmd.on_stop = lambda word: _stop_line(word, cfg.out)
        from jaxbench.data import load_dataset

        data = load_dataset(cfg)
        if k > 1:
            assert train_seeds is not None
            result = train_seeds(cfg, range(cfg.seed, cfg.seed + k), data, cfg.out)
            if not args.quiet:
                _print_seeds(result, cfg.out)
            return 0
        kwargs = train_kwargs if args.resume is None else {**train_kwargs, "resume": args.resume}
        summary = train(cfg, cfg.out, data=data, stream=stream, progress=not args.no_progress,
                        quiet=args.quiet, profile_dir=args.profile, **kwargs)  # fmt: skip
        if not args.quiet:
            print(
                f"final {_accuracies(summary['final'])}; {summary['total_time_seconds']:.1f} s "
                f"timed ({summary['images_per_second']:.0f} img/s),"
                f" {summary['compile_seconds']:.1f} s {compile_label}"
            )
            if cfg.out is not None:
                print(f"wrote config.json, metrics.jsonl, status.json, summary.json to {cfg.out}")
        return 0

    code = run_command(body, errors={FloatingPointError: EXIT_FAILED, **BAD_INPUT})
    if code:
        raise SystemExit(code)
    return 0


def _config(
    cmd: Command, args: argparse.Namespace, check_supported: Callable[[Config], None]
) -> tuple[Config, str]:
    """(config, stream) from the flags, or from the run `--resume` names."""
    resume, stream = args.resume, args.stream or "fast"
    if resume is not None:
        cmd.prepare_out(resume, RUN_FILES, overwrite=args.overwrite, flag="--resume", resume=True)
        try:
            saved = configs.config_from_dict(json.loads((Path(resume) / "config.json").read_text()))
        except OSError as e:
            raise ValueError(f"--resume {resume}: cannot read its config.json ({e})") from None
        cfg = configs.resumed_config(args, saved, resume)
        driver.check_resume(resume, re_evaluate=args.re_evaluate)  # after flag checks
        _, progress = checkpoint.read_latest(resume)
        stream = args.stream or progress.get("stream", "fast")
    else:
        cfg = configs.config_from_args(args)
    check_supported(cfg)
    if cfg.data_dir is None and os.environ.get("JAXBENCH_DATA_DIR"):
        # config.json names the folder the data came from, not `null`
        cfg = cfg.replace(data_dir=os.environ["JAXBENCH_DATA_DIR"])
    return cfg, stream


def _stop_line(word: str, out: str | None) -> str:
    """Ctrl-C's or SIGTERM's line: how far status.json says the run got."""
    if not out:
        return word
    try:
        status = json.loads((Path(out) / "status.json").read_text())
        return f"{word} after epoch {status['epochs_completed']}; partial results in {out}"
    except (OSError, ValueError, KeyError):
        return f"{word} before training started; nothing written to {out}"


def _accuracies(final: dict[str, Any]) -> str:
    ema = final["ema_val_acc"]
    shown = f", ema_val_acc {100 * ema:.2f}%" if ema is not None else ""
    return f"val_acc {100 * final['val_acc']:.2f}%{shown}"


def _print_seeds(result: dict[str, Any], out: str | None) -> None:
    """A line per seed, then their mean (each seed's EMA accuracy where it has one)."""
    accs = []
    for s in result["seeds"]:
        f = s["final"]
        accs.append(f["ema_val_acc"] if f["ema_val_acc"] is not None else f["val_acc"])
        print(f"seed {s['seed']}: {_accuracies(f)}")
    spread = f" ± {100 * np.std(accs, ddof=1):.2f}" if len(accs) > 1 else ""
    print(
        f"{len(accs)} seeds in one program: mean {100 * np.mean(accs):.2f}%{spread}; "
        f"{result['total_time_seconds']:.1f} s timed, {result['compile_seconds']:.1f} s "
        "compiling"
    )
    if out is not None:
        print(f"wrote config.json, status.json, seeds.json to {out}")
