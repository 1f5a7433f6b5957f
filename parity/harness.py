"""The entry points of both frameworks that the checks call, gathered in one swappable record.

Every check reaches `jaxbench` and `torch_ref` only through a `Harness`, so a plant
(`parity.plants`) is a `Harness` with one entry replaced, plus monkeypatches that `active()`
applies and always restores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import optax
import torch

from jaxbench import augment, models, optim, optim_muon
from jaxbench.configs import Config
from jaxbench.train import seed_keys
from parity import convert
from torch_ref import augment as torch_augment
from torch_ref import model as torch_model
from torch_ref import muon as torch_muon

PyTree = Any


@dataclass(frozen=True)
class EmaOps:
    """The JAX EMA as three functions: init from variables, update after a step, read out."""

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, int, Config], PyTree]  # (state, variables, step>=1, cfg)
    read: Callable[[PyTree], PyTree]


def _flax_init(model: models.ResNet9, seed: int) -> PyTree:
    """The trainer's own init for `seed` (jaxbench.train splits the seed into init and data)."""
    return models.init_variables(model, seed_keys(seed)[0])


def _ema_update(state: PyTree, new: PyTree, step: int, cfg: Config) -> PyTree:
    return optim.maybe_ema_update(state, new, jax.numpy.asarray(step, jax.numpy.int32), cfg)


def _jax_apply_plan(images: Any, plan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
    return np.asarray(augment.apply_plan(jax.numpy.asarray(images), plan, cfg))


def _torch_apply_plan(images: Any, plan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
    tplan = torch_augment.plan_to_device(plan, "cpu")
    return torch_augment.apply_plan(torch.as_tensor(np.asarray(images)), tplan, cfg).numpy()


def _jax_normalize(images_u8: Any, plan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
    """The JAX trainer's float32 input for a uint8 batch and its plan (colour jitter in)."""
    jitter = augment.plan_jitter(plan, cfg)
    return np.asarray(augment.normalize(jax.numpy.asarray(images_u8), cfg.dataset, jitter=jitter))


def _torch_normalize(images_u8: Any, plan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
    """torch_ref's float32 input for the same, back in NHWC."""
    tplan = torch_augment.plan_to_device(plan, "cpu")
    mean, std = torch_augment.device_stats(cfg.dataset, torch.device("cpu"))
    x = torch.as_tensor(np.asarray(images_u8))
    jitter = torch_augment.plan_jitter(tplan, cfg)
    return torch_augment.normalize(x, mean, std, jitter=jitter).permute(0, 2, 3, 1).numpy()


def _jax_jitter(x_NHWC: np.ndarray, plan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
    """JAX's colour jitter of given float32 images with a plan's factors."""
    b, c = augment.plan_jitter(plan, cfg)
    return np.asarray(augment.color_jitter(jax.numpy.asarray(x_NHWC), b, c))


def _torch_jitter(x_NHWC: np.ndarray, plan: dict[str, np.ndarray], cfg: Config) -> np.ndarray:
    """torch_ref's colour jitter of the same."""
    b, c = torch_augment.plan_jitter(torch_augment.plan_to_device(plan, "cpu"), cfg)
    return torch_augment.color_jitter(torch.as_tensor(np.asarray(x_NHWC)), b, c).numpy()


def _jax_draw_plan(seed: int, n_train: int, cfg: Config) -> dict[str, np.ndarray]:
    """An epoch plan drawn on the device by the JAX trainer's generator."""
    return jax.device_get(augment.draw_plan(jax.random.PRNGKey(seed), 0, n_train, cfg))


def _torch_draw_plan(seed: int, n_train: int, cfg: Config) -> dict[str, np.ndarray]:
    """The same from torch_ref's."""
    plan = torch_augment.draw_plan(torch.Generator().manual_seed(seed), 0, n_train, cfg, "cpu")
    return {k: v.numpy() for k, v in plan.items()}


@dataclass(frozen=True)
class Harness:
    """How the checks build, convert, optimise and augment in each framework."""

    name: str = "reference"
    flax_model: Callable[[Config], Any] = models.model_from_config
    flax_init: Callable[[Any, int], PyTree] = _flax_init
    torch_model: Callable[[Config, int], torch.nn.Module] = torch_model.model_from_config
    to_flax: Callable[..., PyTree] = convert.torch_to_flax
    to_torch: Callable[..., Any] = convert.flax_to_torch
    jax_optimizer: Callable[[Config, int], optax.GradientTransformation] = optim.make_optimizer
    jax_lr: Callable[[Config, int], Callable[[Any], Any]] = optim.lr_schedule
    jax_ema: EmaOps = EmaOps(
        init=lambda v: jax.tree_util.tree_map(lambda x: jax.numpy.array(x, copy=True), v),
        update=_ema_update,
        read=lambda s: s,
    )
    # Muon on conv filters: (spec, LR schedule, total steps) -> optax; (params, spec, total)
    jax_muon: Callable[..., optax.GradientTransformation] = optim_muon.muon
    torch_muon: Callable[..., torch.optim.Optimizer] = torch_muon.Muon
    jax_apply_plan: Callable[[Any, dict[str, np.ndarray], Config], np.ndarray] = _jax_apply_plan
    torch_apply_plan: Callable[[Any, dict[str, np.ndarray], Config], np.ndarray] = _torch_apply_plan
    jax_normalize: Callable[[Any, dict[str, np.ndarray], Config], np.ndarray] = _jax_normalize
    torch_normalize: Callable[[Any, dict[str, np.ndarray], Config], np.ndarray] = _torch_normalize
    jax_jitter: Callable[[np.ndarray, dict[str, np.ndarray], Config], np.ndarray] = _jax_jitter
    torch_jitter: Callable[[np.ndarray, dict[str, np.ndarray], Config], np.ndarray] = _torch_jitter
    jax_draw_plan: Callable[[int, int, Config], dict[str, np.ndarray]] = _jax_draw_plan
    torch_draw_plan: Callable[[int, int, Config], dict[str, np.ndarray]] = _torch_draw_plan
    # Context-manager factories entered for the whole run (monkeypatches that restore).
    patches: tuple[Callable[[], contextlib.AbstractContextManager[Any]], ...] = field(
        default_factory=tuple
    )

    @contextlib.contextmanager
    def active(self) -> Iterator[Harness]:
        """Enter every patch; leave them in reverse order, also on errors."""
        with contextlib.ExitStack() as stack:
            for make in self.patches:
                stack.enter_context(make())
            yield self


@contextlib.contextmanager
def setattr_patch(obj: Any, name: str, value: Any) -> Iterator[None]:
    """`setattr(obj, name, value)` for the duration of the block, then the old value back."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """float32 matmuls/convs at full precision in both frameworks (no TF32), restored after."""
    with (
        setattr_patch(torch.backends.cuda.matmul, "allow_tf32", False),
        setattr_patch(torch.backends.cudnn, "allow_tf32", False),
        jax.default_matmul_precision("highest"),
    ):
        yield
