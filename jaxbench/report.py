"""Results on disk and on stdout, shared by both trainers, the parity suite and the benchmark.

Every file is written atomically (temp file, then `os.replace`): never half a JSON.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxbench.threads import THREAD_ENV_VARS

EPOCH_COLUMNS: tuple[str, ...] = (
    "epoch",
    "train_loss",
    "val_loss",
    "train_acc",
    "val_acc",
    "ema_val_acc",
    "total_time_seconds",
)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy, jax and torch scalars and arrays
        return x.tolist()
    return x


_UMASK = os.umask(0)  # reading the umask means setting it: put it back at once
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for sharing
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> None:
    """Rewrite the whole JSON-lines file atomically (runs are short; rows are few)."""
    atomic_write_text(path, "".join(json.dumps(_jsonable(r), sort_keys=True) + "\n" for r in rows))


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


@functools.lru_cache(maxsize=1)
def gpu_driver() -> str | None:
    """The NVIDIA driver version (from /proc, else nvidia-smi), or None without one."""
    with contextlib.suppress(OSError):
        text = Path("/proc/driver/nvidia/version").read_text()
        if m := re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text):
            return m.group(1)
    smi = shutil.which("nvidia-smi")
    text = probe([smi, "--query-gpu=driver_version", "--format=csv,noheader"])[0] if smi else None
    words = (text or "").split()
    return words[0] if words else None


PROBE_TIMEOUT = 10.0  # seconds for each git / lscpu / nvidia-smi call


def probe(args: Sequence[str]) -> tuple[str | None, str]:
    """(stdout, "") of a short command in the C locale, or (None, why); never raises."""
    try:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**os.environ, "LC_ALL": "C", "GIT_OPTIONAL_LOCKS": "0"},
            start_new_session=True,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return None, f"{type(e).__name__}: {e}"
    with proc:
        try:
            out, err = proc.communicate(timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (AttributeError, OSError):  # not POSIX, or already gone
                proc.kill()
            proc.communicate()
            return None, f"timed out after {PROBE_TIMEOUT:g} s"
    if proc.returncode != 0:
        lines = (err or "").strip().splitlines()
        return None, lines[0] if lines else f"exit status {proc.returncode}"
    return out, ""


def code_root() -> Path:
    """The folder holding the running `jaxbench` package (a checkout, or site-packages)."""
    return Path(__file__).resolve().parent.parent


def git_state(root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """`git_commit`, `git_dirty` (tracked files differ) and `git_note` (why either is None)
    for the code at `root` (default `code_root()`), which must be its checkout's top: a
    wheel in a virtualenv inside another repository is not that repository's code. Cached."""
    return dict(_git_state(str(Path(root) if root is not None else code_root())))


