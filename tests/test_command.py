"""The start and stop every command shares (jaxbench.command): exit codes, --out, signals."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxbench.command import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Command,
    OutputError,
    Terminated,
    run_command,
)

FILES = ("result.json", "plot-*.png")


@pytest.fixture(autouse=True)
def sigint_as_in_a_terminal():
    """A suite started in the background inherits SIGINT ignored; these tests need a
    terminal's handler, as a user who presses Ctrl-C has."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its content's hash ("dir" for a folder)."""
    return {
        str(p.relative_to(root)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "raised,code,text",
    [
        (ValueError("--lr must be positive"), 2, "error: --lr must be positive"),
        (OSError(2, "No such file or directory"), 2, "error: [Errno 2] No such file or directory"),
        (ValueError("two\nlines"), 2, "error: two; lines"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "interrupted"),
        (Terminated(), EXIT_TERMINATED, "terminated"),
    ],
)
def test_each_ending_has_its_exit_code_and_one_line(
    capsys: pytest.CaptureFixture[str], raised: BaseException, code: int, text: str
) -> None:
    def body(cmd: Command) -> int:
        raise raised

    assert run_command(body, hard_exit=False) == code
    assert _one_line(capsys.readouterr().err) == text


def test_the_body_s_own_code_passes_through_and_others_are_mapped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_command(lambda cmd: 1) == 1
    assert run_command(lambda cmd: None) == 0
    assert run_command(lambda cmd: 0) == 0

    def diverged(cmd: Command) -> int:
        raise FloatingPointError("loss is nan at epoch 2")

    assert run_command(diverged, errors={FloatingPointError: 1, ValueError: 2}) == 1
    assert _one_line(capsys.readouterr().err) == "error: loss is nan at epoch 2"
    with pytest.raises(FloatingPointError):  # not bad input: a bug keeps its traceback
        run_command(diverged)

    def crashed(cmd: Command) -> int:
        cmd.inputs_checked()
        raise ValueError("a bug in the work, not the input")

    with pytest.raises(ValueError, match="a bug"):  # after the input is checked: a traceback
        run_command(crashed)

    def usage(cmd: Command) -> int:
        raise SystemExit(2)  # argparse's usage error

    with pytest.raises(SystemExit) as e:
        run_command(usage)
    assert e.value.code == 2


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A file, a folder holding results (and a file of the user's), the parent of both."""
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    full = tmp_path / "full"
    full.mkdir()
    (full / "result.json").write_text('{"old": 1}')
    (full / "plot-tiny.png").write_bytes(b"\x89PNG old")
    (full / "notes.txt").write_text("the user's")
    return {"root": tmp_path, "file": a_file, "full": full}


@pytest.mark.parametrize(
    "where,text",
    [
        ("a_file", "is a file, not a folder"),
        ("full", "already holds results (plot-tiny.png, result.json); pass --overwrite"),
        ("a_file/sub", "not writable (Not a directory)"),
        ("/proc/jaxbench-test/out", "not writable"),
    ],
)
def test_a_refused_out_is_one_line_exit_2_and_changes_nothing(
    places: dict[str, Path], capsys: pytest.CaptureFixture[str], where: str, text: str
) -> None:
    root = places["root"]
    out = Path(where) if where.startswith("/") else root / where
    before = _snapshot(root)
    ran = []

    def body(cmd: Command) -> int:
        cmd.prepare_out(out, FILES, overwrite=False)
        ran.append(True)  # the work: never reached
        return 0

    assert run_command(body) == EXIT_BAD_INPUT
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out {out}") and text in line, line
    assert ran == [] and _snapshot(root) == before


def test_overwrite_removes_exactly_the_results(places: dict[str, Path]) -> None:
    full = places["full"]
    assert run_command(lambda cmd: cmd.prepare_out(full, FILES, overwrite=True) and 0) == 0
    assert sorted(os.listdir(full)) == ["notes.txt"]


def test_a_refused_result_file_changes_nothing(
    places: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = places["root"]
    before = _snapshot(root)
    cases = [
        (places["full"], "is a folder, not a file"),
        (places["file"], "already exists; pass --overwrite"),
        (places["file"] / "x.json", "not writable (Not a directory)"),  # as for a folder
        (places["file"] / "sub" / "x.json", "not writable (Not a directory)"),
        (Path("/proc/jaxbench-test/x.json"), "not writable"),
    ]
    for path, text in cases:
        assert run_command(lambda cmd, p=path: cmd.prepare_file(p, overwrite=False) and 0) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"error: --out {path}") and text in line, line
    assert _snapshot(root) == before
    new = root / "new" / "deeper" / "x.json"
    assert run_command(lambda cmd: cmd.prepare_file(new, overwrite=False) and 0) == 0
    assert not (root / "new").exists()  # made for the file, nothing written: removed again
    assert run_command(lambda cmd: cmd.prepare_file(places["file"], overwrite=True) and 0) == 0
    assert places["file"].read_text() == "mine"  # replaced only when the command writes it


