"""One weight + activation quantized variant: calibrate -> activation importance -> allocate -> save ->
reload -> evaluate, each step reused while its inputs are unchanged.

A variant is (plan, budget, range mode). Plans: ``uniform`` (every module at the budget's WxAy) or the
exact allocator ``common.quant.allocate.allocate_wa`` fed one sensitivity for weights and one for activations:
``fisher`` (element-resolved weight Fisher, ``fisher_distortion``, plus the activation Fisher of
``common.importance.activations``), and the controls ``magnitude`` (mean |w| and mean |a|, each times the squared
error its quantizer causes), ``random`` (U(0, 1) per tensor and per input) and ``quant_error`` (the squared
errors alone). Range modes: ``single`` (one range per input for every timestep) or ``group``
(``act_quant.timestep_groups`` ranges, chosen by the timestep being sampled).

Calibrated ranges (``ranges_<mode>.safetensors``) and activation importance (``act_importance_<mode>.json``)
are cached in ``baseline/act_quant/`` beside the checkpoint, each with a fingerprint of its inputs.
"""
import hashlib
import json
import os

from ..core import distributed, lock, storage
from ..core.budget import budget_bits, parse_wa_budget
from ..core.config import to_dict
from ..diffusion.data import mnist_tensor
from ..diffusion.samplers import build_sampler
from ..diffusion.schedule import NoiseSchedule
from ..evaluation import evaluate
from ..importance.activations import activation_importance
from ..importance.weights import random_scores
from ..quant.activations import (
    ActQuantizer,
    attention_projections,
    concat_splits,
    group_of,
    layer_quants,
    load_act_quant,
    quantizable_modules,
    quantizer_digest,
    save_act_quant,
)
from ..quant.allocate import (
    InfeasibleBudgetError,
    allocate_steps,
    allocate_wa,
    format_bits,
    layer_bops,
    uniform_wa_choice,
)
from ..quant.calibrate import calibration_timesteps, collect_ranges
from ..quant.container import QUANTIZED_FILE, arch_record, load_quantized, save_quantized, stored_digest
from ..quant.formats import Assignment, quantize_model
from .pipeline import ensure_importance, ensure_rule_fisher

PLAN_WEIGHT_METRIC = {"fisher": "fisher_distortion", "magnitude": "magnitude", "random": "random",
                      "quant_error": "quant_error"}


def mode_groups(cfg, mode: str) -> int:
    return 1 if mode == "single" else cfg.act_quant.timestep_groups


def act_layout(cfg, model):
    """(quantizable module names, inputs kept at act_quant.keep_bits, {name: concat split}, per-token names)."""
    aq = cfg.act_quant
    names = quantizable_modules(model)
    kept = set(model.ends) & set(names) if aq.keep_first_last else set()
    splits = concat_splits(model) if aq.split_concat else {}
    token = attention_projections(model) if aq.per_token_attention else set()
    return names, kept, splits, token


def input_quants(cfg, model, ranges, bits: dict) -> dict:
    """{module: LayerQuant} of the inputs in ``bits`` ({module: b or None = float}) under the config's layout
    (``act_layout``: per-token ranges for the attention projections with ``act_quant.per_token_attention``,
    two-part ranges for skip concatenations with ``split_concat``, ``act_quant.symmetric``; with
    ``act_quant.block_size`` every input dynamic per block of channels instead); the one builder of the
    W/A pipeline, ``make lowbit`` and ``make finetune``."""
    _, _, splits, token = act_layout(cfg, model)
    return layer_quants(ranges, bits, cfg.act_quant.symmetric, token, splits, cfg.act_quant.block_size)


def scale_bits(block: int) -> float:
    """Bits per value of a quantized input that its per-block scales add: one 8-bit scale per ``block`` values;
    0 without blocks."""
    return 8 / block if block else 0.0


def block_scale_bits(macs: dict, quantized, block: int) -> float:
    """``scale_bits`` per activation MAC-weighted over every input of ``macs`` (only the ``quantized`` ones carry
    scales)."""
    if not block:
        return 0.0
    return scale_bits(block) * sum(macs[n] for n in quantized) / sum(macs.values())


def end_bits(cfg, kept) -> dict:
    """{input: bits} of the kept ends: ``act_quant.keep_bits`` each, none while that is float."""
    return dict.fromkeys(kept, cfg.act_quant.keep_bits) if cfg.act_quant.keep_bits else {}


