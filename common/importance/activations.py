"""How much the DDPM loss is expected to grow when a module's input is quantized: the activation side of
the W/A allocator.

For module m with input a_n (sample n) and a candidate quantizer Q_b (b bits, the ranges of n's timestep
group), the second-order estimate with the empirical Fisher as curvature -- the same estimate
``common.importance.weights`` makes for weights, 1/2 sum_i F_i dW_i^2 -- is

    fisher[m][b] = 1/2 * E_n[ sum_j g_{n,j}^2 * (a_{n,j} - Q_b(a_{n,j}))^2 ],     g_n = dL_n / da_n,

with L_n the per-sample plain DDPM loss mean((eps - eps_theta(x_t, t))^2) against the true noise and
(x0, t, eps) drawn like ``common.importance.fisher``'s samples (real images, t uniform over the chain). Kept per
timestep group too (``profile``). The controls need E_n[sum_j (a - Q_b(a))^2] (``mse``) and E_n[mean_j |a|]
(``abs_mean``), measured in the same pass.

Samples of a batch never interact in the U-Net (GroupNorm and attention work within a sample), so the
gradient of sum_n L_n with respect to a batch of inputs holds each sample's own g_n: one backward per chunk
gives exact per-sample gradients without vmap. Each module sees its input through its own alias
(``view_as``), so g is the gradient through that module alone even where two modules share an input.
"""
import time

import torch
from tqdm.auto import tqdm

from ..diffusion.schedule import bucket_edges
from ..quant.activations import channel_dim, group_of
from ..quant.hooks import input_hooks
from .fisher import draw_samples


def activation_importance(model, schedule, x_pool, candidates: dict, groups: int, n_samples: int, chunk: int,
                          seed: int, device="cpu", progress=True) -> dict:
    """Activation sensitivities of ``model`` (eval mode, called as model(x_t, t)).

    candidates: {module name: {bits: LayerQuant}} (the quantizers each module may get);
    x_pool: (N, C, H, W) real images in [-1, 1]. Returns {"fisher", "mse": {name: {bits: float}},
    "abs_mean": {name: float}, "profile": {group label: {name: {bits: fisher}}}, "meta"}.
    """
    t0 = time.time()
    model.eval()
    T = schedule.timesteps
    x0, t, eps = draw_samples(x_pool, n_samples, T, seed)
    names = list(candidates)
    fis = {n: {b: torch.zeros(groups, dtype=torch.float64) for b in candidates[n]} for n in names}
    mse = {n: {b: torch.zeros(groups, dtype=torch.float64) for b in candidates[n]} for n in names}
    abs_sum = {n: 0.0 for n in names}
    count = torch.zeros(groups, dtype=torch.float64)
    state = {}

    def per_sample_into_groups(acc, values):
        acc.index_add_(0, state["g"].cpu(), values.detach().double().cpu())

    mods = dict(model.named_modules())

    def pre_hook(name, args):
        a = args[0]
        # gradients reaching this node flow through this module only; an input computed from constants
        # alone (the time MLP's sinusoidal rows) becomes a leaf that collects its own gradient
        alias = a.view_as(a) if a.requires_grad else a.detach().requires_grad_(True)
        a = a.detach()
        g_idx, dim = state["g"], channel_dim(a, mods[name])
        abs_sum[name] += float(a.abs().flatten(1).mean(1).sum())

        def on_grad(grad):  # the errors are computed here, so only ``a`` (which autograd keeps anyway) waits
            g2 = grad.detach().pow(2)
            for b, lq in candidates[name].items():
                d2 = (a - lq.apply(a, g_idx, dim)).pow(2)
                per_sample_into_groups(fis[name][b], (g2 * d2).flatten(1).sum(1))
                per_sample_into_groups(mse[name][b], d2.flatten(1).sum(1))

        alias.register_hook(on_grad)
        return (alias, *args[1:])

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # gradients w.r.t. activations only
        p.requires_grad_(False)
    try:
        with input_hooks(model, names, pre_hook):
            for s in tqdm(range(0, n_samples, chunk), desc="activation fisher", disable=not progress, unit="chunk"):
                sl = slice(s, s + chunk)
                tc = t[sl].to(device)
                state["g"] = group_of(tc, groups, T).to(device)
                with torch.enable_grad():
                    x_t = schedule.q_sample(x0[sl].to(device), tc, eps[sl].to(device)).requires_grad_(True)
                    per_sample = (model(x_t, tc) - eps[sl].to(device)).pow(2).flatten(1).mean(1)
                    per_sample.sum().backward()
                count.index_add_(0, state["g"].cpu(), torch.ones(len(tc), dtype=torch.float64))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    edges = bucket_edges(T, groups)
    profile = {f"t{edges[g][0]:04d}-{edges[g][1]:04d}": {n: {b: 0.5 * float(fis[n][b][g] / count[g])
                                                             for b in fis[n]} for n in names}
               for g in range(groups) if count[g]}
    return {
        "fisher": {n: {b: 0.5 * float(v.sum()) / n_samples for b, v in fis[n].items()} for n in names},
        "mse": {n: {b: float(v.sum()) / n_samples for b, v in mse[n].items()} for n in names},
        "abs_mean": {n: abs_sum[n] / n_samples for n in names},
        "profile": profile,
        "meta": {"n_samples": n_samples, "seed": seed, "groups": groups, "group_counts": count.long().tolist(),
                 "seconds": round(time.time() - t0, 2),
                 "loss": "per-sample mean over pixels of (eps - eps_theta(x_t, t))^2, plain DDPM objective"},
    }
