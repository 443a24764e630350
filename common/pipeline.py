"""The stages every script shares: baseline training, Fisher, quantized variants, evaluation.

Each stage records what it was computed from; a finished stage with the same inputs is reused
(and says so), one with different inputs is an error unless ``force`` is given.
"""
import os

import torch
import torchvision

from . import storage
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
