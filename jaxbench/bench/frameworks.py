"""The race's one door into the trainers (`jaxbench.train`, `torch_ref.train` and
`torch_ref.fast`), imported only when needed, so the bench sets JAX's allocator flags first."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from jaxbench import configs

FRAMEWORKS: tuple[str, ...] = ("jax", "torch")
LOOPS: tuple[str, ...] = ("auto", "scan", "step")

# Set-up keys the trainers report beside the contract's summary keys; kept per framework.
TRAINER_INFO_KEYS: tuple[str, ...] = (
    "environment",
    "device",
    "precision",
    "compute_dtype",
    "loop",
    "stream",
    "compile",
    "torch_setup",
)

Trainer = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Entry:
    """One contender: a framework, and for JAX possibly a fixed loop (`--loop scan,step`)."""

    name: str  # "jax", "torch", or "jax-scan" / "jax-step" when several loops race
    framework: str
    loop: str | None = None  # None: the trainer's own choice

    def config(self, cfg: configs.Config) -> configs.Config:
        return cfg if self.loop is None else cfg.replace(loop=self.loop)


def make_entries(frameworks: Sequence[str], loops: Sequence[str]) -> tuple[Entry, ...]:
    """The contenders: each framework once, JAX once per loop when several are asked for."""
    out: list[Entry] = []
    for fw in frameworks:
        if fw == "jax" and len(loops) > 1:
            out += [Entry(f"jax-{loop}", "jax", loop) for loop in loops]
        elif fw == "jax" and tuple(loops) != ("auto",):
            out.append(Entry("jax", "jax", loops[0]))
        else:
            out.append(Entry(fw, fw))
    return tuple(out)


def load_trainer(framework: str) -> Trainer:
    """Import a framework's `train_and_evaluate` only when it is raced."""
    try:
        if framework == "jax":
            from jaxbench.train import train_and_evaluate
        else:
            from torch_ref.train import train_and_evaluate
    except ImportError as e:
        extra = "" if framework == "jax" else "[torch]"
        raise RuntimeError(
            f"--frameworks {framework}: cannot import its trainer ({e}); "
            f"install it with pip install -e .{extra}"
        ) from None
    return train_and_evaluate


def torch_kwargs(compile: bool | None, compile_mode: str | None) -> dict[str, Any]:
    """The PyTorch trainer's set-up arguments from the bench flags (a bad mode: ValueError)."""
    out: dict[str, Any] = {"compile": compile}
    if compile_mode is not None:
        from torch_ref.fast import TorchSetup

        out["torch_setup"] = TorchSetup(compile_mode=compile_mode)
    return out


def load_trainers(
    frameworks: Iterable[str], cfgs: Sequence[configs.Config], torch_compile_mode: str | None
) -> dict[str, Trainer]:
    """Import each trainer and let it refuse every config before any run starts
    (ValueError "<framework>: <why>", also for a bad PyTorch compile mode)."""
    trainers = {}
    for name in frameworks:
        try:
            trainers[name] = load_trainer(name)
            if name == "torch":
                torch_kwargs(None, torch_compile_mode)
            check = getattr(sys.modules[trainers[name].__module__], "check_supported", None)
            if check is not None:
                for cfg in cfgs:
                    check(cfg)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{name}: {e}") from None
    return trainers


def run_trainer(
    train: Trainer,
    entry: Entry,
    cfg: configs.Config,
    *,
    data: Any,
    stream: str,
    torch_setup: dict[str, Any],
    caches: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """One quiet run of `entry`'s trainer on in-memory `data`, no run folder: its summary.
    A JAX contender's runs share a `CompileCache` (in `caches`), so only the first compiles."""
    kwargs: dict[str, Any] = dict(data=data, stream=stream, progress=False, quiet=True, **extra)
    if entry.framework == "torch":
        kwargs.update(torch_setup)
    else:
        from jaxbench.programs import CompileCache

        kwargs["compile_cache"] = caches.setdefault(entry.name, CompileCache())
    return train(cfg, None, **kwargs)


def train_seeds(cfg: configs.Config, seeds: Iterable[int], data: Any) -> dict[str, Any]:
    """K JAX seeds in one vmapped program (`jaxbench.train.train_seeds`)."""
    from jaxbench.train import train_seeds as vmapped

    return vmapped(cfg, seeds, data)


def torch_sync_check(cfg: configs.Config, data: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """On CUDA: PyTorch's training steps under sync-debug mode "error" (skipped on the CPU),
    in the race's own set-up (`kwargs`, from `torch_kwargs`)."""
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "detail": "no CUDA device: sync-debug mode is CUDA's"}
    from torch_ref import fast, train

    r = train.setup(cfg, data, **kwargs)
    return fast.check_no_host_sync(
        r, step=train.train_step, plan=train.plan_epoch, evaluate=train.evaluate_net
    )
