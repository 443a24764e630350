"""Baseline weights files: EMA weights as safetensors with their training provenance in the header.

The same format serves the EMA snapshots written during training (``train.snapshot_every``) and the
released baseline under ``checkpoints/`` that ``configs/default.yaml`` names in ``baseline.weights``:
tensors = the EMA ``state_dict``; metadata (strings) = the full config it was trained with, the
fingerprint of its training inputs, step, images seen, training seconds, loss and the code commit.
Loading never unpickles; the released file is checked against ``baseline.sha256`` before use.
"""
import json
import os
import subprocess

from ..core import machine
from ..core.cli import command
from ..core.config import NOT_YAML, Config, _build, to_dict
from ..core.errors import UserError
from ..core.storage import atomic_save_safetensors, atomic_write_json, diff_keys, fingerprint, sha256_file
from .checkpoint import device_type, load_ema, recorded_bf16, resolve_bf16, training_inputs
from .model import build_model

FORMAT = "laqfi-baseline"
VERSION = "1"


class BaselineError(UserError, RuntimeError):
    """A baseline weights file that is missing, corrupt, foreign or made for another config."""


def code_commit() -> str:
    """The git commit of this checkout (with "+dirty" when tracked files differ), or "unknown"."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_weights(path, state_dict, cfg, training_inputs: dict, step: int, train_seconds: float, loss):
    """Write EMA weights + provenance atomically; ``cfg`` a Config or its dict. Returns the metadata written."""
    config = cfg if isinstance(cfg, dict) else to_dict(cfg)
    meta = {
        "format": FORMAT, "version": VERSION,
        "config": json.dumps(config, sort_keys=True, default=str),
        "training_inputs": json.dumps(training_inputs, sort_keys=True),
        "training_fingerprint": fingerprint(training_inputs),
        "step": str(step), "images_seen": str(step * config["train"]["batch_size"]),
        "train_seconds": f"{train_seconds:.1f}", "loss_ema": "nan" if loss is None else f"{loss:.6f}",
        "code_commit": code_commit(),
    }
    atomic_save_safetensors(state_dict, path, meta)
    return meta


def read_metadata(path) -> dict:
    """The header metadata of a weights file, or a ``BaselineError`` naming the file and the problem."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise BaselineError(f"{path} not found")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise BaselineError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise BaselineError(f"{path} is not a LAQFI baseline weights file (metadata format "
                            f"{meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def config_of(path, meta=None) -> Config:
    """The typed config the weights were trained with (from the file's metadata)."""
    meta = meta or read_metadata(path)
    stored = {k: v for k, v in json.loads(meta["config"]).items() if k not in NOT_YAML}
    return _build(Config, stored, path)


def load_weights(path, device="cpu"):
    """(EMA U-Net in eval mode, metadata) from a weights file; the architecture comes from the file."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    cfg = config_of(path, meta)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
    try:
        state = load_file(path, device="cpu")
        model.load_state_dict(state)
    except Exception as e:
        raise BaselineError(f"{path}: its tensors do not load into the architecture its metadata names "
                            f"({type(e).__name__}: {e})") from None
    return model.to(device).eval().requires_grad_(False), meta


def from_scratch_command(cfg) -> str:
    """The command that trains this config's baseline here instead of using released weights."""
    return command(cfg, "simplediffusion.py", "--set", "baseline.weights=null",
                   drop=("baseline.weights", "baseline.sha256"))


def restore_hint(path: str) -> str:
    """'Restore it (git checkout -- path) or ' when git tracks ``path`` in the checkout holding it, else 'Replace
    it with the released file, or '. Asks git, so it is only called on the way to an error."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        subprocess.run(["git", "ls-files", "--error-unmatch", "--", os.path.abspath(path)], cwd=folder,
                       capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "Replace it with the released file, or "
    return f"Restore it (git checkout -- {path}) or "


def verified_release(path, want, section: str, source: str, error, missing: str, wrong: str, keys=None) -> str:
    """The SHA-256 of the released file ``<section>.weights`` = ``path`` once it exists and matches ``want``
    (``<section>.sha256``; None skips the check), else ``error`` naming both keys, the config ``source`` and what to
    do: restore the tracked file, or the remedy ``missing`` / ``wrong``. Shared by every released artifact;
    ``keys``: (file key, hash key) where they are not named that way (``train.init_from`` / ``init_sha256``)."""
    file_key, sha_key = keys or (f"{section}.weights", f"{section}.sha256")
    if not os.path.isfile(path):
        raise error(f"{file_key}: {path} not found. {restore_hint(path)}{missing}")
    have = sha256_file(path)
    if want and have != want:
        raise error(f"{file_key}: {path} has SHA-256 {have[:16]}..., but {sha_key} in {source} "
                    f"expects {want[:16]}...: the file is corrupt or not the released one. {restore_hint(path)}{wrong}")
    return have


def verify_released(cfg, recover_hint=None) -> str:
    """Check ``cfg.baseline.weights`` exists, has ``cfg.baseline.sha256`` and was trained with this config's
    training inputs; returns its SHA-256. Every failure is a ``BaselineError`` that says what to do: restore a
    file git tracks, or train from scratch (``recover_hint``, by default ``from_scratch_command``)."""
    path = cfg.baseline.weights
    hint = recover_hint or f"`{from_scratch_command(cfg)}` (or `make reproduce-from-scratch`)"
    have = verified_release(path, cfg.baseline.sha256, "baseline", cfg.source, BaselineError,
                            missing=f"train the baseline yourself: {hint}", wrong=f"train from scratch: {hint}")
    meta = read_metadata(path)
    recorded = json.loads(meta.get("training_inputs", "{}"))
    # train.bf16: auto accepts what the file was trained with, so the released weights verify on any CPU
    inputs = training_inputs(cfg, resolve_bf16(cfg.train, device_type(cfg), recorded_bf16(recorded)))
    if meta.get("training_fingerprint") != fingerprint(inputs):
        keys = diff_keys(recorded, inputs)
        raise BaselineError(f"baseline.weights: {path} was trained with other data/model/diffusion/train settings "
                            f"than {cfg.source} (differs in: {', '.join(keys) or '?'}); to use these settings, "
                            f"train them: {hint}")
    return have


def _network_name(config: dict) -> str:
    arch = config.get("model", {}).get("arch", "unet")
    return {"unet": "U-Net", "dit": "DiT"}.get(arch, arch) + f" of run `{config.get('run', {}).get('name', '?')}`"


def write_provenance(weights_path, meta: dict, retrain_command: str, extra=None) -> str:
    """``<weights>.json`` beside the weights: what they are, where they came from, how to recreate them."""
    path = os.path.splitext(weights_path)[0] + ".json"
    record = {
        "file": os.path.basename(weights_path),
        "sha256": sha256_file(weights_path),
        "bytes": os.path.getsize(weights_path),
        "what": f"EMA weights of the LAQFI {_network_name(json.loads(meta['config']))} (fp32), trained by this "
                "repository's code",
        "step": int(meta["step"]), "images_seen": int(meta["images_seen"]),
        "train_seconds": float(meta["train_seconds"]), "final_loss_ema": float(meta["loss_ema"]),
        "code_commit": meta["code_commit"],
        "training_fingerprint": meta["training_fingerprint"],
        "retrain_command": retrain_command,
        "config": json.loads(meta["config"]),
        "exported_on": machine.capability(),  # the machine that wrote this file (training checkpoints record none)
        **(extra or {}),
    }
    atomic_write_json(record, path)
    return path


def running_step(running, value):
    """One step of the training's running loss (the progress bar's and the snapshots' ``loss_ema``)."""
    return value if running is None else 0.98 * running + 0.02 * value


def running_loss(losses):
    """The running loss after ``losses``, computed as the training loop computes it step by step (so a resumed run
    continues the uninterrupted run's value bit for bit); None before the first step."""
    running = None
    for value in losses:
        running = running_step(running, value)
    return running


def release(ckpt_path, out_path, retrain_command: str, extra=None):
    """Export a finished training checkpoint's EMA weights as a released baseline: ``out_path``
    (safetensors) and its provenance ``<out>.json``. Returns (SHA-256, provenance path)."""
    model, ckpt = load_ema(ckpt_path)
    # loss_ema as the snapshots record it (the running average), not a plain mean of the last steps
    meta = save_weights(out_path, model.state_dict(), ckpt["config"], ckpt["training_inputs"], ckpt["step"],
                        ckpt.get("train_seconds") or 0.0, running_loss(ckpt["loss_history"]))
    prov = write_provenance(out_path, meta, retrain_command, extra)
    return sha256_file(out_path), prov


def load_any(path, device="cpu"):
    """(model, info) from a baseline weights file (.safetensors) or a finished training checkpoint (.pt)."""
    if path.endswith(".safetensors"):
        return load_weights(path, device)
    model, ckpt = load_ema(path, device)
    return model, {"step": str(ckpt["step"]), "config": json.dumps(ckpt["config"])}
