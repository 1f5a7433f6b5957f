"""Deliberately broken references: the suite must fail on each, naming the check that catches it.

A plant is a `Harness` with one entry swapped for a classic framework-porting
bug (docs: shared/docs/recipes.md, "Framework traps"). None edits jaxbench or
torch_ref: a plant constructs their modules with other arguments, wraps their
functions, or monkeypatches a module attribute inside a context manager that
always restores it. Each `Plant` names the check expected to catch it; `python
-m parity --plant NAME` runs checks 1-6 and exits non-zero when it is caught.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbench import models, optim, speedrun_model
from jaxbench.configs import Config, optimizer_scales
from parity.harness import EmaOps, Harness, setattr_patch


@dataclass(frozen=True)
class Plant:
    """A named bug, the check that must catch it, how it is planted, and the harness it yields."""

    name: str
    check: int
    how: str
    build: Callable[[Harness], Harness]
    config: str = "tiny"  # the preset whose code the plant breaks (the CLI's default for it)


def _flax_default_init(h: Harness) -> Harness:
    def model(cfg: Config) -> Any:
        return models.model_from_config(cfg, kernel_init=nn.initializers.lecun_normal())

    return dataclasses.replace(h, flax_model=model)


def _bn_momentum(h: Harness) -> Harness:
    # ResNet9 takes PyTorch's convention and passes 1 - m to Flax; handing it 0.9
    # makes Flax's momentum 0.1, i.e. PyTorch's 0.1 copied into Flax unchanged.
    def model(cfg: Config) -> Any:
        return models.model_from_config(cfg, bn_momentum=1.0 - cfg.bn_momentum)

    return dataclasses.replace(h, flax_model=model)


def _flax_batch_norm(
    train: bool, momentum: float, eps: float, dtype: Any, name: str, use_scale: bool = True
) -> nn.BatchNorm:
    """Flax's own BatchNorm, otherwise configured like jaxbench's: it stores the running
    average of the *biased* batch variance, where PyTorch stores the unbiased one."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=1.0 - momentum,
        epsilon=eps,
        use_scale=use_scale,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        force_float32_reductions=True,
        name=name,
    )


def _bn_unbiased_var(h: Harness) -> Harness:
    return dataclasses.replace(
        h,
        patches=(
            *h.patches,
            lambda: setattr_patch(models, "torch_batch_norm", _flax_batch_norm),
            lambda: setattr_patch(speedrun_model, "torch_batch_norm", _flax_batch_norm),
        ),
    )


class _SamePaddingLinen(types.SimpleNamespace):
    """`flax.linen` as jaxbench.models sees it, except that every Conv pads 'SAME'."""

    def __getattr__(self, name: str) -> Any:
        return getattr(nn, name)

    @staticmethod
    def Conv(*args: Any, **kwargs: Any) -> nn.Conv:  # noqa: N802 - stands in for nn.Conv
        kwargs["padding"] = "SAME"
        return nn.Conv(*args, **kwargs)


def _same_padding(h: Harness) -> Harness:
    return dataclasses.replace(
        h, patches=(*h.patches, lambda: setattr_patch(models, "nn", _SamePaddingLinen()))
    )


def _decoupled_weight_decay(h: Harness) -> Harness:
    def optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
        _, wd = optimizer_scales(cfg)
        base = optim.lr_schedule(cfg, steps_per_epoch)

        def group(lr_mult: float, wd_mult: float) -> optax.GradientTransformation:
            # The bug: momentum first, decay added after it (decoupled from the buffer).
            return optax.chain(
                optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov),
                optax.add_decayed_weights(wd * wd_mult),
                optax.scale_by_learning_rate(lambda c: base(c) * lr_mult),
            )

        return optax.multi_transform(
            {
                "default": group(1.0, 1.0),
                "bn_bias": group(cfg.bn_bias_lr_mult, cfg.bn_bias_wd_mult),
            },
            optim.param_labels,
        )

    return dataclasses.replace(h, jax_optimizer=optimizer)


def _lr_schedule_off_by_one(h: Harness) -> Harness:
    real = optim.lr_knots

    def shifted(cfg: Config, steps_per_epoch: int) -> tuple[list[int], list[float]]:
        xs, ys = real(cfg, steps_per_epoch)
        return [xs[0], *(x + 1 for x in xs[1:])], ys  # every knot after the start one step late

    return dataclasses.replace(
        h, patches=(*h.patches, lambda: setattr_patch(optim, "lr_knots", shifted))
    )


def _ema_debias(h: Harness) -> Harness:
    """optax.ema as is: zero start, debiased read-out (torch_ref copies the weights first)."""

    def init(v: Any) -> Any:
        return {"opt": None, "value": jax.tree_util.tree_map(jnp.zeros_like, v)}

    def update(state: Any, new: Any, step: int, cfg: Config) -> Any:
        if not cfg.ema_every or step % cfg.ema_every:
            return state
        tx = optax.ema(cfg.ema_momentum, debias=True)
        opt = state["opt"] if state["opt"] is not None else tx.init(new)
        value, opt = tx.update(new, opt)
        return {"opt": opt, "value": value}

    return dataclasses.replace(
        h, jax_ema=EmaOps(init=init, update=update, read=lambda s: s["value"])
    )


