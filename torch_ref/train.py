"""Train and evaluate the ResNet-9 recipe in PyTorch: `python -m torch_ref.train`.

The same recipe, presets, flags, table and files as `python -m jaxbench.train` (docs/design.md),
in plain eager PyTorch: data stays on the device as uint8, augmentation runs there as batched
tensor ops, and an epoch's metrics are fetched once. Speed is `torch_ref.fast`, several processes
`torch_ref.distributed`, what a run holds and saves `torch_ref.run`; each plugs in in `setup`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxbench import cli, configs, schedule
from jaxbench.command import Command, run_command
from jaxbench.configs import Config
from jaxbench.driver import Driver
from jaxbench.progress import progress_bar
from jaxbench.stream import epoch_plan, steps_per_epoch
from torch_ref import augment, distributed, fast, layers, optim
from torch_ref.model import model_from_config, use_bfloat16
from torch_ref.profiling import TorchProfile
from torch_ref.run import Hooks, Run, Trainer, device_data, load_checkpoint  # noqa: F401  (API)
from torch_ref.whitening import whitening_kernel

STREAMS: tuple[str, ...] = ("fast", "shared")
_STREAM_SEED_TAG = 0x5EED  # keeps the fast stream's generator apart from the init seed

# --- model and state ------------------------------------------------------------------------------


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
    jitter: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, mean per-example loss, correct count) for one uint8 batch
    (`jitter`: its plan's colour jitter)."""
    x = augment.normalize(x_u8, mean, std, channels_last=channels_last, jitter=jitter)
    with torch.autocast(x_u8.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(x)
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
    *,
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = train_forward,
    **loss_kw: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`forward` (`train_forward` or its compiled twin) of the batch `plan` cuts from train_x."""
    x = augment.apply_plan(images, plan, cfg, fill=fill)
    jitter = augment.plan_jitter(plan, cfg)
    return forward(net, x, labels[plan["indices"]], mean, std, jitter=jitter, **loss_kw)


def loss_options(cfg: Config, bf16: bool) -> dict[str, Any]:
    """The keyword arguments of `train_forward` for `cfg`: the trainer's loss call."""
    return {"bf16": bf16, "label_smoothing": cfg.label_smoothing, "reduction": cfg.loss_reduction}


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
    """(per-view logits [V, N, C], TTA logits [N, C]) of a uint8 NHWC batch, BN as `net` is:
    normalisation, the forward, and `augment.tta_logits`'s views of `cfg`."""
    x = augment.normalize(x_u8, mean, std, channels_last=channels_last)
    with torch.autocast(x_u8.device.type, dtype=torch.bfloat16, enabled=bf16):
        return augment.tta_logits(net, x, cfg)


def eval_forward(
    net: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, *args: Any, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy without smoothing, correct count) of `eval_logits`'s TTA logits."""
    _, logits = eval_logits(net, x_u8, *args, **kw)
    loss = F.cross_entropy(logits, y, reduction="sum")
    return loss, (logits.argmax(1) == y).sum()


def check_supported(cfg: Config) -> None:
    """Refuse config fields this trainer does not implement (see `configs.check_supported`),
    and a device count or batch that the running processes cannot train."""
    configs.check_supported(cfg, "torch_ref.train")
    distributed.check(cfg, distributed.world_size())


def setup(
    cfg: Config,
    data: Any = None,
    *,
    init_state_dict: Mapping[str, Any] | None = None,
    stream: str = "fast",
    compile: bool | None = None,
    device: torch.device | str | None = None,
    torch_setup: fast.TorchSetup | None = None,
) -> Run:
    """Data on the device, model, EMA copy and optimizer (`data` None: `load_dataset(cfg)`;
    `init_state_dict`: these weights, not the seed's). `torch_setup` (None: the device's
    defaults) and `compile` (the older switch) choose the speed set-up; in a process group,
    this process's part of a data-parallel run, eager (compiling is a ValueError)."""
    if stream not in STREAMS:
        raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    check_supported(cfg)
    dev = fast.resolve_device(device)
    compile = distributed.eager_only(compile, torch_setup, distributed.world_size())
    speed = fast.resolve(dev, compile, torch_setup)
    bf16 = use_bfloat16(cfg, dev)
    if data is None:
        from jaxbench.data import load_dataset

        data = load_dataset(cfg)
    tensors = device_data(cfg, data, dev)
    n_train, n_test = len(tensors["train_x"]), len(tensors["test_x"])
    init = model_from_config(cfg)
    if init_state_dict is not None:
        as_tensor = lambda v: v if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))  # noqa: E731
        init.load_state_dict({k: as_tensor(v) for k, v in init_state_dict.items()})
    fmt = torch.channels_last if speed.channels_last else torch.contiguous_format
    model = init.to(dev, memory_format=fmt)
    ema_model = copy.deepcopy(model) if cfg.ema_every else None
    key = (cfg.recipe(), n_train, n_test, str(dev), speed, bf16)  # the warm-up's: not the data
    model, ema_model, tensors = fast.place(speed, key, model, ema_model, tensors)
    layers.set_whiten_bias_trainable(model, True)
    layers.set_sync(model, distributed.bn_sync(cfg))
    forward, eval_fwd = fast.forwards(speed, augmented_train_forward, train_forward, eval_forward)
    steps = steps_per_epoch(cfg, n_train)
    total = schedule.train_steps(cfg, steps)
    flips = augment.draw_base_flips(cfg, n_train, dev) if cfg.flip == "alternating" else None
    source = getattr(data, "source", None) or "arrays in memory"
    dtype = "bfloat16" if bf16 else "float32"
    r = Run(
        cfg=cfg,
        device=dev,
        stream=stream,
        bf16=bf16,
        steps=steps,
        n_test=n_test,
        **tensors,
        **dict(zip(("mean", "std"), augment.device_stats(cfg.dataset, dev), strict=True)),
        fill=augment.fill_tensor(dev),
        model=model,
        ema_model=ema_model,
        optimizer=optim.make_optimizer(model, cfg, speed.sgd_impl, steps),
        lrs=[float(v) for v in schedule.lr_at(np.arange(total), cfg, steps)],
        decays=schedule.ema_decays(cfg, total),  # float32, the same as JAX's
        forward=forward,
        eval_forward=eval_fwd,
        loss_kw={**loss_options(cfg, bf16), "channels_last": speed.channels_last},
        generator=torch.Generator(device=dev).manual_seed(cfg.seed * 65_537 + _STREAM_SEED_TAG),
        base_flips=flips,
        extras=dict(
            device=str(dev), data_source=source, compute_dtype=dtype, devices=1, processes=1
        ),
        ema_live=optim.ema_tensors(model),
        ema_copy=optim.ema_tensors(ema_model) if ema_model is not None else [],
    )
    distributed.prepare(r)  # several processes: DDP forward, a part of the test set each
    warm = fast.warm_up(r, speed, key, evaluate=evaluate_net, ema_update=optim.ema_update)
    r.extras.update(warm, compile=speed.compiled, torch_setup=fast.record(speed, dev, bf16))
    return r


