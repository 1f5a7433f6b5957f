"""The suite's machinery: exact conversion, statistics, CLI, and the quick run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxbench import stats
from jaxbench.configs import tiny
from parity import convert
from torch_ref.model import model_from_config

CFG = tiny().replace(widths=(8, 16, 32, 64))


def _trained_state_dict(batches: int = 3, batch: int = 8) -> dict[str, torch.Tensor]:
    """A state dict whose BN statistics have seen `batches` train-mode batches."""
    model = model_from_config(CFG, seed=0)
    model.train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, 32, 32, generator=gen))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys, shapes, dtypes and bits."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def test_round_trip_is_bit_exact_for_a_fresh_model() -> None:
    sd = model_from_config(CFG, seed=1).state_dict()
    back = convert.flax_to_torch(convert.torch_to_flax(sd))
    assert _state_dicts_equal(sd, back)


def test_layouts_map_index_for_index() -> None:
    sd = model_from_config(CFG, seed=2).state_dict()
    v = convert.torch_to_flax(sd)
    w = sd["layer1.conv.weight"].numpy()  # OIHW
    k = v["params"]["layer1"]["conv"]["kernel"]  # HWIO
    assert k.shape == (3, 3, w.shape[1], w.shape[0])
    assert k[2, 0, 5, 7] == w[7, 5, 2, 0]
    head = sd["head.weight"].numpy()  # (out, in)
    assert v["params"]["head"]["kernel"][11, 3] == head[3, 11]


def test_trained_state_round_trips_bit_exactly() -> None:
    """Both frameworks store PyTorch's unbiased running variance: BN statistics are copies."""
    sd = _trained_state_dict(batches=3)
    back = convert.flax_to_torch(convert.torch_to_flax(sd), num_batches_tracked=3)
    assert _state_dicts_equal(sd, back)


def test_uniform_fit_accepts_uniform_and_rejects_lecun_normal() -> None:
    rng = np.random.default_rng(0)
    b = 1 / math.sqrt(27)
    assert stats.uniform_fit(rng.uniform(-b, b, 4000).astype(np.float32), b).passed
    lecun = rng.standard_normal(4000) / math.sqrt(27)
    fit = stats.uniform_fit(np.clip(lecun, -2 * b, 2 * b), b)
    assert not fit.passed and fit.max_ratio > 1.5 and fit.std_z > 10


# --- check 7: the chaos test, its false-alarm rate and power, the ulp perturbation -------------


@pytest.mark.parametrize(
    ("p", "df", "want"),
    [
        (0.975, 1, 12.706204736174703),  # tan(0.475 pi), exact
        (0.975, 10, 2.228138851986274),
        (0.995, 5, 4.032142983555228),
        (0.9995, 3, 12.923978636687961),
        (0.975, math.inf, 1.959963984540054),
    ],
)
def test_t_quantile_matches_published_values(p: float, df: float, want: float) -> None:
    assert stats.t_quantile(p, df) == pytest.approx(want, rel=1e-9)
    assert stats.t_quantile(1 - p, df) == pytest.approx(-want, rel=1e-9)
    assert stats.t_sf(want, df) == pytest.approx(1 - p, rel=1e-8)


def test_t_sf_meets_its_closed_forms() -> None:
    """df 1 is Cauchy's law, df 2 has a closed form; both tails, and t = 0, agree."""
    for t in (-7.5, -1.0, 0.0, 0.3, 1.0, 4.0, 40.0):
        assert stats.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-14)
        assert stats.t_sf(t, 2) == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-14)
        assert stats.t_sf(t, 5) + stats.t_sf(-t, 5) == pytest.approx(1.0)


def test_chaos_test_by_hand() -> None:
    treat = [0.62, 0.60]
    ref = [[0.60, 0.61, 0.62], [0.59, 0.59, 0.62]]
    t = stats.chaos_test(treat, ref, n_tests=4, alpha=0.01)
    var = ((0.01**2 + 0 + 0.01**2) + (0.01**2 + 0.01**2 + 0.02**2)) / 4  # 2 seeds x 2 df
    assert t.df == 4 and t.chaos_sd == pytest.approx(math.sqrt(var))
    assert t.diff == pytest.approx(((0.62 - 0.61) + (0.60 - 0.60)) / 2)
    assert t.se == pytest.approx(math.sqrt(var * (1 + 1 / 3) / 2))
    assert t.quantile == pytest.approx(stats.t_quantile(1 - 0.01 / 8, 4))
    assert t.bar == pytest.approx(t.quantile * t.se) and t.passed
    assert not stats.chaos_test([0.70, 0.68], ref, n_tests=4, alpha=0.01).passed
    with pytest.raises(ValueError, match="2 reference runs"):
        stats.chaos_test([0.6], [[0.6]], alpha=0.01)


