"""Muon for the conv filters in optax: `jaxbench.muon`'s reference update, in float32.

`muon(spec, learning_rate, total_steps)` is an `optax.GradientTransformation` whose
updates are the whole step (momentum, Newton-Schulz, weight normalisation, LR, decay:
`params + updates` is the new filter), so it sits in an `optax.multi_transform`
beside the SGD groups of `jaxbench.optim` with no `scale_by_learning_rate` after it.
Every leaf it gets must be a flax HWIO conv kernel; `is_muon_param` names them.

Why not `optax.contrib.muon` (optax 0.2.8): it computes another update.
- Momentum: an EMA `mu = b * mu + (1 - b) * g` with Adam-style bias correction, and a
  nesterov input `b * mu_hat(t+1) + (1 - b) * g_hat(t)`; the sources use torch SGD's
  `buf = m * buf + g`, `g + m * buf`. Up to a positive factor (which the Frobenius
  normalisation removes) the two agree only once the bias corrections reach 1: the
  weight of the buffer against the gradient is m(1 - m^t)/(1 - m^(t+1)) there, m
  here (0.49 against 0.6 at the second update of airbench94_muon, checked
  numerically against `scale_by_muon(ns_steps=0)`; the first is a multiple of g in both).
- Newton-Schulz: 5 steps by default (the sources: 3); `x / (||x|| + eps)` with eps 1e-8
  (airbench94_muon 1e-7, the record 1e-5 after its target-magnitude pre-scaling,
  which optax does not have); the coefficients default to airbench94_muon's, the
  record's must be passed.
- 4-D tensors: only 2-D leaves go to Muon unless `MuonDimensionNumbers` are given
  (the rest go to AdamW); with reduction axes (0, 1, 2) and output axis 3 an HWIO
  kernel becomes the transpose of (out, kh*kw*in), the source's matrix with its
  columns permuted, which Newton-Schulz commutes with.
- Scale: `sqrt(max(1, fan_out / fan_in))` by default (1 for every filter of the
  speedrun net, where out <= in*kh*kw; not for, say, a 1x1 conv 27 -> 64).
- Decay: `add_decayed_weights` before the LR, W <- W - lr (O + wd W): the update is not
  decayed; the record decays after the update, W <- (W - lr O)(1 - lr wd).
- No weight normalisation (the sources' `W *= sqrt(out) / ||W||`), no adaptive interval,
  and a float16 `mu_dtype` rounds once after the EMA, the record twice (mul, add).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbench.muon import MuonSpec, normalization_steps, target_magnitude, update_scale_factor

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]


class MuonState(NamedTuple):
    """`count`: updates done (int32); `momentum`: one buffer per filter (float32 or float16)."""

    count: jax.Array
    momentum: PyTree


def is_muon_param(path: tuple[str, ...], value: Any) -> bool:
    """A trainable conv filter: a 4-D `kernel` other than the frozen whitening kernel."""
    if not path or path[-1] != "kernel" or getattr(value, "ndim", 0) != 4:
        return False
    return len(path) < 2 or path[-2] != "whiten"


def hwio_to_matrix(x: jax.Array) -> jax.Array:
    """HWIO (kh, kw, in, out) -> the source's (out, in*kh*kw) matrix.

    Transposing to OIHW first makes it the very matrix PyTorch's `g.reshape(len(g), -1)`
    takes of an OIHW filter, element for element (same column order, so the same sums).
    """
    return jnp.transpose(x, (3, 2, 0, 1)).reshape(x.shape[3], -1)


def matrix_to_hwio(m: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of `hwio_to_matrix` for an HWIO `shape`."""
    kh, kw, cin, cout = shape
    return jnp.transpose(m.reshape(cout, cin, kh, kw), (2, 3, 1, 0))


def frobenius(x: jax.Array) -> jax.Array:
    """||x||_F as a float32 dot product: XLA's CPU reduction behind `jnp.linalg.norm` was
    measured 9e-7 off (relative) on a 16x16x3x3 filter with dirac entries, which weight
    normalisation multiplies into the update; the dot, like numpy's norm, stays near 5e-8."""
    v = x.reshape(-1)
    return jnp.sqrt(jnp.dot(v, v, precision=jax.lax.Precision.HIGHEST))


