"""The benchmark's planner: rounds on a fake clock with fake trainers, the watchdog, and
what a framework on the CPU beside a GPU becomes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from jaxbench import configs, report
from jaxbench.bench import cli, records
from jaxbench.bench.budget import (
    SAFETY,
    SLACK_S,
    Budget,
    BudgetExceeded,
    Watchdog,
    fits,
    round_order,
)
from jaxbench.bench.frameworks import FRAMEWORKS
from jaxbench.bench.output import format_table
from jaxbench.bench.race import WARMUP_SEED, Bench


class FakeClock:
    """A clock that only moves when a fake run says so."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Data:
    def __init__(self, n_train: int = 1000, n_test: int = 200) -> None:
        self.train_labels = [0] * n_train
        self.test_labels = [0] * n_test


def _fake_trainers(clock: FakeClock, walls: dict[str, Any], log: list[tuple]) -> dict[str, Any]:
    """Trainers that advance the fake clock by `walls[framework]` (a number or an iterator)."""

    def make(framework: str) -> Any:
        def train(cfg: configs.Config, workdir: Any, **kw: Any) -> dict[str, Any]:
            w = walls[framework]
            wall = w if isinstance(w, float) else next(w)
            log.append((cfg.name, framework, cfg.seed, kw.get("profile_dir")))
            clock.t += wall
            return {
                "final": {"val_acc": 0.95, "ema_val_acc": 0.95},
                "epochs": [],
                "total_time_seconds": wall * 0.9,
                "compile_seconds": 0.0,
                "seed": cfg.seed,
                "compiled": framework == "jax" and cfg.seed == WARMUP_SEED,
            }

        return train

    return {fw: make(fw) for fw in FRAMEWORKS}


def _bench(
    argv: list[str], clock: FakeClock, walls: dict[str, Any], tmp_path: Any, n_train: int = 1000
) -> tuple:
    opts = cli.parse_args([*argv, "--out", str(tmp_path / "out")])
    log: list[tuple] = []
    budget = Budget(opts.max_seconds or float("inf"), clock=clock)
    data = {cfg.name: _Data(n_train) for cfg in opts.cfgs}
    b = Bench(opts, _fake_trainers(clock, walls, log), data, "cmd", budget, log=lambda m: None)
    b.self_checks = lambda cfg: None  # the real ones compile; tested in test_program.py
    return b, log


def test_fits_keeps_safety_slack_and_reserve() -> None:
    est = 10.0
    need = est * SAFETY + SLACK_S
    assert fits(need, est) and not fits(need - 0.01, est)
    assert fits(need + 30.0, est, reserve=30.0) and not fits(need + 29.0, est, reserve=30.0)


def test_round_order_alternates() -> None:
    assert round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert round_order(["a", "b", "c"], 1) == ["c", "b", "a"]


