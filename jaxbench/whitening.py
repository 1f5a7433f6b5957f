"""Data-dependent weights of the frozen patch-whitening convs, numpy only.

Two stems use them (`Config.whiten`). With C the uncentred covariance of all
k x k patches of the first N (normalised) training images and
C = V diag(lambda) V^T, the filters are the columns of W = V / sqrt(lambda + eps):
- `patch2` (airbench94, the `speedrun` net): k = 2, N = 5,000, eps 5e-4, and the
  filters W and -W (so GELU sees both signs), 24 filters of 2x2x3;
- `patch3` (Page's ResNet-9): k = 3, N = 10,000, eps 1e-2, W alone, 27 filters
  of 3x3x3 (Page divides C by n - 1 rather than n: a 1e-7 relative change).

Everything here is numpy (exact integer patch moments of the raw uint8 pixels,
then float64), so JAX and PyTorch load the *same* float32 kernel: no framework
or device rounding reaches the eigendecomposition, which is sensitive to the
smallest eigenvalues. A trainer may compute the integer moments on its device
(they are exact there too) and finish with `covariance_from_moments`. Patch
features are ordered (c, kh, kw), so an eigenvector reshapes directly into one
OIHW filter. Eigenvalues are sorted largest first and each eigenvector's sign is
fixed (its largest-magnitude entry is positive), so the kernel does not depend
on the LAPACK build.
"""

from __future__ import annotations

import numpy as np

from jaxbench.stream import MEAN_STD

WHITEN_EPS = 5e-4
WHITEN_IMAGES = 5000
PATCH = 2


def patch_moments(
    images_uint8_NHWC: np.ndarray, patch: int = PATCH, chunk: int = 500
) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact integer moments of every `patch` x `patch` patch of raw uint8 images.

    Returns (sum of u u^T as int64 (d, d), sum of u as int64 (d,), number of
    patches), features ordered (c, kh, kw). Integer sums are exact, so a device
    that computes the same sums (e.g. per-image int32 partial sums) reproduces
    them bit for bit and hence the very same kernel. Works in chunks of images.
    """
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
    sum_uu: np.ndarray,
    sum_u: np.ndarray,
    count: int,
    dataset: str = "cifar10",
    patch: int = PATCH,
) -> np.ndarray:
    """Uncentred covariance E[x x^T] of *normalised* patches x = a * u + b, in float64.

    Normalisation is affine per channel (a = 1 / (255 std), b = -mean / std), so
    E[x x^T] = A E[u u^T] A + (A E[u]) b^T + b (A E[u])^T + b b^T with A = diag(a).
    """
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
    the first `n_images`.

    Takes the raw uint8 training images (the order the trainers see them in,
    before any shuffling) and normalises them itself, in float64.
    """
    images = np.asarray(train_images_uint8_NHWC)
    if images.dtype != np.uint8:
        raise ValueError(f"whitening expects uint8 NHWC images, got {images.dtype}")
    cov = covariance_from_moments(*patch_moments(images[:n_images], patch), dataset, patch)
    return whitening_from_covariance(cov, images.shape[3], patch, eps, negate)


def kernel_OIHW_to_HWIO(kernel_OIHW: np.ndarray) -> np.ndarray:
    """PyTorch's conv layout (out, in, h, w) to Flax's (h, w, in, out)."""
    return np.ascontiguousarray(np.asarray(kernel_OIHW).transpose(2, 3, 1, 0))


def whitening_kernel_HWIO(
    train_images_uint8_NHWC: np.ndarray,
    *,
    dataset: str = "cifar10",
    n_images: int = WHITEN_IMAGES,
    patch: int = PATCH,
    eps: float = WHITEN_EPS,
    negate: bool = True,
) -> np.ndarray:
    """`whitening_kernel_OIHW` in Flax's HWIO layout (the same numbers)."""
    kernel_OIHW = whitening_kernel_OIHW(
        train_images_uint8_NHWC,
        dataset=dataset,
        n_images=n_images,
        patch=patch,
        eps=eps,
        negate=negate,
    )
    return kernel_OIHW_to_HWIO(kernel_OIHW)


def whitening_for_config(cov: np.ndarray, whiten: str, eps: float, channels: int = 3) -> np.ndarray:
    """The OIHW kernel of a config's stem (`patch2`: +-W of 2x2; `patch3`: W of 3x3)."""
    if whiten == "patch2":
        return whitening_from_covariance(cov, channels, 2, eps, negate=True)
    if whiten == "patch3":
        return whitening_from_covariance(cov, channels, 3, eps, negate=False)
    raise ValueError(f"no whitening kernel for --whiten {whiten!r}")
