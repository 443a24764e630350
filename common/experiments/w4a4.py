"""W4A4 that holds: where uniform W4A4's damage comes from, and what each technique against it buys.

Two studies on the released baseline, written under ``runs/<run>/finetune/`` beside ``make finetune``'s variants
and with its weights (every conv / linear but the two ends in 4-bit per-channel codes, the ends in
``lowbit.keep_format``), calibration and evaluation settings; every variant is sampled from its stored files.

* ``run_damage``: A4 on every quantized input but one group, and on one group alone (groups: ``input_group``),
  plus per input the relative output error of 4-bit rounding per tensor against per input channel.
* ``run_ablation``: uniform W4A4 from plain rounding, adding one technique at a time (``TECHNIQUES``): ranges
  searched for the least quantization MSE, dynamic per-token ranges for attention inputs, smoothing, rotation,
  a 16-bit low-rank branch, the time path as a table, GPTQ's error-compensating weight rounding
  (``quant.gptq``: it rounds the transformed weights), dynamic per-block activation ranges (microscaling:
  ``w4a4.block_size`` input channels share an e4m3 scale, so the row's activations cost 4 + 8 / block bits;
  ``quant.activations.block_fake_quant``), and last quantization-aware distillation (``finetune.py``), which
  starts from the row's stored codes and quantizers: the one trained row, so it is trained once, on the rest.
"""
import contextlib
import copy
import functools
import json
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import distributed, lock, machine, storage
from ..core.config import W4A4_TECHNIQUES, to_dict
from ..core.errors import UserError
from ..diffusion.samplers import build_sampler
from ..diffusion.schedule import NoiseSchedule
from ..evaluation import evaluate
from ..evaluation.integrity import SELECTION_FILES
from ..quant import lowrank, rotation, smoothing, time_table
from ..quant.activations import (
    channel_dim,
    fake_quant,
    group_of,
    int_range,
    load_act_quant,
    qparams,
    quantizer_digest,
    save_act_quant,
)
from ..quant.bops import unet_macs
from ..quant.container import arch_record, is_extra_tensor, stored_digest
from ..quant.eligibility import eligible_names, end_convs
from ..quant.formats import channel_axes, dequantize_tensor, int_codes, quantize_tensor
from ..quant.hooks import input_hooks
from ..quant.learnable import GRADIENT_VERSION
from . import lowbit, pipeline
from .act_pipeline import (
    act_layout,
    act_quantizer,
    block_scale_bits,
    calibrated_ranges,
    ensure_act_importance,
    ensure_ranges,
    ensure_weight_fisher,
    input_bits,
    mean_bits,
    mode_groups,
    plan_choice,
    run_act_variant,
    save_and_evaluate,
    scale_bits,
    step_record,
)

# the techniques of the ablation, in the order the rows add them
TECHNIQUES = W4A4_TECHNIQUES
SAMPLING_CONVS = ("down-sampling conv", "up-sampling (transposed) conv")


def input_group(model, name: str, splits: dict) -> str:
    """The damage group of a quantized input: the time path, skip concatenations, sampling convs, or the
    network's own op type (attention projections, ResBlock convs; the DiT's qkv / out / MLP inputs)."""
    if model.time_path(name):
        return "time path"
    if name in splits:
        return "skip concatenation"
    op = model.op_type(name)
    return "sampling conv" if op in SAMPLING_CONVS else op


def rounded_weights(c, model, w_bits: int) -> dict:
    """Stored entries of plain W-bit rounding: every ``lowbit.RULE`` weight in int<w_bits> per output channel,
    the two ends in ``lowbit.keep_format``, the rest fp32 (as ``make finetune``'s ``none`` method stores them):
    ``stored_entries`` over the parameters alone (buffers are rebuilt by the model, not stored)."""
    return stored_entries(c, model, w_bits, dict(model.named_parameters()))


def _evaluate(c, variant, model, stored, quantizer, extra, device, force, progress, transformed=None):
    """Save and evaluate one variant from its files, under its lock; ``transformed``: the network with extras
    (smoothing divisors, rotations, low-rank branches, time table) that the quantized file records."""
    provenance = {"study": extra["study"], "checkpoint_sha256": extra["checkpoint_sha256"]}
    arch = arch_record(c, transformed) if transformed is not None else None
    with lock.hold(evaluate.variant_dir(c, variant)):
        return save_and_evaluate(c, variant, model, stored, quantizer, extra, provenance, {"study": extra}, device,
                                 force, progress, arch=arch)


# ----------------------------------------------------------------------------- where the damage comes from
def damage_sets(model, names, kept, splits) -> dict:
    """{variant: (label, inputs at A4)}: weights only, every input, and per group all-but-it and it alone."""
    inputs = [n for n in names if n not in kept]
    groups = {}
    for n in inputs:
        groups.setdefault(input_group(model, n, splits), []).append(n)
    out = {"damage_w4": ("W4, inputs float", []), "damage_all": ("W4A4 (every quantized input)", inputs)}
    for g, members in groups.items():
        tag = g.replace(" ", "_").replace("(", "").replace(")", "")
        out[f"damage_but_{tag}"] = (f"A4 on all but {g}", [n for n in inputs if n not in members])
        out[f"damage_only_{tag}"] = (f"A4 on {g} alone", members)
    return out


def run_damage(cfg, c, model, sha, a_bits, device, force=False, progress=True) -> dict:
    """Evaluate ``damage_sets`` at W4A{a_bits}: {variant: (label, group, metrics)}."""
    mode = cfg.finetune.range_mode
    names, kept, splits, _ = act_layout(c, model)
    ranges = pipeline.shared(c, lambda: ensure_ranges(c, model, mode, sha, device, progress))
    stored = rounded_weights(c, model, 4)
    done = {}
    for variant, (label, inputs) in damage_sets(model, names, kept, splits).items():
        q = _quantizer(c, model, ranges, {n: a_bits for n in inputs}, mode, token=False)
        extra = {"study": "damage", "label": label, "inputs_at_a4": len(inputs), "checkpoint_sha256": sha,
                 "a_bits": a_bits, "range_mode": mode}
        done[variant] = (label, _evaluate(c, variant, model, stored, q, extra, device, force, progress))
    # the weights' own term under GPTQ's rounding too: where the weight share goes once rounding is fixed
    label = "W4 by GPTQ, inputs float"
    entries, info = gptq_weights(c, model, sha, device, progress)
    extra = {"study": "damage", "label": label, "inputs_at_a4": 0, "checkpoint_sha256": sha, "a_bits": a_bits,
             "range_mode": mode, "gptq_median_error_ratio": info["median_error_ratio"]}
    q = _quantizer(c, model, ranges, {}, mode, token=False)
    done["damage_w4_gptq"] = (label, _evaluate(c, "damage_w4_gptq", model, {**stored, **entries}, q, extra, device,
                                                force, progress))
    return done


def _quantizer(c, model, ranges, bits, mode, token: bool, block: int = 0):
    """The W/A pipeline's activation quantizer with per-token attention ranges switched by ``token`` and dynamic
    per-block ranges by ``block`` (channels; 0 = off)."""
    c2 = copy.deepcopy(c)
    c2.act_quant.per_token_attention = token
    c2.act_quant.block_size = block
    return act_quantizer(c2, model, ranges, bits, mode)


def range_method(techniques) -> str:
    """The row's per-tensor activation ranges: least-MSE with the "ranges" technique, else min-max."""
    return "mse" if "ranges" in techniques else "minmax"


def row_block(cfg, techniques) -> int:
    """The row's activation block size: ``w4a4.block_size`` with the "block" technique, else 0 (off)."""
    return cfg.w4a4.block_size if "block" in techniques else 0


