"""The time path at full precision over the sampler's timesteps (TFMQ-DM, Huang et al. 2024).

Everything a denoiser computes from t alone (the U-Net's time MLP and every ResBlock's projection of it, the
DiT's time MLP and every adaLN modulation) has only as many distinct inputs as the sampler has steps. So the
outputs of the network's ``time_outputs()`` modules are computed once per sampler timestep by the
unquantized model and stored as a table (fp16, counted in the file's size, a buffer ``<module>.time_rows``
(steps, width) plus the model's ``time_rows_steps``); at run time a hook returns each sample's row instead of
the module's (quantized) output. A timestep outside the table is an error, never a silent fallback.
"""
import torch
from torch import nn

from .hooks import output_hooks

TABLE_FORMAT = "fp16"


def _see_t(model, args):
    t = args[1].reshape(-1).to(model.time_rows_steps.device, torch.int32)
    hit = t[:, None] == model.time_rows_steps[None, :]
    if not bool(hit.any(1).all()):
        missing = sorted(set(t[~hit.any(1)].tolist()))
        raise ValueError(f"timesteps {missing[:5]} are not in the stored time table (it covers the sampler's "
                         f"{model.time_rows_steps.tolist()}): sample with the sampler the variant was made for")
    model._time_rows = hit.float().argmax(1)


def _row(module, args, out):
    rows = module._time_rows_owner._time_rows
    table = module.time_rows[rows]
    if rows.numel() == 1 and out.shape[0] > 1:
        table = table.expand(out.shape[0], -1)
    return table.to(out.device, out.dtype)


def attach(model: nn.Module, steps, widths: dict) -> nn.Module:
    """Register an (empty) table for ``steps`` on each module of ``widths`` ({module name: output width}) and the
    hooks that read it. ``load_state_dict`` then fills the tables."""
    # int32: stored as a plain 4-byte-per-value entry like the fp32 tensors of a quantized file; on the model's
    # device (a model already on a GPU is never moved again before it samples)
    device = next(model.parameters()).device
    model.register_buffer("time_rows_steps", torch.as_tensor(list(steps), dtype=torch.int32, device=device))
    mods = dict(model.named_modules())
    for name, width in widths.items():
        m = mods[name]
        m.register_buffer("time_rows", torch.zeros(len(steps), int(width), device=device))
        object.__setattr__(m, "_time_rows_owner", model)  # not a submodule: no cycle in named_modules
        m.register_forward_hook(_row)
    model.register_forward_pre_hook(_see_t)
    return model


@torch.no_grad()
def build(model: nn.Module, steps, image_shape) -> dict:
    """Attach tables to ``model`` filled from ``model`` itself before attaching (its float path, with whatever
    exact transformations it carries: smoothing may fold divisors into the time path's outputs), the
    unquantized path, at the sampler timesteps ``steps``; returns {module name: width}. ``image_shape``:
    (C, H, W) of one input (the time path does not depend on it). Rows are rounded to TABLE_FORMAT."""
    names = list(model.time_outputs())
    steps = [int(s) for s in steps]
    outs = {}
    p = next(model.parameters())
    shape = (len(steps), *image_shape)
    with output_hooks(model, names, lambda n, a, o: outs.__setitem__(n, o.detach())):
        model(torch.zeros(shape, device=p.device), torch.tensor(steps, device=p.device))
    widths = {n: outs[n].shape[1] for n in names}
    attach(model, steps, widths)
    mods = dict(model.named_modules())
    for n in names:
        mods[n].time_rows.copy_(outs[n].to(torch.float16).float())
    return widths


def table_entries(model: nn.Module) -> list:
    """State-dict names of the stored table tensors."""
    return [n for n, _ in model.named_buffers() if n.endswith("time_rows") or n == "time_rows_steps"]
