"""Chain-aware Fisher: how much each weight moves the *final sample* through the sampler, not one denoising step.

The Fisher of ``fisher.py`` is the curvature of one step's noise-prediction loss. Sampling applies the network
``steps`` times, and an error at one step is carried (amplified or damped) to x_0 by the rest of the chain. For
the sampler's map x_0 = S_theta(x_T, z) (initial noise x_T, per-step noise z, both fixed), the Gauss-Newton
curvature of E||x_0(theta + d) - x_0(theta)||^2 is J^T J, J = dx_0/dtheta. Its diagonal is estimated with
random projections (Hutchinson): diag(J^T J) = E_v[(J^T v)^2] for v with independent unit-variance entries
(Rademacher). P projections of B chains cost one batched forward through the chain and P backward passes: for
independent v_i per chain, E[(sum_i J_i^T v_i)^2] = sum_i diag(J_i^T J_i), so each pass estimates the B chains'
sum without bias. With diag_w per weight,

    cost[n][f] = 1/2 * sum_w diag_w (w - Q_f(w))^2 / (B * D)       (D = pixels per image)

is the quadratic estimate of the paired MSE per pixel that storing tensor n in format f adds to the final samples
(up to the 1/2 the weight Fisher carries too), summed over tensors like ``fisher_distortion``. The same backward
passes give, through a hook on every step's noise prediction, E||d(v^T x_0)/d eps_s||^2: how strongly an error in
step s's output reaches x_0 (``per_step``).

Error bars. The estimate has two sources of noise: the projections (Hutchinson) and the chains themselves (B
draws of the starting noise; the sensitivity of another B chains differs). So the chains are split into G =
min(B, P) groups and projection p draws v only on group p mod G (zero elsewhere): each group's mean over its own
projections is an unbiased estimate of that group's sum, their sum of the B chains' (the same cost: P backward
passes). G x (group g's estimate) are G independent estimates of the total, and their standard error over the
groups (``rel_sem``) holds both noises; with one group (B = 1) only the projections' is left.

Seeds: x_T and the per-step noise come from ``batch_generator(seed, 0)``, the same source sampling uses. Callers
give a seed of its own (``lowbit.chain_seed``), never one the damage it is judged against is measured with:
otherwise the chains would be the first B of those images.
"""
import time

import torch
from tqdm.auto import tqdm

from ..diffusion.samplers import batch_generator


def chain_fisher(model, sampler, names, shape, n_chains=16, n_projections=32, seed=0, device="cpu",
                 progress=True) -> dict:
    """The chain-aware Fisher artifact of ``model`` for the parameters ``names``.

    shape: one image's (C, H, W). Returns {"diag": {name: (shape) float32, per chain and pixel},
    "rel_sem": {name: relative standard error of the tensor's summed diagonal}, "per_step": {t: share of
    E||d(v^T x_0)/d eps_t||^2}, "meta": {...}}.
    """
    t0 = time.time()
    model.eval()
    params = dict(model.named_parameters())
    old_flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    gen = batch_generator(seed, 0)
    per_step = {t: 0.0 for t in sampler.timesteps}
    try:
        x = torch.randn((n_chains, *shape), generator=gen).to(device)
        t_batch = torch.empty(n_chains, dtype=torch.long, device=device)
        for t in tqdm(sampler.timesteps, desc="chain forward", disable=not progress, leave=False):
            eps = model(x, t_batch.fill_(t))
            eps.register_hook(lambda g, t=t: per_step.__setitem__(t, per_step[t] + float(g.double().pow(2).sum())))
            noise = torch.randn((n_chains, *shape), generator=gen).to(device) if sampler.stochastic else None
            x = sampler.step(eps, t, x, noise)
        targets = [params[n] for n in names]
        groups = min(n_chains, n_projections)
        group = torch.arange(n_chains, device=device) % groups  # chain i belongs to group i mod G
        count = torch.bincount(torch.arange(n_projections) % groups, minlength=groups).double()
        sq = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
        sums = torch.zeros(n_projections, len(names), dtype=torch.float64)  # per projection, before weighting
        vgen = torch.Generator().manual_seed(seed + 1)
        for p in tqdm(range(n_projections), desc="chain backward", disable=not progress, leave=False):
            v = (torch.randint(0, 2, x.shape, generator=vgen) * 2 - 1).to(device=device, dtype=x.dtype)
            v[group != p % groups] = 0  # this projection sees its group of chains only
            grads = torch.autograd.grad((x * v).sum(), targets, retain_graph=p < n_projections - 1)
            for k, (n, g) in enumerate(zip(names, grads, strict=True)):
                g2 = g.detach().double().pow(2)
                sq[n] += g2 / count[p % groups]  # group means, summed over the groups: the B chains' sum
                sums[p, k] = g2.sum()
    finally:
        for n, p in params.items():
            p.requires_grad_(old_flags[n])
    scale = n_chains * float(torch.tensor(shape).prod())
    rel_sem = _rel_sem(sums, groups, count, torch.bincount(torch.arange(n_chains) % groups, minlength=groups))
    total = sum(per_step.values()) or 1.0
    return {"diag": {n: (sq[n] / scale).float().cpu() for n in names},
            "rel_sem": {n: rel_sem[k] for k, n in enumerate(names)},
            "per_step": {int(t): v / total for t, v in per_step.items()},
            "meta": {"chains": n_chains, "projections": n_projections, "groups": groups, "seed": seed,
                     "steps": len(sampler.timesteps),
                     "estimator": "Hutchinson diag(J^T J), J = dx_0/dtheta through the sampler, Rademacher v on one "
                                  "group of chains per projection",
                     "error": "standard error over chain groups (chains and projections)" if groups > 1 else
                              "standard error over projections (one chain: no spread over chains)",
                     "seconds": round(time.time() - t0, 1)}}


def _rel_sem(sums, groups, count, chains) -> list:
    """Relative standard error of every tensor's summed diagonal. sums: (P, K) per projection and tensor;
    count / chains: (G,) projections / chains of each group.

    G > 1: (B / B_g) x (group g's mean) estimates the total independently for each g (B_g of the B chains are in
    group g: B / G each when G divides B), so their spread over the groups is the estimate's error with the
    chains' own variation in it. G = 1: the spread over the projections."""
    P = sums.shape[0]
    if groups > 1:
        per_group = torch.stack([sums[torch.arange(P) % groups == g].sum(0) / count[g] for g in range(groups)])
        chains = torch.as_tensor(chains, dtype=torch.float64)
        est = per_group * (chains.sum() / chains)[:, None]  # (G, K)
        mean, sem = est.mean(0), est.std(0, unbiased=True) / groups ** 0.5
    elif P > 1:
        mean, sem = sums.mean(0), sums.std(0, unbiased=True) / P ** 0.5
    else:
        return [float("nan")] * sums.shape[1]
    return [float(s / m) if m > 0 else float("nan") for s, m in zip(sem, mean, strict=True)]
