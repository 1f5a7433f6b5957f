"""ResNet-9: names, shapes, parameter count, PyTorch-style init and BN conventions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbench.configs import Config
from jaxbench.models import ResNet9, init_variables, model_from_config, param_count

BLOCKS = ("prep", "layer1", "res1a", "res1b", "layer2", "layer3", "res3a", "res3b")
NARROW = (16, 32, 64, 128)


def _train_apply(model: ResNet9, v: dict, x: jax.Array) -> tuple[jax.Array, dict]:
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)


def test_default_widths_have_the_myrtle_parameter_count() -> None:
    model = model_from_config(Config())
    x = jnp.zeros((1, 32, 32, 3))
    shapes = jax.eval_shape(lambda k: model.init(k, x), jax.random.PRNGKey(0))
    assert param_count(shapes["params"]) == 6_573_120


def test_names_and_layouts_follow_the_design_contract() -> None:
    model = ResNet9(widths=NARROW)
    v = init_variables(model, jax.random.PRNGKey(0))
    assert set(v["params"]) == {*BLOCKS, "head"}
    assert set(v["batch_stats"]) == set(BLOCKS)
    assert v["params"]["prep"]["conv"]["kernel"].shape == (3, 3, 3, 16)  # HWIO
    assert v["params"]["layer1"]["conv"]["kernel"].shape == (3, 3, 16, 32)
    assert v["params"]["res3b"]["conv"]["kernel"].shape == (3, 3, 128, 128)
    assert v["params"]["head"] == {"kernel": v["params"]["head"]["kernel"]}  # no bias
    assert v["params"]["head"]["kernel"].shape == (128, 10)  # (in, out)
    for b in BLOCKS:
        assert set(v["params"][b]) == {"conv", "bn"}
        assert set(v["params"][b]["conv"]) == {"kernel"}  # convs without bias
        assert set(v["batch_stats"][b]["bn"]) == {"mean", "var"}


def test_output_shape_and_pooling_strides() -> None:
    model = ResNet9(widths=(4, 8, 8, 8), num_classes=100)
    v = init_variables(model, jax.random.PRNGKey(0))
    x = jnp.zeros((2, 32, 32, 3))
    logits, inter = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True))(v, x)
    assert logits.shape == (2, 100) and logits.dtype == jnp.float32
    spatial = {b: inter["intermediates"][b]["__call__"][0].shape[1] for b in BLOCKS}
    # max pool 2x2 with stride 2 (Flax's default stride of 1 would keep 32)
    assert spatial == dict(
        prep=32, layer1=16, res1a=16, res1b=16, layer2=8, layer3=4, res3a=4, res3b=4
    )


def test_init_is_pytorch_uniform_within_one_over_sqrt_fan_in() -> None:
    v = init_variables(ResNet9(widths=NARROW), jax.random.PRNGKey(1))
    kernels = {b: v["params"][b]["conv"]["kernel"] for b in BLOCKS}
    kernels["head"] = v["params"]["head"]["kernel"]
    for name, w in kernels.items():
        w = np.asarray(w)
        bound = 1.0 / math.sqrt(math.prod(w.shape[:-1]))
        assert np.abs(w).max() <= bound, f"{name}: weight outside +-1/sqrt(fan_in)"
        if w.size >= 4000:  # uniform(-b, b) has std b / sqrt(3); lecun_normal would be b
            assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
            assert np.abs(w).max() > 0.98 * bound, f"{name}: not spread to the bound"
    for b in BLOCKS:
        np.testing.assert_array_equal(v["params"][b]["bn"]["scale"], 1.0)
        np.testing.assert_array_equal(v["params"][b]["bn"]["bias"], 0.0)
        np.testing.assert_array_equal(v["batch_stats"][b]["bn"]["mean"], 0.0)
        np.testing.assert_array_equal(v["batch_stats"][b]["bn"]["var"], 1.0)


def test_kernel_init_is_overridable() -> None:
    model = ResNet9(widths=(4, 8, 8, 8), kernel_init=jax.nn.initializers.zeros)
    v = init_variables(model, jax.random.PRNGKey(0))
    assert float(jnp.abs(v["params"]["layer2"]["conv"]["kernel"]).sum()) == 0.0


def test_bn_running_stats_use_pytorch_momentum_and_unbiased_variance() -> None:
    model = ResNet9(widths=(4, 8, 8, 8), bn_momentum=0.1)
    v = init_variables(model, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (8, 32, 32, 3))
    _, mutated = _train_apply(model, v, x)
    conv = jax.lax.conv_general_dilated(
        x,
        v["params"]["prep"]["conv"]["kernel"],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    stats = mutated["batch_stats"]["prep"]["bn"]
    np.testing.assert_allclose(stats["mean"], 0.1 * conv.mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    n = 8 * 32 * 32  # values per channel: PyTorch stores the unbiased variance
    np.testing.assert_allclose(
        stats["var"], 0.9 + 0.1 * conv.var((0, 1, 2)) * n / (n - 1), rtol=1e-4
    )


def test_bn_matches_torch_batchnorm2d_in_both_modes() -> None:
    """Outputs and stored statistics of PyTorch's BatchNorm2d, train and eval, few values."""
    torch = pytest.importorskip("torch")
    from jaxbench.models import BatchNorm

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (4, 3, 3, 5)).astype(np.float32)  # 36 values per channel
    tbn = torch.nn.BatchNorm2d(5, momentum=0.4, eps=1e-5)
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 5).astype(np.float32)))
        tbn.bias.copy_(torch.from_numpy(rng.normal(0, 1, 5).astype(np.float32)))
    variables = {
        "params": {"scale": tbn.weight.detach().numpy(), "bias": tbn.bias.detach().numpy()},
        "batch_stats": {"mean": np.zeros(5, np.float32), "var": np.ones(5, np.float32)},
    }
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    for _ in range(2):
        tbn.train()
        with torch.no_grad():
            want = tbn(xt).permute(0, 2, 3, 1).numpy()
        got, mutated = BatchNorm(train=True, momentum=0.4).apply(
            variables, x, mutable=["batch_stats"]
        )
        variables = {**variables, "batch_stats": mutated["batch_stats"]}
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
        stats = variables["batch_stats"]
        np.testing.assert_allclose(stats["mean"], tbn.running_mean.numpy(), rtol=2e-6)
        np.testing.assert_allclose(stats["var"], tbn.running_var.numpy(), rtol=2e-6)
    tbn.eval()
    with torch.no_grad():
        want = tbn(xt).permute(0, 2, 3, 1).numpy()
    got = BatchNorm(train=False).apply(variables, x)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)


