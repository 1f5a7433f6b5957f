"""Statistical tests behind checks 1 and 7, numpy only.

Check 1 asks whether a layer's initial weights are draws from
uniform(-b, b), b = 1/sqrt(fan_in); check 7 asks whether two frameworks'
mean accuracy curves differ by more than their seed-to-seed noise explains.
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


@dataclass(frozen=True)
class MeanDiff:
    """Difference of two groups' means with the standard error of that difference."""

    mean_a: float
    mean_b: float
    std_a: float
    std_b: float
    n_a: int
    n_b: int

    @property
    def diff(self) -> float:
        return self.mean_a - self.mean_b

    @property
    def se(self) -> float:
        """Welch's standard error of the difference (0 for one run per group)."""
        va = self.std_a**2 / self.n_a if self.n_a > 1 else 0.0
        vb = self.std_b**2 / self.n_b if self.n_b > 1 else 0.0
        return math.sqrt(va + vb)

    @property
    def df(self) -> float:
        """Welch-Satterthwaite degrees of freedom of the difference (inf when no spread)."""
        va = self.std_a**2 / self.n_a if self.n_a > 1 else 0.0
        vb = self.std_b**2 / self.n_b if self.n_b > 1 else 0.0
        den = (va**2 / (self.n_a - 1) if self.n_a > 1 else 0.0) + (
            vb**2 / (self.n_b - 1) if self.n_b > 1 else 0.0
        )
        return (va + vb) ** 2 / den if den > 0 else math.inf

    def tolerance(self, floor: float, n_se: float = 2.0) -> float:
        """max(floor, n_se standard errors): a fixed bar, widened only by measured noise."""
        return max(floor, n_se * self.se)


def mean_diff(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> MeanDiff:
    """Summarise two independent samples (e.g. one accuracy per seed per framework)."""
    xa, xb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if xa.size == 0 or xb.size == 0:
        raise ValueError("mean_diff needs at least one value per group")
    return MeanDiff(
        mean_a=float(xa.mean()),
        mean_b=float(xb.mean()),
        std_a=float(xa.std(ddof=1)) if xa.size > 1 else 0.0,
        std_b=float(xb.std(ddof=1)) if xb.size > 1 else 0.0,
        n_a=int(xa.size),
        n_b=int(xb.size),
    )


def relative_error(a: np.ndarray, b: np.ndarray, floor: float = 1e-12) -> float:
    """||a - b|| / max(||a||, ||b||, floor): the gradient check's per-parameter figure."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.linalg.norm(a64)), float(np.linalg.norm(b64)), floor)
    return float(np.linalg.norm(a64 - b64) / scale)
