"""common.quant.strategies on hand-made Fisher values: exact plans for each of the poster's rules."""
import math
import statistics

import pytest
import torch
from torch import nn

from common.quant.formats import Assignment
from common.quant.strategies import describe_plan, fp32, layer_group, layer_math, layer_ratio, uniform, whole_threshold

PER_TENSOR = {
    "Layer1.a.weight": 1.0,
    "Layer1.b.weight": 0.05,
    "Layer2.c.weight": 0.2,
    "Layer2.d.weight": 0.5,
    "Layer3.e.weight": 0.01,
    "Layer3.f.weight": 0.3,
    "Layer3.g.weight": 10.0,
    "Layer4.h.weight": 0.001,
}


def fisher_from(per_tensor, shape=(2, 3)):
    """Tensor-granularity fixture: every element of a tensor equals its mean."""
    return {"per_tensor": dict(per_tensor), "diag": {n: torch.full(shape, v) for n, v in per_tensor.items()}}


@pytest.fixture
def fisher():
    return fisher_from(PER_TENSOR)


def quantized(plan):
    return set(plan)


def test_references(fisher):
    assert fp32(fisher) == ({}, {})
    plan, _ = uniform(fisher, "int8")
    assert set(plan) == set(PER_TENSOR) and all(a.format == "int8" and a.mask is None for a in plan.values())


def test_whole_threshold_extremes(fisher):
    assert whole_threshold(fisher, 0.0)[0] == {}
    plan, info = whole_threshold(fisher, 1.0 + 1e-9, fmt="int4")
    assert set(plan) == set(PER_TENSOR) and all(a.format == "int4" and a.mask is None for a in plan.values())
    assert info == {"normalizer_max": 10.0, "threshold": 1.0 + 1e-9}
    # exactly 1: the comparison is strict, so the maximum itself stays fp32
    assert set(whole_threshold(fisher, 1.0)[0]) == set(PER_TENSOR) - {"Layer3.g.weight"}


@pytest.mark.parametrize("threshold, expected", [
    (0.04, {"Layer1.b.weight", "Layer2.c.weight", "Layer3.e.weight", "Layer3.f.weight", "Layer4.h.weight"}),
    (0.025, {"Layer1.b.weight", "Layer2.c.weight", "Layer3.e.weight", "Layer4.h.weight"}),
    (0.0005, {"Layer4.h.weight"}),
    (0.2, set(PER_TENSOR) - {"Layer3.g.weight"}),
    (0.09, set(PER_TENSOR) - {"Layer3.g.weight", "Layer1.a.weight"}),
])
def test_whole_threshold_global_normalization(fisher, threshold, expected):
    plan, _ = whole_threshold(fisher, threshold)
    assert set(plan) == expected
    assert all(isinstance(a, Assignment) and a.format == "fp16" for a in plan.values())


def test_whole_threshold_all_zero_fisher():
    plan, info = whole_threshold(fisher_from({n: 0.0 for n in PER_TENSOR}), 0.1)
    assert set(plan) == set(PER_TENSOR) and info["normalizer_max"] == 0.0  # no NaN from 0/0


def test_layer_group_normalizes_per_group(fisher):
    groups = {"A": {"layers": [1, 2], "threshold": 0.3}, "B": {"layers": [3], "threshold": 0.05}}
    plan, info = layer_group(fisher, groups)
    # A: max 1.0 -> b 0.05, c 0.2 below 0.3 (a 1.0, d 0.5 not); B: max 10 -> e 0.001, f 0.03 below 0.05
    # Layer4 is in no group and stays fp32 even though its Fisher is the smallest of all
    assert set(plan) == {"Layer1.b.weight", "Layer2.c.weight", "Layer3.e.weight", "Layer3.f.weight"}
    assert info["A"] == {"layers": [1, 2], "threshold": 0.3, "normalizer_max": 1.0}
    assert info["B"]["normalizer_max"] == 10.0
    # a global normalization (max 10) would have quantized all of group A at 0.3
    assert {"Layer1.a.weight", "Layer2.d.weight"} <= set(whole_threshold(fisher, 0.3)[0])


