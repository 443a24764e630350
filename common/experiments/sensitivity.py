"""How quantization sensitivity moves with training.

For several EMA snapshots of one training run (e.g. an early one, a middle one and the released
weights), each treated as a baseline of its own under ``runs/<run>/sensitivity/<snapshot>/``: its
Fisher (same settings), its fp32 samples, and uniform int8, uniform int4 and a Fisher-allocated
mix at ``sensitivity.budget`` — all with the same seeds and noise, so paired MSE and the metric
changes against each snapshot's own fp32 samples are comparable across training.
"""
import copy
import os

import numpy as np

from ..core import storage
from ..core.cli import command
from . import pipeline
from .report import per_seed, pyplot, save_figure
from .statistics import ALPHA, holm, paired_p

VARIANTS = ("uniform_int8", "uniform_int4", "mp_fisher")


def snapshot_name(path) -> str:
    """The sub-run folder of a snapshot: its file name without the extension."""
    return os.path.splitext(os.path.basename(path))[0]


def distinct_snapshots(paths) -> list:
    """``paths`` with each file once (by its real path, named as given); FileNotFoundError unless at least two remain
    and no two share a ``snapshot_name`` (they would share one sub-run folder)."""
    first = {}
    for q in paths:
        first.setdefault(os.path.realpath(q), q)
    out = list(first.values())
    if len(out) < 2:
        raise FileNotFoundError(f"--snapshots: need at least 2 different snapshot files, got {out}")
    names = [snapshot_name(q) for q in out]
    twice = sorted({x for x in names if names.count(x) > 1})
    if twice:
        raise FileNotFoundError(f"--snapshots: files named alike in different folders ({twice}) would share one "
                                f"sub-run folder; rename or copy them apart")
    return out


def snapshot_config(cfg, path):
    """``cfg`` with ``path`` as its (verified) baseline, the sensitivity sample budget and its own run folder."""
    c = pipeline.sub_run_config(cfg, f"sensitivity/{snapshot_name(path)}", cfg.sensitivity)
    c.baseline.weights, c.baseline.sha256 = path, storage.sha256_file(path)
    return c


def evaluate_snapshot(cfg, path, device, force=False, progress=True) -> dict:
    """{"fp32": metrics, variant: metrics, "fisher": per-stage mean Fisher and CI, "info": ...} of one snapshot."""
    c = snapshot_config(cfg, path)
    model, weights = pipeline.released_baseline(c, device, progress)
    fisher, _ = pipeline.ensure_fisher(c, model, weights, device, force=force, progress=progress)
    out = {"fp32": pipeline.evaluate_fp32(c, model, weights, device, force, progress)}
    for fmt in ("int8", "int4"):
        cf = copy.deepcopy(c)
        cf.quant.format, cf.quant.granularity = fmt, "tensor"
        out[f"uniform_{fmt}"] = pipeline.run_variant(cf, f"uniform_{fmt}", "uniform", {}, model, weights, fisher,
                                                     device, force, progress)
    budget = cfg.sensitivity.budget
    out["mp_fisher"] = pipeline.run_variant(
        c, f"mp_fisher_{budget}", "mixed_precision",
        {"metric": "fisher", "budget": budget, "formats": list(cfg.mixed_precision.formats)},
        model, weights, fisher, device, force, progress)
    info = storage.load_json(os.path.join(storage.baseline_dir(c), "model.json"))
    out["info"] = {"snapshot": os.path.basename(path), "step": info["steps"],
                   "images_seen": info["steps"] * cfg.train.batch_size}
    out["fisher"] = {st: {"mean": m, "ci": fisher.get("per_layer_ci", {}).get(st)}
                     for st, m in fisher["per_layer"].items()}
    return out


def run_sensitivity(cfg, paths, device, force=False, progress=True) -> list:
    rows = [evaluate_snapshot(cfg, p, device, force, progress) for p in paths]
    return sorted(rows, key=lambda r: r["info"]["step"])


def _ms(values, scale=1.0, digits=3):
    v = values[~np.isnan(values)] * scale
    if not len(v):
        return "–"
    return f"{v.mean():.{digits}g} ± {v.std(ddof=1):.2g}" if len(v) > 1 else f"{v.mean():.{digits}g}"


