"""Tables, plots and verdicts of a run: ``python -m common.report runs/<run> [--update-docs docs/results.md]``.

Reads every ``runs/<run>/<variant>/metrics.json`` and ``baseline/fisher.pt`` and writes
``summary.md``, ``summary.csv`` and ``plots/*.png`` beside them. Verdicts on the poster's claims
are computed from the per-seed numbers (all variants share each seed's noise, so per-seed
differences are paired).
"""
import argparse
import glob
import io
import math
import os

import numpy as np

from ..core import storage
from ..core.cli import command
from ..core.errors import StaleArtifactError
from ..evaluation import evaluate, integrity
from ..importance.fisher import load_fisher
from .statistics import ALPHA, holm, paired_p, paired_test, paired_verdict  # noqa: F401 (paired_verdict: re-exported)

# The poster's published rows (5000 images) and the slides' 100-image rows, for comparison.
POSTER = {
    "fp32": {"fid": 22.7512, "size_mb": 134.2, "reduction_pct": 0.0},
    "uniform_fp16": {"fid": 24.1324, "size_mb": 67.7, "reduction_pct": 49.55},
    "layer_group": {"fid": 23.84, "size_mb": 67.9, "reduction_pct": 49.4},
    "layer_ratio_p0.25": {"fid": 22.42, "size_mb": 102.26, "reduction_pct": 23.8},
    "layer_math": {"fid": 23.16, "size_mb": 81.57, "reduction_pct": 39.2},
}
SLIDES_100 = {
    "fp32": {"fid": 59.3030, "is": 1.7225, "size_mb": 134.20},
    "whole_threshold": {"fid": 59.7148, "is": 2.0846, "size_mb": 71.48},
    "layer_group": {"fid": 57.8034, "is": 1.7356},
}
COLUMNS = ["variant", "fid", "fid_std", "kid", "kid_std", "is_mean", "is_std", "clf_fid", "clf_fid_std",
           "clf_kid", "clf_kid_std", "clf_is", "clf_is_std",
           "paired_mse_vs_fp32", "size_mb", "reduction_pct", "quantized_fraction",
           "poster_fid", "poster_size_mb", "poster_reduction_pct", "slides100_fid", "slides100_is"]


def load_results(run: str) -> dict:
    """Every ``<variant>/metrics.json`` of ``run``; an error if they do not share one checkpoint, one set of
    evaluation settings and one seed list (their paired comparison would be meaningless)."""
    out = {}
    for name in sorted(os.listdir(run)):
        p = os.path.join(run, name, "metrics.json")
        if os.path.isfile(p):
            out[name] = storage.load_json(p, "re-run the script that wrote it with --force")
            rerun = f"recompute with `{out[name].get('command') or 'the script that wrote it'} --force`"
            # the numbers must come from the files that are there now (what `python -m common.verify` checks)
            evaluate.raise_first_problem(integrity.check_variant(os.path.join(run, name)), f"{name} not tabulated; "
                                         f"{rerun}")
            plan = os.path.join(run, name, "plan.json")
            if os.path.isfile(plan):  # the format decides which uniform variant is its reference
                out[name]["format"] = storage.load_json(plan, rerun).get("format")
    groups = {}
    for v, r in out.items():
        # the instruments too (the classifier's SHA-256, the reference images, the Inception network): the
        # fingerprint holds settings, and one table never mixes what they resolved to
        instruments = ((r.get("classifier") or {}).get("sha256"), r.get("reference_sha256"), r.get("inception_weights"))
        groups.setdefault((r.get("checkpoint_sha256"), r.get("eval_fingerprint"), tuple(r["seeds"]), instruments),
                          []).append(v)
    if len(groups) > 1:
        raise ValueError(f"{run}: the variants come from different checkpoints, evaluation settings or instruments: "
                         + "; ".join(", ".join(vs) for vs in groups.values())
                         + ". Re-run the stale ones with --force, or remove their folders.")
    rank = ["fp32", "uniform", "whole_threshold", "layer_group", "layer_ratio", "layer_math"]
    order = lambda v: (next((i for i, r in enumerate(rank) if v.startswith(r)), len(rank)), v)  # noqa: E731
    return dict(sorted(out.items(), key=lambda kv: order(kv[0])))


POSTER_RULES = ("whole_threshold", "layer_group", "layer_ratio", "layer_math")


