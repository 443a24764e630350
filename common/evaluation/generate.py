"""Images from any weights file on any execution backend (what ``sample.py`` runs).

``load_weights`` reads a baseline or a variant: a training checkpoint (``checkpoint.pt``, its EMA
weights), a plain safetensors state dict (EMA snapshots, released weights; the architecture from its
metadata or the config), or a ``quantized.safetensors``. ``build_runner`` turns it into a
``backends.Runner``; ``generate`` samples it with the configured sampler and writes the images.
"""
import json
import os
import time

import numpy as np
import torch

from ..core import machine, storage
from ..core.config import ModelConfig, to_dict
from ..diffusion.checkpoint import load_ema
from ..diffusion.data import to_uint8
from ..diffusion.model import build_model
from ..diffusion.samplers import build_sampler, sample
from ..diffusion.schedule import NoiseSchedule
from ..quant import backends
from ..quant.activations import load_act_quant
from ..quant.container import META_KEY, load_quantized, read_quantized
from .grids import save_grid
from .integrity import bind_files, check_variant


def _arch_from_metadata(meta: dict):
    """(ModelConfig, timesteps, image size) recorded in a safetensors header, or None: a JSON ``config`` (the
    full resolved config, nanoGPT-style) or JSON ``model`` plus ``timesteps`` (and ``image_size``, else 32)."""
    try:
        if "config" in meta:
            full = json.loads(meta["config"])
            return (ModelConfig(**full["model"]), int(full["diffusion"]["timesteps"]),
                    int(full.get("data", {}).get("image_size", 32)))
        if "model" in meta:
            return ModelConfig(**json.loads(meta["model"])), int(meta["timesteps"]), int(meta.get("image_size", 32))
    except (ValueError, KeyError, TypeError):
        return None
    return None


def load_weights(path: str, cfg, device="cpu"):
    """(fp32 model in eval mode, stored entries or None, info dict) from any weights file.

    ``stored`` is the quantized file's entries (what each tensor was stored as), None for fp32 weights.
    A state dict that does not fit the architecture is an error naming the file and the config.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    if os.path.basename(path) == "quantized.pt":
        read_quantized(path)  # refuses the old pickle container, saying how to rewrite it
    info = {"path": os.path.abspath(path), "sha256": storage.sha256_file(path)}
    if path.endswith(".pt"):
        model, _ = load_ema(path, device)
        return model, None, {**info, "kind": "training checkpoint (EMA weights)"}
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: expected a .safetensors file (quantized or a state dict) or a checkpoint .pt")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if META_KEY in meta:
        model, blob = load_quantized(path, device)
        return model, blob["tensors"], {**info, "kind": "quantized", "provenance": blob["provenance"]}
    from safetensors.torch import load_file

    arch = _arch_from_metadata(meta)
    model = build_model(*(arch or (cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)))
    try:
        model.load_state_dict(load_file(path))
    except RuntimeError as e:
        where = "its metadata" if arch else f"the config {cfg.source} (model section, diffusion.timesteps)"
        raise ValueError(f"{path}: the state dict does not fit the architecture from {where}: "
                         f"{str(e).splitlines()[0]} ... pass the config it was trained with") from None
    return (model.to(device).eval().requires_grad_(False), None,
            {**info, "kind": "state dict", "architecture_from": "metadata" if arch else cfg.source})


def build_runner(cfg, model, stored, backend: str, device, batch_size: int, compile_model=None, progress=True):
    """``backends.prepare`` with this config's sampler for int8 calibration (``backend.calib_*``)."""
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    calib = None
    if backend in ("int8", "int8_bf16"):
        backends.float_input_match(model, cfg.backend.int8_float_inputs)  # a wrong name before minutes of calibration
        sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
        calib = backends.calibration_inputs(model, sampler, cfg.backend.calib_images, shape, cfg.backend.calib_seed,
                                            cfg.backend.calib_steps, progress)
    if compile_model is None:
        compile_model = cfg.backend.compile
    return backends.prepare(model, stored, backend, device, calib=calib, batch_size=batch_size,
                            compile_model=compile_model, warmup_shape=(batch_size, *shape),
                            int8_ranges=cfg.backend.int8_ranges, int8_percentile=cfg.backend.int8_percentile,
                            int8_reduce_range=backends.resolve_reduce_range(cfg.backend.int8_reduce_range),
                            int8_time_path=cfg.backend.int8_time_path,
                            int8_float_inputs=cfg.backend.int8_float_inputs)


def int8_settings_tag(cfg, backend: str) -> str:
    """The int8 settings that differ from the code's defaults (histogram ranges, auto reduce_range, int8 time
    path, no input kept float), as a folder-name suffix (e.g. "_pct99.9_tpfp32"; default.yaml's kept-float inputs
    add "_float4-<hash>"), so an A/B of them under sample.py's default folder never overwrites the other side's
    samples."""
    if backend not in ("int8", "int8_bf16"):
        return ""
    b = cfg.backend
    parts = [f"pct{b.int8_percentile:g}" if b.int8_ranges == "percentile" else "",
             f"rr{str(b.int8_reduce_range).lower()}" if b.int8_reduce_range != "auto" else "",
             f"tp{b.int8_time_path}" if b.int8_time_path != "int8" else "",
             f"float{len(b.int8_float_inputs)}-{storage.fingerprint(sorted(b.int8_float_inputs))[:6]}"
             if b.int8_float_inputs else ""]
    return "".join(f"_{p}" for p in parts if p)


