"""The speedrun (airbench94) preset: whitening weights, the two nets, their parity, the config."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from helpers import random_dataset, random_images, small_config, smooth_images

from jaxbench import augment, optim, schedule, whitening
from jaxbench.configs import get_config, optimizer_scales
from jaxbench.data import Dataset
from jaxbench.layers import activation
from jaxbench.schedule import lr_knots
from jaxbench.speedrun_model import (
    SpeedrunNet,
    speedrun_from_config,
    with_whitening,
)
from jaxbench.stream import MEAN_STD
from parity.convert import flax_to_torch, torch_to_flax
from torch_ref import augment as taugment
from torch_ref import speedrun_model as tsm

WIDTHS = (64, 256, 256)


def reference_kernel_svd(
    images_uint8: np.ndarray, eps: float = 5e-4, gram: bool = False
) -> np.ndarray:
    """Independent whitening kernel: shifted slices -> patch matrix -> SVD, all float64.

    `gram=True` takes the SVD of the 12x12 Gram matrix instead of the patch matrix
    (the same eigenvectors, seconds faster on 5,000 images).
    """
    mean, std = (np.asarray(v, np.float64) for v in MEAN_STD["cifar10"])
    x = (images_uint8.astype(np.float64) / 255.0 - mean) / std
    h, w = x.shape[1] - 1, x.shape[2] - 1
    cols = [x[:, dy : dy + h, dx : dx + w, c] for c in range(3) for dy in (0, 1) for dx in (0, 1)]
    patches = np.stack(cols, axis=-1).reshape(-1, 12) / math.sqrt(len(x) * h * w)
    if gram:
        _, lam, vt = np.linalg.svd(patches.T @ patches)
    else:
        _, s, vt = np.linalg.svd(patches, full_matrices=False)
        lam = s**2
    filters = (vt / np.sqrt(lam + eps)[:, None]).reshape(12, 3, 2, 2)
    return np.concatenate([filters, -filters])


def align_signs(kernel: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Flip each reference filter to the sign of `kernel`'s (eigenvector signs are arbitrary)."""
    dots = np.einsum("oihw,oihw->o", kernel.astype(np.float64), reference)
    return reference * np.sign(dots)[:, None, None, None]


# --- whitening ----------------------------------------------------------------------


def test_whitening_matches_independent_svd() -> None:
    images = smooth_images(600)
    kernel = whitening.whitening_kernel_OIHW(images)
    assert kernel.shape == (24, 3, 2, 2) and kernel.dtype == np.float32
    ref = align_signs(kernel, reference_kernel_svd(images))
    np.testing.assert_allclose(kernel, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(kernel[12:], -kernel[:12])


def test_whitening_whitens_the_patches() -> None:
    """W^T C W = diag(lambda / (lambda + eps)): the first 12 filters decorrelate patches."""
    images = smooth_images(300, seed=1)
    cov = whitening.covariance_from_moments(*whitening.patch_moments(images))
    lam, _ = whitening.eigh_descending(cov)
    w = whitening.whitening_kernel_OIHW(images)[:12].reshape(12, -1).astype(np.float64)
    np.testing.assert_allclose(w @ cov @ w.T, np.diag(lam / (lam + 5e-4)), atol=1e-5)
    assert np.all(np.diff(lam) <= 0), "eigenvalues must be sorted largest first"


def test_whitening_uses_first_n_images_and_rejects_floats() -> None:
    images = smooth_images(400, seed=2)
    a = whitening.whitening_kernel_OIHW(images, n_images=200)
    b = whitening.whitening_kernel_OIHW(images[:200])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="uint8"):
        whitening.whitening_kernel_OIHW(images.astype(np.float32))


def test_both_frameworks_load_identical_whitening(cifar10: Dataset) -> None:
    """On the real first 5,000 images: torch's and Flax's whitening kernels are the same bits."""
    data = cifar10
    kernel_OIHW = whitening.whitening_kernel_OIHW(data.train_images)
    ref = align_signs(kernel_OIHW, reference_kernel_svd(data.train_images[:5000], gram=True))
    np.testing.assert_allclose(kernel_OIHW, ref, atol=1e-5, rtol=1e-5)

    net = tsm.SpeedrunNet(widths=(8, 8, 8))
    net.set_whitening(kernel_OIHW)
    variables = SpeedrunNet(widths=(8, 8, 8)).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False
    )
    variables = with_whitening(variables, whitening.whitening_kernel_HWIO(data.train_images))
    from_torch = torch_to_flax(net.state_dict())["params"]["whiten"]["kernel"]
    np.testing.assert_array_equal(from_torch, np.asarray(variables["params"]["whiten"]["kernel"]))


