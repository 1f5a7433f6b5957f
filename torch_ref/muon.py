"""Muon for the conv filters in PyTorch: `jaxbench.muon`'s reference update, in float32.

`Muon(params, spec, total_steps)` updates OIHW filters in place; the trainer sets `lr`
before each step, and the update counter is in each parameter's state (`step`).

Not `torch.optim.Muon` (torch 2.13): it rejects 4-D parameters and its update differs (lerp
momentum, bfloat16 Newton-Schulz without pre-scaling, an LR scale, decay first, no weight norm).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from jaxbench.muon import MuonSpec, normalization_steps, target_magnitude, update_scale_factor


def frobenius(x: torch.Tensor) -> torch.Tensor:
    """||x||_F as a pairwise sum of squares: torch's float32 `linalg.norm` on the CPU is
    5e-6 off (relative) on a 256x2304 matrix, ten times the rest of the update's float32
    noise, while `sum` keeps it near 3e-8."""
    return x.square().sum().sqrt()


def newton_schulz(g: torch.Tensor, spec: MuonSpec, magnitude: float) -> torch.Tensor:
    """`jaxbench.muon.newton_schulz` in float32 on an (out, in*kh*kw) matrix."""
    x = g.float()
    if spec.ns_target_magnitude is not None:
        x = x * (magnitude / (frobenius(x) + spec.ns_target_eps))
    x = x / (frobenius(x) + spec.ns_eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    a, b, c = spec.ns_coefficients
    for _ in range(spec.ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """The reference Muon update (`jaxbench.muon.muon_update`) of 4-D filters, in float32."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        spec: MuonSpec,
        total_steps: int,
        lr: float | None = None,
    ) -> None:
        super().__init__(params, {"lr": spec.lr if lr is None else lr})
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 4:
                    raise ValueError(f"Muon takes OIHW conv filters only, got {tuple(p.shape)}")
        self.spec, self.total_steps = spec, total_steps
        self.norm_table = normalization_steps(total_steps, spec)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One update of every filter with a gradient (no closure: Muon needs none)."""
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                if p.grad is not None:
                    muon_step_(p, self.state[p], lr, self.spec, self.total_steps, self.norm_table)


def momentum_(state: dict, g: torch.Tensor, spec: MuonSpec) -> torch.Tensor:
    """Update the buffer in `state` in place; return the Newton-Schulz input (`momentum_step`)."""
    dtype = torch.float16 if spec.momentum_dtype == "float16" else torch.float32
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(g, dtype=dtype)
    buf = state["momentum_buffer"]
    if dtype == torch.float16:
        # float32 product and sum, each rounded to float16: the record's in-place
        # float16 mul_ and add_, whatever the device's half arithmetic
        buf.copy_((buf.float() * spec.momentum).half())
        buf.copy_((buf.float() + g.half().float()).half())
        wide = buf.float()
    else:
        buf.mul_(spec.momentum).add_(g)
        wide = buf
    return g + spec.momentum * wide if spec.nesterov else wide.clone()


@torch.no_grad()
def muon_step_(
    p: torch.Tensor,
    state: dict,
    lr: float,
    spec: MuonSpec,
    total_steps: int,
    norm_table: np.ndarray,
) -> None:
    """One Muon update of OIHW filter `p` (its `.grad`, its optimizer `state`) at LR `lr`;
    `norm_table` is `normalization_steps(total_steps, spec)`. Steps 1-6 of `jaxbench.muon`."""
    state["step"] = state.get("step", 0) + 1
    step = min(state["step"], total_steps)  # the record's step_count
    n = momentum_(state, p.grad.float(), spec)
    # OIHW -> (out, in*kh*kw): both sources' `g.reshape(len(g), -1)`
    o = newton_schulz(n.reshape(len(n), -1), spec, target_magnitude(step, total_steps, spec))
    o = o.reshape(p.shape)
    scale = update_scale_factor(tuple(p.shape), spec)
    if norm_table[step]:
        p.mul_(math.sqrt(len(p)) / (frobenius(p) + spec.norm_eps))
    p.add_(o, alpha=-lr * scale)
    if spec.weight_decay:
        p.mul_(1 - lr * spec.weight_decay)
