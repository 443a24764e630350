"""Empirical Fisher diagonal of the trained (EMA) noise predictor under the DDPM objective.

F_i = (1/N) sum_n (d L_n / d w_i)^2, with L_n = ||eps_n - eps_theta(x_t(x0_n, t_n, eps_n), t_n)||^2
averaged over pixels, one sample n = (real x0, timestep t, noise eps). Per-sample gradients come
from ``torch.func.vmap(grad(...))`` in chunks; the square of a batch-mean gradient would be a
different (biased) quantity.
"""

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from .model import stage_of, unfused_attention
from .storage import CheckpointMismatchError, load_for_checkpoint, save_for_checkpoint

ELIGIBLE_RULES = {
    "poster": "weights of Conv2d/ConvTranspose2d/Linear modules inside Layer1..Layer6",
    "all_weights": "weights of every Conv2d/ConvTranspose2d/Linear module",
    "all": "every parameter (weights, biases, GroupNorm affine)",
}
_WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


FisherMismatchError = CheckpointMismatchError


def eligible_names(model: nn.Module, rule: str = "poster") -> list:
    """Names of the parameters that importance covers (and that strategies may quantize)."""
    if rule == "all":
        return [n for n, _ in model.named_parameters()]
    names = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, _WEIGHTED) and (rule == "all_weights" or stage_of(mod_name)):
            names.append(f"{mod_name}.weight")
    if rule not in ELIGIBLE_RULES:
        raise ValueError(f"eligible rule must be one of {sorted(ELIGIBLE_RULES)}, got {rule!r}")
    return names


def draw_samples(x_pool: torch.Tensor, n: int, timesteps: int, seed: int, fixed_t=None):
    """The (x0, t, eps) triples, drawn once from ``seed`` so loop and vmap see the same ones."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x_pool), (n,), generator=gen)
    if fixed_t:
        t = torch.tensor(fixed_t, dtype=torch.long).repeat(n // len(fixed_t) + 1)[:n]
    else:
        t = torch.randint(0, timesteps, (n,), generator=gen)
    eps = torch.randn((n, *x_pool.shape[1:]), generator=gen)
    return x_pool[idx], t, eps


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
        for n, g in zip(names, gs):
            out[n][i] = g.pow(2)
    return out


def bucket_edges(T: int, K: int) -> list:
    """[(first t, last t)] of the K timestep buckets b = t*K // T (ceil edges: exact when K does not divide T)."""
    return [(-(-k * T // K), -(-(k + 1) * T // K) - 1) for k in range(K)]


def compute_fisher(model, schedule, x_pool, fisher_cfg, rule=None, progress=True, device="cpu"):
    """Return the Fisher artifact dict (without checkpoint hash) for ``model`` in eval mode.

    x_pool: (N, C, H, W) real training images in [-1, 1]. Samples, timesteps and noise are drawn
    from ``fisher_cfg.seed``; timesteps uniform over 0..T-1 unless ``fisher_cfg.timesteps`` lists them.
    """
    model.eval()
    rule = rule or fisher_cfg.eligible
    names = eligible_names(model, rule)
    T = schedule.timesteps
    x0, t, eps = draw_samples(x_pool, fisher_cfg.n_samples, T, fisher_cfg.seed, fisher_cfg.timesteps)
    K = fisher_cfg.profile_buckets
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n], device="cpu") for n in names}
    bucket_sum = torch.zeros(K, len(names), dtype=torch.float64)  # per bucket, per tensor sum of g^2
    bucket_count = torch.zeros(K, dtype=torch.long)
    bucket_of = (t * K) // T  # bucket_edges gives each bucket's first and last t
    chunk = fisher_cfg.chunk_size
    for s in tqdm(range(0, len(x0), chunk), desc="fisher", disable=not progress, unit="chunk"):
        sl = slice(s, s + chunk)
        sq = per_sample_sq_grads(model, schedule, names, x0[sl].to(device), t[sl].to(device),
                                 eps[sl].to(device))
        b = bucket_of[sl]
        for j, n in enumerate(names):
            g2 = sq[n].cpu()
            total[n] += g2.sum(0)
            bucket_sum[:, j].index_add_(0, b, g2.flatten(1).sum(1).double())
        bucket_count += torch.bincount(b, minlength=K)
    n_total = len(x0)
    diag = {n: total[n] / n_total for n in names}
    numel = torch.tensor([params[n].numel() for n in names], dtype=torch.float64)
    edges = bucket_edges(T, K)
    profile = {}
    for k in range(K):
        if bucket_count[k]:
            label = f"t{edges[k][0]:04d}-{edges[k][1]:04d}"
            means = bucket_sum[k] / (bucket_count[k] * numel)
            profile[label] = {n: float(m) for n, m in zip(names, means)}
    return {
        "diag": diag,
        **summarize(diag),
        "timestep_profile": profile,
        "meta": {
            "n_samples": n_total, "timesteps": t.tolist(), "seed": fisher_cfg.seed,
            "timestep_rule": "fixed list" if fisher_cfg.timesteps else f"uniform over 0..{T - 1}",
            "bucket_counts": bucket_count.tolist(), "eligible_rule": rule,
            "eligible_description": ELIGIBLE_RULES[rule],
            "loss": "per-sample mean over pixels of (eps - eps_theta(x_t, t))^2, EMA weights, eval mode",
        },
    }


def summarize(diag: dict) -> dict:
    """Per tensor mean, per stage mean over its eligible elements and per stage total."""
    per_tensor = {n: float(d.mean()) for n, d in diag.items()}
    sums, counts = {}, {}
    for n, d in diag.items():
        stage = stage_of(n) or "other"
        sums[stage] = sums.get(stage, 0.0) + float(d.double().sum())
        counts[stage] = counts.get(stage, 0) + d.numel()
    order = sorted(sums, key=lambda s: (s == "other", int(s[5:]) if s != "other" else 0))
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
