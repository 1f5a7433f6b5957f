"""The benchmark: statistics with known answers, FLOP counts, the table, the CLI, a smoke race."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from jaxbench import configs, stats
from jaxbench.bench import cli, flops, frameworks, output, records
from jaxbench.bench.race import SCHEMA_VERSION


def _record(acc: float, time_s: float, seed: int = 0, curve: list[float] | None = None) -> dict:
    """A run record as `records.run_record` makes it, with a monitoring curve."""
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
    d = stats.describe([1.0, 2.0, 3.0, 4.0])
    assert d["n"] == 4 and d["mean"] == 2.5 and d["min"] == 1.0 and d["max"] == 4.0
    assert d["std"] == pytest.approx(math.sqrt(5 / 3))  # sample std, ddof=1
    assert stats.describe([0.5])["std"] is None  # no spread from one run


def test_share_at_least_counts_ties() -> None:
    assert stats.share_at_least([0.93, 0.94, 0.95, 0.9401], 0.94) == (3, 0.75)
    assert stats.share_at_least([0.1, 0.2], 0.94) == (0, 0.0)


def test_ratio_ci_known_answer() -> None:
    # means 2 and 4, stds 1 and 2, n 3 each: se^2 = 1/(3*4) + 4/(3*16) = 1/6, Welch df = 4,
    # t(0.975, 4) = 2.776445105; CI = 0.5 * exp(+-2.776445105 * sqrt(1/6)).
    r = stats.ratio_ci([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert r["value"] == 0.5
    assert r["df"] == pytest.approx(4.0)
    assert r["se_log"] == pytest.approx(math.sqrt(1 / 6))
    assert r["ci"] == pytest.approx([0.16095569, 1.55322247], rel=1e-7)
    lo, hi = r["ci"]
    assert math.log(hi / r["value"]) == pytest.approx(math.log(r["value"] / lo))  # log-symmetric


def test_ratio_ci_edge_cases() -> None:
    assert stats.ratio_ci([3.0], [2.0, 2.5])["ci"] is None  # one run: no spread, no interval
    r = stats.ratio_ci([3.0, 3.0], [2.0, 2.0])
    assert r["value"] == 1.5 and r["ci"] == [1.5, 1.5]
    # more runs with the same spread -> narrower interval
    wide = stats.ratio_ci([9.0, 11.0], [19.0, 21.0])["ci"]
    narrow = stats.ratio_ci([9.0, 11.0] * 5, [19.0, 21.0] * 5)["ci"]
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]


def test_mean_curve_and_first_epoch() -> None:
    recs = [_record(0.6, 10.0, curve=[0.3, 0.5, 0.6]), _record(0.5, 20.0, curve=[0.2, 0.4, 0.5])]
    curve = records.mean_curve([r["epochs"] for r in recs], "ema_val_acc")
    assert [p["epoch"] for p in curve] == [1, 2, 3]
    assert [p["accuracy"] for p in curve] == pytest.approx([0.25, 0.45, 0.55])
    assert [p["time_seconds"] for p in curve] == pytest.approx([15.0, 30.0, 45.0])
    assert records.first_epoch_at(curve, 0.45) == 2
    assert records.first_epoch_at(curve, 0.56) is None


def test_summarize_synthetic_runs() -> None:
    cfg = configs.resnet9()
    recs = [_record(a, t, i) for i, (a, t) in enumerate([(0.93, 4.0), (0.95, 5.0), (0.94, 6.0)])]
    s = records.summarize(recs, {"compile_seconds": 30.0}, cfg, 0.94)
    assert s["runs"] == 3 and s["runs_at_target"] == 2 and s["share_at_target"] == 2 / 3
    assert s["accuracy"]["mean"] == pytest.approx(0.94)
    assert s["accuracy"]["std"] == pytest.approx(0.01)
    assert (s["time_seconds"]["mean"], s["time_seconds"]["std"]) == pytest.approx((5.0, 1.0))
    assert s["compile_seconds"] == {"warmup": 30.0, "timed_runs_mean": 1.5}
    assert s["epoch_reaching_target"] == 1  # mean of the one-epoch curve is 0.94
    assert (s["images_per_second"], s["tflops_per_second"]) == (1000.0, 2.5)


def test_headline_metric_follows_ema() -> None:
    assert records.headline_metric(configs.resnet9()) == "ema_val_acc"
    no_ema = configs.resnet9().replace(ema_every=0)
    assert records.headline_metric(no_ema) == "val_acc"
    assert "trained weights" in records.describe_metric(no_ema)
    record = configs.get_config("speedrun_record")  # selective TTA: the extra views for some
    assert records.describe_metric(record).endswith(
        "(trained weights, plain view; flip + shift TTA for the 25% least confident)"
    )
    assert records.describe_metric(record.replace(tta_select=0.0)).endswith("flip + shift TTA)")


def test_run_record_derives_throughput_from_timed_work() -> None:
    # 4 epochs x 40 batches x 250 = 40,000 images; 3 * 48,073,216 FLOPs each; the final
    # evaluation scores 2,000 test images with two weight sets (EMA), 2 forwards each (TTA).
    cfg = configs.tiny().replace(
        widths=(16, 32, 64, 128), epochs=4, batch_size=250, subset=None, test_subset=None
    )
    images, work = records.timed_work(cfg, 10_000, 2_000)
    assert images == 40_000
    assert work == 40_000 * 3 * 48_073_216 + 2_000 * 2 * 2 * 48_073_216
    summary = {
        "final": {"val_acc": 0.5, "ema_val_acc": 0.6},
        "total_time_seconds": 8.0,
        "images_per_second": 123.0,
        "seed": 1,
    }
    rec = records.run_record(summary, cfg, 10_000, 2_000)
    assert rec["accuracy"] == 0.6 and rec["val_acc"] == 0.5 and rec["seed"] == 1
    assert rec["images_per_second"] == 5_000.0  # 40,000 images / 8 s, whatever the trainer says
    assert rec["trainer_images_per_second"] == 123.0
    assert rec["tflops_per_second"] == pytest.approx(work / 8.0 / 1e12)


# --- FLOPs -------------------------------------------------------------------------------------


def test_flops_resnet9_default_widths_hand_count() -> None:
    # 2*k*k*cin*cout*H*W per conv: prep 2*9*3*64*32*32 = 3,538,944; layer1 (conv at 32x32),
    # res1a+res1b (16x16), layer2 (16x16), layer3 (8x8), res3a+res3b (4x4) are 150,994,944
    # each as pairs; head 2*512*10 = 10,240. Total 758,523,904.
    cfg = configs.myrtle24().replace(tta=True)
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
    narrow = configs.myrtle24().replace(widths=(16, 32, 64, 128))
    assert flops.forward_flops_per_image(narrow) == 48_073_216
    c100 = configs.myrtle24().replace(dataset="cifar100")
    assert flops.forward_flops_per_image(c100) - 758_523_904 == 2 * 512 * 90


def test_flops_page_whitening_stem_hand_count() -> None:
    # Page's prep: a 3x3 whitening conv 3 -> 27 and a 1x1 conv 27 -> 64, both at 32x32,
    # in place of the 3x3 conv 3 -> 64; the rest of the net is the same.
    page = configs.resnet9()
    per_layer = dict(flops.layer_flops(page))
    assert per_layer["prep.whiten"] == 2 * 9 * 3 * 27 * 32 * 32
    assert per_layer["prep.conv"] == 2 * 27 * 64 * 32 * 32
    assert flops.forward_flops_per_image(page) == (
        758_523_904 - 3_538_944 + 2 * 9 * 3 * 27 * 32 * 32 + 2 * 27 * 64 * 32 * 32
    )
    # XLA's count: the frozen whitening conv runs forward only, and the 1x1 conv after it
    # needs no input gradient (nothing before it trains)
    whiten = flops.conv_flops_unpadded(3, 3, 27, 32, 1)
    one_by_one = flops.conv_flops_unpadded(1, 27, 64, 32, 0)
    rest = flops.unpadded_train_flops_per_image(page) - whiten - 2 * one_by_one
    plain = configs.myrtle24()
    assert (
        rest
        == flops.unpadded_train_flops_per_image(plain)
        - flops.conv_flops_unpadded(3, 3, 64, 32, 1) * 2
    )


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
        "accuracy_metric_description": records.describe_metric(cfg),
        "frameworks": {},
    }
    for name, times in (("jax", [4.0, 5.0, 6.0]), ("torch", [8.0, 10.0, 12.0])):
        accs = [0.93, 0.95, 0.94]
        recs = [_record(a, t, i) for i, (a, t) in enumerate(zip(accs, times, strict=True))]
        warm = {"compile_seconds": 12.34, "built_programs": True}
        for r in recs:
            r["built_programs"] = False
        doc["frameworks"][name] = {
            "warmup": warm,
            "runs": recs,
            "summary": records.summarize(recs, warm, cfg, 0.94),
        }
    runs = {n: fw["runs"] for n, fw in doc["frameworks"].items()}
    doc["verdicts"] = {"jax": records.decide(runs, "jax", "torch", 0.94)}
    doc["ratio"] = doc["verdicts"]["jax"]["ratio"]
    return doc


def test_format_table_layout() -> None:
    lines = output.format_table(_doc()).splitlines()
    assert lines[0].split() == [
        "framework", "preset", "devices", "runs", "acc", "mean±std", ">=target",
        "time", "mean±std", "compile", "img/s", "TFLOP/s", "epoch>=target", "built",
    ]  # fmt: skip
    assert lines[1].split() == [
        "jax", "resnet9", "1", "3", "0.9400±0.0100", "2/3", "5.00±1.00", "s", "12.3", "s",
        "1000", "2.5", "1", "1",
    ]  # fmt: skip
    assert lines[2].startswith("torch ") and "10.00±2.00 s" in lines[2]
    # columns line up: every row has its cells at the header's offsets
    assert lines[1].index("0.9400") == lines[0].index("acc mean")
    assert lines[2].index("2/3") == lines[0].index(">=target")
    assert "ema_val_acc" in lines[3] and "0.9400" in lines[3]
    assert lines[5].startswith("time ratio jax/torch (resnet9): 0.500, 95% CI 0.")


def test_no_winner_below_target() -> None:
    """Time-to-target needs both sides at the target: else no ratio, and the table says so."""
    fast_but_wrong = [_record(0.935, 1.0, i) for i in range(3)]
    slow_and_right = [_record(0.945, 9.0, i) for i in range(3)]
    runs = {"jax": fast_but_wrong, "torch": slow_and_right}
    v = records.decide(runs, "jax", "torch", 0.94)
    assert v["status"] == "target not reached" and v["ratio"] is None
    assert v["below_target"] == {"jax": pytest.approx(0.935)}
    line = output.format_verdict(v, "resnet9")
    assert "target not reached" in line and "jax 0.9350" in line and "ratio" not in line[15:]
    ok = records.decide(runs, "jax", "torch", 0.93)
    assert ok["status"] == "ratio" and ok["ratio"]["value"] == pytest.approx(1 / 9)
    assert records.decide({"jax": [], "torch": slow_and_right}, "jax", "torch", 0.9)["status"] == (
        "no runs"
    )


def test_plot_writes_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert output.plot(_doc(), tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--runs", "0"], "--runs"),
        (["--runs", "1001"], "--runs takes 1 to 1000"),
        (["--frameworks", "jax,tf"], "--frameworks"),
        (["--frameworks", "jax,jax"], "twice"),
        (["--target", "94"], "--target"),
        (["--widths", "8,8"], "--widths"),
        (["--config", "huge"], "--config"),
        (["--config", "tiny,tiny"], "--config"),
        (["--loop", "scan,fast"], "--loop"),
        (["--max-seconds", "0"], "--max-seconds"),
        (["--max-seconds", "nan"], "--max-seconds"),
        (["--max-seconds", "-5"], "--max-seconds"),
        (["--max-seconds", "1e9"], "--max-seconds"),
        (["--target", "0"], "--target"),
        (["--target", "nan"], "--target"),
        (["--vmap-seeds", "0"], "--vmap-seeds takes K from 2"),
        (["--vmap-seeds", "-2"], "--vmap-seeds"),
        (["--vmap-seeds", "100000"], "--vmap-seeds takes K from 2 to 64"),
        (["--checkpoint-every", "1"], "nothing to checkpoint"),
        (["--bogus"], "--bogus"),
        (["--seed", "3"], "--seed"),  # the benchmark owns the seeds
    ],
)
def test_bad_flags_exit_2_with_one_line(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
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
    monkeypatch.setattr(frameworks, "load_trainer", lambda name: train_and_evaluate)


def test_trainer_refusal_stops_before_any_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_trainer_module(monkeypatch, "this trainer does not implement --lookahead")
    out = tmp_path / "never"
    assert cli.main(["--config", "tiny", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: jax: this trainer does not implement --lookahead"
    assert not out.exists()


def test_missing_data_stops_before_any_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_trainer_module(monkeypatch, None)
    out = tmp_path / "never"
    argv = ["--config", "tiny", "--data-dir", str(tmp_path / "nope"), "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot load cifar10" in err
    assert not out.exists()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_profile_file_is_refused_before_any_run(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overwrite: bool,
) -> None:
    """--profile names a folder: a file there is one line, exit 2, and nothing changed;
    checked before --overwrite empties --out, so the old results survive a refusal."""
    _fake_trainer_module(monkeypatch, None)
    profile = tmp_path / "traces"
    profile.write_text("mine")
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.json").write_text("{}")
    argv = ["--config", "tiny", "--data-dir", str(tmp_path), "--out", str(out),
            "--profile", str(profile), *(["--overwrite"] if overwrite else [])]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --profile {profile} is a file") and "\n" not in err
    assert profile.read_text() == "mine" and (out / "bench.json").read_text() == "{}"
    assert sorted(p.name for p in out.iterdir()) == ["bench.json"]


def test_checkpoint_every_is_not_listed(capsys: pytest.CaptureFixture[str]) -> None:
    """The bench's runs keep no run folder: --help does not offer --checkpoint-every, and
    0 (never) is accepted as the trainers accept it."""
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    assert "--checkpoint-every" not in capsys.readouterr().out
    assert cli.parse_args(["--config", "tiny", "--checkpoint-every", "0"]).vmap_seeds == 0


def test_flags_pass_through_to_config() -> None:
    opts = cli.parse_args(
        ["--config", "tiny", "--epochs", "2", "--widths", "8,8,8,8", "--no-torch-compile"]
    )
    (cfg,) = opts.cfgs
    assert cfg.name == "tiny" and cfg.epochs == 2 and cfg.widths == (8, 8, 8, 8)
    assert cfg.subset == configs.tiny().subset  # the preset's value survives
    assert opts.torch_compile is False and opts.frameworks == ("jax", "torch")
    assert opts.out == Path("bench-out/tiny") and opts.runs == cli.DEFAULT_RUNS
    two = cli.parse_args(
        [
            "--config",
            "tiny,speedrun",
            "--epochs",
            "2",
            "--lr-peak-epoch",
            "1",
            "--max-seconds",
            "60",
        ]
    )
    assert [c.name for c in two.cfgs] == ["tiny", "speedrun"]
    assert all(c.epochs == 2 for c in two.cfgs) and two.runs is None  # budget-driven
    assert two.out == Path("bench-out/tiny+speedrun")
    loops = cli.parse_args(["--config", "tiny", "--loop", "scan,step"])
    assert [(e.name, e.loop) for e in loops.entries] == [
        ("jax-scan", "scan"), ("jax-step", "step"), ("torch", None),
    ]  # fmt: skip


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


SMALL = ["--subset", "500", "--test-subset", "500", "--epochs", "1", "--widths", "8,8,8,8",
         "--batch-size", "100", "--lr-peak-epoch", "0.5"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.realdata
def test_smoke_race_writes_every_field(
    data_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "bench"
    cli.main(
        ["--config", "tiny", "--frameworks", "jax,torch", "--runs", "2", "--target", "0.05",
         "--data-dir", data_dir, "--out", str(out), *SMALL]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "framework" in printed and "time ratio jax/torch" in printed
    doc = json.loads((out / "bench.json").read_text())
    assert doc["complete"] and doc["schema"] == SCHEMA_VERSION
    assert doc["stop_reason"] == "reached --runs 2"
    assert (out / "bench-tiny.png").stat().st_size > 1000
    race = doc["races"]["tiny"]
    assert race["complete"] and race["accuracy_metric"] == "ema_val_acc"
    assert race["config"]["widths"] == [8, 8, 8, 8] and race["n_train"] == 500
    env = doc["environment"]
    for key in ("date", "command", "gpu_driver", "jax", "jax_device", "torch", "torch_device"):
        assert key in env, key
    assert env["command"].startswith(
        "python -m jaxbench.bench --config tiny --frameworks jax,torch"
    )
    # interleaved: warm-ups, then ABAB rounds (who goes first alternates)
    order = [(o["contender"], o["seed"], o["kind"]) for o in doc["order"]]
    assert order == [
        ("jax", 1000, "warm-up"), ("torch", 1000, "warm-up"),
        ("jax", 0, "timed"), ("torch", 0, "timed"), ("torch", 1, "timed"), ("jax", 1, "timed"),
    ]  # fmt: skip
    for name in ("jax", "torch"):
        fw = race["frameworks"][name]
        assert [r["seed"] for r in fw["runs"]] == [0, 1] and fw["warmup"]["seed"] == 1000
        assert fw["trainer"]["environment"]["date"]  # each trainer's own record is kept
        assert fw["error"] is None
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
    # programs are built once per framework and preset: the warm-up's, reused by the runs
    assert race["frameworks"]["jax"]["programs_built"] == 1
    assert race["frameworks"]["jax"]["warmup"]["built_programs"] is True
    assert race["frameworks"]["torch"]["programs_built"] <= 1
    assert all(r["dynamo_compiles"] in (0, None) for r in race["frameworks"]["torch"]["runs"])
    assert race["frameworks"]["torch"]["trainer"]["torch_setup"]["sgd_impl"]
    checks = race["self_checks"]
    assert checks["jax_program"]["status"] == "passed", checks["jax_program"]
    flop = checks["jax_flops"]
    assert 0.8 < flop["train_ratio"] < 1.5 and 0.8 < flop["eval_ratio"] < 1.5
    assert checks["torch_sync"]["status"] in ("skipped", "passed")
    ratio = race["ratio"]
    assert race["verdicts"]["jax"]["status"] == "ratio"
    jax_t = race["frameworks"]["jax"]["summary"]["time_seconds"]["mean"]
    torch_t = race["frameworks"]["torch"]["summary"]["time_seconds"]["mean"]
    assert ratio["value"] == pytest.approx(jax_t / torch_t)
    assert ratio["ci"][0] <= ratio["value"] <= ratio["ci"][1]


def _bench_cmd(presets: str, data_dir: str, out: Path, *flags: str) -> list[str]:
    """`python -m jaxbench.bench` racing JAX alone on `presets` into `out`."""
    return [sys.executable, "-m", "jaxbench.bench", "--config", presets, "--frameworks", "jax",
            "--data-dir", data_dir, "--out", str(out), *flags]  # fmt: skip


@pytest.mark.slow
@pytest.mark.realdata
def test_max_seconds_stops_in_time_with_valid_json(data_dir: str, tmp_path: Path) -> None:
    """Two presets, a budget: rounds while they fit, then a complete bench.json in time."""
    out = tmp_path / "bench"
    budget = 45.0
    t0 = time.monotonic()
    small = ["--subset", "500", "--test-subset", "500", "--epochs", "1", "--batch-size", "100",
             "--lr-peak-epoch", "0.5"]  # fmt: skip
    cmd = _bench_cmd("tiny,speedrun", data_dir, out, "--max-seconds", str(budget),
                     "--target", "0.05", *small)  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["elapsed_seconds"] <= budget and wall < budget + 30  # + start-up and imports
    assert doc["stop_reason"].startswith(("budget", "watchdog")), doc["stop_reason"]
    for check in doc["races"]["tiny"]["self_checks"].values():  # run, or skipped for the budget
        assert check["status"] != "skipped" or check["detail"].startswith("budget"), check
    tiny, speedrun = (doc["races"][p]["frameworks"]["jax"] for p in ("tiny", "speedrun"))
    assert len(tiny["runs"]) >= 1
    # the later preset either raced whole rounds beside tiny or was skipped with the reason
    if speedrun["error"]:
        assert speedrun["error"]["error"].startswith("skipped: budget")
    else:
        assert abs(len(tiny["runs"]) - len(speedrun["runs"])) <= 1


@pytest.mark.slow
@pytest.mark.realdata
def test_watchdog_leaves_valid_json_when_a_run_overruns(data_dir: str, tmp_path: Path) -> None:
    """A budget smaller than one warm-up: the run is interrupted, the JSON stays valid."""
    out = tmp_path / "bench"
    cmd = _bench_cmd("tiny", data_dir, out, "--max-seconds", "3", *SMALL)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["complete"] is False and doc["stop_reason"].startswith("watchdog")
    assert doc["elapsed_seconds"] < 10


@pytest.mark.slow
@pytest.mark.realdata
def test_sigterm_leaves_valid_json(data_dir: str, tmp_path: Path) -> None:
    """Killed politely mid-race (a timeout, a closing terminal): JSON written, exit 143."""
    out = tmp_path / "bench"
    cmd = _bench_cmd("tiny", data_dir, out, "--runs", "50", *SMALL)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for the first timed run to be recorded
            path = out / "bench.json"
            if path.exists() and '"kind": "timed"' in path.read_text():
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip() == f"terminated; partial results in {out / 'bench.json'}", err[-2000:]
    doc = json.loads((out / "bench.json").read_text())
    assert doc["stop_reason"] == "terminated (SIGTERM)" and doc["complete"] is False
    assert len(doc["races"]["tiny"]["frameworks"]["jax"]["runs"]) >= 1


def test_one_run_shows_no_spread() -> None:
    """`--runs 1`: the table says "1 run" rather than a dangling "±-"."""
    assert output.plus_minus({"mean": 0.622, "std": None}, 4) == "0.6220 (1 run)"
    assert output.plus_minus({"mean": 0.622, "std": 0.01}, 4) == "0.6220±0.0100"


@pytest.mark.slow
@pytest.mark.realdata
def test_vmap_seeds_row(data_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--vmap-seeds K`: K JAX seeds in one program, beside the runs alone (the bench's
    own `main`, here: the row is what is tested, not the process)."""
    out = tmp_path / "bench"
    argv = _bench_cmd("tiny", data_dir, out, "--runs", "1", "--vmap-seeds", "2", *SMALL)[3:]
    assert cli.main(argv) == 0, capsys.readouterr().err[-2000:]
    v = json.loads((out / "bench.json").read_text())["races"]["tiny"]["vmap_seeds"]
    assert v["k"] == 2 and v["seeds"] == [0, 1] and v["accuracy"]["n"] == 2
    assert v["time_per_seed"] == pytest.approx(v["time_seconds"] / 2) and v["time_alone"] > 0
    assert "2 seeds, one program (jax):" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,text",
    [
        (["--vmap-seeds", "1"], "K from 2"),
        (["--vmap-seeds", "2", "--frameworks", "torch"], "JAX"),
    ],
)
def test_vmap_seeds_flag_errors(flags: list[str], text: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--config", "tiny", *flags])
    assert e.value.code == 2 and text in capsys.readouterr().err


def test_race_is_on_one_device_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    """The trainers default to every local device; the race does not, or a multi-GPU node
    would set all its GPUs (JAX) against one (PyTorch)."""
    opts = cli.parse_args(["--config", "tiny"])
    assert [c.devices for c in opts.cfgs] == [1]
    assert (
        cli.parse_args(["--config", "tiny", "--frameworks", "jax", "--devices", "4"])
        .cfgs[0]
        .devices
        == 4
    )
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--config", "tiny", "--devices", "4"])
    assert exc.value.code == 2
    assert "torchrun" in capsys.readouterr().err
