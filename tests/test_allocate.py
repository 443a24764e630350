"""common.quant.allocate: budgets, exactness against brute force, beating random allocations, real sizes."""
import itertools
import random

import pytest

from common.core.budget import (
    budget_bits,
    budget_tag,
    normalize_budget,
    normalize_wa_budget,
    parse_budget,
    parse_wa_budget,
    wa_budget_tag,
)
from common.importance.weights import compute_importance
from common.quant.allocate import (
    InfeasibleBudgetError,
    allocate,
    allocate_model,
    allocate_steps,
    allocate_wa,
    format_bits,
    layer_bops,
    uniform_wa_choice,
)
from common.quant.formats import quantize_model, size_report

# Toy sensitivity table: 4 tensors, bits and estimated loss increase per format.
NUMEL = {"a": 1000, "b": 4000, "c": 500, "d": 2500}
SENS = {"a": 5.0, "b": 0.1, "c": 20.0, "d": 1.0}
ERR = {"fp32": 0.0, "fp16": 1e-6, "int8": 1e-3, "int4": 3e-2}  # per-weight squared error of the format
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
COST = {n: {f: SENS[n] * NUMEL[n] * e for f, e in ERR.items()} for n in NUMEL}
TBITS = {n: {f: NUMEL[n] * b for f, b in BITS.items()} for n in NUMEL}


def total(choice, table):
    return sum(table[n][f] for n, f in choice.items())


