"""Faults replayed for real: Ctrl-C at each phase of each command, in a child process.

Every command promises the same on Ctrl-C: exit 130, one line on stderr that
starts with "interrupted", no traceback, a status that tells the truth, no
temporary or half-written file, and no empty folder left behind by a command
that wrote nothing. (Resume after SIGKILL equals an uninterrupted run: tests/test_checkpoint.py.)

Bad input, too, is replayed as a user types it: each command refuses it
before any work, in one line with exit status 2, and touches nothing.

The moment of a signal is chosen by the child's launcher, not by the project:
it wraps one function (the data loader, the XLA compiler, the epoch recorder,
the checkpoint writer, the bench warm-up, the parity suite) so that a real
signal (SIGINT, or `FAULT_SIGNAL`) is sent to the child while its
`FAULT_CALL`-th call runs. A signal that lands inside C code (an XLA
compilation) is raised when control returns to Python, as a terminal's Ctrl-C is.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jaxbench import checkpoint

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
    """The child's environment, with its own temporary folder (checked empty afterwards)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {**os.environ, "TMPDIR": str(tmp)}


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
    code, stdout, err = _run("jaxbench.bench", target, 0.0 if "load" in target else 0.5, argv, env)
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
    """During the third run: two rows kept, the summary of them written, one line."""
    out = tmp_path / "sweep"
    argv = ["--config", "tiny", "--set", "subset=1000", "test_subset=200", "widths=8,8,8,8",
            "batch_size=100", "epochs=30", "--grid", "lr=0.1,0.2,0.4", "--data-dir",
            str(real_data_dir), "--out", str(out), "--no-progress"]  # fmt: skip
    code, stdout, err = _run(
        "jaxbench.sweep", "jaxbench.sweep:append_run", 0.5, argv, {**env, "FAULT_CALL": "2"}
    )
    _assert_interrupted(code, stdout, err, "interrupted after 2 runs; they are in ")
    rows = [json.loads(r) for r in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["cell"]["lr"] for r in rows] == [0.1, 0.2]
    assert json.loads((out / "summary.json").read_text())["runs"] == 2
    assert _leftovers(out) == []


