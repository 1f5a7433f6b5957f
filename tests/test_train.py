"""The trainer: one step against recorded values, scan == step, API, files, CLI, tiny learns."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench import augment, models, optim, train
from jaxbench.configs import Config, speedrun, tiny
from jaxbench.report import EPOCH_COLUMNS
from jaxbench.stream import epoch_plan

NARROW = Config(
    name="test",
    widths=(4, 8, 8, 8),
    batch_size=16,
    subset=32,
    test_subset=24,
    epochs=1,
    lr_peak_epoch=0.5,
    eval_batch_size=16,
    precision="float32",
)


def _synthetic(n_train: int = 64, n_test: int = 24) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    return SimpleNamespace(
        name="cifar10",
        classes=[str(i) for i in range(10)],
        train_images=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        train_labels=rng.integers(0, 10, n_train).astype(np.int32),
        test_images=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 10, n_test).astype(np.int32),
    )


# Recorded with jax 0.10.2 on CPU (float32). If one of these moves, the message names
# the stage that changed: init, augmentation, forward/loss, optimizer, BN stats or EMA.
REFERENCE = {
    "init: sum |params|": 314.35084705146437,
    "augmentation: sum of batch pixels": 6225568.0,
    "forward: loss": 2.327890396118164,
    "optimizer: sum |params| after": 320.5540513721353,
    "optimizer: sum params*index after": 102.9365675412607,
    "bn: sum of running means after": -1.1102781158406287,
    "bn: sum of running vars after": 50.692072451114655,
    "ema: sum |ema params| after": 315.83491571299965,
}


def _one_step_values() -> dict[str, float]:
    cfg = NARROW.replace(ema_every=1, ema_momentum=0.5, label_smoothing=0.2)
    data = _synthetic()
    model = models.model_from_config(cfg)
    tx = optim.make_optimizer(cfg, 2)
    init_key, data_key = train.seed_keys(0)
    state = train.create_train_state(model, tx, init_key)
    out = {"init: sum |params|": _abs_sum(state.params)}
    plan = augment.plan_batch(augment.plan_to_device(epoch_plan(cfg, 0, 32)), 0, cfg.batch_size)
    images = augment.apply_plan(jnp.asarray(data.train_images), plan, cfg)
    out["augmentation: sum of batch pixels"] = float(np.asarray(images, np.float64).sum())
    batch = {"images": images, "labels": jnp.asarray(data.train_labels)[plan["indices"]]}
    # a second, nonzero-LR step: the first update of a one-cycle from 0 has LR 0
    step = jax.jit(train.make_train_step(cfg, model, tx))
    state, _ = step(state, batch)
    state, metrics = step(state, batch)
    out["forward: loss"] = float(metrics["loss"])
    out["optimizer: sum |params| after"] = _abs_sum(state.params)
    leaves = jax.tree_util.tree_leaves(state.params)
    flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    out["optimizer: sum params*index after"] = float((flat * np.arange(flat.size) / 1e3).sum())
    bn = state.batch_stats
    out["bn: sum of running means after"] = float(
        sum(np.asarray(v["bn"]["mean"], np.float64).sum() for v in bn.values())
    )
    out["bn: sum of running vars after"] = float(
        sum(np.asarray(v["bn"]["var"], np.float64).sum() for v in bn.values())
    )
    out["ema: sum |ema params| after"] = _abs_sum(state.ema["params"])
    return out


def _abs_sum(tree: object) -> float:
    return float(
        sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree_util.tree_leaves(tree))
    )


def test_one_step_reference_values() -> None:
    got = _one_step_values()
    moved = [
        f"{k}: got {got[k]!r}, recorded {v!r}"
        for k, v in REFERENCE.items()
        if not np.isclose(got[k], v, rtol=2e-4, atol=1e-5)
    ]
    assert not moved, "one-step reference moved:\n" + "\n".join(moved)


def _run(cfg: Config, **kw: object) -> dict:
    return train.train_and_evaluate(
        cfg, data=_synthetic(), progress=False, quiet=True, return_variables=True, **kw
    )


def test_scan_and_step_loops_give_the_same_parameters() -> None:
    cfg = NARROW.replace(ema_every=1)
    step = _run(cfg.replace(loop="step"))
    scan = _run(cfg.replace(loop="scan"))
    assert step["loop"] == "step" and scan["loop"] == "scan"
    np.testing.assert_allclose(step["step_losses"], scan["step_losses"], rtol=1e-5)
    for name in ("variables", "ema_variables"):
        for a, b in zip(
            jax.tree_util.tree_leaves(step[name]),
            jax.tree_util.tree_leaves(scan[name]),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


class _Counting(train.Hooks):
    """Observes every hook call; returns the states unchanged."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def before_step(self, t: int, state: train.TrainState) -> train.TrainState:
        self.calls.append(("before_step", t))
        return state

    def after_step(self, t: int, state: train.TrainState, metrics: dict) -> None:
        self.calls.append(("after_step", t))

    def before_eval(self, epoch: int, state: train.TrainState) -> train.TrainState:
        self.calls.append(("before_eval", epoch))
        return state


