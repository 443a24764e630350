"""Activation ranges from the inputs the modules see along the sampling trajectory.

The full-precision model samples ``n_images`` images with the configured sampler from calibration noise
(its own seed, never an evaluation seed); at ``n_timesteps`` of the sampler's timesteps, spread evenly over
the whole chain, forward pre-hooks record each module's input. Ranges are kept per timestep group
(g = t * G // T) and per channel part (the two slices of a skip concatenation):

* ``minmax``: the smallest and largest value seen (covers every calibration activation);
* ``percentile``: the (100 - p)-th and p-th percentiles, estimated from a uniform random subsample of each
  recorded input (at most ``values_per_call`` values per module call, so memory stays bounded);
* ``mse``: the clipping range that minimises the quantization MSE of that subsample at ``mse_bits``
  (``mse_range``): heavy-tailed inputs (a few tokens or pixels far out) lose less by clipping them than by
  spreading 2^b levels over the whole min-max range.
"""
import torch

from ..core.config import ConfigError
from ..diffusion.samplers import build_sampler, sample
from ..diffusion.schedule import NoiseSchedule
from .activations import fake_quant, group_of, int_range, qparams
from .hooks import input_hooks


def calibration_timesteps(sampler, n=None) -> list:
    """``n`` of the sampler's timesteps evenly spread over its chain (all of them when n is None or larger)."""
    ts = list(sampler.timesteps)
    if n is None or n >= len(ts):
        return ts
    return [ts[i] for i in torch.linspace(0, len(ts) - 1, n).round().long().unique().tolist()]


def mse_range(values: torch.Tensor, bits: int, symmetric=False, steps=40):
    """(lo, hi) minimising E[(Q(x) - x)^2] over ``values`` for a b-bit quantizer (asymmetric unless
    ``symmetric``): a grid over one shrink factor of the min-max range, then each end refined on its own."""
    qmin, qmax = int_range(bits, symmetric)
    lo0, hi0 = float(values.min()), float(values.max())

    def err(lo, hi):
        s, z = qparams(torch.tensor(lo), torch.tensor(hi), bits, symmetric)
        return float((fake_quant(values, s, z, qmin, qmax) - values).pow(2).mean())

    grid = torch.linspace(1.0 / steps, 1.0, steps).tolist()
    best = min((err(lo0 * a, hi0 * a), lo0 * a, hi0 * a) for a in grid)
    _, lo, hi = best
    if not symmetric:  # coordinate refinement of each end
        best = min(best, min((err(lo0 * a, hi), lo0 * a, hi) for a in grid))
        _, lo, hi = best
        best = min(best, min((err(lo, hi0 * a), lo, hi0 * a) for a in grid))
        _, lo, hi = best
    return lo, hi


def collect_ranges(model, sampler, names, shape, n_images: int, timesteps, groups: int, method="minmax",
                   percentile=99.99, splits=None, seed=1000, batch_size=256, device="cpu", progress=True,
                   values_per_call=4096, mse_bits=4, symmetric=False):
    """Ranges {name: (G, P, 2) float32 [lo, hi]} of the inputs of modules ``names`` of ``model``.

    shape: one image (C, H, W); timesteps: the sampler timesteps to record at; splits: {name: channel}
    where a module's input is split into two parts; mse_bits: the bits the ``mse`` ranges are searched for, one
    for every input or {name: bits or [bits per timestep group]} (an input without bits: 16), for the symmetric
    quantizer where ``symmetric`` (the one they will feed). Raises
    ValueError if a timestep group gets no data.
    """
    if method not in ("minmax", "percentile", "mse"):
        raise ValueError(f"range method must be 'minmax', 'percentile' or 'mse', got {method!r}")
    splits = splits or {}
    T, wanted = sampler.schedule.timesteps, set(timesteps)
    parts = {n: 1 if splits.get(n) is None else 2 for n in names}
    lo = {n: torch.full((groups, parts[n]), float("inf")) for n in names}
    hi = {n: torch.full((groups, parts[n]), float("-inf")) for n in names}
    kept = {n: [[[] for _ in range(parts[n])] for _ in range(groups)] for n in names}
    state = {"g": None}
    gen = torch.Generator().manual_seed(seed)

    def see_t(module, args):
        t = int(args[1].reshape(-1)[0])  # sampling denoises a whole batch at one t
        state["g"] = int(group_of(t, groups, T)) if t in wanted else None

    def record(name, args):
        g = state["g"]
        if g is None:
            return
        x = args[0].detach().float()
        k = splits.get(name)
        for p, v in enumerate([x] if k is None else [x[:, :k], x[:, k:]]):
            lo[name][g, p] = min(float(lo[name][g, p]), float(v.min()))
            hi[name][g, p] = max(float(hi[name][g, p]), float(v.max()))
            if method != "minmax":
                flat = v.flatten()
                idx = torch.randint(flat.numel(), (min(values_per_call, flat.numel()),), generator=gen)
                kept[name][g][p].append(flat[idx.to(flat.device)].cpu())

    t_hook = model.register_forward_pre_hook(see_t)
    try:
        with input_hooks(model, names, record):
            sample(model, sampler, n_images, shape, seed, batch_size, device, progress=progress, desc="calibration")
    finally:
        t_hook.remove()
    seen = {int(group_of(t, groups, T)) for t in wanted}
    empty = [g for g in range(groups) if g not in seen]
    if empty:
        raise ValueError(f"timestep groups {empty} of {groups} contain none of the calibration timesteps "
                         f"{sorted(wanted)}: use fewer timestep groups or more calibration timesteps")
    out = {}
    for n in names:
        r = torch.stack([lo[n], hi[n]], dim=-1)
        if method == "percentile":
            q = torch.tensor([1 - percentile / 100, percentile / 100])
            for g in range(groups):
                for p in range(parts[n]):
                    r[g, p] = torch.quantile(torch.cat(kept[n][g][p]), q)
        elif method == "mse":
            for g in range(groups):
                for p in range(parts[n]):
                    bits = mse_bits.get(n) or 16 if isinstance(mse_bits, dict) else mse_bits
                    bits = bits[g] if isinstance(bits, (list, tuple)) else bits  # bits per timestep group
                    r[g, p] = torch.tensor(mse_range(torch.cat(kept[n][g][p]), bits, symmetric))
        out[n] = r
    return out


def check_act_quant_groups(cfg):
    """Every per-timestep activation group must see calibration timesteps. Checked when activations are
    calibrated (act_quant.py), not on every load: other scripts may sample with fewer steps."""
    aq, src = cfg.act_quant, cfg.source + "".join(f" --set {o}" for o in cfg.overrides)
    if "group" in aq.range_modes:
        sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
        ts = calibration_timesteps(sampler, aq.calib_timesteps)
        seen = set(group_of(ts, aq.timestep_groups, cfg.diffusion.timesteps).tolist())
        if len(seen) < aq.timestep_groups:
            raise ConfigError(f"{src}: act_quant.timestep_groups: {aq.timestep_groups} groups, but the "
                              f"{len(ts)} calibration timesteps (act_quant.calib_timesteps of the sampler's "
                              f"{len(sampler.timesteps)}) fall in only {len(seen)} of them; use fewer groups or more "
                              f"calibration timesteps")
