"""Rank statistics of the recoverability study: rank correlations, bootstrap intervals, percentiles.

Written out (not scipy calls) so that the study's numbers can be checked against scipy in the tests.
"""
import numpy as np


def average_ranks(values):
    """Ranks 1..n of `values`, ties sharing their mean rank (scipy.stats.rankdata 'average')."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a, b):
    """Pearson correlation of the average ranks."""
    ra, rb = average_ranks(a) - (len(a) + 1) / 2, average_ranks(b) - (len(b) + 1) / 2
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def kendall_tau_b(a, b):
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_a) (n0 - ties_b)) over all pairs."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    upper = np.triu_indices(len(a), k=1)
    s = (da * db)[upper].sum()
    n_a, n_b = (da[upper] != 0).sum(), (db[upper] != 0).sum()
    return float(s / np.sqrt(n_a * n_b)) if n_a and n_b else float("nan")


def bootstrap_interval(a, b, stat, n_boot=2000, level=0.95, seed=0):
    """Percentile bootstrap interval of stat(a, b), resampling the (a_i, b_i) pairs with replacement."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(a), len(a))
        v = stat(a[idx], b[idx])
        if np.isfinite(v):
            values.append(v)
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def percentile(value, population, lower_is_better=True):
    """Share (in %) of the OTHER members of `population` that are strictly worse than `value`.

    A member of the population is compared with the remaining n - 1 (one copy of its own value is
    left out), an outsider with all n; so the best subnet scores 100 and the worst 0.
    """
    pop = list(np.asarray(population, dtype=float))
    if value in pop:
        pop.remove(value)
    pop = np.asarray(pop)
    worse = (pop > value) if lower_is_better else (pop < value)
    return float(100.0 * worse.sum() / len(pop)) if len(pop) else float("nan")
