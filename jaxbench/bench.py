"""Race `jaxbench` against `torch_ref` on one machine: `python -m jaxbench.bench`.

For each framework, in the order given: one untimed warm-up run (it pays for
compilation, autotuning and allocator growth), then `--runs` timed runs with
seeds 0..N-1. The dataset is loaded once and handed to both trainers through
`data=`; moving it onto the device happens inside the trainers, outside their
clock. What is timed is each trainer's `total_time_seconds`: data-dependent
initialisation, every training step and the final evaluation with TTA, with a
device synchronisation before each clock read; compilation and the per-epoch
monitoring evaluations are excluded (docs/design.md, docs/benchmark.md).

Both frameworks run sequentially in this one process. JAX would otherwise
reserve 75% of GPU memory at start-up and leave PyTorch the rest, so `main`
sets `XLA_PYTHON_CLIENT_PREALLOCATE=false` (unless the caller set it) before
JAX is imported; ResNet-9 on CIFAR-10 needs a few GiB, far below one card.

Statistics: mean, sample std (ddof=1), min and max over runs; the JAX/PyTorch
time ratio of means has a 95% interval from the delta method on the log ratio
with Welch's degrees of freedom (`ratio_ci`).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from jaxbench import configs, flops, report
from jaxbench.stream import steps_per_epoch

FRAMEWORKS: tuple[str, ...] = ("jax", "torch")
SCHEMA_VERSION = 1
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


def timed_work(cfg: configs.Config, n_train: int, n_test: int) -> tuple[int, int]:
    """(training images, counted FLOPs) inside one run's timed region.

    Training: epochs x full batches; the final evaluation scores every test
    image once per weight set (trained and, with EMA, the EMA copy).
    """
    images = cfg.epochs * steps_per_epoch(cfg, n_train) * cfg.batch_size
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
    images, work = timed_work(cfg, n_train, n_test)
    rec = {
        "seed": summary.get("seed", cfg.seed),
        "accuracy": float(final[headline_metric(cfg)]),
        "time_seconds": time_s,
        "compile_seconds": summary.get("compile_seconds"),
        "images_per_second": images / time_s if time_s > 0 else None,
        "tflops_per_second": work / time_s / 1e12 if time_s > 0 else None,
        "trainer_images_per_second": summary.get("images_per_second"),
        "date": summary.get("environment", {}).get("date"),
        "epochs": summary.get("epochs", []),
    }
    for key in ("val_acc", "ema_val_acc", "val_loss", "train_loss", "train_acc"):
        rec[key] = final.get(key)
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
    }


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


def run_framework(
    framework: str,
    cfg: configs.Config,
    data: Any,
    runs: int,
    *,
    stream: str = "fast",
    torch_compile: bool | None = None,
    trainer: Trainer | None = None,
    on_record: Callable[[str, dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(warm-up record, timed records, trainer info) for one framework.

    Trainer info: the warm-up summary's `environment` plus whatever set-up keys
    the trainer reports (device, precision, loop, compile, ...).

    The warm-up uses seed `runs` (the first seed no timed run uses), so its
    numbers are kept but never mixed into the statistics.
    """
    trainer = trainer or load_trainer(framework)
    kwargs: dict[str, Any] = {"data": data, "stream": stream, "progress": False, "quiet": True}
    if framework == "torch":
        kwargs["compile"] = torch_compile
    warmup_summary = trainer(cfg.replace(seed=runs, out=None), None, **kwargs)
    n_train, n_test = len(data.train_labels), len(data.test_labels)
    warmup = run_record(warmup_summary, cfg, n_train, n_test)
    if on_record:
        on_record("warm-up", warmup)
    records = []
    for seed in range(runs):
        summary = trainer(cfg.replace(seed=seed, out=None), None, **kwargs)
        records.append(run_record(summary, cfg, n_train, n_test))
        if on_record:
            on_record(f"run {seed + 1}/{runs}", records[-1])
    info = {k: warmup_summary[k] for k in TRAINER_INFO_KEYS if k in warmup_summary}
    return warmup, records, info


# --- output ---------------------------------------------------------------------------------


