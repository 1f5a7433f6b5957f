"""The benchmark: statistics with known answers, FLOP counts, the table, the CLI, a smoke race."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from jaxbench import bench, configs, flops


def _record(acc: float, time_s: float, seed: int = 0, curve: list[float] | None = None) -> dict:
    """A run record as `bench.run_record` makes it, with a monitoring curve."""
    curve = curve or [acc]
    rows = [
        {"epoch": i + 1, "ema_val_acc": a, "val_acc": a, "total_time_seconds": time_s * (i + 1)}
        for i, a in enumerate(curve)
    ]
    return {
        "seed": seed,
        "accuracy": acc,
        "time_seconds": time_s,
        "compile_seconds": 1.5,
        "images_per_second": 1000.0,
        "tflops_per_second": 2.5,
        "epochs": rows,
    }


# --- statistics ------------------------------------------------------------------------------


def test_describe_known_values() -> None:
    d = bench.describe([1.0, 2.0, 3.0, 4.0])
    assert d["n"] == 4 and d["mean"] == 2.5 and d["min"] == 1.0 and d["max"] == 4.0
    assert d["std"] == pytest.approx(math.sqrt(5 / 3))  # sample std, ddof=1
    assert bench.describe([0.5])["std"] is None  # no spread from one run


def test_share_at_least_counts_ties() -> None:
    assert bench.share_at_least([0.93, 0.94, 0.95, 0.9401], 0.94) == (3, 0.75)
    assert bench.share_at_least([0.1, 0.2], 0.94) == (0, 0.0)


def test_ratio_ci_known_answer() -> None:
    # means 2 and 4, stds 1 and 2, n 3 each: se^2 = 1/(3*4) + 4/(3*16) = 1/6, Welch df = 4,
    # t(0.975, 4) = 2.776445105; CI = 0.5 * exp(+-2.776445105 * sqrt(1/6)).
    r = bench.ratio_ci([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert r["value"] == 0.5
    assert r["df"] == pytest.approx(4.0)
    assert r["se_log"] == pytest.approx(math.sqrt(1 / 6))
    assert r["ci"] == pytest.approx([0.16095569, 1.55322247], rel=1e-7)
    lo, hi = r["ci"]
    assert math.log(hi / r["value"]) == pytest.approx(math.log(r["value"] / lo))  # log-symmetric


def test_ratio_ci_edge_cases() -> None:
    assert bench.ratio_ci([3.0], [2.0, 2.5])["ci"] is None  # one run: no spread, no interval
    r = bench.ratio_ci([3.0, 3.0], [2.0, 2.0])
    assert r["value"] == 1.5 and r["ci"] == [1.5, 1.5]
    # more runs with the same spread -> narrower interval
    wide = bench.ratio_ci([9.0, 11.0], [19.0, 21.0])["ci"]
    narrow = bench.ratio_ci([9.0, 11.0] * 5, [19.0, 21.0] * 5)["ci"]
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


def test_mean_curve_and_first_epoch() -> None:
    recs = [_record(0.6, 10.0, curve=[0.3, 0.5, 0.6]), _record(0.5, 20.0, curve=[0.2, 0.4, 0.5])]
    curve = bench.mean_curve([r["epochs"] for r in recs], "ema_val_acc")
    assert [p["epoch"] for p in curve] == [1, 2, 3]
    assert [p["accuracy"] for p in curve] == pytest.approx([0.25, 0.45, 0.55])
    assert [p["time_seconds"] for p in curve] == pytest.approx([15.0, 30.0, 45.0])
    assert bench.first_epoch_at(curve, 0.45) == 2
    assert bench.first_epoch_at(curve, 0.56) is None


def test_summarize_synthetic_runs() -> None:
    cfg = configs.resnet9()
    recs = [_record(a, t, i) for i, (a, t) in enumerate([(0.93, 4.0), (0.95, 5.0), (0.94, 6.0)])]
    s = bench.summarize(recs, {"compile_seconds": 30.0}, cfg, 0.94)
    assert s["runs"] == 3 and s["runs_at_target"] == 2 and s["share_at_target"] == 2 / 3
    assert s["accuracy"]["mean"] == pytest.approx(0.94)
    assert s["accuracy"]["std"] == pytest.approx(0.01)
    assert (s["time_seconds"]["mean"], s["time_seconds"]["std"]) == pytest.approx((5.0, 1.0))
    assert s["compile_seconds"] == {"warmup": 30.0, "timed_runs_mean": 1.5}
    assert s["epoch_reaching_target"] == 1  # mean of the one-epoch curve is 0.94
    assert (s["images_per_second"], s["tflops_per_second"]) == (1000.0, 2.5)


def test_headline_metric_follows_ema() -> None:
    assert bench.headline_metric(configs.resnet9()) == "ema_val_acc"
    no_ema = configs.resnet9().replace(ema_every=0)
    assert bench.headline_metric(no_ema) == "val_acc"
    assert "trained weights" in bench.describe_metric(no_ema)


def test_run_framework_seeds_and_warmup_kept_apart() -> None:
    calls: list[tuple[int, dict[str, Any]]] = []

    def fake_trainer(cfg: configs.Config, workdir: Any, **kw: Any) -> dict[str, Any]:
        calls.append((cfg.seed, kw))
        acc = 0.9 + cfg.seed / 100
        return {
            "final": {"val_acc": acc - 0.01, "ema_val_acc": acc},
            "epochs": [],
            "total_time_seconds": 2.0 + cfg.seed,
            "compile_seconds": 9.0 if not calls[:-1] else 0.1,
            "images_per_second": 100.0,
            "seed": cfg.seed,
        }

    cfg = configs.tiny()
    data = SimpleNamespace(train_labels=[0] * 10_000, test_labels=[0] * 2_000)
    warm, recs, _ = bench.run_framework("torch", cfg, data, 3, trainer=fake_trainer)
    assert [s for s, _ in calls] == [3, 0, 1, 2]  # warm-up first, on a seed no timed run uses
    assert warm["compile_seconds"] == 9.0 and warm["seed"] == 3
    assert [r["seed"] for r in recs] == [0, 1, 2]
    assert [r["accuracy"] for r in recs] == pytest.approx([0.90, 0.91, 0.92])  # EMA accuracy
    assert calls[0][1]["compile"] is None and calls[0][1]["quiet"] is True
    calls.clear()
    bench.run_framework("jax", cfg, data, 1, trainer=fake_trainer)
    assert "compile" not in calls[0][1]  # the JAX trainer has no such argument


def test_run_record_derives_throughput_from_timed_work() -> None:
    # 4 epochs x 40 batches x 250 = 40,000 images; 3 * 48,073,216 FLOPs each; the final
    # evaluation scores 2,000 test images with two weight sets (EMA), 2 forwards each (TTA).
    cfg = configs.resnet9().replace(widths=(16, 32, 64, 128), epochs=4, batch_size=250)
    images, work = bench.timed_work(cfg, 10_000, 2_000)
    assert images == 40_000
    assert work == 40_000 * 3 * 48_073_216 + 2_000 * 2 * 2 * 48_073_216
    summary = {
        "final": {"val_acc": 0.5, "ema_val_acc": 0.6},
        "total_time_seconds": 8.0,
        "images_per_second": 123.0,
        "seed": 1,
    }
    rec = bench.run_record(summary, cfg, 10_000, 2_000)
    assert rec["accuracy"] == 0.6 and rec["val_acc"] == 0.5 and rec["seed"] == 1
    assert rec["images_per_second"] == 5_000.0  # 40,000 images / 8 s, whatever the trainer says
    assert rec["trainer_images_per_second"] == 123.0
    assert rec["tflops_per_second"] == pytest.approx(work / 8.0 / 1e12)


# --- FLOPs -------------------------------------------------------------------------------------


def test_flops_resnet9_default_widths_hand_count() -> None:
    # 2*k*k*cin*cout*H*W per conv: prep 2*9*3*64*32*32 = 3,538,944; layer1 (conv at 32x32),
    # res1a+res1b (16x16), layer2 (16x16), layer3 (8x8), res3a+res3b (4x4) are 150,994,944
    # each as pairs; head 2*512*10 = 10,240. Total 758,523,904.
    cfg = configs.resnet9()
    per_layer = dict(flops.layer_flops(cfg))
    assert per_layer["prep"] == 3_538_944
    assert per_layer["layer1"] == 150_994_944
    assert per_layer["res3a"] + per_layer["res3b"] == 150_994_944
    assert per_layer["head"] == 10_240
    assert flops.forward_flops_per_image(cfg) == 758_523_904
    assert flops.train_flops_per_image(cfg) == 3 * 758_523_904
    assert flops.eval_flops_per_image(cfg) == 2 * 758_523_904
    assert flops.eval_flops_per_image(cfg.replace(tta=False)) == 758_523_904


def test_flops_follow_widths_and_classes() -> None:
    narrow = configs.resnet9().replace(widths=(16, 32, 64, 128))
    assert flops.forward_flops_per_image(narrow) == 48_073_216
    c100 = configs.resnet9().replace(dataset="cifar100")
    assert flops.forward_flops_per_image(c100) - 758_523_904 == 2 * 512 * 90


def test_flops_speedrun_hand_count() -> None:
    # whiten 2x2 VALID 3->24 at 31x31; block convs at 31/15, 15/7, 7/3; head 256 -> 10.
    cfg = configs.get_config("speedrun")
    expected = (
        2 * 4 * 3 * 24 * 31 * 31
        + 2 * 9 * (24 * 64 * 31 * 31 + 64 * 64 * 15 * 15)
        + 2 * 9 * (64 * 256 * 15 * 15 + 256 * 256 * 7 * 7)
        + 2 * 9 * (256 * 256 * 7 * 7 + 256 * 256 * 3 * 3)
        + 2 * 256 * 10
    )
    assert flops.forward_flops_per_image(cfg) == expected == 236_294_720
    assert flops.eval_forwards(cfg) == 6  # flip x three translations
    assert flops.eval_forwards(cfg.replace(tta=False)) == 1


# --- table -------------------------------------------------------------------------------------


def _doc() -> dict[str, Any]:
    cfg = configs.resnet9()
    doc: dict[str, Any] = {
        "preset": "resnet9",
        "target": 0.94,
        "accuracy_metric": "ema_val_acc",
        "accuracy_metric_description": bench.describe_metric(cfg),
        "frameworks": {},
    }
    for name, times in (("jax", [4.0, 5.0, 6.0]), ("torch", [8.0, 10.0, 12.0])):
        accs = [0.93, 0.95, 0.94]
        recs = [_record(a, t, i) for i, (a, t) in enumerate(zip(accs, times, strict=True))]
        doc["frameworks"][name] = {
            "runs": recs,
            "summary": bench.summarize(recs, {"compile_seconds": 12.34}, cfg, 0.94),
        }
    doc["ratio"] = {
        "numerator": "jax",
        "denominator": "torch",
        **bench.ratio_ci([4, 5, 6], [8, 10, 12]),
    }
    return doc


def test_format_table_matches_issue_layout() -> None:
    lines = bench.format_table(_doc()).splitlines()
    assert lines[0].split() == [
        "framework", "preset", "runs", "acc", "mean±std", ">=target",
        "time", "mean±std", "compile", "img/s", "TFLOP/s", "epoch>=target",
    ]  # fmt: skip
    assert lines[1].split() == [
        "jax", "resnet9", "3", "0.9400±0.0100", "2/3", "5.00±1.00", "s", "12.3", "s",
        "1000", "2.5", "1",
    ]  # fmt: skip
    assert lines[2].startswith("torch ") and "10.00±2.00 s" in lines[2]
    # columns line up: every row has its cells at the header's offsets
    assert lines[1].index("0.9400") == lines[0].index("acc mean")
    assert lines[2].index("2/3") == lines[0].index(">=target")
    assert "ema_val_acc" in lines[3] and "0.9400" in lines[3]
    assert lines[4].startswith("time ratio jax/torch (resnet9): 0.500, 95% CI 0.")


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert bench.plot(_doc(), tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--runs", "0"], "--runs"),
        (["--frameworks", "jax,tf"], "--frameworks"),
        (["--frameworks", "jax,jax"], "twice"),
        (["--target", "94"], "--target"),
        (["--widths", "8,8"], "--widths"),
        (["--config", "huge"], "--config"),
        (["--bogus"], "--bogus"),
        (["--seed", "3"], "--seed"),  # the benchmark owns the seeds
    ],
)
def test_bad_flags_exit_2_with_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def _fake_trainer_module(monkeypatch: pytest.MonkeyPatch, refuse: str | None) -> None:
    """Route every framework to a trainer that must never run, with an optional refusal."""
    mod = ModuleType("fake_bench_trainer")

    def train_and_evaluate(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise AssertionError("no run may start")

    def check_supported(cfg: configs.Config) -> None:
        if refuse:
            raise ValueError(refuse)

    train_and_evaluate.__module__ = mod.__name__
    mod.train_and_evaluate = train_and_evaluate  # type: ignore[attr-defined]
    mod.check_supported = check_supported  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(bench, "load_trainer", lambda name: train_and_evaluate)


def test_trainer_refusal_stops_before_any_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_trainer_module(monkeypatch, "this trainer does not implement --lookahead")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        bench.main(["--config", "tiny", "--data-dir", str(tmp_path), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err == "python -m jaxbench.bench: error: jax: this trainer does not implement --lookahead"
    )
    assert not out.exists()


def test_missing_data_stops_before_any_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_trainer_module(monkeypatch, None)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exc:
        bench.main(["--config", "tiny", "--data-dir", str(tmp_path / "nope"), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load cifar10" in err
    assert not out.exists()


def test_flags_pass_through_to_config() -> None:
    opts = bench.parse_args(
        ["--config", "tiny", "--epochs", "2", "--widths", "8,8,8,8", "--no-torch-compile"]
    )
    assert opts.cfg.name == "tiny" and opts.cfg.epochs == 2 and opts.cfg.widths == (8, 8, 8, 8)
    assert opts.cfg.subset == configs.tiny().subset  # the preset's value survives
    assert opts.torch_compile is False and opts.frameworks == ("jax", "torch")
    assert opts.out == Path("bench-out/tiny")


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture
def data_dir(request: pytest.FixtureRequest) -> str:
    """The real CIFAR-10: the shared `real_data_dir` fixture if conftest has it, else the env."""
    try:
        return str(request.getfixturevalue("real_data_dir"))
    except pytest.FixtureLookupError:
        pass
    path = os.environ.get("JAXBENCH_DATA_DIR")
    if not path or not Path(path).is_dir():
        pytest.skip("needs the real CIFAR-10: set JAXBENCH_DATA_DIR to the unpacked folder")
    return path


@pytest.mark.slow
@pytest.mark.realdata
def test_smoke_race_writes_every_field(
    data_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "bench"
    bench.main(
        ["--config", "tiny", "--frameworks", "jax,torch", "--runs", "2", "--target", "0.5",
         "--data-dir", data_dir, "--out", str(out), "--subset", "500", "--test-subset", "500",
         "--epochs", "1", "--widths", "8,8,8,8", "--batch-size", "100", "--lr-peak-epoch", "0.5"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "framework" in printed and "time ratio jax/torch" in printed
    doc = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 1000
    assert doc["complete"] and doc["accuracy_metric"] == "ema_val_acc"
    assert doc["config"]["widths"] == [8, 8, 8, 8] and doc["n_train"] == 500
    env = doc["environment"]
    for key in ("date", "command", "gpu_driver", "jax", "jax_device", "torch", "torch_device"):
        assert key in env, key
    assert env["command"].startswith(
        "python -m jaxbench.bench --config tiny --frameworks jax,torch"
    )
    for name in ("jax", "torch"):
        fw = doc["frameworks"][name]
        assert [r["seed"] for r in fw["runs"]] == [0, 1] and fw["warmup"]["seed"] == 2
        assert fw["trainer"]["environment"]["date"]  # each trainer's own record is kept
        for r in fw["runs"]:
            assert 0.0 <= r["accuracy"] <= 1.0 and r["time_seconds"] > 0
            assert r["images_per_second"] > 0 and len(r["epochs"]) == 1
        s = fw["summary"]
        for key in ("mean", "std", "min", "max"):
            assert isinstance(s["accuracy"][key], float), (name, key)
            assert isinstance(s["time_seconds"][key], float), (name, key)
        assert s["runs_at_target"] in (0, 1, 2) and 0.0 <= s["share_at_target"] <= 1.0
        assert "epoch_reaching_target" in s and len(s["mean_curve"]) == 1
        assert s["compile_seconds"]["warmup"] >= 0.0
        assert s["images_per_second"] > 0 and s["tflops_per_second"] > 0
    ratio = doc["ratio"]
    assert ratio["numerator"] == "jax" and ratio["denominator"] == "torch"
    jax_t = doc["frameworks"]["jax"]["summary"]["time_seconds"]["mean"]
    torch_t = doc["frameworks"]["torch"]["summary"]["time_seconds"]["mean"]
    assert ratio["value"] == pytest.approx(jax_t / torch_t)
    assert ratio["ci"][0] <= ratio["value"] <= ratio["ci"][1]