@pytest.mark.slow
@pytest.mark.realdata
def test_ctrl_c_in_the_parity_suite(
    real_data_dir: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    out = tmp_path / "parity"
    argv = ["--quick", "--checks", "1,2,3,4,5,6", "--quiet", "--data-dir", str(real_data_dir),
            "--out", str(out)]  # fmt: skip
    code, stdout, err = _run("parity.__main__", "parity.suite:run_suite", 0.5, argv, env)
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
    res = subprocess.run(
        [sys.executable, "-m", "jaxbench.train", "--resume", str(run), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert status["status"] == "done" and [r["epoch"] for r in rows] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_3"]
    assert _leftovers(run) == []


# --- bad input: one line, exit 2, nothing touched ----------------------------------------------

_CLIS = {
    "jax": ["jaxbench.train", *TINY],
    "torch": ["torch_ref.train", *TINY],
    "bench": ["jaxbench.bench", *TINY, "--frameworks", "jax", "--runs", "1"],
    "parity": ["parity.__main__", "--quick"],
    "sweep": ["jaxbench.sweep", "--config", "tiny", "--set", "subset=1000", "--grid", "lr=0.1"],
    "micro": ["jaxbench.microbench", *TINY, "--reps", "2"],
}
_BAD = [
    # (name, extra flags ({out}: the --out path), which CLIs, what the line must contain)
    ("out is a file", ["--out", "{file}"], "jax torch bench parity sweep", "is a file"),
    ("out holds results", ["--out", "{full}"], "jax torch bench parity sweep",
     "already holds results"),
    ("out unwritable", ["--out", "/proc/jaxbench-faults/out"], "jax torch bench parity sweep micro",
     "not writable"),
    # the microbench's --out names a file
    ("out is a folder", ["--out", "{full}"], "micro", "is a folder, not a file"),
    ("out exists", ["--out", "{file}"], "micro", "already exists; pass --overwrite"),
    ("lr nan", ["--lr", "nan"], "jax torch bench micro", "--lr"),
    ("lr inf", ["--lr", "inf"], "jax torch bench micro", "--lr"),
    ("lr negative", ["--lr", "-1"], "jax torch bench micro", "--lr"),
    ("lr nan in a sweep", ["--set", "lr=nan"], "sweep", "lr"),
    ("grid trailing comma", ["--grid", "lr=0.2,"], "sweep", "an empty value"),
    ("grid key twice", ["--grid", "lr=0.1", "lr=0.2"], "sweep", "names lr twice"),
    ("grid not a number", ["--grid", "lr=fast"], "sweep", "is not a valid value"),
    ("grid empty", ["--grid"], "sweep", "expected at least one argument"),
    ("momentum 1", ["--momentum", "1.0"], "jax torch bench micro", "--momentum"),
    ("unknown flag", ["--no-such-flag"], "jax torch bench parity sweep micro", "--no-such-flag"),
]  # fmt: skip
_BAD_BENCH = [
    # the bench's own flags: every number in its range, every flag it takes works
    ("runs 0", ["--runs", "0"], "bench", "--runs takes 1 to"),
    ("runs huge", ["--runs", "100000"], "bench", "--runs takes 1 to"),
    ("max seconds 0", ["--max-seconds", "0"], "bench", "--max-seconds"),
    ("max seconds nan", ["--max-seconds", "nan"], "bench", "--max-seconds"),
    ("max seconds huge", ["--max-seconds", "1e12"], "bench", "--max-seconds"),
    ("target 0", ["--target", "0"], "bench", "--target"),
    ("target 94", ["--target", "94"], "bench", "--target"),
    ("vmap seeds 0", ["--vmap-seeds", "0"], "bench", "--vmap-seeds takes K from 2"),
    ("vmap seeds 1", ["--vmap-seeds", "1"], "bench", "--vmap-seeds takes K from 2"),
    ("vmap seeds huge", ["--vmap-seeds", "100000"], "bench", "--vmap-seeds takes K from 2"),
    ("checkpoint every", ["--checkpoint-every", "1", "--out", "{full}", "--overwrite"], "bench",
     "nothing to checkpoint"),
    ("profile is a file", ["--profile", "{file}"], "bench", "--profile"),
    ("profile is a file with overwrite", ["--profile", "{file}", "--out", "{full}",
     "--overwrite"], "bench", "is a file"),
    ("profile unwritable", ["--profile", "/proc/jaxbench-faults/traces"], "bench",
     "not writable"),
]  # fmt: skip
_BAD_CASES = [
    (name, cli, flags, text)
    for name, flags, clis, text in [*_BAD, *_BAD_BENCH]
    for cli in clis.split()
]


@pytest.mark.parametrize(
    "name,cli,flags,text", _BAD_CASES, ids=[f"{c}-{n.replace(' ', '_')}" for n, c, *_ in _BAD_CASES]
)
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    tmp_path: Path, env: dict[str, str], name: str, cli: str, flags: list[str], text: str
) -> None:
    file = tmp_path / "a_file"
    file.write_text("mine")
    full = tmp_path / "full"
    full.mkdir()
    for produced in ("summary.json", "bench.json", "parity.json"):
        (full / produced).write_text("{}")

    def snapshot() -> list[tuple[str, int, str]]:  # the child's own TMPDIR aside
        return sorted(
            (
                str(p.relative_to(tmp_path)),
                p.stat().st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder",
            )
            for p in tmp_path.rglob("*")
            if p.relative_to(tmp_path).parts[0] != "tmp"
        )

    before = snapshot()
    assert len(before) == 5
    module, *base = _CLIS[cli]
    argv = [*base, *(f.format(file=file, full=full) for f in flags)]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    code, out, err = _run(module, "", 0.0, argv, env)
    lines = err.strip().splitlines()
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err + out and len(lines) == 1 and text in lines[0], err[-3000:]
    assert snapshot() == before


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
