"""Activation fake-quantization on the inputs of conv / transposed-conv / linear modules.

A b-bit uniform quantizer maps x to integer codes q = clamp(round(x / s) + z, qmin, qmax) and back to
x_hat = (q - z) * s:

* asymmetric: [qmin, qmax] = [0, 2^b - 1]; the range [lo, hi] is widened to include 0 (zero padding and
  ReLU zeros stay exact), s = (hi - lo) / (2^b - 1), z = round(-lo / s);
* symmetric: [qmin, qmax] = [-(2^(b-1) - 1), 2^(b-1) - 1], z = 0, s = max(|lo|, |hi|) / qmax (the
  weight quantizer's convention in ``common.quant.formats``).

Granularity: per tensor with calibrated ranges, where the input of a module that consumes a skip
concatenation may be split into its two channel slices with a range each (Q-Diffusion's shortcut
splitting); or per token, dynamic (each row of an attention projection's (B, L, C) input gets the range of
its own values at run time); or per block, dynamic (microscaling, as MXINT / NVFP4: each run of ``block``
consecutive input channels at one pixel or token gets the range of its own values, its scale stored in 8 bits,
float8 e4m3 times one fp32 scale per sample, so a block of 16 costs 0.5 bit per activation more).
Calibrated ranges may differ per timestep group (TFMQ-style intervals): group g = t * G // T of the timestep
t being denoised. A forward pre-hook on the U-Net itself reads its ``t`` argument, so every sample of a batch
uses the ranges of its own timestep.
"""
import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from ..core.storage import atomic_save_safetensors
from ..diffusion.blocks import Attention
from ..diffusion.schedule import bucket_edges

QUANTIZABLE = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
FILE_FORMAT, FILE_VERSION = "laqfi-act-quant", "1"


