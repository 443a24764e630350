"""A sensitivity learned from measured configurations (Qua²SeDiMo's idea, our implementation).

Random weight configurations (one format per eligible tensor) drawn over a range of average bits are measured
on a small fixed calibration set: the final samples' paired MSE against the fp32 model's under the same noise
(mean and median over images) and the one-step noise-prediction error. A regularised, non-negative linear model
of the measured damage is fitted on them; because it is linear in per-tensor choices, the allocator can minimise
it exactly (its cost per tensor and format is a coefficient). Two feature sets are cross-validated:

* ``onehot``: one indicator per (tensor, format other than the reference): damage = b + sum beta[n, f_n];
* ``error``: each tensor's squared weight error in its format: damage = b + sum a_n ||W_n - Q_f(W_n)||^2, so
  a_n is a per-tensor sensitivity (the learned counterpart of the Fisher's mean) with 1 parameter per tensor;

* ``prior``: each tensor's cost under a prior sensitivity (the chain-aware Fisher): damage = b + sum a_n
  prior[n][f_n], a_n shrunk towards one common scale rather than towards 0;

``onehot`` and ``error`` on the damage itself or on its logarithm (damage saturates: a few layers at low bits
already cost as much as the worst mixes), with the ridge strength. Coefficients are non-negative (bounded least
squares on the ridge-augmented system), so no format is ever predicted to *help*, which an exact optimiser would
otherwise exploit.

A coefficient shrunk to 0 is what an optimiser exploits too: a tensor the random configurations say little about
costs nothing to the ``onehot`` and ``error`` fits, and the allocator then puts it at the lowest format (on the
released baseline that made every ``learned`` plan collapse, classifier-FID ~570). So, with a prior:

* the ``prior`` fit's multipliers are bounded below, a_n >= ``floor`` x the common scale, not only shrunk towards
  it: no tensor's cost can vanish;
* the fit is chosen by the one-standard-error rule (the most constrained fit whose cross-validated tau is within
  one standard error over the folds of the best: ``prior`` before ``error`` before ``onehot``, then the strongest
  ridge), not by the best tau alone, whose ties went to whichever kind came first in the list;
* whatever kind is chosen, the costs handed to the allocator are at least ``floor`` x (the fit's typical ratio of
  coefficient to prior) x the prior's cost of that tensor and format (``Predictor.costs``);
* ``refit_with_plans`` adds the allocator's own choices, measured, to the training set and refits, a few rounds
  (active learning): the random configurations rarely visit the corners the allocator goes to;
* ``select_by_plans`` then judges candidate fits (ridge strengths and floors of ``prior``, the cross-validated
  fit, the prior itself) by what matters: the measured damage of the plans each allocates. Cross-validated tau
  over random mixes rewards ranking the average bits, which the allocator holds fixed; a fit that ranks the mixes
  best still sent the wrong tensors to int2 (released baseline: +149 classifier-FID at 3 bits against the prior's
  +37). With the prior among the candidates as the reference, a fit replaces it only where its plans do no more
  damage at every budget and menu, and less on average.
"""
import copy
import math
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion.samplers import sample


def config_bits(config: dict, bits: dict, fixed_bits: int) -> int:
    """Stored bits of a configuration {tensor: format}; ``bits`` {tensor: {format: bits}}."""
    return fixed_bits + sum(bits[n][f] for n, f in config.items())