def test_layer_group_with_the_poster_groups(fisher):
    from common.core.config import LayerGroupConfig

    groups = LayerGroupConfig().groups  # Layer1-2 @ 0.1, Layer3-5 @ 0.3, Layer6 @ 0.1
    assert {g: v["layers"] for g, v in groups.items()} == {"Layer1-2": [1, 2], "Layer3-5": [3, 4, 5], "Layer6": [6]}
    plan, info = layer_group(fisher, groups)
    # Layer1-2: max 1.0, only b (0.05) < 0.1; Layer3-5: max 10 (g), e 0.001, f 0.03, h 0.0001 < 0.3; Layer6 empty
    assert set(plan) == {"Layer1.b.weight", "Layer3.e.weight", "Layer3.f.weight", "Layer4.h.weight"}
    assert set(info) == {"Layer1-2", "Layer3-5"} and info["Layer3-5"]["normalizer_max"] == 10.0


def test_layer_group_skips_empty_groups(fisher):
    plan, info = layer_group(fisher, {"none": {"layers": [6], "threshold": 0.5},
                                      "L4": {"layers": [4], "threshold": 1.5}})
    assert set(plan) == {"Layer4.h.weight"} and set(info) == {"L4"}


@pytest.mark.parametrize("p, expected", [
    (0.0, set(PER_TENSOR)),
    (1.0, set()),
    # keep ceil(p*n) per stage (n = 2, 2, 3, 1): the largest Fisher stays fp32
    (0.25, {"Layer1.b.weight", "Layer2.c.weight", "Layer3.e.weight", "Layer3.f.weight"}),
    (0.5, {"Layer1.b.weight", "Layer2.c.weight", "Layer3.e.weight"}),
    (0.6, {"Layer3.e.weight"}),
    (0.7, set()),
])
def test_layer_ratio_keeps_ceil_p_n_per_stage(fisher, p, expected):
    plan, info = layer_ratio(fisher, p)
    assert set(plan) == expected
    sizes = {"Layer1": 2, "Layer2": 2, "Layer3": 3, "Layer4": 1}
    for stage, n in sizes.items():
        assert info[stage] == {"p": p, "kept": math.ceil(p * n), "of": n}


def test_layer_ratio_float_guard():
    # 0.28 * 25 = 7.000000000000001 in floating point: still 7 kept, not 8
    assert 0.28 * 25 > 7
    per = {f"Layer1.t{i}.weight": float(i + 1) for i in range(25)}
    plan, info = layer_ratio(fisher_from(per), 0.28)
    assert info["Layer1"]["kept"] == 7
    assert set(plan) == {f"Layer1.t{i}.weight" for i in range(18)}


def test_layer_ratio_ties_are_stable():
    per = {"Layer1.x.weight": 1.0, "Layer1.y.weight": 1.0, "Layer1.z.weight": 1.0}
    plan, _ = layer_ratio(fisher_from(per), 0.5)  # keep 2 of 3 tied: the first two in order
    assert set(plan) == {"Layer1.z.weight"}


def _math_fisher(values, stage="Layer5"):
    return fisher_from({f"{stage}.t{i}.weight": v for i, v in enumerate(values)})


