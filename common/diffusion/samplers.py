"""Samplers, kept apart from the network and the schedule (cf. diffusers' schedulers): each is a small
object with ``step(eps, t, x, noise)``; ``sample`` is the loop that joins one to a network.

Notation follows Ho et al. 2020 (DDPM) and Song et al. 2021 (DDIM): beta_t, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, timesteps are 0-based (t = 0 .. T-1).
"""
import torch
from tqdm.auto import tqdm

from ..core import distributed
from .schedule import NoiseSchedule


class DDPMSampler:
    """Ancestral sampling (DDPM eq. 11) with sigma_t^2 = beta_t over all T steps."""

    stochastic = True

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.steps = schedule.timesteps
        s = schedule
        self.timesteps = list(range(s.timesteps - 1, -1, -1))
        self._coef_eps = (s.betas / s.sqrt_one_minus_alpha_bar).tolist()
        self._inv_sqrt_alpha = (1.0 / s.alphas.sqrt()).tolist()
        self._sigma = s.betas.sqrt().tolist()

    def step(self, eps, t: int, x, noise):
        mean = self._inv_sqrt_alpha[t] * (x - self._coef_eps[t] * eps)
        return mean if t == 0 else mean + self._sigma[t] * noise


class DDIMSampler:
    """DDIM (Song et al. eq. 12) on ``steps`` evenly spaced timesteps; eta=0 is deterministic."""

    def __init__(self, schedule: NoiseSchedule, steps: int, eta: float = 0.0, clip_x0: bool = True):
        self.schedule = schedule
        self.steps = steps
        self.eta = eta
        self.stochastic = eta > 0
        self.clip_x0 = clip_x0
        # Counting down from T-1, so a single step still starts from pure noise (t = T-1), not t = 0.
        ts = torch.linspace(schedule.timesteps - 1, 0, steps).round().long().unique()
        self.timesteps = ts.flip(0).tolist()
        ab = schedule.alpha_bar.double()
        self._ab = {t: ab[t].item() for t in self.timesteps}
        self._ab_prev = {t: (ab[p].item() if p >= 0 else 1.0)
                         for t, p in zip(self.timesteps, self.timesteps[1:] + [-1], strict=True)}

    def step(self, eps, t: int, x, noise):
        ab, ab_prev = self._ab[t], self._ab_prev[t]
        x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5
        if self.clip_x0:
            x0 = x0.clamp(-1, 1)
            # Recompute eps consistent with the clipped x0, as diffusers does.
            eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5
        sigma = self.eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        out = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
        return out + sigma * noise if self.stochastic and sigma > 0 else out


def build_sampler(sample_cfg, schedule):
    if sample_cfg.sampler == "ddpm":
        return DDPMSampler(schedule)
    return DDIMSampler(schedule, sample_cfg.steps, sample_cfg.eta)


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """Noise source for one batch; depends only on (seed, batch index), never on the weights."""
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index)


@torch.inference_mode()
def sample(model, sampler, n: int, shape, seed: int, batch_size: int, device="cpu",
           channels_last=False, progress=True, desc="sampling", batches=None, noise_rows=None, noise_of=None):
    """Draw ``n`` images (n, *shape) in [-1, 1] (unclamped model space) as float32 on the CPU.

    The initial x_T and every per-step noise come from ``batch_generator(seed, b)``, so two
    models sampled with the same (seed, batch_size) see identical noise. ``batches``: only these batch
    indices (their images, in that order), e.g. one rank's share. ``noise_rows``: draw each batch's noise for
    this many images and use the first ones, so a smaller batch gets the images a batch of ``noise_rows`` would
    begin with (a stochastic sampler's per-step noise depends on the number of rows drawn). ``noise_of``: the
    number of images of the draw being reproduced (an evaluation of ``noise_of`` images in batches of
    ``noise_rows``): batch b draws as that draw's batch b did, min(noise_rows, noise_of - b * noise_rows) rows.
    """
    model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    out = []
    n_batches = (n + batch_size - 1) // batch_size
    todo = range(n_batches) if batches is None else batches
    bar = tqdm(total=len(todo) * len(sampler.timesteps), desc=desc, unit="step", leave=False,
               disable=not progress or not distributed.shows_progress())
    for b in todo:
        m = min(batch_size, n - b * batch_size)
        rows = max(m, noise_rows or m) if noise_of is None else max(m, min(noise_rows, noise_of - b * noise_rows))
        gen = batch_generator(seed, b)
        x = torch.randn((rows, *shape), generator=gen)[:m].to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        t_batch = torch.empty(m, dtype=torch.long, device=device)
        for t in sampler.timesteps:
            eps = model(x, t_batch.fill_(t))
            noise = torch.randn((rows, *shape), generator=gen)[:m].to(device) if sampler.stochastic else None
            x = sampler.step(eps, t, x, noise)
            bar.update(1)
        out.append(x.float().cpu())
    bar.close()
    return torch.cat(out) if out else torch.empty((0, *shape))


def sample_across_ranks(model, sampler, n: int, shape, seed: int, batch_size: int, device="cpu", **kwargs):
    """``sample`` with the batches split across the ranks of a torchrun and gathered on every rank: each batch's
    noise depends on (seed, batch index) only, so the images are those one process draws."""
    n_batches = (n + batch_size - 1) // batch_size
    mine = distributed.shard(list(range(n_batches)))
    x = sample(model, sampler, n, shape, seed, batch_size, device, batches=mine, **kwargs)
    parts = list(torch.split(x, [min(batch_size, n - b * batch_size) for b in mine])) if mine else []
    return torch.cat(distributed.gather_in_order(parts, n_batches))