def int_range(bits, symmetric: bool):
    """(qmin, qmax) of the integer codes (``bits`` an int, or a tensor of them: tensors of ranges)."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return (0 * bits if torch.is_tensor(bits) else 0), 2 ** bits - 1  # clamp takes two numbers or two tensors


def qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """(scale float32, zero point int32) for ranges ``lo`` <= ``hi`` of any (equal) shape."""
    qmin, qmax = int_range(bits, symmetric)
    lo, hi = lo.float(), hi.float()
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / qmax
    else:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero input: codes 0, not NaN
    if symmetric:
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    return scale, torch.round(-lo / scale).clamp(qmin, qmax).to(torch.int32)


def fake_quant(x, scale, zero_point, qmin: int, qmax: int):
    """x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s; ``scale``/``zero_point`` broadcast against x."""
    z = zero_point.to(x.dtype)
    return (torch.clamp(torch.round(x / scale) + z, qmin, qmax) - z) * scale


def channel_dim(x: torch.Tensor, layer: nn.Module) -> int:
    """The input-channel axis: 1 for conv inputs (B, C, H, W), the last for linear inputs (B, [L,] C)."""
    return x.dim() - 1 if isinstance(layer, nn.Linear) else 1


E4M3_MAX = 448.0  # largest finite float8 e4m3fn


def e4m3_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` (B, ...) rounded to float8 e4m3 relative to one fp32 scale per sample (its largest finite one
    maps to e4m3's largest), as an NVFP4 tensor stores its block scales: a block holding inf / NaN breaks only
    itself, not its sample."""
    red = tuple(range(1, scale.dim()))
    finite = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
    g = (finite.amax(red, keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (scale / g).to(torch.float8_e4m3fn).float().clamp_min(2.0 ** -9) * g  # never a zero scale


def block_fake_quant(x, bits, symmetric: bool, block: int, dim: int):
    """Dynamic per-block quantization along the channel axis ``dim``: each run of ``block`` channels at one
    position gets the range of its own values, its scale rounded by ``e4m3_scale`` (channels padded with zeros
    to a whole block; ``bits`` an int or a tensor of one per sample, shaped (B, 1, ...)). Computed in float32
    (a half-precision scale of a near-zero block would underflow to 0) and returned in x's dtype."""
    v = x.float().movedim(dim, -1)
    c = v.shape[-1]
    pad = -c % block
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.unflatten(-1, (-1, block))
    if torch.is_tensor(bits):
        bits = bits.reshape(-1, *([1] * (v.dim() - 1)))
    qmin, qmax = int_range(bits, symmetric)
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    if symmetric:
        scale = e4m3_scale(torch.maximum(lo.abs(), hi.abs()).float() / qmax)
        zp = torch.zeros_like(scale)
    else:
        lo, hi = lo.clamp(max=0.0).float(), hi.clamp(min=0.0).float()
        scale = e4m3_scale((hi - lo) / (qmax - qmin))
        zp = torch.round(-lo / scale).clamp(qmin, qmax)
    out = fake_quant(v, scale, zp, qmin, qmax).flatten(-2)[..., :c]
    return out.movedim(-1, dim).to(x.dtype)


def straight_through(x, out):
    """``out`` with an identity gradient to ``x`` while training (rounding has none: a dynamic quantizer would
    otherwise pass gradient only through each row's / block's min and max); outside autograd ``out`` itself, bit
    for bit."""
    return x + (out - x).detach() if torch.is_grad_enabled() and x.requires_grad else out


def token_fake_quant(x, bits, symmetric: bool):
    """Dynamic per-token quantization: each row of the last dimension uses the range of its own values
    (``bits`` an int, or a tensor broadcasting against x's rows: bits per sample)."""
    scale, zp = qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits, symmetric)
    return fake_quant(x, scale, zp, *int_range(bits, symmetric))


@dataclass
class LayerQuant:
    """How one module's input is quantized.

    ``scale``/``zero_point``: (G, P) per timestep group and channel part (None when dynamic: per token or block);
    ``block``: channels per block (granularity "block");
    ``split``: the channel where the second part starts (None: one part); ``group_bits``: bits per timestep
    group (activation bits allocated across sampler steps), then ``bits`` is their largest; None: ``bits`` in
    every group.
    """
    bits: int
    symmetric: bool = False
    granularity: str = "tensor"  # or "token" (dynamic, rows of the last dimension), "block" (dynamic, channels)
    split: int | None = None
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    group_bits: tuple | None = None
    block: int | None = None

    @classmethod
    def from_ranges(cls, ranges, bits, symmetric=False, granularity="tensor", split=None, block=None):
        """From calibrated ranges (G, P, 2) = lo, hi per group and part (unused when dynamic, so may be None:
        per-token and per-block inputs need no calibration); ``bits`` an int or one per timestep group."""
        group_bits = None
        if granularity == "tensor" and ranges is None:
            raise ValueError("a per-tensor activation quantizer needs calibrated ranges (got none)")
        if isinstance(bits, (list, tuple)):
            if ranges is not None and len(bits) != ranges.shape[0]:
                raise ValueError(f"{len(bits)} bit widths for {ranges.shape[0]} timestep groups")
            group_bits, bits = tuple(int(b) for b in bits), max(int(b) for b in bits)
        if granularity == "block" and not (isinstance(block, int) and block > 0):
            raise ValueError(f"block granularity needs a positive block size, got {block!r}")
        if granularity in ("token", "block"):
            return cls(bits, symmetric, granularity, split, block=block if granularity == "block" else None,
                       group_bits=group_bits)
        b = bits if group_bits is None else torch.tensor(group_bits).view(-1, *([1] * (ranges.dim() - 2)))
        scale, zp = qparams(ranges[..., 0], ranges[..., 1], b, symmetric)
        return cls(bits, symmetric, "tensor", split, scale, zp, group_bits)

    def sample_bits(self, group, shape):
        """The bits of each sample (its timestep group's), shaped to broadcast; ``bits`` without group bits."""
        if self.group_bits is None:
            return self.bits
        return torch.tensor(self.group_bits, device=group.device)[group].view(shape)

    def apply(self, x, group, dim=None):
        """Fake-quantize x: conv input (B, C, H, W) or linear input (B, [L,] C); ``group`` (B,) long selects
        each sample's parameters; ``dim``: the channel axis (``channel_dim``), which blocks run along."""
        shape = (-1,) + (1,) * (x.dim() - 1)  # per sample, broadcast over the rest
        if self.granularity == "block":
            if dim is None:  # conv and linear inputs keep their channels on different axes: never guess
                raise ValueError("per-block activation quantization needs the input's channel axis (channel_dim)")
            return straight_through(x, block_fake_quant(x, self.sample_bits(group, shape), self.symmetric,
                                                        self.block, dim))
        if self.granularity == "token":
            return straight_through(x, token_fake_quant(x, self.sample_bits(group, shape), self.symmetric))
        qmin, qmax = int_range(self.sample_bits(group, shape), self.symmetric)
        s, z = self.scale[group], self.zero_point[group]  # (B, P)
        if self.split is None:
            return fake_quant(x, s[:, 0].view(shape), z[:, 0].view(shape), qmin, qmax)
        k = self.split
        return torch.cat([fake_quant(x[:, :k], s[:, 0].view(shape), z[:, 0].view(shape), qmin, qmax),
                          fake_quant(x[:, k:], s[:, 1].view(shape), z[:, 1].view(shape), qmin, qmax)], dim=1)

    def to(self, device):
        if self.scale is not None:
            self.scale, self.zero_point = self.scale.to(device), self.zero_point.to(device)
        return self


def quantizable_modules(model: nn.Module) -> list:
    """Names of every conv / transposed-conv / linear module of the network, in module order (not the two
    halves of a low-rank branch: ``common.quant.lowrank`` keeps them in 16 bits beside their layer)."""
    return [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE) and ".lowrank." not in n + "."]


