"""Every planted bug is caught by the check meant to catch it; the unplanted suite passes 1-6."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from jaxbench.configs import get_config
from parity.plants import PLANTS
from parity.suite import FAST_CHECKS, load_data, run_suite


@pytest.fixture(scope="module")
def data(real_data_dir: Path) -> Any:
    return load_data(real_data_dir)


def _quiet(_: str) -> None:
    pass


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(PLANTS))
def test_plant_is_caught_by_its_check(name: str, data: Any) -> None:
    plant = PLANTS[name]
    cfg = get_config(plant.config)
    suite = run_suite(cfg, quick=True, data=data, checks=[plant.check], plant=name, log=_quiet)
    (result,) = suite.results
    assert result.error is None, result.details.get("traceback")
    assert not result.passed, f"{name} not caught by check {plant.check}"
    assert "caught by check" in suite.verdict() and "NOT" not in suite.verdict()


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("preset", ["tiny", "speedrun"])
def test_unplanted_suite_passes_checks_1_to_6(preset: str, data: Any) -> None:
    suite = run_suite(get_config(preset), quick=True, data=data, checks=FAST_CHECKS, log=_quiet)
    failed = {r.number: (r.error, [f.name for f in r.failed_figures]) for r in suite.results}
    assert suite.passed, {k: v for k, v in failed.items() if v[0] or v[1]}


@pytest.mark.realdata
def test_cli_plant_exits_1_and_names_the_check(real_data_dir: Path, tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "parity",
            "--quick",
            "--plant",
            "flip_mismatch",
            "--checks",
            "5",
            "--data-dir",
            str(real_data_dir),
            "--out",
            str(tmp_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout + r.stderr[-2000:]
    assert "plant 'flip_mismatch' caught by check 5 (augmentation)" in r.stdout
    assert (tmp_path / "parity_report.md").exists()
