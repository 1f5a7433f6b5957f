"""The building blocks both Flax nets share, chosen by config fields, not by model name:
BN, the activation, the pool's place in a conv block and the whitening stems, so the nets
are only wiring and a new recipe is a config. `torch_ref.layers` mirrors it one to one."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxbench import parallel
from jaxbench.configs import Config

Array = jax.Array
Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]


# --- initialisers: PyTorch's defaults, spelled out ---------------------------------------


def torch_default_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """Uniform(+-1/sqrt(fan_in)), fan_in = all axes but the last: PyTorch's default
    `kaiming_uniform_(a=sqrt(5))` for conv and linear weights."""
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, tuple(shape), dtype, minval=-bound, maxval=bound)


def torch_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init, uniform(+-1/sqrt(fan_in)) of the layer's weight fan-in."""
    bound = 1.0 / math.sqrt(fan_in)
    return functools.partial(jax.random.uniform, minval=-bound, maxval=bound)


def dirac_init(base: Initializer = torch_default_init) -> Initializer:
    """`base`, then a centred delta on input channel o for each filter o < min(C_in, C_out)
    (torch `dirac_(w[:C_in])`), so each conv starts as the identity (airbench)."""

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        kh, kw, c_in, c_out = shape
        n = min(c_in, c_out)
        kernel = base(key, shape, dtype).at[:, :, :, :n].set(0)
        idx = jnp.arange(n)
        return kernel.at[kh // 2, kw // 2, idx, idx].set(1)

    return init


def conv(
    features: int,
    size: int,
    dtype: Any,
    kernel_init: Initializer,
    name: str,
    padding: Any = ((1, 1), (1, 1)),  # explicit: 'SAME' differs from PyTorch for stride 2
    use_bias: bool = False,
    bias_init: Initializer = nn.initializers.zeros,
) -> nn.Conv:
    """A size x size conv, stride 1, computing in `dtype` with float32 parameters."""
    return nn.Conv(
        features,
        (size, size),
        padding=padding,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def head(classes: int, dtype: Any, kernel_init: Initializer) -> nn.Dense:
    """The nets' last layer, `head`: a linear map without bias, float32 parameters."""
    return nn.Dense(
        classes,
        use_bias=False,
        kernel_init=kernel_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name="head",
    )


# --- normalisation -------------------------------------------------------------------------


class BatchNorm(nn.Module):
    """PyTorch's `BatchNorm2d` in Flax: its `momentum`, two-pass float32 statistics and
    *unbiased* running variance (Flax keeps the biased one), so weights convert by copy.
    Ghost BN (`ghost` > 0, Page's): in training image i is normalised with its group
    i mod (N / ghost), and the running statistics move towards the groups' mean."""

    train: bool = False  # batch statistics (and update the running ones) vs running ones
    momentum: float = 0.1
    epsilon: float = 1e-5
    use_scale: bool = True
    scale_init: float = 1.0  # the trainable scale's start, or the fixed scale
    ghost: int = 0  # images per ghost batch (0: the whole batch)
    # Contiguous shares of the batch normalised on their own (`--bn-sync local`: one per
    # device, ghost groups inside each); 1: statistics over the whole batch.
    shards: int = 1
    dtype: Any = jnp.float32
    # One-pass E[x^2] - E[x]^2 (Flax's `use_fast_variance`): never used by the trainers,
    # whose two-pass variance is PyTorch's; `jaxbench.microbench` times the difference.
    fast_variance: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        n_batch = x.shape[0]
        if self.train and self.shards > 1 and not self.is_initializing():
            return self._sharded(x, ra_mean, ra_var)
        # A batch of at most `ghost` images is one group (as in `torch_ref.layers`).
        splits = max(n_batch // self.ghost, 1) if self.ghost and self.train else 1
        if splits > 1 and n_batch % self.ghost:
            raise ValueError(f"ghost batch norm: batch {n_batch} is not a multiple of {self.ghost}")
        # Ghost groups: (N / splits, splits, H, W, C), so image i lands in group i mod splits.
        xs = x.reshape(n_batch // splits, splits, *x.shape[1:]) if splits > 1 else x
        if self.train:
            axes = (0, *range(2, xs.ndim - 1)) if splits > 1 else tuple(range(x.ndim - 1))
            x32 = xs.astype(jnp.float32)
            mean = jnp.mean(x32, axes, keepdims=splits > 1)
            if self.fast_variance:
                var = jnp.mean(jnp.square(x32), axes, keepdims=splits > 1) - jnp.square(mean)
            else:  # biased: what normalises the batch
                var = jnp.mean(jnp.square(x32 - mean), axes, keepdims=splits > 1)
            if not self.is_initializing():
                n = math.prod(x.shape[:-1]) // splits
                m = self.momentum
                unbiased = var * (n / max(n - 1, 1))
                if splits > 1:  # the mean of the groups' statistics
                    batch_mean = mean.reshape(splits, features).mean(0)
                    batch_var = unbiased.reshape(splits, features).mean(0)
                else:
                    batch_mean, batch_var = mean, unbiased
                ra_mean.value = (1.0 - m) * ra_mean.value + m * batch_mean
                ra_var.value = (1.0 - m) * ra_var.value + m * batch_var
        else:
            mean, var = ra_mean.value, ra_var.value
        return self._affine(xs, mean, var, x.shape)

    def _affine(self, xs: jax.Array, mean: Any, var: Any, shape: tuple[int, ...]) -> jax.Array:
        """(x - mean) / sqrt(var + eps) * scale + bias, back in the input's shape."""
        features = shape[-1]
        mul = jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            init = nn.initializers.constant(self.scale_init)
            mul = mul * self.param("scale", init, (features,), jnp.float32)
        elif self.scale_init != 1.0:
            mul = mul * jnp.float32(self.scale_init)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
        return ((xs - mean) * mul + bias).reshape(shape).astype(self.dtype)

    def _sharded(self, x: jax.Array, ra_mean: Any, ra_var: Any) -> jax.Array:
        """Training statistics per contiguous share of the batch (one device's part, so the
        reduction stays on it) and ghost group within it; running ones move to their mean."""
        n_batch, features = x.shape[0], x.shape[-1]
        if n_batch % self.shards:
            raise ValueError(f"batch norm: batch {n_batch} does not split into {self.shards}")
        share = n_batch // self.shards
        splits = max(share // self.ghost, 1) if self.ghost else 1
        if splits > 1 and share % self.ghost:
            raise ValueError(f"ghost batch norm: share {share} is not a multiple of {self.ghost}")
        xs = x.reshape(self.shards, share // splits, splits, *x.shape[1:])
        axes = (1, *range(3, xs.ndim - 1))
        x32 = xs.astype(jnp.float32)
        mean = jnp.mean(x32, axes, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axes, keepdims=True)
        if not self.is_initializing():
            n = math.prod(xs.shape[1:-1]) // splits
            m = self.momentum
            unbiased = var * (n / max(n - 1, 1))
            ra_mean.value = (1.0 - m) * ra_mean.value + m * mean.reshape(-1, features).mean(0)
            ra_var.value = (1.0 - m) * ra_var.value + m * unbiased.reshape(-1, features).mean(0)
        return self._affine(xs, mean, var, x.shape)


def batch_norm(cfg: Config, train: bool, dtype: Any, name: str) -> nn.Module:
    """The BN layer of `cfg` (momentum, eps, ghost groups, scale), in training or eval mode."""
    return BatchNorm(
        train=train,
        momentum=cfg.bn_momentum,
        epsilon=cfg.bn_eps,
        use_scale=cfg.bn_scale_trainable,
        scale_init=cfg.bn_scale,
        ghost=cfg.ghost_bn,
        shards=parallel.bn_shards(cfg),
        dtype=dtype,
        name=name,
    )


# --- activation and block order ------------------------------------------------------------


def activation(cfg: Config) -> Callable[[Array], Array]:
    """relu; celu with `cfg.celu_alpha` (jax's default alpha is 1.0, Page's 0.3); the exact
    erf GELU of PyTorch's `nn.GELU()` (`jax.nn.gelu` defaults to the tanh form); or SiLU."""
    if cfg.activation == "relu":
        return nn.relu
    if cfg.activation == "celu":
        return functools.partial(jax.nn.celu, alpha=cfg.celu_alpha)
    if cfg.activation == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if cfg.activation == "silu":
        return nn.silu
    raise ValueError(f"--activation must be relu, celu, gelu or silu, got {cfg.activation!r}")


def _windows(x_NHWC: Array, k: int) -> Array:
    """(N, H//k, k, W//k, k, C): the k x k windows, the odd rows/columns dropped (floor)."""
    n, h, w, c = x_NHWC.shape
    ho, wo = h // k, w // k
    return x_NHWC[:, : ho * k, : wo * k, :].reshape(n, ho, k, wo, k, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool(x_NHWC: Array, k: int) -> Array:
    """k x k max pool, stride k, VALID (floor, as PyTorch's `MaxPool2d(k)`), with Flax's values
    and gradients (to each window's first maximum) as a reshape and selects: XLA:CPU's
    select_and_scatter is slower (`tiny` step 168 vs 139 ms; `jaxbench.microbench` times it)."""
    return _windows(x_NHWC, k).max(axis=(2, 4))


def _max_pool_fwd(x_NHWC: Array, k: int) -> tuple[Array, tuple[Array, Array]]:
    """The max and its first position in one pass: `x == max` in the backward pass could
    miss, as XLA may recompute `x`'s producer there with other rounding."""
    win = _windows(x_NHWC, k)
    best = win[:, :, 0, :, 0, :]
    index = jnp.zeros(best.shape, jnp.int8)
    for p in range(1, k * k):
        v = win[:, :, p // k, :, p % k, :]
        better = (v > best) | jnp.isnan(v)  # PyTorch's test: ties keep the earlier position
        best = jnp.where(better, v, best)
        index = jnp.where(better, jnp.int8(p), index)
    # the rows and columns the floor dropped, as a (tiny) array's shape: residuals are arrays
    dropped = jnp.zeros((x_NHWC.shape[1] % k, x_NHWC.shape[2] % k), jnp.int8)
    return best, (index, dropped)


def _max_pool_bwd(k: int, res: tuple[Array, Array], g: Array) -> tuple[Array]:
    index, dropped = res
    zero = jnp.zeros((), g.dtype)
    rows = [
        jnp.stack([jnp.where(index == i * k + j, g, zero) for j in range(k)], axis=3)
        for i in range(k)
    ]
    dx = jnp.stack(rows, axis=2)  # (N, H//k, k, W//k, k, C)
    n, ho, _, wo, _, c = dx.shape
    dx = dx.reshape(n, ho * k, wo * k, c)
    return (jnp.pad(dx, ((0, 0), (0, dropped.shape[0]), (0, dropped.shape[1]), (0, 0))),)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv_block(cfg: Config, x: Array, conv: nn.Module, norm: nn.Module, pool: bool) -> Array:
    """conv -> BN -> act [-> pool], or with `cfg.pool_before_act` (Page's trick, airbench's
    order) conv [-> pool] -> BN -> act. A function, so each net keeps its module names."""
    act = activation(cfg)
    x = conv(x)
    if pool and cfg.pool_before_act:
        x = max_pool(x, 2)
    x = act(norm(x))
    if pool and not cfg.pool_before_act:
        x = max_pool(x, 2)
    return x


# --- whitening stems -------------------------------------------------------------------------


class PatchWhiten(nn.Module):
    """Page's stem: a frozen 3x3 whitening conv (`whiten`, 27 filters, set from the data
    before training), then a 1x1 conv (`conv`), BN (`bn`) and the activation."""

    cfg: Config
    features: int
    train: bool
    dtype: Any = jnp.float32
    kernel_init: Initializer = torch_default_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c_in = x.shape[-1]
        x = conv(c_in * 9, 3, self.dtype, self.kernel_init, "whiten")(x)
        one = conv(self.features, 1, self.dtype, self.kernel_init, "conv", padding="SAME")
        bn = batch_norm(self.cfg, self.train, self.dtype, "bn")
        return conv_block(self.cfg, x, one, bn, pool=False)


def whiten_path(cfg: Config) -> tuple[str, ...]:
    """Where the frozen whitening kernel sits in `params` for this config (() if none)."""
    return {"patch3": ("prep", "whiten"), "patch2": ("whiten",)}.get(cfg.whiten, ())


def whiten_patch(cfg: Config) -> int:
    """The whitening patch side: 3 (Page), 2 (airbench), 0 without whitening."""
    return {"patch3": 3, "patch2": 2}.get(cfg.whiten, 0)


def with_whitening(
    variables: dict[str, Any], kernel_HWIO: Array, path: tuple[str, ...]
) -> dict[str, Any]:
    """A copy of `variables` whose whitening kernel at `path` is `kernel_HWIO` (shape-checked)."""
    node = params = dict(variables["params"])
    for p in path:
        node[p] = dict(node[p])
        node = node[p]
    old = node["kernel"]
    if tuple(kernel_HWIO.shape) != tuple(old.shape):
        raise ValueError(f"whitening kernel shape {kernel_HWIO.shape} != {old.shape}")
    node["kernel"] = jnp.asarray(kernel_HWIO, old.dtype)
    return {**variables, "params": params}


def patch_moment_groups(images_u8_NHWC: Array, patch: int = 2, group: int = 32) -> Array:
    """int32 (ceil(N / group), d + 1, d + 1), d = C * patch^2: per group the sums of [u, 1]
    [u, 1]^T over every patch, ordered as `whitening.patch_moments`. Exact for patch <= 3 on
    32x32: a row's sum < 2^24 (float32 at HIGHEST), an image's < 2^26, a group's < 2^31."""
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
