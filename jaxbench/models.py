"""The Myrtle ResNet-9 in Flax, named and initialised like its PyTorch twin.

Module names follow docs/design.md (`prep`, `layer1`, `res1a`, ..., `head`) so `parity`
converts weights by name; the blocks come from `jaxbench.layers`. Kernels start from
PyTorch's init, not Flax's lecun_normal (`kernel_init` stays open for the parity plants).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxbench import layers
from jaxbench.configs import Config
from jaxbench.layers import BatchNorm, Initializer, torch_default_init
from jaxbench.speedrun_model import net_fields, speedrun_from_config

__all__ = ["BatchNorm", "ConvBN", "ResNet9", "model_from_config", "torch_default_init"]


class ConvBN(nn.Module):
    """conv3x3 (no bias, padding 1 like PyTorch), BN and the activation, with an optional
    2x2 max pool placed by `cfg.pool_before_act` (`layers.conv_block`)."""

    features: int
    pool: bool = False
    cfg: Config = Config()
    dtype: Any = jnp.float32
    kernel_init: Initializer = torch_default_init

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = layers.conv(self.features, 3, self.dtype, self.kernel_init, "conv")
        norm = layers.batch_norm(self.cfg, train, self.dtype, "bn")
        return layers.conv_block(self.cfg, x, conv, norm, self.pool)


class ResNet9(nn.Module):
    """Myrtle ResNet-9: prep, layer1 + residual, layer2, layer3 + residual, max pool, linear;
    normalised NHWC in, float32 logits x `output_scale` out. `cfg` picks the layers; the
    other fields override it (the parity suite plants through them)."""

    widths: tuple[int, ...] = (64, 128, 256, 512)
    num_classes: int = 10
    output_scale: float = 0.125
    bn_momentum: float = 0.1  # PyTorch convention: weight of the new batch statistic
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32  # compute dtype; parameters and BN statistics stay float32
    kernel_init: Initializer = torch_default_init
    cfg: Config = Config()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        w0, w1, w2, w3 = self.widths
        cfg = self.cfg.replace(bn_momentum=self.bn_momentum, bn_eps=self.bn_eps)

        def block(features: int, name: str, pool: bool = False) -> ConvBN:
            return ConvBN(
                features,
                pool=pool,
                cfg=cfg,
                dtype=self.dtype,
                kernel_init=self.kernel_init,
                name=name,
            )

        x = x.astype(self.dtype)
        if cfg.whiten == "patch3":
            x = layers.PatchWhiten(
                cfg, w0, train, self.dtype, kernel_init=self.kernel_init, name="prep"
            )(x)
        else:
            x = block(w0, "prep")(x, train)
        x = block(w1, "layer1", pool=True)(x, train)
        x = x + block(w1, "res1b")(block(w1, "res1a")(x, train), train)
        x = block(w2, "layer2", pool=True)(x, train)
        x = block(w3, "layer3", pool=True)(x, train)
        x = x + block(w3, "res3b")(block(w3, "res3a")(x, train), train)
        x = jnp.max(x, axis=(1, 2))  # global max pool
        x = layers.head(self.num_classes, self.dtype, self.kernel_init)(x)
        return x.astype(jnp.float32) * self.output_scale


def compute_dtype(cfg: Config) -> Any:
    """The activation dtype: bfloat16 on accelerators under `precision=auto`, else float32."""
    if cfg.precision == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[cfg.precision]


def model_from_config(cfg: Config, **overrides: Any) -> Any:
    """The net a config describes (ResNet9, or SpeedrunNet for `model="speedrun"`);
    `overrides` (e.g. `kernel_init`) win over the config."""
    if cfg.model == "speedrun":
        return speedrun_from_config(cfg, compute_dtype(cfg), **overrides)
    if cfg.model != "resnet9":
        raise ValueError(f"unknown --model {cfg.model!r}; this trainer builds resnet9, speedrun")
    return ResNet9(**(net_fields(cfg, compute_dtype(cfg)) | overrides))


def init_variables(model: nn.Module, key: jax.Array) -> dict[str, Any]:
    """Fresh {'params', 'batch_stats'} for 32x32x3 inputs. A ResNet9 with `torch_default_init`
    draws every kernel from one uniform(-1, 1) call scaled by 1/sqrt(fan_in) (XLA:CPU
    compiles one threefry call in 0.3 s, nine in ~6 s); other nets use `model.init`."""
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    if not isinstance(model, ResNet9) or model.kernel_init is not torch_default_init:
        variables = jax.jit(lambda k: model.init(k, x, train=False))(key)
        return {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    flat = traverse_util.flatten_dict(shapes["params"])
    kernels = sorted(p for p in flat if p[-1] == "kernel")
    total = sum(math.prod(flat[p].shape) for p in kernels)
    draw = jax.jit(lambda k: jax.random.uniform(k, (total,), jnp.float32, -1.0, 1.0))
    u = np.asarray(draw(key))
    params: dict[tuple[str, ...], np.ndarray] = {}
    offset = 0
    for p in kernels:
        shape = flat[p].shape
        size = math.prod(shape)
        bound = np.float32(1.0 / math.sqrt(math.prod(shape[:-1])))
        params[p] = u[offset : offset + size].reshape(shape) * bound
        offset += size
    scale = model.cfg.bn_scale
    for p, leaf in flat.items():
        if p[-1] != "kernel":  # BN scale (cfg.bn_scale), bias 0
            params[p] = np.full(leaf.shape, scale if p[-1] == "scale" else 0.0, np.float32)
    stats = traverse_util.flatten_dict(shapes["batch_stats"])
    batch_stats = {
        p: np.full(leaf.shape, 1.0 if p[-1] == "var" else 0.0, np.float32)
        for p, leaf in stats.items()
    }
    return jax.device_put(
        {
            "params": traverse_util.unflatten_dict(params),
            "batch_stats": traverse_util.unflatten_dict(batch_stats),
        }
    )


def param_count(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