def _family_rejections(
    rng: np.random.Generator, sims: int, seeds: int, runs: int, shift: float = 0.0
) -> tuple[np.ndarray, int]:
    """Simulated check-7 calls on Gaussian chaos (sd 1) around large per-seed effects: for
    each call and figure, whether the test rejects; the treatment's mean is off by `shift`."""
    from parity.checks import curves

    figures = 2 * 3  # metrics x epochs, as in quick mode
    seed_effect = rng.normal(60.0, 5.0, (sims, figures, seeds))
    treat = seed_effect + shift + rng.standard_normal((sims, figures, seeds))
    ref = seed_effect[..., None] + rng.standard_normal((sims, figures, seeds, runs))
    diff, _, se, df = stats.chaos_moments(treat, ref)
    q = stats.t_quantile(1 - curves.ALPHA / (2 * figures), df)
    return np.abs(diff) > q * se, figures


@pytest.mark.parametrize("runs", [3, 2], ids=["real: jax vs 3 torch runs", "null: vs 2 runs"])
def test_chaos_test_false_alarm_rate_is_the_stated_alpha(runs: int) -> None:
    """The family-wise rate over 6 independent figures is 1 - (1 - alpha/6)^6 <= alpha, the
    per-figure rate alpha/6: both within 4 binomial standard errors of 40,000 calls."""
    from parity.checks import curves

    sims = 40_000
    reject, k = _family_rejections(np.random.default_rng(7), sims, seeds=3, runs=runs)
    per_figure = curves.ALPHA / k
    family = 1 - (1 - per_figure) ** k
    for observed, p, n in (
        (reject.any(-1).mean(), family, sims),
        (reject.mean(), per_figure, sims * k),
    ):
        assert abs(observed - p) <= 4 * math.sqrt(p * (1 - p) / n), (observed, p)


def test_chaos_test_detects_a_shift_of_a_few_chaos_sd() -> None:
    """Quick mode's design (3 seeds, 3 torch runs): a bias of 6 chaos sd in one figure is
    caught 9 times in 10, of 8 sd nearly always; 1 sd hardly ever."""
    rng = np.random.default_rng(8)
    rates = {s: _family_rejections(rng, 4000, 3, 3, shift=s)[0][:, 0].mean() for s in (1, 6, 8)}
    assert rates[1] < 0.05 and rates[6] > 0.9 and rates[8] > 0.99, rates


def test_perturb_moves_weights_by_about_one_ulp() -> None:
    from parity.checks.curves import perturb

    sd = {k: v.clone() for k, v in model_from_config(CFG, seed=3).state_dict().items()}
    a, b = perturb(sd, 3, 1), perturb(sd, 3, 1)
    assert all(torch.equal(a[k], b[k]) for k in sd)  # deterministic
    assert not torch.equal(perturb(sd, 3, 2)["head.weight"], a["head.weight"])
    ulps = []
    for k, v in sd.items():
        if not v.is_floating_point() or k.endswith(("running_mean", "running_var")):
            assert torch.equal(a[k], v), k  # buffers untouched
            continue
        x, y = v.numpy(), a[k].numpy()
        assert np.all(y[x == 0] == 0), k  # zeros stay zero
        ulps.append(np.abs(y.astype(np.float64) - x) / np.spacing(np.abs(x)))
    d = np.round(np.concatenate([u.ravel() for u in ulps]))
    assert 0.6 < np.mean(d > 0) < 0.8 and np.median(d) == 1 and d.max() <= 8


def _fake_runs(seeds: int = 3, epochs: int = 3, shift: float = 0.0) -> dict[str, list]:
    rng = np.random.default_rng(0)
    names = ["jax", "torch", "torch'", "torch''"]
    base = rng.uniform(0.3, 0.6, (seeds, epochs))
    return {
        n: [
            [
                {
                    "epoch": e + 1,
                    "val_acc": base[s, e] + (shift if n == "jax" else 0) + rng.normal(0, 0.01),
                    "ema_val_acc": base[s, e] + rng.normal(0, 0.01),
                }
                for e in range(epochs)
            ]
            for s in range(seeds)
        ]
        for n in names
    }


