"""Faults replayed for real: Ctrl-C at each phase of each command, in a child process.

Every command promises the same on Ctrl-C: exit 130, one line on stderr that
starts with "interrupted", no traceback, a status that tells the truth, no
temporary or half-written file, and no empty folder left behind by a command
that wrote nothing. (Resume after SIGKILL equals an uninterrupted run: tests/test_checkpoint.py.)

Bad input, too, is replayed as a user types it, from one table of cases across every
entry point (each output place as a file, a folder of results, an unwritable place;
every numeric flag out of range or not a number; junk, empty and missing data): each
command refuses it before any work, in one line with exit status 2, and no file it
finds changes (content hash and mtime). The table runs in this process through each
entry point's `main(argv)`; a few of its cases run as real `python -m` processes too.

The moment of a signal is chosen by the child's launcher, not by the project:
it wraps one function (the data loader, the XLA compiler, the epoch recorder,
the checkpoint writer, the bench warm-up, the parity suite) so that a real
signal (SIGINT, or `FAULT_SIGNAL`) is sent to the child while its
`FAULT_CALL`-th call runs. A signal that lands inside C code (an XLA
compilation) is raised when control returns to Python, as a terminal's Ctrl-C is.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jaxbench import checkpoint, configs
from jaxbench import data as data_module

# Ctrl-C as in a terminal: a job started in the background (as CI may start the tests)
# inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
_LAUNCHER = r"""
import importlib, os, signal, sys, threading
signal.signal(signal.SIGINT, signal.default_int_handler)
module, target, delay, *argv = sys.argv[1:]
if target:
    where, _, attr = target.partition(":")
    owner = importlib.import_module(where)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(True)
        if len(calls) == int(os.environ.get("FAULT_CALL", "1")):
            sig = getattr(signal, os.environ.get("FAULT_SIGNAL", "SIGINT"))
            threading.Timer(float(delay), os.kill, (os.getpid(), sig)).start()
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)
sys.exit(importlib.import_module(module).main(argv))
"""

TINY = ["--config", "tiny", "--subset", "1000", "--test-subset", "200", "--widths", "8,8,8,8",
        "--batch-size", "100", "--lr-peak-epoch", "1"]  # fmt: skip


def _run(module: str, target: str, delay: float, argv: list[str], env: dict[str, str]) -> tuple:
    """(exit code, stdout, stderr) of `module.main(argv)` with SIGINT `delay` s into `target`."""
    res = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, module, target, str(delay), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return res.returncode, res.stdout, res.stderr


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The child's environment, with its own temporary folder (checked empty afterwards),
    and without the test run's shared XLA cache: compiling as a user's first run does keeps
    each signal's moment where it was aimed, and the commands' own caches in TMPDIR."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cache = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")  # fmt: skip
    return {k: v for k, v in os.environ.items() if k not in cache} | {"TMPDIR": str(tmp)}


def _assert_interrupted(code: int, out: str, err: str, starts: str, expect: int = 130) -> None:
    assert code == expect, (code, err[-3000:])
    assert "Traceback" not in err + out, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(starts), err[-3000:]


def _leftovers(folder: Path) -> list[str]:
    """Temporary or half-written files anywhere under `folder`."""
    if not folder.exists():
        return []
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.name.startswith(".") or p.suffix in (".tmp", ".part")
    )


def _assert_true_status(run: Path) -> None:
    """status.json says interrupted, and its epoch count is the metrics file's row count."""
    status = json.loads((run / "status.json").read_text())
    rows = (run / "metrics.jsonl").read_text().splitlines() if status["epochs_completed"] else []
    assert status["status"] == "interrupted", status
    assert status["epochs_completed"] == len(rows), (status, rows)
    assert all(json.loads(r)["epoch"] == i + 1 for i, r in enumerate(rows))
    assert not (run / "summary.json").exists()