def random_configs(bits: dict, fixed_bits: int, total_params: int, lo: float, hi: float, n: int, seed: int,
                   tol: float = 0.05) -> list:
    """``n`` random configurations whose average bits per weight lie in [target - tol, target], the target drawn
    uniformly from [lo, hi] for each: start from a random format per tensor, then lower (or raise) random
    tensors to a random smaller (larger) format until the average fits. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    names = sorted(bits)
    out = []
    for _ in range(n):
        target = rng.uniform(lo, hi)
        cfg = {m: rng.choice(sorted(bits[m])) for m in names}
        for _ in range(20 * len(names)):
            avg = config_bits(cfg, bits, fixed_bits) / total_params
            if target - tol <= avg <= target:
                break
            m = names[rng.integers(len(names))]
            here = bits[m][cfg[m]]
            options = [f for f in bits[m] if (bits[m][f] < here if avg > target else bits[m][f] > here)]
            if options:
                cfg[m] = str(rng.choice(sorted(options)))
        out.append({m: str(f) for m, f in cfg.items()})
    return out


class ConfigMeasurer:
    """Measures weight configurations of one model under fixed calibration noise.

    entries: {tensor: {format: de-quantized weight}} (built from stored files); samples come from a working
    copy of ``model`` with those weights swapped in. ``eps_inputs``: (x_t, t) pairs for the one-step error.
    """

    def __init__(self, model, sampler, shape, entries, n_images, batch_size, eps_inputs, device="cpu", fixed=None):
        self.fp32, self.sampler, self.shape, self.entries = model, sampler, shape, entries
        self.n_images, self.batch_size, self.device = n_images, batch_size, device
        self.work = copy.deepcopy(model).eval()
        self.params = dict(self.work.named_parameters())
        with torch.no_grad():  # tensors every configuration shares (e.g. the first and last conv at their format)
            for n, v in (fixed or {}).items():
                self.params[n].copy_(v)
        self.eps_inputs = eps_inputs
        self._ref = {}
        with torch.inference_mode():
            self.eps_ref = model(*eps_inputs)  # the fp32 model's: damage is measured against it

    def reference(self, seed: int) -> torch.Tensor:
        if seed not in self._ref:
            self._ref[seed] = self._sample(self.fp32, seed)
        return self._ref[seed]

    def _sample(self, model, seed):
        x = sample(model, self.sampler, self.n_images, self.shape, seed, self.batch_size, self.device,
                   progress=False)
        return (x.clamp(-1, 1) + 1) / 2

    def load(self, config: dict):
        with torch.no_grad():
            for n, f in config.items():
                self.params[n].copy_(self.entries[n][f])

    def measure_images(self, config: dict, seed: int) -> torch.Tensor:
        """Each image's paired MSE vs fp32 ([0, 1] pixels) under noise ``seed``."""
        self.load(config)
        return (self._sample(self.work, seed) - self.reference(seed)).pow(2).flatten(1).mean(1)

    def measure(self, config: dict, seed: int) -> dict:
        """{"mse_mean", "mse_median": per-image paired MSE vs fp32 ([0, 1] pixels), "eps_mse"}."""
        per_image = self.measure_images(config, seed)
        with torch.inference_mode():
            eps = self.work(*self.eps_inputs)
        return {"mse_mean": float(per_image.mean()), "mse_median": float(per_image.median()),
                "eps_mse": float((eps - self.eps_ref).pow(2).mean())}


def measure_all(measurer, configs, seed, progress=True, desc="configurations") -> list:
    t0 = time.time()
    out = [measurer.measure(c, seed) for c in tqdm(configs, desc=desc, disable=not progress)]
    for r in out:
        r["seconds"] = (time.time() - t0) / max(1, len(out))
    return out


