"""Sample grids: a batch of images as one PNG."""
import os

import torch
import torchvision


def save_grid(images01: torch.Tensor, path: str, nrow: int = 8):
    """Write (N, 1, H, W) images in [0, 1] as one PNG grid (atomically)."""
    grid = torchvision.utils.make_grid(images01, nrow=nrow, padding=2, pad_value=1.0)
    tmp = path + ".tmp.png"
    torchvision.utils.save_image(grid, tmp)
    os.replace(tmp, path)
