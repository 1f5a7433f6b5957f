"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
