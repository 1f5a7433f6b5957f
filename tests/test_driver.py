"""The run driver with a numpy trainer: files, checkpoints and resume, divergence, the clock."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxbench import checkpoint, driver
from jaxbench.checkpoint import Ledger
from jaxbench.configs import Config, tiny

STEPS = 4
TRAIN_SECONDS, WHITEN_SECONDS, EVAL_SECONDS = 1.0, 0.5, 100.0


class FakeTime:
    """A clock the fake trainer advances, so the timed seconds are known exactly."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class NumpyTrainer:
    """A linear 'net' per lane whose steps draw from the seed and the epoch, like a real one."""

    framework = "numpy"
    stream = "fast"
    steps = STEPS
    n_train = 200
    n_test = 50

    def __init__(
        self,
        cfg: Config,
        clock: FakeTime,
        seeds: Sequence[int] | None = None,
        nan_epoch: int | None = None,
        stop_epoch: int | None = None,
    ) -> None:
        self.cfg, self.time = cfg, clock
        self.seeds = list(seeds) if seeds is not None else [cfg.seed]
        self.w = np.zeros((len(self.seeds), 3))
        self.nan_epoch, self.stop_epoch = nan_epoch, stop_epoch
        self.scored: list[tuple[int, bool]] = []
        self.written: list[str] = []  # the folders write_state filled
        self.restored: tuple[Path, int] | None = None
        self.graphs = 0

    def start(self, clock: driver.Clock) -> None:
        with clock():
            self.w += 1.0  # the data-dependent start, timed
            self.time.now += WHITEN_SECONDS

    def restore(self, folder: Path, epochs_done: int) -> None:
        self.w = np.load(folder / "w.npy")
        self.restored = (folder, epochs_done)

    def train_epoch(self, epoch: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        if epoch == self.stop_epoch:
            raise KeyboardInterrupt
        losses = np.empty((len(self.seeds), STEPS), np.float32)
        for k, seed in enumerate(self.seeds):
            rng = np.random.default_rng([seed, epoch])
            for i in range(STEPS):
                self.w[k] -= 0.1 * rng.standard_normal(3)
                losses[k, i] = float(np.sum(self.w[k] ** 2))
        if epoch == self.nan_epoch:
            losses[:, -1] = np.nan
        self.time.now += TRAIN_SECONDS
        self.graphs += 1  # one graph compiled per epoch, inside the timed region
        correct = np.array([int(10 * abs(w[0])) % 50 for w in self.w])
        return (losses[0], correct[0]) if len(self.seeds) == 1 else (losses, correct)

    def score(self, epoch: int, same_weights: bool) -> tuple[Any, int]:
        self.scored.append((epoch, same_weights))
        self.time.now += EVAL_SECONDS
        rows = [
            {"val_loss": float(np.sum(w**2)), "val_acc": float(abs(w[1]) % 1), "ema_val_acc": None}
            for w in self.w
        ]
        return (rows[0] if len(rows) == 1 else rows), 1 if same_weights else 2

    def sync(self) -> None:
        pass

    def compile_count(self) -> int:
        return self.graphs

    def write_state(self, folder: Path) -> None:
        np.save(folder / "w.npy", self.w)
        self.written.append(folder.name)

    def summary_extras(self, ledger: Ledger) -> dict[str, Any]:
        return {"graphs_in_timed_regions": ledger.compiles}


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    clock = FakeTime()
    monkeypatch.setattr(driver.time, "perf_counter", clock)
    return clock


def _cfg(**kw: Any) -> Config:
    return tiny().replace(**{"epochs": 3, "eval_every": 1, **kw})


def _run(cfg: Config, workdir: Path | None, trainer: NumpyTrainer, **kw: Any) -> dict[str, Any]:
    d = driver.Driver(cfg, "numpy", "fast", workdir=workdir, quiet=True, progress=False, **kw)
    return d.run(trainer)


def _untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "total_time_seconds"} for r in rows]


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_folder_files_and_summary(tmp_path: Path, fake_time: FakeTime) -> None:
    cfg = _cfg()
    trainer = NumpyTrainer(cfg, fake_time)
    summary = _run(cfg, tmp_path, trainer)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "done" and status["epochs_completed"] == 3
    rows = _jsonl(tmp_path / "metrics.jsonl")
    assert rows == summary["epochs"] and [r["epoch"] for r in rows] == [1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    assert len(summary["step_losses"]) == 3 * STEPS
    assert summary["final"] == {k: rows[-1][k] for k in summary["final"]}
    assert summary["framework"] == "numpy" and summary["seed"] == cfg.seed
    assert summary["steps_per_epoch"] == STEPS and summary["final_eval_weight_sets"] == 2
    assert summary["graphs_in_timed_regions"] == 3  # compiles inside the clock are counted
    assert rows[-1]["train_loss"] == float(np.mean(summary["step_losses"][-STEPS:]))
    assert not (tmp_path / checkpoint.CHECKPOINTS).exists()  # checkpoint_every 0


def test_clock_times_training_start_and_final_eval_only(
    tmp_path: Path, fake_time: FakeTime
) -> None:
    """Monitoring evaluations (epochs 1, 2) are off the clock; the final one is on it."""
    cfg = _cfg()
    summary = _run(cfg, tmp_path, NumpyTrainer(cfg, fake_time))
    times = [r["total_time_seconds"] for r in summary["epochs"]]
    start = WHITEN_SECONDS
    assert times == [start + 1, start + 2, start + 3 + EVAL_SECONDS]
    assert summary["total_time_seconds"] == start + 3 * TRAIN_SECONDS + EVAL_SECONDS
    assert summary["images_per_second"] == 3 * STEPS * cfg.batch_size / times[-1]


def test_eval_every_rows_and_lookahead_same_weights(fake_time: FakeTime) -> None:
    cfg = _cfg(epochs=5, eval_every=2, lookahead=True)
    trainer = NumpyTrainer(cfg, fake_time)
    summary = _run(cfg, None, trainer)
    evaluated = [r["val_acc"] is not None for r in summary["epochs"]]
    assert evaluated == [False, True, False, True, True]
    assert all(r["val_loss"] is None and r["ema_val_acc"] is None
               for r in summary["epochs"] if r["val_acc"] is None)  # fmt: skip
    # same weights only on lookahead's last epoch; the final evaluation's count is reported
    assert trainer.scored == [(1, False), (3, False), (4, True)]
    assert summary["final_eval_weight_sets"] == 1


def test_nan_loss_is_diverged_and_unevaluated(tmp_path: Path, fake_time: FakeTime) -> None:
    cfg = _cfg()
    trainer = NumpyTrainer(cfg, fake_time, nan_epoch=1)
    with pytest.raises(FloatingPointError, match="epoch 2"):
        _run(cfg, tmp_path, trainer)
    assert trainer.scored == [(0, False)]  # the NaN epoch was not evaluated
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "diverged" and status["epoch"] == 2
    assert status["epochs_completed"] == 1 == len(_jsonl(tmp_path / "metrics.jsonl"))
    assert not (tmp_path / "summary.json").exists()


def test_checkpoint_cadence(tmp_path: Path, fake_time: FakeTime) -> None:
    cfg = _cfg(epochs=5, checkpoint_every=2)
    trainer = NumpyTrainer(cfg, fake_time)
    _run(cfg, tmp_path, trainer)
    assert [n.split("-")[1] for n in trainer.written] == ["epoch_2", "epoch_4"]  # not 5
    epochs_done, folder = checkpoint.latest(tmp_path)  # type: ignore[misc]
    assert epochs_done == 4 and folder.name == "epoch_4"
    assert [p.name for p in (tmp_path / checkpoint.CHECKPOINTS).iterdir()] == ["epoch_4"]
    progress = json.loads((folder / checkpoint.PROGRESS).read_text())
    assert progress["framework"] == "numpy" and len(progress["rows"]) == 4
    assert len(progress["step_losses"]) == 4 * STEPS


def test_interrupted_run_resumes_exactly(tmp_path: Path, fake_time: FakeTime) -> None:
    cfg = _cfg(epochs=4, checkpoint_every=1, eval_every=2)
    whole = _run(cfg, tmp_path / "whole", NumpyTrainer(cfg, fake_time))

    cut = tmp_path / "cut"
    first = NumpyTrainer(cfg, fake_time, stop_epoch=2)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, cut, first)
    status = json.loads((cut / "status.json").read_text())
    assert status["status"] == "interrupted" and status["epochs_completed"] == 2

    again = NumpyTrainer(cfg, fake_time)
    resumed = _run(cfg, None, again, resume=cut)  # the folder defaults to the resumed one
    assert again.restored is not None and again.restored[1] == 2  # restored, not started
    assert _untimed(resumed["epochs"]) == _untimed(whole["epochs"])
    assert resumed["step_losses"] == whole["step_losses"]
    assert _untimed(_jsonl(cut / "metrics.jsonl")) == _untimed(whole["epochs"])
    assert json.loads((cut / "status.json").read_text())["status"] == "done"
    # the timed seconds carry on from the checkpoint: start, 4 epochs and the final eval
    assert resumed["total_time_seconds"] == WHITEN_SECONDS + 4 * TRAIN_SECONDS + EVAL_SECONDS


