"""The speed set-up of torch_ref: how a run is raced in PyTorch, and the self-check that proves it.

`torch_ref.train` is plain eager PyTorch; this makes it fast, and every summary records which
of it ran (`record`): `torch.compile` (max-autotune with CUDA graphs on GPUs, as
airbench94_compiled), the SGD kernel, channels-last, cuDNN benchmark, fixed addresses so CUDA
graphs replay (`place`), a warm-up off the clock (`warm_up`); eager on the CPU.
`check_no_host_sync` proves an epoch never waits for the device; the LR: `LR_HANDLING`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from torch_ref import augment
from torch_ref.layers import set_whiten_bias_trainable

COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")
CUDA_GRAPH_MODES: tuple[str, ...] = ("max-autotune", "reduce-overhead")  # inductor's cudagraphs
SGD_IMPLS: tuple[str, ...] = ("fused", "foreach", "for-loop")
LR_HANDLING = "host float in param_groups (eager optimizer: no sync, no recompile)"


@dataclasses.dataclass(frozen=True)
class TorchSetup:
    """The PyTorch knobs of a run; `None` fields take the device's default in `resolve`."""

    compile_mode: str | None = None  # "none" (eager) or a torch.compile mode
    compile_backend: str = "inductor"  # "eager"/"aot_eager" (mode "default"): cheap tests
    compile_augment: bool | None = None  # the augmentation in the forward's graph, or eager
    sgd_impl: str | None = None  # torch.optim.SGD's kernel: fused, foreach or for-loop
    channels_last: bool = True
    cudnn_benchmark: bool | None = None  # CUDA only
    static_addresses: bool | None = None  # reuse nets and data across runs (`place`)

    def __post_init__(self) -> None:
        for what, value, known in (
            ("compile mode", self.compile_mode, COMPILE_MODES),
            ("SGD implementation", self.sgd_impl, SGD_IMPLS),
        ):
            if value is not None and value not in known:
                raise ValueError(f"{what} must be one of {', '.join(known)}, got {value!r}")
        if not self.compile_backend:
            raise ValueError("compile backend must be a non-empty name, e.g. inductor")

    @property
    def compiled(self) -> bool:
        return self.compile_mode not in (None, "none")

    def cuda_graphs(self, device: torch.device) -> bool:
        """Whether inductor captures the compiled functions in CUDA graphs on `device`."""
        inductor = self.compile_backend == "inductor"
        return device.type == "cuda" and inductor and self.compile_mode in CUDA_GRAPH_MODES

    def resolve(self, device: torch.device, compile: bool | None = None) -> TorchSetup:
        """Every field concrete for `device`. `compile` is the on/off switch: False is mode
        "none", True the device's compiled default; contradictions raise ValueError."""
        mode, backend, cuda = self.compile_mode, self.compile_backend, device.type == "cuda"
        if compile is False and mode not in (None, "none"):
            raise ValueError(f"compile=False contradicts compile mode {mode!r}")
        if compile is True and mode == "none":
            raise ValueError("compile=True contradicts compile mode 'none'")
        if mode is None:
            if compile is None:
                compile = cuda
            mode = ("max-autotune" if cuda else "default") if compile else "none"
        compiled = mode != "none"
        if compiled and backend != "inductor" and mode != "default":
            raise ValueError(
                f"compile mode {mode!r} is inductor's; backend {backend!r} takes compile mode "
                "'default'"
            )
        if compiled:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if backend not in known:
                raise ValueError(
                    f"unknown compile backend {backend!r}; torch has {', '.join(known)}"
                )
        if self.compile_augment and not compiled:
            raise ValueError("compile_augment needs a compile mode other than 'none'")
        augment = compiled and cuda if self.compile_augment is None else self.compile_augment
        out = dataclasses.replace(
            self,
            compile_mode=mode,
            compile_augment=bool(augment),
            sgd_impl=self.sgd_impl or ("fused" if cuda else "foreach"),
            cudnn_benchmark=cuda and self.cudnn_benchmark is not False,
        )
        static = out.cuda_graphs(device) if self.static_addresses is None else self.static_addresses
        return dataclasses.replace(out, static_addresses=bool(static))

    def compile_kwargs(self) -> dict[str, Any]:
        """`torch.compile`'s keyword arguments (static shapes: no dynamic batch dimension)."""
        kw: dict[str, Any] = {"dynamic": False, "backend": self.compile_backend}
        if self.compile_backend == "inductor" and self.compile_mode not in (None, "none"):
            kw["mode"] = self.compile_mode
        return kw


def sgd_kwargs(sgd_impl: str | None) -> dict[str, Any]:
    """torch.optim.SGD's `fused=`/`foreach=` for a kernel name (None: torch's own choice)."""
    if sgd_impl not in SGD_IMPLS:
        return {}
    return {"fused": sgd_impl == "fused", "foreach": sgd_impl == "foreach"}