# --- the two nets -----------------------------------------------------------------------


def expected_param_count(widths: tuple[int, ...], classes: int = 10) -> int:
    count = 24 * 3 * 2 * 2 + 24  # whitening conv with bias
    c_in = 24
    for w in widths:
        count += 9 * c_in * w + 9 * w * w + 2 * w  # two convs, two BN biases (no scales)
        c_in = w
    return count + c_in * classes


def init_flax(widths: tuple[int, ...] = WIDTHS, seed: int = 0) -> dict:
    net = SpeedrunNet(widths=widths)
    return net.init(jax.random.PRNGKey(seed), jnp.zeros((2, 32, 32, 3)), train=False)


def test_param_counts_and_names_match() -> None:
    variables = init_flax()
    torch_net = tsm.SpeedrunNet(widths=WIDTHS)
    n_flax = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
    n_torch = sum(p.numel() for p in torch_net.parameters())
    assert n_flax == n_torch == expected_param_count(WIDTHS)
    converted = torch_to_flax(torch_net.state_dict())
    shapes = jax.tree_util.tree_map(np.shape, converted)
    assert shapes == jax.tree_util.tree_map(np.shape, jax.device_get(variables))
    # the frozen parts: no BN scale anywhere, torch's whitening weight frozen
    assert all(m.weight is None for m in torch_net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch_net.whiten.weight.requires_grad


@pytest.mark.parametrize(
    ("widths", "act"), [((16, 32, 32), "gelu"), (WIDTHS, "gelu"), ((16, 32, 32), "silu")]
)
def test_forward_parity_train_and_eval(widths: tuple[int, ...], act: str) -> None:
    """Same weights -> same logits (train and eval mode) and same updated BN statistics;
    `act` is the blocks' activation (the record's SiLU), the stem's GELU in both."""
    cfg = get_config("speedrun").replace(activation=act)
    images = smooth_images(64, seed=3)
    kernel = whitening.whitening_kernel_OIHW(images)
    variables = with_whitening(init_flax(widths, seed=1), whitening.kernel_OIHW_to_HWIO(kernel))
    # non-trivial BN biases so the bias mapping is exercised
    rng = np.random.default_rng(4)
    variables = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype)
            if any(getattr(p, "key", "").startswith("bn") for p in path)
            and getattr(path[-1], "key", "") == "bias"
            else x
        ),
        variables,
    )
    torch_net = tsm.SpeedrunNet(widths=widths, cfg=cfg)
    torch_net.load_state_dict(flax_to_torch(variables), strict=True)

    batch = 8
    mean, std = (np.asarray(v, np.float32) for v in MEAN_STD["cifar10"])
    x = (images[:batch].astype(np.float32) / 255.0 - mean) / std
    net = SpeedrunNet(widths=widths, cfg=cfg)
    with jax.default_matmul_precision("highest"):
        logits_j, updates = net.apply(
            variables, jnp.asarray(x), train=True, mutable=["batch_stats"]
        )
        torch_net.train()
        logits_t = torch_net(torch.from_numpy(x).permute(0, 3, 1, 2))
        np.testing.assert_allclose(np.asarray(logits_j), logits_t.detach().numpy(), atol=1e-5)

        stats_t = torch_to_flax(torch_net.state_dict())  # both store PyTorch's unbiased var
        for path, value in jax.tree_util.tree_leaves_with_path(updates["batch_stats"]):
            keys = [p.key for p in path]
            ref = stats_t["batch_stats"]
            for k in keys:
                ref = ref[k]
            np.testing.assert_allclose(np.asarray(value), ref, atol=1e-5, rtol=1e-5)

        # Eval normalises by the stored (unbiased) variance, the same numbers in both.
        evaluated = {**variables, "batch_stats": stats_t["batch_stats"]}
        eval_j = net.apply(evaluated, jnp.asarray(x), train=False)
        torch_net.eval()
        with torch.no_grad():
            eval_t = torch_net(torch.from_numpy(x).permute(0, 3, 1, 2))
        np.testing.assert_allclose(np.asarray(eval_j), eval_t.numpy(), atol=1e-5)
    assert np.abs(np.asarray(eval_j) - np.asarray(logits_j)).max() > 1e-3  # modes differ