def attention_projections(model: nn.Module) -> set:
    """Names of the attention blocks' input and output projections (candidates for per-token ranges)."""
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, Attention) for p in ("proj1", "proj2")}


def concat_splits(model: nn.Module) -> dict:
    """{module name: channels of the first part} for the modules whose input is a skip concatenation (the
    network declares them: ``model.concat_splits()``; none in a DiT)."""
    return model.concat_splits()


def group_of(t, groups: int, timesteps: int):
    """Timestep group of each t: t * G // T (the buckets of ``fisher.bucket_edges``)."""
    return (torch.as_tensor(t).long().reshape(-1) * groups // timesteps).clamp(0, groups - 1)


class ActQuantizer:
    """Hooks that fake-quantize the inputs of ``layers`` ({module name: LayerQuant}) and, with
    ``softmax_bits``, the attention probabilities (unsigned, fixed range [0, 1], s = 1 / (2^b - 1)).

    ``attach(model)`` installs them on a model whose forward is ``model(x, t)``; ``remove()`` takes them off.
    """

    def __init__(self, layers: dict, groups: int, timesteps: int, softmax_bits=None):
        for name, lq in layers.items():  # learned quantizers (finetune) have no per-group bits
            per_group = getattr(lq, "group_bits", None)
            if per_group is not None and len(per_group) != groups:
                raise ValueError(f"{name}: {len(per_group)} bit widths for {groups} timestep groups")
        self.layers, self.groups, self.timesteps, self.softmax_bits = layers, groups, timesteps, softmax_bits
        self.group = None
        self._handles, self._unfused = [], []

    def attach(self, model: nn.Module):
        mods = dict(model.named_modules())
        missing = sorted(set(self.layers) - set(mods))
        if missing:
            raise KeyError(f"activation quantizer names modules the model does not have: {missing[:3]}")
        device = next(model.parameters()).device
        self._handles.append(model.register_forward_pre_hook(self._see_t))
        for name, lq in self.layers.items():
            lq.to(device)
            self._handles.append(mods[name].register_forward_pre_hook(
                lambda mod, args, lq=lq: (lq.apply(args[0], self._group(args[0]), channel_dim(args[0], mod)),
                                          *args[1:])))
        if self.softmax_bits:
            for m in mods.values():
                if isinstance(m, Attention):
                    m.fused = False  # the fused kernel never materialises the probabilities
                    self._unfused.append(m)
                    self._handles.append(m.softmax.register_forward_hook(self._quant_probs))
        return self

    def remove(self):
        for h in self._handles:
            h.remove()
        for m in self._unfused:
            m.fused = True
        self._handles, self._unfused, self.group = [], [], None

    def _see_t(self, module, args):
        self.group = group_of(args[1], self.groups, self.timesteps).to(args[0].device)
        if len(self.group) == 1 and len(args[0]) > 1:  # a scalar t for the whole batch
            self.group = self.group.expand(len(args[0]))

    def _group(self, x):
        if self.group is None:
            raise RuntimeError("activation quantizer saw no timestep: attach it to the model called as model(x, t)")
        return self.group

    def _quant_probs(self, module, args, out):
        qmax = 2 ** self.softmax_bits - 1
        return torch.clamp(torch.round(out * qmax), 0, qmax) / qmax


def layer_quants(ranges: dict, bits: dict, symmetric=False, token_layers=(), splits=None, block=None) -> dict:
    """{name: LayerQuant} from calibrated ``ranges`` {name: (G, P, 2)} and ``bits`` {name: b or None (float: left
    out)}, in ``bits``' order: with ``block`` (channels) every input gets dynamic per-block ranges (``ranges`` may
    then be None: nothing is calibrated); else modules in ``token_layers`` get dynamic per-token ranges, ``splits``
    {name: channel} two-part ranges. The one place a module's input quantizer is made
    (``experiments.act_pipeline.input_quants`` applies a config's layout)."""
    splits, ranges = splits or {}, ranges or {}

    def granularity(n):
        return "block" if block else "token" if n in token_layers else "tensor"

    missing = [n for n, b in bits.items() if b is not None and granularity(n) == "tensor" and n not in ranges]
    if missing:
        raise ValueError(f"no calibrated activation ranges for the per-tensor inputs {missing[:3]}"
                         + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""))
    return {n: LayerQuant.from_ranges(ranges.get(n), b, symmetric, granularity(n), splits.get(n), block or None)
            for n, b in bits.items() if b is not None}


