"""Empirical Fisher diagonal of the trained (EMA) noise predictor under the DDPM objective.

F_i = E_n (d L_n / d w_i)^2, with L_n = ||eps_n - eps_theta(x_t(x0_n, t_n, eps_n), t_n)||^2
averaged over pixels, one sample n = (real x0, timestep t, noise eps), t uniform over 0..T-1.
Per-sample gradients come from ``torch.func.vmap(grad(...))`` in chunks; the square of a
batch-mean gradient would be a different (biased) quantity.

A few samples at small t dominate the sum, so by default timesteps are *stratified*: equal
counts in each of the ``profile_buckets`` equal-width timestep buckets (fewer buckets when there are
fewer samples), each bucket weighted by its
width (an unbiased estimate of the same expectation, with less spread than i.i.d. uniform t). A
bootstrap over samples (resampled within buckets) gives each tensor's and stage's confidence interval.
"""

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ..core import distributed
from ..core.storage import CheckpointMismatchError, load_for_checkpoint, save_for_checkpoint
from ..diffusion.model import stage_of, unfused_attention
from ..diffusion.schedule import bucket_edges
from ..quant.eligibility import ELIGIBLE_RULES, eligible_names

FisherMismatchError = CheckpointMismatchError



def draw_samples(x_pool: torch.Tensor, n: int, timesteps: int, seed: int, fixed_t=None, strata=None):
    """The (x0, t, eps) triples, drawn once from ``seed`` so loop and vmap see the same ones.

    ``strata``: a number K of equal-width timestep buckets (``bucket_edges``) that get equal counts
    (the first n mod K buckets one more), t uniform inside each; None draws t uniform over 0..T-1.
    """
    if strata and strata > timesteps:  # a bucket would hold no timestep at all
        raise ValueError(f"{strata} timestep buckets for {timesteps} timesteps: at most one bucket per timestep "
                         f"(fisher.profile_buckets <= diffusion.timesteps)")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x_pool), (n,), generator=gen)
    if fixed_t:
        t = torch.tensor(fixed_t, dtype=torch.long).repeat(n // len(fixed_t) + 1)[:n]
    elif strata:
        t = torch.cat([torch.randint(lo, hi + 1, (n // strata + (k < n % strata),), generator=gen)
                       for k, (lo, hi) in enumerate(bucket_edges(timesteps, strata))])
    else:
        t = torch.randint(0, timesteps, (n,), generator=gen)
    eps = torch.randn((n, *x_pool.shape[1:]), generator=gen)
    return x_pool[idx], t, eps


def sample_weights(t: torch.Tensor, timesteps: int, strata) -> torch.Tensor:
    """Per-sample weights w (mean 1) with E_t[.] estimated by mean(w * .): 1 for i.i.d. timesteps;
    for stratified ones, (bucket width / T) / (bucket count / n), which stays exact when K does not divide T."""
    if not strata:
        return torch.ones(len(t), dtype=torch.float64)
    b = (t * strata) // timesteps
    widths = torch.tensor([hi - lo + 1 for lo, hi in bucket_edges(timesteps, strata)], dtype=torch.float64)
    counts = torch.bincount(b, minlength=strata).double()
    return (widths[b] / timesteps) / (counts[b] / len(t))


def _split_params(model, names):
    params = dict(model.named_parameters())
    trainable = {n: params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in params.items() if n not in trainable}
    frozen.update(dict(model.named_buffers()))
    return trainable, frozen


def per_sample_sq_grads(model, schedule, names, x0, t, eps):
    """{name: (B, *shape) squared per-sample gradients} for one chunk, vectorized with torch.func."""
    trainable, frozen = _split_params(model, names)

    def loss_one(p, x0_, t_, eps_):
        x_t = schedule.q_sample(x0_[None], t_[None], eps_[None])
        out = functional_call(model, (p, frozen), (x_t, t_[None]))
        return torch.mean((out - eps_[None]) ** 2)

    # torch has no vmap rule for the fused CPU attention kernel (it would loop per sample): use plain ops.
    with unfused_attention(model):
        grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(trainable, x0, t, eps)
    return {n: g * g for n, g in grads.items()}


def per_sample_sq_grads_loop(model, schedule, names, x0, t, eps):
    """Reference: the same quantity with one autograd backward per sample (slow, for tests/bench)."""
    params = dict(model.named_parameters())
    out = {n: torch.empty((len(x0), *params[n].shape)) for n in names}
    for i in range(len(x0)):
        loss = schedule.p_losses(model, x0[i:i + 1], t[i:i + 1], eps[i:i + 1])
        gs = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, gs, strict=True):
            out[n][i] = g.pow(2)
    return out


def compute_fisher(model, schedule, x_pool, fisher_cfg, rule=None, progress=True, device="cpu"):
    """Return the Fisher artifact dict (without checkpoint hash) for ``model`` in eval mode.

    x_pool: (N, C, H, W) real training images in [-1, 1]. Samples, timesteps and noise are drawn
    from ``fisher_cfg.seed``; timesteps stratified over the profile buckets, uniform, or the
    ``fisher_cfg.timesteps`` list.
    """
    model.eval()
    rule = rule or fisher_cfg.eligible
    names = eligible_names(model, rule)
    T = schedule.timesteps
    K = fisher_cfg.profile_buckets
    strata = None
    if fisher_cfg.timestep_sampling == "stratified" and not fisher_cfg.timesteps:
        strata = min(K, fisher_cfg.n_samples, T)  # fewer samples (or timesteps) than buckets: coarser buckets
    x0, t, eps = draw_samples(x_pool, fisher_cfg.n_samples, T, fisher_cfg.seed, fisher_cfg.timesteps, strata)
    w = sample_weights(t, T, strata)
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n], device="cpu") for n in names}
    sample_sums = torch.zeros(len(x0), len(names), dtype=torch.float64)  # per sample, per tensor sum of g^2
    chunk = fisher_cfg.chunk_size
    starts = list(range(0, len(x0), chunk))
    mine = distributed.shard(starts)  # under torchrun each rank takes every N-th chunk of the same samples
    for s in tqdm(mine, desc="fisher", disable=not progress or not distributed.shows_progress(), unit="chunk"):
        sl = slice(s, s + chunk)
        sq = per_sample_sq_grads(model, schedule, names, x0[sl].to(device), t[sl].to(device),
                                 eps[sl].to(device))
        for j, n in enumerate(names):
            g2 = sq[n].cpu()
            if strata:
                g2 = g2 * w[sl].float().view(-1, *[1] * (g2.dim() - 1))
            total[n] += g2.sum(0)
            sample_sums[sl, j] = g2.flatten(1).sum(1).double()
    if distributed.world_size() > 1:
        for n in names:
            distributed.all_reduce_sum(total[n])
        distributed.all_reduce_sum(sample_sums)  # each row was filled by exactly one rank, zeros elsewhere
    n_total = len(x0)
    diag = {n: total[n] / n_total for n in names}
    numel = torch.tensor([params[n].numel() for n in names], dtype=torch.float64)
    bucket_of = (t * K) // T
    bucket_count = torch.bincount(bucket_of, minlength=K)
    raw = sample_sums / w[:, None]  # unweighted per-sample sums: each bucket's own mean
    edges = bucket_edges(T, K)
    profile = {}
    for k in range(K):
        if bucket_count[k]:
            label = f"t{edges[k][0]:04d}-{edges[k][1]:04d}"
            means = raw[bucket_of == k].sum(0) / (bucket_count[k] * numel)
            profile[label] = {n: float(m) for n, m in zip(names, means, strict=True)}
    ci = bootstrap_ci(sample_sums, names, numel, (t * strata) // T if strata else None, fisher_cfg.bootstrap,
                      fisher_cfg.seed)
    return {
        "diag": diag,
        **summarize(diag),
        **ci,
        "timestep_profile": profile,
        "sample_sums": sample_sums,
        "meta": {
            "n_samples": n_total, "timesteps": t.tolist(), "seed": fisher_cfg.seed,
            "timestep_rule": ("fixed list" if fisher_cfg.timesteps else
                              f"stratified: equal counts in {strata} equal-width buckets of 0..{T - 1}, "
                              f"weighted by bucket width" if strata else f"uniform over 0..{T - 1}"),
            "bucket_counts": bucket_count.tolist(), "eligible_rule": rule,
            "eligible_description": ELIGIBLE_RULES[rule],
            "loss": "per-sample mean over pixels of (eps - eps_theta(x_t, t))^2, EMA weights, eval mode",
            "sample_sums": "per sample (rows, in meta.timesteps order) and tensor (columns, in diag order): "
                           "weighted sum of g^2 over the tensor's elements",
        },
    }


