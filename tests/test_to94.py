"""The FLOPs-to-94% table: steps as the records count them, the count against their stated
work and against XLA's count of a compiled Muon step."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxbench import muon
from jaxbench.bench import to94
from jaxbench.configs import get_config


def test_steps_as_the_records_count_them() -> None:
    # airbench94: 48 steps an epoch, 9.9 epochs = 476 steps; airbench94_muon: 200 steps
    assert to94.training_images(9.9, 1024) == 476 * 1024
    assert to94.training_images(8, 2000) == 200 * 2000


def test_counted_work_matches_what_the_records_state() -> None:
    """Page's 1.15, airbench94's 0.36 and airbench94_muon's 0.29 PFLOP (rounded there)."""
    table = to94.rows([], xla=False)
    stated = [r for r in table if r["published_pflop"] is not None]
    assert len(stated) == 3
    for r in stated:
        assert r["counted_pflop"] == pytest.approx(r["published_pflop"], rel=0.05), r


def test_newton_schulz_count_matches_xla() -> None:
    """XLA's step with Muon minus the same step on SGD is the Newton-Schulz matmuls (plus a
    little elementwise work): a wrong shape or iteration count misses by far more."""
    cfg = get_config("speedrun_muon").replace(widths=(16, 64, 64), batch_size=100)
    with_muon = to94.xla_train_flops_per_image(cfg)
    without = to94.xla_train_flops_per_image(cfg.replace(optimizer="sgd"))
    counted = to94.newton_schulz_flops(cfg, muon.AIRBENCH94_MUON) / cfg.batch_size
    assert counted > 0
    assert with_muon - without == pytest.approx(counted, rel=0.05)


def test_cli_prints_the_table_and_refuses_an_unknown_preset() -> None:
    run = [sys.executable, "-m", "jaxbench.bench.to94"]
    ok = subprocess.run([*run, "--no-xla", "--config", "tiny"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 2 + len(to94.ANCHORS) + 1 and "preset `tiny`" in lines[-1]
    bad = subprocess.run([*run, "--config", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "'nope'" in bad.stderr