def uniform_reference(results: dict, fmt=None):
    """Uniform quantization in ``fmt`` (a variant is compared with uniform casting to its own format);
    without a format the poster's uniform_fp16, else the first uniform_* variant."""
    if fmt is not None:
        return results.get(f"uniform_{fmt}")
    return results.get("uniform_fp16") or next((r for v, r in results.items() if v.startswith("uniform")), None)


POSTER_RATIO_IMPROVEMENT_PCT = 100 * (24.1324 - 22.42) / 24.1324  # 7.10 %: uniform 24.13 -> ratio 22.42


def _improvement_verdict(impr: np.ndarray, claimed: float = POSTER_RATIO_IMPROVEMENT_PCT):
    """(verdict, evidence) for "improves by ~claimed %", from paired per-seed improvements in %.

    "~claimed" is read as the band [claimed/2, 1.5*claimed]: supported when the 95% CI excludes 0 and
    overlaps the band; an improvement whose CI lies wholly outside the band is a different size of effect.
    """
    from scipy.stats import t as student_t

    n = int((~np.isnan(impr)).sum())
    if n < 3:
        return f"undecided ({n} seed(s): too few for a spread)", None
    mean, sem, _ = paired_test(impr)
    half = student_t.ppf(0.975, n - 1) * sem
    lo, hi = mean - half, mean + half
    band = (claimed / 2, 1.5 * claimed)
    ci = f"improvement {mean:.2f}% (95% CI [{lo:.2f}%, {hi:.2f}%], {n} paired seeds; claimed {claimed:.2f}%)"
    if lo <= 0 <= hi:
        return "within noise", ci
    if hi < 0:
        return "not supported (worse than uniform)", ci
    if hi < band[0] or lo > band[1]:
        return f"not supported (improves, but not by ~{claimed:.0f}%)", ci
    return "supported", ci


def _poster_key(variant):
    return "layer_ratio_p0.25" if variant.startswith("layer_ratio_p0.25") else variant


def rows(results: dict) -> list:
    table = []
    for v, r in results.items():
        row = {c: r.get(c) for c in COLUMNS}
        p, s = POSTER.get(_poster_key(v), {}), SLIDES_100.get(v, {})
        row.update(poster_fid=p.get("fid"), poster_size_mb=p.get("size_mb"),
                   poster_reduction_pct=p.get("reduction_pct"), slides100_fid=s.get("fid"), slides100_is=s.get("is"))
        table.append(row)
    return table


def _k(v, std=None):
    """KID in units of 10^-3, as KID tables usually print it."""
    return _f(None if v is None else 1e3 * v, 2, None if std is None else 1e3 * std)


def _f(v, d=2, std=None):
    if v is None:
        return "–"
    return f"{v:.{d}f}" + (f" ± {std:.{d}f}" if std is not None else "")


# ----------------------------------------------------------------------------- verdicts
def per_seed(r, key) -> np.ndarray:
    """A variant's per-seed values of ``key`` in seed order (NaN where not measured, or not recorded at all)."""
    seeds = sorted(r["per_seed"], key=int)
    return np.array([np.nan if r["per_seed"][s].get(key) is None else r["per_seed"][s][key] for s in seeds],
                    dtype=float)


def spread(values: np.ndarray) -> float:
    """Sample std (n - 1) of the non-NaN values; 0 with fewer than two."""
    v = values[~np.isnan(values)]
    return float(v.std(ddof=1)) if len(v) > 1 else 0.0


def mean_sd(values: np.ndarray, digits: int = 3) -> str:
    """'mean ± sample std' of the non-NaN values ('–' if none, the mean alone for one)."""
    v = values[~np.isnan(values)]
    if not len(v):
        return "–"
    return f"{v.mean():.{digits}g} ± {spread(v):.2g}" if len(v) > 1 else f"{v.mean():.{digits}g}"


def _paired_verdict(d: np.ndarray, better_if_negative=True):
    """Verdict on paired per-seed differences d (variant minus reference)."""
    mean, sem, significant = paired_test(d)
    if mean is None:
        return "not measured", None, None
    n = int((~np.isnan(d)).sum())
    if n < 3:
        return f"undecided ({n} seed(s): too few for a spread)", mean, sem
    if not significant:
        return "within noise", mean, sem
    return ("supported" if (mean < 0) == better_if_negative else "not supported (opposite)"), mean, sem


EQUAL_SIZE = "layer-adaptive beats uniform at equal size"