def test_hooks_see_every_step_and_change_nothing_they_do_not_replace() -> None:
    cfg = NARROW.replace(loop="step", epochs=2, ema_every=1)
    plain = _run(cfg)
    hooks = _Counting()
    hooked = _run(cfg, hooks=hooks)
    assert plain["step_losses"] == hooked["step_losses"]
    steps = plain["steps_per_epoch"] * 2
    assert [c for c in hooks.calls if c[0] == "before_step"] == [
        ("before_step", t) for t in range(steps)
    ]
    assert ("after_step", steps - 1) in hooks.calls
    assert [c for c in hooks.calls if c[0] == "before_eval"] == [
        ("before_eval", 0),
        ("before_eval", 1),
    ]
    with pytest.raises(ValueError, match="per-step loop"):
        _run(cfg.replace(loop="scan"), hooks=hooks)


def test_summary_files_and_init_variables(tmp_path: os.PathLike[str]) -> None:
    cfg = NARROW.replace(epochs=2, lr_peak_epoch=1.0)
    first = _run(cfg, workdir=tmp_path, stream="shared")
    assert set(first["final"]) == {"val_acc", "ema_val_acc", "val_loss", "train_loss", "train_acc"}
    assert len(first["step_losses"]) == 2 * 2 and all(np.isfinite(first["step_losses"]))
    assert [r["epoch"] for r in first["epochs"]] == [1, 2]
    assert set(EPOCH_COLUMNS) <= set(first["epochs"][0])
    assert first["compile_seconds"] > 0 and first["total_time_seconds"] > 0
    assert first["n_test"] == 24 and 0.0 <= first["final"]["val_acc"] <= 1.0
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["final"] == first["final"] and "variables" not in saved
    assert json.loads((tmp_path / "config.json").read_text())["widths"] == [4, 8, 8, 8]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    # starting from the seed's own init reproduces the run; the caller's arrays survive donation
    init_key, _ = train.seed_keys(cfg.seed)
    given = models.init_variables(models.model_from_config(cfg), init_key)
    again = _run(cfg, stream="shared", init_variables=given)
    np.testing.assert_allclose(again["step_losses"], first["step_losses"], rtol=1e-6)
    assert np.isfinite(np.asarray(given["params"]["prep"]["conv"]["kernel"])).all()
    fast = _run(cfg)  # the device-drawn stream differs but trains too
    assert fast["stream"] == "fast" and fast["step_losses"] != first["step_losses"]


def test_bad_init_variables_and_nonfinite_loss_are_reported() -> None:
    cfg = NARROW
    given = models.init_variables(
        models.model_from_config(cfg.replace(widths=(4, 8, 8, 16))), jax.random.PRNGKey(0)
    )
    with pytest.raises(ValueError, match="init_variables"):
        _run(cfg, init_variables=given)
    given = models.init_variables(models.model_from_config(cfg), jax.random.PRNGKey(0))
    given["params"]["head"]["kernel"] = jnp.full_like(given["params"]["head"]["kernel"], jnp.nan)
    with pytest.raises(FloatingPointError, match="epoch 1"):
        _run(cfg, init_variables=given)


def test_cli_reports_bad_input_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "tiny", "--widths", "8,16"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--widths" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "tiny", "--lookahead"])
    assert e.value.code == 2 and "--lookahead" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--epochs", "--batch-size", "--lr", "--seed", "--subset", "--widths", "--out"):
        assert flag in out