# ----------------------------------------------------------------------------- the model of measured damage
class Predictor:
    """damage ~ intercept + sum_n coef[n][f_n] (on log(damage) for target "log").

    ``prior`` {tensor: {format: cost}} and ``floor``: the allocator's costs are bounded below by the prior
    (``costs``); without a prior they are the coefficients."""

    def __init__(self, kind, target, alpha, coef, intercept, reference, prior=None, floor=0.0):
        self.kind, self.target, self.alpha = kind, target, alpha
        self.coef, self.intercept, self.reference = coef, intercept, reference
        self.prior, self.floor = prior, floor
        self.active = 0  # measured plans of its own allocator among the training configurations
        self.selection = None  # select_by_plans' table, where this predictor was chosen by it

    @classmethod
    def of_prior(cls, prior, reference, floor=0.0):
        """The prior's own costs as a predictor (infinite ridge towards it): allocates as the prior does."""
        return cls("prior", "raw", math.inf, {n: dict(fs) for n, fs in prior.items()}, 0.0, reference, prior, floor)

    def costs(self) -> dict:
        """{tensor: {format: cost}} for the allocator: max(coefficient, floor x s x prior cost), s the median ratio
        of coefficient to prior cost where both are positive (the fit's own units: damage or log damage), so a
        coefficient of 0 never makes a format free where the prior says it costs something."""
        if not self.prior or self.floor <= 0:
            return self.coef
        ratios = [self.coef[n][f] / self.prior[n][f] for n in self.coef for f in self.coef[n]
                  if self.coef[n][f] > 0 and self.prior[n].get(f, 0) > 0]
        s = float(np.median(ratios)) if ratios else 1.0
        return {n: {f: max(v, self.floor * s * self.prior[n].get(f, 0.0)) for f, v in fs.items()}
                for n, fs in self.coef.items()}

    def predict(self, config: dict) -> float:
        return self.intercept + sum(self.coef[n][f] for n, f in config.items())

    def describe(self) -> dict:
        return {"kind": self.kind, "target": self.target, "alpha": _finite(self.alpha), "intercept": self.intercept,
                "reference_format": self.reference, "floor": self.floor, "active": self.active,
                "selection": self.selection}


def _design(configs, names, formats, kind, per_format, reference):
    """Design matrix and its columns: indicators per (tensor, non-reference format), or per tensor the value
    ``per_format[kind][n][f_n]`` of its format in the configuration."""
    if kind == "onehot":
        cols = [(n, f) for n in names for f in formats if f != reference]
        index = {c: i for i, c in enumerate(cols)}
        X = np.zeros((len(configs), len(cols)))
        for r, c in enumerate(configs):
            for n in names:
                if c[n] != reference:
                    X[r, index[(n, c[n])]] = 1.0
        return X, cols
    X = np.array([[per_format[kind][n][c[n]] for n in names] for c in configs])
    return X, names


def _fit(X, y, alpha, center=None, lower=0.0):
    """min ||X b + c - y||^2 + alpha ||b - center||^2 over b >= lower and a free intercept c (columns scaled to unit
    RMS first, so alpha means the same for every feature set). ``center``: what b shrinks towards (0 = none)."""
    from scipy.optimize import lsq_linear

    scale = np.sqrt((X ** 2).mean(0))
    scale[scale == 0] = 1.0
    Xs = X / scale
    k = Xs.shape[1]
    center_s = np.zeros(k) if center is None else np.broadcast_to(center, (k,)) * scale
    A = np.vstack([np.hstack([Xs, np.ones((len(y), 1))]), np.hstack([math.sqrt(alpha) * np.eye(k), np.zeros((k, 1))])])
    b = np.concatenate([y, math.sqrt(alpha) * center_s])
    lo = np.broadcast_to(np.asarray(lower, dtype=float), (k,)) * scale
    sol = lsq_linear(A, b, bounds=(np.r_[lo, -np.inf], np.full(k + 1, np.inf))).x
    return sol[:k] / scale, sol[k]


def _transform(y, target):
    return np.log(np.maximum(y, 1e-12)) if target == "log" else np.asarray(y)


def _center(kind, X, y):
    """``prior`` shrinks every tensor's multiplier towards one common scale (the prior's calibration, a
    least-squares fit of the damage on the summed prior); the other kinds towards 0."""
    if kind != "prior":
        return None
    s, _ = _fit(X.sum(1, keepdims=True), y, 0.0)
    return s[0]


KINDS = {"onehot": ("log", "raw"), "error": ("log", "raw"), "prior": ("raw",)}
CONSTRAINED = ("prior", "error", "onehot")  # most constrained first: the one-standard-error rule's preference


