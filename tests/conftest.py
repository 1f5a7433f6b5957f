"""Shared test fixtures: the real CIFAR-10 loaded once, one quick parity run, small data.

Plain helpers (synthetic data, small configs) are in `helpers.py`; the fixtures here
build on them. A fixture that trains is session-scoped, so the suite pays for it once
however many files read its results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import random_dataset

from jaxbench.data import Dataset


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real CIFAR-10 (official binary layout), or a visible skip when it is not configured.

    Session-scoped, so it reads `JAXBENCH_DATA_DIR` before any per-test fixture edits the
    environment. A set but wrong path is not skipped: the test fails, which CI must notice.
    """
    path = os.environ.get("JAXBENCH_DATA_DIR")
    if not path:
        pytest.skip("set JAXBENCH_DATA_DIR to an unpacked CIFAR-10 (see README)")
    return Path(path)


@pytest.fixture(scope="session")
def cifar10(real_data_dir: Path) -> Dataset:
    """The real CIFAR-10, decoded once for the session: tests read it and never edit it."""
    from jaxbench.data import load_dataset

    return load_dataset(data_dir=real_data_dir, download=False, progress=False)


@pytest.fixture(scope="session")
def quick_parity(real_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`python -m parity --quick` on the real data, run once: checks 1-7 on `tiny`.

    Returns the finished process and its `--out` folder. The end-to-end CLI test and the
    tests of check 7 and of the unplanted checks on `tiny` all read this one run.
    """
    out = tmp_path_factory.mktemp("quick-parity") / "parity"
    proc = subprocess.run(
        [sys.executable, "-m", "parity", "--quick", "--data-dir", str(real_data_dir)]
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
