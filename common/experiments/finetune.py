"""W4A4 that holds up: reconstruction (Q-Diffusion / BRECQ-style AdaRound) and selective finetuning (QuEST), with
Fisher information choosing what to train.

Every conv / linear weight but the first and last conv's is stored in b-bit integer codes (per output channel;
the two ends in ``lowbit.keep_format``) and every quantized input at a bits with per-timestep-group ranges
(``finetune.range_mode``), the budget 'W4A4' naming both. Calibration data comes from the teacher: the fp32
model's own sampling trajectories (x_t, t) over the whole chain from ``finetune.calib_seed`` (never an evaluation
seed), or, with ``finetune.calib_source: noised``, training images noised by q(x_t | x_0). Methods:

* ``none``: round to nearest, calibrated min-max ranges (plain post-training quantization);
* ``reconstruction``: per layer, AdaRound's learned rounding and LSQ steps for its input minimise the squared
  error of the layer's output against the fp32 layer on the fp32 layer's calibration inputs;
* ``quest``, ``fisher``, ``all``: finetuning with the weights' quantizer in the loop (straight-through) and LSQ
  steps for every quantized input, loss = ||eps_student - eps_teacher||^2 + ``local_weight`` * mean over the
  trained layers of their output MSE against the teacher's; ``quest`` trains QuEST's choice (the time-embedding
  path: time MLP and every time_proj, and the attention projections), ``fisher`` the same number of layers with
  the largest weight + activation Fisher (the one-step estimate ½ΣFΔW² at the budget's weight bits plus the
  activation Fisher at its activation bits), ``all`` every quantized layer.

``finetune.plans`` (e.g. '3bits@A8') trains ``make lowbit``'s stored plans the same way: the student takes the
plan's per-tensor formats (group-wise scales included) and starts from its codes (GPTQ's), at the budget's
activation bits; variants ``<method>_<plan_source>_<budget>``.

After optimisation the learned codes and steps are exported to ``quantized.safetensors`` and
``act_quant.safetensors`` and the variant is evaluated from those files (``act_pipeline.save_and_evaluate``).
"""
import copy
import json
import os
import time

import numpy as np
import torch
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..core import distributed, lock, machine, storage
from ..core.budget import parse_size_at_bits, parse_wa_budget, size_at_bits_tag
from ..core.cli import command
from ..core.config import to_dict
from ..core.errors import UserError
from ..core.format_names import format_spec
from ..diffusion.data import mnist_tensor
from ..diffusion.samplers import build_sampler
from ..diffusion.schedule import NoiseSchedule
from ..evaluation import evaluate
from ..importance.fisher import draw_samples
from ..importance.weights import fisher_distortion_costs
from ..quant.activations import ActQuantizer, attention_projections, channel_dim, group_of
from ..quant.backends import calibration_inputs
from ..quant.container import read_quantized
from ..quant.eligibility import eligible_names, end_convs
from ..quant.formats import channel_axes, dequantize_tensor, quantize_tensor
from ..quant.hooks import output_hooks
from ..quant.learnable import GRADIENT_VERSION, LearnedActQuant, WeightQuant, export_weight
from . import lowbit, pipeline
from .act_pipeline import (
    act_importance_inputs,
    act_layout,
    ensure_act_importance,
    ensure_ranges,
    input_bits,
    input_quants,
    mode_groups,
    quantizer_inputs,
    range_inputs,
    save_and_evaluate,
)
from .report import mean_sd, per_seed, pyplot, save_figure, write_summary_files
from .statistics import target_verdict, verdict_table

METHODS = ("none", "reconstruction", "quest", "fisher", "all")
COLUMNS = ["budget", "method", "seed", "variant", "trainable_params", "steps", "seconds", "paired_mse_vs_fp32",
           "paired_mse_median", "clf_fid", "clf_is"]


def finetune_config(cfg):
    """``cfg`` with the comparison's sample budget, writing under runs/<run>/finetune/."""
    c = pipeline.sub_run_config(cfg, "finetune", cfg.finetune)
    c.act_quant.range_modes = [cfg.finetune.range_mode]
    return c


def finetune_dir(cfg) -> str:
    return storage.run_dir(finetune_config(cfg))


def quest_layers(model) -> list:
    """QuEST's rule: the time-embedding path (the U-Net's time MLP and ResBlock time projections, the DiT's
    time MLP and adaLN modulations) and the attention projections, among the quantized layers."""
    names = [n.removesuffix(".weight") for n in eligible_names(model, lowbit.RULE)]
    attention = attention_projections(model)
    return [n for n in names if model.time_path(n) or n in attention]


