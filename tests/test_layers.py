"""Page's tricks as layers: each framework's `layers.py` against a numpy reference and
against the other framework, the config fields that choose them, and the presets."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import random_images

from jaxbench import configs, layers, models, schedule, whitening
from jaxbench.configs import Config, get_config
from torch_ref import layers as tlayers
from torch_ref import model as tmodel

ROOT = Path(__file__).resolve().parent.parent


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def ghost_reference(
    x: np.ndarray, ghost: int, eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 ghost BN of NHWC `x` (scale 1, bias 0): image i in group i mod (N / ghost).
    Returns (output, mean of the groups' means, mean of the groups' unbiased variances)."""
    n = len(x)
    splits = n // ghost
    out = np.empty_like(x, dtype=np.float64)
    means, variances = [], []
    for k in range(splits):
        idx = np.arange(k, n, splits)
        g = x[idx].astype(np.float64)
        mean = g.mean(axis=(0, 1, 2))
        var = g.var(axis=(0, 1, 2))
        count = g.shape[0] * g.shape[1] * g.shape[2]
        out[idx] = (g - mean) / np.sqrt(var + eps)
        means.append(mean)
        variances.append(var * count / (count - 1))
    return out, np.mean(means, axis=0), np.mean(variances, axis=0)


def test_ghost_bn_normalises_page_groups_in_both_frameworks() -> None:
    """Groups are i mod splits (Page's `view(-1, C * splits, H, W)`), each variance unbiased
    with its own count, the running statistics move towards the groups' mean statistics."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 5, 5, 3)) * 2 + np.arange(16)[:, None, None, None] / 4).astype(
        np.float32
    )  # a trend along the batch, so contiguous chunks would give other statistics
    want, mean, var = ghost_reference(x, 4, 1e-5)
    bn = layers.BatchNorm(train=True, momentum=0.1, ghost=4)
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    y, mutated = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y), want, atol=2e-5)
    stats = mutated["batch_stats"]
    np.testing.assert_allclose(np.asarray(stats["mean"]), 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["var"]), 0.9 + 0.1 * var, atol=1e-6)

    tbn = tlayers.BatchNorm(3, eps=1e-5, momentum=0.1, ghost=4).train()
    ty = tbn(nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ty, want, atol=2e-5)
    np.testing.assert_allclose(tbn.running_mean.numpy(), 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(tbn.running_var.numpy(), 0.9 + 0.1 * var, atol=1e-6)
    assert tuple(tbn.running_mean.shape) == (3,)  # one (C,) set: converts like plain BN

    # contiguous chunks are a different normalisation: the grouping matters
    chunks = np.concatenate(
        [(g - g.mean((0, 1, 2))) / np.sqrt(g.var((0, 1, 2)) + 1e-5) for g in np.split(x, 4)]
    )
    assert np.abs(chunks - want).max() > 1e-2


def test_ghost_bn_off_or_one_group_is_plain_bn() -> None:
    x = np.random.default_rng(1).standard_normal((8, 4, 4, 2)).astype(np.float32)
    plain = layers.BatchNorm(train=True)
    variables = plain.init(jax.random.PRNGKey(0), jnp.asarray(x))
    want, _ = plain.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    for ghost in (8, 16):  # a batch of at most `ghost` images is one group
        got, _ = layers.BatchNorm(train=True, ghost=ghost).apply(
            variables, jnp.asarray(x), mutable=["batch_stats"]
        )
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        t = tlayers.BatchNorm(2, eps=1e-5, momentum=0.1, ghost=ghost).train()(nchw(x))
        np.testing.assert_allclose(t.detach().numpy().transpose(0, 2, 3, 1), want, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple"):
        layers.BatchNorm(train=True, ghost=3).apply(
            variables, jnp.asarray(x), mutable=["batch_stats"]
        )


@pytest.mark.parametrize("trainable", [True, False])
def test_bn_scale_value_trainable_or_frozen(trainable: bool) -> None:
    """`bn_scale` starts a trainable scale, or is the fixed one; a frozen scale is no
    parameter in either framework (the trees convert one to one)."""
    cfg = Config(bn_scale=0.25, bn_scale_trainable=trainable)
    x = np.random.default_rng(2).standard_normal((6, 3, 3, 4)).astype(np.float32)
    bn = layers.batch_norm(cfg, True, jnp.float32, "bn")
    variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x))
    assert ("scale" in variables["params"]) == trainable
    y, _ = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
    normed = (x - x.mean((0, 1, 2))) / np.sqrt(x.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(np.asarray(y), 0.25 * normed, atol=1e-5)
    tbn = tlayers.batch_norm(cfg, 4).train()
    assert (tbn.weight is not None) == trainable
    assert ("weight" in tbn.state_dict()) == trainable
    ty = tbn(nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ty, 0.25 * normed, atol=1e-5)


def test_celu_alpha_reaches_both_frameworks() -> None:
    """jax.nn.celu defaults to alpha 1.0: the config's alpha must be passed."""
    x = np.linspace(-3, 3, 121, dtype=np.float32)
    cfg = Config(activation="celu", celu_alpha=0.3)
    got = np.asarray(layers.activation(cfg)(jnp.asarray(x)))
    want = np.maximum(x, 0) + np.minimum(0, 0.3 * (np.exp(x / 0.3) - 1))
    np.testing.assert_allclose(got, want, atol=1e-6)
    t = tlayers.activation(cfg)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(t, want, atol=1e-6)
    assert np.abs(np.asarray(jax.nn.celu(jnp.asarray(x))) - want).max() > 0.1


