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

from ..core.format_names import format_spec

FORMATS = ("fp16", "bf16", "int8", "int4")  # the poster's and the comparisons' menu (element masks allowed)
_CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
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


def pack_codes(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes < 2^bits (any shape) -> uint8, as one little-endian bit stream: code i occupies bits
    [i*bits, (i+1)*bits), each byte filled from its least significant bit; length ceil(n*bits/8). For 4 bits
    that is two codes per byte, the first in the low nibble."""
    u = u.flatten().to(torch.uint8)
    stream = ((u[:, None] >> torch.arange(bits, dtype=torch.uint8)) & 1).flatten().bool()
    return pack_bits(stream)


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The ``n`` unsigned codes of ``pack_codes`` as uint8."""
    stream = unpack_bits(packed, n * bits).view(n, bits).to(torch.uint8)
    return (stream << torch.arange(bits, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def pack_signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer codes in [-2^(b-1), 2^(b-1) - 1] (any shape, any integer or integral float dtype) ->
    ``pack_codes`` of code + 2^(b-1) (offset binary): the one layout of every packed integer format."""
    return pack_codes((codes.flatten().to(torch.int16) + 2 ** (bits - 1)).to(torch.uint8), bits)


def unpack_signed(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The ``n`` signed codes of ``pack_signed`` as int8 (n,)."""
    return (unpack_codes(packed, n, bits).to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """``unpack_signed(packed, n, 4)``: int4 codes in [-8, 7], two per byte, low nibble first."""
    return unpack_signed(packed, n, 4)


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
    """Number of output channels of a tensor as quantization sees it (rows of the channel-first view): one per
    output channel, but one for a 1-D tensor (a bias or norm weight has no channels; a scale per element
    would store it losslessly at more than fp32's size)."""
    return shape[axis] if len(shape) > 1 else 1


def _channel_first(w: torch.Tensor, axis: int) -> torch.Tensor:
    return w.movedim(axis, 0).reshape(scale_groups(w.shape, axis), -1)


def _from_channel_first(flat: torch.Tensor, shape, axis: int) -> torch.Tensor:
    if len(shape) == 1:
        return flat.reshape(shape)
    moved = list(shape)
    moved.insert(0, moved.pop(axis))
    return flat.reshape(moved).movedim(0, axis)


def fp16_scale_values(scale: torch.Tensor) -> torch.Tensor:
    """Scales as the fp16 a group-wise entry stores them, never 0 or inf."""
    return scale.clamp(2.0 ** -24, 65504.0).half()  # the smallest fp16 subnormal: tiny groups round to 0


def empty_scale(spec) -> float:
    """The scale of an all-zero row or group: 1 on the symmetric grid (its codes are 0, values 0), the smallest
    fp16 subnormal on a midrise grid, which has no zero level (its values are +-scale / 2: negligible, not 0.5)."""
    return 2.0 ** -24 if spec.midrise else 1.0


def _fp16_scale(amax: torch.Tensor, qmax: float, empty: float = 1.0) -> torch.Tensor:
    """amax / qmax as fp16, never 0 or inf (an all-zero group gets ``empty``, so its codes are 0, not NaN)."""
    return fp16_scale_values(torch.where(amax > 0, amax / qmax, torch.full_like(amax, empty)))


def group_scale(cf: torch.Tensor, group: int, qmax: float, empty: float = 1.0) -> torch.Tensor:
    """fp16 (C, G) scales of a channel-first (C, K) tensor, one per group of ``group`` inputs of a row:
    max|w| / qmax over the group (``empty`` for an all-zero group, ``empty_scale``)."""
    return _fp16_scale(_group_view(cf, group).abs().amax(-1), qmax, empty)


def expand_group_scale(scale: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """fp16 (C, G) group scales -> fp32 (C, K), the scale of every element (what de-quantization multiplies)."""
    return scale.float().repeat_interleave(group, dim=1)[:, :k]


def _group_view(cf: torch.Tensor, group: int) -> torch.Tensor:
    """(C, K) -> (C, ceil(K / group), group), zero-padded at the end of each row."""
    C, K = cf.shape
    G = -(-K // group)
    return torch.nn.functional.pad(cf, (0, G * group - K)).view(C, G, group)


# 2: an empty cluster at convergence moves to the farthest value and Lloyd resumes (1: it kept its centroid, a
# code no value used, in ~2% of km4 rows); caches of codebook entries record it, so rule-1 entries are recomputed
KMEANS_VERSION = 2


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 30) -> torch.Tensor:
    """Lloyd's k-means on each row of ``x`` (R, K) with k centroids, initialised at evenly spaced quantiles
    (deterministic). Repeated values make quantiles coincide and can leave a cluster empty, a code no value uses:
    such a centroid then moves to the row's value farthest from its own centroid (as scikit-learn's k-means
    relocates empty clusters) and Lloyd resumes on that row. Every step lowers the squared error or keeps it, so
    a row never ends worse than under the plain rule, and rows without an empty cluster are unchanged by it.
    Returns (R, k) sorted centroids."""
    q = torch.linspace(0, 1, 2 * k + 1, dtype=x.dtype)[1::2]
    c = _lloyd(x, torch.quantile(x, q, dim=1).T.contiguous(), iters)
    for _ in range(k):
        rows = _refill_empty(x, c)
        if not rows:
            break
        c[rows] = _lloyd(x[rows], c[rows], iters)
    return c.sort(dim=1).values


def _lloyd(x: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    """At most ``iters`` Lloyd steps on every row from centroids ``c`` (R, k); an empty cluster keeps its own."""
    for _ in range(iters):
        onehot = torch.nn.functional.one_hot((x[:, :, None] - c[:, None, :]).abs().argmin(-1), c.shape[1])
        onehot = onehot.to(x.dtype)
        count = onehot.sum(1)
        new = torch.where(count > 0, (onehot * x[:, :, None]).sum(1) / count.clamp(min=1), c)
        if torch.equal(new, c):
            break
        c = new
    return c


def _refill_empty(x: torch.Tensor, c: torch.Tensor) -> list:
    """In place: each empty cluster of ``c`` takes its row's value farthest from its centroid that is not already
    a centroid (that value's error becomes 0, no other grows). Returns the rows changed; a row with fewer
    distinct values than clusters keeps its spare centroids."""
    idx = (x[:, :, None] - c[:, None, :]).abs().argmin(-1)
    count = torch.nn.functional.one_hot(idx, c.shape[1]).sum(1)
    changed = []
    for r in torch.nonzero((count == 0).any(1)).flatten().tolist():
        dist = (x[r] - c[r, idx[r]]).abs()
        empty = (count[r] == 0).nonzero().flatten().tolist()
        taken = set(c[r].tolist())
        for i in dist.argsort(descending=True, stable=True).tolist():
            if not empty or dist[i] == 0:
                break
            if float(x[r, i]) not in taken:
                c[r, empty.pop(0)] = x[r, i]
                taken.add(float(x[r, i]))
                changed.append(r)
    return sorted(set(changed))


def quantize_tensor(w: torch.Tensor, fmt: str, axis: int = 0, mask=None) -> dict:
    """Stored form of one fp32 tensor in ``fmt`` (whole tensor, or the elements where ``mask``: classic formats
    only). Fields: ``data`` (fp16/bf16 values, int8 codes, or b-bit codes / indices packed by ``pack_codes``),
    ``scale`` (fp32 (C,) per channel, or fp16 (C, groups)), ``codebook`` (fp16 (C or 1, 2^b)), and for a mask
    ``mask`` (packed bits) and ``kept`` (the fp32 elements it leaves)."""
    spec = format_spec(fmt)
    if mask is not None and (spec.group is not None or spec.kind == "codebook" or spec.bits < 4 or spec.midrise):
        raise ValueError(f"format {fmt!r}: element masks are for fp16, bf16, int8 and int4 only")
    w = w.detach().float().cpu()
    cf = _channel_first(w, axis)
    entry = {"format": fmt, "shape": tuple(w.shape), "axis": axis}
    if spec.kind == "float":
        if mask is None:
            entry["data"] = cf.to(_CAST[fmt]).clone()
            return entry
        m = _channel_first(mask.bool().cpu(), axis)
        entry.update(mask=pack_bits(m), data=cf[m].to(_CAST[fmt]).clone(), kept=cf[~m].clone())
        return entry
    if spec.kind == "codebook":
        rows = cf.reshape(1, -1) if spec.per_tensor else cf
        book = kmeans_1d(rows.double(), 2 ** spec.bits).half()
        # indices to the nearest *stored* (fp16) centroid, so de-quantization is exact
        idx = (rows[:, :, None] - book.float()[:, None, :]).abs().argmin(-1)
        entry.update(codebook=book.contiguous(), data=pack_codes(idx.to(torch.uint8), spec.bits))
        return entry
    if spec.group is not None:
        scale = group_scale(cf, spec.group, spec.qmax, empty_scale(spec))
        codes = round_codes(cf / expand_group_scale(scale, spec.group, cf.shape[1]), spec)
        return group_entry(fmt, entry["shape"], axis, codes, scale)
    m = None if mask is None else _channel_first(mask.bool().cpu(), axis)
    scale = channel_scale(cf, spec.qmax, m, empty_scale(spec))
    scale_full = scale[:, None].expand_as(cf)
    values, s = (cf, scale_full) if m is None else (cf[m], scale_full[m])
    codes = round_codes(values / s, spec)
    return int_entry(fmt, entry["shape"], axis, codes, scale, m, None if m is None else cf[~m])


def round_codes(x: torch.Tensor, spec) -> torch.Tensor:
    """The stored integer codes of ``x`` (in units of the scale) on the format's grid, nearest level: -qmax..qmax
    symmetric, or on a midrise grid the k of the level k + 1/2 (k in -2^(b-1) .. 2^(b-1) - 1)."""
    if spec.midrise:
        return torch.floor(x).clamp(-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1)
    return torch.round(x).clamp(-spec.qmax, spec.qmax)


def channel_scale(cf: torch.Tensor, qmax: float, mask=None, empty: float = 1.0) -> torch.Tensor:
    """(C,) per-output-channel scales max|w| / qmax of a channel-first (C, K) tensor, over the elements a bool
    ``mask`` (C, K) marks as quantized (the kept ones stay fp32, so their range must not coarsen the scale); an
    all-zero channel gets scale ``empty`` (``empty_scale``) so its codes are 0, not NaN. Used by
    ``quantize_tensor`` and by the learned quantizers of ``common.quant.learnable``."""
    a = cf.detach().abs()
    amax = (a if mask is None else torch.where(mask, a, 0.0)).amax(dim=1)
    return torch.where(amax > 0, amax / qmax, torch.full_like(amax, empty))


def int_entry(fmt: str, shape, axis: int, codes: torch.Tensor, scale: torch.Tensor, mask=None, kept=None) -> dict:
    """The stored entry of per-output-channel integer codes: ``codes`` (integral values in [-qmax, qmax], the
    channel-first order, only the masked elements when ``mask``) as int8 data (8 bits) or ``pack_signed``;
    ``scale`` (C,) fp32; for a mask the packed ``mask`` and the ``kept`` fp32 elements."""
    bits = format_spec(fmt).bits
    codes = codes.detach().cpu().to(torch.int8)
    entry = {"format": fmt, "shape": tuple(shape), "axis": axis, "scale": scale.detach().float().cpu().clone(),
             "data": codes.clone() if bits == 8 else pack_signed(codes, bits)}
    if mask is not None:
        entry.update(mask=pack_bits(mask), kept=kept.clone())
    return entry


def group_entry(fmt: str, shape, axis: int, codes: torch.Tensor, scale: torch.Tensor) -> dict:
    """The stored entry of group-wise integer codes: ``codes`` (C, K) integral in [-qmax, qmax], channel-first,
    packed by ``pack_signed``; ``scale`` fp16 (C, G), one per group of the format's size."""
    return {"format": fmt, "shape": tuple(shape), "axis": axis, "scale": scale.detach().cpu().half().contiguous(),
            "data": pack_signed(codes.detach().cpu(), format_spec(fmt).bits)}


def int_codes(entry: dict) -> torch.Tensor:
    """The signed integer codes of an "int" entry without a mask, channel-first (C, K), as int8 (a midrise
    format's k: its values are (k + 1/2) x scale)."""
    spec = format_spec(entry["format"])
    n = math.prod(entry["shape"])
    C = scale_groups(entry["shape"], entry["axis"])
    if spec.bits == 8:
        return entry["data"].reshape(C, -1)
    return unpack_signed(entry["data"], n, spec.bits).reshape(C, -1)


def dequantize_tensor(entry: dict) -> torch.Tensor:
    """fp32 tensor of the original shape from a stored entry."""
    shape, axis, fmt = entry["shape"], entry["axis"], entry["format"]
    spec = format_spec(fmt)
    C = scale_groups(shape, axis)
    n = math.prod(shape)
    K = n // C
    if "mask" in entry:
        m = unpack_bits(entry["mask"], n).reshape(C, -1)
        out = torch.empty(C, K)
        if spec.kind == "float":
            out[m] = entry["data"].float()
        else:
            nq = int(m.sum())
            codes = entry["data"] if spec.bits == 8 else unpack_signed(entry["data"], nq, spec.bits)
            out[m] = (codes.float() + spec.offset) * entry["scale"][:, None].expand(C, K)[m]
        out[~m] = entry["kept"]
        return _from_channel_first(out, shape, axis)
    if spec.kind == "float":
        out = entry["data"].float().reshape(C, K)
    elif spec.kind == "codebook":
        book = entry["codebook"].float()
        idx = unpack_codes(entry["data"], n, spec.bits).long()
        out = (book[0][idx] if spec.per_tensor else book.gather(1, idx.view(C, K))).reshape(C, K)
    elif spec.group is not None:
        out = (int_codes(entry).float() + spec.offset) * expand_group_scale(entry["scale"], spec.group, K)
    else:
        out = (int_codes(entry).float() + spec.offset) * entry["scale"][:, None]
    return _from_channel_first(out, shape, axis)


def entry_bits(numel: int, channels: int, fmt: str, n_quantized=None) -> int:
    """Analytic storage bits of one tensor (byte-rounded like the stored arrays), scales and codebooks included;
    ``channels`` is ``scale_groups(shape, axis)``, the rows of its channel-first view."""
    spec = format_spec(fmt)

    def payload(k):
        return 8 * math.ceil(k * spec.bits / 8)
    if spec.kind == "codebook":
        return payload(numel) + 16 * 2 ** spec.bits * (1 if spec.per_tensor else channels)
    if spec.group is not None:
        return payload(numel) + 16 * channels * -(-(numel // channels) // spec.group)
    scales = 32 * channels if spec.kind == "int" else 0
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
