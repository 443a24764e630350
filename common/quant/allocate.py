"""Budgeted mixed-precision allocation: one format per tensor, minimum estimated loss increase.

Given, for every eligible tensor n and candidate format f, an estimated loss increase
``cost[n][f]`` (from ``common.importance.weights``) and the storage bits ``bits[n][f]`` that
``common.quant.formats`` would really write, choose x[n][f] in {0, 1} with one format per tensor to

    minimise   sum_{n,f} cost[n][f] * x[n][f]
    subject to fixed_bits + sum_{n,f} bits[n][f] * x[n][f] <= budget_bits,

a multiple-choice knapsack solved exactly as a mixed-integer program (``scipy.optimize.milp``).
Parameters outside the eligible set stay fp32 and count in ``fixed_bits``.
"""
import numpy as np

from ..core.budget import W_FORMAT_OF_BITS, budget_bits, parse_wa_budget
from ..core.errors import UserError
from ..core.format_names import bits_of
from .formats import Assignment, channel_axes, entry_bits, scale_groups

SOLVER = "scipy.optimize.milp (HiGHS), relative gap <= 1e-6"


class InfeasibleBudgetError(UserError, ValueError):
    """No choice of formats fits the budget; the message names the smallest reachable size."""


def format_bits(model, names, formats) -> dict:
    """{name: {format: stored bits}} as ``common.quant.formats.size_report`` would count them."""
    params, axes = dict(model.named_parameters()), channel_axes(model)
    out = {}
    for n in names:
        p = params[n]
        out[n] = {f: 32 * p.numel() if f == "fp32" else entry_bits(p.numel(), scale_groups(p.shape, axes[n]), f)
                  for f in formats}
    return out