TRAINER_PHASES = [
    # (trainer module, where the signal lands, delay s, epochs, what the one line says)
    ("jaxbench.train", "jaxbench.data:load_dataset", 0.0, 3, "before"),
    ("jaxbench.train", "jax.stages:Lowered.compile", 0.1, 3, "before"),
    ("jaxbench.train", "jaxbench.report:RunRecorder.epoch", 0.3, 40, "after"),
    ("torch_ref.train", "jaxbench.data:load_dataset", 0.0, 3, "before"),
    ("torch_ref.train", "torch_ref.train:setup", 0.1, 3, "before"),
    ("torch_ref.train", "jaxbench.report:RunRecorder.epoch", 0.3, 40, "after"),
    ("jaxbench.train", "jaxbench.checkpoint:save", 0.05, 3, "after"),
    ("torch_ref.train", "jaxbench.checkpoint:save", 0.05, 3, "after"),
]


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize(
    "module,target,delay,epochs,when",
    TRAINER_PHASES,
    ids=[f"{m.split('.')[0]}-{t.rpartition(':')[2]}" for m, t, *_ in TRAINER_PHASES],
)
def test_ctrl_c_in_a_trainer(
    real_data_dir: Path,
    tmp_path: Path,
    env: dict[str, str],
    module: str,
    target: str,
    delay: float,
    epochs: int,
    when: str,
) -> None:
    run = tmp_path / "run"
    argv = [*TINY, "--epochs", str(epochs), "--data-dir", str(real_data_dir), "--out", str(run),
            "--no-progress", "--checkpoint-every", "1"]  # fmt: skip
    code, out, err = _run(module, target, delay, argv, env)
    if when == "before":
        _assert_interrupted(code, out, err, "interrupted before training started; nothing written")
        assert not run.exists(), sorted(p.name for p in run.iterdir())
    else:
        _assert_interrupted(code, out, err, "interrupted after epoch ")
        _assert_true_status(run)
        done = json.loads((run / "status.json").read_text())["epochs_completed"]
        assert 1 <= done < epochs
        saved = checkpoint.latest(run)  # a checkpoint is whole, and never ahead of the rows
        assert saved is None or (saved[0] <= done and (saved[1] / "progress.json").is_file())
    assert _leftovers(run) == [] and _leftovers(Path(env["TMPDIR"])) == []


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("module", ["jaxbench.train", "torch_ref.train"])
def test_sigterm_in_a_trainer(
    real_data_dir: Path, tmp_path: Path, env: dict[str, str], module: str
) -> None:
    """A scheduler's time limit or `timeout`: the run stops as on Ctrl-C, exit 143."""
    run = tmp_path / "run"
    argv = [*TINY, "--epochs", "40", "--data-dir", str(real_data_dir), "--out", str(run),
            "--no-progress"]  # fmt: skip
    target = "jaxbench.report:RunRecorder.epoch"
    code, out, err = _run(module, target, 0.3, argv, {**env, "FAULT_SIGNAL": "SIGTERM"})
    _assert_interrupted(code, out, err, "terminated after epoch ", expect=143)
    _assert_true_status(run)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize(
    "target", ["jaxbench.bench.cli:load_data", "jaxbench.bench.race:Bench.warmups"]
)
def test_ctrl_c_in_the_bench(
    real_data_dir: Path, tmp_path: Path, env: dict[str, str], target: str
) -> None:
    out = tmp_path / "bench"
    argv = [*TINY, "--epochs", "20", "--frameworks", "jax", "--runs", "2", "--target", "0.1",
            "--data-dir", str(real_data_dir), "--out", str(out)]  # fmt: skip
    code, stdout, err = _run(
        "jaxbench.bench.cli", target, 0.0 if "load" in target else 0.5, argv, env
    )
    if "load" in target:
        _assert_interrupted(
            code, stdout, err, f"interrupted before the race started; nothing written to {out}"
        )
        assert not out.exists()
    else:
        _assert_interrupted(code, stdout, err, f"interrupted; partial results in {out}")
        doc = json.loads((out / "bench.json").read_text())
        assert doc["complete"] is False and doc["stop_reason"] == "interrupted (Ctrl-C)"
    assert _leftovers(out) == [] and _leftovers(Path(env["TMPDIR"])) == []


@pytest.mark.slow
@pytest.mark.realdata
def test_ctrl_c_in_a_sweep(real_data_dir: Path, tmp_path: Path, env: dict[str, str]) -> None:
    """During the third run: two rows kept, the summary of them written, one line. Two
    short runs, then a long one for the signal to land in (0.5 s after the second row)."""
    out = tmp_path / "sweep"
    argv = ["--config", "tiny", "--set", "subset=1000", "test_subset=200", "widths=8,8,8,8",
            "batch_size=100", "lr_peak_epoch=0.5", "--grid", "epochs=1,2,20", "--data-dir",
            str(real_data_dir), "--out", str(out), "--no-progress"]  # fmt: skip
    code, stdout, err = _run(
        "jaxbench.sweep", "jaxbench.sweep:append_run", 0.5, argv, {**env, "FAULT_CALL": "2"}
    )
    _assert_interrupted(code, stdout, err, "interrupted after 2 runs; they are in ")
    rows = [json.loads(r) for r in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["cell"]["epochs"] for r in rows] == [1, 2]
    assert json.loads((out / "summary.json").read_text())["runs"] == 2
    assert _leftovers(out) == []