# ----------------------------------------------------------------------------- data and the student
def sampler_inputs(c) -> dict:
    """What of ``sample`` decides a sampler's trajectories (not the batch or the grid)."""
    return {k: to_dict(c.sample)[k] for k in ("sampler", "steps", "eta")}


def pool_inputs(c, checkpoint_sha256: str) -> dict:
    """What the teacher's calibration pool depends on."""
    ft = c.finetune
    inputs = {"checkpoint_sha256": checkpoint_sha256, "source": ft.calib_source, "images": ft.calib_images,
              "seed": ft.calib_seed, "diffusion": to_dict(c.diffusion),
              "shape": [c.model.in_channels, c.data.image_size, c.data.image_size]}
    if ft.calib_source == "noised":
        inputs["train_limit"] = c.data.train_limit
    else:
        inputs["sampler"] = sampler_inputs(c)
    return inputs


def ensure_pool(c, model, checkpoint_sha256, device, progress=True):
    """``calibration_pool``, cached in the comparison's baseline folder (``calib_pool.safetensors``, sealed with
    ``pool_inputs`` and a digest of its tensors) and recomputed when an input changed or the file is damaged.
    Returns (x, t) on the CPU."""
    path = os.path.join(storage.baseline_dir(c), "calib_pool.safetensors")
    inputs = pool_inputs(c, checkpoint_sha256)
    pool = storage.reusable_tensors(path, inputs)
    if pool is not None:
        print(f"[finetune] reusing the teacher's calibration pool {path}")
        return pool["x"], pool["t"]
    x, t = calibration_pool(c, model, device, progress)
    storage.save_sealed_tensors({"x": x, "t": t}, path, inputs)
    print(f"[finetune] teacher's calibration pool ({len(x)} inputs, {c.finetune.calib_source}) -> {path}")
    return x, t


def calibration_pool(c, model, device, progress=True):
    """(x_t, t) pairs the teacher meets: its sampling trajectories from ``calib_seed`` (every step), or noised
    training images. Returns (x (N, C, H, W), t (N,)) on the CPU."""
    ft = c.finetune
    shape = (c.model.in_channels, c.data.image_size, c.data.image_size)
    if ft.calib_source == "noised":
        x0, t, eps = draw_samples(mnist_tensor(c.data, "train")[0], ft.calib_images * 20, c.diffusion.timesteps,
                                  ft.calib_seed)
        return NoiseSchedule.from_config(c.diffusion).q_sample(x0, t, eps), t
    sampler = build_sampler(c.sample, NoiseSchedule.from_config(c.diffusion))
    pairs = calibration_inputs(model, sampler, ft.calib_images, shape, ft.calib_seed, progress=progress)
    return torch.cat([x for x, _ in pairs]).cpu(), torch.cat([t.expand(len(x)) for x, t in pairs]).cpu()


class Student:
    """A copy of the fp32 model whose quantized weights are parametrized (``WeightQuant``) and whose quantized
    inputs pass the W/A pipeline's quantizers (``act_pipeline.input_quants``), the per-tensor ones with learned
    steps (``aq``: LSQ), the per-token ones (``act_quant.per_token_attention``) as they are (dynamic ranges have no
    step to learn); ``export`` writes what it has learned as stored entries and an ``ActQuantizer``. The copy is in
    eval mode, like the teacher: dropout would make the student's output random where the teacher's is not."""

    def __init__(self, c, model, w_bits, a_bits, ranges, mode, start=None):
        """``w_bits``: every quantized weight in ``int<w_bits>`` codes per output channel, or {weight: format}
        (a plan's per-tensor formats, group-wise ones included); ``start``: {weight: stored entry} of the same
        formats whose scales the weights keep and whose values they start from (a plan's GPTQ codes: untrained,
        the export is the plan); AdaRound starts from the fp32 weights instead, its rounding being a choice
        between the two grid points around each of them. The ends keep ``start``'s entries."""
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        params, axes = dict(model.named_parameters()), channel_axes(model)
        start = start or {}
        self.names = eligible_names(model, lowbit.RULE)
        # a plan's formats cover every quantized weight (run_finetune refuses one that does not)
        formats = w_bits if isinstance(w_bits, dict) else {n: f"int{w_bits}" for n in self.names}
        self.ends = end_convs(model)
        self.keep = {n: start.get(n) or quantize_tensor(params[n], c.lowbit.keep_format, axes[n]) for n in self.ends}
        own = dict(self.model.named_parameters())
        with torch.no_grad():  # the ends hold their stored values, the rest start from ``start``'s where given
            values = [] if mode == "adaround" else [(n, start[n]) for n in self.names if n in start]
            for n, e in [*self.keep.items(), *values]:
                own[n].copy_(dequantize_tensor(e).to(own[n].device))
        mods = dict(self.model.named_modules())
        self.wq = {}
        for n in self.names:
            mod = mods[n.removesuffix(".weight")]
            self.wq[n] = WeightQuant(own[n], formats[n], axes[n], mode, start[n]["scale"] if n in start else None)
            parametrize.register_parametrization(mod, "weight", self.wq[n])
        names, kept, _, _ = act_layout(c, model)
        quants = input_quants(c, model, ranges, input_bits(c, names, kept, a_bits))
        self.aq = {n: LearnedActQuant(q) for n, q in quants.items() if q.granularity == "tensor"}
        self.quantizer = ActQuantizer({n: self.aq.get(n, q) for n, q in quants.items()},
                                      mode_groups(c, c.finetune.range_mode), c.diffusion.timesteps,
                                      c.act_quant.softmax_bits).attach(self.model)
        for m in list(self.wq.values()) + list(self.aq.values()):  # the methods switch on what they train
            m.requires_grad_(False)
        self.model.eval()  # the parametrizations too

    def original(self, n):
        """The trainable tensor under the parametrization of weight ``n``."""
        mod = dict(self.model.named_modules())[n.removesuffix(".weight")]
        return mod.parametrizations.weight.original

    def export(self, fp32_model):
        stored = {}
        for n, p in fp32_model.named_parameters():
            if n in self.wq:
                stored[n] = export_weight(self.wq[n], self.original(n))
            elif n in self.keep:
                stored[n] = self.keep[n]
            else:
                stored[n] = {"format": "fp32", "data": p.detach().cpu().clone()}
        q = ActQuantizer({n: self.aq[n].export() if n in self.aq else lq for n, lq in self.quantizer.layers.items()},
                         self.quantizer.groups, self.quantizer.timesteps, self.quantizer.softmax_bits)
        return stored, q