def _pm(stat: dict[str, Any], digits: int) -> str:
    std = "-" if stat["std"] is None else f"{stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}±{std}"


def format_table(doc: dict[str, Any]) -> str:
    """The results table (plus FLOP rate and epoch-at-target), then the ratio line."""
    header = [
        "framework",
        "preset",
        "runs",
        "acc mean±std",
        ">=target",
        "time mean±std",
        "compile",
        "img/s",
        "TFLOP/s",
        "epoch>=target",
    ]
    rows = [header]
    for name, fw in doc["frameworks"].items():
        s = fw["summary"]
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
                str(s["runs"]),
                _pm(s["accuracy"], 4),
                f"{s['runs_at_target']}/{s['runs']}",
                _pm(s["time_seconds"], 2) + " s",
                "-" if comp is None else f"{comp:.1f} s",
                "-" if ips is None else f"{ips:.0f}",
                "-" if tf is None else f"{tf:.3g}",
                "-" if ep is None else str(ep),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(
        f"acc = {doc['accuracy_metric_description']}; target {doc['target']:.4f}; "
        "time = timed training + final evaluation; compile = warm-up run's"
    )
    ratio = doc.get("ratio")
    if ratio is not None:
        ci = ratio["ci"]
        span = "n/a (needs >= 2 runs each)" if ci is None else f"{ci[0]:.3f}..{ci[1]:.3f}"
        lines.append(
            f"time ratio {ratio['numerator']}/{ratio['denominator']} ({doc['preset']}): "
            f"{ratio['value']:.3f}, {100 * ratio['level']:.0f}% CI {span}"
        )
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
        color = _COLORS.get(name)
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


# --- command line -------------------------------------------------------------------------


_Parser = configs.OneLineErrorParser


