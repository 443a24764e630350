"""The denoiser eps_theta(x_t, t), whichever architecture the config names: one factory, one call signature.

Both networks (``unet.UNet``, ``dit.DiT``) are called as ``model(x_t, t)`` and declare what is
architecture-specific about them, so nothing else tests for an architecture's name:

* stages ``Layer1`` .. ``LayerN`` (every parameter name of a stage starts with ``LayerK.``), the poster's unit;
* ``ends``: the first and last layer's module names;
* ``concat_splits()``: {module: channel} for inputs that are skip concatenations (two-part activation ranges);
* ``op_type(name)`` and ``time_path(name)``: what a module does, for per-op-type tables and QuEST's rule.
"""
from torch import nn

from .blocks import Attention, unfused_attention
from .dit import DiT
from .unet import UNet

__all__ = ["Attention", "build_model", "count_params", "stage_of", "unfused_attention"]


def build_model(model_cfg, timesteps: int = 1000, image_size: int = 32) -> nn.Module:
    """The network of the ``model`` config section (``common.core.config.ModelConfig``); ``timesteps`` sizes
    the sin/cos time table (``diffusion.timesteps``), ``image_size`` the DiT's token grid (``data.image_size``)."""
    if model_cfg.arch == "dit":
        return DiT(image_size=image_size, patch_size=model_cfg.patch_size, in_channels=model_cfg.in_channels,
                   hidden=model_cfg.hidden, stage_blocks=list(model_cfg.stage_blocks),
                   num_heads=model_cfg.num_heads, mlp_ratio=model_cfg.mlp_ratio, dropout=model_cfg.dropout,
                   timesteps=timesteps)
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
    """'Layer3.ResBlock1.conv1.weight' -> 'Layer3'; None for parameters outside the stages."""
    head = param_name.split(".", 1)[0]
    return head if head.startswith("Layer") and head[5:].isdigit() else None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