def bootstrap_ci(sample_sums, names, numel, strata_of, n_boot: int, seed: int, level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of each tensor's and stage's mean Fisher.

    Resamples the per-sample sums with replacement (within each timestep stratum when ``strata_of``
    is given, as the estimate was drawn), recomputing the means; returns {} when ``n_boot`` is 0.
    """
    if not n_boot or len(sample_sums) < 2:
        return {}
    n = len(sample_sums)
    gen = torch.Generator().manual_seed(seed + 1)
    groups = [torch.arange(n)] if strata_of is None else [
        torch.nonzero(strata_of == k).flatten() for k in strata_of.unique()]
    counts = torch.zeros(n_boot, n, dtype=torch.float64)
    for g in groups:  # how often each sample appears in each resample
        pick = g[torch.randint(0, len(g), (n_boot, len(g)), generator=gen)]
        counts.scatter_add_(1, pick, torch.ones_like(pick, dtype=torch.float64))
    tensor_sums = counts @ sample_sums / n  # (n_boot, tensors): resampled mean of summed g^2
    stages = [stage_of(nm) or "other" for nm in names]
    order = summarize_order(stages)
    stage_sums = torch.stack([tensor_sums[:, [i for i, s in enumerate(stages) if s == st]].sum(1)
                              for st in order], 1)
    stage_numel = torch.tensor([sum(float(numel[i]) for i, s in enumerate(stages) if s == st) for st in order])
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    t_ci = torch.quantile(tensor_sums / numel, q, dim=0)
    s_ci = torch.quantile(stage_sums / stage_numel, q, dim=0)
    return {
        "per_tensor_ci": {nm: [float(t_ci[0, i]), float(t_ci[1, i])] for i, nm in enumerate(names)},
        "per_layer_ci": {st: [float(s_ci[0, i]), float(s_ci[1, i])] for i, st in enumerate(order)},
        "ci": {"level": level, "resamples": n_boot, "method": "percentile bootstrap over samples" + (
            "" if strata_of is None else ", resampled within timestep strata")},
    }


def summarize_order(stages) -> list:
    """Stages in network order (Layer1..LayerK), 'other' last."""
    return sorted(set(stages), key=lambda s: (s == "other", int(s[5:]) if s != "other" else 0))


def summarize(diag: dict) -> dict:
    """Per tensor mean, per stage mean over its eligible elements and per stage total."""
    per_tensor = {n: float(d.mean()) for n, d in diag.items()}
    sums, counts = {}, {}
    for n, d in diag.items():
        stage = stage_of(n) or "other"
        sums[stage] = sums.get(stage, 0.0) + float(d.double().sum())
        counts[stage] = counts.get(stage, 0) + d.numel()
    order = summarize_order(sums)
    return {
        "per_tensor": per_tensor,
        "per_layer": {s: sums[s] / counts[s] for s in order},
        "per_layer_total": {s: sums[s] for s in order},
        "per_layer_numel": {s: counts[s] for s in order},
    }


def save_fisher(artifact: dict, path: str, ckpt_path: str):
    save_for_checkpoint(artifact, path, ckpt_path)


def load_fisher(path: str, ckpt_path: str, hint="run `python simplediffusion.py --config ...` "
                                                "(--recompute-fisher to replace a stale or corrupt one)") -> dict:
    """Load ``fisher.pt`` and check it was computed for the checkpoint at ``ckpt_path``; ``hint``: the
    command that recomputes it, for the error message."""
    return load_for_checkpoint(path, ckpt_path, hint)
