"""The run driver both trainers share: everything about a run that is not the recipe.

A trainer builds its nets, data and compiled functions, then hands itself (`Trainer`) to
`Driver.run`, which owns the run folder, checkpoints and resume, the clock (epochs, a fresh
start's whitening and the final evaluation), the rows, Ctrl-C, the profiler and the summary.
`lanes`: K seeds in one vmapped JAX program share the clock; each gets its own rows, and the
summary holds `seeds`. Only the `primary` process writes. Imports neither jax nor torch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxbench import checkpoint, schedule
from jaxbench.checkpoint import Ledger
from jaxbench.configs import Config
from jaxbench.profiling import format_top_ops
from jaxbench.report import FINAL_KEYS, RunRecorder, environment, read_status, write_json

Row = dict[str, Any]
Clock = Callable[[], contextlib.AbstractContextManager[None]]
NOT_EVALUATED: Row = {"val_loss": None, "val_acc": None, "ema_val_acc": None}


class Trainer(Protocol):
    """What a framework's trainer supplies to `Driver.run`; `seeds`: one per lane."""

    framework: str
    cfg: Config
    stream: str
    seeds: Sequence[int]
    steps: int
    n_train: int
    n_test: int

    def start(self, clock: Clock) -> None:
        """A fresh run's last step before epoch 1; what it times runs in `with clock():`."""

    def restore(self, folder: Path, epochs_done: int) -> None:
        """Load `write_state`'s tensors from a checkpoint instead of `start` (off the clock)."""

    def train_epoch(self, epoch: int, progress: bool) -> tuple[Any, Any]:
        """Train 0-based `epoch`: step losses ((steps,) or (lanes, steps)) and right counts."""

    def score(self, epoch: int, same_weights: bool) -> tuple[Row | list[Row], int]:
        """Evaluate: val_loss, val_acc, ema_val_acc (per lane) and the weight sets scored."""

    def sync(self) -> None:
        """Wait for the device's queued work (the clock calls it on entry and exit)."""

    def compile_count(self) -> int:
        """Graph compilations so far (dynamo; 0 for ahead-of-time JAX)."""

    def write_state(self, folder: Path) -> None:
        """Every tensor the numbers depend on, into a checkpoint folder, on disk."""

    def summary_extras(self, ledger: Ledger) -> dict[str, Any]:
        """The trainer's own summary fields (compile seconds, device, loop, ...)."""


class Profiler(Protocol):
    """`jaxbench.profiling.JaxProfile`, `torch_ref.profiling.TorchProfile` (`abort` optional)."""

    def start(self) -> None: ...
    def pause(self) -> None: ...
    def finish(self) -> dict[str, Any]: ...


