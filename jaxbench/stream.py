"""The framework-neutral batch stream: shuffle order and augmentation parameters.

`epoch_plan` draws with numpy, from the seed alone, an epoch's image order and every
augmentation parameter; each framework applies it with its own batched ops, and
`apply_plan_numpy` is the slow, obvious reference both are tested against. Per image
(uint8 NHWC): take images[indices[b]]; reflect-pad by crop_pad (edge not repeated) and cut
the 32x32 window at (crop_y, crop_x); mirror if flip; fill the cutout square at
(cutout_y, cutout_x) with FILL_RGB. The result stays uint8, so frameworks agree bit for
bit; normalisation happens afterwards, on the device, and with colour jitter (the record's)
the normalised float32 image x becomes `(x + brightness) * contrast` (`jitter_numpy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxbench.configs import Config

IMAGE_SIZE = 32
# Per-channel statistics of the training set, in [0, 1] units.
MEAN_STD: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
}
# Cutout fill: the CIFAR-10 mean as uint8, so a cut square normalises to ~0.
FILL_RGB: tuple[int, int, int] = (125, 123, 114)

_STREAM_TAG = 0x5EED  # keeps the data stream's seeds apart from the init seeds
_FLIP_TAG = 0xF11B


@dataclass(frozen=True)
class EpochPlan:
    """Everything random about one epoch's batches; arrays have steps * batch entries."""

    indices: np.ndarray  # int32, which training image sits at each batch position
    crop_y: np.ndarray  # int32 in [0, 2 * crop_pad]
    crop_x: np.ndarray  # int32 in [0, 2 * crop_pad]
    flip: np.ndarray  # bool
    cutout_y: np.ndarray  # int32 in [0, 32 - cutout]
    cutout_x: np.ndarray  # int32 in [0, 32 - cutout]
    brightness: np.ndarray  # float32 in [-jitter_brightness, jitter_brightness), else 0
    contrast: np.ndarray  # float32 in [1 - jitter_contrast, 1 + jitter_contrast), else 1

    def batch(self, step: int, batch_size: int) -> EpochPlan:
        """The slice of the plan that step `step` of the epoch consumes."""
        sl = slice(step * batch_size, (step + 1) * batch_size)
        return EpochPlan(**{k: v[sl] for k, v in vars(self).items()})

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(vars(self))


def steps_per_epoch(cfg: Config, n_train: int) -> int:
    """Full batches per epoch; the last partial batch is dropped."""
    return n_train // cfg.batch_size


def base_flips(cfg: Config, n_train: int) -> np.ndarray:
    """The once-per-run random half for alternating flip (airbench's epoch-0 flips)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _FLIP_TAG]))
    return rng.random(n_train) < 0.5


def epoch_plan(cfg: Config, epoch: int, n_train: int) -> EpochPlan:
    """The shared stream's plan for `epoch` (0-based); a pure function of (cfg, epoch, n)."""
    n = steps_per_epoch(cfg, n_train) * cfg.batch_size
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, _STREAM_TAG, epoch]))
    indices = rng.permutation(n_train)[:n].astype(np.int32)
    span = 2 * cfg.crop_pad + 1
    crop_y = rng.integers(0, span, n, dtype=np.int32)
    crop_x = rng.integers(0, span, n, dtype=np.int32)
    if cfg.flip == "random":
        flip = rng.random(n) < 0.5
    elif cfg.flip == "alternating":
        flip = base_flips(cfg, n_train)[indices] ^ bool(epoch % 2)
    else:
        flip = np.zeros(n, dtype=bool)
    corner = IMAGE_SIZE - cfg.cutout + 1
    cutout_y = rng.integers(0, corner, n, dtype=np.int32)
    cutout_x = rng.integers(0, corner, n, dtype=np.int32)
    # drawn last, and only when on, so every earlier draw is the same with jitter or without
    brightness, contrast = np.zeros(n, np.float32), np.ones(n, np.float32)
    if has_jitter(cfg):
        brightness = ((rng.random(n) * 2 - 1) * cfg.jitter_brightness).astype(np.float32)
        contrast = ((rng.random(n) * 2 - 1) * cfg.jitter_contrast + 1).astype(np.float32)
    return EpochPlan(indices, crop_y, crop_x, flip, cutout_y, cutout_x, brightness, contrast)


