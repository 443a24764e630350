"""Sample grids: a batch of images as one PNG."""
import io

import torch

from ..core import storage


def save_grid(images01: torch.Tensor, path: str, nrow: int = 8):
    """Write (N, 1, H, W) images in [0, 1] as one PNG grid (atomically)."""
    import torchvision  # on first use: importing it costs every script ~2 s of start-up (torch._dynamo)

    grid = torchvision.utils.make_grid(images01, nrow=nrow, padding=2, pad_value=1.0)
    buf = io.BytesIO()
    torchvision.utils.save_image(grid, buf, format="png")
    storage.atomic_write_bytes(buf.getvalue(), path)