def input_bits(cfg, names, kept, a_bits) -> dict:
    """{input: bits} of a uniform plan: every allocatable input at ``a_bits``, the kept ends at ``end_bits``;
    none when ``a_bits`` is None (float activations)."""
    if a_bits is None:
        return {}
    ends = end_bits(cfg, kept)
    return {n: ends.get(n, a_bits) for n in names if n in ends or n not in kept}  # in the network's order


def act_quantizer(cfg, model, ranges, bits: dict, mode: str) -> ActQuantizer:
    """The ``ActQuantizer`` of ``input_quants`` with ``mode``'s timestep groups and ``act_quant.softmax_bits``."""
    return ActQuantizer(input_quants(cfg, model, ranges, bits), mode_groups(cfg, mode), cfg.diffusion.timesteps,
                        cfg.act_quant.softmax_bits)


def quantizer_inputs(cfg) -> dict:
    """What a quantizer of ``act_quantizer`` depends on beyond its bits and ranges: ``act_layout``'s settings and
    the softmax bits (``block_size`` and ``keep_bits`` only when set, so records made before stay valid)."""
    aq = cfg.act_quant
    return {"act_quant": {k: to_dict(aq)[k] for k in ("symmetric", "per_token_attention", "keep_first_last",
                                                      "split_concat", "softmax_bits")},
            **({"block_size": aq.block_size} if aq.block_size else {}),
            # the ends' inputs when not float (since 2026-12-07 in lowbit's plans and searches and w4a4's rows too)
            **({"keep_bits": aq.keep_bits, "ends": "keep_bits in every plan"} if aq.keep_bits else {})}


def _cache_dir(cfg) -> str:
    """Beside fisher.pt in the run's baseline folder (never beside released weights in checkpoints/)."""
    return os.path.join(storage.baseline_dir(cfg), "act_quant")


def range_inputs(cfg, mode: str, checkpoint_sha256: str, mse_bits=None) -> dict:
    """What the calibrated ranges of ``mode`` depend on (``mse_bits``: the least-MSE ranges at those bits, in place
    of ``act_quant.range_method``)."""
    aq = cfg.act_quant
    method = "mse" if mse_bits else aq.range_method
    return {"checkpoint_sha256": checkpoint_sha256, "sample": to_dict(cfg.sample), "diffusion": to_dict(cfg.diffusion),
            "groups": mode_groups(cfg, mode), "method": method,
            "percentile": aq.percentile if method == "percentile" else None, "images": aq.calib_images,
            "timesteps": aq.calib_timesteps, "seed": aq.calib_seed, "split_concat": aq.split_concat,
            **({"mse_bits": mse_bits} if mse_bits else {}),
            **({"symmetric": True} if method == "mse" and aq.symmetric else {})}  # least-MSE for that quantizer


def calibrated_ranges(cfg, model, names, mode: str, method: str, device, progress=True, mse_bits=4) -> dict:
    """``quant.calibrate.collect_ranges`` of ``model``'s inputs ``names`` by ``method`` under the config's
    calibration: ``act_quant.calib_*``, the sampler, ``mode``'s timestep groups and the concatenation splits."""
    aq = cfg.act_quant
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    return collect_ranges(model, sampler, names, shape, aq.calib_images,
                          calibration_timesteps(sampler, aq.calib_timesteps), mode_groups(cfg, mode), method,
                          aq.percentile, act_layout(cfg, model)[2], aq.calib_seed, cfg.sample.batch_size, device,
                          progress, mse_bits=mse_bits, symmetric=aq.symmetric)


def ensure_ranges(cfg, model, mode, checkpoint_sha256, device, progress=True, mse_bits=None) -> dict:
    """Calibrated ranges {module: (G, P, 2)} of ``mode`` by ``act_quant.range_method`` (``mse_bits``: the
    least-MSE ranges at those bits instead), reused from the cache when its inputs match (and its tensors their
    digest)."""
    path = os.path.join(_cache_dir(cfg), f"ranges_{mode}{f'_mse{mse_bits}' if mse_bits else ''}.safetensors")
    inputs = range_inputs(cfg, mode, checkpoint_sha256, mse_bits)
    method = inputs["method"]
    ranges = storage.reusable_tensors(path, inputs)
    if ranges is not None:
        print(f"[act_quant] reusing calibrated ranges {path}")
        return ranges
    ranges = calibrated_ranges(cfg, model, act_layout(cfg, model)[0], mode, method, device, progress,
                               mse_bits=mse_bits or 4)
    storage.save_sealed_tensors(ranges, path, inputs)
    print(f"[act_quant] {mode} {method} ranges from {cfg.act_quant.calib_images} calibration images -> {path}")
    return ranges


