"""The stages every script shares: baseline training, Fisher, quantized variants, evaluation.

Each stage records what it was computed from; a finished stage with the same inputs is reused
(and says so), one with different inputs is an error unless ``force`` is given.
"""
import os
import time

import torch
import torchvision

from . import evaluate, storage
from .config import to_dict
from .data import mnist_tensor, to_uint8
from .diffusion import NoiseSchedule, build_sampler, sample
from .model import count_params
from .train import StaleArtifactError, check_checkpoint_matches, load_ema, train


def save_grid(images01: torch.Tensor, path: str, nrow: int = 8):
    """Write (N, 1, H, W) images in [0, 1] as one PNG grid (atomically)."""
    grid = torchvision.utils.make_grid(images01, nrow=nrow, padding=2, pad_value=1.0)
    tmp = path + ".tmp.png"
    torchvision.utils.save_image(grid, tmp)
    os.replace(tmp, path)


def ensure_baseline(cfg, device, force=False, resume=False, progress=True):
    """Train the baseline unless a finished checkpoint for this config exists; returns (ema, ckpt path)."""
    out = storage.baseline_dir(cfg)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not force:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        check_checkpoint_matches(ckpt, cfg, ckpt_path)
        if ckpt.get("finished"):
            print(f"[baseline] reusing finished checkpoint {ckpt_path} ({ckpt['step']} steps)")
            model, _ = load_ema(ckpt_path, device)
            return model, ckpt_path
        if not resume:
            raise StaleArtifactError(f"{ckpt_path} is a partial checkpoint at step {ckpt['step']}: "
                                     f"pass --resume to continue it or --force to start over")
    x_train, _ = mnist_tensor(cfg.data, "train")
    print(f"[baseline] training on {len(x_train)} MNIST images -> {ckpt_path}")
    model, ckpt = train(cfg, x_train, ckpt_path, device, resume=resume and not force, progress=progress)
    n = count_params(model)
    storage.atomic_write_json({
        "n_params": n, "fp32_size_mb": n * 4 / 2 ** 20, "size_unit": "MiB (2^20 bytes)",
        "steps": ckpt["step"], "train_seconds": ckpt.get("train_seconds"),
        "final_loss_avg100": sum(ckpt["loss_history"][-100:]) / max(1, len(ckpt["loss_history"][-100:])),
        "config": ckpt["config"],
    }, os.path.join(out, "model.json"))
    write_sample_grid(cfg, model, os.path.join(out, "samples.png"), device, progress)
    return model, ckpt_path


def write_sample_grid(cfg, model, path, device, progress=True, seed=None):
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    sampler = build_sampler(cfg.sample, schedule)
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    x = sample(model, sampler, cfg.sample.grid_images, shape,
               seed=cfg.eval.seeds[0] if seed is None else seed,
               batch_size=cfg.sample.batch_size, device=device, progress=progress, desc="grid")
    save_grid(to_uint8(x).float() / 255, path)
    print(f"[baseline] sample grid -> {path}")


# ----------------------------------------------------------------------------- Fisher
def ensure_fisher(cfg, model, ckpt_path, device, recompute=False, progress=True):
    """The Fisher artifact for this checkpoint: reused if present and matching, else computed."""
    from .fisher import FisherMismatchError, compute_fisher, load_fisher, save_fisher

    path = os.path.join(storage.baseline_dir(cfg), "fisher.pt")
    inputs = to_dict(cfg.fisher)
    if os.path.exists(path) and not recompute:
        try:
            art = load_fisher(path, ckpt_path)
        except FisherMismatchError as e:
            raise FisherMismatchError(f"{e} (or pass --recompute-fisher)") from None
        if art["meta"].get("config") == inputs:
            print(f"[fisher] reusing {path} ({art['meta']['n_samples']} samples)")
            return art, path
        raise StaleArtifactError(f"{path} was computed with fisher settings {art['meta'].get('config')}, "
                                 f"the config asks for {inputs}: pass --recompute-fisher")
    x_pool, _ = mnist_tensor(cfg.data, "train")
    t0 = time.time()
    art = compute_fisher(model, NoiseSchedule.from_config(cfg.diffusion), x_pool, cfg.fisher,
                         progress=progress, device=device)
    art["meta"]["config"] = inputs
    art["meta"]["seconds"] = round(time.time() - t0, 1)
    save_fisher(art, path, ckpt_path)
    print(f"[fisher] {art['meta']['n_samples']} per-sample gradients in {art['meta']['seconds']} s -> {path}")
    return art, path


# ----------------------------------------------------------------------------- variants
def fp32_size(model) -> dict:
    n = count_params(model)
    return {"size_bytes": 4 * n, "fp32_bytes": 4 * n, "quantized_fraction": 0.0,
            "analytic_bytes": 4 * n, "stored_bytes": 4 * n}


def evaluate_fp32(cfg, model, ckpt_path, device, force=False, progress=True):
    return evaluate.evaluate_variant(cfg, "fp32", model, fp32_size(model), device,
                                     weights_id=storage.sha256_file(ckpt_path), force=force,
                                     progress=progress, extra={"strategy": "fp32"})


