"""The Muon update of a 4-D conv filter: the float64 reference both frameworks are tested against.

Two recipes train the speedrun net's trained conv filters with Muon, with different
updates: `AIRBENCH94_MUON` (KellerJordan/cifar10-airbench `airbench94_muon.py`) and
`RECORD` (hiverge/cifar10-speedrun `cifar10_speedrun.py`). Update t (from 1) of an OIHW
filter W with gradient G and scheduled LR lr_t:

1. momentum, torch SGD's dampening-0 form: `buf = m * buf + G` (the record's buffer is
   float16, rounded after `m * buf` and after the add);
2. nesterov: `N = G + m * buf` (plain: `N = buf`);
3. `O = newton_schulz(N as (out, in*kh*kw))`, reshaped back, x `update_scale_factor`;
4. `W *= sqrt(out) / (||W||_F + eps)` before the update: always in airbench94_muon (eps
   0), at `normalization_steps` in the record (eps 1e-7);
5. `W -= lr_t * O`;
6. the record only: `W *= 1 - lr_t * wd` (airbench94_muon's decay is for the SGD groups).

The sources run in half precision; here the reference is float64, the trainers float32, and
only the record's float16 buffer is modelled. Each filter is orthogonalised on its own (the
record's zero-padded batch of filters changes nothing in exact arithmetic).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

UPDATE_SCALES = ("none", "width", "rms")
NORMALIZATIONS = ("none", "every_step", "adaptive")


@dataclass(frozen=True)
class MuonSpec:
    """Everything that defines one recipe's Muon update (see the module docstring)."""

    lr: float  # peak LR; the trainer's schedule multiplies it (linear to zero in both)
    momentum: float
    nesterov: bool
    ns_coefficients: tuple[float, float, float]  # (a, b, c): X <- aX + (bA + cA^2)X, A = XX^T
    ns_steps: int
    ns_eps: float  # X = G / (||G||_F + ns_eps) right before the iteration
    # The record's pre-scaling: G *= t / (||G||_F + ns_target_eps), t linear from
    # ns_target_magnitude[0] to [1] over the run; None: no pre-scaling (airbench94_muon).
    ns_target_magnitude: tuple[float, float] | None
    ns_target_eps: float
    update_scale: str  # "none": O as is (both sources); "width" / "rms": library conventions
    normalization: str  # "none", "every_step" or "adaptive"
    norm_eps: float  # W *= sqrt(out) / (||W||_F + norm_eps)
    norm_interval: tuple[int, int]  # adaptive: interval(t) = base + int(slope * (t / total))
    weight_decay: float  # decoupled: W *= 1 - lr_t * weight_decay after the update
    momentum_dtype: str  # "float32" or "float16" (the buffer's storage)

    def __post_init__(self) -> None:
        if self.update_scale not in UPDATE_SCALES:
            raise ValueError(f"update_scale must be one of {UPDATE_SCALES}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}")
        if self.momentum_dtype not in ("float32", "float16"):
            raise ValueError("momentum_dtype must be 'float32' or 'float16'")
        if self.ns_steps < 1 or len(self.ns_coefficients) != 3:
            raise ValueError("ns_steps must be >= 1 and ns_coefficients three numbers")


AIRBENCH94_MUON = MuonSpec(
    lr=0.24,  # airbench94_muon.py: Muon(filter_params, lr=0.24, ...)
    momentum=0.6,  # airbench94_muon.py: momentum=0.6
    nesterov=True,  # airbench94_muon.py: nesterov=True
    ns_coefficients=(3.4445, -4.7750, 2.0315),  # airbench94_muon.py: zeropower_via_newtonschulz5
    ns_steps=3,  # airbench94_muon.py: steps=3 (default of zeropower_via_newtonschulz5)
    ns_eps=1e-7,  # airbench94_muon.py: X /= (X.norm() + eps), eps=1e-7
    ns_target_magnitude=None,  # airbench94_muon.py: no pre-scaling
    ns_target_eps=0.0,
    update_scale="none",  # airbench94_muon.py: p.data.add_(update, alpha=-lr), no shape factor
    normalization="every_step",  # airbench94_muon.py: p.data.mul_(len(p.data)**0.5 / p.data.norm())
    norm_eps=0.0,  # airbench94_muon.py: p.data.norm() without eps
    norm_interval=(1, 0),  # unused with every_step
    # airbench94_muon.py: Muon has no decay; wd / lr goes to the SGD groups only
    weight_decay=0.0,
    # airbench94_muon.py: zeros_like(g), the parameter's dtype (float16 there only because
    # the whole net is half); in a float32 trainer that is float32
    momentum_dtype="float32",
)