def solve(cost: dict, resources: dict, limits: dict):
    """Exact minimum-cost choice of one option per item under one or more resource limits.

    cost: {item: {option: value}}; resources: {kind: {item: {option: amount}}} over the same items and
    options; limits: {kind: the most the chosen options may use in total}. Returns ({item: option}, solver
    status). Raises ``InfeasibleBudgetError`` when no choice fits.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp  # ~0.2 s to import: only when allocating

    names = list(cost)
    choices = [(i, n, o) for i, n in enumerate(names) for o in cost[n]]
    c = np.array([cost[n][o] for _, n, o in choices], dtype=float)
    one_each = np.zeros((len(names), len(choices)))
    for k, (i, _, _) in enumerate(choices):
        one_each[i, k] = 1
    constraints = [LinearConstraint(one_each, 1, 1)]
    for kind, limit in limits.items():
        row = np.array([resources[kind][n][o] for _, n, o in choices], dtype=float)
        constraints.append(LinearConstraint(row[None], -np.inf, limit))
    # HiGHS stops within an absolute gap of ~1e-6. Costs span many decades (fp16 vs int4), so scale them
    # by the LP relaxation's optimum, a lower bound of the integer one: the gap is then <= 1e-6 relative.
    relaxed = milp(c, bounds=Bounds(0, 1), constraints=constraints)
    scale = relaxed.fun if relaxed.x is not None and relaxed.fun > 0 else max(c.max(), 1.0)
    res = milp(c / scale, integrality=np.ones(len(choices)), bounds=Bounds(0, 1), constraints=constraints,
               options={"mip_rel_gap": 0.0})
    if res.x is None:
        raise InfeasibleBudgetError(f"milp found no allocation: {res.message}")
    chosen = {n: o for (_, n, o), x in zip(choices, res.x, strict=True) if x > 0.5}
    over = {k: sum(resources[k][n][o] for n, o in chosen.items()) for k, lim in limits.items()}
    # rounding of the solver's solution must not bend the rules; a float resource (BOPs of a fraction of the
    # steps) summed in another order than the solver's may land an ulp above a limit it meets exactly, and an
    # integer one (bits) breaks a limit by at least 1, far above this tolerance
    slack = {k: 0 if isinstance(limits[k], int) and all(isinstance(v, int) for r in resources[k].values()
                                                         for v in r.values()) else 1e-9 * abs(limits[k])
             for k in limits}  # an integer resource (bits) is held exactly
    if len(chosen) != len(names) or any(over[k] > limits[k] + slack[k] for k in limits):
        raise RuntimeError(f"milp returned an invalid allocation ({len(chosen)}/{len(names)} items, "
                           f"used {over} of {limits}?): {res.message}")
    return chosen, res.message


def allocate(cost: dict, bits: dict, fixed_bits: int, budget: int):
    """Exact minimum-cost choice of one format per tensor within ``budget`` bits.

    cost, bits: {name: {format: value}} over the same names and formats. Returns
    ({name: format}, info) where info holds the objective, the bits used and the solver status.
    Raises ``InfeasibleBudgetError`` naming the smallest size reachable when no choice fits.
    """
    floor = fixed_bits + sum(min(b.values()) for b in bits.values())
    if floor > budget:
        raise InfeasibleBudgetError(
            f"budget of {budget / 8 / 2 ** 20:.4f} MB is below the smallest reachable size "
            f"{floor / 8 / 2 ** 20:.4f} MB (every eligible tensor in its smallest format; the rest stays fp32)")
    chosen, status = solve(cost, {"bits": bits}, {"bits": budget - fixed_bits})
    used = fixed_bits + sum(bits[n][f] for n, f in chosen.items())
    return chosen, {"objective": float(sum(cost[n][f] for n, f in chosen.items())), "bits_used": int(used),
                    "budget_bits": int(budget), "solver": SOLVER, "status": status}


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


# ----------------------------------------------------------------------------- weights and activations
def layer_bops(macs: int, w_format: str, a_bits) -> int:
    """MACs * w_bits * a_bits, a float input (None) counted as 32 bits."""
    return macs * bits_of(w_format) * (a_bits or 32)


def uniform_wa_choice(layers: dict, w: int, a: int) -> dict:
    """Every module at W-bit weights and A-bit activations; a module with one option keeps it (fp32 weights
    outside the eligible set, inputs kept at higher precision)."""
    fmt = W_FORMAT_OF_BITS[w]

    def pick(want, options):
        return want if want in options else next(iter(options)) if len(options) == 1 else KeyError

    out = {n: (pick(fmt, layer["w"]), pick(a, layer["a"])) for n, layer in layers.items()}
    for n, o in out.items():
        if KeyError in o:
            raise InfeasibleBudgetError(f"uniform W{w}A{a}: {n} may take weights {list(layers[n]['w'])} and "
                                        f"activation bits {list(layers[n]['a'])}; add {fmt} / {a} to the candidates")
    return out


def allocate_wa(layers: dict, budget: str, total_params: int, fixed_bits: int, bops_limit=None):
    """Exact choice of one (weight format, activation bits) per module minimising the summed estimated
    loss increase, weight cost + activation cost (taken as additive, as second-order estimates of
    independent perturbations are), within ``budget`` in BOPs and/or stored size.

    layers: {module: {"macs": MACs per evaluation, "w": {format: (cost, stored bits)}, "a": {bits: cost}}};
    a module whose weight stays fp32 has w = {"fp32": (0, bits)}, one whose input stays float a = {None: 0}.
    fixed_bits: stored bits of the parameters outside the layers' weights (biases, norms); bops_limit: the BOPs
    limit itself, in place of ``budget``'s (which then only names it). Returns ({module: (format, a_bits)}, info).
    """
    opts = {n: [(f, a) for f in layer["w"] for a in layer["a"]] for n, layer in layers.items()}
    cost = {n: {o: layers[n]["w"][o[0]][0] + layers[n]["a"][o[1]] for o in opts[n]} for n in layers}
    res = {"bops": {n: {o: layer_bops(layers[n]["macs"], *o) for o in opts[n]} for n in layers},
           "bits": {n: {o: layers[n]["w"][o[0]][1] for o in opts[n]} for n in layers}}
    limits = {} if bops_limit is None else {"bops": float(bops_limit)}
    for (kind, value), raw in zip(parse_wa_budget(budget) if bops_limit is None else [], str(budget).split("&"),
                                  strict=bops_limit is None):
        if kind == "wa":
            uniform = uniform_wa_choice(layers, *value)
            limits["bops"] = sum(res["bops"][n][o] for n, o in uniform.items())
        elif kind == "gbops":
            limits["bops"] = value * 1e9
        else:
            limits["bits"] = budget_bits(raw, total_params) - fixed_bits
    for kind, limit in limits.items():
        floor = sum(min(r.values()) for r in res[kind].values())
        if floor > limit:
            unit = (f"{floor / 1e9:.4g} GBOPs (every module at its fewest bits); the budget allows "
                    f"{limit / 1e9:.4g}") if kind == "bops" else (
                f"{(floor + fixed_bits) / 8 / 2 ** 20:.4f} MB of stored weights; the budget allows "
                f"{(limit + fixed_bits) / 8 / 2 ** 20:.4f} MB")
            raise InfeasibleBudgetError(f"budget {budget!r}: the smallest reachable is {unit}")
    chosen, status = solve(cost, res, limits)
    used_bops = sum(res["bops"][n][o] for n, o in chosen.items())
    used_bits = fixed_bits + sum(res["bits"][n][o] for n, o in chosen.items())
    return chosen, {"objective": float(sum(cost[n][o] for n, o in chosen.items())), "bops": int(used_bops),
                    "bits_used": int(used_bits), "avg_bits": used_bits / total_params, "budget": budget,
                    "limits": {k: float(v) for k, v in limits.items()}, "solver": SOLVER, "status": status,
                    "choice": {n: list(o) for n, o in chosen.items()}}


def allocate_steps(choice: dict, macs: dict, a_cost: dict, a_options, fractions, shares, bops_limit: float):
    """Activation bits per module *and timestep group* within ``bops_limit`` (BOPs per network evaluation,
    averaged over the sampler's steps), the weights as ``choice`` {module: (format, a_bits)} has them.

    fractions[g]: the share of the sampler's steps in group g; shares[g]: the share of the final sample's
    sensitivity to a noise-prediction error in those steps (the chain-aware Fisher's ``per_step``). A module's
    input at b bits in group g costs shares[g] * a_cost[module][b] (its error weighted by how much that group's
    steps reach x_0) and spends macs * fractions[g] * w_bits * b BOPs; modules without ``a_cost`` (inputs kept
    float) keep their bits. Returns ({module: (format, [bits per group] or the kept bits)}, info)."""
    units = {}
    for n, (f, b) in choice.items():
        if b is None or n not in a_cost:
            units[n] = {"macs": macs[n], "w": {f: (0.0, 0)}, "a": {b: 0.0}}
            continue
        for g, (frac, share) in enumerate(zip(fractions, shares, strict=True)):
            units[f"{n}@{g}"] = {"macs": macs[n] * frac, "w": {f: (0.0, 0)},
                                 "a": {a: share * a_cost[n][a] for a in a_options}}
    chosen, info = allocate_wa(units, f"{bops_limit / 1e9:.6g} GBOPs", 1, 0, bops_limit=bops_limit)
    out = {n: (f, [chosen[f"{n}@{g}"][1] for g in range(len(fractions))] if f"{n}@0" in chosen else b)
           for n, (f, b) in choice.items()}
    return out, {k: info[k] for k in ("objective", "bops", "limits", "solver", "status")}

