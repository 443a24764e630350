"""Weight quantization formats: quantizers, element masks, bit packing and exact size accounting.

A *plan* maps parameter names to a ``Assignment(format, mask)``; parameters not in the plan stay
fp32. ``quantize_model`` returns a copy of the model whose weights are the de-quantized values
(so sampling sees the rounding) plus the *stored* form, which holds each tensor in its real
dtype: fp16/bf16 tensors, int8 values or int4 nibbles packed two per byte with fp32 per-output-
channel scales, and for element granularity a bit-packed mask, the quantized elements and the
kept fp32 elements. ``entry_bits`` counts that storage analytically. The file that holds a stored
model is ``common.quant.container``'s ``quantized.safetensors``.
"""
import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

FORMATS = ("fp16", "bf16", "int8", "int4")
BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4}
_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
_QMAX = {"int8": 127, "int4": 7}  # symmetric, round-to-nearest: codes -qmax..qmax


@dataclass
class Assignment:
    format: str
    mask: torch.Tensor | None = None  # bool, parameter's shape, True = quantized; None = whole tensor


def channel_axes(model: nn.Module) -> dict:
    """Output-channel axis of each weight: 1 for ConvTranspose2d (in, out, kh, kw), else 0."""
    axes = {}
    for mod_name, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            axes[full] = 1 if isinstance(mod, nn.ConvTranspose2d) and pname == "weight" else 0
    return axes


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] (any shape) -> uint8, two per byte (low nibble first), length ceil(n/2)."""
    u = (codes.flatten().to(torch.int16) + 8).to(torch.uint8)
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    u = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()[:n]
    return u.to(torch.int8) - 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (any shape) -> uint8, 8 flags per byte (LSB first), length ceil(n/8)."""
    m = mask.flatten().to(torch.uint8)
    pad = (-m.numel()) % 8
    if pad:
        m = torch.cat([m, m.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (m.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.flatten()[:n].bool()


def scale_groups(shape, axis: int) -> int:
    """Number of int scales of a tensor: one per output channel, but one for a 1-D tensor (a bias or
    norm weight has no channels; a scale per element would store it losslessly at more than fp32's size)."""
    return shape[axis] if len(shape) > 1 else 1


def _channel_first(w: torch.Tensor, axis: int) -> torch.Tensor:
    return w.movedim(axis, 0).reshape(scale_groups(w.shape, axis), -1)


def _from_channel_first(flat: torch.Tensor, shape, axis: int) -> torch.Tensor:
    if len(shape) == 1:
        return flat.reshape(shape)
    moved = list(shape)
    moved.insert(0, moved.pop(axis))
    return flat.reshape(moved).movedim(0, axis)


def _encode(values_cf: torch.Tensor, fmt: str, scale):
    """Encode channel-first values (C, K) or a 1-D selection with per-element scales."""
    if fmt in _CAST:
        return values_cf.to(_CAST[fmt]).clone()
    codes = torch.round(values_cf / scale).clamp(-_QMAX[fmt], _QMAX[fmt]).to(torch.int8)
    return codes.clone() if fmt == "int8" else pack_int4(codes)


def _decode(data: torch.Tensor, fmt: str, scale, n: int) -> torch.Tensor:
    if fmt in _CAST:
        return data.float().flatten()
    codes = data.flatten() if fmt == "int8" else unpack_int4(data, n)
    return codes.float() * scale


def quantize_tensor(w: torch.Tensor, fmt: str, axis: int = 0, mask=None) -> dict:
    """Stored form of one fp32 tensor in ``fmt`` (whole tensor, or the elements where ``mask``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    w = w.detach().float().cpu()
    cf = _channel_first(w, axis)
    entry = {"format": fmt, "shape": tuple(w.shape), "axis": axis}
    scale_full = None
    m = None if mask is None else _channel_first(mask.bool().cpu(), axis)
    if fmt in _QMAX:
        # Per output channel, over the elements actually quantized (the kept ones stay fp32, so their
        # range must not coarsen the scale); an all-zero channel gets scale 1 so its codes are 0, not NaN.
        amax = (cf.abs() if m is None else torch.where(m, cf.abs(), 0.0)).amax(dim=1)
        scale = torch.where(amax > 0, amax / _QMAX[fmt], torch.ones_like(amax))
        entry["scale"] = scale.clone()
        scale_full = scale[:, None].expand_as(cf)
    if m is None:
        entry["data"] = _encode(cf, fmt, scale_full)
        return entry
    entry["mask"] = pack_bits(m)
    entry["data"] = _encode(cf[m], fmt, None if scale_full is None else scale_full[m])
    entry["kept"] = cf[~m].clone()
    return entry


def dequantize_tensor(entry: dict) -> torch.Tensor:
    """fp32 tensor of the original shape from a stored entry."""
    shape, axis, fmt = entry["shape"], entry["axis"], entry["format"]
    C = scale_groups(shape, axis)
    n = math.prod(shape)
    scale = entry.get("scale")
    if "mask" not in entry:
        s = None if scale is None else scale[:, None].expand(C, n // C).flatten()
        flat = _decode(entry["data"], fmt, s, n)
        return _from_channel_first(flat.reshape(C, -1), shape, axis)
    m = unpack_bits(entry["mask"], n).reshape(C, -1)
    out = torch.empty(C, n // C)
    s = None if scale is None else scale[:, None].expand(C, n // C)[m]
    out[m] = _decode(entry["data"], fmt, s, int(m.sum()))
    out[~m] = entry["kept"]
    return _from_channel_first(out, shape, axis)


def entry_bits(numel: int, channels: int, fmt: str, n_quantized=None) -> int:
    """Analytic storage bits of one tensor (byte-rounded like the stored arrays); ``channels`` is its
    number of scales, ``scale_groups(shape, axis)``."""
    def payload(k):
        return 8 * math.ceil(k * BITS[fmt] / 8)
    scales = 32 * channels if fmt in _QMAX else 0
    if n_quantized is None:
        return payload(numel) + scales
    return 8 * math.ceil(numel / 8) + payload(n_quantized) + 32 * (numel - n_quantized) + scales


def quantize_model(model: nn.Module, plan: dict):
    """Return (model copy with de-quantized weights, stored dict {name: entry}).

    ``plan``: {param name: Assignment}; every other parameter is stored as fp32.
    """
    axes = channel_axes(model)
    qmodel = copy.deepcopy(model)
    params = dict(qmodel.named_parameters())
    unknown = sorted(set(plan) - set(params))
    if unknown:
        raise KeyError(f"plan names parameters the model does not have: {unknown[:3]}")
    stored = {}
    with torch.no_grad():
        for name, p in params.items():
            a = plan.get(name)
            if a is None:
                stored[name] = {"format": "fp32", "data": p.detach().cpu().clone()}
                continue
            entry = quantize_tensor(p, a.format, axes[name], a.mask)
            stored[name] = entry
            p.copy_(dequantize_tensor(entry).to(p.device))
    return qmodel, stored


def _entry_tensors(entry):
    return [v for v in entry.values() if isinstance(v, torch.Tensor)]


def size_report(stored: dict) -> dict:
    """Analytic bytes (from bit counts) and the bytes of the tensors actually stored."""
    analytic_bits = stored_bytes = 0
    quantized = total = 0
    for entry in stored.values():
        stored_bytes += sum(t.numel() * t.element_size() for t in _entry_tensors(entry))
        if entry["format"] == "fp32":
            n = entry["data"].numel()
            analytic_bits += 32 * n
            total += n
            continue
        n, C = math.prod(entry["shape"]), scale_groups(entry["shape"], entry["axis"])
        nq = n - entry["kept"].numel() if "mask" in entry else None
        analytic_bits += entry_bits(n, C, entry["format"], nq)
        quantized += n if nq is None else nq
        total += n
    return {"analytic_bytes": analytic_bits // 8, "stored_bytes": stored_bytes,
            "quantized_elements": quantized, "total_elements": total,
            "quantized_fraction": quantized / total if total else 0.0}
