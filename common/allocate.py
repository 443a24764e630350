"""Budgeted mixed-precision allocation: one format per tensor, minimum estimated loss increase.

Given, for every eligible tensor n and candidate format f, an estimated loss increase
``cost[n][f]`` (from ``common.importance``) and the storage bits ``bits[n][f]`` that
``common.quantize`` would really write, choose x[n][f] in {0, 1} with one format per tensor to

    minimise   sum_{n,f} cost[n][f] * x[n][f]
    subject to fixed_bits + sum_{n,f} bits[n][f] * x[n][f] <= budget_bits,

a multiple-choice knapsack solved exactly as a mixed-integer program (``scipy.optimize.milp``).
Parameters outside the eligible set stay fp32 and count in ``fixed_bits``.
"""
import math
import re

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .quantize import Assignment, channel_axes, entry_bits, scale_groups

_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|bits|MB)\s*$")


class InfeasibleBudgetError(ValueError):
    pass


def parse_budget(text: str):
    """'50%' -> ('fraction', 0.5); '4.5bits' -> ('bits', 4.5); '2.1MB' -> ('mb', 2.1) (MB = 2^20 bytes)."""
    m = _BUDGET.match(str(text))
    if not m:
        raise ValueError(f"budget {text!r}: expected a percentage of the fp32 size ('25%'), average bits per "
                         f"weight ('4.5bits') or MB of stored weights ('2.1MB')")
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0 or (unit == "%" and value > 100) or (unit == "bits" and value > 32):
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


def format_bits(model, names, formats) -> dict:
    """{name: {format: stored bits}} as ``common.quantize.size_report`` would count them."""
    params, axes = dict(model.named_parameters()), channel_axes(model)
    out = {}
    for n in names:
        p = params[n]
        out[n] = {f: 32 * p.numel() if f == "fp32" else entry_bits(p.numel(), scale_groups(p.shape, axes[n]), f)
                  for f in formats}
    return out


def allocate(cost: dict, bits: dict, fixed_bits: int, budget: int):
    """Exact minimum-cost choice of one format per tensor within ``budget`` bits.

    cost, bits: {name: {format: value}} over the same names and formats. Returns
    ({name: format}, info) where info holds the objective, the bits used and the solver status.
    Raises ``InfeasibleBudgetError`` naming the smallest size reachable when no choice fits.
    """
    names = list(cost)
    choices = [(i, n, f) for i, n in enumerate(names) for f in cost[n]]
    c = np.array([cost[n][f] for _, n, f in choices], dtype=float)
    b = np.array([bits[n][f] for _, n, f in choices], dtype=float)
    floor = fixed_bits + sum(min(bits[n].values()) for n in names)
    if floor > budget:
        raise InfeasibleBudgetError(
            f"budget of {budget / 8 / 2 ** 20:.4f} MB is below the smallest reachable size "
            f"{floor / 8 / 2 ** 20:.4f} MB (every eligible tensor in its smallest format; the rest stays fp32)")
    one_each = np.zeros((len(names), len(choices)))
    for k, (i, _, _) in enumerate(choices):
        one_each[i, k] = 1
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(b[None], -np.inf, budget - fixed_bits)]
    # HiGHS stops within an absolute gap of ~1e-6. Costs span many decades (fp16 vs int4), so scale them
    # by the LP relaxation's optimum, a lower bound of the integer one: the gap is then <= 1e-6 relative.
    relaxed = milp(c, bounds=Bounds(0, 1), constraints=constraints)
    scale = relaxed.fun if relaxed.x is not None and relaxed.fun > 0 else max(c.max(), 1.0)
    res = milp(c / scale, integrality=np.ones(len(choices)), bounds=Bounds(0, 1), constraints=constraints,
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise InfeasibleBudgetError(f"milp found no allocation: {res.message}")
    chosen = {n: f for (_, n, f), x in zip(choices, res.x) if x > 0.5}
    used = fixed_bits + sum(bits[n][f] for n, f in chosen.items())
    if len(chosen) != len(names) or used > budget:  # rounding of the solver's solution must not bend the rules
        raise RuntimeError(f"milp returned an invalid allocation ({len(chosen)}/{len(names)} tensors, "
                           f"{used} > {budget} bits?): {res.message}")
    return chosen, {"objective": float(sum(cost[n][f] for n, f in chosen.items())), "bits_used": int(used),
                    "budget_bits": int(budget), "solver": "scipy.optimize.milp (HiGHS), relative gap <= 1e-6",
                    "status": res.message}


def plan_from_choice(choice: dict) -> dict:
    """{name: format} -> a quantization plan (fp32 tensors are simply left out)."""
    return {n: Assignment(f) for n, f in choice.items() if f != "fp32"}


def allocate_model(model, importance: dict, budget: str, formats) -> tuple:
    """Plan for ``model`` from an importance artifact under ``budget`` ('25%', '4.5bits', '2.1MB').

    The tensors ``importance`` covers choose among ``formats``; every other parameter stays fp32.
    Returns (plan, info) with info recording the choice per tensor, the budget and the objective.
    """
    names = list(importance["cost"])
    bits = format_bits(model, names, formats)
    cost = {n: {f: importance["cost"][n][f] for f in formats} for n in names}
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    fixed = 32 * (total - sum(params[n].numel() for n in names))
    try:
        choice, info = allocate(cost, bits, fixed, budget_bits(budget, total))
    except InfeasibleBudgetError as e:
        floor = (fixed + sum(min(b.values()) for b in bits.values())) / total
        raise InfeasibleBudgetError(f"budget {budget!r}: {e}, i.e. {floor:.2f} bits per weight "
                                    f"with formats {list(formats)}") from None
    info.update(budget=budget, formats=list(formats), avg_bits=info["bits_used"] / total, choice=choice)
    return plan_from_choice(choice), info


def normalize_budget(budget: str) -> str:
    """One spelling per budget: ' 25.0 %' -> '25%', '4.50bits' -> '4.5bits'."""
    kind, value = parse_budget(budget)
    return {"fraction": f"{100 * value:g}%", "bits": f"{value:g}bits", "mb": f"{value:g}MB"}[kind]


def budget_tag(budget: str) -> str:
    """A file-name-safe label: '25%' -> '25pct', '4.5bits' -> '4.5bits'."""
    return normalize_budget(budget).replace("%", "pct")
