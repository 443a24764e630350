"""Weight + activation plans compared under one evaluation: ``python act_quant.py`` (``make actquant``).

Evaluates, in ``runs/<run>/act_quant/`` with the ``act_quant`` section's seeds and images per seed, the fp32
baseline and every (budget, range mode, plan) of ``common.experiments.act_pipeline``; all share each seed's noise, so
per-seed differences are paired. Writes ``summary.csv`` (one row per variant and seed), ``summary.md``
(the table, then a verdict per comparison: Fisher against every other plan, per-timestep-group against
single ranges; two-sided paired t-tests over seeds with Holm's correction over the table,
``statistics.verdict_table``) and ``act_quant.png``.
"""
import os

import numpy as np

from ..core import distributed, storage
from ..core.budget import parse_wa_budget, wa_budget_tag
from ..quant.allocate import InfeasibleBudgetError
from ..quant.bops import unet_macs
from ..quant.calibrate import check_act_quant_groups
from . import pipeline
from .act_pipeline import ensure_act_importance, ensure_ranges, ensure_weight_fisher, run_act_variant
from .report import mean_sd, per_seed, pyplot, save_figure, spread, write_summary_files
from .statistics import verdict_table

KEYS = [("paired_mse_vs_fp32", "paired MSE"), ("clf_fid", "clf-FID"), ("fid", "FID"), ("kid", "KID")]
COLUMNS = ["plan", "budget", "range_mode", "seed", "variant", "gbops", "w_bits", "a_bits", "size_mb"] + [
    k for k, _ in KEYS]


def act_config(cfg):
    """``cfg`` with the comparison's sample budget, writing under runs/<run>/act_quant/."""
    return pipeline.sub_run_config(cfg, "act_quant", cfg.act_quant)


def act_dir(cfg) -> str:
    return storage.run_dir(act_config(cfg))


def variant_name(plan: str, budget: str, mode: str) -> str:
    return f"{plan}_{wa_budget_tag(budget)}_{mode}"


def run_act_comparison(cfg, device, force=False, progress=True):
    """Evaluate the grid. Returns ({variant: (plan, budget, mode, metrics)}, [notes on what was skipped])."""
    check_act_quant_groups(cfg)
    model, ckpt_path, fisher = pipeline.load_artifacts(cfg, device, force=force, progress=progress)
    acfg = act_config(cfg)
    aq = cfg.act_quant
    macs = unet_macs(model, (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size))
    done = {"fp32": ("fp32", None, None, distributed.rank0_first(
        lambda: pipeline.evaluate_fp32(acfg, model, ckpt_path, device, force, progress)))}
    sha = fisher["meta"]["checkpoint_sha256"]

    def caches():  # every cache the variants read, computed once before they are handed to the ranks
        ensure_weight_fisher(acfg, model, ckpt_path, fisher, device, progress)
        for mode in aq.range_modes:
            ranges = ensure_ranges(acfg, model, mode, sha, device, progress)
            if set(aq.plans) - {"uniform"}:
                ensure_act_importance(acfg, model, mode, ranges, sha, device, progress)

    pipeline.shared(acfg, caches)
    notes = []
    tasks = []
    for budget in aq.budgets:
        if "uniform" in aq.plans and not any(k == "wa" for k, _ in parse_wa_budget(budget)):
            notes.append(f"`{budget}`: no uniform plan (it needs a 'WxAy' budget)")
        tasks += [(plan, budget, mode) for mode in aq.range_modes for plan in aq.plans
                  if plan != "uniform" or any(k == "wa" for k, _ in parse_wa_budget(budget))]

    def one(task):
        plan, budget, mode = task
        try:
            return run_act_variant(acfg, variant_name(plan, budget, mode), plan, budget, mode, model, ckpt_path,
                                   fisher, macs, device, force, progress)
        except InfeasibleBudgetError as e:
            print(f"[act_quant] {e}")
            return e

    # every variant on one rank of a torchrun (each alone, with its own lock and files), in this order
    for (plan, budget, mode), r in zip(tasks, distributed.map_tasks(tasks, one), strict=True):
        if isinstance(r, InfeasibleBudgetError):
            notes.append(f"`{budget}` ({plan}): {r}")
        else:
            done[variant_name(plan, budget, mode)] = (plan, budget, mode, r)
    return done, notes