def _family_note(results: dict, rows: list) -> str:
    """What Holm's correction over the equal-size comparisons asks of the smallest p in this run."""
    from scipy.stats import t as student_t

    m = sum(c.startswith(EQUAL_SIZE) and v != "not measured" for c, v, _ in rows)
    n = len((results.get("fp32") or {}).get("seeds") or [])
    if m == 0 or n < 3:
        return f"one family of {m} comparisons over {n} seeds"
    return (f"one family: with {n} seeds and {m} comparisons the smallest p must be below {ALPHA:g} / {m}, a mean "
            f"of about {student_t.ppf(1 - ALPHA / (2 * m), n - 1):.1f} standard errors")


def verdicts(results: dict, fisher) -> list:
    """[(claim, verdict, evidence)] for the poster's three claims."""
    out = []
    fp = results.get("fp32")
    adaptive = {v: r for v, r in results.items() if v.startswith(POSTER_RULES)}
    metric_keys = [k for k in ("fid", "clf_fid") if fp and fp.get(k) is not None]
    if fp and adaptive:
        cells = []  # (claim, d, evidence) of every equal-size comparison: one family, Holm-corrected together
        for key in metric_keys:
            for v, r in adaptive.items():
                uni = uniform_reference(results, r.get("format"))
                if uni is None:
                    out.append((f"{EQUAL_SIZE} ({v}, {key})", "not measured",
                                f"no uniform_{r.get('format')} variant to compare with"))
                    continue
                # "At equal size": compare with the straight line from fp32 to uniform at the variant's size.
                lo, hi = uni["size_mb"], fp["size_mb"]
                w = 0.0 if hi == lo else (r["size_mb"] - lo) / (hi - lo)
                line = (1 - w) * per_seed(uni, key) + w * per_seed(fp, key)
                cells.append((f"{EQUAL_SIZE} ({v}, {key})", per_seed(r, key) - line,
                              f"{key} minus fp32–uniform line at {r['size_mb']:.3f} MB", len(r["seeds"])))
        ps = [paired_p(d) for _, d, _, _ in cells]
        adjusted = holm([p if (~np.isnan(d)).sum() >= 3 else None for p, (_, d, _, _) in zip(ps, cells, strict=True)])
        for (claim, d, what, seeds), p, p_adj in zip(cells, ps, adjusted, strict=True):
            verdict, mean, sem = _paired_verdict(d)
            if p_adj is not None:
                verdict = verdict if p_adj < ALPHA else "within noise"
            out.append((claim, verdict, f"{what}: {_f(mean, 3)} (± {_f(sem, 3)} s.e.m. over {seeds} paired seeds; "
                                        f"p {_f(p, 4)}, Holm {_f(p_adj, 4)})"))
    ratio = results.get("layer_ratio_p0.25")
    uni = ratio and uniform_reference(results, ratio.get("format"))
    if ratio and not uni:
        out.append(("ratio p=0.25 improves over uniform by ~7% (poster: 24.13 -> 22.42)", "not measured",
                    f"no uniform_{ratio.get('format')} variant to compare with"))
    if ratio and uni:
        for key in metric_keys:
            u, q = per_seed(uni, key), per_seed(ratio, key)
            verdict, ci = _improvement_verdict(100 * (u - q) / u)
            evidence = f"{ci or 'no spread'} (uniform {_f(uni[key], 3)}, ratio {_f(ratio[key], 3)})"
            out.append((f"ratio p=0.25 improves {key} over uniform by ~7% (poster: 24.13 -> 22.42)", verdict,
                        evidence))
    if fisher is not None:
        pl = fisher["per_layer"]
        top = sorted((k for k in pl if k.startswith("Layer")), key=lambda k: -pl[k])
        verdict = "supported" if set(top[:2]) == {"Layer1", "Layer2"} else "not supported"
        out.append(("layers 1-2 carry the most Fisher (mean per weight)", verdict,
                    "ranking by mean Fisher: " + " > ".join(f"{k} ({pl[k]:.3g})" for k in top)))
    return out


# ----------------------------------------------------------------------------- plots
def plot_fisher_recorded(fisher: dict, fisher_path: str, folder: str) -> list:
    """``plot_fisher`` and ``<folder>/fisher.sources.json`` binding the plots to the ``fisher.pt`` they show."""
    paths = plot_fisher(fisher, folder)
    storage.write_sources(os.path.join(folder, "fisher.sources.json"), paths, [fisher_path])
    return paths


