"""Race `jaxbench` against `torch_ref` on one machine: `python -m jaxbench.bench`.

One command for a user who rents a GPU by the minute and wants the whole
comparison: several presets (`--config resnet9,speedrun`), both frameworks,
JAX's loop choice (`--loop scan,step`), within a wall-clock budget
(`--max-seconds`), with profiles on request (`--profile DIR`).

Order of work (docs/benchmark.md):
1. The dataset is loaded once into host memory and handed to every run.
2. Per preset and contender, one untimed warm-up run (seed `WARMUP_SEED`): it
   compiles (JAX: `jit(...).lower().compile()` into a `CompileCache` shared by
   later runs; PyTorch: `torch.compile` and a warm-up step, once per process),
   autotunes and grows the allocators. Then the self-checks: JAX's program as
   exported for the GPU (`jaxbench.program`), XLA's executed FLOPs against the
   counted ones, and on CUDA PyTorch's timed steps under sync-debug mode.
3. Rounds: one timed run of every contender of every preset, seed = round
   index, the order alternating each round (ABAB, who goes first alternates),
   until `--runs` rounds or the budget says the next round would not fit
   (`jaxbench.budget`). Every contender so has the same seeds.
4. With `--profile`: one more run per contender under the profilers.
Results are written atomically after every run (a kill leaves valid JSON).

What is timed is each trainer's `total_time_seconds`: data-dependent
initialisation, every training step and the final evaluation with TTA, with a
device synchronisation before each clock read; compilation and the per-epoch
monitoring evaluations are excluded (docs/design.md).

Both frameworks run in this one process; `main` sets
`XLA_PYTHON_CLIENT_PREALLOCATE=false` (unless the caller set it) before JAX is
imported, so JAX does not reserve 75% of the GPU before PyTorch runs.

Statistics: mean, sample std (ddof=1), min and max over runs; the time ratio
of means has a 95% interval from the delta method on the log ratio with
Welch's degrees of freedom (`ratio_ci`). A race whose contenders do not both
reach `--target` on average has no winner: "target not reached", no ratio.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from jaxbench import configs, flops, report
from jaxbench.budget import SAFETY, SLACK_S, Budget, BudgetExceeded, Watchdog, fits, round_order
from jaxbench.stream import steps_per_epoch

FRAMEWORKS: tuple[str, ...] = ("jax", "torch")
LOOPS: tuple[str, ...] = ("auto", "scan", "step")
SCHEMA_VERSION = 2
WARMUP_SEED = 1000  # never a timed seed (timed seeds are the round indices 0, 1, ...)
DEFAULT_RUNS = 5  # rounds when neither --runs nor --max-seconds is given
BENCH_FILES: tuple[str, ...] = ("bench.json", "bench-*.png")
PROFILE_OVERHEAD = 2.0  # a profiled run's wall, predicted as this x a timed run's
CI_LEVEL = 0.95
RATIO_METHOD = (
    "ratio of mean times; 95% CI = ratio * exp(+-t * se), se^2 = s_a^2/(n_a m_a^2) + "
    "s_b^2/(n_b m_b^2) (delta method on the log ratio), t from Student's t with "
    "Welch-Satterthwaite degrees of freedom"
)
TIME_DEFINITION = (
    "trainer's total_time_seconds: data-dependent init + every training step + final "
    "evaluation with TTA; compilation, data loading and per-epoch monitoring excluded"
)
THROUGHPUT_DEFINITION = (
    "images_per_second = epochs * full batches * batch_size / time_seconds; "
    "tflops_per_second = counted FLOPs of those training steps (3x forward) plus the final "
    "evaluation (test images x weight sets x one forward per TTA view) / time_seconds"
)

# Set-up keys the trainers report beside the contract's summary keys; kept per framework.
TRAINER_INFO_KEYS: tuple[str, ...] = (
    "environment",
    "device",
    "precision",
    "compute_dtype",
    "loop",
    "stream",
    "compile",
    "torch_setup",
)

Trainer = Callable[..., dict[str, Any]]


# --- statistics -------------------------------------------------------------------------


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std (ddof=1; None for one value), min and max of `values`."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("describe() needs at least one value")
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else None,
        "min": float(x.min()),
        "max": float(x.max()),
    }


def share_at_least(values: Sequence[float], target: float) -> tuple[int, float]:
    """(count, fraction) of values >= target; the record-holders' 'share of runs >= 94%'."""
    x = np.asarray(values, dtype=np.float64)
    k = int(np.sum(x >= target))
    return k, k / x.size


def ratio_ci(
    numerator: Sequence[float], denominator: Sequence[float], level: float = CI_LEVEL
) -> dict[str, Any]:
    """Ratio of means with a confidence interval from the run-to-run spread.

    The log of a ratio of means is a difference of two independent log-means;
    by the delta method Var(log mean) ~= s^2 / (n * mean^2). The interval is
    symmetric on the log scale (so it never crosses zero) and uses Student's t
    with Welch-Satterthwaite degrees of freedom, which matters for n ~ 2..10.
    With fewer than two runs on either side there is no spread: `ci` is None.
    """
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("ratio_ci() needs at least one value on each side")
    ma, mb = float(a.mean()), float(b.mean())
    out: dict[str, Any] = {"value": ma / mb, "level": level, "ci": None, "se_log": None, "df": None}
    if a.size < 2 or b.size < 2:
        return out
    va = float(a.var(ddof=1)) / (a.size * ma**2)
    vb = float(b.var(ddof=1)) / (b.size * mb**2)
    se = math.sqrt(va + vb)
    if se == 0.0:
        out.update(ci=[out["value"], out["value"]], se_log=0.0)
        return out
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    from scipy.stats import t as student_t  # scipy ships with jax; imported only when needed

    q = float(student_t.ppf(0.5 + level / 2, df))
    out.update(
        ci=[out["value"] * math.exp(-q * se), out["value"] * math.exp(q * se)], se_log=se, df=df
    )
    return out


