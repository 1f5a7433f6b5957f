"""K seeds in one vmapped program equal the K single runs (`jaxbench.train.train_seeds`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxbench.configs import get_config
from jaxbench.data import load_dataset
from jaxbench.train import CompileCache, train_and_evaluate, train_seeds


@pytest.mark.slow
@pytest.mark.realdata
def test_each_vmapped_seed_equals_its_single_run(real_data_dir: Path) -> None:
    """Per-step losses and final numbers, seed by seed. The first step's loss is equal
    up to summation order (a mixed-up seed, data key or plan differs there by far);
    later steps may drift only as float32 chaos does, a few steps in."""
    cfg = get_config("tiny").replace(
        subset=400, test_subset=500, epochs=1, widths=(8, 16, 16, 16), batch_size=100,
        lr_peak_epoch=0.5, data_dir=str(real_data_dir),
    )  # fmt: skip
    data = load_dataset(cfg)
    together = train_seeds(cfg, [3, 0], data)
    firsts, cache = [], CompileCache()  # the single runs share one program, as a sweep's do
    for got in together["seeds"]:
        alone = train_and_evaluate(
            cfg.replace(seed=got["seed"]), None, data=data, progress=False, quiet=True,
            compile_cache=cache,
        )  # fmt: skip
        a, b = np.asarray(got["step_losses"]), np.asarray(alone["step_losses"])
        assert a.shape == b.shape == (4,)
        firsts.append(b[0])
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
        np.testing.assert_allclose(a, b, rtol=1e-3)
        f, g = got["final"], alone["final"]
        assert abs(f["val_loss"] - g["val_loss"]) <= 1e-3 * g["val_loss"]
        for key in ("val_acc", "ema_val_acc"):  # a prediction or two may flip
            assert abs(f[key] - g[key]) <= 3 / 500, (key, f, g)
    assert len({round(x, 4) for x in firsts}) == 2  # the seeds really differ
    assert (cache.compiles, cache.hits) == (1, 1)
    assert together["total_time_seconds"] > 0 and together["compile_seconds"] > 0


def test_vmap_seeds_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="distinct seeds"):
        train_seeds(get_config("tiny"), [1, 1])
    with pytest.raises(ValueError, match="lookahead"):
        train_seeds(get_config("speedrun"), [0, 1])


@pytest.mark.slow
@pytest.mark.realdata
def test_train_cli_vmap_seeds(
    real_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jaxbench import train

    out = tmp_path / "run"
    argv = ["--config", "tiny", "--subset", "400", "--test-subset", "200", "--epochs", "1",
            "--widths", "8,8,8,8", "--batch-size", "100", "--lr-peak-epoch", "0.5",
            "--seed", "5", "--vmap-seeds", "2", "--data-dir", str(real_data_dir),
            "--out", str(out)]  # fmt: skip
    assert train.main(argv) == 0
    text = capsys.readouterr().out
    assert "seed 5:" in text and "seed 6:" in text and "2 seeds in one program: mean" in text
    doc = json.loads((out / "seeds.json").read_text())
    assert [s["seed"] for s in doc["seeds"]] == [5, 6]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "seeds.json", "status.json"]
    status = json.loads((out / "status.json").read_text())  # as a single run's
    assert status["status"] == "done" and status["epochs_completed"] == 1
    assert f"wrote config.json, status.json, seeds.json to {out}" in text
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert train.main(["--resume", str(out)]) == 0  # finished: said, and nothing changed
    assert "holds --vmap-seeds runs that finished after epoch 1" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    with pytest.raises(SystemExit) as e:  # bad input: exit 2, as a single run's
        train.main([*argv, "--vmap-seeds", "0", "--overwrite"])
    assert e.value.code == 2


def test_memory_check_refuses_what_cannot_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The estimate: K x (the train state, exactly + batch x each image's activations)."""
    import jax

    from jaxbench import memory, models, optim, train

    cfg = get_config("tiny").replace(widths=(4, 8, 8, 8), batch_size=16)
    model = models.model_from_config(cfg)
    state = train.create_train_state(model, optim.make_optimizer(cfg, 10), jax.random.PRNGKey(0))
    need, per_state, per_image = memory.estimate(cfg, state, 3, cfg.batch_size)
    assert per_state == memory.nbytes(state) > 2 * memory.nbytes(state.params)  # + EMA, momenta
    assert per_image >= 4 * 32 * 32 * 4  # at least the first conv's float32 output
    assert need == 3 * (per_state + 16 * per_image)
    monkeypatch.setattr(memory, "free_bytes", lambda: need - 1)
    with pytest.raises(ValueError, match=r"--vmap-seeds 3 with --batch-size 16 needs at least"):
        memory.check(cfg, state, 3)
    memory.check(cfg, state, 1)  # a single run's batch up to CHECKED_BATCH: not checked
    monkeypatch.setattr(memory, "free_bytes", lambda: need)
    memory.check(cfg, state, 3)  # fits


def test_cli_refuses_more_seeds_than_memory_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More seeds than the free memory holds (here: a machine with 1 MiB free): one line,
    exit 2, before the states are built (such a run once grew for minutes), no folder left."""
    from helpers import random_dataset

    from jaxbench import data, memory, train

    monkeypatch.setattr(data, "load_dataset", lambda cfg: random_dataset(64, 24))
    monkeypatch.setattr(memory, "free_bytes", lambda: 2**20)
    out = tmp_path / "new" / "run"
    argv = ["--config", "tiny", "--subset", "64", "--test-subset", "24", "--batch-size", "16",
            "--vmap-seeds", "64", "--out", str(out), "--no-progress"]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "--vmap-seeds 64 with --batch-size 16 needs at least" in err[0] and "GiB" in err[0]
    assert list(tmp_path.iterdir()) == []
