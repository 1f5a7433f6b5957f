"""Data parallelism for torch_ref: one process per device, started by torchrun.

`torchrun --nproc-per-node N -m torch_ref.train ...` starts N processes and sets
WORLD_SIZE, RANK and LOCAL_RANK; `init` then joins them in a process group (gloo on
the CPU, nccl on CUDA, device `cuda:LOCAL_RANK`). Every process draws the same epoch
plan and trains on its contiguous share of each global batch (`local_share`); the
model is wrapped in `DistributedDataParallel` (`wrap`), the EMA copy is not. The
update equals one process's update of the whole global batch: `loss_scale` undoes
DDP's averaging, and BN's training statistics are all-reduced over the processes
(`torch_ref.layers.BatchNorm`, `bn_sync="global"`). Only process 0 writes outputs.
"""

from __future__ import annotations

import datetime
import inspect
import os
import warnings
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from jaxbench.configs import Config

# How long joining the group, and any one collective, may wait for the other processes
# before it fails with an error instead of hanging.
DEFAULT_TIMEOUT_S = 300


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when started without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Processes on this machine (torchrun's LOCAL_WORLD_SIZE), to share its CPU cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def world_size() -> int:
    """Processes in the running group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's index in the group (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init(timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun's variables describe; False (nothing done) for
    WORLD_SIZE <= 1 or a group that already exists.

    On CUDA each process takes `cuda:LOCAL_RANK`. `timeout_s` bounds the start and
    every collective, so a missing or dead peer is an error, never a hang.
    """
    if env_world_size() <= 1 or dist.is_initialized():
        return False
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be positive seconds, got {timeout_s}")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    # torch 2.13 deprecates this differentiable all-reduce in favour of a private module;
    # it is the public one, so keep using it without a warning per BN layer.
    warnings.filterwarnings(
        "ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated"
    )
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group, if any (on errors too, so no process lingers)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check(cfg: Config, world: int) -> None:
    """One-line ValueErrors for a config that `world` processes cannot train."""
    if cfg.devices not in (0, 1):
        raise ValueError(
            f"--devices {cfg.devices}: torch_ref trains on one device per process; for N "
            "devices launch N processes: torchrun --nproc-per-node N -m torch_ref.train ..."
        )
    if world <= 1:
        return
    batch, ghost = cfg.batch_size, cfg.ghost_bn
    if batch % world:
        raise ValueError(
            f"--batch-size {batch} does not split over {world} processes: use a multiple "
            f"of {world} or change --nproc-per-node"
        )
    share = batch // world
    if cfg.bn_sync == "global" and ghost and batch > ghost and ghost % world:
        raise ValueError(
            f"--ghost-bn {ghost} with --bn-sync global: every process must hold an equal part "
            f"of each ghost batch; use a --ghost-bn that is a multiple of {world}"
        )
    if cfg.bn_sync == "local" and ghost and share > ghost and share % ghost:
        raise ValueError(
            f"--bn-sync local: each process's {share} images do not split into ghost batches "
            f"of {ghost}; change --ghost-bn or --nproc-per-node"
        )
    if cfg.checkpoint_every:
        raise ValueError(
            "--checkpoint-every and --resume run in a single process; drop them or launch "
            "without torchrun"
        )


def local_share(
    bp: Mapping[str, torch.Tensor], rank: int, world: int
) -> Mapping[str, torch.Tensor]:
    """This process's contiguous part of a global batch's plan (views, no copy)."""
    if world == 1:
        return bp
    b = len(bp["indices"]) // world
    return {name: v[rank * b : (rank + 1) * b] for name, v in bp.items()}


def shard(n: int, rank: int, world: int) -> slice:
    """This process's contiguous part of `n` items (the test set), sizes differing by <= 1."""
    return slice(rank * n // world, (rank + 1) * n // world)


def loss_scale(reduction: str, world: int) -> float:
    """What each process multiplies its loss by before `backward`.

    DDP averages the processes' gradients, i.e. divides their sum by `world`. The
    sum over processes of the gradients of each one's part of the global loss is the
    global gradient (the all-reduces in BN send the cross-process terms back to the
    process whose weights they belong to), so each process backpropagates `world`
    times its part: "sum" -> world x the local sum; "mean" -> world x local sum /
    global batch = the local mean, i.e. the loss as computed.
    """
    return float(world) if reduction == "sum" else 1.0


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel (the weights of process 0 are broadcast once).

    Buffers are not broadcast per step: BN keeps them equal on every process.
    Rebuild the wrapper when a parameter's `requires_grad` changes.
    """
    ddp = nn.parallel.DistributedDataParallel
    # torch 2.13 renames `broadcast_buffers` (its per-forward sync) to `forward_sync_buffers`
    named = "forward_sync_buffers" in inspect.signature(ddp).parameters
    no_sync = {"forward_sync_buffers" if named else "broadcast_buffers": False}
    ids = [device.index] if device.type == "cuda" else None
    return ddp(model, device_ids=ids, **no_sync)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over the processes, differentiable (its gradient is summed too)."""
    import torch.distributed.nn.functional as dist_fn  # here: needs a distributed build

    return dist_fn.all_reduce(x)


@torch.no_grad()
def all_reduce_(*tensors: torch.Tensor, mean: bool = False) -> None:
    """Sum (or average) each tensor over the processes, in place, outside autograd."""
    for t in tensors:
        dist.all_reduce(t)
        if mean:
            t.div_(dist.get_world_size())