def set_whitening(r: Run) -> None:
    """The whitening filters from the training images, in the net and its EMA."""
    kernel = torch.from_numpy(whitening_kernel(r.train_x, r.cfg)).to(r.device)
    for net in (r.model, r.ema_model):
        if net is not None:
            layers.set_whitening(net, kernel)


# --- step -----------------------------------------------------------------------------------------


def train_step(r: Run, bp: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Update `r.t` on batch plan `bp`: LR, forward, backward, SGD, EMA (and lookahead);
    (mean per-example loss, correct count) as device tensors: no sync."""
    cfg = r.cfg
    optim.set_lr(r.optimizer, r.lrs[r.t])
    args = (r.model, r.train_x, r.train_y, bp, r.fill, r.mean, r.std, cfg)
    loss, per_example, correct = r.forward(*args, **r.loss_kw)
    loss.backward()
    r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    r.t += 1
    if r.ema_model is not None and r.t % cfg.ema_every == 0:
        optim.ema_update(r.ema_copy, r.ema_live, float(r.decays[r.t]))
        if cfg.lookahead:
            optim.lookahead_reset(r.ema_live, r.ema_copy)
    return per_example, correct


# --- epoch ----------------------------------------------------------------------------------------


def plan_epoch(r: Run, epoch: int) -> dict[str, torch.Tensor]:
    """The epoch's batch plan on the device: drawn there ("fast"), or the shared numpy one."""
    if r.stream == "shared":
        return augment.plan_to_device(epoch_plan(r.cfg, epoch, r.n_train).as_dict(), r.device)
    return augment.draw_plan(
        r.generator, epoch, r.n_train, r.cfg, r.device, base_flips=r.base_flips
    )


def train_epoch(
    r: Run, epoch: int, *, progress: bool = False, hooks: Hooks | None = None
) -> tuple[list[float], int]:
    """One epoch; returns (per-step mean losses, correct count), fetched once at the end."""
    cfg = r.cfg
    plan = plan_epoch(r, epoch)
    steps = schedule.epoch_steps(cfg, r.steps, epoch)
    losses = torch.empty(steps, device=r.device)
    correct = torch.zeros((), dtype=torch.int64, device=r.device)
    desc, off = f"epoch {epoch + 1}/{cfg.epochs}", None if progress else True  # None: on a tty
    bar = progress_bar(range(steps), desc=desc, leave=False, disable=off, file=sys.stderr)
    for step in bar:
        t = r.t
        if cfg.whiten == "patch2" and t == schedule.whiten_bias_steps(cfg, r.steps):
            layers.set_whiten_bias_trainable(r.model, False)  # no gradient: torch skips it
        if hooks is not None:
            hooks.before_step(t, r)
        per_example, c = train_step(r, augment.slice_plan(plan, step, cfg.batch_size))
        losses[step] = per_example
        correct += c
        if hooks is not None:
            hooks.after_step(t, r, per_example)
    bar.close()
    if cfg.lookahead and r.ema_model is not None and epoch == cfg.epochs - 1:
        optim.lookahead_reset(r.ema_live, r.ema_copy)  # airbench ends with net = EMA
    distributed.sum_over_processes(correct)  # the global batch's count and mean loss
    distributed.sum_over_processes(losses, mean=True)
    fast.sync(r.device)
    return losses.tolist(), int(correct.item())  # the one fetch of the epoch


# --- evaluate -------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_net(r: Run, net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, correct count) of `net` on the run's whole test set as device tensors (no
    sync); BN in eval mode, TTA per cfg; each process scores its part and the sums are added.
    The count, not a float32 ratio, so the host divides exactly (accuracy = correct / n)."""
    cfg, kw = r.cfg, {"bf16": r.bf16, "channels_last": r.loss_kw["channels_last"]}
    was_training = net.training
    net.eval()
    if cfg.tta_select:  # over the whole test set: one process holds it (`distributed.check`)
        six = cfg.replace(tta=True, tta_shift=True)
        loss, correct = augment.selective_tta_scores(
            lambda x: eval_logits(net, x, r.mean, r.std, six, **kw)[0], r.test_x, r.test_y, cfg
        )
        net.train(was_training)
        return torch.tensor(loss / r.n_test), torch.tensor(correct)
    loss_sum = torch.zeros((), device=r.device)
    correct = torch.zeros((), dtype=torch.int64, device=r.device)
    for i in range(0, len(r.test_x), cfg.eval_batch_size):
        sl = slice(i, i + cfg.eval_batch_size)
        loss, c = r.eval_forward(net, r.test_x[sl], r.test_y[sl], r.mean, r.std, cfg, **kw)
        loss_sum += loss
        correct += c
    net.train(was_training)
    distributed.sum_over_processes(loss_sum, correct)
    return loss_sum / r.n_test, correct


def score(r: Run, same_weights: bool | None) -> tuple[dict[str, float | None], int]:
    """(val_loss, val_acc and ema_val_acc of the run's nets, how many weight sets were scored);
    synchronises. `same_weights`: True when the caller knows the net equals its EMA
    (lookahead's last epoch), None to compare them here; equal weights are scored once."""
    if r.ema_model is not None and same_weights is None:
        same_weights = optim.weights_equal(r.ema_live, r.ema_copy)
    val_loss, val_correct = evaluate_net(r, r.model)
    val_acc, ema_acc, sets = int(val_correct.item()) / r.n_test, None, 1
    if r.ema_model is not None and same_weights:
        ema_acc = val_acc
    elif r.ema_model is not None:
        ema_acc, sets = int(evaluate_net(r, r.ema_model)[1].item()) / r.n_test, 2
    return {"val_loss": val_loss.item(), "val_acc": val_acc, "ema_val_acc": ema_acc}, sets


# --- train_and_evaluate ---------------------------------------------------------------------------


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
    torch_setup: fast.TorchSetup | None = None,
    profile_dir: str | os.PathLike[str] | None = None,
    resume: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train `cfg`, evaluate every epoch, return the summary (docs/design.md, "Trainer API").

    `setup`, then `jaxbench.driver.Driver` runs `Trainer`: the run folder (`workdir`, default
    `cfg.out`), the clock, the per-epoch rows, checkpoints and `resume` (a run folder whose
    latest checkpoint the run continues from, bit for bit). Other arguments: see `setup` and
    `Hooks`; `return_variables` adds the final CPU state dicts (`variables`, `ema_variables`);
    `profile_dir` gets `torch-trace.json` of the timed region (`profile` in the summary).
    Raises FloatingPointError, naming the epoch, when the training loss is not finite. In a
    process group every process returns the same numbers; only process 0 writes or prints.
    """
    distributed.refuse_resume(resume)
    driver = Driver(
        cfg,
        "torch",
        stream,
        workdir=workdir,
        resume=resume,
        quiet=quiet,
        progress=progress and not quiet,
        primary=distributed.rank() == 0,
    )
    kw = dict(init_state_dict=init_state_dict, stream=stream, compile=compile, device=device)
    r = setup(cfg, data, torch_setup=torch_setup, **kw)
    profiler = TorchProfile(profile_dir, r.device) if profile_dir is not None else None
    trainer = Trainer(r, whiten=set_whitening, epoch=train_epoch, score=score, hooks=hooks)
    summary = driver.run(trainer, profiler)
    if return_variables:
        cpu = lambda net: {k: v.detach().cpu() for k, v in net.state_dict().items()}  # noqa: E731
        summary = {**summary, "variables": cpu(r.model)}
        if r.ema_model is not None:
            summary["ema_variables"] = cpu(r.ema_model)
    return summary


# --- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The shared trainer flags, the speed set-up's and those of several processes."""
    parser = cli.trainer_parser(
        "python -m torch_ref.train",
        "Train the PyTorch reference (ResNet-9 or the speedrun net) on CIFAR and print a "
        "per-epoch table. Start from a --config preset; every other flag overrides one "
        "field of it. With --out DIR the run writes config.json, metrics.jsonl, status.json "
        "and summary.json there.",
    )
    fast.add_arguments(parser)
    distributed.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point on `jaxbench.command`: exit 0 on success, 1 if training diverged, 2 on
    bad input (one line, checked before any work), 130 on Ctrl-C, 143 on SIGTERM. Under
    torchrun the processes join a process group (`distributed.join`) and always leave it."""
    return run_command(lambda cmd: _main(cmd, argv))


def _main(cmd: Command, argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    torch_setup = fast.setup_from_args(args)
    if args.profile is not None:  # a file or an unwritable place: refused before any work
        cmd.prepare_out(args.profile, (), overwrite=args.overwrite, flag="--profile")
    distributed.join(args, torch_setup)
    cmd.inputs_checked()  # `cli.run_trainer` checks the rest and maps its own errors
    try:
        distributed.share_cpu_threads()
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