def _flip_mismatch(h: Harness) -> Harness:
    real = h.jax_apply_plan

    def apply_plan(images: Any, plan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
        # The bug: flip the wrong axis (H instead of W), after cutout.
        out = real(images, {**plan, "flip": np.zeros_like(plan["flip"])}, cfg)
        flip = np.asarray(plan["flip"], bool)
        out = np.array(out)
        out[flip] = out[flip][:, ::-1]
        return out

    return dataclasses.replace(h, jax_apply_plan=apply_plan)


def _gelu_tanh(h: Harness) -> Harness:
    """jax.nn.gelu's default (tanh approximation) instead of the exact erf GELU torch uses."""

    def gelu(x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=True)

    return dataclasses.replace(
        h, patches=(*h.patches, lambda: setattr_patch(speedrun_model, "gelu", gelu))
    )


def _lookahead_without_bn_stats(h: Harness) -> Harness:
    """The lookahead EMA over the params only: BN running stats neither averaged nor reset."""
    real = optim.lookahead_update

    def params_only(ema: Any, live: Any, step: Any, cfg: Config, total_steps: int) -> Any:
        p_ema, p_live = real(
            {"params": ema["params"]}, {"params": live["params"]}, step, cfg, total_steps
        )
        return {**ema, "params": p_ema["params"]}, {**live, "params": p_live["params"]}

    return dataclasses.replace(
        h, patches=(*h.patches, lambda: setattr_patch(optim, "lookahead_update", params_only))
    )


PLANTS: dict[str, Plant] = {
    p.name: p
    for p in (
        Plant(
            "flax_default_init",
            1,
            "jaxbench ResNet9 built with kernel_init=lecun_normal (Flax's default) "
            "via model_from_config(..., kernel_init=...)",
            _flax_default_init,
        ),
        Plant(
            "bn_momentum",
            2,
            "jaxbench ResNet9 built with bn_momentum=1-m, so Flax's BatchNorm gets "
            "momentum 0.1 (PyTorch's number copied into Flax's convention)",
            _bn_momentum,
        ),
        Plant(
            "bn_unbiased_var",
            2,
            "jaxbench's BN layers replaced, for the run, by Flax's nn.BatchNorm, which "
            "stores the running average of the biased batch variance (PyTorch: unbiased)",
            _bn_unbiased_var,
        ),
        Plant(
            "same_padding",
            2,
            "flax.linen.Conv replaced, inside jaxbench.models only and for the run, by one "
            "that pads 'SAME'; ResNet-9's stride-1 3x3 convs are unaffected (their logits "
            "still match), so it is caught by check 2's stride-2 probe of each conv layer",
            _same_padding,
        ),
        Plant(
            "decoupled_weight_decay",
            4,
            "the JAX optimizer rebuilt as trace(momentum) -> add_decayed_weights -> "
            "scale_by_learning_rate: decay added after the momentum buffer",
            _decoupled_weight_decay,
        ),
        Plant(
            "lr_schedule_off_by_one",
            4,
            "jaxbench.optim.lr_knots patched for the run so every knot after step 0 is one "
            "step late (the optax schedule lags torch_ref's lr_at(t) by a step)",
            _lr_schedule_off_by_one,
        ),
        Plant(
            "ema_debias",
            4,
            "the JAX EMA replaced by optax.ema(m, debias=True): zero start, debiased read-out",
            _ema_debias,
        ),
        Plant(
            "flip_mismatch",
            5,
            "the JAX apply_plan wrapped to flip rows (H) instead of columns (W), after cutout",
            _flip_mismatch,
        ),
        Plant(
            "gelu_tanh",
            2,
            "with --config speedrun: jaxbench.speedrun_model.gelu patched for the run to "
            "jax.nn.gelu's default tanh approximation (torch's nn.GELU is the exact erf form)",
            _gelu_tanh,
            config="speedrun",
        ),
        Plant(
            "lookahead_without_bn_stats",
            4,
            "with --config speedrun: jaxbench.optim.lookahead_update patched for the run to "
            "average and reset the params only, leaving the BN running statistics out",
            _lookahead_without_bn_stats,
            config="speedrun",
        ),
    )
}


def get_plant(name: str) -> Plant:
    """A plant by name, with the list of valid names in the error."""
    if name not in PLANTS:
        raise ValueError(f"unknown --plant {name!r}; choose one of {', '.join(PLANTS)}")
    return PLANTS[name]


def planted_harness(name: str | None) -> Harness:
    """The reference harness, or the one with plant `name` swapped in."""
    base = Harness()
    if name is None:
        return base
    return dataclasses.replace(get_plant(name).build(base), name=f"plant:{name}")
