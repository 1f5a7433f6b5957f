"""The airbench94-style net of the `speedrun` preset, in Flax.

    whiten (conv 2x2 VALID, 3 -> 24, bias; weight from `jaxbench.whitening`, frozen)
    -> GELU (exact erf) -> block1, block2, block3 -> max pool 3 -> flatten -> head
    (linear, no bias) -> x output_scale (1/9)

Each block: `conv1` (3x3, pad 1, no bias), max pool 2, `bn1`, GELU, `conv2`
(3x3, pad 1, no bias), `bn2`, GELU. Spatial sizes for 32x32 input: 31 after the
whitening conv, then 15, 7, 3, and 1 after the final pool (so flattening is
layout-independent and `head` sees `widths[-1]` features).

Names mirror `torch_ref.speedrun_model` for the name-based weight conversion:
`params["whiten"]["kernel"|"bias"]`, `params["blockN"]["convK"]["kernel"]`
(HWIO), `params["blockN"]["bnK"]["bias"]`, `batch_stats["blockN"]["bnK"]["mean"|"var"]`
(PyTorch's unbiased running variance), `params["head"]["kernel"]` (in, out).

BN scale: with `bn_scale_trainable=False` (the preset) BN has *no* scale
parameter (`use_scale=False`), and PyTorch's BN has `weight=None`; both
multiply by an implicit 1, nothing needs freezing or masking, and the two
parameter trees map one to one. BN statistics are float32 (float32 params and
reductions) whatever the compute dtype; `use_fast_variance=False` so variances
match PyTorch's two-pass computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxbench.configs import Config
from jaxbench.models import NUM_CLASSES, Initializer, torch_batch_norm, torch_default_init

Array = jax.Array

WHITEN_CHANNELS = 24  # concat(W, -W) of 12 eigenvectors of 2x2x3 patches


def gelu(x: Array) -> Array:
    """Exact (erf) GELU, as PyTorch's `nn.GELU()`; `jax.nn.gelu` defaults to tanh."""
    return jax.nn.gelu(x, approximate=False)