def test_curves_compare_and_report_show_real_and_null_side_by_side(tmp_path: Path) -> None:
    from jaxbench.configs import tiny as tiny_cfg
    from parity import report
    from parity.checks import CheckResult, curves
    from parity.suite import SuiteResult

    runs = _fake_runs(shift=0.2)  # jax's test accuracy 20 points high: 20 chaos sd
    refs = ["torch", "torch'", "torch''"]
    real, table = curves.compare(runs, "jax", refs, 3, "")
    null, null_table = curves.compare(runs, "torch''", refs[:2], 3, "null: ", headline=False)
    assert [f.passed for f in real] == [False] * 3 + [True] * 3
    assert all(f.passed for f in null) and len(null_table) == 6
    assert table[0]["df"] == 6 and null_table[0]["df"] == 3 and table[0]["alpha"] == curves.ALPHA
    r = CheckResult(7, "epoch accuracy curves", figures=real + null)
    r.details = {
        "note": "fake",
        "seeds": 3,
        "torch_runs": 3,
        "alpha": curves.ALPHA,
        "table": table,
        "null_table": null_table,
    }
    suite = SuiteResult(
        [r],
        tiny_cfg(),
        True,
        None,
        "fake",
        1.0,
        curves={"runs": runs, "note": "fake", "table": table, "null_table": null_table},
    )
    md = report.to_markdown(suite, has_plot=True)
    assert "alpha = 0.5% per comparison" in md and "null: torch'' - torch" in md
    assert md.count("**FAIL**") >= 3
    json.dumps(report.to_json(suite))  # valid JSON, details per figure included
    assert report.plot_curves(suite.curves)[:4] == b"\x89PNG"
    r.details["table"] = suite.curves["table"] = []  # a null-only run (with_jax=False)
    md = report.to_markdown(suite, has_plot=False)
    row = next(line for line in md.splitlines() if line.startswith("| val_acc | 1 |"))
    assert row.count("|") == 14 and row.split("|")[3].strip() == "-"
    assert report.plot_curves(suite.curves)[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.realdata
def test_curves_null_comparison_passes_on_real_data(quick_parity: tuple) -> None:
    """Check 7 of the test run's quick parity run (2 seeds x 3 torch runs, 1 epoch of 4,000
    images): the torch-vs-torch null comparison passes, and the quick config learns: mean
    final EMA accuracy >= 30% (36.7% measured, runs 32.5-41.1%; the bar sits about 4
    standard deviations of that mean below it, counting the 2 seeds as the independent
    draws; chance is 10%), on the number of images asked for."""
    proc, out = quick_parity
    assert (out / "parity.json").exists(), proc.stdout + proc.stderr[-3000:]
    report = json.loads((out / "parity.json").read_text())
    (check7,) = [c for c in report["checks"] if c["number"] == 7]
    assert check7["error"] is None
    null = [f for f in check7["figures"] if f["name"].startswith("null: ")]
    assert len(null) == 2 and len(check7["figures"]) == 4  # 2 metrics x 1 epoch each
    assert all(f["passed"] for f in null), [f for f in null if not f["passed"]]
    final = [
        run[-1]["ema_val_acc"]
        for name in ("torch", "torch'", "torch''")
        for run in report["curves"]["runs"][name]
    ]
    assert len(final) == 6 and np.mean(final) >= 0.30, final
    assert (
        report["curves"]["config"]["subset"] == 4000
        and "4,000 training" in check7["details"]["note"]
    )


def test_curves_without_jax_train_only_torch_and_compare_the_null(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`with_jax=False`: the JAX trainer is never called, the torch runs still are (on
    synthetic data, one seed, one epoch: the figures' values mean nothing here), and every
    figure is the null comparison's."""
    from helpers import random_dataset

    from jaxbench import train as jtrain
    from jaxbench.configs import tiny as tiny_cfg
    from parity.checks import Context, curves
    from parity.harness import Harness

    def no_jax(*args: object, **kwargs: object) -> None:
        raise AssertionError("with_jax=False trained the JAX model")

    monkeypatch.setattr(jtrain, "train_and_evaluate", no_jax)
    ctx = Context(
        cfg=tiny_cfg(),
        harness=Harness(),
        quick=True,
        data=random_dataset(100, 50),
        seeds=1,
        epochs=1,
        log=lambda _msg: None,
    )
    res = curves.check_curves(ctx, with_jax=False)
    assert res.error is None
    assert sorted(ctx.curves["runs"]) == ["torch", "torch'", "torch''"]
    assert [len(runs) for runs in ctx.curves["runs"].values()] == [1, 1, 1]
    assert len(res.figures) == 2 and all(f.name.startswith("null: ") for f in res.figures)
    assert ctx.curves["table"] == [] and len(ctx.curves["null_table"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--plant", "nope"], "unknown --plant 'nope'"),
        (["--checks", "9"], "--checks must name checks"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--subset", "0"], "--subset must be at least 1"),
        (["--subset", "50001"], "--subset must be in [1, 50000] training images, got 50001"),
        (["--quick", "--subset", "49"], "--subset must be at least check 7's batch (50), got 49"),
        (["--subset", "99"], "--subset must be at least check 7's batch (100), got 99"),
    ],
)
def test_cli_rejects_bad_input_with_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """In this process (a real one: test_faults, test_readme): exit 2, one line, no output."""
    from parity.__main__ import main

    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_quick_suite_passes_end_to_end(quick_parity: tuple) -> None:
    r, out = quick_parity
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "all checks passed" in r.stdout
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and [c["number"] for c in report["checks"]] == [1, 2, 3, 4, 5, 6, 7]
    assert all(c["passed"] and c["measured"] is not None for c in report["checks"])
    assert "Check 7" in (out / "parity_report.md").read_text()
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
