"""Pieces both denoisers share: the sin/cos timestep table and multi-head self-attention over tokens."""
import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_table(timesteps: int, dim: int) -> torch.Tensor:
    """(timesteps, dim) fixed sin/cos embedding (Vaswani et al.), not learned."""
    position = torch.arange(timesteps, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(timesteps, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


class Attention(nn.Module):
    """Multi-head self-attention over tokens: (B, L, C) -> (B, L, C).

    ``proj1`` is the fused q/k/v projection (C -> 3C), ``proj2`` the output projection. ``fused`` False runs
    the same maths in plain ops: torch.func.vmap can batch them (not the fused CPU kernel), and hooks on
    ``softmax`` see the attention probabilities (``common.quant.activations``).
    """

    def __init__(self, channels: int, num_heads: int, dropout: float):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not divisible by {num_heads} heads")
        self.proj1 = nn.Linear(channels, 3 * channels)
        self.proj2 = nn.Linear(channels, channels)
        self.num_heads = num_heads
        self.dropout = dropout
        self.fused = True
        self.softmax = nn.Softmax(dim=-1)  # a module (no parameters) so hooks can reach the probabilities

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.proj1(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.fused:
            # The poster's original applied attention dropout at sampling time too; only train with it.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        else:
            out = self.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])) @ v
        return self.proj2(out.transpose(1, 2).reshape(b, n, c))


@contextlib.contextmanager
def unfused_attention(model: nn.Module):
    """Run attention as plain matmul/softmax inside the block (for vmap'd per-sample gradients)."""
    mods = [m for m in model.modules() if isinstance(m, Attention)]
    for m in mods:
        m.fused = False
    try:
        yield model
    finally:
        for m in mods:
            m.fused = True