@pytest.mark.parametrize("alpha, k_min, k_max, expected_k, expected", [
    (0.3, 0.1, 2.0, 0.3 * 4 / math.sqrt(10), {0, 1}),   # unclamped: threshold = (1 - alpha) * mean = 2.8
    (0.5, 0.1, 0.3, 0.3, {0, 1, 2}),                    # clamped to k_max: 4 - 0.3*sqrt(10) = 3.05
    (0.1, 1.5, 2.0, 1.5, set()),                        # clamped to k_min: 4 - 1.5*sqrt(10) < 0
])
def test_layer_math_threshold(alpha, k_min, k_max, expected_k, expected):
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    plan, info = layer_math(_math_fisher(values), alpha=alpha, k_min=k_min, k_max=k_max)
    mean, std = statistics.mean(values), statistics.pstdev(values)
    assert info["Layer5"]["mean"] == pytest.approx(mean) and info["Layer5"]["std"] == pytest.approx(std)
    assert info["Layer5"]["k"] == pytest.approx(expected_k)
    assert info["Layer5"]["threshold"] == pytest.approx(mean - expected_k * std)
    assert set(plan) == {f"Layer5.t{i}.weight" for i in expected}


def test_layer_math_constant_stage_quantizes_nothing():
    plan, info = layer_math(_math_fisher([2.0, 2.0, 2.0]), k_max=1.7)
    assert plan == {} and info["Layer5"]["k"] == 1.7 and info["Layer5"]["threshold"] == 2.0


def test_layer_math_is_per_stage(fisher):
    plan, info = layer_math(fisher)
    for stage in ("Layer1", "Layer2", "Layer3", "Layer4"):
        vals = [v for n, v in PER_TENSOR.items() if n.startswith(stage + ".")]
        mean, std = statistics.mean(vals), statistics.pstdev(vals)
        k = min(max(0.5 * mean / std, 0.1), 2.0) if std > 0 else 2.0
        want = {n for n, v in PER_TENSOR.items() if n.startswith(stage + ".") and v < mean - k * std}
        assert {n for n in plan if n.startswith(stage + ".")} == want
        assert info[stage]["k"] == pytest.approx(k)
    # unclamped k gives threshold (1 - alpha) * mean: Layer1 .2625 -> b; Layer2 .175 -> none (c is 0.2);
    # Layer3 1.718 -> e, f; Layer4 alone: std 0, nothing
    assert set(plan) == {"Layer1.b.weight", "Layer3.e.weight", "Layer3.f.weight"}


# ---------------------------------------------------------------- element granularity

def element_fisher():
    g = torch.Generator().manual_seed(0)
    diag = {
        "Layer1.a.weight": torch.rand(4, 5, generator=g),
        "Layer1.b.weight": torch.rand(3, 2, 2, generator=g) * 0.01,   # all tiny: fully quantized
        "Layer2.c.weight": torch.rand(6, generator=g) + 10.0,          # stage 2 alone
        "Layer2.d.weight": torch.rand(2, 3, generator=g) * 12.0,
    }
    return {"diag": diag, "per_tensor": {n: float(d.mean()) for n, d in diag.items()}}


def check_masks(plan, fisher, expected_masks):
    for n, want in expected_masks.items():
        if not want.any():
            assert n not in plan, n
        elif want.all():
            assert plan[n].mask is None, n
        else:
            assert plan[n].mask is not None and plan[n].mask.dtype == torch.bool
            assert plan[n].mask.shape == fisher["diag"][n].shape
            assert torch.equal(plan[n].mask, want), n


