"""Budgets as people write them, parsed and spelled one way.

Weight budgets: a share of the fp32 size ('25%'), average stored bits per weight ('4.5bits') or MB of
stored weights ('2.1MB'). Weight/activation budgets add BOPs: 'W4A8' (the BOPs of uniform 4-bit weights
and 8-bit activations) or '1.5GBOPs', optionally joined to a size with '&'. Config validation and the
allocators share these parsers, so a budget means the same everywhere.
"""
import math
import re

_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|bits|MB)\s*$")


def parse_budget(text: str):
    """'50%' -> ('fraction', 0.5); '4.5bits' -> ('bits', 4.5); '2.1MB' -> ('mb', 2.1) (MB = 2^20 bytes)."""
    m = _BUDGET.match(str(text))
    if not m:
        raise ValueError(f"budget {text!r}: expected a percentage of the fp32 size ('25%'), average bits per "
                         f"weight ('4.5bits') or MB of stored weights ('2.1MB')")
    value, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(value) or value <= 0 or (unit == "%" and value > 100) or (unit == "bits" and value > 32):
        raise ValueError(f"budget {text!r}: must be in (0, 100]% of fp32, (0, 32] bits or a positive MB")
    return {"%": ("fraction", value / 100), "bits": ("bits", value), "MB": ("mb", value)}[unit]


def budget_bits(text: str, total_params: int) -> int:
    """The budget in stored bits for a model of ``total_params`` parameters."""
    kind, value = parse_budget(text)
    if kind == "fraction":
        return math.floor(value * 32 * total_params)
    if kind == "bits":
        return math.floor(value * total_params)
    return math.floor(value * 2 ** 20 * 8)


def normalize_budget(budget: str) -> str:
    """One spelling per budget: ' 25.0 %' -> '25%', '4.50bits' -> '4.5bits'."""
    kind, value = parse_budget(budget)
    # 15 significant digits: 4.1234567bits stays itself ({:g} kept 6, so two nearby budgets became one variant)
    return {"fraction": f"{100 * value:.15g}%", "bits": f"{value:.15g}bits", "mb": f"{value:.15g}MB"}[kind]


def budget_tag(budget: str) -> str:
    """A file-name-safe label: '25%' -> '25pct', '4.5bits' -> '4.5bits'."""
    return normalize_budget(budget).replace("%", "pct")


_WA = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)
_GBOPS = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*GBOPs$", re.IGNORECASE)
W_FORMAT_OF_BITS = {32: "fp32", 16: "fp16", 8: "int8", 4: "int4", 3: "int3", 2: "int2"}
_WA_FORMS = ("'W4A8' (the BOPs of every module at 4-bit weights and 8-bit activations), '1.5GBOPs' per network "
             "evaluation, a stored size ('25%', '4.5bits', '2.1MB'), or one BOPs and one size part joined by '&'")


def parse_wa_budget(text: str) -> list:
    """'W4A8' -> [('wa', (4, 8))]; '1.5GBOPs' -> [('gbops', 1.5)]; '25%' -> [('fraction', 0.25)] (every
    ``parse_budget`` form); 'W4A8&25%' -> both, and both must hold."""
    out = []
    for part in str(text).split("&"):
        p = part.strip()
        wa, gb = _WA.match(p), _GBOPS.match(p)
        if wa:
            w, a = int(wa.group(1)), int(wa.group(2))
            if w not in W_FORMAT_OF_BITS or not 2 <= a <= 16:
                raise ValueError(f"budget {text!r}: W must be one of {sorted(W_FORMAT_OF_BITS)} and A in 2..16")
            out.append(("wa", (w, a)))
        elif gb:
            if float(gb.group(1)) <= 0:
                raise ValueError(f"budget {text!r}: GBOPs must be positive")
            out.append(("gbops", float(gb.group(1))))
        else:
            try:
                out.append(parse_budget(p))
            except ValueError:
                raise ValueError(f"budget {text!r}: expected {_WA_FORMS}") from None
    ops = sum(k in ("wa", "gbops") for k, _ in out)
    if ops > 1 or len(out) - ops > 1:
        raise ValueError(f"budget {text!r}: at most one BOPs part and one size part; expected {_WA_FORMS}")
    return out


def normalize_wa_budget(text: str) -> str:
    """One spelling per budget: 'w4a8 & 25.0%' -> 'W4A8&25%'."""
    parts = []
    for (kind, value), raw in zip(parse_wa_budget(text), str(text).split("&"), strict=True):
        parts.append(f"W{value[0]}A{value[1]}" if kind == "wa" else f"{value:.15g}GBOPs" if kind == "gbops"
                     else normalize_budget(raw))
    return "&".join(parts)


def wa_budget_tag(text: str) -> str:
    """A file-name-safe label: 'W4A8&25%' -> 'W4A8+25pct'."""
    return normalize_wa_budget(text).replace("%", "pct").replace("&", "+")


_AT = re.compile(r"^\s*(.+?)\s*(?:@\s*A(\d+))?\s*$", re.IGNORECASE)


def parse_size_at_bits(text: str):
    """'3.5bits@A6' -> ('3.5bits', 6): a stored-size budget for the weights (every ``parse_budget`` form) and the
    bits of every quantized activation; without '@A<bits>' the activations stay float (None)."""
    m = _AT.match(str(text))
    a = int(m.group(2)) if m and m.group(2) else None
    if not m or (a is not None and not 2 <= a <= 16):
        raise ValueError(f"budget {text!r}: expected a weight size ('3.5bits', '25%', '2.1MB'), optionally with "
                         f"'@A<bits>' for the activations (2..16), e.g. '3.5bits@A8'")
    try:
        return normalize_budget(m.group(1)), a
    except ValueError as e:
        raise ValueError(f"{e}; with activation bits: '<size>@A<bits>', e.g. '3.5bits@A8'") from None


def normalize_size_at_bits(text: str) -> str:
    """One spelling: ' 3.50bits @ a8' -> '3.5bits@A8'."""
    size, a = parse_size_at_bits(text)
    return size + (f"@A{a}" if a else "")


def size_at_bits_tag(text: str) -> str:
    """'3.5bits@A8' -> '3.5bits_A8' (file-name safe)."""
    size, a = parse_size_at_bits(text)
    return budget_tag(size) + (f"_A{a}" if a else "")
