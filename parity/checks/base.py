"""What every check shares: result records, the context, and small array helpers."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
import torch

from jaxbench.configs import Config
from jaxbench.data import Dataset
from jaxbench.stream import normalize_numpy
from parity.harness import Harness

PyTree = Any
QUICK_WIDTHS = (8, 16, 32, 64)
# speedrun: three widths; wider than 24 (the whitening conv's output) so that block1.conv1
# and block2.conv1 keep some uniform filters beside their identity (dirac) ones.
QUICK_WIDTHS_SPEEDRUN = (32, 48, 48)
ARITH_GHOST = 4  # ghost-BN group size in the arithmetic checks (batches of 16-32)


def quick_widths(cfg: Config) -> tuple[int, ...]:
    """The narrow widths quick mode uses for this config's model."""
    return QUICK_WIDTHS_SPEEDRUN if cfg.model == "speedrun" else QUICK_WIDTHS


def dirac_filters(cfg: Config, layer: str, hwio: tuple[int, ...]) -> int:
    """How many leading filters of `layer` (an HWIO kernel's shape) the model initialises as
    identity (dirac): the speedrun net's 3x3 convs (`blockN.convK`) get min(C_in, C_out)."""
    parts = layer.split(".")
    if cfg.model != "speedrun" or len(parts) != 2 or not parts[0].startswith("block"):
        return 0
    return min(hwio[2], hwio[3]) if parts[1].startswith("conv") else 0


@dataclass(frozen=True)
class Figure:
    """One measured number and its bar: passes when `value <= tolerance` (or `>=` for op '>=')."""

    name: str
    value: float
    tolerance: float
    op: str = "<="
    headline: bool = True  # may be shown as the check's figure in the summary table

    @property
    def passed(self) -> bool:
        if not math.isfinite(self.value):
            return False
        return self.value <= self.tolerance if self.op == "<=" else self.value >= self.tolerance

    @property
    def severity(self) -> float:
        """value / tolerance (or its inverse for '>='): above 1 means failed."""
        if self.op == "<=":
            if self.tolerance == 0:
                return 0.0 if self.value == 0 else math.inf
            return abs(self.value) / self.tolerance
        return self.tolerance / self.value if self.value > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        fields = ("name", "value", "tolerance", "op")
        return {**{k: getattr(self, k) for k in fields}, "passed": self.passed}


@dataclass
class CheckResult:
    """What one check found: its figures, free-form details, time taken, and any crash."""

    number: int
    name: str
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.figures) and all(f.passed for f in self.figures)

    @property
    def headline(self) -> Figure | None:
        """The figure the summary shows: the worst failure, else the closest headline figure."""
        if not self.figures:
            return None
        pool = self.failed_figures or [f for f in self.figures if f.headline] or self.figures
        return max(pool, key=lambda f: f.severity)

    @property
    def failed_figures(self) -> list[Figure]:
        return [f for f in self.figures if not f.passed]

    def as_dict(self) -> dict[str, Any]:
        h = self.headline
        return {
            "number": self.number,
            "name": self.name,
            "passed": self.passed,
            "measured": None if h is None else h.value,
            "tolerance": None if h is None else h.tolerance,
            "headline": None if h is None else h.name,
            "figures": [f.as_dict() for f in self.figures],
            "details": self.details,
            "seconds": self.seconds,
            "error": self.error,
        }


@dataclass
class Context:
    """Everything the checks share: the config, the harness, the data, and the run's options."""

    cfg: Config
    harness: Harness
    quick: bool = True
    images: np.ndarray | None = None  # uint8 NHWC sample for checks 2-5 (real or synthetic)
    labels: np.ndarray | None = None
    data: Any = None  # jaxbench.data.Dataset for checks 6-7 (None: synthetic for 6, 7 fails)
    seeds: int = 3  # per framework, check 7
    epochs: int | None = None  # check 7 overrides
    subset: int | None = None
    log: Callable[[str], None] = print
    curves: dict[str, Any] = field(default_factory=dict)  # check 7 fills it for the plot

    @property
    def arith_cfg(self) -> Config:
        """The config for arithmetic checks: narrow in quick mode, float32, and ghost BN (if on)
        over `ARITH_GHOST` images, so the checks' batches hold several groups."""
        cfg = self.cfg.replace(precision="float32")
        if cfg.ghost_bn:
            cfg = cfg.replace(ghost_bn=ARITH_GHOST)
        return cfg.replace(widths=quick_widths(cfg)) if self.quick else cfg


def path_keys(path: Any) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def leaves(tree: PyTree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(path_keys(path)): np.asarray(v) for path, v in flat}


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    x = t.detach().cpu().numpy()
    return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def sample_batch(ctx: Context, n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n normalised float32 NHWC images and their labels from the context's sample."""
    assert ctx.images is not None and ctx.labels is not None
    x = ctx.images[offset : offset + n]
    if len(x) < n:
        raise ValueError(f"the image sample has {len(ctx.images)} images; need {offset + n}")
    return normalize_numpy(x, ctx.cfg.dataset), np.asarray(ctx.labels[offset : offset + n])


def subset_data(ds: Any, n_train: int, n_test: int) -> Any:
    """The first n images of each split, as the trainers' `data=` argument."""
    return dataclasses.replace(
        ds,
        train_images=ds.train_images[:n_train],
        train_labels=ds.train_labels[:n_train],
        test_images=ds.test_images[:n_test],
        test_labels=ds.test_labels[:n_test],
    )


def synthetic_dataset(n_train: int, n_test: int, seed: int = 0) -> Any:
    """Random uint8 images and labels in the `Dataset` shape, for runs without CIFAR."""
    rng = np.random.default_rng(seed)
    xtr = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    ytr = rng.integers(0, 10, n_train).astype(np.int32)
    xte = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    yte = rng.integers(0, 10, n_test).astype(np.int32)
    return Dataset("cifar10", [str(i) for i in range(10)], xtr, ytr, xte, yte, "synthetic")
