"""Quantizers with parameters to learn: the weights' rounding (AdaRound), the weights themselves through a
straight-through estimator, and the activations' step sizes (LSQ). They train in fake-quantized form and export
to the ordinary files: integer codes and scales for ``quantized.safetensors`` (``export_weight``) and
``LayerQuant`` scales for ``act_quant.safetensors`` (``LearnedActQuant.export``), so what is evaluated is what
the file holds.

* Weights: symmetric b-bit codes, one scale per output channel s_c = max|w_c| / qmax (``formats.channel_scale``,
  the scale of ``formats.quantize_tensor``; ``formats.int_entry`` stores the learned codes as it stores its own),
  or one fp16 scale per group of inputs of a row for the group-wise formats (``formats.group_scale``,
  ``formats.group_entry``).
  ``ste``: w_hat = s * clamp(round(w / s)), the gradient passing the rounding unchanged (Bengio et al. 2013), so
  the weights w themselves train (QuEST-style finetuning). ``adaround`` (Nagel et al. 2020): w fixed,
  w_hat = s * clamp(floor(w / s) + h(V)) with h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1,
  gamma = -0.1, V initialised so h equals the fractional part; the regulariser sum(1 - |2h - 1|^beta), beta
  annealed from 20 to 2, drives h to 0 or 1, and the export rounds it. ``lsq``: as ``ste``, with the per-channel
  scale a parameter of its own (log s, initialised at max|w_c| / qmax) learned with the weights (LSQ for
  weights, EfficientDM-style), so ranges can shrink below the largest weight and codes flip.
* Activations (LSQ, Esser et al. 2020): per timestep group and channel part a learned step s (and the
  calibrated zero point), x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) s with round passed straight
  through and the step's gradient scaled by 1 / sqrt(numel * qmax).
"""
import math

import torch
from torch import nn

from ..core.format_names import format_spec
from .activations import LayerQuant, int_range
from .formats import (
    _channel_first,
    _from_channel_first,
    channel_scale,
    expand_group_scale,
    fp16_scale_values,
    group_entry,
    group_scale,
    int_entry,
)

ZETA, GAMMA = 1.1, -0.1


# The gradient rule of the learned quantizers; results trained under another are retrained, not reused. 2
# (2026-12-06): values that round to a limit keep their gradient (clip before rounding, as LSQ); 1: they had none.
# 3 (2026-12-06, later): a learned activation step trains at exactly the value it exports (it could be 1 ulp off).
GRADIENT_VERSION = 3


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return x + (torch.round(x) - x).detach()


