"""Exact null distributions and p-value combination for radioactive-data detection.

Every p-value is carried as a natural log (``ln p``) and only converted to ``log10`` at the
end: detection p-values of 1e-300 .. 1e-3000 are routine and underflow float64.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special as sc
import scipy.stats as ss
import torch
from torch import Tensor

__all__ = [
    "cosine_null_logsf",
    "fisher_log_p",
    "to_log10",
    "whitebox_cosines",
    "whitebox_test",
    "sign_test_log10_p",
    "SignedRankNull",
    "permutation_log10_p",
    "uniformity_report",
    "random_carriers",
]

_LN10 = math.log(10.0)
# Below this, float64 results from scipy are denormal or about to be (relative accuracy is lost),
# so we switch to the log-space evaluation.
_TINY = 1e-280
_LOG_TINY = math.log(_TINY)


def to_log10(ln_p):
    """Convert natural-log p-values to log10 (array or scalar)."""
    if np.ndim(ln_p) == 0:
        return float(ln_p) / _LN10
    return np.asarray(ln_p, dtype=np.float64) / _LN10


# --------------------------------------------------------------------------------------------
# Per-class null: cosine between a fixed vector and a uniform random unit vector in R^d.
# --------------------------------------------------------------------------------------------


def _log_betainc_cf(a: float, b: float, x: np.ndarray, max_iter: int = 100_000) -> np.ndarray:
    """ln I_x(a, b) via the Lentz continued fraction, prefactor in log space.

    Valid (fast convergence) for x < (a + 1) / (a + b + 2), i.e. the lower tail of the Beta
    distribution, which is exactly where scipy's ``betainc`` underflows.
    """
    x = np.asarray(x, dtype=np.float64)
    fpmin = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    dd = 1.0 - qab * x / qap
    dd = np.where(np.abs(dd) < fpmin, fpmin, dd)
    dd = 1.0 / dd
    h = dd.copy()
    done = np.zeros(x.shape, dtype=bool)
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        dd = 1.0 + aa * dd
        dd = np.where(np.abs(dd) < fpmin, fpmin, dd)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < fpmin, fpmin, c)
        dd = 1.0 / dd
        h = np.where(done, h, h * dd * c)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        dd = 1.0 + aa * dd
        dd = np.where(np.abs(dd) < fpmin, fpmin, dd)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < fpmin, fpmin, c)
        dd = 1.0 / dd
        delta = dd * c
        h = np.where(done, h, h * delta)
        done |= np.abs(delta - 1.0) < 1e-15
        if done.all():
            break
    else:  # pragma: no cover - never reached in the regime we call it in
        raise RuntimeError("continued fraction for the incomplete beta did not converge")
    # a ln x + b ln(1-x) - ln a - ln B(a, b); ln x is taken by the caller via log1p for accuracy.
    return np.log(h) - math.log(a) - sc.betaln(a, b)


def cosine_null_logsf(t, d: int) -> np.ndarray:
    """ln P(s >= t), s = cos(fixed vector, uniform random unit vector in R^d).

    t is clipped to [-1, 1]. Finite for every t < 1; t >= 1 returns -inf (P = 0 exactly,
    impossible with real float data, so not worth a special finite value). NaN stays NaN.
    """
    if d < 2:
        raise ValueError(f"d must be >= 2, got {d}")
    t = np.clip(np.asarray(t, dtype=np.float64), -1.0, 1.0)
    scalar = t.ndim == 0
    t = np.atleast_1d(t)
    a, b = (d - 1) / 2.0, 0.5
    x = 1.0 - t * t
    ibeta = sc.betainc(a, b, x)  # P(|s| >= |t|) = I_{1-t^2}((d-1)/2, 1/2)
    out = np.empty_like(t)

    nan = np.isnan(t)
    out[nan] = np.nan
    neg = t < 0
    # P(s >= t) = 1 - P(s >= |t|) for t < 0; the subtracted term is <= 1/2 so log1p is safe.
    out[neg] = np.log1p(-0.5 * ibeta[neg])

    pos = ~neg & ~nan
    ok = pos & (ibeta >= _TINY)
    out[ok] = math.log(0.5) + np.log(ibeta[ok])

    one = pos & (t >= 1.0)
    out[one] = -np.inf

    # Far tail: scipy underflows (e.g. t=0.99, d=2048 gives 1e-1744); evaluate in log space.
    far = pos & ~ok & ~one
    if far.any():
        tf = t[far]
        log_x = np.log1p(-tf * tf)
        log_1mx = 2.0 * np.log(tf)
        out[far] = math.log(0.5) + a * log_x + b * log_1mx + _log_betainc_cf(a, b, 1.0 - tf * tf)
    return out[0] if scalar else out


# --------------------------------------------------------------------------------------------
# Fisher combination.
# --------------------------------------------------------------------------------------------


def fisher_log_p(log_ps) -> float:
    """ln of Fisher's combined p-value from natural-log p-values ``log_ps`` (C of them).

    X = -2 Σ ln p_k ~ χ²_{2C}; for even dof sf(x) = e^{-x/2} Σ_{i<C} (x/2)^i / i!, evaluated in
    log space so it stays finite for any x.
    """
    log_ps = np.asarray(log_ps, dtype=np.float64).ravel()
    if log_ps.size == 0:
        raise ValueError("need at least one p-value")
    if np.any(np.isnan(log_ps)) or np.any(log_ps > 1e-12):
        raise ValueError("log p-values must be <= 0 and not NaN")
    log_ps = np.minimum(log_ps, 0.0)
    half_x = -log_ps.sum()  # x / 2
    if not np.isfinite(half_x):
        return -np.inf
    i = np.arange(log_ps.size, dtype=np.float64)
    # xlogy gives 0 for the i=0 term even when x == 0 (all p == 1).
    terms = sc.xlogy(i, half_x) - sc.gammaln(i + 1.0)
    return float(min(0.0, -half_x + sc.logsumexp(terms)))


# --------------------------------------------------------------------------------------------
# White-box test.
# --------------------------------------------------------------------------------------------


def whitebox_cosines(
    W: Tensor,
    feats_marking: Tensor,
    feats_suspect: Tensor,
    carriers: Tensor,
    align: bool = True,
) -> Tensor:
    """cos(W̃_k, u_k) for each class, W̃ = W Mᵀ, M = argmin ‖F_m M − F_s‖ (no bias).

    W: (C, ds) suspect's last linear layer; feats_marking: (n, d); feats_suspect: (n, ds);
    carriers: (C, d). ``align=False`` (only when ds == d) uses M = I. Returns float64 (C,).
    """
    C, ds = W.shape
    if carriers.shape[0] != C:
        raise ValueError(f"W has {C} rows but carriers has {carriers.shape[0]}")
    d = carriers.shape[1]
    dev = W.device
    W64 = W.detach().to(dev, torch.float64)
    if align:
        Fm = feats_marking.detach().to(dev, torch.float64)
        Fs = feats_suspect.detach().to(dev, torch.float64)
        if Fm.shape[0] != Fs.shape[0] or Fm.shape[1] != d or Fs.shape[1] != ds:
            raise ValueError(
                f"shape mismatch: feats_marking {tuple(Fm.shape)}, feats_suspect {tuple(Fs.shape)}, "
                f"W {tuple(W.shape)}, carriers {tuple(carriers.shape)}"
            )
        # pinv = minimum-norm least squares: handles n < d and rank-deficient features (dead
        # ReLU dims are common) on any device, unlike lstsq's CUDA driver which assumes full rank.
        M = torch.linalg.pinv(Fm) @ Fs  # (d, ds)
        Wt = W64 @ M.T  # (C, d)
    else:
        if ds != d:
            raise ValueError(f"align=False needs ds == d, got ds={ds}, d={d}")
        Wt = W64
    Wt = torch.nn.functional.normalize(Wt, dim=1)
    U = torch.nn.functional.normalize(carriers.detach().to(dev, torch.float64), dim=1)
    return (Wt * U).sum(dim=1)


def whitebox_test(cosines, d: int) -> dict:
    """Fisher-combined one-sided test of the per-class cosines against the exact null.

    Returns ``log10_p`` (float), ``per_class_log10_p`` (ndarray), ``cos_mean`` (float).
    """
    if isinstance(cosines, Tensor):
        cosines = cosines.detach().cpu().double().numpy()
    cos = np.asarray(cosines, dtype=np.float64).ravel()
    ln_p = cosine_null_logsf(cos, d)
    return {
        "log10_p": to_log10(fisher_log_p(ln_p)),
        "per_class_log10_p": to_log10(ln_p),
        "cos_mean": float(cos.mean()),
    }


# --------------------------------------------------------------------------------------------
# Black-box tests.
# --------------------------------------------------------------------------------------------


def sign_test_log10_p(wins: int, n: int) -> float:
    """log10 P(X >= wins), X ~ Bin(n, 1/2): exact one-sided sign test.

    Ties must be dropped by the caller before counting (n = number of non-tied pairs).
    """
    wins, n = int(wins), int(n)
    if n < 0 or wins < 0 or wins > n:
        raise ValueError(f"need 0 <= wins <= n, got wins={wins}, n={n}")
    if wins == 0:
        return 0.0
    ln_p = float(ss.binom.logsf(wins - 1, n, 0.5))
    if not (np.isfinite(ln_p) and ln_p > _LOG_TINY):
        # Upper tail pmf summed in log space: exact up to gammaln rounding, finite for any n.
        k = np.arange(wins, n + 1, dtype=np.float64)
        log_pmf = sc.gammaln(n + 1.0) - sc.gammaln(k + 1.0) - sc.gammaln(n - k + 1.0) - n * math.log(2.0)
        ln_p = float(sc.logsumexp(log_pmf))
    return min(0.0, ln_p) / _LN10


class SignedRankNull:
    """Exact null of Wilcoxon's signed-rank statistic given the magnitudes ``|d_i|`` (zeros dropped).

    Under H0 each sign is an independent fair coin, independent of the magnitudes, so
    W = sum of the midranks of ``|d_i|`` over the positive ``d_i`` has a known distribution: the sum of
    independent terms that are 0 or r_i with probability 1/2 each. It is computed exactly, by convolution over
    doubled midranks (integers, so ties in ``|d_i|`` are handled exactly), for up to ``EXACT_MAX`` non-zero
    terms; beyond that (O(n^3) work) the normal approximation with the exact mean and tie-corrected variance
    is used, which is then accurate far into the tail.
    """

    EXACT_MAX = 1000

    def __init__(self, abs_diff):
        a = np.abs(np.asarray(abs_diff, dtype=np.float64).ravel())
        a = a[a > 0]
        self.n = int(a.size)
        # Doubled midranks are integers; W2 = 2 W.
        self.ranks2 = np.rint(2 * ss.rankdata(a)).astype(np.int64) if a.size else np.zeros(0, np.int64)
        total = int(self.ranks2.sum())
        self.mean2, self.var2 = total / 2.0, float((self.ranks2.astype(np.float64) ** 2).sum()) / 4.0
        self.exact = self.n <= self.EXACT_MAX
        if self.exact:
            # pmf over W2 = 0..total, rescaled to max 1 after each step (log scale kept apart) so that
            # 2^-n never underflows.
            pmf, log_scale = np.zeros(total + 1), 0.0
            pmf[0], top = 1.0, 0
            for r in self.ranks2:
                pmf[r : top + r + 1] += pmf[: top + 1].copy()
                top += int(r)
                peak = pmf[: top + 1].max()
                pmf[: top + 1] /= peak
                log_scale += math.log(peak) - math.log(2.0)
            tail = np.cumsum(pmf[::-1])[::-1]
            with np.errstate(divide="ignore"):
                self._ln_sf = np.log(tail) + log_scale  # ln P(W2 >= w2)
                self._ln_pmf = np.log(pmf) + log_scale

    def ln_sf(self, w2: int) -> float:
        """ln P(W2 >= w2) under H0, W2 = twice the signed-rank statistic."""
        w2 = int(w2)
        if w2 <= 0:
            return 0.0
        if self.exact:
            return float(self._ln_sf[w2]) if w2 < self._ln_sf.size else float("-inf")
        # Continuity correction of half a doubled-rank unit (the lattice step of W2 is at least 1).
        z = (w2 - 0.5 - self.mean2) / math.sqrt(self.var2)
        return float(ss.norm.logsf(z))

    def pmf(self, w2: int) -> float:
        """P(W2 = w2) under H0 (for randomised p-values; 0 outside the support)."""
        w2 = int(w2)
        if self.exact:
            return float(np.exp(self._ln_pmf[w2])) if 0 <= w2 < self._ln_pmf.size else 0.0
        return float(math.exp(self.ln_sf(w2)) - math.exp(self.ln_sf(w2 + 1)))

    def statistic2(self, diff) -> int:
        """W2 for the signed differences ``diff`` whose magnitudes built this null (same order)."""
        d = np.asarray(diff, dtype=np.float64).ravel()
        d = d[d != 0]
        if d.size != self.n:
            raise ValueError(f"{d.size} non-zero differences, but the null was built for {self.n}")
        return int(self.ranks2[d > 0].sum())

    def log10_p(self, diff) -> float:
        """log10 P(W >= w_observed): the one-sided exact signed-rank test (large W = more positives)."""
        return to_log10(min(0.0, self.ln_sf(self.statistic2(diff))))


def permutation_log10_p(stat_secret: float, stats_control) -> float:
    """log10 of the key-level permutation p-value (1 + #{control >= secret}) / (M + 1).

    Larger statistic = more evidence of marking. Valid whenever the secret key is exchangeable
    with the control keys under H0; never smaller than 1/(M+1).
    """
    ctrl = np.asarray(stats_control, dtype=np.float64).ravel()
    if np.isnan(stat_secret) or np.any(np.isnan(ctrl)):
        raise ValueError("NaN statistic")
    ge = int(np.count_nonzero(ctrl >= stat_secret))
    return math.log10((1 + ge) / (ctrl.size + 1))


# --------------------------------------------------------------------------------------------
# Calibration.
# --------------------------------------------------------------------------------------------


def uniformity_report(pvalues) -> dict:
    """Calibration check of null p-values against U(0,1).

    Keys: n, ks_stat, ks_pvalue, fpr_05, fpr_01, count_05, count_05_bounds (two-sided 99% binomial
    interval for the count of p <= 0.05 under H0), count_05_within.
    """
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    n = p.size
    if n == 0:
        raise ValueError("no p-values")
    ks = ss.kstest(p, "uniform")
    count_05 = int(np.count_nonzero(p <= 0.05))
    lo, hi = ss.binom.interval(0.99, n, 0.05)
    return {
        "n": n,
        "ks_stat": float(ks.statistic),
        "ks_pvalue": float(ks.pvalue),
        "fpr_05": count_05 / n,
        "fpr_01": float(np.count_nonzero(p <= 0.01)) / n,
        "count_05": count_05,
        "count_05_bounds": (int(lo), int(hi)),
        "count_05_within": bool(lo <= count_05 <= hi),
    }


# --------------------------------------------------------------------------------------------
# Carriers.
# --------------------------------------------------------------------------------------------


def random_carriers(n: int, d: int, generator: torch.Generator) -> Tensor:
    """n i.i.d. uniform unit vectors in R^d (normalised Gaussians), float32, on the generator's device."""
    g = torch.randn(n, d, generator=generator, dtype=torch.float64, device=generator.device)
    # Normalise in float64 so the float32 rows are unit to rounding.
    return torch.nn.functional.normalize(g, dim=1).to(torch.float32)
