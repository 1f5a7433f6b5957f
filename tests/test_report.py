"""Every result records the code that made it (git commit, dirty flag) and the hardware."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jaxbench import report
from jaxbench.command import OutputError, prepare_output

REPO = Path(report.__file__).resolve().parent.parent
GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    """Each test looks git, CPU and GPU up afresh and leaves no stale answer behind."""
    report.clear_environment_cache()
    yield
    report.clear_environment_cache()


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def _in_checkout() -> bool:
    if GIT is None:
        return False
    r = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--show-toplevel"], capture_output=True, text=True
    )
    return r.returncode == 0 and Path(r.stdout.strip()).resolve() == REPO


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A git repository with one committed file."""
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / "a.txt").write_text("one\n")
    _git(root, "add", "a.txt")
    _git(
        root,
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@example.com",
        "-c",
        "commit.gpgsign=false",
        "commit",
        "-qm",
        "first",
    )
    return root


def test_environment_fields_are_present_and_typed() -> None:
    env = report.environment()
    for key in ("python", "platform", "date", "command", "numpy"):
        assert isinstance(env[key], str), key
    assert env["cpu_model"] is None or (isinstance(env["cpu_model"], str) and env["cpu_model"])
    gpus = env["gpu_models"]
    assert gpus is None or (isinstance(gpus, list) and all(isinstance(g, str) for g in gpus))
    if shutil.which("nvidia-smi") is None:
        assert gpus == []
    assert isinstance(env["thread_env"], dict)
    commit, dirty, note = env["git_commit"], env["git_dirty"], env["git_note"]
    assert commit is None or (isinstance(commit, str) and len(commit) in (40, 64))
    assert dirty is None or isinstance(dirty, bool)
    assert note is None or isinstance(note, str)
    if commit is None:
        assert note, "a missing commit must say why"


@pytest.mark.skipif(not _in_checkout(), reason="jaxbench is not running from a git checkout")
def test_commit_is_the_checkouts_head_whatever_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not a repository: the code's location decides
    env = report.environment()
    assert env["git_commit"] == _git(REPO, "rev-parse", "HEAD")
    assert isinstance(env["git_dirty"], bool) and env["git_note"] is None
    assert report.code_root() == REPO


@needs_git
def test_dirty_flag_follows_tracked_files_only(tiny_repo: Path) -> None:
    clean = report.git_state(tiny_repo)
    assert clean == {
        "git_commit": _git(tiny_repo, "rev-parse", "HEAD"),
        "git_dirty": False,
        "git_note": None,
    }
    (tiny_repo / "new.txt").write_text("untracked files do not count\n")
    report.clear_environment_cache()
    assert report.git_state(tiny_repo)["git_dirty"] is False
    (tiny_repo / "a.txt").write_text("two\n")
    assert report.git_state(tiny_repo)["git_dirty"] is False  # cached for the process
    report.clear_environment_cache()
    dirty = report.git_state(tiny_repo)
    assert dirty["git_dirty"] is True and dirty["git_commit"] == clean["git_commit"]


@needs_git
def test_cached_answer_cannot_be_edited_by_a_caller(tiny_repo: Path) -> None:
    report.git_state(tiny_repo)["git_commit"] = "edited"
    assert report.git_state(tiny_repo)["git_commit"] != "edited"
    gpus = report.gpu_models()
    if gpus is not None:
        gpus.append("edited")
        assert "edited" not in report.gpu_models()


@needs_git
def test_not_a_repository_records_null_and_says_why(tmp_path: Path) -> None:
    state = report.git_state(tmp_path)
    assert state["git_commit"] is None and state["git_dirty"] is None
    assert "not a git checkout" in state["git_note"]


@needs_git
def test_a_folder_inside_a_checkout_is_not_that_checkouts_code(tiny_repo: Path) -> None:
    """A wheel in a virtualenv that lies inside some repository must not take its commit."""
    site = tiny_repo / ".venv" / "site-packages"
    site.mkdir(parents=True)
    state = report.git_state(site)
    assert state["git_commit"] is None and "not a git checkout" in state["git_note"]