def test_resume_of_another_config_fails_before_building(
    tmp_path: Path, fake_time: FakeTime
) -> None:
    cfg = _cfg(checkpoint_every=1)
    _run(cfg, tmp_path, NumpyTrainer(cfg, fake_time))
    with pytest.raises(ValueError, match="lr="):
        driver.Driver(cfg.replace(lr=cfg.lr * 2), "numpy", "fast", resume=tmp_path)
    with pytest.raises(ValueError, match="needs a run folder"):
        driver.Driver(cfg.replace(out=None), "numpy", "fast")


def test_secondary_process_writes_nothing(tmp_path: Path, fake_time: FakeTime) -> None:
    cfg = _cfg()
    summary = _run(cfg, tmp_path / "run", NumpyTrainer(cfg, fake_time), primary=False)
    assert not (tmp_path / "run").exists()
    assert len(summary["epochs"]) == 3


def test_lanes_report_per_seed_rows(tmp_path: Path, fake_time: FakeTime) -> None:
    """K runs in one program: each lane equals its single run; a run folder gets
    config.json, a true status.json and seeds.json, and nothing else."""
    cfg = _cfg(eval_every=2)
    together = _run(cfg, tmp_path / "k", NumpyTrainer(cfg, fake_time, seeds=[3, 5]), lanes=2)
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "config.json", "seeds.json", "status.json"]  # fmt: skip
    status = json.loads((tmp_path / "k" / "status.json").read_text())
    assert status["status"] == "done" and status["epochs_completed"] == 3
    assert json.loads((tmp_path / "k" / "seeds.json").read_text()) == json.loads(
        json.dumps(together)
    )
    assert [s["seed"] for s in together["seeds"]] == [3, 5]
    for lane in together["seeds"]:
        alone = _run(cfg.replace(seed=lane["seed"]), None, NumpyTrainer(
            cfg.replace(seed=lane["seed"]), fake_time))  # fmt: skip
        assert _untimed(lane["epochs"]) == _untimed(alone["epochs"])
        assert lane["step_losses"] == alone["step_losses"]
        assert lane["final"] == {k: alone["final"][k] for k in lane["final"]}
    named = cfg.replace(out=str(tmp_path / "one"))
    one = _run(named, None, NumpyTrainer(named, fake_time, seeds=[3]), lanes=1)
    assert [s["seed"] for s in one["seeds"]] == [3]
    assert not (tmp_path / "one").exists()  # only a workdir given is written, not cfg.out
    assert one["seeds"][0]["step_losses"] == together["seeds"][0]["step_losses"]
    with pytest.raises(ValueError, match="resume"):
        driver.Driver(cfg, "numpy", "fast", resume=tmp_path, lanes=1)