# ----------------------------------------------------------------------------- tables
def measured_keys(done: dict) -> list:
    """The metrics some variant has (KID only where common.evaluation.metrics computes it)."""
    return [(k, label) for k, label in KEYS if any(not np.all(np.isnan(per_seed(r, k))) for *_, r in done.values())]


def _bits(r: dict, fp32_gbops) -> dict:
    """GBOPs, bits per weight and MAC-weighted bits per activation (fp32: every operand 32 bits)."""
    return {"gbops": r.get("gbops", fp32_gbops), "w_bits": r.get("w_bits", 32.0), "a_bits": r.get("a_bits", 32.0)}


def _fp32_gbops(done: dict):
    """fp32 BOPs: every MAC at 32 x 32 bits (the MAC count from any quantized variant)."""
    macs = next((r["macs"] for plan, *_, r in done.values() if plan != "fp32"), None)
    return None if macs is None else macs * 32 * 32 / 1e9


def rows(done: dict) -> list:
    fp32_gbops = _fp32_gbops(done)
    out = []
    for variant, (plan, budget, mode, r) in done.items():
        for seed in sorted(r["per_seed"], key=int):
            out.append({"plan": plan, "budget": budget or "", "range_mode": mode or "", "seed": int(seed),
                        "variant": variant, **_bits(r, fp32_gbops), "size_mb": r["size_mb"],
                        **{k: r["per_seed"][seed].get(k) for k, _ in KEYS}})
    return out


def comparisons(done: dict, cfg) -> list:
    """[(label, variant A, variant B, name of A, name of B)]: Fisher against each other plan per budget and
    range mode, then per-group against single ranges per budget and plan (A is the one asked about)."""
    aq = cfg.act_quant
    out = []
    for budget in aq.budgets:
        for mode in aq.range_modes:
            fisher = variant_name("fisher", budget, mode)
            for plan in aq.plans:
                other = variant_name(plan, budget, mode)
                if plan != "fisher" and fisher in done and other in done:
                    out.append((f"{budget}, {mode} ranges: fisher vs {plan}", fisher, other, "fisher", plan))
        if {"single", "group"} <= set(aq.range_modes):
            for plan in aq.plans:
                g, s = variant_name(plan, budget, "group"), variant_name(plan, budget, "single")
                if g in done and s in done:
                    out.append((f"{budget}, {plan}: per-group vs single ranges", g, s, "per-group", "single"))
    return out


def summary_markdown(cfg, done: dict, notes: list, seconds=None) -> str:
    keys = measured_keys(done)
    ref = done["fp32"][3]
    head = ["budget", "ranges", "plan", "GBOPs", "w bits", "a bits", "size MB"] + [label for _, label in keys]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    fp32_gbops = _fp32_gbops(done)
    for plan, budget, mode, r in done.values():
        s = _bits(r, fp32_gbops)
        gb = s["gbops"]
        lines.append(f"| {budget or 'reference'} | {mode or '–'} | {plan} | "
                     f"{'–' if gb is None else f'{gb:.3f}'} | {s['w_bits']:.2f} | {s['a_bits']:.2f} | "
                     f"{r['size_mb']:.3f} | " + " | ".join(mean_sd(per_seed(r, k), 4) for k, _ in keys) + " |")
    vlines = ["| comparison (A vs B) | " + " | ".join(f"{label}: B − A" for _, label in keys) + " |",
              "|---|" + "---|" * len(keys)]
    vlines += verdict_table([(label, [per_seed(done[b][3], k) - per_seed(done[a][3], k) for k, _ in keys], (na, nb))
                             for label, a, b, na, nb in comparisons(done, cfg)])
    wall = sum(r.get("wall_seconds") or 0 for *_, r in done.values())
    settings = settings_note(cfg, ref) + (f" Evaluation time summed over variants: {wall / 60:.1f} min"
                                          + (f"; this invocation {seconds / 60:.1f} min." if seconds is not None
                                             else "."))
    md = ["# Weight + activation quantization", "", settings, "", "\n".join(lines), ""]
    if notes:
        md += ["Not evaluated:", ""] + [f"* {n}" for n in notes] + [""]
    md += ["## Verdicts", "",
           "B − A: mean paired per-seed difference (± s.e.m.); every metric is lower-is-better, so a positive "
           "difference favours A. A side is named **better** when a two-sided paired t-test over the "
           f"{len(ref['seeds'])} seeds says so after the correction stated under the table, else the difference is "
           "within noise.",
           "", "\n".join(vlines), "", "![act_quant](act_quant.png)"]
    return "\n".join(md) + "\n"


