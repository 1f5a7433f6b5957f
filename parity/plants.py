"""Deliberately broken references: the suite must fail on each, naming the check that catches it.

A harness plant swaps one entry of the `Harness` (or monkeypatches a module attribute for the
run): the classic porting traps in the building blocks. A source plant edits one line of a
trainer's own code in a temporary copy of the packages, which `python -m parity --plant NAME`
re-runs itself on: the bugs of the trainers' glue. Checks 1-6 run; exit 1 when caught.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbench import augment, layers, models, optim, optim_muon, stream
from jaxbench.configs import Config, optimizer_scales
from jaxbench.muon import MuonSpec, update_scale_factor
from parity.harness import EmaOps, Harness, setattr_patch
from torch_ref import augment as torch_augment
from torch_ref import muon as torch_muon


@dataclass(frozen=True)
class SourceEdit:
    """Replace `old` (which must occur exactly once) by `new` in `path` (from the repo root)."""

    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Plant:
    """A named bug, the check that must catch it, how it is planted: a harness or a source edit."""

    name: str
    check: int
    how: str
    build: Callable[[Harness], Harness] | None = None
    config: str = "tiny"  # the preset whose code the plant breaks (the CLI's default for it)
    edit: SourceEdit | None = None


PLANTED_ENV = "JAXBENCH_PARITY_PLANTED"  # set in the child that runs on an edited copy
PACKAGES: tuple[str, ...] = ("jaxbench", "torch_ref", "parity")


def repo_root() -> Path:
    """The folder holding the packages that are running (the code a source plant copies)."""
    return Path(models.__file__).resolve().parent.parent


@contextlib.contextmanager
def planted_tree(plant: Plant) -> Iterator[Path]:
    """A temporary copy of the packages with `plant.edit` applied; removed afterwards."""
    assert plant.edit is not None
    root = repo_root()
    with tempfile.TemporaryDirectory(prefix=f"parity-plant-{plant.name}-") as tmp:
        ignore = shutil.ignore_patterns("__pycache__")
        for pkg in PACKAGES:
            shutil.copytree(root / pkg, Path(tmp) / pkg, ignore=ignore)
        target = Path(tmp) / plant.edit.path
        text = target.read_text()
        if text.count(plant.edit.old) != 1:
            raise ValueError(
                f"plant {plant.name!r} no longer applies: {plant.edit.path} must contain its "
                f"target line exactly once ({plant.edit.old.strip()!r}); update parity/plants.py"
            )
        target.write_text(text.replace(plant.edit.old, plant.edit.new))
        yield Path(tmp)


def running_planted() -> str | None:
    """The source plant this process runs under (set by the parent that made the copy)."""
    name = os.environ.get(PLANTED_ENV)
    if name and not str(repo_root()).startswith(tempfile.gettempdir()):
        raise RuntimeError(f"{PLANTED_ENV}={name} but the code runs from {repo_root()}")
    return name or None


PLANTS: dict[str, Plant] = {}


def _harness_plant(
    check: int, how: str, config: str = "tiny", target: tuple[Any, str] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as a plant named after it (no leading `_`): a harness
    builder, or with `target` (module, attribute) what stands in for that attribute during
    the run, called with the real one first."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        def patch(h: Harness) -> Harness:
            obj, attr = target
            return _patched(h, obj, attr, partial(fn, getattr(obj, attr)))

        name = fn.__name__.lstrip("_")
        PLANTS[name] = Plant(name, check, how, fn if target is None else patch, config=config)
        return fn

    return register


def _patched(h: Harness, obj: Any, attr: str, value: Any) -> Harness:
    """`h` with `obj.attr` set to `value` for the run (restored after it)."""
    return dataclasses.replace(h, patches=(*h.patches, lambda: setattr_patch(obj, attr, value)))


@_harness_plant(
    1,
    "jaxbench ResNet9 built with kernel_init=lecun_normal (Flax's default) "
    "via model_from_config(..., kernel_init=...)",
)
def _flax_default_init(h: Harness) -> Harness:
    lecun = nn.initializers.lecun_normal()
    return dataclasses.replace(h, flax_model=partial(models.model_from_config, kernel_init=lecun))


@_harness_plant(
    2,
    "jaxbench ResNet9 built with bn_momentum=1-m, so Flax's BatchNorm gets "
    "momentum 0.1 (PyTorch's number copied into Flax's convention)",
)
def _bn_momentum(h: Harness) -> Harness:
    def model(cfg: Config) -> Any:
        return models.model_from_config(cfg, bn_momentum=1.0 - cfg.bn_momentum)

    return dataclasses.replace(h, flax_model=model)


@_harness_plant(
    2,
    "jaxbench's BN layers replaced, for the run, by Flax's nn.BatchNorm, which "
    "stores the running average of the biased batch variance (PyTorch: unbiased)",
    target=(layers, "batch_norm"),
)
def _bn_unbiased_var(_real: Any, cfg: Config, train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    """Flax's own BatchNorm, otherwise configured like jaxbench's."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=1.0 - cfg.bn_momentum,
        epsilon=cfg.bn_eps,
        use_scale=cfg.bn_scale_trainable,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        force_float32_reductions=True,
        name=name,
    )


