"""The building blocks both PyTorch nets share, chosen by config fields (`jaxbench.layers`'s
mirror): BN, the activation, the pool/norm order of a conv block and Page's whitening stem."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from jaxbench.configs import Config
from torch_ref import distributed


class BatchNorm(nn.BatchNorm2d):
    """`BatchNorm2d` with the config's scale and optional ghost batches. A fixed scale is a
    constant, not a weight, so the state dict maps one to one onto Flax's BN. Ghost BN (Page's
    `view(-1, C * splits, H, W)`): image i in group i mod splits; the (C,) running statistics
    move towards the groups' mean. `sync` over processes: "global" uses the whole batch's
    statistics, "local" each share's (`nn.SyncBatchNorm` refuses CPU tensors and ghost groups)."""

    sync: str | None = None  # None: one process; "global" or "local": several

    def __init__(
        self,
        channels: int,
        eps: float,
        momentum: float,
        scale_trainable: bool = True,
        scale: float = 1.0,
        ghost: int = 0,
    ) -> None:
        super().__init__(channels, eps=eps, momentum=momentum, affine=True)
        self.scale, self.ghost = float(scale), int(ghost)
        if not scale_trainable:
            self.weight = None  # F.batch_norm treats a missing weight as 1
            if self.scale != 1.0:
                self.register_buffer(
                    "fixed_scale", torch.full((channels,), self.scale), persistent=False
                )
        self.reset_parameters()  # again: nn.BatchNorm2d's ran before `scale` was set

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        with torch.no_grad():
            if self.weight is not None:
                self.weight.fill_(getattr(self, "scale", 1.0))
            self.bias.zero_()

    def _scale(self) -> torch.Tensor | None:
        return self.weight if self.weight is not None else getattr(self, "fixed_scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync is not None and self.training:
            return self._synced(x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not self.training or not self.ghost or n <= self.ghost:  # one group
            if not hasattr(self, "fixed_scale"):
                return super().forward(x)
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self._scale(),
                self.bias,
                self.training,
                self.momentum,
                self.eps,
            )
        if n % self.ghost:
            raise ValueError(f"ghost batch norm: batch {n} is not a multiple of {self.ghost}")
        splits = n // self.ghost
        mean = self.running_mean.repeat(splits)
        var = self.running_var.repeat(splits)
        scale = self._scale()
        y = F.batch_norm(
            x.reshape(n // splits, c * splits, h, w),
            mean,
            var,
            None if scale is None else scale.repeat(splits),
            self.bias.repeat(splits),
            True,
            self.momentum,
            self.eps,
        )
        with torch.no_grad():  # fold the groups' updated buffers back into one (C,) set
            self.running_mean.copy_(mean.view(splits, c).mean(0))
            self.running_var.copy_(var.view(splits, c).mean(0))
        return y.reshape(n, c, h, w)

    def _synced(self, x: torch.Tensor) -> torch.Tensor:
        """Training BN over several processes (see the class docstring)."""
        world = distributed.world_size()
        if self.sync == "local":
            y = self._forward(x)  # this process's share: its own statistics and groups
            # `.data`: F.batch_norm's backward keeps the buffers but in training never reads them
            distributed.sum_over_processes(self.running_mean.data, self.running_var.data, mean=True)
            return y
        n, c, h, w = x.shape
        total = n * world
        splits = total // self.ghost if self.ghost and total > self.ghost else 1
        if n % splits:
            raise ValueError(
                f"ghost batch norm: {n} images per process hold no equal part of {splits} groups"
            )
        # Image j of this process is image rank * n + j of the global batch, in group
        # (rank * n + j) mod splits = j mod splits (n is a multiple of splits).
        xg = x.float().reshape(n // splits, splits, c, h, w)
        dims = (0, 3, 4)
        count = total // splits * h * w  # per group and channel, over every process
        mean = distributed.all_reduce_sum(xg.sum(dims)) / count  # (splits, C)
        d = xg - mean[None, :, :, None, None]
        var = distributed.all_reduce_sum((d * d).sum(dims)) / count  # two-pass: stable
        inv = torch.rsqrt(var + self.eps)
        scale = self._scale()
        if scale is not None:
            inv = inv * scale
        y = d * inv[None, :, :, None, None] + self.bias[None, None, :, None, None]
        with torch.no_grad():  # as F.batch_norm per group, then the mean over the groups
            m = self.momentum
            unbiased = var * (count / max(count - 1, 1))
            self.running_mean.copy_(((1 - m) * self.running_mean + m * mean).mean(0))
            self.running_var.copy_(((1 - m) * self.running_var + m * unbiased).mean(0))
            if splits == 1 and not hasattr(self, "fixed_scale"):
                self.num_batches_tracked.add_(1)  # as nn.BatchNorm2d counts (unused)
        return y.reshape(n, c, h, w).to(x.dtype)


def set_sync(model: nn.Module, sync: str | None) -> None:
    """Every BN layer of `model` trains over the process group ("global"/"local") or alone."""
    for m in model.modules():
        if isinstance(m, BatchNorm):
            m.sync = sync


def batch_norm(cfg: Config, channels: int) -> BatchNorm:
    """The config's BN layer for `channels` channels."""
    return BatchNorm(
        channels,
        eps=cfg.bn_eps,
        momentum=cfg.bn_momentum,
        scale_trainable=cfg.bn_scale_trainable,
        scale=cfg.bn_scale,
        ghost=cfg.ghost_bn,
    )


def activation(cfg: Config) -> nn.Module:
    """ReLU, CELU(`cfg.celu_alpha`), the exact erf GELU or SiLU."""
    if cfg.activation == "celu":
        return nn.CELU(alpha=cfg.celu_alpha)
    plain = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}  # GELU's approximate="none"
    if cfg.activation not in plain:
        raise ValueError(f"--activation must be relu, celu, gelu or silu, got {cfg.activation!r}")
    return plain[cfg.activation]()


def conv_block(
    cfg: Config, x: torch.Tensor, conv: nn.Module, norm: nn.Module, act: nn.Module, pool: bool
) -> torch.Tensor:
    """conv -> BN -> act [-> pool], or with `cfg.pool_before_act` conv [-> pool] -> BN -> act."""
    x = conv(x)
    if pool and cfg.pool_before_act:
        x = F.max_pool2d(x, 2)
    x = act(norm(x))
    if pool and not cfg.pool_before_act:
        x = F.max_pool2d(x, 2)
    return x


class PatchWhiten(nn.Module):
    """Page's input stem: frozen 3x3 whitening conv (`whiten`, 27 filters, padding 1, no
    bias; loaded by `set_whitening`), 1x1 conv (`conv`), BN (`bn`), activation."""

    def __init__(self, cfg: Config, c_in: int, c_out: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.whiten = nn.Conv2d(c_in, c_in * 9, 3, padding=1, bias=False)
        self.whiten.weight.requires_grad_(False)
        self.conv = nn.Conv2d(c_in * 9, c_out, 1, bias=False)
        self.bn = batch_norm(cfg, c_out)
        self.act = activation(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_block(self.cfg, self.whiten(x), self.conv, self.bn, self.act, pool=False)


def set_whitening(model: nn.Module, kernel_OIHW: torch.Tensor) -> None:
    """Load the frozen whitening kernel into the module named `whiten` (either stem)."""
    convs = [m for name, m in model.named_modules() if name.split(".")[-1] == "whiten"]
    if len(convs) != 1:
        raise ValueError(f"expected one whitening conv, found {len(convs)}")
    weight = convs[0].weight
    kernel = torch.as_tensor(kernel_OIHW)
    if tuple(kernel.shape) != tuple(weight.shape):
        raise ValueError(f"whitening kernel shape {tuple(kernel.shape)} != {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(kernel)


def set_whiten_bias_trainable(model: nn.Module, trainable: bool) -> None:
    """Train or freeze the speedrun net's whitening bias (frozen: SGD skips it entirely)."""
    whiten = getattr(model, "whiten", None)
    if whiten is not None and whiten.bias is not None:
        whiten.bias.requires_grad_(trainable)
