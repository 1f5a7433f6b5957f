"""Loss-side state of the recipe in PyTorch, as `jaxbench/optim.py` is for JAX.

SGD with Nesterov momentum and coupled decay (BN biases in a group of their own), the
LR set per update from `schedule.lr_at`, and the EMA of the weights and BN statistics
with airbench's lookahead reset (docs/design.md, "Loss and optimizer" and "EMA").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from jaxbench.configs import Config, optimizer_scales
from torch_ref import fast


def make_optimizer(model: nn.Module, cfg: Config, sgd_impl: str | None = None) -> torch.optim.SGD:
    """SGD with Nesterov momentum and coupled decay; BN biases in their own group.

    Each group carries `lr_mult`; the trainer sets `lr = lr_at(t) * lr_mult` before
    update t. LR and decay are in optimizer units (`configs.optimizer_scales`).
    `sgd_impl`: "fused", "foreach" or "for-loop" (None: torch's own choice).
    """
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
    """`ema = m * ema + (1 - m) * w`, literally (two products, one sum), all tensors at once.

    `m` and `1 - m` are formed in float32 (as `jaxbench.optim.ema_update` does), so
    the two frameworks multiply by the very same coefficients.
    """
    m32 = np.float32(m)
    scaled = torch._foreach_mul(list(current), float(np.float32(1.0) - m32))
    torch._foreach_mul_(list(ema), float(m32))
    torch._foreach_add_(list(ema), scaled)


@torch.no_grad()
def lookahead_reset(live: Sequence[torch.Tensor], ema: Sequence[torch.Tensor]) -> None:
    """airbench's lookahead: after an EMA update the net (params and BN stats) becomes the EMA."""
    for w, e in zip(live, ema, strict=True):
        w.copy_(e)