def test_element_whole_threshold():
    f = element_fisher()
    top = max(float(d.max()) for d in f["diag"].values())
    thr = 0.3
    plan, info = whole_threshold(f, thr, granularity="element")
    expected = {n: d.double() / top < thr for n, d in f["diag"].items()}
    check_masks(plan, f, expected)
    assert info["normalizer_max"] == pytest.approx(top)
    n_quant = sum(d.numel() if a.mask is None else int(a.mask.sum()) for n, a in plan.items()
                  for d in [f["diag"][n]])
    assert n_quant == sum(int(m.sum()) for m in expected.values())
    assert plan["Layer1.b.weight"].mask is None   # everything below: a whole-tensor assignment
    assert "Layer2.c.weight" not in plan          # nothing below: not in the plan
    assert plan["Layer2.d.weight"].mask is not None and 0 < int(plan["Layer2.d.weight"].mask.sum()) < 6


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_element_layer_ratio_counts(p):
    f = element_fisher()
    plan, info = layer_ratio(f, p, fmt="int8", granularity="element")
    for stage, names in (("Layer1", ["Layer1.a.weight", "Layer1.b.weight"]),
                         ("Layer2", ["Layer2.c.weight", "Layer2.d.weight"])):
        n = sum(f["diag"][x].numel() for x in names)
        keep = math.ceil(p * n)
        assert info[stage] == {"p": p, "kept": keep, "of": n}
        nq = sum((f["diag"][x].numel() if plan[x].mask is None else int(plan[x].mask.sum()))
                 for x in names if x in plan)
        assert nq == n - keep
        # the kept elements are the stage's largest Fisher values
        vals = torch.cat([f["diag"][x].flatten() for x in names])
        flags = torch.cat([(torch.ones(f["diag"][x].numel(), dtype=torch.bool) if x in plan and plan[x].mask is None
                            else plan[x].mask.flatten() if x in plan
                            else torch.zeros(f["diag"][x].numel(), dtype=torch.bool)) for x in names])
        if 0 < keep < n:
            assert vals[~flags].min() >= vals[flags].max()
    assert all(a.format == "int8" for a in plan.values())


def test_element_layer_group_and_math_masks():
    f = element_fisher()
    plan, _ = layer_group(f, {"g": {"layers": [1], "threshold": 0.5}}, granularity="element")
    stage_max = max(float(f["diag"][n].max()) for n in ("Layer1.a.weight", "Layer1.b.weight"))
    check_masks(plan, f, {n: f["diag"][n].double() / stage_max < 0.5 for n in ("Layer1.a.weight", "Layer1.b.weight")})
    assert not any(n.startswith("Layer2") for n in plan)

    plan, info = layer_math(f, granularity="element")
    for stage in ("Layer1", "Layer2"):
        names = [n for n in f["diag"] if n.startswith(stage)]
        v = torch.cat([f["diag"][n].flatten().double() for n in names])
        mean, std = float(v.mean()), float(v.std(unbiased=False))
        k = min(max(0.5 * mean / std, 0.1), 2.0)
        assert info[stage]["k"] == pytest.approx(k)
        check_masks(plan, f, {n: f["diag"][n].double() < mean - k * std for n in names})


def test_describe_plan_counts():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.Layer1 = nn.Linear(3, 2)      # Layer1.weight (6), Layer1.bias (2)
            self.head = nn.Linear(2, 1)        # head.weight (2), head.bias (1)

    model = M()
    fisher = {"per_tensor": {"Layer1.weight": 0.5, "head.weight": 0.1}}
    mask = torch.tensor([[True, False, True], [False, False, False]])
    plan = {"Layer1.weight": Assignment("int4", mask), "head.weight": Assignment("int4")}
    d = describe_plan(plan, model, fisher)
    assert d["per_stage"]["Layer1"] == {"tensors": 2, "tensors_quantized": 1, "elements": 8,
                                        "elements_quantized": 2, "eligible_tensors": 1, "formats": {"int4": 1}}
    assert d["per_stage"]["other"]["elements_quantized"] == 2
    assert d["tensors"]["Layer1.weight"] == {"format": "int4", "numel": 6, "quantized_elements": 2,
                                             "fisher_mean": 0.5}
    assert set(d["tensors"]) == {"Layer1.weight", "head.weight"}
    mixed = describe_plan({"Layer1.weight": Assignment("int8"), "head.weight": Assignment("fp16")}, model, fisher)
    assert mixed["tensors"]["Layer1.weight"]["format"] == "int8" and mixed["tensors"]["head.weight"]["format"] == "fp16"
    assert mixed["per_stage"]["other"]["formats"] == {"fp16": 1}
