"""Tests of torch_ref's PyTorch setup: defaults per device, CLI, SGD kernels, warm-up once per
process, recompiles on the clock, one scoring of equal weights, device whitening moments,
the sync self-check and profiles."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
import torch
from test_torch_ref import SyntheticData, small_cfg

from jaxbench.configs import get_config
from jaxbench.whitening import patch_moments, whitening_kernel_OIHW
from torch_ref import augment, fast, optim, train, whitening
from torch_ref.fast import TorchSetup, record

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
EAGER_COMPILE = TorchSetup(compile_mode="default", compile_backend="eager")
KW: dict[str, Any] = {"progress": False, "quiet": True}


def _speedrun_cfg(**changes: Any) -> Any:
    """A tiny airbench-style run: lookahead EMA, 3-view TTA, whitening, frozen bias after 1."""
    sr = get_config("speedrun")
    stem = ("activation", "pool_before_act", "whiten", "whiten_eps", "whiten_images")
    base: dict[str, Any] = {k: getattr(sr, k) for k in stem}
    base |= dict(
        model="speedrun",
        widths=(8, 16, 16),
        lookahead=True,
        tta_shift=True,
        whiten_bias_epochs=1,
        bn_scale_trainable=False,
        flip="alternating",
        ema_every=2,
    )
    base.update(changes)
    return small_cfg(**base)


# --- the setup record -----------------------------------------------------------------------------


def test_defaults_per_device_and_the_compile_switch() -> None:
    cpu = TorchSetup().resolve(CPU)
    assert (cpu.compile_mode, cpu.sgd_impl, cpu.compile_augment) == ("none", "foreach", False)
    assert not cpu.cudnn_benchmark and not cpu.static_addresses and cpu.channels_last
    gpu = TorchSetup().resolve(CUDA)  # resolving touches no device
    assert (gpu.compile_mode, gpu.sgd_impl, gpu.compile_augment) == ("max-autotune", "fused", True)
    assert gpu.cudnn_benchmark and gpu.static_addresses and gpu.cuda_graphs(CUDA)
    assert not TorchSetup(compile_mode="max-autotune-no-cudagraphs").resolve(CUDA).static_addresses
    # compile=False is mode "none", compile=True the device's compiled default
    assert TorchSetup().resolve(CUDA, compile=False).compile_mode == "none"
    assert TorchSetup().resolve(CPU, compile=True).compile_mode == "default"
    assert TorchSetup().resolve(CUDA, compile=True).compile_mode == "max-autotune"
    assert TorchSetup().compile_kwargs() == {"dynamic": False, "backend": "inductor"}
    assert gpu.compile_kwargs()["mode"] == "max-autotune"
    assert "mode" not in EAGER_COMPILE.resolve(CPU).compile_kwargs()


@pytest.mark.parametrize(
    "make",
    [
        lambda: TorchSetup(compile_mode="fast"),
        lambda: TorchSetup(sgd_impl="adam"),
        lambda: TorchSetup(compile_mode="max-autotune").resolve(CPU, compile=False),
        lambda: TorchSetup(compile_mode="none").resolve(CPU, compile=True),
        lambda: TorchSetup(compile_augment=True).resolve(CPU),
        lambda: TorchSetup(compile_mode="max-autotune", compile_backend="eager").resolve(CPU),
        lambda: TorchSetup(compile_mode="default", compile_backend="no-such").resolve(CPU),
    ],
)
def test_bad_setups_raise_value_error(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_cli_flags_and_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    args = train.build_parser().parse_args(
        ["--compile-mode", "reduce-overhead", "--sgd-impl", "fused", "--no-compile-augment"]
    )
    s = fast.setup_from_args(args)
    assert (s.compile_mode, s.sgd_impl, s.compile_augment) == ("reduce-overhead", "fused", False)
    assert fast.setup_from_args(train.build_parser().parse_args([])) == TorchSetup()
    for argv in (
        ["--config", "tiny", "--compile-mode", "fastest"],
        ["--config", "tiny", "--sgd-impl", "adam"],
        ["--config", "tiny", "--no-compile", "--compile-mode", "max-autotune"],
        ["--config", "tiny", "--compile-backend", "eager", "--compile-mode", "max-autotune"],
    ):
        try:  # argparse's choices exit at parse time; a contradiction returns 2
            code = train.main(argv)
        except SystemExit as e:
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert "error: " in err and "\n" not in err, err


def test_summary_records_the_resolved_setup() -> None:
    s = train.train_and_evaluate(small_cfg(epochs=1), data=SyntheticData(96, 40), **KW)
    rec = s["torch_setup"]
    for field in ("compile_mode", "compile_backend", "compile_augment", "sgd_impl"):
        assert rec[field] is not None, field
    for key in ("torch_version", "cudnn_benchmark", "channels_last", "autocast_dtype", "lr"):
        assert key in rec, key
    assert rec["torch_version"] == torch.__version__ and rec["compile_mode"] == "none"
    assert rec["sgd_impl"] == "foreach" and rec["autocast_dtype"] is None
    assert s["compile"] is False and isinstance(s["warmup_ran"], bool)
    assert s["dynamo_compiles"] == 0 and s["final_eval_weight_sets"] == 2
    json.dumps(s["torch_setup"])  # summary.json must hold it
    assert record(TorchSetup().resolve(CPU), CPU, True)["autocast_dtype"] == "bfloat16"


# --- SGD kernels ----------------------------------------------------------------------------------

# Measured (torch 2.13, CPU, this run): foreach == for-loop bit for bit; fused differs from
# them by at most 1.3e-7 of a tensor's largest entry after 3 steps (float32 rounding, ~1 ulp).
SGD_TOL = 1e-6


def test_sgd_implementations_agree_after_a_few_steps() -> None:
    cfg = small_cfg(epochs=1, bn_bias_lr_mult=64.0, bn_bias_wd_mult=1 / 64)
    out = {}
    for impl in ("for-loop", "foreach", "fused"):
        s = train.train_and_evaluate(
            cfg,
            data=SyntheticData(96, 40),
            stream="shared",
            return_variables=True,
            torch_setup=TorchSetup(sgd_impl=impl),
            **KW,
        )
        assert s["torch_setup"]["sgd_impl"] == impl
        out[impl] = s["variables"]
    ref = out["for-loop"]
    for name, v in out["foreach"].items():
        assert torch.equal(v, ref[name]), name
    for name, v in out["fused"].items():
        if v.is_floating_point():
            scale = ref[name].abs().max().clamp_min(1e-30)
            assert ((v - ref[name]).abs().max() / scale).item() <= SGD_TOL, name
    opt = optim.make_optimizer(torch.nn.Linear(2, 2), cfg, "fused")
    assert opt.defaults["fused"] and not opt.defaults["foreach"]


# --- warm-up once, no recompiles on the clock -----------------------------------------------------


def test_second_run_skips_warm_up_and_does_not_recompile() -> None:
    fast.forget_warmups()
    data = SyntheticData(96, 40)
    runs = [
        train.train_and_evaluate(small_cfg(seed=seed), data=data, torch_setup=EAGER_COMPILE, **KW)
        for seed in (0, 1)
    ]
    assert runs[0]["warmup_ran"] and runs[0]["compile_seconds"] > 0
    assert not runs[1]["warmup_ran"] and runs[1]["compile_seconds"] == 0.0
    assert [r["dynamo_compiles"] for r in runs] == [0, 0]
    assert runs[1]["compile"] is True and runs[1]["torch_setup"]["compile_backend"] == "eager"
    # the same numbers as eager: the eager backend runs the very same ops
    plain = train.train_and_evaluate(small_cfg(seed=1), data=data, **KW)
    assert plain["step_losses"] == runs[1]["step_losses"]


def test_speedrun_second_run_does_not_recompile() -> None:
    """Both whitening-bias variants and every eval shape are compiled in the warm-up."""
    data = SyntheticData(96, 40)
    runs = [
        train.train_and_evaluate(
            _speedrun_cfg(seed=seed), data=data, torch_setup=EAGER_COMPILE, **KW
        )
        for seed in (0, 1)
    ]
    assert [r["dynamo_compiles"] for r in runs] == [0, 0]
    assert not runs[1]["warmup_ran"]


def test_recompiles_on_the_clock_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        fast, "warm_up", lambda *a, **k: {"compile_seconds": 0.0, "warmup_ran": False}
    )
    fresh = TorchSetup(compile_mode="default", compile_backend="aot_eager", channels_last=False)
    s = train.train_and_evaluate(small_cfg(), data=SyntheticData(96, 40), torch_setup=fresh, **KW)
    # the train step compiles in epoch 1, on the clock; the eval batches compile in the
    # untimed monitoring evaluation after it, so they are not counted
    assert s["dynamo_compiles"] >= 1


def test_static_addresses_reuse_the_nets_with_the_same_numbers() -> None:
    data = SyntheticData(96, 40)
    pooled = TorchSetup(
        compile_mode="default", compile_backend="eager", compile_augment=True, static_addresses=True
    )
    r0 = train.setup(small_cfg(seed=0), data, torch_setup=pooled)
    r1 = train.setup(small_cfg(seed=1), data, torch_setup=pooled)
    assert r1.model is r0.model and r1.train_x is r0.train_x and not r1.extras["warmup_ran"]
    for seed in (0, 1):
        kw = dict(data=data, return_variables=True, stream="shared", **KW)
        a = train.train_and_evaluate(small_cfg(seed=seed), torch_setup=pooled, **kw)
        b = train.train_and_evaluate(small_cfg(seed=seed), **kw)
        assert a["step_losses"] == b["step_losses"] and a["final"] == b["final"]
        assert all(torch.equal(v, b["ema_variables"][k]) for k, v in a["ema_variables"].items())


def test_constants_are_made_once_per_device() -> None:
    assert augment.fill_tensor(CPU) is augment.fill_tensor(CPU)
    assert augment.device_stats("cifar10", CPU)[0] is augment.device_stats("cifar10", CPU)[0]
    r = train.setup(small_cfg(), SyntheticData(96, 40))
    assert r.fill is augment.fill_tensor(CPU) and r.mean is augment.device_stats("cifar10", CPU)[0]


# --- one scoring of equal weights -----------------------------------------------------------------


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = train.evaluate_net

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(train, "evaluate_net", counted)
    return calls


def test_lookahead_end_scores_the_net_once(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _speedrun_cfg()
    r = train.setup(cfg, SyntheticData(96, 40))
    train.set_whitening(r)
    for epoch in range(cfg.epochs):
        train.train_epoch(r, epoch)
    calls = _counting(monkeypatch)
    both = train.score(r, False)[0]
    assert len(calls) == 2
    once = train.score(r, True)[0]
    assert len(calls) == 3
    compared = train.score(r, None)[0]  # detects equality itself
    assert len(calls) == 4
    assert once == both == compared and once["val_acc"] == once["ema_val_acc"]
    with torch.no_grad():
        r.model.head.weight.add_(1.0)
    assert train.score(r, None)[1] == 2  # different weights: both scored


def test_trainer_scores_equal_weights_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    s = train.train_and_evaluate(_speedrun_cfg(), data=SyntheticData(96, 40), **KW)
    warm = 2 if s["warmup_ran"] else 0  # the warm-up evaluates the net and its EMA
    assert len(calls) == warm + 2 * (s["config"]["epochs"] - 1) + 1
    assert s["final_eval_weight_sets"] == 1
    assert s["final"]["val_acc"] == s["final"]["ema_val_acc"]


# --- whitening moments on the device --------------------------------------------------------------


def _natural_images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth, correlated uint8 images (upsampled low-res colour fields plus noise)."""
    rng = np.random.default_rng(seed)
    low = rng.normal(128, 50, (n, 4, 4, 3)) + rng.normal(0, 20, (n, 1, 1, 1))
    x = np.kron(low, np.ones((1, 8, 8, 1))) + rng.normal(0, 6, (n, 32, 32, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def test_device_moments_and_kernel_equal_numpy_bit_for_bit() -> None:
    images = _natural_images(5_100)  # more than WHITEN_IMAGES: the prefix is what counts
    got = whitening.device_patch_moments(torch.from_numpy(images[:1_234]), chunk=500)
    want = patch_moments(images[:1_234])
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2] == want[2]
    data = SyntheticData(96, 40)
    data.train_images = images
    data.train_labels = np.zeros(len(images), np.int32)
    r = train.setup(_speedrun_cfg(), data)
    kernel = whitening.whitening_kernel(r.train_x, r.cfg)
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, whitening_kernel_OIHW(images))