def load_artifacts(cfg, device):
    """(EMA model, checkpoint path, Fisher artifact) of a finished baseline, or a clear error."""
    from .fisher import load_fisher

    base = storage.baseline_dir(cfg)
    ckpt_path = os.path.join(base, "checkpoint.pt")
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path} not found: train the baseline first with "
                                f"`python simplediffusion.py --config {cfg.source}`")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    check_checkpoint_matches(ckpt, cfg, ckpt_path)
    if not ckpt.get("finished"):
        raise StaleArtifactError(f"{ckpt_path} is unfinished (step {ckpt['step']}): "
                                 f"`python simplediffusion.py --config {cfg.source} --resume`")
    model, _ = load_ema(ckpt_path, device)
    fisher = load_fisher(os.path.join(base, "fisher.pt"), ckpt_path)
    return model, ckpt_path, fisher


def run_variant(cfg, variant, strategy, params, model, ckpt_path, fisher, device, force=False,
                progress=True):
    """Quantize with ``strategies.<strategy>(fisher, **params)``, save, reload and evaluate."""
    from . import strategies
    from .quantize import load_quantized, quantize_model, save_quantized

    fmt, gran = cfg.quant.format, cfg.quant.granularity
    plan, thresholds = getattr(strategies, strategy)(fisher, **params, fmt=fmt, granularity=gran)
    out = evaluate.variant_dir(cfg, variant)
    plan_inputs = {"strategy": strategy, "params": params, "format": fmt, "granularity": gran,
                   "checkpoint_sha256": fisher["meta"]["checkpoint_sha256"],
                   "fisher": {k: v for k, v in fisher["meta"].items() if k != "timesteps"}}
    weights_id = storage.fingerprint(plan_inputs)
    metrics_path = os.path.join(out, "metrics.json")
    eval_fp = storage.fingerprint({"eval": evaluate.eval_inputs(cfg), "weights": weights_id,
                                   "extra": {"strategy": strategy, "params": params}})
    # Refuse before writing anything if this directory holds another configuration's results.
    if evaluate.check_not_stale(metrics_path, eval_fp, force):
        print(f"[{variant}] reusing {metrics_path}")
        return storage.load_json(metrics_path)
    _, stored = quantize_model(model, plan)
    arch = {"model": to_dict(cfg.model), "timesteps": cfg.diffusion.timesteps}
    qpath = os.path.join(out, "quantized.pt")
    size = save_quantized(stored, qpath, arch, plan_inputs)
    size["size_bytes"] = size["stored_bytes"]
    size["fp32_bytes"] = 4 * count_params(model)
    summary = strategies.describe_plan(plan, model, fisher, fmt)
    storage.atomic_write_json({"variant": variant, "strategy": strategy, "params": params, "format": fmt,
                               "granularity": gran, "thresholds": thresholds, **summary, "size": size},
                              os.path.join(out, "plan.json"))
    # Sample from what was stored: the reloaded low-precision checkpoint, not the in-memory copy.
    qmodel, _ = load_quantized(qpath, device)
    print(f"[{variant}] {len(plan)} tensors -> {fmt} ({size['quantized_fraction']:.1%} of weights), "
          f"{size['stored_bytes'] / evaluate.MB:.3f} MB stored, file {qpath}")
    return evaluate.evaluate_variant(cfg, variant, qmodel, size, device, weights_id, force=force,
                                     progress=progress, extra={"strategy": strategy, "params": params})


def run_strategy_script(description: str, variants):
    """Body of the four strategy scripts: ``variants(cfg)`` -> [(variant name, strategy, params)]."""
    from . import cli

    args = cli.parser(description).parse_args()
    cfg = cli.load(args)
    with cli.clear_errors():
        device = storage.resolve_device(cfg.run.device)
        model, ckpt_path, fisher = load_artifacts(cfg, device)
        progress = not args.no_progress
        done = {"fp32": evaluate_fp32(cfg, model, ckpt_path, device, progress=progress)}
        for variant, strategy, params in variants(cfg):
            done[variant] = run_variant(cfg, variant, strategy, params, model, ckpt_path, fisher, device,
                                        force=args.force, progress=progress)
        print_comparison(done)


def print_comparison(results: dict):
    print(f"\n{'variant':24s} {'FID':>9s} {'clf-FID':>9s} {'clf-IS':>7s} {'paired MSE':>11s} {'MB':>8s} {'red.%':>6s}")
    for v, r in results.items():
        fid = f"{r['fid']:9.2f}" if r["fid"] is not None else f"{'n/a':>9s}"
        print(f"{v:24s} {fid} {r['clf_fid']:9.3f} {r['clf_is']:7.3f} {r['paired_mse_vs_fp32']:11.2e} "
              f"{r['size_mb']:8.3f} {r['reduction_pct']:6.1f}")
    r = next(iter(results.values()))
    print(f"({r['n_images']} images x seeds {r['seeds']}, {r['sampler']} {r['sampling_steps']} steps; "
          f"FID on {r['inception_n_images']} images/seed, Inception: {r['inception_weights']})")
