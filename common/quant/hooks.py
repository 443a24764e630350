"""Hooks on the inputs of named modules for the length of a ``with`` block: what calibration, smoothing and GPTQ
record while the model runs, removed however the block ends."""
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
