"""The training checkpoint (``baseline/checkpoint.pt``): which config sections determine the weights, the check
that a checkpoint belongs to a config, and the EMA network rebuilt from a finished one.

``train.bf16: auto`` is resolved before it enters a fingerprint, so every record holds the choice that was made
(true or false): checked against an existing checkpoint or released file, auto means what that artifact
recorded (a training continues as it started, and the released weights verify on any CPU); for a new training
it means whether this machine has native bf16 kernels (``core.machine.native_bf16``).
"""
import torch

from ..core import machine
from ..core.config import NOT_YAML, Config, _build, to_dict
from ..core.errors import StaleArtifactError, UserError
from ..core.process_state import per_process
from ..core.storage import CorruptFileError, content_ok, diff_keys, fingerprint, load_torch
from .model import build_model


class UnfinishedCheckpointError(UserError, RuntimeError):
    """A training checkpoint that is not finished: resume it before sampling from it."""


def _check_training_checkpoint(ckpt, path: str, needed, hint: str):
    """A ``CorruptFileError`` naming ``path`` unless ``ckpt`` is a dict with every key of ``needed``."""
    missing = sorted(set(needed) - set(ckpt)) if isinstance(ckpt, dict) else sorted(needed)
    if missing:
        raise CorruptFileError(f"{path}: not a training checkpoint of this project (no {', '.join(missing)})"
                               + (f"; {hint}" if hint else ""))


_WARNED = per_process(set(), what="checkpoint._WARNED")  # bf16 warnings already printed by this process

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


def device_type(cfg) -> str:
    """"cuda" or "cpu": where ``run.device`` trains (auto: CUDA when there is one)."""
    if cfg.run.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.run.device


def recorded_bf16(inputs) -> bool | None:
    """The resolved ``train.bf16`` an artifact's training inputs record, or None (none recorded)."""
    value = (inputs or {}).get("train", {}).get("bf16")
    return value if isinstance(value, bool) else None


def resolve_bf16(train_cfg, device="cpu", recorded=None) -> bool:
    """``train.bf16`` as the choice it makes: true/false as written; auto -> ``recorded`` (what the checkpoint or
    released file being checked or resumed was trained with) when given, else native bf16 on ``device``."""
    if train_cfg.bf16 != "auto":
        return train_cfg.bf16
    if recorded is not None:
        return recorded
    return machine.native_bf16(device)


def announce_bf16(train_cfg, device="cpu", recorded=None, say=print) -> bool:
    """``resolve_bf16`` for a training about to run, saying what it chose: auto on a new training names the machine;
    bf16 on a CPU without native bf16 kernels (written explicitly, or auto resuming a bf16 checkpoint) is warned
    about once per process, with the measured cost of a bf16 matmul here."""
    bf16 = resolve_bf16(train_cfg, device, recorded)
    cap = machine.capability()
    if train_cfg.bf16 == "auto" and recorded is None:
        why = ("native bf16 kernels" if bf16 else "no native bf16 kernels, so bf16 would be emulated") + " on " + (
            "this GPU" if device == "cuda" else f"this CPU ({machine.describe(cap)})")
        say(f"[train] train.bf16: auto -> {'bf16 autocast' if bf16 else 'fp32'}: {why}")
    elif train_cfg.bf16 == "auto":
        say(f"[train] train.bf16: auto -> {'bf16 autocast' if bf16 else 'fp32'}, as the checkpoint being resumed "
            f"was trained")
    if bf16 and device == "cpu" and not cap["native_bf16"] and (train_cfg.bf16, recorded) not in _WARNED:
        _WARNED.add((train_cfg.bf16, recorded))
        cost = machine.bf16_matmul_cost()
        why = ("train.bf16 is true" if train_cfg.bf16 is True else
               "train.bf16: auto continues this checkpoint in bf16, as it started")
        fix = ("train.bf16: auto (or false) trains in fp32 here" if train_cfg.bf16 is True else
               "to train in fp32 here, start a new run: --set train.bf16=false --set run.name=<new name>")
        say(f"[train] WARNING: {why}, but this CPU ({cap['isa']}) has no native bf16 kernels: a {cost['n']}^2 "
            f"matmul measured {cost['slowdown']:g}x slower in bf16 ({cost['bf16_gflops']:g} GFLOP/s) than in fp32 "
            f"({cost['fp32_gflops']:g} GFLOP/s); training will be about that much slower. {fix}")
    return bf16