def conv_kernels_HWIO(variables: dict) -> dict[str, np.ndarray]:
    return {
        f"{block}/{conv}": np.asarray(v["kernel"])
        for block, convs in variables["params"].items()
        if block.startswith("block")
        for conv, v in convs.items()
        if conv.startswith("conv")
    }


def test_dirac_init_on_first_c_in_filters() -> None:
    variables = init_flax((16, 32, 32))
    torch_net = tsm.SpeedrunNet(widths=(16, 32, 32))
    torch_kernels = {
        k.replace(".weight", "").replace(".", "/"): v.numpy().transpose(2, 3, 1, 0)
        for k, v in torch_net.state_dict().items()
        if ".conv" in k
    }
    flax_kernels = conv_kernels_HWIO(variables)
    assert flax_kernels.keys() == torch_kernels.keys() and len(flax_kernels) == 6
    for name, (fk, tk) in {n: (flax_kernels[n], torch_kernels[n]) for n in flax_kernels}.items():
        c_in, c_out = fk.shape[2], fk.shape[3]
        n = min(c_in, c_out)
        delta = np.zeros((3, 3, c_in, n), np.float32)
        delta[1, 1, np.arange(n), np.arange(n)] = 1.0
        for k in (fk, tk):
            np.testing.assert_array_equal(k[..., :n], delta, err_msg=name)
            if c_out > n:  # the rest keeps the uniform(+-1/sqrt(fan_in)) init
                rest, bound = k[..., n:], 1.0 / math.sqrt(9 * c_in)
                assert np.abs(rest).max() <= bound and rest.std() > 0.45 * bound


def test_init_is_torch_uniform_not_lecun_normal() -> None:
    """Head and whitening weights: uniform(+-1/sqrt(fan_in)), std = bound / sqrt(3)."""
    params = init_flax((16, 32, 256))["params"]
    head = np.asarray(params["head"]["kernel"])
    bound = 1.0 / math.sqrt(256)
    assert np.abs(head).max() <= bound
    assert abs(head.std() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    bias = np.asarray(params["whiten"]["bias"])
    assert np.all(bias == 0)  # airbench's zero start (the preset's whiten_bias_init)
    cfg = get_config("speedrun").replace(widths=(16, 32, 256), whiten_bias_init="uniform")
    net = speedrun_from_config(cfg)
    variables = net.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False)
    bias = np.asarray(variables["params"]["whiten"]["bias"])
    assert np.abs(bias).max() <= 1.0 / math.sqrt(12) and np.abs(bias).max() > 0
    tbias = tsm.speedrun_from_config(cfg).whiten.bias.detach().numpy()
    assert np.abs(tbias).max() <= 1.0 / math.sqrt(12) and np.abs(tbias).max() > 0
    assert np.all(
        tsm.speedrun_from_config(get_config("speedrun")).whiten.bias.detach().numpy() == 0
    )


