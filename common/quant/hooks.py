"""Hooks on the inputs (or outputs) of named modules for the length of a ``with`` block: what calibration, the
activation Fisher, smoothing, GPTQ and the finetuning record while the model runs, removed however the block
ends."""
import contextlib

from torch import nn


@contextlib.contextmanager
def input_hooks(model: nn.Module, names, fn):
    """Call ``fn(name, args)`` on the positional inputs of each module of ``names`` whenever it runs inside the
    block (after the pre-hooks already registered, so ``args`` is what the module itself receives; a non-None
    return replaces them, as a forward pre-hook's does). Yields {name: module} of the whole model."""
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_pre_hook(lambda m, a, n=n: fn(n, a)) for n in names]
    try:
        yield mods
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def output_hooks(model: nn.Module, names, fn):
    """Call ``fn(name, args, output)`` whenever a module of ``names`` runs inside the block (a non-None return
    replaces the output, as a forward hook's does). Yields {name: module} of the whole model."""
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: fn(n, a, o)) for n in names]
    try:
        yield mods
    finally:
        for h in handles:
            h.remove()
