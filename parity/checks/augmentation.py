"""Check 5: the shared stream's batches, byte for byte in both frameworks."""

from __future__ import annotations

import numpy as np

from jaxbench.stream import apply_plan_numpy, epoch_plan
from parity.checks.base import CheckResult, Context, Figure


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
        res.figures.append(
            Figure(
                f"bytes differing, {who.replace('_', ' ')}", sum(r[who] for r in rows.values()), 0
            )
        )
    res.details = {"batches": rows, "crop_pad": ctx.cfg.crop_pad, "cutout": ctx.cfg.cutout}
    return res


def _count_diff(a: np.ndarray, b: np.ndarray) -> int:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return int(max(a.size, b.size))
    return int(np.sum(a != b))
