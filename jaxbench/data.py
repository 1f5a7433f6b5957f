"""CIFAR loading (placeholder: official binary layout only; the data layer replaces it).

Keep the signature of `load_dataset` and the fields of `Dataset`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxbench.configs import Config


@dataclass(frozen=True)
class Dataset:
    name: str
    classes: list[str]
    train_images: np.ndarray  # uint8 NHWC
    train_labels: np.ndarray  # int32
    test_images: np.ndarray
    test_labels: np.ndarray


def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, 3073)
    return raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), raw[:, 0].astype(
        np.int32
    )


def load_dataset(cfg: Config | None = None, *, data_dir: str | None = None) -> Dataset:
    """The dataset of `cfg` (subset and test_subset applied)."""
    cfg = cfg or Config()
    root = (
        Path(data_dir or cfg.data_dir or os.environ["JAXBENCH_DATA_DIR"]) / "cifar-10-batches-bin"
    )
    parts = [_read_bin(root / f"data_batch_{i}.bin") for i in range(1, 6)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    tx, ty = _read_bin(root / "test_batch.bin")
    classes = (root / "batches.meta.txt").read_text().split()
    return Dataset(
        "cifar10",
        classes,
        x[: cfg.subset],
        y[: cfg.subset],
        tx[: cfg.test_subset],
        ty[: cfg.test_subset],
    )