@pytest.mark.slow
@pytest.mark.realdata
def test_ctrl_c_in_the_parity_suite(
    real_data_dir: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    """Ctrl-C as check 2 starts: mid-suite however fast the checks run."""
    out = tmp_path / "parity"
    argv = ["--quick", "--checks", "1,2,3,4,5,6", "--quiet", "--data-dir", str(real_data_dir),
            "--out", str(out)]  # fmt: skip
    code, stdout, err = _run(
        "parity.__main__", "parity.suite:run_check", 0.0, argv, {**env, "FAULT_CALL": "2"}
    )
    _assert_interrupted(code, stdout, err, f"interrupted; nothing written to {out}")
    assert not out.exists()
    assert list(Path(env["TMPDIR"]).iterdir()) == []  # the XLA cache folder is gone too


def test_ctrl_c_during_a_download(tmp_path: Path, env: dict[str, str]) -> None:
    """The archive arrives through a pipe that stalls after a few bytes; Ctrl-C then."""
    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    pipe = mirror / "cifar-10-binary.tar.gz"
    os.mkfifo(pipe)
    stop = threading.Event()

    def serve() -> None:
        with open(pipe, "wb") as f:  # blocks until the child opens its end
            f.write(b"\x1f\x8b" + bytes(1000))
            f.flush()
            stop.wait(120)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    child_env = {k: v for k, v in env.items() if k != "JAXBENCH_DATA_DIR"}
    child_env.update(JAXBENCH_CACHE_DIR=str(cache), JAXBENCH_CIFAR_URL=mirror.as_uri() + "/")
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, "jaxbench.data", "", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(cache.glob(".cifar-*.tmp")):
            time.sleep(0.05)
        assert list(cache.glob(".cifar-*.tmp")), "the download never started"
        time.sleep(0.5)  # the child is now waiting for more bytes
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        stop.set()
        proc.kill()
    _assert_interrupted(proc.returncode, out, err, "interrupted; nothing new kept in the cache")
    assert not cache.exists()  # the folder the download made is gone with its file


@pytest.mark.slow
@pytest.mark.realdata
def test_ctrl_c_reaches_a_planted_parity_child_once(
    real_data_dir: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    """A source plant runs the suite in a child process. Ctrl-C in a terminal signals the
    whole foreground process group: the child must hear it once (from the parent) and
    report it once; the parent exits with its code and adds nothing."""
    out = tmp_path / "parity"
    argv = ["--plant", "whiten_eps_airbench", "--quick", "--data-dir", str(real_data_dir),
            "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, "parity.__main__", "", "0", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        process_group=0,  # a terminal's foreground group: the parent leads it
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the child's progress lines come through the same pipe
            lines.append(line)
            if line.startswith("check 2"):
                os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
                break
        lines += proc.stderr.readlines()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    err = "".join(lines)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.count("interrupted") == 1, err[-3000:]
    assert lines[-1].startswith(f"interrupted; nothing written to {out}"), err[-3000:]
    assert not out.exists() and list(Path(env["TMPDIR"]).iterdir()) == []


@pytest.mark.slow
@pytest.mark.realdata
def test_sigkill_while_a_checkpoint_is_written_then_resume(
    real_data_dir: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    """No Python code runs after SIGKILL: the status stays `running` (the one thing
    it cannot update), the half-written checkpoint is never read, and --resume
    continues from the last complete one and finishes with a true folder."""
    run = tmp_path / "run"
    argv = [*TINY, "--epochs", "3", "--data-dir", str(real_data_dir), "--out", str(run),
            "--no-progress", "--checkpoint-every", "1"]  # fmt: skip
    target = "jaxbench.checkpoint:save"  # the second save: epoch 2, epoch 1's is complete
    kill = {**env, "FAULT_SIGNAL": "SIGKILL", "FAULT_CALL": "2"}
    code, _, _ = _run("jaxbench.train", target, 0.0, argv, kill)
    assert code == -signal.SIGKILL
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "running" and status["epochs_completed"] == 2
    from jaxbench import train  # the resume is the trainer's own main, here

    assert train.main(["--resume", str(run), "--no-progress", "--quiet"]) == 0
    status = json.loads((run / "status.json").read_text())
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert status["status"] == "done" and [r["epoch"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_3"]
    assert _leftovers(run) == []


# --- bad input: one line, exit 2, nothing touched ----------------------------------------------
#
# One table of cases across every `python -m` entry point, called in this process through
# the entry point's own `main(argv)`: the same parser, checks and command wrapper as a
# user's `python -m`, without a new interpreter and JAX start per case. A few cases
# (`test_bad_input_as_a_user_types_it`) run as real `python -m` processes too.
#
# Every case starts from the same place (`world`): a file, a folder of every command's
# results, an empty folder, and broken data. The data loader is replaced by one that
# fails the test, so a command that would start work before refusing is caught at once
# (cases with `loads=True` run the real loader on the broken data).


class WorkStarted(BaseException):
    """The command got past its checks and asked for the data: the bad input went unseen."""


def _no_work(*args: object, **kwargs: object) -> None:
    raise WorkStarted("the command started loading data instead of refusing its input")


@dataclass(frozen=True)
class Case:
    """One bad input: `entry`'s base flags plus `argv` ({file}, {full}, {empty}, {junk},
    {junk_tar}, {empty_tar}, {missing}: places in the world); the one line must hold `says`."""

    entry: str
    argv: tuple[str, ...]
    says: str
    loads: bool = False  # the real data loader runs (broken data is the fault)
    code: int = 2


_TRAINER = ("--config", "tiny", "--subset", "1000", "--test-subset", "200", "--widths",
            "8,8,8,8", "--batch-size", "100", "--lr-peak-epoch", "1")  # fmt: skip
_BASE: dict[str, tuple[str, ...]] = {
    "jaxbench.train": _TRAINER,
    "torch_ref.train": _TRAINER,
    "jaxbench.bench": (*_TRAINER, "--frameworks", "jax", "--runs", "1"),
    "jaxbench.microbench": (*_TRAINER, "--reps", "2"),
    "jaxbench.sweep": ("--config", "tiny", "--set", "subset=1000", "--grid", "lr=0.1"),
    "parity": ("--quick",),
    "jaxbench.data": (),
}
_MAIN_MODULE = {"parity": "parity.__main__", "jaxbench.bench": "jaxbench.bench.cli"}
_OUT_FOLDER = ("jaxbench.train", "torch_ref.train", "jaxbench.bench", "jaxbench.sweep", "parity")
_TRAINERS = ("jaxbench.train", "torch_ref.train")
_CONFIG_CLIS = (*_TRAINERS, "jaxbench.bench", "jaxbench.microbench")

# Every numeric config flag: a value out of its range (and what the line names).
_OUT_OF_RANGE = [
    ("--subset", "0", "--subset 0"),
    ("--test-subset", "0", "--test-subset"),
    ("--output-scale", "0", "--output-scale"),
    ("--bn-momentum", "0", "--bn-momentum"),
    ("--bn-momentum", "2", "--bn-momentum"),
    ("--bn-eps", "0", "--bn-eps"),
    ("--epochs", "0", "--epochs"),
    ("--batch-size", "0", "--batch-size"),
    ("--lr", "nan", "--lr"),
    ("--lr", "inf", "--lr"),
    ("--lr", "-1", "--lr"),
    ("--lr-peak-epoch", "0", "--lr-peak-epoch"),
    ("--lr-peak-epoch", "1e12", "--lr-peak-epoch"),
    ("--lr-start", "-1", "--lr-start"),
    ("--lr-end", "nan", "--lr-end"),
    ("--lr-flat-epochs", "-1", "--lr-flat-epochs"),
    ("--momentum", "1.0", "--momentum"),
    ("--momentum", "-1", "--momentum"),
    ("--weight-decay", "-1", "--weight-decay"),
    ("--bn-bias-lr-mult", "-1", "--bn-bias-lr-mult"),
    ("--bn-bias-wd-mult", "nan", "--bn-bias-wd-mult"),
    ("--label-smoothing", "1", "--label-smoothing"),
    ("--ema-every", "-1", "--ema-every"),
    ("--ema-momentum", "1", "--ema-momentum"),
    ("--bn-scale", "0", "--bn-scale"),
    ("--celu-alpha", "0", "--celu-alpha"),
    ("--ghost-bn", "7", "--ghost-bn 7"),
    ("--whiten-eps", "0", "--whiten-eps"),
    ("--whiten-images", "0", "--whiten-images"),
    ("--whiten-bias-epochs", "-1", "--whiten-bias-epochs"),
    ("--eval-batch-size", "0", "--eval-batch-size"),
    ("--eval-every", "0", "--eval-every"),
    ("--crop-pad", "17", "--crop-pad"),
    ("--cutout", "33", "--cutout"),
    ("--checkpoint-every", "-1", "--checkpoint-every"),
    ("--widths", "0,8,8,8", "--widths"),
    ("--widths", "8,8", "--widths"),
    # ... above its range: each line names the flag, the range and the value given
    ("--lr", "20000", "--lr must be a positive finite number in (0, 10000], e.g. 0.4; got 20000.0"),
    ("--weight-decay", "1", "--weight-decay must be a finite number in [0, 1), e.g. 5e-4; got 1.0"),
    ("--lr-start", "2", "--lr-start must be a finite number in [0, 1], e.g. 0.2"),
    ("--lr-end", "1.5", "--lr-end must be a finite number in [0, 1], e.g. 0.1"),
    ("--lr-flat-epochs", "4", "--lr-flat-epochs must be in [0, --epochs] = [0, 3], got 4.0"),
    ("--output-scale", "1000", "--output-scale must be a positive finite number in (0, 100]"),
    ("--bn-eps", "2", "--bn-eps must be a positive finite number in (0, 1], e.g. 1e-5; got 2.0"),
    ("--bn-scale", "1000", "--bn-scale must be a positive finite number in (0, 100]"),
    ("--celu-alpha", "inf", "--celu-alpha must be a positive finite number in (0, 100]"),
    ("--whiten-eps", "2", "--whiten-eps must be a positive finite number in (0, 1]"),
    ("--bn-bias-lr-mult", "1e4", "--bn-bias-lr-mult must be a finite number in [0, 1000]"),
    ("--bn-bias-wd-mult", "1e4", "--bn-bias-wd-mult must be a finite number in [0, 1000]"),
    ("--muon-lr", "0", "--muon-lr must be a positive finite number in (0, 100]"),
    ("--muon-lr", "1000", "--muon-lr must be a positive finite number in (0, 100]"),
    ("--seed", "-1", "--seed must be in [0, 2147483647] (0 to 2**31 - 1), got -1"),
    ("--seed", "2147483648", "--seed must be in [0, 2147483647] (0 to 2**31 - 1), got 2147483648"),
]
# Every count just past the top of its range (`configs.COUNT_RANGES`, the subsets, widths).
_ABOVE_COUNT = [
    ("--epochs", "1001", "--epochs must be in [1, 1000] epochs, got 1001"),
    ("--batch-size", "65537", "--batch-size must be in [1, 65536] images, got 65537"),
    ("--eval-batch-size", "65537", "--eval-batch-size must be in [1, 65536] images, got 65537"),
    ("--eval-every", "1001", "--eval-every must be in [1, 1000] epochs (the last epoch is "
     "always evaluated), got 1001"),
    ("--ema-every", "100001", "--ema-every must be in [0, 100000] steps (0: no EMA), got 100001"),
    ("--whiten-images", "50001", "--whiten-images must be in [1, 50000] training images, "
     "got 50001"),
    ("--whiten-bias-epochs", "1001", "--whiten-bias-epochs must be a finite number in [0, 1000]"),
    ("--checkpoint-every", "1001", "--checkpoint-every must be in [0, 1000] epochs (0: no "
     "checkpoints), got 1001"),
    ("--devices", "1025", "--devices must be in [0, 1024] devices per process"),
    ("--subset", "50001", "--subset must be in [--batch-size, 50000] = [100, 50000] images "
     "(cifar10's training set), got 50001"),
    ("--test-subset", "10001", "--test-subset must be in [1, 10000] images (cifar10's test "
     "set), got 10001"),
    ("--widths", "8,8,8,4097", "--widths entries must be in [1, 4096] channels, e.g. "
     "16,32,64,128; got 8,8,8,4097"),
]  # fmt: skip
# ... and every numeric config flag given something that is not a number.
_NOT_A_NUMBER = sorted({flag for flag, _, _ in _OUT_OF_RANGE} | {"--seed", "--devices"})
# Every named choice given a name it does not know.
_CHOICES = ["--config", "--dataset", "--precision", "--loop", "--flip", "--activation",
            "--whiten", "--stream", "--model", "--loss-reduction", "--source",
            "--whiten-bias-init"]  # fmt: skip


def _cases() -> list[Case]:
    """The table: every entry point, its output places, its numbers, its data."""
    c: list[Case] = []
    for entry in _TRAINERS:
        c += [Case(entry, (f, v), says) for f, v, says in _OUT_OF_RANGE]
        c += [Case(entry, (f, "abc"), f) for f in _NOT_A_NUMBER]
        c += [Case(entry, (f, "nope"), f) for f in _CHOICES]
        c += [
            Case(entry, ("--resume", "{file}"), "is a file, not a folder"),
            Case(entry, ("--resume", "{empty}"), "holds no run"),
            Case(entry, ("--resume", "{missing}"), "holds no run"),
            Case(entry, ("--devices", "-1"), "--devices"),
        ]
    c += [
        Case("jaxbench.train", ("--resume", "{full}"), "contradicts the run's saved config"),
        Case("jaxbench.train", ("--dist-timeout", "0"), "--dist-timeout"),
        Case("jaxbench.train", ("--vmap-seeds", "0"), "--vmap-seeds 0"),
        Case("jaxbench.train", ("--vmap-seeds", "-1"), "--vmap-seeds -1"),
        Case("jaxbench.train", ("--vmap-seeds", "2", "--checkpoint-every", "1"),
             "drop --checkpoint-every"),
        Case("jaxbench.train", ("--vmap-seeds", "2", "--out", "{full}"), "already holds results"),
        Case("jaxbench.train", ("--vmap-seeds", "2", "--out", "{file}"), "is a file"),
        Case("jaxbench.train", ("--vmap-seeds", "2", "--devices", "2"), "--devices 2"),
        Case("jaxbench.train", ("--coordinator", "localhost:1234"), "--num-processes"),
        Case("jaxbench.train", ("--coordinator", "localhost:1", "--num-processes", "2",
                                "--process-id", "-1"), "--process-id -1"),
        Case("torch_ref.train", ("--devices", "2"), "torchrun"),
        Case("torch_ref.train", ("--vmap-seeds", "2"), "--vmap-seeds"),
    ]  # fmt: skip
    for entry in _OUT_FOLDER:  # every output folder: a file, a result, unwritable, under a file
        c += [
            Case(entry, ("--out", "{file}"), "is a file"),
            Case(entry, ("--out", "{full}"), "already holds results"
                 if entry != "jaxbench.sweep" else "holds a different sweep"),
            Case(entry, ("--out", "/proc/jaxbench-faults/out"), "not writable"),
            Case(entry, ("--out", "{file}/sub"), "not writable (Not a directory)"),
        ]  # fmt: skip
    for entry in (*_OUT_FOLDER, "jaxbench.microbench", "jaxbench.data"):
        c.append(Case(entry, ("--no-such-flag",), "--no-such-flag"))
    for entry in (*_OUT_FOLDER, "jaxbench.microbench"):  # broken data: the real loader runs
        c += [
            Case(entry, ("--data-dir", "{junk}"), "batches.meta.txt", loads=True),
            Case(entry, ("--data-dir", "{empty_tar}"), "is an empty file", loads=True),
        ]
    c += [
        Case("jaxbench.data", ("--data-dir", "{junk}", "--no-download"), "batches.meta.txt", True),
        Case("jaxbench.data", ("--data-dir", "{junk_tar}", "--no-download"), "md5", True),
        Case("jaxbench.data", ("--data-dir", "{empty_tar}", "--no-download"), "an empty file",
             True),
        Case("jaxbench.data", ("--data-dir", "{missing}", "--no-download"), "does not exist",
             True),
        Case("jaxbench.data", ("--data-dir", "{empty}", "--no-download"), "holds no cifar10",
             True),
        Case("jaxbench.data", ("--dataset", "mnist"), "--dataset"),
        Case("jaxbench.data", ("--source", "nope"), "--source"),
        Case("jaxbench.train", ("--data-dir", "{junk_tar}"), "md5", True),
        Case("jaxbench.train", ("--data-dir", "{missing}"), "does not exist", True),
    ]  # fmt: skip
    c += [  # the microbench's --out names a file
        Case("jaxbench.microbench", ("--out", "{full}"), "is a folder, not a file"),
        Case("jaxbench.microbench", ("--out", "{file}"), "already exists; pass --overwrite"),
        Case("jaxbench.microbench", ("--out", "/proc/jaxbench-faults/out.json"), "not writable"),
        Case("jaxbench.microbench", ("--out", "{file}/x.json"), "not writable (Not a directory)"),
        Case("jaxbench.microbench", ("--reps", "0"), "--reps"),
        Case("jaxbench.microbench", ("--reps", "1"), "--reps"),
        Case("jaxbench.microbench", ("--reps", "abc"), "--reps"),
    ]
    for entry in ("jaxbench.bench", "jaxbench.microbench"):  # the shared config flags
        c += [
            Case(entry, ("--lr", "nan"), "--lr"),
            Case(entry, ("--momentum", "1.0"), "--momentum"),
            Case(entry, ("--epochs", "0"), "--epochs"),
            Case(entry, ("--batch-size", "abc"), "--batch-size"),
        ]
    c += [  # the bench's own flags: every number in its range, every flag it lists works
        Case("jaxbench.bench", ("--runs", "0"), "--runs takes 1 to"),
        Case("jaxbench.bench", ("--runs", "100000"), "--runs takes 1 to"),
        Case("jaxbench.bench", ("--max-seconds", "0"), "--max-seconds"),
        Case("jaxbench.bench", ("--max-seconds", "nan"), "--max-seconds"),
        Case("jaxbench.bench", ("--max-seconds", "1e12"), "--max-seconds"),
        Case("jaxbench.bench", ("--target", "0"), "--target"),
        Case("jaxbench.bench", ("--target", "94"), "--target"),
        Case("jaxbench.bench", ("--target", "nan"), "--target"),
        Case("jaxbench.bench", ("--vmap-seeds", "0"), "--vmap-seeds takes K from 2"),
        Case("jaxbench.bench", ("--vmap-seeds", "1"), "--vmap-seeds takes K from 2"),
        Case("jaxbench.bench", ("--vmap-seeds", "100000"), "--vmap-seeds takes K from 2"),
        Case("jaxbench.bench", ("--checkpoint-every", "1", "--out", "{full}", "--overwrite"),
             "nothing to checkpoint"),
        Case("jaxbench.bench", ("--profile", "{file}"), "--profile"),
        Case("jaxbench.bench", ("--profile", "{file}", "--out", "{full}", "--overwrite"),
             "is a file"),
        Case("jaxbench.bench", ("--profile", "/proc/jaxbench-faults/traces"), "not writable"),
        Case("jaxbench.bench", ("--frameworks", "mxnet"), "--frameworks"),
        Case("jaxbench.bench", ("--config", "nope"), "unknown preset 'nope'"),
        Case("jaxbench.bench", ("--loop", "fast"), "--loop"),
    ]  # fmt: skip
    c += [  # the sweep's flags and grid
        Case("jaxbench.sweep", ("--set", "lr=nan"), "lr"),
        Case("jaxbench.sweep", ("--set", "epochs=0"), "--epochs"),
        Case("jaxbench.sweep", ("--set", "lr"), "expected FIELD=VALUE"),
        Case("jaxbench.sweep", ("--set", "nope=1"), "'nope' is not a config field"),
        Case("jaxbench.sweep", ("--grid", "lr=0.2,"), "an empty value"),
        Case("jaxbench.sweep", ("--grid", "lr=0.1", "lr=0.2"), "names lr twice"),
        Case("jaxbench.sweep", ("--grid", "lr=fast"), "is not a valid value"),
        Case("jaxbench.sweep", ("--grid", "nope=1"), "'nope' is not a config field"),
        Case("jaxbench.sweep", ("--grid",), "expected at least one argument"),
        Case("jaxbench.sweep", ("--seeds", "0"), "--seeds"),
        Case("jaxbench.sweep", ("--seeds", "abc"), "--seeds"),
        Case("jaxbench.sweep", ("--vmap-seeds", "0"), "--vmap-seeds"),
        Case("jaxbench.sweep", ("--shard", "2/2"), "--shard 2/2"),
        Case("jaxbench.sweep", ("--shard", "0/0"), "--shard 0/0"),
        Case("jaxbench.sweep", ("--shard", "x"), "--shard 'x'"),
        Case("jaxbench.sweep", ("--workers", "0"), "--workers"),
        Case("jaxbench.sweep", ("--workers", "1000"), "--workers 1000"),
        Case("jaxbench.sweep", ("--frameworks", "mxnet"), "--frameworks"),
        Case("jaxbench.sweep", ("--merge", "{missing}"), "not a sweep folder"),
        Case("jaxbench.sweep", ("--merge", "{file}"), "not a sweep folder"),
        Case("jaxbench.sweep", ("--merge", "{empty}"), "not a sweep folder"),
    ]
    c += [  # the parity suite's flags
        Case("parity", ("--seeds", "0"), "--seeds"),
        Case("parity", ("--epochs", "0"), "--epochs"),
        Case("parity", ("--threads", "0"), "--threads"),
        Case("parity", ("--threads", "abc"), "--threads"),
        Case("parity", ("--checks", "9"), "--checks"),
        Case("parity", ("--checks", "3-1"), "--checks"),
        Case("parity", ("--checks", "x"), "--checks"),
        Case("parity", ("--plant", "nope"), "unknown --plant 'nope'"),
        Case("parity", ("--config", "nope"), "--config"),
    ]
    return c


def _range_cases() -> list[Case]:
    """Each command's own numbers above their ranges, flags that do not apply to the
    command as given, and a finished `--vmap-seeds` run asked to run again."""
    wait = "--dist-timeout must be seconds in [1, 86400] (up to a day), got"
    c = [
        Case("torch_ref.train", ("--dist-timeout", "0"), f"{wait} 0"),
        Case("torch_ref.train", ("--dist-timeout", "100000"), f"{wait} 100000"),
        Case("jaxbench.train", ("--dist-timeout", "100000"), f"{wait} 100000"),
        Case("jaxbench.train", ("--seed", "2147483647", "--vmap-seeds", "2"),
             "--vmap-seeds 2 from --seed 2147483647 goes past the largest seed, 2147483647"),
        Case("jaxbench.microbench", ("--out", "{file}/sub/x.json"),
             "not writable (Not a directory)"),  # as the folder commands' --out {file}/sub
        Case("jaxbench.microbench", ("--reps", "1001"), "--reps must be in [2, 1000] A/B pairs, "
             "got 1001"),
        Case("jaxbench.sweep", ("--seeds", "1001"), "--seeds must be in [1, 1000] seeds per cell "
             "(from seed 0), got 1001"),
        Case("jaxbench.sweep", ("--set", "seed=2147483647", "--seeds", "2"),
             "--seeds must be in [1, 1] seeds per cell (from seed 2147483647), got 2"),
        Case("jaxbench.sweep", ("--set", "seed=-1"), "--seed must be in [0, 2147483647]"),
        Case("jaxbench.sweep", ("--grid", "lr=20000"), "--lr must be a positive finite number "
             "in (0, 10000]"),
        Case("jaxbench.sweep", ("--vmap-seeds", "65"), "--vmap-seeds must be in [1, 64] seeds "
             "per program, got 65"),
        Case("jaxbench.bench", ("--torch-compile-mode", "max-autotune"),
             "--torch-compile-mode applies to the PyTorch contender: add torch to --frameworks"),
        Case("jaxbench.bench", ("--torch-compile",), "--torch-compile applies to the PyTorch"),
        Case("jaxbench.bench", ("--no-torch-compile",),
             "--no-torch-compile applies to the PyTorch contender"),
    ]  # fmt: skip
    for entry in ("jaxbench.bench", "jaxbench.microbench"):  # the shared config ranges
        c += [
            Case(entry, ("--lr", "20000"), "--lr must be a positive finite number in (0, 10000]"),
            Case(entry, ("--bn-eps", "2"), "--bn-eps must be a positive finite number in (0, 1]"),
            Case(entry, ("--epochs", "1001"), "--epochs must be in [1, 1000] epochs, got 1001"),
        ]
    for entry in _TRAINERS:  # each count just past its range
        c += [Case(entry, (f, v), says) for f, v, says in _ABOVE_COUNT]
    c += [
        Case("jaxbench.train", ("--vmap-seeds", "65"),
             "--vmap-seeds 65: give K in [1, 64] seeds per program"),
        Case("jaxbench.train", ("--coordinator", "localhost:1", "--num-processes", "4097",
                                "--process-id", "0"),
             "--num-processes must be in [1, 4096], got 4097"),
        Case("jaxbench.sweep", ("--set", "batch_size=65537"), "--batch-size must be in [1, 65536]"),
        Case("jaxbench.sweep", ("--grid", "epochs=2,1001"), "--epochs must be in [1, 1000]"),
        Case("jaxbench.sweep", ("--shard", "0/10001"), "--shard 0/10001: need 0 <= i < n <= 10000"),
        Case("parity", ("--seeds", "1001"), "--seeds must be in [1, 1000] seeds per framework, "
             "got 1001"),
        Case("parity", ("--epochs", "1001"), "--epochs must be in [1, 1000], got 1001"),
        Case("parity", ("--threads", "1025"), "--threads must be in [1, 1024]; got 1025"),
    ]  # fmt: skip
    for entry in _TRAINERS:  # no checkpoint to run a vmapped run again from
        c.append(Case(entry, ("--resume", "{vmap}", "--re-evaluate"),
                      "its --vmap-seeds run keeps no checkpoint to run again from"))  # fmt: skip
    return c


_CASES = _cases() + _range_cases()


def _case_id(case: Case) -> str:
    words = " ".join(a.strip("{}") for a in case.argv).replace("/", "_").replace(" ", "_")
    return f"{case.entry}-{words}"


def _world(root: Path) -> dict[str, str]:
    """The places every case starts from; nothing under `root` may change."""
    (root / "a_file").write_text("mine")
    full = root / "full"  # a folder holding every command's results
    full.mkdir()
    for produced in ("summary.json", "config.json", "metrics.jsonl", "bench.json",
                     "parity.json", "sweep.json", "runs.jsonl"):  # fmt: skip
        (full / produced).write_text("{}")
    (root / "empty").mkdir()
    junk = root / "junk" / "cifar-10-batches-bin"  # the official layout, bytes of nothing
    junk.mkdir(parents=True)
    for name in ("batches.meta.txt", *(f"data_batch_{i}.bin" for i in range(1, 6)),
                 "test_batch.bin"):  # fmt: skip
        (junk / name).write_bytes(bytes(range(256)) * 20)
    (root / "junk_archive").mkdir()  # an archive of the official name, not its bytes
    (root / "junk_archive" / "cifar-10-binary.tar.gz").write_bytes(bytes(range(256)) * 12)
    (root / "empty.tar.gz").write_bytes(b"")
    (root / "cache").mkdir()
    run = configs.get_config("tiny").replace(subset=1000, test_subset=200, widths=(8, 8, 8, 8),
                                             batch_size=100, lr_peak_epoch=1.0)  # fmt: skip
    status = json.dumps({"status": "done", "epochs_completed": 3})
    for name, result in (("done", "summary.json"), ("vmap", "seeds.json")):  # finished runs
        (root / name).mkdir()  # one run, and K seeds in one program (`--vmap-seeds`)
        (root / name / "config.json").write_text(run.to_json())
        (root / name / "status.json").write_text(status)
        (root / name / result).write_text("{}")
    return {
        "file": str(root / "a_file"),
        "full": str(full),
        "empty": str(root / "empty"),
        "junk": str(root / "junk"),
        "junk_tar": str(root / "junk_archive" / "cifar-10-binary.tar.gz"),
        "empty_tar": str(root / "empty.tar.gz"),
        "missing": str(root / "missing"),
        "done": str(root / "done"),
        "vmap": str(root / "vmap"),
    }


def _snapshot(root: Path) -> list[tuple[str, int, str]]:
    """Every path under `root`; a file with its mtime and content hash. (A folder's mtime
    is left out: checking that a folder is writable may make and remove a probe file.)"""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        if p.is_file()
        else (str(p.relative_to(root)), 0, "folder")
        for p in root.rglob("*")
    )


def _argv(case: Case, places: dict[str, str], root: Path) -> list[str]:
    argv = [*_BASE[case.entry], *(a.format(**places) for a in case.argv)]
    has_out = {"--out", "--resume"} & set(argv)
    if case.entry in _OUT_FOLDER and not has_out:
        argv += ["--out", str(root / "new")]
    return argv


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, dict[str, str]]]:
    """The pre-existing places, a cache of their own, no download, and the environment and
    signal handlers put back afterwards (an entry point may set either)."""
    root = tmp_path / "world"
    root.mkdir()
    places = _world(root)
    environ = dict(os.environ)
    monkeypatch.setenv("JAXBENCH_CACHE_DIR", str(root / "cache"))
    monkeypatch.setenv("JAXBENCH_CIFAR_URL", (tmp_path / "no-mirror").as_uri() + "/")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield root, places
    for s, h in handlers.items():
        signal.signal(s, h)
    for key in set(os.environ) - set(environ):
        monkeypatch.delenv(key)


@pytest.mark.parametrize("case", _CASES, ids=[_case_id(c) for c in _CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    world: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: Case,
) -> None:
    root, places = world
    if not case.loads:
        monkeypatch.setattr(data_module, "load_dataset", _no_work)
    main = importlib.import_module(_MAIN_MODULE.get(case.entry, case.entry)).main
    before = _snapshot(root)
    assert len(before) > 10
    try:
        code = main(_argv(case, places, root))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == case.code, (code, err[-3000:])
    assert "Traceback" not in err + out, err[-3000:]
    assert len(lines) == 1 and case.says in lines[0], err[-3000:]
    assert _snapshot(root) == before


@pytest.mark.parametrize("entry", _TRAINERS)
@pytest.mark.parametrize(
    "place,says",
    [
        ("done", "holds a run that finished after epoch 3: nothing to resume, nothing changed"),
        ("vmap", "holds --vmap-seeds runs that finished after epoch 3: nothing to resume, "
                 "nothing changed"),
    ],
)  # fmt: skip
def test_resume_of_a_finished_run_says_so_and_changes_nothing(
    world: tuple[Path, dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    entry: str,
    place: str,
    says: str,
) -> None:
    """Not an error: exit 0, one line on stdout, nothing on stderr, no file changed."""
    root, places = world
    monkeypatch.setattr(data_module, "load_dataset", _no_work)
    before = _snapshot(root)
    code = importlib.import_module(entry).main([*_BASE[entry], "--resume", places[place]])
    out, err = capsys.readouterr()
    assert code == 0 and err == "", (code, err[-3000:])
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{places[place]} {says}"), out
    assert _snapshot(root) == before


def test_the_table_covers_every_entry_point() -> None:
    """Each `python -m` command of the project is replayed, and enough cases in all."""
    assert {c.entry for c in _CASES} == set(_BASE)
    assert len(_CASES) >= 118
    assert len({_case_id(c) for c in _CASES}) == len(_CASES)  # distinct ids


_AS_TYPED = [  # (module, extra flags, what the one line must contain)
    ("jaxbench.train", ["--out", "{file}"], "is a file"),
    ("torch_ref.train", ["--lr", "nan"], "--lr"),
    ("torch_ref.train", ["--dist-timeout", "0"], "--dist-timeout must be seconds in [1, 86400]"),
    ("jaxbench.bench", ["--runs", "0"], "--runs"),
    ("jaxbench.sweep", ["--out", "{full}"], "holds a different sweep"),
    ("parity", ["--out", "{full}"], "already holds results"),
    ("jaxbench.microbench", ["--out", "{full}"], "is a folder, not a file"),
    ("jaxbench.data", ["--data-dir", "{empty_tar}", "--no-download"], "is an empty file"),
]


@pytest.mark.parametrize(
    "module,flags,says", _AS_TYPED, ids=[f"{m}-{f[0]}" for m, f, _ in _AS_TYPED]
)
def test_bad_input_as_a_user_types_it(
    tmp_path: Path, env: dict[str, str], module: str, flags: list[str], says: str
) -> None:
    """The same promise through a real `python -m` (its own `sys.exit`, a fresh JAX)."""
    root = tmp_path / "world"
    root.mkdir()
    places = _world(root)
    before = _snapshot(root)
    argv = [*_BASE[module], *(f.format(**places) for f in flags)]
    if module in _OUT_FOLDER and "--out" not in argv:
        argv += ["--out", str(root / "new")]
    env = {**env, "JAXBENCH_CACHE_DIR": str(root / "cache")}
    res = subprocess.run(
        [sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env, timeout=300
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert len(lines) == 1 and says in lines[0], res.stderr[-3000:]
    assert _snapshot(root) == before


def test_a_sigkilled_run_reads_stopped_without_a_word(tmp_path: Path) -> None:
    """Nothing writes at SIGKILL; `read_status` tells the dead run by its recorded pid."""
    from jaxbench.report import read_status

    run = tmp_path / "run"
    child = (
        "import os, signal, sys; from jaxbench.report import RunRecorder; "
        "RunRecorder({}, sys.argv[1], quiet=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    res = subprocess.run([sys.executable, "-c", child, str(run)], timeout=120)  # fmt: skip
    assert res.returncode == -signal.SIGKILL
    recorded = json.loads((run / "status.json").read_text())
    assert recorded["status"] == "running" and isinstance(recorded["pid"], int)
    status = read_status(run)
    assert status["status"] == "stopped without a word" and status["was"] == "running"
    alive = tmp_path / "alive"
    alive.mkdir()
    (alive / "status.json").write_text(json.dumps({**recorded, "pid": os.getpid()}))
    assert read_status(alive)["status"] == "running"
