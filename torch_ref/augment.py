"""Batched, on-device augmentation: apply a batch plan, or draw an epoch's plan.

`apply_plan` is `jaxbench.stream.apply_plan_numpy` (crop, flip, cutout), bit for bit, as one
gather: padding, crop and flip fold into per-image row and column indices. `draw_plan` draws
`stream.epoch_plan`'s distributions with a `torch.Generator` on the device (other numbers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np
import torch

from jaxbench.configs import Config
from jaxbench.stream import (
    FILL_RGB,
    IMAGE_SIZE,
    MEAN_STD,
    cross_entropy_sum,
    has_jitter,
    selective_tta,
    steps_per_epoch,
    tta_weights,
)

PLAN_FIELDS: tuple[str, ...] = (
    "indices", "crop_y", "crop_x", "flip", "cutout_y", "cutout_x", "brightness", "contrast",
)  # fmt: skip
_DTYPES = {"flip": torch.bool, "brightness": torch.float32, "contrast": torch.float32}  # else int64
_FLIP_SEED_TAG = 0xF11B  # base flips get their own generator, so they are drawn "once"


def plan_to_device(plan: Mapping[str, np.ndarray | torch.Tensor], device: torch.device | str):
    """A plan (numpy arrays, e.g. `EpochPlan.as_dict()`) as int64/bool/float32 tensors on
    `device`, through pinned memory for CUDA (a pageable copy would wait for the device)."""
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    for name in PLAN_FIELDS:
        v = plan[name]
        dtype = _DTYPES.get(name, torch.int64)
        if not torch.is_tensor(v):
            v = torch.from_numpy(np.ascontiguousarray(v)).to(dtype)
            if device.type == "cuda":
                v = v.pin_memory()
        out[name] = v.to(device, dtype, non_blocking=True)
    return out


def slice_plan(
    plan: Mapping[str, torch.Tensor], step: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """The part of an epoch plan that step `step` consumes (views, no copy)."""
    sl = slice(step * batch_size, (step + 1) * batch_size)
    return {name: plan[name][sl] for name in PLAN_FIELDS}


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """numpy 'reflect' padding as index arithmetic: -1 -> 1, n -> n - 2 (edge not repeated)."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


@functools.cache
def fill_tensor(device: torch.device) -> torch.Tensor:
    """Cutout's uint8 fill colour on `device`, made once (per step it would be a sync)."""
    return torch.tensor(FILL_RGB, dtype=torch.uint8, device=device)