def channel_errors(model, quantizer, pool, n_inputs=64, seed=0) -> list:
    """Per quantized input: the relative output error ||f(Q(x)) - f(x)|| / ||f(x)|| of its layer with the
    calibrated per-tensor quantizer and with min-max ranges per input channel (of the same inputs, per timestep
    group), on ``n_inputs`` pairs of the teacher's calibration pool; and where the outliers are: the spread of the
    channels' ranges (largest max|x| of a channel over the median channel's)."""
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(pool[0]), generator=gen)[:n_inputs]
    device = next(model.parameters()).device  # the pool is kept on the CPU; the model may be on a GPU
    x, t = pool[0][idx].to(device), pool[1][idx].to(device)
    seen = {}
    with torch.no_grad(), input_hooks(model, quantizer.layers, lambda n, a: seen.__setitem__(n, a[0].detach())):
        model(x, t)
    groups = group_of(t, quantizer.groups, quantizer.timesteps)
    rows = []
    with torch.no_grad():
        for n, lq in quantizer.layers.items():
            layer, xi, lq = mods[n], seen[n], copy.copy(lq).to(device)  # a copy: the quantizer stays where it is
            ref = layer(xi)
            dim = channel_dim(xi, layer)
            per_tensor = float((layer.forward(lq.apply(xi, groups, dim)) - ref).norm() / ref.norm())
            xc = torch.empty_like(xi)
            for g in groups.unique():
                sel = groups == g
                v = xi[sel]
                red = tuple(d for d in range(v.dim()) if d != dim)
                s, z = qparams(v.amin(red, keepdim=True), v.amax(red, keepdim=True), lq.bits, lq.symmetric)
                xc[sel] = fake_quant(v, s, z, *int_range(lq.bits, lq.symmetric))
            per_channel = float((layer.forward(xc) - ref).norm() / ref.norm())
            amax = xi.abs().amax(tuple(d for d in range(xi.dim()) if d != dim))
            spread = float(amax.max() / amax.median().clamp_min(1e-12))
            rows.append({"input": n, "op": model.op_type(n), "per_tensor": per_tensor, "per_channel": per_channel,
                         "channels": int(amax.numel()), "range_spread": spread})
    return rows


# ----------------------------------------------------------------------------- the ablation
def technique_variant(techniques) -> str:
    return "w4a4_" + "_".join(("round",) + tuple(techniques))


def selection_damage(c, variant: str, reference, sha: str, n: int, device) -> list:
    """Per-image paired MSE on the [0, 1] scale of ``variant`` (rebuilt from its stored files) against the fp32
    samples ``reference()`` (a function: sampled only when some variant's record is missing) of the checkpoint
    ``sha`` on ``n`` images of selection noise (``finetune.calib_seed + 1``: never an evaluation seed), so the
    greedy ablation decides on noise it is not judged on. Stored beside the variant (``selection.json``, with
    their mean), computed once per stored variant: a rerun that reuses the variant reuses its selection damage.
    Under torchrun rank 0 computes it and the other ranks read its record, so every rank keeps the same rows."""
    return distributed.rank0_first(lambda: _selection_damage(c, variant, reference, sha, n, device))


def _selection_damage(c, variant, reference, sha, n, device) -> list:
    from ..quant.container import load_quantized

    folder = evaluate.variant_dir(c, variant)
    files = [os.path.join(folder, f) for f in SELECTION_FILES]
    inputs = {"files": [storage.sha256_file(f) for f in files], "checkpoint_sha256": sha, "n": n,
              "seed": c.finetune.calib_seed + 1, "sample": to_dict(c.sample), "diffusion": to_dict(c.diffusion),
              "device": torch.device(device).type, "per_image": True}
    path = os.path.join(folder, "selection.json")
    old = storage.reusable_record(path, inputs)
    if old is not None:
        print(f"[{variant}] reusing its selection damage {path}")
        return old["per_image"]
    qmodel, _ = load_quantized(files[0], device)
    load_act_quant(files[1])[0].attach(qmodel)
    x = _selection_samples(c, qmodel, n, device)
    per_image = ((x - reference()) ** 2).flatten(1).mean(1).tolist()
    if distributed.is_main():
        storage.atomic_write_record({"inputs": inputs, "paired_mse": float(np.mean(per_image)),
                                     "per_image": per_image}, path)
    return per_image