class Driver:
    """One run's folder, checkpoints, clock, rows and summary around a `Trainer`; made before
    the trainer builds anything, so a bad `resume` fails before compiling."""

    def __init__(
        self,
        cfg: Config,
        framework: str,
        stream: str,
        *,
        workdir: str | os.PathLike[str] | None = None,
        resume: str | os.PathLike[str] | None = None,
        quiet: bool = False,
        progress: bool = True,
        primary: bool = True,
        lanes: int | None = None,
    ) -> None:
        if lanes is not None and resume is not None:
            raise ValueError("several runs in one program cannot --resume")
        if workdir is None and lanes is None:
            workdir = resume if resume is not None else cfg.out
        if not primary:  # one process writes and prints for the run
            workdir, quiet, progress = None, True, False
        if lanes is not None:
            quiet, progress = True, False
        elif cfg.checkpoint_every and workdir is None:
            raise ValueError("--checkpoint-every needs a run folder: pass --out DIR")
        self.framework, self.stream, self.workdir = framework, stream, workdir
        self.quiet, self.progress, self.primary = quiet, progress and not quiet, primary
        self.several, self.lanes = lanes is not None, lanes or 1
        self.ckpt: Path | None = None
        self.saved: dict[str, Any] | None = None
        if resume is not None:
            self.ckpt, self.saved = checkpoint.load_progress(resume, cfg, framework, stream)

    def run(self, trainer: Trainer, profiler: Profiler | None = None) -> dict[str, Any]:
        """Train the epochs left, evaluate when due, write the files; the summary."""
        cfg = trainer.cfg
        if len(trainer.seeds) != self.lanes:
            raise ValueError(f"the trainer has {len(trainer.seeds)} lanes, the driver {self.lanes}")
        profiler = profiler if self.primary else None
        rows = (self.saved or {}).get("rows", [])
        recorder = RunRecorder(cfg.to_dict(), self.workdir, self.quiet, rows=rows)
        with recorder.watch():  # Ctrl-C: status.json says "interrupted"
            try:
                ledger = Ledger.from_progress(self.saved)
                clock = _Clock(trainer, ledger, profiler)
                if self.ckpt is not None:  # the whitening kernel is part of the saved state
                    trainer.restore(self.ckpt, ledger.epoch)
                else:
                    trainer.start(clock)
                lane_rows = [recorder.rows] + [[] for _ in range(self.lanes - 1)]
                lane_losses = [ledger.step_losses] + [[] for _ in range(self.lanes - 1)]
                for epoch in range(ledger.epoch, cfg.epochs):
                    rows = _epoch(trainer, epoch, ledger, clock, lane_losses,
                                  progress=self.progress, several=self.several)  # fmt: skip
                    if self.several:  # lane 0's rows are the recorder's
                        for k, row in enumerate(rows):
                            lane_rows[k].append(row)
                        recorder.set_status("running")
                        continue
                    recorder.epoch(rows[0])  # raises FloatingPointError on a NaN loss
                    if checkpoint.should_save(cfg, epoch):  # off the clock
                        assert self.workdir is not None
                        saved = ledger.progress(self.framework, self.stream, cfg, recorder.rows)
                        checkpoint.save(self.workdir, epoch + 1, saved, trainer.write_state)
            except BaseException:
                abort = getattr(profiler, "abort", None)
                if abort is not None:
                    abort()  # leave no profiler running in the process
                raise
            summary = _summary(trainer, self.framework, ledger, lane_rows, lane_losses,
                               several=self.several)  # fmt: skip
            if profiler is not None:
                summary["profile"] = profile = profiler.finish()
                if not self.quiet:
                    title = f"{self.framework}: top operations (self time)"
                    print(format_top_ops(profile["top_ops"], title))
            if self.several and self.workdir is not None:
                write_json(Path(self.workdir) / "seeds.json", summary)
                recorder.set_status("done")
            else:
                recorder.finish(summary)
        return summary


class Finished(Exception):
    """`--resume` of a finished run: nothing to do, nothing changed (the message says so)."""


def check_resume(folder: str | os.PathLike[str], *, re_evaluate: bool = False) -> None:
    """Before anything loads: refuse a run still alive on this host (ValueError); a finished
    one (summary.json, or seeds.json of `--vmap-seeds` runs) raises `Finished` unless
    `re_evaluate`; a dead one resumes."""
    folder = Path(folder)
    try:
        status = read_status(folder)
    except (OSError, ValueError):
        status = {}  # no status yet: the checkpoint decides
    if status.get("status") == "running" and status.get("host") == socket.gethostname():
        raise ValueError(
            f"--resume {folder}: its run is still going (process {status.get('pid')} on this "
            "host); stop it first, or wait for it to end"
        )
    if (folder / "seeds.json").is_file():  # K seeds in one program: no checkpoint kept
        if re_evaluate:
            raise ValueError(
                f"--re-evaluate {folder}: its --vmap-seeds run keeps no checkpoint to run "
                "again from; train it again with --out and --overwrite"
            )
        raise Finished(
            f"{folder} holds --vmap-seeds runs that finished after epoch "
            f"{status.get('epochs_completed')}: nothing to resume, nothing changed"
        )
    if (folder / "summary.json").is_file() and not re_evaluate:
        raise Finished(
            f"{folder} holds a run that finished after epoch {status.get('epochs_completed')}: "
            "nothing to resume, nothing changed (--re-evaluate runs it again from its checkpoint)"
        )


