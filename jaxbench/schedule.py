"""The one-cycle learning-rate schedule, defined once as knots (`lr_knots`) for both trainers;
`lr_at(t)`, the float64 reference, is the LR of update t (0-based)."""

from __future__ import annotations

import math

import numpy as np

from jaxbench.configs import Config, optimizer_scales


def epoch_steps(cfg: Config, steps_per_epoch: int, epoch: int) -> int:
    """Updates in `epoch` (0-based): all its batches, or in the last epoch the first
    ceil(last_epoch_fraction x steps) (the record: ceil(7.59 x 32) = 7 x 32 + 19)."""
    if epoch < cfg.epochs - 1 or cfg.last_epoch_fraction >= 1.0:
        return steps_per_epoch
    return min(steps_per_epoch, max(1, math.ceil(cfg.last_epoch_fraction * steps_per_epoch)))


def train_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Updates in the whole run, where the LR schedule ends."""
    return (cfg.epochs - 1) * steps_per_epoch + epoch_steps(cfg, steps_per_epoch, cfg.epochs - 1)


def whiten_bias_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Updates of the whitening bias before it freezes: ceil(whiten_bias_epochs x steps)
    (the record's 0.19 epochs of 32 steps: 7)."""
    return math.ceil(cfg.whiten_bias_epochs * steps_per_epoch)


def lr_knots(cfg: Config, steps_per_epoch: int) -> tuple[list[int], list[float]]:
    """(steps, values) in optimizer units: linear from lr_start*lr to lr at the peak, to
    lr_end*lr `lr_flat_epochs` before the end, flat after it (Page's EMA epochs);
    `lr_schedule="linear"`: lr at step 0 straight to lr_end*lr at the end."""
    lr, _ = optimizer_scales(cfg)
    total = train_steps(cfg, steps_per_epoch)
    if cfg.lr_schedule == "linear":  # airbench94_muon: lr * (1 - t / total), no warm-up
        return [0, total], [lr, cfg.lr_end * lr]
    peak = min(max(int(round(cfg.lr_peak_epoch * steps_per_epoch)), 1), total)
    end = max(total - int(round(cfg.lr_flat_epochs * steps_per_epoch)), peak)
    if end < total:
        return [0, peak, end, total], [cfg.lr_start * lr, lr, cfg.lr_end * lr, cfg.lr_end * lr]
    return [0, peak, total], [cfg.lr_start * lr, lr, cfg.lr_end * lr]


def whiten_bias_lr_knots(cfg: Config, steps_per_epoch: int) -> tuple[list[int], list[float]]:
    """`whiten_bias_own_lr`'s knots: the BN biases' LR at step 0 linear to zero when the
    bias freezes (airbench94_muon: `bias_lr * (1 - step / whiten_bias_train_steps)`)."""
    lr, _ = optimizer_scales(cfg)
    end = max(whiten_bias_steps(cfg, steps_per_epoch), 1)
    return [0, end], [lr * cfg.bn_bias_lr_mult, 0.0]


def lr_at(step: np.ndarray | int, cfg: Config, steps_per_epoch: int) -> np.ndarray:
    """Reference LR of update `step`, piecewise linear between the knots."""
    xs, ys = lr_knots(cfg, steps_per_epoch)
    return np.interp(np.asarray(step, dtype=np.float64), xs, ys)


def ema_decays(cfg: Config, total_steps: int) -> np.ndarray:
    """EMA decay after update t (from 1), float32, one table for both trainers:
    `ema_momentum`, or with `lookahead` airbench's ramp `ema_momentum * (t / total) ** 3`."""
    t = np.arange(total_steps + 1, dtype=np.float64)
    if cfg.lookahead:
        return (cfg.ema_momentum * (t / max(total_steps, 1)) ** 3).astype(np.float32)
    return np.full(total_steps + 1, cfg.ema_momentum, np.float32)
