"""Config validation: numbers that would train nothing or diverge are refused up front."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jaxbench.configs import (
    PRESETS,
    Config,
    Recipe,
    RunOptions,
    add_config_args,
    config_from_args,
    config_from_dict,
    get_config,
    recipe_of,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"


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


def test_config_is_its_recipe_then_its_run_options() -> None:
    names = [f.name for f in dataclasses.fields(Config)]
    recipe = [f.name for f in dataclasses.fields(Recipe)]
    run = [f.name for f in dataclasses.fields(RunOptions)]
    assert names == recipe + run
    assert set(run) == {"seed", "data_dir", "loop", "devices", "out", "checkpoint_every"}
    cfg = get_config("tiny")
    # a compile cache keys on the recipe: the run options leave it as it is
    other = cfg.replace(seed=3, out="/o", data_dir="/d", loop="step", devices=1, checkpoint_every=2)
    assert other.recipe() == cfg.recipe() == recipe_of(other)
    assert type(cfg.recipe()) is Recipe and not hasattr(cfg.recipe(), "out")
    assert cfg.replace(lr=0.3).recipe() != cfg.recipe()
    assert cfg.replace(bn_sync="local").recipe() != cfg.recipe()


def test_every_field_is_still_a_flag_and_attribute() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--config", "tiny", "--lr", "0.3", "--out", "/o", "--seed", "4"])
    cfg = config_from_args(args)
    assert (cfg.lr, cfg.out, cfg.seed, cfg.name) == (0.3, "/o", 4, "tiny")
    shown = parser.format_help()
    for f in dataclasses.fields(Config):
        assert f.name == "name" or f"--{f.name.replace('_', '-')}" in shown


@pytest.mark.parametrize(
    "path", sorted(RESULTS.glob("**/config.json")), ids=lambda p: p.parent.name
)
def test_saved_run_configs_still_load(path: Path) -> None:
    saved = json.loads(path.read_text())
    cfg = config_from_dict(saved)
    assert {k: v for k, v in cfg.to_dict().items() if k in saved} == saved