def test_bfloat16_compute_keeps_float32_params_and_stats() -> None:
    cfg = Config(widths=(4, 8, 8, 8), precision="bfloat16")
    model = model_from_config(cfg)
    assert model.dtype == jnp.bfloat16
    v = init_variables(model, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3))
    logits, mutated = _train_apply(model, v, x)
    assert logits.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves((v["params"], mutated["batch_stats"])):
        assert leaf.dtype == jnp.float32
    assert model_from_config(Config(precision="float32")).dtype == jnp.float32


def test_fast_variance_is_one_pass_and_off_by_default() -> None:
    """The trainers keep PyTorch's two-pass variance; the one-pass switch (timed by
    `jaxbench.microbench`) agrees on centred data and loses digits on offset data."""
    from jaxbench.models import BatchNorm

    x = np.random.default_rng(0).normal(size=(8, 4, 4, 3)).astype(np.float32)
    assert not BatchNorm().fast_variance

    def run(v: np.ndarray, fast: bool) -> np.ndarray:
        bn = BatchNorm(train=True, fast_variance=fast)
        variables = bn.init(jax.random.PRNGKey(0), v)
        _, upd = bn.apply(variables, v, mutable=["batch_stats"])
        return np.asarray(upd["batch_stats"]["var"])

    np.testing.assert_allclose(run(x, True), run(x, False), rtol=1e-5)
    far = x + 3000.0  # E[x^2] - E[x]^2 cancels catastrophically here
    assert np.max(np.abs(run(far, True) - run(far, False))) > 1e-3
