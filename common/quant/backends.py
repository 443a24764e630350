"""Execution backends: run a stored model in the precision its file promises, not only at its size.

``prepare(model, stored, backend, ...)`` returns a ``Runner``, an ``nn.Module`` with the U-Net's call
signature (x_t fp32 (B, C, H, W), t int64 (B,)) -> eps fp32 (B, C, H, W), so ``diffusion.sample`` drives any
backend unchanged. ``model`` is the fp32 network holding the de-quantized values (``quantize.load_quantized``),
``stored`` the file's entries (what the plan really stored; None = every tensor fp32, a baseline).

What each tensor runs in (``Runner.precision`` says it per parameter):

* ``dequant`` — the reference: fp32 weights holding the stored values, fp32 activations. Same numbers as the
  plan; fp32 speed and memory.
* ``bf16`` — every weight, buffer (the time table) and activation in bfloat16, eager or ``torch.compile``.
  A tensor stored bf16 runs exactly; fp32/fp16/int8/int4 values are rounded to bf16 (8 significant bits), so
  the tensors a plan keeps at fp32 lose their precision here (casting around them would cost more than it
  saves at this model size).
* ``fp16`` — the same in float16, CUDA only (CPUs have no fast fp16 kernels: measured ~17x slower than fp32).
* ``int8`` — static W8A8 through PyTorch 2 export quantization (``torch.export`` -> torchao ``prepare_pt2e``
  with ``X86InductorQuantizer`` -> calibration -> ``convert_pt2e`` -> ``torch.compile``, whose x86 passes
  lower the quantize/dequantize patterns to oneDNN int8 convolutions and matmuls on VNNI). Only the
  Conv2d / Linear weights the plan stored as *whole-tensor* int8 or int4 run int8, with the plan's own codes
  and per-output-channel scales (int4 codes sit in int8 storage: exact; a midrise grid's levels k + 1/2 as the
  odd codes 2k + 1 at half the scale, exact too); their input activations become
  uint8 with one static scale per tensor from the calibration (that rounding is the backend's only new
  error). The ConvTranspose2d up-samplers have no x86 int8 kernel; their (kernel 4, stride 2, padding 1)
  geometry is rewritten as four 2x2 Conv2d, one per output phase (``SubPixelConvTranspose``: same sums,
  same codes). Everything else keeps its stored values in fp32 compute: fp32/fp16/bf16 tensors and
  element-masked tensors (one kernel cannot mix formats inside a tensor); with ``backend.int8_time_path: fp32``
  the time path's modules too (one input row per image: int8 buys nothing there), and the modules
  ``backend.int8_float_inputs`` names (inputs kept float; ``int8_sites`` makes the same cut in a calibrated
  graph, to study which to name). The export has a dynamic batch
  dimension; the compiled graph is specialised to ``batch_size`` and smaller batches are zero-padded to it
  (samples are independent under static scales, so padding changes no result).
* ``int8_bf16`` — the same int8 graph with bf16 islands: the int8 kernels as above (fp32 outputs), attention
  (``scaled_dot_product_attention``) and the float convolutions / linears whose weight the plan does not store
  as fp32 (nor keeps fp32 by ``int8_time_path``) rewritten to run in bf16 and cast back (``_bf16_islands``), so
  the residual stream, norms and
  everything between, biases included, stays fp32. PT2E's int8-mixed-bf16 (the whole graph under bf16
  autocast, bf16 outputs from the int8 kernels) ran 10-20% faster but, on the smoothed uniform int8 plan, with
  1.4x this one's damage (docs/performance.md).

``auto`` (``choose_auto``) — the fastest backend that is *exact for the plan* on this machine: one that runs every
stored weight at its stored value (no second rounding of a parameter) and adds no rounding the plan does not
choose. ``dequant`` always is; ``bf16`` (``fp16``, CUDA only) when every parameter holds a bf16- (fp16-)
representable value, i.e. the plan stores the whole network in that format, whose activations then run in it too
(buffers, the sin/cos tables, are inputs of the time path and rounded like activations); ``int8`` / ``int8_bf16``
never, because they round activations to uint8 with calibrated scales, which no weight-only plan contains (an
act_quant variant's own activation quantizers run on ``dequant`` only). Where more than one is exact, a short probe
(a few U-Net calls at a small batch, each candidate) measures them once per machine (``core.machine.key``), plan
kind and architecture, cached in ``<run.cache_dir>/backend_auto.json``; a candidate must beat ``dequant`` by 5%
in that probe, so auto is never slower than ``dequant`` on the machine it runs on.
"""
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import machine, storage
from ..core.format_names import format_spec
from ..diffusion.samplers import sample
from . import smoothing

