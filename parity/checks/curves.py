"""Check 7: per-epoch accuracy curves over matched seeds, against a same-framework null.

Is JAX further from PyTorch than PyTorch is from itself? Per seed both start from the same
weights on the same batches, and torch_ref reruns from those weights perturbed by ~1 ulp: what
separates the reruns is float32 chaos alone, and a JAX trainer of the same function is one more
draw from that chaos (`check_curves` tests it).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from jaxbench import stats
from jaxbench import train as jtrain
from jaxbench.configs import DATASET_IMAGES, Config
from jaxbench.stream import steps_per_epoch
from parity.checks.base import CheckResult, Context, Figure, quick_widths, subset_data
from torch_ref import train as ttrain

METRICS = ("val_acc", "ema_val_acc")
TORCH_RUNS = 3  # per seed: the original and two perturbed reruns (the null needs >= 3)
ALPHA = 0.005  # family-wise false-alarm rate of each comparison; the check's is <= 2 ALPHA
PERTURB_SEED = 20_231  # the numpy stream behind the ulp perturbations (any fixed number)


def curve_config(ctx: Context) -> tuple[Config, str]:
    """The check-7 config and a sentence saying what it is. Quick mode, chosen on torch_ref
    runs: ResNet-9 at widths 8-64, 3 epochs of batch 50 (batch 100 lost 1-3 points; wider took
    twice the time for no gain), no flip TTA (30% of a run's time), no cutout (no gain so short):
    62.6% mean EMA accuracy over 24 torch runs, chaos sd 1.0-1.4 points, so ~4.1 sd bars are 3-5
    points, 160 s on a 2-core CPU (2026-11-28). The speedrun net: widths 32,48,48, 6,000 images,
    batch 100, no TTA (~63%). Full mode: the preset itself."""
    quick = dict(
        widths=quick_widths(ctx.cfg),
        subset=ctx.subset or (8000 if ctx.cfg.model == "resnet9" else 6000),
        test_subset=1000,
        eval_batch_size=1000,
        epochs=ctx.epochs or 3,
        tta=False,
        tta_select=0.0,
        precision="float32",
    )
    if ctx.quick and ctx.cfg.model == "resnet9":
        cfg = ctx.cfg.replace(
            **quick,
            batch_size=50,
            lr=0.4,
            lr_peak_epoch=1.0,
            lr_flat_epochs=0.0,
            ghost_bn=10 if ctx.cfg.ghost_bn else 0,  # 5 groups of the batch of 50
            cutout=0,
            ema_every=5,
            ema_momentum=0.8,
        )
        note = (
            f"quick mode: the {ctx.cfg.name} recipe at ResNet-9 widths 8,16,32,64; "
            f"{cfg.subset:,} training and 1,000 test images; {cfg.epochs} epochs of batch 50 "
            "(ghost BN groups of 10 if on), LR 0.4 peaking at epoch 1; no cutout, no TTA; EMA "
            "every 5 steps, momentum 0.8 (tiny: ~62% final EMA accuracy), not the full preset"
        )
        return cfg, note
    if ctx.quick:  # the speedrun net
        cfg = ctx.cfg.replace(
            **quick,
            batch_size=100,
            lr_peak_epoch=0.7,  # airbench's 23% of the run
            whiten_bias_epochs=1,
            tta_shift=False,
        )
        note = (
            f"quick mode: the {ctx.cfg.name} recipe at widths 32,48,48; {cfg.subset:,} training "
            f"and 1,000 test images; {cfg.epochs} epochs of batch 100, LR peak at 23%, whitening "
            "bias trained for 1 epoch; no TTA (~63% final EMA accuracy), not the full preset"
        )
        return cfg, note
    cfg = ctx.cfg.replace(epochs=ctx.epochs or ctx.cfg.epochs, subset=ctx.subset or ctx.cfg.subset)
    images = f", {cfg.subset:,} training images" if ctx.subset else ""
    return cfg, f"the {ctx.cfg.name} preset ({cfg.epochs} epochs{images})"


def run_name(k: int) -> str:
    """'torch' for the unperturbed run, then "torch'", "torch''", ... for the reruns."""
    return "torch" + "'" * k


def perturb(state_dict: dict[str, torch.Tensor], seed: int, k: int) -> dict[str, torch.Tensor]:
    """The state dict with every float parameter moved by about one ulp; buffers unchanged:
    w -> float32(w (1 + 2^-23 z)), z ~ N(0, 1) keyed by (PERTURB_SEED, seed, k): one rounding
    error's size, random in sign and place (at widths 8-64: 29% unchanged, mean 1.1 ulp). BN
    running statistics only enter evaluation and are soon overwritten; zeros stay zero."""
    rng = np.random.default_rng([PERTURB_SEED, seed, k])
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if t.is_floating_point() and not name.endswith(("running_mean", "running_var")):
            x = t.detach().cpu().numpy().astype(np.float64)
            x = x * (1.0 + 2.0**-23 * rng.standard_normal(x.shape))
            out[name] = torch.from_numpy(x.astype(np.float32)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def _divergence(a: list[float], b: list[float], steps_per_epoch: int) -> dict[str, float]:
    """Mean |loss_a - loss_b| over the first 10 steps and over the last epoch's steps."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(x), len(y))
    d = np.abs(x[:n] - y[:n])
    return {
        "first_10_steps": float(d[:10].mean()) if n else float("nan"),
        "last_epoch": float(d[-steps_per_epoch:].mean()) if n else float("nan"),
    }


def train_runs(
    ctx: Context, cfg: Config, data: Any, *, with_jax: bool = True
) -> tuple[dict[str, list[list[dict[str, Any]]]], dict[str, Any]]:
    """Per seed: jax (unless `with_jax` is False) and TORCH_RUNS torch runs from one init.
    Returns ({run name: [per-seed epoch rows]}, {wall and CPU seconds per run kind, the
    per-step loss divergence of jax and of the first rerun from the torch run})."""
    h = ctx.harness
    names = (["jax"] if with_jax else []) + [run_name(k) for k in range(TORCH_RUNS)]
    runs: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    seconds: dict[str, float] = {n: 0.0 for n in names}
    cpu_seconds: dict[str, float] = {n: 0.0 for n in names}
    losses: dict[str, list[list[float]]] = {n: [] for n in names}
    common = dict(data=data, stream="shared", progress=False, quiet=True)
    for s in range(ctx.seeds):
        c = cfg.replace(seed=s)
        sd = {k: v.clone() for k, v in h.torch_model(c, s).state_dict().items()}
        msg = []
        for name in names:
            t0, c0 = time.perf_counter(), time.process_time()
            if name == "jax":
                summary = jtrain.train_and_evaluate(c, init_variables=h.to_flax(sd), **common)
            else:
                k = name.count("'")
                init = sd if k == 0 else perturb(sd, s, k)
                summary = ttrain.train_and_evaluate(c, init_state_dict=init, **common)
            dt = time.perf_counter() - t0
            seconds[name] += dt
            cpu_seconds[name] += time.process_time() - c0
            runs[name].append(summary["epochs"])
            losses[name].append(summary.get("step_losses", []))
            acc = summary["final"]["ema_val_acc"] or summary["final"]["val_acc"]
            msg.append(f"{name} {100 * acc:.2f}% ({dt:.0f} s)")
        what = "EMA accuracy" if cfg.ema_every else "accuracy"
        ctx.log(f"  check 7 seed {s} ({what}): " + ", ".join(msg))
    spe = steps_per_epoch(cfg, cfg.subset or DATASET_IMAGES[cfg.dataset][0])
    divergence = {}
    for name in ("jax", run_name(1)):
        if name in losses and spe:
            per_seed = [
                _divergence(a, b, spe) for a, b in zip(losses[name], losses["torch"], strict=True)
            ]
            divergence[f"{name} vs torch"] = {
                k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]
            }
    diag = {"seconds": seconds, "cpu_seconds": cpu_seconds, "loss_divergence": divergence}
    return runs, diag