def test_gelu_is_the_exact_erf_form() -> None:
    x = np.linspace(-4, 4, 161)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    tanh = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    gelu = activation(get_config("speedrun"))
    got = np.asarray(gelu(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, exact, atol=1e-6)
    assert np.abs(got - tanh).max() > 1e-4  # the tanh approximation would fail above
    acts = [m for m in tsm.SpeedrunNet(widths=(8, 8, 8)).modules() if isinstance(m, torch.nn.GELU)]
    assert acts and all(m.approximate == "none" for m in acts)


def test_silu_in_the_blocks_gelu_in_the_stem() -> None:
    """`--activation silu` (the record's) changes the blocks' activations, not the stem's."""
    cfg = get_config("speedrun").replace(activation="silu")
    x = np.linspace(-4, 4, 161)
    got = np.asarray(activation(cfg)(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, x / (1 + np.exp(-x)), rtol=1e-6, atol=1e-7)
    net = tsm.SpeedrunNet(widths=(8, 8, 8), cfg=cfg)
    assert isinstance(net.act, torch.nn.GELU)
    kinds = {type(m).__name__ for name, m in net.named_modules() if name.startswith("block")}
    assert "SiLU" in kinds and "GELU" not in kinds


def test_bn_statistics_stay_float32_under_bfloat16() -> None:
    net = SpeedrunNet(widths=(8, 8, 8), dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    variables = net.init(jax.random.PRNGKey(0), x, train=False)
    logits, updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves(updates["batch_stats"]):
        assert leaf.dtype == jnp.float32


def test_whitening_shape_errors() -> None:
    with pytest.raises(ValueError, match="whitening kernel shape"):
        with_whitening(init_flax((8, 8, 8)), np.zeros((2, 2, 3, 12), np.float32))
    with pytest.raises(ValueError, match="whitening kernel shape"):
        tsm.SpeedrunNet(widths=(8, 8, 8)).set_whitening(np.zeros((12, 3, 2, 2), np.float32))


def test_tta_views_and_weights() -> None:
    """Against a per-view numpy reference with a linear 'net' (so every pixel counts)."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 6, 5, 2)).astype(np.float32)
    m = rng.normal(size=(6 * 5 * 2, 4)).astype(np.float32)

    def lin(v: np.ndarray) -> np.ndarray:
        return np.asarray(v, np.float64).reshape(len(v), -1) @ m

    def mirror(v: np.ndarray) -> np.ndarray:
        return 0.5 * (lin(v) + lin(v[:, :, ::-1]))

    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    want = 0.5 * mirror(x) + 0.25 * mirror(p[:, :6, :5]) + 0.25 * mirror(p[:, 2:8, 2:7])
    cfg = get_config("speedrun")
    views, got = augment.tta_logits(
        lambda v: v.reshape(v.shape[0], -1) @ jnp.asarray(m), jnp.asarray(x), cfg
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    assert views.shape == (6, 3, 4)
    np.testing.assert_allclose(np.asarray(views[1]), lin(x[:, :, ::-1]), atol=1e-4)
    flip_cfg = cfg.replace(tta_shift=False)
    _, flip_only = augment.tta_logits(
        lambda v: v.reshape(v.shape[0], -1) @ jnp.asarray(m), x, flip_cfg
    )
    np.testing.assert_allclose(np.asarray(flip_only), mirror(x), atol=1e-4)
    _, plain = augment.tta_logits(
        lambda v: v.reshape(v.shape[0], -1) @ jnp.asarray(m), x, cfg.replace(tta=False)
    )
    np.testing.assert_allclose(np.asarray(plain), lin(x), atol=1e-4)
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2)
    m_t = torch.from_numpy(m)
    views_t, got_t = taugment.tta_logits(
        lambda v: v.permute(0, 2, 3, 1).reshape(v.shape[0], -1) @ m_t, x_t, cfg
    )
    np.testing.assert_allclose(got_t.numpy(), want, atol=1e-4)
    np.testing.assert_allclose(views_t.numpy(), np.asarray(views), atol=1e-4)


def test_tta_parity_on_the_net() -> None:
    variables = init_flax((16, 32, 32), seed=2)
    torch_net = tsm.SpeedrunNet(widths=(16, 32, 32)).eval()
    torch_net.load_state_dict(flax_to_torch(variables), strict=True)
    x = np.random.default_rng(6).normal(size=(4, 32, 32, 3)).astype(np.float32)
    net = SpeedrunNet(widths=(16, 32, 32))
    with jax.default_matmul_precision("highest"):
        cfg = get_config("speedrun")
        views, got = augment.tta_logits(
            lambda v: net.apply(variables, v, train=False), jnp.asarray(x), cfg
        )
    with torch.no_grad():
        views_t, want = taugment.tta_logits(torch_net, torch.from_numpy(x).permute(0, 3, 1, 2), cfg)
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(views), views_t.numpy(), atol=1e-5)


# --- the preset ---------------------------------------------------------------------------


def test_speedrun_preset_matches_airbench_units() -> None:
    cfg = get_config("speedrun")
    lr, wd = optimizer_scales(cfg)
    kilostep = 1024 * (1 + 1 / (1 - 0.85))
    assert lr == pytest.approx(11.5 / kilostep, rel=1e-12)
    assert wd == pytest.approx(0.0153 * 1024 / 11.5, rel=1e-12)  # airbench's wd / lr
    assert lr * wd == pytest.approx(0.0153 * 1024 / kilostep, rel=1e-12)  # per-step shrink
    assert cfg.bn_bias_lr_mult * cfg.bn_bias_wd_mult == 1.0 and cfg.bn_bias_lr_mult == 64
    steps, values = lr_knots(cfg, 50_000 // cfg.batch_size)
    assert steps == [0, 110, 480]
    assert values == pytest.approx([0.2 * lr, lr, 0.07 * lr])
    assert cfg.ema_momentum == pytest.approx(0.95**5) and cfg.lookahead and cfg.tta_shift
    assert (cfg.flip, cfg.crop_pad, cfg.cutout) == ("alternating", 2, 0)
    assert (cfg.bn_momentum, cfg.bn_eps, cfg.bn_scale_trainable) == (0.4, 1e-12, False)
    net = speedrun_from_config(cfg)
    assert net.widths == WIDTHS and net.output_scale == pytest.approx(1 / 9)
    assert tsm.speedrun_from_config(cfg).output_scale == pytest.approx(1 / 9)


def test_speedrun_widths_validation() -> None:
    cfg = get_config("speedrun")
    assert cfg.replace(widths=(16, 32, 32)).widths == (16, 32, 32)
    with pytest.raises(ValueError, match="three numbers"):
        cfg.replace(widths=(64, 128, 256, 512))
    with pytest.raises(ValueError, match="whiten-bias-epochs"):
        cfg.replace(whiten_bias_epochs=-1)


# --- phase 2: optimizer, lookahead, trainers ----------------------------------------------


def test_ema_decays_ramp() -> None:
    cfg = get_config("speedrun")
    d = schedule.ema_decays(cfg, 480)
    assert d.dtype == np.float32 and d.shape == (481,)
    assert d[480] == np.float32(0.95**5) and d[0] == 0.0
    np.testing.assert_allclose(d[240], 0.95**5 * 0.125, rtol=1e-6)
    flat = schedule.ema_decays(cfg.replace(lookahead=False), 10)
    assert np.all(flat == np.float32(0.95**5))


def test_optimizer_freezes_whitening_without_recompiling() -> None:
    """Kernel never moves (update masked, not the gradient); the bias moves for exactly
    whiten_bias_epochs * steps_per_epoch updates, under one compiled update function."""
    cfg = get_config("speedrun").replace(widths=(8, 8, 8), whiten_bias_epochs=1)
    spe = 3
    params = init_flax((8, 8, 8))["params"]
    labels = optim.param_labels(params)
    assert labels["whiten"] == {"kernel": "frozen", "bias": "whiten_bias"}
    assert labels["block1"]["bn2"]["bias"] == "bn_bias" and labels["head"]["kernel"] == "default"
    tx = optim.make_optimizer(cfg, spe)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    update = jax.jit(
        lambda p, s: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(grads, s, p))
    )
    state = tx.init(params)
    biases = [np.asarray(params["whiten"]["bias"])]
    p = params
    for _ in range(2 * spe):
        p, state = update(p, state)
        biases.append(np.asarray(p["whiten"]["bias"]))
    np.testing.assert_array_equal(p["whiten"]["kernel"], params["whiten"]["kernel"])
    moved = [not np.array_equal(a, b) for a, b in zip(biases, biases[1:], strict=False)]
    assert moved == [True] * spe + [False] * spe
    assert update._cache_size() == 1  # the switch is data, not a retrace


def test_lookahead_update_averages_and_resets_everything() -> None:
    cfg = get_config("speedrun")
    total = 20
    rng = np.random.default_rng(7)
    tree = {"params": {"w": np.float32(1.0)}, "batch_stats": {"mean": np.float32(0.0)}}
    ema = jax.tree_util.tree_map(lambda _: jnp.float32(rng.normal()), tree)
    live = jax.tree_util.tree_map(lambda _: jnp.float32(rng.normal()), tree)
    same_ema, same_live = optim.lookahead_update(ema, live, jnp.int32(7), cfg, total)
    assert same_ema == ema and same_live == live  # off an EMA step: untouched
    new_ema, new_live = optim.lookahead_update(ema, live, jnp.int32(10), cfg, total)
    d = np.float32(0.95**5 * (10 / 20) ** 3)
    for part in ("params", "batch_stats"):
        for k in tree[part]:
            want = d * np.float32(ema[part][k]) + (np.float32(1) - d) * np.float32(live[part][k])
            np.testing.assert_allclose(new_ema[part][k], want, rtol=1e-6)
            assert new_live[part][k] == new_ema[part][k]


@pytest.mark.slow
def test_both_trainers_whiten_freeze_and_end_on_the_ema() -> None:
    """End to end on 600 images: the frozen whitening kernel is the data's, a bias frozen
    from the start stays at its init, and the returned net is the EMA (airbench's end)."""
    from jaxbench import train as jtrain
    from torch_ref import train as ttrain

    cfg = small_config(
        "speedrun", subset=600, test_subset=200, batch_size=100, eval_batch_size=200,
        epochs=2, lr_peak_epoch=1.0, whiten_bias_epochs=0,
    )  # fmt: skip
    data = random_dataset(600, 200, seed=1)
    kernel_OIHW = whitening.whitening_kernel_OIHW(data.train_images)
    sd = {k: v.clone() for k, v in tsm.speedrun_from_config(cfg).state_dict().items()}
    common = dict(data=data, stream="shared", progress=False, quiet=True, return_variables=True)
    js = jtrain.train_and_evaluate(cfg, init_variables=torch_to_flax(sd), **common)
    ts = ttrain.train_and_evaluate(cfg, init_state_dict=sd, compile=False, **common)

    jp, tv = js["variables"]["params"], ts["variables"]
    # Frozen, but the lookahead EMA m * k + (1 - m) * k may round it by an ulp (as airbench's).
    want = whitening.kernel_OIHW_to_HWIO(kernel_OIHW)
    np.testing.assert_allclose(jp["whiten"]["kernel"], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tv["whiten.weight"].numpy(), kernel_OIHW, rtol=1e-6, atol=1e-7)
    init_bias = sd["whiten.bias"].numpy()
    np.testing.assert_allclose(jp["whiten"]["bias"], init_bias, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tv["whiten.bias"].numpy(), init_bias, rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(jp["head"]["kernel"]) - sd["head.weight"].numpy().T).max() > 1e-3
    for a, b in zip(
        jax.tree_util.tree_leaves(js["variables"]),
        jax.tree_util.tree_leaves(js["ema_variables"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    for k, v in ts["variables"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, ts["ema_variables"][k], rtol=0, atol=0)
    for s in (js, ts):
        assert s["final"]["val_acc"] == s["final"]["ema_val_acc"]
        assert np.isfinite(s["step_losses"]).all()


def test_device_patch_moments_are_exact() -> None:
    """The trainer's on-device moments equal numpy's integer ones, saturated pixels included,
    so the whitening kernel is the same bit for bit."""
    from jaxbench.layers import patch_moment_groups
    from jaxbench.whitening import moments_from_groups

    x = random_images(70, seed=3)
    x[:33] = 255  # the largest sums: a group of 32 saturated images must not overflow int32
    got = moments_from_groups(np.asarray(jax.jit(patch_moment_groups)(x)))
    want = whitening.patch_moments(x)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2] == 70 * 31 * 31


def test_jitted_lookahead_resets_bit_for_bit_without_control_flow() -> None:
    """Compiled, the reset net equals the EMA exactly (no 1-ulp FMA split between fusions),
    untouched leaves stay bit-identical off EMA steps, and no conditional is emitted."""
    cfg = get_config("speedrun")
    rng = np.random.default_rng(11)
    shapes = {"k": (2, 2, 3, 24), "w": (3, 3, 24, 64), "b": (64,), "s": ()}
    ema = {n: jnp.asarray(rng.normal(size=s).astype(np.float32)) for n, s in shapes.items()}
    live = {n: jnp.asarray(rng.normal(size=s).astype(np.float32)) for n, s in shapes.items()}
    live["k"] = ema["k"] + 0.0  # a frozen leaf: equal in both trees
    f = jax.jit(lambda e, w, t: optim.lookahead_update(e, w, t, cfg, 400))
    assert "conditional" not in f.lower(ema, live, jnp.int32(5)).compile().as_text()
    for t in (5, 50, 250, 395):
        new_ema, new_live = f(ema, live, jnp.int32(t))
        for n in shapes:
            assert np.array_equal(np.asarray(new_ema[n]), np.asarray(new_live[n])), (t, n)
    off_ema, off_live = f(ema, live, jnp.int32(7))
    for n in shapes:
        assert np.array_equal(off_ema[n], ema[n]) and np.array_equal(off_live[n], live[n])


def test_trainer_whitening_uses_the_first_5000_images_on_the_device() -> None:
    """More training images than the whitening needs: the trainer's compiled moments take
    the first `WHITEN_IMAGES` and give numpy's kernel bit for bit."""
    from jaxbench import train

    data = random_dataset(whitening.WHITEN_IMAGES + 100, 16, seed=5)
    cfg = small_config(
        "speedrun", widths=(8, 8, 8), batch_size=1000, whiten_bias_epochs=0, eval_batch_size=16
    )
    r = train.setup(cfg, data)
    st = train.set_whitening(r.state, r.programs.moments, r.images, cfg)
    want = whitening.whitening_kernel_HWIO(data.train_images)
    assert np.array_equal(np.asarray(st.params["whiten"]["kernel"]), want)
    assert np.array_equal(np.asarray(st.ema["params"]["whiten"]["kernel"]), want)
