"""Tests for radmark.detection.stats: exact nulls, log-space combination, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special as sc
import scipy.stats as ss
import torch

from radmark.detection.stats import (
    SignedRankNull,
    cosine_null_logsf,
    fisher_log_p,
    permutation_log10_p,
    random_carriers,
    sign_test_log10_p,
    to_log10,
    uniformity_report,
    whitebox_cosines,
    whitebox_test,
)


def _mc_cosines(d: int, n: int, seed: int) -> np.ndarray:
    """Cosines between e_1 and n uniform random unit vectors in R^d."""
    z = np.random.default_rng(seed).standard_normal((n, d))
    return z[:, 0] / np.linalg.norm(z, axis=1)


# ------------------------------------------------------------------ per-class null


@pytest.mark.parametrize(
    "d, ts",
    [
        (16, [-0.6, -0.3, -0.05, 0.0, 0.1, 0.3, 0.5, 0.7]),
        (512, [-0.1, -0.04, 0.0, 0.02, 0.05, 0.1, 0.13]),
    ],
)
def test_cosine_null_matches_monte_carlo(d, ts):
    n = 20000
    s = _mc_cosines(d, n, seed=d)
    for t in ts:
        p_theory = float(np.exp(cosine_null_logsf(t, d)))
        p_emp = float(np.mean(s >= t))
        sd = math.sqrt(p_theory * (1 - p_theory) / n)
        assert abs(p_emp - p_theory) <= 5 * sd + 1e-4, (d, t, p_emp, p_theory)
    # p-values of null cosines are U(0,1).
    p = np.exp(cosine_null_logsf(s, d))
    assert ss.kstest(p, "uniform").pvalue > 0.01


def test_cosine_null_edges_and_symmetry():
    d = 64
    assert cosine_null_logsf(0.0, d) == pytest.approx(math.log(0.5), abs=1e-14)
    assert cosine_null_logsf(-1.0, d) == 0.0
    assert cosine_null_logsf(-2.0, d) == 0.0  # clipped
    assert cosine_null_logsf(1.0, d) == -np.inf  # documented: exactly 1 has P = 0
    assert np.isnan(cosine_null_logsf(np.nan, d))
    t = np.array([0.05, 0.2, 0.4])
    # P(s >= t) + P(s >= -t) = 1 by symmetry.
    np.testing.assert_allclose(
        np.exp(cosine_null_logsf(t, d)) + np.exp(cosine_null_logsf(-t, d)), 1, atol=1e-14
    )
    # Scalar in, scalar out; array shape preserved.
    assert np.ndim(cosine_null_logsf(0.3, d)) == 0
    assert cosine_null_logsf(np.zeros((2, 3)), d).shape == (2, 3)
    with pytest.raises(ValueError):
        cosine_null_logsf(0.1, 1)


def test_cosine_null_finite_where_scipy_underflows():
    mpmath = pytest.importorskip("mpmath")
    d, t = 2048, 0.99
    a = (d - 1) / 2
    assert sc.betainc(a, 0.5, 1 - t * t) == 0.0  # scipy underflows here
    got = float(cosine_null_logsf(t, d))
    assert np.isfinite(got)
    with mpmath.workdps(40):
        ma = mpmath.mpf(d - 1) / 2
        x = 1 - mpmath.mpf("0.99") ** 2
        ref = float(mpmath.log(mpmath.betainc(ma, 0.5, 0, x, regularized=True) / 2))
        # Independent check: integrate the density (1 - s^2)^((d-3)/2) / B((d-1)/2, 1/2).
        tt = mpmath.mpf("0.99")
        pts = [tt + (1 - tt) * k / mpmath.mpf(1000) for k in (0, 1, 2, 5, 10, 20, 50, 100, 1000)]
        dens = lambda s: (1 - s * s) ** ((d - 3) / mpmath.mpf(2))  # noqa: E731
        ref_quad = float(mpmath.log(mpmath.quad(dens, pts)) - mpmath.log(mpmath.beta(ma, 0.5)))
    assert got == pytest.approx(ref, rel=1e-11)
    assert got == pytest.approx(ref_quad, rel=1e-9)
    assert to_log10(got) < -1700


@pytest.mark.parametrize("d", [16, 2048, 1_000_000])
def test_cosine_null_finite_and_monotone(d):
    t = np.linspace(-0.999, 0.999, 4001)
    v = cosine_null_logsf(t, d)
    assert np.all(np.isfinite(v))
    assert np.all(np.diff(v) <= 0)
    assert np.all(np.diff(v[t > 0.01]) < 0)


def test_continued_fraction_agrees_with_scipy_where_scipy_is_finite():
    from radmark.detection.stats import _log_betainc_cf

    for d in (16, 512, 2048, 100_000):
        a = (d - 1) / 2
        for t in (0.3, 0.5, 0.8, 0.95):
            if t * t < 4.0 / d:
                continue
            x = 1 - t * t
            ref = sc.betainc(a, 0.5, x)
            if ref < 1e-290:
                continue
            cf = a * math.log1p(-t * t) + math.log(t) + _log_betainc_cf(a, 0.5, np.array([x]))[0]
            assert cf == pytest.approx(math.log(ref), rel=1e-12, abs=1e-12)
    # Right at the hand-over (scipy value ~1e-285, still a normal float): no jump.
    for d in (512, 2048, 100_000):
        a = (d - 1) / 2
        lo, hi = 0.0, 1.0
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sc.betainc(a, 0.5, 1 - mid * mid) > 1e-285 else (lo, mid)
        t = lo
        ref = math.log(0.5 * sc.betainc(a, 0.5, 1 - t * t))
        cf = (
            math.log(0.5)
            + a * math.log1p(-t * t)
            + math.log(t)
            + _log_betainc_cf(a, 0.5, np.array([1 - t * t]))[0]
        )
        assert cf == pytest.approx(ref, rel=1e-10)
        assert float(cosine_null_logsf(t, d)) == pytest.approx(ref, rel=1e-10)
        assert float(cosine_null_logsf(t * (1 + 1e-9), d)) == pytest.approx(ref, rel=1e-6)


# ------------------------------------------------------------------ Fisher


def test_fisher_matches_scipy_where_finite():
    rng = np.random.default_rng(0)
    checked = 0
    for C in (1, 2, 5, 10, 100):
        for power in (0.3, 1.0, 5.0, 40.0):
            p = rng.uniform(size=C) ** power
            p = np.clip(p, 1e-300, 1)
            ref = ss.combine_pvalues(p, method="fisher").pvalue
            if not ref > 1e-250:
                continue
            got = fisher_log_p(np.log(p))
            assert got == pytest.approx(math.log(ref), rel=1e-9, abs=1e-11), (C, power)
            checked += 1
    assert checked >= 15


def test_fisher_finite_and_monotone_beyond_scipy():
    ln_1e100 = -100 * math.log(10)
    got = to_log10(fisher_log_p(np.full(10, ln_1e100)))
    assert np.isfinite(got) and got < -900
    # Closed form check: x/2 = 1000 ln 10, sf = e^{-x/2} Σ_{i<10} (x/2)^i / i!
    h = 1000 * math.log(10)
    ref = -h + sc.logsumexp([i * math.log(h) - sc.gammaln(i + 1) for i in range(10)])
    assert got == pytest.approx(ref / math.log(10), rel=1e-12)
    vals = [fisher_log_p(np.full(10, -k * math.log(10))) for k in (1, 10, 50, 100, 300, 1000, 3000, 1e5)]
    assert all(np.isfinite(vals))
    assert all(b < a for a, b in zip(vals, vals[1:], strict=False))
    # All p = 1 -> combined p = 1; one p = 0 -> -inf.
    assert fisher_log_p(np.zeros(5)) == 0.0
    assert fisher_log_p(np.array([-np.inf, -1.0])) == -np.inf
    with pytest.raises(ValueError):
        fisher_log_p(np.array([0.5]))


# ------------------------------------------------------------------ white-box


def _planted(C, d, a, seed):
    g = torch.Generator().manual_seed(seed)
    u = random_carriers(C, d, g).double()
    noise = torch.randn(C, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return u, a * u + noise


def test_whitebox_planted_identity():
    C, d = 10, 64
    u, W = _planted(C, d, a=0.5, seed=1)
    cos = whitebox_cosines(W, torch.empty(0, d), torch.empty(0, d), u, align=False)
    assert cos.shape == (C,) and cos.dtype == torch.float64
    direct = torch.nn.functional.cosine_similarity(W, u, dim=1)
    torch.testing.assert_close(cos, direct)
    res = whitebox_test(cos, d)
    assert res["log10_p"] < -10
    assert res["per_class_log10_p"].shape == (C,)
    assert 0.2 < res["cos_mean"] < 0.8
    # The same W without the planted carrier is not significant.
    _, W0 = _planted(C, d, a=0.0, seed=1)
    res0 = whitebox_test(whitebox_cosines(W0, torch.empty(0, d), torch.empty(0, d), u, align=False), d)
    assert res0["log10_p"] > -3


@pytest.mark.parametrize("ds", [96, 48])
def test_whitebox_planted_through_random_linear_map(ds):
    C, d, n = 10, 64, 400
    u, Wt0 = _planted(C, d, a=0.5, seed=2)
    g = torch.Generator().manual_seed(3)
    Fm = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = torch.randn(d, ds, generator=g, dtype=torch.float64)
    Fs = Fm @ A
    # Suspect's classifier in its own feature space: logits = f_s W^T = f_m A W^T, so its
    # marking-space equivalent is W A^T; choose W so that W A^T is (as close as possible to) Wt0.
    W = Wt0 @ torch.linalg.pinv(A.T)
    cos = whitebox_cosines(W.float(), Fm.float(), Fs.float(), u.float())
    assert cos.shape == (C,)
    if ds > d:  # exact recovery of the planted marking-space classifier
        torch.testing.assert_close(
            cos, torch.nn.functional.cosine_similarity(Wt0, u, dim=1), atol=1e-4, rtol=0
        )
    assert whitebox_test(cos, d)["log10_p"] < -10
    with pytest.raises(ValueError):
        whitebox_cosines(W, Fm, Fs, u, align=False)


def test_whitebox_underdetermined_alignment_runs():
    C, d, ds, n = 10, 64, 32, 40  # n < d: minimum-norm solution
    g = torch.Generator().manual_seed(4)
    Fm = torch.randn(n, d, generator=g)
    Fm[:, 5] = 0  # a dead feature: rank-deficient, must not break
    Fs = torch.randn(n, ds, generator=g)
    W = torch.randn(C, ds, generator=g)
    u = random_carriers(C, d, g)
    cos = whitebox_cosines(W, Fm, Fs, u)
    assert torch.all(torch.isfinite(cos)) and torch.all(cos.abs() <= 1 + 1e-12)
    assert np.isfinite(whitebox_test(cos, d)["log10_p"])


def test_whitebox_null_is_uniform_over_keys():
    C, d, ds, n, keys = 10, 32, 48, 200, 300
    g = torch.Generator().manual_seed(5)
    Fm = torch.randn(n, d, generator=g)
    Fs = Fm @ torch.randn(d, ds, generator=g) + 0.5 * torch.randn(n, ds, generator=g)
    W = torch.randn(C, ds, generator=g)  # independent of every key
    # The alignment does not depend on the key: solve it once (LAPACK calls are slow on a
    # loaded 2-core box) and check the full path agrees on a few keys.
    M = torch.linalg.lstsq(Fm.double(), Fs.double()).solution
    Wt = W.double() @ M.T
    pv, per_class = [], []
    for key in range(keys):
        u = random_carriers(C, d, torch.Generator().manual_seed(1000 + key))
        cos = whitebox_cosines(Wt, Fm, Fm, u, align=False)
        if key < 3:
            torch.testing.assert_close(cos, whitebox_cosines(W, Fm, Fs, u), atol=1e-9, rtol=0)
        res = whitebox_test(cos, d)
        pv.append(10 ** res["log10_p"])
        per_class.append(10 ** res["per_class_log10_p"])
    assert ss.kstest(pv, "uniform").pvalue > 0.01
    assert ss.kstest(np.concatenate(per_class), "uniform").pvalue > 0.01
    assert uniformity_report(pv)["count_05_within"]


# ------------------------------------------------------------------ black-box


def test_sign_test_matches_scipy_small_n():
    for n in (1, 2, 5, 10, 21, 50, 200):
        for wins in range(n + 1):
            ref = ss.binomtest(wins, n, 0.5, alternative="greater").pvalue
            got = sign_test_log10_p(wins, n)
            assert got == pytest.approx(math.log10(ref), rel=1e-9, abs=1e-12), (wins, n)
    with pytest.raises(ValueError):
        sign_test_log10_p(3, 2)


def test_sign_test_large_n_finite():
    n = 100_000
    assert sign_test_log10_p(n, n) == pytest.approx(-n * math.log10(2), rel=1e-10)
    assert sign_test_log10_p(n - 1, n) == pytest.approx(math.log10(n + 1) - n * math.log10(2), rel=1e-10)
    # n = 1e6 deep in the tail: within the Chernoff bounds
    # -n KL(q||1/2) - log(n+1) <= ln p <= -n KL(q||1/2).
    n, wins = 1_000_000, 600_000
    q = wins / n
    kl = q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q))
    got = sign_test_log10_p(wins, n) * math.log(10)
    assert -n * kl - math.log(n + 1) <= got <= -n * kl
    vals = [sign_test_log10_p(w, 2000) for w in range(1000, 2001, 25)]
    assert all(np.isfinite(vals)) and all(b < a for a, b in zip(vals, vals[1:], strict=False))


def test_signed_rank_matches_scipy_exact_without_ties():
    rng = np.random.default_rng(3)
    for n in (1, 4, 9, 20, 45):
        for shift in (-0.5, 0.0, 0.7):
            d = rng.standard_normal(n) + shift
            ref = ss.wilcoxon(d, alternative="greater", method="exact").pvalue
            assert SignedRankNull(d).log10_p(d) == pytest.approx(math.log10(ref), rel=1e-9, abs=1e-12)


def test_signed_rank_with_ties_matches_enumeration():
    # Ties in |d| (and a zero, dropped): scipy's exact method does not cover them, so enumerate all 2^n signs.
    d = np.array([1.0, -1.0, 2.0, 2.0, -3.0, 0.0, 3.0, 3.0, 0.5, -2.0])
    null = SignedRankNull(d)
    nz = d[d != 0]
    ranks = ss.rankdata(np.abs(nz))
    w_obs = ranks[nz > 0].sum()
    signs = np.array(np.meshgrid(*[[0, 1]] * nz.size)).reshape(nz.size, -1).T.astype(bool)
    w_all = (signs * ranks).sum(axis=1)
    assert 10 ** null.log10_p(d) == pytest.approx(np.mean(w_all >= w_obs - 1e-9), rel=1e-12)
    assert sum(null.pmf(w) for w in range(0, int(2 * ranks.sum()) + 1)) == pytest.approx(1.0, rel=1e-12)


def test_signed_rank_extreme_tail_is_finite_and_exact():
    n = 800  # all positive: P = 2^-n, far below float64's normal range after 1000 terms of raw probabilities
    d = np.linspace(0.1, 5.0, n)
    assert SignedRankNull(d).log10_p(d) == pytest.approx(-n * math.log10(2), rel=1e-9)
    big = np.random.default_rng(0).standard_normal(SignedRankNull.EXACT_MAX + 200) + 0.1
    approx = SignedRankNull(big).log10_p(big)
    ref = math.log10(ss.wilcoxon(big, alternative="greater", method="approx", correction=True).pvalue)
    assert approx == pytest.approx(ref, abs=0.02)


def test_permutation_p():
    assert permutation_log10_p(5.0, [1, 2, 3]) == pytest.approx(math.log10(1 / 4))
    assert permutation_log10_p(5.0, [5, 6, 1]) == pytest.approx(math.log10(3 / 4))
    assert permutation_log10_p(5.0, []) == 0.0
    # Under exchangeability the p-value is (super-)uniform.
    rng = np.random.default_rng(0)
    # 1 secret + 19 controls: p = (1 + ge) / 20 takes each value k/20 with probability 1/20.
    ps = np.array([10 ** permutation_log10_p(x[0], x[1:]) for x in rng.standard_normal((4000, 20))])
    for k in (1, 5, 10):
        frac = np.mean(ps <= k / 20 + 1e-12)
        assert abs(frac - k / 20) <= 4 * math.sqrt(k / 20 * (1 - k / 20) / 4000), (k, frac)


# ------------------------------------------------------------------ calibration & carriers


def test_uniformity_report():
    p = np.random.default_rng(1).uniform(size=5000)
    rep = uniformity_report(p)
    assert rep["n"] == 5000
    assert rep["ks_pvalue"] > 0.01
    assert rep["count_05_within"]
    lo, hi = rep["count_05_bounds"]
    assert lo < 250 < hi
    assert abs(rep["fpr_05"] - 0.05) < 0.015 and abs(rep["fpr_01"] - 0.01) < 0.006
    bad = uniformity_report(p**2)
    assert bad["ks_pvalue"] < 1e-6
    assert not bad["count_05_within"]
    assert bad["fpr_05"] > 0.15


def test_random_carriers():
    u = random_carriers(7, 33, torch.Generator().manual_seed(0))
    assert u.shape == (7, 33) and u.dtype == torch.float32
    torch.testing.assert_close(u.norm(dim=1), torch.ones(7), atol=1e-6, rtol=0)
    torch.testing.assert_close(u, random_carriers(7, 33, torch.Generator().manual_seed(0)), atol=0, rtol=0)
    assert not torch.equal(u, random_carriers(7, 33, torch.Generator().manual_seed(1)))