def compare(
    runs: dict[str, list[list[dict[str, Any]]]],
    treatment: str,
    reference: list[str],
    epochs: int,
    label: str,
    *,
    headline: bool = True,
) -> tuple[list[Figure], list[dict[str, Any]]]:
    """`chaos_test` per (metric, epoch), Bonferroni over all of them: figures and table rows
    (the EMA's accuracy only where the runs have an EMA)."""
    has_ema = runs[treatment][0][0]["ema_val_acc"] is not None
    metrics = METRICS if has_ema else METRICS[:1]
    n_tests = len(metrics) * epochs
    figures, rows = [], []
    for metric in metrics:
        for e in range(epochs):
            x = np.array([r[e][metric] for r in runs[treatment]], np.float64)
            y = np.array(
                [[runs[n][s][e][metric] for n in reference] for s in range(len(x))], np.float64
            )
            test = stats.chaos_test(x, y, n_tests=n_tests, alpha=ALPHA)
            name = f"{label}{metric} epoch {e + 1}: |{treatment} - torch| (points)"
            figures.append(Figure(name, 100 * abs(test.diff), 100 * test.bar, headline=headline))
            rows.append(
                {
                    "metric": metric,
                    "epoch": e + 1,
                    "treatment": treatment,
                    "reference": list(reference),
                    "treatment_mean": float(x.mean()),
                    "reference_mean": float(y.mean()),
                    **test.as_dict(),
                }
            )
    return figures, rows