def ensure_weight_fisher(cfg, model, ckpt_path, fisher, device, progress=True) -> dict:
    """A weight Fisher over every conv / linear weight. The allocator may quantize all of them but the kept
    first and last conv (late_conv and the time MLP too, which the poster's stage rule leaves out), so the
    baseline's fisher.pt serves only when it covers them; else one is computed with the same fisher settings
    under the ``all_weights`` rule (same samples, so equal values on the shared tensors) and cached."""
    if {f"{n}.weight" for n in quantizable_modules(model)} <= set(fisher["diag"]):
        return fisher
    path = os.path.join(_cache_dir(cfg), "fisher_all_weights.pt")
    return ensure_rule_fisher(cfg, model, ckpt_path, "all_weights", path, device, progress)


def candidates(cfg, model, ranges, allocatable=True) -> dict:
    """{module: {bits: LayerQuant}}: the quantizers each module's input may get (allocatable modules: every
    act_quant.a_bits; kept ones: act_quant.keep_bits only, none when that is float)."""
    aq = cfg.act_quant
    names, kept, _, _ = act_layout(cfg, model)
    options = {n: ([aq.keep_bits] if aq.keep_bits else []) if n in kept else list(aq.a_bits)
               for n in names if not (n in kept and allocatable)}
    by_bits = {b: input_quants(cfg, model, ranges, {n: b for n, bs in options.items() if b in bs})
               for b in dict.fromkeys(b for bs in options.values() for b in bs)}
    return {n: {b: by_bits[b][n] for b in bs} for n, bs in options.items()}


def act_importance_inputs(cfg, mode: str, checkpoint_sha256: str) -> dict:
    """What the activation importance of ``mode`` depends on."""
    aq = cfg.act_quant
    return {"ranges": range_inputs(cfg, mode, checkpoint_sha256), "a_bits": aq.a_bits, "symmetric": aq.symmetric,
            "per_token_attention": aq.per_token_attention, "keep_first_last": aq.keep_first_last,
            "n_samples": aq.fisher_samples, "seed": cfg.fisher.seed, "train_limit": cfg.data.train_limit,
            **({"block_size": aq.block_size} if aq.block_size else {})}  # only then: earlier caches stay valid


def ensure_act_importance(cfg, model, mode, ranges, checkpoint_sha256, device, progress=True) -> dict:
    """Activation Fisher / squared error / mean |a| of the allocatable inputs under ``mode``'s ranges."""
    aq = cfg.act_quant
    path = os.path.join(_cache_dir(cfg), f"act_importance_{mode}.json")
    inputs = act_importance_inputs(cfg, mode, checkpoint_sha256)
    fp = storage.fingerprint(inputs)
    if os.path.exists(path):
        art = storage.load_json(path)
        if art.get("fingerprint") == fp:
            print(f"[act_quant] reusing activation importance {path}")
            return _int_bits(art)
    x_pool, _ = mnist_tensor(cfg.data, "train")
    art = activation_importance(model, NoiseSchedule.from_config(cfg.diffusion), x_pool,
                                candidates(cfg, model, ranges), mode_groups(cfg, mode), aq.fisher_samples,
                                aq.fisher_chunk, cfg.fisher.seed, device, progress)
    art.update(fingerprint=fp, inputs=inputs)
    storage.atomic_write_record(art, path)
    print(f"[act_quant] activation Fisher over {aq.fisher_samples} samples in {art['meta']['seconds']} s -> {path}")
    return _int_bits(json.loads(json.dumps(art)))


def _int_bits(art: dict) -> dict:
    """JSON keeps the bit widths as strings; the allocator wants ints."""
    for key in ("fisher", "mse"):
        art[key] = {n: {int(b): v for b, v in d.items()} for n, d in art[key].items()}
    return art


def activation_costs(plan: str, imp: dict, seed: int) -> dict:
    """{module: {bits: estimated loss increase}} of ``plan`` (the sensitivity times the squared error)."""
    names = list(imp["mse"])
    if plan == "fisher":
        return imp["fisher"]
    scores = {"magnitude": imp["abs_mean"], "quant_error": dict.fromkeys(names, 1.0),
              # seed + 1: draws independent of the weights' random scores, which use ``seed``
              "random": random_scores(names, seed + 1) if plan == "random" else None}[plan]
    return {n: {b: 0.5 * scores[n] * e for b, e in imp["mse"][n].items()} for n in names}


