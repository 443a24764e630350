"""Which parameters importance covers and strategies may quantize: the eligibility rules."""
from torch import nn

from ..diffusion.model import stage_of

ELIGIBLE_RULES = {
    "poster": "weights of Conv2d/ConvTranspose2d/Linear modules inside Layer1..Layer6",
    "all_weights": "weights of every Conv2d/ConvTranspose2d/Linear module",
    "all": "every parameter (weights, biases, GroupNorm affine)",
}
_WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def eligible_names(model: nn.Module, rule: str = "poster") -> list:
    """Names of the parameters that importance covers (and that strategies may quantize)."""
    if rule == "all":
        return [n for n, _ in model.named_parameters()]
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _WEIGHTED) and (rule == "all_weights" or stage_of(mod_name)):
            names.append(f"{mod_name}.weight")
    if rule not in ELIGIBLE_RULES:
        raise ValueError(f"eligible rule must be one of {sorted(ELIGIBLE_RULES)}, got {rule!r}")
    return names