def _fit_kind(kind, X, y, alpha, floor):
    """(coefficients, intercept) of one kind; ``prior``: shrunk towards the common scale s, bounded by floor x s."""
    center = _center(kind, X, y)
    lower = 0.0 if center is None else floor * center
    return _fit(X, y, alpha, center, lower)


def one_standard_error(table) -> dict:
    """The row of the cross-validation table to keep: among the rows whose cv_tau is within one standard error
    (over the folds) of the best, the most constrained kind, then the strongest ridge."""
    ok = [r for r in table if r["cv_tau"] == r["cv_tau"]]
    if not ok:  # no fold could be scored (too few configurations): nothing to choose by, so the most constrained
        return min(table, key=lambda r: (CONSTRAINED.index(r["kind"]), -r["alpha"]))
    best = max(ok, key=lambda r: r["cv_tau"])
    near = [r for r in ok if r["cv_tau"] >= best["cv_tau"] - np.nan_to_num(best["cv_sem"])]
    return min(near, key=lambda r: (CONSTRAINED.index(r["kind"]), -r["alpha"]))


def fit_predictor(configs, damage, names, formats, sq_error, reference, prior=None,
                  alphas=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0), folds=5, seed=0, floor=0.1, chosen=None):
    """The (kind, target, alpha) with the best mean Kendall tau over ``folds`` cross-validation folds of the
    training configurations, refitted on all of them. Kinds: ``onehot`` and ``error`` (see the module's
    docstring) and, with ``prior`` {tensor: {format: cost}} (e.g. the chain-aware Fisher's estimate),
    ``prior``: damage = b + sum a_n prior[n][f_n] with a_n >= floor x s shrunk towards one common scale s, so a
    tensor the measurements say little about keeps the prior's estimate instead of a free zero. The fit is chosen
    by ``one_standard_error``; ``chosen`` (a row of an earlier table) skips the cross-validation and refits that
    kind, target and alpha (a refit with a few more configurations: the grid costs minutes at full scale).
    Returns (Predictor, cross-validation table)."""
    from scipy.stats import kendalltau  # on first use (start-up time)

    damage = np.asarray(damage, dtype=float)
    order = np.random.default_rng(seed).permutation(len(configs))
    parts = np.array_split(order, folds)
    per_format = {"error": sq_error, "prior": prior}
    kinds = [k for k in KINDS if k != "prior" or prior is not None]
    table = [] if chosen is None else [chosen]
    with warnings.catch_warnings():  # tiny folds (tests) and constant predictions give NaN taus: skipped below
        warnings.simplefilter("ignore")
        for kind in kinds if chosen is None else ():
            X, _ = _design(configs, names, formats, kind, per_format, reference)
            for target in KINDS[kind]:
                y = _transform(damage, target)
                for alpha in alphas:
                    taus = []
                    for k in range(folds):
                        test = parts[k]
                        train = np.concatenate([parts[j] for j in range(folds) if j != k])
                        b, c = _fit_kind(kind, X[train], y[train], alpha, floor)
                        if len(test) >= 3:
                            taus.append(kendalltau(X[test] @ b + c, damage[test]).statistic)
                    taus = [t for t in taus if t == t]
                    table.append({"kind": kind, "target": target, "alpha": alpha,
                                  "cv_tau": float(np.mean(taus)) if taus else float("nan"),
                                  "cv_sem": float(np.std(taus, ddof=1) / math.sqrt(len(taus))) if len(taus) > 1
                                  else float("nan")})
    best = one_standard_error(table)
    X, cols = _design(configs, names, formats, best["kind"], per_format, reference)
    y = _transform(damage, best["target"])
    b, c = _fit_kind(best["kind"], X, y, best["alpha"], floor)
    if best["kind"] == "onehot":
        coef = {n: {f: 0.0 for f in formats} for n in names}
        for (n, f), v in zip(cols, b, strict=True):
            coef[n][f] = float(v)
    else:
        coef = {n: {f: float(a * per_format[best["kind"]][n][f]) for f in formats}
                for n, a in zip(names, b, strict=True)}
    return Predictor(best["kind"], best["target"], best["alpha"], coef, float(c), reference, prior, floor), table