def layer_table(cfg, model, macs: dict, eligible: set, w_cost=None, a_cost=None):
    """(allocator layers, fixed stored bits, parameter count): per module its MACs, weight options
    {format: (cost, stored bits)} (fp32 only outside the eligible weights) and input options {bits: cost}
    (act_quant.keep_bits only for kept inputs). Costs are 0 where not given (the uniform plan)."""
    aq = cfg.act_quant
    names, kept, _, _ = act_layout(cfg, model)
    params = dict(model.named_parameters())
    wnames = [f"{n}.weight" for n in names if f"{n}.weight" in eligible]
    bits = format_bits(model, wnames, aq.w_formats)
    layers = {}
    for n in names:
        w = f"{n}.weight"
        if w in eligible:
            wopt = {f: ((w_cost[w][f] if w_cost else 0.0), bits[w][f]) for f in aq.w_formats}
        else:
            wopt = {"fp32": (0.0, 32 * params[w].numel())}
        aopt = {aq.keep_bits: 0.0} if n in kept else {b: (a_cost[n][b] if a_cost else 0.0) for b in aq.a_bits}
        layers[n] = {"macs": macs[n], "w": wopt, "a": aopt}
    total = sum(p.numel() for p in params.values())
    fixed = 32 * (total - sum(params[f"{n}.weight"].numel() for n in names))
    return layers, fixed, total


def choose(cfg, plan, budget, model, macs, ckpt_path, fisher, imp, device):
    """({module: (weight format, activation bits)}, info) of ``plan`` at ``budget``; ``fisher`` covers every
    conv / linear weight (``ensure_weight_fisher``)."""
    names, kept, _, _ = act_layout(cfg, model)
    eligible = {f"{n}.weight" for n in names if n not in kept}
    if plan == "uniform":
        parts = parse_wa_budget(budget)
        wa = [v for k, v in parts if k == "wa"]
        if not wa:
            raise ValueError(f"budget {budget!r}: the uniform plan needs a 'WxAy' budget")
        layers, fixed, total = layer_table(cfg, model, macs, eligible)
        choice = uniform_wa_choice(layers, *wa[0])
        used = fixed + sum(layers[n]["w"][f][1] for n, (f, _) in choice.items())
        for (kind, _), raw in zip(parts, str(budget).split("&"), strict=True):
            if kind not in ("wa", "gbops") and used > budget_bits(raw, total):  # 'WxAy&<size>': both must hold
                raise InfeasibleBudgetError(
                    f"budget {budget!r}: uniform W{wa[0][0]}A{wa[0][1]} stores {used / total:.3g} bits per weight, "
                    f"above the size part {raw.strip()!r} ({budget_bits(raw, total) / total:.3g}); only the "
                    f"allocating plans can meet both")
        return choice, {"budget": budget, "bops": sum(layer_bops(macs[n], *o) for n, o in choice.items()),
                        "bits_used": used, "avg_bits": used / total, "choice": {n: list(o) for n, o in choice.items()}}
    w_cost = ensure_importance(cfg, PLAN_WEIGHT_METRIC[plan], model, ckpt_path, fisher, device,
                               folder=os.path.join("act_quant", "importance"))["cost"]
    a_cost = activation_costs(plan, imp, cfg.importance.seed)
    layers, fixed, total = layer_table(cfg, model, macs, eligible, w_cost, a_cost)
    return allocate_wa(layers, budget, total, fixed)


# plans that allocate activation bits across timestep groups too: the per-input plan they start from
STEP_PLANS = {"fisher_steps": "fisher"}


def group_step_shares(per_step: dict, groups: int, timesteps: int):
    """(fractions, shares) per timestep group: the share of the sampler's steps in each group and the summed
    ``per_step`` share of the final sample's sensitivity ({t: share}, ``importance.chain``) of those steps."""
    g_of = {t: int(group_of(t, groups, timesteps)) for t in per_step}
    fractions = [sum(g == k for g in g_of.values()) / len(g_of) for k in range(groups)]
    shares = [sum(v for t, v in per_step.items() if g_of[t] == k) for k in range(groups)]
    return fractions, shares


def mean_bits(b, fractions):
    """An input's bits averaged over the sampler's steps (float = 32)."""
    if isinstance(b, list):
        return sum(f * x for f, x in zip(fractions, b, strict=True))
    return b or 32


