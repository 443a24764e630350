"""Every importance metric through the same allocator and evaluation, at several size budgets.

``python compare_metrics.py --config configs/default.yaml`` (``make compare``) evaluates, in
``runs/<run>/compare/`` and with the ``compare`` section's sample budget: the fp32 baseline, uniform
fp16/int8/int4, the poster's four threshold rules, and for every (metric, budget) the exact
minimum-cost allocation of ``common.quant.allocate``. All share each seed's noise, so per-seed differences
are paired. Writes ``summary.csv`` (one row per variant and seed), ``summary.md`` (which metric wins
at which budget, and whether a paired t-test over seeds separates it from the runner-up) and ``compare.png``.
"""
import copy
import os

import numpy as np

from ..core import distributed, storage
from ..core.budget import budget_tag
from ..quant.allocate import InfeasibleBudgetError
from . import pipeline
from .report import mean_sd, paired_test, per_seed, pyplot, save_figure, spread, write_summary_files
from .statistics import ALPHA, holm, holm_note, paired_p, tested

COLUMNS = ["kind", "metric", "budget", "seed", "variant", "size_mb", "avg_bits", "clf_fid", "fid", "clf_is",
           "paired_mse_vs_fp32"]
POSTER_RULES = ("whole_threshold", "layer_group", "layer_ratio", "layer_math")


def compare_config(cfg):
    """``cfg`` with the comparison's sample budget, writing under runs/<run>/compare/."""
    return pipeline.sub_run_config(cfg, "compare", cfg.compare)


def compare_dir(cfg) -> str:
    return storage.run_dir(compare_config(cfg))


def poster_variants(cfg):
    """(variant, strategy, params) of the poster's four rules with the run's thresholds (first p of the sweep)."""
    s = cfg.strategies
    return [("whole_threshold", "whole_threshold", {"threshold": s.whole_threshold.threshold}),
            ("layer_group", "layer_group", {"groups": s.layer_group.groups}),
            (f"layer_ratio_p{s.layer_ratio.p[0]:g}", "layer_ratio", {"p": s.layer_ratio.p[0]}),
            ("layer_math", "layer_math", {"alpha": s.layer_math.alpha, "k_min": s.layer_math.k_min,
                                          "k_max": s.layer_math.k_max})]


def run_comparison(cfg, device, force=False, progress=True):
    """Evaluate every variant of the comparison. Returns ({variant: (kind, metric, budget, metrics)},
    {budget no allocation can meet: why}, {metric: per-tensor scores})."""
    model, ckpt_path, fisher = pipeline.load_artifacts(cfg, device, force=force, progress=progress)
    ccfg = compare_config(cfg)
    # under the comparison's own config: the scores the variants' allocator reads, computed (and cached) once
    scores = distributed.rank0_first(lambda: {m: pipeline.ensure_importance(ccfg, m, model, ckpt_path, fisher,
                                                                            device)["score"]
                                              for m in cfg.compare.metrics})

    def run(variant, strategy, params, c=ccfg):
        return pipeline.run_variant(c, variant, strategy, params, model, ckpt_path, fisher, device, force, progress)

    done = {"fp32": ("reference", "fp32", None, distributed.rank0_first(
        lambda: pipeline.evaluate_fp32(ccfg, model, ckpt_path, device, force, progress)))}
    tasks = []
    if cfg.compare.poster_strategies:
        tasks += [("reference", f"uniform_{fmt}", None, (f"uniform_{fmt}", "uniform", {}), fmt)
                  for fmt in ("fp16", "int8", "int4")]
        tasks += [("poster_rule", variant, None, (variant, strategy, params), None)
                  for variant, strategy, params in poster_variants(ccfg)]
    tasks += [("allocator", metric, budget, (f"mp_{metric}_{budget_tag(budget)}", "mixed_precision",
                                             {"metric": metric, "budget": budget,
                                              "formats": list(cfg.mixed_precision.formats)}), None)
              for budget in cfg.compare.budgets for metric in cfg.compare.metrics]

    def one(task):
        kind, label, budget, (variant, strategy, params), fmt = task
        c = ccfg
        if fmt is not None:
            c = copy.deepcopy(ccfg)
            c.quant.format, c.quant.granularity = fmt, "tensor"
        try:
            return variant, run(variant, strategy, params, c)
        except InfeasibleBudgetError as e:
            return variant, e

    infeasible = {}
    # every variant on one rank of a torchrun (each alone, with its own lock and files), in this order
    for task, (variant, r) in zip(tasks, distributed.map_tasks(tasks, one), strict=True):
        kind, label, budget = task[:3]
        if isinstance(r, InfeasibleBudgetError):
            if budget not in infeasible:  # the same for every metric: the floor does not depend on it
                infeasible[budget] = str(r)
                print(f"[compare] budget {budget}: {r}")
            continue
        done[variant] = (kind, label, budget, r)
    return done, infeasible, scores


