"""An orthogonal rotation of a layer's input channels before 4-bit rounding (QuaRot, Ashkboos et al. 2024;
ConvRot for convolutions).

With H orthogonal, x W^T = (x H)(W H)^T: rotating the input channels and the weight's input axis by the same H
changes nothing in real arithmetic but spreads a channel's outlier over all channels of its block, so a
per-tensor activation range fits the bulk better. H is block-diagonal Walsh-Hadamard (blocks of the largest
power of two dividing the channel count, scaled to be orthonormal), rebuilt from the block size alone; a
convolution rotates the channels at every pixel (conv is linear in its input channels at each tap). The
rotation of the input runs at run time (a pre-hook before the activation quantizer); the weight is stored
rotated. Recorded per layer as its block size (``extras["rotate"]`` of the quantized file).
"""
import math

import torch
from torch import nn

from .smoothing import weight_in_axis


def block_size(channels: int, largest: int = 64) -> int:
    """The largest power of two that divides ``channels``, at most ``largest``."""
    b = 1
    while channels % (2 * b) == 0 and 2 * b <= largest:
        b *= 2
    return b


def hadamard(n: int) -> torch.Tensor:
    """(n, n) orthonormal Walsh-Hadamard matrix (Sylvester's construction); n a power of two."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def matrix(channels: int, block: int) -> torch.Tensor:
    """(C, C) block-diagonal rotation with ``block`` x ``block`` Hadamard blocks."""
    return torch.block_diag(*[hadamard(block)] * (channels // block))


def block_size_of(layer: nn.Module) -> int:
    """The Hadamard block size of an attached rotation (the size of its first block's non-zero run)."""
    return int((layer.rotation[0] != 0).sum())


def _rotate_input(layer, args):
    x, h = args[0], layer.rotation.to(args[0].dtype)
    if isinstance(layer, nn.Linear):
        return (x @ h, *args[1:])
    return (torch.einsum("bc...,cd->bd...", x, h), *args[1:])


def attach(model: nn.Module, blocks: dict) -> nn.Module:
    """Pre-hooks rotating the inputs of the layers of ``blocks`` ({layer: block size}); the rotation is a
    non-persistent buffer rebuilt from the block size. Runs after a smoothing divisor, before quantizers
    attached later."""
    mods = dict(model.named_modules())
    for name, block in blocks.items():
        layer = mods[name]
        channels = layer.weight.shape[weight_in_axis(layer)]
        layer.register_buffer("rotation", matrix(channels, int(block)).to(layer.weight.device), persistent=False)
        layer.register_forward_pre_hook(_rotate_input)
    return model


@torch.no_grad()
def rotate(model: nn.Module, names) -> dict:
    """Rotate the weights of ``names`` (W <- W H over the input axis) and attach the input rotations; returns
    {layer: block}. The model computes the same function (to float rounding)."""
    mods = dict(model.named_modules())
    blocks = {}
    for name in names:
        layer = mods[name]
        axis = weight_in_axis(layer)
        blocks[name] = block_size(layer.weight.shape[axis])
        h = matrix(layer.weight.shape[axis], blocks[name]).to(layer.weight)
        w = layer.weight.movedim(axis, -1)
        layer.weight.copy_((w @ h).movedim(-1, axis))
    attach(model, blocks)
    return blocks