# ----------------------------------------------------------------------------- methods
def reconstruct(c, student, teacher, pool, progress=True):
    """Layer by layer: AdaRound rounding + the layer's input LSQ steps, minimising the output error against the
    fp32 layer on the fp32 inputs of ``pool``. Returns (optimisation steps, loss history summary)."""
    ft = c.finetune
    device = next(teacher.parameters()).device
    smods = dict(student.model.named_modules())
    layers = [n.removesuffix(".weight") for n in student.names]
    gen = torch.Generator().manual_seed(ft.calib_seed)
    idx = torch.randperm(len(pool[0]), generator=gen)[:ft.recon_samples]
    x, t = pool[0][idx].to(device), pool[1][idx].to(device)
    captured, group_t = {}, {}
    with torch.no_grad(), output_hooks(teacher, layers, lambda n, a, o: captured.__setitem__(n, (a[0], o))):
        for b in range(0, len(x), 64):
            teacher(x[b:b + 64], t[b:b + 64])
            for n in layers:
                i, o = captured[n]
                group_t.setdefault(n, []).append((i, o, t[b:b + 64]))
    steps, first, last = 0, [], []
    bar = tqdm(layers, desc="reconstruct", disable=not progress)
    for n in bar:
        # the layer's input quantizer: learned steps (trained here too) or per-token ranges (applied as they are)
        mod, wq, aq = smods[n], student.wq[f"{n}.weight"], student.quantizer.layers.get(n)
        params = [wq.v] + ([aq.step] if n in student.aq else [])
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=ft.recon_lr)
        ins = torch.cat([i for i, _, _ in group_t[n]])
        outs = torch.cat([o for _, o, _ in group_t[n]])
        ts = torch.cat([tt for _, _, tt in group_t[n]])
        groups = group_of(ts, student.quantizer.groups, c.diffusion.timesteps)
        for k in range(ft.recon_iters):
            sel = torch.randint(0, len(ins), (min(ft.recon_batch, len(ins)),), generator=gen).to(device)
            xi = ins[sel] if aq is None else aq.apply(ins[sel], groups[sel], channel_dim(ins, mod))
            out = mod.forward(xi)  # forward() skips the pre-hook: the input was quantized above
            rec = (out - outs[sel]).pow(2).mean()
            beta = 20 - (20 - 2) * k / max(1, ft.recon_iters - 1)
            loss = rec + ft.recon_lambda * wq.regularizer(beta) / wq.v.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if k == 0:
                first.append(rec.item())
        last.append(rec.item())
        steps += ft.recon_iters
        for p in params:
            p.requires_grad_(False)
        del group_t[n]
    return steps, {"layers": len(layers), "first_mse_mean": float(np.mean(first)),
                   "last_mse_mean": float(np.mean(last))}


