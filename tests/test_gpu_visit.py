"""The GPU-visit script: budget scheduling on a fake clock, the phases with fake trainers,
the CLI's one-line errors, and one real (tiny) visit on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jaxbench import configs, gpu_visit, report
from jaxbench.data import Dataset
from jaxbench.gpu_visit import SAFETY, SLACK_S, Budget, fits, run_rounds

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock that only moves when a fake run says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# --- scheduling -------------------------------------------------------------------------------


def test_fits_keeps_safety_slack_and_reserve() -> None:
    est = 10.0
    need = est * SAFETY + SLACK_S
    assert fits(need, est) and not fits(need - 0.01, est)
    assert fits(need + 30.0, est, reserve=30.0) and not fits(need + 29.0, est, reserve=30.0)


@pytest.mark.parametrize("budget_s", [20.0, 60.0, 100.0, 333.0])
@pytest.mark.parametrize("reserve", [0.0, 25.0])
def test_run_rounds_stops_before_the_budget(budget_s: float, reserve: float) -> None:
    """With run times as predicted, rounds never overrun and as many run as fit."""
    clock = FakeClock()
    budget = Budget(budget_s, clock=clock)
    times = {"jax": 4.0, "torch": 6.0}
    log: list[tuple[str, int]] = []

    def run_one(fw: str, seed: int) -> None:
        log.append((fw, seed))
        clock.t += times[fw]

    rounds, why = run_rounds(["jax", "torch"], times, budget, run_one, reserve=reserve)
    used = clock.t
    assert used <= max(0.0, budget_s - reserve)  # never into the reserve, nor past the budget
    assert rounds == len(log) // 2  # whole rounds only: both frameworks get the same count
    # one more round would not have fitted: the loop stopped for the budget, not early
    assert not fits(budget_s - used, sum(times.values()), reserve)
    assert why.startswith("budget")
    expected = max(0, int((budget_s - reserve - SLACK_S - 10.0 * SAFETY) // 10.0) + 1)
    assert rounds == expected


def test_run_rounds_alternates_order_and_respects_max_rounds() -> None:
    clock = FakeClock()
    log: list[tuple[str, int]] = []

    def run_one(fw: str, seed: int) -> None:
        log.append((fw, seed))
        clock.t += 1.0

    rounds, why = run_rounds(
        ["jax", "torch"],
        {"jax": 1.0, "torch": 1.0},
        Budget(1e6, clock=clock),
        run_one,
        max_rounds=3,
    )
    assert rounds == 3 and why == "reached --runs 3"
    assert log == [("jax", 0), ("torch", 0), ("torch", 1), ("jax", 1), ("jax", 2), ("torch", 2)]


def test_run_rounds_learns_the_slowest_run() -> None:
    """A warm-up estimate gives way to timed walls, and a slow run is not forgotten."""
    clock = FakeClock()
    budget = Budget(120.0, clock=clock)
    never = run_rounds(["jax", "torch"], {"jax": 50.0, "torch": 50.0}, budget, _fail_if_called)
    assert never[0] == 0 and clock.t == 0.0  # 100 s x 1.25 + 5 s does not fit in 120 s

    walls = iter([2.0, 2.0, 30.0, 2.0] + [2.0] * 100)  # round 1's first run (torch) is slow

    def run_one(fw: str, seed: int) -> None:
        clock.t += next(walls)

    rounds, why = run_rounds(["jax", "torch"], {"jax": 5.0, "torch": 5.0}, budget, run_one)
    # After the 30 s run a round is predicted at 32 s (needs 45 s): rounds of 4 s run while
    # 45 s are left, t = 4, 36, 40, ..., 76; with 44 s left it stops. Had it forgotten the
    # slow run (predicting 4 s, needing 10 s), it would have gone on to t = 112.
    assert clock.t == pytest.approx(76.0) and rounds == 12 and why.startswith("budget")


def _fail_if_called(fw: str, seed: int) -> None:
    raise AssertionError("no round should start")


def test_run_rounds_continues_from_start() -> None:
    clock = FakeClock()
    log: list[tuple[str, int]] = []

    def run_one(fw: str, seed: int) -> None:
        log.append((fw, seed))
        clock.t += 1.0

    est = {"jax": 1.0, "torch": 1.0}
    rounds, why = run_rounds(
        ["jax", "torch"], est, Budget(1e6, clock=clock), run_one, max_rounds=3, start=2
    )
    assert rounds == 3 and log == [("jax", 2), ("torch", 2)]


def test_epoch_seconds_and_card_slug() -> None:
    rows = [{"total_time_seconds": t} for t in (1.5, 2.5, 3.0, 4.5)]
    assert gpu_visit.epoch_seconds(rows) == pytest.approx([1.5, 1.0, 0.5])  # last has the eval
    assert gpu_visit.card_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_visit.card_slug("NVIDIA H200") == "h200"
    assert gpu_visit.card_slug("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_visit.card_slug("cpu") == "cpu" and gpu_visit.card_slug(None) == "cpu"


# --- the phases, with fake trainers on a fake clock --------------------------------------------


def _fake_trainer(clock: FakeClock, framework: str, cost: Callable[[configs.Config], float]):
    """A trainer that returns a plausible summary and advances the fake clock."""

    def train(cfg: configs.Config, workdir: Any = None, **kwargs: Any) -> dict[str, Any]:
        assert workdir is None and kwargs["quiet"] and not kwargs["progress"]
        assert ("compile" in kwargs) == (framework == "torch")
        wall = cost(cfg)
        clock.t += wall
        timed = wall / 2
        per = timed / cfg.epochs
        acc = 0.9 + 0.001 * (cfg.seed % 10)
        rows = [
            {
                "epoch": e + 1,
                "ema_val_acc": acc,
                "val_acc": acc,
                "total_time_seconds": per * (e + 1),
            }
            for e in range(cfg.epochs)
        ]
        final = {"val_acc": acc, "ema_val_acc": acc, "val_loss": 0.3, "train_loss": 0.5}
        final["train_acc"] = 0.8
        out = {"final": final, "epochs": rows, "total_time_seconds": timed, "seed": cfg.seed}
        out.update(compile_seconds=wall / 4, environment={"date": "now"}, images_per_second=1.0)
        if framework == "jax":
            out["loop"] = cfg.loop
        return out

    return train


def _fake_data(n_train: int = 400, n_test: int = 100) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset(
        "cifar10",
        [str(i) for i in range(10)],
        rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.int32),
        rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, n_test).astype(np.int32),
    )


def _opts(tmp_path: Path, presets: tuple[str, ...], budget_s: float, **kw: Any):
    small = {"subset": None, "test_subset": None, "batch_size": 100}
    cfgs = tuple(configs.get_config(p).replace(**small) for p in presets)
    base = dict(
        configs=cfgs,
        out=tmp_path,
        budget_seconds=budget_s,
        runs=None,
        frameworks=("jax", "torch"),
        target=0.94,
        stream="fast",
        torch_compile=None,
        loop_epochs=3,
        loop_check=True,
        jax_cache=False,
    )
    base.update(kw)
    return gpu_visit.VisitOptions(**base)


def _visit(opts: Any, clock: FakeClock, costs: dict[str, float]):
    visit = gpu_visit.Visit(
        opts, "python -m jaxbench.gpu_visit (test)", Budget(opts.budget_seconds, clock=clock)
    )
    for fw in ("jax", "torch"):
        visit.trainers[fw] = _fake_trainer(
            clock, fw, lambda cfg, fw=fw: costs[fw] * (3.0 if cfg.seed == 1000 else 1.0)
        )
    return visit


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench's doc records the environment; importing jax and torch for it is not the point."""
    monkeypatch.setattr(report, "environment", lambda frameworks=(): {"date": "now"})


