"""How well each lowbit sensitivity predicts the damage, and how it is reported.

The primary score of a sensitivity is what its plans do: the measured final damage (paired MSE against fp32 under
calibration noise, ``lowbit.retest_seed``, never an evaluation seed and never the noise a predictor was fitted or a
search was run on) of the plan the exact allocator makes from it at every weight budget of ``lowbit.budgets``.

Rank correlation over random configurations is kept as a second view, but over the whole 2.4-4.5 bit range much
of any score's Kendall tau is the configuration's average bits (a random score gets ~0.4). Allocation happens
within one budget, so tau is reported per budget band, each with a bootstrap 95% interval (configurations of the
band resampled with replacement) beside the band's own test-retest ceiling (the same configurations measured
again under a second noise seed): a band whose ceiling is low cannot rank anything.
"""
import numpy as np

BANDS = ((0.0, 3.25), (3.25, 3.75), (3.75, 99.0))
SEARCH_FITNESS = "search fitness (measured)"  # a row of the τ tables that is a measurement, not a model
N_BOOT = 1000


def _tau(p, y):
    from scipy.stats import kendalltau  # on first use (start-up time)

    t = kendalltau(p, y).statistic
    return None if t != t else float(t)


def band_tau(p, y, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Kendall tau of ``p`` against ``y`` with a percentile bootstrap 95% interval; None below 4 points."""
    p, y = np.asarray(p, float), np.asarray(y, float)
    if len(p) < 4:
        return {"tau": None, "ci": None, "n": len(p)}
    rng = np.random.default_rng(seed)
    boots = [_tau(p[i], y[i]) for i in (rng.integers(0, len(p), len(p)) for _ in range(n_boot))]
    boots = [b for b in boots if b is not None]  # a resample of ties only has no tau
    ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else None
    return {"tau": _tau(p, y), "ci": ci, "n": len(p)}


def bands_tau(p, y, bits, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """{band: ``band_tau``} of ``p`` against ``y`` within each band of ``BANDS`` (``bits``: average bits)."""
    p, y, bits = np.asarray(p, float), np.asarray(y, float), np.asarray(bits, float)
    return {f"{lo:g}-{hi:g}": band_tau(p[sel], y[sel], n_boot, seed)
            for lo, hi in BANDS for sel in [(bits >= lo) & (bits < hi)]}


def predictor_quality(preds: dict, measured: list, retest: list, bits, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Every predictor's tau / rho on held-out configurations against the one-step error and the final damage,
    per band with bootstrap intervals; the test-retest ceiling over all and per band.

    preds: {name: predictions, one per configuration}; measured / retest: the configurations' measurements under
    the first and the second noise seed ({"mse_mean", "mse_median", "eps_mse"}); bits: their average bits."""
    from scipy.stats import spearmanr

    bits = np.asarray(bits, float)
    y = {k: np.array([r[k] for r in measured]) for k in ("eps_mse", "mse_mean", "mse_median")}
    second = {k: np.array([r[k] for r in retest]) for k in ("mse_mean", "mse_median")}
    rows = {}
    for name, p in preds.items():
        p = np.asarray(p, float)
        row = {f"tau_{k}": _tau(p, v) for k, v in y.items()}
        row.update({f"rho_{k}": float(spearmanr(p, v).statistic) for k, v in y.items()})
        row["bands"] = bands_tau(p, y["mse_mean"], bits, n_boot, seed)
        rows[name] = row
    return {"rows": rows, "n_heldout": len(measured),
            "ceiling_tau": _tau(y["mse_mean"], second["mse_mean"]),
            "ceiling_tau_median": _tau(y["mse_median"], second["mse_median"]),
            "ceiling_bands": bands_tau(y["mse_mean"], second["mse_mean"], bits, n_boot, seed),
            "band_counts": [int(((bits >= lo) & (bits < hi)).sum()) for lo, hi in BANDS]}


def image_statistic(per_image, statistic="mean", axis=-1):
    """A judge's fitness from its images' paired MSEs (along ``axis``): their mean, or (``geomean``) their geometric
    mean, floored at 1e-12 so an image reproduced exactly is not -inf. The geometric mean is less swayed by the few
    images whose quantized chain lands on another digit: at 16 images it ordered the released U-Net's searched
    3-bit plans as 256 images' mean does in 81% of pairs, the mean in 71% (docs/lowbit.md)."""
    per_image = np.asarray(per_image, float)
    if statistic == "geomean":
        return np.exp(np.log(np.maximum(per_image, 1e-12)).mean(axis))
    if statistic != "mean":
        raise ValueError(f"image_statistic: statistic must be 'mean' or 'geomean', got {statistic!r}")
    return per_image.mean(axis)


def judge_size_tau(per_image, measured: list, bits, statistic="mean") -> dict:
    """How many sampled images a measurement needs to rank within a band: the judge's per-image damages
    (configurations x images) split into disjoint groups of k images (k = 1, 2, 4, ... up to all of them); per
    band, the mean and the lowest Kendall tau of a group's damage (``image_statistic``) against the held-out mean
    damage. {k: {band: {"mean", "min", "groups"}}}."""
    per_image, bits = np.asarray(per_image, float), np.asarray(bits, float)
    y = np.array([r["mse_mean"] for r in measured])
    n = per_image.shape[1]
    sizes = sorted({min(2 ** i, n) for i in range(n.bit_length())} | {n})
    out = {}
    for k in sizes:
        groups = [image_statistic(per_image[:, j:j + k], statistic, 1) for j in range(0, n - k + 1, k)]
        out[str(k)] = {}  # str: the same keys after a round trip through predictors.json
        for lo, hi in BANDS:
            sel = (bits >= lo) & (bits < hi)
            taus = [t for t in (_tau(g[sel], y[sel]) if sel.sum() >= 4 else None for g in groups) if t is not None]
            out[str(k)][f"{lo:g}-{hi:g}"] = ({"mean": float(np.mean(taus)), "min": float(np.min(taus)),
                                         "groups": len(taus)} if taus else None)
    return out


def judge_size_lines(sizes: dict, rows: dict) -> list:
    """``judge_size_tau`` as a table, under it the best predictor per band for comparison."""
    if not sizes:
        return []
    bands = list(next(iter(sizes.values())))
    out = ["", "How many sampled images the measurement needs: the search's judge split into disjoint groups of k of "
               "its images; per band the mean τ of a group's damage against the held-out damage (the lowest group "
               "in brackets).", "",
           "| judge images | " + " | ".join(f"{b} bits" for b in bands) + " |", "|---|" + "---:|" * len(bands)]
    for k, row in sizes.items():
        g = next(iter(r["groups"] for r in row.values() if r), 0)
        out.append(f"| {k} (mean of {g} group{'' if g == 1 else 's'}) | " + " | ".join(
            "–" if row[b] is None else f"{row[b]['mean']:.2f} [{row[b]['min']:.2f}]" for b in bands) + " |")
    best = []
    for b in bands:
        cands = [(r["bands"][b]["tau"], name) for name, r in rows.items() if name != SEARCH_FITNESS
                 and r["bands"][b]["tau"] is not None]
        best.append("–" if not cands else f"{max(cands)[0]:.2f} ({max(cands)[1]})")
    out.append("| *best predictor* | " + " | ".join(best) + " |")
    return out


def curve_tau(preds: dict, measured: list, bits, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """The learning curve of a fitted model: {training configurations: ``bands_tau``} of each fit's predictions
    ({n: predictions of the held-out configurations}) against the held-out mean damage."""
    y = [r["mse_mean"] for r in measured]
    return {str(n): bands_tau(p, y, bits, n_boot, seed) for n, p in preds.items()}


def curve_lines(curve: dict, images, ceiling: dict) -> list:
    """``curve_tau`` as a table, the bands' test-retest ceiling under it."""
    if not curve:
        return []
    bands = list(next(iter(curve.values())))
    out = ["", f"The interaction predictor by the number of configurations it was fitted on ({images} images each; "
               "the first n of its measurements, n at least 20; ridge strength cross-validated at each n): "
               "held-out τ per band [bootstrap 95% interval].", "",
           "| training configurations | " + " | ".join(f"{b} bits" for b in bands) + " |",
           "|---|" + "---:|" * len(bands)]
    for n, row in curve.items():
        out.append(f"| {n} | " + " | ".join(_cell(row[b]) for b in bands) + " |")
    out.append("| *test–retest ceiling* | " + " | ".join(_cell(ceiling.get(b)) for b in bands) + " |")
    return out


def _cell(b) -> str:
    if b is None or b["tau"] is None:
        return "–"
    return f"{b['tau']:.2f}" + (f" [{b['ci'][0]:.2f}, {b['ci'][1]:.2f}]" if b["ci"] else "")


def _f(v) -> str:
    return "–" if v is None else f"{v:.2f}"


# the label of a re-ranked search's own best in the plan-damage table ("search (own pick)")
OWN_PICK = " (own pick)"


def plan_damage_lines(damage: dict, images: int, seed: int) -> list:
    """The primary score: {"<menu> <size>": {plan: {"mse_mean": ...}}} as a table, the best plan per column bold."""
    if not damage:
        return []
    cols = list(damage)
    plans = list(dict.fromkeys(p for c in cols for p in damage[c]))
    # a re-ranked search's own pick is a diagnostic beside its plan, never the column's best plan
    best = {c: min(r["mse_mean"] for p, r in damage[c].items() if not p.endswith(OWN_PICK)) for c in cols}
    out = [f"**Primary score: the damage of the plans each sensitivity allocates.** Paired MSE against fp32 of the "
           f"plan's weights (activations float) over {images} images of calibration noise (seed {seed}: no "
           f"evaluation seed, and not the noise any predictor was fitted or the search was run on); lower is better, "
           f"the best per column in bold.", "",
           "| plan | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for p in plans:
        cells = []
        for c in cols:
            r = damage[c].get(p)
            v = None if r is None else r["mse_mean"]
            cells.append("–" if v is None else (f"**{v:.3g}**" if v == best[c] else f"{v:.3g}"))
        out.append(f"| {f'*{p}*' if p.endswith(OWN_PICK) else p} | " + " | ".join(cells) + " |")
    return out


def quality_lines(q: dict, images) -> list:
    """The held-out tau tables (overall, then per band with intervals and the band's ceiling)."""
    if not q:
        return ["(no learned predictor in lowbit.plans: no measured configurations)"]
    bands = list(q["ceiling_bands"])
    out = [f"Held-out: {q['n_heldout']} of {q['n_train'] + q['n_heldout']} random configurations ({images} "
           f"images each, their own noise seed); per band {q['band_counts']}. Test–retest ceiling (the same held-out "
           f"configurations under a second noise seed): τ {_f(q['ceiling_tau'])} (mean damage), "
           f"{_f(q['ceiling_tau_median'])} (median).", "",
           "| predictor | τ one-step error | τ mean damage | ρ mean damage | τ median damage |",
           "|---|---:|---:|---:|---:|"]
    for name, r in q["rows"].items():
        out.append(f"| {name} | {_f(r['tau_eps_mse'])} | {_f(r['tau_mse_mean'])} | {_f(r['rho_mse_mean'])} | "
                   f"{_f(r['tau_mse_median'])} |")
    out += ["", "Within a budget band (where allocation happens): τ against the mean damage [bootstrap 95% interval, "
            f"{N_BOOT} resamples of the band's configurations]; the last row is the band's test–retest ceiling.", "",
            "| predictor | " + " | ".join(f"{b} bits" for b in bands) + " |", "|---|" + "---:|" * len(bands)]
    for name, r in q["rows"].items():
        out.append(f"| {name} | " + " | ".join(_cell(r["bands"][b]) for b in bands) + " |")
    out.append("| *test–retest ceiling* | " + " | ".join(_cell(q["ceiling_bands"][b]) for b in bands) + " |")
    out += judge_size_lines(q.get("judge_sizes"), q["rows"])
    out += curve_lines(q.get("interaction_curve"), q.get("interaction_images"), q["ceiling_bands"])
    if q.get("interaction_retest"):
        r = q["interaction_retest"]
        out += ["", "Its training measurements share the held-out damage's noise seed (`lowbit.predictor_seed`); "
                    "against the same held-out configurations under the retest seed (noise disjoint from both) "
                    "the full fit ranks at τ " + " / ".join(_cell(r[b]) for b in bands) + "."]
    if q.get("predictor"):
        p = q["predictor"]
        alpha = "∞ (the prior itself)" if p["alpha"] is None else f"{p['alpha']:g}"
        out += ["", f"Learned predictor kept: features `{p['kind']}`, target `{p['target']}` damage, ridge α {alpha}, "
                    f"floor {p['floor']:g}. The cross-validated fit (5-fold τ on the training configurations: the most "
                    f"constrained within one standard error of the best) was refitted on {p.get('active', 0)} measured "
                    f"plans of its own allocator" + ("." if not p.get("selection") else
                    "; then each candidate below allocated one plan per budget and menu, measured on the "
                    "predictor's calibration noise, and " + (
                        "of those no worse than the prior's plans at every budget and menu (eligible) "
                        if any("eligible" in r for r in p["selection"]) else "") +
                    "the one of least mean log damage was kept:")]
        if p.get("selection"):
            out += ["", "| candidate | plan damage (per budget and menu) | mean log damage | eligible | kept |",
                    "|---|---|---:|:---:|:---:|"]
            for r in p["selection"]:
                out.append(f"| {r['name']} | " + ", ".join(f"{d:.3g}" for d in r["plan_damage"]) +
                           f" | {r['score']:.3f} | {'yes' if r.get('eligible', True) else 'no'} | "
                           f"{'✓' if r['chosen'] else ''} |")
    return out
