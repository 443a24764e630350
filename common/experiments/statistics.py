"""Paired statistics of the verdict tables (lowbit, finetune, compare, act_compare, w4a4).

Every variant of a comparison is sampled from the same noise per seed, so the per-seed differences d = B - A of a
metric are paired; with n seeds the one-sample t-test on d (n - 1 degrees of freedom) judges their mean. A table
asks many such questions at once (lowbit: ~100 cells), and at 5% each, about one in twenty "differences" of two
equal plans would be called real. Holm's step-down correction keeps the family-wise error of the whole table at
5%: sort the m p-values, p_(1) <= ... <= p_(m); the adjusted p_(i) is max_{j <= i} min(1, (m - j + 1) p_(j)); a
cell is called **better** only when its adjusted p < 0.05. It is uniformly more powerful than Bonferroni (m p) and
needs no independence between the tests (cells of one table share seeds and variants, so they are not).

Targets ("classifier-FID within +5 of fp32") are judged by the 95% t-interval of the per-seed difference to fp32:
met only when the whole interval lies within the target; a point estimate inside with an interval reaching
past it is reported as that, not as met.
"""
import math

import numpy as np

ALPHA = 0.05


def _clean(d) -> np.ndarray:
    d = np.asarray(d, dtype=float)
    return d[~np.isnan(d)]


def paired_test(d: np.ndarray):
    """(mean, s.e.m., significant) of paired per-seed differences ``d``: two-sided t-test at 5%, uncorrected.

    With 3 seeds the mean must exceed 4.3 standard errors; ``significant`` is None below 2 seeds.
    """
    p = paired_p(d)
    d = _clean(d)
    if len(d) == 0:
        return None, float("nan"), None
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), None
    return mean, float(d.std(ddof=1) / math.sqrt(len(d))), p < ALPHA


def paired_p(d: np.ndarray):
    """Two-sided p-value of the one-sample t-test of mean(d) = 0 (NaN entries dropped); None below 2 values.

    Equal differences on every seed (s.e.m. 0) give p = 0 when they are not 0 and p = 1 when they are: identical
    samples (two plans that chose the same formats) differ by exactly 0."""
    from scipy.stats import t as student_t

    d = _clean(d)
    if len(d) < 2:
        return None
    mean, sem = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    if sem == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    return float(2 * student_t.sf(abs(mean) / sem, len(d) - 1))


def holm(pvalues) -> list:
    """Holm-adjusted p-values, in the input's order; None (an untestable cell) stays None and does not count
    towards m."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    m, out, running = len(idx), list(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))  # monotone: never below an earlier step
        out[i] = running
    return out


def t_interval(d: np.ndarray, level: float = 0.95):
    """(mean, low, high) of the ``level`` t-interval of mean(d); None below 2 values."""
    from scipy.stats import t as student_t

    d = _clean(d)
    if len(d) < 2:
        return None
    mean, sem = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    half = float(student_t.ppf(0.5 + level / 2, len(d) - 1)) * sem
    return mean, mean - half, mean + half


def ratio_interval(num: np.ndarray, den: np.ndarray, level: float = 0.95, n_boot: int = 2000, seed: int = 0):
    """(low, high) of the ``level`` percentile-bootstrap interval of mean(num) / mean(den) where num[i] and den[i]
    belong to the same image (paired: both resampled with one index), e.g. two backends' per-image paired MSE.
    A few images whose digit changes carry most of a paired MSE, so one noise seed's ratio can sit far from
    another's; the interval says how far. Both 1-D, one value per image. None where they are not the same images
    (lengths differ: e.g. a row that ran a tenth of them), below 2 pairs, where a value is not finite (a diverged
    row) or where a resample's mean(den) is 0."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if num.ndim != 1 or den.ndim != 1:
        raise ValueError(f"ratio_interval takes one value per image on each side, got shapes {num.shape} and "
                         f"{den.shape}")
    if len(num) != len(den) or len(num) < 2 or not (np.isfinite(num).all() and np.isfinite(den).all()):
        return None
    idx = np.random.default_rng(seed).integers(0, len(num), (n_boot, len(num)))
    means = den[idx].mean(1)
    if (means <= 0).any():
        return None
    ratios = num[idx].mean(1) / means
    lo, hi = np.percentile(ratios, [50 - 50 * level, 50 + 50 * level])
    return float(lo), float(hi)


def paired_verdict(d: np.ndarray, names=("A", "B"), p_adjusted=None) -> str:
    """Table cell for paired per-seed differences B - A (lower is better: a positive mean favours A).

    ``p_adjusted``: the cell's p-value after the table's correction (``verdict_cells``); without it the cell is
    judged alone at 5%."""
    d = _clean(d)
    if len(d) == 0:
        return "–"
    mean = float(d.mean())
    if len(d) < 2:
        return f"{mean:+.3g} (one seed: no verdict)"
    sem = float(d.std(ddof=1) / math.sqrt(len(d)))
    p = paired_p(d) if p_adjusted is None else p_adjusted
    who = f"{names[0] if mean > 0 else names[1]} better" if p < ALPHA else "within noise"
    shown = "" if p_adjusted is None else f" (p_Holm {p:.2g})"
    return f"{mean:+.3g} ± {sem:.2g}{shown}: **{who}**"


def verdict_cells(diffs: list, names: list) -> list:
    """``paired_verdict`` of every difference of one table, significance decided by Holm over all of them.

    diffs: [per-seed differences B - A]; names: [(A, B)] alike. Returns the cells in the same order."""
    adjusted = holm([paired_p(d) for d in diffs])
    return [paired_verdict(d, n, p) for d, n, p in zip(diffs, names, adjusted, strict=True)]


def holm_note(m: int, alpha: float = ALPHA) -> str:
    """The sentence stated under a verdict table of ``m`` tested cells."""
    return (f"Multiple comparisons: Holm's correction over the {m} tested cells of this table (family-wise error "
            f"{alpha:.0%}); p_Holm is each cell's adjusted p-value, and a side is named **better** only when "
            f"p_Holm < {alpha:g}. One-seed cells are not tested.")


def tested(diffs: list) -> int:
    """How many of ``diffs`` have the two values a test needs."""
    return sum(len(_clean(d)) >= 2 for d in diffs)


def target_verdict(d: np.ndarray, target: float, level: float = 0.95):
    """(verdict, mean, low, high) of the per-seed difference to the reference ``d`` against ``target`` (the most
    the difference may be; lower is better): "target met" only when the ``level`` interval lies within it."""
    ci = t_interval(d, level)
    if ci is None:
        d = _clean(d)
        mean = float(d.mean()) if len(d) else float("nan")
        return ("one seed: no interval" if len(d) else "not measured"), mean, None, None
    mean, lo, hi = ci
    if hi <= target:
        return "target met", mean, lo, hi
    if mean <= target:
        return "point estimate within target, interval not", mean, lo, hi
    return f"target missed by {mean - target:.3g}", mean, lo, hi


def verdict_table(rows: list) -> list:
    """Markdown lines of a verdict table's body: ``rows`` [(label, [per-seed differences B - A, one per column],
    (A, B))] -> "| label | cell | ... |" per row, every cell judged with Holm over the whole table, then an empty
    line and the correction's note (the statement every verdict table carries under it)."""
    flat = [d for _, ds, _ in rows for d in ds]
    cells = iter(verdict_cells(flat, [n for _, ds, n in rows for _ in ds]))
    out = [f"| {label} | " + " | ".join(next(cells) for _ in ds) + " |" for label, ds, _ in rows]
    return out + ["", holm_note(tested(flat))]
