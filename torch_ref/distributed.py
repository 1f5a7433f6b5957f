"""Data parallelism for torch_ref: one process per device, started by torchrun.

Every process draws the same epoch plan and trains on its contiguous share of each global batch
through `DistributedDataParallel` (not the EMA copy); `loss_scale` undoes DDP's averaging and BN
all-reduces its statistics (`bn_sync="global"`), so the update equals one process's on the whole
batch. `prepare` turns a single-process run into its share; only process 0 writes outputs.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from jaxbench.configs import Config, check_wait

RESUME_ALONE = "--resume runs in a single process; launch it without torchrun"

DEFAULT_TIMEOUT_S = 300  # how long joining, or one collective, waits before it fails


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when started without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    """Processes in the running group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's index in the group (0 when there is none)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init(timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes (False, nothing done, alone or if joined);
    `timeout_s` bounds the start and every collective: a dead peer is an error, not a hang."""
    if env_world_size() <= 1 or dist.is_initialized():
        return False
    check_wait(timeout_s)
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
    if cfg.tta_select:
        raise ValueError(
            "--tta-select picks images over the whole test set, which torchrun splits over "
            "processes: run it in one process (or --tta-select 0)"
        )
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


def bn_sync(cfg: Config) -> str | None:
    """How BN's training statistics span the processes: `cfg.bn_sync`, None alone."""
    return cfg.bn_sync if world_size() > 1 else None


def refuse_resume(resume: Any) -> None:
    """`--resume` runs in a single process: a ValueError in a process group."""
    if resume is not None and world_size() > 1:
        raise ValueError(RESUME_ALONE)


def loss_scale(reduction: str, world: int) -> float:
    """What each process multiplies its loss by before `backward`: DDP divides the summed
    gradients by `world`, so each backpropagates `world` x its part of the global loss ("sum":
    world x the local sum; "mean": world x local sum / global batch = the local mean)."""
    return float(world) if reduction == "sum" else 1.0


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel (process 0's weights broadcast once; BN keeps the
    buffers equal, so none per step). Rebuild it when a `requires_grad` changes."""
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


def cpu_threads() -> int:
    """The cores this process may use (affinity-aware), for `torch.set_num_threads`."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def share_cpu_threads() -> None:
    """Without CUDA: torch's threads are this process's share of the machine's cores. Alone,
    an OMP_NUM_THREADS the user set stands (torch sized its pool from it); under torchrun,
    which sets it to 1 for every process, the cores are split over the local processes."""
    if torch.cuda.is_available():
        return
    if "LOCAL_WORLD_SIZE" not in os.environ and os.environ.get("OMP_NUM_THREADS"):
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this machine
    torch.set_num_threads(max(1, cpu_threads() // local_world))


def eager_only(compile: bool | None, torch_setup: Any, world: int) -> bool | None:
    """The compile switch over `world` processes: unchanged alone; False with several (eager:
    BN's all-reduces and DDP's hooks are not compiled), where asking to compile is an error."""
    if world <= 1:
        return compile
    if compile or (torch_setup is not None and torch_setup.compiled):
        raise ValueError(
            "torch.compile is not used with several processes (DDP runs eagerly here); "
            "drop --compile / --compile-mode"
        )
    return False


class DataParallelForward:
    """`augmented_train_forward` on this process's share of each global batch through DDP, the
    loss scaled by `loss_scale`; rewrapped when the speedrun net freezes its whitening bias."""

    def __init__(
        self, forward: Callable[..., Any], model: nn.Module, device: torch.device, reduction: str
    ) -> None:
        self.forward, self.model, self.device = forward, model, device
        self.rank, self.world = rank(), world_size()
        self.scale = loss_scale(reduction, self.world)
        self.trained = self._trained()
        self.ddp = wrap(model, device)

    def _trained(self) -> tuple[bool, ...]:
        return tuple(p.requires_grad for p in self.model.parameters())

    def __call__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        plan: Any,
        *args: Any,
        **kw: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._trained() != self.trained:
            self.ddp, self.trained = wrap(self.model, self.device), self._trained()
        b = len(plan["indices"]) // self.world  # this process's contiguous part, as views
        share = {name: v[self.rank * b : (self.rank + 1) * b] for name, v in plan.items()}
        loss, per_example, correct = self.forward(self.ddp, images, labels, share, *args, **kw)
        return loss * self.scale, per_example, correct


def prepare(r: Any) -> None:
    """Make run `r` (a `torch_ref.run.Run`) this process's part of a data-parallel run:
    DDP forward, this process's contiguous part of the test set. Nothing alone."""
    world = world_size()
    if world <= 1:
        return
    r.forward = DataParallelForward(r.forward, r.model, r.device, r.cfg.loss_reduction)
    n, i = r.n_test, rank()
    part = slice(i * n // world, (i + 1) * n // world)  # parts differ by one image at most
    r.test_x, r.test_y = r.test_x[part], r.test_y[part]
    r.extras.update(devices=world, processes=world)  # data-parallel devices, one per process


@torch.no_grad()
def sum_over_processes(*tensors: torch.Tensor, mean: bool = False) -> None:
    """Sum (or average) each tensor over the processes, in place, outside autograd."""
    if world_size() <= 1:
        return
    for t in tensors:
        dist.all_reduce(t)
        if mean:
            t.div_(dist.get_world_size())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--dist-timeout` and the help on running under torchrun."""
    group = parser.add_argument_group(
        "several processes",
        "Data-parallel training, one device per process: torchrun --nproc-per-node N -m "
        "torch_ref.train ... (gloo on the CPU, nccl on GPUs, cuda:LOCAL_RANK each). "
        "--batch-size is the global batch, split into contiguous shares; --bn-sync global "
        "gives one process's numbers, local a different recipe; eager only (no --compile), "
        "no --resume or --checkpoint-every; process 0 writes the outputs.",
    )
    group.add_argument(
        "--dist-timeout",
        type=int,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds a process waits for the others (to start, or in any one collective) "
        "before it fails with an error instead of hanging",
    )


def join(args: argparse.Namespace, torch_setup: Any) -> None:
    """Under torchrun: refuse what several processes do not run (ValueError), join the
    group, and silence every process but 0 (no run folder, table or profile)."""
    check_wait(args.dist_timeout)  # a bad value is refused alone too
    if env_world_size() <= 1:
        return
    if args.resume is not None:
        raise ValueError(RESUME_ALONE)
    eager_only(args.compile, torch_setup, env_world_size())
    try:
        init(args.dist_timeout)
    except RuntimeError as e:  # torch's own, often many lines: keep the first
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise ValueError(f"cannot join the other processes: {lines[0]}") from None
    if rank() != 0:
        if hasattr(args, "out"):
            args.out = None
        args.quiet, args.no_progress, args.profile = True, True, None
