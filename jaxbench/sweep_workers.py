"""`python -m jaxbench.sweep --workers N`: N sweep processes share one machine.

Each worker is the sweep command with `--worker i/N`, pinned to its share of the CPU cores
(and of `CUDA_VISIBLE_DEVICES`). A worker claims a run by creating `OUT/workers/claims/<run>`
exclusively, prefers the next seed of the cell it just compiled, and appends each finished
run to `runs.jsonl` under a lock; the parent watches that file and writes the summary.
Why: XLA:CPU's convolutions use two cores poorly (a `tiny` run: 45 s on one core, 33 s on
two), so two one-core runs side by side finish sooner; each row records `worker`, `cpus`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

WORKERS_DIR = "workers"


def usable_cpus() -> list[int]:
    """The cores this process may run on (affinity-aware where the OS says)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: assume every core
        return list(range(os.cpu_count() or 1))


def split(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """The `index`-th of `count` contiguous, near-equal parts of `items`."""
    size, extra = divmod(len(items), count)
    start = index * size + min(index, extra)
    return list(items[start : start + size + (index < extra)])


def check_workers(count: int, environ: dict[str, str] | None = None) -> None:
    """One-line ValueError unless `count` workers each get a core (and a listed device)."""
    if isinstance(count, bool) or count < 1:
        raise ValueError(f"--workers must be at least 1; got {count}")
    cores = len(usable_cpus())
    if count > cores:
        raise ValueError(
            f"--workers {count}: this process may use {cores} CPU core(s); give at most {cores}"
        )
    devices = _cuda_devices(os.environ if environ is None else environ)
    if devices is not None and count > len(devices):
        raise ValueError(
            f"--workers {count}: CUDA_VISIBLE_DEVICES lists {len(devices)} device(s); give at "
            f"most {len(devices)}, one per worker"
        )


def _cuda_devices(environ: Any) -> list[str] | None:
    text = environ.get("CUDA_VISIBLE_DEVICES")
    if text is None or not text.strip():
        return None
    return [d.strip() for d in text.split(",") if d.strip()]


def worker_env(index: int, count: int, environ: dict[str, str]) -> dict[str, str]:
    """Worker `index`'s environment: its cores, thread counts and devices."""
    from jaxbench.threads import xla_thread_env

    env = dict(environ)
    cpus = split(usable_cpus(), index, count)
    xla_thread_env(len(cpus), env)
    env["JAXBENCH_WORKER_CPUS"] = ",".join(map(str, cpus))
    devices = _cuda_devices(environ)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(split(devices, index, count))
    return env


def enter_worker() -> list[int]:
    """Before JAX or PyTorch start: pin to the parent's cores and die with the parent."""
    text = os.environ.get("JAXBENCH_WORKER_CPUS", "")
    cpus = [int(c) for c in text.split(",") if c.strip()] or usable_cpus()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, cpus)
    # PR_SET_PDEATHSIG, best effort. SIGKILL, not SIGTERM (a clean stop): the worker must
    # be gone before a rerun of the sweep starts.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    return cpus


class Claims:
    """Exclusive claims on runs, one empty file each, for one invocation's workers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def claim(self, key: str) -> bool:
        name = hashlib.sha1(key.encode()).hexdigest()
        try:
            os.close(os.open(self.folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        return True


@contextlib.contextmanager
def locked(fd: int, exclusive: bool) -> Iterator[None]:
    """An advisory lock on an open file (none where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def prefer_same_program(groups: list[list[Any]], last: tuple[str, Any] | None) -> int:
    """Index of the first group of the (framework, cell) just compiled, else 0."""
    return next((i for i, g in enumerate(groups) if (g[0].framework, g[0].cell) == last), 0)


def child_argv(argv: Sequence[str]) -> list[str]:
    """The sweep command line without `--workers`, `--overwrite` and `--no-progress`."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        value_of_workers = i > 0 and argv[i - 1] == "--workers"
        dropped = arg in ("--workers", "--overwrite", "--no-progress") or value_of_workers
        if not (dropped or arg.startswith("--workers=")):
            out.append(arg)
    return out


def run_workers(
    out: Path,
    argv: Sequence[str],
    count: int,
    poll: Callable[[], list[dict[str, Any]]],
    on_row: Callable[[dict[str, Any]], None],
    interval: float = 1.0,
) -> list[str]:
    """Start the workers, pass each new row to `on_row`; one line per failed worker."""
    folder = out / WORKERS_DIR
    shutil.rmtree(folder / "claims", ignore_errors=True)
    (folder / "claims").mkdir(parents=True)
    seen = len(poll())
    procs: list[subprocess.Popen[bytes]] = []
    logs = [folder / f"worker{i}.log" for i in range(count)]
    with contextlib.ExitStack() as files:
        try:
            for i in range(count):
                log = files.enter_context(open(logs[i], "wb"))
                cmd = [sys.executable, "-m", "jaxbench.sweep", *child_argv(argv)]
                cmd += ["--worker", f"{i}/{count}", "--no-progress"]
                env = worker_env(i, count, dict(os.environ))
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            while True:
                running = any(p.poll() is None for p in procs)
                rows = poll()
                for row in rows[seen:]:
                    on_row(row)
                seen = len(rows)
                if not running:
                    break
                time.sleep(interval)
        except BaseException:
            _stop(procs)
            raise
    return [
        f"worker {i} exited with code {p.returncode}: {_last_line(path)} (whole log: {path})"
        for i, (p, path) in enumerate(zip(procs, logs, strict=True))
        if p.returncode != 0
    ]


def _stop(procs: Sequence[subprocess.Popen[bytes]], grace: float = 30.0) -> None:
    """SIGINT to the workers still running, then SIGKILL after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"
