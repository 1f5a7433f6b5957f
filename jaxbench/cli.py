"""The command-line driver both trainers share: flags, errors, exit codes, last line.

`python -m jaxbench.train` and `python -m torch_ref.train` differ only in the
function they call and a flag or two, so the error handling and the exit
codes (0 done, 1 diverged, 2 bad input, 130 Ctrl-C, 143 SIGTERM) live here once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxbench import checkpoint
from jaxbench.command import (
    Terminated,
    exit_interrupted,
    prepare_output,
    raise_terminated,
    remove_if_empty,
)
from jaxbench.configs import (
    Config,
    OneLineErrorParser,
    add_config_args,
    config_from_args,
    config_from_dict,
    resumed_config,
)
from jaxbench.report import RUN_FILES, write_json


def trainer_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Config flags plus the run flags every trainer takes."""
    parser = OneLineErrorParser(prog=prog, description=description)
    add_config_args(parser)
    parser.set_defaults(config=None)  # None: not given (the default preset, or a resumed run's)
    parser.add_argument(
        "--stream",
        choices=("fast", "shared"),
        default=None,
        help="fast (default): augmentation plan drawn on the device from the seed; shared: the "
        "framework-neutral numpy plan of jaxbench.stream (the same batches in both trainers)",
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the stopped run in DIR (its --out) from its latest checkpoint "
        "(see --checkpoint-every), with the config saved there; DIR becomes --out",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bar within each epoch"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run files (config.json, metrics.jsonl, summary.json) already in --out",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="write a profiler trace of the timed epochs to DIR (open it in Perfetto or "
        "TensorBoard) and add a table of the top operations by time to the summary",
    )
    return parser


def _fail(message: object, code: int) -> SystemExit:
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(code)


def run_trainer(
    args: argparse.Namespace,
    *,
    check_supported: Callable[[Config], None],
    train: Callable[..., dict[str, Any]],
    compile_label: str,
    **train_kwargs: Any,
) -> int:
    """Build the config, load the data, train, print the final line; errors exit 1 or 2,
    Ctrl-C exits 130 with one line (see `_interrupted`)."""
    out = getattr(args, "out", None) or getattr(args, "resume", None)
    created = out is not None and not Path(out).exists()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        return _run_trainer(args, check_supported, train, compile_label, train_kwargs)
    except KeyboardInterrupt as e:
        _interrupted(out, created, terminated=isinstance(e, Terminated))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 130  # not reached


def _interrupted(out: str | None, created: bool, terminated: bool) -> None:
    """One line, then exit 130 (Ctrl-C) or 143 (SIGTERM). The trainers have already
    marked status.json "interrupted"; without one the run never started, and a folder
    this command made is removed again."""
    what, code = ("terminated", 143) if terminated else ("interrupted", 130)
    if not out:
        exit_interrupted(what, code)
    try:
        status = json.loads((Path(out) / "status.json").read_text())
        where = f"after epoch {status['epochs_completed']}; partial results in {out}"
    except (OSError, ValueError, KeyError):
        if created:
            remove_if_empty(out)
        where = f"before training started; nothing written to {out}"
    exit_interrupted(f"{what} {where}", code)