def plot_fisher(fisher: dict, folder: str) -> list:
    """Per-layer bar (log), per-tensor within each layer, per-timestep profile per layer."""
    plt = pyplot()
    os.makedirs(folder, exist_ok=True)
    paths = []
    pl = {k: v for k, v in fisher["per_layer"].items() if k.startswith("Layer")}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(pl), list(pl.values()), color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylabel("mean Fisher per weight")
    ax.set_title(f"Fisher by stage ({fisher['meta']['n_samples']} samples, {fisher['meta']['eligible_rule']})")
    paths.append(save_figure(fig, os.path.join(folder, "fisher_per_layer.png")))

    stages = list(pl)
    fig, axes = plt.subplots(1, len(stages), figsize=(3 * len(stages), 3.5), sharey=True)
    for ax, st in zip(np.atleast_1d(axes), stages, strict=True):
        names = [n for n in fisher["per_tensor"] if n.split(".", 1)[0] == st]
        ax.bar(range(len(names)), [fisher["per_tensor"][n] for n in names], color="tab:orange")
        ax.set_yscale("log")
        ax.set_title(st)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.split(".", 1)[1].replace(".weight", "") for n in names], rotation=90, fontsize=6)
    np.atleast_1d(axes)[0].set_ylabel("mean Fisher of tensor")
    paths.append(save_figure(fig, os.path.join(folder, "fisher_per_tensor.png")))

    prof = fisher["timestep_profile"]
    if prof:
        numel = {n: d.numel() for n, d in fisher["diag"].items()}
        buckets = list(prof)
        fig, ax = plt.subplots(figsize=(7, 4))
        for st in stages:
            names = [n for n in fisher["per_tensor"] if n.split(".", 1)[0] == st]
            tot = sum(numel[n] for n in names)
            ax.plot(range(len(buckets)), [sum(prof[b][n] * numel[n] for n in names) / tot for b in buckets],
                    marker="o", label=st)
        ax.set_yscale("log")
        ax.set_xticks(range(len(buckets)))
        ax.set_xticklabels(buckets, rotation=45, fontsize=7)
        ax.set_xlabel("timestep bucket")
        ax.set_ylabel("mean Fisher per weight")
        ax.legend(fontsize=7)
        ax.set_title("Fisher by timestep")
        paths.append(save_figure(fig, os.path.join(folder, "fisher_timestep_profile.png")))
    return paths


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use: importing it costs every script
    about 0.3 s, and most runs of a strategy script draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    """Write a matplotlib figure atomically and close it."""
    plt = pyplot()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.atomic_write_bytes(buf.getvalue(), path)
    return path


def plot_tradeoff(results: dict, folder: str):
    plt = pyplot()
    keys = [k for k in ("fid", "clf_fid") if any(r.get(k) is not None for r in results.values())]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(5.5 * (len(keys) + 1), 4.2), squeeze=False)
    # The paired difference to fp32 shows the effect of the weights even where FID cannot resolve it.
    ax = axes[0][-1]
    color = {v: f"C{i}" for i, v in enumerate(results)}  # one colour per variant in every panel
    for v, r in results.items():
        if v != "fp32":
            ax.errorbar(r["size_mb"], r["paired_mse_vs_fp32"], yerr=r.get("paired_mse_std") or 0, fmt="o",
                        capsize=3, label=v, color=color[v])
    ax.set_yscale("log")
    ax.set_xlabel("stored weights (MB)")
    ax.set_ylabel("paired MSE vs fp32 samples")
    ax.set_title("pixel change caused by quantization (same noise)")
    ax.legend(fontsize=7)
    for ax, key in zip(axes[0][:-1], keys, strict=True):  # the last panel is the paired MSE above
        fp, uni = results.get("fp32"), uniform_reference(results)
        if fp and uni:
            ax.plot([uni["size_mb"], fp["size_mb"]], [uni[key], fp[key]], "k--", lw=1, label="fp32–uniform line")
        for v, r in results.items():
            ax.errorbar(r["size_mb"], r[key], yerr=r.get(f"{key}_std") or 0, fmt="o", capsize=3, label=v,
                        color=color[v])
        ax.set_xlabel("stored weights (MB)")
        ax.set_ylabel(key.replace("clf_fid", "classifier-FID").upper() if key == "fid" else "classifier-FID")
        ax.set_title(f"{key} vs size (mean ± std over seeds)")
        ax.legend(fontsize=7)
    return save_figure(fig, os.path.join(folder, "tradeoff.png"))


