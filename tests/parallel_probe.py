"""Runs the JAX trainer's own setup and epochs on 1 and N devices for `test_parallel.py`.

A separate process, because the device count (`--xla_force_host_platform_device_count`)
is fixed when JAX starts. Prints one JSON object: for each set of fields (the shared
fields, then each group after a `+`: one process serves every group) and each variant,
the per-step losses and the final params and BN statistics, flattened. The variants `permuted`
are one device with every batch's images shuffled (ghost groups kept): the same
mathematics in another float order, which measures the rounding noise the
multi-device runs are judged against.

    python tests/parallel_probe.py DEVICES [field=value ...] [+ field=value ...] ...
    python tests/parallel_probe.py member HOST:PORT PROCESSES ID [field=value ...]
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__" and sys.argv[1] != "member":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={sys.argv[1]}"
    )

import contextlib
import dataclasses
from typing import Any

import jax
import numpy as np

from jaxbench import configs, parallel, train
from jaxbench.data import Dataset
from jaxbench.programs import CompileCache

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
# The shuffled reruns run the one-device program again: compiled once per process.
PROGRAMS = CompileCache()


def synthetic_data(n_train: int = 512, n_test: int = 200, seed: int = 0) -> Dataset:
    """Images whose class shows in their colour balance, so the net has something to learn."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = rng.integers(0, 10, n).astype(np.int32)
    base = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.float32)
    tint = np.stack([labels * 25.0, (9 - labels) * 25.0, np.full(n, 128.0)], -1)
    x = np.clip(0.6 * base + 0.4 * tint[:, None, None, :], 0, 255).astype(np.uint8)
    return Dataset(
        "cifar10",
        [str(i) for i in range(10)],
        x[:n_train],
        labels[:n_train],
        x[n_train:],
        labels[n_train:],
        "synthetic",
    )


def probe_config(**changes: Any) -> configs.Config:
    """A small ResNet-9 that still has every layer kind: a few seconds per variant."""
    cfg = configs.get_config("tiny").replace(
        widths=(8, 16, 32, 64),
        batch_size=64,
        eval_batch_size=100,
        epochs=2,
        loop="step",
        subset=256,
        test_subset=200,
    )
    return cfg.replace(**changes)


def group_preserving_permutation(batch: int, ghost: int, seed: int) -> np.ndarray:
    """A random permutation of a batch's slots that keeps each slot's ghost group
    (i mod splits): whole rows of `splits` slots move, so every column stays."""
    splits = batch // ghost if ghost and batch > ghost else 1
    blocks = np.arange(batch).reshape(batch // splits, splits)
    return blocks[np.random.default_rng(seed).permutation(len(blocks))].reshape(-1)


def run(cfg: configs.Config, data: Dataset, *, permute: int | None = None) -> dict[str, Any]:
    """Every epoch of `cfg` through the trainer's own `setup`, `_start` and `train_epoch`."""
    r = train.setup(cfg, data, compile_cache=PROGRAMS)
    if permute is not None:
        order = group_preserving_permutation(cfg.batch_size, cfg.ghost_bn, permute)
        base = r.make_plan

        def permuted(epoch: int) -> Any:
            plan = jax.device_get(base(epoch))
            n = len(plan["indices"])
            idx = (np.arange(n).reshape(-1, cfg.batch_size)[:, order]).reshape(-1)
            return jax.device_put({k: np.asarray(v)[idx] for k, v in plan.items()})

        r = dataclasses.replace(r, make_plan=permuted)
    r.start(contextlib.nullcontext)  # the whitening kernel, as a run starts
    state = r.state
    losses: list[float] = []
    for epoch in range(cfg.epochs):
        state, host = train.train_epoch(r, state, epoch)
        losses.extend(float(x) for x in host["loss"])
    variables = jax.device_get(state.variables())
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    hlo = r.programs.run.as_text()
    return {
        "collectives": {
            op: hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in COLLECTIVES
        },
        "losses": losses,
        "leaves": {jax.tree_util.keystr(k): np.ravel(v).tolist() for k, v in leaves},
        "devices": r.topology.devices,
    }


def _changes(args: list[str]) -> dict[str, Any]:
    return {k: configs.parse_field(k, v) for k, v in (a.split("=", 1) for a in args)}


def member(coordinator: str, processes: int, pid: int, args: list[str]) -> None:
    """One process of a multi-process run (one device each); process 0 prints the result."""
    parallel.initialize(parallel.ProcessArgs(coordinator, processes, pid, timeout_s=60))
    result = run(probe_config(**_changes(args)).replace(devices=1), synthetic_data())
    if jax.process_index() == 0:
        print(json.dumps({"processes": result}))


def main(argv: list[str]) -> None:
    if argv[0] == "member":
        member(argv[1], int(argv[2]), int(argv[3]), argv[4:])
        return
    devices = int(argv[0])
    shared, *groups = " ".join(argv[1:]).split("+")
    data = synthetic_data()
    out = {}
    for group in groups or [""]:
        cfg = probe_config(**_changes(shared.split() + group.split()))
        out[group.strip()] = {
            "one": run(cfg.replace(devices=1), data),
            "permuted": [run(cfg.replace(devices=1), data, permute=seed) for seed in (1, 2)],
            "many": run(cfg.replace(devices=devices, bn_sync="global"), data),
            "local": run(cfg.replace(devices=devices, bn_sync="local"), data),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