RECORD_BATCH = 1536  # cifar10_speedrun.py: training_batch_size = 1536

RECORD = MuonSpec(
    lr=0.205,  # cifar10_speedrun.py: Muon(filter_params, lr=0.205, ...)
    momentum=0.655,  # cifar10_speedrun.py: momentum=0.655
    nesterov=True,  # cifar10_speedrun.py: nesterov=True
    ns_coefficients=(3.4576, -4.7391, 2.0843),  # cifar10_speedrun.py: _zeropower_via_newtonschulz5
    ns_steps=3,  # cifar10_speedrun.py: three unrolled iterations
    ns_eps=1e-5,  # cifar10_speedrun.py: eps_stable = 1e-05
    ns_target_magnitude=(0.5012, 0.0786),  # cifar10_speedrun.py: initial/final_target_mag
    ns_target_eps=1e-5,  # cifar10_speedrun.py: eps_gms = 1e-05
    update_scale="none",  # cifar10_speedrun.py: _foreach_add_(params, O, alpha=-lr)
    normalization="adaptive",  # cifar10_speedrun.py: do_norm_scaling every norm_freq steps
    norm_eps=1e-7,  # cifar10_speedrun.py: len(p.data) ** 0.5 / (n + 1e-07)
    # cifar10_speedrun.py: group["norm_freq"] = 2 + int(15 * progress) each step (the
    # constructor's norm_freq=4 is overwritten before its first use)
    norm_interval=(2, 15),
    weight_decay=1.0418e-6 * RECORD_BATCH,  # cifar10_speedrun.py: weight_decay=wd (not wd / lr)
    momentum_dtype="float16",  # cifar10_speedrun.py: param_groups[0]["momentum_buffer_dtype"]
)


VARIANTS: dict[str, MuonSpec] = {"airbench94_muon": AIRBENCH94_MUON, "record": RECORD}


def spec_of(cfg: Any) -> MuonSpec:
    """A config's Muon (`muon_variant`, `muon_lr`, `muon_momentum`, `muon_weight_norm`): both
    trainers build their update from this one spec."""
    return make_spec(cfg.muon_variant, cfg.muon_lr, cfg.muon_momentum, cfg.muon_weight_norm)


def make_spec(variant: str, lr: float, momentum: float, weight_norm: bool = True) -> MuonSpec:
    """`VARIANTS[variant]` with this peak LR and momentum, its weight normalisation off
    unless `weight_norm` (plain values, so an optimizer's settings stay plain too)."""
    spec = dataclasses.replace(VARIANTS[variant], lr=lr, momentum=momentum)
    return spec if weight_norm else dataclasses.replace(spec, normalization="none")


def as_matrix(w_oihw: np.ndarray) -> np.ndarray:
    """The (out, in*kh*kw) matrix both sources orthogonalise: `g.reshape(len(g), -1)` of OIHW."""
    return w_oihw.reshape(w_oihw.shape[0], -1)


def target_magnitude(step: int, total_steps: int, spec: MuonSpec) -> float:
    """The record's pre-scaling magnitude at update `step` (from 1), progress `step / total`."""
    if spec.ns_target_magnitude is None:
        return 1.0
    start, end = spec.ns_target_magnitude
    progress = step / max(1, total_steps)
    return start * (1 - progress) + end * progress


