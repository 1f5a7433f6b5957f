"""The whitening stem's kernel from training images on their device, equal to numpy's bit for bit.

Patch moments summed in float64 are integers below 2^53, exact in any order; the rest is
`jaxbench.whitening`'s, so both frameworks start from the very same kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from jaxbench.configs import Config
from jaxbench.whitening import PATCH, covariance_from_moments, whitening_for_config


def device_patch_moments(
    images: torch.Tensor, patch: int = PATCH, chunk: int = 1000
) -> tuple[np.ndarray, np.ndarray, int]:
    """`jaxbench.whitening.patch_moments` of uint8 NHWC `images`: summed on device, one fetch."""
    n, h, w, c = images.shape
    d = c * patch * patch
    sum_uu = torch.zeros((d, d), dtype=torch.float64, device=images.device)
    sum_u = torch.zeros(d, dtype=torch.float64, device=images.device)
    hh, ww = h - patch + 1, w - patch + 1
    for start in range(0, n, chunk):
        u = images[start : start + chunk].to(torch.float64)
        # (B, H', W', C, kh * kw): the window offsets last, hence the (c, kh, kw) order
        win = torch.stack(
            [u[:, i : i + hh, j : j + ww, :] for i in range(patch) for j in range(patch)], dim=-1
        )
        rows = win.reshape(-1, d)
        sum_uu += rows.T @ rows
        sum_u += rows.sum(0)
    fetched = torch.cat([sum_uu.reshape(-1), sum_u]).cpu().numpy().astype(np.int64)
    return fetched[: d * d].reshape(d, d), fetched[d * d :], n * hh * ww


def whitening_kernel(train_images: torch.Tensor, cfg: Config) -> np.ndarray:
    """The float32 OIHW whitening kernel from the first `cfg.whiten_images` uint8 NHWC images."""
    patch = {"patch2": 2, "patch3": 3}[cfg.whiten]
    images = train_images[: cfg.whiten_images]
    moments = device_patch_moments(images, patch)
    cov = covariance_from_moments(*moments, dataset=cfg.dataset, patch=patch)
    return whitening_for_config(cov, cfg.whiten, cfg.whiten_eps, channels=images.shape[3])