@pytest.mark.parametrize("budget_s", [30.0, 60.0, 100.0, 333.0])
def test_rounds_stop_before_the_budget(budget_s: float, tmp_path: Any) -> None:
    """With run times as predicted, whole rounds run while one more fits, and no further."""
    clock = FakeClock()
    walls = {"jax": 4.0, "torch": 6.0}
    b, log = _bench(["--config", "tiny", "--max-seconds", str(budget_s)], clock, walls, tmp_path)
    b.warmups()
    why = b.rounds()
    b.finish(True)
    timed = [x for x in log if x[2] != WARMUP_SEED]
    assert clock.t <= budget_s and len(timed) % 2 == 0  # whole rounds only
    assert not fits(budget_s - clock.t, 10.0) and why.startswith("budget")
    race = b.doc["races"]["tiny"]
    n = len(timed) // 2
    assert [len(race["frameworks"][fw]["runs"]) for fw in ("jax", "torch")] == [n, n]
    expected = max(0, int((budget_s - 10.0 - SLACK_S - 10.0 * SAFETY) // 10.0) + 1)
    assert n == expected


def test_rounds_interleave_abab_across_presets(tmp_path: Any) -> None:
    clock = FakeClock()
    walls = {"jax": 1.0, "torch": 1.0}
    argv = ["--config", "tiny,speedrun", "--runs", "2"]
    b, log = _bench(argv, clock, walls, tmp_path)
    b.warmups()
    assert b.rounds() == "reached --runs 2"
    timed = [(p, fw, s) for p, fw, s, _ in log if s != WARMUP_SEED]
    assert timed == [
        ("tiny", "jax", 0), ("tiny", "torch", 0), ("speedrun", "jax", 0), ("speedrun", "torch", 0),
        ("speedrun", "torch", 1), ("speedrun", "jax", 1), ("tiny", "torch", 1), ("tiny", "jax", 1),
    ]  # fmt: skip
    kinds = [o["kind"] for o in b.doc["order"]]
    assert kinds == ["warm-up"] * 4 + ["timed"] * 8


def test_rounds_learn_the_slowest_run(tmp_path: Any) -> None:
    """A warm-up estimate gives way to timed walls, and a slow run is not forgotten."""
    clock = FakeClock()
    walls = {"jax": iter([5.0, 2.0, 30.0] + [2.0] * 100), "torch": iter([5.0] + [2.0] * 100)}
    b, log = _bench(["--config", "tiny", "--max-seconds", "130"], clock, walls, tmp_path)
    b.warmups()  # t = 10
    why = b.rounds()
    # Round 0: 4 s (t = 14); round 1 has jax's 30 s run (t = 46); from then a round is
    # predicted at 32 s, needing 45 s: rounds of 4 s start while 45 s are left (t <= 85),
    # the last ends at t = 86. Had the slow run been forgotten (need 10 s), it would have
    # gone on to t = 122.
    assert clock.t == pytest.approx(86.0) and why.startswith("budget")


def test_profile_runs_after_rounds_and_stay_out_of_statistics(tmp_path: Any) -> None:
    clock = FakeClock()
    b, log = _bench(
        ["--config", "tiny", "--runs", "1", "--profile", str(tmp_path / "p")],
        clock,
        {"jax": 1.0, "torch": 1.0},
        tmp_path,
    )
    b.warmups()
    b.rounds()
    b.profiles()
    profiled = [x for x in log if x[3] is not None]
    assert [x[1] for x in profiled] == ["jax", "torch"]
    assert str(profiled[0][3]).endswith("p/tiny/jax")
    assert all(len(fw["runs"]) == 1 for fw in b.doc["races"]["tiny"]["frameworks"].values())


def test_compile_count_and_verdicts(tmp_path: Any) -> None:
    clock = FakeClock()
    b, _ = _bench(["--config", "tiny", "--runs", "2", "--target", "0.99"], clock,
                  {"jax": 1.0, "torch": 2.0}, tmp_path)  # fmt: skip
    b.warmups()
    b.rounds()
    b.finish(True)
    race = b.doc["races"]["tiny"]
    assert race["frameworks"]["jax"]["programs_built"] == 1
    assert race["verdicts"]["jax"]["status"] == "target not reached"
    assert race["ratio"] is None
    assert "target not reached" in format_table(race)


def test_watchdog_interrupts_only_a_guarded_run() -> None:
    watchdog = Watchdog(Budget(0.3))
    assert watchdog.arm()
    try:
        t0 = time.monotonic()
        with pytest.raises(BudgetExceeded), watchdog.guard():
            while time.monotonic() - t0 < 5.0:
                time.sleep(0.01)
        assert time.monotonic() - t0 < 2.0 and watchdog.expired
        with pytest.raises(BudgetExceeded), watchdog.guard():
            pass  # a spent budget refuses the next run at once
    finally:
        watchdog.disarm()
    quiet = Watchdog(Budget(0.05))
    quiet.arm()
    try:
        time.sleep(0.3)  # unguarded: the alarm only marks the budget spent
        assert quiet.expired
    finally:
        quiet.disarm()
    assert not Watchdog(Budget()).arm()  # no limit, no alarm
    early = Watchdog(Budget(5.2), reserve=5.0)  # fires `reserve` s before the end
    early.arm()
    try:
        time.sleep(0.6)
        assert early.expired
    finally:
        early.disarm()


def test_framework_on_the_cpu_beside_a_gpu_is_dropped(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = {"jax_backend": "cpu", "torch_device": "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(report, "environment", lambda fws=(): dict(fake))
    monkeypatch.setattr(report, "nvidia_smi", lambda: {"available": True, "list": "GPU 0"})
    b, _ = _bench(["--config", "tiny", "--runs", "1"], FakeClock(), {}, tmp_path)
    b.record_environment()
    assert [e.name for e in b.entries] == ["torch"]
    assert "no GPU backend" in b.doc["dropped"]["jax"]


def test_later_preset_skipped_when_its_predicted_warmup_does_not_fit(tmp_path: Any) -> None:
    """A later preset's runs are predicted from the first's warm-up scaled by counted FLOPs;
    one that would not fit is skipped with the reason, and the first preset's rounds run."""
    clock = FakeClock()
    argv = ["--config", "tiny,speedrun", "--frameworks", "jax", "--max-seconds", "120"]
    b, log = _bench(argv, clock, {"jax": 10.0}, tmp_path, n_train=50_000)
    cfgs = b.opts.cfgs
    ratio = records.work_ratio(cfgs[1], cfgs[0], b.doc["races"])
    assert ratio > 6  # speedrun's 10 epochs of a wider net vs tiny's 3
    b.warmups()
    err = b.doc["races"]["speedrun"]["frameworks"]["jax"]["error"]["error"]
    assert err.startswith("skipped: budget") and [x[0] for x in log] == ["tiny"]
    assert b.rounds().startswith("budget")
    assert len(b.doc["races"]["tiny"]["frameworks"]["jax"]["runs"]) >= 5
