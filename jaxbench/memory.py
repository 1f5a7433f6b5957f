"""What a JAX run needs in memory, checked before its states are built.

A run asking for more than the machine has would grow for minutes until the system stops it;
`check` refuses it in one line with a lower bound (state and forward activations).
"""

from __future__ import annotations

from typing import Any

import jax

from jaxbench import models
from jaxbench.configs import Config

CHECKED_BATCH = 1024  # a single run's batch above this is checked; the presets' are not
GIB = 2**30


def nbytes(tree: Any) -> int:
    """The bytes of every array (or shape) in `tree`."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def estimate(cfg: Config, state: Any, lanes: int, batch: int) -> tuple[int, int, int]:
    """(bytes at least, train state bytes per run, activation bytes per image) of `lanes`
    runs like `state` (one run's, built), training `batch` images each."""
    model = models.model_from_config(cfg)

    def forward(variables: Any, x: jax.Array) -> Any:
        _, kept = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                              capture_intermediates=True)  # fmt: skip
        return kept["intermediates"]

    variables = {"params": state.params, "batch_stats": state.batch_stats}
    image = jax.ShapeDtypeStruct((1, 32, 32, 3), models.compute_dtype(cfg))
    per_state, per_image = nbytes(state), nbytes(jax.eval_shape(forward, variables, image))
    return lanes * (per_state + batch * per_image), per_state, per_image


def free_bytes() -> int | None:
    """Memory free for a run: the first device's (an accelerator's allocator limit less
    what it holds), else the host's available memory; None when neither says."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            kib = next((line.split()[1] for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        return None
    return None if kib is None else int(kib) * 1024


def check(cfg: Config, state: Any, lanes: int, devices: int = 1) -> None:
    """Refuse (one-line ValueError, with the estimate) `lanes` runs like `state` whose
    states and activations cannot fit in the memory free here; a single run with a batch
    up to `CHECKED_BATCH` is not checked (tracing the model costs seconds on a CPU)."""
    batch = -(-cfg.batch_size // max(1, devices))  # each device's share
    if lanes == 1 and batch <= CHECKED_BATCH:
        return
    free = free_bytes()
    if free is None:
        return
    need, per_state, per_image = estimate(cfg, state, lanes, batch)
    if need <= free:
        return
    seeds = f"--vmap-seeds {lanes} with " if lanes > 1 else ""
    raise ValueError(
        f"{seeds}--batch-size {cfg.batch_size} needs at least {need / GIB:.1f} GiB ({lanes} x "
        f"({per_state / 2**20:.1f} MiB of weights, optimizer state and EMA + {batch} x "
        f"{per_image / 2**20:.2f} MiB of activations per image)), more than the "
        f"{free / GIB:.1f} GiB free here; lower --vmap-seeds or --batch-size"
    )