def step_record(choice: dict, macs: dict, info: dict) -> dict:
    """For a plan with bits per timestep group: its MAC-weighted activation bits in each group (allocated inputs
    only) beside each group's share of the final sample's sensitivity; {} for any other plan."""
    steps = info.get("steps")
    if not steps:
        return {}
    per = [(macs[n], b) for n, (_, b) in choice.items() if isinstance(b, list)]
    total = sum(m for m, _ in per) or 1
    return {"a_bits_by_group": [sum(m * b[g] for m, b in per) / total for g in range(len(steps["shares"]))],
            "group_sensitivity_shares": steps["shares"], "group_step_fractions": steps["fractions"]}


def plan_choice(cfg, plan, budget, mode, model, ckpt_path, fisher, macs, device, progress=True, per_step=None):
    """(choice, info, ranges) of ``plan`` at ``budget``: ``choose`` with its cached inputs (the all-weights Fisher,
    ``mode`` ranges and, but for the uniform plan, the activation importance). A ``STEP_PLANS`` plan re-allocates
    its per-input plan's activation bits per timestep group of ``mode`` (``quant.allocate.allocate_steps``) by
    ``per_step`` ({sampler timestep: share of the final sample's sensitivity}), within the same BOPs limit."""
    sha = fisher["meta"]["checkpoint_sha256"]
    fisher = ensure_weight_fisher(cfg, model, ckpt_path, fisher, device, progress)
    ranges = ensure_ranges(cfg, model, mode, sha, device, progress)
    imp = None if plan == "uniform" else ensure_act_importance(cfg, model, mode, ranges, sha, device, progress)
    base = STEP_PLANS.get(plan, plan)
    choice, info = choose(cfg, base, budget, model, macs, ckpt_path, fisher, imp, device)
    if plan in STEP_PLANS:
        if not per_step:
            raise ValueError(f"plan {plan!r} allocates across sampler steps: it needs their sensitivity shares")
        fractions, shares = group_step_shares(per_step, mode_groups(cfg, mode), cfg.diffusion.timesteps)
        _, kept, _, _ = act_layout(cfg, model)
        a_cost = {n: c for n, c in activation_costs(base, imp, cfg.importance.seed).items()
                  if n not in kept and choice[n][1]}
        choice, steps = allocate_steps(choice, macs, a_cost, cfg.act_quant.a_bits, fractions, shares,
                                       info["limits"]["bops"])
        info = {**info, "bops": steps["bops"], "steps": {**steps, "fractions": fractions, "shares": shares},
                "choice": {n: list(o) for n, o in choice.items()}}
    return choice, info, ranges


def run_act_variant(cfg, variant, plan, budget, mode, model, ckpt_path, fisher, macs, device, force=False,
                    progress=True, per_step=None):
    """Quantize weights and activations by ``plan`` at ``budget`` with ``mode`` ranges, save both files,
    rebuild the model from them and evaluate it (metrics.json with w_bits, a_bits, bops). The variant's
    folder is locked throughout, as ``pipeline.run_variant`` locks a weights-only variant."""
    with lock.hold(evaluate.variant_dir(cfg, variant)):
        return _run_act_variant(cfg, variant, plan, budget, mode, model, ckpt_path, fisher, macs, device, force,
                                progress, per_step)


