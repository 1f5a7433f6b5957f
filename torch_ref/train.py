"""Train and evaluate the ResNet-9 recipe in PyTorch: `python -m torch_ref.train`.

The same recipe, config presets, flags, table and files as `python -m
jaxbench.train` (docs/design.md), set up the way one would race PyTorch: data
resident on the device as uint8, augmentation as batched tensor ops on the
device, channels-last, bf16 autocast on GPU, optional `torch.compile`, cuDNN
benchmark mode, no host syncs inside an epoch (metrics accumulate in device
tensors and are fetched once per epoch), and compilation/warm-up kept off the
clock.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxbench import cli, configs, report, schedule
from jaxbench.configs import Config, optimizer_scales
from jaxbench.progress import progress_bar
from jaxbench.stream import MEAN_STD, epoch_plan, steps_per_epoch
from jaxbench.whitening import whitening_kernel_OIHW
from torch_ref.augment import (
    apply_plan,
    draw_base_flips,
    draw_plan,
    plan_to_device,
    slice_plan,
    tta_logits,
)
from torch_ref.model import model_from_config

STREAMS: tuple[str, ...] = ("fast", "shared")
FINAL_KEYS: tuple[str, ...] = ("val_acc", "ema_val_acc", "val_loss", "train_loss", "train_acc")
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


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.SGD:
    """SGD with Nesterov momentum and coupled decay; BN biases in their own group.

    Each group carries `lr_mult`; the trainer sets `lr = lr_at(t) * lr_mult` before
    update t. LR and decay are in optimizer units (`configs.optimizer_scales`).
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
        groups, lr=lr, momentum=cfg.momentum, dampening=0.0, nesterov=cfg.nesterov
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
    buffers = [b for b in model.buffers() if b.is_floating_point()]
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


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, `(x / 255 - mean) / std`; the permute makes it channels-last."""
    x = (images.float() / 255.0 - mean) / std
    return x.permute(0, 3, 1, 2)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, mean per-example loss, correct count) for one uint8 batch.

    A module-level function taking the net as an argument, so one `torch.compile`
    serves every run in the process (closures over a fresh model would recompile
    per run and hit dynamo's recompile limit in the benchmark's seed loop).
    """
    with torch.autocast(x_u8.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(normalize(x_u8, mean, std))
    logits = logits.float()
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing, reduction=reduction)
    per_example = loss.detach() / y.shape[0] if reduction == "sum" else loss.detach()
    correct = (logits.detach().argmax(1) == y).sum()
    return loss, per_example, correct


def eval_logits(
    net: nn.Module,
    x_u8: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: Config,
    *,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-view logits [V, N, C], TTA logits [N, C]) of a uint8 NHWC batch, BN as `net` is.

    What evaluation scores: normalisation, the forward, and `augment.tta_logits`'s
    views of `cfg`. The parity suite calls it.
    """
    with torch.autocast(x_u8.device.type, dtype=torch.bfloat16, enabled=bf16):
        return tta_logits(net, normalize(x_u8, mean, std), cfg)


def eval_forward(
    net: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: Config,
    *,
    bf16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy without smoothing, correct count) of the TTA logits."""
    _, logits = eval_logits(net, x_u8, mean, std, cfg, bf16=bf16)
    loss = F.cross_entropy(logits, y, reduction="sum")
    return loss, (logits.argmax(1) == y).sum()


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One compiled version per function per process; static shapes (no dynamic batch dim)."""
    return torch.compile(fn, dynamic=False)


@torch.no_grad()
def evaluate(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: Config,
    *,
    bf16: bool = False,
    compile: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, number correct) as device tensors (no sync); BN in eval mode, flip TTA per cfg.

    The count, not a float32 ratio, so the host divides exactly (accuracy = correct / n).
    """
    fwd = _compiled(eval_forward) if compile else eval_forward
    mean, std = _stats_tensors(cfg.dataset, images.device)
    was_training = net.training
    net.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    for i in range(0, len(images), cfg.eval_batch_size):
        sl = slice(i, i + cfg.eval_batch_size)
        loss, c = fwd(net, images[sl], labels[sl], mean, std, cfg, bf16=bf16)
        loss_sum += loss
        correct += c
    net.train(was_training)
    return loss_sum / len(images), correct


