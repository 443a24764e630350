"""Importance metrics behind one interface, each turned into an estimated loss increase per format.

Every metric gives each eligible tensor n a per-weight sensitivity s_n (higher = more important).
The allocator needs the loss increase of storing n in format f, estimated the same way for every
metric as sensitivity times the squared error that format really causes in that tensor:

    cost[n][f] = 1/2 * s_n * ||W_n - Q_f(W_n)||^2            (cost[n]["fp32"] = 0)

With s_n = the tensor's mean Fisher this is the diagonal-Fisher second-order estimate of the loss
increase at tensor resolution (as HAWQ-v2 weighs an average Hessian trace by ||dW||^2);
``fisher_distortion`` resolves it per element, 1/2 * sum_i F_i (w_i - Q_f(w_i))^2, so the
sensitivity meets the error exactly where the format puts it.

``orthogonality`` follows MPQ-Diff (Maruzzelli, Lewandowski, Chen, arXiv:2412.00144), which
builds on OMPQ (Ma et al., AAAI 2023): a layer whose outputs are less correlated with the other
layers' outputs carries more unique information and is more important. Our reading of the
abstract-level description, with the choices it left open:
  * layer output = the output of the module that owns the tensor, flattened per sample (tensors of one
    module, e.g. a weight and its bias, share its score);
  * correlation = OMPQ's ORM, linear CKA of centred Gram matrices over the calibration samples;
  * per timestep bucket k: gamma_n(k) = mean_{m != n} ORM(n, m), s_n(k) = exp(-beta * gamma_n(k))
    (OMPQ's exponential mapping; a mean rather than a sum so beta does not depend on the layer count);
  * timesteps drawn uniformly inside each of K equal buckets ("uniform sampling"), and s_n the
    mean of s_n(k) over buckets. The per-bucket values are kept in ``timestep_profile``.
MPQ-Diff feeds the score to a linear program over bit-widths; here it goes through the same
allocator as every other metric, which is the point of the comparison.
"""
import time

import torch

from ..core.storage import fingerprint, load_for_checkpoint
from ..quant.formats import FORMATS, channel_axes, dequantize_tensor, quantize_tensor
from ..quant.hooks import output_hooks

METRICS = {
    "fisher": "mean empirical Fisher of the tensor (the poster's signal)",
    "fisher_distortion": "1/2 sum_i F_i (w_i - Q_f(w_i))^2 per tensor and format (element-resolved Fisher)",
    "magnitude": "mean |w| of the tensor (control)",
    "random": "U(0, 1) per tensor from importance.seed (control)",
    "quant_error": "1 for every tensor: minimise the summed squared weight error alone (control)",
    "orthogonality": "MPQ-Diff / OMPQ: exp(-beta * mean linear CKA with the other layers' outputs), "
                     "averaged over timestep buckets",
}
NEEDS_FISHER = ("fisher", "fisher_distortion")


def quantization_errors(model, names) -> dict:
    """{name: {format: w - Q_f(w)}} for every quantized format (fp32 error is zero)."""
    params, axes = dict(model.named_parameters()), channel_axes(model)
    out = {}
    for n in names:
        w = params[n].detach().float().cpu()
        out[n] = {f: w - dequantize_tensor(quantize_tensor(w, f, axes[n])) for f in FORMATS}
    return out


def costs_from_scores(scores: dict, errors: dict) -> dict:
    """cost[n][f] = 1/2 * s_n * ||dW_f||^2, with fp32 free."""
    return {n: {"fp32": 0.0, **{f: 0.5 * scores[n] * float(e.double().pow(2).sum()) for f, e in errs.items()}}
            for n, errs in errors.items()}


def fisher_distortion_costs(diag: dict, errors: dict) -> dict:
    """cost[n][f] = 1/2 * sum_i F_i (w_i - Q_f(w_i))^2."""
    return {n: {"fp32": 0.0, **{f: 0.5 * float((diag[n].double() * e.double().pow(2)).sum())
                                for f, e in errs.items()}}
            for n, errs in errors.items()}


def magnitude_scores(model, names) -> dict:
    params = dict(model.named_parameters())
    return {n: float(params[n].detach().abs().mean()) for n in names}


