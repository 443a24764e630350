"""The exact first-order change of the final sample along a plan's real weight error (a JVP through the chain).

Every other sensitivity here prices a tensor's error by a diagonal curvature: 1/2 sum_w F_w dW_w^2 assumes the
weights' errors do not interact, within a tensor or across tensors. To first order the change of the final sample
x_0 = S_theta(x_T, z) (sampler, fixed noise) under the real error dW of a plan is exact without that assumption:

    dx_0 ~ J dW = d/ds S_{theta + s dW}(x_T, z) at s = 0,

one forward-mode pass through the whole chain (``torch.func.jvp``) along the tangent dW, every tensor's error at
once. Its squared norm per pixel, ||J dW||^2 / (B D), is the first-order estimate of the paired MSE the plan adds
(in the model's [-1, 1] pixel units; [0, 1] pixels are 1/4 of it), cross terms between tensors included:

* ``jvp_costs``: per (tensor, format), ||J dW_{n,f}||^2 / (B D), a sensitivity of its own for the exact
  allocator (additive again across tensors, but exact within a tensor: no diagonal);
* ``plan_jvp``: one number per whole configuration, a feature no additive estimate has (it sees two tensors'
  errors cancel or add through the chain).

Forward-mode AD has no rule for the fused CPU attention kernels, so the passes run with PyTorch's math attention
(the same function, composed of differentiable primitives).
"""
import torch
from tqdm.auto import tqdm

from ..diffusion.samplers import batch_generator


class ChainJVP:
    """x_0's directional derivative along weight errors, for ``n_chains`` chains of fixed noise from ``seed``
    (``batch_generator(seed, 0)``: x_T, then each step's noise, as ``sample`` draws them)."""

    def __init__(self, model, sampler, shape, n_chains=8, seed=0, device="cpu"):
        self.model, self.sampler, self.device = model.eval(), sampler, device
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = {n: b for n, b in model.named_buffers()}
        gen = batch_generator(seed, 0)
        self.x_T = torch.randn((n_chains, *shape), generator=gen).to(device)
        self.noise = [torch.randn((n_chains, *shape), generator=gen).to(device) if sampler.stochastic else None
                      for _ in sampler.timesteps]
        self.pixels = n_chains * int(torch.tensor(shape).prod())

    def _chain(self, names):
        from torch.func import functional_call

        def run(*weights):
            p = {**self.params, **dict(zip(names, weights, strict=True)), **self.buffers}
            x = self.x_T
            t_batch = torch.empty(len(x), dtype=torch.long, device=self.device)
            for t, z in zip(self.sampler.timesteps, self.noise, strict=True):
                eps = functional_call(self.model, p, (x, t_batch.fill_(t)))
                x = self.sampler.step(eps, t, x, z)
            return x

        return run

    def direction(self, deltas: dict) -> torch.Tensor:
        """J dW: x_0's first-order change (n_chains, *shape) along {tensor: dW} (the other weights fixed)."""
        from torch.func import jvp
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = list(deltas)
        with sdpa_kernel([SDPBackend.MATH]):
            _, dx = jvp(self._chain(names), tuple(self.params[n] for n in names),
                        tuple(deltas[n].to(self.device, self.params[n].dtype) for n in names))
        return dx

    def directions(self, name: str, deltas: torch.Tensor) -> torch.Tensor:
        """J dW_k for K errors of one tensor at once, (K, n_chains, *shape): the tangents batched with
        ``torch.func.vmap`` (one pass through the chain, ~3x faster than K passes on the CPU)."""
        from torch.func import jvp, vmap
        from torch.nn.attention import SDPBackend, sdpa_kernel

        run, w = self._chain([name]), self.params[name]
        with sdpa_kernel([SDPBackend.MATH]):
            return vmap(lambda d: jvp(run, (w,), (d,))[1])(deltas.to(self.device, w.dtype))

    def sq_norm(self, deltas: dict) -> float:
        """||J dW||^2 per chain and pixel: the first-order paired MSE ([-1, 1] pixel units)."""
        return float(self.direction(deltas).double().pow(2).sum()) / self.pixels


def jvp_costs(cj: ChainJVP, errors: dict, progress=True) -> dict:
    """{tensor: {format: ||J dW_{n,f}||^2 / (B D)}} from {tensor: {format: W - Q_f(W)}} (one batched JVP per
    tensor; an exact format, e.g. fp32, costs 0 without one)."""
    out = {}
    for n in tqdm(errors, desc="jvp", disable=not progress, leave=False):
        fs = [f for f in errors[n] if errors[n][f].any()]
        out[n] = {f: 0.0 for f in errors[n]}
        if fs:
            dx = cj.directions(n, torch.stack([errors[n][f] for f in fs]))
            out[n].update({f: float(v) / cj.pixels for f, v in zip(fs, dx.double().pow(2).flatten(1).sum(1),
                                                                     strict=True)})
    return out


def plan_jvp(cj: ChainJVP, config: dict, errors: dict) -> float:
    """||J dW_plan||^2 / (B D) of a whole configuration {tensor: format}: every tensor's error in one tangent."""
    return cj.sq_norm({n: errors[n][f] for n, f in config.items() if errors[n][f].any()})
