"""Per-input-channel smoothing of activations into the weights (SmoothQuant, Xiao et al. 2023; SVDQuant).

A layer computes y = x W^T; with s > 0 per input channel, y = (x / s)(W diag(s))^T exactly. Choosing
s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) moves the spread between channels from the activations (quantized
per tensor) to the weights (quantized per output channel), alpha chosen per layer on calibration inputs by
the output error of the quantized layer. The divisor 1 / s is folded into the op that produces x where the
network declares one (``model.smoothing_folds()``: a GroupNorm's affine before a ReLU, value rows of an
attention projection, the rows of an adaLN modulation), so the stored model runs no extra op there; any other
input gets it at run time as a buffer ``<layer>.smooth_div`` (stored fp16 and counted in the file's size).
"""
import torch
from torch import nn

from .activations import channel_dim, fake_quant, int_range, qparams
from .hooks import input_hooks

DIVISOR_FORMAT = "fp16"
FP16_TINY, FP16_MAX = 2.0 ** -14, 65504.0  # fp16's normal range: a scale outside it would round to 0 or inf


def weight_in_axis(layer: nn.Module) -> int:
    """The weight axis that meets input channels: 1 for Conv2d / Linear, 0 for ConvTranspose2d."""
    return 0 if isinstance(layer, nn.ConvTranspose2d) else 1


def weight_in_absmax(layer: nn.Module) -> torch.Tensor:
    """(C_in,) max |W| over everything but the input-channel axis."""
    w = layer.weight.detach().abs()
    axis = weight_in_axis(layer)
    return w.transpose(0, axis).reshape(w.shape[axis], -1).amax(1)


