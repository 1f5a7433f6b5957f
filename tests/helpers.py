"""Synthetic data and small configs the tests share, so a training test costs seconds.

Plain functions (importable as `helpers` from any test file); the pytest fixtures built
on them, and on the real CIFAR-10, are in `conftest.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxbench.configs import Config, get_config
from jaxbench.data import Dataset

CLASSES = [str(i) for i in range(10)]


def random_images(n: int, seed: int = 0) -> np.ndarray:
    """`n` uint8 NHWC 32x32 images of uniform random pixels."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def random_dataset(n_train: int, n_test: int, seed: int = 0) -> Dataset:
    """A `Dataset` of random pixels and labels: one generator draws the train images, train
    labels, test images and test labels in that order (the draws of
    `parity.checks.synthetic_dataset`), so a seed names the same bits everywhere."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        return images, rng.integers(0, 10, n).astype(np.int32)

    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return Dataset("cifar10", list(CLASSES), xtr, ytr, xte, yte, "synthetic")


def smooth_images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish uint8 images (upsampled noise plus pixel noise): neighbouring pixels
    correlate as in photographs, which a whitening test needs and uniform noise lacks."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.float64)
    smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
    noisy = smooth + rng.normal(0, 20, smooth.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def small_config(preset: str = "tiny", **changes: Any) -> Config:
    """`preset` shrunk to train in seconds on the CPU: narrow widths, a whole (unsubsetted)
    synthetic dataset, float32, one epoch peaking half-way. `changes` override any field."""
    widths = (16, 16, 16) if preset == "speedrun" else (4, 8, 8, 8)
    base: dict[str, Any] = dict(
        widths=widths,
        subset=None,
        test_subset=None,
        epochs=1,
        lr_peak_epoch=0.5,
        precision="float32",
    )
    return get_config(preset).replace(**{**base, **changes})
