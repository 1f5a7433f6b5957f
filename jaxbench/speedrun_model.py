"""The airbench94-style net of the `speedrun` preset, in Flax.

whiten (2x2 VALID conv 3 -> 24, frozen weight from `jaxbench.whitening`) -> GELU -> block1..3
(`conv1`, max pool 2, `bn1`, act, `conv2`, `bn2`, act) -> max pool 3 -> `head` -> x 1/9. The
stem's GELU is fixed (all three sources); `cfg.activation` is the blocks' (the record's SiLU).
Spatial sizes 32, 31, 15, 7, 3, 1. Names mirror `torch_ref.speedrun_model`; with the
preset's `bn_scale_trainable=False` neither framework's BN has a scale: one to one.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxbench import layers
from jaxbench.configs import Config, speedrun
from jaxbench.layers import Initializer, dirac_init, torch_bias_init, torch_default_init

Array = jax.Array

NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100}


class ConvGroup(nn.Module):
    """conv1, max pool 2, bn1, act, conv2, bn2, act (the pool's place: `cfg.pool_before_act`)."""

    width: int
    cfg: Config
    dtype: Any = jnp.float32
    kernel_init: Initializer = torch_default_init  # before the dirac part

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        conv = partial(layers.conv, self.width, 3, self.dtype, dirac_init(self.kernel_init))
        bn = partial(layers.batch_norm, self.cfg, train, self.dtype)
        x = layers.conv_block(self.cfg, x, conv("conv1"), bn("bn1"), pool=True)
        return layers.conv_block(self.cfg, x, conv("conv2"), bn("bn2"), pool=False)


class SpeedrunNet(nn.Module):
    """airbench94's net; normalised NHWC in, float32 logits out. `cfg` picks the layers; the
    other fields override it (the parity suite plants through them)."""

    widths: Sequence[int] = (64, 256, 256)
    num_classes: int = 10
    output_scale: float = 1.0 / 9.0
    bn_momentum: float = 0.4
    bn_eps: float = 1e-12
    bn_scale_trainable: bool = False
    dtype: Any = jnp.float32  # compute dtype; parameters and BN statistics stay float32
    kernel_init: Initializer = torch_default_init  # overridable for the parity plants
    cfg: Config = speedrun()

    @nn.compact
    def __call__(self, x: Array, train: bool = True) -> Array:
        cfg = self.cfg.replace(
            bn_momentum=self.bn_momentum,
            bn_eps=self.bn_eps,
            bn_scale_trainable=self.bn_scale_trainable,
        )
        c_in = x.shape[-1]
        bias_init = (
            nn.initializers.zeros if cfg.whiten_bias_init == "zero" else torch_bias_init(c_in * 4)
        )
        whiten = partial(layers.conv, padding="VALID", use_bias=True, bias_init=bias_init)
        x = whiten(2 * c_in * 4, 2, self.dtype, self.kernel_init, "whiten")(x.astype(self.dtype))
        x = layers.activation(cfg.replace(activation="gelu"))(x)  # the stem's, fixed
        for i, width in enumerate(self.widths):
            x = ConvGroup(width, cfg, self.dtype, self.kernel_init, name=f"block{i + 1}")(x, train)
        x = layers.max_pool(x, 3)  # VALID: floor, as torch MaxPool2d(3)
        x = x.reshape(x.shape[0], -1)
        init = unit_std(self.kernel_init) if cfg.head_unit_std else self.kernel_init
        x = layers.head(self.num_classes, self.dtype, init)(x)
        return x.astype(jnp.float32) * self.output_scale


def unit_std(init: Initializer) -> Initializer:
    """`init` rescaled to unit (n - 1) standard deviation: airbench94_muon's head."""

    def rescaled(key: Array, shape: Any, dtype: Any = jnp.float32) -> Array:
        w = init(key, shape, dtype)
        return w * (1 / jnp.std(w, ddof=1))

    return rescaled


def speedrun_from_config(cfg: Config, dtype: Any = jnp.float32, **overrides: Any) -> SpeedrunNet:
    """The net a config describes (`cfg.widths` has three numbers); `overrides` win."""
    if len(cfg.widths) != 3:
        raise ValueError(f"the speedrun net takes three --widths, got {cfg.widths}")
    fields = net_fields(cfg, dtype) | {"bn_scale_trainable": cfg.bn_scale_trainable}
    return SpeedrunNet(**(fields | overrides))


def net_fields(cfg: Config, dtype: Any) -> dict[str, Any]:
    """The fields of either Flax net that a config sets."""
    return dict(
        widths=tuple(cfg.widths),
        num_classes=NUM_CLASSES[cfg.dataset],
        output_scale=cfg.output_scale,
        bn_momentum=cfg.bn_momentum,
        bn_eps=cfg.bn_eps,
        dtype=dtype,
        cfg=cfg,
    )


def with_whitening(variables: dict[str, Any], kernel_HWIO: Array | np.ndarray) -> dict[str, Any]:
    """A copy of `variables` whose whitening kernel is `kernel_HWIO` (shape-checked)."""
    return layers.with_whitening(variables, jnp.asarray(kernel_HWIO), ("whiten",))
