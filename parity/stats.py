"""Statistical tests behind checks 1 and 7, numpy only.

Check 1 asks whether a layer's initial weights are draws from
uniform(-b, b), b = 1/sqrt(fan_in); check 7 asks whether JAX's accuracy
curves are further from PyTorch's than PyTorch reruns, perturbed by one ulp,
are from each other (`chaos_test`).
Both turn a sample into figures with a stated tolerance, so a failure says
by how much and a pass says how close.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Tolerances for the init tests, chosen so that a correct init fails one of
# ~100 (layer, framework, statistic) tests with probability well below 1e-3.
Z_TOL = 5.0  # |z| of the sample mean and standard deviation
KS_ALPHA = 1e-4  # per-test false-alarm rate of the Kolmogorov-Smirnov test
MAX_TAIL_P = 1e-6  # P(max |w| falls below the accepted range) for a true uniform


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
            self.max_ratio <= 1.0 + 1e-6
            and self.max_ratio >= self.min_max_ratio
            and abs(self.mean_z) <= Z_TOL
            and abs(self.std_z) <= Z_TOL
            and self.ks <= self.ks_crit
        )

    def as_dict(self) -> dict[str, float | int | bool]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["passed"] = self.passed
        return d


def uniform_fit(sample: np.ndarray, bound: float) -> UniformFit:
    """Test `sample` (all seeds pooled, any shape) against uniform(-bound, bound).

    Standard errors use the uniform's own moments: var = b^2/3 and, for the
    sample variance, Var(s^2) = (mu4 - sigma^4)/n with mu4 = b^4/5, so a wrong
    scale (e.g. lecun_normal's std 1/sqrt(fan_in), sqrt(3) too large) shows as a
    huge std_z and a max_ratio near 2.
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
    u = np.sort((w / bound + 1.0) / 2.0)  # uniform(0, 1) under the hypothesis
    i = np.arange(1, n + 1)
    ks = float(max(np.max(i / n - u), np.max(u - (i - 1) / n)))
    ks_crit = math.sqrt(-math.log(KS_ALPHA / 2.0) / 2.0) / math.sqrt(n)
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


# --- check 7: is JAX-vs-PyTorch further apart than PyTorch-vs-PyTorch? ---------------------


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by Lentz's continued fraction.

    The expansion of Numerical Recipes (2nd ed., 6.4), applied directly for
    x < (a + 1) / (a + b + 2) and through I_x(a, b) = 1 - I_{1-x}(b, a) otherwise,
    where it converges in O(sqrt(max(a, b))) terms; accurate to ~1e-14 here.
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * f / a


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (df = inf: the normal)."""
    if math.isinf(df):
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (numpy/math only): bisection on `t_sf` to ~1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    tail = 1.0 - p
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > tail:  # bracket: the root lies in [hi/2, hi]
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > tail:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class ChaosTest:
    """One figure of check 7: is the treatment's mean further from the reference runs' mean
    than float32 chaos explains? (See `chaos_test` for the model; values as fractions.)"""

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
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["bar"] = self.bar
        d["passed"] = self.passed
        return d


def chaos_moments(
    treat: np.ndarray, ref: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(diff, chaos_sd, se, df) of `chaos_test`, vectorised over leading axes.

    treat: (..., S), one run per seed; ref: (..., S, R), R >= 2 reference runs per seed.
    """
    x = np.asarray(treat, np.float64)
    y = np.asarray(ref, np.float64)
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
    """Test one figure: a treatment run and R reference runs for each of S seeds.

    Model: run r of seed s scores X = mu_framework + a_s + e, with a_s the seed's
    effect (its init and batch stream, shared by all its runs, hence cancelled by
    pairing) and e ~ N(0, tau^2) iid: float32 chaos, the divergence that rounding
    differences grow into. H0: the treatment is one more draw of the same chaos,
    mu_treat = mu_ref. Then D_s = treat_s - mean_r ref_sr has variance
    tau^2 (1 + 1/R); tau^2 is estimated by the reference runs' within-seed
    variance, pooled, with S (R - 1) degrees of freedom and independent of every
    D_s (normal theory: a sample's variance is independent of its mean), so
    mean(D) / sqrt(tau_hat^2 (1 + 1/R) / S) is exactly Student-t with S (R - 1)
    df. The bar is the two-sided t quantile at alpha / n_tests (Bonferroni over
    the family) times that standard error: the family rejects anything under H0
    with probability at most alpha.
    """
    if not 0.0 < alpha < 1.0 or n_tests < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_tests >= 1; got {alpha}, {n_tests}")
    diff, sd, se, df = chaos_moments(np.asarray(treat), np.asarray(ref))
    q = t_quantile(1.0 - alpha / (2.0 * n_tests), df)
    d, e = float(diff), float(se)
    t = d / e if e > 0 else (0.0 if d == 0 else math.copysign(math.inf, d))
    return ChaosTest(
        diff=d,
        chaos_sd=float(sd),
        se=e,
        df=int(df),
        t=t,
        quantile=q,
        alpha=alpha,
        n_tests=n_tests,
    )


def relative_error(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> float:
    """||a - b|| / max(||a||, ||b||, floor): the gradient check's per-parameter figure."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.linalg.norm(a64)), float(np.linalg.norm(b64)), floor)
    return float(np.linalg.norm(a64 - b64) / scale)
