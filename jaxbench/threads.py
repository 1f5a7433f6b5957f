"""Limit XLA:CPU and PyTorch to N CPU threads (e.g. `python -m parity --threads N`).

Imports neither framework. Verified on jax 0.10.2: `PJRT_NPROC=N` sizes XLA:CPU's intra-op
pool (N `tf_XLAEigen` threads), read when the CPU backend is created, so it works after
`import jax` but not after the first computation. `--xla_cpu_multi_thread_eigen=false`
changes nothing, and `intra_op_parallelism_threads` is no XLA flag (XLA aborts on it).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import MutableMapping
from typing import Any

# what XLA:CPU (PJRT_NPROC, else NPROC), OpenMP and the BLAS libraries size their pools from
THREAD_ENV_VARS: tuple[str, ...] = (
    "PJRT_NPROC",
    "NPROC",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)
MAX_THREADS = 1024  # --threads: more than any machine here has cores


def _jax_started() -> bool:
    """Whether JAX has created its backends, after which XLA ignores PJRT_NPROC."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # private API: when it moves, assume the caller got the order right
        return False


def xla_thread_env(n: int, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set `environ` (default `os.environ`) so XLA:CPU and OpenMP use `n` threads, before JAX's
    first computation (RuntimeError after it); returns the variables set."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"--threads must be at least 1; got {n!r}")
    if n > MAX_THREADS:
        raise ValueError(f"--threads must be in [1, {MAX_THREADS}]; got {n}")
    if environ is None:
        if _jax_started():
            raise RuntimeError("--threads must be applied before JAX starts its CPU backend")
        environ = os.environ
    flags = {"PJRT_NPROC": str(n), "OMP_NUM_THREADS": str(n)}
    environ.update(flags)
    return flags


def _torch_counts() -> dict[str, int]:
    import torch

    return {
        "torch_intra_op": torch.get_num_threads(),
        "torch_interop": torch.get_num_interop_threads(),
    }


def limit_threads(n: int) -> dict[str, Any]:
    """XLA:CPU and PyTorch on `n` threads for the rest of the process (call before JAX's
    first computation; PyTorch's inter-op pool is sized only before its first inter-op
    work); what was set, for the run's record."""
    env = xla_thread_env(n)
    import torch

    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        with contextlib.suppress(RuntimeError):  # "cannot set ... after parallel work started"
            torch.set_num_interop_threads(n)
    return {"threads": n, "env": env, **_torch_counts()}


def xla_cpu_threads(environ: MutableMapping[str, str] | None = None) -> int:
    """The size XLA:CPU gives its intra-op pool, worked out as XLA does: PJRT_NPROC, else
    NPROC, else the cores this process may run on."""
    environ = os.environ if environ is None else environ
    for key in ("PJRT_NPROC", "NPROC"):
        with contextlib.suppress(ValueError):  # unset or not a number: the next source
            return max(0, int(environ.get(key, "")))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_settings() -> dict[str, Any]:
    """The thread limits in force now: XLA:CPU's pool size, the variables XLA/OpenMP read,
    and PyTorch's counts (when PyTorch is loaded), for recording beside results."""
    return {
        "xla_cpu_threads": xla_cpu_threads(),
        "env": {k: os.environ[k] for k in THREAD_ENV_VARS if k in os.environ},
        **(_torch_counts() if "torch" in sys.modules else {}),
    }