def newton_schulz(
    g: np.ndarray, spec: MuonSpec, magnitude: float = 1.0, dtype: type = np.float64
) -> np.ndarray:
    """Newton-Schulz orthogonalisation in `dtype`: the record's pre-scaling to `magnitude`,
    then X / (||X||_F + ns_eps) and `ns_steps` of X <- aX + (bA + cA^2)X, A = XX^T, on the
    wide orientation; each singular value goes through `singular_value_map`."""
    x = np.asarray(g, dtype=dtype)
    if spec.ns_target_magnitude is not None:
        x = x * (dtype(magnitude) / (np.linalg.norm(x) + dtype(spec.ns_target_eps)))
    x = x / (np.linalg.norm(x) + dtype(spec.ns_eps))
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    a, b, c = (dtype(v) for v in spec.ns_coefficients)
    for _ in range(spec.ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.T if tall else x


def singular_value_map(s: np.ndarray, spec: MuonSpec) -> np.ndarray:
    """What `newton_schulz` does to each singular value s of the normalised input."""
    a, b, c = spec.ns_coefficients
    s = np.asarray(s, dtype=np.float64)
    for _ in range(spec.ns_steps):
        s = a * s + b * s**3 + c * s**5
    return s


def update_scale_factor(shape: tuple[int, ...], spec: MuonSpec) -> float:
    """The factor on the orthogonalised (out, in*kh*kw) update: "none" 1 (both sources);
    "width" sqrt(max(1, rows / cols)) (optax.contrib.muon's default); "rms" 0.2 *
    sqrt(max(rows, cols)) (torch.optim.Muon's "match_rms_adamw")."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    if spec.update_scale == "width":
        return float(np.sqrt(max(1.0, rows / cols)))
    if spec.update_scale == "rms":
        return float(0.2 * np.sqrt(max(rows, cols)))
    return 1.0


def normalization_steps(total_steps: int, spec: MuonSpec) -> np.ndarray:
    """Bool table, index t = update t (from 1): normalise before update t. The record's
    adaptive rule normalises when t - last >= base + int(slope * t / total) (first at 2)."""
    table = np.zeros(total_steps + 1, dtype=bool)
    if spec.normalization == "every_step":
        table[1:] = True
    elif spec.normalization == "adaptive":
        base, slope = spec.norm_interval
        last = 0
        for t in range(1, total_steps + 1):
            if t - last >= base + int(slope * (t / total_steps)):
                table[t] = True
                last = t
    return table


def momentum_step(
    buf: np.ndarray, g: np.ndarray, spec: MuonSpec, dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """(new buffer, Newton-Schulz input): `buf = m * buf + g`, then `g + m * buf` (nesterov).
    A float16 buffer rounds `m * buf`, g and their sum, as the record's in-place ops do."""
    g = np.asarray(g, dtype=dtype)
    m = dtype(spec.momentum)
    if spec.momentum_dtype == "float16":
        scaled = (np.asarray(buf, dtype=dtype) * m).astype(np.float16)
        new = (scaled.astype(dtype) + g.astype(np.float16).astype(dtype)).astype(np.float16)
        wide = new.astype(dtype)
    else:
        new = m * np.asarray(buf, dtype=dtype) + g
        wide = new
    return new, (g + m * wide) if spec.nesterov else wide


def muon_update(
    w: np.ndarray,
    g: np.ndarray,
    buf: np.ndarray,
    *,
    step: int,
    lr: float,
    total_steps: int,
    spec: MuonSpec,
    dtype: type = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-6 of the module docstring on an OIHW filter: (new weights, new buffer);
    `step` counts from 1, `lr` is this update's scheduled LR."""
    w = np.asarray(w, dtype=dtype)
    buf, n = momentum_step(buf, g, spec, dtype)
    magnitude = target_magnitude(step, total_steps, spec)
    o = newton_schulz(as_matrix(n), spec, magnitude, dtype).reshape(w.shape)
    o = o * dtype(update_scale_factor(w.shape, spec))
    if normalization_steps(total_steps, spec)[step]:
        w = w * (dtype(np.sqrt(w.shape[0])) / (np.linalg.norm(w) + dtype(spec.norm_eps)))
    w = w - dtype(lr) * o
    if spec.weight_decay:
        w = w * (1 - dtype(lr) * dtype(spec.weight_decay))
    return w, buf


def zero_buffer(shape: tuple[int, ...], spec: MuonSpec) -> np.ndarray:
    """The initial momentum buffer (zeros, in the spec's storage dtype)."""
    return np.zeros(shape, dtype=np.float16 if spec.momentum_dtype == "float16" else np.float64)