def round_clamp_ste(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """clamp(round(x), lo, hi) forward; backward identity wherever the clamp changed nothing (round(x) within
    [lo, hi]) and 0 where it clipped. torch's clamp of the rounded codes is flat at its ends, which froze every
    value that merely rounds to a limit -- each channel's largest weight, whose code is the limit by its scale."""
    inside = (x > lo - 0.5) & (x < hi + 0.5)  # round half to even: lo - 0.5 and hi + 0.5 would leave the range
    return round_ste(torch.where(inside, x, x.detach().clamp(lo, hi)))


class WeightQuant(nn.Module):
    """Fake-quantizes one weight (a parametrization: ``module.weight`` becomes ``forward(original)``), in a
    per-channel integer format or a group-wise one (``int3_g64``: one fp16 scale per group of inputs of a row, as
    ``formats.quantize_tensor`` stores it; the learned scales of ``lsq`` then train at their fp16 values).
    ``scale``: a stored entry's scales ((C,) or (C, G)) to keep instead of max|w| / qmax (a plan's, whose codes
    need not reach qmax in every row or group after GPTQ's error compensation); ``lsq`` starts from them."""

    def __init__(self, weight: torch.Tensor, fmt: str, axis: int, mode: str, scale=None):
        super().__init__()
        spec = format_spec(fmt)
        if spec.midrise:  # its rounding, clamp and straight-through estimator are the symmetric grid's
            raise ValueError(f"learned quantizer: format {fmt!r} is on a midrise grid, not trainable here; "
                             "int8 / int4 / int3 / int2 with or without groups are")
        if spec.kind != "int":
            raise ValueError(f"learned quantization supports integer formats (per channel or group-wise), not {fmt!r}")
        self.fmt, self.axis, self.mode, self.qmax, self.group = fmt, axis, mode, spec.qmax, spec.group
        self.shape = tuple(weight.shape)
        self.register_buffer("fixed_scale", None if scale is None or mode == "lsq" else
                             scale.detach().float().to(weight.device).clone())
        if mode == "adaround":
            cf = _channel_first(weight.detach(), axis)
            s = self.scales(cf)[1]
            frac = cf / s - torch.floor(cf / s)
            # h(V) = frac at the start: sigmoid(V) = (frac - gamma) / (zeta - gamma)
            p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
            self.v = nn.Parameter(torch.log(p / (1 - p)))
        elif mode == "lsq":
            init = (scale.detach().float().to(weight.device) if scale is not None
                    else self.scales(_channel_first(weight.detach(), axis))[0])
            self.log_scale = nn.Parameter(init.log())
        elif mode != "ste":
            raise ValueError(f"weight quantizer mode must be 'ste', 'lsq' or 'adaround', got {mode!r}")

    def scales(self, cf: torch.Tensor):
        """(stored, per element) scales of the channel-first (C, K) weight: what the file stores ((C,) fp32 per
        channel, (C, G) fp16-valued per group) and each element's ((C, 1) or (C, K))."""
        if self.mode == "lsq" and hasattr(self, "log_scale"):
            stored = self.log_scale.exp()
            if self.group is not None:  # the file holds fp16 scales: train with the value it will hold
                stored = stored + (fp16_scale_values(stored).float() - stored).detach()
        elif self.fixed_scale is not None:
            stored = self.fixed_scale
        elif self.group is None:
            stored = channel_scale(cf, self.qmax)
        else:
            stored = group_scale(cf.detach(), self.group, self.qmax).float()
        if self.group is None:
            return stored, stored[:, None]
        return stored, expand_group_scale(stored, self.group, cf.shape[1])

    def h(self):
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def codes(self, w: torch.Tensor, hard=True):
        """Channel-first (C, K) codes of ``w`` (AdaRound: with its learned rounding, hard = rounded h), the
        per-element scales and the stored ones."""
        cf = _channel_first(w, self.axis)
        stored, s = self.scales(cf)
        if self.mode == "adaround":
            h = (self.h() >= 0.5).to(cf.dtype) if hard else self.h()
            return torch.clamp(torch.floor(cf.detach() / s) + h, -self.qmax, self.qmax), s, stored
        if hard:
            return torch.clamp(torch.round(cf / s), -self.qmax, self.qmax), s, stored
        return round_clamp_ste(cf / s, -self.qmax, self.qmax), s, stored

    def forward(self, w):
        codes, s, _ = self.codes(w, hard=False)
        return _from_channel_first(codes * s, self.shape, self.axis)

    def regularizer(self, beta: float) -> torch.Tensor:
        if self.mode != "adaround":
            return torch.zeros(())
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def export_weight(wq: WeightQuant, w: torch.Tensor) -> dict:
    """The stored entry (``formats.quantize_tensor``'s layout) of the learned codes: int8 data or packed codes and
    fp32 per-channel scales, or packed codes and fp16 group scales."""
    with torch.no_grad():
        codes, _, stored = wq.codes(w.detach().float(), hard=True)
    if wq.group is not None:
        return group_entry(wq.fmt, wq.shape, wq.axis, codes, stored)
    return int_entry(wq.fmt, wq.shape, wq.axis, codes, stored)


class LSQFakeQuant(torch.autograd.Function):
    """x_hat = (round(clamp(x / s + z, qmin, qmax)) - z) s, round passed straight through (LSQ: clipped before
    rounding; z is an integer, so the value is clamp(round(x / s) + z) as before): the value and the gradients
    autograd derives from that expression (d/dx = 1 where qmin < x / s + z < qmax, else 0; d/ds = (q - z) - x / s
    there, else q - z), computed in a few whole-tensor passes instead of the ~20 of the expression's graph, which is
    most of a finetuning step's elementwise work. ``s``, ``z``: broadcastable to x; ``z`` gets no gradient."""

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax):
        v = x / s
        q0 = torch.round(v).add_(z)
        # before rounding: a value that only rounds to a limit still passes its gradient; strictly, as torch's clamp
        # passes none at its ends; against the limits shifted by the integer z (a z-sized tensor, not an x-sized v + z;
        # the exact condition: a v within an ulp of a limit, whose float v + z rounds onto it, counts as inside)
        inside = (v > qmin - z).logical_and_(v < qmax - z)
        q = q0.clamp_(qmin, qmax).sub_(z)
        ctx.save_for_backward(v, q, inside)
        ctx.s_shape = s.shape
        return q * s

    @staticmethod
    def backward(ctx, grad):
        v, q, inside = ctx.saved_tensors
        grad_x = grad * inside
        per_element = torch.where(inside, q - v, q).mul_(grad)
        dims = [d for d, n in enumerate(ctx.s_shape) if n == 1 and grad.shape[d] != 1]
        grad_s = per_element.sum(dims, keepdim=True) if dims else per_element  # sum([]) would sum everything
        return grad_x, grad_s, None, None, None


