"""The suite's machinery: exact conversion, statistics, CLI, and the quick run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxbench.configs import tiny
from parity import convert, stats
from torch_ref.model import model_from_config

CFG = tiny().replace(widths=(8, 16, 32, 64))


def _trained_state_dict(batches: int = 3, batch: int = 8) -> dict[str, torch.Tensor]:
    """A state dict whose BN statistics have seen `batches` train-mode batches."""
    model = model_from_config(CFG, seed=0)
    model.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, 32, 32, generator=gen))
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_round_trip_is_bit_exact_for_a_fresh_model() -> None:
    sd = model_from_config(CFG, seed=1).state_dict()
    back = convert.flax_to_torch(convert.torch_to_flax(sd))
    assert convert.state_dicts_equal(sd, back)


def test_layouts_map_index_for_index() -> None:
    sd = model_from_config(CFG, seed=2).state_dict()
    v = convert.torch_to_flax(sd)
    w = sd["layer1.conv.weight"].numpy()  # OIHW
    k = v["params"]["layer1"]["conv"]["kernel"]  # HWIO
    assert k.shape == (3, 3, w.shape[1], w.shape[0])
    assert k[2, 0, 5, 7] == w[7, 5, 2, 0]
    head = sd["head.weight"].numpy()  # (out, in)
    assert v["params"]["head"]["kernel"][11, 3] == head[3, 11]


def test_trained_variance_converts_between_conventions() -> None:
    """After k batches of n values, flax_var = p + (torch_var - p) (n - 1) / n, p = 0.9^k."""
    batch = 8
    sd = _trained_state_dict(batch=batch)
    counts = convert.resnet9_bn_counts(batch)
    v = convert.torch_to_flax(sd, bn_counts=counts)
    k, n = 3, counts["res3a.bn"]
    p = 0.9**k
    tv = sd["res3a.bn.running_var"].numpy().astype(np.float64)
    np.testing.assert_allclose(
        v["batch_stats"]["res3a"]["bn"]["var"], p + (tv - p) * (n - 1) / n, rtol=1e-6
    )
    back = convert.flax_to_torch(v, num_batches_tracked=k, bn_counts=counts)
    for key, t in sd.items():
        if key.endswith("running_var"):  # one rounding each way: within 2 ulp
            np.testing.assert_array_max_ulp(back[key].numpy(), t.numpy(), maxulp=2)
        else:
            assert torch.equal(back[key], t), key
    raw = convert.flax_to_torch(
        convert.torch_to_flax(sd, raw_var=True), num_batches_tracked=k, raw_var=True
    )
    assert convert.state_dicts_equal(sd, raw)


def test_trained_variance_without_counts_is_refused() -> None:
    with pytest.raises(ValueError, match="bn_counts"):
        convert.torch_to_flax(_trained_state_dict(batches=1))


def test_uniform_fit_accepts_uniform_and_rejects_lecun_normal() -> None:
    rng = np.random.default_rng(0)
    b = 1 / math.sqrt(27)
    assert stats.uniform_fit(rng.uniform(-b, b, 4000).astype(np.float32), b).passed
    lecun = rng.standard_normal(4000) / math.sqrt(27)
    fit = stats.uniform_fit(np.clip(lecun, -2 * b, 2 * b), b)
    assert not fit.passed and fit.max_ratio > 1.5 and fit.std_z > 10


def test_mean_diff_bar_is_two_standard_errors_or_the_floor() -> None:
    md = stats.mean_diff([0.50, 0.52, 0.48], [0.49, 0.51, 0.47])
    assert md.diff == pytest.approx(0.01)
    assert md.se == pytest.approx(math.sqrt(2 * 0.02**2 / 3))
    assert md.tolerance(0.005, n_se=2.0) == pytest.approx(2 * md.se)
    assert stats.mean_diff([0.5], [0.5]).tolerance(0.005) == 0.005


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "parity", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plant", "nope"], "unknown --plant 'nope'"),
        (["--checks", "9"], "--checks must name checks"),
        (["--seeds", "0"], "--seeds must be at least 1"),
    ],
)
def test_cli_rejects_bad_input_with_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    r = _cli(*args, "--out", str(tmp_path))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.realdata
def test_quick_suite_passes_end_to_end(real_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "parity"
    r = _cli("--quick", "--data-dir", str(real_data_dir), "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "all checks passed" in r.stdout
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and [c["number"] for c in report["checks"]] == [1, 2, 3, 4, 5, 6, 7]
    assert all(c["passed"] and c["measured"] is not None for c in report["checks"])
    assert "Check 7" in (out / "parity_report.md").read_text()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
