"""Shared test fixtures: the real CIFAR-10 loaded once, one quick parity run, small data.

Plain helpers (synthetic data, small configs) are in `helpers.py`; the fixtures here
build on them. A fixture that trains is scoped to the test run, so the suite pays for it once
however many files read its results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# An xdist worker gets its share of the cores, set before either framework starts so XLA,
# torch and every subprocess a test starts read it: two workers each running every thread
# the machine has would fight over the cores (OpenMP spin-waits) and take longer than one.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    for _var in ("PJRT_NPROC", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // workers)))

# One XLA compilation cache for the whole run, workers and the subprocesses tests start
# included: many tests compile the same small programs, and a program loaded from the
# cache is the one compiled, so no number changes. Made by the first process (pytest
# itself, not a worker), removed when it ends; a cache the user set is left alone.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ and not workers
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxbench-tests-xla-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

from helpers import random_dataset  # noqa: E402

from jaxbench.data import Dataset  # noqa: E402


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _torch_keeps_the_workers_share() -> Iterator[None]:
    """A command run in this process can resize torch's pool for the rest of it (parity's
    `--threads`); the worker's later tests must stay on its share. On two busy cores, torch on
    two threads per worker took test_torch_setup.py from 24 to 114 CPU-s."""
    yield
    if workers and "torch" in sys.modules:
        import torch

        if torch.get_num_threads() != (share := int(os.environ["OMP_NUM_THREADS"])):
            torch.set_num_threads(share)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most 4 (each with its share of the threads, above):
    past that, the tests that share a fixture and the longest ones set the suite's time."""
    return max(1, min(4, os.cpu_count() or 1))


# Fixtures that train or compile once for many tests: under xdist, the tests that read one
# share a worker (`--dist loadgroup`), so the work is still done once.
SHARED_FIXTURES = ("quick_parity", "resnet9_compiled", "runs", "four_devices")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups from the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group by shared fixture; the quick parity run first, then the tests that train: the
    longest units of work (minutes), so started last they would finish alone while the other
    workers idle. The quick tests come last and fill the gaps."""
    for item in items:
        for name in SHARED_FIXTURES:
            if name in getattr(item, "fixturenames", ()):
                group = name if name == "quick_parity" else f"{item.path.stem}:{name}"
                item.add_marker(pytest.mark.xdist_group(group))
                break
    items.sort(
        key=lambda item: (
            "quick_parity" not in getattr(item, "fixturenames", ()),
            item.get_closest_marker("slow") is None,
        )
    )


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real CIFAR-10 (official binary layout), or a visible skip when it is not configured.

    Scoped to the test run, so it reads `JAXBENCH_DATA_DIR` before any per-test fixture edits the
    environment. A set but wrong path is not skipped: the test fails, which CI must notice.
    """
    path = os.environ.get("JAXBENCH_DATA_DIR")
    if not path:
        pytest.skip("set JAXBENCH_DATA_DIR to an unpacked CIFAR-10 (see README)")
    return Path(path)


@pytest.fixture(scope="session")
def cifar10(real_data_dir: Path) -> Dataset:
    """The real CIFAR-10, decoded once for the test run: tests read it and never edit it."""
    from jaxbench.data import load_dataset

    return load_dataset(data_dir=real_data_dir, download=False, progress=False)


@pytest.fixture(scope="session")
def quick_parity(real_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`python -m parity --quick --seeds 2 --epochs 1 --subset 4000` on the real data, run
    once: checks 1-7 on `tiny`.

    Check 7 at 2 seeds x 1 epoch of 4,000 images (not the CLI's 3 x 3 of 8,000) trains 1/9
    as much and still runs every part of it: the JAX-vs-torch and the null comparisons, the
    figures, the plot. What the defaults add is power against small biases, which these
    tests do not measure.
    Returns the finished process and its `--out` folder. The end-to-end CLI test and the
    tests of check 7 and of the unplanted checks on `tiny` all read this one run.
    """
    out = tmp_path_factory.mktemp("quick-parity") / "parity"
    proc = subprocess.run(
        [sys.executable, "-m", "parity", "--quick", "--seeds", "2", "--epochs", "1"]
        + ["--subset", "4000"]
        + ["--data-dir", str(real_data_dir)]
        + ["--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, out


@pytest.fixture
def tiny_data() -> Dataset:
    """100 training and 20 test images of random pixels and labels (seed 5)."""
    return random_dataset(100, 20, seed=5)