@functools.lru_cache(maxsize=8)
def _git_state(root: str) -> dict[str, Any]:
    out: dict[str, Any] = {"git_commit": None, "git_dirty": None, "git_note": None}
    git = shutil.which("git")
    if git is None:
        out["git_note"] = "git not found: commit not recorded"
        return out
    top, why = probe([git, "-C", root, "rev-parse", "--show-toplevel"])
    if top is None or Path(top.strip()).resolve() != Path(root).resolve():
        reason = f"it lies inside {top.strip()}" if top is not None else why
        out["git_note"] = f"{root} is not a git checkout ({reason}): commit not recorded"
        return out
    sha, why = probe([git, "-C", root, "rev-parse", "--verify", "HEAD"])
    if sha is None or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", sha.strip()):
        out["git_note"] = f"git rev-parse HEAD failed in {root} ({why or sha}): no commit"
        return out
    out["git_commit"] = sha.strip()
    status, why = probe(
        [git, "-C", root, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"]
    )
    if status is None:
        out["git_note"] = f"git status failed ({why}): dirty flag unknown"
    else:
        out["git_dirty"] = bool(status.strip())
    return out


@functools.lru_cache(maxsize=1)
def cpu_model() -> str | None:
    """The CPU's model name (Linux: lscpu, else /proc/cpuinfo; elsewhere platform.processor())."""
    if sys.platform.startswith("linux"):
        text = probe(["lscpu"])[0] if shutil.which("lscpu") else None
        names = _values(text or "", "Model name")
        if not names:
            with contextlib.suppress(OSError):
                names = _values(Path("/proc/cpuinfo").read_text(errors="replace"), "model name")[:1]
        if names:
            return "; ".join(names)  # several only on hybrid CPUs (e.g. ARM big.LITTLE)
    return platform.processor() or None


def _values(text: str, key: str) -> list[str]:
    """The distinct non-empty values of `key: value` lines, in order."""
    pairs = (line.partition(":") for line in text.splitlines())
    return list(dict.fromkeys(v.strip() for k, _, v in pairs if k.strip() == key and v.strip()))


def gpu_models() -> list[str] | None:
    """`nvidia-smi -L` lines: [] without nvidia-smi, None when it fails. Cached."""
    found = _gpu_models()
    return list(found) if found is not None else None


@functools.lru_cache(maxsize=1)
def _gpu_models() -> tuple[str, ...] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    text, _ = probe([smi, "-L"])
    if text is None:
        return None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def clear_environment_cache() -> None:
    """Forget the cached git, CPU and GPU look-ups."""
    _git_state.cache_clear()
    gpu_driver.cache_clear()
    cpu_model.cache_clear()
    _gpu_models.cache_clear()


def _program() -> str:
    """How this process was started: `python -m pkg.mod` for modules, else the script name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"python -m {spec.name.removesuffix('.__main__')}"
    return Path(sys.argv[0]).name


def environment(frameworks: Sequence[str] = ()) -> dict[str, Any]:
    """Host, Python and framework versions and the code's git state, beside every result."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "date": now_iso(),
        "command": " ".join([_program(), *sys.argv[1:]]),
        "gpu_driver": gpu_driver(),
        "cpu_model": cpu_model(),
        "gpu_models": gpu_models(),
        # set ones only: thread limits that change timings (jaxbench.threads sets them)
        "thread_env": {k: os.environ[k] for k in THREAD_ENV_VARS if k in os.environ},
        **git_state(),
    }
    if "jax" in frameworks:
        import flax
        import jax
        import optax

        dev = jax.devices()[0]
        env.update(
            jax=jax.__version__,
            flax=flax.__version__,
            optax=optax.__version__,
            jax_backend=jax.default_backend(),
            jax_device=getattr(dev, "device_kind", str(dev)),
            jax_devices=jax.device_count(),  # every device of the run, over all processes
            xla_flags=os.environ.get("XLA_FLAGS") or None,  # e.g. simulated CPU devices
        )
    if "torch" in frameworks:
        import torch

        env.update(torch=torch.__version__)
        if torch.cuda.is_available():
            env.update(
                torch_device=torch.cuda.get_device_name(0),
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
            )
        else:
            env.update(torch_device="cpu")
    return env


def format_row(values: dict[str, Any], columns: Sequence[str] = EPOCH_COLUMNS) -> str:
    """One fixed-width table row; floats in [0, 1] accuracy columns print as percentages."""
    cells = []
    for c in columns:
        v = values.get(c)
        if v is None:
            cells.append(f"{'-':>{_width(c)}}")
        elif c.endswith("_acc"):
            cells.append(f"{100 * v:>{_width(c) - 1}.2f}%")
        elif isinstance(v, float):
            cells.append(f"{v:>{_width(c)}.4f}")
        else:
            cells.append(f"{v!s:>{_width(c)}}")
    return "  ".join(cells)


def _width(column: str) -> int:
    return max(len(column), 8)


STOPPED_SILENTLY = "stopped without a word"


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """A run's status.json, truthful after a SIGKILL: "running" with its process gone (on
    this host) reads `STOPPED_SILENTLY`, `was` the recorded status. Other hosts' are
    taken at their word."""
    doc = json.loads((Path(run_dir) / "status.json").read_text())
    pid = doc.get("pid")
    running = doc.get("status") == "running" and isinstance(pid, int) and pid > 0
    if not running or doc.get("host") != socket.gethostname():
        return doc
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return {**doc, "status": STOPPED_SILENTLY, "was": doc["status"]}
    except PermissionError:  # alive, another user's
        pass
    return doc