def _run_act_variant(cfg, variant, plan, budget, mode, model, ckpt_path, fisher, macs, device, force, progress,
                     per_step=None):
    aq = cfg.act_quant
    sha = fisher["meta"]["checkpoint_sha256"]
    choice, info, ranges = plan_choice(cfg, plan, budget, mode, model, ckpt_path, fisher, macs, device, progress,
                                       per_step)
    _, stored = quantize_model(model, {f"{n}.weight": Assignment(f) for n, (f, _) in choice.items() if f != "fp32"})
    q = act_quantizer(cfg, model, ranges, {n: b for n, (_, b) in choice.items()}, mode)
    total_macs = sum(macs.values())
    fractions = info.get("steps", {}).get("fractions")
    bits = {n: mean_bits(b, fractions) for n, (_, b) in choice.items()}  # over the sampler's steps, float = 32
    a_bits = sum(macs[n] * bits[n] for n in choice) / total_macs  # MAC-weighted
    extra = {"strategy": "act_quant", "plan": plan, "budget": budget, "range_mode": mode,
             "checkpoint_sha256": sha,
             "quantized_weights": "every conv / linear weight" + (" but the first and last conv's"
                                                                  if aq.keep_first_last else ""),
             "w_bits": info["avg_bits"], "a_bits": a_bits,
             **({"a_block": aq.block_size, "a_bits_effective": a_bits + block_scale_bits(
                 macs, [n for n, (_, b) in choice.items() if b is not None], aq.block_size)}
                if aq.block_size else {}),
             "bops": int(info["bops"]), "gbops": info["bops"] / 1e9, "macs": total_macs,
             "bops_unit": "bit-operations per U-Net evaluation (MACs x w_bits x a_bits, float = 32 bits)",
             **step_record(choice, macs, info)}
    provenance = {"plan": plan, "budget": budget, "range_mode": mode, "checkpoint_sha256": sha,
                  "ranges": range_inputs(cfg, mode, sha), "act_quant": to_dict(aq)}
    per_module = {n: {"w_format": f, "a_bits": b, "macs": macs[n], "bops": layer_bops(macs[n], f, bits[n])}
                  for n, (f, b) in choice.items()}
    print(f"[{variant}] {extra['gbops']:.4g} GBOPs, {extra['w_bits']:.2f} bits/weight, "
          f"{extra['a_bits']:.2f} bits/activation (MAC-weighted)")
    return save_and_evaluate(cfg, variant, model, stored, q, extra, provenance,
                             {"allocation": info, "modules": per_module}, device, force, progress)


def save_and_evaluate(cfg, variant, model, stored, q, extra, provenance, plan_record, device, force=False,
                      progress=True, arch=None):
    """Reuse the variant's results if intact, else write ``quantized.safetensors`` (``stored``),
    ``act_quant.safetensors`` (the activation quantizer ``q``) and ``plan.json`` (``plan_record`` + ``extra``),
    rebuild the model from the two files and evaluate it (``metrics.json`` binds all three). ``arch``: the
    network the file records (``container.arch_record``; default: the config's plain network, no extras).
    ``model`` (the fp32 network) sizes ``fp32_bytes``. The caller holds the variant's lock."""
    weights_id = hashlib.sha256((stored_digest(stored) + quantizer_digest(q)).encode()).hexdigest()
    # ranks that evaluate one variant together must hold the same one (a GPU backward or SVD can differ in its
    # last bits between ranks, and a tie then turns into another plan): rank 0's files, the others' samples
    if distributed.broadcast_object(weights_id) != weights_id:
        raise RuntimeError(f"{variant}: rank {distributed.rank()} built other weights or activation quantizers than "
                           f"rank 0 (weights_id differs); rerun on one process, or make the computation deterministic")
    out = evaluate.variant_dir(cfg, variant)
    metrics_path = os.path.join(out, "metrics.json")
    qpath, apath = os.path.join(out, QUANTIZED_FILE), os.path.join(out, "act_quant.safetensors")
    old = evaluate.reusable(cfg, metrics_path, evaluate.result_fingerprint(cfg, weights_id, extra), force)
    if old is not None:
        print(f"[{variant}] reusing {metrics_path}")
        return old
    arch = arch or arch_record(cfg)
    size = save_quantized(stored, qpath, arch, provenance)
    save_act_quant(q, apath, provenance)
    size.update(size_bytes=size["stored_bytes"], fp32_bytes=4 * sum(p.numel() for p in model.parameters()),
                act_file_bytes=os.path.getsize(apath))
    plan_path = os.path.join(out, "plan.json")
    storage.atomic_write_record({"variant": variant, **extra, **plan_record, "size": size,
                                 "quantized_file": QUANTIZED_FILE, "quantized_sha256": storage.sha256_file(qpath)},
                                plan_path)
    # Sample from what was stored: the weights and the activation quantizers rebuilt from their files.
    qmodel, _ = load_quantized(qpath, device)
    load_act_quant(apath)[0].attach(qmodel)
    print(f"[{variant}] {size['stored_bytes']:,} B of weights; {qpath}, {apath}")
    # the model is rebuilt from the two files alone: a variant of this run with the same tensors and architecture
    # lends its samples (another plan rule that allocated the same formats)
    return evaluate.evaluate_variant(cfg, variant, qmodel, size, device, weights_id, force=force,
                                     progress=progress, extra=extra, quantized_path=qpath, bound=[plan_path, apath],
                                     samples_key=evaluate.samples_key(weights_id, arch))