def random_scores(names, seed: int) -> dict:
    u = torch.rand(len(names), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {n: float(v) for n, v in zip(names, u, strict=True)}


def linear_cka_matrix(features: list) -> torch.Tensor:
    """(L, L) ORM / linear CKA between L feature sets, each (N, D_l) over the same N samples.

    CKA(X, Y) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F) with K = X X^T, L = Y Y^T, H the centring matrix.
    """
    n = features[0].shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    grams = []
    for x in features:
        k = x.double().flatten(1)
        k = h @ (k @ k.T) @ h
        grams.append((k / k.norm().clamp_min(1e-300)).flatten())
    g = torch.stack(grams)
    return g @ g.T


def orthogonality_from_features(features: list, beta: float) -> torch.Tensor:
    """exp(-beta * mean CKA with the other layers) per layer: (L,) from L feature sets (N, D_l)."""
    orm = linear_cka_matrix(features)
    gamma = (orm.sum(1) - orm.diagonal()) / max(1, len(features) - 1)
    return torch.exp(-beta * gamma)


def orthogonality_scores(model, schedule, x_pool, names, ortho_cfg, seed: int, device="cpu"):
    """(scores {name: float}, profile {bucket label: {name: float}}) for the eligible tensors."""
    owner = {n: n.rsplit(".", 1)[0] for n in names}
    modules = list(dict.fromkeys(owner.values()))
    captured = {}
    gen = torch.Generator().manual_seed(seed)
    T, K, N = schedule.timesteps, ortho_cfg.buckets, ortho_cfg.n_samples
    per_bucket, profile = [], {}
    model.eval()
    with output_hooks(model, modules, lambda m, a, out: captured.__setitem__(m, out.detach().cpu())):
        for k in range(K):
            lo, hi = k * T // K, (k + 1) * T // K
            x0 = x_pool[torch.randint(0, len(x_pool), (N,), generator=gen)]
            t = torch.randint(lo, hi, (N,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            with torch.inference_mode():
                model(schedule.q_sample(x0, t, eps).to(device), t.to(device))
            scores = orthogonality_from_features([captured[m] for m in modules], ortho_cfg.beta)
            s = dict(zip(modules, scores, strict=True))
            per_bucket.append(s)
            profile[f"t{lo:04d}-{hi - 1:04d}"] = {n: float(s[owner[n]]) for n in names}
    return {n: float(sum(s[owner[n]] for s in per_bucket) / K) for n in names}, profile


def compute_importance(metric: str, model, fisher: dict, imp_cfg, schedule=None, x_pool=None, device="cpu"):
    """The importance artifact of ``metric`` over the tensors ``fisher`` covers (its eligible set).

    Returns {"metric", "score" {name: s_n}, "cost" {name: {format: loss increase}}, "meta"}.
    ``schedule`` and ``x_pool`` ((N, C, H, W) real images in [-1, 1]) are needed by orthogonality only.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown importance metric {metric!r}; valid: {', '.join(METRICS)}")
    t0 = time.time()
    names = list(fisher["per_tensor"])
    errors = quantization_errors(model, names)
    meta = {"metric": metric, "description": METRICS[metric], "eligible_rule": fisher["meta"].get("eligible_rule"),
            "n_tensors": len(names)}
    profile = None
    if metric == "fisher_distortion":
        cost = fisher_distortion_costs(fisher["diag"], errors)
        # Effective sensitivity: the error-weighted mean Fisher at int8 (for ranking plots only).
        scores = {n: 2 * cost[n]["int8"] / max(float(errors[n]["int8"].double().pow(2).sum()), 1e-300)
                  for n in names}
    else:
        if metric == "fisher":
            scores = dict(fisher["per_tensor"])
        elif metric == "magnitude":
            scores = magnitude_scores(model, names)
        elif metric == "random":
            scores = random_scores(names, imp_cfg.seed)
            meta["seed"] = imp_cfg.seed
        elif metric == "quant_error":
            scores = dict.fromkeys(names, 1.0)
        else:
            ortho = imp_cfg.orthogonality
            scores, profile = orthogonality_scores(model, schedule, x_pool, names, ortho, imp_cfg.seed, device)
            meta.update(seed=imp_cfg.seed, n_samples_per_bucket=ortho.n_samples, buckets=ortho.buckets,
                        beta=ortho.beta)
        cost = costs_from_scores(scores, errors)
    if metric in NEEDS_FISHER:
        meta["fisher_n_samples"] = fisher["meta"].get("n_samples")
        meta["fisher_seed"] = fisher["meta"].get("seed")
    meta["seconds"] = round(time.time() - t0, 2)
    return {"metric": metric, "score": scores, "cost": cost, "timestep_profile": profile, "meta": meta}


def artifact_inputs(metric: str, imp_cfg, fisher: dict) -> dict:
    """What an importance artifact depends on besides the checkpoint (to tell when to recompute)."""
    inputs = {"metric": metric}
    if metric == "random":
        inputs["seed"] = imp_cfg.seed
    if metric == "orthogonality":
        o = imp_cfg.orthogonality
        inputs.update(seed=imp_cfg.seed, n_samples=o.n_samples, buckets=o.buckets, beta=o.beta)
    # Every metric covers the eligible set of fisher.pt; the Fisher metrics also use its values.
    inputs["fisher"] = fingerprint(fisher["per_tensor"])
    return inputs


def load_importance(path: str, ckpt_path: str) -> dict:
    return load_for_checkpoint(path, ckpt_path, "delete it, or run mixed_precision.py, which recomputes it")