def build_quantizer(ranges: dict, bits: dict, groups: int, timesteps: int, symmetric=False, token_layers=(),
                    splits=None, softmax_bits=None, block=None) -> ActQuantizer:
    """ActQuantizer of ``layer_quants(ranges, bits, symmetric, token_layers, splits, block)``."""
    return ActQuantizer(layer_quants(ranges, bits, symmetric, token_layers, splits, block), groups, timesteps,
                        softmax_bits)


# ----------------------------------------------------------------------------- file
def _layer_meta(lq: LayerQuant) -> dict:
    qmin, qmax = int_range(lq.bits, lq.symmetric)
    meta = {"bits": lq.bits, "symmetric": lq.symmetric, "granularity": lq.granularity, "split": lq.split,
            "qmin": qmin, "qmax": qmax}
    if lq.group_bits is not None:  # only then: files without per-step bits stay byte-identical
        meta["group_bits"] = list(lq.group_bits)
    if lq.block is not None:
        meta["block"], meta["block_scale"] = lq.block, "float8_e4m3fn x fp32 per sample"
    return meta


# Every key starts with "act." / "act_" so the file can be merged into a variant's weight file as it is.
def _file_tensors(q: ActQuantizer) -> dict:
    out = {}
    for name, lq in q.layers.items():
        if lq.granularity == "tensor":
            out[f"act.{name}.scale"], out[f"act.{name}.zero_point"] = lq.scale.cpu(), lq.zero_point.cpu()
    return out