def finetune(c, student, teacher, pool, layers, progress=True):
    """Train the weights of ``layers`` (straight-through) and every input's LSQ steps against the teacher:
    eps MSE + ``local_weight`` x the trained layers' output MSE. Returns (steps, loss summary)."""
    ft = c.finetune
    device = next(teacher.parameters()).device
    weights = [student.original(f"{n}.weight") for n in layers]
    steps_p = [a.step for a in student.aq.values()]
    local = layers if ft.local_weight else []
    for p in weights + steps_p:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": weights, "lr": ft.lr}, {"params": steps_p, "lr": ft.step_lr}])
    t_out, s_out = {}, {}
    gen = torch.Generator().manual_seed(ft.calib_seed + 1)
    losses = []
    try:
        with output_hooks(teacher, local, lambda n, a, o: t_out.__setitem__(n, o)), \
                output_hooks(student.model, local, lambda n, a, o: s_out.__setitem__(n, o)):
            for _ in tqdm(range(ft.steps), desc="finetune", disable=not progress):
                sel = torch.randint(0, len(pool[0]), (ft.batch_size,), generator=gen)
                x, t = pool[0][sel].to(device), pool[1][sel].to(device)
                with torch.no_grad():
                    eps_t = teacher(x, t)
                eps_s = student.model(x, t)
                loss = (eps_s - eps_t).pow(2).mean()
                if local:
                    loss = loss + ft.local_weight * sum((s_out[n] - t_out[n]).pow(2).mean() for n in local) / len(local)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    finally:
        for p in weights + steps_p:
            p.requires_grad_(False)
    k = max(1, len(losses) // 10)
    return ft.steps, {"first_loss": float(np.mean(losses[:k])), "last_loss": float(np.mean(losses[-k:]))}


def fisher_layers(model, fisher, imp, w_bits, a_bits, k, start=None):
    """The ``k`` quantized layers with the largest weight + activation Fisher estimate at this budget: ``fisher``
    the weight Fisher over the all_but_ends tensors (the one ``make lowbit`` caches), ``imp`` the activation
    importance (``act_pipeline.ensure_act_importance``); ``w_bits`` as ``Student`` takes it, the weight error
    that of ``start``'s stored entries where given (a plan's GPTQ codes), else of rounding to nearest. Returns
    (layers, {layer: score})."""
    params, axes = dict(model.named_parameters()), channel_axes(model)
    fmts = w_bits if isinstance(w_bits, dict) else {n: f"int{w_bits}" for n in fisher["diag"]}
    start = start or {}
    err = {n: {fmts[n]: params[n].detach().cpu() - (dequantize_tensor(start[n]) if n in start
                                                    else _dequant(params[n], fmts[n], axes[n]))}
           for n in fisher["diag"]}
    w_cost = fisher_distortion_costs(fisher["diag"], err)
    score = {}
    for n in eligible_names(model, lowbit.RULE):
        m = n.removesuffix(".weight")
        score[m] = w_cost[n][fmts[n]] + float((imp["fisher"].get(m) or {}).get(a_bits, 0.0))
    return sorted(score, key=lambda m: -score[m])[:k], score


def _dequant(w, fmt, axis):
    return dequantize_tensor(quantize_tensor(w, fmt, axis))


# ----------------------------------------------------------------------------- the comparison
def variant_name(method, budget, source="search"):
    """'fisher_W4A8'; a plan of ``make lowbit`` (budget '3bits@A8', plan ``source``): 'fisher_search_3bits_A8'."""
    return f"{method}_{source}_{size_at_bits_tag(budget)}" if is_plan(budget) else f"{method}_{budget}"


def is_plan(budget: str) -> bool:
    """A ``finetune.plans`` entry ('3bits@A8': make lowbit's stored plan) rather than a uniform 'WxAy'."""
    return "@" in budget


def budget_bits(budget: str, plan=None):
    """(weight bits, activation bits) of a 'WxAy' budget; of a plan budget ({weight: format}, activation bits)."""
    if is_plan(budget):
        return plan["formats"], parse_size_at_bits(budget)[1]
    (_, wa), = [p for p in parse_wa_budget(budget) if p[0] == "wa"]
    return wa


def plan_folder(cfg, budget: str) -> str:
    """The variant folder of ``make lowbit``'s stored plan at ``budget`` (``finetune.plan_source``, uniform menu)."""
    return evaluate.variant_dir(lowbit.lowbit_config(cfg), lowbit.variant_name(
        cfg.finetune.plan_source, "uniform", budget, cfg.lowbit.range_method))


def lowbit_plan(cfg, budget: str, sha: str) -> dict:
    """``make lowbit``'s stored plan at ``budget``: its ``finetune.plan_source`` variant on the uniform menu
    (with the run's ``lowbit.rounding`` and ``range_method``), checked intact and made from the checkpoint ``sha``
    first. {"file", "sha256",
    "formats": {weight: format} of the allocated tensors, "entries": every stored entry}."""
    folder = plan_folder(cfg, budget)
    path = os.path.join(folder, "quantized.safetensors")
    if not os.path.exists(os.path.join(folder, "metrics.json")):
        raise UserError(f"finetune.plans: {budget!r} trains make lowbit's stored plan {folder}, which does not exist: "
                        f"run `{command(cfg, 'lowbit.py')}` first (with {cfg.finetune.plan_source!r} in lowbit.plans, "
                        f"'uniform' in lowbit.quantizers and {budget!r} in lowbit.budgets; this run's lowbit.rounding "
                        f"{cfg.lowbit.rounding!r} and range_method {cfg.lowbit.range_method!r} name the folder)")
    evaluate.raise_first_problem(evaluate.integrity.check_variant(folder, sha), f"rerun `{command(cfg, 'lowbit.py')}`")
    entries = read_quantized(path)["tensors"]
    return {"file": os.path.relpath(path, storage.run_dir(cfg)), "sha256": storage.sha256_file(path),
            # the learned quantizers train the symmetric grid's codes: a midrise format is left out (refused below)
            "formats": {n: e["format"] for n, e in entries.items() if e["format"] != "fp32"
                        and format_spec(e["format"]).kind == "int" and not format_spec(e["format"]).midrise},
            "entries": entries}


def variant_inputs(cfg, c, sha: str, method: str, plan=None) -> dict:
    """Everything a finetuned variant depends on but the evaluation (``_reusable`` compares that apart): the
    checkpoint, the ``finetune`` settings, the ends' ``lowbit.keep_format``, the activation quantizers' layout and
    ranges, the teacher's calibration pool, for ``fisher`` the two Fisher estimates that choose its layers, and
    for a plan of ``make lowbit`` its stored file."""
    # which budgets, plans and methods a run makes changes none of them (a variant's name says its own)
    settings = {k: v for k, v in to_dict(cfg.finetune).items() if k not in ("budgets", "methods", "plans",
                                                                            "plan_source")}
    out = {"checkpoint_sha256": sha, "finetune": settings, "keep_format": cfg.lowbit.keep_format,
           "gradient_version": GRADIENT_VERSION,
           **quantizer_inputs(c), "ranges": range_inputs(c, cfg.finetune.range_mode, sha), "pool": pool_inputs(c, sha)}
    if method == "fisher":
        out["fisher"] = {"weights": {**pipeline.fisher_inputs(cfg), "eligible": lowbit.RULE},
                         "activations": act_importance_inputs(c, cfg.finetune.range_mode, sha)}
    if plan is not None:
        out["plan"] = {k: plan[k] for k in ("file", "sha256")}
    return json.loads(json.dumps(out, default=str))  # as metrics.json holds it


def run_finetune(cfg, device, force=False, progress=True):
    """Every (budget, method) variant: {variant: (budget, method, metrics)}.

    What the variants share (calibrated ranges, the teacher's calibration pool, the two Fisher estimates that
    choose the ``fisher`` layers) is computed once, under its folder's lock and on rank 0 first, before the
    variants are handed to the ranks; only what an unfinished variant needs."""
    c = finetune_config(cfg)
    ft = cfg.finetune
    model, ckpt_path, fisher = pipeline.load_artifacts(cfg, device, force=False, progress=progress)
    sha = fisher["meta"]["checkpoint_sha256"]
    ranges = pipeline.shared(c, lambda: ensure_ranges(c, model, ft.range_mode, sha, device, progress))
    done = {"fp32": (None, "fp32", distributed.rank0_first(
        lambda: pipeline.evaluate_fp32(c, model, ckpt_path, device, force, progress)))}
    quest = quest_layers(model)
    plans = {b: lowbit_plan(cfg, b, sha) for b in ft.plans}
    for b, plan in plans.items():
        if missing := [n for n in eligible_names(model, lowbit.RULE) if n not in plan["formats"]]:
            raise UserError(f"finetune.plans: {b!r}: {plan['file']} stores {missing[0]} in "
                            f"{plan['entries'][missing[0]]['format']}; only integer formats on the symmetric grid "
                            f"(per channel or group-wise: int4, int3_g64, ...) are trained, not codebooks or midrise "
                            f"grids (int3m, ...: lowbit.uniform_menu)")
    tasks = [(budget, method) for budget in ft.budgets + ft.plans for method in ft.methods]
    inputs = {(b, m): variant_inputs(cfg, c, sha, m, plans.get(b)) for b, m in tasks}
    name = {(b, m): variant_name(m, b, ft.plan_source) for b, m in tasks}
    todo = distributed.broadcast_object(  # rank 0's view: the others must agree on which caches to compute
        [task for task in tasks if not _reusable(cfg, c, name[task], inputs[task], force)]
        if distributed.is_main() else None)
    lc = lowbit.lowbit_config(cfg)

    def caches(todo, share):  # (calibration pool, {budget: fisher layers}) of the variants in ``todo``
        pool, chosen = None, {}
        if any(m != "none" for _, m in todo):
            pool = share(c, lambda: ensure_pool(c, model, sha, device, progress))
        if any(m == "fisher" for _, m in todo):
            w_fisher = share(lc, lambda: lowbit.ensure_fisher(lc, model, ckpt_path, progress, device))
            imp = share(c, lambda: ensure_act_importance(c, model, ft.range_mode, ranges, sha, device, progress))
            for budget in dict.fromkeys(b for b, m in todo if m == "fisher"):
                start = plans[budget]["entries"] if budget in plans else None
                chosen[budget] = fisher_layers(model, w_fisher, imp, *budget_bits(budget, plans.get(budget)),
                                               len(quest), start)[0]
        return pool, chosen

    pool, chosen = caches(todo, pipeline.shared)

    def one(task):
        budget, method = task
        variant = name[task]
        with lock.hold(evaluate.variant_dir(c, variant)):
            if _reusable(cfg, c, variant, inputs[task], force):
                print(f"[{variant}] reusing {evaluate.variant_dir(c, variant)}/metrics.json")
                return storage.load_json(os.path.join(evaluate.variant_dir(c, variant), "metrics.json"))
            mine, layers = pool, {"quest": quest, "fisher": chosen.get(budget)}.get(method)
            if task not in todo:  # reusable at the check above, changed since by another process: this rank alone
                mine, picked = caches([task], _locked)
                layers = picked.get(budget, layers)
            return optimise_and_evaluate(c, model, sha, ranges, budget, method, layers, mine, inputs[task], device,
                                         progress, plans.get(budget))

    # every variant on one rank of a torchrun (each alone, with its own lock and files), in this order
    for (budget, method), r in zip(tasks, distributed.map_tasks(tasks, one), strict=True):
        done[name[(budget, method)]] = (budget, method, r)
    return done


def _locked(cfg, compute):
    with lock.hold(storage.baseline_dir(cfg)):
        return compute()


def optimise_and_evaluate(c, model, sha, ranges, budget, method, layers, pool, inputs, device, progress, plan=None):
    """One variant: build the student, run ``method`` (``layers``: the ones ``quest`` / ``fisher`` train), export,
    save, evaluate from the files. ``plan``: ``lowbit_plan``'s, for a plan budget (its formats and codes)."""
    ft = c.finetune
    w_bits, a_bits = budget_bits(budget, plan)
    variant = variant_name(method, budget, ft.plan_source)
    t0 = time.time()
    student = Student(c, model, w_bits, a_bits, ranges, "adaround" if method == "reconstruction" else "ste",
                      plan["entries"] if plan else None)
    info, steps = {}, 0
    if method in ("reconstruction", "all"):
        layers = [n.removesuffix(".weight") for n in student.names]
    elif method == "none":
        layers = []
    if method == "reconstruction":
        steps, info = reconstruct(c, student, model, pool, progress)
    elif method in ("quest", "fisher", "all"):
        steps, info = finetune(c, student, model, pool, layers, progress)
    seconds = time.time() - t0
    params = dict(model.named_parameters())
    if method in ("quest", "fisher", "all"):
        trained = sum(params[f"{m}.weight"].numel() for m in layers)
    elif method == "reconstruction":
        trained = sum(student.wq[n].v.numel() for n in student.wq)
    else:
        trained = 0
    trained += 0 if method == "none" else sum(a.step.numel() for a in student.aq.values())
    stored, q = student.export(model)
    extra = {"strategy": "finetune", "method": method, "budget": budget, "checkpoint_sha256": sha,
             "w_bits_format": "plan" if plan else f"int{w_bits}", "a_bits": a_bits, "range_mode": ft.range_mode,
             "calib_source": ft.calib_source, "trainable_params": int(trained), "layers_trained": layers,
             "optimisation_steps": int(steps), "optimisation_seconds": round(seconds, 1),
             "peak_rss_mb_so_far": round(machine.peak_rss_mb()),
             "optimisation": info, "settings": to_dict(ft), "inputs": inputs}
    provenance = {"method": method, "budget": budget, "checkpoint_sha256": sha,
                  **({"plan": {k: plan[k] for k in ("file", "sha256")}} if plan else {}),
                  "calib": {"source": ft.calib_source, "images": ft.calib_images, "seed": ft.calib_seed}}
    return save_and_evaluate(c, variant, model, stored, q, extra, provenance, {"layers_trained": layers}, device,
                             True, progress)


def _reusable(cfg, c, variant, inputs, force):
    """A finished variant whose folder is intact (``evaluate.reusable`` without its fingerprint: optimisation is
    not repeated to recompute one) and whose ``variant_inputs`` and evaluation settings are today's; ``force``
    recomputes."""
    path = os.path.join(evaluate.variant_dir(c, variant), "metrics.json")
    if force or not os.path.exists(path):
        return False
    try:
        old = storage.load_json(path)
    except storage.CorruptFileError:
        return False
    if old.get("inputs") != inputs or old.get("eval_fingerprint") != evaluate.eval_fingerprint(c):
        return False
    evaluate.raise_first_problem(evaluate.integrity.check_variant(os.path.dirname(path)),
                                 f"recompute with `{command(cfg, None, '--force')}`")
    evaluate.check_instruments(c, old, path)  # the classifier, reference images and Inception it was measured with
    return True


# ----------------------------------------------------------------------------- outputs
def summary_markdown(cfg, done, seconds=None) -> str:
    ft = cfg.finetune
    ref = done["fp32"][2]
    lines = [f"# W4A4 that holds up (`{finetune_dir(cfg)}`)", "",
             f"{ft.n_images} images per seed × seeds {ft.seeds}, paired noise; weights: every conv / linear but the "
             f"first and last conv (those {cfg.lowbit.keep_format}); activations: every quantized input, "
             f"{ft.range_mode} ranges; calibration: {ft.calib_source} ({ft.calib_images} images, seed "
             f"{ft.calib_seed}); finetuning {ft.steps} steps × batch {ft.batch_size}, reconstruction "
             f"{ft.recon_iters} iterations per layer. Seconds: optimisation wall time on this machine."
             + (f" This invocation: {seconds / 60:.1f} min." if seconds else ""), "",
             "| budget | method | trainable params | steps | s | paired MSE | median paired MSE | clf-FID | "
             "clf-FID / fp32 | clf-IS |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| reference | fp32 | – | – | – | 0 | 0 | {mean_sd(per_seed(ref, 'clf_fid'))} | 1 | "
             f"{mean_sd(per_seed(ref, 'clf_is'))} |"]
    fp_fid = np.nanmean(per_seed(ref, "clf_fid"))
    for v, (budget, method, r) in done.items():
        if v == "fp32":
            continue
        lines.append(f"| {budget} | {method} | {r['trainable_params']:,} | {r['optimisation_steps']:,} | "
                     f"{r['optimisation_seconds']:.0f} | {mean_sd(per_seed(r, 'paired_mse_vs_fp32'))} | "
                     f"{mean_sd(per_seed(r, 'paired_mse_median'))} | {mean_sd(per_seed(r, 'clf_fid'))} | "
                     f"{np.nanmean(per_seed(r, 'clf_fid')) / fp_fid:.2f} | {mean_sd(per_seed(r, 'clf_is'))} |")
    lines += ["", "## Verdicts", "", "B − A: mean paired per-seed difference (± s.e.m.); lower is better, so a "
              "positive difference favours A; **better** when a two-sided paired t-test says so (Holm, below).", "",
              "| comparison (A vs B) | paired MSE: B − A | clf-FID: B − A |", "|---|---|---|"]
    by = {(b, m): r for b, m, r in done.values() if m != "fp32"}
    pairs = [(b, "fisher", "quest") for b, m in by if m == "fisher" and (b, "quest") in by]
    pairs += [(b, m, "none") for b, m in by if m != "none" and (b, "none") in by]
    lines += verdict_table([(f"{b}: {a_m} vs {b_m}", [per_seed(by[(b, b_m)], k) - per_seed(by[(b, a_m)], k)
                                                      for k in ("paired_mse_vs_fp32", "clf_fid")], (a_m, b_m))
                            for b, a_m, b_m in pairs])
    lines += ["", "## Selective finetuning against training everything", ""] + recovery_lines(by)
    lines += plan_lines(cfg, done)
    lines += ["", "![finetune](finetune.png)"]
    return "\n".join(lines) + "\n"


def plan_lines(cfg, done) -> list:
    """For ``finetune.plans``: each trained plan's classifier-FID over fp32's (paired per seed, 95% t-interval)
    against ``lowbit.targets``, beside the plan as ``make lowbit`` stored and evaluated it (its own ranges)."""
    ref = done["fp32"][2]
    rows = [(b, m, r) for v, (b, m, r) in done.items() if v != "fp32" and is_plan(b)]
    if not rows:
        return []
    out = ["", "## Plans of `make lowbit`, trained", "",
           f"Each plan starts from `make lowbit`'s stored `{cfg.finetune.plan_source}` variant (its per-tensor "
           f"formats, group-wise ones included, and its {cfg.lowbit.rounding} codes); `none` is that plan with this "
           f"page's activation ranges ({cfg.finetune.range_mode}, min-max), untrained. Δ clf-FID: per-seed "
           f"classifier-FID minus fp32's, mean and 95% t-interval; **target met** only when the whole interval lies "
           f"within `lowbit.targets`.", "",
           "| budget | method | paired MSE | Δ clf-FID | 95% interval | target Δ | verdict |",
           "|---|---|---:|---:|---|---:|---|"]
    for b, m, r in rows:
        target = cfg.lowbit.targets.get(b)
        d = per_seed(r, "clf_fid") - per_seed(ref, "clf_fid")
        verdict, mean, lo, hi = target_verdict(d, target if target is not None else float("inf"))
        out.append(f"| {b} | {m} | {mean_sd(per_seed(r, 'paired_mse_vs_fp32'))} | {mean:+.3g} | "
                   + ("–" if lo is None else f"[{lo:+.3g}, {hi:+.3g}]")
                   + (f" | +{target:g} | {verdict} |" if target is not None else " | – | – |"))
    for b in dict.fromkeys(b for b, _, _ in rows):
        folder = plan_folder(cfg, b)
        m = storage.load_json(os.path.join(folder, "metrics.json"))
        out.append(f"\n{b} as `make lowbit` stored it ({os.path.relpath(folder, storage.run_dir(cfg))}, its "
                   f"{cfg.lowbit.range_method} ranges): paired MSE {mean_sd(per_seed(m, 'paired_mse_vs_fp32'))}, "
                   f"clf-FID {mean_sd(per_seed(m, 'clf_fid'))}.")
    return out


def recovery_lines(by) -> list:
    out = ["| budget | method | share of `all`'s paired-MSE reduction | share of `all`'s trainable params |",
           "|---|---|---:|---:|"]
    for b in sorted({b for b, _ in by}):
        if not {(b, "all"), (b, "none")} <= set(by):
            continue
        none, full = (np.nanmean(per_seed(by[(b, m)], "paired_mse_vs_fp32")) for m in ("none", "all"))
        for m in ("quest", "fisher", "reconstruction"):
            if (b, m) in by:
                mine = np.nanmean(per_seed(by[(b, m)], "paired_mse_vs_fp32"))
                share = (none - mine) / (none - full) if none != full else float("nan")
                params = by[(b, m)]["trainable_params"] / max(1, by[(b, "all")]["trainable_params"])
                out.append(f"| {b} | {m} | {share:.0%} | {params:.0%} |")
    return out


def rows(done):
    out = []
    for v, (budget, method, r) in done.items():
        for s in r["seeds"]:
            ps = r["per_seed"][str(s)]
            out.append({"budget": budget or "", "method": method, "seed": s, "variant": v,
                        "trainable_params": r.get("trainable_params"), "steps": r.get("optimisation_steps"),
                        "seconds": r.get("optimisation_seconds"), "paired_mse_vs_fp32": ps["paired_mse_vs_fp32"],
                        "paired_mse_median": ps.get("paired_mse_median"), "clf_fid": ps["clf_fid"],
                        "clf_is": ps["clf_is"]})
    return out


def plot(done, cfg, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    for ax, key, label in ((axes[0][0], "paired_mse_vs_fp32", "paired MSE vs fp32"),
                           (axes[0][1], "clf_fid", "classifier-FID")):
        for i, budget in enumerate(cfg.finetune.budgets + cfg.finetune.plans):
            pts = sorted((max(1, r["trainable_params"]), np.nanmean(per_seed(r, key)),
                          float(np.nanstd(per_seed(r, key))), m) for b, m, r in done.values() if b == budget)
            for x, y, e, m in pts:
                ax.errorbar(x, y, yerr=e, marker="o", color=f"C{i}", capsize=3)
                ax.annotate(m, (x, y), fontsize=6)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", lw=0.8, label=budget)
        if key == "clf_fid":
            ax.axhline(np.nanmean(per_seed(done["fp32"][2], key)), color="k", ls="--", lw=1, label="fp32")
        ax.set_xscale("log")
        ax.set_yscale("log" if key != "clf_fid" else "linear")
        ax.set_xlabel("trainable parameters (1 = none)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_outputs(cfg, done, seconds=None) -> str:
    folder = finetune_dir(cfg)
    fig = plot(done, cfg, os.path.join(folder, "finetune.png"))
    md = summary_markdown(cfg, done, seconds)
    plans = [os.path.join(plan_folder(cfg, b), "metrics.json")  # the summary quotes the plans as lowbit stored them
             for b in dict.fromkeys(b for b, _, _ in done.values() if b and is_plan(b))]
    write_summary_files(folder, cfg, rows(done), COLUMNS, md, [fig], done, plans)
    return md