# ----------------------------------------------------------------------------- tables
def rows(done: dict) -> list:
    out = []
    for variant, (kind, metric, budget, r) in done.items():
        n_params = r["fp32_size_mb"] * 2 ** 20 / 4
        for seed, s in r["per_seed"].items():
            out.append({"kind": kind, "metric": metric, "budget": budget or "", "seed": int(seed),
                        "variant": variant, "size_mb": r["size_mb"], "avg_bits": 8 * r["size_bytes"] / n_params,
                        "clf_fid": s["clf_fid"], "fid": s["fid"], "clf_is": s["clf_is"],
                        "paired_mse_vs_fp32": s["paired_mse_vs_fp32"]})
    return out


def winners(done: dict, budgets, key: str, with_diffs=False) -> list:
    """Per budget: (budget, best metric, runner-up, gap mean, gap sem, verdict) on ``key`` (lower is better), the
    verdict of that row's test alone; ``with_diffs``: the per-seed gaps appended to every row that was tested."""
    out = []
    for budget in budgets:
        entries = [(m, r) for kind, m, b, r in done.values() if kind == "allocator" and b == budget]
        if len(entries) < 2:
            continue
        entries.sort(key=lambda e: np.nanmean(per_seed(e[1], key)))
        # Metrics that chose the same allocation give identical samples: one group, not a winner and a loser.
        groups = []
        for m, r in entries:
            if groups and np.array_equal(per_seed(groups[-1][1], key), per_seed(r, key), equal_nan=True):
                groups[-1][0].append(m)
            else:
                groups.append(([m], r))
        if len(groups) < 2:
            out.append((budget, " = ".join(groups[0][0]), "–", 0.0, 0.0, "all tie (identical results)"))
            continue
        (m1, r1), (m2, r2) = groups[0], groups[1]
        d = per_seed(r2, key) - per_seed(r1, key)
        mean, sem, significant = paired_test(d)
        verdict = {None: "one seed: no spread to judge by", True: "clear (paired t-test, 5%)",
                   False: "within noise"}[significant]
        out.append((budget, " = ".join(m1), " = ".join(m2), mean, sem, verdict, d) if with_diffs else
                   (budget, " = ".join(m1), " = ".join(m2), mean, sem, verdict))
    return out


def winner_lines(done: dict, budgets, keys) -> list:
    """The winners table's rows for every (key, label) of ``keys``, each win judged by its paired t-test with Holm's
    correction over the whole table (a tie of identical results is not tested), then the correction's note."""
    rows = [(label, w) for key, label in keys for w in winners(done, budgets, key, with_diffs=True)]
    adjusted = iter(holm([paired_p(w[6]) for _, w in rows if len(w) == 7]))
    out = []
    for label, w in rows:
        budget, m1, m2, mean, sem, verdict = w[:6]
        if len(w) == 7:
            p = next(adjusted)
            verdict = ("one seed: no spread to judge by" if p is None else
                       f"{'clear' if p < ALPHA else 'within noise'} (paired t-test, p_Holm {p:.2g})")
        out.append(f"| {budget} ({label}) | **{m1}** | {m2} | {mean:.4g} ± {sem:.2g} | {verdict} |")
    return out + ["", holm_note(sum(len(w) == 7 and tested([w[6]]) for _, w in rows))]


def score_correlations(scores: dict) -> dict:
    """Spearman rank correlation between the metrics' per-tensor scores (which tensors each deems important)."""
    from scipy.stats import spearmanr

    names = list(next(iter(scores.values())))
    return {a: {b: float(spearmanr([scores[a][n] for n in names], [scores[b][n] for n in names])[0])
                for b in scores} for a in scores}