def _epoch(
    trainer: Trainer,
    epoch: int,
    ledger: Ledger,
    clock: Clock,
    lane_losses: list[list[float]],
    *,
    progress: bool,
    several: bool,
) -> list[Row]:
    """Train `epoch` on the clock, evaluate when due (only the final evaluation timed); one
    row per lane. A single run's non-finite loss returns its row unevaluated."""
    cfg, lanes = trainer.cfg, len(lane_losses)
    with clock():
        losses, correct = trainer.train_epoch(epoch, progress)
    losses = np.asarray(losses, np.float64).reshape(lanes, -1)
    correct = np.asarray(correct).reshape(lanes)
    ledger.epoch = epoch + 1
    trained = schedule.epoch_steps(cfg, trainer.steps, epoch) * cfg.batch_size
    rows = []
    for k in range(lanes):
        lane_losses[k].extend(float(v) for v in losses[k])
        loss, acc = float(losses[k].mean()), float(correct[k]) / trained
        rows.append({"epoch": epoch + 1, "train_loss": loss, "train_acc": acc})
    if not several and not np.isfinite(rows[0]["train_loss"]):
        return rows
    last = epoch == cfg.epochs - 1
    if last or (epoch + 1) % cfg.eval_every == 0:
        # lookahead ends with net = EMA: the final evaluation may score that one net once
        with clock() if last else contextlib.nullcontext():
            fields, weight_sets = trainer.score(epoch, last and cfg.lookahead)
        if last:
            ledger.weight_sets = weight_sets
        scores = [fields] if isinstance(fields, dict) else list(fields)
    else:
        scores = [NOT_EVALUATED] * lanes
    for row, score in zip(rows, scores, strict=True):
        row.update(score)
        row["total_time_seconds"] = ledger.timed_seconds
    return rows


def _summary(
    trainer: Trainer,
    framework: str,
    ledger: Ledger,
    lane_rows: list[list[Row]],
    lane_losses: list[list[float]],
    *,
    several: bool,
) -> dict[str, Any]:
    """summary.json (docs/design.md, "Trainer API"); several lanes: one entry per seed."""
    cfg = trainer.cfg
    timed = ledger.timed_seconds
    images = schedule.train_steps(cfg, trainer.steps) * cfg.batch_size
    runs = [
        {
            "seed": seed,
            "final": {k: rows[-1][k] for k in FINAL_KEYS},
            "epochs": rows,
            "step_losses": losses,
        }
        for seed, rows, losses in zip(trainer.seeds, lane_rows, lane_losses, strict=True)
    ]
    if several:
        common: dict[str, Any] = {"seeds": runs, "total_time_seconds": timed}
    else:  # a single run's seed is cfg.seed
        common = {
            **runs[0],
            "total_time_seconds": timed,
            "final_eval_weight_sets": ledger.weight_sets,
            "images_per_second": images / timed if timed > 0 else None,
            "stream": trainer.stream,
        }
    common.update(
        environment=environment((framework,)),
        config=cfg.to_dict(),
        n_train=trainer.n_train,
        n_test=trainer.n_test,
        steps_per_epoch=trainer.steps,
    )
    return {**common, **trainer.summary_extras(ledger), "framework": framework}


class _Clock:
    """`with clock():` adds a region's synchronised seconds and compiles to the ledger."""

    def __init__(self, trainer: Trainer, ledger: Ledger, profiler: Profiler | None) -> None:
        self.trainer, self.ledger, self.profiler = trainer, ledger, profiler

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.trainer.sync()
        if self.profiler is not None:
            self.profiler.start()
        graphs = self.trainer.compile_count()
        t0 = time.perf_counter()
        yield
        self.trainer.sync()
        self.ledger.timed_seconds += time.perf_counter() - t0
        self.ledger.compiles += max(0, self.trainer.compile_count() - graphs)
        if self.profiler is not None:
            self.profiler.pause()