def torch_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init, uniform(+-1/sqrt(fan_in)) of the layer's weight fan-in."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dirac_init(base: Initializer = torch_default_init) -> Initializer:
    """`base`, then identity on the first min(C_in, C_out) filters (torch `dirac_(w[:C_in])`).

    Filter o < C_in becomes a centred delta on input channel o, so each conv starts
    by passing its input through (airbench's identity init).
    """

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        kh, kw, c_in, c_out = shape
        n = min(c_in, c_out)
        kernel = base(key, shape, dtype)
        kernel = kernel.at[:, :, :, :n].set(0)
        idx = jnp.arange(n)
        return kernel.at[kh // 2, kw // 2, idx, idx].set(1)

    return init


class ConvGroup(nn.Module):
    """conv1, max pool 2, bn1, GELU, conv2, bn2, GELU."""

    width: int
    bn_momentum: float = 0.4  # PyTorch convention: new = (1 - m) * old + m * batch
    bn_eps: float = 1e-12
    bn_scale_trainable: bool = False
    dtype: Any = jnp.float32
    kernel_init: Initializer = torch_default_init  # before the dirac part

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        conv = partial(
            nn.Conv,
            self.width,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=dirac_init(self.kernel_init),
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )

        def bn(name: str) -> nn.BatchNorm:
            return torch_batch_norm(
                train,
                self.bn_momentum,
                self.bn_eps,
                self.dtype,
                name,
                use_scale=self.bn_scale_trainable,
            )

        x = conv(name="conv1")(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = gelu(bn("bn1")(x))
        x = conv(name="conv2")(x)
        return gelu(bn("bn2")(x))


class SpeedrunNet(nn.Module):
    """airbench94's net; NHWC float input (normalised), float32 logits out."""

    widths: Sequence[int] = (64, 256, 256)
    num_classes: int = 10
    output_scale: float = 1.0 / 9.0
    bn_momentum: float = 0.4
    bn_eps: float = 1e-12
    bn_scale_trainable: bool = False
    dtype: Any = jnp.float32  # compute dtype; parameters and BN statistics stay float32
    kernel_init: Initializer = torch_default_init  # overridable for the parity plants

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        c_in = x.shape[-1]
        x = nn.Conv(
            2 * c_in * 4,
            (2, 2),
            padding="VALID",
            use_bias=True,
            kernel_init=self.kernel_init,
            bias_init=torch_bias_init(c_in * 4),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="whiten",
        )(x.astype(self.dtype))
        x = gelu(x)
        for i, width in enumerate(self.widths):
            x = ConvGroup(
                width,
                self.bn_momentum,
                self.bn_eps,
                self.bn_scale_trainable,
                self.dtype,
                self.kernel_init,
                name=f"block{i + 1}",
            )(x, train)
        x = nn.max_pool(x, (3, 3), strides=(3, 3))  # VALID: floor, as torch MaxPool2d(3)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(
            self.num_classes,
            use_bias=False,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="head",
        )(x)
        return x.astype(jnp.float32) * self.output_scale


def speedrun_from_config(cfg: Config, dtype: Any = jnp.float32, **overrides: Any) -> SpeedrunNet:
    """The net a config describes (`cfg.widths` has three numbers); `overrides` win."""
    if len(cfg.widths) != 3:
        raise ValueError(f"the speedrun net takes three --widths, got {cfg.widths}")
    fields: dict[str, Any] = dict(
        widths=tuple(cfg.widths),
        num_classes=NUM_CLASSES[cfg.dataset],
        output_scale=cfg.output_scale,
        bn_momentum=cfg.bn_momentum,
        bn_eps=cfg.bn_eps,
        bn_scale_trainable=cfg.bn_scale_trainable,
        dtype=dtype,
    )
    fields.update(overrides)
    return SpeedrunNet(**fields)


def with_whitening(variables: dict[str, Any], kernel_HWIO: Array | np.ndarray) -> dict[str, Any]:
    """A copy of `variables` whose whitening kernel is `kernel_HWIO` (shape-checked)."""
    params = dict(variables["params"])
    whiten = dict(params["whiten"])
    old = whiten["kernel"]
    if tuple(kernel_HWIO.shape) != tuple(old.shape):
        raise ValueError(f"whitening kernel shape {kernel_HWIO.shape} != {old.shape}")
    whiten["kernel"] = jnp.asarray(kernel_HWIO, old.dtype)
    params["whiten"] = whiten
    return {**variables, "params": params}


def patch_moment_groups(images_u8_NHWC: Array, patch: int = 2, group: int = 32) -> Array:
    """Exact integer 2x2-patch second moments on the device, summed per group of images.

    Returns int32 (ceil(N / group), d + 1, d + 1) with d = C * patch^2: the sums of
    [u, 1] [u, 1]^T over every patch of each group's images, features ordered
    (c, kh, kw) as `jaxbench.whitening.patch_moments` orders them, so the host
    finishes in int64 and gets the very same numbers (and hence kernel).
    Exactness: a row of 31 patches sums products <= 255^2 to < 2^24 (exact in
    float32 at HIGHEST precision); an image's sum < 2^26 and a group of 32 < 2^31.
    """
    u = images_u8_NHWC.astype(jnp.float32)
    n, h, w, c = u.shape
    ho, wo = h - patch + 1, w - patch + 1
    feats = [
        u[:, kh : kh + ho, kw : kw + wo, ch]
        for ch in range(c)
        for kh in range(patch)
        for kw in range(patch)
    ]
    feats.append(jnp.ones((n, ho, wo), jnp.float32))  # the constant: sum of u and the count
    p = jnp.stack(feats, axis=-1)  # (N, H', W', d + 1)
    rows = jnp.einsum("nhwi,nhwj->nhij", p, p, precision=jax.lax.Precision.HIGHEST)
    per_image = rows.astype(jnp.int32).sum(axis=1)  # (N, d + 1, d + 1)
    pad = (-n) % group
    per_image = jnp.pad(per_image, ((0, pad), (0, 0), (0, 0)))
    return per_image.reshape(-1, group, *per_image.shape[1:]).sum(axis=1)


def moments_from_groups(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum of u u^T, sum of u, number of patches) in int64 from `patch_moment_groups`."""
    total = np.asarray(groups, np.int64).sum(axis=0)
    d = total.shape[0] - 1
    return total[:d, :d], total[:d, d], int(total[d, d])