def test_parse_budget_forms_and_errors():
    assert parse_budget("50%") == ("fraction", 0.5)
    assert parse_budget(" 4.5bits") == ("bits", 4.5)
    assert parse_budget("2.1MB") == ("mb", 2.1)
    for bad in ("50", "4.5 bytes", "-3%", "0bits", "120%", "40bits", "", "half"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    assert budget_bits("25%", 1000) == 8000 and budget_bits("4.5bits", 1000) == 4500
    assert budget_bits("1MB", 10) == 8 * 2 ** 20
    assert budget_tag("25%") == "25pct" and budget_tag("4.5bits") == "4.5bits"
    assert normalize_budget(" 25.0 %") == normalize_budget("25%") == "25%"
    assert normalize_budget("4.50bits") == "4.5bits" and normalize_budget("2.10MB") == "2.1MB"
    # two nearby budgets stay two (6 significant digits made them one variant); an infinite one is an error
    assert normalize_budget("4.1234567bits") == "4.1234567bits" != normalize_budget("4.1234568bits")
    assert normalize_budget("33.3%") == "33.3%"
    with pytest.raises(ValueError, match="1e400MB"):
        parse_budget("1e400MB")


@pytest.mark.parametrize("avg_bits", [30, 16, 12, 8, 6, 4.5, 4])
def test_allocation_is_exact_and_within_budget(avg_bits):
    budget = int(avg_bits * sum(NUMEL.values()))
    choice, info = allocate(COST, TBITS, 0, budget)
    assert set(choice) == set(NUMEL)
    assert total(choice, TBITS) <= budget and info["bits_used"] == total(choice, TBITS)
    feasible = [dict(zip(NUMEL, fs, strict=True)) for fs in itertools.product(BITS, repeat=len(NUMEL))
                if total(dict(zip(NUMEL, fs, strict=True)), TBITS) <= budget]
    best = min(total(c, COST) for c in feasible)
    assert total(choice, COST) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert info["objective"] == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_allocation_beats_random_allocations():
    budget = 6 * sum(NUMEL.values())
    choice, _ = allocate(COST, TBITS, 0, budget)
    rng = random.Random(0)
    tried = 0
    while tried < 200:
        c = {n: rng.choice(list(BITS)) for n in NUMEL}
        if total(c, TBITS) <= budget:
            tried += 1
            assert total(choice, COST) <= total(c, COST) + 1e-12
    # the sensitive tensor keeps more bits than the insensitive one of the same error
    assert BITS[choice["c"]] > BITS[choice["b"]]


def test_costs_many_decades_apart_are_still_solved_exactly():
    """fp16 costs ~1e-9 of int4's: the solver's absolute gap must not decide between cheap choices."""
    cost = {n: {"fp32": 0.0, "fp16": 1e-9 * (i + 1), "int4": 1.0 + i} for i, n in enumerate("abcdef")}
    bits = {n: {"fp32": 32, "fp16": 16, "int4": 4} for n in cost}
    budget = 16 * 3 + 32 * 3
    choice, _ = allocate(cost, bits, 0, budget)
    feasible = [dict(zip(cost, fs, strict=True)) for fs in itertools.product(["fp32", "fp16", "int4"], repeat=6)
                if total(dict(zip(cost, fs, strict=True)), bits) <= budget]
    assert total(choice, cost) == pytest.approx(min(total(c, cost) for c in feasible), rel=1e-9)


def test_fixed_bits_count_and_infeasible_budget_names_the_floor():
    floor = 4 * sum(NUMEL.values())
    with pytest.raises(InfeasibleBudgetError, match="smallest reachable"):
        allocate(COST, TBITS, 1000, floor + 999)
    choice, info = allocate(COST, TBITS, 1000, floor + 1000)
    assert all(f == "int4" for f in choice.values()) and info["bits_used"] == floor + 1000


@pytest.fixture(scope="module")
def tiny(tiny_model_fisher):
    _, model, fisher = tiny_model_fisher
    return model, compute_importance("fisher_distortion", model, fisher, None)


@pytest.mark.parametrize("budget", ["50%", "25%", "5bits", "0.3MB"])
def test_allocated_model_really_fits_the_budget(tiny, budget):
    model, importance = tiny
    formats = ["fp32", "fp16", "int8", "int4"]
    plan, info = allocate_model(model, importance, budget, formats)
    _, stored = quantize_model(model, plan)
    size = size_report(stored)
    n_params = sum(p.numel() for p in model.parameters())
    assert size["analytic_bytes"] * 8 == info["bits_used"]  # the allocator counts what is stored
    assert size["stored_bytes"] * 8 <= budget_bits(budget, n_params)
    assert info["avg_bits"] == pytest.approx(info["bits_used"] / n_params)


def test_allocate_model_infeasible_budget_is_a_clear_error(tiny):
    model, importance = tiny
    with pytest.raises(InfeasibleBudgetError, match=r"budget '3bits'.*bits per weight"):
        allocate_model(model, importance, "3bits", ["fp32", "int8", "int4"])


def test_format_bits_counts_scales(tiny):
    model, _ = tiny
    bits = format_bits(model, ["Layer4.conv.weight"], ["fp32", "fp16", "int8", "int4"])["Layer4.conv.weight"]
    w = dict(model.named_parameters())["Layer4.conv.weight"]  # ConvTranspose2d: output channels on axis 1
    n, c = w.numel(), w.shape[1]
    assert bits == {"fp32": 32 * n, "fp16": 16 * n, "int8": 8 * n + 32 * c, "int4": 8 * ((n + 1) // 2) + 32 * c}


# ----------------------------------------------------------------------------- weights and activations

# Four modules: MACs, weight options {format: (cost, stored bits)}, input options {bits: cost}. "first" keeps
# fp32 weights and a float input (one option each), as the kept first conv does.
WA = {
    "first": {"macs": 50, "w": {"fp32": (0.0, 32 * 9)}, "a": {None: 0.0}},
    "a": {"macs": 1000, "w": {"int8": (0.1, 8 * 100), "int4": (2.0, 4 * 100)}, "a": {8: 0.2, 6: 1.0, 4: 5.0}},
    "b": {"macs": 4000, "w": {"int8": (0.01, 8 * 400), "int4": (0.05, 4 * 400)}, "a": {8: 3.0, 6: 6.0, 4: 9.0}},
    "c": {"macs": 500, "w": {"int8": (1.0, 8 * 50), "int4": (9.0, 4 * 50)}, "a": {8: 0.01, 6: 0.02, 4: 0.03}},
}


def _brute(layers, bops_limit=None, bits_limit=None, fixed=0):
    best = None
    names = list(layers)
    for combo in itertools.product(*[list(itertools.product(layers[n]["w"], layers[n]["a"])) for n in names]):
        c = dict(zip(names, combo, strict=True))
        bo = sum(layer_bops(layers[n]["macs"], *o) for n, o in c.items())
        bi = fixed + sum(layers[n]["w"][o[0]][1] for n, o in c.items())
        if (bops_limit is None or bo <= bops_limit) and (bits_limit is None or bi <= bits_limit):
            cost = sum(layers[n]["w"][o[0]][0] + layers[n]["a"][o[1]] for n, o in c.items())
            best = cost if best is None else min(best, cost)
    return best


def test_wa_budget_forms_and_errors():
    assert parse_wa_budget("W4A8") == [("wa", (4, 8))]
    assert parse_wa_budget("1.5GBOPs") == [("gbops", 1.5)]
    assert parse_wa_budget("w4a8 & 25%") == [("wa", (4, 8)), ("fraction", 0.25)]
    assert normalize_wa_budget("w4a8 & 25.0 %") == "W4A8&25%" and wa_budget_tag("W4A8&25%") == "W4A8+25pct"
    for bad in ("W5A8", "W4A1", "W4A8&1GBOPs", "25%&4bits", "eight", "-1GBOPs"):
        with pytest.raises(ValueError, match="budget"):
            parse_wa_budget(bad)


@pytest.mark.parametrize("budget", ["W8A8", "W4A8", "W4A6", "W4A4", "0.02GBOPs", "W4A8&0.0006MB"])
def test_wa_allocation_is_exact_within_bops_and_size(budget):
    total_params, fixed = 600, 32 * 41  # 559 weights in the table (9 fp32 + 550 allocatable), 41 other params
    choice, info = allocate_wa(WA, budget, total_params, fixed)
    used_bops = sum(layer_bops(WA[n]["macs"], *o) for n, o in choice.items())
    assert info["bops"] == used_bops and used_bops <= info["limits"]["bops"]
    if "W" in budget:  # the uniform plan's BOPs is the limit, and it fits by construction
        w, a = parse_wa_budget(budget)[0][1]
        uniform = uniform_wa_choice(WA, w, a)
        assert uniform["first"] == ("fp32", None)
        assert info["limits"]["bops"] == sum(layer_bops(WA[n]["macs"], *o) for n, o in uniform.items())
    bits_limit = info["limits"].get("bits")
    if bits_limit is not None:
        assert info["bits_used"] - fixed <= bits_limit
    best = _brute(WA, info["limits"]["bops"], None if bits_limit is None else bits_limit + fixed, fixed)
    assert info["objective"] == pytest.approx(best, rel=1e-9)


def test_wa_allocation_trades_weight_and_activation_bits():
    """At uniform W4A8's BOPs, `c` (sensitive weights, insensitive input) goes W8A4 for the same BOPs, while `b`
    (cheap weights, sensitive input) stays W4A8."""
    choice, _ = allocate_wa(WA, "W4A8", 600, 0)
    assert choice["c"] == ("int8", 4) and choice["b"] == ("int4", 8)


def test_wa_infeasible_budget_names_the_floor():
    with pytest.raises(InfeasibleBudgetError, match="smallest reachable"):
        allocate_wa(WA, "0.0001GBOPs", 600, 0)
    with pytest.raises(InfeasibleBudgetError, match="add int8 / 16"):
        uniform_wa_choice(WA, 8, 16)


def test_step_allocation_spends_the_bops_where_the_steps_reach_the_sample():
    """``allocate_steps``: bits per input and timestep group within the same BOPs; a group that carries most of
    the final sample's sensitivity gets more bits, the others fewer; a kept input keeps its bits; equal shares
    and equal step fractions give every group the same bits (the per-input problem, split in parts)."""
    choice = {"a": ("int4", 4), "b": ("int4", 4), "end": ("fp32", None)}
    macs = {"a": 1000, "b": 3000, "end": 50}
    a_cost = {n: {3: 8.0 * k, 4: 2.0 * k, 6: 0.5 * k, 8: 0.1 * k} for n, k in (("a", 1.0), ("b", 2.0))}
    limit = sum(m * 4 * 4 for n, m in macs.items() if n != "end") + macs["end"] * 32 * 32
    out, info = allocate_steps(choice, macs, a_cost, [3, 4, 6, 8], [0.25] * 4, [0.05, 0.85, 0.05, 0.05], limit)
    assert out["end"] == ("fp32", None) and info["bops"] <= limit
    for n in ("a", "b"):
        f, bits = out[n]
        assert f == "int4" and len(bits) == 4
        assert bits[1] == max(bits) > min(bits)  # the decisive group gets the most
    spent = sum(macs[n] * 0.25 * 4 * b for n in ("a", "b") for b in out[n][1]) + macs["end"] * 32 * 32
    assert spent == info["bops"]
    even, _ = allocate_steps(choice, macs, a_cost, [3, 4, 6, 8], [0.25] * 4, [0.25] * 4, limit)
    assert all(len(set(even[n][1])) == 1 for n in ("a", "b"))


def test_step_allocation_at_a_limit_it_meets_exactly_is_not_refused_for_an_ulp():
    """A group's BOPs are macs × a float step fraction; where every input already sits at the top bits and the
    limit is that plan's own BOPs, the solver's exact optimum summed in another order came out an ulp above the
    limit and was refused as invalid ("milp returned an invalid allocation"), 12 of 100 random draws."""
    import random

    rng = random.Random(2)
    for _ in range(40):
        raw = [rng.random() for _ in range(10)]
        fractions = [r / sum(raw) for r in raw]
        raw = [rng.random() for _ in range(10)]
        shares = [r / sum(raw) for r in raw]
        macs = {f"m{i}": rng.randint(10**5, 10**7) for i in range(6)}
        choice = {n: ("int4", 8) for n in macs}
        a_cost = {n: {b: rng.random() * 2.0 ** (-b) for b in (4, 6, 8)} for n in macs}
        limit = float(sum(m * 4 * 8 for m in macs.values()))
        out, info = allocate_steps(choice, macs, a_cost, [4, 6, 8], fractions, shares, limit)
        assert set(out) == set(macs) and all(len(bits) == 10 for _, bits in out.values())
        assert info["bops"] <= limit * (1 + 1e-12)
