"""Multiply-accumulates and bit-operations of the conv / linear modules, counted from one forward pass.

MACs per image of one network evaluation, exact from each module's input and output shapes:

* Conv2d:          C_out * H_out * W_out * (C_in / groups) * k_h * k_w
* ConvTranspose2d: C_in * H_in * W_in * (C_out / groups) * k_h * k_w   (each input element meets every tap)
* Linear:          (output elements / out_features) * in_features * out_features

BOPs = MACs * w_bits * a_bits (as Qua2SeDiMo reports them, after van Baalen et al.'s Bayesian Bits), with a
float operand counted as 32 bits. Biases, normalisations, activations and attention's two matmuls are not
conv/linear modules and are not counted.
"""
import math

import torch
from torch import nn

from .activations import QUANTIZABLE
from .hooks import output_hooks

FLOAT_BITS = 32


def module_macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """MACs per sample of one call of a conv / transposed-conv / linear ``module`` (batch = dim 0)."""
    b = x.shape[0]
    if isinstance(module, nn.ConvTranspose2d):
        k = math.prod(module.kernel_size)
        return x[0].numel() * (module.out_channels // module.groups) * k
    if isinstance(module, nn.Conv2d):
        k = math.prod(module.kernel_size)
        return out[0].numel() * (module.in_channels // module.groups) * k
    if isinstance(module, nn.Linear):
        return out.numel() // b * module.in_features
    raise TypeError(f"no MAC rule for {type(module).__name__}")


@torch.no_grad()
def count_macs(model: nn.Module, example_inputs: tuple) -> dict:
    """{module name: MACs per sample} of every conv / linear module over one forward of ``example_inputs``
    (a module called more than once is summed)."""
    macs = {}
    names = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    with output_hooks(model, names, lambda n, args, out: macs.__setitem__(
            n, macs.get(n, 0) + module_macs(mods[n], args[0], out))) as mods:
        model(*example_inputs)
    return macs


def unet_macs(model: nn.Module, image_shape) -> dict:
    """MACs per image of one U-Net evaluation eps_theta(x_t, t) for images of ``image_shape`` (C, H, W)."""
    device = next(model.parameters()).device
    return count_macs(model, (torch.zeros(1, *image_shape, device=device), torch.zeros(1, dtype=torch.long,
                                                                                      device=device)))


def bops(macs: dict, w_bits: dict, a_bits: dict) -> int:
    """Sum over modules of MACs * w_bits * a_bits; a missing or None bit width counts as float (32)."""
    return sum(m * (w_bits.get(n) or FLOAT_BITS) * (a_bits.get(n) or FLOAT_BITS) for n, m in macs.items())
