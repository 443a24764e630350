"""A small Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

x_t (B, C, S, S) is cut into (S/p)^2 patches of p x p pixels (``patch_embed``, a stride-p conv), each a
token of width ``hidden`` plus a fixed 2-D sin/cos position embedding. The timestep's sin/cos features go
through a 2-layer MLP (``t_embedder``) to the conditioning vector c. Every block is adaLN-Zero: from c it
regresses a shift, scale and gate for its attention and its MLP (``adaLN_modulation``, zero-initialised so
every block starts as the identity); the final layer modulates once more, maps each token to p*p*C values
(``final_layer.linear``, zero-initialised) and unpatchify reassembles the image. The output is eps only (no
learned variance: our samplers use fixed ones).

Blocks are grouped into six stages ``Layer1`` .. ``Layer6`` (``model.stage_blocks`` blocks each) so the
poster's per-stage rules and every per-stage table apply unchanged; the patch embedding, the time MLP and
the final layer lie outside the stages, as the U-Net's first/last convolutions and time MLP do.
"""
import torch
from torch import nn

from .blocks import Attention, sinusoidal_table


def modulate(x, shift, scale):
    """adaLN: x (B, L, C) normalised, shift / scale (B, C) from the conditioning."""
    return x * (1 + scale[:, None]) + shift[:, None]


def pos_embed_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) fixed 2-D sin/cos embedding: half the channels encode the row, half the column."""
    half = sinusoidal_table(grid, dim // 2)
    rows = half[:, None, :].expand(grid, grid, dim // 2)
    cols = half[None, :, :].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)


class Mlp(nn.Module):
    """Token-wise fc1 -> GELU (tanh approximation, as DiT) -> fc2."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class DiTBlock(nn.Module):
    """x + gate_a * Attn(adaLN(x)), then x + gate_m * MLP(adaLN(x)); the six modulations come from c."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads, dropout)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class DiTStage(nn.Module):
    """A run of blocks that the poster's rules treat as one layer."""

    def __init__(self, n_blocks: int, *args):
        super().__init__()
        self.blocks = nn.ModuleList(DiTBlock(*args) for _ in range(n_blocks))

    def forward(self, x, c):
        for block in self.blocks:
            x = block(x, c)
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TimestepEmbedder(nn.Module):
    """t (B,) int64 -> (B, hidden): the sin/cos row of t through Linear-SiLU-Linear."""

    def __init__(self, hidden: int, timesteps: int, freq_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.register_buffer("table", sinusoidal_table(timesteps, freq_dim), persistent=False)

    def forward(self, t):
        return self.mlp(self.table[t])


class DiT(nn.Module):
    """eps_theta(x_t, t): x_t (B, in_ch, S, S) float, t (B,) int64 in [0, T) -> (B, in_ch, S, S)."""

    ends = ("patch_embed", "final_layer.linear")

    def __init__(self, image_size: int, patch_size: int, in_channels: int, hidden: int, stage_blocks,
                 num_heads: int, mlp_ratio: float, dropout: float, timesteps: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by patch size {patch_size}")
        self.patch, self.in_channels = patch_size, in_channels
        self.grid = image_size // patch_size
        self.num_layers = len(stage_blocks)
        self.patch_embed = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden, timesteps)
        for i, n in enumerate(stage_blocks):
            setattr(self, f"Layer{i + 1}", DiTStage(n, hidden, num_heads, mlp_ratio, dropout))
        self.final_layer = FinalLayer(hidden, patch_size, in_channels)
        self.register_buffer("pos_embed", pos_embed_2d(self.grid, hidden), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: Xavier linears, the patch conv like a linear, N(0, 0.02) time MLP, and adaLN-Zero: every
        modulation and the output linear start at zero, so each block is the identity at step 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.t_embedder.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, (DiTBlock, FinalLayer)):
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(B, L, p*p*C) -> (B, C, S, S)."""
        b, g, p, c = x.shape[0], self.grid, self.patch, self.in_channels
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x, t):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, L, hidden)
        c = self.t_embedder(t)
        for i in range(self.num_layers):
            x = getattr(self, f"Layer{i + 1}")(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def concat_splits(self) -> dict:
        """No skip concatenations in a DiT (the U-Net's two-part ranges do not apply)."""
        return {}

    @staticmethod
    def op_type(name: str) -> str:
        """What a module (or its parameter) ``name`` does, for per-op-type tables."""
        if name.startswith("t_embedder"):
            return "time MLP"
        if "adaLN_modulation" in name:
            return "adaLN modulation"
        if ".attn.proj1" in name:
            return "attention qkv"
        if ".attn.proj2" in name:
            return "attention out"
        if ".mlp.fc1" in name:
            return "MLP fc1"
        if ".mlp.fc2" in name:
            return "MLP fc2"
        if name.startswith("patch_embed"):
            return "patch embedding"
        return "final layer"

    @staticmethod
    def time_path(name: str) -> bool:
        """Whether module ``name`` computes from the timestep alone (the time MLP and every adaLN modulation,
        the DiT's analogue of the U-Net's time projections)."""
        return name.startswith("t_embedder") or "adaLN_modulation" in name

    def time_outputs(self) -> list:
        """Modules whose outputs depend on t alone and feed the rest of the network: every adaLN modulation (the
        time MLP only feeds them)."""
        return [n for n, _ in self.named_modules() if n.endswith("adaLN_modulation")]

    def smoothing_folds(self) -> dict:
        """{module: where a per-input-channel divisor of its input can be folded, exactly}: the attention and MLP
        inputs are adaLN-modulated, norm(x) * (1 + scale) + shift, so ``("modulation", linear, shift, scale,
        chunks)`` divides the shift and (1 + scale) rows of the modulation linear; attention's output is a convex
        mix of the value rows of ``proj1`` (``("rows", ...)``). fc2's input (after GELU) and the modulations'
        inputs (after SiLU) need the divisor at run time."""
        out = {}
        for name, m in self.named_modules():
            if isinstance(m, DiTBlock):
                ada = f"{name}.adaLN_modulation.1"
                out[f"{name}.attn.proj1"] = ("modulation", ada, 0, 1, 6)
                out[f"{name}.mlp.fc1"] = ("modulation", ada, 3, 4, 6)
                c = m.attn.proj2.in_features
                out[f"{name}.attn.proj2"] = ("rows", f"{name}.attn.proj1", 2 * c, 3 * c)
        out["final_layer.linear"] = ("modulation", "final_layer.adaLN_modulation.1", 0, 1, 2)
        return out