def headline_metric(cfg: configs.Config) -> str:
    """The accuracy the benchmark ranks by: the EMA copy's when the recipe keeps one."""
    return "ema_val_acc" if cfg.ema_every > 0 else "val_acc"


def describe_metric(cfg: configs.Config) -> str:
    weights = "EMA weights" if cfg.ema_every > 0 else "trained weights"
    tta = ("flip + shift TTA" if cfg.tta_shift else "flip TTA") if cfg.tta else "no TTA"
    return f"final {headline_metric(cfg)} ({weights}, {tta})"


def mean_curve(epoch_rows: Sequence[Sequence[dict[str, Any]]], metric: str) -> list[dict]:
    """Per epoch, the mean over runs of `metric` and of the cumulative timed seconds.

    Built from the trainers' per-epoch monitoring rows; epochs that not every
    run logged are dropped, and a value any run left empty stays None.
    """
    if not epoch_rows:
        return []
    length = min(len(rows) for rows in epoch_rows)
    curve = []
    for i in range(length):
        rows = [r[i] for r in epoch_rows]
        point: dict[str, Any] = {"epoch": rows[0].get("epoch", i + 1)}
        for key, name in ((metric, "accuracy"), ("total_time_seconds", "time_seconds")):
            vals = [r.get(key) for r in rows]
            point[name] = None if any(v is None for v in vals) else float(np.mean(vals))
        curve.append(point)
    return curve


def first_epoch_at(curve: Sequence[dict[str, Any]], target: float) -> int | None:
    """The first epoch whose mean accuracy reaches `target`, or None if none does."""
    for point in curve:
        if point["accuracy"] is not None and point["accuracy"] >= target:
            return int(point["epoch"])
    return None


# --- one framework ------------------------------------------------------------------------


def timed_work(
    cfg: configs.Config, n_train: int, n_test: int, weight_sets: int | None = None
) -> tuple[int, int]:
    """(training images, counted FLOPs) inside one run's timed region.

    Training: epochs x full batches; the final evaluation scores every test
    image once per weight set the trainer scored (`final_eval_weight_sets`:
    net and EMA, or one net when lookahead made them equal; by default 2 with
    an EMA, else 1).
    """
    images = cfg.epochs * steps_per_epoch(cfg, n_train) * cfg.batch_size
    if weight_sets is None:
        weight_sets = 2 if cfg.ema_every > 0 else 1
    work = images * flops.train_flops_per_image(cfg)
    return images, work + n_test * weight_sets * flops.eval_flops_per_image(cfg)


def run_record(
    summary: dict[str, Any], cfg: configs.Config, n_train: int, n_test: int
) -> dict[str, Any]:
    """The numbers the benchmark keeps from one trainer summary.

    Throughput is computed here, not taken from the trainer, so that both
    frameworks share one definition: training images (and counted FLOPs) per
    timed second. The trainer's own figure is kept as `trainer_images_per_second`.
    """
    final = summary["final"]
    time_s = float(summary["total_time_seconds"])
    images, work = timed_work(cfg, n_train, n_test, summary.get("final_eval_weight_sets"))
    rec = {
        "seed": summary.get("seed", cfg.seed),
        "accuracy": float(final[headline_metric(cfg)]),
        "time_seconds": time_s,
        "compile_seconds": summary.get("compile_seconds"),
        "images_per_second": images / time_s if time_s > 0 else None,
        "tflops_per_second": work / time_s / 1e12 if time_s > 0 else None,
        "trainer_images_per_second": summary.get("images_per_second"),
        "devices": summary.get("devices", 1),  # data-parallel devices of the run
        "date": summary.get("environment", {}).get("date"),
        "epochs": summary.get("epochs", []),
    }
    for key in ("val_acc", "ema_val_acc", "val_loss", "train_loss", "train_acc"):
        rec[key] = final.get(key)
    # Did this run build its programs? JAX: compiled (vs reused from the cache);
    # PyTorch: ran its compile/autotune warm-up. Dynamo compiles inside the clock must be 0.
    built = summary.get("compiled", summary.get("warmup_ran"))
    rec["built_programs"] = None if built is None else bool(built)
    rec["dynamo_compiles"] = summary.get("dynamo_compiles")
    rec["loop"] = summary.get("loop")
    return rec


