"""The training checkpoint (``baseline/checkpoint.pt``): which config sections determine the weights, the check
that a checkpoint belongs to a config, and the EMA network rebuilt from a finished one."""
from ..core.config import NOT_YAML, Config, _build, to_dict
from ..core.errors import StaleArtifactError
from ..core.storage import diff_keys, fingerprint, load_torch
from .model import build_model

UNET_KEYS = ("channels", "attentions", "upscales", "num_groups", "time_embedding")
DIT_KEYS = ("patch_size", "hidden", "stage_blocks", "mlp_ratio")


def arch_inputs(model_cfg) -> dict:
    """The ``model`` keys that shape this architecture's weights (a U-Net's record is as before ``arch``
    existed, so checkpoints trained then stay valid)."""
    model = to_dict(model_cfg)
    for key in DIT_KEYS if model["arch"] == "unet" else UNET_KEYS:
        model.pop(key)
    if model["arch"] == "unet":
        model.pop("arch")
    if model.get("time_embedding") == "table":
        model.pop("time_embedding")
    return model


def training_inputs(cfg) -> dict:
    """The config sections that determine the trained weights (not paths or devices)."""
    data = to_dict(cfg.data)
    data.pop("root")
    data.pop("download")
    train = to_dict(cfg.train)
    train.pop("checkpoint_every")
    train.pop("snapshot_every")
    model = arch_inputs(cfg.model)
    # Options added later are recorded only when used, so older checkpoints stay valid.
    for key, default in (("lr_schedule", "constant"), ("warmup_steps", 0), ("min_snr_gamma", None)):
        if train.get(key) == default:
            train.pop(key)
    return {"data": data, "model": model, "diffusion": to_dict(cfg.diffusion),
            "train": train, "seed": cfg.run.seed}


def check_checkpoint_matches(ckpt: dict, cfg, path: str):
    if ckpt.get("fingerprint") != fingerprint(training_inputs(cfg)):
        keys = diff_keys(ckpt.get("training_inputs", {}), training_inputs(cfg))
        raise StaleArtifactError(
            f"{path} was trained with a different config (differs in: {', '.join(keys) or '?'}). "
            f"Use --force to retrain into this run, or pick another run.name."
        )


def load_ema(ckpt_path: str, device="cpu", hint="run `python simplediffusion.py --config ...` (--retrain if corrupt)"):
    """Rebuild the EMA network from a finished checkpoint; returns (model in eval mode, checkpoint).
    ``hint``: the command that makes a missing or corrupt checkpoint, for the error message."""
    ckpt = load_torch(ckpt_path, hint, map_location=device)
    if not ckpt.get("finished"):
        raise RuntimeError(f"{ckpt_path} is a partial checkpoint (step {ckpt.get('step')}): "
                           f"finish it with `python simplediffusion.py --resume`")
    stored = {k: v for k, v in ckpt["config"].items() if k not in NOT_YAML}
    cfg = _build(Config, stored, ckpt_path)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).to(device)
    model.load_state_dict(ckpt["ema"])
    return model.eval().requires_grad_(False), ckpt