def newton_schulz(
    g: jax.Array, spec: MuonSpec, magnitude: jax.Array, precision: jax.lax.Precision
) -> jax.Array:
    """`jaxbench.muon.newton_schulz` in float32, same operations in the same order."""
    dot = lambda p, q: jnp.matmul(p, q, precision=precision)  # noqa: E731
    x = g.astype(jnp.float32)
    if spec.ns_target_magnitude is not None:
        x = x * (magnitude / (frobenius(x) + spec.ns_target_eps))
    x = x / (frobenius(x) + spec.ns_eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    a, b, c = spec.ns_coefficients
    for _ in range(spec.ns_steps):
        gram = dot(x, x.T)
        x = a * x + dot(b * gram + c * dot(gram, gram), x)
    return x.T if tall else x


def _momentum(buf: jax.Array, g: jax.Array, spec: MuonSpec) -> tuple[jax.Array, jax.Array]:
    """`jaxbench.muon.momentum_step`: (new buffer, Newton-Schulz input)."""
    m = jnp.float32(spec.momentum)
    if spec.momentum_dtype == "float16":
        # float32 products and sums rounded to float16 (a Python scalar times a float16
        # array would round m itself to float16 in JAX; torch keeps it in float32)
        scaled = (buf.astype(jnp.float32) * m).astype(jnp.float16)
        new = (scaled.astype(jnp.float32) + g.astype(jnp.float16).astype(jnp.float32)).astype(
            jnp.float16
        )
        wide = new.astype(jnp.float32)
    else:
        new = m * buf + g
        wide = new
    return new, (g + m * wide) if spec.nesterov else wide


def muon(
    spec: MuonSpec,
    learning_rate: float | Schedule,
    total_steps: int,
    *,
    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST,
) -> optax.GradientTransformation:
    """Muon on HWIO conv kernels with `spec`; `learning_rate(count)` is update count's LR
    (count from 0, as optax schedules); `total_steps` sets the record's magnitude ramp and
    normalisation interval. `precision` HIGHEST keeps float32 matmuls on GPUs (TF32 would
    leave the float32 bound the tests hold it to)."""
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    norm_table = jnp.asarray(normalization_steps(total_steps, spec))
    magnitudes = jnp.asarray(
        np.array([target_magnitude(t, total_steps, spec) for t in range(total_steps + 1)]),
        jnp.float32,
    )
    buf_dtype = jnp.float16 if spec.momentum_dtype == "float16" else jnp.float32

    def init_fn(params: PyTree) -> MuonState:
        for leaf in jax.tree_util.tree_leaves(params):
            if leaf.ndim != 4:
                raise ValueError(f"Muon takes HWIO conv kernels only, got shape {leaf.shape}")
        momentum = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, buf_dtype), params)
        return MuonState(count=jnp.zeros([], jnp.int32), momentum=momentum)

    def update_fn(
        grads: PyTree, state: MuonState, params: PyTree | None = None
    ) -> tuple[PyTree, MuonState]:
        if params is None:
            raise ValueError("Muon needs the params (weight normalisation and decay)")
        step = jnp.minimum(state.count + 1, total_steps)  # the source's step_count
        lr = jnp.asarray(schedule(state.count), jnp.float32)
        normalise = norm_table[step]
        magnitude = magnitudes[step]

        def leaf(g: jax.Array, buf: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
            buf, n = _momentum(buf, g.astype(jnp.float32), spec)
            o = newton_schulz(hwio_to_matrix(n), spec, magnitude, precision)
            o = matrix_to_hwio(o, w.shape)
            scale = update_scale_factor((w.shape[3], w.shape[2], w.shape[0], w.shape[1]), spec)
            if scale != 1.0:
                o = o * scale
            new = w
            if spec.normalization != "none":
                s = jnp.sqrt(jnp.float32(w.shape[3])) / (frobenius(w) + spec.norm_eps)
                new = jnp.where(normalise, w * s, w)
            new = new - lr * o
            if spec.weight_decay:
                new = new * (1 - lr * spec.weight_decay)
            return new - w, buf

        # Flattened by the gradients' structure: inside `optax.multi_transform` the leaves
        # of other groups are `MaskedNode`s, which hold no leaves and so drop out here.
        g_leaves, treedef = jax.tree_util.tree_flatten(grads)
        b_leaves = treedef.flatten_up_to(state.momentum)
        w_leaves = treedef.flatten_up_to(params)
        out = [leaf(g, b, w) for g, b, w in zip(g_leaves, b_leaves, w_leaves, strict=True)]
        updates = jax.tree_util.tree_unflatten(treedef, [u for u, _ in out])
        momentum = jax.tree_util.tree_unflatten(treedef, [b for _, b in out])
        return updates, MuonState(count=state.count + 1, momentum=momentum)

    return optax.GradientTransformation(init_fn, update_fn)
