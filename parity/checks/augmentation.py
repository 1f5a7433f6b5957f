"""Check 5: the shared stream's batches, byte for byte in both frameworks, and the colour
jitter: bit for bit on the same float32 images, the trainers' whole input (normalised, then
jittered) within the rounding their normalisation shows without jitter in the same run, and
the ranges each framework's device generator draws the jitter from."""

from __future__ import annotations

import numpy as np

from jaxbench.configs import Config
from jaxbench.stream import apply_plan_numpy, epoch_plan, has_jitter, jitter_numpy, normalize_numpy
from parity.checks.base import CheckResult, Context, Figure

# The record's ranges (cifar10_speedrun.py: brightness_range 0.1399, contrast_range 0.1308),
# for configs that do not jitter: the check covers the jitter whatever the preset.
RECORD_JITTER = {"jitter_brightness": 0.1399, "jitter_contrast": 0.1308}
# Of n >= 1024 uniform draws, the largest falls below 0.9 of the range with odds 0.95^1024.
REACH = 0.9
EPS32 = float(np.finfo(np.float32).eps)


def check_augment(ctx: Context) -> CheckResult:
    """The shared stream's batches, applied by JAX, PyTorch and numpy, are the same bytes."""
    res = CheckResult(5, "augmentation")
    h = ctx.harness
    assert ctx.images is not None
    images = ctx.images[:1024]
    rows: dict[str, dict[str, int]] = {}
    for flip in ("random", "alternating"):
        cfg = ctx.cfg.replace(flip=flip, batch_size=256, subset=None)
        for epoch in (0, 1):
            plan = epoch_plan(cfg, epoch, len(images))
            for step in (0, 1):
                bp = plan.batch(step, cfg.batch_size)
                ref = apply_plan_numpy(images, bp, cfg)
                j = h.jax_apply_plan(images, bp.as_dict(), cfg)
                t = h.torch_apply_plan(images, bp.as_dict(), cfg)
                rows[f"flip={flip} epoch={epoch} step={step}"] = {
                    "jax_vs_numpy": _count_diff(j, ref),
                    "torch_vs_numpy": _count_diff(t, ref),
                    "jax_vs_torch": _count_diff(j, t),
                    "flipped": int(bp.flip.sum()),
                }
    for who in ("jax_vs_numpy", "torch_vs_numpy", "jax_vs_torch"):
        n = sum(r[who] for r in rows.values())
        res.figures.append(Figure(f"bytes differing, {who.replace('_', ' ')}", n, 0))
    jcfg = ctx.cfg if has_jitter(ctx.cfg) else ctx.cfg.replace(**RECORD_JITTER)
    jcfg = jcfg.replace(batch_size=256, subset=None)
    jitter_rows = _jitter_inputs(ctx, images, jcfg)
    for who in ("jax_vs_numpy", "torch_vs_numpy"):
        n = sum(r[who] for r in jitter_rows.values())
        res.figures.append(Figure(f"jittered floats differing, {who.replace('_', ' ')}", n, 0))
        worst = max(r[f"{who} input"] for r in jitter_rows.values())
        name = f"trainer input vs numpy, {who.split('_')[0]}: max |diff| / rounding bound"
        res.figures.append(Figure(name, worst, 1.0))
    ranges = _jitter_ranges(ctx, len(images), jcfg)
    for name, r in ranges.items():
        what = f"{name}: draws outside the range or short of its ends"
        res.figures.append(Figure(what, r["bad"], 0))
    res.details = {
        "batches": rows,
        "crop_pad": ctx.cfg.crop_pad,
        "cutout": ctx.cfg.cutout,
        "jitter": {"brightness": jcfg.jitter_brightness, "contrast": jcfg.jitter_contrast},
        "jitter_batches": jitter_rows,
        "jitter_ranges": ranges,
    }
    return res


def _jitter_inputs(ctx: Context, images: np.ndarray, cfg: Config) -> dict[str, dict[str, float]]:
    """Per batch: how many values of each framework's jitter of the numpy-normalised images
    differ from `jitter_numpy`'s (bit for bit), and each trainer's whole input (its own
    normalisation, then the jitter) against numpy's, as a fraction of a rounding bound: the
    same trainer's normalisation error without jitter, times the largest contrast, plus 4
    float32 ulps of the largest value (the jitter's two roundings, with room)."""
    h, rows = ctx.harness, {}
    off = cfg.replace(jitter_brightness=0.0, jitter_contrast=0.0)
    for epoch in (0, 1):
        bp = epoch_plan(cfg, epoch, len(images)).batch(0, cfg.batch_size)
        plan = bp.as_dict()
        u8 = apply_plan_numpy(images, bp, cfg)
        x = normalize_numpy(u8, cfg.dataset)
        ref = jitter_numpy(x, bp.brightness, bp.contrast)
        row: dict[str, float] = {}
        for fw, jitter, normalize in (
            ("jax", h.jax_jitter, h.jax_normalize),
            ("torch", h.torch_jitter, h.torch_normalize),
        ):
            row[f"{fw}_vs_numpy"] = _count_diff(jitter(x, plan, cfg), ref)
            noise = float(np.abs(normalize(u8, plan, off) - x).max())
            bound = noise * float(bp.contrast.max()) + 4 * EPS32 * float(np.abs(ref).max())
            error = float(np.abs(normalize(u8, plan, cfg) - ref).max())
            row[f"{fw}_vs_numpy input"] = error / bound
        rows[f"epoch={epoch} step=0"] = row
    return rows


def _jitter_ranges(ctx: Context, n_train: int, cfg: Config) -> dict[str, dict[str, float]]:
    """Each device generator's jitter draws for one epoch: inside [-B, B) and [1-C, 1+C),
    and reaching within 10% of both ends (a halved or one-sided range falls short)."""
    out: dict[str, dict[str, float]] = {}
    for fw, draw in (("jax", ctx.harness.jax_draw_plan), ("torch", ctx.harness.torch_draw_plan)):
        plan = draw(11, n_train, cfg)
        for field, centre, half in (
            ("brightness", 0.0, cfg.jitter_brightness),
            ("contrast", 1.0, cfg.jitter_contrast),
        ):
            x = (np.asarray(plan[field], np.float64) - centre) / half
            inside = np.sum((x >= -1.0) & (x <= 1.0))
            bad = int(len(x) - inside) + int(x.min() > -REACH) + int(x.max() < REACH)
            out[f"{fw} {field}"] = {"bad": bad, "min": float(x.min()), "max": float(x.max())}
    return out


def _count_diff(a: np.ndarray, b: np.ndarray) -> int:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return int(max(a.size, b.size))
    return int(np.sum(a != b))