@dataclass(frozen=True)
class Options:
    cfg: configs.Config
    frameworks: tuple[str, ...]
    runs: int
    target: float
    out: Path
    stream: str
    torch_compile: bool | None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m jaxbench.bench",
        description="Race jaxbench against torch_ref: warm-up, N seeded runs each, statistics.",
        allow_abbrev=False,
    )
    p.add_argument("--frameworks", default="jax,torch", help="comma list of jax, torch")
    p.add_argument("--runs", type=int, default=5, help="timed runs per framework (seeds 0..N-1)")
    p.add_argument("--target", type=float, default=0.94, help="accuracy target in (0, 1]")
    p.add_argument("--out", default=None, help="output folder (default bench-out/<preset>)")
    p.add_argument("--stream", default="fast", choices=("fast", "shared"), help="batch stream")
    p.add_argument(
        "--torch-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the PyTorch model (default: the trainer's choice)",
    )
    # `--config` picks the preset; `--out` and `--seed` belong to the benchmark, not the run.
    configs.add_config_args(p, skip=("name", "out", "seed"))
    return p


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Flags -> Options; any bad value exits 2 with one line naming the fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = configs.config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    names = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
    bad = [f for f in names if f not in FRAMEWORKS]
    if not names or bad:
        parser.error(f"--frameworks takes a comma list of {', '.join(FRAMEWORKS)}; got {bad}")
    if len(set(names)) != len(names):
        parser.error(f"--frameworks lists a framework twice: {args.frameworks}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if not 0.0 < args.target <= 1.0:
        parser.error(f"--target is an accuracy in (0, 1], e.g. 0.94; got {args.target}")
    out = Path(args.out) if args.out else Path("bench-out") / cfg.name
    return Options(cfg, names, args.runs, args.target, out, args.stream, args.torch_compile)


def _fail(message: str) -> NoReturn:
    print(f"python -m jaxbench.bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load_trainers(frameworks: Sequence[str], cfg: configs.Config) -> dict[str, Trainer]:
    """Import each trainer and let it refuse the config before any run starts."""
    trainers = {}
    for name in frameworks:
        try:
            trainers[name] = load_trainer(name)
            check = getattr(sys.modules[trainers[name].__module__], "check_supported", None)
            if check is not None:
                check(cfg)
        except (RuntimeError, ValueError) as e:
            _fail(f"{name}: {e}")
    return trainers


def _load_data(cfg: configs.Config) -> Any:
    """The dataset, once, in host memory; a data problem is one line and exit 2."""
    from jaxbench.data import load_dataset

    try:
        return load_dataset(cfg)
    except (OSError, ValueError, KeyError) as e:
        _fail(f"cannot load {cfg.dataset}: {e}")


def _new_doc(opts: Options, data: Any, command: str) -> dict[str, Any]:
    """bench.json before any run: what is raced, on what, and how it is measured."""
    cfg = opts.cfg
    return {
        "schema": SCHEMA_VERSION,
        "complete": False,
        "preset": cfg.name,
        "target": opts.target,
        "runs_per_framework": opts.runs,
        "seeds": list(range(opts.runs)),
        "accuracy_metric": headline_metric(cfg),
        "accuracy_metric_description": describe_metric(cfg),
        "time_definition": TIME_DEFINITION,
        "throughput_definition": THROUGHPUT_DEFINITION,
        "stream": opts.stream,
        "torch_compile": opts.torch_compile,
        "config": cfg.to_dict(),
        "n_train": int(len(data.train_labels)),
        "n_test": int(len(data.test_labels)),
        "flops": {
            "forward_per_image": flops.forward_flops_per_image(cfg),
            "train_per_image": flops.train_flops_per_image(cfg),
            "eval_per_image": flops.eval_flops_per_image(cfg),
            "convention": flops.CONVENTION,
        },
        "environment": {**report.environment(opts.frameworks), "command": command},
        "frameworks": {},
        "ratio": None,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Run the race, print the table, write bench.json and bench.png to --out."""
    opts = parse_args(argv)
    # Before JAX is imported: let both frameworks allocate GPU memory on demand.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = opts.cfg
    command = " ".join(
        ["python -m jaxbench.bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    trainers = _load_trainers(opts.frameworks, cfg)
    data = _load_data(cfg)
    doc = _new_doc(opts, data, command)
    json_path = opts.out / "bench.json"
    print(
        f"bench {cfg.name}: {', '.join(opts.frameworks)}; 1 warm-up + {opts.runs} runs each; "
        f"{doc['n_train']} train / {doc['n_test']} test images -> {opts.out}",
        flush=True,
    )
    for name in opts.frameworks:
        fw: dict[str, Any] = {"warmup": None, "runs": [], "trainer": {}, "summary": None}
        doc["frameworks"][name] = fw

        def on_record(label: str, rec: dict[str, Any], name: str = name, fw: dict = fw) -> None:
            if label == "warm-up":
                fw["warmup"] = rec
            else:
                fw["runs"].append(rec)
            print(
                f"  {name:<5} {label:<9} seed {rec['seed']}: acc {rec['accuracy']:.4f}  "
                f"time {rec['time_seconds']:.2f} s  compile {rec['compile_seconds'] or 0:.1f} s",
                flush=True,
            )
            report.write_json(json_path, doc)  # keep partial results if a later run dies

        warmup, records, info = run_framework(
            name,
            cfg,
            data,
            opts.runs,
            stream=opts.stream,
            torch_compile=opts.torch_compile,
            trainer=trainers[name],
            on_record=on_record,
        )
        fw["trainer"] = info
        fw["summary"] = summarize(records, warmup, cfg, opts.target)
    if "jax" in doc["frameworks"] and "torch" in doc["frameworks"]:
        times = {n: [r["time_seconds"] for r in doc["frameworks"][n]["runs"]] for n in FRAMEWORKS}
        doc["ratio"] = {
            "numerator": "jax",
            "denominator": "torch",
            **ratio_ci(times["jax"], times["torch"]),
            "method": RATIO_METHOD,
        }
    doc["complete"] = True
    report.write_json(json_path, doc)
    wrote_png = plot(doc, opts.out / "bench.png")
    print(format_table(doc))
    print(f"wrote {json_path}" + (f" and {opts.out / 'bench.png'}" if wrote_png else ""))
    if not wrote_png:
        print("bench.png skipped: matplotlib is not installed (pip install -e .[plot])")


if __name__ == "__main__":
    main()