BACKENDS = ("dequant", "bf16", "fp16", "int8", "int8_bf16")
AUTO = "auto"  # backend.name / sample.py --backend: choose_auto picks one of BACKENDS
_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Runner(nn.Module):
    """eps_theta(x_t, t) on a backend: fp32 in, fp32 out, whatever runs inside.

    ``precision``: {parameter name: what it runs as}; ``resident_bytes``: bytes of the weights, buffers and
    constants the executed module holds (not the file), ``resident_by_dtype`` the same split by dtype;
    ``prepare_seconds``: conversion + calibration + compilation; ``batch_size``: the batch a compiled int8
    graph was specialised to (None = any).
    """

    def __init__(self, fn, backend, dtype, precision, resident: dict, prepare_seconds=0.0, batch_size=None,
                 notes=(), min_batch=1):
        super().__init__()
        self.__dict__["fn"] = fn  # not a submodule: an exported graph refuses .eval()/.train()
        self.backend, self.dtype, self.batch_size, self.min_batch = backend, dtype, batch_size, min_batch
        self.precision, self.resident_by_dtype = precision, resident
        self.resident_bytes = sum(resident.values())
        self.prepare_seconds, self.notes = prepare_seconds, list(notes)

    def train(self, mode=True):  # always inference; nothing inside has a train mode to switch
        return self

    def forward(self, x, t):
        n = x.shape[0]
        # A compiled int8 graph runs one batch shape, an exported one at least 2: pad with zeros, then drop.
        want = self.batch_size or max(n, self.min_batch)
        if n > want:
            raise ValueError(f"batch of {n} but this {self.backend} runner was compiled for {want}")
        if n < want:
            x = torch.cat([x, x.new_zeros(want - n, *x.shape[1:])])
            t = torch.cat([t, t.new_zeros(want - n)])
        return self.fn(x.to(self.dtype), t)[:n].float()

    def summary(self) -> dict:
        """{what runs: number of parameters} and the JSON-able facts of this runner."""
        counts = {}
        for how in self.precision.values():
            counts[how] = counts.get(how, 0) + 1
        return {"backend": self.backend, "resident_bytes": self.resident_bytes,
                "resident_by_dtype": self.resident_by_dtype,
                "prepare_seconds": round(self.prepare_seconds, 2), "batch_size": self.batch_size,
                "tensors_by_execution": dict(sorted(counts.items())), "notes": self.notes}


