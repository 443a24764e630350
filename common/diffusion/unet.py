"""The poster's 6-stage U-Net (noise predictor eps_theta(x_t, t)).

Stages are attributes ``Layer1`` .. ``Layer6`` so every parameter name starts with
``LayerK.`` and per-layer analysis lines up with the poster. Layers 1-3 go down
(stride-2 conv doubles channels), layers 4-6 go up (transposed conv halves them) and
concatenate the skip of the mirrored down stage. With channels (64,128,256,512,512,384),
attention on layers 2 and 6 and GroupNorm(32) the network has 35,178,689 parameters.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Attention, sinusoidal_table


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


class SpatialAttention(Attention):
    """Self-attention over the H*W positions of a feature map (B, C, H, W)."""

    def forward(self, x):
        b, c, h, w = x.shape
        out = super().forward(x.flatten(2).transpose(1, 2))
        return out.transpose(1, 2).reshape(b, c, h, w)


class UNetStage(nn.Module):
    """ResBlock -> [Attention] -> ResBlock, then a stride-2 conv (down) or transposed conv (up)."""

    def __init__(self, channels, upscale, attention, num_groups, num_heads, dropout, emb_dim=None):
        super().__init__()
        self.ResBlock1 = ResBlock(channels, num_groups, dropout, emb_dim)
        self.ResBlock2 = ResBlock(channels, num_groups, dropout, emb_dim)
        if attention:
            self.attention_layer = SpatialAttention(channels, num_heads, dropout)
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

    # The first and last layers (their inputs and weights stay float under the `all_but_ends` and
    # keep_first_last rules).
    ends = ("shallow_conv", "output_conv")

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

    def concat_splits(self) -> dict:
        """{module name: channels of the upsampled part} for the modules whose input is a skip concatenation.

        Up stage Layer{i+1} concatenates its output with the mirrored down stage's skip; the next stage's
        ResBlock1.conv1 consumes it (after GroupNorm and ReLU, which keep the channels apart) and after the
        last stage ``late_conv`` does.
        """
        n, out = self.num_layers, {}
        for i in range(n // 2, n):
            consumer = f"Layer{i + 2}.ResBlock1.conv1" if i + 1 < n else "late_conv"
            out[consumer] = getattr(self, f"Layer{i + 1}").conv.out_channels
        return out

    @staticmethod
    def op_type(name: str) -> str:
        """What a module (or its parameter) ``name`` does, for per-op-type tables."""
        if name.startswith("time_mlp"):
            return "time MLP"
        if "time_proj" in name:
            return "time-embedding projection"
        if "attention" in name:
            return "attention projection"
        if ".conv1" in name or ".conv2" in name:
            return "ResBlock conv"
        if name.startswith("Layer") and ".conv" in name:
            return "down-sampling conv" if name[5] in "123" else "up-sampling (transposed) conv"
        return "stage-external conv"

    @staticmethod
    def time_path(name: str) -> bool:
        """Whether module ``name`` computes from the timestep alone (the time MLP, every ResBlock's projection)."""
        return name.startswith("time_mlp") or ".time_proj" in name

    def time_outputs(self) -> list:
        """Modules whose outputs depend on t alone and feed the rest of the network: every ResBlock's time
        projection (the time MLP only feeds them)."""
        return [n for n, _ in self.named_modules() if n.endswith(".time_proj")]

    def smoothing_folds(self) -> dict:
        """{module: where a per-input-channel divisor of its input can be folded, exactly}: ``("affine", gn)``
        when the input is ReLU(GroupNorm(.)) (ReLU commutes with a positive scale; the GroupNorm's weight and
        bias absorb it); ``("rows", linear, start, stop)`` when the input is made of output rows of a linear
        layer (attention's output is a convex mix of the value rows of ``proj1``) or ReLU of them. Inputs not
        listed (the residual stream into attention and the sampling convs, skip concatenations, the time
        path) need the divisor at run time."""
        out = {}
        for name, m in self.named_modules():
            if isinstance(m, ResBlock):
                out[f"{name}.conv1"] = ("affine", f"{name}.gnorm1")
                out[f"{name}.conv2"] = ("affine", f"{name}.gnorm2")
            elif isinstance(m, Attention):
                c = m.proj2.in_features
                out[f"{name}.proj2"] = ("rows", f"{name}.proj1", 2 * c, 3 * c)
        out["output_conv"] = ("rows", "late_conv", 0, self.late_conv.out_channels)
        return out

