"""What one PyTorch run holds (`Run`), how the run driver drives it (`Trainer`), its checkpoint
file (`write_state`, `restore`: a resumed run continues bit for bit) and the `Hooks` the
parity suite watches the training loop through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jaxbench import checkpoint
from jaxbench.checkpoint import Ledger
from jaxbench.configs import Config
from jaxbench.schedule import whiten_bias_steps
from jaxbench.stream import steps_per_epoch
from torch_ref import fast, layers

STATE_FILE = "state.pt"


@dataclasses.dataclass
class Run:
    """What `setup` builds for one run. `forward` and `eval_forward` are the eager functions or
    what `torch_ref.fast` and `torch_ref.distributed` make of them; `extras` go to the summary."""

    cfg: Config
    device: torch.device
    stream: str
    bf16: bool
    steps: int  # optimizer steps per epoch
    n_test: int  # the whole test set's size (`test_x` may be this process's part of it)
    train_x: torch.Tensor  # uint8 NHWC on the device
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    fill: torch.Tensor  # cutout colour on the device
    model: nn.Module
    ema_model: nn.Module | None
    optimizer: torch.optim.SGD
    lrs: list[float]  # LR of update t, before group multipliers
    decays: np.ndarray  # EMA decay after update t (float32, shared with JAX)
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    eval_forward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    loss_kw: dict[str, Any]
    generator: torch.Generator
    base_flips: torch.Tensor | None
    extras: dict[str, Any]
    ema_live: list[torch.Tensor]  # what the EMA averages (`ema_tensors`) of the net
    ema_copy: list[torch.Tensor]  # and of the EMA copy (empty without one)
    t: int = 0  # optimizer updates done so far

    @property
    def n_train(self) -> int:
        return len(self.train_x)


class Hooks:
    """Observation points in the training loop for the parity suite (no-ops by default): the
    run before and after update `t` (with the step's mean loss) and before each evaluation."""

    def before_step(self, t: int, run: Run) -> None: ...

    def after_step(self, t: int, run: Run, loss: torch.Tensor) -> None: ...

    def before_eval(self, epoch: int, run: Run) -> None: ...


class Trainer:
    """A `Run` as `jaxbench.driver.Driver` drives it; the recipe supplies `whiten(r)`,
    `epoch(r, epoch, progress=, hooks=)` and `score(r, same_weights)`."""

    framework = "torch"

    def __init__(
        self,
        r: Run,
        *,
        whiten: Callable[[Run], None],
        epoch: Callable[..., tuple[list[float], int]],
        score: Callable[[Run, bool | None], tuple[dict[str, float | None], int]],
        hooks: Hooks | None = None,
    ) -> None:
        self.r, self.hooks = r, hooks
        self.whiten_fn, self.epoch_fn, self.score_fn = whiten, epoch, score
        self.cfg, self.stream, self.steps = r.cfg, r.stream, r.steps
        self.seeds, self.n_train, self.n_test = [r.cfg.seed], r.n_train, r.n_test

    def start(self, clock: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        """The data-dependent whitening kernel, on the clock (as airbench times it)."""
        if self.cfg.whiten != "none":
            with clock():
                self.whiten_fn(self.r)
        self.r.model.train()

    def restore(self, folder: Path, epochs_done: int) -> None:
        """Load `write_state`'s file into the run, in place (the nets keep their addresses), with
        the whitening bias frozen if the updates done froze it."""
        r = self.r
        state = torch.load(folder / STATE_FILE, map_location=r.device, weights_only=True)
        r.model.load_state_dict(state["model"])
        if r.ema_model is not None:
            r.ema_model.load_state_dict(state["ema_model"])
        r.optimizer.load_state_dict(state["optimizer"])
        r.t = int(state["t"])
        r.generator.set_state(state["generator"].cpu())
        if r.cfg.whiten == "patch2" and r.t > whiten_bias_steps(r.cfg, r.steps):
            layers.set_whiten_bias_trainable(r.model, False)  # else the next step freezes it
        r.model.train()

    def train_epoch(self, epoch: int, progress: bool) -> tuple[list[float], int]:
        return self.epoch_fn(self.r, epoch, progress=progress, hooks=self.hooks)

    def score(self, epoch: int, same_weights: bool) -> tuple[dict[str, float | None], int]:
        """The recipe's scores; equal weights scored once, compared if hooks may touch them."""
        if self.hooks is not None:
            self.hooks.before_eval(epoch, self.r)
        same = (True if self.hooks is None else None) if same_weights else False
        return self.score_fn(self.r, same)

    def sync(self) -> None:
        fast.sync(self.r.device)

    def compile_count(self) -> int:
        """Graphs dynamo has compiled in this process, recompiles included (0: never loaded)."""
        dynamo = sys.modules.get("torch._dynamo.utils")
        return 0 if dynamo is None else int(dynamo.counters["stats"]["unique_graphs"])

    def write_state(self, folder: Path) -> None:
        """Both nets, the optimizer, the update count and the plan generator's state, atomically,
        as tensors and plain containers (so `restore` loads them with `weights_only`)."""
        r = self.r
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

    def summary_extras(self, ledger: Ledger) -> dict[str, Any]:
        return {"dynamo_compiles": ledger.compiles, **self.r.extras}


def device_data(cfg: Config, data: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """The config's training and test prefixes resident on `device`: uint8 NHWC images
    (`train_x`, `test_x`), int64 labels (`train_y`, `test_y`). Checks there is a batch."""
    host = {
        "train_x": (np.asarray(data.train_images[: cfg.subset], np.uint8), torch.uint8),
        "train_y": (data.train_labels[: cfg.subset], torch.int64),
        "test_x": (data.test_images[: cfg.test_subset], torch.uint8),
        "test_y": (data.test_labels[: cfg.test_subset], torch.int64),
    }
    n_train, n_test = len(host["train_x"][0]), len(host["test_x"][0])
    if steps_per_epoch(cfg, n_train) == 0:
        raise ValueError(
            f"{n_train} training images make no full batch of {cfg.batch_size}; "
            "lower --batch-size or raise --subset"
        )
    if n_test == 0:
        raise ValueError("the test set is empty; check the data or --test-subset")
    as_tensor = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(device, dt)  # noqa: E731
    return {k: as_tensor(a, dt) for k, (a, dt) in host.items()}


def load_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(progress, saved state: `model`, `ema_model`, `optimizer`, `t`, `generator`) of a run
    folder's latest checkpoint, on the CPU, to inspect it."""
    folder, progress = checkpoint.read_latest(run_dir)
    return progress, torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