def plot_ratio_sweep(results: dict, folder: str):
    plt = pyplot()
    sweep = sorted((r["params"]["p"], r) for v, r in results.items() if v.startswith("layer_ratio_p"))
    if len(sweep) < 2:
        return None
    keys = [k for k in ("fid", "clf_fid") if sweep[0][1].get(k) is not None]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    uni = uniform_reference(results)
    for ax, key in zip(axes[0], keys, strict=True):
        ps = [p for p, _ in sweep]
        ax.errorbar(ps, [r[key] for _, r in sweep], yerr=[r.get(f"{key}_std") or 0 for _, r in sweep],
                    marker="o", capsize=3, label="layer_ratio")
        for lbl, ref in (("fp32", results.get("fp32")), ("uniform", uni)):
            if ref:
                ax.axhline(ref[key], ls="--", lw=1, color="gray" if lbl == "fp32" else "red", label=lbl)
        ax.set_xlabel("p (fraction of each stage kept at fp32)")
        ax.set_ylabel(key)
        ax.legend(fontsize=8)
        ax.set_title(f"layer_ratio sweep: {key}")
    return save_figure(fig, os.path.join(folder, "ratio_sweep.png"))


def plot_grids(run: str, results: dict, folder: str, n=16, name="grids.png"):
    """The first ``n`` samples of the first seed of each variant of ``results`` (its folder under ``run``), side by
    side: the same noise for every variant. Written to ``folder``/``name``; None if no variant has samples."""
    plt = pyplot()
    names = [v for v in results if os.path.exists(os.path.join(run, v, f"samples_seed{results[v]['seeds'][0]}.pt"))]
    if not names:
        return None
    import torchvision

    fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names), 2.8), squeeze=False)
    for ax, v in zip(axes[0], names, strict=True):
        x = storage.load_torch(os.path.join(run, v, f"samples_seed{results[v]['seeds'][0]}.pt"),
                               "re-run the script that wrote it with --force")[:n]
        grid = torchvision.utils.make_grid(x, nrow=int(math.sqrt(n)), padding=1, pad_value=1.0)[0]
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(v, fontsize=7)
        ax.axis("off")
    fig.suptitle(f"same noise (seed {results[names[0]]['seeds'][0]}) for every variant", fontsize=9)
    return save_figure(fig, os.path.join(folder, name))


# ----------------------------------------------------------------------------- tables
def fisher_table(fisher: dict) -> str:
    ci = fisher.get("per_layer_ci", {})
    lines = ["| stage | tensors | weights | mean Fisher | 95% CI | total Fisher |", "|---|---:|---:|---:|---:|---:|"]
    count = {}
    for n in fisher["per_tensor"]:
        st = n.split(".", 1)[0]
        count[st] = count.get(st, 0) + 1
    for st, m in fisher["per_layer"].items():
        interval = f"[{ci[st][0]:.3g}, {ci[st][1]:.3g}]" if st in ci else "–"
        lines.append(f"| {st} | {count.get(st, 0)} | {fisher['per_layer_numel'][st]:,} | {m:.4g} | {interval} | "
                     f"{fisher['per_layer_total'][st]:.4g} |")
    meta = fisher.get("meta", {})
    if "ci" in fisher:
        lines.append(f"\n{meta.get('n_samples')} samples, timesteps {meta.get('timestep_rule')}; CI: "
                     f"{fisher['ci']['method']} ({fisher['ci']['resamples']} resamples).")
    return "\n".join(lines)


def fisher_op_table(fisher: dict, op_type) -> str:
    """Fisher by what a tensor does (``op_type``: the network's own naming, e.g. attention qkv, MLP, adaLN
    modulation), largest share first: where an architecture's sensitivity sits, comparable across networks."""
    groups = {}
    for name, mean in fisher["per_tensor"].items():
        g = groups.setdefault(op_type(name), [0, 0, 0.0])
        numel = fisher["diag"][name].numel()
        g[0] += 1
        g[1] += numel
        g[2] += mean * numel
    total = sum(g[2] for g in groups.values()) or 1.0
    lines = ["| op type | tensors | weights | mean Fisher | share of total Fisher |", "|---|---:|---:|---:|---:|"]
    for op, (n, numel, tot) in sorted(groups.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"| {op} | {n} | {numel:,} | {tot / numel:.3g} | {tot / total:.1%} |")
    return "\n".join(lines)


