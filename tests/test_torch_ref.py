"""Tests of the PyTorch reference: model, augmentation, optimizer, LR, EMA, trainer, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from jaxbench import schedule
from jaxbench.configs import Config, tiny
from jaxbench.stream import FILL_RGB, apply_plan_numpy, epoch_plan
from torch_ref import augment, optim, train
from torch_ref.model import ResNet9, count_params, model_from_config

BLOCKS = ("prep", "layer1", "res1a", "res1b", "layer2", "layer3", "res3a", "res3b")
SMALL_WIDTHS = (4, 8, 8, 8)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


class SyntheticData:
    """A synthetic stand-in for `jaxbench.data.Dataset` (random pixels, random labels)."""

    def __init__(self, n_train: int, n_test: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.name, self.classes = "cifar10", [str(i) for i in range(10)]
        self.train_images = _images(n_train, seed)
        self.train_labels = rng.integers(0, 10, n_train).astype(np.int32)
        self.test_images = _images(n_test, seed + 1)
        self.test_labels = rng.integers(0, 10, n_test).astype(np.int32)


def small_cfg(**changes: Any) -> Config:
    """3 steps per epoch on 96 synthetic images, a net small enough for milliseconds per step."""
    base = dict(
        widths=SMALL_WIDTHS,
        subset=None,
        test_subset=None,
        batch_size=32,
        eval_batch_size=25,  # 40 test images: one full eval batch and a remainder
        epochs=3,
        lr_peak_epoch=1.0,
    )
    base.update(changes)
    return tiny().replace(**base)


# --- model ------------------------------------------------------------------------------------


def test_param_count_default_widths() -> None:
    assert count_params(ResNet9()) == 6_573_120


def test_names_and_output_shape() -> None:
    model = model_from_config(tiny())
    names = [n for n, _ in model.named_children()]
    assert names == [*BLOCKS, "head"]
    for block in BLOCKS:
        m = getattr(model, block)
        assert m.conv.bias is None and isinstance(m.bn, nn.BatchNorm2d)
        assert m.bn.momentum == 0.1 and m.bn.eps == 1e-5
    assert model.head.bias is None
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 10) and model(x).dtype == torch.float32
    assert model_from_config(tiny().replace(dataset="cifar100")).head.out_features == 100


@pytest.mark.parametrize("widths", [(64, 128, 256, 512), (16, 32, 64, 128)])
def test_shapes_and_count_equal_jax_model(widths: tuple[int, ...]) -> None:
    jax = pytest.importorskip("jax", reason="jax not installed")
    models = pytest.importorskip("jaxbench.models", reason="jaxbench.models not written yet")
    cfg = tiny().replace(widths=widths)
    fm = models.model_from_config(cfg)
    x = jax.numpy.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lambda: fm.init(jax.random.PRNGKey(0), x, train=False))
    params, stats = shapes["params"], shapes["batch_stats"]
    tm = model_from_config(cfg)
    n_flax = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    assert count_params(tm) == n_flax
    for block in BLOCKS:
        m = getattr(tm, block)
        oihw = tuple(m.conv.weight.shape)
        assert tuple(params[block]["conv"]["kernel"].shape) == (oihw[2], oihw[3], oihw[1], oihw[0])
        for t_name, f_tree, f_name in [
            ("weight", params, "scale"),
            ("bias", params, "bias"),
            ("running_mean", stats, "mean"),
            ("running_var", stats, "var"),
        ]:
            assert tuple(getattr(m.bn, t_name).shape) == tuple(f_tree[block]["bn"][f_name].shape)
    assert tuple(params["head"]["kernel"].shape) == tuple(tm.head.weight.shape)[::-1]


def test_init_distribution_and_determinism() -> None:
    cfg = tiny().replace(widths=(64, 128, 256, 512))
    model = model_from_config(cfg, seed=3)
    for name, p in model.named_parameters():
        if name.endswith("conv.weight") or name == "head.weight":
            bound = 1.0 / math.sqrt(p[0].numel())
            assert p.abs().max() <= bound, name
            assert p.abs().max() > 0.9 * bound, name  # uniform fills the range
            # std of U(-b, b) is b / sqrt(3); Flax's lecun_normal would be sqrt(3) times larger
            assert abs(p.std().item() / (bound / math.sqrt(3)) - 1) < 0.1, name
    for block in BLOCKS:
        bn = getattr(model, block).bn
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
        assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    again = model_from_config(cfg, seed=3).state_dict()
    other = model_from_config(cfg, seed=4).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.prep.conv.weight, other["prep.conv.weight"])


# --- augmentation -----------------------------------------------------------------------------

AUG_CASES = [
    {},
    {"crop_pad": 0, "cutout": 0, "flip": "none"},
    {"crop_pad": 1, "cutout": 1, "flip": "alternating"},
    {"crop_pad": 2, "cutout": 0, "flip": "alternating"},
    {"crop_pad": 16, "cutout": 32, "flip": "random"},
    {"crop_pad": 4, "cutout": 12, "flip": "none"},
]


@pytest.mark.parametrize("changes", AUG_CASES)
def test_apply_plan_bit_identical_to_numpy_reference(changes: dict[str, Any]) -> None:
    images = _images(150)
    cfg = tiny().replace(subset=None, batch_size=50, **changes)
    for epoch in range(2):
        plan = epoch_plan(cfg, epoch, len(images))
        ref = apply_plan_numpy(images, plan, cfg)
        got = augment.apply_plan(
            torch.from_numpy(images), augment.plan_to_device(plan.as_dict(), "cpu"), cfg
        )
        assert got.dtype == torch.uint8 and got.shape == ref.shape
        np.testing.assert_array_equal(got.numpy(), ref)


def _plan(n: int, **fields: Any) -> dict[str, torch.Tensor]:
    plan = {
        "indices": torch.arange(n),
        "crop_y": torch.zeros(n, dtype=torch.int64),
        "crop_x": torch.zeros(n, dtype=torch.int64),
        "flip": torch.zeros(n, dtype=torch.bool),
        "cutout_y": torch.zeros(n, dtype=torch.int64),
        "cutout_x": torch.zeros(n, dtype=torch.int64),
    }
    plan.update({k: torch.as_tensor(v) for k, v in fields.items()})
    return plan


def test_augmentation_properties() -> None:
    x = torch.from_numpy(_images(4))
    off = tiny().replace(crop_pad=0, cutout=0, flip="none")
    # Identity when everything is off; the plan's indices pick and reorder images.
    np.testing.assert_array_equal(augment.apply_plan(x, _plan(4), off), x)
    np.testing.assert_array_equal(augment.apply_plan(x, _plan(2, indices=[3, 1]), off), x[[3, 1]])
    # Flip mirrors the W axis of exactly the flagged images.
    flip_cfg = off.replace(flip="random")
    out = augment.apply_plan(x, _plan(4, flip=[True, False, True, False]), flip_cfg)
    assert torch.equal(out[0], x[0].flip(1)) and torch.equal(out[1], x[1])
    # Crop at offset (p, p) is the identity; offset (0, 0) starts with the reflected rows.
    p = 4
    crop = off.replace(crop_pad=p)
    centred = augment.apply_plan(x, _plan(4, crop_y=[p] * 4, crop_x=[p] * 4), crop)
    assert torch.equal(centred, x)
    corner = augment.apply_plan(x, _plan(4), crop)
    assert torch.equal(corner[:, 0, p:], x[:, p, : 32 - p])  # row 0 reads source row p
    assert torch.equal(corner[:, p, p:], x[:, 0, : 32 - p])  # edge row not repeated
    assert torch.equal(corner[:, p + 1, p + 1], x[:, 1, 1])
    # Cutout fills exactly the square with FILL_RGB and leaves the rest alone.
    cut = off.replace(cutout=8)
    out = augment.apply_plan(x, _plan(4, cutout_y=[0, 24, 5, 10], cutout_x=[0, 24, 20, 3]), cut)
    for b, (cy, cx) in enumerate([(0, 0), (24, 24), (5, 20), (10, 3)]):
        mask = torch.zeros(32, 32, dtype=torch.bool)
        mask[cy : cy + 8, cx : cx + 8] = True
        assert torch.all(out[b][mask] == torch.tensor(FILL_RGB, dtype=torch.uint8))
        assert torch.equal(out[b][~mask], x[b][~mask])


def _chi2_uniform(values: np.ndarray, k: int) -> float:
    """Chi-square statistic of `values` against uniform over 0..k-1 (values outside count fully)."""
    counts = np.bincount(values, minlength=k)
    expected = len(values) / k
    outside = counts[k:].sum() if len(counts) > k else 0
    return float(((counts[:k] - expected) ** 2 / expected).sum() + outside * 1e6)


def test_fast_plan_has_the_shared_streams_distributions() -> None:
    cfg = tiny().replace(subset=None, batch_size=100, crop_pad=4, cutout=8)
    n_train = 20_000
    gen = torch.Generator().manual_seed(0)
    fast = augment.draw_plan(gen, 0, n_train, cfg, "cpu")
    shared = epoch_plan(cfg, 0, n_train).as_dict()
    assert sorted(fast) == sorted(shared)
    idx = fast["indices"].numpy()
    assert len(idx) == len(shared["indices"]) == n_train and len(np.unique(idx)) == n_train
    # 99.9% chi-square quantiles: df 8 -> 26.1, df 24 -> 51.2. A range off by one (0..2p-1 or
    # 0..2p+1) empties or adds a bin and pushes the statistic into the thousands.
    for name, k, limit in [("crop_y", 9, 26.1), ("crop_x", 9, 26.1), ("cutout_y", 25, 51.2)]:
        for plan in (fast, shared):
            v = np.asarray(plan[name])
            assert v.min() == 0 and v.max() == k - 1, name
            assert _chi2_uniform(v, k) < limit, name
    assert _chi2_uniform(fast["cutout_x"].numpy(), 25) < 51.2
    # Flip rate 1/2 within 4.5 standard errors, for both streams.
    se = 0.5 / math.sqrt(n_train)
    assert abs(fast["flip"].float().mean().item() - 0.5) < 4.5 * se
    assert abs(np.mean(shared["flip"]) - 0.5) < 4.5 * se
    # Different epochs and generators draw different numbers.
    again = augment.draw_plan(gen, 1, n_train, cfg, "cpu")
    assert not torch.equal(again["indices"], fast["indices"])


def test_fast_plan_alternating_flip_and_drop_last() -> None:
    cfg = tiny().replace(subset=None, batch_size=64, flip="alternating")
    n_train = 1000  # 15 full batches, 40 images dropped each epoch
    gen = torch.Generator().manual_seed(1)
    plans = [augment.draw_plan(gen, e, n_train, cfg, "cpu") for e in range(3)]
    flips = []
    for plan in plans:
        assert len(plan["indices"]) == 15 * 64
        per_image = torch.full((n_train,), -1, dtype=torch.int64)
        per_image[plan["indices"]] = plan["flip"].long()
        flips.append(per_image)
    both = (flips[0] >= 0) & (flips[1] >= 0) & (flips[2] >= 0)
    assert torch.all(flips[1][both] == 1 - flips[0][both])  # odd epochs flip the other way
    assert torch.all(flips[2][both] == flips[0][both])  # base flips drawn once per run
    assert 0.4 < flips[0][flips[0] >= 0].float().mean().item() < 0.6


# --- optimizer, LR, EMA -----------------------------------------------------------------------


def test_optimizer_step_matches_contract_formula() -> None:
    """Two SGD steps equal `g += wd*w; buf = m*buf + g; w -= lr*(g + m*buf)` per group."""
    cfg = tiny().replace(widths=SMALL_WIDTHS, bn_bias_lr_mult=64.0, bn_bias_wd_mult=1 / 64)
    model = model_from_config(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)  # BN biases start at zero; move them so decay matters
    opt = optim.make_optimizer(model, cfg)
    lr, wd = 0.01, cfg.weight_decay * cfg.batch_size  # optimizer units for a summed loss
    assert cfg.loss_reduction == "sum"
    optim.set_lr(opt, lr)
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, wd * (1 / 64)]
    bias_ids = {id(getattr(model, b).bn.bias) for b in BLOCKS}
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf = {n: torch.zeros_like(p) for n, p in w.items()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        grads = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in w.items()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
            is_bias = id(p) in bias_ids
            lr_n = lr * (64.0 if is_bias else 1.0)
            g = grads[n] + wd * (1 / 64 if is_bias else 1.0) * w[n]
            buf[n] = cfg.momentum * buf[n] + g
            w[n] = w[n] - lr_n * (g + cfg.momentum * buf[n])
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), w[n], rtol=1e-12, atol=1e-14)


def test_ema_update_arithmetic() -> None:
    rng = np.random.default_rng(0)
    e_np = rng.standard_normal(1000).astype(np.float32)
    w_np = rng.standard_normal(1000).astype(np.float32)
    ema, cur = [torch.from_numpy(e_np.copy())], [torch.from_numpy(w_np)]
    m = 0.99
    optim.ema_update(ema, cur, m)
    m32 = np.float32(m)
    expected = m32 * e_np + (np.float32(1) - m32) * w_np  # the JAX side's float32 formula
    np.testing.assert_array_equal(ema[0].numpy(), expected)
    model = model_from_config(tiny())
    names = [n for n, _ in model.named_parameters()] + [
        n for n, b in model.named_buffers() if b.is_floating_point()
    ]
    assert len(optim.ema_tensors(model)) == len(names)  # params and BN stats, not the counter
    assert sum(n.endswith("running_var") for n in names) == len(BLOCKS)


def _record_lrs(monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """Patch the trainer's optimizer factory so every `step()` records each group's LR."""
    seen: list[list[float]] = []
    real = optim.make_optimizer

    def recording(model: nn.Module, cfg: Config, *args: Any) -> torch.optim.SGD:
        opt = real(model, cfg, *args)
        step = opt.step

        def wrapped(*a: Any, **k: Any) -> Any:
            seen.append([g["lr"] for g in opt.param_groups])
            return step(*a, **k)

        opt.step = wrapped  # type: ignore[method-assign]
        return opt

    calls = {"n": 0}

    def factory(model: nn.Module, cfg: Config, *args: Any) -> torch.optim.SGD:
        calls["n"] += 1  # the first optimizer is the trainer's; later ones are warm-up scratch
        if calls["n"] == 1:
            return recording(model, cfg, *args)
        return real(model, cfg, *args)

    monkeypatch.setattr(optim, "make_optimizer", factory)
    return seen


def test_lr_used_by_the_optimizer_equals_lr_at(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _record_lrs(monkeypatch)
    cfg = small_cfg(epochs=4, lr_peak_epoch=1.5, lr_start=0.1, lr_end=0.05, bn_bias_lr_mult=8.0)
    train.train_and_evaluate(cfg, data=SyntheticData(96, 40), progress=False, quiet=True)
    spe = 3
    expected = schedule.lr_at(np.arange(cfg.epochs * spe), cfg, spe)
    assert len(seen) == cfg.epochs * spe
    got = np.array([s[0] for s in seen])
    np.testing.assert_array_equal(got, expected)  # exactly, not approximately
    np.testing.assert_array_equal(np.array([s[1] for s in seen]), expected * 8.0)
    # Key steps: the first update uses lr_start * lr, the peak knot uses lr (per example).
    lr = cfg.lr / cfg.batch_size
    peak = schedule.lr_knots(cfg, spe)[0][1]
    assert got[0] == pytest.approx(0.1 * lr) and got[peak] == pytest.approx(lr)
    assert int(np.argmax(got)) == peak and got[-1] > 0.05 * lr


# --- the trainer ------------------------------------------------------------------------------


def on_disk_keys(folder: Any) -> set[str]:
    return set(json.loads((folder / "summary.json").read_text()))


def test_trainer_summary_and_files(tmp_path: Any) -> None:
    cfg = small_cfg()
    summary = train.train_and_evaluate(
        cfg, tmp_path, data=SyntheticData(100, 40), progress=False, quiet=True
    )
    for key in ("val_acc", "ema_val_acc", "val_loss", "train_loss", "train_acc"):
        assert summary["final"][key] is not None and math.isfinite(summary["final"][key])
    assert len(summary["step_losses"]) == cfg.epochs * 3  # 100 // 32 = 3, last 4 dropped
    assert [r["epoch"] for r in summary["epochs"]] == [1, 2, 3]
    times = [r["total_time_seconds"] for r in summary["epochs"]]
    assert times == sorted(times) and summary["total_time_seconds"] == times[-1]
    assert summary["images_per_second"] > 0 and summary["dynamo_compiles"] == 0
    # the warm-up runs once per process and configuration; a skipped one costs nothing
    if summary["warmup_ran"]:
        assert summary["compile_seconds"] > 0
    else:
        assert summary["compile_seconds"] == 0.0
    assert on_disk_keys(tmp_path) >= {"torch_setup", "warmup_ran", "dynamo_compiles", "compile"}
    assert summary["environment"]["torch"] == torch.__version__
    assert summary["config"]["widths"] == list(SMALL_WIDTHS) and summary["seed"] == cfg.seed
    assert (tmp_path / "config.json").exists()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2, 3]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["final"] == summary["final"]
    assert np.mean(summary["step_losses"][-3:]) == pytest.approx(summary["final"]["train_loss"])


def test_trainer_is_deterministic_and_stream_selects_the_plan() -> None:
    data = SyntheticData(96, 40)
    kw: dict[str, Any] = {"data": data, "progress": False, "quiet": True}
    a = train.train_and_evaluate(small_cfg(), stream="shared", **kw)
    b = train.train_and_evaluate(small_cfg(), stream="shared", **kw)
    c = train.train_and_evaluate(small_cfg(), stream="fast", **kw)
    d = train.train_and_evaluate(small_cfg(seed=1), stream="shared", **kw)
    assert a["step_losses"] == b["step_losses"]
    assert a["step_losses"] != c["step_losses"] and a["step_losses"] != d["step_losses"]
    with pytest.raises(ValueError, match="stream"):
        train.train_and_evaluate(small_cfg(), stream="numpy", **kw)


def test_ema_copies_at_start_and_updates_every_k_steps() -> None:
    """m = 0: the EMA is the weights of the last update whose count is a multiple of k."""
    data = SyntheticData(96, 40)
    kw: dict[str, Any] = {"data": data, "progress": False, "quiet": True, "return_variables": True}
    init = model_from_config(small_cfg()).state_dict()
    # 9 updates, k = 9: the EMA is the final weights, BN running stats included.
    s = train.train_and_evaluate(small_cfg(ema_every=9, ema_momentum=0.0), **kw)
    for k, v in s["variables"].items():
        if v.is_floating_point():
            assert torch.equal(s["ema_variables"][k], v), k
    assert not torch.equal(s["variables"]["prep.bn.running_mean"], init["prep.bn.running_mean"])
    # k = 10 > 9 updates: never updated, still the initial copy.
    s = train.train_and_evaluate(small_cfg(ema_every=10, ema_momentum=0.0), **kw)
    for k, v in init.items():
        assert torch.equal(s["ema_variables"][k], v), k
    # init_state_dict starts both the net and its EMA from the given weights.
    given = model_from_config(small_cfg(), seed=7).state_dict()
    s = train.train_and_evaluate(
        small_cfg(ema_every=10, ema_momentum=0.0), init_state_dict=given, **kw
    )
    assert torch.equal(s["ema_variables"]["prep.conv.weight"], given["prep.conv.weight"])
    # ema_every = 0 turns the EMA off.
    s = train.train_and_evaluate(small_cfg(ema_every=0), **kw)
    assert s["final"]["ema_val_acc"] is None and "ema_variables" not in s


def test_diverging_run_raises_floating_point_error() -> None:
    with pytest.raises(FloatingPointError, match=r"became nan in epoch \d; lower --lr"):
        train.train_and_evaluate(
            small_cfg(lr=1e4, output_scale=100.0),  # the largest the flags allow
            data=SyntheticData(96, 40),
            progress=False,
            quiet=True,
        )


@pytest.mark.slow
@pytest.mark.realdata
def test_tiny_preset_learns_on_real_data(real_data_dir: Any) -> None:
    from jaxbench.data import load_dataset

    # The tiny preset shortened to 60 steps on 3,000 images (~45% measured; chance is 10%).
    cfg = tiny().replace(
        data_dir=str(real_data_dir),
        subset=3000,
        test_subset=500,
        batch_size=100,
        epochs=2,
        lr_peak_epoch=0.5,
    )
    summary = train.train_and_evaluate(cfg, data=load_dataset(cfg), progress=False, quiet=True)
    rows = summary["epochs"]
    assert rows[1]["train_loss"] < rows[0]["train_loss"] < math.log(10)
    assert summary["final"]["val_acc"] > 0.3, summary["final"]
    assert summary["final"]["ema_val_acc"] > 0.3, summary["final"]


# --- command line -----------------------------------------------------------------------------


def test_cli_bad_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--config", "tiny", "--lookahead"],
        ["--config", "tiny", "--batch-size", "0"],
        ["--config", "tiny", "--subset", "10"],
    ):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err


def _exit_code(argv: list[str]) -> int | str | None:
    """`train.main`'s exit code, returned or raised (a usage error exits from argparse)."""
    try:
        return train.main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("case", ["a file", "unwritable", "under a file"])
