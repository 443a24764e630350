"""Learning curve: sample quality of the EMA snapshots a training run kept, against images seen.

Each snapshot (``train.snapshot_every``, baseline weights format) is sampled like every variant
(``eval.seeds`` x ``eval.n_images``, the configured sampler, paired noise) and scored with the same
metrics (classifier-IS/FID/KID; FID/KID on the first ``eval.inception_n_images`` when
``eval.inception``). Results are cached per snapshot in ``runs/<run>/learning_curve.json``, keyed by
the snapshot's SHA-256 and the evaluation settings, so a rerun only evaluates new snapshots.
"""
import glob
import os

import numpy as np

from ..core import storage
from ..diffusion.baseline import load_weights
from ..diffusion.data import to_uint8
from ..diffusion.samplers import build_sampler, sample
from ..diffusion.schedule import NoiseSchedule
from ..evaluation import evaluate
from .report import pyplot, save_figure

KEYS = ("clf_is", "clf_fid", "clf_kid", "fid", "kid")


def snapshot_paths(spec: str) -> list:
    """A folder of ``*.safetensors`` snapshots, a glob, or one file -> sorted paths (error if none)."""
    pattern = os.path.join(spec, "*.safetensors") if os.path.isdir(spec) else spec
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no snapshots match {pattern!r}: a training run writes them where "
                                f"train.snapshot_every is set (configs/default.yaml: 2000; `make learning-curve` "
                                f"reads the run of `make reproduce-from-scratch`, which trains from scratch)")
    return paths


def evaluate_snapshot(cfg, path, device, progress=True) -> dict:
    """Metrics of one snapshot, mean and sample std over ``eval.seeds``."""
    model, meta = load_weights(path, device)
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    per_seed = {}
    for seed in cfg.eval.seeds:
        x = sample(model, sampler, cfg.eval.n_images, shape, seed, cfg.sample.batch_size, device,
                   progress=progress, desc=f"{os.path.basename(path)} seed {seed}")
        per_seed[str(seed)] = evaluate.evaluate_seed(cfg, to_uint8(x), device, progress)
    row = {"snapshot": os.path.basename(path), "step": int(meta["step"]), "images_seen": int(meta["images_seen"]),
           "train_seconds": float(meta["train_seconds"]), "loss_ema": float(meta["loss_ema"])}
    for k in KEYS:
        vals = [r[k] for r in per_seed.values() if r.get(k) is not None]
        row[k] = float(np.mean(vals)) if vals else None
        row[k + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    row["per_seed"] = per_seed
    return row


def learning_curve(cfg, paths, device, progress=True) -> list:
    """Rows (one per snapshot, by step) for ``paths``; cached in ``runs/<run>/learning_curve.json``."""
    cache_path = os.path.join(storage.run_dir(cfg), "learning_curve.json")
    try:
        cache = storage.load_json(cache_path) if os.path.exists(cache_path) else {}
    except storage.CorruptFileError as e:  # a cache: recompute rather than fail
        print(f"[curve] {e}; recomputing it")
        cache = {}
    if storage.seal_ok(cache) is False:  # an edited cache is not read (and not re-sealed as if it were ours)
        print(f"[curve] {cache_path} was edited (its seal does not match); recomputing it")
        cache = {}
    cache.pop(storage.SEAL, None)
    # the settings, and what they resolve to here: the reference images and the Inception network
    eval_fp = f"{evaluate.eval_fingerprint(cfg)}:{evaluate.instrument_key(cfg)}"
    rows = []
    for path in paths:
        key = f"{storage.sha256_file(path)}:{eval_fp}"
        if key not in cache:
            cache[key] = evaluate_snapshot(cfg, path, device, progress)
            storage.atomic_write_record(cache, cache_path)  # each snapshot's result survives an interruption
        row = cache[key]
        print(f"[curve] step {row['step']:>7,d}  images {row['images_seen']:>10,d}  clf-IS {row['clf_is']:.3f}  "
              f"clf-FID {row['clf_fid']:.2f}" + (f"  FID {row['fid']:.2f}" if row["fid"] is not None else ""))
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def curve_table(rows, cfg) -> str:
    def f(r, k, d, scale=1.0):
        if r[k] is None:
            return "–"
        s = f"{scale * r[k]:.{d}f}"
        return s + (f" ± {scale * r[k + '_std']:.{d}f}" if r.get(k + "_std") is not None else "")

    lines = ["| step | images seen | training min | clf-IS | clf-FID | clf-KID x10^3 | FID | KID x10^3 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['step']:,} | {r['images_seen']:,} | {r['train_seconds'] / 60:.0f} | {f(r, 'clf_is', 2)} | "
                     f"{f(r, 'clf_fid', 2)} | {f(r, 'clf_kid', 2, 1e3)} | {f(r, 'fid', 1)} | {f(r, 'kid', 1, 1e3)} |")
    inc = (f"; FID/KID on the first {cfg.eval.inception_n_images or cfg.eval.n_images} per seed"
           if cfg.eval.inception else "")
    lines.append(f"\n{cfg.eval.n_images} images x seeds {list(cfg.eval.seeds)} per snapshot, {cfg.sample.sampler} "
                 f"{cfg.sample.steps} steps (eta {cfg.sample.eta:g}){inc}; ± is the sample std over seeds.")
    return "\n".join(lines)


def plot_curve(rows, path):
    plt = pyplot()


    x = [r["images_seen"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "clf_is", "classifier-IS (max 10)"), (axes[1], "fid", "FID (Inception)")):
        if key == "fid" and all(r["fid"] is None for r in rows):
            key, label = "clf_fid", "classifier-FID"
        y = [r[key] for r in rows]
        err = [r.get(key + "_std") or 0 for r in rows]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3)
        ax.set_xlabel("training images seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(8.5, color="grey", ls="--", lw=1, label="target 8.5")
    axes[0].legend()
    fig.suptitle("Learning curve of the EMA weights")
    save_figure(fig, path)
    return path