def has_jitter(cfg: Config) -> bool:
    """Whether the config's batches get colour jitter (either range non-zero)."""
    return bool(cfg.jitter_brightness or cfg.jitter_contrast)


def jitter_numpy(x_NHWC: np.ndarray, brightness: np.ndarray, contrast: np.ndarray) -> np.ndarray:
    """The reference jitter of normalised float32 images: `(x + b) * c` per image, as the
    record's `batch_color_jitter` (the shift first, the scale about zero, not the mean)."""
    b = np.asarray(brightness, np.float32)[:, None, None, None]
    c = np.asarray(contrast, np.float32)[:, None, None, None]
    return (np.asarray(x_NHWC, np.float32) + b) * c


def apply_plan_numpy(images_NHWC: np.ndarray, plan: EpochPlan, cfg: Config) -> np.ndarray:
    """Reference implementation of the semantics above, one image at a time."""
    out = np.empty((len(plan.indices), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    p = cfg.crop_pad
    for b, i in enumerate(plan.indices):
        x = images_NHWC[i]
        if p:
            x = np.pad(x, ((p, p), (p, p), (0, 0)), mode="reflect")
            x = x[plan.crop_y[b] : plan.crop_y[b] + 32, plan.crop_x[b] : plan.crop_x[b] + 32]
        if plan.flip[b]:
            x = x[:, ::-1]
        x = np.array(x)
        if cfg.cutout:
            y0, x0, s = plan.cutout_y[b], plan.cutout_x[b], cfg.cutout
            x[y0 : y0 + s, x0 : x0 + s] = FILL_RGB
        out[b] = x
    return out


def normalize_numpy(images_NHWC: np.ndarray, dataset: str = "cifar10") -> np.ndarray:
    """Float32 normalisation, for tests and host-side references."""
    mean, std = (np.asarray(v, np.float32) for v in MEAN_STD[dataset])
    return (images_NHWC.astype(np.float32) / 255.0 - mean) / std


def tta_weights(cfg: Config) -> tuple[float, ...]:
    """Weights of the test-time views: image, mirror, then 1-px shifts and their mirrors."""
    if not cfg.tta:
        return (1.0,)
    if not cfg.tta_shift:
        return (0.5, 0.5)
    return (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)


def least_confident(plain_logits: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of the int(fraction x n) images whose plain-view top softmax
    probability is lowest (the record's `topk(confidences, k, largest=False)`; ties go to
    the lower index, so the choice is a function of the logits alone)."""
    x = np.asarray(plain_logits, np.float64)
    confidence = 1.0 / np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)
    k = int(len(x) * fraction)
    return np.sort(np.argsort(confidence, kind="stable")[:k])


def selective_tta(
    plain_logits: np.ndarray, views_logits: np.ndarray, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, selected): the plain view's logits [N, C], those of the `least_confident`
    images replaced by the equal mean of their 6 test-time views `views_logits` [6, N, C]
    (the record's selective TTA; its weights are 1/6 each, not `tta_weights`')."""
    selected = least_confident(plain_logits, fraction)
    out = np.array(plain_logits, np.float32, copy=True)
    out[selected] = np.asarray(views_logits, np.float32)[:, selected].mean(axis=0)
    return out, selected


def cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(summed cross-entropy in float64, right predictions) of float32 logits: how both
    trainers score selective TTA's logits, on the host."""
    x = np.asarray(logits, np.float64)
    top = x.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    y = np.asarray(labels, np.int64)
    loss = float(np.sum(log_z - x[np.arange(len(x)), y]))
    return loss, int(np.sum(np.argmax(np.asarray(logits), axis=1) == y))