def summary_markdown(cfg, done, infeasible, scores) -> str:
    ref = done["fp32"][3]
    has_fid = ref.get("fid") is not None
    head = ("| budget | metric | size MB | avg bits | classifier-FID | paired MSE vs fp32 |"
            + (" FID |" if has_fid else "")
            + "\n|---|---|---:|---:|---:|---:|" + ("---:|" if has_fid else ""))
    lines = [head]
    for kind, metric, budget, r in done.values():  # references, poster rules, then budget by budget
        n_params = r["fp32_size_mb"] * 2 ** 20 / 4
        label = budget or ("poster rule" if kind == "poster_rule" else "reference")
        lines.append(f"| {label} | {metric} | {r['size_mb']:.3f} | {8 * r['size_bytes'] / n_params:.2f} | "
                     f"{mean_sd(per_seed(r, 'clf_fid'), 4)} | {mean_sd(per_seed(r, 'paired_mse_vs_fp32'), 4)} |"
                     + (f" {mean_sd(per_seed(r, 'fid'), 4)} |" if has_fid else ""))
    win_lines = ["| budget | best metric | runner-up | runner-up minus best | verdict |", "|---|---|---|---:|---|"]
    win_lines += winner_lines(done, cfg.compare.budgets, (("clf_fid", "classifier-FID"),
                                                          ("paired_mse_vs_fp32", "paired MSE")))
    names, corr = list(scores), score_correlations(scores)
    corr_lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    corr_lines += [f"| {a} | " + " | ".join("–" if np.isnan(corr[a][b]) else f"{corr[a][b]:.2f}" for b in names)
                   + " |" for a in names]
    settings = (f"{ref['n_images']} images per seed × seeds {ref['seeds']}, {ref['sampler'].upper()} "
                f"{ref['sampling_steps']} steps, classifier-FID against {ref['ref_n_images']} real images"
                + (f", FID on {ref['inception_n_images']} images per seed" if has_fid else
                   ", FID not computed (compare.inception: false)")
                + ". ± is the sample standard deviation over seeds in the first table; in the winners' table it is "
                  "the standard error of the mean paired difference. A win is *clear* when a two-sided paired "
                  "t-test over the per-seed differences to the runner-up (same noise for every variant) says so after "
                  "the correction stated under the table.")
    md = ["# Importance metrics under one allocator", "", settings, "", "\n".join(lines), ""]
    if infeasible:
        md += ["Budgets no allocation can meet:", ""] + [f"* `{b}`: {e}" for b, e in infeasible.items()] + [""]
    md += ["## Which metric wins at which budget", "", "\n".join(win_lines), "",
           "## How much the metrics agree", "",
           "Spearman rank correlation of the per-tensor sensitivities (which tensors each metric calls important; "
           "– where a metric is constant, as `quant_error`'s s = 1):",
           "", "\n".join(corr_lines) if names else "(no importance artifacts)", "", "![compare](compare.png)"]
    return "\n".join(md) + "\n"


# ----------------------------------------------------------------------------- plot
def plot(done: dict, cfg, path: str) -> str:
    plt = pyplot()

    keys = ["clf_fid", "paired_mse_vs_fp32"] + (["fid"] if done["fp32"][3].get("fid") is not None else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for i, metric in enumerate(cfg.compare.metrics):
            pts = sorted((r["size_mb"], np.nanmean(per_seed(r, key)), spread(per_seed(r, key)))
                         for kind, m, b, r in done.values() if kind == "allocator" and m == metric)
            if pts:
                x, y, e = zip(*pts, strict=True)
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=metric, color=f"C{i}")
        for kind, marker, color in (("poster_rule", "*", "k"), ("reference", "s", "gray")):
            for m, (_, _, _, r) in [(m, e) for m, e in done.items() if e[0] == kind]:
                if key == "paired_mse_vs_fp32" and m == "fp32":
                    continue
                y = per_seed(r, key)
                ax.errorbar(r["size_mb"], np.nanmean(y), yerr=spread(y), marker=marker,
                            ms=9 if marker == "*" else 6,
                            color=color, capsize=3, ls="none")
                ax.annotate(m, (r["size_mb"], np.nanmean(y)), fontsize=6, xytext=(3, 3), textcoords="offset points")
        if key == "paired_mse_vs_fp32":
            ax.set_yscale("log")
        ax.set_xlabel("stored weights (MB)")
        ax.set_ylabel({"clf_fid": "classifier-FID", "paired_mse_vs_fp32": "paired MSE vs fp32", "fid": "FID"}[key])
        ax.set_title(f"{key}: mean ± std over {len(cfg.compare.seeds)} seeds")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_outputs(cfg, done, infeasible, scores) -> str:
    folder = compare_dir(cfg)
    fig = plot(done, cfg, os.path.join(folder, "compare.png"))
    md = summary_markdown(cfg, done, infeasible, scores)
    write_summary_files(folder, cfg, rows(done), COLUMNS, md, [fig], done)
    return md

