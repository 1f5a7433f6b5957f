"""Statistics for the benchmark, the sweep and the parity suite: numpy and `scipy.stats` only.

Spreads are sample std (ddof=1); distributions are scipy's. What scipy lacks is written
here with its model in the docstring: `ratio_ci` (benchmark), `uniform_fit` (parity check
1) and `chaos_test` (parity check 7). Framework-neutral.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

CI_LEVEL = 0.95

# Tolerances of `uniform_fit`, chosen so that a correct init fails one of ~100
# (layer, framework, statistic) tests with probability well below 1e-3.
Z_TOL = 5.0  # |z| of the sample mean and standard deviation
KS_ALPHA = 1e-4  # per-test false-alarm rate of the Kolmogorov-Smirnov test
MAX_TAIL_P = 1e-6  # P(max |w| falls below the accepted range) for a true uniform


def _scipy_stats() -> Any:
    """`scipy.stats`, imported on first use: it takes about a second, which every command
    that imports this module (the sweep's workers, each parity run) would pay at start."""
    import scipy.stats

    return scipy.stats


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """n, mean (None for no value) and sample std (ddof=1; None for fewer than two)."""
    a = np.asarray(values, np.float64)
    return {
        "n": len(a),
        "mean": float(a.mean()) if len(a) else None,
        "std": float(a.std(ddof=1)) if len(a) > 1 else None,
    }


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, sample std (ddof=1; None for one value), min and max of `values`."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("describe() needs at least one value")
    return {**mean_std(x), "min": float(x.min()), "max": float(x.max())}


def share_at_least(values: Sequence[float], target: float) -> tuple[int, float]:
    """(count, fraction) of values >= target; the record-holders' 'share of runs >= 94%'."""
    x = np.asarray(values, dtype=np.float64)
    k = int(np.sum(x >= target))
    return k, k / x.size


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (df = inf: the normal)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    return float(_scipy_stats().t.ppf(p, df))


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t (df = inf: the normal)."""
    return float(_scipy_stats().t.sf(t, df))


def ratio_ci(
    numerator: Sequence[float], denominator: Sequence[float], level: float = CI_LEVEL
) -> dict[str, Any]:
    """Ratio of means with a log-symmetric Welch t interval (None with under two runs a side),
    by the delta method: Var(log mean) ~= s^2 / (n mean^2)."""
    a, b = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("ratio_ci() needs at least one value on each side")
    ma, mb = float(a.mean()), float(b.mean())
    out: dict[str, Any] = {"value": ma / mb, "level": level, "ci": None, "se_log": None, "df": None}
    if a.size < 2 or b.size < 2:
        return out
    va = float(a.var(ddof=1)) / (a.size * ma**2)
    vb = float(b.var(ddof=1)) / (b.size * mb**2)
    se = math.sqrt(va + vb)
    if se == 0.0:
        out.update(ci=[out["value"], out["value"]], se_log=0.0)
        return out
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    q = t_quantile(0.5 + level / 2, df)
    ci = [out["value"] * math.exp(-q * se), out["value"] * math.exp(q * se)]
    out.update(ci=ci, se_log=se, df=df)
    return out


@dataclass(frozen=True)
class UniformFit:
    """How well a pooled sample fits uniform(-bound, bound); every figure has its tolerance."""

    n: int
    bound: float
    max_ratio: float  # max |w| / bound: must be <= 1 (+ rounding) and near 1
    min_max_ratio: float  # the smallest max_ratio a true uniform reaches w.p. 1 - MAX_TAIL_P
    mean_z: float  # sample mean in standard errors
    std_ratio: float  # sample std / (bound / sqrt(3))
    std_z: float  # (sample std - bound / sqrt(3)) in standard errors
    ks: float  # Kolmogorov-Smirnov distance to the uniform CDF
    ks_crit: float  # its critical value at KS_ALPHA

    @property
    def passed(self) -> bool:
        return (
            self.min_max_ratio <= self.max_ratio <= 1.0 + 1e-6
            and abs(self.mean_z) <= Z_TOL
            and abs(self.std_z) <= Z_TOL
            and self.ks <= self.ks_crit
        )

    def as_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "passed": self.passed}


def uniform_fit(sample: np.ndarray, bound: float) -> UniformFit:
    """Test `sample` (all seeds pooled, any shape) against uniform(-bound, bound).

    Standard errors use the uniform's moments: var = b^2/3, Var(s^2) = (b^4/5 - var^2)/n,
    so a wrong scale shows as a huge std_z. The KS distance is to the identity CDF on
    (w / b + 1) / 2, unclipped; its critical value is `kstwobign`'s upper KS_ALPHA point.
    """
    w = np.asarray(sample, dtype=np.float64).ravel()
    n = w.size
    if n < 2:
        raise ValueError("uniform_fit needs at least two weights")
    sigma = bound / math.sqrt(3.0)
    mean_z = float(w.mean() / (sigma / math.sqrt(n)))
    s = float(w.std(ddof=1))
    se_var = math.sqrt((bound**4 / 5.0 - sigma**4) / n)
    std_z = (s * s - sigma * sigma) / se_var  # z of the variance; the std's is ~ the same
    sps = _scipy_stats()
    ks = float(sps.ks_1samp((w / bound + 1.0) / 2.0, lambda u: u).statistic)
    ks_crit = float(sps.kstwobign.isf(KS_ALPHA)) / math.sqrt(n)
    # P(max |w| < b (1 - d)) = (1 - d)^n  =>  d = 1 - MAX_TAIL_P^(1/n)
    min_max_ratio = MAX_TAIL_P ** (1.0 / n)
    return UniformFit(
        n=n,
        bound=bound,
        max_ratio=float(np.max(np.abs(w)) / bound),
        min_max_ratio=float(min_max_ratio),
        mean_z=mean_z,
        std_ratio=s / sigma,
        std_z=float(std_z),
        ks=ks,
        ks_crit=ks_crit,
    )


@dataclass(frozen=True)
class ChaosTest:
    """One figure of check 7 (the model: `chaos_test`; values as fractions)."""

    diff: float  # mean over seeds of treatment - mean of the reference runs
    chaos_sd: float  # pooled within-seed sd of the reference runs: one run's chaos noise
    se: float  # standard error of `diff` under H0
    df: int  # degrees of freedom of chaos_sd (and of t)
    t: float  # diff / se
    quantile: float  # two-sided t quantile at alpha / n_tests
    alpha: float  # family-wise false-alarm rate
    n_tests: int  # the family's size (Bonferroni)

    @property
    def bar(self) -> float:
        """The largest |diff| that passes: quantile standard errors."""
        return self.quantile * self.se

    @property
    def passed(self) -> bool:
        return bool(abs(self.diff) <= self.bar)

    def as_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "bar": self.bar, "passed": self.passed}


def chaos_moments(
    treat: np.ndarray, ref: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(diff, chaos_sd, se, df) of `chaos_test` over leading axes: treat (..., S), one run
    per seed; ref (..., S, R), R >= 2 reference runs per seed."""
    x, y = np.asarray(treat, np.float64), np.asarray(ref, np.float64)
    if y.ndim < 2 or x.shape != y.shape[:-1]:
        raise ValueError(f"treat (..., S) and ref (..., S, R) disagree: {x.shape}, {y.shape}")
    s, r = y.shape[-2], y.shape[-1]
    if s < 1 or r < 2:
        raise ValueError(f"need >= 1 seed and >= 2 reference runs per seed; got {s} x {r}")
    ybar = y.mean(-1)
    df = s * (r - 1)
    var = ((y - ybar[..., None]) ** 2).sum((-2, -1)) / df
    diff = (x - ybar).mean(-1)
    se = np.sqrt(var * (1.0 + 1.0 / r) / s)
    return diff, np.sqrt(var), se, df


def chaos_test(
    treat: np.ndarray | list[float],
    ref: np.ndarray | list[list[float]],
    *,
    n_tests: int = 1,
    alpha: float,
) -> ChaosTest:
    """Is a treatment further from R reference runs per seed (S seeds) than float32 chaos?

    Model: a run scores mu_framework + a_s (the seed's effect, cancelled by pairing) + e,
    e ~ N(0, tau^2) the chaos rounding grows into. Under H0 (mu_treat = mu_ref),
    D_s = treat_s - mean_r ref_sr has variance tau^2 (1 + 1/R), and with tau^2 pooled from
    the within-seed variance, mean(D) / sqrt(tau_hat^2 (1 + 1/R) / S) is Student-t with
    S (R - 1) df. The bar: the two-sided quantile at alpha / n_tests (Bonferroni).
    """
    if not 0.0 < alpha < 1.0 or n_tests < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_tests >= 1; got {alpha}, {n_tests}")
    diff, sd, se, df = chaos_moments(np.asarray(treat), np.asarray(ref))
    q = t_quantile(1.0 - alpha / (2.0 * n_tests), df)
    d, e = float(diff), float(se)
    t = d / e if e > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
    return ChaosTest(
        diff=d, chaos_sd=float(sd), se=e, df=int(df), t=t, quantile=q, alpha=alpha, n_tests=n_tests
    )


def relative_error(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> float:
    """||a - b|| / max(||a||, ||b||, floor): the gradient check's per-parameter figure."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.linalg.norm(a64)), float(np.linalg.norm(b64)), floor)
    return float(np.linalg.norm(a64 - b64) / scale)