def training_inputs(cfg, bf16=None) -> dict:
    """The config sections that determine the trained weights (not paths or devices); ``train.bf16`` as the
    resolved choice: ``bf16`` when given, else ``resolve_bf16`` on this machine."""
    data = to_dict(cfg.data)
    data.pop("root")
    data.pop("download")
    train = to_dict(cfg.train)
    train["bf16"] = resolve_bf16(cfg.train, device_type(cfg)) if bf16 is None else bool(bf16)
    train.pop("checkpoint_every")
    train.pop("snapshot_every")
    train.pop("compile", None)  # how the same recipe is scheduled (float order; with dropout, inductor's masks)
    model = arch_inputs(cfg.model)
    # Options added later are recorded only when used, so older checkpoints stay valid.
    for key, default in (("lr_schedule", "constant"), ("warmup_steps", 0), ("min_snr_gamma", None),
                         ("init_sha256", None)):
        if train.get(key) == default:
            train.pop(key)
    train.pop("init_from")  # where the starting weights lie is not what they are: init_sha256 is
    return {"data": data, "model": model, "diffusion": to_dict(cfg.diffusion),
            "train": train, "seed": cfg.run.seed}


def check_checkpoint_matches(ckpt: dict, cfg, path: str):
    """A ``StaleArtifactError`` unless ``ckpt`` was trained with ``cfg``'s training inputs (train.bf16: auto
    accepts the choice the checkpoint recorded)."""
    _check_training_checkpoint(ckpt, path, ("fingerprint", "training_inputs"), "use --force to retrain into this run")
    mine = training_inputs(cfg, resolve_bf16(cfg.train, device_type(cfg), recorded_bf16(ckpt.get("training_inputs"))))
    if ckpt.get("fingerprint") != fingerprint(mine):
        keys = diff_keys(ckpt.get("training_inputs", {}), mine)
        raise StaleArtifactError(
            f"{path} was trained with a different config (differs in: {', '.join(keys) or '?'}). "
            f"Use --force to retrain into this run, or pick another run.name."
        )


def load_checkpoint(path: str, hint: str, map_location="cpu") -> dict:
    """A training checkpoint, read without running code and checked against the digest of its contents that
    training writes into it (``storage.save_cache``; checkpoints of before 2026-12-06 carry none): a flipped
    byte in a tensor is a ``CorruptFileError``, never weights that load as wrong numbers."""
    ckpt = load_torch(path, hint, map_location=map_location)
    if content_ok(ckpt) is False:
        raise CorruptFileError(f"{path}: its contents do not match the digest written with them (damaged)"
                               + (f"; {hint}" if hint else ""))
    return ckpt


def load_ema(ckpt_path: str, device="cpu", hint="run `python simplediffusion.py --config ...` (--retrain if corrupt)"):
    """Rebuild the EMA network from a finished checkpoint; returns (model in eval mode, checkpoint).
    ``hint``: the command that makes a missing or corrupt checkpoint, for the error message."""
    return ema_model(load_checkpoint(ckpt_path, hint, map_location=device), ckpt_path, device, hint)


def ema_model(ckpt: dict, ckpt_path: str, device="cpu", hint=""):
    """(EMA network in eval mode, ``ckpt``) of a loaded finished checkpoint (``load_checkpoint``)."""
    _check_training_checkpoint(ckpt, ckpt_path, ("finished", "config", "ema"), hint)
    if not ckpt["finished"]:
        raise UnfinishedCheckpointError(f"{ckpt_path} is a partial checkpoint (step {ckpt.get('step')}): finish it "
                                        f"with `python simplediffusion.py --config <its config> --resume`")
    stored = {k: v for k, v in ckpt["config"].items() if k not in NOT_YAML}
    cfg = _build(Config, stored, ckpt_path)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).to(device)
    model.load_state_dict(ckpt["ema"])
    return model.eval().requires_grad_(False), ckpt