# --- the sync self-check --------------------------------------------------------------------------


def _sync_check(r: train.Run, **kw: Any) -> dict[str, Any]:
    """`fast.check_no_host_sync` on the trainer's own step, plan and evaluation."""
    recipe = {"step": train.train_step, "plan": train.plan_epoch, "evaluate": train.evaluate_net}
    return fast.check_no_host_sync(r, **recipe, **kw)


def test_sync_check_is_skipped_on_the_cpu() -> None:
    result = _sync_check(train.setup(small_cfg(), SyntheticData(96, 40)))
    assert result["status"] == "skipped" and "CUDA" in result["detail"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["none", "reduce-overhead"])
def test_sync_check_passes_on_cuda(mode: str) -> None:
    cfg = _speedrun_cfg(batch_size=32)
    r = train.setup(cfg, SyntheticData(96, 40), torch_setup=TorchSetup(compile_mode=mode))
    before = {k: v.clone() for k, v in r.model.state_dict().items()}
    result = _sync_check(r, raise_on_sync=True)
    assert result["status"] == "passed", result
    after = r.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # the run is unchanged


# --- profiles -------------------------------------------------------------------------------------


def test_profile_writes_a_trace_and_ranked_top_ops(tmp_path: Any) -> None:
    folder = tmp_path / "prof"
    s = train.train_and_evaluate(
        small_cfg(epochs=2), data=SyntheticData(96, 40), profile_dir=folder, **KW
    )
    prof = s["profile"]
    assert prof["trace"] == str(folder / "torch-trace.json")
    assert os.listdir(folder) == ["torch-trace.json"]  # the temporary file was renamed
    doc = json.loads((folder / "torch-trace.json").read_text())
    assert doc["traceEvents"]
    rows = prof["top_ops"]
    assert rows and {"name", "seconds", "calls", "share"} <= set(rows[0])
    seconds = [row["seconds"] for row in rows]
    assert seconds == sorted(seconds, reverse=True)
    assert 0 < sum(row["share"] for row in rows) <= 1 + 1e-9
    assert any(row["name"].startswith("aten::") for row in rows)


def test_a_failed_profiled_run_leaves_no_profiler_running(tmp_path: Any) -> None:
    diverges = small_cfg(lr=1e4, output_scale=100.0)  # the largest rates the flags allow
    with pytest.raises(FloatingPointError):
        train.train_and_evaluate(
            diverges, data=SyntheticData(96, 40), profile_dir=tmp_path / "a", **KW
        )
    s = train.train_and_evaluate(
        small_cfg(epochs=1), data=SyntheticData(96, 40), profile_dir=tmp_path / "b", **KW
    )
    assert s["profile"]["top_ops"] and not (tmp_path / "a").exists()
