"""Train and evaluate the ResNet-9 recipe in PyTorch: `python -m torch_ref.train`.

The same recipe, config presets, flags, table and files as `python -m
jaxbench.train` (docs/design.md), set up the way one would race PyTorch: data
resident on the device as uint8, augmentation as batched tensor ops on the
device, channels-last, bf16 autocast on GPU, `torch.compile` (max-autotune on
CUDA), fused SGD, cuDNN benchmark mode, no host syncs inside an epoch (metrics
accumulate in device tensors and are fetched once per epoch), and compilation/
warm-up kept off the clock, once per process and configuration. `TorchSetup`
(torch_ref.torch_setup) holds those choices; every summary records them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxbench import checkpoint, cli, configs, report, schedule
from jaxbench.checkpoint import Ledger
from jaxbench.configs import Config, optimizer_scales
from jaxbench.profiling import format_top_ops
from jaxbench.progress import progress_bar
from jaxbench.stream import MEAN_STD, epoch_plan, steps_per_epoch
from jaxbench.whitening import PATCH, covariance_from_moments, whitening_for_config
from torch_ref import distributed, layers
from torch_ref import torch_setup as tsetup
from torch_ref.augment import (
    apply_plan,
    draw_base_flips,
    draw_plan,
    fill_tensor,
    plan_to_device,
    slice_plan,
    tta_logits,
)
from torch_ref.model import model_from_config
from torch_ref.profiling import TorchProfile
from torch_ref.torch_setup import TorchSetup

STREAMS: tuple[str, ...] = ("fast", "shared")
_STREAM_SEED_TAG = 0x5EED  # keeps the fast stream's generator apart from the init seed


# --- pieces the tests and the parity suite use directly ------------------------------------------


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """The requested device, else the first GPU, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def use_bfloat16(cfg: Config, device: torch.device) -> bool:
    """`precision=auto` means bf16 autocast on GPU and float32 on the CPU."""
    if cfg.precision == "auto":
        return device.type == "cuda"
    return cfg.precision == "bfloat16"


