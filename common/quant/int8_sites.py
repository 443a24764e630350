"""Cut activation quantizers out of a calibrated int8 graph, one input at a time.

The uncompiled graph PT2E converts (``backends.prepare(..., compile_model=False).fn``) holds, before each conv /
linear whose input it quantizes, a uint8 quantize / dequantize pair. Skipping a pair leaves that input float and
every other input's calibrated range as it was: one calibration serves a study of every input
(``benchmarks/bench_int8_sites.py``). ``backend.int8_float_inputs`` runs the same cut in a fresh calibration
(whose downstream ranges then see the float input) and, under ``int8_bf16``, in a bf16 island rather than fp32.
"""
import copy

import torch


def _quantized_input(node):
    """The dequantize node feeding ``node``'s input (a conv / linear of a converted int8 graph), else None."""
    if node.op != "call_function" or node.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
        return None
    x = node.args[0]
    if isinstance(x, torch.fx.Node) and x.target is torch.ops.quantized_decomposed.dequantize_per_tensor.default:
        return x
    return None


def _module_of(node) -> str:
    """The model's module a graph node belongs to; a sub-pixel phase (``<name>.phases.<i>``) reports its
    ConvTranspose2d, the module ``int8_float_inputs`` names."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else node.name
    return path.split(".phases.")[0]


def activation_sites(gm) -> list:
    """Modules of the uncompiled int8 graph ``gm`` whose input activations are quantized, in graph order."""
    return list(dict.fromkeys(_module_of(n) for n in gm.graph.nodes if _quantized_input(n) is not None))


def without_input_quantizers(gm, modules):
    """A copy of the uncompiled int8 graph ``gm`` in which the inputs of ``modules`` skip their uint8
    quantize / dequantize (their int8 weights stay as they are)."""
    unknown = set(modules) - set(activation_sites(gm))
    if unknown:
        raise ValueError(f"no quantized input in this int8 graph for {sorted(unknown)}; "
                         f"valid: {', '.join(activation_sites(gm))}")
    out = copy.deepcopy(gm)
    for node in list(out.graph.nodes):
        dq = _quantized_input(node)
        if dq is not None and _module_of(node) in modules:
            node.replace_input_with(dq, dq.args[0].args[0])  # dequantize(quantize(x)) -> x
    out.graph.eliminate_dead_code()
    out.recompile()
    return out
