"""Muon for the conv filters in optax: `jaxbench.muon`'s reference update, in float32.

`muon(spec, learning_rate, total_steps)`'s updates are the whole step (`params + updates` is
the new filter), so it sits in an `optax.multi_transform` beside `jaxbench.optim`'s SGD groups
with no learning-rate scaling after it. Not `optax.contrib.muon` (0.2.8), whose update
differs: a bias-corrected EMA momentum, not torch SGD's (buffer weight 0.49 vs 0.6 at
airbench94_muon's second update), 5 Newton-Schulz steps (the sources 3) with eps 1e-8 and no
pre-scaling, 2-D leaves only, a sqrt(max(1, out / in)) scale, decay before the LR, no weight
normalisation, and a float16 buffer rounded once (the record's twice).
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
    """HWIO -> the (out, in*kh*kw) matrix PyTorch's `g.reshape(len(g), -1)` takes of the
    OIHW filter, element for element (same column order, so the same sums)."""
    return jnp.transpose(x, (3, 2, 0, 1)).reshape(x.shape[3], -1)


def matrix_to_hwio(m: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of `hwio_to_matrix` for an HWIO `shape`."""
    kh, kw, cin, cout = shape
    return jnp.transpose(m.reshape(cout, cin, kh, kw), (2, 3, 1, 0))


def frobenius(x: jax.Array) -> jax.Array:
    """||x||_F as a float32 dot: `jnp.linalg.norm`'s XLA:CPU reduction was 9e-7 off (relative)
    on a dirac 16x16x3x3 filter, the dot stays near 5e-8 as numpy's norm does."""
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
        g16 = g.astype(jnp.float16).astype(jnp.float32)
        new = (scaled.astype(jnp.float32) + g16).astype(jnp.float16)
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
    """Muon on HWIO conv kernels: `learning_rate(count)` from count 0, `total_steps` for the
    record's ramps; `precision` HIGHEST keeps GPU matmuls float32 (TF32 fails the tests)."""
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
