"""Check 3: per-parameter gradients of the trainers' loss."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from jaxbench import optim, stats
from jaxbench import train as jtrain
from jaxbench.configs import Config
from parity import convert
from parity.checks.base import CheckResult, Context, Figure, PyTree, nchw, sample_batch
from torch_ref import train as ttrain
from torch_ref.augment import device_stats


def _jax_grads(
    cfg: Config, fmodel: Any, variables: PyTree, x: np.ndarray, x_u8: np.ndarray | None, y: Any
) -> tuple[jax.Array, PyTree]:
    """The loss and its gradient: the trainer's own loss on `x_u8`, else the model on `x`."""
    trainer_loss = jtrain.make_loss_fn(cfg, fmodel)

    def loss_fn(params: PyTree) -> jax.Array:
        if x_u8 is not None:
            return trainer_loss(params, variables["batch_stats"], x_u8, jnp.asarray(y))[0]
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        logits, _ = fmodel.apply(v, x, train=True, mutable=["batch_stats"])
        return optim.cross_entropy(logits, jnp.asarray(y), cfg.label_smoothing, cfg.loss_reduction)

    return jax.jit(jax.value_and_grad(loss_fn))(variables["params"])


def _torch_loss(
    cfg: Config, tmodel: torch.nn.Module, x: np.ndarray, x_u8: np.ndarray | None, y: Any
) -> torch.Tensor:
    """The same loss in torch_ref: `train_forward` on `x_u8`, else the model on `x`."""
    labels = torch.as_tensor(y, dtype=torch.int64)
    if x_u8 is None:
        smoothing, reduction = cfg.label_smoothing, cfg.loss_reduction
        return F.cross_entropy(
            tmodel(nchw(x)), labels, label_smoothing=smoothing, reduction=reduction
        )
    mean, std = device_stats(cfg.dataset, torch.device("cpu"))
    options = ttrain.loss_options(cfg, False)
    return ttrain.train_forward(tmodel, torch.from_numpy(x_u8), labels, mean, std, **options)[0]


def check_gradients(ctx: Context) -> CheckResult:
    """Per-parameter relative error of the gradient of each trainer's own training loss
    (`jaxbench.train.make_loss_fn`, `torch_ref.train.train_forward` with `loss_options`:
    normalisation of the uint8 batch, forward, smoothed cross-entropy), same batch."""
    res = CheckResult(3, "gradients")
    h, cfg = ctx.harness, ctx.arith_cfg
    b = 16 if ctx.quick else 32
    x, y = sample_batch(ctx, b)
    assert ctx.images is not None
    x_u8: np.ndarray | None = np.asarray(ctx.images[:b])  # the trainers' own input
    if cfg.model == "speedrun":
        x_u8 = None
        # Identity convs carry pixels straight into the max pools, where real images' ties make
        # XLA and PyTorch route gradients differently (1e-3 on CIFAR, 1e-6 on noise).
        x = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    tmodel = h.torch_model(cfg, 1)
    variables = h.to_flax({k: v.clone() for k, v in tmodel.state_dict().items()})
    f_loss, f_grads = _jax_grads(cfg, h.flax_model(cfg), variables, x, x_u8, y)
    tmodel.train()
    for p in tmodel.parameters():  # frozen ones too (speedrun's whitening): compare every grad
        p.requires_grad_(True)
    tmodel.zero_grad(set_to_none=True)
    t_loss = _torch_loss(cfg, tmodel, x, x_u8, y)
    t_loss.backward()
    t_loss_v = float(t_loss.detach())
    g_torch = convert.flax_to_torch({"params": jax.device_get(f_grads)})
    rows: dict[str, float] = {}
    for name, p in tmodel.named_parameters():
        ref = p.grad.numpy() if p.grad is not None else np.zeros_like(p.detach().numpy())
        got = g_torch.get(name)
        rows[name] = math.inf if got is None else stats.relative_error(got.numpy(), ref)
        res.figures.append(Figure(f"grad {name}: relative error", rows[name], 1e-4, headline=False))
    worst = max(rows.values())
    res.figures.insert(0, Figure("gradients: worst per-parameter relative error", worst, 1e-4))
    loss_rel = abs(float(f_loss) - t_loss_v) / max(abs(t_loss_v), 1e-12)
    res.figures.append(Figure("loss relative |diff|", loss_rel, 1e-6, headline=False))
    res.details = {
        "batch": b,
        "input": "the trainers' loss on uint8 images" if x_u8 is not None else "float noise",
        "loss": {"jax": float(f_loss), "torch": t_loss_v},
        "label_smoothing": cfg.label_smoothing,
        "loss_reduction": cfg.loss_reduction,
        "relative_error": rows,
    }
    return res