def _stats_tensors(dataset: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = MEAN_STD[dataset]
    return (
        torch.tensor(mean, dtype=torch.float32, device=device),
        torch.tensor(std, dtype=torch.float32, device=device),
    )


def check_supported(cfg: Config) -> None:
    """Refuse config fields this trainer does not implement (see `configs.check_supported`)."""
    configs.check_supported(cfg, "torch_ref.train")


# --- the trainer ------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What `setup` builds for one run: data on the device, the nets, the optimizer, the clock.

    `t` counts optimizer updates done so far; `train_step` advances it.
    """

    cfg: Config
    device: torch.device
    stream: str
    compile: bool
    bf16: bool
    steps: int  # optimizer steps per epoch
    n_train: int
    n_test: int
    host_x: np.ndarray  # the training images on the host (whitening moments)
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
    t: int = 0

    @property
    def ema_live(self) -> list[torch.Tensor]:
        return ema_tensors(self.model)

    @property
    def ema_copy(self) -> list[torch.Tensor]:
        return ema_tensors(self.ema_model) if self.ema_model is not None else []


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


def setup(
    cfg: Config,
    data: Any = None,
    *,
    init_state_dict: Mapping[str, Any] | None = None,
    stream: str = "fast",
    compile: bool | None = None,
    device: torch.device | str | None = None,
) -> Run:
    """Data on the device, model, EMA copy and optimizer; warm-up off the clock."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    check_supported(cfg)
    dev = resolve_device(device)
    if compile is None:
        compile = dev.type == "cuda"
    bf16 = use_bfloat16(cfg, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if data is None:
        from jaxbench.data import load_dataset

        data = load_dataset(cfg)

    # Data resident on the device, uint8 NHWC.
    def put(a: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev, dtype)

    host_x = np.asarray(data.train_images[: cfg.subset], np.uint8)
    train_x = put(host_x, torch.uint8)
    train_y = put(data.train_labels[: cfg.subset], torch.int64)
    test_x = put(data.test_images[: cfg.test_subset], torch.uint8)
    test_y = put(data.test_labels[: cfg.test_subset], torch.int64)
    n_train, n_test, batch = len(train_x), len(test_x), cfg.batch_size
    spe = steps_per_epoch(cfg, n_train)
    if spe == 0:
        raise ValueError(
            f"{n_train} training images make no full batch of {batch}; "
            "lower --batch-size or raise --subset"
        )
    if n_test == 0:
        raise ValueError("the test set is empty; check the data or --test-subset")
    mean, std = _stats_tensors(cfg.dataset, dev)

    model = model_from_config(cfg)
    if init_state_dict is not None:
        model.load_state_dict(
            {
                k: v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))
                for k, v in init_state_dict.items()
            }
        )
    model = model.to(dev, memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model) if cfg.ema_every else None
    optimizer = make_optimizer(model, cfg)
    fwd = _compiled(train_forward) if compile else train_forward
    loss_kw = loss_options(cfg, bf16)

    # Warm-up (compilation, cuDNN autotuning, first-call allocations) off the clock, on
    # every shape and op the run uses; then weights and BN statistics are put back.
    _sync(dev)
    t_warm = time.perf_counter()
    base_flips = draw_base_flips(cfg, n_train, dev) if cfg.flip == "alternating" else None
    ema_live = ema_tensors(model)
    ema_copy = ema_tensors(ema_model) if ema_model is not None else []
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    scratch = make_optimizer(model, cfg)
    warm_gen = torch.Generator(device=dev).manual_seed(0)
    warm_plan = slice_plan(draw_plan(warm_gen, 0, n_train, cfg, dev, base_flips), 0, batch)
    # speedrun: the whitening bias is frozen mid-run, which changes the compiled graph;
    # compile both variants here, off the clock.
    bias_variants = (True, False) if cfg.model == "speedrun" and compile else (True,)
    for trainable in bias_variants:
        set_whiten_bias_trainable(model, trainable)
        for _ in range(2 if compile else 1):
            x = apply_plan(train_x, warm_plan, cfg)
            loss, _, _ = fwd(model, x, train_y[warm_plan["indices"]], mean, std, **loss_kw)
            loss.backward()
            scratch.step()
            scratch.zero_grad(set_to_none=True)
            if ema_copy:
                ema_update([e.clone() for e in ema_copy], ema_live, cfg.ema_momentum)
    set_whiten_bias_trainable(model, True)
    for net in (model, ema_model):
        if net is not None:
            evaluate(net, test_x, test_y, cfg, bf16=bf16, compile=compile)
    model.load_state_dict(saved)
    del scratch, saved, warm_plan
    _sync(dev)
    compile_seconds = time.perf_counter() - t_warm

    return Run(
        cfg=cfg,
        device=dev,
        stream=stream,
        compile=compile,
        bf16=bf16,
        steps=spe,
        n_train=n_train,
        n_test=n_test,
        host_x=host_x,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
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
        base_flips=base_flips,
        compile_seconds=compile_seconds,
    )