def make_optimizer(model: nn.Module, cfg: Config, sgd_impl: str | None = None) -> torch.optim.SGD:
    """SGD with Nesterov momentum and coupled decay; BN biases in their own group.

    Each group carries `lr_mult`; the trainer sets `lr = lr_at(t) * lr_mult` before
    update t. LR and decay are in optimizer units (`configs.optimizer_scales`).
    `sgd_impl`: "fused", "foreach" or "for-loop" (None: torch's own choice).
    """
    lr, wd = optimizer_scales(cfg)
    bn_biases = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_ids = {id(p) for p in bn_biases}
    others = [p for p in model.parameters() if id(p) not in bn_ids]
    groups = [
        {"params": others, "lr": lr, "lr_mult": 1.0, "weight_decay": wd},
        {
            "params": bn_biases,
            "lr": lr * cfg.bn_bias_lr_mult,
            "lr_mult": cfg.bn_bias_lr_mult,
            "weight_decay": wd * cfg.bn_bias_wd_mult,
        },
    ]
    return torch.optim.SGD(
        groups,
        lr=lr,
        momentum=cfg.momentum,
        dampening=0.0,
        nesterov=cfg.nesterov,
        **TorchSetup(sgd_impl=sgd_impl).sgd_kwargs(),
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The LR of the coming update in every group (a host float: no device sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def ema_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What the EMA averages, in a fixed order: parameters, then float buffers (BN stats).

    `num_batches_tracked` (an integer counter, unused with a set momentum) is left out.
    """
    params = list(model.parameters())
    buffers = [
        b
        for name, b in model.named_buffers()
        if b.is_floating_point() and not name.endswith("fixed_scale")  # a constant, not state
    ]
    return params + buffers


@torch.no_grad()
def ema_update(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], m: float) -> None:
    """`ema = m * ema + (1 - m) * w`, literally (two products, one sum), all tensors at once.

    `m` and `1 - m` are formed in float32 (as `jaxbench.optim.ema_update` does), so
    the two frameworks multiply by the very same coefficients.
    """
    m32 = np.float32(m)
    scaled = torch._foreach_mul(list(current), float(np.float32(1.0) - m32))
    torch._foreach_mul_(list(ema), float(m32))
    torch._foreach_add_(list(ema), scaled)


@torch.no_grad()
def lookahead_reset(live: Sequence[torch.Tensor], ema: Sequence[torch.Tensor]) -> None:
    """airbench's lookahead: after an EMA update the net (params and BN stats) becomes the EMA."""
    for w, e in zip(live, ema, strict=True):
        w.copy_(e)


def set_whiten_bias_trainable(model: nn.Module, trainable: bool) -> None:
    """Train or freeze the speedrun net's whitening bias (frozen: SGD skips it entirely)."""
    whiten = getattr(model, "whiten", None)
    if whiten is not None and whiten.bias is not None:
        whiten.bias.requires_grad_(trainable)


def normalize(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, *, channels_last: bool = True
) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, `(x / 255 - mean) / std`; the permute makes it channels-last
    (`channels_last=False`: made contiguous NCHW)."""
    x = ((images.float() / 255.0 - mean) / std).permute(0, 3, 1, 2)
    return x if channels_last else x.contiguous()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_forward(
    net: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    *,
    bf16: bool,
    label_smoothing: float,
    reduction: str,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, mean per-example loss, correct count) for one uint8 batch.

    A module-level function taking the net as an argument, so one `torch.compile`
    serves every run in the process (closures over a fresh model would recompile
    per run and hit dynamo's recompile limit in the benchmark's seed loop).
    """
    with torch.autocast(x_u8.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(normalize(x_u8, mean, std, channels_last=channels_last))
    logits = logits.float()
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction=reduction)
    per_example = loss.detach() / y.shape[0] if reduction == "sum" else loss.detach()
    correct = (logits.detach().argmax(1) == y).sum()
    return loss, per_example, correct


def augmented_train_forward(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: Mapping[str, torch.Tensor],
    fill: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: Config,
    **loss_kw: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`train_forward` of the batch that `plan` cuts from the resident set: with
    `compile_augment` the gather, cutout and normalisation fuse into the forward's graph."""
    x = apply_plan(images, plan, cfg, fill=fill)
    return train_forward(net, x, labels[plan["indices"]], mean, std, **loss_kw)


def eval_logits(
    net: nn.Module,
    x_u8: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: Config,
    *,
    bf16: bool,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-view logits [V, N, C], TTA logits [N, C]) of a uint8 NHWC batch, BN as `net` is.

    What evaluation scores: normalisation, the forward, and `augment.tta_logits`'s
    views of `cfg`. The parity suite calls it.
    """
    x = normalize(x_u8, mean, std, channels_last=channels_last)
    with torch.autocast(x_u8.device.type, dtype=torch.bfloat16, enabled=bf16):
        return tta_logits(net, x, cfg)


def eval_forward(
    net: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: Config,
    *,
    bf16: bool,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy without smoothing, correct count) of the TTA logits."""
    _, logits = eval_logits(net, x_u8, mean, std, cfg, bf16=bf16, channels_last=channels_last)
    loss = F.cross_entropy(logits, y, reduction="sum")
    return loss, (logits.argmax(1) == y).sum()


def _compiled(fn: Callable[..., Any], setup: TorchSetup | None = None) -> Callable[..., Any]:
    """One compiled version per function, compile mode and backend per process; static shapes.

    `setup` None: the default compiled mode of the first GPU (or the CPU).
    """
    if setup is None:
        setup = TorchSetup().resolve(resolve_device(None), compile=True)
    return _compile(fn, setup.compile_mode, setup.compile_backend)


@functools.cache
def _compile(fn: Callable[..., Any], mode: str | None, backend: str) -> Callable[..., Any]:
    kw = TorchSetup(compile_mode=mode, compile_backend=backend).compile_kwargs()
    return torch.compile(fn, **kw)


def evaluate(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
    *,
    bf16: bool = False,
    compile: bool = False,
    fwd: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, number correct) as device tensors (no sync); BN in eval mode, flip TTA per cfg.

    The count, not a float32 ratio, so the host divides exactly (accuracy = correct / n).
    `fwd`: the (compiled) `eval_forward` to call; else per `compile`.
    """
    loss_sum, correct = evaluate_sums(
        net, images, labels, cfg, bf16=bf16, compile=compile, fwd=fwd, channels_last=channels_last
    )
    return loss_sum / len(images), correct


@torch.no_grad()
def evaluate_sums(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
    *,
    bf16: bool = False,
    compile: bool = False,
    fwd: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    channels_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`evaluate`'s (summed loss, number correct), which add up over parts of a test set."""
    if fwd is None:
        fwd = _compiled(eval_forward) if compile else eval_forward
    mean, std = device_stats(cfg.dataset, images.device)
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for i in range(0, len(images), cfg.eval_batch_size):
        sl = slice(i, i + cfg.eval_batch_size)
        loss, c = fwd(
            net, images[sl], labels[sl], mean, std, cfg, bf16=bf16, channels_last=channels_last
        )
        loss_sum += loss
        correct += c
    net.train(was_training)
    return loss_sum, correct


def _stats_tensors(dataset: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = MEAN_STD[dataset]
    return (
        torch.tensor(mean, dtype=torch.float32, device=device),
        torch.tensor(std, dtype=torch.float32, device=device),
    )


@functools.cache
def device_stats(dataset: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation mean and std on `device`, made once per process (no per-call copy)."""
    return _stats_tensors(dataset, device)


def check_supported(cfg: Config) -> None:
    """Refuse config fields this trainer does not implement (see `configs.check_supported`),
    and a device count or batch that the running processes cannot train."""
    configs.check_supported(cfg, "torch_ref.train")
    distributed.check(cfg, distributed.world_size())


# --- the trainer ------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What `setup` builds for one run: data on the device, the nets, the optimizer, the clock.

    `t` counts optimizer updates done so far; `train_step` advances it. With
    `setup.static_addresses` the nets and device data are the process's pooled
    ones, reused in place by the next run of the same configuration. With several
    processes `model` is this process's copy (trained through `ddp`), `cfg.batch_size`
    the global batch, and each process trains on its `world_size`-th of it.
    """

    cfg: Config
    device: torch.device
    stream: str
    compile: bool
    bf16: bool
    steps: int  # optimizer steps per epoch
    n_train: int
    n_test: int
    host_x: np.ndarray  # the training images on the host
    train_x: torch.Tensor  # uint8 NHWC on the device
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    model: nn.Module
    ema_model: nn.Module | None
    optimizer: torch.optim.SGD
    lrs: list[float]  # LR of update t, before group multipliers
    decays: np.ndarray  # EMA decay after update t (float32, shared with JAX)
    fwd: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    loss_kw: dict[str, Any]
    generator: torch.Generator
    base_flips: torch.Tensor | None
    compile_seconds: float
    setup: TorchSetup = dataclasses.field(default_factory=TorchSetup)  # resolved
    eval_fwd: Callable[..., tuple[torch.Tensor, torch.Tensor]] = eval_forward
    fill: torch.Tensor | None = None  # cutout colour on the device
    warmup_ran: bool = True
    data_source: str = "arrays in memory"  # where the images came from (`Dataset.source`)
    rank: int = 0  # this process's index; only 0 writes outputs
    world_size: int = 1  # processes (one device each) the global batch is split over
    ddp: nn.Module | None = None  # `model` in DistributedDataParallel, with several processes
    t: int = 0
    _live: list[torch.Tensor] | None = dataclasses.field(default=None, repr=False)
    _ema: list[torch.Tensor] | None = dataclasses.field(default=None, repr=False)

    @property
    def ema_live(self) -> list[torch.Tensor]:
        if self._live is None:
            self._live = ema_tensors(self.model)
        return self._live

    @property
    def ema_copy(self) -> list[torch.Tensor]:
        if self._ema is None:
            self._ema = ema_tensors(self.ema_model) if self.ema_model is not None else []
        return self._ema


class Hooks:
    """Observation points in the training loop, for the parity suite (no-ops by default).

    `before_step` sees the run before update `t`, `after_step` after it (model,
    optimizer, EMA) with the step's mean loss (a device tensor); `before_eval`
    sees it before each evaluation.
    """

    def before_step(self, t: int, run: Run) -> None:
        pass

    def after_step(self, t: int, run: Run, loss: torch.Tensor) -> None:
        pass

    def before_eval(self, epoch: int, run: Run) -> None:
        pass


@dataclasses.dataclass
class _Pooled:
    """A configuration's nets and device data, kept at fixed addresses across runs."""

    model: nn.Module
    ema_model: nn.Module | None
    tensors: dict[str, torch.Tensor]


# Warm-up and pooled tensors, per (config without seed/out, shapes, device, setup, bf16).
_WARMED: set[Any] = set()
_POOL: dict[Any, _Pooled] = {}


def forget_warmups() -> None:
    """Make the next run of every configuration warm up again (and drop pooled tensors)."""
    _WARMED.clear()
    _POOL.clear()


def _run_key(
    cfg: Config, n_train: int, n_test: int, dev: torch.device, s: TorchSetup, bf16: bool
) -> tuple[Any, ...]:
    """What the warm-up depends on: not the seed, the output folder or the data's values."""
    return (dataclasses.replace(cfg, seed=0, out=None), n_train, n_test, str(dev), s, bf16)


def _forward(r: Run, bp: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The step's (loss, mean per-example loss, correct count) on global batch plan `bp`
    (this process's share of it, with several)."""
    net = r.model
    if r.ddp is not None:
        net = r.ddp
        bp = distributed.local_share(bp, r.rank, r.world_size)
    if r.setup.compile_augment:
        args = (net, r.train_x, r.train_y, bp, r.fill, r.mean, r.std, r.cfg)
        return r.fwd(*args, **r.loss_kw)
    x = apply_plan(r.train_x, bp, r.cfg)  # its default fill is `r.fill`, the cached one
    return r.fwd(net, x, r.train_y[bp["indices"]], r.mean, r.std, **r.loss_kw)


def setup(
    cfg: Config,
    data: Any = None,
    *,
    init_state_dict: Mapping[str, Any] | None = None,
    stream: str = "fast",
    compile: bool | None = None,
    device: torch.device | str | None = None,
    torch_setup: TorchSetup | None = None,
) -> Run:
    """Data on the device, model, EMA copy and optimizer; warm-up off the clock, once per
    process and configuration (`_run_key`).

    `torch_setup`: see `TorchSetup` (None: the device's defaults); `compile` is the
    older switch (False: mode "none"; True: the device's compiled default).
    In a process group (`torch_ref.distributed.init`) the run is data-parallel over
    its processes, eagerly: asking for `torch.compile` there is a ValueError.
    """
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    check_supported(cfg)
    world, rank = distributed.world_size(), distributed.rank()
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:  # one name per device for the caches
        dev = torch.device("cuda", torch.cuda.current_device())
    if world > 1:
        _check_eager(compile, torch_setup)
        compile = False
    s = (torch_setup or TorchSetup()).resolve(dev, compile)
    bf16 = use_bfloat16(cfg, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = bool(s.cudnn_benchmark)
    if data is None:
        from jaxbench.data import load_dataset

        data = load_dataset(cfg)

    host_x = np.asarray(data.train_images[: cfg.subset], np.uint8)
    host = {
        "train_x": (host_x, torch.uint8),
        "train_y": (data.train_labels[: cfg.subset], torch.int64),
        "test_x": (data.test_images[: cfg.test_subset], torch.uint8),
        "test_y": (data.test_labels[: cfg.test_subset], torch.int64),
    }
    n_train, n_test, batch = len(host_x), len(host["test_x"][0]), cfg.batch_size
    spe = steps_per_epoch(cfg, n_train)
    if spe == 0:
        raise ValueError(
            f"{n_train} training images make no full batch of {batch}; "
            "lower --batch-size or raise --subset"
        )
    if n_test == 0:
        raise ValueError("the test set is empty; check the data or --test-subset")
    key = _run_key(cfg, n_train, n_test, dev, s, bf16)
    mean, std = device_stats(cfg.dataset, dev)
    fill = fill_tensor(dev)

    init = model_from_config(cfg)
    if init_state_dict is not None:
        init.load_state_dict(
            {
                k: v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))
                for k, v in init_state_dict.items()
            }
        )
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    pooled = _POOL.get(key) if s.static_addresses else None
    if pooled is None:
        # Data resident on the device, uint8 NHWC.
        tensors = {
            k: torch.from_numpy(np.ascontiguousarray(a)).to(dev, dt) for k, (a, dt) in host.items()
        }
        model = init.to(dev, memory_format=fmt)
        ema_model = copy.deepcopy(model) if cfg.ema_every else None
        if s.static_addresses:
            from torch._dynamo import mark_static_address

            for t in tensors.values():  # the compiled augmentation reads train_x in place
                mark_static_address(t, guard=False)  # new address: re-record, not recompile
            _POOL[key] = _Pooled(model, ema_model, tensors)
    else:  # the same tensors as the last run of this key, refilled in place
        tensors = pooled.tensors
        for k, (a, dt) in host.items():
            tensors[k].copy_(torch.from_numpy(np.ascontiguousarray(a)).to(dt))
        model, ema_model = pooled.model, pooled.ema_model
        state = init.state_dict()
        for net in (model, ema_model):
            if net is not None:
                net.load_state_dict(state)
                net.train()
        for p in model.parameters():
            p.grad = None
    set_whiten_bias_trainable(model, True)
    layers.set_sync(model, cfg.bn_sync if world > 1 else None)
    optimizer = make_optimizer(model, cfg, s.sgd_impl)
    train_fn = augmented_train_forward if s.compile_augment else train_forward
    fwd = _compiled(train_fn, s) if s.compiled else train_fn
    eval_fwd = _compiled(eval_forward, s) if s.compiled else eval_forward
    loss_kw = loss_options(cfg, bf16)
    if not s.channels_last:
        loss_kw["channels_last"] = False

    r = Run(
        cfg=cfg,
        device=dev,
        stream=stream,
        compile=s.compiled,
        bf16=bf16,
        steps=spe,
        n_train=n_train,
        n_test=n_test,
        host_x=host_x,
        train_x=tensors["train_x"],
        train_y=tensors["train_y"],
        test_x=tensors["test_x"],
        test_y=tensors["test_y"],
        mean=mean,
        std=std,
        model=model,
        ema_model=ema_model,
        optimizer=optimizer,
        lrs=[float(v) for v in schedule.lr_at(np.arange(cfg.epochs * spe), cfg, spe)],
        decays=schedule.ema_decays(cfg, cfg.epochs * spe),  # float32, the same table as JAX's
        fwd=fwd,
        loss_kw=loss_kw,
        generator=torch.Generator(device=dev).manual_seed(cfg.seed * 65_537 + _STREAM_SEED_TAG),
        base_flips=draw_base_flips(cfg, n_train, dev) if cfg.flip == "alternating" else None,
        compile_seconds=0.0,
        data_source=getattr(data, "source", None) or "arrays in memory",
        setup=s,
        eval_fwd=eval_fwd,
        fill=fill,
        warmup_ran=key not in _WARMED,
        rank=rank,
        world_size=world,
        ddp=distributed.wrap(model, dev) if world > 1 else None,
    )
    if r.warmup_ran:
        _sync(dev)
        t_warm = time.perf_counter()
        _warm_up(r)
        _sync(dev)
        r.compile_seconds = time.perf_counter() - t_warm
        _WARMED.add(key)
    return r


def _check_eager(compile: bool | None, torch_setup: TorchSetup | None) -> None:
    """Several processes train eagerly: BN's all-reduces and DDP's hooks are not compiled."""
    if compile or (torch_setup is not None and torch_setup.compiled):
        raise ValueError(
            "torch.compile is not used with several processes (DDP runs eagerly here); "
            "drop --compile / --compile-mode"
        )


def _warm_up(r: Run) -> None:
    """Compilation, cuDNN autotuning, CUDA-graph recording and first-call allocations, on
    every shape and op the run uses; then the weights and BN statistics are put back."""
    cfg, model = r.cfg, r.model
    compiled, graphs = r.setup.compiled, r.setup.cuda_graphs(r.device)
    # inductor's CUDA graphs: the first call runs eagerly, the second records, the third replays
    passes = 3 if graphs else 2 if compiled else 1
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    scratch = make_optimizer(model, cfg, r.setup.sgd_impl)
    warm_gen = torch.Generator(device=r.device).manual_seed(0)
    plan = draw_plan(warm_gen, 0, r.n_train, cfg, r.device, r.base_flips)
    warm_plan = slice_plan(plan, 0, cfg.batch_size)
    # speedrun: the whitening bias is frozen mid-run, which changes the compiled graph;
    # compile both variants here, off the clock.
    variants = (True, False) if cfg.whiten == "patch2" and compiled else (True,)
    warm = dataclasses.replace(r, optimizer=scratch)
    for trainable in variants:
        set_whiten_bias_trainable(model, trainable)
        for _ in range(passes):
            loss, _, _ = _forward(warm, warm_plan)
            loss.backward()
            scratch.step()
            scratch.zero_grad(set_to_none=True)
            if r.ema_copy:
                ema_update([e.clone() for e in r.ema_copy], r.ema_live, cfg.ema_momentum)
    set_whiten_bias_trainable(model, True)
    for net in (model, r.ema_model):
        if net is not None:
            for _ in range(3 if graphs else 1):
                _evaluate(r, net)
    model.load_state_dict(saved)


def loss_options(cfg: Config, bf16: bool) -> dict[str, Any]:
    """The keyword arguments of `train_forward` for `cfg`: the trainer's loss call."""
    return {"bf16": bf16, "label_smoothing": cfg.label_smoothing, "reduction": cfg.loss_reduction}


def device_patch_moments(
    images: torch.Tensor, patch: int = PATCH, chunk: int = 1000
) -> tuple[np.ndarray, np.ndarray, int]:
    """`jaxbench.whitening.patch_moments` of uint8 NHWC `images`, summed on their device.

    float64 on the device: every product and partial sum is an integer below 2^53,
    so the sums are exact in any order and equal numpy's. One fetch at the end.
    """
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
    fetched = torch.cat([sum_uu.reshape(-1), sum_u]).cpu().numpy()
    return (
        fetched[: d * d].reshape(d, d).astype(np.int64),
        fetched[d * d :].astype(np.int64),
        n * hh * ww,
    )


def whitening_kernel(r: Run) -> np.ndarray:
    """The whitening stem's float32 OIHW kernel from the run's first `cfg.whiten_images`
    training images: the moments on the device, the float64 rest as `jaxbench.whitening`."""
    cfg = r.cfg
    patch = {"patch2": 2, "patch3": 3}[cfg.whiten]
    images = r.train_x[: cfg.whiten_images]
    moments = device_patch_moments(images, patch)
    cov = covariance_from_moments(*moments, dataset=cfg.dataset, patch=patch)
    return whitening_for_config(cov, cfg.whiten, cfg.whiten_eps, channels=images.shape[3])


def set_whitening(r: Run) -> None:
    """The whitening filters from the training images, in the net and its EMA."""
    kernel = torch.from_numpy(whitening_kernel(r)).to(r.device)
    for net in (r.model, r.ema_model):
        if net is not None:
            layers.set_whitening(net, kernel)


def train_step(r: Run, bp: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Update `r.t` on batch plan `bp`: LR, forward, backward, SGD, EMA (and lookahead).

    Returns (mean per-example loss, correct count) as device tensors: no sync. With
    several processes `bp` is the global batch's plan and both numbers this process's.
    """
    cfg = r.cfg
    set_lr(r.optimizer, r.lrs[r.t])
    loss, per_example, correct = _forward(r, bp)
    if r.ddp is not None:  # the global batch's gradient after DDP's average
        loss = loss * distributed.loss_scale(cfg.loss_reduction, r.world_size)
    loss.backward()
    r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.t += 1
    if r.ema_model is not None and r.t % cfg.ema_every == 0:
        ema_update(r.ema_copy, r.ema_live, float(r.decays[r.t]))
        if cfg.lookahead:
            lookahead_reset(r.ema_live, r.ema_copy)
    return per_example, correct


def train_epoch(
    r: Run, epoch: int, *, progress: bool = False, hooks: Hooks | None = None
) -> tuple[list[float], int]:
    """One epoch; returns (per-step mean losses, correct count), fetched once at the end."""
    cfg = r.cfg
    if cfg.whiten == "patch2" and epoch == cfg.whiten_bias_epochs:
        set_whiten_bias_trainable(r.model, False)
        if r.ddp is not None:  # DDP fixes its parameters when it wraps the model
            r.ddp = distributed.wrap(r.model, r.device)
    plan = _epoch_plan(r, epoch)
    losses = torch.empty(r.steps, device=r.device)
    correct = torch.zeros((), dtype=torch.int64, device=r.device)
    bar = progress_bar(
        range(r.steps),
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=None if progress else True,  # None: off unless a terminal
        file=sys.stderr,
    )
    for step in bar:
        t = r.t
        if hooks is not None:
            hooks.before_step(t, r)
        per_example, c = train_step(r, slice_plan(plan, step, cfg.batch_size))
        losses[step] = per_example
        correct += c
        if hooks is not None:
            hooks.after_step(t, r, per_example)
    bar.close()
    if cfg.lookahead and r.ema_model is not None and epoch == cfg.epochs - 1:
        lookahead_reset(r.ema_live, r.ema_copy)  # airbench ends with net = EMA
    if r.ddp is not None:  # the global batch's mean loss and count, in every process
        distributed.all_reduce_(correct)
        distributed.all_reduce_(losses, mean=True)
    _sync(r.device)
    return losses.tolist(), int(correct.item())  # the one fetch of the epoch


def _epoch_plan(r: Run, epoch: int) -> dict[str, torch.Tensor]:
    if r.stream == "shared":
        return plan_to_device(epoch_plan(r.cfg, epoch, r.n_train).as_dict(), r.device)
    return draw_plan(r.generator, epoch, r.n_train, r.cfg, r.device, base_flips=r.base_flips)


def _evaluate(r: Run, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, correct count) of `net` on the whole test set; with several processes
    each scores its contiguous part and the sums are all-reduced, so all get the same."""
    kw: dict[str, Any] = {"bf16": r.bf16, "fwd": r.eval_fwd, "channels_last": r.setup.channels_last}
    if r.world_size == 1:
        return evaluate(net, r.test_x, r.test_y, r.cfg, **kw)
    part = distributed.shard(r.n_test, r.rank, r.world_size)
    loss_sum, correct = evaluate_sums(net, r.test_x[part], r.test_y[part], r.cfg, **kw)
    distributed.all_reduce_(loss_sum, correct)
    return loss_sum / r.n_test, correct


def weights_equal(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> bool:
    """Whether two tensor lists hold the same values (one host sync for all of them)."""
    if len(a) != len(b):
        return False
    if not a:
        return True
    differs = torch.stack([(x != y).any() for x, y in zip(a, b, strict=True)])
    return not bool(differs.any())


def evaluate_run(r: Run, *, same_weights: bool | None = False) -> dict[str, float | None]:
    """val_loss, val_acc and ema_val_acc of the run's nets on its test set (synchronises).

    `same_weights`: True when the caller knows the net equals its EMA (lookahead's last
    epoch), None to compare them here; equal weights are scored once, for both.
    """
    return _score(r, same_weights)[0]


def _score(r: Run, same_weights: bool | None) -> tuple[dict[str, float | None], int]:
    """`evaluate_run`'s numbers and how many weight sets it scored (1 or 2)."""
    if r.ema_model is not None and same_weights is None:
        same_weights = weights_equal(r.ema_live, r.ema_copy)
    val_loss, val_correct = _evaluate(r, r.model)
    correct = int(val_correct.item())
    ema_correct: int | None = None
    sets = 1
    if r.ema_model is not None:
        if same_weights:
            ema_correct = correct
        else:
            ema_correct = int(_evaluate(r, r.ema_model)[1].item())
            sets = 2
    scores = {
        "val_loss": val_loss.item(),
        "val_acc": correct / r.n_test,
        "ema_val_acc": None if ema_correct is None else ema_correct / r.n_test,
    }
    return scores, sets


@contextlib.contextmanager
def _clock(r: Run, ledger: Ledger, profiler: TorchProfile | None) -> Iterator[None]:
    """A timed region: synchronised wall seconds and dynamo graph compiles into `ledger`."""
    _sync(r.device)
    if profiler is not None:
        profiler.start()
    graphs = tsetup.dynamo_graphs()
    t0 = time.perf_counter()
    yield
    _sync(r.device)
    ledger.timed_seconds += time.perf_counter() - t0
    ledger.compiles += max(0, tsetup.dynamo_graphs() - graphs)
    if profiler is not None:
        profiler.pause()


def train_and_evaluate(
    cfg: Config,
    workdir: str | os.PathLike[str] | None = None,
    *,
    data: Any = None,
    init_state_dict: Mapping[str, Any] | None = None,
    stream: str = "fast",
    progress: bool = True,
    quiet: bool = False,
    compile: bool | None = None,
    device: torch.device | str | None = None,
    return_variables: bool = False,
    hooks: Hooks | None = None,
    torch_setup: TorchSetup | None = None,
    profile_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train `cfg`, evaluate every epoch, return the summary (docs/design.md, "Trainer API").

    `setup` -> `train_epoch` per epoch (+ `evaluate_run`) -> summary.
    `workdir` (default `cfg.out`) receives config.json, metrics.jsonl, summary.json.
    `data`: a `jaxbench.data.Dataset` (else `load_dataset(cfg)`; subset prefixes are
    applied either way). `init_state_dict`: start from these weights (a `ResNet9`
    state dict of tensors or arrays) instead of the seed's. `stream`: "fast" (plan
    drawn on the device) or "shared" (`stream.epoch_plan`: the JAX trainer's very
    batches). `torch_setup`: compile mode, SGD kernel, ... (`TorchSetup`; None: the
    device's defaults); `compile`: the older switch (None: on for CUDA, off on the
    CPU). `return_variables` adds the final `variables` and `ema_variables` (CPU
    state dicts) to the returned dict, not to summary.json. `hooks`: see `Hooks`
    (parity suite). `profile_dir`: profile the timed region with `torch.profiler`,
    write `<profile_dir>/torch-trace.json` and add `profile` (trace, top_ops) to the
    summary. `resume`: a run folder (default `workdir`) whose latest checkpoint
    (`cfg.checkpoint_every`) the run continues from, bit for bit; `cfg` must be that
    run's. Raises FloatingPointError, naming the epoch, when the training loss is
    not finite. In a process group (`torch_ref.distributed`) every process trains and
    returns the same numbers, but only process 0 writes files or prints.
    """
    if resume is not None and distributed.world_size() > 1:
        raise ValueError(RESUME_ALONE)
    if distributed.rank() != 0:
        workdir, quiet, progress, profile_dir = None, True, False, None
    elif workdir is None:
        workdir = resume if resume is not None else cfg.out
    if cfg.checkpoint_every and workdir is None:
        raise ValueError("--checkpoint-every needs a run folder: pass --out DIR")
    ckpt, saved = None, None
    if resume is not None:
        ckpt, saved = checkpoint.load_progress(resume, cfg, "torch", stream)
    r = setup(
        cfg,
        data,
        init_state_dict=init_state_dict,
        stream=stream,
        compile=compile,
        device=device,
        torch_setup=torch_setup,
    )
    recorder = report.RunRecorder(cfg.to_dict(), workdir, quiet, rows=(saved or {}).get("rows", []))
    with recorder.watch():  # Ctrl-C: status.json says "interrupted"
        profiler = TorchProfile(profile_dir, r.device) if profile_dir is not None else None
        try:
            ledger = Ledger.from_progress(saved)
            _start(r, ledger, ckpt, profiler)
            for epoch in range(ledger.epoch, cfg.epochs):
                row = _epoch(
                    r, epoch, ledger, profiler, hooks=hooks, progress=progress and not quiet
                )
                recorder.epoch(row)  # raises FloatingPointError, naming the epoch, on a NaN loss
                if checkpoint.should_save(cfg, epoch):  # off the clock
                    assert workdir is not None
                    progress_now = ledger.progress("torch", r.stream, cfg, recorder.rows)
                    write = functools.partial(_write_state, r)
                    checkpoint.save(workdir, epoch + 1, progress_now, write)
        except BaseException:
            if profiler is not None:
                profiler.abort()  # leave no profiler running in the process
            raise
        summary = _summary(r, recorder.rows, ledger, stream)
        if profiler is not None:
            summary["profile"] = profiler.finish()
            if not quiet:
                print(
                    format_top_ops(
                        summary["profile"]["top_ops"], "torch: top operations (self time)"
                    )
                )
        recorder.finish(summary)
    if return_variables:
        summary = dict(summary)
        summary["variables"] = {k: v.detach().cpu() for k, v in r.model.state_dict().items()}
        if r.ema_model is not None:
            summary["ema_variables"] = {
                k: v.detach().cpu() for k, v in r.ema_model.state_dict().items()
            }
    return summary


def _start(r: Run, ledger: Ledger, ckpt: Path | None, profiler: TorchProfile | None) -> None:
    """Bring the nets to where the first epoch starts: a checkpoint's state (`ckpt`), or
    the data-dependent whitening kernel (on the clock, as airbench times it)."""
    cfg = r.cfg
    if ckpt is not None:  # the whitening kernel is part of the restored weights
        _restore(r, ckpt)
        if cfg.whiten == "patch2" and ledger.epoch > cfg.whiten_bias_epochs:
            set_whiten_bias_trainable(r.model, False)  # train_epoch froze it at that epoch
    elif cfg.whiten != "none":
        with _clock(r, ledger, profiler):
            set_whitening(r)
    r.model.train()


def _epoch(
    r: Run,
    epoch: int,
    ledger: Ledger,
    profiler: TorchProfile | None,
    *,
    hooks: Hooks | None,
    progress: bool,
) -> dict[str, Any]:
    """Train epoch `epoch` on the clock, evaluate when due, and return the metrics row.

    Monitoring evaluations are off the clock; the final one is part of the timed run.
    A non-finite training loss returns the row at once, unevaluated.
    """
    cfg = r.cfg
    with _clock(r, ledger, profiler):
        epoch_losses, correct = train_epoch(r, epoch, progress=progress, hooks=hooks)
    ledger.step_losses.extend(epoch_losses)
    ledger.epoch = epoch + 1
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": float(np.mean(epoch_losses)),
        "train_acc": correct / (r.steps * cfg.batch_size),
    }
    if not np.isfinite(row["train_loss"]):
        return row
    last = epoch == cfg.epochs - 1
    if last or (epoch + 1) % cfg.eval_every == 0:
        if hooks is not None:
            hooks.before_eval(epoch, r)
        # lookahead ends with net = EMA: score that one net once (hooks may have
        # touched the nets, so then compare them instead)
        same: bool | None = False
        if last and cfg.lookahead and r.ema_model is not None:
            same = True if hooks is None else None
        if last:
            with _clock(r, ledger, profiler):
                scores, ledger.weight_sets = _score(r, same)
        else:
            scores, _ = _score(r, same)
        row.update(scores)
    else:
        row.update(val_loss=None, val_acc=None, ema_val_acc=None)
    row["total_time_seconds"] = ledger.timed_seconds
    return row


def _summary(r: Run, rows: list[dict[str, Any]], ledger: Ledger, stream: str) -> dict[str, Any]:
    """summary.json (docs/design.md, "Trainer API") of a finished run."""
    cfg = r.cfg
    seconds = ledger.timed_seconds
    return {
        "final": {k: rows[-1][k] for k in report.FINAL_KEYS},
        "epochs": rows,
        "step_losses": ledger.step_losses,
        "total_time_seconds": seconds,
        "compile_seconds": r.compile_seconds,
        "warmup_ran": r.warmup_ran,
        "dynamo_compiles": ledger.compiles,
        "final_eval_weight_sets": ledger.weight_sets,
        "images_per_second": cfg.epochs * r.steps * cfg.batch_size / seconds
        if seconds > 0
        else None,
        "environment": report.environment(["torch"]),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "stream": stream,
        "compile": r.compile,
        "torch_setup": tsetup.record(r.setup, r.device, r.bf16),
        "compute_dtype": "bfloat16" if r.bf16 else "float32",
        "device": str(r.device),
        "data_source": r.data_source,
        "n_train": r.n_train,
        "n_test": r.n_test,
        "steps_per_epoch": r.steps,
        "devices": r.world_size,  # data-parallel devices, one per process
        "processes": r.world_size,
        "framework": "torch",
    }


STATE_FILE = "state.pt"
RESUME_ALONE = "--resume runs in a single process; launch it without torchrun"


def _write_state(r: Run, folder: Path) -> None:
    """Everything the numbers depend on, as tensors and plain containers: both nets,
    the optimizer, the update counter and the plan generator's state."""
    state = {
        "model": r.model.state_dict(),
        "ema_model": r.ema_model.state_dict() if r.ema_model is not None else None,
        "optimizer": r.optimizer.state_dict(),
        "t": r.t,
        "generator": r.generator.get_state(),
    }
    tmp = folder / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / STATE_FILE)


def _restore(r: Run, folder: Path) -> None:
    """Load `_write_state`'s file into the run, in place (the nets keep their addresses)."""
    state = torch.load(folder / STATE_FILE, map_location=r.device, weights_only=True)
    r.model.load_state_dict(state["model"])
    if r.ema_model is not None:
        r.ema_model.load_state_dict(state["ema_model"])
    r.optimizer.load_state_dict(state["optimizer"])
    r.t = int(state["t"])
    r.generator.set_state(state["generator"].cpu())


def load_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(progress, saved state: `model`, `ema_model`, `optimizer`, `t`, `generator`) of a run
    folder's latest checkpoint, on the CPU, to inspect it."""
    folder, progress = checkpoint.read_latest(run_dir)
    return progress, torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


# --- self-check -------------------------------------------------------------------------------

SYNC_MESSAGE = "called a synchronizing CUDA operation"  # torch's error under mode "error"


def check_no_host_sync(r: Run, steps: int = 3, *, raise_on_sync: bool = False) -> dict[str, Any]:
    """Run `steps` real training steps (an EMA update among them), an epoch's plan draw and
    an evaluation under `torch.cuda.set_sync_debug_mode("error")`.

    Nothing in them may wait for the device (the per-epoch fetch and the final
    `.item()` are outside what is checked; torch flags copies and stream syncs, not
    every possible stall). The steps use the run's warmed-up nets and a scratch
    optimizer; weights, BN statistics and EMA are restored, so the run is unchanged.
    Returns {"status": "passed" | "skipped" | "failed", "detail": ...}; a failure
    names the phase and the synchronising line (RuntimeError with `raise_on_sync`).
    """
    if r.device.type != "cuda":
        return {"status": "skipped", "detail": "no CUDA device: sync-debug mode is CUDA's"}
    cfg = r.cfg
    nets = [n for n in (r.model, r.ema_model) if n is not None]
    saved = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    # start one update before an EMA step, so the EMA (and lookahead) path is checked too
    t0 = max(cfg.ema_every - 1, 0) if r.ema_model is not None else 0
    n = min(steps, r.steps)
    t0 = max(0, min(t0, len(r.lrs) - n))
    scratch = dataclasses.replace(
        r,
        optimizer=make_optimizer(r.model, cfg, r.setup.sgd_impl),
        t=t0,
        generator=torch.Generator(device=r.device).manual_seed(0),
    )
    phase = "draw_plan (once per epoch)"
    previous = torch.cuda.get_sync_debug_mode()
    detail = None
    torch.cuda.synchronize(r.device)
    try:
        torch.cuda.set_sync_debug_mode("error")
        plan = _epoch_plan(scratch, 0)
        phase = "train_step"
        for k in range(n):
            train_step(scratch, slice_plan(plan, k, cfg.batch_size))
        phase = "evaluate (before its one fetch)"
        _evaluate(r, r.model)
    except RuntimeError as e:
        if SYNC_MESSAGE not in str(e):
            raise
        detail = f"{phase}: {SYNC_MESSAGE} at {_where(e)}"
        if raise_on_sync:
            raise RuntimeError(f"host sync in the training loop: {detail}") from e
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize(r.device)
        for net, state in zip(nets, saved, strict=True):
            net.load_state_dict(state)
    if detail is not None:
        return {"status": "failed", "detail": detail}
    return {
        "status": "passed",
        "detail": f"{n} training steps (updates {t0}..{t0 + n - 1}), a plan draw and an "
        "evaluation ran under torch.cuda.set_sync_debug_mode('error') without a sync",
    }


def _where(e: BaseException) -> str:
    """The innermost project line of an exception's traceback, and the innermost line."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "an unknown line"

    def fmt(f: traceback.FrameSummary) -> str:
        return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"

    ours = [f for f in frames if "torch_ref" in f.filename or "jaxbench" in f.filename]
    where = fmt(ours[-1]) if ours else fmt(frames[-1])
    if ours and ours[-1] is not frames[-1]:
        where += f" (innermost: {fmt(frames[-1])})"
    return where


# --- command line -----------------------------------------------------------------------------


def cpu_threads() -> int:
    """The cores this process may use (affinity-aware), for `torch.set_num_threads`."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.trainer_parser(
        "python -m torch_ref.train",
        "Train the PyTorch reference (ResNet-9 or the speedrun net) on CIFAR and print a "
        "per-epoch table. Start from a --config preset; every other flag overrides one "
        "field of it. With --out DIR the run writes config.json, metrics.jsonl and "
        "summary.json there.",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the forward/backward (default: on for CUDA, off on the CPU); "
        "--compile means --compile-mode's device default, --no-compile means 'none'",
    )
    parser.add_argument(
        "--compile-mode",
        choices=tsetup.COMPILE_MODES,
        default=None,
        help="torch.compile mode (default: max-autotune on CUDA, as airbench94_compiled; "
        "none on the CPU)",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (inductor; eager/aot_eager take mode 'default' only)",
    )
    parser.add_argument(
        "--compile-augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the augmentation gather/cutout into the forward's graph (default: on "
        "when compiling on CUDA) or run it eagerly before it",
    )
    parser.add_argument(
        "--sgd-impl",
        choices=tsetup.SGD_IMPLS,
        default=None,
        help="torch.optim.SGD kernel (default: fused on CUDA, foreach on the CPU)",
    )
    dist = parser.add_argument_group(
        "several processes",
        "Data-parallel training, one device per process: torchrun --nproc-per-node N -m "
        "torch_ref.train ... (gloo on the CPU, nccl on GPUs, cuda:LOCAL_RANK each). "
        "--batch-size is the global batch, split into contiguous shares; --bn-sync global "
        "gives one process's numbers, local a different recipe; eager only (no --compile), "
        "no --resume or --checkpoint-every; process 0 writes the outputs.",
    )
    dist.add_argument(
        "--dist-timeout",
        type=int,
        default=distributed.DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds a process waits for the others (to start, or in any one collective) "
        "before it fails with an error instead of hanging",
    )
    return parser


def setup_from_args(args: argparse.Namespace) -> TorchSetup:
    """The `TorchSetup` of the command line, checked against this machine's device."""
    s = TorchSetup(
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        compile_augment=args.compile_augment,
        sgd_impl=args.sgd_impl,
    )
    s.resolve(resolve_device(None), args.compile)  # raises ValueError on a contradiction
    return s


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 1 if training diverged, 2 on bad input.

    Under torchrun (WORLD_SIZE > 1) the processes first join a process group, and
    leave it on the way out, errors included; all but process 0 train silently.
    """
    args = build_parser().parse_args(argv)
    try:
        torch_setup = setup_from_args(args)
        if distributed.env_world_size() > 1:
            if args.resume is not None:
                raise ValueError(RESUME_ALONE)
            _check_eager(args.compile, torch_setup)
            try:
                distributed.init(args.dist_timeout)
            except RuntimeError as e:  # torch's own, often many lines: keep the first
                lines = str(e).strip().splitlines() or [type(e).__name__]
                raise ValueError(f"cannot join the other processes: {lines[0]}") from None
    except ValueError as e:  # one line, exit 2, as the config's own errors
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        if distributed.rank() != 0:  # one process writes the run folder and prints
            if hasattr(args, "out"):
                args.out = None
            args.quiet, args.no_progress, args.profile = True, True, None
        if not torch.cuda.is_available():  # the machine's cores, shared by its processes
            torch.set_num_threads(max(1, cpu_threads() // distributed.local_world_size()))
        return cli.run_trainer(
            args,
            check_supported=check_supported,
            train=train_and_evaluate,
            compile_label="warm-up/compiling",
            compile=args.compile,
            torch_setup=torch_setup,
        )
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
