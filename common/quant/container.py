"""The container of a quantized model: ``quantized.safetensors``.

Every stored array is a safetensors tensor named ``<parameter>/<field>`` (field: data, scale, mask, kept),
and the header metadata holds one JSON record (``META_KEY``) with the file version, the architecture, the
plan's provenance, each parameter's format / shape / axis / field dtypes and shapes, and a SHA-256 of all
stored tensors. Loading needs no pickle, and a truncated or corrupted file is refused with the reason.
"""
import hashlib
import json
import os
import struct

import torch

from ..core.config import ModelConfig, to_dict
from ..core.errors import UserError
from ..core.storage import atomic_write_bytes
from ..diffusion.model import build_model
from . import lowrank, rotation, smoothing, time_table
from .formats import dequantize_tensor, size_report

FILE_VERSION = 3  # 2: one int scale for 1-D tensors; 3: quantized.safetensors instead of a torch.save container
QUANTIZED_FILE = "quantized.safetensors"
META_KEY = "laqfi_quantized"  # the safetensors metadata key holding the JSON record
_FIELDS = ("data", "scale", "mask", "kept", "codebook")


def stored_digest(stored: dict) -> str:
    """SHA-256 over every stored tensor's name, format, dtype, shape and bytes (identifies the weights)."""
    h = hashlib.sha256()
    for name in sorted(stored):
        entry = stored[name]
        h.update(f"{name}:{entry['format']}".encode())
        for key in sorted(k for k, v in entry.items() if isinstance(v, torch.Tensor)):
            t = entry[key].detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _record(stored: dict, arch: dict, provenance: dict) -> dict:
    tensors = {}
    for name, entry in stored.items():
        rec = {"format": entry["format"],
               "fields": {k: {"dtype": str(entry[k].dtype).replace("torch.", ""), "shape": list(entry[k].shape)}
                          for k in _FIELDS if k in entry}}
        if entry["format"] != "fp32":
            rec["shape"], rec["axis"] = list(entry["shape"]), entry["axis"]
        tensors[name] = rec
    record = {"file_version": FILE_VERSION, "arch": arch, "provenance": provenance, "tensors": tensors,
              "sha256": stored_digest(stored)}
    record = json.loads(json.dumps(record, default=str))  # what a reader parses back, digested as such
    record["record_sha256"] = _record_digest(record)
    return record


def _record_digest(record: dict) -> str:
    """SHA-256 of the header record itself: the tensors' shape / axis, the architecture and the provenance decide
    how the stored bytes are read back, and ``sha256`` covers only the bytes."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_quantized(stored: dict, path: str, arch: dict, provenance: dict) -> dict:
    """Write ``quantized.safetensors`` atomically; return the size report with the file's bytes.

    ``stored_bytes`` (the tensors, = ``analytic_bytes``) and ``header_bytes`` (8-byte length + JSON
    header with the metadata record) add up to ``file_bytes`` exactly.
    """
    from safetensors.torch import save

    tensors = {f"{name}/{k}": entry[k].contiguous() for name, entry in stored.items() for k in _FIELDS if k in entry}
    record = _record(stored, arch, provenance)
    blob = save(tensors, metadata={META_KEY: json.dumps(record)})
    atomic_write_bytes(blob, path)
    report = size_report(stored)
    report["file_bytes"] = os.path.getsize(path)
    report["header_bytes"] = 8 + struct.unpack("<Q", blob[:8])[0]
    if report["file_bytes"] != report["header_bytes"] + report["stored_bytes"]:  # safetensors pads nothing today
        raise AssertionError(f"{path}: {report['file_bytes']} B on disk != header {report['header_bytes']} B + "
                             f"tensors {report['stored_bytes']} B")
    return report


class QuantizedFileError(UserError, ValueError):
    """A quantized file that cannot be used: wrong kind, truncated, corrupted or of an old version."""


def read_quantized(path: str) -> dict:
    """The stored form of a quantized file: {"file_version", "arch", "provenance", "tensors": {name: entry}}.

    Reads with ``safetensors`` only (no pickle); checks the metadata record against the tensors and
    the SHA-256 of every stored byte, so truncation or corruption anywhere is an error naming the file.
    """
    from safetensors import SafetensorError, safe_open

    rerun = "rewrite it by re-running the strategy script that made it (with --force)"
    if path.endswith(".pt"):
        raise QuantizedFileError(
            f"{path}: quantized.pt (a torch.save container, file version 2) is no longer read because loading "
            f"it needs pickle; re-run the strategy script for this variant: it writes {QUANTIZED_FILE} from the "
            f"same plan (the metrics are reused) and removes the old file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
            raw = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise QuantizedFileError(f"{path}: not a readable safetensors file ({e}): truncated or corrupted; "
                                 f"{rerun}") from None
    if META_KEY not in meta:
        raise QuantizedFileError(f"{path}: a safetensors file without the '{META_KEY}' metadata record, i.e. "
                                 f"not a LAQFI quantized file (a plain state dict goes to --checkpoint)")
    try:
        record = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise QuantizedFileError(f"{path}: metadata record is not valid JSON ({e}): corrupted; {rerun}") from None
    if "record_sha256" in record and _record_digest(record) != record["record_sha256"]:  # files since 2026-12-06
        raise QuantizedFileError(f"{path}: metadata record does not match its SHA-256 (a shape, axis, architecture "
                                 f"or provenance entry was changed): corrupted; {rerun}")
    if record.get("file_version") != FILE_VERSION:
        raise QuantizedFileError(f"{path}: file_version {record.get('file_version')!r}, this code reads "
                                 f"{FILE_VERSION}; {rerun}")
    try:
        stored = _entries(record["tensors"], raw, path, rerun)
        arch, provenance = record["arch"], record["provenance"]
    except (KeyError, TypeError, AttributeError) as e:
        raise QuantizedFileError(f"{path}: metadata record incomplete ({type(e).__name__}: {e}); {rerun}") from None
    if raw:
        raise QuantizedFileError(f"{path}: tensors the metadata does not describe: {sorted(raw)[:3]}; {rerun}")
    if stored_digest(stored) != record.get("sha256"):
        raise QuantizedFileError(f"{path}: stored tensors do not match the SHA-256 in the metadata: corrupted; "
                                 f"{rerun}")
    return {"file_version": FILE_VERSION, "arch": arch, "provenance": provenance, "tensors": stored}


def _entries(records: dict, raw: dict, path: str, rerun: str) -> dict:
    """Stored entries from the metadata's per-tensor records; takes their tensors out of ``raw``."""
    stored = {}
    for name, rec in records.items():
        entry = {"format": rec["format"]}
        if rec["format"] != "fp32":
            entry["shape"], entry["axis"] = tuple(rec["shape"]), rec["axis"]
        for k, spec in rec["fields"].items():
            t = raw.pop(f"{name}/{k}", None)
            if t is None or str(t.dtype).replace("torch.", "") != spec["dtype"] or list(t.shape) != spec["shape"]:
                got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
                raise QuantizedFileError(f"{path}: tensor '{name}/{k}' should be {spec['dtype']} {spec['shape']}, "
                                         f"found {got}: corrupted; {rerun}")
            entry[k] = t
        stored[name] = entry
    return stored


