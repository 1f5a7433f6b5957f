"""Every planted bug is caught by the deterministic check meant to catch it (never check 7
alone); the unplanted suite passes 1-6. Source plants edit a trainer's own code in a copy."""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jaxbench.configs import get_config
from parity.checks import Context, optimizer
from parity.harness import full_precision
from parity.plants import PACKAGES, PLANTED_ENV, PLANTS, planted_harness, planted_tree
from parity.suite import FAST_CHECKS, run_suite


@pytest.fixture(scope="module")
def data(cifar10: Any) -> Any:
    return cifar10


def _quiet(_: str) -> None:
    pass


HARNESS_PLANTS = sorted(n for n, p in PLANTS.items() if p.edit is None)
SOURCE_PLANTS = sorted(n for n, p in PLANTS.items() if p.edit is not None)


def _readme_plants() -> tuple[set[str], set[str]]:
    """The plant names the README lists: (those that swap a building block, those that edit
    a trainer's source), from its paragraph that starts "Plants (`--plant NAME`)"."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    para = text[text.index("Plants (`--plant NAME`)") :].split("\n\n")[0]
    swap, edit = para.split("Source plants")
    names = lambda part: set(re.findall(r"`([a-z0-9_]+)`", part))  # noqa: E731
    return names(swap), names(edit)


def test_readme_lists_every_plant_of_the_registry_by_kind() -> None:
    swap, edit = _readme_plants()
    assert swap == set(HARNESS_PLANTS) and edit == set(SOURCE_PLANTS), (swap, edit)


def test_plants_cover_every_deterministic_check_and_the_trainers_glue() -> None:
    assert all(p.check in FAST_CHECKS for p in PLANTS.values())  # never check 7 alone
    assert {p.check for p in PLANTS.values()} == set(FAST_CHECKS)  # a plant for each
    edited = {p.edit.path for p in PLANTS.values() if p.edit is not None}
    assert {"jaxbench/train.py", "torch_ref/train.py"} <= edited


# Each Muon plant breaks one framework: (plant, the framework whose figures must fail).
MUON_PLANTS = {"muon_ns_coefficient": "jax", "muon_scale_rms": "torch"}


@pytest.mark.parametrize("name", [None, *MUON_PLANTS])
def test_muon_run_passes_clean_and_fails_only_the_planted_framework(name: str | None) -> None:
    """Check 4's Muon run, both recipes: clean, every figure passes; planted, the planted
    framework's figures against the float64 reference and against the other framework fail,
    far above the bar, and the other framework's still pass."""
    harness = planted_harness(name)
    cfg = Context(cfg=get_config("tiny"), harness=harness).arith_cfg
    with harness.active(), full_precision():
        figures, _ = optimizer.muon_figures(harness, cfg, steps=3, seed=4)
    assert len(figures) == 6 and all(f.name.startswith("Muon (") for f in figures)
    failed = {f.name.split(": ")[0] for f in figures if not f.passed}
    if name is None:
        assert not failed, [(f.name, f.value) for f in figures]
        return
    planted = MUON_PLANTS[name]
    recipes = ("airbench94_muon", "record")
    assert failed == {f"Muon ({r}) {w}" for r in recipes for w in (planted, "jax vs torch")}
    assert all(f.value > 100 for f in figures if not f.passed), [(f.name, f.value) for f in figures]


# The source plant whose test starts the real `python -m parity` child (a new interpreter on
# the planted copy); the others run that child's code in this process, from the same copy.
REAL_CHILD = "normalization_data_path"