class _SamePaddingLinen(types.SimpleNamespace):
    """`flax.linen` as jaxbench.layers sees it, except that every Conv pads 'SAME'."""

    def __getattr__(self, name: str) -> Any:
        return getattr(nn, name)

    @staticmethod
    def Conv(*args: Any, **kwargs: Any) -> nn.Conv:  # noqa: N802 - stands in for nn.Conv
        kwargs["padding"] = "SAME"
        return nn.Conv(*args, **kwargs)


@_harness_plant(
    2,
    "flax.linen.Conv replaced, inside jaxbench.layers only and for the run, by one "
    "that pads 'SAME'; ResNet-9's stride-1 3x3 convs are unaffected (their logits "
    "still match), so it is caught by check 2's stride-2 probe of each conv layer",
)
def _same_padding(h: Harness) -> Harness:
    return _patched(h, layers, "nn", _SamePaddingLinen())


@_harness_plant(
    4,
    "the JAX optimizer rebuilt as trace(momentum) -> add_decayed_weights -> "
    "scale_by_learning_rate: decay added after the momentum buffer",
)
def _decoupled_weight_decay(h: Harness) -> Harness:
    def optimizer(cfg: Config, steps_per_epoch: int) -> optax.GradientTransformation:
        _, wd = optimizer_scales(cfg)
        base = optim.lr_schedule(cfg, steps_per_epoch)

        def group(lr_mult: float, wd_mult: float) -> optax.GradientTransformation:
            return optax.chain(
                optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov),
                optax.add_decayed_weights(wd * wd_mult),
                optax.scale_by_learning_rate(lambda c: base(c) * lr_mult),
            )

        groups = {"default": group(1.0, 1.0)}
        groups["bn_bias"] = group(cfg.bn_bias_lr_mult, cfg.bn_bias_wd_mult)
        return optax.multi_transform(groups, optim.param_labels)

    return dataclasses.replace(h, jax_optimizer=optimizer)


@_harness_plant(
    4,
    "jaxbench.optim.lr_knots patched for the run so every knot after step 0 is one "
    "step late (the optax schedule lags torch_ref's lr_at(t) by a step)",
    target=(optim, "lr_knots"),
)
def _lr_schedule_off_by_one(
    real: Callable[..., Any], cfg: Config, steps_per_epoch: int
) -> tuple[list[int], list[float]]:
    xs, ys = real(cfg, steps_per_epoch)
    return [xs[0], *(x + 1 for x in xs[1:])], ys  # every knot after the start one step late


@_harness_plant(
    4, "the JAX EMA replaced by optax.ema(m, debias=True): zero start, debiased read-out"
)
def _ema_debias(h: Harness) -> Harness:
    def init(v: Any) -> Any:
        return {"opt": None, "value": jax.tree_util.tree_map(jnp.zeros_like, v)}

    def update(state: Any, new: Any, step: int, cfg: Config) -> Any:
        if not cfg.ema_every or step % cfg.ema_every:
            return state
        tx = optax.ema(cfg.ema_momentum, debias=True)
        opt = state["opt"] if state["opt"] is not None else tx.init(new)
        value, opt = tx.update(new, opt)
        return {"opt": opt, "value": value}

    return dataclasses.replace(h, jax_ema=EmaOps(init, update, read=lambda s: s["value"]))


@_harness_plant(
    4,
    "jaxbench.optim_muon.newton_schulz patched for the run to iterate with the "
    "quintic's c rounded to one decimal (2.0315 -> 2.0, the record's 2.0843 -> 2.1)",
    target=(optim_muon, "newton_schulz"),
)
def _muon_ns_coefficient(
    real: Callable[..., jax.Array], g: jax.Array, spec: MuonSpec, *args: Any
) -> jax.Array:
    a, b, c = spec.ns_coefficients
    return real(g, dataclasses.replace(spec, ns_coefficients=(a, b, round(c, 1))), *args)