def plan_table(summary: dict) -> str:
    """Per stage: tensors quantized (of eligible), weights quantized, formats used (from describe_plan)."""
    lines = [f"  {'stage':8s} {'tensors':>9s} {'weights quantized':>22s}  formats"]
    for st, s in sorted(summary["per_stage"].items(), key=lambda kv: (kv[0] == "other", kv[0])):
        fmts = ", ".join(f"{k} x{v}" for k, v in sorted(s["formats"].items())) or "-"
        lines.append(f"  {st:8s} {s['tensors_quantized']:>4d}/{s['eligible_tensors']:<4d} "
                     f"{s['elements_quantized']:>10,d}/{s['elements']:<10,d}  {fmts}")
    return "\n".join(lines)


def results_table(results: dict) -> str:
    head = ("| variant | FID | KID x10^3 | IS | clf-FID | clf-KID x10^3 | clf-IS | paired MSE | size MB | "
            "reduction % | quantized | poster FID | poster MB | poster red. % | slides-100 FID / IS |")
    lines = [head, "|" + "---|" * 15]
    for row in rows(results):
        lines.append(
            f"| {row['variant']} | {_f(row['fid'], 2, row['fid_std'])} | {_k(row['kid'], row['kid_std'])} | "
            f"{_f(row['is_mean'], 3)} | {_f(row['clf_fid'], 2, row['clf_fid_std'])} | "
            f"{_k(row['clf_kid'], row['clf_kid_std'])} | {_f(row['clf_is'], 3, row['clf_is_std'])} | "
            f"{row['paired_mse_vs_fp32']:.1e} | {row['size_mb']:.3f} | {row['reduction_pct']:.1f} | "
            f"{row['quantized_fraction']:.1%} | {_f(row['poster_fid'], 2)} | {_f(row['poster_size_mb'], 2)} | "
            f"{_f(row['poster_reduction_pct'], 2)} | {_f(row['slides100_fid'], 2)} / {_f(row['slides100_is'], 3)} |")
    return "\n".join(lines)


def settings_note(results: dict, run: str) -> str:
    r = next(iter(results.values()))
    model = storage.load_json(os.path.join(run, "baseline", "model.json"),
                              "delete it; simplediffusion.py writes it again") if os.path.exists(
        os.path.join(run, "baseline", "model.json")) else {}
    n_params = round(r["fp32_size_mb"] * 2 ** 20 / 4)
    return (f"Our setting: {n_params:,} parameters "
            f"({r['fp32_size_mb']:.2f} MB fp32; poster: 35,178,689 = 134.2 MB), "
            f"{model.get('steps', '?')} training steps, {r['sampler'].upper()} with {r['sampling_steps']} steps "
            f"(poster: DDPM 1000), {r['n_images']} images per seed × seeds {r['seeds']} for classifier metrics, "
            f"{r['inception_n_images']} per seed for FID against {r['ref_n_images']} real training images "
            f"(poster: 5000 images; slides: 100). Inception weights: {r['inception_weights']}. "
            f"MNIST classifier test accuracy {r['classifier_test_accuracy']:.4f}. "
            "± is the sample standard deviation (n − 1) over seeds. Sizes are the bytes of the stored tensors "
            "(MB = 2^20 bytes, as the poster's 134.2 MB). Poster numbers come from a different, "
            "much larger model and protocol: compare directions, not values.")


def baseline_weights_path(run: str) -> str:
    """The weights a run's baseline came from: released weights (model.json "source") or its own training."""
    info = os.path.join(run, "baseline", "model.json")
    source = storage.load_json(info).get("source") if os.path.exists(info) else None
    return source or os.path.join(run, "baseline", "checkpoint.pt")