def refit_with_plans(fit, allocate_plans, measure, configs, damage, rounds, cv=None):
    """Active learning: fit, allocate with the fit, measure those plans, add them to the training set, refit;
    ``rounds`` times or until the allocator proposes nothing new.

    fit(configs, damage, chosen) -> (Predictor, cv table), ``chosen`` None (cross-validate) or the first fit's
    row of its table (refit that); allocate_plans(predictor) -> [configuration] (e.g. one per budget and menu);
    measure(configuration) -> damage. ``cv``: the first fit's table from an earlier run on the same training
    configurations (its choice is refitted without the cross-validation, which gives the same predictor).
    Returns (Predictor, the first fit's cv table, [(config, damage)] added)."""
    configs, damage, added = list(configs), list(damage), []
    seen = {_key(c) for c in configs}
    if cv is None:
        pred, cv = fit(configs, damage, None)
    else:
        pred, _ = fit(configs, damage, one_standard_error(cv))
    chosen = one_standard_error(cv)  # kept for the refits (a few more configurations; the grid costs minutes)
    for _ in range(rounds):
        new = []
        for c in allocate_plans(pred):
            if _key(c) not in seen:
                seen.add(_key(c))
                new.append((c, measure(c)))
        if not new:
            break
        added += new
        configs += [c for c, _ in new]
        damage += [d for _, d in new]
        pred, _ = fit(configs, damage, chosen)
    pred.active = len(added)
    return pred, cv, added


def select_by_plans(candidates: dict, allocate_plans, measure, reference=None) -> tuple:
    """The candidate whose plans do the least measured damage: ``candidates`` {name: Predictor} in order of
    preference (a tie goes to the earlier); allocate_plans(predictor) -> [configuration] (one per budget and menu,
    the same budgets for every candidate); measure(configuration) -> damage (a cache makes a plan two candidates
    share cost one measurement). Score: the mean log damage over the plans, so every budget counts alike rather
    than the lowest one's larger damage deciding. With ``reference`` (a candidate's name, the prior), only
    candidates whose plans do no more damage than the reference's at *every* budget and menu may replace it: the
    mean alone let a fit trade a loss at one budget for a gain at another (DiT release: 20% more damage at
    4 bits for less at 3.5), which is exactly what "no worse at any budget" forbids. Returns (name, Predictor
    with ``selection`` set, table); each row says whether it was ``eligible``."""
    if reference is not None and reference not in candidates:
        raise ValueError(f"reference candidate {reference!r} is not among {sorted(candidates)}")
    table = []
    for name, pred in candidates.items():
        damage = [float(measure(c)) for c in allocate_plans(pred)]
        score = float(np.mean(np.log(np.maximum(damage, 1e-12)))) if damage else math.inf
        table.append({"name": name, "kind": pred.kind, "alpha": _finite(pred.alpha), "floor": pred.floor,
                      "plan_damage": damage, "score": score})
    ref = next((r for r in table if r["name"] == reference), None)
    for row in table:  # plans of another count (a budget infeasible for one candidate) cannot be compared
        row["eligible"] = ref is None or row is ref or (
            len(row["plan_damage"]) == len(ref["plan_damage"]) and
            all(d <= r for d, r in zip(row["plan_damage"], ref["plan_damage"], strict=True)))
    # least score; on equal scores the reference, then the earlier candidate
    best = min((i for i, r in enumerate(table) if r["eligible"]),
               key=lambda i: (table[i]["score"], table[i] is not ref, i))
    for i, row in enumerate(table):
        row["chosen"] = i == best
    name = table[best]["name"]
    chosen = candidates[name]
    chosen.selection = table
    return name, chosen, table


def _finite(x):
    """JSON has no infinity: the prior's own ridge strength is recorded as null."""
    return None if math.isinf(x) else x


def _key(config: dict) -> tuple:
    return tuple(sorted(config.items()))
