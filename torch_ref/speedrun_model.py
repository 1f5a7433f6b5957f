"""The airbench94-style net of the `speedrun` preset, in PyTorch (mirror of jaxbench's).

Same structure and names as `jaxbench.speedrun_model`: `whiten` (frozen 2x2 conv with bias),
`block1..3` (`conv1`, max pool 2, `bn1`, act, `conv2`, `bn2`, act), max pool 3, `head`. The
stem's activation is GELU in all three sources; `cfg.activation` is the blocks' (record: SiLU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from jaxbench.configs import Config, speedrun
from torch_ref import layers

WHITEN_CHANNELS = 24
NUM_CLASSES: dict[str, int] = {"cifar10": 10, "cifar100": 100}


class ConvGroup(nn.Module):
    """conv1, max pool 2, bn1, act, conv2, bn2, act (the pool's place: `cfg.pool_before_act`)."""

    def __init__(self, c_in: int, width: int, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
        self.bn1 = layers.batch_norm(cfg, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = layers.batch_norm(cfg, width)
        self.act = layers.activation(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = layers.conv_block(self.cfg, x, self.conv1, self.bn1, self.act, pool=True)
        return layers.conv_block(self.cfg, x, self.conv2, self.bn2, self.act, pool=False)


class SpeedrunNet(nn.Module):
    """airbench94's net; NCHW float input (normalised), logits out."""

    def __init__(
        self,
        widths: Sequence[int] = (64, 256, 256),
        num_classes: int = 10,
        output_scale: float = 1.0 / 9.0,
        cfg: Config | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or speedrun()  # BN settings and the layers' choices
        self.output_scale = output_scale
        self.whiten_bias_zero = cfg.whiten_bias_init == "zero"
        self.head_unit_std = cfg.head_unit_std
        self.whiten = nn.Conv2d(3, WHITEN_CHANNELS, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()  # the stem's, whatever the blocks use
        c_in = WHITEN_CHANNELS
        for i, width in enumerate(widths):
            self.add_module(f"block{i + 1}", ConvGroup(c_in, width, cfg))
            c_in = width
        self.n_blocks = len(widths)
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The contract's init from `generator`: conv/linear weights and the whitening bias ~
        U(+-1/sqrt(fan_in)), then identity on the first C_in filters of every 3x3 conv."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / math.sqrt(m.weight[0].numel())
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        if self.whiten_bias_zero:  # airbench: the whitening bias starts at zero
            self.whiten.bias.zero_()
        for m in self.modules():  # the blocks' 3x3 convs
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                nn.init.dirac_(m.weight[: m.in_channels])
        if self.head_unit_std:  # airbench94_muon: w *= 1 / w.std()
            self.head.weight.mul_(1 / self.head.weight.std())

    def set_whitening(self, kernel_OIHW: np.ndarray | torch.Tensor) -> None:
        """Load the (frozen) whitening kernel from `jaxbench.whitening.whitening_kernel_OIHW`."""
        layers.set_whitening(self, torch.as_tensor(kernel_OIHW))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(x))
        for i in range(self.n_blocks):
            x = getattr(self, f"block{i + 1}")(x)
        x = torch.flatten(self.pool(x), 1)
        return self.head(x).float() * self.output_scale  # float32 logits, also under autocast


def speedrun_from_config(cfg: Config, seed: int | None = None) -> SpeedrunNet:
    """The configured net on the CPU, initialised from `seed` (default `cfg.seed`) privately."""
    if len(cfg.widths) != 3:
        raise ValueError(f"the speedrun net takes three --widths, got {cfg.widths}")
    net = SpeedrunNet(
        widths=tuple(cfg.widths),
        num_classes=NUM_CLASSES[cfg.dataset],
        output_scale=cfg.output_scale,
        cfg=cfg,
    )
    net.reset_parameters(torch.Generator().manual_seed(cfg.seed if seed is None else seed))
    return net