def tensor_bytes(tensors) -> dict:
    """{dtype name: bytes} of the distinct tensors (shared storage counted once)."""
    seen, out = set(), {}
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            key = str(t.dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def _held(module) -> dict:
    return tensor_bytes(list(module.parameters()) + list(module.buffers()))


def module_bytes(module: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers a module holds."""
    return sum(_held(module).values())


def _formats(model, stored):
    """{parameter: stored format}, with "masked" appended for element-granularity entries."""
    if stored is None:
        return {n: "fp32" for n, _ in model.named_parameters()}
    return {n: e["format"] + (" masked" if "mask" in e else "") for n, e in stored.items()}


# ----------------------------------------------------------------------------- floating point
def _floating(model, stored, backend, device, compile_model):
    dtype = _DTYPE[backend]
    if backend == "fp16" and torch.device(device).type != "cuda":
        raise ValueError("backend 'fp16' needs a CUDA device (CPU fp16 kernels are ~17x slower than fp32 here); "
                         "use 'bf16' on a CPU")
    if backend == "bf16" and torch.device(device).type == "cuda" and not machine.cuda_native_bf16():
        raise ValueError("backend 'bf16': this GPU has no native bfloat16 (compute capability < 8.0: torch would "
                         "emulate it, slower than fp16); use 'fp16'")
    net = _copy(model).to(device=device, dtype=dtype)
    fn = torch.compile(net) if compile_model else net
    precision = {n: backend + (" (exact)" if f == backend else f" (rounded from {f})")
                 for n, f in _formats(model, stored).items()}
    return Runner(fn, backend, dtype, precision, _held(net), notes=["torch.compile"] if compile_model else [])


def _copy(model):
    import copy

    return copy.deepcopy(model).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- int8 (PT2E)
class SubPixelConvTranspose(nn.Module):
    """ConvTranspose2d(kernel 4, stride 2, padding 1) as four 2x2 convolutions, one per output phase,
    interleaved; exactly the same sums, but each is an ordinary Conv2d, which has an x86 int8 kernel.

    In 1-D, output 2m takes x[m-1]*W[3] + x[m]*W[1] and output 2m+1 takes x[m]*W[2] + x[m+1]*W[0]; so
    phase p correlates the (once zero-padded) input with the taps ``TAPS[p]``. Each phase weight is a
    slice of the transposed-conv weight (in, out, 4, 4), so its per-output-channel int8 codes and scales
    are the plan's own.
    """
    TAPS = ((3, 1), (2, 0))  # kernel index of tap a in the even / odd output phase

    def __init__(self, ct: nn.ConvTranspose2d):
        super().__init__()
        self.phases = nn.ModuleList()
        for w in self.phase_weights(ct.weight.detach()):
            conv = nn.Conv2d(w.shape[1], w.shape[0], 2, bias=ct.bias is not None)
            conv.weight = nn.Parameter(w, requires_grad=False)
            if ct.bias is not None:
                conv.bias = nn.Parameter(ct.bias.detach().clone(), requires_grad=False)
            self.phases.append(conv)

    @classmethod
    def phase_weights(cls, w: torch.Tensor) -> list:
        """(in, out, 4, 4) -> four (out, in, 2, 2) weights, phases (0,0), (0,1), (1,0), (1,1)."""
        return [w[:, :, list(cls.TAPS[py])][:, :, :, list(cls.TAPS[px])].transpose(0, 1).contiguous()
                for py in (0, 1) for px in (0, 1)]

    @staticmethod
    def fits(ct: nn.ConvTranspose2d) -> bool:
        return (ct.kernel_size, ct.stride, ct.padding, ct.output_padding, ct.dilation, ct.groups) == (
            (4, 4), (2, 2), (1, 1), (0, 0), (1, 1), 1)

    def forward(self, x):
        b, _, h, w = x.shape
        xp = nn.functional.pad(x, (1, 1, 1, 1))
        y = torch.stack([conv(xp[:, :, py:py + h + 1, px:px + w + 1])
                         for conv, (py, px) in zip(self.phases, ((0, 0), (0, 1), (1, 0), (1, 1)), strict=True)])
        c = y.shape[2]  # y: (phase_y * 2 + phase_x, B, C, H, W) -> (B, C, 2H, 2W)
        return y.view(2, 2, b, c, h, w).permute(2, 3, 4, 0, 5, 1).reshape(b, c, 2 * h, 2 * w)


@dataclass
class Int8Plan:
    """Which modules run int8 and with which weight scales; the reasons the others do not."""
    scales: dict = field(default_factory=dict)   # module name (after rewriting) -> the plan's per-channel scale
    subpixel: list = field(default_factory=list)  # ConvTranspose2d modules run as SubPixelConvTranspose
    kept: dict = field(default_factory=dict)     # parameter name -> why it stays fp32
    fp32: set = field(default_factory=set)       # kept parameters that stay fp32 under int8_bf16's islands too


class CodebookNotRunnable(ValueError):
    """A codebook-stored tensor on the int8 backend."""


def float_input_match(model, float_inputs) -> Callable[[str], bool]:
    """A test of module names against ``float_inputs`` (names or prefixes of modules of ``model``); an entry that
    names no module is an error, never a silent no-op."""
    def named(name, entry):  # the module itself or one inside it: a prefix ends at a module boundary
        return name == entry or name.startswith(entry + ".")

    names = [n for n, _ in model.named_modules() if n]
    for entry in float_inputs:
        if not any(named(n, entry) for n in names):
            examples = [n for n in names if n.count(".") in (1, 2)][:6]
            raise ValueError(f"backend.int8_float_inputs: {entry!r} names no module of this {type(model).__name__}; "
                             f"valid: module names or their prefixes, e.g. {', '.join(examples)}")
    return lambda name: any(named(name, e) for e in float_inputs)


def int8_plan(model, stored, time_path="int8", float_inputs=()) -> Int8Plan:
    """Modules whose weight the plan stored whole-tensor int8/int4/int3/int2 with one scale per output channel
    (codes within int8's range and the kernel's per-channel scale: exact) and which have an x86 int8 kernel.
    Group-wise scales do not fit a per-channel kernel: those tensors run their stored values in fp32. Codebooks
    (k-means centroids) are not integer codes at all: refused. ``time_path`` "fp32": the network's time-path
    modules (``model.time_path``) run their stored values in fp32 (weight-only), never in a bf16 island.
    ``float_inputs``: module names or prefixes whose inputs stay float (weight-only, their stored values; a bf16
    island under int8_bf16)."""
    plan = Int8Plan()
    if stored is None:
        return plan
    book = sorted(n for n, e in stored.items() if e["format"] != "fp32" and format_spec(e["format"]).kind == "codebook")
    if book:
        raise CodebookNotRunnable(
            f"the int8 backend runs integer codes with per-channel scales; {len(book)} tensors ({book[0]}, ...) are "
            f"stored as k-means codebooks ({stored[book[0]]['format']}), whose values are not evenly spaced levels "
            f"an int8 kernel could multiply: use --backend dequant (exact) or bf16")
    if time_path not in INT8_TIME_PATH:
        raise ValueError(f"unknown int8 time path {time_path!r}; valid: {', '.join(INT8_TIME_PATH)}")
    if time_path == "fp32" and not hasattr(model, "time_path"):
        raise ValueError(f"int8 time path 'fp32': a {type(model).__name__} does not say which modules are on its "
                         f"time path (no time_path method); use 'int8'")
    input_float = float_input_match(model, float_inputs)
    for mod_name, mod in model.named_modules():
        name = f"{mod_name}.weight"
        e = stored.get(name)
        if e is None or e["format"] == "fp32":
            continue
        on_time_path = time_path == "fp32" and model.time_path(mod_name)
        if on_time_path:  # fp16 / bf16 values too: never a bf16 island
            plan.fp32.add(name)
        if format_spec(e["format"]).kind != "int":
            continue
        if on_time_path:
            plan.kept[name] = "time path, one row per image (backend.int8_time_path: fp32)"
        elif format_spec(e["format"]).group is not None:
            plan.kept[name] = f"{e['format']}: group-wise scales (an int8 kernel has one scale per output channel)"
        elif "mask" in e:
            plan.kept[name] = "element mask (one kernel cannot mix formats in a tensor)"
        elif input_float(mod_name):
            plan.kept[name] = "input kept float (backend.int8_float_inputs)"
        elif isinstance(mod, nn.ConvTranspose2d):
            extras = [what for what in ("rotation", "lowrank") if hasattr(mod, what)]
            if extras:  # hooks of the module itself: the sub-pixel rewrite would run without them
                plan.kept[name] = f"ConvTranspose2d with a {' and '.join(extras)} (no sub-pixel rewrite carries it)"
            elif SubPixelConvTranspose.fits(mod):
                plan.subpixel.append(mod_name)
                plan.scales.update({f"{mod_name}.phases.{i}": _kernel_scale(e) for i in range(4)})
            else:
                plan.kept[name] = "ConvTranspose2d of another geometry than kernel 4, stride 2, padding 1"
        elif type(mod) in (nn.Conv2d, nn.Linear):
            plan.scales[mod_name] = _kernel_scale(e)
        else:
            plan.kept[name] = f"{type(mod).__name__} (no int8 kernel)"
    return plan


def _kernel_scale(entry):
    """The int8 kernel's per-channel weight scale for a stored entry: its own, or half of it on a midrise grid,
    where the levels (k + 1/2) s are the odd integers 2k + 1 at s / 2 (|2k + 1| <= 15: exact in int8)."""
    return entry["scale"] / 2 if format_spec(entry["format"]).midrise else entry["scale"]


def _plan_scale_observer():
    from torchao.quantization.pt2e.observer import PerChannelMinMaxObserver

    class PlanScaleObserver(PerChannelMinMaxObserver):
        """Per-channel weight observer that returns the plan's own scales, so the int8 kernel multiplies
        exactly the stored codes (re-deriving amax/127.5 would round them a second time)."""

        def __init__(self, plan_scale, **kwargs):
            super().__init__(**kwargs)
            self.plan_scale = plan_scale

        def calculate_qparams(self):
            _, zero_point = super().calculate_qparams()
            return self.plan_scale.clone().to(torch.float32), zero_point

    return PlanScaleObserver


INT8_RANGES = ("histogram", "percentile")
INT8_TIME_PATH = ("int8", "fp32")
PERCENTILE_SAMPLE = 1 << 20  # values per calibration call the percentile is taken over (a strided subsample)


def _percentile_observer():
    from torchao.quantization.pt2e.observer import MinMaxObserver

    class PercentileObserver(MinMaxObserver):
        """Activation range from percentiles: per calibration call (one sampler step of the chain) the
        ``percentile``-th and (100 - ``percentile``)-th values of the input, and over the calls the widest of
        them. Activations change scale along the chain, so the range must cover every step, but within a step a
        few outlier values would otherwise stretch the 256 levels for all the rest."""

        def __init__(self, percentile=99.99, **kwargs):
            super().__init__(**kwargs)
            self.percentile = percentile

        def forward(self, x_orig):
            if x_orig.numel() == 0:
                return x_orig
            x = x_orig.detach().flatten().to(self.min_val.dtype)
            x = x[:: max(1, x.numel() // PERCENTILE_SAMPLE)]  # torch.quantile takes at most 2^24 values
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], dtype=x.dtype)
            lo, hi = torch.quantile(x, q)
            self.min_val.copy_(torch.min(lo, self.min_val))
            self.max_val.copy_(torch.max(hi, self.max_val))
            return x_orig

    return PercentileObserver


def _activation_spec(default, ranges: str, percentile: float):
    """PT2E's x86 activation spec (uint8, per tensor, affine) with the observer ``ranges`` names: its default
    histogram observer (least L2 error over a histogram), or ``PercentileObserver``."""
    from dataclasses import replace

    if ranges == "histogram":
        return default.input_activation
    if ranges != "percentile":
        raise ValueError(f"unknown int8 activation ranges {ranges!r}; valid: {', '.join(INT8_RANGES)}")
    return replace(default.input_activation,
                   observer_or_fake_quant_ctr=_percentile_observer().with_args(percentile=percentile))


def resolve_reduce_range(setting, cap=None) -> bool:
    """``backend.int8_reduce_range`` as the choice it makes: true / false as written; auto -> true exactly where
    the CPU has no VNNI. Without VNNI, oneDNN's u8*s8 kernels (vpmaddubsw) add pairs of products in saturating
    16-bit sums, which 8-bit activation codes overflow; 7-bit codes cannot (127 * 127 * 2 < 32767)."""
    if setting != "auto":
        return bool(setting)
    return not (cap or machine.capability())["vnni"]


def _quantizer(plan: Int8Plan, ranges="histogram", percentile=99.99, reduce_range=False):
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    # uint8 activations (0..127 with reduce_range), HistogramObserver
    default = get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    activation = _activation_spec(default, ranges, percentile)
    observer = _plan_scale_observer()
    quantizer = X86InductorQuantizer()  # no global config: nothing but the modules below is quantized
    for mod_name, scale in plan.scales.items():
        weight = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127, qscheme=torch.per_channel_symmetric,
                                  ch_axis=0, is_dynamic=False, observer_or_fake_quant_ctr=observer.with_args(
                                      plan_scale=scale))
        quantizer.set_module_name_qconfig(mod_name, QuantizationConfig(
            activation, default.output_activation, weight, None, False))
    return quantizer


def _attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _graph_constants(gm):
    """Drop the tensors the converted graph no longer reads (convert_pt2e leaves the original fp32
    weights attached); return the tensors it does read."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used:
            mod_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(mod_name) if mod_name else gm
            owner._parameters.pop(leaf, None)
            owner._buffers.pop(leaf, None)
    return [t for t in (_attr(gm, target) for target in used) if isinstance(t, torch.Tensor)]


def _int8(model, stored, calib, batch_size, compile_model, mixed_bf16=False, ranges="histogram", percentile=99.99,
          reduce_range=False, time_path="int8", float_inputs=()):
    if not calib:
        raise ValueError("backend 'int8' needs calibration inputs (see calibration_inputs)")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    plan = int8_plan(model, stored, time_path, float_inputs)
    net = _copy(model)
    for mod_name in plan.subpixel:
        parent, _, leaf = mod_name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        ct = getattr(owner, leaf)
        setattr(owner, leaf, smoothing.carry_divisor(ct, SubPixelConvTranspose(ct)))  # a smoothed input stays so
    x, t = calib[0]
    batch = torch.export.Dim("batch", min=2)  # the sampler's last batch may be smaller; min 2 avoids 0/1 specialisation
    gm = torch.export.export(net, (x[:2], t[:2]), dynamic_shapes={"x": {0: batch}, "t": {0: batch}}).module()
    prepared = prepare_pt2e(gm, _quantizer(plan, ranges, percentile, reduce_range))
    with torch.no_grad():
        for xc, tc in calib:
            prepared(xc, tc)
    converted = convert_pt2e(prepared)
    resident = tensor_bytes(_graph_constants(converted))
    formats = _formats(model, stored)
    # a masked entry's kept elements are fp32 by the plan's choice (outliers, high-Fisher elements): never bf16
    in_bf16 = _bf16_islands(converted, {n for n, f in formats.items() if f == "fp32" or f.endswith(" masked")}
                            | plan.fp32) if mixed_bf16 else set()
    fn, notes = converted, [f"activation ranges: {ranges}" + (f" {percentile}" if ranges == "percentile" else "")
                            + (", 7-bit codes (reduce_range)" if reduce_range else "")
                            + (", time path fp32" if plan.fp32 else "")
                            + (f", inputs kept float: {', '.join(float_inputs)}" if float_inputs else "")]
    batch_size = batch_size or len(x)
    if compile_model:
        fn = _frozen(torch.compile(converted))
        notes.append("torch.compile (inductor, freezing); resident bytes are the converted graph's tensors, "
                     "oneDNN additionally holds prepacked copies of the int8 weights")
    else:
        notes.append("not compiled: the reference quantize/dequantize graph (int8 numerics, fp32 speed)")
        batch_size = None
    if mixed_bf16:
        notes.append("bf16 islands: attention and the convolutions / linears of non-fp32 float weights in bf16, "
                     "cast back to fp32; the int8 kernels' outputs, norms and the residual stream in fp32")
    precision = {}
    for name, fmt in formats.items():
        mod_name = name.rpartition(".")[0]
        if mod_name in plan.scales and name.endswith(".weight"):
            precision[name] = f"int8 W8A8 ({fmt} codes, plan scales)"
        elif mod_name in plan.subpixel and name.endswith(".weight"):
            precision[name] = f"int8 W8A8 ({fmt} codes, plan scales; as 4 sub-pixel 2x2 convs)"
        elif name in plan.kept:
            precision[name] = f"{'bf16' if name in in_bf16 else 'fp32'} ({fmt} values; {plan.kept[name]})"
        elif name in in_bf16:
            precision[name] = f"bf16 ({fmt} values, output cast to fp32)"
        elif name in plan.fp32:
            precision[name] = f"fp32 ({fmt} values; time path, backend.int8_time_path: fp32)"
        else:
            precision[name] = f"fp32 ({fmt} values)"
    return Runner(fn, "int8_bf16" if mixed_bf16 else "int8", torch.float32, precision, resident,
                  batch_size=batch_size, notes=notes, min_batch=2)


def _conv2d_bf16(x, weight, bias=None, *args, **kwargs):
    out = torch.ops.aten.conv2d.default(x.bfloat16(), weight.bfloat16(), None, *args, **kwargs).float()
    return out if bias is None else out + bias.view(1, -1, 1, 1)  # the bias (never quantized) added in fp32


def _linear_bf16(x, weight, bias=None):
    out = torch.ops.aten.linear.default(x.bfloat16(), weight.bfloat16()).float()
    return out if bias is None else out + bias


def _sdpa_bf16(q, k, v, *args, **kwargs):
    return torch.ops.aten.scaled_dot_product_attention.default(q.bfloat16(), k.bfloat16(), v.bfloat16(), *args,
                                                                **kwargs).float()


def _bf16_islands(gm, fp32_names) -> set:
    """Rewrite ``gm``'s attention and its float convolutions / linears (a plain weight attribute, not an int8
    dequantize node) whose weight the plan does not store as fp32 (``fp32_names``) to run in bf16 with fp32
    outputs (their biases added in fp32); returns the weight names that now run in bf16. Autocasting the whole
    graph instead (PT2E's int8-mixed-bf16) also rounds the int8 kernels' outputs, i.e. the residual stream, to
    bf16 after every layer: on the smoothed uniform int8 plan 1.4x the damage, for 10-20% more speed."""
    swap = {torch.ops.aten.conv2d.default: _conv2d_bf16, torch.ops.aten.linear.default: _linear_bf16}
    islands = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.scaled_dot_product_attention.default:
            node.target = _sdpa_bf16
        elif node.target in swap:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and weight.target not in fp32_names:
                node.target = swap[node.target]
                islands.add(weight.target)
    gm.recompile()
    return islands


def _frozen(compiled):
    """Call ``compiled`` with inductor's freezing on, which turns the weights into constants so the x86
    passes can prepack them for oneDNN's int8 kernels. It must be on whenever inductor compiles, i.e. at the
    first call (and any recompilation); ``torch.compile(options={"freezing": True})`` does not reach that
    pass in torch 2.14 (qconv_prepack then fails under fake tensors)."""
    import torch._inductor.config as inductor_config

    def fn(x, t):
        with inductor_config.patch(freezing=True):
            return compiled(x, t)

    return fn


# ----------------------------------------------------------------------------- entry points
class _Recorder(nn.Module):
    def __init__(self, model, keep):
        super().__init__()
        self.model, self.keep, self.inputs, self.step = model, keep, [], 0

    def forward(self, x, t):
        if self.step in self.keep:
            self.inputs.append((x.clone(), t.clone()))
        self.step += 1
        return self.model(x, t)


def calibration_inputs(model, sampler, n: int, shape, seed: int, steps=None, progress=False):
    """U-Net inputs (x_t, t) met along ``n`` sampling trajectories of ``model`` (one batch of ``n``):
    at every sampler step, or at ``steps`` of them spread evenly over the chain (first and last included).
    Activation ranges depend strongly on t, so calibration must see the whole chain."""
    if steps is not None and steps < 2:
        raise ValueError(f"calibration steps {steps}: need at least 2 (the chain's first and last step), "
                         "or None for every step")
    total = len(sampler.timesteps)
    k = total if steps is None else min(steps, total)
    keep = {round(i * (total - 1) / max(1, k - 1)) for i in range(k)}
    rec = _Recorder(model, keep)
    device = next(model.parameters()).device  # where the model is (a GPU for finetune's teacher)
    sample(rec, sampler, n, shape, seed, n, device=device, progress=progress, desc="calibration")
    return rec.inputs


def prepare(model, stored, backend: str, device="cpu", calib=None, batch_size=None, compile_model=None,
            warmup_shape=None, int8_ranges="histogram", int8_percentile=99.99, int8_reduce_range=False,
            int8_time_path="int8", int8_float_inputs=()) -> Runner:
    """Build the ``Runner`` of ``backend`` for ``model`` (fp32, de-quantized values) and its stored entries.

    calib: [(x, t), ...] from ``calibration_inputs`` (int8 only). batch_size: the sampling batch (int8
    compiles for it). compile_model: torch.compile (default: True for int8, False otherwise).
    warmup_shape: (B, C, H, W) to run once here, so compilation is timed in ``prepare_seconds``.
    int8_ranges / int8_percentile: how the int8 backends calibrate activation ranges (``INT8_RANGES``);
    int8_reduce_range: 7-bit activation codes (``backend.int8_reduce_range``); int8_time_path: "fp32" runs the
    time path's modules weight-only in fp32 (``backend.int8_time_path``); int8_float_inputs: modules whose inputs
    stay float (``backend.int8_float_inputs``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    t0 = time.perf_counter()
    if backend == "dequant":
        net = model.eval().requires_grad_(False).to(device)  # the reference runs the model as it is
        fn = torch.compile(net) if compile_model else net
        precision = {n: f"fp32 ({f} values)" for n, f in _formats(model, stored).items()}
        runner = Runner(fn, backend, torch.float32, precision, _held(net),
                        notes=["torch.compile"] if compile_model else [])
    elif backend in _DTYPE:
        runner = _floating(model, stored, backend, device, bool(compile_model))
    else:
        if torch.device(device).type != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU (x86 oneDNN kernels); use --set run.device=cpu")
        runner = _int8(model, stored, calib, batch_size, True if compile_model is None else compile_model,
                       mixed_bf16=backend == "int8_bf16", ranges=int8_ranges, percentile=int8_percentile,
                       reduce_range=int8_reduce_range, time_path=int8_time_path,
                       float_inputs=tuple(int8_float_inputs))
    if warmup_shape is not None:
        b = runner.batch_size or warmup_shape[0]
        with torch.inference_mode():
            runner(torch.zeros(b, *warmup_shape[1:], device=device), torch.zeros(b, dtype=torch.long, device=device))
    runner.prepare_seconds = time.perf_counter() - t0
    return runner


# ----------------------------------------------------------------------------- auto
AUTO_FILE = "backend_auto.json"
AUTO_MARGIN = 1.05  # a candidate must be this much faster than dequant in the probe to be chosen


def plan_kind(model, act_quant=False) -> str:
    """What decides which backends run a plan exactly: "act_quant" (fake-quantized activations), "bf16" / "fp16" /
    "bf16+fp16" (every floating tensor of the plan -- parameters and stored buffers such as smoothing's fp16
    divisors -- holds a value of that format; the floating backends cast them all), else "fp32"."""
    if act_quant:
        return "act_quant"
    params = [p.detach() for p in model.state_dict().values() if p.is_floating_point()]
    fits = [name for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))
            if all(torch.equal(p.to(dtype).to(p.dtype), p) for p in params)]
    return "+".join(fits) or "fp32"


def exact_backends(kind: str, device="cpu") -> list:
    """The backends that run a plan of ``kind`` (``plan_kind``) exactly on ``device``; ``dequant`` first."""
    cuda = torch.device(device).type == "cuda"
    out = ["dequant"]
    if "bf16" in kind.split("+") and (not cuda or machine.cuda_native_bf16()):
        out.append("bf16")
    if "fp16" in kind.split("+") and cuda:
        out.append("fp16")
    return out


def probe_speed(model, backend: str, device, shape, timesteps: int, batch=4, min_seconds=0.3, max_calls=20) -> float:
    """Images per second of single U-Net calls of ``model`` on ``backend`` at ``batch`` (random x_t, t = T/2): one
    warm-up call, then calls until ``min_seconds`` or ``max_calls``. Eager: what auto compares is the kernels."""
    runner = prepare(model, None, backend, device)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    t = torch.full((batch,), timesteps // 2, dtype=torch.long, device=device)
    cuda = torch.device(device).type == "cuda"
    with torch.inference_mode():
        runner(x, t)
        if cuda:  # the warm-up's kernels finish before the clock starts
            torch.cuda.synchronize()
        calls, t0 = 0, time.perf_counter()
        while calls < max_calls and (calls == 0 or time.perf_counter() - t0 < min_seconds):
            runner(x, t)
            calls += 1
        if cuda:
            torch.cuda.synchronize()
        return batch * calls / (time.perf_counter() - t0)


def _read_auto_cache(path) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        cached = storage.load_json(path)
    except storage.CorruptFileError as e:
        print(f"[backend] auto: {e}; measuring again")
        return {}
    return cached if isinstance(cached, dict) else {}


def choose_auto(model, device, cache_dir, shape, timesteps: int, act_quant=False, batch=4, probe=probe_speed) -> dict:
    """Resolve ``backend.name: auto`` for ``model`` (fp32, holding the plan's de-quantized values) on this machine.

    Returns {"backend", "kind", "candidates", "measured" ({backend: images/s in the probe} or None), "cached",
    "machine", "reason"}. ``probe(model, backend, device, shape, timesteps, batch)`` -> images/s (tests pass their
    own); measured figures are cached in ``cache_dir``/backend_auto.json per machine, device, plan kind,
    architecture (parameter names and shapes), input shape and probe batch.
    """
    kind = plan_kind(model, act_quant)
    candidates = exact_backends(kind, device)
    cap = machine.capability()
    out = {"kind": kind, "candidates": candidates, "measured": None, "cached": False, "machine": machine.describe(cap)}
    if len(candidates) == 1:
        why = ("its activation quantizers run only as fake quantization" if act_quant else
               "bf16 / fp16 would round its parameters and int8 its activations")
        return {**out, "backend": "dequant", "reason": f"only dequant runs this plan ({kind}) exactly: {why}"}
    arch = storage.fingerprint({n: list(p.shape) for n, p in model.named_parameters()})
    # the input's shape too: a DiT's token count follows the image size while its parameters' shapes do not
    key = f"{machine.key(cap)}/{torch.device(device).type}/{kind}/{arch}/b{batch}/{'x'.join(map(str, shape))}"
    path = os.path.join(cache_dir, AUTO_FILE)
    entry = _read_auto_cache(path).get(key)
    got = entry.get("measured") if isinstance(entry, dict) else None  # a hand-edited entry is measured again
    if isinstance(got, dict) and set(got) == set(candidates) and \
            all(isinstance(v, (int, float)) and v > 0 for v in got.values()):
        measured, out["cached"] = got, True
    else:
        measured = {b: round(probe(model, b, device, shape, timesteps, batch), 2) for b in candidates}
        cached = _read_auto_cache(path)  # another process may have added entries meanwhile
        cached[key] = {"measured": measured, "machine": out["machine"], "isa": cap["isa"], "kind": kind,
                       "probe_batch": batch, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        storage.atomic_write_json(cached, path)
    best = max(candidates, key=lambda b: measured[b])
    if best != "dequant" and measured[best] < AUTO_MARGIN * measured["dequant"]:
        best = "dequant"
    ratios = ", ".join(f"{b} {measured[b] / measured['dequant']:.2f}x" for b in candidates if b != "dequant")
    src = "cached probe" if out["cached"] else "probe"
    return {**out, "backend": best, "measured": measured,
            "reason": f"exact for this plan ({kind}): {', '.join(candidates)}; {src} on {cap['isa']}: {ratios} "
                      f"dequant's speed"}
