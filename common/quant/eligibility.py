"""Which parameters importance covers and strategies may quantize: the eligibility rules."""
from torch import nn

from ..diffusion.model import stage_of

ELIGIBLE_RULES = {
    "poster": "weights of Conv2d/ConvTranspose2d/Linear modules inside Layer1..Layer6",
    "all_weights": "weights of every Conv2d/ConvTranspose2d/Linear module",
    "all_but_ends": "weights of every Conv2d/ConvTranspose2d/Linear module but the first and last layer "
                    "(the network's `ends`: the U-Net's shallow_conv and output_conv, the DiT's patch_embed and "
                    "final_layer.linear), which keep a format of their own",
    "all": "every parameter (weights, biases, GroupNorm affine)",
}
_WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def eligible_names(model: nn.Module, rule: str = "poster") -> list:
    """Names of the parameters that importance covers (and that strategies may quantize).

    ``poster``: inside Layer1..Layer6 (the time MLP and the stage-external layers stay fp32, a floor of
    5.42 bits per weight on the default U-Net); ``all_but_ends``: every conv / linear weight but the first and
    last layer, so budgets down to ~2.3 bits are reachable."""
    if rule == "all":
        return [n for n, _ in model.named_parameters()]
    names = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, _WEIGHTED) or ".lowrank." in mod_name + ".":  # a 16-bit branch, not a layer
            continue
        if rule == "all_weights" or (rule == "all_but_ends" and mod_name not in model.ends) or (
                rule == "poster" and stage_of(mod_name)):
            names.append(f"{mod_name}.weight")
    if rule not in ELIGIBLE_RULES:
        raise ValueError(f"eligible rule must be one of {sorted(ELIGIBLE_RULES)}, got {rule!r}")
    return names


def end_convs(model: nn.Module) -> list:
    """The weights the ``all_but_ends`` rule leaves out: the first and last layer's."""
    return [f"{m}.weight" for m in model.ends]