def _run_trainer(
    args: argparse.Namespace,
    check_supported: Callable[[Config], None],
    train: Callable[..., dict[str, Any]],
    compile_label: str,
    train_kwargs: dict[str, Any],
) -> int:
    created = False
    resume = getattr(args, "resume", None)
    stream = args.stream or "fast"
    try:
        if resume is not None:  # before the data loads: a bad folder costs nothing
            prepare_output(
                resume, RUN_FILES, overwrite=args.overwrite, flag="--resume", resume=True
            )
            saved = config_from_dict(json.loads((Path(resume) / "config.json").read_text()))
            cfg = resumed_config(args, saved, resume)
            _, progress = checkpoint.read_latest(resume)
            stream = args.stream or progress.get("stream", "fast")
            train_kwargs = {**train_kwargs, "resume": resume}
        else:
            cfg = config_from_args(args)
        check_supported(cfg)
        if cfg.data_dir is None and os.environ.get("JAXBENCH_DATA_DIR"):
            # config.json names the folder the data came from, not `null`
            cfg = cfg.replace(data_dir=os.environ["JAXBENCH_DATA_DIR"])
        if cfg.out is not None and resume is None:
            created = not Path(cfg.out).exists()
            prepare_output(cfg.out, RUN_FILES, overwrite=args.overwrite)
    except ValueError as e:
        raise _fail(e, 2) from None
    except OSError as e:
        raise _fail(f"--resume {resume}: cannot read its config.json ({e})", 2) from None
    try:
        from jaxbench.data import load_dataset

        data = load_dataset(cfg)
    except (ValueError, OSError) as e:
        if created:  # leave no empty folder behind a run that never started
            with contextlib.suppress(OSError):
                Path(cfg.out).rmdir()
        raise _fail(e, 2) from None
    try:
        summary = train(
            cfg,
            cfg.out,
            data=data,
            stream=stream,
            progress=not args.no_progress,
            quiet=args.quiet,
            profile_dir=args.profile,
            **train_kwargs,
        )
    except FloatingPointError as e:
        raise _fail(e, 1) from None
    except ValueError as e:
        raise _fail(e, 2) from None
    if not args.quiet:
        f = summary["final"]
        ema = f["ema_val_acc"]
        print(
            f"final val_acc {100 * f['val_acc']:.2f}%"
            + (f", ema_val_acc {100 * ema:.2f}%" if ema is not None else "")
            + f"; {summary['total_time_seconds']:.1f} s timed"
            f" ({summary['images_per_second']:.0f} img/s),"
            f" {summary['compile_seconds']:.1f} s {compile_label}"
        )
        if cfg.out is not None:
            print(f"wrote config.json, metrics.jsonl, status.json, summary.json to {cfg.out}")
    return 0


def run_seeds(
    args: argparse.Namespace,
    *,
    check_supported: Callable[[Config], None],
    train_seeds: Callable[..., dict[str, Any]],
) -> int:
    """`--vmap-seeds K`: K seeds in one program (`jaxbench.train.train_seeds`), a line per
    seed and their mean; --out gets config.json and seeds.json. Exit codes as `run_trainer`."""
    from jaxbench.data import load_dataset

    out = None
    try:
        if args.vmap_seeds < 1:
            raise ValueError(f"--vmap-seeds {args.vmap_seeds}: give K >= 1")
        if args.resume is not None or args.profile is not None:
            raise ValueError("--vmap-seeds runs without --resume and --profile")
        cfg = config_from_args(args)
        check_supported(cfg)
        if cfg.checkpoint_every:
            raise ValueError("--vmap-seeds writes no checkpoints; drop --checkpoint-every")
        out = cfg.out
        created = out is not None and not Path(out).exists()
        if out is not None:
            prepare_output(out, ("config.json", "seeds.json"), overwrite=args.overwrite)
        data = load_dataset(cfg)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = train_seeds(cfg, range(cfg.seed, cfg.seed + args.vmap_seeds), data)
    except KeyboardInterrupt:
        if out is not None and created:
            remove_if_empty(out)
        exit_interrupted(f"interrupted; nothing written to {out}" if out else "interrupted")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    accs = []
    for s in result["seeds"]:
        f = s["final"]
        acc = f["ema_val_acc"] if f["ema_val_acc"] is not None else f["val_acc"]
        accs.append(acc)
        if not args.quiet:
            ema = f["ema_val_acc"]
            shown = f", ema_val_acc {100 * ema:.2f}%" if ema is not None else ""
            print(f"seed {s['seed']}: val_acc {100 * f['val_acc']:.2f}%{shown}")
    if not args.quiet:
        spread = f" ± {100 * np.std(accs, ddof=1):.2f}" if len(accs) > 1 else ""
        print(
            f"{len(accs)} seeds in one program: mean {100 * np.mean(accs):.2f}%{spread}; "
            f"{result['total_time_seconds']:.1f} s timed, {result['compile_seconds']:.1f} s "
            "compiling"
        )
    if out is not None:
        write_json(Path(out) / "config.json", cfg.to_dict())
        write_json(Path(out) / "seeds.json", result)
        if not args.quiet:
            print(f"wrote config.json, seeds.json to {out}")
    return 0