class RunRecorder:
    """The per-epoch table and the run's files; `status.json` (running, done, diverged or
    interrupted) counts the rows of `metrics.jsonl`, being written after them."""

    def __init__(
        self,
        config: dict[str, Any],
        workdir: str | os.PathLike[str] | None,
        quiet: bool,
        rows: Sequence[dict[str, Any]] = (),
    ):
        """`rows`: a resumed run's epochs from its checkpoint; later rows are dropped."""
        self.workdir = Path(workdir) if workdir is not None else None
        self.quiet = quiet
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]
        self.started = now_iso()
        if self.workdir is not None:
            write_json(self.workdir / "config.json", config)
            if self.rows:
                write_jsonl(self.workdir / "metrics.jsonl", self.rows)
        self.set_status("running")
        if not quiet:
            print("  ".join(f"{c:>{_width(c)}}" for c in EPOCH_COLUMNS), flush=True)
            for row in self.rows:
                print(format_row(row), flush=True)

    def set_status(self, status: str, **extra: Any) -> None:
        """Rewrite `status.json`: the state, epochs completed, times, `extra`."""
        if self.workdir is None:
            return
        doc = {
            "status": status,
            "epochs_completed": len(self.rows),
            "started": self.started,
            "updated": now_iso(),
            "pid": os.getpid(),  # with `host`, lets a reader tell a run killed outright
            "host": socket.gethostname(),
            **extra,
        }
        write_json(self.workdir / "status.json", doc)

    def epoch(self, row: dict[str, Any]) -> None:
        """Print and record a row; a non-finite training loss raises FloatingPointError."""
        row = {k: _jsonable(v) for k, v in row.items()}
        loss = row.get("train_loss")
        if loss is not None and not np.isfinite(loss):
            message = (
                f"training loss became {loss} in epoch {row.get('epoch')}; "
                "lower --lr or check the data"
            )
            self.set_status("diverged", epoch=row.get("epoch"), error=message)
            raise FloatingPointError(message)
        self.rows.append(row)
        if not self.quiet:
            print(format_row(row), flush=True)
        if self.workdir is not None:
            write_jsonl(self.workdir / "metrics.jsonl", self.rows)
        self.set_status("running")

    def finish(self, summary: dict[str, Any]) -> None:
        if self.workdir is not None:
            write_json(self.workdir / "summary.json", summary)
        self.set_status("done")

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Mark the run `interrupted` when Ctrl-C (KeyboardInterrupt) ends it in the block."""
        try:
            yield
        except KeyboardInterrupt:
            self.set_status("interrupted")
            raise


# Environment variables that change what the frameworks compute or how they allocate.
ENV_VARS = (
    "XLA_FLAGS",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_PYTHON_CLIENT_ALLOCATOR",
    "JAX_DEFAULT_MATMUL_PRECISION",
    "JAX_COMPILATION_CACHE_DIR",
    "NVIDIA_TF32_OVERRIDE",
    "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
    "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF",
)


def nvidia_smi() -> dict[str, Any]:
    """`nvidia-smi -L` and a read-only query of clocks and limits (never changes settings)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {"available": False}
    out: dict[str, Any] = {"available": True}
    query = "name,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
    for key, args in (("list", ["-L"]), ("query", [f"--query-gpu={query}", "--format=csv"])):
        try:
            res = subprocess.run([smi, *args], capture_output=True, text=True, timeout=20)
            out[key] = (res.stdout or res.stderr).strip()
        except (OSError, subprocess.SubprocessError) as e:
            out[key] = f"failed: {e}"
    return out


def numeric_settings() -> dict[str, Any]:
    """Environment variables, JAX config and PyTorch TF32 flags that change the numbers."""
    out: dict[str, Any] = {"env": {k: os.environ.get(k) for k in ENV_VARS}}
    if "jax" in sys.modules:
        import jax

        out["jax"] = {
            k: getattr(jax.config, k, None)
            for k in (
                "jax_default_matmul_precision",
                "jax_enable_x64",
                "jax_compilation_cache_dir",
                "jax_persistent_cache_min_compile_time_secs",
            )
        }
    if "torch" in sys.modules:
        import torch

        cudnn = torch.backends.cudnn
        t: dict[str, Any] = {"float32_matmul_precision": torch.get_float32_matmul_precision()}
        with warnings.catch_warnings():  # newer torch deprecates allow_tf32 in favour of
            warnings.simplefilter("ignore")  # fp32_precision; record whichever exists
            for name, obj in (("cuda_matmul", torch.backends.cuda.matmul), ("cudnn", cudnn)):
                for attr in ("allow_tf32", "fp32_precision"):
                    with contextlib.suppress(AttributeError, RuntimeError):
                        t[f"{name}.{attr}"] = getattr(obj, attr)
        t["cudnn.benchmark"] = cudnn.benchmark
        t["cudnn.deterministic"] = cudnn.deterministic
        out["torch"] = {k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in t.items()}
    return out


RUN_FILES: tuple[str, ...] = (
    "config.json",
    "metrics.jsonl",
    "summary.json",
    "status.json",
    "checkpoints",
)


# The keys of summary.json's "final": the last epoch's row, the same in both trainers.
FINAL_KEYS: tuple[str, ...] = ("val_acc", "ema_val_acc", "val_loss", "train_loss", "train_acc")