@pytest.fixture
def cifar_dir(request: pytest.FixtureRequest) -> str:
    try:
        return str(request.getfixturevalue("real_data_dir"))
    except pytest.FixtureLookupError:
        d = os.environ.get("JAXBENCH_DATA_DIR")
        if not d:
            pytest.skip("set JAXBENCH_DATA_DIR to the unpacked CIFAR-10 to run this test")
        return d


@pytest.mark.slow
@pytest.mark.realdata
def test_tiny_learns_on_real_data(cifar_dir: str) -> None:
    """The tiny recipe on a quarter of its data for two epochs, 40 steps (~25 s; measured
    40% plain and 32% EMA, chance is 10%)."""
    cfg = tiny().replace(
        data_dir=cifar_dir,
        subset=2000,
        test_subset=500,
        epochs=2,
        batch_size=100,
        lr_peak_epoch=0.5,
    )
    summary = train.train_and_evaluate(cfg, progress=False, quiet=True)
    assert summary["final"]["ema_val_acc"] >= 0.25, summary["final"]
    assert summary["final"]["val_acc"] >= 0.3, summary["final"]


def test_compile_cache_reuses_programs_and_changes_no_number() -> None:
    """A second seed reuses the first run's executables; results equal an uncached run's."""
    data = _synthetic()
    cfg = NARROW.replace(epochs=2, ema_every=1)
    cache = train.CompileCache()
    first = train.train_and_evaluate(cfg, None, data=data, quiet=True, compile_cache=cache)
    second = train.train_and_evaluate(
        cfg.replace(seed=1), None, data=data, quiet=True, compile_cache=cache
    )
    assert first["compiled"] and not second["compiled"] and second["compile_seconds"] == 0.0
    assert (cache.compiles, cache.hits) == (1, 1)
    fresh = train.train_and_evaluate(cfg.replace(seed=1), None, data=data, quiet=True)
    assert fresh["compiled"]
    assert second["step_losses"] == fresh["step_losses"]
    assert second["final"] == fresh["final"]
    # another shape is another program
    train.train_and_evaluate(cfg.replace(batch_size=8), None, data=data, quiet=True,
                             compile_cache=cache)  # fmt: skip
    assert cache.compiles == 2


def test_final_evaluation_scores_equal_weights_once() -> None:
    """With lookahead the net ends equal to the EMA: one scoring, the same numbers as two."""
    data = _synthetic()
    cfg = dataclasses.replace(
        speedrun(), widths=(8, 8, 8), batch_size=16, subset=32, test_subset=24, epochs=1,
        lr_peak_epoch=0.5, whiten_bias_epochs=0, eval_batch_size=16, precision="float32",
    )  # fmt: skip
    assert cfg.lookahead and cfg.tta_shift
    r = train.setup(cfg, data)
    st = r.state.replace(params=r.state.ema["params"], batch_stats=r.state.ema["batch_stats"])
    both, once = r.evaluate(st), r.evaluate(st, same_weights=True)
    assert once == both and once["ema_val_acc"] == once["val_acc"]
    assert r.programs.eval_one is not r.programs.eval_both


def test_profile_writes_a_trace_and_a_top_ops_table(tmp_path: os.PathLike[str]) -> None:
    data = _synthetic()
    s = train.train_and_evaluate(
        NARROW, None, data=data, quiet=True, profile_dir=os.path.join(tmp_path, "prof")
    )
    prof = s["profile"]
    assert prof["trace"].endswith("perfetto_trace.json.gz") and os.path.getsize(prof["trace"]) > 0
    rows = prof["top_ops"]
    assert rows and all(r["seconds"] >= 0 and r["calls"] >= 1 for r in rows)
    assert [r["seconds"] for r in rows] == sorted((r["seconds"] for r in rows), reverse=True)
    assert 0.0 < sum(r["share"] for r in rows) <= 1.0 + 1e-9


# --- the command line: every place checked first, resume tells the truth ---------------------

