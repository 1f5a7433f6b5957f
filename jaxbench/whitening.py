"""Data-dependent weights of the frozen patch-whitening convs, numpy only.

With C = V diag(lambda) V^T the uncentred covariance of the k x k patches of the first N
normalised training images, the filters are W = V / sqrt(lambda + eps): `patch2`
(airbench94) k = 2, N = 5,000, eps 5e-4, W and -W; `patch3` (Page) k = 3, N = 10,000,
eps 1e-2, W alone. Exact integer moments, then float64 numpy, so both frameworks load the
same float32 kernel; sorted eigenvalues and fixed signs keep it from any LAPACK build.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxbench.stream import MEAN_STD

WHITEN_EPS = 5e-4
WHITEN_IMAGES = 5000
PATCH = 2


def patch_moments(
    images_uint8_NHWC: np.ndarray, patch: int = PATCH, chunk: int = 500
) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum of u u^T, sum of u, number of patches), int64, over every patch of raw uint8
    images, features (c, kh, kw): exact, so a device's integer sums give the same kernel."""
    u = np.asarray(images_uint8_NHWC)
    if u.dtype != np.uint8 or u.ndim != 4 or u.shape[1] < patch or u.shape[2] < patch:
        raise ValueError(
            f"expected uint8 NHWC images of at least {patch}x{patch}, got {u.dtype} {u.shape}"
        )
    d = u.shape[3] * patch * patch
    sum_uu = np.zeros((d, d), np.int64)
    sum_u = np.zeros(d, np.int64)
    count = 0
    for start in range(0, len(u), chunk):
        # (B, H', W', C, kh, kw): the window axes come last, hence (c, kh, kw) order.
        win = np.lib.stride_tricks.sliding_window_view(
            u[start : start + chunk], (patch, patch), (1, 2)
        )
        # float64 BLAS on integers below 2^53 is exact (and much faster than int64 matmul).
        rows = win.reshape(-1, d).astype(np.float64)
        sum_uu += (rows.T @ rows).astype(np.int64)
        sum_u += rows.sum(axis=0).astype(np.int64)
        count += len(rows)
    return sum_uu, sum_u, count


def covariance_from_moments(
    sum_uu: np.ndarray, sum_u: np.ndarray, count: int, dataset: str = "cifar10", patch: int = PATCH
) -> np.ndarray:
    """Uncentred float64 covariance of the normalised patches x = a * u + b (a = 1 / (255 std),
    b = -mean / std): A E[u u^T] A + (A E[u]) b^T + b (A E[u])^T + b b^T, A = diag(a)."""
    mean, std = (np.asarray(v, np.float64) for v in MEAN_STD[dataset])
    a = np.repeat(1.0 / (255.0 * std), patch * patch)  # (c, kh, kw) order
    b = np.repeat(-mean / std, patch * patch)
    second = np.asarray(sum_uu, np.float64) / count
    first = a * (np.asarray(sum_u, np.float64) / count)
    return (
        a[:, None] * second * a[None, :] + np.outer(first, b) + np.outer(b, first) + np.outer(b, b)
    )


def eigh_descending(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues, eigenvectors as columns), largest first, with a fixed sign per vector."""
    lam, vecs = np.linalg.eigh(np.asarray(cov, np.float64))
    lam, vecs = lam[::-1], vecs[:, ::-1]
    pivot = np.abs(vecs).argmax(axis=0)
    signs = np.sign(vecs[pivot, np.arange(vecs.shape[1])])
    return lam.copy(), vecs * signs


def whitening_from_covariance(
    cov: np.ndarray,
    channels: int = 3,
    patch: int = PATCH,
    eps: float = WHITEN_EPS,
    negate: bool = True,
) -> np.ndarray:
    """The float32 OIHW kernel W = V / sqrt(lambda + eps), or concat(W, -W) with `negate`."""
    lam, vecs = eigh_descending(cov)
    filters = (vecs / np.sqrt(lam + eps)).T.reshape(-1, channels, patch, patch)
    if negate:
        filters = np.concatenate([filters, -filters])
    return filters.astype(np.float32)


def moments_from_groups(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(sum of u u^T, sum of u, number of patches) in int64 from per-group device sums
    (`jaxbench.layers.patch_moment_groups`, `torch_ref.whitening.device_patch_moments`)."""
    total = np.asarray(groups, np.int64).sum(axis=0)
    d = total.shape[0] - 1
    return total[:d, :d], total[:d, d], int(total[d, d])


def whitening_kernel_OIHW(
    train_images_uint8_NHWC: np.ndarray,
    *,
    dataset: str = "cifar10",
    n_images: int = WHITEN_IMAGES,
    patch: int = PATCH,
    eps: float = WHITEN_EPS,
    negate: bool = True,
) -> np.ndarray:
    """Whitening kernel ((2 if negate else 1) * 3 * patch^2, 3, patch, patch), float32, from
    the first `n_images` raw uint8 training images (normalised here, in float64)."""
    images = np.asarray(train_images_uint8_NHWC)
    if images.dtype != np.uint8:
        raise ValueError(f"whitening expects uint8 NHWC images, got {images.dtype}")
    cov = covariance_from_moments(*patch_moments(images[:n_images], patch), dataset, patch)
    return whitening_from_covariance(cov, images.shape[3], patch, eps, negate)


def kernel_OIHW_to_HWIO(kernel_OIHW: np.ndarray) -> np.ndarray:
    """PyTorch's conv layout (out, in, h, w) to Flax's (h, w, in, out)."""
    return np.ascontiguousarray(np.asarray(kernel_OIHW).transpose(2, 3, 1, 0))


def whitening_kernel_HWIO(train_images_uint8_NHWC: np.ndarray, **kwargs: Any) -> np.ndarray:
    """`whitening_kernel_OIHW` (same keywords) in Flax's HWIO layout (the same numbers)."""
    return kernel_OIHW_to_HWIO(whitening_kernel_OIHW(train_images_uint8_NHWC, **kwargs))


def whitening_for_config(cov: np.ndarray, whiten: str, eps: float, channels: int = 3) -> np.ndarray:
    """The OIHW kernel of a config's stem (`patch2`: +-W of 2x2; `patch3`: W of 3x3)."""
    if whiten == "patch2":
        return whitening_from_covariance(cov, channels, 2, eps, negate=True)
    if whiten == "patch3":
        return whitening_from_covariance(cov, channels, 3, eps, negate=False)
    raise ValueError(f"no whitening kernel for --whiten {whiten!r}")