def table(rows, cfg) -> str:
    lines = ["| training step (images) | variant | paired MSE vs own fp32 | clf-FID | Δ clf-FID vs fp32 | "
             "clf-KID x10^3 | clf-IS |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = r["fp32"]
        label = f"{r['info']['step']:,} ({r['info']['images_seen']:,})"
        for v in ("fp32",) + VARIANTS:
            m = r[v]
            delta = "–" if v == "fp32" else _ms(per_seed(m, "clf_fid") - per_seed(ref, "clf_fid"))
            lines.append(f"| {label} | {m['variant']} | {_ms(per_seed(m, 'paired_mse_vs_fp32'))} | "
                         f"{_ms(per_seed(m, 'clf_fid'))} | {delta} | {_ms(per_seed(m, 'clf_kid'), 1e3)} | "
                         f"{_ms(per_seed(m, 'clf_is'))} |")
            label = ""
    stages = list(rows[0]["fisher"])
    flines = ["| training step | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for r in rows:
        cells = []
        for st in stages:
            f = r["fisher"].get(st)
            ci = f and f["ci"]
            cells.append("–" if f is None else f"{f['mean']:.3g}" + (f" [{ci[0]:.2g}, {ci[1]:.2g}]" if ci else ""))
        flines.append(f"| {r['info']['step']:,} | " + " | ".join(cells) + " |")
    s = cfg.sensitivity
    note = (f"{s.n_images} images x seeds {list(s.seeds)} per variant, the same noise for every snapshot and variant; "
            f"paired MSE against the same snapshot's fp32 samples; ± is the sample std over seeds. "
            f"mp_fisher: the exact allocator on the `fisher` metric at {s.budget} (formats "
            f"{', '.join(cfg.mixed_precision.formats)}).")
    return "\n".join(lines + ["", note, "", "Mean Fisher per stage [95% bootstrap CI]:", ""] + flines)


def trend_sentences(rows) -> list:
    """Plain statements of how each variant's damage changed from the first to the last snapshot."""
    first, last = rows[0], rows[-1]
    out = []
    # one family: the variants' changes, Holm-corrected together (as every verdict table is)
    adjusted = holm([paired_p(per_seed(last[v], "paired_mse_vs_fp32") - per_seed(first[v], "paired_mse_vs_fp32"))
                     for v in VARIANTS])
    for v, p in zip(VARIANTS, adjusted, strict=True):
        a = per_seed(first[v], "paired_mse_vs_fp32")
        b = per_seed(last[v], "paired_mse_vs_fp32")
        verdict = ("one seed: not judged" if p is None else
                   f"{'a clear change' if p < ALPHA else 'within noise'} (paired t-test, Holm over the "
                   f"{len(VARIANTS)} variants: p_Holm {p:.2g})")
        out.append(f"{first[v]['variant']}: paired MSE {np.nanmean(a):.3g} at step {first['info']['step']:,} -> "
                   f"{np.nanmean(b):.3g} at step {last['info']['step']:,} (x{np.nanmean(b) / np.nanmean(a):.2f}; "
                   f"{verdict}).")
    return out


def plot(rows, path) -> str:
    plt = pyplot()

    x = [r["info"]["images_seen"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, v in enumerate(VARIANTS):
        label = rows[0][v]["variant"]
        mse = [per_seed(r[v], "paired_mse_vs_fp32") for r in rows]
        axes[0].errorbar(x, [np.nanmean(m) for m in mse], yerr=[np.nanstd(m, ddof=1) for m in mse], marker="o",
                         capsize=3, label=label, color=f"C{i}")
        d = [per_seed(r[v], "clf_fid") - per_seed(r["fp32"], "clf_fid") for r in rows]
        axes[1].errorbar(x, [np.nanmean(e) for e in d], yerr=[np.nanstd(e, ddof=1) for e in d], marker="o", capsize=3,
                         label=label, color=f"C{i}")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("paired MSE vs own fp32")
    axes[1].axhline(0, color="grey", lw=1)
    axes[1].set_ylabel("Δ classifier-FID vs own fp32")
    for st in rows[0]["fisher"]:
        axes[2].plot(x, [r["fisher"][st]["mean"] for r in rows], marker="o", label=st)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("mean Fisher per stage")
    for ax in axes:
        ax.set_xlabel("training images seen (thousands)")
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:g}")  # full counts overlap at this width
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Quantization sensitivity along training")
    return save_figure(fig, path)


def write_outputs(cfg, rows) -> str:
    folder = os.path.join(storage.run_dir(cfg), "sensitivity")
    md = "\n".join(["# Quantization sensitivity along training", "", table(rows, cfg), "",
                    *[f"* {s}" for s in trend_sentences(rows)], "", "![sensitivity](sensitivity.png)"]) + "\n"
    plot(rows, os.path.join(folder, "sensitivity.png"))
    storage.atomic_write_text(md, os.path.join(folder, "summary.md"))
    sources = [os.path.join(folder, snapshot_name(r["info"]["snapshot"]), r[v]["variant"], "metrics.json")
               for r in rows for v in ("fp32",) + VARIANTS]
    storage.write_sources(os.path.join(folder, "summary.sources.json"),
                          [os.path.join(folder, f) for f in ("summary.md", "sensitivity.png")], sources, command(cfg))
    return md