# NARROW as flags, on `_synthetic()` data (`load_dataset` replaced): seconds per run.
NARROW_FLAGS = [
    "--config", "tiny", "--widths", "4,8,8,8", "--batch-size", "16", "--subset", "32",
    "--test-subset", "24", "--epochs", "1", "--lr-peak-epoch", "0.5", "--eval-batch-size", "16",
    "--precision", "float32", "--no-progress",
]  # fmt: skip


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of `python -m jaxbench.train argv`, in process."""
    try:
        code = train.main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def _hashes(folder: os.PathLike[str]) -> dict[str, str]:
    """Every file under `folder` by its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def test_cli_checks_every_output_place_before_any_work(
    tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from jaxbench import data

    def no_work(cfg: Config) -> None:
        raise AssertionError("the data loaded before the flags were checked")

    monkeypatch.setattr(data, "load_dataset", no_work)
    a_file = os.path.join(tmp_path, "a_file")
    with open(a_file, "w") as f:
        f.write("mine")
    full = os.path.join(tmp_path, "full")
    os.mkdir(full)
    with open(os.path.join(full, "summary.json"), "w") as f:
        f.write("{}")
    new = os.path.join(tmp_path, "new", "run")
    before = _hashes(tmp_path)
    for flags, text in [
        (["--profile", a_file, "--out", new], f"--profile {a_file} is a file"),
        (["--profile", a_file, "--out", full, "--overwrite"], "is a file"),  # full kept
        (["--profile", "/proc/jaxbench-train/trace", "--out", new], "not writable"),
        (["--re-evaluate", "--out", new], "--re-evaluate goes with --resume"),
        (["--vmap-seeds", "0", "--out", new], "--vmap-seeds 0"),
        (["--vmap-seeds", "2", "--profile", new], "without --resume and --profile"),
    ]:
        code, out, err = _cli([*NARROW_FLAGS, *flags], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and text in err[0], err
        assert _hashes(tmp_path) == before and not os.path.exists(os.path.join(tmp_path, "new"))

    # the README's first command offline: one line, and no empty runs/ left behind
    def offline(cfg: Config) -> None:
        raise ValueError("no CIFAR-10 here and no network to fetch it; pass --data-dir")

    monkeypatch.setattr(data, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(["--config", "tiny", "--out", "runs/tiny"], capsys)
    assert code == 2 and len(err) == 1 and "no network" in err[0], err
    assert not os.path.exists("runs") and _hashes(tmp_path) == before


def test_cli_resume_of_a_finished_running_or_dead_run(
    tmp_path: os.PathLike[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished run is left untouched (--re-evaluate forces it); a live one is refused;
    one whose process died without a word resumes."""
    from jaxbench import data

    monkeypatch.setattr(data, "load_dataset", lambda cfg: _synthetic())
    run = os.path.join(tmp_path, "run")
    code, _, err = _cli([*NARROW_FLAGS, "--checkpoint-every", "1", "--out", run], capsys)
    assert code == 0, err
    finished = _hashes(run)
    assert {"config.json", "summary.json", "status.json", "metrics.jsonl"} <= set(finished)

    code, out, err = _cli(["--resume", run], capsys)
    assert code == 0 and err == [] and len(out.splitlines()) == 1, (out, err)
    assert "finished after epoch 1: nothing" in out and "--re-evaluate" in out
    assert _hashes(run) == finished

    status_file = os.path.join(run, "status.json")
    with open(status_file) as f:
        status = json.load(f)
    alive = {**status, "status": "running", "pid": os.getpid(), "host": socket.gethostname()}
    with open(status_file, "w") as f:
        json.dump(alive, f)
    os.remove(os.path.join(run, "summary.json"))
    code, out, err = _cli(["--resume", run], capsys)
    assert code == 2 and len(err) == 1 and "still going" in err[0] and out == "", err

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    with open(status_file, "w") as f:
        json.dump({**alive, "pid": int(gone.stdout)}, f)
    code, out, err = _cli(["--resume", run, "--quiet"], capsys)
    assert code == 0 and err == [], err
    with open(status_file) as f:
        assert json.load(f)["status"] == "done"
    resumed = _hashes(run)
    with open(os.path.join(run, "summary.json")) as f:
        first = json.load(f)

    code, out, err = _cli(["--resume", run, "--re-evaluate", "--quiet"], capsys)
    assert code == 0 and err == [] and out == "", err
    with open(os.path.join(run, "summary.json")) as f:
        again = json.load(f)
    assert _hashes(run)["summary.json"] != resumed["summary.json"]  # written anew
    assert again["final"] == first["final"]
