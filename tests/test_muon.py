"""Muon: the float64 reference's properties, and both frameworks within float32 noise of it.

The bound for the frameworks is measured, not chosen: the same reference run in
float32 gives the float32 noise of this very computation (filters, gradients,
recipe), and an implementation passes within `NOISE_HEADROOM` times that. Each plant
(a changed Newton-Schulz coefficient, a wrong update scale, no nesterov term) run
through the same implementation lands far outside.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util
from helpers import random_dataset

from jaxbench import configs, optim
from jaxbench import muon as ref
from jaxbench import train as jtrain
from jaxbench.configs import Config, get_config, optimizer_scales, without_trick
from jaxbench.muon import AIRBENCH94_MUON, RECORD, MuonSpec
from jaxbench.optim_muon import MuonState, hwio_to_matrix, is_muon_param, matrix_to_hwio
from jaxbench.optim_muon import muon as optax_muon
from jaxbench.schedule import lr_at, whiten_bias_lr_knots
from jaxbench.speedrun_model import speedrun_from_config
from torch_ref import optim as toptim
from torch_ref import speedrun_model as tsm
from torch_ref import train as ttrain
from torch_ref.muon import Muon as TorchMuon

# Another BLAS sums in another order: the frameworks' errors measured at 0.2-1.5x the
# float32 reference's own on these cases; 4 leaves room for other machines' kernels.
NOISE_HEADROOM = 4.0
# Each recipe's total updates: ceil(8 * 25) (batch 2000), ceil(7.59 * 32) (batch 1536).
TOTALS = {AIRBENCH94_MUON: 200, RECORD: 243}
RECIPES = [pytest.param(AIRBENCH94_MUON, id="airbench94_muon"), pytest.param(RECORD, id="record")]


def _problem(shape: tuple[int, ...], steps: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A filter at PyTorch's default init scale and `steps` gradients, float32-exact."""
    rng = np.random.default_rng(seed)
    fan_in = int(np.prod(shape[1:]))
    w0 = rng.uniform(-1, 1, shape) / np.sqrt(fan_in)
    grads = [0.1 * rng.standard_normal(shape) for _ in range(steps)]
    as32 = lambda x: x.astype(np.float32).astype(np.float64)  # noqa: E731
    return as32(w0), [as32(g) for g in grads]


def _lr(spec: MuonSpec, count: int, total: int) -> float:
    """Both recipes' LR: linear to zero, update `count` from 0."""
    return spec.lr * (1 - count / total)


def run_reference(
    spec: MuonSpec, total: int, w0: np.ndarray, grads: list[np.ndarray], dtype: type = np.float64
) -> list[np.ndarray]:
    """The weights after each update (first: the initial filter), by `jaxbench.muon`."""
    w, buf = w0.astype(dtype), ref.zero_buffer(w0.shape, spec)
    out = [w]
    for t, g in enumerate(grads, start=1):
        w, buf = ref.muon_update(
            w, g, buf, step=t, lr=_lr(spec, t - 1, total), total_steps=total, spec=spec, dtype=dtype
        )
        out.append(w)
    return out


def run_optax(
    spec: MuonSpec, total: int, w0: np.ndarray, grads: list[np.ndarray]
) -> list[np.ndarray]:
    """The same through `jaxbench.optim_muon.muon` on the HWIO filter, back in OIHW."""
    tx = optax_muon(spec, lambda count: spec.lr * (1 - count / total), total)
    to_hwio = lambda x: jnp.asarray(x.transpose(2, 3, 1, 0), jnp.float32)  # noqa: E731
    params = {"conv": {"kernel": to_hwio(w0)}}
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = [w0.astype(np.float32)]
    for g in grads:
        updates, state = update({"conv": {"kernel": to_hwio(g)}}, state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params["conv"]["kernel"]).transpose(3, 2, 0, 1))
    return out


def run_torch(
    spec: MuonSpec, total: int, w0: np.ndarray, grads: list[np.ndarray]
) -> list[np.ndarray]:
    """The same through `torch_ref.muon.Muon` on the OIHW filter."""
    p = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float32))
    opt = TorchMuon([p], spec, total)
    out = [w0.astype(np.float32)]
    for count, g in enumerate(grads):
        opt.param_groups[0]["lr"] = _lr(spec, count, total)
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        out.append(p.detach().numpy().copy())
    return out


