"""Config validation: numbers that would train nothing or diverge are refused up front."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from jaxbench.configs import PRESETS, get_config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", math.nan),
        ("lr", math.inf),
        ("lr", 0.0),
        ("lr", -0.1),
        ("weight_decay", math.nan),
        ("weight_decay", -1e-4),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("momentum", math.nan),
        ("bn_momentum", 0.0),
        ("bn_momentum", 1.5),
        ("bn_eps", 0.0),
        ("output_scale", math.inf),
        ("lr_end", math.nan),
        ("bn_bias_lr_mult", -1.0),
    ],
)
def test_bad_numbers_are_refused_naming_the_flag(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must"):
        get_config("tiny").replace(**{field: value})


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_serialise_as_strict_json(name: str) -> None:
    cfg = get_config(name)
    assert json.loads(cfg.to_json())["name"] == name


def test_trainer_refuses_nan_lr_before_loading_data(tmp_path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "jaxbench.train", "--config", "tiny", "--lr", "nan",
         "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "--lr must be a positive finite number" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("module", "args"),
    [
        ("jaxbench.train", ["--config", "resnet10"]),
        ("jaxbench.train", ["--lr", "abc"]),
        ("torch_ref.train", ["--widths", "a,b"]),
        ("parity", ["--seeds", "x"]),
    ],
)
def test_bad_flag_values_give_one_line(module: str, args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "see --help" in lines[0], r.stderr