def write_summary(run: str, readme=None) -> str:
    results = load_results(run)
    if not results:
        raise FileNotFoundError(f"{run}: no <variant>/metrics.json found; run the scripts first")
    fisher_path = os.path.join(run, "baseline", "fisher.pt")
    fisher = None
    if os.path.exists(fisher_path):  # refused if it belongs to another checkpoint than the results

        fisher = load_fisher(fisher_path, baseline_weights_path(run))
        if fisher["meta"]["checkpoint_sha256"] != next(iter(results.values())).get("checkpoint_sha256"):
            raise ValueError(f"{fisher_path} and the results of {run} come from different checkpoints")
    plots = os.path.join(run, "plots")
    os.makedirs(plots, exist_ok=True)
    figs = [plot_tradeoff(results, plots), plot_ratio_sweep(results, plots), plot_grids(run, results, plots)]
    fisher_figs = plot_fisher_recorded(fisher, fisher_path, plots) if fisher is not None else []
    results_md = results_table(results) + "\n\n" + settings_note(results, run)
    rows_v = verdicts(results, fisher)
    v_md = "\n".join(f"| {c} | **{v}** | {e} |" for c, v, e in rows_v)
    verdict_md = ("| poster claim | verdict | evidence |\n|---|---|---|\n" + v_md +
                  "\n\nRule: per-seed paired differences (same noise for every variant); *supported* when a two-sided "
                  "paired t-test finds the mean difference favours the claim at 5% after Holm's correction over "
                  f"every equal-size comparison of the table ({_family_note(results, rows_v)}), *within noise* "
                  "otherwise; each row gives its uncorrected p and its Holm-adjusted one. The ~7% claim is "
                  "*supported* when the 95% confidence interval of the per-seed improvement excludes 0 and "
                  "overlaps [3.5%, 10.6%] (half to 1.5 times the poster's 7.10%).")
    md = [f"# Results of `{run}`", "", results_md, "", "## Verdicts on the poster's claims", "", verdict_md]
    if fisher is not None:
        md += ["", "## Fisher per stage", "", fisher_table(fisher)]
    figs_all = [p for p in figs if p] + fisher_figs
    md += ["", "## Plots", ""] + [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in figs_all]
    text = "\n".join(md) + "\n"
    write_summary_files(run, None, rows(results), COLUMNS, text, figs, results,  # the Fisher plots have their own
                        sources=[fisher_path] if fisher else [], cmd="python -m common.report " + run)  # record
    if readme:
        block = results_md + "\n\n### Verdicts\n\n" + verdict_md
        if fisher is not None:
            block += "\n\n### Fisher per stage\n\n" + fisher_table(fisher)
        block += "\n\n" + "\n".join(f"![{os.path.basename(p)[:-4]}]({os.path.basename(p)})" for p in figs_all)
        update_section(readme, "results", block, figures=figs_all)
    return text


def write_summary_files(folder: str, cfg, rows: list, columns: list, md: str, figures, variants, sources=(),
                        cmd=None):
    """A run's or experiment folder's ``summary.csv`` and ``summary.md`` and ``summary.sources.json``, which binds
    them (and ``figures``) to the ``metrics.json`` of ``variants`` and the other ``sources`` (fisher.pt) they were
    made from; ``cmd``: the command recorded (default: the one that reruns ``cfg``)."""
    storage.atomic_write_csv(rows, columns, os.path.join(folder, "summary.csv"))
    storage.atomic_write_text(md, os.path.join(folder, "summary.md"))
    storage.write_sources(os.path.join(folder, "summary.sources.json"),
                          [os.path.join(folder, "summary.csv"), os.path.join(folder, "summary.md")]
                          + [f for f in figures if f], [os.path.join(folder, v, "metrics.json") for v in variants]
                          + list(sources), cmd or command(cfg))


def update_section(path: str, marker: str, block: str, figures=()):
    """Replace the text between the ``<!-- {marker}:start/end -->`` markers of the markdown file ``path`` with
    ``block``. ``figures`` are copied into the repository's ``docs/`` folder (``path``'s own folder when that is
    ``docs/``) and ``block``'s links to them, written as ``](name.png)``, are made relative to ``path``."""
    start, end = _markers(marker)
    with open(path) as fh:
        text = fh.read()
    missing = _missing_markers(path, text, marker)
    if missing:
        raise ValueError(missing)
    here = os.path.dirname(os.path.abspath(path))
    docs = here if os.path.basename(here) == "docs" else os.path.join(here, "docs")
    os.makedirs(docs, exist_ok=True)
    for fig in figures:
        if fig:
            name = os.path.basename(fig)
            with open(fig, "rb") as fh:
                storage.atomic_write_bytes(fh.read(), os.path.join(docs, name))
            block = block.replace(f"]({name})", f"]({os.path.relpath(os.path.join(docs, name), here)})")
    head, rest = text.split(start, 1)
    storage.atomic_write_text(head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1], path)


def _markers(marker: str) -> tuple:
    return f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"


def _missing_markers(path: str, text: str, marker: str):
    """None if ``text`` (the file ``path``) holds both of ``marker``'s markers, else the one-line error."""
    start, end = _markers(marker)
    if start in text and end in text:
        return None
    return f"{path}: markers {start} / {end} not found" + _marker_hint(path, start, end)


