"""Checkpoints of a run folder, shared by both trainers.

`RUN/checkpoints/epoch_N` (N epochs done) holds the framework's tensors and `progress.json`
(rows, step losses, timed seconds: `Ledger`). It is built under a temporary name and renamed
into place, so a killed run leaves all of it or none; only the latest is kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jaxbench.configs import MAY_DIFFER, Config
from jaxbench.report import write_json

CHECKPOINTS = "checkpoints"
PROGRESS = "progress.json"
_NAME = re.compile(r"epoch_(\d+)")
_TMP_PREFIX = ".tmp-"


def should_save(cfg: Config, epoch: int) -> bool:
    """Whether the end of 0-based `epoch` is a checkpoint."""
    return cfg.checkpoint_every > 0 and (epoch + 1) % cfg.checkpoint_every == 0


def latest(run_dir: str | os.PathLike[str]) -> tuple[int, Path] | None:
    """(epochs done, folder) of the newest complete checkpoint, or None."""
    found = [
        (int(m.group(1)), p)
        for p in (Path(run_dir) / CHECKPOINTS).glob("epoch_*")  # none without the folder
        if (m := _NAME.fullmatch(p.name)) and (p / PROGRESS).is_file()
    ]
    return max(found, default=None)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM in the block take effect at its end (orbax cannot be cut short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: caught.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)  # raises KeyboardInterrupt (or the trainer's own)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


def save(
    run_dir: str | os.PathLike[str],
    epoch: int,
    progress: dict[str, Any],
    write_state: Callable[[Path], None],
) -> Path:
    """Write checkpoint `epoch_<epoch>` into a temporary folder; one rename publishes it."""
    folder = Path(run_dir).resolve() / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"epoch_{epoch}"
    tmp = folder / f"{_TMP_PREFIX}epoch_{epoch}-{os.getpid()}"
    with deferred_signals():  # Ctrl-C mid-write takes effect once the checkpoint is whole
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_state(tmp)
            write_json(tmp / PROGRESS, {"epoch": epoch, **progress})
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:  # a full disk mid-write: no half checkpoint stays
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for p in folder.iterdir():  # older checkpoints and temporaries of killed writes
        if p != final and (_NAME.fullmatch(p.name) or p.name.startswith(_TMP_PREFIX)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return final


def read_latest(run_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """(folder, progress) of the latest checkpoint; a one-line ValueError when there is none."""
    found = latest(run_dir)
    if found is None:
        raise ValueError(
            f"--resume {run_dir}: no checkpoint in {Path(run_dir) / CHECKPOINTS}; "
            "a run saves them only with --checkpoint-every N, so start it again with --out"
        )
    try:
        return found[1], json.loads((found[1] / PROGRESS).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--resume {run_dir}: unreadable {found[1] / PROGRESS} ({e}); "
            "remove that checkpoint folder to resume from none, or start again"
        ) from None


def load_progress(
    run_dir: str | os.PathLike[str], cfg: Config, framework: str, stream: str
) -> tuple[Path, dict[str, Any]]:
    """`read_latest`, checked against the run that continues from it (else ValueError)."""
    path, progress = read_latest(run_dir)
    if progress.get("framework") != framework:
        raise ValueError(
            f"--resume {run_dir}: the checkpoint was written by the "
            f"{progress.get('framework')} trainer; resume it with that trainer"
        )
    if progress.get("stream") != stream:
        raise ValueError(
            f"--resume {run_dir}: the run used --stream {progress.get('stream')}; "
            f"resume it with --stream {progress.get('stream')} (or no --stream)"
        )
    saved = progress.get("config", {})
    for key, value in cfg.to_dict().items():
        if key not in MAY_DIFFER and saved.get(key) != value:
            raise ValueError(
                f"--resume {run_dir}: {key}={value!r} differs from the checkpoint's "
                f"{saved.get(key)!r}; resume with the run's own config.json"
            )
    return path, progress


@dataclasses.dataclass
class Ledger:
    """What a run accumulates besides its weights; a checkpoint's progress.json holds it."""

    epoch: int = 0
    step_losses: list[float] = dataclasses.field(default_factory=list)
    timed_seconds: float = 0.0
    compiles: int = 0
    weight_sets: int = 0

    @classmethod
    def from_progress(cls, progress: dict[str, Any] | None) -> Ledger:
        """A fresh ledger (None), or a checkpoint's."""
        if not progress:
            return cls()
        return cls(
            epoch=int(progress["epoch"]),
            step_losses=[float(v) for v in progress["step_losses"]],
            timed_seconds=float(progress["timed_seconds"]),
            compiles=int(progress.get("compiles", 0)),
            weight_sets=int(progress.get("final_eval_weight_sets", 0)),
        )

    def progress(
        self, framework: str, stream: str, cfg: Config, rows: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """progress.json's fields (`save` adds the epoch)."""
        return {
            "framework": framework,
            "stream": stream,
            "config": cfg.to_dict(),
            "rows": rows,
            "step_losses": self.step_losses,
            "timed_seconds": self.timed_seconds,
            "compiles": self.compiles,
            "final_eval_weight_sets": self.weight_sets,
        }
