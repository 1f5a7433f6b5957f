"""The Myrtle ResNet-9 in Flax, named and initialised like its PyTorch twin.

Module names follow docs/design.md (`prep`, `layer1`, `res1a`, ..., `head`, each
conv block holding `conv` and `bn`) so that `parity` can convert weights by name.
The default kernel init is PyTorch's (uniform +-1/sqrt(fan_in)), not Flax's
lecun_normal, so that both frameworks start from the same distribution;
`kernel_init` stays overridable so the parity suite can plant other inits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxbench.configs import Config

Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]
NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100}


def torch_default_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = all axes but the last (HWIO / (in, out)).

    This is what PyTorch's `kaiming_uniform_(a=sqrt(5))` default amounts to for
    conv and linear weights.
    """
    fan_in = math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, tuple(shape), dtype, minval=-bound, maxval=bound)


class BatchNorm(nn.Module):
    """PyTorch's `BatchNorm2d` in Flax: the same arithmetic and the same stored statistics.

    Flax's `nn.BatchNorm` stores the running average of the *biased* batch
    variance; PyTorch stores the *unbiased* one (x n / (n - 1)) and normalises
    by it in eval mode. Storing PyTorch's number makes eval-mode outputs and
    the EMA of BN statistics the same in both frameworks and weight conversion
    a plain copy. `momentum` is PyTorch's (the weight of the new statistic).
    Statistics are two-pass and float32, also under bfloat16 compute; parameter
    and variable names (`scale`, `bias`; `mean`, `var`) are Flax's.
    """

    train: bool = False  # batch statistics (and update the running ones) vs running ones
    momentum: float = 0.1
    epsilon: float = 1e-5
    use_scale: bool = True
    dtype: Any = jnp.float32
    # One-pass E[x^2] - E[x]^2 (Flax's `use_fast_variance`): never used by the trainers,
    # whose two-pass variance is PyTorch's; `jaxbench.microbench` times the difference.
    fast_variance: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        if self.train:
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axes)
            if self.fast_variance:
                var = jnp.mean(jnp.square(x32), axes) - jnp.square(mean)
            else:  # biased: what normalises the batch
                var = jnp.mean(jnp.square(x32 - mean), axes)
            if not self.is_initializing():
                n = math.prod(x.shape[:-1])
                m = self.momentum
                ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
                ra_var.value = (1.0 - m) * ra_var.value + m * (var * (n / max(n - 1, 1)))
        else:
            mean, var = ra_mean.value, ra_var.value
        mul = jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            mul = mul * self.param("scale", nn.initializers.ones, (features,), jnp.float32)
        y = (x - mean) * mul + self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return y.astype(self.dtype)


def torch_batch_norm(
    train: bool,
    momentum: float,
    eps: float,
    dtype: Any,
    name: str,
    use_scale: bool = True,
) -> nn.Module:
    """The BN layer both Flax nets build, in training or eval mode (`BatchNorm`)."""
    return BatchNorm(
        train=train, momentum=momentum, epsilon=eps, use_scale=use_scale, dtype=dtype, name=name
    )


class ConvBN(nn.Module):
    """conv3x3 (no bias, padding 1 like PyTorch) -> BatchNorm -> ReLU [-> max pool 2]."""

    features: int
    pool: bool = False
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32
    kernel_init: Initializer = torch_default_init

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Conv(
            self.features,
            (3, 3),
            padding=((1, 1), (1, 1)),  # explicit: 'SAME' differs from PyTorch for stride 2
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=self.kernel_init,
            name="conv",
        )(x)
        x = torch_batch_norm(train, self.bn_momentum, self.bn_eps, self.dtype, "bn")(x)
        x = nn.relu(x)
        if self.pool:
            x = nn.max_pool(x, (2, 2), strides=(2, 2))  # Flax's default stride is 1
        return x


class ResNet9(nn.Module):
    """Myrtle ResNet-9: prep, layer1 + residual, layer2, layer3 + residual, max pool, linear.

    Input: normalised float NHWC images. Output: float32 logits times `output_scale`.
    """

    widths: tuple[int, ...] = (64, 128, 256, 512)
    num_classes: int = 10
    output_scale: float = 0.125
    bn_momentum: float = 0.1  # PyTorch convention: weight of the new batch statistic
    bn_eps: float = 1e-5
    dtype: Any = jnp.float32  # compute dtype; parameters and BN statistics stay float32
    kernel_init: Initializer = torch_default_init

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        w0, w1, w2, w3 = self.widths

        def block(features: int, name: str, pool: bool = False) -> ConvBN:
            return ConvBN(
                features,
                pool=pool,
                bn_momentum=self.bn_momentum,
                bn_eps=self.bn_eps,
                dtype=self.dtype,
                kernel_init=self.kernel_init,
                name=name,
            )

        x = x.astype(self.dtype)
        x = block(w0, "prep")(x, train)
        x = block(w1, "layer1", pool=True)(x, train)
        x = x + block(w1, "res1b")(block(w1, "res1a")(x, train), train)
        x = block(w2, "layer2", pool=True)(x, train)
        x = block(w3, "layer3", pool=True)(x, train)
        x = x + block(w3, "res3b")(block(w3, "res3a")(x, train), train)
        x = jnp.max(x, axis=(1, 2))  # global max pool
        x = nn.Dense(
            self.num_classes,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=self.kernel_init,
            name="head",
        )(x)
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
        from jaxbench.speedrun_model import speedrun_from_config

        return speedrun_from_config(cfg, compute_dtype(cfg), **overrides)
    if cfg.model != "resnet9":
        raise ValueError(f"unknown --model {cfg.model!r}; this trainer builds resnet9, speedrun")
    fields: dict[str, Any] = dict(
        widths=tuple(cfg.widths),
        num_classes=NUM_CLASSES[cfg.dataset],
        output_scale=cfg.output_scale,
        bn_momentum=cfg.bn_momentum,
        bn_eps=cfg.bn_eps,
        dtype=compute_dtype(cfg),
    )
    fields.update(overrides)
    return ResNet9(**fields)


def init_variables(model: nn.Module, key: jax.Array) -> dict[str, Any]:
    """Fresh {'params', 'batch_stats'} for 32x32x3 inputs.

    For a ResNet9 with the default `torch_default_init`, all kernels come from
    one uniform(-1, 1) draw of `key`, cut in name order and scaled by
    1/sqrt(fan_in) (the same distribution as `model.init`, but XLA:CPU compiles
    one threefry call in 0.3 s rather than nine in ~6 s). Every other net (the
    speedrun net's dirac filters and conv bias) and a planted `kernel_init` go
    through Flax's own `model.init`.
    """
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    if not isinstance(model, ResNet9) or model.kernel_init is not torch_default_init:
        init = jax.jit(lambda k: model.init(k, x, train=False))
        variables = init(key)
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
    for p, leaf in flat.items():
        if p[-1] != "kernel":  # BN scale 1, bias 0
            params[p] = np.full(leaf.shape, 1.0 if p[-1] == "scale" else 0.0, np.float32)
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
