"""common.importance.weights: the distortion formula by hand, CKA properties, every metric's determinism."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from common.diffusion.schedule import NoiseSchedule
from common.importance.weights import (
    METRICS,
    compute_importance,
    costs_from_scores,
    fisher_distortion_costs,
    linear_cka_matrix,
    orthogonality_from_features,
    quantization_errors,
)


class OneLinear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.Layer1 = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.Layer1.weight.copy_(w)


def test_fisher_distortion_on_a_hand_made_tensor():
    w = torch.tensor([[0.5, -0.2, 0.1], [1.0, 0.3, -0.7]])
    F = torch.tensor([[2.0, 10.0, 0.0], [1.0, 4.0, 3.0]])
    errors = quantization_errors(OneLinear(w), ["Layer1.weight"])
    cost = fisher_distortion_costs({"Layer1.weight": F}, errors)["Layer1.weight"]
    # int8, per output row: scale = max|w| / 127, q = round(w / scale) (no ties here)
    expected = 0.0
    for row_w, row_f in zip(w.tolist(), F.tolist(), strict=True):
        s = max(abs(v) for v in row_w) / 127
        expected += sum(f * (v - round(v / s) * s) ** 2 for v, f in zip(row_w, row_f, strict=True))
    assert cost["int8"] == pytest.approx(0.5 * expected, rel=1e-5)
    # int4: codes clamp to [-7, 7]
    expected4 = 0.0
    for row_w, row_f in zip(w.tolist(), F.tolist(), strict=True):
        s = max(abs(v) for v in row_w) / 7
        expected4 += sum(f * (v - max(-7, min(7, round(v / s))) * s) ** 2 for v, f in zip(row_w, row_f, strict=True))
    assert cost["int4"] == pytest.approx(0.5 * expected4, rel=1e-5)
    fp16 = (w - w.half().float()).double()
    assert cost["fp16"] == pytest.approx(0.5 * float((F.double() * fp16 ** 2).sum()), rel=1e-9)
    assert cost["fp32"] == 0.0
    assert cost["int4"] > cost["int8"] > cost["fp16"] > 0


def test_scores_become_costs_through_the_same_error():
    w = torch.tensor([[0.5, -0.2, 0.1], [1.0, 0.3, -0.7]])
    errors = quantization_errors(OneLinear(w), ["Layer1.weight"])
    cost = costs_from_scores({"Layer1.weight": 3.0}, errors)["Layer1.weight"]
    for f in ("fp16", "bf16", "int8", "int4"):
        assert cost[f] == pytest.approx(0.5 * 3.0 * float(errors["Layer1.weight"][f].double().pow(2).sum()))
    # a constant Fisher makes the element-resolved and the tensor-level estimates agree
    flat = fisher_distortion_costs({"Layer1.weight": torch.full_like(w, 3.0)}, errors)["Layer1.weight"]
    assert flat == pytest.approx(cost)


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 12, generator=g, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    unrelated = torch.randn(40, 30, generator=g, dtype=torch.float64)
    m = linear_cka_matrix([x, 5 * x @ rot + 3, unrelated])
    assert torch.allclose(m.diagonal(), torch.ones(3, dtype=torch.float64))
    assert m[0, 1] == pytest.approx(1.0)  # invariant to rotation, isotropic scaling and offsets
    assert torch.allclose(m, m.T)
    assert 0 < m[0, 2] < 0.7


def test_the_layer_unlike_the_others_is_the_most_important():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 20, generator=g)
    similar = [x, 2 * x + 0.01 * torch.randn(50, 20, generator=g), x @ torch.randn(20, 30, generator=g)]
    unique = torch.randn(50, 25, generator=g)
    s = orthogonality_from_features(similar + [unique], beta=5.0)
    assert int(s.argmax()) == 3 and bool((s[:3] < s[3]).all())
    assert torch.allclose(orthogonality_from_features(similar + [unique], beta=0.0), torch.ones(4, dtype=s.dtype))


@pytest.fixture(scope="module")
def tiny(tiny_model_fisher):
    cfg, model, fisher = tiny_model_fisher
    pool = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return cfg, model, fisher, NoiseSchedule.from_config(cfg.diffusion), pool


def imp_cfg(seed=0):
    return SimpleNamespace(seed=seed, orthogonality=SimpleNamespace(n_samples=6, buckets=2, beta=5.0))


@pytest.mark.parametrize("metric", list(METRICS))
def test_every_metric_is_deterministic_under_its_seed(tiny, metric):
    _, model, fisher, schedule, pool = tiny
    a = compute_importance(metric, model, fisher, imp_cfg(), schedule, pool)
    b = compute_importance(metric, model, fisher, imp_cfg(), schedule, pool)
    assert a["score"] == b["score"] and a["cost"] == b["cost"]
    assert set(a["cost"]) == set(fisher["per_tensor"])
    for c in a["cost"].values():
        assert c["fp32"] == 0.0 and all(v >= 0 for v in c.values())
    if metric == "quant_error":
        assert set(a["score"].values()) == {1.0}
    if metric in ("random", "orthogonality"):  # the seed is what decides them
        other = compute_importance(metric, model, fisher, imp_cfg(seed=1), schedule, pool)
        assert other["score"] != a["score"]


def test_orthogonality_profile_and_range(tiny):
    _, model, fisher, schedule, pool = tiny
    art = compute_importance("orthogonality", model, fisher, imp_cfg(), schedule, pool)
    assert list(art["timestep_profile"]) == ["t0000-0049", "t0050-0099"]
    for n, s in art["score"].items():
        assert 0 < s <= 1  # exp(-beta * mean CKA), CKA in [0, 1]
        per_bucket = [art["timestep_profile"][b][n] for b in art["timestep_profile"]]
        assert s == pytest.approx(sum(per_bucket) / len(per_bucket))


def test_unknown_metric(tiny):
    _, model, fisher, _, _ = tiny
    with pytest.raises(ValueError, match="orthogonality"):
        compute_importance("hessian", model, fisher, imp_cfg())
