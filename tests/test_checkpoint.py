"""Checkpoints and --resume: a killed run, resumed, ends bit for bit as an uninterrupted one."""

from __future__ import annotations

import importlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxbench import checkpoint, configs

# A run small enough for seconds per epoch on two CPU cores. The speedrun net covers the
# most state: the data-dependent whitening kernel, lookahead EMA, alternating flips and
# the whitening bias frozen after epoch 1.
RUN = (
    "--config", "speedrun", "--subset", "500", "--test-subset", "200", "--widths", "8,16,16",
    "--batch-size", "50", "--epochs", "3", "--whiten-images", "200", "--whiten-bias-epochs", "1",
    "--checkpoint-every", "1", "--loop", "step", "--no-progress", "--quiet",
)  # fmt: skip
# The plain ResNet-9 path: random flips, cutout, a per-step EMA, no whitening.
RUN_TINY = (
    "--config", "tiny", "--subset", "500", "--test-subset", "200", "--widths", "8,8,16,16",
    "--batch-size", "50", "--epochs", "3", "--checkpoint-every", "1", "--loop", "step",
    "--no-progress", "--quiet",
)  # fmt: skip
MODULES = {"jax": "jaxbench.train", "torch": "torch_ref.train"}


def _cmd(framework: str, *args: str) -> list[str]:
    # The child runs with Ctrl-C as in a terminal, as tests/test_report.py starts trainers.
    code = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"sys.argv[0] = {MODULES[framework]!r}; "
        f"runpy.run_module({MODULES[framework]!r}, run_name='__main__')"
    )
    return [sys.executable, "-c", code, *args]


def _run(framework: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(framework, *args), capture_output=True, text=True, timeout=timeout)


def _rows(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall-clock column, which no two runs share."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "total_time_seconds"} for r in rows]


def _final_weights(framework: str, folder: Path) -> tuple[int, list[np.ndarray]]:
    """(epochs done, every array of the latest checkpoint's state) of a run folder."""
    if framework == "jax":
        import jax

        from jaxbench.train import load_checkpoint

        progress, state = load_checkpoint(folder)
        leaves = jax.tree_util.tree_leaves(state)
    else:
        import torch

        from torch_ref.train import load_checkpoint

        progress, state = load_checkpoint(folder)
        leaves = [
            v
            for part in ("model", "ema_model")
            for v in (state[part] or {}).values()
            if isinstance(v, torch.Tensor)
        ]
        momenta = state["optimizer"]["state"]
        leaves += [v for k in sorted(momenta) for v in momenta[k].values() if torch.is_tensor(v)]
        leaves += [state["generator"], torch.tensor(state["t"])]
        leaves = [v.numpy() for v in leaves]
    return progress["epoch"], [np.asarray(x) for x in leaves]


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("run", [RUN], ids=["speedrun"])  # RUN_TINY: same code, +2 min
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_killed_run_resumes_bit_for_bit(
    framework: str, run: tuple[str, ...], real_data_dir: Path, tmp_path: Path
) -> None:
    data = ("--data-dir", str(real_data_dir))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    # the uninterrupted run first: the one to be killed then finds its programs compiled
    uncut = _run(framework, *run, *data, "--out", str(whole))
    assert uncut.returncode == 0, uncut.stderr
    proc = subprocess.Popen(
        _cmd(framework, *run, *data, "--out", str(cut)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while checkpoint.latest(cut) is None and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    status = json.loads((cut / "status.json").read_text())
    assert status["status"] == "running", "the run ended before it could be killed"
    assert status["epochs_completed"] == len(_rows(cut)) >= 1
    assert not (cut / "summary.json").exists()
    found = checkpoint.latest(cut)
    assert found is not None and 1 <= found[0] < 3  # epochs are left to resume

    (cut / "checkpoints" / ".tmp-epoch_9-1").mkdir()  # a write that a kill cut short
    res = _run(framework, "--resume", str(cut), *data, "--quiet", "--no-progress")
    assert res.returncode == 0, res.stderr

    assert _rows(cut) == _rows(whole)
    final = json.loads((cut / "summary.json").read_text())
    want = json.loads((whole / "summary.json").read_text())
    assert final["final"] == want["final"] and final["step_losses"] == want["step_losses"]
    assert json.loads((cut / "status.json").read_text())["status"] == "done"
    epochs_a, a = _final_weights(framework, whole)
    epochs_b, b = _final_weights(framework, cut)
    assert epochs_a == epochs_b == 3 and len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert [p.name for p in (cut / "checkpoints").iterdir()] == ["epoch_3"]  # only the latest


def _main_in_process(framework: str, capsys: pytest.CaptureFixture[str], *args: str) -> tuple:
    """(exit code, stderr) of the trainer's own `main`, here: refusals need no new process."""
    module = importlib.import_module(MODULES[framework])
    capsys.readouterr()
    try:
        code = module.main(list(args))
    except SystemExit as e:  # a refusal at parse time
        code = e.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_resume_without_checkpoint_is_one_line(
    framework: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "config.json").write_text(configs.get_config("tiny").to_json())
    (tmp_path / "checkpoints" / ".tmp-epoch_1-7").mkdir(parents=True)  # incomplete: ignored
    code, err = _main_in_process(framework, capsys, "--resume", str(tmp_path))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "no checkpoint" in err and "--checkpoint-every" in err


def test_resume_refuses_a_contradicting_flag_and_a_folder_without_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = configs.get_config("tiny")
    (tmp_path / "config.json").write_text(cfg.to_json())
    code, err = _main_in_process("jax", capsys, "--resume", str(tmp_path), "--lr", "0.5")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--lr 0.5 contradicts" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _main_in_process("jax", capsys, "--resume", str(empty))
    assert code == 2 and len(err.splitlines()) == 1 and "no config.json" in err, err


def test_latest_reads_only_complete_checkpoints(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path) is None
    cfg = configs.get_config("tiny").replace(checkpoint_every=1)

    def write(folder: Path) -> None:
        (folder / "state.bin").write_bytes(b"x")

    checkpoint.save(tmp_path, 1, {"rows": []}, write)
    stray = tmp_path / "checkpoints" / ".tmp-epoch_5-123"
    stray.mkdir()
    (tmp_path / "checkpoints" / "epoch_4").mkdir()  # no progress.json: not complete
    epoch, path = checkpoint.latest(tmp_path) or (0, tmp_path)
    assert epoch == 1 and (path / "state.bin").read_bytes() == b"x"
    checkpoint.save(tmp_path, 2, {"rows": []}, write)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch_2"]  # older ones and strays removed once the new one is in place
    assert checkpoint.should_save(cfg, 0)
    assert not checkpoint.should_save(cfg.replace(checkpoint_every=0), 0)
    assert not checkpoint.should_save(cfg.replace(checkpoint_every=2), 0)


def test_signals_during_a_write_wait_for_its_end() -> None:
    """Ctrl-C inside `deferred_signals` is raised when the block ends, not in it."""
    import os
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    reached = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with checkpoint.deferred_signals():
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):  # Python would raise here, between bytecodes
                    pass
                reached.append(True)
        assert reached == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
