"""`python -m parity`: run the parity suite, print the table, write the report; exit 0 iff all pass.

Exit codes: 0 every check passed; 1 a check failed (for `--plant`, that is the
expected outcome, and the verdict line names the check that caught it); 2 bad input
(nothing written); 130 Ctrl-C, 143 SIGTERM (one line, nothing written; `jaxbench.command`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from jaxbench import configs
from jaxbench.command import BAD_INPUT, Command, run_command
from jaxbench.configs import MAX_EPOCHS, PRESETS, Config, OneLineErrorParser, get_config
from jaxbench.threads import MAX_THREADS

MAX_SEEDS = 1000  # check 7's seeds per framework: more says nothing a thousand do not


def build_parser() -> argparse.ArgumentParser:
    from parity.plants import PLANTS

    p = OneLineErrorParser(
        prog="python -m parity",
        description="Check that jaxbench (JAX) and torch_ref (PyTorch) are the same training.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="narrow widths for checks 2-6 and a reduced tiny config for check 7 "
        "(under 5 minutes on a 2-core CPU)",
    )
    p.add_argument("--data-dir", help="CIFAR-10 folder (else $JAXBENCH_DATA_DIR)")
    p.add_argument(
        "--out", default="parity_out", help="folder for parity.json, the report, the plot"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace parity.json, parity_report.md and curves.png already in --out",
    )
    p.add_argument(
        "--plant",
        metavar="NAME",
        help=f"run checks 1-6 against a planted bug: {', '.join(PLANTS)}",
    )
    p.add_argument(
        "--config",
        choices=sorted(PRESETS),
        help="preset (default tiny; with --plant, the preset that plant breaks)",
    )
    p.add_argument("--checks", help="which checks, e.g. 1-6 or 2,5 (default: all)")
    p.add_argument("--seeds", type=int, help=f"seeds per framework for check 7, 1 to {MAX_SEEDS}")
    p.add_argument(
        "--epochs", type=int, help=f"epochs for check 7, 1 to {MAX_EPOCHS} (default: preset)"
    )
    p.add_argument(
        "--subset",
        type=int,
        metavar="N",
        help="training images for check 7, at least one batch (default: 8,000 with --quick, "
        "6,000 for the speedrun net; else the preset's): fewer is quicker and less powerful",
    )
    p.add_argument("--quiet", action="store_true", help="only the table and the verdict")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"CPU threads (1 to {MAX_THREADS}) for XLA:CPU (PJRT_NPROC) and PyTorch (intra- "
        "and inter-op); default: XLA uses every core, PyTorch its default (1 in --quick)",
    )
    return p


def setup_threads(argv: Sequence[str]) -> dict[str, Any] | None:
    """Apply `--threads N` before JAX starts (build_parser imports it, via the plants); a value
    that is not a number is left for build_parser's usage error."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads")
    text = pre.parse_known_args(argv)[0].threads
    try:
        n = int(text)
    except (TypeError, ValueError):
        return None
    from jaxbench.threads import limit_threads

    return limit_threads(n)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m parity`; exit codes in the module docstring."""
    args = sys.argv[1:] if argv is None else list(argv)
    return run_command(lambda cmd: _main(cmd, args), errors={**BAD_INPUT, RuntimeError: 2})


def _main(cmd: Command, argv: list[str]) -> int:
    """Check the flags, --out and the data, then run the suite (results come at the end)."""
    setup_threads(argv)
    args = build_parser().parse_args(argv)
    cmd.on_stop = lambda word: f"{word}; nothing written to {args.out} (results come at the end)"
    plant = None
    if args.plant is not None:
        from parity.plants import get_plant, running_planted

        plant = get_plant(args.plant)
        if plant.edit is not None and running_planted() != plant.name:
            return _run_source_plant(plant, argv)
    from parity.suite import load_data, parse_checks

    checks = parse_checks(args.checks) if args.checks else None
    cfg = get_config(args.config or (plant.config if plant else "tiny"))  # a plant's own preset
    for flag, value, top, unit in (
        ("--seeds", args.seeds, MAX_SEEDS, " seeds per framework"),
        ("--epochs", args.epochs, MAX_EPOCHS, ""),
        ("--subset", args.subset, configs.DATASET_IMAGES[cfg.dataset][0], " training images"),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1")
        if value is not None and value > top:
            raise ValueError(f"{flag} must be in [1, {top}]{unit}, got {value}")
    if args.subset is not None:  # at least check 7's batch: refused now, not after checks 1-6
        from parity.checks import Context, curves

        ctx = Context(cfg, None, quick=args.quick, epochs=args.epochs)  # type: ignore[arg-type]
        if args.subset < (batch := curves.curve_config(ctx)[0].batch_size):
            raise ValueError(
                f"--subset must be at least check 7's batch ({batch}), got {args.subset}"
            )
    # before the data loads and the suite runs: a bad --out costs nothing
    cmd.prepare_out(args.out, PARITY_FILES, overwrite=args.overwrite)
    data = load_data(args.data_dir, cfg.dataset)
    cmd.inputs_checked()
    with tempfile.TemporaryDirectory(prefix="parity-xla-") as folder:
        import jax

        if jax.config.jax_compilation_cache_dir is None:  # share compilations between seeds
            jax.config.update("jax_compilation_cache_dir", folder)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        return _run(args, cfg, checks, data)


def _run_source_plant(plant: Any, argv: Sequence[str]) -> int:
    """Run this command again on a copy of the packages with the plant's edit applied."""
    from parity.plants import PLANTED_ENV, planted_tree

    with planted_tree(plant) as tree:
        env = {**os.environ, PLANTED_ENV: plant.name, "PYTHONPATH": str(tree)}
        # -P: the packages come from the copy, not from this folder (where paths stay valid).
        # The child has its own process group, so Ctrl-C reaches it once, from here.
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "parity", *argv], env=env, process_group=0
        )
        previous = {
            s: signal.signal(s, lambda signum, _: proc.send_signal(signum))
            for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            return proc.wait()  # the child's code: 130 or 143 after its own line
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


PARITY_FILES: tuple[str, ...] = ("parity.json", "parity_report.md", "curves.png")


def _run(args: argparse.Namespace, cfg: Config, checks: tuple[int, ...] | None, data: Any) -> int:
    """Run the checks, print the table and the verdict, write the report."""
    from parity import report
    from parity.suite import run_suite

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if data is None:
        log("no --data-dir or JAXBENCH_DATA_DIR: checks 2-6 use random images, check 7 fails")
    suite = run_suite(
        cfg,
        quick=args.quick,
        data=data,
        checks=checks,
        plant=args.plant,
        seeds=args.seeds,
        epochs=args.epochs,
        subset=args.subset,
        threads=args.threads,
        log=log,
    )
    print(report.format_table(suite))
    for path in report.write_outputs(suite, args.out):
        log(f"wrote {path}")
    print(suite.verdict())
    return 0 if suite.passed else 1


if __name__ == "__main__":
    sys.exit(main())