@pytest.mark.usefixtures("no_env")
def test_phases_fit_the_budget_and_skip_what_does_not(tmp_path: Path) -> None:
    clock = FakeClock()
    opts = _opts(tmp_path, ("tiny", "resnet9"), budget_s=200.0)
    visit = _visit(opts, clock, {"jax": 5.0, "torch": 4.0})
    visit.run_phases(_fake_data())
    assert clock.t <= 200.0
    phases = visit.doc["phases"]
    assert list(phases) == ["bench-tiny", "loop-check", "bench-resnet9"]
    first = phases["bench-tiny"]
    assert first["status"] == "done" and first["stop_reason"].startswith("budget")
    assert first["runs"]["jax"] == first["runs"]["torch"] >= 1
    doc = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert doc["complete"] and doc["runs_per_framework"] == first["runs"]["jax"]
    assert doc["seeds"] == list(range(first["runs"]["jax"]))
    assert doc["frameworks"]["jax"]["warmup"]["seed"] == gpu_visit.WARMUP_SEED
    assert doc["ratio"]["value"] == pytest.approx(2.5 / 2.0)  # fake timed = wall / 2
    assert (tmp_path / "bench-tiny.png").is_file()
    loop = phases["loop-check"]
    assert loop["status"] == "done" and set(loop["loops"]) == {"scan", "step"}
    assert loop["loops"]["scan"]["loop_reported"] == "scan"
    # the later preset's warm-ups and rounds had time kept for them
    later = phases["bench-resnet9"]
    assert later["status"] == "done" and later["runs"]["jax"] == later["runs"]["torch"] >= 1
    assert later["stop_reason"].startswith("budget")
    table = visit.table()
    assert "bench-tiny" in table and "loop check" in table and "budget:" in table