class LearnedActQuant(nn.Module):
    """A ``LayerQuant`` (per-tensor granularity) whose steps train (LSQ); the zero points stay calibrated."""
    granularity = "tensor"

    def __init__(self, lq: LayerQuant):
        super().__init__()
        if lq.granularity != "tensor":
            raise ValueError("LSQ steps are learned for per-tensor ranges, not per-token ones")
        if lq.group_bits is not None:
            raise ValueError("LSQ steps are learned at one bit width per input, not bits per timestep group")
        self.bits, self.symmetric, self.split = lq.bits, lq.symmetric, lq.split
        self.step = nn.Parameter(lq.scale.detach().clone().float())  # (G, P)
        self.register_buffer("zero_point", lq.zero_point.detach().clone())

    def apply(self, x, group, dim=None):  # dim: the channel axis, unused per tensor (``LayerQuant.apply``'s)
        qmin, qmax = int_range(self.bits, self.symmetric)
        g = 1.0 / math.sqrt(x[0].numel() * qmax)
        # LSQ's gradient scale; the value is exactly ``step`` (the exported one): a + (b - b) with b's value detached
        # is a + 0, where a*g + (a - a*g) could round 1 ulp away
        scaled = self.step * g
        step = self.step.detach() + (scaled - scaled.detach())
        s, z = step.abs().clamp(min=1e-8)[group], self.zero_point[group].to(x.dtype)  # (B, P)
        if self.split is None:
            s, z = s[:, :1], z[:, :1]
        else:  # (B, C): part 0 for channels [0, split), part 1 for the rest
            rest = x.shape[1] - self.split
            s = torch.cat([s[:, :1].expand(-1, self.split), s[:, 1:2].expand(-1, rest)], dim=1)
            z = torch.cat([z[:, :1].expand(-1, self.split), z[:, 1:2].expand(-1, rest)], dim=1)
        shape = s.shape + (1,) * (x.dim() - 2)
        return LSQFakeQuant.apply(x, s.reshape(shape), z.reshape(shape), qmin, qmax)

    def export(self) -> LayerQuant:
        return LayerQuant(self.bits, self.symmetric, "tensor", self.split,
                          self.step.detach().abs().clamp(min=1e-8).cpu().clone(), self.zero_point.cpu().clone())