def resolve_backend(cfg, model, backend: str, device, act_quant=False, say=print):
    """(backend name, the auto choice's record or None): ``auto`` resolved by ``backends.choose_auto`` for this
    plan on this machine (stated through ``say``), any other name as it is."""
    if backend != backends.AUTO:
        return backend, None
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    choice = backends.choose_auto(model, device, cfg.run.cache_dir, shape, cfg.diffusion.timesteps, act_quant)
    say(f"[sample] backend auto -> {choice['backend']}: {choice['reason']}")
    return choice["backend"], choice


def generate(cfg, path: str, backend: str, n: int, seed: int, out_dir: str, device="cpu", progress=True,
             like_n=None) -> dict:
    """Sample ``n`` images of ``path`` on ``backend`` (``auto``: ``resolve_backend``) and write
    ``out_dir``/{samples.png, samples.npz, sample.json}.

    samples.npz: ``images`` uint8 (n, C, S, S) as the PNG holds them, ``x`` float32 (n, C, S, S) in model space
    (unclamped, about [-1, 1]). The noise depends only on (seed, batch), as in evaluation, so two backends or
    variants sampled with the same seed and batch size are paired. sample.json records the machine
    (``core.machine.capability``) and, for auto, the choice and its probe. ``like_n`` (default: ``n_images`` of
    the ``metrics.json`` beside ``path``, else ``eval.n_images``): the noise is drawn as an evaluation of that many
    images draws it, so ``n`` <= ``like_n`` gives that evaluation's first ``n`` images of ``seed`` (a stochastic
    sampler's noise depends on the rows per batch).
    """
    _check_variant_files(path)
    model, stored, info = load_weights(path, cfg, device)
    act_path = os.path.join(os.path.dirname(path), "act_quant.safetensors")
    act_quant = stored is not None and os.path.exists(act_path)
    backend, choice = resolve_backend(cfg, model, backend, device, act_quant)
    if act_quant:  # a variant of act_quant.py: activations quantized too
        if backend != "dequant":
            raise ValueError(f"{act_path}: this variant quantizes activations as well; its activation quantizers "
                             f"(per-layer bits, per-timestep-group ranges) run only as fake quantization, on "
                             f"--backend dequant. The bf16 / int8 backends choose activation precision themselves "
                             f"(bf16; uint8 calibrated by PT2E), so they would not run this variant's plan")

        load_act_quant(act_path)[0].attach(model)
        info["act_quant"] = {"path": os.path.abspath(act_path), "sha256": storage.sha256_file(act_path)}
    batch = min(n, cfg.sample.batch_size)
    runner = build_runner(cfg, model, stored, backend, device, batch, progress=progress)
    del model  # only the runner's own weights stay resident
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    t0 = time.perf_counter()
    like_n = like_n or _evaluated_n(path) or cfg.eval.n_images
    x = sample(runner, sampler, n, shape, seed, batch, device, progress=progress, desc=f"sampling ({backend})",
               noise_rows=cfg.sample.batch_size, noise_of=like_n)
    seconds = time.perf_counter() - t0
    images = to_uint8(x)
    os.makedirs(out_dir, exist_ok=True)
    save_grid(images[:cfg.sample.grid_images].float() / 255, os.path.join(out_dir, "samples.png"))
    storage.atomic_write_bytes(_npz(images=images.numpy(), x=x.numpy()), os.path.join(out_dir, "samples.npz"))
    result = {"source": info, "n": n, "seed": seed, "batch_size": batch, "noise_like_n": like_n,
              "sampler": to_dict(cfg.sample),
              "sampling_steps": len(sampler.timesteps), "sampling_seconds": round(seconds, 2),
              "images_per_second": round(n / seconds, 2), **runner.summary(), "precision": runner.precision,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": machine.capability(),
              "backend_auto": choice, "files": bind_files(out_dir, ["samples.png", "samples.npz"])}
    storage.atomic_write_record(result, os.path.join(out_dir, "sample.json"))
    return result


VARIANT_FILES = ("quantized.safetensors", "act_quant.safetensors")  # what sampling a variant reads


def _check_variant_files(path: str):
    """A variant's weights and activation quantizer are the files its ``metrics.json`` evaluated (a W/A variant
    whose activation file is gone would otherwise sample weight-only, a swapped one another plan); its samples
    and plots may be missing, and the folder may have moved away from its fp32 reference: sampling reads
    neither."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) != "quantized.safetensors" or not os.path.exists(os.path.join(folder, "metrics.json")):
        return
    bad = next((f for f in check_variant(folder) if f.problem and os.path.basename(f.path) in VARIANT_FILES), None)
    if bad is not None:
        raise ValueError(f"{bad.path}: {bad.detail}; recompute the variant with the script that wrote it (--force)")


def _evaluated_n(path: str):
    """Images per seed of the evaluation whose ``metrics.json`` sits beside ``path`` (a variant's folder), else None."""
    record = os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.json")
    try:
        n = storage.load_json(record).get("n_images") if os.path.exists(record) else None
    except (storage.CorruptFileError, AttributeError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def _npz(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()
