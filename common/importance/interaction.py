"""A predictor of a whole configuration's damage that sees interactions (issue 32's "per-stage saturation").

Every sensitivity of ``lowbit`` is additive: the damage of a configuration {tensor: format} is the sum of its
tensors' costs. Within a budget band that ranks the final samples' damage poorly (Kendall tau <= 0.53 on the
released U-Net), and fits of per-tensor multipliers to 150 measured configurations did no better. This model adds
what an additive one cannot express and fits it to many cheaply measured configurations:

    log damage ~ b + sum_(n, f) a_(n, f) [f_n = f]               one indicator per (tensor, format)
                   + c log P + sum_s d_s log P_s                  saturation: the prior's total and per-stage cost
                   + sum_(s <= t) e_st log P_s log P_t            pairwise interaction of the stages

where P_s is the prior's (the chain-aware Fisher's) summed cost of stage s's tensors in the configuration. The
fit is ridge regression on standardised columns (closed form), its strength chosen by ``folds``-fold
cross-validation on what the model is judged by: Kendall tau *within* budget bands of the training
configurations, averaged over the bands (so ranking the average bits, which an allocation holds fixed, earns
nothing). It predicts whole configurations, so it ranks candidates (the τ tables, the search's proposals), not
per-tensor costs for the exact allocator.
"""
import math

import numpy as np

ALPHAS = (30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)


def _log(x):
    return np.log(np.maximum(np.asarray(x, dtype=float), 1e-30))


class InteractionPredictor:
    """log damage of a configuration from its formats, the prior's per-stage costs and their pairwise products.

    names: the tensors; formats: every format a configuration may use; prior: {tensor: {format: cost}};
    groups: {tensor: stage} (tensors outside the stages share one group)."""

    def __init__(self, names, formats, prior, groups, alpha=1000.0):
        self.names, self.formats, self.prior = list(names), list(formats), prior
        self.groups = {n: groups.get(n) or "other" for n in self.names}
        self.stages = sorted(set(self.groups.values()))
        self.alpha = alpha
        self.column = {(n, f): i for i, (n, f) in enumerate((n, f) for n in self.names for f in self.formats)}
        self.mean = self.scale = self.weights = None
        self.intercept = 0.0
        self.cv = None  # the cross-validation table the strength was chosen by

    def features(self, configs) -> np.ndarray:
        k, s = len(self.column), len(self.stages)
        X = np.zeros((len(configs), k + 1 + s))
        for r, c in enumerate(configs):
            for n in self.names:
                X[r, self.column[(n, c[n])]] = 1.0
                X[r, k + 1 + self.stages.index(self.groups[n])] += self.prior[n][c[n]]
        X[:, k] = X[:, k + 1:].sum(1)
        X[:, k:] = _log(X[:, k:])
        stage = X[:, k + 1:]
        i, j = np.triu_indices(s)
        return np.hstack([X, stage[:, i] * stage[:, j]])

    def _solve(self, X, y, alpha):
        mean, scale = X.mean(0), X.std(0)
        scale[scale == 0] = 1.0  # a column constant over the training set carries nothing
        Z = (X - mean) / scale
        w = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ (y - y.mean()))
        return mean, scale, w, float(y.mean())

    def fit(self, configs, damage, bits=None, bands=None, alphas=ALPHAS, folds=5, seed=0):
        """Fit to measured ``damage`` (> 0) of ``configs``; the ridge strength from ``alphas`` by cross-validated
        tau within ``bands`` ([(lo, hi)] of ``bits``, each configuration's average bits; without them, tau over
        all), the strongest on a tie or where no fold can be scored. Returns self."""
        X, y = self.features(configs), _log(damage)
        bits = np.zeros(len(y)) if bits is None else np.asarray(bits, dtype=float)
        bands = bands or [(-math.inf, math.inf)]
        order = np.random.default_rng(seed).permutation(len(y))
        parts = [p for p in np.array_split(order, folds) if len(p)]
        table = []
        if len(alphas) > 1 and len(parts) > 1:
            for alpha in alphas:
                scores = []
                for k, test in enumerate(parts):
                    train = np.concatenate([p for j, p in enumerate(parts) if j != k])
                    mean, scale, w, b = self._solve(X[train], y[train], alpha)
                    scores.append(band_mean_tau(((X[test] - mean) / scale) @ w + b, y[test], bits[test], bands))
                scores = [s for s in scores if s == s]
                table.append({"alpha": alpha, "cv_tau": float(np.mean(scores)) if scores else None})  # JSON: null
            ok = [r for r in table if r["cv_tau"] is not None]
            self.alpha = max(ok, key=lambda r: (r["cv_tau"], r["alpha"]))["alpha"] if ok else max(alphas)
        else:  # nothing to choose by (one strength, or too few configurations to fold): the strongest
            self.alpha = max(alphas)
        self.cv = table
        self.mean, self.scale, self.weights, self.intercept = self._solve(X, y, self.alpha)
        return self

    def predict_log(self, configs) -> np.ndarray:
        """The predicted log damage of every configuration (what ranks them: no overflow far outside the data)."""
        if self.weights is None:
            raise RuntimeError("InteractionPredictor.predict before fit")
        return ((self.features(configs) - self.mean) / self.scale) @ self.weights + self.intercept

    def predict(self, configs) -> np.ndarray:
        """The predicted damage (not its log) of every configuration."""
        return np.exp(self.predict_log(configs))

    def describe(self) -> dict:
        return {"kind": "interaction", "alpha": self.alpha, "features": len(self.weights),
                "stages": self.stages, "cv": self.cv}


def band_mean_tau(pred, y, bits, bands) -> float:
    """Kendall tau of ``pred`` against ``y`` within each band of ``bits`` holding at least 4 configurations,
    averaged over those bands (NaN where none does)."""
    from scipy.stats import kendalltau  # on first use (start-up time)

    taus = []
    for lo, hi in bands:
        sel = (bits >= lo) & (bits < hi)
        if sel.sum() >= 4:
            t = kendalltau(pred[sel], y[sel]).statistic
            if t == t:
                taus.append(t)
    return float(np.mean(taus)) if taus else float("nan")
