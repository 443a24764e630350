"""The poster's 6-stage U-Net (noise predictor eps_theta(x_t, t)).

Stages are attributes ``Layer1`` .. ``Layer6`` so every parameter name starts with
``LayerK.`` and per-layer analysis lines up with the poster. Layers 1-3 go down
(stride-2 conv doubles channels), layers 4-6 go up (transposed conv halves them) and
concatenate the skip of the mirrored down stage. With channels (64,128,256,512,512,384),
attention on layers 2 and 6 and GroupNorm(32) the network has 35,178,689 parameters.
"""
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


class ResBlock(nn.Module):
    """``emb_dim`` None: the poster's block (first C dims of the fixed table added to its input).
    Otherwise the block owns a projection of the learned time embedding, added after its first
    conv as in Ho et al.'s DDPM, so each block can ask for the timestep features it needs."""

    def __init__(self, channels: int, num_groups: int, dropout: float, emb_dim=None):
        super().__init__()
        self.gnorm1 = nn.GroupNorm(num_groups, channels)
        self.gnorm2 = nn.GroupNorm(num_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        if emb_dim is not None:
            self.time_proj = nn.Linear(emb_dim, channels)

    def forward(self, x, emb):
        if not hasattr(self, "time_proj"):
            # The poster's additive table: first C dims of the shared sin/cos rows.
            x = x + emb[:, : x.shape[1], None, None]
        r = self.conv1(F.relu(self.gnorm1(x)))
        if hasattr(self, "time_proj"):
            r = r + self.time_proj(emb)[:, :, None, None]
        r = self.dropout(r)
        r = self.conv2(F.relu(self.gnorm2(r)))
        return r + x


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions."""

    def __init__(self, channels: int, num_heads: int, dropout: float):
        super().__init__()
        self.proj1 = nn.Linear(channels, 3 * channels)
        self.proj2 = nn.Linear(channels, channels)
        self.num_heads = num_heads
        self.dropout = dropout
        self.fused = True
        # A module (no parameters) so hooks can reach the attention probabilities (common.quant.activations).
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.proj1(x.flatten(2).transpose(1, 2))  # (b, L, 3C)
        qkv = qkv.view(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            # The original applied attention dropout at sampling time too; only train with it.
            out = F.scaled_dot_product_attention(
                qkv[0], qkv[1], qkv[2], dropout_p=self.dropout if self.training else 0.0
            )
        else:  # same maths in plain ops: torch.func.vmap can batch them (not the fused CPU kernel), hooks see softmax
            q, k, v = qkv[0], qkv[1], qkv[2]
            out = self.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])) @ v
        out = self.proj2(out.transpose(1, 2).reshape(b, h * w, c))
        return out.transpose(1, 2).reshape(b, c, h, w)


class UNetStage(nn.Module):
    """ResBlock -> [Attention] -> ResBlock, then a stride-2 conv (down) or transposed conv (up)."""

    def __init__(self, channels, upscale, attention, num_groups, num_heads, dropout, emb_dim=None):
        super().__init__()
        self.ResBlock1 = ResBlock(channels, num_groups, dropout, emb_dim)
        self.ResBlock2 = ResBlock(channels, num_groups, dropout, emb_dim)
        if attention:
            self.attention_layer = Attention(channels, num_heads, dropout)
        if upscale:
            self.conv = nn.ConvTranspose2d(channels, channels // 2, 4, stride=2, padding=1)
        else:
            self.conv = nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1)

    def forward(self, x, emb):
        x = self.ResBlock1(x, emb)
        if hasattr(self, "attention_layer"):
            x = self.attention_layer(x)
        x = self.ResBlock2(x, emb)
        return self.conv(x), x


class UNet(nn.Module):
    """eps_theta(x_t, t): x_t (B, in_ch, H, W) float in [-1, 1]-ish, t (B,) int64 in [0, T).

    ``time_embedding``: "table" is the poster's fixed sin/cos rows added to each block's input;
    "mlp" passes the same rows through a learned 2-layer MLP (``time_mlp``, outside the six stages)
    and gives every ResBlock its own linear projection of the result.
    """

    def __init__(self, channels, attentions, upscales, num_groups, num_heads, dropout,
                 in_channels, timesteps, time_embedding="table"):
        super().__init__()
        self.num_layers = len(channels)
        self.shallow_conv = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        emb_dim = None
        if time_embedding == "mlp":
            emb_dim = 2 * max(channels)
            self.time_mlp = nn.Sequential(nn.Linear(max(channels), emb_dim), nn.SiLU(),
                                          nn.Linear(emb_dim, emb_dim), nn.SiLU())
        for i, c in enumerate(channels):
            stage = UNetStage(c, upscales[i], attentions[i], num_groups, num_heads, dropout, emb_dim)
            setattr(self, f"Layer{i + 1}", stage)
        out_channels = channels[-1] // 2 + channels[0]
        self.late_conv = nn.Conv2d(out_channels, out_channels // 2, 3, padding=1)
        self.output_conv = nn.Conv2d(out_channels // 2, in_channels, 1)
        # Not persistent: it is a pure function of (timesteps, width), rebuilt on load.
        self.register_buffer("time_table", sinusoidal_table(timesteps, max(channels)), persistent=False)

    def forward(self, x, t):
        emb = self.time_table[t]
        if hasattr(self, "time_mlp"):
            emb = self.time_mlp(emb)
        x = self.shallow_conv(x)
        skips = []
        half = self.num_layers // 2
        for i in range(half):
            x, skip = getattr(self, f"Layer{i + 1}")(x, emb)
            skips.append(skip)
        for i in range(half, self.num_layers):
            x, _ = getattr(self, f"Layer{i + 1}")(x, emb)
            x = torch.cat((x, skips[self.num_layers - i - 1]), dim=1)
        return self.output_conv(F.relu(self.late_conv(x)))


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


def build_unet(model_cfg, timesteps: int = 1000) -> UNet:
    """Build the U-Net from the ``model`` config section (see ``common.core.config.ModelConfig``);
    ``timesteps`` sizes the sinusoidal time table (``diffusion.timesteps``)."""
    return UNet(
        channels=list(model_cfg.channels),
        attentions=list(model_cfg.attentions),
        upscales=list(model_cfg.upscales),
        num_groups=model_cfg.num_groups,
        num_heads=model_cfg.num_heads,
        dropout=model_cfg.dropout,
        in_channels=model_cfg.in_channels,
        timesteps=timesteps,
        time_embedding=model_cfg.time_embedding,
    )


def stage_of(param_name: str):
    """'Layer3.ResBlock1.conv1.weight' -> 'Layer3'; None for parameters outside the six stages."""
    head = param_name.split(".", 1)[0]
    return head if head.startswith("Layer") and head[5:].isdigit() else None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