def check_curves(ctx: Context, *, with_jax: bool = True) -> CheckResult:
    """Per-epoch accuracy and EMA accuracy: JAX against torch_ref, and torch_ref against itself.

    Per (metric, epoch), `stats.chaos_test` of jax against all torch runs (`train_runs`), and as
    the null of the last rerun against the others (exchangeable by construction, so exactly
    valid), each Bonferroni-corrected at ALPHA: an unbroken trainer fails with probability <= 2
    ALPHA if chaos saturates (the report warns when not) and the noise is near Gaussian (which
    the null tests every call). The bar scales with the chaos measured in the same call. Power
    (quick, 3 seeds): bar ~4.1 chaos sd, a bias of 4, 6, 8 sd caught ~50%, 93%, >99% of the
    time; 4 seeds: ~3.0 sd, 5: ~2.4 sd (`--seeds`). `with_jax=False`: the torch runs and null.
    """
    res = CheckResult(7, "epoch accuracy curves")
    if ctx.data is None:
        res.error = "needs CIFAR-10: pass --data-dir DIR or set JAXBENCH_DATA_DIR"
        return res
    cfg, note = curve_config(ctx)
    n_train = cfg.subset or len(ctx.data.train_images)
    data = subset_data(ctx.data, n_train, cfg.test_subset or len(ctx.data.test_images))
    runs, diag = train_runs(ctx, cfg, data, with_jax=with_jax)
    torch_names = [run_name(k) for k in range(TORCH_RUNS)]
    table: list[dict[str, Any]] = []
    if with_jax:
        figs, table = compare(runs, "jax", torch_names, cfg.epochs, "")
        res.figures += figs
    null = (runs, torch_names[-1], torch_names[:-1], cfg.epochs, "null: ")
    figs, null_table = compare(*null, headline=not with_jax)
    res.figures += figs
    ctx.curves = dict(
        runs=runs, config=cfg.to_dict(), note=note, table=table, null_table=null_table
    )
    res.details = {
        "note": note,
        "seeds": ctx.seeds,
        "torch_runs": TORCH_RUNS,
        "alpha": ALPHA,
        "init": "shared per seed; torch reruns perturbed by ~1 ulp",
        "table": table,
        "null_table": null_table,
        **diag,
    }
    return res
