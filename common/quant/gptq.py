"""GPTQ: weight rounding that compensates each rounding error with the columns not yet rounded (Frantar et al.,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023).

Round-to-nearest minimises each weight's own error; what the network sees is the layer's output error
||(W - Q) X||^2 over its real inputs X, i.e. tr((W - Q) H (W - Q)^T) with H = X X^T / N. GPTQ rounds one input
column at a time and spreads the column's error over the later columns through the inverse Hessian (the optimal
update of Optimal Brain Surgeon), so correlated input channels absorb each other's rounding. The stored result is
ordinary per-output-channel integer codes and scales (``formats.int_entry``): nothing changes at run time.

* ``collect_hessians``: H of the inputs of conv / linear modules over a calibration run (conv inputs unfolded
  into the kernel's patches, so a conv is the linear map W (C_out, C_in * kh * kw) on patches);
* ``gptq_codes``: the codes of one channel-first weight (C, K) for fixed scales (per channel, or per element for
  group-wise formats: fixed before rounding, so the column order is free), in blocks with lazy updates, columns
  in decreasing order of H's diagonal ("act order"), a damping of ``damp`` x mean(diag H);
* ``gptq_entry``: the stored entry of one module's weight in a per-channel or group-wise integer format (on the
  symmetric or the midrise grid), with
  round-to-nearest's scales (a clipping searched on the output-error proxy lowered the proxy further but raised
  the final samples' damage on the released U-Net: paired MSE 0.00148 against 0.00108 at W4, docs/lowbit.md);
* ``output_error``: tr(dW H dW^T), the proxy both rounding rules are compared on.

Transposed convolutions and grouped convolutions are not covered (``supports``): they keep round-to-nearest.
"""
import torch
from torch import nn
from torch.nn import functional as F

from ..core.format_names import format_spec
from .formats import channel_scale, empty_scale, expand_group_scale, group_entry, group_scale, int_entry, round_codes
from .hooks import input_hooks


def supports(module: nn.Module, fmt: str) -> bool:
    """GPTQ covers linears and ungrouped convs in integer formats (per channel or group-wise; not codebooks)."""
    spec = format_spec(fmt)
    if spec.kind != "int":
        return False
    if isinstance(module, nn.Linear):
        return True
    return type(module) is nn.Conv2d and module.groups == 1


def input_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(rows, K) of the input ``x`` as the module's weight multiplies it: a conv's patches (F.unfold orders a
    patch as (C_in, kh, kw), the order of ``weight.reshape(C_out, -1)``), a linear's token rows."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, K, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@torch.no_grad()
def collect_hessians(model: nn.Module, names, run) -> dict:
    """{module name: H (K, K) float64} = mean over input rows of x x^T, for the modules ``names`` while ``run()``
    calls the model. The hooks run after any input transformation already registered (smoothing divisors), so
    H is that of the input the stored weight multiplies."""
    mods = dict(model.named_modules())
    acc = {}

    def add(name, args):
        rows = input_patches(mods[name], args[0].detach())
        h, n = acc.get(name, (0.0, 0))  # a batch's sum in the input's precision, the running sum in float64
        acc[name] = (h + (rows.T @ rows).double(), n + len(rows))

    with input_hooks(model, names, add):
        run()
    missing = [n for n in names if n not in acc]
    if missing:
        raise ValueError(f"GPTQ: no calibration input reached {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return {n: (h / n_rows).cpu() for n, (h, n_rows) in acc.items()}


def output_error(dw: torch.Tensor, H: torch.Tensor) -> float:
    """tr(dW H dW^T): the summed squared output error of a weight error ``dw`` (C, K) over inputs with Hessian H."""
    dw = dw.double()
    return float(((dw @ H.double()) * dw).sum())


def _level(w, scale, spec):
    """The nearest level of the format's grid in units of the scale (``formats.round_codes``' code + offset)."""
    return round_codes(w / scale, spec) + spec.offset


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of H^-1 after damping; dead inputs (zero diagonal) get 1 on the diagonal so H
    stays invertible."""
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = float(torch.diag(H).mean())
    for k in range(6):  # a damping too small for a rank-deficient H: increase it until Cholesky succeeds
        Hd = H + torch.eye(len(H), dtype=H.dtype) * damp * 10 ** k * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    raise ValueError("GPTQ: the input Hessian is not positive definite even with 1e5 x the damping")


def gptq_codes(w: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, spec, damp=0.01, block=128,
               act_order=True) -> torch.Tensor:
    """Levels (C, K) in [-qmax, qmax] of the channel-first weight ``w`` (C, K) on the grid of the integer format
    ``spec`` (``format_spec``) with the scale of each row (C,) or of each element (C, K), each column's rounding
    error compensated on the columns after it (GPTQ, Algorithm 1): integers, or on a midrise grid integers + 1/2."""
    W = w.double().clone()
    C, K = W.shape
    S = (scale.double()[:, None] if scale.dim() == 1 else scale.double()).expand(C, K)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, S = W[:, perm], S[:, perm]
    U = _inverse_cholesky(H[perm][:, perm], damp)
    Q = torch.zeros_like(W)
    for i0 in range(0, K, block):
        i1 = min(i0 + block, K)
        Wb, Ub = W[:, i0:i1].clone(), U[i0:i1, i0:i1]
        Eb = torch.zeros_like(Wb)
        for j in range(i1 - i0):
            s = S[:, i0 + j:i0 + j + 1]
            q = _level(Wb[:, j:j + 1], s, spec)
            Q[:, i0 + j] = q[:, 0]
            err = (Wb[:, j:j + 1] - q * s) / Ub[j, j]
            Wb[:, j:] -= err @ Ub[j:j + 1, j:]
            Eb[:, j] = err[:, 0]
        W[:, i1:] -= Eb @ U[i0:i1, i1:]
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes


def gptq_entry(weight: torch.Tensor, fmt: str, H: torch.Tensor, damp=0.01) -> tuple:
    """(stored entry, info) of a linear / conv ``weight`` (output channels first) in the integer format ``fmt``
    (per channel or group-wise) by GPTQ, with the scales round-to-nearest stores (max|w| / qmax per channel or
    group: ``formats.quantize_tensor``). info: the output-error proxy of round-to-nearest and of GPTQ, and their
    ratio."""
    spec = format_spec(fmt)
    w = weight.detach().float().cpu().reshape(weight.shape[0], -1)
    K = w.shape[1]
    if H.shape != (K, K):
        raise ValueError(f"GPTQ: Hessian {tuple(H.shape)} does not match the weight's {K} inputs")
    if spec.group is not None:
        stored = group_scale(w, spec.group, spec.qmax, empty_scale(spec))
        full = expand_group_scale(stored, spec.group, K)
    else:
        stored = channel_scale(w, spec.qmax, empty=empty_scale(spec))
        full = stored[:, None].expand(-1, K)
    levels = gptq_codes(w, H, full, spec, damp)
    rtn = output_error(w - _level(w, full, spec) * full, H)
    new = output_error(w - levels * full, H)
    codes = levels - spec.offset  # what is stored: the midrise level k + 1/2 as its k
    if spec.group is not None:
        entry = group_entry(fmt, tuple(weight.shape), 0, codes, stored)
    else:
        entry = int_entry(fmt, tuple(weight.shape), 0, codes, stored)
    return entry, {"rtn_error": rtn, "gptq_error": new, "ratio": new / rtn if rtn > 0 else 1.0}