def scales(act_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|x|^alpha / max|W|^(1 - alpha), normalised to geometric mean 1 (only ratios matter)."""
    s = act_absmax.clamp(min=1e-5) ** alpha / w_absmax.clamp(min=1e-5) ** (1 - alpha)
    return s / s.log().mean().exp()


def _in_shape(layer, x_dim, channels):
    shape = [1] * x_dim
    shape[x_dim - 1 if isinstance(layer, nn.Linear) else 1] = channels
    return shape


def _w_shape(layer, channels):
    shape = [1] * layer.weight.dim()
    shape[weight_in_axis(layer)] = channels
    return shape


def layer_error(layer, x, s, w_quant, a_bits: int) -> float:
    """Relative output error ||f_q(Q(x / s)) - f(x)|| / ||f(x)|| of ``layer`` with smoothing ``s``, its weight
    W diag(s) through ``w_quant`` (W -> de-quantized W) and the input x / s at ``a_bits`` per tensor (min-max)."""
    with torch.no_grad():
        ref = layer(x)
        xs = x / s.view(_in_shape(layer, x.dim(), s.numel()))
        sc, zp = qparams(xs.amin(), xs.amax(), a_bits, False)
        xq = fake_quant(xs, sc, zp, *int_range(a_bits, False))
        w = w_quant(layer.weight * s.view(_w_shape(layer, s.numel()))).to(x.device)  # the formats quantize on the CPU
        out = layer._conv_forward(xq, w, layer.bias) if isinstance(layer, nn.Conv2d) else (
            nn.functional.conv_transpose2d(xq, w, layer.bias, layer.stride, layer.padding, layer.output_padding)
            if isinstance(layer, nn.ConvTranspose2d) else nn.functional.linear(xq, w, layer.bias))
        return float((out - ref).norm() / ref.norm().clamp(min=1e-12))


def choose_alpha(layer, x, act_absmax, w_quant, a_bits, alphas=(0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)):
    """(alpha, s, {alpha: error}) minimising ``layer_error`` on the calibration inputs ``x``; alpha 0 with s
    from max|W| alone still smooths, so 'no smoothing' (s = 1) is a candidate too (reported as alpha None)."""
    w_abs = weight_in_absmax(layer)
    errors = {None: layer_error(layer, x, torch.ones_like(w_abs), w_quant, a_bits)}
    for a in alphas:
        errors[a] = layer_error(layer, x, scales(act_absmax, w_abs, a), w_quant, a_bits)
    best = min(errors, key=errors.get)
    return best, (torch.ones_like(w_abs) if best is None else scales(act_absmax, w_abs, best)), errors


def _divide_input(layer, args):
    x = args[0]
    return (x / layer.smooth_div.view(_in_shape(layer, x.dim(), layer.smooth_div.numel())).to(x.dtype), *args[1:])


def attach_divisors(model: nn.Module, divisors: dict) -> nn.Module:
    """Run-time divisors: a buffer ``smooth_div`` (C,) and a pre-hook dividing the input by it, placed before
    any other pre-hook (activation quantizers quantize the smoothed input). Values are filled by the caller or
    by ``load_state_dict``."""
    mods = dict(model.named_modules())
    for name, channels in divisors.items():
        layer = mods[name]
        layer.register_buffer("smooth_div", torch.ones(int(channels), device=layer.weight.device))
        layer.register_forward_pre_hook(_divide_input, prepend=True)
    return model


def fold(model: nn.Module, layer_name: str, s: torch.Tensor, runtime: dict):
    """Smooth ``layer_name`` of ``model`` in place: W <- W diag(s), and x / s folded into its producer (or,
    undeclared, recorded in ``runtime`` {layer: s} for ``attach_divisors``). Exact in real arithmetic."""
    mods = dict(model.named_modules())
    layer = mods[layer_name]
    spec = model.smoothing_folds().get(layer_name)
    with torch.no_grad():
        layer.weight.mul_(s.view(_w_shape(layer, s.numel())).to(layer.weight))
        if spec is None:
            runtime[layer_name] = s
        elif spec[0] == "affine":  # ReLU(g z + b) / s = ReLU((g / s) z + b / s) for s > 0
            norm = mods[spec[1]]
            norm.weight.div_(s)
            norm.bias.div_(s)
        elif spec[0] == "rows":  # outputs start..stop of a linear (or ReLU of them) divided by s
            prod, a, b = mods[spec[1]], spec[2], spec[3]
            shape = [-1] + [1] * (prod.weight.dim() - 1)
            prod.weight[a:b].div_(s.view(shape))
            if prod.bias is not None:
                prod.bias[a:b].div_(s)
        elif spec[0] == "modulation":  # (x (1 + scale) + shift) / s: shift / s, and scale' = scale / s + 1 / s - 1
            lin, i_shift, i_scale, chunks = mods[spec[1]], spec[2], spec[3], spec[4]
            c = lin.out_features // chunks
            for i in (i_shift, i_scale):
                lin.weight[i * c:(i + 1) * c].div_(s[:, None])
                lin.bias[i * c:(i + 1) * c].div_(s)
            lin.bias[i_scale * c:(i_scale + 1) * c].add_(1 / s - 1)
        else:
            raise ValueError(f"{layer_name}: unknown smoothing fold {spec!r}")


def input_absmax(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(C_in,) max |x| of ``layer``'s recorded inputs over everything but the input-channel axis."""
    return x.abs().amax(tuple(d for d in range(x.dim()) if d != channel_dim(x, layer)))


def smooth(model: nn.Module, layers: list, run, w_quant, a_bits: int, record=None, grid=None) -> dict:
    """Smooth ``layers`` of ``model`` in place, each with the alpha of least ``layer_error`` at ``a_bits``
    (``choose_alpha``) on the inputs ``run()`` feeds it; ``w_quant(layer name)`` -> the weight quantizer
    (W -> de-quantized W) the layer will be stored with. Run-time divisors are attached and hold their fp16
    values (what the file stores). ``record``: the layers whose inputs are recorded (default ``layers``; the
    random subsets depend on it); ``grid``: the alphas ``choose_alpha`` tries (default its own).
    Returns {"alpha": {layer: alpha or None}, "folded": [...], "runtime": [...]}."""
    recorded = record_inputs(model, record or layers, run)
    mods, runtime, alphas = dict(model.named_modules()), {}, {}
    for n in layers:
        x = recorded[n].to(mods[n].weight.device)  # recorded on the CPU (memory); the layer may be on a GPU
        alpha, s, _ = choose_alpha(mods[n], x, input_absmax(mods[n], x), w_quant(n), a_bits,
                                   **({} if grid is None else {"alphas": grid}))
        alphas[n] = alpha
        if alpha is not None:  # s rounded to the divisor's stored fp16 first, so W diag(s) and x / s still cancel
            fold(model, n, s.clamp(FP16_TINY, FP16_MAX).half().float(), runtime)
    attach_divisors(model, {n: s.numel() for n, s in runtime.items()})
    with torch.no_grad():
        for n, s in runtime.items():
            mods[n].smooth_div.copy_(s)
    return {"alpha": alphas, "folded": sorted(n for n, a in alphas.items() if a is not None and n not in runtime),
            "runtime": sorted(runtime)}


def carry_divisor(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` (a module replacing ``src``, e.g. a rewritten convolution) ``src``'s run-time divisor and its
    pre-hook, so the replacement still sees the smoothed input x / s."""
    if hasattr(src, "smooth_div"):
        dst.register_buffer("smooth_div", src.smooth_div.detach().clone())
        dst.register_forward_pre_hook(_divide_input, prepend=True)
    return dst


def record_inputs(model, names, run, max_rows=4096, seed=0) -> dict:
    """{layer: inputs} seen while ``run()`` calls the model: up to ``max_rows`` calibration rows per layer, a
    uniform random subset (conv inputs keep whole images, linear inputs token rows)."""
    mods, seen = dict(model.named_modules()), {n: [] for n in names}
    gen = torch.Generator().manual_seed(seed)

    def keep(name, args):
        x = args[0].detach()
        if isinstance(mods[name], nn.Linear) and x.dim() > 2:
            x = x.reshape(-1, x.shape[-1])
        seen[name].append(x[torch.randperm(len(x), generator=gen)[:max(1, max_rows // 16)].to(x.device)].cpu())

    with input_hooks(model, names, keep):
        run()
    out = {}
    for n, xs in seen.items():
        x = torch.cat(xs)
        out[n] = x[torch.randperm(len(x), generator=gen)[:max_rows]]
    return out
