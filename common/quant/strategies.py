"""The poster's threshold rules, turning a Fisher artifact into a quantization plan.

Every function takes the Fisher artifact (``diag`` and ``per_tensor`` over the eligible
tensors) and returns ``(plan, thresholds)``: ``plan`` maps each tensor to quantize to an
``Assignment`` (whole tensor for granularity 'tensor', an element mask for 'element'), and
``thresholds`` records the cut-offs used, for ``plan.json``. Fisher values are compared as
stored; "normalized" means divided by the maximum of the set it is compared within.
"""
import math

import torch

from ..diffusion.model import stage_of
from .formats import Assignment


def _stages(names):
    out = {}
    for n in names:
        out.setdefault(stage_of(n) or "other", []).append(n)
    return out


def _stage_values(fisher, names, granularity):
    if granularity == "tensor":
        return torch.tensor([fisher["per_tensor"][n] for n in names], dtype=torch.float64)
    return torch.cat([fisher["diag"][n].flatten().double() for n in names])


def _assign(fisher, names, quantize_flags, fmt, granularity):
    """Turn per-tensor (tensor) or concatenated per-element (element) flags into a plan."""
    plan = {}
    if granularity == "tensor":
        for n, q in zip(names, quantize_flags.tolist(), strict=True):
            if q:
                plan[n] = Assignment(fmt)
        return plan
    offset = 0
    for n in names:
        d = fisher["diag"][n]
        m = quantize_flags[offset: offset + d.numel()].reshape(d.shape)
        offset += d.numel()
        if m.all():
            plan[n] = Assignment(fmt)
        elif m.any():
            plan[n] = Assignment(fmt, m.clone())
    return plan


def fp32(fisher, fmt="fp16", granularity="tensor"):
    """The unquantized baseline: an empty plan."""
    return {}, {}


def uniform(fisher, fmt="fp16", granularity="tensor"):
    """Every eligible tensor in ``fmt``: the poster's uniform reference."""
    return {n: Assignment(fmt) for n in fisher["per_tensor"]}, {}


def whole_threshold(fisher, threshold, fmt="fp16", granularity="tensor"):
    """One global cut: quantize where Fisher / max(Fisher over all eligible) < threshold."""
    names = list(fisher["per_tensor"])
    v = _stage_values(fisher, names, granularity)
    top = v.max()
    norm = v / top if top > 0 else torch.zeros_like(v)
    return _assign(fisher, names, norm < threshold, fmt, granularity), {
        "normalizer_max": float(top), "threshold": threshold}


def layer_group(fisher, groups: dict, fmt="fp16", granularity="tensor"):
    """Per group of stages: quantize where Fisher / max(Fisher within the group) < its threshold.

    ``groups``: {"Layer1-2": {"layers": [1, 2], "threshold": t}, ...}; stages in no group stay fp32.
    """
    by_stage = _stages(fisher["per_tensor"])
    plan, info = {}, {}
    for gname, g in groups.items():
        names = [n for k in g["layers"] for n in by_stage.get(f"Layer{k}", [])]
        if not names:
            continue
        v = _stage_values(fisher, names, granularity)
        top = v.max()
        norm = v / top if top > 0 else torch.zeros_like(v)
        plan.update(_assign(fisher, names, norm < g["threshold"], fmt, granularity))
        info[gname] = {"layers": g["layers"], "threshold": g["threshold"], "normalizer_max": float(top)}
    return plan, info


def layer_ratio(fisher, p: float, fmt="fp16", granularity="tensor"):
    """Per stage: keep the top ceil(p*n) tensors (or elements) by Fisher in fp32, quantize the rest."""
    plan, info = {}, {}
    for stage, names in _stages(fisher["per_tensor"]).items():
        v = _stage_values(fisher, names, granularity)
        keep = math.ceil(p * len(v) - 1e-9)
        order = torch.argsort(v, descending=True, stable=True)
        flags = torch.ones(len(v), dtype=torch.bool)
        flags[order[:keep]] = False
        plan.update(_assign(fisher, names, flags, fmt, granularity))
        info[stage] = {"p": p, "kept": keep, "of": len(v)}
    return plan, info


def layer_math(fisher, alpha=0.5, k_min=0.1, k_max=2.0, fmt="fp16", granularity="tensor"):
    """Per stage: quantize where Fisher < mean - k*std, k = clamp(alpha*mean/std, k_min, k_max)."""
    plan, info = {}, {}
    for stage, names in _stages(fisher["per_tensor"]).items():
        v = _stage_values(fisher, names, granularity)
        mean, std = v.mean(), v.std(unbiased=False)
        k = min(max(alpha * float(mean / std), k_min), k_max) if std > 0 else k_max
        thr = float(mean) - k * float(std)
        plan.update(_assign(fisher, names, v < thr, fmt, granularity))
        info[stage] = {"mean": float(mean), "std": float(std), "k": k, "threshold": thr}
    return plan, info


def describe_plan(plan: dict, model, fisher) -> dict:
    """Per stage and per tensor: how many tensors/elements go to which format (for plan.json)."""
    per_stage, tensors = {}, {}
    params = dict(model.named_parameters())
    for n, p in params.items():
        stage = stage_of(n) or "other"
        a = plan.get(n)
        nq = 0 if a is None else (p.numel() if a.mask is None else int(a.mask.sum()))
        s = per_stage.setdefault(stage, {"tensors": 0, "tensors_quantized": 0, "elements": 0,
                                         "elements_quantized": 0, "eligible_tensors": 0, "formats": {}})
        s["tensors"] += 1
        s["elements"] += p.numel()
        s["tensors_quantized"] += int(nq > 0)
        s["elements_quantized"] += nq
        s["eligible_tensors"] += int(n in fisher["per_tensor"])
        if nq:
            s["formats"][a.format] = s["formats"].get(a.format, 0) + 1
        if n in fisher["per_tensor"]:
            tensors[n] = {"format": a.format if nq else "fp32", "numel": p.numel(), "quantized_elements": nq,
                          "fisher_mean": fisher["per_tensor"][n]}
    return {"per_stage": per_stage, "tensors": tensors}
