"""Augmentation on the device: apply a batch plan, or draw a whole epoch's plan with jax.random.

`apply_plan` is `jaxbench.stream`'s crop -> flip -> cutout as one gather and one masked
fill inside the training jit, bit for bit `stream.apply_plan_numpy`; `draw_plan` draws
`stream.epoch_plan`'s distributions on the device. Plans are dicts of `EpochPlan`'s fields.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbench.configs import Config
from jaxbench.stream import (
    FILL_RGB,
    IMAGE_SIZE,
    MEAN_STD,
    EpochPlan,
    has_jitter,
    steps_per_epoch,
    tta_weights,
)

Plan = dict[str, jax.Array]
PLAN_FIELDS: tuple[str, ...] = (
    "indices", "crop_y", "crop_x", "flip", "cutout_y", "cutout_x", "brightness", "contrast",
)  # fmt: skip


def _reflect(i: jax.Array) -> jax.Array:
    """Index into the unpadded image of padded index i (numpy 'reflect': edge not repeated)."""
    i = jnp.abs(i)
    return jnp.where(i > IMAGE_SIZE - 1, 2 * (IMAGE_SIZE - 1) - i, i)


def apply_plan(images_u8: jax.Array, plan: Plan | EpochPlan, cfg: Config) -> jax.Array:
    """Augmented uint8 NHWC batch for one batch `plan`: pixel (r, c) of slot b reads image
    `indices[b]` at row reflect(crop_y + r - pad), column reflect(crop_x + c' - pad), c' =
    31 - c when flipped; then cutout's masked fill."""
    if isinstance(plan, EpochPlan):
        plan = plan.as_dict()
    p = cfg.crop_pad
    idx = jnp.asarray(plan["indices"], jnp.int32)
    pos = jnp.arange(IMAGE_SIZE, dtype=jnp.int32)
    flip = jnp.asarray(plan["flip"], bool)[:, None]
    cols = jnp.where(flip, IMAGE_SIZE - 1 - pos[None, :], pos[None, :])  # (B, 32)
    rows = jnp.broadcast_to(pos[None, :], cols.shape)
    if p:
        rows = _reflect(rows + jnp.asarray(plan["crop_y"], jnp.int32)[:, None] - p)
        cols = _reflect(cols + jnp.asarray(plan["crop_x"], jnp.int32)[:, None] - p)
    out = images_u8[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, 32, 32, 3)
    if cfg.cutout:
        s = cfg.cutout
        cy = jnp.asarray(plan["cutout_y"], jnp.int32)[:, None]
        cx = jnp.asarray(plan["cutout_x"], jnp.int32)[:, None]
        in_y = (pos[None, :] >= cy) & (pos[None, :] < cy + s)
        in_x = (pos[None, :] >= cx) & (pos[None, :] < cx + s)
        mask = in_y[:, :, None, None] & in_x[:, None, :, None]
        out = jnp.where(mask, jnp.asarray(FILL_RGB, jnp.uint8), out)
    return out


def plan_to_device(plan: EpochPlan) -> Plan:
    """A shared numpy plan as device arrays (one transfer per epoch)."""
    return {f: jnp.asarray(getattr(plan, f)) for f in PLAN_FIELDS}


def plan_batch(plan: Plan, step: jax.Array | int, batch_size: int) -> Plan:
    """The slice of an epoch plan that `step` consumes; `step` may be traced."""
    return {
        f: jax.lax.dynamic_slice_in_dim(v, step * batch_size, batch_size) for f, v in plan.items()
    }


@functools.partial(jax.jit, static_argnames="cfg")
def apply_epoch_plan_jit(
    images_u8: jax.Array, plan: Plan, step: jax.Array | int, cfg: Config
) -> jax.Array:
    """Augmented batch `step` of an epoch plan: `plan_batch` then `apply_plan`."""
    return apply_plan(images_u8, plan_batch(plan, step, cfg.batch_size), cfg)


def draw_plan(key: jax.Array, epoch: jax.Array | int, n_train: int, cfg: Config) -> Plan:
    """An epoch plan drawn on the device from the run's data key with the epoch (maybe
    traced) folded in; alternating flip's base flips ignore the epoch (one draw per run)."""
    n = steps_per_epoch(cfg, n_train) * cfg.batch_size
    plan_key, flip_key = jax.random.split(key)
    k_perm, k_cy, k_cx, k_flip, k_uy, k_ux = jax.random.split(
        jax.random.fold_in(plan_key, epoch), 6
    )
    indices = jax.random.permutation(k_perm, n_train)[:n].astype(jnp.int32)
    span = 2 * cfg.crop_pad + 1
    crop_y = jax.random.randint(k_cy, (n,), 0, span, jnp.int32)
    crop_x = jax.random.randint(k_cx, (n,), 0, span, jnp.int32)
    if cfg.flip == "random":
        flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    elif cfg.flip == "alternating":
        base = jax.random.bernoulli(flip_key, 0.5, (n_train,))
        flip = base[indices] ^ (jnp.asarray(epoch) % 2 == 1)
    else:
        flip = jnp.zeros((n,), bool)
    corner = IMAGE_SIZE - cfg.cutout + 1
    cutout_y = jax.random.randint(k_uy, (n,), 0, corner, jnp.int32)
    cutout_x = jax.random.randint(k_ux, (n,), 0, corner, jnp.int32)
    brightness, contrast = jnp.zeros((n,), jnp.float32), jnp.ones((n,), jnp.float32)
    if has_jitter(cfg):  # keys of their own: the draws above stay as they were without jitter
        k_b, k_c = jax.random.split(jax.random.fold_in(flip_key, epoch), 2)
        brightness = jax.random.uniform(k_b, (n,), jnp.float32, -1.0, 1.0) * cfg.jitter_brightness
        contrast = jax.random.uniform(k_c, (n,), jnp.float32, -1.0, 1.0) * cfg.jitter_contrast + 1
    drawn = (indices, crop_y, crop_x, flip, cutout_y, cutout_x, brightness, contrast)
    return dict(zip(PLAN_FIELDS, drawn, strict=True))


def normalize(
    images_u8: jax.Array,
    dataset: str = "cifar10",
    dtype: Any = jnp.float32,
    jitter: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """`(x / 255 - mean) / std` in float32 (as `stream.normalize_numpy`); with `jitter`, a
    batch plan's (brightness, contrast), `(x + b) * c` per image (`stream.jitter_numpy`);
    then cast to `dtype`."""
    mean, std = (np.asarray(v, np.float32) for v in MEAN_STD[dataset])
    x = (images_u8.astype(jnp.float32) / 255.0 - mean) / std
    if jitter is not None:
        x = color_jitter(x, *jitter)
    return x.astype(dtype)


def color_jitter(x_NHWC: jax.Array, brightness: jax.Array, contrast: jax.Array) -> jax.Array:
    """`(x + b) * c` per image in float32 (`stream.jitter_numpy`): two rounded operations,
    so the same inputs give the same bits in every framework."""
    b = jnp.asarray(brightness, jnp.float32)[:, None, None, None]
    c = jnp.asarray(contrast, jnp.float32)[:, None, None, None]
    return (x_NHWC + b) * c


def plan_jitter(plan: Plan | EpochPlan, cfg: Config) -> tuple[jax.Array, jax.Array] | None:
    """A batch plan's (brightness, contrast) when the config jitters, else None."""
    if not has_jitter(cfg):
        return None
    if isinstance(plan, EpochPlan):
        plan = plan.as_dict()
    return jnp.asarray(plan["brightness"]), jnp.asarray(plan["contrast"])


def tta_logits(
    logits_fn: Callable[[jax.Array], jax.Array], x_NHWC: jax.Array, cfg: Config
) -> tuple[jax.Array, jax.Array]:
    """(logits of every test-time view `[V, N, C]`, their `stream.tta_weights` sum), float32;
    each view goes through `logits_fn` with its mirror in one call, as airbench does."""
    views = [x_NHWC]
    if cfg.tta and cfg.tta_shift:
        padded = jnp.pad(x_NHWC, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        h, w = x_NHWC.shape[1], x_NHWC.shape[2]
        views += [padded[:, :h, :w], padded[:, 2 : 2 + h, 2 : 2 + w]]
    n = x_NHWC.shape[0]
    out: list[jax.Array] = []
    for view in views:
        if cfg.tta:
            pair = logits_fn(jnp.concatenate([view, view[:, :, ::-1]])).astype(jnp.float32)
            out += [pair[:n], pair[n:]]
        else:
            out.append(logits_fn(view).astype(jnp.float32))
    combined = sum(w * v for w, v in zip(tta_weights(cfg), out, strict=True))
    return jnp.stack(out), combined