@needs_git
def test_repository_without_commits(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    state = report.git_state(tmp_path)
    assert state["git_commit"] is None and state["git_note"]


def test_missing_git_and_tools_never_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no git, lscpu or nvidia-smi
    state = report.git_state(REPO)
    assert state == {
        "git_commit": None,
        "git_dirty": None,
        "git_note": "git not found: commit not recorded",
    }
    env = report.environment()
    assert env["git_commit"] is None and env["git_note"]
    assert env["gpu_models"] == []
    assert env["cpu_model"] is None or isinstance(env["cpu_model"], str)  # /proc/cpuinfo


def test_failing_or_hanging_tools_never_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken git, a hanging nvidia-smi: null values, no exception, no long wait."""
    for name, body in (("git", "echo boom >&2; exit 3"), ("nvidia-smi", "sleep 30")):
        tool = tmp_path / name
        tool.write_text(f"#!/bin/sh\n{body}\n")
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(report, "PROBE_TIMEOUT", 0.5)
    state = report.git_state(REPO)
    assert state["git_commit"] is None and "boom" in state["git_note"]
    t0 = time.perf_counter()
    assert report.gpu_models() is None
    assert time.perf_counter() - t0 < 10  # the shell's `sleep` child is ended too


def test_nvidia_smi_lines_are_the_gpu_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text(
        "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)'\n"
    )
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert report.gpu_models() == [
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)",
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)",
    ]


def test_lookups_are_cached_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real = report.probe

    def counting(args):  # type: ignore[no-untyped-def]
        calls.append(list(args))
        return real(args)

    monkeypatch.setattr(report, "probe", counting)
    report.environment()
    n = len(calls)
    report.environment()
    assert len(calls) == n


def test_bench_and_parity_records_carry_the_commit() -> None:
    """bench.json and parity.json take their environment from `report.environment`."""
    from jaxbench.bench import cli
    from jaxbench.bench.budget import Budget
    from jaxbench.bench.race import Bench
    from jaxbench.configs import tiny
    from parity import report as parity_report
    from parity.suite import SuiteResult

    want = report.git_state()
    opts = cli.parse_args(["--config", "tiny", "--frameworks", "jax"])
    data = {"tiny": SimpleNamespace(train_labels=np.zeros(3), test_labels=np.zeros(2))}
    b = Bench(opts, {}, data, "python -m jaxbench.bench", Budget(), log=print)
    b.save = lambda: None  # nothing on disk: only the record is checked
    b.record_environment()
    docs = [
        b.doc["environment"],
        parity_report.to_json(
            SuiteResult(
                results=[], config=tiny(), quick=True, plant=None, data_source="x", seconds=0.0
            )
        )["environment"],
    ]
    for env in docs:
        for key in ("git_commit", "git_dirty", "git_note", "cpu_model", "gpu_models"):
            assert key in env, key
        assert env["git_commit"] == want["git_commit"]


# --- output folders -------------------------------------------------------------------------


def test_prepare_output_refuses_files_old_results_and_unwritable_places(tmp_path: Path) -> None:
    files = report.RUN_FILES
    new = prepare_output(tmp_path / "a" / "b", files, overwrite=False)
    assert new.is_dir() and not list(new.iterdir())  # made, and the probe left nothing
    (new / "summary.json").write_text("{}")
    (new / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="already holds results .summary.json.*--overwrite"):
        prepare_output(new, files, overwrite=False)
    prepare_output(new, files, overwrite=True)
    assert sorted(p.name for p in new.iterdir()) == ["notes.txt"]  # only run files go
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        prepare_output(a_file, files, overwrite=True)
    with pytest.raises(OutputError, match="is a file|not writable"):
        prepare_output(a_file / "sub", files, overwrite=False)
    (new / "bench-tiny.png").write_text("x")
    with pytest.raises(OutputError, match="bench-tiny.png"):
        prepare_output(new, ("bench.json", "bench-*.png"), overwrite=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_prepare_output_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            prepare_output(ro, report.RUN_FILES, overwrite=False)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize(
    "command, produced",
    [
        (["jaxbench.train"], "summary.json"),
        (["torch_ref.train"], "metrics.jsonl"),
        (["jaxbench.bench", "--config", "tiny"], "bench.json"),
        (["parity"], "parity.json"),
    ],
)
def test_every_cli_checks_out_before_loading_data(
    tmp_path: Path, command: list[str], produced: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out holding old results is one line and exit 2 before any data is read (the
    data folder here does not exist, so reaching the data would give another error).
    Each command's own `main`, in this process: what is tested is its order of checks."""
    out = tmp_path / "out"
    out.mkdir()
    (out / produced).write_text("{}")
    module, *args = command
    main = importlib.import_module(
        {"parity": "parity.__main__", "jaxbench.bench": "jaxbench.bench.cli"}.get(module, module)
    ).main
    try:
        code = main([*args, "--out", str(out), "--data-dir", str(tmp_path / "none")])
    except SystemExit as e:  # the trainers refuse at parse time
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "already holds results" in err and "--overwrite" in err
    assert (out / produced).read_text() == "{}"  # nothing touched


# --- run status -----------------------------------------------------------------------------


def _status(folder: Path) -> dict:
    return json.loads((folder / "status.json").read_text())


def test_run_status_follows_the_run(tmp_path: Path) -> None:
    rec = report.RunRecorder({"lr": 1.0}, tmp_path, quiet=True)
    assert _status(tmp_path)["status"] == "running" and _status(tmp_path)["epochs_completed"] == 0
    rec.epoch({"epoch": 1, "train_loss": 2.0})
    assert _status(tmp_path)["epochs_completed"] == 1
    rec.finish({"final": {}})
    assert _status(tmp_path)["status"] == "done"

    diverged = tmp_path / "d"
    rec = report.RunRecorder({}, diverged, quiet=True)
    rec.epoch({"epoch": 1, "train_loss": 2.0})
    with pytest.raises(FloatingPointError):
        rec.epoch({"epoch": 2, "train_loss": float("nan")})
    st = _status(diverged)
    assert st["status"] == "diverged" and st["epoch"] == 2 and st["epochs_completed"] == 1
    assert len((diverged / "metrics.jsonl").read_text().splitlines()) == 1

    stopped = tmp_path / "i"
    rec = report.RunRecorder({}, stopped, quiet=True)
    with pytest.raises(KeyboardInterrupt), rec.watch():
        rec.epoch({"epoch": 1, "train_loss": 2.0})
        raise KeyboardInterrupt
    assert _status(stopped)["status"] == "interrupted" and _status(stopped)["epochs_completed"] == 1