def arch_record(cfg, model=None) -> dict:
    """What a quantized file records of the network it belongs to (``model_from_arch`` rebuilds it): the
    config's architecture and, for a ``model`` carrying them, its extras (low-rank branches, time table)."""
    arch = {"model": to_dict(cfg.model), "timesteps": cfg.diffusion.timesteps, "image_size": cfg.data.image_size}
    extras = extras_of(model) if model is not None else {}
    if extras:
        arch["extras"] = extras
    return arch


def is_extra_tensor(name: str) -> bool:
    """A tensor an extra adds to the network (low-rank factors, smoothing divisors, time-table rows): the file
    stores these in 16 bits (``extras_of`` records the extras themselves)."""
    return ".lowrank." in name or name.endswith(".smooth_div") or name.endswith(".time_rows")


def extras_of(model) -> dict:
    """What was added to the plain network, in the order ``model_from_arch`` re-attaches it (the order the
    input hooks run in): {"smooth": {module: channels}, "rotate": {module: block}, "lowrank": {module: rank},
    "time_table": {"steps", "widths"}}."""
    out = {}
    divisors = {n: m.smooth_div.numel() for n, m in model.named_modules() if hasattr(m, "smooth_div")}
    if divisors:
        out["smooth"] = divisors
    blocks = {n: rotation.block_size_of(m) for n, m in model.named_modules() if hasattr(m, "rotation")}
    if blocks:
        out["rotate"] = blocks
    ranks = {n: m.lowrank.down.weight.shape[0] for n, m in model.named_modules() if hasattr(m, "lowrank")}
    if ranks:
        out["lowrank"] = ranks
    if hasattr(model, "time_rows_steps"):
        out["time_table"] = {"steps": model.time_rows_steps.tolist(),
                             "widths": {n: m.time_rows.shape[1] for n, m in model.named_modules()
                                        if n and hasattr(m, "time_rows")}}
    return out


def model_from_arch(arch: dict):
    """An fp32 network of the recorded architecture ({"model": ModelConfig fields, "timesteps": T,
    "image_size": S (absent in older files: 32), "extras": ``extras_of`` (absent: none)})."""
    model = build_model(ModelConfig(**arch["model"]), arch["timesteps"], arch.get("image_size", 32))
    extras = arch.get("extras", {})
    if "smooth" in extras:  # first: the divisor's hook precedes the branch's (smoothing.attach_divisors)
        smoothing.attach_divisors(model, extras["smooth"])
    if "rotate" in extras:
        rotation.attach(model, extras["rotate"])
    if "lowrank" in extras:
        lowrank.attach(model, extras["lowrank"])
    if "time_table" in extras:
        time_table.attach(model, extras["time_table"]["steps"], extras["time_table"]["widths"])
    return model


def load_quantized(path: str, device="cpu"):
    """Rebuild the network from ``quantized.safetensors``; returns (model with de-quantized fp32 weights, blob).

    ``blob`` is ``read_quantized``'s dict; ``blob["tensors"]`` holds the stored entries (what the
    execution backends in ``common.quant.backends`` run from).
    """
    blob = read_quantized(path)
    model = model_from_arch(blob["arch"])
    state = {n: (e["data"] if e["format"] == "fp32" else dequantize_tensor(e)) for n, e in blob["tensors"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise QuantizedFileError(f"{path}: tensors do not fit the recorded architecture: {e}") from None
    return model.to(device).eval().requires_grad_(False), blob