@pytest.mark.parametrize("pool_before_act", [False, True])
def test_conv_block_order_matches_across_frameworks(pool_before_act: bool) -> None:
    """conv, BN, act, pool (Myrtle) or conv, pool, BN, act (Page's move): the same in both."""
    cfg = Config(pool_before_act=pool_before_act, activation="celu")
    tnet = tmodel.ConvBN(3, 5, pool=True, cfg=cfg).train()
    fnet = models.ConvBN(5, pool=True, cfg=cfg)
    x = np.random.default_rng(3).standard_normal((4, 8, 8, 3)).astype(np.float32)
    variables = {
        "params": {
            "conv": {"kernel": tnet.conv.weight.detach().numpy().transpose(2, 3, 1, 0)},
            "bn": {"scale": np.ones(5, np.float32), "bias": np.zeros(5, np.float32)},
        },
        "batch_stats": {"bn": {"mean": np.zeros(5, np.float32), "var": np.ones(5, np.float32)}},
    }
    y, _ = fnet.apply(variables, jnp.asarray(x), True, mutable=["batch_stats"])
    ty = tnet(nchw(x)).detach().numpy().transpose(0, 2, 3, 1)
    assert y.shape == (4, 4, 4, 5)
    np.testing.assert_allclose(np.asarray(y), ty, atol=1e-5)
    other = models.ConvBN(5, pool=True, cfg=cfg.replace(pool_before_act=not pool_before_act))
    y2, _ = other.apply(variables, jnp.asarray(x), True, mutable=["batch_stats"])
    assert np.abs(np.asarray(y2) - np.asarray(y)).max() > 1e-3  # BN does not commute with pool


def _pool_inputs(shape: tuple[int, ...], ties: bool) -> np.ndarray:
    rng = np.random.default_rng(sum(shape) + ties)
    if ties:  # small integers, then ReLU: many equal maxima, and all-zero windows
        return np.maximum(rng.integers(-2, 3, shape), 0).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "k,shape", [(2, (3, 8, 8, 5)), (2, (2, 7, 9, 3)), (3, (2, 7, 7, 4)), (3, (2, 3, 3, 2))]
)
def test_max_pool_matches_flax_and_torch_values_and_gradients(
    k: int, shape: tuple[int, ...], ties: bool
) -> None:
    """`layers.max_pool` is Flax's reduce_window pool (select_and_scatter gradient) and
    PyTorch's MaxPool2d, bit for bit: odd sizes floor, a tie's gradient goes to the first
    maximum of the window in row-major order."""
    import flax.linen as nn

    x = _pool_inputs(shape, ties)
    g = (
        np.random.default_rng(1)
        .standard_normal((shape[0], shape[1] // k, shape[2] // k, shape[3]))
        .astype(np.float32)
    )
    y, vjp = jax.vjp(lambda v: layers.max_pool(v, k), jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    y_ref, vjp_ref = jax.vjp(lambda v: nn.max_pool(v, (k, k), strides=(k, k)), jnp.asarray(x))
    (dx_ref,) = vjp_ref(jnp.asarray(g))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_ref))
    tx = nchw(x).requires_grad_(True)
    ty = torch.nn.MaxPool2d(k)(tx)
    ty.backward(nchw(g))
    np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(dx), tx.grad.numpy().transpose(0, 2, 3, 1))
    if ties:  # the test has teeth: splitting a tie's gradient (jnp.max's rule) differs
        split = jax.vjp(lambda v: _windows_max(v, k), jnp.asarray(x))[1](jnp.asarray(g))[0]
        assert np.abs(np.asarray(split) - np.asarray(dx)).max() > 0.1