def test_cli_refuses_a_bad_profile_place_before_any_work(
    case: str, tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--profile is checked before the data loads: one line, exit 2, nothing written."""
    import jaxbench.data

    def no_work(*args: Any, **kw: Any) -> None:
        raise AssertionError("the data loaded before --profile was checked")

    monkeypatch.setattr(jaxbench.data, "load_dataset", no_work)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    profile = {
        "a file": a_file,
        "unwritable": "/proc/torch-ref-tests/traces",
        "under a file": a_file / "traces",
    }[case]
    out = tmp_path / "run"
    code = _exit_code(["--config", "tiny", "--out", str(out), "--profile", str(profile)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: --profile ") and "\n" not in err, err
    assert not out.exists()  # no run folder, so no status.json saying "running"
    assert a_file.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_leaves_no_profile_folder_when_out_is_refused(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    argv = ["--config", "tiny", "--out", str(a_file), "--profile", str(tmp_path / "p" / "q")]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out ") and "\n" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert a_file.read_text() == "keep me"


def test_importing_torch_ref_does_not_import_jax() -> None:
    code = "import sys, torch_ref.train, torch_ref.augment; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


class _Recording(train.Hooks):
    """Observes every hook call with the update counter and the loss."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def before_step(self, t: int, run: train.Run) -> None:
        self.calls.append(("before_step", t, run.t))

    def after_step(self, t: int, run: train.Run, loss: torch.Tensor) -> None:
        assert torch.isfinite(loss)
        self.calls.append(("after_step", t, run.t))

    def before_eval(self, epoch: int, run: train.Run) -> None:
        self.calls.append(("before_eval", epoch, run.t))


def test_hooks_see_every_update_and_change_nothing() -> None:
    kw: dict[str, Any] = {"data": SyntheticData(96, 40), "progress": False, "quiet": True}
    plain = train.train_and_evaluate(small_cfg(), **kw)
    rec = _Recording()
    hooked = train.train_and_evaluate(small_cfg(), hooks=rec, **kw)
    assert plain["step_losses"] == hooked["step_losses"]
    assert plain["final"] == hooked["final"]
    steps = 3 * plain["steps_per_epoch"]
    assert [c for c in rec.calls if c[0] == "before_step"] == [
        ("before_step", t, t) for t in range(steps)
    ]
    assert [c for c in rec.calls if c[0] == "after_step"] == [
        ("after_step", t, t + 1) for t in range(steps)
    ]
    assert [c[1] for c in rec.calls if c[0] == "before_eval"] == [0, 1, 2]