def keeps(per_image, base, margin: float, costs_more: bool = False) -> tuple[bool, float]:
    """The greedy rule: (kept, z) for a row of per-image selection damages ``per_image`` tried on the kept row
    ``base`` (None: the first row, kept), z being the mean per-image paired difference over its standard error.
    A technique that costs nothing (the same bytes and activation bits as its base) is dropped only when z >
    ``margin``: a tie is kept, since differences inside the images' noise are what float paths on another CPU
    can flip, and a technique that pays only together with a later one (GPTQ after the low-rank branch) is not
    lost on the way. One that ``costs_more`` (stored bytes, activation bits) must pay for it: kept only when
    z < -``margin``. ``margin`` 0: kept exactly when the mean went down (the strict rule)."""
    if base is None:
        return True, 0.0
    diff = np.asarray(per_image, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    if not np.isfinite(diff).all():  # a broken row (NaN samples) is never built on
        return False, float("nan")
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    z = mean / se if se > 0 else (0.0 if mean == 0 else float(np.copysign(np.inf, mean)))
    if margin <= 0:
        return mean < 0, z
    return (z < -margin if costs_more else z <= margin), z


def row_cost(result) -> tuple:
    """What a row stores and spends: (weight bytes, activation bits per quantized input)."""
    return result["size_bytes"], result.get("a_bits_effective", 4)


def costs_more(cost, base_cost, rel: float = 1e-3) -> bool:
    """More stored bytes (beyond ``rel``: metadata is not a cost) or more activation bits than the base row."""
    return base_cost is not None and (cost[0] > base_cost[0] * (1 + rel) or cost[1] > base_cost[1] + 1e-9)


def _selection_samples(c, model, n, device):
    from ..diffusion.samplers import sample

    sampler = build_sampler(c.sample, NoiseSchedule.from_config(c.diffusion))
    shape = (c.model.in_channels, c.data.image_size, c.data.image_size)
    x = sample(model, sampler, n, shape, c.finetune.calib_seed + 1, min(n, c.sample.batch_size), device,
               progress=False)
    return (x.clamp(-1, 1) + 1) / 2


def transformed_model(c, model, techniques, pool, device, rank: int, smooth_samples: int, progress=True):
    """The fp32 model with the ablation's exact transformations applied, in the order their input hooks run:
    smoothing (alpha per layer chosen at W4A4 on teacher inputs), rotation, low-rank branches, time table.
    Returns (model, {technique: what it did})."""
    names, kept, _, _ = act_layout(c, model)
    layers = [n.removesuffix(".weight") for n in eligible_names(model, lowbit.RULE)]
    inputs = [n for n in names if n not in kept]
    m = copy.deepcopy(model)
    info = {}
    axes = channel_axes(model)
    if "smooth" in techniques:
        gen = torch.Generator().manual_seed(c.finetune.calib_seed)
        idx = torch.randperm(len(pool[0]), generator=gen)[:smooth_samples]
        xs, ts = pool[0][idx].to(device), pool[1][idx].to(device)
        info["smooth"] = smoothing.smooth(
            m, [n for n in inputs if n in layers],
            lambda: [m(xs[i:i + 64], ts[i:i + 64]) for i in range(0, len(xs), 64)],
            lambda n: lambda w: dequantize_tensor(quantize_tensor(w, "int4", axes[f"{n}.weight"])), 4, record=inputs)
    if "rotate" in techniques:
        info["rotate"] = rotation.rotate(m, [n for n in inputs if n in layers])
    if "lowrank" in techniques:
        info["lowrank"] = lowrank.decompose(m, {n: rank for n in layers})
    if "time_table" in techniques:
        sampler = build_sampler(c.sample, NoiseSchedule.from_config(c.diffusion))
        shape = (c.model.in_channels, c.data.image_size, c.data.image_size)
        info["time_table"] = {"steps": [int(s) for s in sampler.timesteps],
                              "widths": time_table.build(m, sampler.timesteps, shape)}
    return m.eval().requires_grad_(False), info


def stored_entries(c, transformed, w_bits: int, state=None) -> dict:
    """What the transformed model stores: its quantized layers' (residual) weights in int<w_bits>, the ends in
    ``keep_format``, low-rank factors / run-time divisors / time rows in 16 bits, everything else fp32; of
    ``state`` (default: the whole state dict)."""
    state = transformed.state_dict() if state is None else state
    params, axes = dict(transformed.named_parameters()), channel_axes(transformed)
    quantized = {n for n in eligible_names(transformed, lowbit.RULE) if ".lowrank." not in n}
    ends = set(end_convs(transformed))
    stored = {}
    for n, v in state.items():
        if n in quantized:
            stored[n] = quantize_tensor(params[n], f"int{w_bits}", axes[n])
        elif n in ends:
            stored[n] = quantize_tensor(params[n], c.lowbit.keep_format, axes[n])
        elif is_extra_tensor(n):
            stored[n] = quantize_tensor(v, "fp16", 0)
        else:
            stored[n] = {"format": "fp32", "data": v.detach().cpu().clone()}
    return stored


def gptq_weights(c, transformed, sha: str, device, progress=True) -> tuple:
    """({parameter: stored entry}, info): the transformed model's quantized layers in int4 by GPTQ
    (``lowbit.gptq_entries``: Hessians from the transformed model's own sampling trajectories,
    ``lowbit.gptq_images`` / ``lowbit.gptq_seed``, the same entries on every invocation). Transposed / grouped
    convs keep round-to-nearest. info per layer: the output-error proxy of round-to-nearest and of GPTQ. Computed
    once per transformed model: cached in the baseline folder, keyed on the digest of the model's whole state and
    the GPTQ settings (rows and studies that round the same model share it; a corrupt file is recomputed), and
    bound to the checkpoint ``sha`` it was transformed from, as ``make verify`` checks every baseline cache."""
    names = [n for n in eligible_names(transformed, lowbit.RULE) if ".lowrank." not in n]
    lb = c.lowbit
    inputs = {"model": model_digest(transformed), "names": names, "images": lb.gptq_images, "seed": lb.gptq_seed,
              "damp": lb.gptq_damp, "sample": to_dict(c.sample), "diffusion": to_dict(c.diffusion),
              "shape": [c.model.in_channels, c.data.image_size, c.data.image_size],
              "device": torch.device(device).type}  # not its index: every rank of a torchrun shares one file
    path = os.path.join(storage.baseline_dir(c), f"gptq_{storage.fingerprint(inputs)}.pt")

    def load_or_round():
        art = storage.load_cache(path, "the GPTQ rounding")
        if (isinstance(art, dict) and {"meta", "entries", "info", "digest"} <= set(art)
                and art["meta"].get("inputs") == inputs and art["meta"].get("checkpoint_sha256") == sha
                and stored_digest(art["entries"]) == art["digest"]):
            print(f"[w4a4] reusing GPTQ's rounding {path}")
            return art["entries"], art["info"]
        entries, infos, report = lowbit.gptq_entries(c, transformed, names, ["int4"], device, progress)
        info = {"images": lb.gptq_images, "damp": lb.gptq_damp,
                "layers": {n.removesuffix(".weight"): v for (n, _), v in infos.items()},
                "round_to_nearest": sorted(n.removesuffix(".weight") for n in report["round_to_nearest"]),
                "median_error_ratio": report["median_error_ratio"].get("int4")}
        entries = {n: e for (n, _), e in entries.items()}
        storage.atomic_torch_save({"meta": {"inputs": inputs, "checkpoint_sha256": sha}, "entries": entries,
                                   "info": info, "digest": stored_digest(entries)}, path)
        return entries, info

    return pipeline.shared(c, load_or_round)  # rank 0 rounds, the other ranks read its file


def quantized_weights(c, transformed, techniques, sha: str, device, info, progress=True) -> dict:
    """The stored entries of a row: ``stored_entries`` at 4 bits, the quantized layers by GPTQ where the row has
    it (its report in ``info['gptq']``). With a distillation in the same row the transformed model's weights
    take GPTQ's values, so the distillation starts from them."""
    stored = stored_entries(c, transformed, 4)
    if "gptq" in techniques:
        entries, info["gptq"] = gptq_weights(c, transformed, sha, device, progress)
        stored.update(entries)
    if "gptq" in techniques and "distill" in techniques:
        params = dict(transformed.named_parameters())
        with torch.no_grad():
            for n, e in entries.items():
                params[n].copy_(dequantize_tensor(e).to(params[n].device))
    return stored


def model_digest(model) -> str:
    """Digest of a (transformed) model's whole state: what its calibration and GPTQ caches are keyed on."""
    return stored_digest({n: {"format": "fp32", "data": v} for n, v in model.state_dict().items()})


def range_cache_inputs(c, transformed, names, method: str, a_bits, mode: str, device, sha: str) -> dict:
    """What ``calibrate``'s ranges depend on: the model's whole state and architecture, the inputs, the range
    method (and the bits the least-MSE search aims at), groups, calibration data, sampler and image shape. The
    device's type, not its index: every rank of a torchrun shares one file. The checkpoint's SHA-256 binds the
    file to the baseline it was transformed from, as ``make verify`` checks every cache in a baseline folder."""
    aq = c.act_quant
    return {"checkpoint_sha256": sha, "model": model_digest(transformed), "arch": to_dict(c.model),
            "names": list(names), "method": method,
            "bits": a_bits if method == "mse" else None, "groups": mode_groups(c, mode),
            "percentile": aq.percentile if method == "percentile" else None, "images": aq.calib_images,
            "timesteps": aq.calib_timesteps, "seed": aq.calib_seed, "splits": act_layout(c, transformed)[2],
            "sample": to_dict(c.sample), "diffusion": to_dict(c.diffusion),
            "shape": [c.model.in_channels, c.data.image_size, c.data.image_size],
            "device": torch.device(device).type,
            **({"symmetric": True} if method == "mse" and aq.symmetric else {})}  # least-MSE for that quantizer


def calibrate(c, transformed, names, method: str, a_bits, mode: str, device, sha: str, progress=True) -> dict:
    """Ranges of the transformed model's inputs (min-max, or the least-MSE ranges at ``a_bits``: an int or one
    per input). Computed once per transformed model and calibration (``range_cache_inputs``): cached in the
    baseline folder, so rows that calibrate the same model the same way (the ``token`` and ``gptq`` rows repeat
    the row below them) and reruns share them; rank 0 computes, the other ranks read its file; a damaged or
    foreign file is recomputed."""
    inputs = range_cache_inputs(c, transformed, names, method, a_bits, mode, device, sha)
    path = os.path.join(storage.baseline_dir(c), f"ranges_{storage.fingerprint(inputs)}.safetensors")

    def load_or_calibrate():
        ranges = storage.reusable_tensors(path, inputs)
        if ranges is not None:
            print(f"[w4a4] reusing calibrated ranges {path}")
            return ranges
        ranges = calibrated_ranges(c, transformed, names, mode, method, device, progress, mse_bits=a_bits)
        if distributed.is_main():
            storage.save_sealed_tensors(ranges, path, inputs)
        return ranges

    return pipeline.shared(c, load_or_calibrate)


@contextlib.contextmanager
def timed(seconds: dict, stage: str):
    """Adds the block's wall time to ``seconds[stage]``: where a row's minutes go (this invocation's; a reused
    cache or variant shows as ~0)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def row_ranges(c, transformed, names, method: str, a_bits, mode: str, block: int, device, sha: str, progress=True):
    """``calibrate``'s ranges, or None with ``block``: every input's ranges are then dynamic, nothing to
    calibrate (the row's record keeps the ``range_method`` its per-tensor inputs would use, so variants stored
    before calibration was skipped stay valid; ``a_block`` > 0 says the ranges are dynamic)."""
    return None if block else calibrate(c, transformed, names, method, a_bits, mode, device, sha, progress)


def distill(cfg, c, teacher, transformed, ranges, pool, token: bool, device, progress=True, start=None, block=0):
    """Quantization-aware distillation that can move the weights (EfficientDM, He et al. 2024): a ``Student`` of
    the transformed model with straight-through weights and learned per-channel weight scales (``lsq``), LSQ
    activation steps per timestep group, and the low-rank factors, trained with Adam to match the fp32
    ``teacher``'s noise prediction on x_t drawn half from the teacher's trajectories (``pool``) and half from the
    student's own (on-policy, refreshed every ``w4a4.onpolicy_every`` steps). ``start``: the row's stored entries
    (round-to-nearest's or GPTQ's): the learned scales start at their scales, so the student starts on their
    codes; ``block``: dynamic per-block activation ranges (as ``_quantizer``; nothing to learn there). Returns
    (stored entries, ActQuantizer, info with the share of weight codes that changed)."""
    from ..diffusion.samplers import build_sampler as sampler_of
    from ..quant.backends import calibration_inputs
    from ..quant.learnable import export_weight
    from .finetune import Student

    w = cfg.w4a4
    c2 = copy.deepcopy(c)
    c2.act_quant.per_token_attention = token
    c2.act_quant.block_size = block
    # the weights start from the stored values and keep their scales, so the student starts on the stored codes
    # (GPTQ's where the row rounds by GPTQ: its scales are round-to-nearest's, its codes are not)
    start = {n: e for n, e in (start or {}).items() if e["format"] == "int4"}
    student = Student(c2, transformed, 4, 4, ranges, "lsq", start=start)
    names = list(student.wq)
    start = {n: e for n, e in start.items() if n in student.wq}
    before = {n: student.wq[n].codes(student.original(n).detach(), hard=True)[0].clone() for n in names}
    same = sum(int((before[n].cpu().to(torch.int8) == int_codes(e)).sum()) for n, e in start.items())
    weights = [student.original(n) for n in names]
    scales = [student.wq[n].log_scale for n in names]
    steps_p = [a.step for a in student.aq.values()]
    branch = [p for n, p in student.model.named_parameters() if ".lowrank." in n]
    trained = weights + scales + steps_p + branch
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": weights + branch, "lr": w.distill_lr}, {"params": scales, "lr": w.scale_lr},
                            {"params": steps_p, "lr": cfg.finetune.step_lr}])
    sampler = sampler_of(c.sample, NoiseSchedule.from_config(c.diffusion))
    shape = (c.model.in_channels, c.data.image_size, c.data.image_size)
    steps = getattr(student.model, "time_rows_steps", None)
    if steps is not None:  # a time table answers only the sampler's timesteps: train on those inputs alone
        keep = torch.isin(pool[1], steps.cpu().to(pool[1].dtype))
        if not keep.any():
            raise UserError("w4a4: distillation on a student with the time table needs calibration inputs at the "
                            f"sampler's timesteps; finetune.calib_source: {c.finetune.calib_source} has none: use "
                            "finetune.calib_source: trajectories, or leave time_table out of the rows before distill")
        pool = (pool[0][keep], pool[1][keep])
    gen = torch.Generator().manual_seed(c.finetune.calib_seed + 7)
    own, losses = None, []
    bar = tqdm(range(w.distill_steps), desc="distill", disable=not progress)
    try:
        for k in bar:
            if w.onpolicy_every and k % w.onpolicy_every == 0:
                with torch.no_grad():  # the student's own trajectories (its quantizers on), from calibration noise
                    pairs = calibration_inputs(student.model, sampler, w.onpolicy_images, shape,
                                               c.finetune.calib_seed + 100 + k, progress=False)
                own = (torch.cat([x for x, _ in pairs]), torch.cat([t.expand(len(x)) for x, t in pairs]))
            half = cfg.finetune.batch_size // 2 if own is not None else cfg.finetune.batch_size
            sel = torch.randint(0, len(pool[0]), (half,), generator=gen)
            x, t = pool[0][sel].to(device), pool[1][sel].to(device)
            if own is not None:
                sel = torch.randint(0, len(own[0]), (cfg.finetune.batch_size - half,), generator=gen)
                x, t = torch.cat([x, own[0][sel].to(device)]), torch.cat([t, own[1][sel].to(device)])
            with torch.no_grad():
                target = teacher(x, t)
            loss = (student.model(x, t) - target).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.2e}")
    finally:
        for p in trained:
            p.requires_grad_(False)
    changed = sum(int((student.wq[n].codes(student.original(n).detach(), hard=True)[0] != before[n]).sum())
                  for n in names)
    total = sum(before[n].numel() for n in names)
    stored = stored_entries(c, transformed, 4)
    for n in names:
        stored[n] = export_weight(student.wq[n], student.original(n))
    own_params = dict(student.model.named_parameters())
    for n in stored:
        if ".lowrank." in n:
            stored[n] = quantize_tensor(own_params[n].detach(), "fp16", 0)
    _, q = student.export(transformed)
    kk = max(1, len(losses) // 10)
    return stored, q, {"steps": w.distill_steps, "codes_changed": changed / max(1, total),
                       "start_matches_stored": same / max(1, sum(before[n].numel() for n in start)),
                       "first_loss": float(np.mean(losses[:kk])) if losses else None,
                       "last_loss": float(np.mean(losses[-kk:])) if losses else None}


def cached_distill(cfg, c, teacher, transformed, ranges, pool, token: bool, ckpt_path: str, before: str, device,
                   progress=True, start=None, block=0):
    """``distill``, computed once: its result (stored entries, activation quantizer, info) is cached in the
    comparison's baseline folder, bound to the checkpoint (``storage.save_for_checkpoint``) and keyed on
    everything else it depends on: the calibration pool, the student it starts from (``before``: the digest of the
    transformed model's stored weights and calibrated quantizer), per-token attention and the distillation
    settings. A rerun of ``make finetune`` then re-trains nothing; a changed setting trains again. ``start``: the
    stored entries ``before`` digests (``distill``'s start)."""
    from .finetune import pool_inputs, sampler_inputs

    ft = cfg.finetune
    sha = storage.sha256_file(ckpt_path)
    pool_key = pool_inputs(c, sha)
    if "sampler" not in pool_key and cfg.w4a4.onpolicy_every:  # its own trajectories follow the sampler too
        pool_key["onpolicy_sampler"] = sampler_inputs(c)
    inputs = {"pool": pool_key, "before": before, "token": token,
              "w4a4": {k: getattr(cfg.w4a4, k) for k in ("distill_steps", "distill_lr", "scale_lr", "onpolicy_every",
                                                         "onpolicy_images")},
              "finetune": {"batch_size": ft.batch_size, "step_lr": ft.step_lr},
              "gradient_version": GRADIENT_VERSION,
              "start": "stored codes",  # before 2026-12-06 the stored scales only: round-to-nearest's codes
              "device": torch.device(device).type, **({"block": block} if block else {})}
    path = os.path.join(storage.baseline_dir(c), f"distill_{storage.fingerprint(inputs)}")

    def load_or_train():
        art = storage.reusable_artifact(path + ".pt", ckpt_path, inputs)
        if art is not None and os.path.exists(path + "_act.safetensors"):
            q, _ = load_act_quant(path + "_act.safetensors")
            if stored_digest(art["stored"]) == art["stored_digest"] and quantizer_digest(q) == art["q_digest"]:
                print(f"[w4a4] reusing the distillation {path}.pt")
                return art["stored"], q, art["info"]
        stored, q, info = distill(cfg, c, teacher, transformed, ranges, pool, token, device, progress, start, block)
        # bound to the checkpoint through the .pt beside it, which records its digest (q_digest): make verify
        # checks both
        save_act_quant(q, path + "_act.safetensors", {"what": "w4a4 distillation cache"})
        storage.save_for_checkpoint({"meta": {"inputs": inputs}, "stored": stored, "info": info,
                                     "stored_digest": stored_digest(stored), "q_digest": quantizer_digest(q)},
                                    path + ".pt", ckpt_path)
        return stored, q, info

    return pipeline.shared(c, load_or_train)  # rank 0 trains, the other ranks read its files (one student)


def run_ablation(cfg, c, model, ckpt_path, sha, pool, device, rows=None, rank=8, force=False, progress=True) -> dict:
    """Ablation rows 0..len(TECHNIQUES) (or ``rows``): row 0 plain rounding, row k adds ``TECHNIQUES[k-1]`` to
    the row it is built on: the row above (``w4a4.ablation: cumulative``), or the last kept row (``greedy``: a
    technique that raises the paired MSE on selection noise by more than ``w4a4.drop_margin`` standard errors is
    tried, reported and dropped, so one harmful technique does not sink the rows after it; ``keeps``).
    {variant: (techniques, metrics, info)} with info: the technique tried, the row it was built on, its selection
    damage, its z against that row and whether it was kept."""
    mode = cfg.finetune.range_mode
    greedy = cfg.w4a4.ablation == "greedy"
    names, kept_inputs, _, _ = act_layout(c, model)
    n_sel = cfg.w4a4.select_images
    reference = functools.cache(lambda: _selection_samples(c, model, n_sel, device))  # only if a record misses
    done, kept, base, base_damage, base_cost = {}, (), None, None, None  # the kept row's per-image damages
    for k in sorted(set(rows)) if rows is not None else range(len(TECHNIQUES) + 1):
        tried = TECHNIQUES[k - 1] if k else None
        techniques = (kept + (tried,)) if greedy and tried else TECHNIQUES[:k]
        if not greedy:  # what this row adds to the row before it: several techniques where rows were skipped
            tried = "+".join(techniques[len(kept):]) or None
        variant = technique_variant(techniques)
        seconds = {}
        with timed(seconds, "transform"):
            m, info = transformed_model(c, model, techniques, pool, device, rank, cfg.w4a4.smooth_samples, progress)
        block = row_block(cfg, techniques)
        method = range_method(techniques)
        bits = input_bits(c, names, kept_inputs, 4)  # the ends at act_quant.keep_bits, as the other studies
        with timed(seconds, "calibrate"):  # (an int aims every least-MSE range at A4: the caches made before)
            ranges = row_ranges(c, m, names, method, bits if c.act_quant.keep_bits else 4, mode, block, device,
                                sha, progress)
        q = _quantizer(c, m, ranges, bits, mode, "token" in techniques, block)
        with timed(seconds, "weights"):
            stored = quantized_weights(c, m, techniques, sha, device, info, progress)
        if "distill" in techniques:
            before = stored_digest(stored) + quantizer_digest(q)
            with timed(seconds, "distill"):
                stored, q, info["distill"] = cached_distill(cfg, c, model, m, ranges, pool, "token" in techniques,
                                                            ckpt_path, before, device, progress, stored, block)
        extra = {"study": "ablation", "row": k, "techniques": list(techniques), "checkpoint_sha256": sha,
                 "range_method": method, "range_mode": mode, "lowrank_rank": rank if "lowrank" in techniques else 0,
                 # per quantized input, unweighted (a tensor's or token's scale: negligible); the A4-on-average
                 # study's a_bits_effective is MAC-weighted over every input instead (block_scale_bits)
                 "a_block": block, "a_bits_effective": 4 + scale_bits(block),
                 "transform": json.loads(json.dumps(info, default=str))}
        with timed(seconds, "evaluate"):
            result = _evaluate(c, variant, model, stored, q, extra, device, force, progress, transformed=m)
        row = {"row": k, "tried": tried, "base": base, "selection_mse": None, "selection_z": None, "kept": True,
               "seconds": seconds}
        if greedy:
            with timed(seconds, "select"):
                per_image = selection_damage(c, variant, reference, sha, n_sel, device)
            against_damage = base_damage if tried else None
            row["costs_more"] = costs_more(row_cost(result), base_cost)
            row["kept"], z = keeps(per_image, against_damage, cfg.w4a4.drop_margin, row["costs_more"])
            row["selection_mse"] = float(np.mean(per_image))
            row["selection_z"] = z if against_damage is not None and np.isfinite(z) else None
            against = ""
            if row["selection_z"] is not None:
                against = f", {z:+.2f} s.e. against its base" + (" (costs more: must be lower)"
                                                                  if row["costs_more"] else "")
            print(f"[w4a4] row {k} ({tried or 'plain rounding'}): selection paired MSE {row['selection_mse']:.4g} "
                  f"on {n_sel} images{against} -> {'kept' if row['kept'] else 'dropped'}")
        if row["kept"]:
            kept, base, base_cost = techniques, variant, row_cost(result)
            base_damage = per_image if greedy else None
        done[variant] = (techniques, result, row)
    return done


# ----------------------------------------------------------------------------- A4 on average
AVERAGE_PLANS = ("uniform", "fisher", "random", "fisher_steps")


def average_stacks(cfg, ablation=None) -> list:
    """The technique tuples ``w4a4.average_on`` names ('best': the ablation's best row, ``best_row``, without
    the distillation, which trains uniform A4's steps)."""
    out = []
    for entry in cfg.w4a4.average_on:
        if entry == "best":
            if not ablation:
                raise ValueError("w4a4.average_on: 'best' needs the ablation study in w4a4.studies")
            out.append(tuple(t for t in ablation[best_row({"ablation": ablation})][0] if t != "distill"))
        else:
            out.append(tuple(t for t in entry.split("+") if t))
    return list(dict.fromkeys(out))


def average_variant(plan: str, techniques) -> str:
    return "_".join(("w4a4_average", plan) + tuple(techniques))


def run_average(cfg, c, model, ckpt_path, fisher, pool, device, ablation=None, force=False, progress=True) -> dict:
    """*A4 on average* beside *uniform A4*: every quantized weight in int4 (the ends as ``act_quant`` keeps them),
    activation bits from ``w4a4.average_a_bits`` chosen per input by the exact allocator under the BOPs of uniform
    W4A4 (``act_pipeline``: the activation Fisher's estimated loss, or random scores as the control), and the
    uniform A4 plan of the same pipeline as the reference; on plain rounding, or on the ablation's techniques
    (``w4a4.average_on``: the same allocation, the techniques' model, ranges calibrated at each input's bits, or
    dynamic per block with the "block" technique).
    {variant: (plan, techniques, metrics)}."""
    c2 = copy.deepcopy(c)
    c2.act_quant.w_formats = ["int4"]
    c2.act_quant.a_bits = sorted(set(cfg.w4a4.average_a_bits) | {4})
    # the plain-rounding block is rounding with per-tensor ranges, as ablation row 0 and the damage study are:
    # per-token attention and activation blocks are techniques of the rows ("token", "block"), not of the base
    c2.act_quant.per_token_attention, c2.act_quant.block_size = False, 0
    macs = unet_macs(model, (c.model.in_channels, c.data.image_size, c.data.image_size))
    mode, sha = cfg.finetune.range_mode, fisher["meta"]["checkpoint_sha256"]

    def caches():  # what the plans allocate by, computed once (rank 0 first, under the lock), not on every rank
        ensure_weight_fisher(c2, model, ckpt_path, fisher, device, progress)
        ensure_act_importance(c2, model, mode, ensure_ranges(c2, model, mode, sha, device, progress), sha, device,
                              progress)
        # the sampler steps' shares of the final sample's sensitivity: the chain-aware Fisher of make lowbit,
        # under lowbit's own settings so both read one cached file
        return lowbit.ensure_chain(lowbit.lowbit_config(cfg), model, eligible_names(model, lowbit.RULE), ckpt_path,
                                   progress, device)["per_step"]

    per_step = pipeline.shared(c2, caches)
    done = {}
    for techniques in average_stacks(cfg, ablation):
        if not techniques:
            for plan in AVERAGE_PLANS:
                variant = average_variant(plan, ())
                done[variant] = (plan, (), run_act_variant(c2, variant, plan, "W4A4", cfg.finetune.range_mode, model,
                                                           ckpt_path, fisher, macs, device, force, progress, per_step))
            continue
        done.update(_average_on(cfg, c, c2, model, ckpt_path, fisher, pool, techniques, macs, per_step, device, force,
                                progress))
    return done


def _average_on(cfg, c, c2, model, ckpt_path, fisher, pool, techniques, macs, per_step, device, force,
                progress) -> dict:
    """The A4-on-average plans (and uniform A4) on the ablation's ``techniques``: the allocation of plain
    rounding's plan (the same BOPs), stored and run through the transformed model as the ablation row is."""
    mode = cfg.finetune.range_mode
    sha = fisher["meta"]["checkpoint_sha256"]
    names, _, _, _ = act_layout(c, model)
    m, tinfo = transformed_model(c, model, techniques, pool, device, cfg.w4a4.lowrank_rank, cfg.w4a4.smooth_samples,
                                 progress)
    stored = quantized_weights(c, m, techniques, sha, device, tinfo, progress)
    total_macs = sum(macs.values())
    block = row_block(cfg, techniques)
    method = range_method(techniques)
    done = {}
    for plan in AVERAGE_PLANS:
        variant = average_variant(plan, techniques)
        choice, info, _ = plan_choice(c2, plan, "W4A4", mode, model, ckpt_path, fisher, macs, device, progress,
                                      per_step)
        # the ends at act_quant.keep_bits where that is set (float: None), as the plain-rounding block quantizes
        # them and as the a-bits and BOPs below count them
        bits = {n: b for n, (_, b) in choice.items() if b is not None}
        ranges = row_ranges(c, m, names, method, bits, mode, block, device, sha, progress)
        q = _quantizer(c, m, ranges, bits, mode, "token" in techniques, block)
        fractions = info.get("steps", {}).get("fractions")
        a_bits = sum(macs[n] * mean_bits(b, fractions) for n, (_, b) in choice.items()) / total_macs
        extra = {"study": "average", "plan": plan, "techniques": list(techniques), "checkpoint_sha256": sha,
                 "range_method": method, "range_mode": mode, "a_bits": a_bits, "a_block": block,
                 "a_bits_effective": a_bits + block_scale_bits(macs, bits, block), "bops": int(info["bops"]),
                 "gbops": info["bops"] / 1e9, "a_bits_by_input": bits, **step_record(choice, macs, info),
                 "lowrank_rank": cfg.w4a4.lowrank_rank if "lowrank" in techniques else 0,
                 "transform": json.loads(json.dumps(tinfo, default=str))}
        print(f"[{variant}] {extra['gbops']:.4g} GBOPs, {a_bits:.2f} bits/activation (MAC-weighted) on "
              f"{' + '.join(('rounding',) + techniques)}")
        done[variant] = (plan, techniques, _evaluate(c, variant, model, stored, q, extra, device, force, progress,
                                                     transformed=m))
    return done


def run_w4a4(cfg, device, studies=("damage", "ablation"), force=False, progress=True) -> dict:
    """The studies on ``cfg``'s baseline: {"damage": ..., "channel_errors": [...], "ablation": ...}."""
    from .finetune import ensure_pool, finetune_config

    c = finetune_config(cfg)
    model, ckpt_path, fisher = pipeline.load_artifacts(cfg, device, force=False, progress=progress)
    sha = fisher["meta"]["checkpoint_sha256"]
    out = {}
    if {"damage", "ablation", "average"} & set(studies):  # the reference of every sampled variant
        out["fp32"] = pipeline.evaluate_fp32(c, model, ckpt_path, device, force, progress)
    pool = pipeline.shared(c, lambda: ensure_pool(c, model, sha, device, progress))
    if "damage" in studies:
        out["damage"] = run_damage(cfg, c, model, sha, 4, device, force, progress)
    if "damage" in studies or "channels" in studies:  # seconds: no variant is sampled
        ranges = pipeline.shared(c, lambda: ensure_ranges(c, model, cfg.finetune.range_mode, sha, device, progress))
        names, kept, _, _ = act_layout(c, model)
        q = _quantizer(c, model, ranges, {n: 4 for n in names if n not in kept}, cfg.finetune.range_mode, False)
        out["channel_errors"] = channel_errors(model, q, pool)
    if "ablation" in studies:
        out["ablation"] = run_ablation(cfg, c, model, ckpt_path, sha, pool, device, rows=cfg.w4a4.rows,
                                       rank=cfg.w4a4.lowrank_rank, force=force, progress=progress)
    if "average" in studies:
        out["average"] = run_average(cfg, c, model, ckpt_path, fisher, pool, device, out.get("ablation"), force,
                                     progress)
    return out


# ----------------------------------------------------------------------------- outputs
COLUMNS = ["study", "variant", "label", "seed", "paired_mse_vs_fp32", "paired_mse_median", "clf_fid", "clf_is",
           "size_bytes"]


def w4a4_dir(cfg) -> str:
    from .finetune import finetune_dir

    return finetune_dir(cfg)


def _variants(done):
    """(study, variant, label, metrics) of every evaluated variant."""
    out = [("reference", "fp32", "fp32", done["fp32"])] if "fp32" in done else []
    for v, (label, r) in done.get("damage", {}).items():
        out.append(("damage", v, label, r))
    for v, (techniques, r, _) in done.get("ablation", {}).items():
        out.append(("ablation", v, " + ".join(("rounding",) + tuple(techniques)), r))
    for v, (plan, techniques, r) in done.get("average", {}).items():
        out.append(("average", v, average_label(plan, techniques), r))
    return out


AVERAGE_LABELS = {"uniform": "uniform A4 (every allocatable input at 4 bits)",
                  "fisher": "A4 on average, bits by the activation Fisher", "random": "A4 on average, random bits",
                  "fisher_steps": "A4 on average, bits by the activation Fisher per input and sampler-step group"}


def average_label(plan: str, techniques) -> str:
    return AVERAGE_LABELS[plan] + (f", on rounding + {' + '.join(techniques)}" if techniques else "")


def rows(done) -> list:
    out = []
    for study, v, label, r in _variants(done):
        for s in r["seeds"]:
            ps = r["per_seed"][str(s)]
            out.append({"study": study, "variant": v, "label": label, "seed": s,
                        "paired_mse_vs_fp32": ps["paired_mse_vs_fp32"],
                        "paired_mse_median": ps.get("paired_mse_median"),
                        "clf_fid": ps["clf_fid"], "clf_is": ps["clf_is"], "size_bytes": r.get("size_bytes")})
    return out


def summary_markdown(cfg, done, seconds=None, grids=False) -> str:
    from .report import mean_sd, per_seed
    from .statistics import holm_note, tested, verdict_cells

    ft = cfg.finetune
    head = ("| variant | paired MSE | clf-FID | clf-FID / fp32 | clf-IS |", "|---|---:|---:|---:|---:|")
    lines = [f"# W4A4: where the damage comes from, what each technique buys (`{w4a4_dir(cfg)}`)", "",
             f"{ft.n_images} images per seed × seeds {ft.seeds}, paired noise; weights: every conv / linear but the "
             f"first and last layer in 4-bit codes per output channel (those {cfg.lowbit.keep_format}); activations: "
             f"{ft.range_mode} ranges calibrated on {cfg.act_quant.calib_images} trajectories from seed "
             f"{cfg.act_quant.calib_seed}." + (f" This invocation: {seconds / 60:.1f} min." if seconds else "")]
    if "fp32" in done:
        ref = done["fp32"]
        fp_fid = float(np.nanmean(per_seed(ref, "clf_fid")))
        lines += ["", f"fp32: clf-FID {mean_sd(per_seed(ref, 'clf_fid'))}, clf-IS {mean_sd(per_seed(ref, 'clf_is'))}."]

    def against(pairs, reference: str):
        """({variant: paired-MSE verdict against its reference row}, the differences): ``pairs`` of (variant,
        its metrics, the reference's), tested together (Holm over the column)."""
        diffs = [per_seed(r, "paired_mse_vs_fp32") - per_seed(ref, "paired_mse_vs_fp32") for _, r, ref in pairs]
        cells_ = verdict_cells(diffs, [(reference, "this")] * len(diffs))
        return dict(zip([v for v, _, _ in pairs], cells_, strict=True)), diffs

    def cells(r):
        fid = float(np.nanmean(per_seed(r, "clf_fid")))
        return (f"{mean_sd(per_seed(r, 'paired_mse_vs_fp32'))} | {mean_sd(per_seed(r, 'clf_fid'))} | "
                f"{fid / fp_fid:.2f} | {mean_sd(per_seed(r, 'clf_is'))}")

    errs = done.get("channel_errors") or []
    if "damage" in done:
        lines += ["", "## Which 4-bit inputs do the damage", "", *head]
        for _, (label, r) in done["damage"].items():
            lines.append(f"| {label} | {cells(r)} |")
    elif errs:
        lines += ["", "## Where the activation outliers are"]
    if errs:
        lines += channel_lines(errs)
    if "ablation" in done:
        greedy = cfg.w4a4.ablation == "greedy"
        margin = cfg.w4a4.drop_margin
        worse = (f"raises it by more than {margin:g} standard errors of the per-image paired difference (z, its "
                 "difference over that error) is tried, reported and dropped, a tie kept; one that stores more "
                 f"bytes or spends more activation bits must lower it by more than {margin:g}" if margin > 0 else
                 "does not lower it is tried, reported and dropped")
        rule = (f"the last kept row, judged by the paired MSE on {cfg.w4a4.select_images} images of selection noise "
                f"(seed finetune.calib_seed + 1, not an evaluation seed): a technique that {worse}" if greedy
                else "the row above")
        lines += ["", "## Ablation: one technique at a time", "",
                  f"Each row adds one technique to the row it is built on: {rule}. The verdict compares it with "
                  "that row (B − A of paired per-seed values, a two-sided paired t-test, Holm-corrected over the "
                  "column).", "",
                  "| row | adds | built on | selection MSE (z) | kept | weights MiB | a-bits (quantized inputs) | "
                  "paired MSE | clf-FID | clf-FID / fp32 | clf-IS | paired MSE vs the row built on |",
                  "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        ablation = done["ablation"]
        verdicts, diffs = against([(v, r, ablation[row["base"]][1]) for v, (_, r, row) in ablation.items()
                                   if row["base"] in ablation], "base")
        for v, (_, r, row) in ablation.items():
            sel = f"{row['selection_mse']:.4g}" if row["selection_mse"] is not None else "–"
            sel += f" ({row['selection_z']:+.1f})" if row.get("selection_z") is not None else ""
            base = " + ".join(("rounding",) + tuple(ablation[row["base"]][0])) if row["base"] in ablation else "–"
            lines.append(f"| {row['row']} | {row['tried'] or 'plain rounding'} | {base} | {sel} | "
                         f"{'yes' if row['kept'] else 'no'} | {r['size_bytes'] / 2 ** 20:.3f} | "
                         f"{r.get('a_bits_effective', 4):.2f} | {cells(r)} | {verdicts.get(v, '–')} |")
        lines += ["", holm_note(tested(diffs))]
        lines += time_lines(ablation)
        if any("block" in t for t, _, _ in ablation.values()):
            lines += ["", f"block: every quantized input dynamic per block of {cfg.w4a4.block_size} input channels at "
                      "each pixel / token, one float8 e4m3 scale per block (times one fp32 scale per sample), as "
                      "NVFP4 / MX formats store them; a-bits counts the scales (4 + 8 / block) per quantized input, "
                      "the kept first and last layer's inputs not counted (the A4-on-average table's a-bits are "
                      "MAC-weighted over every input, kept ones included)."]
    if "average" in done:
        lines += ["", "## Uniform A4 and A4 on average", "",
                  f"Every quantized weight in int4; activation bits per input from {sorted(cfg.w4a4.average_a_bits)} "
                  "chosen by the exact allocator within the BOPs of uniform W4A4 (the first and last layer's inputs "
                  "as `act_quant` keeps them), on plain rounding or on the ablation's techniques (the same "
                  "allocation; ranges searched at each input's bits). Verdicts: B − A of paired per-seed values "
                  "against uniform A4 on the same techniques, a two-sided paired t-test, Holm-corrected over the "
                  "column.", "",
                  "| plan | a-bits (MAC-weighted) | GBOPs | paired MSE | clf-FID | clf-FID / fp32 | clf-IS | "
                  "paired MSE vs uniform A4 |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        average = done["average"]
        uniform = {techniques: r for plan, techniques, r in average.values() if plan == "uniform"}
        verdicts, diffs = against([(v, r, uniform[t]) for v, (p, t, r) in average.items()
                                   if p != "uniform" and t in uniform], "uniform A4")
        for v, (plan, techniques, r) in average.items():
            scales = f" ({r['a_bits_effective']:.2f} with block scales)" if r.get("a_block") else ""
            lines.append(f"| {average_label(plan, techniques)} | {r.get('a_bits', float('nan')):.2f}{scales} | "
                         f"{r.get('gbops', float('nan')):.4g} | {cells(r)} | {verdicts.get(v, '–')} |")
        lines += ["", holm_note(tested(diffs))]
        for plan, techniques, r in average.values():
            if r.get("a_bits_by_group"):
                lines += ["", f"{average_label(plan, techniques)}: MAC-weighted activation bits per timestep group "
                          "(t ascending) " + ", ".join(f"{b:.2f}" for b in r["a_bits_by_group"]) + "; the groups' "
                          "shares of the final sample's sensitivity (chain-aware Fisher) " +
                          ", ".join(f"{x:.2f}" for x in r["group_sensitivity_shares"]) + "."]
    if any(done.get(k) for k in ("damage", "ablation", "channel_errors")):  # what ``plot`` draws
        lines += ["", "![w4a4](w4a4.png)"]
    best = best_row(done)
    if grids and best:
        lines += ["", f"Samples under the same noise (seed {ft.seeds[0]}): fp32, plain rounding and the ablation's "
                  f"best row ({best}):", "", "![W4A4 samples](w4a4_grids.png)"]
    return "\n".join(lines) + "\n"


STAGES = ("transform", "calibrate", "weights", "distill", "evaluate", "select")


def time_lines(ablation) -> list:
    """Where this invocation's minutes went, per ablation row and stage (a reused cache or variant: ~0)."""
    timed_rows = [(v, row) for v, (_, _, row) in ablation.items() if row.get("seconds")]
    if not timed_rows:
        return []
    lines = ["", f"Minutes of this invocation per row ({machine.describe()}; a stage that reused its cache or variant "
             "shows ~0; evaluate = sampling every seed's images and scoring them; select = the greedy rule's "
             "selection samples):", "", "| row | " + " | ".join(STAGES) + " | total |",
             "|---:|" + "---:|" * (len(STAGES) + 1)]
    for _, row in timed_rows:
        sec = row["seconds"]
        lines.append(f"| {row['row']} | " + " | ".join(f"{sec[k] / 60:.1f}" if k in sec else "–" for k in STAGES)
                     + f" | {sum(sec.values()) / 60:.1f} |")
    return lines


def channel_lines(errs) -> list:
    """The per-op-type table of ``channel_errors`` (medians; the range spread's largest too) and the worst inputs."""
    lines = ["", "Relative output error of one layer with its input at 4 bits (64 teacher inputs): the calibrated "
             "per-tensor range against min-max ranges per input channel; and the range spread, the largest channel's "
             "max |x| over the median channel's (where the outliers are). Medians over the inputs of each op type, "
             "and the five worst inputs:", "",
             "| op type | inputs | per tensor | per channel | range spread (median) | range spread (max) |",
             "|---|---:|---:|---:|---:|---:|"]
    for op in sorted({e["op"] for e in errs}):
        es = [e for e in errs if e["op"] == op]
        spreads = [e["range_spread"] for e in es]
        lines.append(f"| {op} | {len(es)} | {np.median([e['per_tensor'] for e in es]):.3g} | "
                     f"{np.median([e['per_channel'] for e in es]):.3g} | {np.median(spreads):.3g} | "
                     f"{max(spreads):.3g} |")
    lines += ["", "| input | per tensor | per channel | range spread |", "|---|---:|---:|---:|"]
    for e in sorted(errs, key=lambda e: -e["per_tensor"])[:5]:
        lines.append(f"| `{e['input']}` | {e['per_tensor']:.3g} | {e['per_channel']:.3g} | "
                     f"{e['range_spread']:.3g} |")
    return lines


def _damage_panel(ax, done):
    from .report import per_seed

    labels = [lab for lab, _ in done["damage"].values()]
    vals = [float(np.nanmean(per_seed(r, "paired_mse_vs_fp32"))) for _, r in done["damage"].values()]
    errs = [float(np.nanstd(per_seed(r, "paired_mse_vs_fp32"))) for _, r in done["damage"].values()]
    ax.barh(range(len(vals)), vals, xerr=errs, color=["C0" if "alone" in lab else "C1" for lab in labels])
    ax.set_yticks(range(len(vals)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("paired MSE vs fp32")
    ax.set_title("W4A4: A4 on all but one group (orange) / one group alone (blue)")


def _ablation_panel(ax, done):
    from .report import per_seed

    names = [row["tried"] or "rounding" for _, _, row in done["ablation"].values()]
    vals = [float(np.nanmean(per_seed(r, "paired_mse_vs_fp32"))) for _, r, _ in done["ablation"].values()]
    errs = [float(np.nanstd(per_seed(r, "paired_mse_vs_fp32"))) for _, r, _ in done["ablation"].values()]
    ax.errorbar(range(len(vals)), vals, yerr=errs, marker="o", color="C0", capsize=3)
    ax.set_xticks(range(len(names)), ["+ " + n if i else n for i, n in enumerate(names)], rotation=30, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("paired MSE vs fp32")
    ax.set_title("W4A4 ablation: each row adds its technique", fontsize=10)


def _outlier_panel(ax, done):
    errs = done["channel_errors"]
    ops = sorted({e["op"] for e in errs})
    for i, op in enumerate(ops):
        vals = [e["range_spread"] for e in errs if e["op"] == op]
        ax.scatter(vals, np.full(len(vals), i) + np.linspace(-0.2, 0.2, len(vals)), s=10)
    ax.set_yticks(range(len(ops)), ops, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("range spread: largest channel max|x| / median channel's")
    ax.set_title("where the activation outliers are (one dot per input)")


def plot(done, path):
    """One panel per study that ran (damage bars, the ablation's paired MSE, the outlier dots); None if none."""
    from .report import pyplot, save_figure

    panels = [(draw, key) for draw, key in ((_damage_panel, "damage"), (_ablation_panel, "ablation"),
                                            (_outlier_panel, "channel_errors")) if done.get(key)]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (draw, _) in zip(axes[0], panels, strict=True):
        draw(ax, done)
    return save_figure(fig, path)


def best_row(done):
    """The ablation's best row: the kept row of least selection damage (greedy: ties are kept, so the last kept
    row may be a little worse than the one it was built on) or the lowest paired MSE (cumulative); None without
    one."""
    from .report import per_seed

    ablation = done.get("ablation") or {}
    kept = [(row["selection_mse"], v) for v, (_, _, row) in ablation.items()
            if row["kept"] and row["selection_mse"] is not None]
    if kept:
        return min(kept)[1]
    scored = [(float(np.nanmean(per_seed(r, "paired_mse_vs_fp32"))), v) for v, (_, r, _) in ablation.items()]
    return min(scored)[1] if scored else None


def write_outputs(cfg, done, seconds=None) -> str:
    from ..core import storage
    from ..core.cli import command
    from .report import plot_grids

    folder = w4a4_dir(cfg)
    fig = plot(done, os.path.join(folder, "w4a4.png"))
    best = best_row(done)
    grids = None
    if best and "fp32" in done:  # the best W4A4 row beside fp32 and plain rounding, same noise
        shown = {"fp32": done["fp32"], **{v: done["ablation"][v][1] for v in dict.fromkeys(
            [technique_variant(()), best]) if v in done["ablation"]}}
        grids = plot_grids(folder, shown, folder, name="w4a4_grids.png")
    md = summary_markdown(cfg, done, seconds, grids=grids is not None)
    for name, made in (("w4a4.png", fig), ("w4a4_grids.png", grids)):  # an earlier run's figure, not this summary's
        if not made and os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    storage.atomic_write_csv(rows(done), COLUMNS, os.path.join(folder, "w4a4.csv"))
    storage.atomic_write_text(md, os.path.join(folder, "w4a4.md"))
    row_seconds = {v: row.get("seconds") for v, (_, _, row) in (done.get("ablation") or {}).items()}
    storage.atomic_write_record({"channel_errors": done.get("channel_errors"), "ablation_seconds": row_seconds},
                                os.path.join(folder, "w4a4.json"))
    storage.write_sources(os.path.join(folder, "w4a4.sources.json"),
                          [os.path.join(folder, f) for f in ("w4a4.csv", "w4a4.md", "w4a4.json")]
                          + [f for f in (fig, grids) if f],
                          [os.path.join(folder, v, "metrics.json") for _, v, _, _ in _variants(done)], command(cfg))
    return md
