"""Iterative Fisher: allocate, quantize, measure the Fisher again where the model now is, allocate again.

The additive estimate 1/2 sum F dW^2 takes the curvature at the fp32 weights, as if every other tensor stayed
fp32. After a first allocation most tensors are not; the Fisher of the partially quantized model (gradients at
the de-quantized weights, the same (x0, t, eps) samples) weighs each tensor's error where the others' errors
already are. Each round re-allocates with that curvature (the weight errors themselves stay W - Q_f(W), relative
to the fp32 weights) until the plan stops changing or ``rounds`` are done; the history records how many tensors
changed format per round and the objective.
"""
import copy
import time

import torch

from ..quant.allocate import allocate
from .fisher import compute_fisher
from .weights import fisher_distortion_costs


def iterative_fisher(model, schedule, x_pool, fisher_cfg, rule, errors, entries, bits, fixed_bits, budget_bits,
                     first_diag, rounds=3, progress=True, device="cpu"):
    """(final {tensor: format}, final Fisher diagonal, history).

    errors: {tensor: {format: W - Q_f(W)}}; entries: {tensor: {format: de-quantized weight}}; bits / fixed_bits /
    budget_bits as ``allocate.allocate`` takes them; first_diag: the fp32 model's Fisher diagonal (round 0).
    """
    def costs(d):  # fisher_distortion_costs adds fp32 (free); the menu is what ``bits`` offers
        c = fisher_distortion_costs(d, errors)
        return {n: {f: c[n][f] for f in bits[n]} for n in bits}

    diag = first_diag
    choice, info = allocate(costs(diag), bits, fixed_bits, budget_bits)
    history = [{"round": 0, "changed": None, "objective": info["objective"], "seconds": 0.0}]
    work = copy.deepcopy(model).eval()
    params = dict(work.named_parameters())
    for r in range(1, rounds + 1):
        t0 = time.time()
        with torch.no_grad():
            for n, f in choice.items():
                params[n].copy_(entries[n][f])
        diag = compute_fisher(work, schedule, x_pool, fisher_cfg, rule=rule, progress=progress, device=device)["diag"]
        new, info = allocate(costs(diag), bits, fixed_bits, budget_bits)
        changed = sum(new[n] != choice[n] for n in choice)
        history.append({"round": r, "changed": changed, "objective": info["objective"],
                        "seconds": round(time.time() - t0, 1)})
        choice = new
        if changed == 0:
            break
    return choice, diag, history