def settings_note(cfg, ref: dict) -> str:
    """What the table was measured with, in one paragraph (``ref``: the fp32 variant's metrics)."""
    aq = cfg.act_quant
    kept = (f"at {aq.keep_bits} bits" if aq.keep_bits else "float") if aq.keep_first_last else "allocated"
    fid = (f", FID on {ref['inception_n_images']} images per seed" if ref.get("fid") is not None
           else ", FID not computed (act_quant.inception: false)")
    method = aq.range_method + (f" ({aq.percentile}th percentile)" if aq.range_method == "percentile" else "")
    return (f"{ref['n_images']} images per seed × seeds {ref['seeds']}, {ref['sampler'].upper()} "
            f"{ref['sampling_steps']} steps, classifier-FID against {ref['ref_n_images']} real images{fid}. "
            f"Activation ranges: {method}, {'symmetric' if aq.symmetric else 'asymmetric'}, from "
            f"{aq.calib_images} calibration images; group mode: {aq.timestep_groups} timestep groups. Candidates: "
            f"weights {aq.w_formats}, activations {aq.a_bits} bits; first/last conv inputs {kept}; attention "
            f"softmax {f'{aq.softmax_bits} bits' if aq.softmax_bits else 'float'}; skip concatenations "
            f"{'split in two ranges' if aq.split_concat else 'one range'}"
            + ("; per-token attention projections" if aq.per_token_attention else "")
            + ". GBOPs per U-Net evaluation (MACs × w bits × a bits, float = 32). ± is the sample standard "
              "deviation over seeds.")


# ----------------------------------------------------------------------------- plot
def plot(done: dict, cfg, path: str) -> str:
    plt = pyplot()

    keys = [(k, label) for k, label in measured_keys(done) if k != "paired_mse_vs_fp32" or len(done) > 1]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys, strict=True):
        for i, plan in enumerate(cfg.act_quant.plans):
            for mode, fill in (("single", "full"), ("group", "none")):
                pts = sorted((r["gbops"], np.nanmean(per_seed(r, key)), spread(per_seed(r, key)))
                             for p, b, m, r in done.values() if p == plan and m == mode)
                if pts:
                    x, y, e = zip(*pts, strict=True)
                    ax.errorbar(x, y, yerr=e, marker="o", fillstyle=fill, capsize=3, color=f"C{i}",
                                ls="-" if mode == "single" else "--", label=f"{plan} ({mode})")
        if key != "paired_mse_vs_fp32":
            ax.axhline(np.nanmean(per_seed(done["fp32"][3], key)), color="gray", ls=":", label="fp32")
        else:
            ax.set_yscale("log")
        ax.set_xlabel("GBOPs per U-Net evaluation")
        ax.set_ylabel(label)
        ax.set_title(f"{label}: mean ± std over {len(cfg.act_quant.seeds)} seeds")
        ax.legend(fontsize=6)
    return save_figure(fig, path)


def write_outputs(cfg, done, notes, seconds=None) -> str:
    folder = act_dir(cfg)
    fig = plot(done, cfg, os.path.join(folder, "act_quant.png"))
    md = summary_markdown(cfg, done, notes, seconds)
    write_summary_files(folder, cfg, rows(done), COLUMNS, md, [fig], done)
    return md
