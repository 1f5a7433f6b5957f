"""Loss-side state of the recipe in PyTorch, as `jaxbench/optim.py` is for JAX.

SGD with Nesterov momentum and coupled decay, the LR set per update, and the EMA of the weights
and BN statistics with airbench's lookahead reset (docs/design.md); `MuonSGD` for Muon.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from jaxbench.configs import Config, optimizer_scales
from jaxbench.muon import make_spec, normalization_steps
from jaxbench.schedule import train_steps, whiten_bias_lr_knots
from torch_ref import fast
from torch_ref.muon import muon_step_


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """A trained conv filter: a 4-D weight outside the frozen whitening conv (as jaxbench's)."""
    parts = name.split(".")
    return p.ndim == 4 and parts[-1] == "weight" and (len(parts) < 2 or parts[-2] != "whiten")


class MuonSGD(torch.optim.Optimizer):
    """Muon on the groups with `muon=True`, torch SGD's for-loop update on the rest, in one
    optimizer (so `set_lr`, state dict and scratch copy serve both). A group with `lr_knots`
    takes its LR from them at its own update count, not from `set_lr`."""

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float,
        momentum: float,
        nesterov: bool,
        total_steps: int,
        muon_momentum: float,
        weight_decay: float = 0.0,
        muon_variant: str = "airbench94_muon",
        muon_weight_norm: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        defaults |= dict(total_steps=total_steps, muon_momentum=muon_momentum)
        defaults |= dict(muon_variant=muon_variant, muon_weight_norm=muon_weight_norm)
        super().__init__(params, defaults)
        # plain settings (a checkpoint loads with weights_only), one spec built from them
        self.spec = make_spec(muon_variant, lr, muon_momentum, muon_weight_norm)
        self.norm_table = normalization_steps(total_steps, self.spec)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One update of every parameter with a gradient."""
        if closure is not None:
            raise ValueError("MuonSGD.step takes no closure")
        for group in self.param_groups:
            if "lr_knots" in group:
                group["lr"] = float(np.interp(group["updates"], *group["lr_knots"]))
                group["updates"] += 1
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group.get("muon", False):
                    total = group["total_steps"]
                    muon_step_(p, self.state[p], lr, self.spec, total, self.norm_table)
                else:
                    self._sgd(p, group, lr)

    def _sgd(self, p: torch.Tensor, group: dict[str, Any], lr: float) -> None:
        d_p = p.grad
        if group["weight_decay"]:
            d_p = d_p.add(p, alpha=group["weight_decay"])
        m, state = group["momentum"], self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.clone(d_p).detach()
        else:
            state["momentum_buffer"].mul_(m).add_(d_p)
        buf = state["momentum_buffer"]
        p.add_(d_p.add(buf, alpha=m) if group["nesterov"] else buf, alpha=-lr)


def make_muon_sgd(model: nn.Module, cfg: Config, steps_per_epoch: int) -> MuonSGD:
    """`jaxbench.optim.make_optimizer`'s groups (default, BN biases, whitening bias, Muon
    filters, labelled as `param_labels`) for `optimizer="muon"` or `whiten_bias_own_lr`."""
    lr, wd = optimizer_scales(cfg)
    named = list(model.named_parameters())
    bn_ids = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    whiten = getattr(model, "whiten", None)
    own = {id(whiten.bias)} if cfg.whiten_bias_own_lr and whiten is not None else set()
    muon = cfg.optimizer == "muon"
    filters = [p for n, p in named if muon and is_muon_param(n, p)]
    taken = bn_ids | own | {id(p) for p in filters}
    bn_group = {"params": [p for _, p in named if id(p) in bn_ids], "lr_mult": cfg.bn_bias_lr_mult}
    bn_group |= {"lr": lr * cfg.bn_bias_lr_mult, "weight_decay": wd * cfg.bn_bias_wd_mult}
    bn_group["label"] = "bn_bias"
    groups = [
        {"params": [p for _, p in named if id(p) not in taken], "lr_mult": 1.0, "label": "default"},
        bn_group,
    ]
    if own:
        xs, ys = whiten_bias_lr_knots(cfg, steps_per_epoch)
        groups.append(
            {"params": [whiten.bias], "lr_knots": (xs, ys), "updates": 0, "lr": ys[0]}
            | {"weight_decay": wd * cfg.bn_bias_wd_mult, "label": "whiten_bias"}
        )
    if filters:
        mult = cfg.muon_lr / lr
        groups.append({"params": filters, "lr": cfg.muon_lr, "lr_mult": mult, "muon": True})
        groups[-1] |= {"weight_decay": 0.0, "momentum": cfg.muon_momentum, "label": "muon"}
    return MuonSGD(
        groups,
        lr=lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        total_steps=train_steps(cfg, steps_per_epoch),
        muon_momentum=cfg.muon_momentum,
        weight_decay=wd,
        muon_variant=cfg.muon_variant,
        muon_weight_norm=cfg.muon_weight_norm,
    )


def make_optimizer(
    model: nn.Module, cfg: Config, sgd_impl: str | None = None, steps_per_epoch: int | None = None
) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum and coupled decay, BN biases in their own group, each group
    with an `lr_mult` (`set_lr`); a `MuonSGD` for Muon or `whiten_bias_own_lr`, which needs
    `steps_per_epoch`. `sgd_impl`: "fused", "foreach" or "for-loop" (None: torch's choice)."""
    if cfg.optimizer == "muon" or cfg.whiten_bias_own_lr:
        if steps_per_epoch is None:
            raise ValueError("make_optimizer needs steps_per_epoch for Muon or the bias's LR")
        return make_muon_sgd(model, cfg, steps_per_epoch)
    lr, wd = optimizer_scales(cfg)
    bn_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_ids = {id(p) for p in bn_biases}
    others = [p for p in model.parameters() if id(p) not in bn_ids]
    bn_group = {"params": bn_biases, "lr": lr * cfg.bn_bias_lr_mult}
    bn_group |= {"lr_mult": cfg.bn_bias_lr_mult, "weight_decay": wd * cfg.bn_bias_wd_mult}
    groups = [{"params": others, "lr": lr, "lr_mult": 1.0, "weight_decay": wd}, bn_group]
    kernel = fast.sgd_kwargs(sgd_impl)
    return torch.optim.SGD(
        groups, lr=lr, momentum=cfg.momentum, dampening=0.0, nesterov=cfg.nesterov, **kernel
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The LR of the coming update in every group (a host float: no device sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def ema_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What the EMA averages, in a fixed order: parameters, then float buffers (BN stats);
    not `num_batches_tracked` (unused with a set momentum) nor a constant `fixed_scale`."""
    buffers = model.named_buffers()
    kept = [b for n, b in buffers if b.is_floating_point() and not n.endswith("fixed_scale")]
    return list(model.parameters()) + kept


@torch.no_grad()
def ema_update(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], m: float) -> None:
    """`ema = m * ema + (1 - m) * w`, literally, all tensors at once; `m` and `1 - m` formed in
    float32 as `jaxbench.optim.ema_update` does, so both multiply by the same coefficients."""
    m32 = np.float32(m)
    scaled = torch._foreach_mul(list(current), float(np.float32(1.0) - m32))
    torch._foreach_mul_(list(ema), float(m32))
    torch._foreach_add_(list(ema), scaled)


@torch.no_grad()
def lookahead_reset(live: Sequence[torch.Tensor], ema: Sequence[torch.Tensor]) -> None:
    """airbench's lookahead: after an EMA update the net (params and BN stats) becomes the EMA."""
    for w, e in zip(live, ema, strict=True):
        w.copy_(e)


def weights_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """Whether two tensor lists hold the same values (one host sync for all of them)."""
    if len(a) != len(b):
        return False
    if not a:
        return True
    return not bool(torch.stack([(x != y).any() for x, y in zip(a, b, strict=True)]).any())