@contextlib.contextmanager
def _packages_from(tree: Path) -> Iterator[None]:
    """Inside the block, this process imports jaxbench, torch_ref and parity from `tree`, and
    its own modules again after it: the child's work without the child's start-up (imports,
    torch's first optimizer, the data: ~6 CPU-s a plant, measured), the frameworks loaded."""
    ours = lambda: [k for k in sys.modules if k.split(".")[0] in PACKAGES]  # noqa: E731
    saved = {k: sys.modules.pop(k) for k in ours()}
    sys.path.insert(0, str(tree))
    try:
        yield
    finally:
        sys.path.remove(str(tree))
        for k in ours():
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("name", SOURCE_PLANTS)
def test_source_plant_is_caught_by_its_check(
    name: str,
    real_data_dir: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`python -m parity --plant NAME`: for REAL_CHILD the command's first half runs here and
    starts the real child on the planted copy; for the others the child's own `main` runs
    here on the planted copy's modules (what `-P` and PYTHONPATH give the real child)."""
    from parity.__main__ import main

    out_dir = tmp_path / "out"
    argv = ["--quick", "--plant", name, "--checks", str(PLANTS[name].check),
            "--data-dir", str(real_data_dir), "--out", str(out_dir), "--quiet"]  # fmt: skip
    if name == REAL_CHILD:
        code = main(argv)
    else:
        with planted_tree(PLANTS[name]) as tree, _packages_from(tree):
            monkeypatch.setenv(PLANTED_ENV, name)
            child = importlib.import_module("parity.__main__")
            assert Path(child.__file__).is_relative_to(tree)  # the planted copy runs
            code = child.main(argv)
    out, err = capfd.readouterr()
    assert code == 1, out + err[-3000:]
    assert f"plant {name!r} caught by check {PLANTS[name].check}" in out, out
    report = json.loads((out_dir / "parity.json").read_text())
    assert report["plant"] == name and not report["passed"]


def test_source_plant_that_no_longer_applies_is_an_error() -> None:
    from parity.plants import Plant, SourceEdit, planted_tree

    stale = Plant("stale", 6, "x", edit=SourceEdit("jaxbench/train.py", "no such line", "y"))
    with pytest.raises(ValueError, match="no longer applies"):
        with planted_tree(stale):
            pass


def test_source_plant_refuses_to_run_in_process() -> None:
    with pytest.raises(ValueError, match="python -m parity --plant"):
        run_suite(get_config("tiny"), quick=True, checks=[6], plant=SOURCE_PLANTS[0], log=_quiet)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("name", HARNESS_PLANTS)
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
@pytest.mark.parametrize("preset", ["speedrun", "resnet9"])
def test_unplanted_suite_passes_checks_1_to_6(preset: str, data: Any) -> None:
    suite = run_suite(get_config(preset), quick=True, data=data, checks=FAST_CHECKS, log=_quiet)
    failed = {r.number: (r.error, [f.name for f in r.failed_figures]) for r in suite.results}
    assert suite.passed, {k: v for k, v in failed.items() if v[0] or v[1]}


@pytest.mark.slow
@pytest.mark.realdata
def test_unplanted_suite_passes_checks_1_to_6_on_tiny(quick_parity: tuple) -> None:
    """`tiny` is the CLI's default: the one quick parity run (checks 1-7) holds its 1-6."""
    proc, out = quick_parity
    assert (out / "parity.json").exists(), proc.stdout + proc.stderr[-3000:]
    report = json.loads((out / "parity.json").read_text())
    assert report["config"]["name"] == "tiny" and report["plant"] is None
    fast = [c for c in report["checks"] if c["number"] in FAST_CHECKS]
    assert [c["number"] for c in fast] == list(FAST_CHECKS)
    failed = {c["number"]: (c["error"], [f["name"] for f in c["figures"] if not f["passed"]])
              for c in fast if not c["passed"]}  # fmt: skip
    assert not failed, failed


@pytest.mark.slow
@pytest.mark.realdata
def test_cli_plant_exits_1_and_names_the_check(
    real_data_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A harness plant through the command (`main`; the source plants above start the real
    `python -m parity` child): exit 1, the catching check named, the report written."""
    from parity.__main__ import main

    argv = ["--quick", "--plant", "flip_mismatch", "--checks", "5", "--data-dir",
            str(real_data_dir), "--out", str(tmp_path), "--quiet"]  # fmt: skip
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 1, out + err[-2000:]
    assert "plant 'flip_mismatch' caught by check 5 (augmentation)" in out
    assert (tmp_path / "parity_report.md").exists()