@pytest.mark.parametrize("ending", ["return", "error", "interrupt", "usage"])
def test_a_folder_the_command_made_and_left_empty_is_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], ending: str
) -> None:
    out = tmp_path / "new" / "deeper"

    def body(cmd: Command) -> int:
        cmd.prepare_out(out, FILES, overwrite=False)
        assert out.is_dir()
        if ending == "error":
            raise ValueError("the data folder holds no CIFAR-10")
        if ending == "interrupt":
            raise KeyboardInterrupt
        if ending == "usage":
            raise SystemExit(2)
        return 1

    with pytest.raises(SystemExit) if ending == "usage" else contextlib.nullcontext():
        run_command(body, hard_exit=False)
    assert not (tmp_path / "new").exists()
    if ending == "interrupt":
        assert _one_line(capsys.readouterr().err) == f"interrupted; nothing written to {out}"


def test_a_folder_with_results_or_one_that_existed_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made, existing = tmp_path / "made", tmp_path / "existing"
    existing.mkdir()

    def body(cmd: Command) -> int:
        cmd.prepare_out(made, FILES, overwrite=False)
        (made / "result.json").write_text("{}")
        cmd.prepare_out(existing, FILES, overwrite=False, flag="--profile")
        raise KeyboardInterrupt

    assert run_command(body, hard_exit=False) == EXIT_INTERRUPTED
    assert _one_line(capsys.readouterr().err) == f"interrupted; partial results in {made}"
    assert (made / "result.json").is_file() and existing.is_dir()


def test_on_stop_saves_and_says_the_line_with_signals_held_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    seen = []

    def body(cmd: Command) -> int:
        cmd.prepare_out(out, FILES, overwrite=False)

        def on_stop(word: str) -> str:
            seen.append(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
            (out / "result.json").write_text("{}")
            return f"{word} after 2 runs; they are in {out}"

        cmd.on_stop = on_stop
        raise Terminated

    assert run_command(body, hard_exit=False) == EXIT_TERMINATED
    assert _one_line(capsys.readouterr().err) == f"terminated after 2 runs; they are in {out}"
    assert seen == [True] and (out / "result.json").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_output_error_is_a_value_error() -> None:
    assert issubclass(OutputError, ValueError) and issubclass(Terminated, KeyboardInterrupt)


_CHILD = r"""
import signal, sys, time
from pathlib import Path
from jaxbench.command import run_command
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even in background
out, write = Path(sys.argv[1]), sys.argv[2] == "write"

def body(cmd):
    cmd.prepare_out(out, ("result.json",), overwrite=False)
    if write:
        (out / "result.json").write_text("{}")
    print("ready", flush=True)
    time.sleep(60)
    return 0

sys.exit(run_command(body))
"""


@pytest.mark.parametrize(
    "sig,code,write,line",
    [
        (signal.SIGTERM, 143, False, "terminated; nothing written to {out}"),
        (signal.SIGINT, 130, True, "interrupted; partial results in {out}"),
    ],
)
def test_a_real_signal_ends_the_process_with_its_code(
    tmp_path: Path, sig: int, code: int, write: bool, line: str
) -> None:
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(out), "write" if write else "empty"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert _one_line(err) == line.format(out=out)
    assert out.exists() == write


def test_one_terminated_class() -> None:
    """Every command stops on SIGTERM through the one `Terminated` (a KeyboardInterrupt)."""
    root = Path(__file__).resolve().parents[1]
    defined = {
        str(path.relative_to(root))
        for pkg in ("jaxbench", "torch_ref", "parity")
        for path in (root / pkg).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name == "Terminated"
    }
    assert defined == {"jaxbench/command.py"}


class _Bomb:
    """An object whose finaliser is interrupted by a signal, as JAX's gc callback can be."""

    def __init__(self, signal_exception: type[KeyboardInterrupt]) -> None:
        self.raised = signal_exception

    def __del__(self) -> None:
        raise self.raised


@pytest.mark.parametrize("raised,code", [(Terminated, 143), (KeyboardInterrupt, 130)])
def test_a_signal_swallowed_by_a_finaliser_still_stops_the_command(
    capsys: pytest.CaptureFixture[str], raised: type[KeyboardInterrupt], code: int
) -> None:
    ran_on = []

    def body(cmd: Command) -> int:
        _Bomb(raised)  # collected at once: its exception is "ignored" by Python
        for _ in range(100):
            time.sleep(0.05)
            ran_on.append(True)
        return 0

    assert run_command(body, hard_exit=False) == code
    assert len(ran_on) < 100 and "Exception ignored" not in capsys.readouterr().err