def _windows_max(x: jax.Array, k: int) -> jax.Array:
    n, h, w, c = x.shape
    x = x[:, : h // k * k, : w // k * k]
    return x.reshape(n, h // k, k, w // k, k, c).max(axis=(2, 4))


def test_max_pool_gradient_survives_compilation_inside_the_net() -> None:
    """The jitted gradient of the `tiny` net equals the one through Flax's pool. A backward
    pass that finds the maximum again by `x == max` failed this: XLA recomputed `x` there
    with other rounding, and whole windows lost their gradient (30-90% off)."""
    import flax.linen as nn
    import optax

    cfg = get_config("tiny")
    variables = models.init_variables(models.model_from_config(cfg), jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((32, 32, 32, 3)), jnp.float32)
    labels = jax.nn.one_hot(jnp.arange(32) % 10, 10)

    def grads() -> dict:
        model = models.model_from_config(cfg)

        def loss(params: dict) -> jax.Array:
            out, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy(out, labels).sum()

        return jax.jit(jax.grad(loss))(variables["params"])

    ours = grads()
    with mock.patch.object(layers, "max_pool", lambda v, k: nn.max_pool(v, (k, k), (k, k))):
        flax_pool = grads()
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(flax_pool), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_page_whitening_kernel_whitens_3x3_patches() -> None:
    """27 filters W = V / sqrt(lambda + eps), no negated copy: W C W^T = diag(l / (l + eps))."""
    images = random_images(40, seed=4)
    images[:, :, 1:] = images[:, :, :-1] // 2 + images[:, :, 1:] // 2  # correlate neighbours
    cov = whitening.covariance_from_moments(*whitening.patch_moments(images, 3), patch=3)
    kernel = whitening.whitening_for_config(cov, "patch3", 1e-2)
    assert kernel.shape == (27, 3, 3, 3) and kernel.dtype == np.float32
    w = kernel.reshape(27, 27).astype(np.float64)
    lam = np.linalg.eigvalsh(cov)[::-1]
    np.testing.assert_allclose(w @ cov @ w.T, np.diag(lam / (lam + 1e-2)), atol=1e-4)
    airbench = whitening.whitening_for_config(
        whitening.covariance_from_moments(*whitening.patch_moments(images, 2)), "patch2", 5e-4
    )
    assert airbench.shape == (24, 3, 2, 2)


def test_device_moments_are_exact_for_3x3_patches() -> None:
    """Page's stem sums 3x3 patch moments on the device: exact, also for saturated images."""
    x = random_images(40, seed=5)
    x[:33] = 255
    got = whitening.moments_from_groups(
        np.asarray(jax.jit(lambda a: layers.patch_moment_groups(a, 3))(x))
    )
    want = whitening.patch_moments(x, 3)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2] == 40 * 30 * 30


def test_resnet9_whitening_stem_has_the_same_tree_in_both_frameworks() -> None:
    from parity.convert import torch_to_flax

    cfg = get_config("resnet9").replace(widths=(8, 16, 16, 32))
    tnet = tmodel.model_from_config(cfg)
    assert not tnet.prep.whiten.weight.requires_grad
    fnet = models.model_from_config(cfg)
    variables = models.init_variables(fnet, jax.random.PRNGKey(0))
    shapes = jax.tree_util.tree_map(np.shape, jax.device_get(variables))
    assert shapes == jax.tree_util.tree_map(np.shape, torch_to_flax(tnet.state_dict()))
    assert shapes["params"]["prep"]["whiten"]["kernel"] == (3, 3, 3, 27)
    assert shapes["params"]["prep"]["conv"]["kernel"] == (1, 1, 27, 8)
    assert "scale" not in variables["params"]["layer1"]["bn"]  # frozen at 1
    from jaxbench import optim

    labels = optim.param_labels(variables["params"])
    assert labels["prep"]["whiten"]["kernel"] == "frozen"
    assert labels["prep"]["bn"]["bias"] == "bn_bias"


def test_presets_say_what_they_are() -> None:
    page = get_config("resnet9")
    assert (page.epochs, page.batch_size, page.lr, page.lr_flat_epochs) == (10, 512, 1.0, 2.0)
    assert page.activation == "celu" and page.celu_alpha == 0.3 and page.ghost_bn == 32
    assert page.pool_before_act and not page.bn_scale_trainable and page.whiten == "patch3"
    assert page.cutout == 0 and page.tta and page.ema_every == 5
    assert math.isclose(page.ema_momentum, 0.99**5) and page.output_scale == 1 / 16
    base = get_config("myrtle24")
    assert (base.epochs, base.lr, base.lr_peak_epoch, base.cutout) == (24, 0.4, 5.0, 8)
    assert base.label_smoothing == 0 and base.ema_every == 0 and not base.tta
    assert base.activation == "relu" and base.whiten == "none" and base.ghost_bn == 0
    assert get_config("speedrun").whiten_bias_init == "zero"
    for name in configs.PRESETS:
        doc = configs.PRESETS[name].__doc__ or ""
        assert "Command:" in doc and "Measured" in doc, name


def test_page_schedule_holds_the_lr_for_the_last_two_epochs() -> None:
    cfg = get_config("resnet9")
    xs, ys = schedule.lr_knots(cfg, 97)
    assert xs == [0, 194, 776, 970]
    np.testing.assert_allclose(ys, np.array([0.0, 1.0, 0.1, 0.1]) / 512)
    lrs = schedule.lr_at(np.arange(970), cfg, 97)
    assert np.all(lrs[776:] == lrs[776])


def test_every_trick_can_be_removed_from_the_command_line() -> None:
    from jaxbench.train import build_parser

    parser = build_parser()
    base = get_config("resnet9")
    for trick, changes in configs.TRICKS.items():
        cfg = configs.config_from_args(parser.parse_args(["--config", "resnet9", f"--no-{trick}"]))
        assert cfg != base, trick
        for field, value in changes.items():
            assert getattr(cfg, field) == value, (trick, field)
    both = configs.config_from_args(
        parser.parse_args(["--config", "resnet9", "--no-whiten", "--no-celu", "--ghost-bn", "64"])
    )
    assert (both.whiten, both.activation, both.ghost_bn) == ("none", "relu", 64)
    assert configs.without_trick(base, "tta").name == "resnet9-no-tta"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ghost_bn": 48}, "must be 0 \\(off\\) or divide --batch-size 512"),
        ({"activation": "swish"}, "--activation must be one of"),
        ({"celu_alpha": 0.0}, "--celu-alpha must be"),
        ({"whiten": "patch2"}, "--whiten for resnet9"),
        ({"lr_flat_epochs": -1.0}, "--lr-flat-epochs must be"),
        ({"whiten_eps": float("nan")}, "--whiten-eps must be"),
        ({"bn_scale": -1.0}, "--bn-scale must be"),
    ],
)
def test_new_fields_are_validated(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_config("resnet9").replace(**changes)


def test_models_do_not_import_each_other() -> None:
    """One place per framework builds the layers; the model files import it, not each other."""
    for a, b in (
        ("jaxbench", ("models", "speedrun_model")),
        ("torch_ref", ("model", "speedrun_model")),
    ):
        imports = {}
        for name in b:
            tree = ast.parse((ROOT / a / f"{name}.py").read_text())
            found = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module:
                    found.add(node.module)
                    found.update(f"{node.module}.{alias.name}" for alias in node.names)
            imports[name] = found
        first, second = b
        assert not (f"{a}.{first}" in imports[second] and f"{a}.{second}" in imports[first])
        assert f"{a}.{first}" not in imports[second]
        assert f"{a}.layers" in imports[first] or f"{a}.layers" in str(imports[first])
