"""common.allocate: budgets, exactness against brute force, beating random allocations, real sizes."""
import itertools
import random

import pytest

from common.allocate import (InfeasibleBudgetError, allocate, allocate_model, budget_bits, budget_tag,
                             format_bits, normalize_budget, parse_budget)
from common.importance import compute_importance
from common.quantize import quantize_model, size_report

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


@pytest.mark.parametrize("avg_bits", [30, 16, 12, 8, 6, 4.5, 4])
def test_allocation_is_exact_and_within_budget(avg_bits):
    budget = int(avg_bits * sum(NUMEL.values()))
    choice, info = allocate(COST, TBITS, 0, budget)
    assert set(choice) == set(NUMEL)
    assert total(choice, TBITS) <= budget and info["bits_used"] == total(choice, TBITS)
    feasible = [dict(zip(NUMEL, fs)) for fs in itertools.product(BITS, repeat=len(NUMEL))
                if total(dict(zip(NUMEL, fs)), TBITS) <= budget]
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
    feasible = [dict(zip(cost, fs)) for fs in itertools.product(["fp32", "fp16", "int4"], repeat=6)
                if total(dict(zip(cost, fs)), bits) <= budget]
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
