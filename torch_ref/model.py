"""The Myrtle ResNet-9 in PyTorch, named block for block like `jaxbench.models`.

The module names (`prep`, `layer1`, `res1a`, ..., each `.conv` and `.bn`; `head`) are the
contract the parity suite converts weights by (docs/design.md): do not rename them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from jaxbench.configs import Config
from torch_ref import layers
from torch_ref.speedrun_model import NUM_CLASSES, speedrun_from_config


class ConvBN(nn.Module):
    """conv3x3 (no bias), BN, the activation and an optional 2x2 max pool (`layers.conv_block`)."""

    def __init__(self, c_in: int, c_out: int, *, pool: bool, cfg: Config) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
        self.bn = layers.batch_norm(cfg, c_out)
        self.act = layers.activation(cfg)
        self.pool = pool
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layers.conv_block(self.cfg, x, self.conv, self.bn, self.act, self.pool)


class ResNet9(nn.Module):
    """prep, layer1 (+res1a/res1b), layer2, layer3 (+res3a/res3b), max pool, linear head."""

    def __init__(
        self,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        output_scale: float = 0.125,
        num_classes: int = 10,
        cfg: Config | None = None,
    ) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"ResNet9 takes four widths, got {tuple(widths)}")
        cfg = cfg or Config()  # BN settings and the layers' choices
        w0, w1, w2, w3 = widths
        if cfg.whiten == "patch3":
            self.prep: nn.Module = layers.PatchWhiten(cfg, 3, w0)
        else:
            self.prep = ConvBN(3, w0, pool=False, cfg=cfg)
        self.layer1 = ConvBN(w0, w1, pool=True, cfg=cfg)
        self.res1a = ConvBN(w1, w1, pool=False, cfg=cfg)
        self.res1b = ConvBN(w1, w1, pool=False, cfg=cfg)
        self.layer2 = ConvBN(w1, w2, pool=True, cfg=cfg)
        self.layer3 = ConvBN(w2, w3, pool=True, cfg=cfg)
        self.res3a = ConvBN(w3, w3, pool=False, cfg=cfg)
        self.res3b = ConvBN(w3, w3, pool=False, cfg=cfg)
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.output_scale = output_scale
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """The contract's init, spelled out: conv/linear weights ~ U(+-1/sqrt(kh kw c_in));
        BN scale `cfg.bn_scale`, bias 0, running mean 0, running var 1."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / math.sqrt(m.weight[0].numel())  # fan_in = kh kw c_in
                m.weight.uniform_(-bound, bound, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prep(x)
        x = self.layer1(x)
        x = x + self.res1b(self.res1a(x))
        x = self.layer2(x)
        x = self.layer3(x)
        x = x + self.res3b(self.res3a(x))
        x = torch.amax(x, dim=(2, 3))
        return self.head(x).float() * self.output_scale  # float32 logits, also under autocast


def model_from_config(cfg: Config, seed: int | None = None) -> nn.Module:
    """The configured net (ResNet-9 or the speedrun net) on the CPU, initialised from `seed`
    (default `cfg.seed`) by a private generator: the same weights on every machine."""
    if cfg.model == "speedrun":
        return speedrun_from_config(cfg, seed)
    if cfg.model != "resnet9":
        raise ValueError(f"torch_ref has no model {cfg.model!r}; use --model resnet9 or speedrun")
    model = ResNet9(
        widths=tuple(cfg.widths),
        output_scale=cfg.output_scale,
        num_classes=NUM_CLASSES[cfg.dataset],
        cfg=cfg,
    )
    model.reset_parameters(torch.Generator().manual_seed(cfg.seed if seed is None else seed))
    return model


def count_params(model: nn.Module) -> int:
    """Trainable parameters (BN running stats are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def use_bfloat16(cfg: Config, device: torch.device) -> bool:
    """`precision=auto`: bf16 autocast on GPU, float32 on CPU (`models.compute_dtype`'s twin)."""
    if cfg.precision == "auto":
        return device.type == "cuda"
    return cfg.precision == "bfloat16"
