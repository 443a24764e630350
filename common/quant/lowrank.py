"""A low-rank 16-bit branch beside a quantized layer (SVDQuant, Li et al. 2025).

W = L1 L2 + R: the rank-r part of W (its top singular directions) runs in 16 bits on the layer's input before
any activation quantization, and only the residual R is quantized, so the weight error is that of R, whose
range is narrower than W's. The branch's factors are ordinary parameters of a small module attached to the
layer (``<layer>.lowrank.down`` / ``.up``), so they are stored in ``quantized.safetensors`` like any other
tensor (fp16) and counted in its size; ``attach`` rebuilds the branch from the recorded ranks before loading.

Shapes (k = kernel positions):
* Linear (out, in):            down = Linear(in -> r), up = Linear(r -> out)
* Conv2d (out, in, kh, kw):    down = Conv2d(in -> r, kh x kw, the layer's stride / padding), up = 1x1 Conv2d(r -> out)
* ConvTranspose2d (in, out, kh, kw): down = 1x1 Conv2d(in -> r), up = ConvTranspose2d(r -> out, the layer's kernel,
  stride and padding)
"""
import torch
from torch import nn

FACTOR_FORMAT = "fp16"


def split(weight: torch.Tensor, kind: type, rank: int):
    """(down weight, up weight, residual) with W = branch(down, up) + residual, from the SVD of W as a matrix."""
    w = weight.detach().float()
    if kind is nn.ConvTranspose2d:  # (in, out, kh, kw): the input side is dim 0
        mat = w.reshape(w.shape[0], -1)
    else:
        mat = w.reshape(w.shape[0], -1)  # (out, in * k)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.numel())
    left, right = u[:, :r] * s[:r].sqrt(), s[:r].sqrt()[:, None] * vh[:r]  # (rows, r), (r, cols)
    # rounded as FACTOR_FORMAT stores them, so the residual absorbs the rounding: calibration, GPTQ and the
    # distillation then see the model the file holds
    left, right = left.half().float(), right.half().float()
    residual = (mat - left @ right).reshape(w.shape)
    if kind is nn.Linear:
        return right, left, residual  # down (r, in), up (out, r)
    if kind is nn.Conv2d:
        return right.reshape(r, *w.shape[1:]), left[:, :, None, None], residual
    # ConvTranspose2d: down = 1x1 conv in -> r (weight (r, in, 1, 1)), up = convT r -> out (weight (r, out, kh, kw))
    return left.T[:, :, None, None].contiguous(), right.reshape(r, *w.shape[1:]), residual


class LowRankBranch(nn.Module):
    """down then up, mirroring the layer it sits beside; added to the layer's output."""

    def __init__(self, layer: nn.Module, rank: int):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        elif isinstance(layer, nn.ConvTranspose2d):
            self.down = nn.Conv2d(layer.in_channels, rank, 1, bias=False)
            self.up = nn.ConvTranspose2d(rank, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                                         bias=False)
        elif isinstance(layer, nn.Conv2d):
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                  bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            raise TypeError(f"no low-rank branch for {type(layer).__name__}")

    def forward(self, x):
        return self.up(self.down(x))


def _keep_input(module, args):
    module._lowrank_input = args[0]


def _add_branch(module, args, out):
    x = module.__dict__.pop("_lowrank_input")
    return out + module.lowrank(x.to(module.lowrank.down.weight.dtype)).to(out.dtype)


def attach(model: nn.Module, ranks: dict) -> nn.Module:
    """Give each layer of ``ranks`` ({module name: r}) an (untrained, zero) branch that adds to its output. It
    sees the layer's input after the pre-hooks already there (a smoothing divisor) and before those attached
    later (activation quantizers, which the pipeline attaches last). Returns ``model``."""
    mods = dict(model.named_modules())
    for name, r in ranks.items():
        layer = mods[name]
        if hasattr(layer, "lowrank"):
            raise ValueError(f"{name} already has a low-rank branch")
        layer.lowrank = LowRankBranch(layer, int(r)).to(layer.weight.device)
        nn.init.zeros_(layer.lowrank.down.weight)
        nn.init.zeros_(layer.lowrank.up.weight)
        layer.register_forward_pre_hook(_keep_input)
        layer.register_forward_hook(_add_branch)
    return model


def decompose(model: nn.Module, ranks: dict) -> dict:
    """Attach branches to ``model`` holding the top-r SVD part of each layer's weight, leave the residual in the
    layer's weight, and return {module: rank}: the rank asked for, or the layer's own where that is smaller (a
    matrix of k rows has no (k + 1)-th singular vector). The model computes the same function (to float rounding)."""
    mods = dict(model.named_modules())
    kinds = {n: type(mods[n]) for n in ranks}
    ranks = {n: min(int(r), min(mods[n].weight.shape[0], mods[n].weight[0].numel())) for n, r in ranks.items()}
    attach(model, ranks)
    with torch.no_grad():
        for name, r in ranks.items():
            layer = mods[name]
            down, up, residual = split(layer.weight, kinds[name], r)
            layer.lowrank.down.weight.copy_(down)
            layer.lowrank.up.weight.copy_(up)
            layer.weight.copy_(residual)
    return dict(ranks)


def branch_parameters(model: nn.Module) -> list:
    """Names of every low-rank factor of ``model`` (stored in FACTOR_FORMAT)."""
    return [n for n, _ in model.named_parameters() if ".lowrank." in n]