def test_interrupted_lanes_say_so_in_status(tmp_path: Path, fake_time: FakeTime) -> None:
    cfg = _cfg()
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tmp_path, NumpyTrainer(cfg, fake_time, seeds=[3, 5], stop_epoch=2), lanes=2)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "interrupted" and status["epochs_completed"] == 2
    assert not (tmp_path / "seeds.json").exists()


def test_check_resume_of_finished_lanes_says_so(tmp_path: Path, fake_time: FakeTime) -> None:
    """K seeds in one program keep no checkpoint: finished, nothing to resume or re-evaluate."""
    cfg = _cfg()
    _run(cfg, tmp_path, NumpyTrainer(cfg, fake_time, seeds=[3, 5]), lanes=2)
    with pytest.raises(driver.Finished, match=r"--vmap-seeds runs that finished after epoch 3"):
        driver.check_resume(tmp_path)
    with pytest.raises(ValueError, match=r"keeps no checkpoint to run again from"):
        driver.check_resume(tmp_path, re_evaluate=True)


def test_check_resume_tells_finished_running_and_dead_runs_apart(
    tmp_path: Path, fake_time: FakeTime
) -> None:
    cfg = _cfg(checkpoint_every=1)
    _run(cfg, tmp_path, NumpyTrainer(cfg, fake_time))
    with pytest.raises(driver.Finished, match=r"finished after epoch 3: nothing .*--re-evaluate"):
        driver.check_resume(tmp_path)
    driver.check_resume(tmp_path, re_evaluate=True)  # forced: nothing refused
    status = json.loads((tmp_path / "status.json").read_text())
    (tmp_path / "summary.json").unlink()
    alive = {**status, "status": "running", "pid": os.getpid(), "host": socket.gethostname()}
    (tmp_path / "status.json").write_text(json.dumps(alive))
    with pytest.raises(ValueError, match=f"still going \\(process {os.getpid()} on this host"):
        driver.check_resume(tmp_path, re_evaluate=True)
    elsewhere = {**alive, "host": "another-machine"}  # taken at its word: not refused
    (tmp_path / "status.json").write_text(json.dumps(elsewhere))
    driver.check_resume(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / "status.json").write_text(json.dumps({**alive, "pid": int(gone.stdout)}))
    driver.check_resume(tmp_path)  # stopped without a word: resumable
    again = NumpyTrainer(cfg, fake_time)
    resumed = _run(cfg, None, again, resume=tmp_path)
    assert again.restored is not None and len(resumed["epochs"]) == 3
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "done"
    driver.check_resume(tmp_path / "no-such-run")  # nothing to tell: the CLI's checks refuse it
