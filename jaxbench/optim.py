"""Loss, optimizer and EMA, with PyTorch's semantics (docs/design.md, "Loss and optimizer").

Per parameter group `add_decayed_weights(wd)` then `sgd(lr_t, momentum, nesterov)`: coupled
L2 as torch.optim.SGD's, and optax's Nesterov trace is torch's dampening-0 form. BN biases
have their own LR and decay multipliers; with `optimizer="muon"` the trained conv filters
get `optim_muon.muon`. The LR is computed in float32 without cancellation near zero.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxbench.configs import Config, optimizer_scales
from jaxbench.muon import spec_of
from jaxbench.optim_muon import is_muon_param, muon
from jaxbench.schedule import (
    ema_decays,
    lr_knots,
    train_steps,
    whiten_bias_lr_knots,
    whiten_bias_steps,
)

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]


def piecewise_linear(xs: Sequence[int], ys: Sequence[float]) -> Schedule:
    """Schedule through the knots (xs, ys), constant outside them; each segment is
    ((x1 - t) * y0 + (t - x0) * y1) / (x1 - x0), so nothing cancels near a zero end."""
    xs = [int(x) for x in xs]
    ys = [float(y) for y in ys]

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.clip(jnp.asarray(count, jnp.int32), xs[0], xs[-1])
        out = jnp.full(t.shape, ys[-1], jnp.float32)
        for i in reversed(range(len(xs) - 1)):
            x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
            if x1 <= x0:
                continue
            seg = ((x1 - t).astype(jnp.float32) * y0 + (t - x0).astype(jnp.float32) * y1) / (
                x1 - x0
            )
            out = jnp.where(t < x1, seg, out)
        return out

    return schedule


def lr_schedule(cfg: Config, steps_per_epoch: int) -> Schedule:
    """The one-cycle LR of `schedule.lr_knots` (optimizer units) as an optax schedule."""
    return piecewise_linear(*lr_knots(cfg, steps_per_epoch))


def is_bn_bias(path: tuple[str, ...]) -> bool:
    """A BatchNorm bias: `.../bn/bias` (ResNet-9) or `.../bnK/bias` (speedrun's bn1, bn2)."""
    if len(path) < 2 or path[-1] != "bias":
        return False
    module = path[-2]
    return module == "bn" or (module.startswith("bn") and module[2:].isdigit())


def _label(path: tuple[str, ...], value: Any = None, with_muon: bool = False) -> str:
    if is_bn_bias(path):
        return "bn_bias"
    if path[-2:] == ("whiten", "kernel"):
        return "frozen"  # data-dependent whitening filters (either stem), never trained
    if path[-2:] == ("whiten", "bias"):
        return "whiten_bias"  # speedrun: trained for cfg.whiten_bias_epochs, then frozen
    if with_muon and is_muon_param(path, value):
        return "muon"
    return "default"


def param_labels(params: PyTree, with_muon: bool = False) -> PyTree:
    """'bn_bias' for BatchNorm biases, 'frozen' for a whitening kernel, 'whiten_bias' for
    the speedrun net's whitening bias, with `with_muon` 'muon' for the trained conv
    filters (`optim_muon.is_muon_param`), 'default' for everything else."""
    return traverse_util.path_aware_map(lambda path, v: _label(tuple(path), v, with_muon), params)


def _freeze_after(updates: int) -> optax.GradientTransformation:
    """Pass the first `updates` updates, then zero them (after decay and momentum, as torch
    skips a frozen parameter): optax's own counter flips it, with no recompile."""
    return optax.scale_by_schedule(lambda count: (count < updates).astype(jnp.float32))


def make_optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD-Nesterov with coupled decay and the configured LR; BN biases get their
    multipliers; with `optimizer="muon"` the trained conv filters get Muon."""
    _, wd = optimizer_scales(cfg)
    base = lr_schedule(cfg, steps_per_epoch)

    def group(lr_mult: float, wd_mult: float, lr: Schedule = base) -> optax.GradientTransformation:
        def schedule(count: jax.Array) -> jax.Array:
            return lr(count) * lr_mult if lr_mult != 1.0 else lr(count)

        return optax.chain(
            optax.add_decayed_weights(wd * wd_mult),
            optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov),
        )

    groups = {
        "default": group(1.0, 1.0),
        "bn_bias": group(cfg.bn_bias_lr_mult, cfg.bn_bias_wd_mult),
    }
    if cfg.whiten != "none":
        groups["frozen"] = optax.set_to_zero()
    if cfg.whiten == "patch2":
        whiten_bias = group(1.0, 1.0)
        if cfg.whiten_bias_own_lr:
            own = piecewise_linear(*whiten_bias_lr_knots(cfg, steps_per_epoch))
            whiten_bias = group(1.0, cfg.bn_bias_wd_mult, own)
        groups["whiten_bias"] = optax.chain(
            whiten_bias, _freeze_after(whiten_bias_steps(cfg, steps_per_epoch))
        )
    if cfg.optimizer != "muon":
        return optax.multi_transform(groups, param_labels)
    # Muon's LR follows the run's schedule, scaled so its peak is cfg.muon_lr
    lr, _ = optimizer_scales(cfg)
    scale = cfg.muon_lr / lr
    groups["muon"] = muon(
        spec_of(cfg), lambda count: base(count) * scale, train_steps(cfg, steps_per_epoch)
    )
    return optax.multi_transform(groups, functools.partial(param_labels, with_muon=True))


def cross_entropy(
    logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0, reduction: str = "mean"
) -> jax.Array:
    """Cross-entropy against (1 - ls) * onehot + ls / classes (PyTorch's `label_smoothing`),
    summed or averaged over the batch (`reduction`)."""
    logits = logits.astype(jnp.float32)
    classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, classes, dtype=jnp.float32)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / classes
    per_example = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    if reduction == "sum":
        return jnp.sum(per_example)
    if reduction == "mean":
        return jnp.mean(per_example)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def ema_update(ema: PyTree, new: PyTree, momentum: float | jax.Array) -> PyTree:
    """`ema = m * ema + (1 - m) * new`, leaf by leaf (no zero start, no debiasing)."""
    m = jnp.asarray(momentum, jnp.float32)
    return jax.tree_util.tree_map(lambda e, w: m * e + (1.0 - m) * w, ema, new)


def _select(flag: jax.Array, on: PyTree, off: PyTree) -> PyTree:
    """`on` where `flag` else `off`, leaf by leaf: a select, not a `lax.cond`, whose predicate
    a GPU reads on the host (splitting the scanned epoch); `off` stays bit-exact."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), on, off)


def is_ema_step(step: jax.Array, cfg: Config) -> jax.Array:
    """Whether update `step` (counted from 1) is followed by an EMA update."""
    return jnp.asarray(step, jnp.int32) % cfg.ema_every == 0


def lookahead_update(
    ema: PyTree, live: PyTree, step: jax.Array, cfg: Config, total_steps: int
) -> tuple[PyTree, PyTree]:
    """airbench's lookahead after update `step` (from 1): every `cfg.ema_every` steps
    `ema = d * ema + (1 - d) * live` (d from `schedule.ema_decays`), then live = ema, over
    whole variable trees (BN statistics too); both bit for bit unchanged between."""
    if cfg.ema_every <= 0:
        return ema, live
    decays = jnp.asarray(ema_decays(cfg, total_steps))
    new = ema_update(ema, live, decays[jnp.minimum(step, total_steps)])
    flag = is_ema_step(step, cfg)
    ema = _select(flag, new, ema)
    # The reset reads the selected EMA, not `new`: XLA may recompute `new` inside each
    # select's fusion, and two fusions of `d * e + (1 - d) * w` with their operands in
    # another order can contract a different product into an FMA (1 ulp apart).
    return ema, _select(flag, ema, live)


def maybe_ema_update(ema: PyTree, new: PyTree, step: jax.Array, cfg: Config) -> PyTree:
    """`ema_update` after update `step` (from 1) when it is a multiple of `cfg.ema_every`;
    bit for bit unchanged otherwise or when the EMA is off (a select, `_select`)."""
    if cfg.ema_every <= 0:
        return ema
    return _select(is_ema_step(step, cfg), ema_update(ema, new, cfg.ema_momentum), ema)