def _mean_of(records: Sequence[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in records if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def summarize(
    records: Sequence[dict[str, Any]],
    warmup: dict[str, Any] | None,
    cfg: configs.Config,
    target: float,
) -> dict[str, Any]:
    """Mean/std/min/max of accuracy and time, share >= target, curve, compile, rates."""
    accs = [r["accuracy"] for r in records]
    k, share = share_at_least(accs, target)
    curve = mean_curve([r["epochs"] for r in records], headline_metric(cfg))
    return {
        "runs": len(records),
        "accuracy": describe(accs),
        "time_seconds": describe([r["time_seconds"] for r in records]),
        "runs_at_target": k,
        "share_at_target": share,
        "epoch_reaching_target": first_epoch_at(curve, target),
        "mean_curve": curve,
        "compile_seconds": {
            "warmup": None if warmup is None else warmup["compile_seconds"],
            "timed_runs_mean": _mean_of(records, "compile_seconds"),
        },
        "images_per_second": _mean_of(records, "images_per_second"),
        "tflops_per_second": _mean_of(records, "tflops_per_second"),
        "devices": max((r.get("devices", 1) for r in records), default=1),
    }


def programs_built(runs: Sequence[dict[str, Any] | None]) -> int | None:
    """How many of these runs (warm-up included) built programs; 1 is the goal per preset."""
    flags = [r.get("built_programs") for r in runs if r is not None]
    if not flags or any(f is None for f in flags):
        return None
    return int(sum(flags))


def load_trainer(framework: str) -> Trainer:
    """Import a framework's `train_and_evaluate` only when it is raced."""
    try:
        if framework == "jax":
            from jaxbench.train import train_and_evaluate
        else:
            from torch_ref.train import train_and_evaluate
    except ImportError as e:
        extra = "" if framework == "jax" else "[torch]"
        raise RuntimeError(
            f"--frameworks {framework}: cannot import its trainer ({e}); "
            f"install it with pip install -e .{extra}"
        ) from None
    return train_and_evaluate


@dataclass(frozen=True)
class Entry:
    """One contender: a framework, and for JAX possibly a fixed loop (`--loop scan,step`)."""

    name: str  # "jax", "torch", or "jax-scan" / "jax-step" when several loops race
    framework: str
    loop: str | None = None  # None: the trainer's own choice

    def config(self, cfg: configs.Config) -> configs.Config:
        return cfg if self.loop is None else cfg.replace(loop=self.loop)


def make_entries(frameworks: Sequence[str], loops: Sequence[str]) -> tuple[Entry, ...]:
    """The contenders: each framework once, JAX once per loop when several are asked for."""
    out: list[Entry] = []
    for fw in frameworks:
        if fw == "jax" and len(loops) > 1:
            out += [Entry(f"jax-{loop}", "jax", loop) for loop in loops]
        elif fw == "jax" and tuple(loops) != ("auto",):
            out.append(Entry("jax", "jax", loops[0]))
        else:
            out.append(Entry(fw, fw))
    return tuple(out)


def decide(
    runs: dict[str, Sequence[dict[str, Any]]], numerator: str, denominator: str, target: float
) -> dict[str, Any]:
    """The race between two contenders' timed runs: a time ratio, or no winner.

    Time-to-target only means something when both reach the target: if either
    contender's mean accuracy is below `target`, the verdict is "target not
    reached" and there is no ratio. Needs at least one timed run each.
    """
    out: dict[str, Any] = {"numerator": numerator, "denominator": denominator, "target": target}
    pair = (numerator, denominator)
    if any(not runs.get(n) for n in pair):
        return {**out, "status": "no runs", "ratio": None}
    means = {n: float(np.mean([r["accuracy"] for r in runs[n]])) for n in pair}
    below = {n: a for n, a in means.items() if a < target}
    if below:
        return {**out, "status": "target not reached", "below_target": below, "ratio": None}
    times = [[r["time_seconds"] for r in runs[n]] for n in pair]
    return {**out, "status": "ratio", "ratio": {**ratio_ci(*times), "method": RATIO_METHOD}}


# --- output ---------------------------------------------------------------------------------


def _pm(stat: dict[str, Any], digits: int) -> str:
    if stat["std"] is None:  # one run: no spread to show
        return f"{stat['mean']:.{digits}f} (1 run)"
    return f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"


def format_table(doc: dict[str, Any]) -> str:
    """The results table (plus FLOP rate and epoch-at-target), then the ratio line."""
    header = [
        "framework",
        "preset",
        "devices",
        "runs",
        "acc mean±std",
        ">=target",
        "time mean±std",
        "compile",
        "img/s",
        "TFLOP/s",
        "epoch>=target",
    ]
    header.append("built")
    rows = [header]
    for name, fw in doc["frameworks"].items():
        s = fw["summary"]
        if s is None:
            continue
        built = programs_built([fw["warmup"], *fw["runs"]])
        comp = s["compile_seconds"]["warmup"]
        ips, tf, ep = (
            s["images_per_second"],
            s["tflops_per_second"],
            s["epoch_reaching_target"],
        )
        rows.append(
            [
                name,
                doc["preset"],
                str(s.get("devices", 1)),
                str(s["runs"]),
                _pm(s["accuracy"], 4),
                f"{s['runs_at_target']}/{s['runs']}",
                _pm(s["time_seconds"], 2) + " s",
                "-" if comp is None else f"{comp:.1f} s",
                "-" if ips is None else f"{ips:.0f}",
                "-" if tf is None else f"{tf:.3g}",
                "-" if ep is None else str(ep),
                "-" if built is None else str(built),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"acc = {doc['accuracy_metric_description']}; target {doc['target']:.4f}; "
        "time = timed training + final evaluation; compile = warm-up run's"
    )
    lines.append(
        "built = runs that compiled their programs (JAX) or ran the compile/autotune warm-up "
        "(PyTorch), warm-up included: 1 means every timed run reused them"
    )
    v = doc.get("vmap_seeds")
    if v and "time_seconds" in v:
        alone = "-" if v["time_alone"] is None else f"{v['time_alone']:.2f} s"
        lines.append(
            f"{v['k']} seeds, one program ({v['contender']}): {v['time_seconds']:.2f} s, "
            f"{v['time_per_seed']:.2f} s per seed against {alone} for a run alone; "
            f"acc {_pm(v['accuracy'], 4)}"
        )
    elif v:
        lines.append(f"{v['k']} seeds, one program: {v.get('skipped') or v.get('error')}")
    for verdict in doc.get("verdicts", {}).values():
        lines.append(format_verdict(verdict, doc["preset"]))
    return "\n".join(lines)


_COLORS = {"jax": "tab:blue", "torch": "tab:orange"}


def plot(doc: dict[str, Any], path: Path) -> bool:
    """bench.png: accuracy vs time (one point per run, mean epoch curve) and vs epoch.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_t, ax_e = fig.subplots(1, 2)
    for name, fw in doc["frameworks"].items():
        if fw.get("summary") is None:
            continue
        color = _COLORS.get(name) if name in _COLORS else None
        runs = fw["runs"]
        ax_t.scatter(
            [r["time_seconds"] for r in runs],
            [r["accuracy"] for r in runs],
            color=color,
            label=f"{name}: final, one point per run",
            zorder=3,
        )
        curve = [p for p in fw["summary"]["mean_curve"] if p["accuracy"] is not None]
        if curve:
            if all(p["time_seconds"] is not None for p in curve):
                ax_t.plot(
                    [p["time_seconds"] for p in curve],
                    [p["accuracy"] for p in curve],
                    color=color,
                    marker=".",
                    alpha=0.6,
                    label=f"{name}: mean epoch curve",
                )
            ax_e.plot(
                [p["epoch"] for p in curve],
                [p["accuracy"] for p in curve],
                color=color,
                marker="o",
                label=name,
            )
    for ax in (ax_t, ax_e):
        ax.axhline(doc["target"], color="gray", linestyle="--", linewidth=1, label="target")
        ax.set_ylabel(doc["accuracy_metric"])
        ax.grid(alpha=0.3)
    ax_t.set_xlabel("timed seconds (cumulative)")
    ax_t.set_title(f"{doc['preset']}: accuracy vs time")
    ax_e.set_xlabel("epoch")
    ax_e.xaxis.get_major_locator().set_params(integer=True)
    ax_e.set_title("mean accuracy per epoch (monitoring evaluations)")
    ax_t.legend(fontsize=8)
    ax_e.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    report.atomic_write_bytes(path, buf.getvalue())
    return True


def format_verdict(verdict: dict[str, Any], preset: str) -> str:
    """One line: the time ratio with its interval, or why the race has no winner."""
    pair = f"{verdict['numerator']}/{verdict['denominator']} ({preset})"
    if verdict["status"] == "target not reached":
        below = ", ".join(f"{n} {a:.4f}" for n, a in verdict["below_target"].items())
        return (
            f"time ratio {pair}: target not reached (mean accuracy below "
            f"{verdict['target']:.4f}: {below}); no winner"
        )
    if verdict["status"] != "ratio":
        return f"time ratio {pair}: {verdict['status']}"
    ratio = verdict["ratio"]
    ci = ratio["ci"]
    span = "n/a (needs >= 2 runs each)" if ci is None else f"{ci[0]:.3f}..{ci[1]:.3f}"
    return (
        f"time ratio {pair}: {ratio['value']:.3f}, {100 * ratio['level']:.0f}% CI {span} "
        "(< 1: the numerator is faster)"
    )


# --- command line -------------------------------------------------------------------------


_Parser = configs.OneLineErrorParser


@dataclass(frozen=True)
class Options:
    cfgs: tuple[configs.Config, ...]  # one per preset, overrides applied
    frameworks: tuple[str, ...]
    loops: tuple[str, ...]
    runs: int | None  # None: as many rounds as --max-seconds allows
    target: float
    out: Path
    stream: str
    torch_compile: bool | None
    torch_compile_mode: str | None
    max_seconds: float | None
    profile: Path | None
    overwrite: bool = False
    vmap_seeds: int = 0  # >1: after the rounds, K JAX seeds in one program

    @property
    def entries(self) -> tuple[Entry, ...]:
        return make_entries(self.frameworks, self.loops)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m jaxbench.bench",
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


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Flags -> Options; any bad value exits 2 with one line naming the fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
    runs = args.runs if args.runs is not None or args.max_seconds is not None else DEFAULT_RUNS
    out = Path(args.out) if args.out else Path("bench-out") / "+".join(presets)
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


def _fail(message: str) -> NoReturn:
    print(f"python -m jaxbench.bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load_trainers(opts: Options) -> dict[str, Trainer]:
    """Import each trainer and let it refuse every config before any run starts."""
    trainers = {}
    cfgs = opts.cfgs
    for name in opts.frameworks:
        try:
            trainers[name] = load_trainer(name)
            if name == "torch" and opts.torch_compile_mode is not None:
                from torch_ref.fast import TorchSetup

                TorchSetup(compile_mode=opts.torch_compile_mode)  # a bad mode: ValueError
            check = getattr(sys.modules[trainers[name].__module__], "check_supported", None)
            if check is not None:
                for cfg in cfgs:
                    check(cfg)
        except (RuntimeError, ValueError) as e:
            _fail(f"{name}: {e}")
    return trainers


def _load_data(cfgs: Sequence[configs.Config]) -> dict[str, Any]:
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
            _fail(f"cannot load {cfg.dataset}: {e}")
    return out


def _error(e: BaseException) -> dict[str, Any]:
    tail = traceback.format_exception(type(e), e, e.__traceback__)[-3:]
    return {"error": f"{type(e).__name__}: {e}", "traceback_tail": "".join(tail)}


def _new_race(cfg: configs.Config, data: Any, opts: Options) -> dict[str, Any]:
    """One preset's part of bench.json before any run: what is raced and how it is measured."""
    return {
        "preset": cfg.name,
        "complete": False,
        "target": opts.target,
        "runs_per_framework": 0,
        "seeds": [],
        "accuracy_metric": headline_metric(cfg),
        "accuracy_metric_description": describe_metric(cfg),
        "time_definition": TIME_DEFINITION,
        "throughput_definition": THROUGHPUT_DEFINITION,
        "stream": opts.stream,
        "config": cfg.to_dict(),
        "n_train": int(len(data.train_labels)),
        "n_test": int(len(data.test_labels)),
        "flops": {
            "forward_per_image": flops.forward_flops_per_image(cfg),
            "train_per_image": flops.train_flops_per_image(cfg),
            "eval_per_image": flops.eval_flops_per_image(cfg),
            "convention": flops.CONVENTION,
        },
        "self_checks": {},
        "frameworks": {},
        "verdicts": {},
        "ratio": None,
    }


class Bench:
    """The whole command's state: budget, contenders, bench.json, and the runs so far."""

    def __init__(
        self,
        opts: Options,
        trainers: dict[str, Trainer],
        data: dict[str, Any],
        command: str,
        budget: Budget,
        log: Callable[[str], None] = print,
    ) -> None:
        self.opts = opts
        self.trainers = trainers
        self.data = data
        self.budget = budget
        self.log = log
        self.watchdog = Watchdog(budget, reserve=SLACK_S)  # the files are written in budget
        self.entries = list(opts.entries)
        self.caches: dict[str, Any] = {}  # JAX entry name -> CompileCache
        self.estimates: dict[tuple[str, str], float] = {}  # (preset, entry) -> wall seconds
        self.doc: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "complete": False,
            "command": command,
            "started": report.now_iso(),
            "finished": None,
            "elapsed_seconds": 0.0,
            "max_seconds": opts.max_seconds,
            "runs_requested": opts.runs,
            "target": opts.target,
            "presets": [c.name for c in opts.cfgs],
            "contenders": [vars(e) for e in self.entries],
            "dropped": {},
            "stop_reason": None,
            "order": [],
            "environment": None,
            "races": {c.name: _new_race(c, data[c.name], opts) for c in opts.cfgs},
            "files": ["bench.json"],
        }
        for cfg in opts.cfgs:
            for e in self.entries:
                self.doc["races"][cfg.name]["frameworks"][e.name] = {
                    "framework": e.framework,
                    "loop": e.loop,
                    "warmup": None,
                    "runs": [],
                    "trainer": {},
                    "summary": None,
                    "programs_built": None,
                    "error": None,
                    "profile": None,
                }

    # -- files
    def save(self) -> None:
        self.doc["elapsed_seconds"] = round(self.budget.elapsed(), 2)
        report.write_json(self.opts.out / "bench.json", self.doc)

    def _stamp(self) -> str:
        return f"[{self.budget.elapsed():7.1f}s]"

    # -- environment
    def record_environment(self) -> None:
        """Versions and settings; a framework that would run on the CPU beside a GPU is dropped
        (a full preset there would take the whole budget and say nothing of the GPU)."""
        env = report.environment(self.opts.frameworks)
        env["command"] = self.doc["command"]
        env["nvidia_smi"] = report.nvidia_smi()
        jax_gpu = env.get("jax_backend") in ("gpu", "cuda", "rocm")
        torch_gpu = env.get("torch_device") not in (None, "cpu")
        if env["nvidia_smi"].get("available") or jax_gpu or torch_gpu:
            if "jax" in self.opts.frameworks and not jax_gpu:
                self.drop("jax", f"no GPU backend (jax_backend={env.get('jax_backend')})")
            if "torch" in self.opts.frameworks and not torch_gpu:
                self.drop("torch", "torch.cuda.is_available() is False")
        env["settings_start"] = report.numeric_settings()
        self.doc["environment"] = env
        self.save()

    def drop(self, framework: str, reason: str) -> None:
        self.entries = [e for e in self.entries if e.framework != framework]
        self.doc["dropped"][framework] = reason
        self.log(f"{self._stamp()} {framework}: dropped: {reason}")

    # -- one run
    def call(self, cfg: configs.Config, entry: Entry, seed: int, **extra: Any) -> dict[str, Any]:
        """One trainer run (guarded by the watchdog); returns its summary."""
        kwargs: dict[str, Any] = {
            "data": self.data[cfg.name],
            "stream": self.opts.stream,
            "progress": False,
            "quiet": True,
            **extra,
        }
        if entry.framework == "torch":
            kwargs.update(_torch_kwargs(self.opts))
        else:
            if entry.name not in self.caches:
                from jaxbench.train import CompileCache

                self.caches[entry.name] = CompileCache()
            kwargs["compile_cache"] = self.caches[entry.name]
        run_cfg = entry.config(cfg).replace(seed=seed, out=None)
        with self.watchdog.guard():
            return self.trainers[entry.framework](run_cfg, None, **kwargs)

    def run(self, cfg: configs.Config, entry: Entry, seed: int, kind: str) -> dict[str, Any] | None:
        """A warm-up or timed run, recorded in bench.json; an error retires the contender."""
        race = self.doc["races"][cfg.name]
        fw = race["frameworks"][entry.name]
        t0 = self.budget.elapsed()
        try:
            summary = self.call(cfg, entry, seed)
        except BudgetExceeded:
            raise
        except Exception as e:  # one failure must not cost the rest of the race
            fw["error"] = {**_error(e), "seed": seed, "kind": kind}
            self.log(
                f"{self._stamp()} {cfg.name} {entry.name}: {kind} failed: {fw['error']['error']}"
            )
            self.save()
            return None
        wall = self.budget.elapsed() - t0
        rec = run_record(summary, cfg, race["n_train"], race["n_test"])
        rec["wall_seconds"] = wall
        self.doc["order"].append(
            {"preset": cfg.name, "contender": entry.name, "seed": seed, "kind": kind}
        )
        key = (cfg.name, entry.name)
        if kind == "warm-up":
            fw["warmup"] = rec
            fw["trainer"] = {k: summary[k] for k in TRAINER_INFO_KEYS if k in summary}
            self.estimates[key] = wall
        else:
            fw["runs"].append(rec)
            if seed not in race["seeds"]:
                race["seeds"].append(seed)
            timed_walls = [r["wall_seconds"] for r in fw["runs"]]
            self.estimates[key] = max(timed_walls)
        self.refresh(cfg)
        self.save()
        self.log(
            f"{self._stamp()} {cfg.name:<9} {entry.name:<9} {kind:<8} seed {seed:<4} "
            f"acc {rec['accuracy']:.4f}  time {rec['time_seconds']:.2f} s  "
            f"compile {rec['compile_seconds'] or 0:.1f} s  wall {wall:.1f} s"
        )
        return summary

    def active(self, cfg: configs.Config) -> list[Entry]:
        """The contenders still racing in this preset (warmed up, no error)."""
        race = self.doc["races"][cfg.name]["frameworks"]
        return [
            e
            for e in self.entries
            if race[e.name]["warmup"] is not None and not race[e.name]["error"]
        ]

    # -- statistics, after every run (so a kill leaves them current)
    def refresh(self, cfg: configs.Config) -> None:
        race = self.doc["races"][cfg.name]
        fws = race["frameworks"]
        for fw in fws.values():
            fw["summary"] = (
                summarize(fw["runs"], fw["warmup"], cfg, self.opts.target) if fw["runs"] else None
            )
            fw["programs_built"] = programs_built([fw["warmup"], *fw["runs"]])
        counts = [len(fw["runs"]) for fw in fws.values() if fw["warmup"] is not None]
        race["runs_per_framework"] = min(counts) if counts else 0
        runs = {name: fw["runs"] for name, fw in fws.items()}
        race["verdicts"] = {}
        if "torch" in fws:
            for name, fw in fws.items():
                if fw["framework"] == "jax":
                    race["verdicts"][name] = decide(runs, name, "torch", self.opts.target)
        single = race["verdicts"].get("jax")
        race["ratio"] = single["ratio"] if single else None

    # -- the phases
    def warmups(self) -> None:
        """A warm-up of every contender in every preset, then the self-checks.

        Under a budget, a later preset starts only if its warm-up, one timed run of
        it and one round of what is already warm fit: its runs are predicted from
        the first preset's warm-up, scaled by the ratio of counted FLOPs per run.
        """
        first = self.opts.cfgs[0]
        for i, cfg in enumerate(self.opts.cfgs):
            for entry in self.entries:
                if i and self.budget.limited:
                    guess = self.estimates.get((first.name, entry.name), 0.0) * _work_ratio(
                        cfg, first, self.doc["races"]
                    )
                    warm = sum(self.estimates[(c.name, e.name)] for c in self.opts.cfgs
                               for e in self.active(c))  # fmt: skip
                    if not fits(self.budget.remaining(), 2 * guess + warm):
                        self.skip(
                            cfg,
                            entry,
                            f"budget: its warm-up and one run (~{2 * guess:.0f} s predicted) "
                            f"and a round of the others (~{warm:.0f} s) do not fit",
                        )
                        continue
                self.run(cfg, entry, WARMUP_SEED, "warm-up")
            self.self_checks(cfg)

    def skip(self, cfg: configs.Config, entry: Entry, reason: str) -> None:
        self.doc["races"][cfg.name]["frameworks"][entry.name]["error"] = {
            "error": f"skipped: {reason}"
        }
        self.log(f"{self._stamp()} {cfg.name} {entry.name}: skipped: {reason}")

    def self_checks(self, cfg: configs.Config) -> None:
        """Checks that hold each side to account, recorded in the race (never timed)."""
        checks = self.doc["races"][cfg.name]["self_checks"]
        for entry in self.active(cfg):
            run_cfg = entry.config(cfg)
            if entry.framework == "jax" and "jax_program" not in checks:
                checks["jax_program"] = _guarded(_jax_program_check, run_cfg)
                checks["jax_flops"] = _guarded(_jax_flop_check, run_cfg)
            if entry.framework == "torch" and "torch_sync" not in checks:
                checks["torch_sync"] = _guarded(
                    _torch_sync_check, run_cfg, self.data[cfg.name], _torch_kwargs(self.opts)
                )
        for name, result in checks.items():
            why = result.get("problems") or result.get("error") or result.get("detail") or ""
            why = "; ".join(why) if isinstance(why, list) else why
            self.log(
                f"{self._stamp()} {cfg.name} self-check {name}: {result.get('status')}"
                + (f" ({why})" if why and result.get("status") != "passed" else "")
            )
        self.save()

    def rounds(self) -> str:
        """Timed rounds until --runs or the budget; returns why they stopped."""
        r = 0
        reserve = self.profile_cost()
        while True:
            todo = [(cfg, e) for cfg in self.opts.cfgs for e in self.active(cfg)]
            if not todo:
                return "no contender left to run"
            if self.opts.runs is not None and r >= self.opts.runs:
                return f"reached --runs {self.opts.runs}"
            cost = sum(self.estimates[(cfg.name, e.name)] for cfg, e in todo)
            if self.budget.limited and not fits(self.budget.remaining(), cost, reserve):
                return (
                    f"budget: next round predicted {cost:.1f} s (x{SAFETY} + {SLACK_S:.0f} s), "
                    f"{self.budget.remaining():.1f} s left, {reserve:.1f} s kept for profiles"
                )
            for cfg in round_order(self.opts.cfgs, r):
                for entry in round_order(self.active(cfg), r):
                    self.run(cfg, entry, r, "timed")
            r += 1

    def vmapped(self) -> None:
        """Per preset, K JAX seeds in one vmapped program (`jaxbench.seeds`), timed as a run
        is (steps and final evaluation, compilation excluded), beside the runs alone."""
        from jaxbench.seeds import train_seeds

        k = self.opts.vmap_seeds
        for cfg in self.opts.cfgs:
            entry = next((e for e in self.active(cfg) if e.framework == "jax"), None)
            if entry is None:
                continue
            race = self.doc["races"][cfg.name]
            est = k * self.estimates[(cfg.name, entry.name)]  # at worst, K runs one by one
            if self.budget.limited and not fits(self.budget.remaining(), est):
                race["vmap_seeds"] = {"k": k, "skipped": f"budget: ~{est:.0f} s predicted"}
                self.log(f"{self._stamp()} {cfg.name} {k} seeds, one program: skipped (budget)")
                continue
            run_cfg = entry.config(cfg).replace(out=None)
            try:
                with self.watchdog.guard():
                    res = train_seeds(run_cfg, range(k), self.data[cfg.name])
            except BudgetExceeded:
                raise
            except Exception as e:
                race["vmap_seeds"] = {"k": k, **_error(e)}
                continue
            metric = headline_metric(cfg)
            accs = [s["final"][metric] for s in res["seeds"]]
            alone = race["frameworks"][entry.name]["summary"]
            race["vmap_seeds"] = {
                "k": k,
                "contender": entry.name,
                "time_seconds": res["total_time_seconds"],
                "time_per_seed": res["total_time_seconds"] / k,
                "time_alone": alone["time_seconds"]["mean"] if alone else None,
                "compile_seconds": res["compile_seconds"],
                "accuracy": describe(accs),
                "seeds": list(range(k)),
            }
            self.save()
            self.log(
                f"{self._stamp()} {cfg.name} {k} seeds, one program: "
                f"{res['total_time_seconds']:.2f} s ({res['total_time_seconds'] / k:.2f} s per "
                f"seed), acc mean {describe(accs)['mean']:.4f}"
            )

    def profile_cost(self) -> float:
        if self.opts.profile is None:
            return 0.0
        return sum(
            PROFILE_OVERHEAD * self.estimates[(cfg.name, e.name)]
            for cfg in self.opts.cfgs
            for e in self.active(cfg)
        )

    def profiles(self) -> None:
        """One profiled run per contender (off the statistics): traces and top-op tables."""
        from jaxbench.profiling import format_top_ops

        assert self.opts.profile is not None
        for cfg in self.opts.cfgs:
            for entry in self.active(cfg):
                est = PROFILE_OVERHEAD * self.estimates[(cfg.name, entry.name)]
                if self.budget.limited and not fits(self.budget.remaining(), est):
                    self.log(f"{self._stamp()} {cfg.name} {entry.name}: profile skipped (budget)")
                    continue
                folder = self.opts.profile / cfg.name / entry.name
                fw = self.doc["races"][cfg.name]["frameworks"][entry.name]
                try:
                    summary = self.call(cfg, entry, WARMUP_SEED, profile_dir=folder)
                except BudgetExceeded:
                    raise
                except Exception as e:
                    fw["profile"] = _error(e)
                    continue
                fw["profile"] = summary.get("profile")
                if fw["profile"]:
                    self.log(
                        format_top_ops(
                            fw["profile"]["top_ops"], f"{cfg.name} {entry.name}: top operations"
                        )
                    )
                self.save()

    def finish(self, complete: bool) -> None:
        """Statistics, verdicts, plots and the table from whatever finished."""
        self.watchdog.disarm()
        for cfg in self.opts.cfgs:
            race = self.doc["races"][cfg.name]
            self.refresh(cfg)
            race["complete"] = complete
            if any(fw["runs"] for fw in race["frameworks"].values()):
                png = f"bench-{cfg.name}.png"
                try:
                    if plot(race, self.opts.out / png) and png not in self.doc["files"]:
                        self.doc["files"].append(png)
                except Exception as e:  # a plot is not worth losing the JSON over
                    race["plot_error"] = f"{type(e).__name__}: {e}"
        if self.doc["environment"] is not None:
            self.doc["environment"]["settings_end"] = report.numeric_settings()
        self.doc["complete"] = complete
        self.doc["finished"] = report.now_iso()
        self.save()

    def table(self) -> str:
        parts = []
        for race in self.doc["races"].values():
            if any(fw["summary"] for fw in race["frameworks"].values()):
                parts.append(format_table(race))
            else:
                parts.append(f"{race['preset']}: no timed runs")
            for name, fw in race["frameworks"].items():
                if fw["error"]:
                    parts.append(f"{race['preset']} {name}: {fw['error']['error']}")
        parts.append(f"stopped: {self.doc['stop_reason']}; {self.budget.elapsed():.0f} s in all")
        return "\n".join(parts)


def _work_ratio(cfg: configs.Config, first: configs.Config, races: dict[str, Any]) -> float:
    """Counted FLOPs of one run of `cfg` over one run of `first`: a run-time scale."""
    work = [
        timed_work(c, races[c.name]["n_train"], races[c.name]["n_test"])[1] for c in (cfg, first)
    ]
    return work[0] / work[1] if work[1] > 0 else 1.0


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    try:
        return fn(*args)
    except Exception as e:
        return {"status": "error", **_error(e)}


def _jax_program_check(cfg: configs.Config) -> dict[str, Any]:
    """JAX's epoch, step and eval as exported for CUDA (whatever this machine is): no host
    callback, no conditional, convolutions and matmuls in the compute dtype, the state
    donated (`jaxbench.program`)."""
    from jaxbench import program

    check = program.check_programs(cfg, platform="cuda")
    problems = [p for f in check["programs"].values() for p in f["problems"]]
    return {
        "status": "passed" if check["ok"] else "failed",
        "problems": problems,
        "platform": check["platform"],
        "compute_dtype": check["compute_dtype"],
        "report": program.format_report(check=check),
    }


def _jax_flop_check(cfg: configs.Config) -> dict[str, Any]:
    """XLA's executed FLOPs per image of the compiled train step and eval batch against the
    analytic count: redundant compute shows up as a ratio out of `program.RATIO_BOUNDS`."""
    from jaxbench import program

    acc = program.flop_accounting(cfg)
    problems = program.flop_problems(acc)
    bounds = {k: list(v) for k, v in program.RATIO_BOUNDS.items()}
    return {"status": "failed" if problems else "passed", "problems": problems,
            "bounds": bounds, **acc}  # fmt: skip


def _torch_kwargs(opts: Options) -> dict[str, Any]:
    """The PyTorch trainer's set-up arguments from the bench flags."""
    out: dict[str, Any] = {"compile": opts.torch_compile}
    if opts.torch_compile_mode is not None:
        from torch_ref.fast import TorchSetup

        out["torch_setup"] = TorchSetup(compile_mode=opts.torch_compile_mode)
    return out


def _torch_sync_check(cfg: configs.Config, data: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """On CUDA: PyTorch's training steps under sync-debug mode "error" (skipped on the CPU),
    in the race's own set-up (its warm-up is the one the race already ran)."""
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "detail": "no CUDA device: sync-debug mode is CUDA's"}
    from torch_ref import fast, train

    r = train.setup(cfg.replace(seed=WARMUP_SEED, out=None), data, **kwargs)
    return fast.check_no_host_sync(
        r, step=train.train_step, plan=train.plan_epoch, evaluate=train.evaluate_net
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Run the race, print the tables, write bench.json and bench-<preset>.png to --out."""
    budget = Budget()  # the clock starts first; the limit is set after parsing
    opts = parse_args(argv)
    if opts.max_seconds is not None:
        budget.seconds = opts.max_seconds
    # Before JAX is imported: let both frameworks allocate GPU memory on demand.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    command = " ".join(
        ["python -m jaxbench.bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    created = not opts.out.exists()
    try:
        trainers = _load_trainers(opts)  # a trainer refusing the config: before any file
        try:  # before the data loads: a bad --out costs nothing
            report.prepare_output(opts.out, BENCH_FILES, overwrite=opts.overwrite)
        except report.OutputError as e:
            _fail(str(e))
        try:
            data = _load_data(opts.cfgs)
        except SystemExit:
            if created:  # leave no empty folder behind a command that did nothing
                report.remove_if_empty(opts.out)
            raise
        b = Bench(opts, trainers, data, command, budget, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        if created:
            report.remove_if_empty(opts.out)
        report.exit_interrupted(
            f"interrupted before the race started; nothing written to {opts.out}"
        )
    names = ", ".join(e.name for e in b.entries)
    plan = f"{opts.runs} rounds" if opts.runs is not None else "rounds while they fit"
    limit = f" within {opts.max_seconds:.0f} s" if opts.max_seconds is not None else ""
    print(
        f"bench {', '.join(c.name for c in opts.cfgs)}: {names}; a warm-up each (one untimed "
        f"training run, compilation included), then {plan}"
        f"{limit} -> {opts.out}",
        flush=True,
    )
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
    if hard_exit == 130:
        report.exit_interrupted(f"interrupted; partial results in {opts.out / 'bench.json'}")
    if hard_exit is not None:
        # A run cut off mid-way can leave compilation or device work in flight, whose
        # teardown at interpreter exit is not safe (XLA:CPU has crashed there). Every
        # result is written and flushed, so leave without it.
        sys.stderr.flush()
        os._exit(hard_exit)


class Terminated(SystemExit):
    """SIGTERM (a timeout, a closing terminal), raised where the main thread runs."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(128 + signum)


if __name__ == "__main__":
    main()