def loss_options(cfg: Config, bf16: bool) -> dict[str, Any]:
    """The keyword arguments of `train_forward` for `cfg`: the trainer's loss call."""
    return {"bf16": bf16, "label_smoothing": cfg.label_smoothing, "reduction": cfg.loss_reduction}


def set_whitening(r: Run) -> None:
    """The speedrun net's whitening filters from the training images, in the net and its EMA."""
    kernel = torch.from_numpy(whitening_kernel_OIHW(r.host_x, dataset=r.cfg.dataset))
    for net in (r.model, r.ema_model):
        if net is not None:
            net.set_whitening(kernel.to(r.device))


def train_step(r: Run, bp: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Update `r.t` on batch plan `bp`: LR, forward, backward, SGD, EMA (and lookahead).

    Returns (mean per-example loss, correct count) as device tensors: no sync.
    """
    cfg = r.cfg
    x = apply_plan(r.train_x, bp, cfg)
    y = r.train_y[bp["indices"]]
    set_lr(r.optimizer, r.lrs[r.t])
    loss, per_example, correct = r.fwd(r.model, x, y, r.mean, r.std, **r.loss_kw)
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
    if cfg.model == "speedrun" and epoch == cfg.whiten_bias_epochs:
        set_whiten_bias_trainable(r.model, False)
    if r.stream == "shared":
        plan = plan_to_device(epoch_plan(cfg, epoch, r.n_train).as_dict(), r.device)
    else:
        plan = draw_plan(r.generator, epoch, r.n_train, cfg, r.device, base_flips=r.base_flips)
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
    _sync(r.device)
    return losses.tolist(), int(correct.item())  # the one fetch of the epoch


def evaluate_run(r: Run) -> dict[str, float | None]:
    """val_loss, val_acc and ema_val_acc of the run's nets on its test set (synchronises)."""
    kw = {"bf16": r.bf16, "compile": r.compile}
    val_loss, val_correct = evaluate(r.model, r.test_x, r.test_y, r.cfg, **kw)
    ema_correct = (
        evaluate(r.ema_model, r.test_x, r.test_y, r.cfg, **kw)[1].item()
        if r.ema_model is not None
        else None
    )
    return {
        "val_loss": val_loss.item(),
        "val_acc": val_correct.item() / r.n_test,
        "ema_val_acc": None if ema_correct is None else ema_correct / r.n_test,
    }


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
) -> dict[str, Any]:
    """Train `cfg`, evaluate every epoch, return the summary (docs/design.md, "Trainer API").

    `setup` -> `train_epoch` per epoch (+ `evaluate_run`) -> summary.
    `workdir` (default `cfg.out`) receives config.json, metrics.jsonl, summary.json.
    `data`: a `jaxbench.data.Dataset` (else `load_dataset(cfg)`; subset prefixes are
    applied either way). `init_state_dict`: start from these weights (a `ResNet9`
    state dict of tensors or arrays) instead of the seed's. `stream`: "fast" (plan
    drawn on the device) or "shared" (`stream.epoch_plan`: the JAX trainer's very
    batches). `compile`: `torch.compile` the train/eval forward passes (None: on for
    CUDA, off on the CPU). `return_variables` adds the final `variables` and
    `ema_variables` (CPU state dicts) to the returned dict, not to summary.json.
    `hooks`: see `Hooks` (parity suite). Raises FloatingPointError, naming the
    epoch, when the training loss is not finite.
    """
    r = setup(
        cfg, data, init_state_dict=init_state_dict, stream=stream, compile=compile, device=device
    )
    if workdir is None:
        workdir = cfg.out
    recorder = report.RunRecorder(cfg.to_dict(), workdir, quiet)
    step_losses: list[float] = []
    timed = 0.0  # training steps + final evaluation
    if cfg.model == "speedrun":  # data-dependent init: on the clock, as airbench times it
        _sync(r.device)
        t0 = time.perf_counter()
        set_whitening(r)
        _sync(r.device)
        timed += time.perf_counter() - t0
    r.model.train()
    for epoch in range(cfg.epochs):
        _sync(r.device)
        t0 = time.perf_counter()
        epoch_losses, correct = train_epoch(r, epoch, progress=progress and not quiet, hooks=hooks)
        timed += time.perf_counter() - t0
        step_losses.extend(epoch_losses)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(epoch_losses)),
            "train_acc": correct / (r.steps * cfg.batch_size),
        }
        if not np.isfinite(row["train_loss"]):
            recorder.epoch(row)  # raises FloatingPointError naming the epoch
        # Monitoring evaluation is off the clock, except the final one.
        last = epoch == cfg.epochs - 1
        if last or (epoch + 1) % cfg.eval_every == 0:
            if hooks is not None:
                hooks.before_eval(epoch, r)
            t1 = time.perf_counter()
            row.update(evaluate_run(r))
            if last:
                timed += time.perf_counter() - t1
        else:
            row.update(val_loss=None, val_acc=None, ema_val_acc=None)
        row["total_time_seconds"] = timed
        recorder.epoch(row)

    spe = r.steps
    final = {k: recorder.rows[-1][k] for k in FINAL_KEYS}
    summary: dict[str, Any] = {
        "final": final,
        "epochs": recorder.rows,
        "step_losses": step_losses,
        "total_time_seconds": timed,
        "compile_seconds": r.compile_seconds,
        "images_per_second": cfg.epochs * spe * cfg.batch_size / timed if timed > 0 else None,
        "environment": report.environment(["torch"]),
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        "stream": stream,
        "compile": r.compile,
        "compute_dtype": "bfloat16" if r.bf16 else "float32",
        "device": str(r.device),
        "n_train": r.n_train,
        "n_test": r.n_test,
        "steps_per_epoch": spe,
        "framework": "torch",
    }
    recorder.finish(summary)
    if return_variables:
        summary = dict(summary)
        summary["variables"] = {k: v.detach().cpu() for k, v in r.model.state_dict().items()}
        if r.ema_model is not None:
            summary["ema_variables"] = {
                k: v.detach().cpu() for k, v in r.ema_model.state_dict().items()
            }
    return summary


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
        help="torch.compile the forward/backward (default: on for CUDA, off on the CPU)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: exit 0 on success, 1 if training diverged, 2 on bad input."""
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads())
    return cli.run_trainer(
        args,
        check_supported=check_supported,
        train=train_and_evaluate,
        compile_label="warm-up/compiling",
        compile=args.compile,
    )


if __name__ == "__main__":
    sys.exit(main())