@pytest.mark.usefixtures("no_env")
def test_later_preset_skipped_when_the_budget_is_gone(tmp_path: Path) -> None:
    clock = FakeClock()
    opts = _opts(tmp_path, ("tiny", "resnet9"), budget_s=80.0, loop_check=False)
    visit = _visit(opts, clock, {"jax": 5.0, "torch": 4.0})
    visit.run_phases(_fake_data())
    assert clock.t <= 80.0
    # the first preset gets its first two rounds before time is kept for later presets
    assert visit.doc["phases"]["bench-tiny"]["runs"] == {"jax": 2, "torch": 2}
    assert visit.doc["phases"]["loop-check"]["status"] == "skipped"
    later = visit.doc["phases"]["bench-resnet9"]
    assert later["status"] == "skipped" and later["reason"].startswith("budget")
    assert {s["phase"] for s in visit.doc["skipped"]} == {"loop-check", "bench-resnet9"}


@pytest.mark.usefixtures("no_env")
def test_refused_preset_and_failing_trainer_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    opts = _opts(tmp_path, ("tiny",), budget_s=100.0, loop_check=False)
    visit = _visit(opts, clock, {"jax": 1.0, "torch": 1.0})
    fake_module = types.ModuleType("fake_trainer_module")

    def check_supported(cfg: configs.Config) -> None:
        raise ValueError("does not implement --model tiny")

    fake_module.check_supported = check_supported  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_trainer_module", fake_module)
    visit.trainers["torch"].__module__ = "fake_trainer_module"
    visit.run_phases(_fake_data())
    rec = visit.doc["phases"]["bench-tiny"]
    assert rec["status"] == "skipped" and "torch: does not implement" in rec["reason"]

    def broken(cfg: configs.Config, workdir: Any = None, **kw: Any) -> dict[str, Any]:
        raise RuntimeError("CUDA out of memory")

    opts_b = _opts(tmp_path / "b", ("tiny",), budget_s=100.0, loop_check=False)
    visit2 = _visit(opts_b, FakeClock(), {"jax": 1.0, "torch": 1.0})
    visit2.trainers["torch"] = broken
    visit2.run_phases(_fake_data())
    rec2 = visit2.doc["phases"]["bench-tiny"]
    assert rec2["status"] == "error" and "CUDA out of memory" in rec2["error"]
    assert "no timed runs" in rec2["table"]
    assert json.loads((tmp_path / "b" / "bench-tiny.json").read_text())["complete"] is False