def _marker_hint(path: str, start: str, end: str) -> str:
    """'; they are in docs/x.md' when another markdown file of the repository holds the markers."""
    root = os.path.dirname(os.path.abspath(path))
    root = os.path.dirname(root) if os.path.basename(root) == "docs" else root
    for cand in [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md"))):
        if os.path.isfile(cand) and os.path.abspath(cand) != os.path.abspath(path):
            with open(cand) as fh:
                text = fh.read()
            if start in text and end in text:
                return f"; they are in {os.path.relpath(cand)}"
    return ""


def update_section_from_summary(path: str, summary_md: str, marker: str, figure):
    """Write a ``summary.md`` (less its title line) between ``path``'s markers, with its figure (or figures)."""
    update_section(path, marker, summary_md.split("\n", 2)[2], figures=[figure] if isinstance(figure, str) else figure)


def add_docs_argument(parser, marker: str, default_file: str):
    """``--update-docs FILE`` (alias ``--update-readme``): also write the table into the markdown file holding the
    ``<!-- {marker} -->`` markers."""
    def markdown_with_markers(path):  # checked before the run, not after hours of it
        try:
            with open(path) as fh:
                text = fh.read()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"{path}: {e.strerror}") from None
        missing = _missing_markers(path, text, marker)
        if missing:
            raise argparse.ArgumentTypeError(missing)
        return path

    parser.add_argument("--update-docs", "--update-readme", dest="update_docs", metavar="MD",
                        type=markdown_with_markers,
                        help=f"also write the table into this markdown file, between its <!-- {marker}:start/end --> "
                             f"markers (they are in {default_file})")


RELEASED_KEYS = (("clf_is", "classifier-IS", 3), ("clf_fid", "classifier-FID", 2), ("clf_kid", "classifier-KID", 5),
                 ("fid", "FID", 2), ("kid", "KID", 5))


def released_comparison(run: str, released_run: str) -> str:
    """How close a from-scratch training gets to the released weights: fp32 metrics side by side."""
    paths = [os.path.join(r, "fp32", "metrics.json") for r in (released_run, run)]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: evaluate that run first (make reproduce evaluates "
                                    f"the released weights into {released_run})")
    rel, mine = (storage.load_json(p) for p in paths)
    lines = [f"| fp32 metric | released ({released_run}) | from scratch ({run}) | difference | in seed stds |",
             "|---|---:|---:|---:|---:|"]
    for key, label, d in RELEASED_KEYS:
        a, b = rel.get(key), mine.get(key)
        if a is None or b is None:
            continue
        std = rel.get(f"{key}_std") or float("nan")
        lines.append(f"| {label} | {a:.{d}f} | {b:.{d}f} | {b - a:+.{d}f} | {(b - a) / std:+.1f} |")
    same = rel.get("eval_fingerprint") == mine.get("eval_fingerprint")
    lines.append(f"\n{'Same' if same else 'DIFFERENT'} evaluation settings ({mine['n_images']} images x seeds "
                 f"{mine['seeds']}); released weights SHA-256 {str(rel.get('checkpoint_sha256'))[:12]}..., "
                 f"from-scratch checkpoint {str(mine.get('checkpoint_sha256'))[:12]}...")
    return "\n".join(lines)

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory, e.g. runs/default")
    add_docs_argument(p, "results", "docs/results.md")
    p.add_argument("--compare-released", metavar="RUN",
                   help="also compare this run's fp32 metrics with those of the released weights' run (runs/default)")
    args = p.parse_args()
    if not os.path.isdir(args.run):
        raise SystemExit(f"{args.run}: no such run directory")
    try:
        print(write_summary(args.run, args.update_docs))
        if args.compare_released:
            md = released_comparison(args.run, args.compare_released)
            out = os.path.join(args.run, "released_comparison.md")
            storage.atomic_write_text(md + "\n", out)
            storage.write_sources(os.path.join(args.run, "released_comparison.sources.json"), [out],
                                  [os.path.join(r, "fp32", "metrics.json") for r in (args.compare_released, args.run)])
            print("\n## From scratch vs released\n\n" + md)
    except (ValueError, FileNotFoundError, storage.CheckpointMismatchError, StaleArtifactError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"[report] {args.run}/summary.md, summary.csv, plots/")


if __name__ == "__main__":
    main()