def default_device() -> torch.device:
    """The first GPU, else the CPU (what a run without `device=` trains on)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """The requested device, else `default_device()`; a GPU with its index (one cache name)."""
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve(
    device: torch.device, compile: bool | None = None, torch_setup: TorchSetup | None = None
) -> TorchSetup:
    """`TorchSetup.resolve` (None: the device's defaults), cuDNN's benchmark mode set to match."""
    s = (torch_setup or TorchSetup()).resolve(device, compile)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(s.cudnn_benchmark)
    return s


def record(s: TorchSetup, device: torch.device, bf16: bool) -> dict[str, Any]:
    """A resolved setup as the summary's `torch_setup`: its fields plus what else shapes speed."""
    out: dict[str, Any] = dataclasses.asdict(s)
    cuda = device.type == "cuda"
    out.update(
        torch_version=torch.__version__,
        python_version=sys.version.split()[0],
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
        cuda_graphs=s.cuda_graphs(device),
        cudnn_benchmark_active=bool(torch.backends.cudnn.benchmark) if cuda else False,
        cudnn_version=torch.backends.cudnn.version() if cuda else None,
        autocast_dtype="bfloat16" if bf16 else None,
        tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
        tf32_cudnn=bool(torch.backends.cudnn.allow_tf32) if cuda else None,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        lr=LR_HANDLING,
        cpu_threads=torch.get_num_threads(),
    )
    return out


# --- compiled functions ---------------------------------------------------------------------------


@functools.cache
def compiled(fn: Callable[..., Any], mode: str | None, backend: str) -> Callable[..., Any]:
    """One compiled version per function, mode and backend per process; static shapes. The net
    is an argument, so every run reuses it (a closure per model would hit the recompile limit)."""
    kw = TorchSetup(compile_mode=mode, compile_backend=backend).compile_kwargs()
    return torch.compile(fn, **kw)


def forwards(
    s: TorchSetup,
    augmented_train_forward: Callable[..., Any],
    train_forward: Callable[..., Any],
    eval_forward: Callable[..., Any],
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The run's (train forward, evaluation forward), eager or compiled; the train forward takes
    `augmented_train_forward`'s arguments, with the augmentation compiled in or run eagerly."""
    if not s.compiled:
        return augmented_train_forward, eval_forward
    mode, backend = s.compile_mode, s.compile_backend
    evaluate = compiled(eval_forward, mode, backend)
    if s.compile_augment:
        return compiled(augmented_train_forward, mode, backend), evaluate
    forward = compiled(train_forward, mode, backend)
    return functools.partial(augmented_train_forward, forward=forward), evaluate


# --- nets and data at fixed addresses, warm-up once per process and configuration -----------------


Placed = tuple[nn.Module, nn.Module | None, dict[str, torch.Tensor]]  # nets and device data

# Warm-up and pooled nets and data, per (recipe, shapes, device, setup, bf16).
_WARMED: set[Any] = set()
_POOL: dict[Any, Placed] = {}


def forget_warmups() -> None:
    """Make the next run of every configuration warm up again (and drop pooled tensors)."""
    _WARMED.clear()
    _POOL.clear()


def place(
    s: TorchSetup,
    key: tuple[Any, ...],
    model: nn.Module,
    ema_model: nn.Module | None,
    tensors: dict[str, torch.Tensor],
) -> Placed:
    """A run's nets and device data; with `static_addresses`, the last run's of `key` with
    these values copied in (CUDA graphs replay instead of re-recording)."""
    if not s.static_addresses:
        return model, ema_model, tensors
    pooled = _POOL.get(key)
    if pooled is None:
        from torch._dynamo import mark_static_address

        for t in tensors.values():  # the compiled augmentation reads train_x in place
            mark_static_address(t, guard=False)  # new address: re-record, not recompile
        _POOL[key] = (model, ema_model, tensors)
        return _POOL[key]
    kept_model, kept_ema, kept_tensors = pooled
    for k, t in tensors.items():
        kept_tensors[k].copy_(t)
    for net, fresh in ((kept_model, model), (kept_ema, ema_model)):
        if net is not None and fresh is not None:
            net.load_state_dict(fresh.state_dict())
            net.train()
    kept_model.zero_grad(set_to_none=True)
    return pooled


def sync(device: torch.device) -> None:
    """Wait for `device` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scratch_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """A fresh optimizer of `opt`'s kind, groups and settings (no momentum yet)."""
    return type(opt)([dict(g) for g in opt.param_groups], **opt.defaults)


def warm_up(
    r: Any,
    s: TorchSetup,
    key: tuple[Any, ...],
    *,
    evaluate: Callable[[Any, nn.Module], Any],
    ema_update: Callable[[list[torch.Tensor], list[torch.Tensor], float], None],
) -> dict[str, Any]:
    """Compile, autotune, record CUDA graphs and allocate on every shape and op of run `r` (a
    `torch_ref.run.Run`) once per process and `key`, then put the weights back. `evaluate` and
    `ema_update` are the trainer's. Returns the summary's `compile_seconds` and `warmup_ran`."""
    if key in _WARMED:
        return {"compile_seconds": 0.0, "warmup_ran": False}
    sync(r.device)
    t0 = time.perf_counter()
    cfg, model = r.cfg, r.model
    graphs = s.cuda_graphs(r.device)
    # inductor's CUDA graphs: the first call runs eagerly, the second records, the third replays
    passes = 3 if graphs else 2 if s.compiled else 1
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    scratch = scratch_optimizer(r.optimizer)
    plan = augment.draw_plan(
        torch.Generator(device=r.device).manual_seed(0), 0, r.n_train, cfg, r.device, r.base_flips
    )
    warm_plan = augment.slice_plan(plan, 0, cfg.batch_size)
    # speedrun: the whitening bias is frozen mid-run, which changes the compiled graph;
    # compile both variants here, off the clock.
    variants = (True, False) if cfg.whiten == "patch2" and s.compiled else (True,)
    args = (r.train_x, r.train_y, warm_plan, r.fill, r.mean, r.std, cfg)
    for trainable in variants:
        set_whiten_bias_trainable(model, trainable)
        for _ in range(passes):
            loss, _, _ = r.forward(model, *args, **r.loss_kw)
            loss.backward()
            scratch.step()
            scratch.zero_grad(set_to_none=True)
            if r.ema_copy:
                ema_update([e.clone() for e in r.ema_copy], r.ema_live, cfg.ema_momentum)
    set_whiten_bias_trainable(model, True)
    for net in (model, r.ema_model):
        if net is not None:
            for _ in range(3 if graphs else 1):
                evaluate(r, net)
    model.load_state_dict(saved)
    sync(r.device)
    _WARMED.add(key)
    return {"compile_seconds": time.perf_counter() - t0, "warmup_ran": True}


# --- the host-sync self-check ---------------------------------------------------------------------

SYNC_MESSAGE = "called a synchronizing CUDA operation"  # torch's error under mode "error"


def check_no_host_sync(
    r: Any,
    *,
    step: Callable[[Any, Mapping[str, torch.Tensor]], Any],
    plan: Callable[[Any, int], Mapping[str, torch.Tensor]],
    evaluate: Callable[[Any, nn.Module], Any],
    steps: int = 3,
    raise_on_sync: bool = False,
) -> dict[str, Any]:
    """Run `steps` training steps (an EMA update among them), a plan draw and an evaluation
    of run `r` (the trainer's `step`, `plan`, `evaluate`) under sync-debug mode "error"; the
    nets are restored after. {"status": "passed" | "skipped" | "failed", "detail": ...}; a
    failure names the phase and the synchronising line (RuntimeError with `raise_on_sync`)."""
    if r.device.type != "cuda":
        return {"status": "skipped", "detail": "no CUDA device: sync-debug mode is CUDA's"}
    cfg = r.cfg
    nets = [n for n in (r.model, r.ema_model) if n is not None]
    saved = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    # start one update before an EMA step, so the EMA (and lookahead) path is checked too
    t0 = max(cfg.ema_every - 1, 0) if r.ema_model is not None else 0
    n = min(steps, r.steps)
    t0 = max(0, min(t0, len(r.lrs) - n))
    gen = torch.Generator(device=r.device).manual_seed(0)
    scratch = dataclasses.replace(r, optimizer=scratch_optimizer(r.optimizer), t=t0, generator=gen)
    phase = "draw_plan (once per epoch)"
    previous = torch.cuda.get_sync_debug_mode()
    detail = None
    torch.cuda.synchronize(r.device)
    try:
        torch.cuda.set_sync_debug_mode("error")
        batches = plan(scratch, 0)
        phase = "train_step"
        for k in range(n):
            step(scratch, augment.slice_plan(batches, k, cfg.batch_size))
        phase = "evaluate (before its one fetch)"
        evaluate(r, r.model)
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
    if ours and ours[-1] is not frames[-1]:
        return f"{fmt(ours[-1])} (innermost: {fmt(frames[-1])})"
    return fmt(frames[-1])


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The speed set-up's flags of `python -m torch_ref.train`."""
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the forward/backward (default: on for CUDA, off on the CPU); "
        "--compile means --compile-mode's device default, --no-compile means 'none'",
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
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
        help="compile the augmentation gather/cutout into the forward's graph (default: on "
        "when compiling on CUDA) or run it eagerly before it",
    )
    parser.add_argument(
        "--sgd-impl",
        choices=SGD_IMPLS,
        help="torch.optim.SGD kernel (default: fused on CUDA, foreach on the CPU)",
    )


def setup_from_args(args: argparse.Namespace) -> TorchSetup:
    """The `TorchSetup` of the command line, checked against this machine's device."""
    s = TorchSetup(
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        compile_augment=args.compile_augment,
        sgd_impl=args.sgd_impl,
    )
    s.resolve(default_device(), args.compile)  # raises ValueError on a contradiction
    return s
