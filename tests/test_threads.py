"""`--threads N`: XLA:CPU's pool and PyTorch's threads, set before JAX starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxbench import threads


def test_xla_thread_env_sets_and_returns_its_variables() -> None:
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "PJRT_NPROC": "8"}
    flags = threads.xla_thread_env(1, environ)
    assert flags == {"PJRT_NPROC": "1", "OMP_NUM_THREADS": "1"}
    assert environ == {"XLA_FLAGS": "--xla_dump_to=/tmp/x", **flags}  # other flags kept
    assert threads.xla_cpu_threads(environ) == 1


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_thread_count_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        threads.xla_thread_env(bad, {})  # type: ignore[arg-type]


def test_xla_pool_size_is_worked_out_as_xla_does() -> None:
    assert threads.xla_cpu_threads({"PJRT_NPROC": "3", "NPROC": "5"}) == 3
    assert threads.xla_cpu_threads({"PJRT_NPROC": "x", "NPROC": "5"}) == 5
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.xla_cpu_threads({}) == cores


def test_thread_settings_record_torch_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("PJRT_NPROC", "2")
    got = threads.thread_settings()
    assert got["xla_cpu_threads"] == 2 and got["env"]["PJRT_NPROC"] == "2"
    assert got["torch_intra_op"] == torch.get_num_threads()
    assert got["torch_interop"] == torch.get_num_interop_threads()


_POOL_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from parity.__main__ import setup_threads

    applied = setup_threads(["--quick", "--threads", sys.argv[1]])
    import jax, jax.numpy as jnp, torch

    x = jnp.ones((256, 256))
    (x @ x).block_until_ready()
    tasks = os.listdir("/proc/self/task")
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks]
    print(json.dumps({"applied": applied, "xla_pool": names.count("tf_XLAEigen"),
                      "torch": torch.get_num_threads()}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize("n", [1, 2, 3])
def test_threads_option_sizes_xlas_pool_and_torch(n: int) -> None:
    """XLA:CPU names its intra-op pool threads tf_XLAEigen: there are exactly N of them."""
    env = {k: v for k, v in os.environ.items() if k not in threads.THREAD_ENV_VARS}
    r = subprocess.run(
        [sys.executable, "-c", _POOL_PROBE, str(n)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "JAX_PLATFORMS": "cpu"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["xla_pool"] == n and got["torch"] == n
    assert got["applied"]["env"]["PJRT_NPROC"] == str(n)
    assert got["applied"]["torch_intra_op"] == n and got["applied"]["torch_interop"] == n


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m parity ARGS` through its own `main`, in this process: a refusal comes before
    `--threads` is applied, so no new interpreter is needed to see it."""
    from parity.__main__ import main

    try:
        code = main(list(args))
    except SystemExit as e:  # a usage error
        code = e.code
    return subprocess.CompletedProcess(args, code, *capsys.readouterr())


@pytest.mark.parametrize("value", ["0", "-1"])
def test_cli_rejects_a_thread_count_below_one_with_one_line(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = _cli(capsys, "--threads", value, "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --threads must be at least 1; got {value}"
    assert r.stdout == "" and not any(tmp_path.iterdir())


def test_cli_rejects_a_non_number_like_any_other_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = _cli(capsys, "--threads", "many", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "argument --threads: invalid int value: 'many'" in r.stderr
    assert "Traceback" not in r.stderr


def test_threads_must_come_before_jax_starts() -> None:
    import jax

    jax.devices()  # this process's CPU backend now exists: PJRT_NPROC would be ignored
    with pytest.raises(RuntimeError, match="before JAX starts"):
        threads.xla_thread_env(1)