def update_error(run: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Worst relative error of an update (weights after minus before) over the run."""
    return max(
        float(np.linalg.norm((a1 - a0) - (b1 - b0)) / np.linalg.norm(b1 - b0))
        for (a0, a1), (b0, b1) in zip(
            zip(run, run[1:], strict=False),
            zip(reference, reference[1:], strict=False),
            strict=True,
        )
    )


@functools.cache
def _case(
    spec: MuonSpec, shape: tuple[int, ...], steps: int
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], float]:
    """(w0, grads, float64 reference run, bound), shared by the optax and torch tests."""
    w0, grads = _problem(shape, steps, seed=sum(shape) + steps)
    reference = run_reference(spec, TOTALS[spec], w0, grads)
    noise = update_error(run_reference(spec, TOTALS[spec], w0, grads, np.float32), reference)
    assert 0 < noise < 1e-4, noise  # float32 noise, not a bug in the float32 path
    return w0, grads, reference, NOISE_HEADROOM * noise


RUNNERS = [pytest.param(run_optax, id="optax"), pytest.param(run_torch, id="torch")]
# The speedrun nets' filter shapes (OIHW), the 256x256 one for two updates only (the CPU is
# shared), and a tall one, out > in*kh*kw (Page's 1x1 conv after his whitening, 27 -> 64).
CASES = [((64, 24, 3, 3), 3), ((256, 64, 3, 3), 3), ((256, 256, 3, 3), 2), ((64, 27, 1, 1), 3)]


# --- the reference's own properties ---------------------------------------------------------------


@pytest.mark.parametrize("spec", RECIPES)
@pytest.mark.parametrize("shape", [(64, 24, 3, 3), (256, 64, 3, 3)])
def test_newton_schulz_maps_each_singular_value_through_the_polynomial(
    spec: MuonSpec, shape: tuple[int, ...]
) -> None:
    """Singular vectors stay and each singular value s of the normalised input becomes
    p(p(p(s))), p(s) = as + bs^3 + cs^5: within the band that map gives, near 1 (not UV^T)."""
    g = ref.as_matrix(np.random.default_rng(1).standard_normal(shape))
    magnitude = ref.target_magnitude(5, TOTALS[spec], spec)
    out = ref.newton_schulz(g, spec, magnitude)
    # the normalised input, exactly as the reference forms it (pre-scaling, then eps)
    x = (
        g * (magnitude / (np.linalg.norm(g) + spec.ns_target_eps))
        if spec.ns_target_magnitude
        else g
    )
    x = x / (np.linalg.norm(x) + spec.ns_eps)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(out, (u * ref.singular_value_map(s, spec)) @ vt, atol=1e-12)
    s_out = np.linalg.svd(out, compute_uv=False)
    band = ref.singular_value_map(np.linspace(s.min(), s.max(), 4001), spec)
    assert band.min() - 1e-9 <= s_out.min() and s_out.max() <= band.max() + 1e-9
    assert 0.6 < s_out.min() and s_out.max() < 1.3  # close to orthogonal, Muon's design
    assert np.abs(s_out - 1).max() > 0.05  # and not exactly: three steps only


def test_newton_schulz_is_the_same_for_the_transpose() -> None:
    """Wide or tall, the reference orthogonalises the same matrix (its transpose trick)."""
    g = np.random.default_rng(2).standard_normal((24, 64))
    for spec in (AIRBENCH94_MUON, RECORD):
        np.testing.assert_allclose(
            ref.newton_schulz(g.T, spec, 0.3), ref.newton_schulz(g, spec, 0.3).T, atol=1e-12
        )


def test_recipe_values_are_the_sources() -> None:
    """The numbers both recipes take from their source files (see the constants' comments)."""
    assert AIRBENCH94_MUON.ns_coefficients == (3.4445, -4.7750, 2.0315)
    assert RECORD.ns_coefficients == (3.4576, -4.7391, 2.0843)
    assert (AIRBENCH94_MUON.lr, AIRBENCH94_MUON.momentum) == (0.24, 0.6)
    assert (RECORD.lr, RECORD.momentum) == (0.205, 0.655)
    assert AIRBENCH94_MUON.weight_decay == 0 and RECORD.weight_decay == pytest.approx(1.6002048e-3)
    assert ref.target_magnitude(0, 100, RECORD) == pytest.approx(0.5012)
    assert ref.target_magnitude(100, 100, RECORD) == pytest.approx(0.0786)


def test_update_scale_by_shape() -> None:
    """No shape factor in either source; the library conventions differ, the width one only
    where out > in*kh*kw, which no filter of the speedrun net is."""
    nets = [(64, 24, 3, 3), (64, 64, 3, 3), (256, 64, 3, 3), (256, 256, 3, 3)]
    width = dataclasses.replace(AIRBENCH94_MUON, update_scale="width")
    rms = dataclasses.replace(AIRBENCH94_MUON, update_scale="rms")
    for shape in nets:
        assert ref.update_scale_factor(shape, AIRBENCH94_MUON) == 1.0
        assert ref.update_scale_factor(shape, RECORD) == 1.0
        assert ref.update_scale_factor(shape, width) == 1.0
    assert ref.update_scale_factor((64, 27, 1, 1), width) == pytest.approx(np.sqrt(64 / 27))
    assert ref.update_scale_factor((256, 64, 3, 3), rms) == pytest.approx(0.2 * np.sqrt(576))


@pytest.mark.parametrize("shape", [(64, 24, 3, 3), (256, 64, 3, 3)])
def test_weight_normalisation_sets_the_norm_to_sqrt_out(shape: tuple[int, ...]) -> None:
    """With a zero LR an update is the normalisation alone: ||W||_F becomes sqrt(out)."""
    w0, (g,) = _problem(shape, 1, seed=3)
    for spec in (AIRBENCH94_MUON, dataclasses.replace(RECORD, weight_decay=0.0)):
        step = 2 if spec.normalization == "adaptive" else 1  # the record's first is update 2
        w, _ = ref.muon_update(
            5 * w0, g, ref.zero_buffer(shape, spec), step=step, lr=0.0, total_steps=243, spec=spec
        )
        # the record's eps 1e-7 beside a norm of 5 ||w0|| ~ 3 leaves sqrt(out) (1 - 3e-8)
        assert np.linalg.norm(w) == pytest.approx(np.sqrt(shape[0]), rel=1e-12 + spec.norm_eps)
    w, _ = ref.muon_update(
        5 * w0, g, ref.zero_buffer(shape, RECORD), step=1, lr=0.0, total_steps=243, spec=RECORD
    )
    np.testing.assert_array_equal(w, 5 * w0)  # not a normalisation update of the record


def test_record_normalisation_interval() -> None:
    """The record's adaptive rule, by hand: interval 2 + int(15 t / T), first at update 2."""
    table = ref.normalization_steps(243, RECORD)
    steps = np.flatnonzero(table)
    assert list(steps[:9]) == [2, 4, 6, 8, 10, 12, 14, 16, 19]
    interval = lambda t: 2 + int(15 * (t / 243))  # noqa: E731
    for prev, t in zip(steps, steps[1:], strict=False):
        assert t - prev >= interval(t)  # due at t, and not before it:
        assert all(u - prev < interval(u) for u in range(prev + 1, t))
    assert steps[-1] == 230 and len(steps) == 37
    assert ref.normalization_steps(200, AIRBENCH94_MUON)[1:].all()


def test_nesterov_and_plain_momentum_by_hand() -> None:
    """Two updates: plain feeds buf = m g1 + g2 to Newton-Schulz, nesterov (1 + m) g2 + m^2 g1;
    the first update's input is g1 times a positive factor either way."""
    rng = np.random.default_rng(4)
    g1, g2 = rng.standard_normal((2, 8, 4, 3, 3))
    w0 = rng.standard_normal((8, 4, 3, 3))
    m = AIRBENCH94_MUON.momentum
    for nesterov, second in ((True, (1 + m) * g2 + m * m * g1), (False, m * g1 + g2)):
        spec = dataclasses.replace(AIRBENCH94_MUON, nesterov=nesterov, normalization="none")
        buf, n1 = ref.momentum_step(ref.zero_buffer(g1.shape, spec), g1, spec)
        np.testing.assert_allclose(n1, (1 + m) * g1 if nesterov else g1)
        buf, n2 = ref.momentum_step(buf, g2, spec)
        np.testing.assert_allclose(buf, m * g1 + g2)
        np.testing.assert_allclose(n2, second)
        # and the whole update: w - lr NS(second), after the first update
        zero = ref.zero_buffer(g1.shape, spec)
        w1, b = ref.muon_update(w0, g1, zero, step=1, lr=0.1, total_steps=10, spec=spec)
        w2, _ = ref.muon_update(w1, g2, b, step=2, lr=0.1, total_steps=10, spec=spec)
        expected = w1 - 0.1 * ref.newton_schulz(ref.as_matrix(second), spec).reshape(w0.shape)
        np.testing.assert_allclose(w2, expected, atol=1e-12)


def test_float16_buffer_rounds_like_in_place_half_ops() -> None:
    """The record's buffer: float16(float16(m * buf) + float16(g)), read back for nesterov."""
    rng = np.random.default_rng(5)
    g1, g2 = 0.1 * rng.standard_normal((2, 4, 2, 3, 3))
    buf, _ = ref.momentum_step(ref.zero_buffer(g1.shape, RECORD), g1, RECORD)
    assert buf.dtype == np.float16
    buf2, n2 = ref.momentum_step(buf, g2, RECORD)
    m = RECORD.momentum
    # m * buf in float64 (a bare `buf * m` would round m itself to float16 under NEP 50)
    scaled = (buf.astype(np.float64) * m).astype(np.float16)
    expected = (scaled + g2.astype(np.float16)).astype(np.float16)
    np.testing.assert_array_equal(buf2, expected)
    np.testing.assert_allclose(n2, g2 + m * expected.astype(np.float64))


# --- both frameworks against the reference ----------------------------------------------------


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("shape,steps", CASES)
@pytest.mark.parametrize("spec", RECIPES)
def test_framework_update_within_float32_noise(
    spec: MuonSpec, shape: tuple[int, ...], steps: int, runner
) -> None:
    """Every update of the optax / torch Muon within the measured float32 bound."""
    w0, grads, reference, bound = _case(spec, shape, steps)
    error = update_error(runner(spec, TOTALS[spec], w0, grads), reference)
    assert error <= bound, (error, bound)


def _coefficient_plant(spec: MuonSpec) -> MuonSpec:
    a, b, c = spec.ns_coefficients
    return dataclasses.replace(spec, ns_coefficients=(a * 1.01, b, c))


PLANTS = [
    pytest.param(_coefficient_plant, id="ns-coefficient-a+1%"),
    pytest.param(lambda s: dataclasses.replace(s, update_scale="rms"), id="scale"),
    pytest.param(lambda s: dataclasses.replace(s, nesterov=False), id="no-nesterov"),
]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("plant", PLANTS)
@pytest.mark.parametrize("spec", RECIPES)
def test_plants_land_far_outside_the_bound(spec: MuonSpec, plant, runner) -> None:
    """A planted implementation (the true recipe's reference, a changed spec) is caught:
    its error is more than 10x the bound the true one passes."""
    w0, grads, reference, bound = _case(spec, (64, 24, 3, 3), 3)
    error = update_error(runner(plant(spec), TOTALS[spec], w0, grads), reference)
    assert error > 10 * bound, (error, bound)


# --- the optax wiring -----------------------------------------------------------------------------


def test_hwio_matrix_is_the_oihw_matrix() -> None:
    """The HWIO kernel's matrix is PyTorch's `w.reshape(out, -1)` of the OIHW filter."""
    w = np.random.default_rng(6).standard_normal((256, 64, 3, 3)).astype(np.float32)
    hwio = jnp.asarray(w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(hwio_to_matrix(hwio)), ref.as_matrix(w))
    np.testing.assert_array_equal(
        np.asarray(matrix_to_hwio(hwio_to_matrix(hwio), hwio.shape)), hwio
    )


def test_optax_muon_in_multi_transform_beside_sgd() -> None:
    """Labelled by `is_muon_param`, Muon takes the conv kernels (not the whitening one) and
    gives the same updates as on its own; the SGD group is untouched by it."""
    rng = np.random.default_rng(7)
    f32 = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    params = {
        "whiten": {"kernel": f32(2, 2, 3, 24), "bias": f32(24)},
        "block1": {"conv1": {"kernel": f32(3, 3, 24, 64)}, "bn1": {"bias": f32(64)}},
        "head": {"kernel": f32(256, 10)},
    }
    grads = jax.tree_util.tree_map(lambda p: 0.1 * jnp.ones_like(p) + 0.01 * p, params)

    labels = traverse_util.path_aware_map(
        lambda path, v: "muon" if is_muon_param(tuple(path), v) else "sgd", params
    )
    assert labels["block1"]["conv1"]["kernel"] == "muon"
    assert labels["whiten"]["kernel"] == "sgd" and labels["head"]["kernel"] == "sgd"
    tx = optax.multi_transform(
        {"muon": optax_muon(RECORD, 0.2, 243), "sgd": optax.sgd(0.1, momentum=0.9)}, labels
    )
    alone = optax_muon(RECORD, 0.2, 243)
    conv = {"k": params["block1"]["conv1"]["kernel"]}
    state, alone_state = tx.init(params), alone.init(conv)
    for step in range(2):
        updates, state = tx.update(grads, state, params)
        expected, alone_state = alone.update(
            {"k": grads["block1"]["conv1"]["kernel"]}, alone_state, conv
        )
        np.testing.assert_array_equal(updates["block1"]["conv1"]["kernel"], expected["k"])
        sgd_trace = 1.0 if step == 0 else 1.9  # constant gradients, momentum 0.9
        np.testing.assert_allclose(
            updates["head"]["kernel"], -0.1 * sgd_trace * grads["head"]["kernel"], rtol=1e-6
        )
        params = optax.apply_updates(params, updates)
        conv = {"k": params["block1"]["conv1"]["kernel"]}


def test_muon_rejects_non_filters() -> None:
    """A 2-D leaf in the Muon group is an error in both frameworks, not a silent reshape."""
    with pytest.raises(ValueError, match="HWIO"):
        optax_muon(RECORD, 0.1, 10).init({"head": jnp.zeros((256, 10))})
    with pytest.raises(ValueError, match="OIHW"):
        TorchMuon([torch.nn.Parameter(torch.zeros(10, 256))], RECORD, 10)


# --- the speedrun_muon preset: both trainers' optimizers -----------------------------------------

PRESET_SPE = 2  # steps per epoch: the whitening bias (1 epoch here) freezes after update 2
PRESET_UPDATES = 3


def _preset() -> Config:
    """speedrun_muon on a narrow net, its whitening bias trained for one epoch."""
    return get_config("speedrun_muon").replace(widths=(8, 16, 16), whiten_bias_epochs=1)


def _torch_name(path: tuple[str, ...]) -> str:
    """A flax parameter path as the torch net's name (`kernel` is torch's `weight`)."""
    return ".".join("weight" if p == "kernel" else p for p in path)


def _to_torch_layout(x: np.ndarray) -> np.ndarray:
    """HWIO -> OIHW, (in, out) -> (out, in); biases as they are."""
    return x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T if x.ndim == 2 else x


def _from_torch_layout(x: np.ndarray) -> np.ndarray:
    return x.transpose(2, 3, 1, 0) if x.ndim == 4 else x.T if x.ndim == 2 else x


@functools.cache
def _flax_params(cfg: Config) -> dict:
    """The JAX net's initial parameters (seed 0), once per config."""
    net = speedrun_from_config(cfg)
    return net.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False)["params"]


def jax_labels(cfg: Config) -> dict[str, str]:
    """torch name -> `jaxbench.optim.param_labels` of the JAX net's parameter."""
    labels = optim.param_labels(_flax_params(cfg), with_muon=cfg.optimizer == "muon")
    return {_torch_name(k): v for k, v in traverse_util.flatten_dict(labels).items()}


def torch_labels(cfg: Config) -> dict[str, str]:
    """torch name -> the label of its `torch_ref.optim` group ('frozen': no gradient)."""
    model = tsm.speedrun_from_config(cfg)
    opt = toptim.make_optimizer(model, cfg, None, PRESET_SPE)
    group_of = {id(p): g.get("label", "?") for g in opt.param_groups for p in g["params"]}
    return {
        n: group_of[id(p)] if p.requires_grad else "frozen" for n, p in model.named_parameters()
    }


def test_preset_groups_the_same_params_in_both_frameworks() -> None:
    """Muon on the six 3x3 filters; BN biases, whitening bias and head on SGD; the same
    parameter in the same group in JAX and PyTorch; `--no-muon` moves the filters to SGD."""
    cfg = _preset()
    got = jax_labels(cfg)
    assert got == torch_labels(cfg)
    muon_params = sorted(n for n, label in got.items() if label == "muon")
    assert muon_params == [f"block{b}.conv{c}.weight" for b in (1, 2, 3) for c in (1, 2)]
    assert got["whiten.weight"] == "frozen" and got["whiten.bias"] == "whiten_bias"
    assert got["head.weight"] == "default" and got["block2.bn1.bias"] == "bn_bias"
    plain = without_trick(cfg, "muon")
    assert plain.optimizer == "sgd" and "muon" not in set(jax_labels(plain).values())
    assert jax_labels(plain) == {n: ("default" if v == "muon" else v) for n, v in got.items()}


def _grads(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Float32-exact gradients in torch layout, one draw per parameter in name order."""
    rng = np.random.default_rng(seed)
    return {
        n: (0.1 * rng.standard_normal(s)).astype(np.float32).astype(np.float64)
        for n, s in sorted(shapes.items())
    }


def reference_update(
    label: str, w: np.ndarray, g: np.ndarray, state: dict, t: int, cfg: Config, dtype: type
) -> np.ndarray:
    """Update t (from 0) of one parameter (torch layout) under the preset's optimizer, in
    `dtype`: `jaxbench.muon.muon_update` for the filters, torch SGD (coupled decay, Nesterov)
    at the group's LR for the rest, the whitening bias frozen after its epochs."""
    lr_opt, wd = optimizer_scales(cfg)
    lr_t = float(lr_at(t, cfg, PRESET_SPE))
    w, g = w.astype(dtype), g.astype(dtype)
    if label == "frozen":
        return w
    if label == "muon":
        spec = ref.spec_of(cfg)
        buf = state.get("buf", ref.zero_buffer(w.shape, spec))
        total = cfg.epochs * PRESET_SPE
        lr = cfg.muon_lr * lr_t / lr_opt
        w, state["buf"] = ref.muon_update(
            w, g, buf, step=t + 1, lr=lr, total_steps=total, spec=spec, dtype=dtype
        )
        return w
    if label == "whiten_bias":
        if t >= cfg.whiten_bias_epochs * PRESET_SPE:
            return w
        lr = float(np.interp(t, *whiten_bias_lr_knots(cfg, PRESET_SPE)))
        decay = wd * cfg.bn_bias_wd_mult
    elif label == "bn_bias":
        lr, decay = lr_t * cfg.bn_bias_lr_mult, wd * cfg.bn_bias_wd_mult
    else:
        lr, decay = lr_t, wd
    m = dtype(cfg.momentum)
    d = g + dtype(decay) * w
    state["buf"] = m * state["buf"] + d if "buf" in state else d
    return w - dtype(lr) * (d + m * state["buf"])


def run_preset_reference(
    labels: dict[str, str], w0: dict[str, np.ndarray], grads: list[dict], cfg: Config, dtype: type
) -> list[dict[str, np.ndarray]]:
    """The parameters (torch layout) after each update; first: the initial ones."""
    states: dict[str, dict] = {n: {} for n in w0}
    out = [w0]
    for t, g in enumerate(grads):
        prev = out[-1]
        out.append(
            {n: reference_update(labels[n], prev[n], g[n], states[n], t, cfg, dtype) for n in w0}
        )
    return out


def run_preset_jax(cfg: Config, grads: list[dict]) -> list[dict[str, np.ndarray]]:
    """`jaxbench.optim.make_optimizer`'s updates of the JAX net, in torch layout."""
    params = _flax_params(cfg)
    tx = optim.make_optimizer(cfg, PRESET_SPE)
    state, update = tx.init(params), jax.jit(tx.update)

    def torch_layout(tree: dict) -> dict[str, np.ndarray]:
        flat = traverse_util.flatten_dict(jax.device_get(tree))
        return {
            _torch_name(k): _to_torch_layout(np.asarray(v, np.float64)) for k, v in flat.items()
        }

    out = [torch_layout(params)]
    for g in grads:
        flat = {
            k: _from_torch_layout(g[_torch_name(k)]) for k in traverse_util.flatten_dict(params)
        }
        g_tree = jax.tree_util.tree_map(
            lambda x: jnp.asarray(x, jnp.float32), traverse_util.unflatten_dict(flat)
        )
        updates, state = update(g_tree, state, params)
        params = optax.apply_updates(params, updates)
        out.append(torch_layout(params))
    return out


def run_preset_torch(cfg: Config, grads: list[dict]) -> list[dict[str, np.ndarray]]:
    """`torch_ref.optim.make_optimizer`'s updates of the torch net, set as the trainer sets
    the LR (`set_lr` with `lr_at(t)`) and freezes the whitening bias (no gradient)."""
    model = tsm.speedrun_from_config(cfg)
    opt = toptim.make_optimizer(model, cfg, None, PRESET_SPE)
    named = dict(model.named_parameters())
    snap = lambda: {n: p.detach().double().numpy().copy() for n, p in named.items()}  # noqa: E731
    out = [snap()]
    for t, g in enumerate(grads):
        toptim.set_lr(opt, float(lr_at(t, cfg, PRESET_SPE)))
        frozen_bias = t >= cfg.whiten_bias_epochs * PRESET_SPE
        for n, p in named.items():
            trained = p.requires_grad and not (n == "whiten.bias" and frozen_bias)
            p.grad = torch.tensor(g[n], dtype=torch.float32) if trained else None
        opt.step()
        out.append(snap())
    return out


def preset_errors(run: list[dict], reference: list[dict]) -> dict[str, float]:
    """Per parameter: the worst relative error of an update over the run (0 where the
    reference does not move it and neither does the run)."""
    errors = {}
    for n in reference[0]:
        worst = 0.0
        for (a0, a1), (b0, b1) in zip(
            zip(run, run[1:], strict=False),
            zip(reference, reference[1:], strict=False),
            strict=True,
        ):
            want, got = b1[n] - b0[n], a1[n] - a0[n]
            scale = np.linalg.norm(want)
            worst = max(worst, np.linalg.norm(got - want) / scale if scale else np.abs(got).max())
        errors[n] = float(worst)
    return errors


def test_config_picks_the_muon_variant() -> None:
    """`--muon-variant` picks the update, `--muon-lr`/`--muon-momentum` override its peak LR
    and momentum, `--no-weight-norm` turns the filter normalisation off."""
    cfg = _preset()
    assert ref.spec_of(cfg) == dataclasses.replace(AIRBENCH94_MUON, lr=0.24, momentum=0.6)
    record = cfg.replace(muon_variant="record", muon_lr=0.205, muon_momentum=0.655)
    assert ref.spec_of(record) == RECORD
    bare = ref.spec_of(without_trick(record, "weight-norm"))
    assert bare == dataclasses.replace(RECORD, normalization="none")
    with pytest.raises(ValueError, match="--muon-variant must be one of"):
        cfg.replace(muon_variant="airbench")


VARIANTS = {
    "airbench94_muon": {},
    "record": {"muon_variant": "record", "muon_lr": 0.205, "muon_momentum": 0.655},
    "record-no-weight-norm": {"muon_variant": "record", "muon_weight_norm": False},
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_preset_updates_within_float32_noise_of_the_reference(framework: str, variant: str) -> None:
    """Three updates of every parameter under speedrun_muon's optimizer (Muon, the three
    SGD groups, the whitening bias's own LR and its freeze), and with the record's Muon,
    within `NOISE_HEADROOM` times the float32 noise of the same reference, per group."""
    cfg = _preset().replace(**VARIANTS[variant])
    runner = run_preset_jax if framework == "jax" else run_preset_torch
    labels = jax_labels(cfg) if framework == "jax" else torch_labels(cfg)
    shapes = {n: v.shape for n, v in runner(cfg, [])[0].items()}
    grads = [_grads(shapes, seed) for seed in range(PRESET_UPDATES)]
    run = runner(cfg, grads)
    w0 = run[0]
    reference = run_preset_reference(labels, w0, grads, cfg, np.float64)
    noise = preset_errors(run_preset_reference(labels, w0, grads, cfg, np.float32), reference)
    errors = preset_errors(run, reference)
    for label in ("muon", "default", "bn_bias", "whiten_bias"):
        names = [n for n, v in labels.items() if v == label]
        group_noise = max(noise[n] for n in names)
        assert 0 < group_noise < 1e-4, (label, group_noise)
        worst = max(errors[n] for n in names)
        assert worst <= NOISE_HEADROOM * group_noise, (label, worst, group_noise)
    # the frozen whitening filter never moves; the whitening bias stops after its epoch
    np.testing.assert_array_equal(run[-1]["whiten.weight"], w0["whiten.weight"])
    np.testing.assert_array_equal(run[3]["whiten.bias"], run[2]["whiten.bias"])
    assert not np.array_equal(run[2]["whiten.bias"], run[1]["whiten.bias"])


def test_preset_update_plants_are_caught() -> None:
    """A wrong split is far outside the bound: the filters on SGD (`--no-muon` against the
    Muon reference), or Muon's momentum taken from the SGD groups."""
    cfg = _preset()
    labels = jax_labels(cfg)
    shapes = {n: v.shape for n, v in run_preset_jax(cfg, [])[0].items()}
    grads = [_grads(shapes, seed) for seed in range(2)]
    run = run_preset_jax(without_trick(cfg, "muon"), grads)
    reference = run_preset_reference(labels, run[0], grads, cfg, np.float64)
    errors = preset_errors(run, reference)
    assert min(errors[n] for n, v in labels.items() if v == "muon") > 0.1
    wrong = run_preset_jax(cfg.replace(muon_momentum=cfg.momentum), grads)
    errors = preset_errors(wrong, reference)
    assert min(errors[n] for n, v in labels.items() if v == "muon") > 1e-3


# --- the speedrun_muon preset trains in both frameworks -------------------------------------------


def preset_from_flags(*flags: str) -> Config:
    """speedrun_muon shrunk by command-line flags, as a user would: 8/16/16, batch 100."""
    parser = configs.OneLineErrorParser()
    configs.add_config_args(parser)
    narrow = ["--widths", "8,16,16", "--batch-size", "100", "--epochs", "1"]
    args = ["--config", "speedrun_muon", *narrow, "--precision", "float32", *flags]
    return configs.config_from_args(parser.parse_args(args))


def has_muon_state(state: object) -> bool:
    is_muon = lambda x: isinstance(x, MuonState)  # noqa: E731
    return any(is_muon(x) for x in jax.tree_util.tree_leaves(state, is_leaf=is_muon))


@pytest.mark.slow
@pytest.mark.parametrize("flags", [(), ("--no-muon",)], ids=["muon", "no-muon"])
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_preset_trains_one_short_epoch(framework: str, flags: tuple[str, ...]) -> None:
    """Two updates of the narrow preset on 200 random images: finite losses in both
    frameworks; `--no-muon` leaves no Muon in either optimizer."""
    cfg = preset_from_flags(*flags)
    with_muon = not flags
    assert cfg.optimizer == ("muon" if with_muon else "sgd") and cfg.widths == (8, 16, 16)
    data = random_dataset(200, 100)
    if framework == "jax":
        tx = optim.make_optimizer(cfg, 2)  # the state's structure: nothing drawn or compiled
        state = jax.eval_shape(lambda: tx.init(_flax_params(cfg)))
        assert has_muon_state(state) == with_muon
        summary = jtrain.train_and_evaluate(cfg, data=data, progress=False, quiet=True)
    else:
        opt = toptim.make_optimizer(tsm.speedrun_from_config(cfg), cfg, None, 2)
        assert any(g.get("muon", False) for g in opt.param_groups) == with_muon
        summary = ttrain.train_and_evaluate(cfg, data=data, progress=False, quiet=True)
    assert summary["steps_per_epoch"] == 2 and len(summary["step_losses"]) == 2
    assert np.isfinite(summary["step_losses"]).all(), summary["step_losses"]
    assert np.isfinite(summary["final"]["val_loss"]), summary["final"]


def test_preset_head_starts_at_unit_std_in_both_frameworks() -> None:
    """airbench94_muon's `w *= 1 / w.std()` on the head (`head_unit_std`); off in `speedrun`
    and with `--no-head-unit-std`, where the head keeps torch's U(+-1/sqrt(in)) init."""
    cfg = _preset()
    off = preset_from_flags("--no-head-unit-std")
    assert cfg.head_unit_std and not off.head_unit_std
    assert not get_config("speedrun").head_unit_std
    for c, want in ((cfg, 1.0), (off, 1 / np.sqrt(3 * 16))):
        jax_head = np.asarray(_flax_params(c)["head"]["kernel"], np.float64)
        torch_head = tsm.speedrun_from_config(c).head.weight.detach().double().numpy()
        for head in (jax_head, torch_head):
            assert np.std(head, ddof=1) == pytest.approx(want, rel=1e-5 if want == 1.0 else 0.2)
