"""Data-parallel torch_ref: 2 processes (DDP over gloo on localhost) train one process's numbers.

The 2-process runs start under torchrun, which runs this file as a script (`_worker`).
The tolerance is measured in the same test: one process whose every batch is reordered
in a way that keeps the mathematics (BN statistics and a summed or averaged loss do not
depend on the images' order; ghost groups are kept) shows how far float rounding alone
moves the losses, weights and BN statistics in these steps. Two processes may differ
from one by `NOISE_FACTOR` times that, plus a few ulps. Plants check that the bound can
fail: per-process BN statistics (`--bn-sync local`) and a gradient that misses the
world-size factor both land far outside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from jaxbench.configs import Config, resnet9, speedrun, tiny
from torch_ref import distributed, train

ROOT = Path(__file__).resolve().parents[1]
NOISE_FACTOR = 8.0  # how many times the measured rounding noise two processes may differ by
ULPS = 8  # plus this many float32 ulps of the compared values (a floor for zero noise)
TIMEOUT_S = 240  # any one subprocess; collectives time out sooner (`DIST_TIMEOUT_S`)
DIST_TIMEOUT_S = 60
N_TRAIN, N_TEST, BATCH = 384, 50, 64  # 6 steps an epoch; the test set splits 25 + 25, in 20 + 5

# Page's recipe, narrow: CELU, max pool before BN, frozen BN scale, whitening. Smooth
# enough, and gentle enough (`lr`), that rounding does not grow into chaos in 6 steps.
# (With tiny's ReLU after BN, the rounding of the BN statistics flips a few near-zero
# activations, which moves some gradients by ~1% in the first step; the noise then
# grows so fast that a bound measured from it would catch little.)
BASE = resnet9().replace(
    widths=(8, 16, 32, 64),
    batch_size=BATCH,
    eval_batch_size=20,
    epochs=1,
    lr=0.02,
    lr_peak_epoch=0.5,
    lr_flat_epochs=0.0,
    whiten_images=256,
    ema_every=3,
)
# name -> the config, trained on synthetic images.
CASES: dict[str, Config] = {
    # BN statistics over the whole batch, trainable BN scale, summed loss
    "global": BASE.replace(ghost_bn=0, bn_scale_trainable=True, whiten="none"),
    # ghost BN: 8 groups of 8 images, 4 of each in each process; mean loss
    "ghost": BASE.replace(ghost_bn=8, loss_reduction="mean"),
    # airbench's net over 2 epochs: lookahead EMA, alternating flips, and the whitening
    # bias frozen after epoch 1 (DDP is rebuilt around the changed parameters)
    "speedrun": speedrun().replace(
        widths=(8, 16, 16),
        batch_size=BATCH,
        eval_batch_size=20,
        epochs=2,
        whiten_bias_epochs=1,
        lr=0.1,
        lr_peak_epoch=0.5,
        whiten_images=256,
    ),
}
PLANTS: dict[str, Config] = {
    "local": CASES["global"].replace(bn_sync="local"),  # each process's own statistics
    "unscaled": CASES["global"],  # trained with `distributed.loss_scale` patched to 1
}


class _Data:
    """Synthetic stand-in for `jaxbench.data.Dataset`: random pixels and labels."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.name, self.classes = "cifar10", [str(i) for i in range(10)]
        self.train_images = rng.integers(0, 256, (N_TRAIN, 32, 32, 3), dtype=np.uint8)
        self.train_labels = rng.integers(0, 10, N_TRAIN).astype(np.int32)
        self.test_images = rng.integers(0, 256, (N_TEST, 32, 32, 3), dtype=np.uint8)
        self.test_labels = rng.integers(0, 10, N_TEST).astype(np.int32)


def _train(cfg: Config, workdir: Path | None = None) -> dict[str, Any]:
    """The trainer's own `train_and_evaluate`, reduced to what the comparison reads."""
    s = train.train_and_evaluate(
        cfg, workdir, data=_Data(), progress=False, quiet=True, return_variables=True
    )
    floats = {k: v for k, v in s["variables"].items() if v.is_floating_point()}
    ema = {k: v for k, v in s["ema_variables"].items() if v.is_floating_point()}
    return {
        "losses": torch.tensor(s["step_losses"]),
        "weights": {k: v for k, v in floats.items() if "running_" not in k},
        "bn_stats": {k: v for k, v in floats.items() if "running_" in k},
        "ema": ema,
        "val_loss": torch.tensor([s["final"]["val_loss"]]),
        "val_acc": s["final"]["val_acc"],
        "ema_val_acc": s["final"]["ema_val_acc"],
        "devices": s["devices"],
    }


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _worker(out: Path) -> None:
    """One torchrun process: join the group, train every case and plant, save the results."""
    torch.set_num_threads(1)
    distributed.init(DIST_TIMEOUT_S)
    try:
        rank = distributed.rank()
        results: dict[str, Any] = {}
        for name, cfg in {**CASES, **PLANTS}.items():
            unscaled = name == "unscaled"
            scale = (lambda reduction, world: 1.0) if unscaled else distributed.loss_scale
            with _patched(distributed, "loss_scale", scale):
                # every process names a folder; only process 0 may create it
                results[name] = _train(cfg, out / f"{name}-rank{rank}")
        torch.save(results, out / f"results-{rank}.pt")
    finally:
        distributed.shutdown()


