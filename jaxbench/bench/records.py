"""What bench.json keeps of each run and race: run records with one throughput definition
for both frameworks, and summaries and verdicts recomputed after every run (`refresh_race`),
so a killed benchmark leaves them current."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxbench import configs, schedule, stats
from jaxbench.bench import flops
from jaxbench.stream import steps_per_epoch

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


def headline_metric(cfg: configs.Config) -> str:
    """The accuracy the benchmark ranks by: the EMA copy's when the recipe keeps one."""
    return "ema_val_acc" if cfg.ema_every > 0 else "val_acc"


def describe_metric(cfg: configs.Config) -> str:
    weights = "EMA weights" if cfg.ema_every > 0 else "trained weights"
    tta = ("flip + shift TTA" if cfg.tta_shift else "flip TTA") if cfg.tta else "no TTA"
    if cfg.tta and cfg.tta_select:
        tta = f"plain view; {tta} for the {cfg.tta_select:.0%} least confident"
    return f"final {headline_metric(cfg)} ({weights}, {tta})"


def mean_curve(epoch_rows: Sequence[Sequence[dict[str, Any]]], metric: str) -> list[dict]:
    """Per epoch every run logged, the mean over runs of `metric` and of the cumulative timed
    seconds (None where any run left it empty)."""
    length = min((len(rows) for rows in epoch_rows), default=0)
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
    reached = (p["epoch"] for p in curve if p["accuracy"] is not None and p["accuracy"] >= target)
    return next((int(e) for e in reached), None)


def timed_work(
    cfg: configs.Config, n_train: int, n_test: int, weight_sets: int | None = None
) -> tuple[int, int]:
    """(training images, counted FLOPs) of one run's timed region: epochs x full batches, and
    the final evaluation of every test image per weight set scored (default: 2 with an EMA)."""
    images = schedule.train_steps(cfg, steps_per_epoch(cfg, n_train)) * cfg.batch_size
    if weight_sets is None:
        weight_sets = 2 if cfg.ema_every > 0 else 1
    work = images * flops.train_flops_per_image(cfg)
    return images, work + n_test * weight_sets * flops.eval_flops_per_image(cfg)


def work_ratio(cfg: configs.Config, first: configs.Config, races: dict[str, Any]) -> float:
    """Counted FLOPs of one run of `cfg` over one run of `first`: a run-time scale."""
    work = [
        timed_work(c, races[c.name]["n_train"], races[c.name]["n_test"])[1] for c in (cfg, first)
    ]
    return work[0] / work[1] if work[1] > 0 else 1.0


def run_record(
    summary: dict[str, Any], cfg: configs.Config, n_train: int, n_test: int
) -> dict[str, Any]:
    """The numbers kept from one trainer summary; throughput computed here, one definition
    for both frameworks (the trainer's own is `trainer_images_per_second`)."""
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
    k, share = stats.share_at_least(accs, target)
    curve = mean_curve([r["epochs"] for r in records], headline_metric(cfg))
    return {
        "runs": len(records),
        "accuracy": stats.describe(accs),
        "time_seconds": stats.describe([r["time_seconds"] for r in records]),
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


def decide(
    runs: dict[str, Sequence[dict[str, Any]]], numerator: str, denominator: str, target: float
) -> dict[str, Any]:
    """Two contenders' time ratio, or no winner: none when either mean accuracy is below
    `target` (time-to-target means nothing then) or either has no timed run."""
    out: dict[str, Any] = {"numerator": numerator, "denominator": denominator, "target": target}
    pair = (numerator, denominator)
    if any(not runs.get(n) for n in pair):
        return {**out, "status": "no runs", "ratio": None}
    means = {n: float(np.mean([r["accuracy"] for r in runs[n]])) for n in pair}
    below = {n: a for n, a in means.items() if a < target}
    if below:
        return {**out, "status": "target not reached", "below_target": below, "ratio": None}
    times = [[r["time_seconds"] for r in runs[n]] for n in pair]
    return {**out, "status": "ratio", "ratio": {**stats.ratio_ci(*times), "method": RATIO_METHOD}}


def new_race(cfg: configs.Config, data: Any, target: float, stream: str) -> dict[str, Any]:
    """One preset's part of bench.json before any run: what is raced and how it is measured."""
    return {
        "preset": cfg.name,
        "complete": False,
        "target": target,
        "runs_per_framework": 0,
        "seeds": [],
        "accuracy_metric": headline_metric(cfg),
        "accuracy_metric_description": describe_metric(cfg),
        "time_definition": TIME_DEFINITION,
        "throughput_definition": THROUGHPUT_DEFINITION,
        "stream": stream,
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


def new_contender(framework: str, loop: str | None) -> dict[str, Any]:
    """One contender's part of a race before any run."""
    return {
        "framework": framework,
        "loop": loop,
        "warmup": None,
        "runs": [],
        "trainer": {},
        "summary": None,
        "programs_built": None,
        "error": None,
        "profile": None,
    }


def refresh_race(race: dict[str, Any], cfg: configs.Config, target: float) -> None:
    """Recompute a race's summaries, run counts, verdicts and ratio from its records."""
    fws = race["frameworks"]
    for fw in fws.values():
        fw["summary"] = summarize(fw["runs"], fw["warmup"], cfg, target) if fw["runs"] else None
        fw["programs_built"] = programs_built([fw["warmup"], *fw["runs"]])
    counts = [len(fw["runs"]) for fw in fws.values() if fw["warmup"] is not None]
    race["runs_per_framework"] = min(counts) if counts else 0
    runs = {name: fw["runs"] for name, fw in fws.items()}
    race["verdicts"] = {}
    if "torch" in fws:
        for name, fw in fws.items():
            if fw["framework"] == "jax":
                race["verdicts"][name] = decide(runs, name, "torch", target)
    single = race["verdicts"].get("jax")
    race["ratio"] = single["ratio"] if single else None