# --- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "o"], "--data-dir is required"),
        (["--out", "o", "--data-dir", "/nonexistent-dir"], "is not a folder"),
        (["--out", "o", "--data-dir", ".", "--presets", "resnet9,nope"], "unknown preset 'nope'"),
        (["--out", "o", "--data-dir", ".", "--presets", "tiny,tiny"], "distinct preset"),
        (["--out", "o", "--data-dir", ".", "--config", "tiny"], "--config is not used here"),
        (["--out", "o", "--data-dir", ".", "--widths", "8,8,8,8"], "preset speedrun"),
        (["--out", "o", "--data-dir", ".", "--budget-seconds", "0"], "--budget-seconds"),
        (["--out", "o", "--data-dir", ".", "--runs", "0"], "--runs"),
        (["--out", "o", "--data-dir", ".", "--loop-epochs", "1"], "--loop-epochs"),
        (["--out", "o", "--data-dir", ".", "--frameworks", "jax,mxnet"], "--frameworks"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        gpu_visit.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_overrides_apply_to_every_preset() -> None:
    opts = gpu_visit.parse_args(
        ["--out", "o", "--data-dir", ".", "--presets", "tiny,resnet9", "--epochs", "4"]
    )
    assert [c.name for c in opts.configs] == ["tiny", "resnet9"]
    assert all(c.epochs == 4 and c.data_dir == "." for c in opts.configs)
    assert opts.budget_seconds == gpu_visit.DEFAULT_BUDGET_S and opts.runs is None


# --- one real visit, tiny, on the CPU ----------------------------------------------------------

# The budget is generous: this test is about the phases and files of a complete visit, not
# about any machine's speed (the scheduling is tested on a fake clock above).
TINY = [
    "--presets", "tiny", "--runs", "1", "--budget-seconds", "1200",
    "--widths", "8,8,8,8", "--subset", "512", "--batch-size", "128", "--test-subset", "256",
    "--epochs", "2", "--lr-peak-epoch", "1", "--eval-batch-size", "256",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.realdata
def test_real_tiny_visit(real_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = ["--data-dir", str(real_data_dir), "--out", str(out), *TINY]
    res = subprocess.run(
        [sys.executable, "-m", "jaxbench.gpu_visit", *argv],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1500,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-tiny.json", "bench-tiny.png", "visit.json"]  # <= 8 come back
    visit = json.loads((out / "visit.json").read_text())
    for key in ("complete", "environment", "card_slug", "phases", "skipped", "files", "table"):
        assert key in visit, key
    assert visit["complete"] and visit["elapsed_seconds"] <= 1200.0
    env_rec = visit["environment"]
    assert {"jax", "torch", "nvidia_smi", "settings_start", "settings_end"} <= set(env_rec)
    assert env_rec["settings_start"]["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    bench_rec = visit["phases"]["bench-tiny"]
    assert bench_rec["status"] == "done" and bench_rec["runs"] == {"jax": 1, "torch": 1}
    loop = visit["phases"]["loop-check"]
    assert loop["status"] == "done" and loop["faster"] in ("scan", "step")
    assert loop["loops"]["step"]["loop_reported"] == "step"
    doc = json.loads((out / "bench-tiny.json").read_text())
    for key in ("environment", "config", "frameworks", "ratio", "visit", "complete"):
        assert key in doc, key
    assert doc["config"]["widths"] == [8, 8, 8, 8]
    assert set(doc["frameworks"]) == {"jax", "torch"}
    assert "GPU visit" in res.stdout and "loop check" in res.stdout


def test_watchdog_interrupts_only_a_guarded_run() -> None:
    import time

    watchdog = gpu_visit.Watchdog(Budget(0.3))
    assert watchdog.arm()
    try:
        t0 = time.monotonic()
        with pytest.raises(gpu_visit.BudgetExceeded), watchdog.guard():
            while time.monotonic() - t0 < 5.0:
                time.sleep(0.01)
        assert time.monotonic() - t0 < 2.0 and watchdog.expired
        with pytest.raises(gpu_visit.BudgetExceeded), watchdog.guard():
            pass  # a spent budget refuses the next run at once
    finally:
        watchdog.disarm()
    quiet = gpu_visit.Watchdog(Budget(0.05))
    quiet.arm()
    try:
        time.sleep(0.3)  # unguarded: the alarm only marks the budget spent
        assert quiet.expired
    finally:
        quiet.disarm()


@pytest.mark.usefixtures("no_env")
def test_framework_on_the_cpu_beside_a_gpu_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_env = {(): {"python": "3"}, ("jax",): {"jax_backend": "cpu"}}
    fake_env[("torch",)] = {"torch_device": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(report, "environment", lambda fws=(): dict(fake_env[tuple(fws)]))
    monkeypatch.setattr(gpu_visit, "nvidia_smi", lambda: {"available": True, "list": "GPU 0"})
    opts = _opts(tmp_path, ("tiny",), budget_s=100.0)
    visit = gpu_visit.Visit(opts, "cmd", Budget(100.0))
    visit.record_environment(None)
    assert visit.frameworks == ["torch"]
    assert "no GPU backend" in visit.doc["dropped_frameworks"]["jax"]
    assert visit.doc["card"] == "NVIDIA H100 80GB HBM3" and visit.doc["card_slug"] == "h100"