def _file_metadata(q: ActQuantizer) -> dict:
    return {"act_format": FILE_FORMAT, "act_version": FILE_VERSION, "act_groups": str(q.groups),
            "act_timesteps": str(q.timesteps), "act_group_edges": json.dumps(bucket_edges(q.timesteps, q.groups)),
            "act_softmax_bits": json.dumps(q.softmax_bits),
            "act_layers": json.dumps({n: _layer_meta(lq) for n, lq in q.layers.items()})}


def quantizer_digest(q: ActQuantizer) -> str:
    """SHA-256 over the parameters that decide the quantized activations (not the provenance)."""
    h = hashlib.sha256(json.dumps(_file_metadata(q), sort_keys=True).encode())
    for k, t in sorted(_file_tensors(q).items()):
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_act_quant(q: ActQuantizer, path: str, provenance: dict):
    """Write ``act_quant.safetensors``: per tensor-granularity module ``act.<name>.scale`` (G, P) float32 and
    ``act.<name>.zero_point`` (G, P) int32; string metadata ``act_layers`` (JSON: per-module bits / symmetric /
    granularity / split / qmin / qmax), ``act_groups``, ``act_timesteps``, ``act_group_edges``,
    ``act_softmax_bits``, ``act_provenance`` and ``act_format`` / ``act_version``.
    A sample of timestep t uses row t * groups // timesteps; code = clamp(round(x / scale) + zero_point,
    qmin, qmax), value = (code - zero_point) * scale; split modules use part 0 for channels [0, split). A module
    with bits per timestep group has ``group_bits`` in its layer entry: group g's codes use [qmin, qmax] of
    group_bits[g] (``bits`` / ``qmin`` / ``qmax`` are then its largest width's)."""
    atomic_save_safetensors(_file_tensors(q), path, {**_file_metadata(q), "act_provenance": json.dumps(provenance)})


def load_act_quant(path: str):
    """(ActQuantizer, provenance) rebuilt from an ``act_quant.safetensors`` file (no pickle)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get("act_format") != FILE_FORMAT or meta.get("act_version") != FILE_VERSION:
        raise ValueError(f"{path}: not a LAQFI activation-quantization file (act_format {meta.get('act_format')!r} "
                         f"act_version {meta.get('act_version')!r}; expected {FILE_FORMAT!r} version {FILE_VERSION})")
    groups = int(meta["act_groups"])
    layers = {}
    for name, m in json.loads(meta["act_layers"]).items():
        group_bits = m.get("group_bits")
        if group_bits is not None and len(group_bits) != groups:
            raise ValueError(f"{path}: {name} has {len(group_bits)} group bit widths for {groups} timestep groups")
        if m["granularity"] not in ("tensor", "token", "block") or (
                m["granularity"] == "block" and not (isinstance(m.get("block"), int) and m["block"] > 0)):
            raise ValueError(f"{path}: {name} has granularity {m['granularity']!r} block {m.get('block')!r}; "
                             f"expected tensor, token or block with a positive block size")
        lq = LayerQuant(m["bits"], m["symmetric"], m["granularity"], m["split"], block=m.get("block"),
                        group_bits=None if group_bits is None else tuple(group_bits))
        if lq.granularity == "tensor":
            parts = 1 if lq.split is None else 2
            for key in ("scale", "zero_point"):
                t = tensors.get(f"act.{name}.{key}")
                if t is None or tuple(t.shape) != (groups, parts):
                    raise ValueError(f"{path}: tensor act.{name}.{key} missing or not of shape ({groups}, {parts})")
            lq.scale, lq.zero_point = tensors[f"act.{name}.scale"], tensors[f"act.{name}.zero_point"]
        layers[name] = lq
    q = ActQuantizer(layers, groups, int(meta["act_timesteps"]), json.loads(meta["act_softmax_bits"]))
    return q, json.loads(meta.get("act_provenance", "{}"))