# --- helpers of the tests ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return int(s.getsockname()[1])


def _torchrun(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """`python -m torch.distributed.run` with 2 processes on localhost, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "localhost", "--master-port", str(_free_port()), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=ROOT, **kw
    )


# Orders of a batch's k blocks of `splits` images (the ghost groups' count; 1 without).
REORDERS: dict[str, Callable[[int], torch.Tensor]] = {
    "reversed": lambda k: torch.arange(k).flip(0),
    "even, odd": lambda k: torch.cat([torch.arange(0, k, 2), torch.arange(1, k, 2)]),
    "odd, even, reversed": lambda k: torch.cat([torch.arange(1, k, 2), torch.arange(0, k, 2)]).flip(
        0
    ),
}


def _reordered(cfg: Config, blocks: Callable[[int], torch.Tensor]) -> Callable[..., Any]:
    """`train.plan_epoch` with each step's images moved in blocks of `splits`.

    Image i of a batch is in ghost group i mod splits; whole blocks keep that, so the
    mathematics of every step is unchanged and only the float order differs.
    """
    batch, ghost = cfg.batch_size, cfg.ghost_bn
    splits = batch // ghost if ghost and batch > ghost else 1
    within = (blocks(batch // splits)[:, None] * splits + torch.arange(splits)).reshape(-1)
    original = train.plan_epoch

    def plan(r: train.Run, epoch: int) -> dict[str, torch.Tensor]:
        p = original(r, epoch)
        steps = len(p["indices"]) // batch
        order = (torch.arange(steps)[:, None] * batch + within).reshape(-1)
        return {k: v[order.to(v.device)] for k, v in p.items()}

    return plan


def _max_diff(a: Any, b: Any) -> float:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max(_max_diff(a[k], b[k]) for k in a)
    return float((a - b).abs().max())


def _max_abs(a: Any) -> float:
    if isinstance(a, dict):
        return max(_max_abs(v) for v in a.values())
    return float(a.abs().max())


COMPARED = ("losses", "weights", "bn_stats", "ema", "val_loss")


def _compare(
    two: dict[str, Any], one: dict[str, Any], reordered: list[dict[str, Any]]
) -> dict[str, Any]:
    """Per compared quantity: (max |2 processes - 1|, the noise, the bound, within it).

    The noise is the largest difference any reordering makes: rounding's effect is
    lumpy (a near-tie in a max pool either flips or not), so one order alone can
    understate it.
    """
    eps = float(torch.finfo(torch.float32).eps)
    out = {}
    for key in COMPARED:
        diff = _max_diff(two[key], one[key])
        noise = max(_max_diff(r[key], one[key]) for r in reordered)
        bound = NOISE_FACTOR * noise + ULPS * eps * _max_abs(one[key])
        out[key] = (diff, noise, bound, diff <= bound)
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One thread, as each torchrun process has, so the float orders are alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case in 1 process, reordered in 1 process, and in 2 processes (with plants)."""
    out = tmp_path_factory.mktemp("ddp")
    proc = _torchrun([str(Path(__file__).resolve()), str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    two, other = (torch.load(out / f"results-{r}.pt", weights_only=False) for r in (0, 1))
    one: dict[str, Any] = {}
    reordered: dict[str, list[dict[str, Any]]] = {}
    with _one_thread():
        for name, cfg in CASES.items():
            one[name] = _train(cfg)
            reordered[name] = []
            for blocks in REORDERS.values():
                with _patched(train, "plan_epoch", _reordered(cfg, blocks)):
                    reordered[name].append(_train(cfg))
    return {"two": two, "other": other, "one": one, "reordered": reordered, "out": out}


def _report(name: str, cmp: dict[str, Any]) -> str:
    parts = (f"{k} {d:.2e} (noise {n:.2e}, bound {b:.2e})" for k, (d, n, b, _) in cmp.items())
    return f"{name}: " + ", ".join(parts)


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_train_one_process_numbers(runs: dict[str, Any], name: str) -> None:
    one, two, reordered = runs["one"][name], runs["two"][name], runs["reordered"][name]
    cmp = _compare(two, one, reordered)
    print(_report(name, cmp))
    assert all(ok for *_, ok in cmp.values()), _report(name, cmp)
    # the reorderings changed the float order (else the bound is just the ulps)
    assert max(_max_diff(r["weights"], one["weights"]) for r in reordered) > 0
    # the sharded evaluation scores the whole test set
    for key in ("val_acc", "ema_val_acc"):
        assert abs(two[key] - one[key]) <= 1 / N_TEST, (key, two[key], one[key])
    assert (two["devices"], one["devices"]) == (2, 1)


@pytest.mark.parametrize("plant", list(PLANTS))
def test_plants_fall_outside_the_bound(runs: dict[str, Any], plant: str) -> None:
    """Per-process BN statistics, or a gradient missing the world-size factor, must fail."""
    one, reordered = runs["one"]["global"], runs["reordered"]["global"]
    cmp = _compare(runs["two"][plant], one, reordered)
    print(_report(plant, cmp))
    assert not cmp["weights"][-1] and not cmp["losses"][-1], _report(plant, cmp)


def test_processes_keep_identical_copies(runs: dict[str, Any]) -> None:
    """Weights, BN statistics, EMA and reported numbers are bitwise the same in both."""
    for name, mine in runs["two"].items():
        theirs = runs["other"][name]
        for key in COMPARED:
            assert _max_diff(mine[key], theirs[key]) == 0, (name, key)
        assert (mine["val_acc"], mine["ema_val_acc"]) == (theirs["val_acc"], theirs["ema_val_acc"])


def test_only_process_0_writes(runs: dict[str, Any]) -> None:
    out = runs["out"]
    for name in (*CASES, *PLANTS):
        assert (out / f"{name}-rank0" / "summary.json").exists()
        assert not (out / f"{name}-rank1").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_cli_under_torchrun_trains_and_writes_once(real_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--config", "tiny", "--subset", "512", "--test-subset", "100", "--epochs", "1"]
    args += ["--widths", "8,16,32,64", "--batch-size", "64", "--data-dir", str(real_data_dir)]
    proc = _torchrun(["-m", "torch_ref.train", *args, "--no-progress", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final val_acc") == 1, proc.stdout  # process 0 alone prints
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["devices"], summary["processes"]) == (2, 2)
    assert len(summary["step_losses"]) == 8 and summary["n_test"] == 100
    # the machine's cores are shared by its processes
    assert summary["torch_setup"]["cpu_threads"] == max(1, distributed.cpu_threads() // 2)


def test_batch_not_split_over_processes_exits_2_with_one_line(tmp_path: Path) -> None:
    """Each process says so in one line and exits 2; torchrun then reports the failure
    (and may stop the other process first, by SIGTERM)."""
    logs = tmp_path / "logs"
    args = ["--config", "tiny", "--batch-size", "63", "--out", str(tmp_path / "run")]
    proc = _torchrun(["--log-dir", str(logs), "--redirects", "3", "-m", "torch_ref.train", *args])
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    errors = [f.read_text().strip().splitlines() for f in sorted(logs.rglob("stderr.log"))]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert all(len(lines) <= 1 for lines in errors), errors  # no traceback, no second line
    message = "error: --batch-size 63 does not split over 2 processes"
    assert any(lines and lines[0].startswith(message) for lines in errors), errors
    assert not (tmp_path / "run").exists()


def test_devices_other_than_one_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "tiny", "--devices", "4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --devices 4") and "\n" not in err
    assert "torchrun --nproc-per-node N" in err


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"batch_size": 63}, "does not split over 2 processes"),
        ({"ghost_bn": 9, "batch_size": 72}, "multiple of 2"),
        ({"bn_sync": "local", "ghost_bn": 32, "batch_size": 96}, "ghost batches of 32"),
        ({"checkpoint_every": 1}, "single process"),
    ],
)
def test_topology_errors(changes: dict[str, Any], words: str) -> None:
    cfg = tiny().replace(**changes)
    with pytest.raises(ValueError, match=words) as e:
        distributed.check(cfg, 2)
    assert "\n" not in str(e.value)
    distributed.check(cfg.replace(checkpoint_every=0), 1)  # one process trains any of them


if __name__ == "__main__":  # a torchrun process of the `runs` fixture
    _worker(Path(sys.argv[1]))


def test_selective_tta_is_refused_over_processes() -> None:
    """Selective TTA ranks the whole test set, which torchrun splits: one line, before work."""
    cfg = speedrun().replace(tta_select=0.25)
    distributed.check(cfg, 1)  # one process holds the whole test set
    with pytest.raises(ValueError, match="--tta-select picks images over the whole test set"):
        distributed.check(cfg, 2)


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({"OMP_NUM_THREADS": "1"}, 1),  # alone, the user's choice stands
        ({}, 4),  # alone, unset: every core this process may use
        ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 2),  # torchrun's 1: cores / 2
    ],
    ids=["user-set", "unset", "torchrun"],
)
def test_cpu_threads_keep_the_users_setting_outside_torchrun(
    env: dict[str, str], want: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a 4-core machine without CUDA (with it, torch's CPU threads are left alone),
    torch started on one thread (as under OMP_NUM_THREADS=1): `share_cpu_threads` once set
    every core whatever OMP_NUM_THREADS said."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(distributed, "cpu_threads", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        distributed.share_cpu_threads()
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