@_harness_plant(
    4,
    "torch_ref.muon's update scale patched for the run to torch.optim.Muon's "
    "match_rms_adamw, 0.2 sqrt(max(out, in*kh*kw)), where both recipes scale by 1",
    target=(torch_muon, "update_scale_factor"),
)
def _muon_scale_rms(_real: Any, shape: tuple[int, ...], spec: MuonSpec) -> float:
    return update_scale_factor(shape, dataclasses.replace(spec, update_scale="rms"))


@_harness_plant(
    5, "the JAX apply_plan wrapped to flip rows (H) instead of columns (W), after cutout"
)
def _flip_mismatch(h: Harness) -> Harness:
    real = h.jax_apply_plan

    def apply_plan(images: Any, plan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
        out = np.array(real(images, {**plan, "flip": np.zeros_like(plan["flip"])}, cfg))
        flip = np.asarray(plan["flip"], bool)
        out[flip] = out[flip][:, ::-1]
        return out

    return dataclasses.replace(h, jax_apply_plan=apply_plan)


@_harness_plant(
    5,
    "torch_ref.augment.color_jitter patched for the run to compute x * contrast + "
    "brightness (the scale first) where the record shifts first: (x + brightness) * contrast",
    target=(torch_augment, "color_jitter"),
)
def _jitter_scale_first(_real: Any, x: Any, brightness: Any, contrast: Any) -> Any:
    return x * contrast[:, None, None, None] + brightness[:, None, None, None]


@_harness_plant(
    5,
    "jaxbench.augment.draw_plan patched for the run to draw the brightness shift from "
    "[0, B) instead of [-B, B)",
    target=(augment, "draw_plan"),
)
def _jitter_range_one_sided(real: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    plan = real(*args, **kw)
    return {**plan, "brightness": jnp.abs(plan["brightness"])}


@_harness_plant(
    6,
    "with --config speedrun_record: torch_ref.augment's selective TTA patched for the run to "
    "give the 6 views to the most confident images instead of the least confident",
    target=(torch_augment, "selective_tta"),
    config="speedrun_record",
)
def _tta_select_most_confident(_real: Any, plain: Any, views: Any, fraction: float) -> Any:
    k = len(stream.least_confident(plain, fraction))
    x = np.asarray(plain, np.float64)
    confidence = 1.0 / np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)
    selected = np.sort(np.argsort(confidence, kind="stable")[len(x) - k :])
    out = np.array(plain, np.float32, copy=True)
    out[selected] = np.asarray(views, np.float32)[:, selected].mean(axis=0)
    return out, selected


@_harness_plant(
    2,
    "with --config speedrun: jaxbench.layers.activation patched for the run to give "
    "jax.nn.gelu's default tanh approximation (torch's nn.GELU is the exact erf form)",
    target=(layers, "activation"),
    config="speedrun",
)
def _gelu_tanh(real: Callable[..., Any], cfg: Config) -> Callable[[jax.Array], jax.Array]:
    return partial(jax.nn.gelu, approximate=True) if cfg.activation == "gelu" else real(cfg)


@_harness_plant(
    2,
    "with --config resnet9: jaxbench.layers.activation patched for the run to give "
    "jax.nn.celu with its default alpha 1.0 (the config and torch_ref use 0.3)",
    target=(layers, "activation"),
    config="resnet9",
)
def _celu_default_alpha(real: Callable[..., Any], cfg: Config) -> Callable[[jax.Array], jax.Array]:
    return jax.nn.celu if cfg.activation == "celu" else real(cfg)


@_harness_plant(
    2,
    "with --config resnet9: jaxbench's ghost batch norm groups contiguous chunks of "
    "the batch instead of Page's groups (image i in group i mod splits)",
    target=(layers, "conv_block"),
    config="resnet9",
)
def _ghost_bn_chunks(
    real: Callable[..., jax.Array], cfg: Config, x: jax.Array, conv: Any, norm: Any, pool: bool
) -> jax.Array:
    """Each BN sees its input permuted so that contiguous chunks become Page's groups."""

    def chunked(y: jax.Array) -> jax.Array:
        n, g = y.shape[0], cfg.ghost_bn
        if not g or n <= g:
            return norm(y)
        # position j * splits + k holds image k * g + j: chunk k lands in group k
        perm = np.arange(n).reshape(n // g, g).T.reshape(-1)
        return norm(y[perm])[np.argsort(perm)]

    return real(cfg, x, conv, chunked, pool)


@_harness_plant(
    4,
    "with --config speedrun: jaxbench.optim.lookahead_update patched for the run to "
    "average and reset the params only, leaving the BN running statistics out",
    target=(optim, "lookahead_update"),
    config="speedrun",
)
def _lookahead_without_bn_stats(
    real: Callable[..., Any], ema: Any, live: Any, step: Any, cfg: Config, total_steps: int
) -> Any:
    p_ema, p_live = real(
        {"params": ema["params"]}, {"params": live["params"]}, step, cfg, total_steps
    )
    return {**ema, "params": p_ema["params"]}, {**live, "params": p_live["params"]}


def _source_plant(
    name: str, check: int, how: str, path: str, old: str, new: str, config: str = "tiny"
) -> None:
    """Register a plant that replaces `old` (which must occur once) by `new` in `path`."""
    PLANTS[name] = Plant(name, check, how, config=config, edit=SourceEdit(path, old, new))


# Source plants: one line of a trainer's own code edited in a copy (module docstring).
_source_plant(
    "whiten_eps_airbench",
    6,
    "with --config resnet9: jaxbench.train builds Page's 3x3 whitening with airbench's "
    "eps 5e-4 instead of the config's 1e-2",
    "jaxbench/train.py",
    "whitening_for_config(cov, cfg.whiten, cfg.whiten_eps)",
    "whitening_for_config(cov, cfg.whiten, 5e-4)",
    config="resnet9",
)
_source_plant(
    "tta_sum",
    6,
    "jaxbench.augment.tta_logits sums the TTA views' logits instead of weighting them "
    "(flip TTA: logits + mirrored instead of their mean)",
    "jaxbench/augment.py",
    "    combined = sum(w * v for w, v in zip(tta_weights(cfg), out, strict=True))\n",
    "    combined = sum(out)\n",
)
_source_plant(
    "ema_interval_call_site",
    6,
    "jaxbench.train's step calls the EMA update with ema_every + 1",
    "jaxbench/train.py",
    "ema = optim.maybe_ema_update(state.ema, live, step, cfg)",
    "ema = optim.maybe_ema_update(\n"
    "                state.ema, live, step, cfg.replace(ema_every=cfg.ema_every + 1)\n"
    "            )",
)
_source_plant(
    "label_smoothing_call_site",
    6,
    "jaxbench.train's loss call hard-codes label smoothing 0.1 (the preset has 0.2)",
    "jaxbench/train.py",
    "optim.cross_entropy(logits, labels, cfg.label_smoothing, cfg.loss_reduction)",
    "optim.cross_entropy(logits, labels, 0.1, cfg.loss_reduction)",
)
_source_plant(
    "normalization_data_path",
    3,
    "jaxbench.train's training data path normalises with CIFAR-100's mean and std",
    "jaxbench/train.py",
    "        x = augment.normalize(images_u8, cfg.dataset, dtype, jitter)\n"
    "        logits, mutated = model.apply(",
    '        x = augment.normalize(images_u8, "cifar100", dtype, jitter)\n'
    "        logits, mutated = model.apply(",
)
_source_plant(
    "bn_bias_no_weight_decay",
    4,
    "jaxbench.optim.make_optimizer gives the BN biases no weight decay",
    "jaxbench/optim.py",
    '"bn_bias": group(cfg.bn_bias_lr_mult, cfg.bn_bias_wd_mult),',
    '"bn_bias": group(cfg.bn_bias_lr_mult, 0.0),',
)
_source_plant(
    "lr_one_step_late",
    6,
    "torch_ref.train's step sets the LR of the previous update (lr_at(t - 1))",
    "torch_ref/train.py",
    "set_lr(r.optimizer, r.lrs[r.t])",
    "set_lr(r.optimizer, r.lrs[max(r.t - 1, 0)])",
)


def get_plant(name: str) -> Plant:
    """A plant by name, with the list of valid names in the error."""
    if name not in PLANTS:
        raise ValueError(f"unknown --plant {name!r}; choose one of {', '.join(PLANTS)}")
    return PLANTS[name]


def planted_harness(name: str | None) -> Harness:
    """The reference harness, or the one with plant `name` swapped in (a source plant's is the
    reference one: its bug is in the copy of the code the child process runs)."""
    base = Harness()
    if name is None:
        return base
    plant = get_plant(name)
    if plant.build is None and running_planted() != name:
        raise ValueError(
            f"plant {name!r} edits the trainers' source: run it with "
            f"`python -m parity --plant {name}`"
        )
    built = base if plant.build is None else plant.build(base)
    return dataclasses.replace(built, name=f"plant:{name}")