@functools.cache
def device_stats(dataset: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation mean and std on `device`, made once per process (no per-call copy)."""
    mean, std = (torch.tensor(v, dtype=torch.float32, device=device) for v in MEAN_STD[dataset])
    return mean, std


def normalize(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    channels_last: bool = True,
    jitter: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW `(x / 255 - mean) / std`, then `jitter`'s (brightness, contrast)
    `(x + b) * c` per image (`stream.jitter_numpy`); channels-last unless `channels_last=False`."""
    x = (images.float() / 255.0 - mean) / std
    if jitter is not None:
        x = color_jitter(x, *jitter)
    x = x.permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def color_jitter(
    x_NHWC: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor
) -> torch.Tensor:
    """`(x + b) * c` per image in float32 (`stream.jitter_numpy`), as `jaxbench.augment`'s."""
    b = brightness.to(x_NHWC.device, torch.float32)[:, None, None, None]
    c = contrast.to(x_NHWC.device, torch.float32)[:, None, None, None]
    return (x_NHWC + b) * c


def selective_tta_scores(
    views_fn: Callable[[torch.Tensor], torch.Tensor],
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    cfg: Config,
) -> tuple[float, int]:
    """(summed loss, correct count) under selective TTA: `views_fn`'s 6 view logits of every
    test batch, fetched once, then `stream.selective_tta` and `stream.cross_entropy_sum`."""
    step = cfg.eval_batch_size
    views = [views_fn(test_x[i : i + step]) for i in range(0, len(test_x), step)]
    host = torch.cat(views, dim=1).float().cpu().numpy()
    logits, _ = selective_tta(host[0], host, cfg.tta_select)
    return cross_entropy_sum(logits, test_y.cpu().numpy())


def plan_jitter(
    plan: Mapping[str, torch.Tensor], cfg: Config
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A batch plan's (brightness, contrast) when the config jitters, else None."""
    return (plan["brightness"], plan["contrast"]) if has_jitter(cfg) else None


def apply_plan(
    images: torch.Tensor,
    plan: Mapping[str, torch.Tensor],
    cfg: Config,
    *,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Augmented uint8 batch (B, 32, 32, 3) of the resident uint8 NHWC `images` that
    `plan["indices"]` picks. `fill` (default `fill_tensor`) is an input for compiled callers."""
    idx = plan["indices"].to(images.device, torch.int64)
    b = idx.shape[0]
    iota = torch.arange(IMAGE_SIZE, device=images.device)
    rows = cols = iota.expand(b, IMAGE_SIZE)
    p = cfg.crop_pad
    if p:
        crop_y = plan["crop_y"].to(images.device, torch.int64)
        crop_x = plan["crop_x"].to(images.device, torch.int64)
        rows = _reflect(crop_y[:, None] + iota - p, IMAGE_SIZE)
        cols = _reflect(crop_x[:, None] + iota - p, IMAGE_SIZE)
    if cfg.flip != "none":
        flip = plan["flip"].to(images.device, torch.bool)
        cols = torch.where(flip[:, None], cols.flip(-1), cols)
    out = images[idx[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, 32, 32, 3)
    if cfg.cutout:
        cy = plan["cutout_y"].to(images.device, torch.int64)[:, None]
        cx = plan["cutout_x"].to(images.device, torch.int64)[:, None]
        in_y = (iota >= cy) & (iota < cy + cfg.cutout)  # (B, 32)
        in_x = (iota >= cx) & (iota < cx + cfg.cutout)
        mask = (in_y[:, :, None] & in_x[:, None, :])[..., None]
        out = torch.where(mask, fill_tensor(images.device) if fill is None else fill, out)
    return out


def draw_base_flips(cfg: Config, n_train: int, device: torch.device | str) -> torch.Tensor:
    """The once-per-run random half for alternating flip, a function of the seed alone."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 65_537 + _FLIP_SEED_TAG)
    return torch.rand(n_train, generator=gen, device=device) < 0.5


def draw_plan(
    generator: torch.Generator,
    epoch: int,
    n_train: int,
    cfg: Config,
    device: torch.device | str,
    base_flips: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One epoch's plan drawn on the device, with `stream.epoch_plan`'s distributions; pass
    `base_flips` (`draw_base_flips`) to avoid redrawing them each epoch."""
    n = steps_per_epoch(cfg, n_train) * cfg.batch_size

    def below(high: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=generator, device=device)

    indices = torch.randperm(n_train, generator=generator, device=device)[:n]
    crop_y, crop_x = below(2 * cfg.crop_pad + 1), below(2 * cfg.crop_pad + 1)
    if cfg.flip == "random":
        flip = torch.rand(n, generator=generator, device=device) < 0.5
    elif cfg.flip == "alternating":
        if base_flips is None:
            base_flips = draw_base_flips(cfg, n_train, device)
        flip = base_flips[indices] ^ bool(epoch % 2)
    else:
        flip = torch.zeros(n, dtype=torch.bool, device=device)
    cutout_y, cutout_x = below(IMAGE_SIZE - cfg.cutout + 1), below(IMAGE_SIZE - cfg.cutout + 1)
    brightness = torch.zeros(n, device=device)
    contrast = torch.ones(n, device=device)
    if has_jitter(cfg):  # drawn last: the draws above are the same with jitter or without
        brightness = torch.rand(n, generator=generator, device=device) * 2 - 1
        brightness = brightness * cfg.jitter_brightness
        contrast = torch.rand(n, generator=generator, device=device) * 2 - 1
        contrast = contrast * cfg.jitter_contrast + 1
    drawn = (indices, crop_y, crop_x, flip, cutout_y, cutout_x, brightness, contrast)
    return dict(zip(PLAN_FIELDS, drawn, strict=True))


def tta_logits(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], x_NCHW: torch.Tensor, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of every test-time view `[V, N, C]`, their weighted sum `[N, C]`), float32: the
    views and weights of `stream.tta_weights`, each view with its mirror in one call."""
    views = [x_NCHW]
    if cfg.tta and cfg.tta_shift:
        padded = torch.nn.functional.pad(x_NCHW, (1, 1, 1, 1), mode="reflect")
        h, w = x_NCHW.shape[2], x_NCHW.shape[3]
        views += [padded[:, :, :h, :w], padded[:, :, 2 : 2 + h, 2 : 2 + w]]
    n = x_NCHW.shape[0]
    out: list[torch.Tensor] = []
    for view in views:
        if cfg.tta:
            pair = logits_fn(torch.cat([view, view.flip(3)])).float()
            out += [pair[:n], pair[n:]]
        else:
            out.append(logits_fn(view).float())
    combined = sum(w * v for w, v in zip(tta_weights(cfg), out, strict=True))
    assert isinstance(combined, torch.Tensor)
    return torch.stack(out), combined
