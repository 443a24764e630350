"""Below 4 bits: sub-4-bit weight formats allocated by several sensitivities, with quantized activations.

Eligibility ``all_but_ends``: every conv / linear weight but the first and last conv (stored in
``lowbit.keep_format``); biases and norms stay fp32. For each budget ('3.5bits@A8': average stored bits per
weight over all parameters, scales and codebooks included, and the activation bits of every quantized input) and
each menu of formats (``uniform``: int8, group-wise and per-channel int4/int3/int2, symmetric or on a midrise
grid, ``lowbit.uniform_menu``; ``codebook``: int8 and k-means
km4/km3/km2), a plan chooses one format per tensor:

* ``uniform``: one format for every tensor, the one with most bits that fits;
* ``fisher``: the exact allocator on 1/2 sum F (W - Q_f(W))^2, the one-step Fisher (``importance.fisher``);
* ``chain_fisher``: the same with the chain-aware Fisher of the final sample (``importance.chain``);
* ``chain_output``: the chain-aware Fisher's cost of round-to-nearest's error times the ratio of the table's
  rounding's layer-output error to round-to-nearest's (GPTQ's measured gain per tensor and format; with
  round-to-nearest rounding it is ``chain_fisher``);
* ``fisher_iterative``: allocate, recompute the Fisher on the quantized model, re-allocate (``importance.iterative``);
* ``learned``: the allocator on a predictor fitted to measured random configurations and refitted with its own
  allocator's plans, its costs bounded below by the chain-aware Fisher's (``importance.predictor``);
* ``jvp``: the allocator on ||J dW||^2, x_0's exact first-order change along each tensor's real error
  (``importance.jvp``);
* ``search``: a measured search from the best-measured sensitivity's plan at the fixed budget (``experiments.search``);
* ``search_act``: the same search judged with every quantized input at the budget's activation bits (``search``
  judges with float activations, so one weight search serves every activation width);
* ``search_interaction``: ``search`` with its moves proposed by the interaction predictor (a model of whole
  configurations, ``importance.interaction``; needs ``lowbit.interaction_configs``) instead of additive costs;
* ``search_wa``: the joint search, ``search``'s weights and then each quantized input's bits over
  ``act_quant.a_bits``, searched by measurement within the BOPs of every input at the budget's bits;
* ``magnitude``, ``random``: controls through the same allocator.

Activations: every quantizable input but the first and last conv's at the budget's bits (``search_wa``: at its
searched bits) with calibrated per-timestep-group ranges (``lowbit.range_mode``; the W/A pipeline's calibration).
Every variant is saved, rebuilt from its files and evaluated with ``lowbit.seeds`` x ``lowbit.n_images`` paired
samples. Each sensitivity is judged first by the measured damage of the plans it allocates (``lowbit_quality``),
then by Kendall tau on held-out configurations per budget band, beside each band's test-retest ceiling. Everything
lands in ``runs/<run>/lowbit/``.
"""
import copy
import functools
import json
import math
import os
import time
from fractions import Fraction

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import distributed, lock, storage
from ..core.budget import budget_bits, budget_tag, parse_size_at_bits, size_at_bits_tag
from ..core.config import to_dict
from ..core.format_names import format_spec
from ..diffusion.data import mnist_tensor
from ..diffusion.model import stage_of
from ..diffusion.samplers import build_sampler
from ..diffusion.schedule import NoiseSchedule
from ..evaluation import evaluate
from ..importance.chain import chain_fisher
from ..importance.fisher import draw_samples
from ..importance.interaction import InteractionPredictor
from ..importance.iterative import iterative_fisher
from ..importance.jvp import ChainJVP, jvp_costs, plan_jvp
from ..importance.predictor import (
    ConfigMeasurer,
    Predictor,
    config_bits,
    fit_predictor,
    measure_all,
    random_configs,
    refit_with_plans,
    select_by_plans,
)
from ..importance.weights import costs_from_scores, fisher_distortion_costs, magnitude_scores, random_scores
from ..quant import gptq
from ..quant.allocate import InfeasibleBudgetError, allocate, format_bits
from ..quant.backends import calibration_inputs
from ..quant.bops import unet_macs
from ..quant.container import arch_record, read_quantized, save_quantized
from ..quant.eligibility import eligible_names, end_convs
from ..quant.formats import KMEANS_VERSION, channel_axes, dequantize_tensor, quantize_tensor
from . import lowbit_quality as quality
from . import pipeline
from .act_pipeline import (
    act_importance_inputs,
    act_layout,
    act_quantizer,
    end_bits,
    ensure_act_importance,
    ensure_ranges,
    input_bits,
    quantizer_inputs,
    range_inputs,
    save_and_evaluate,
)
from .report import mean_sd, per_seed, pyplot, save_figure, spread, write_summary_files
from .search import bops_options, finalists, measured_search, plot_trace, rerank, used_bits
from .statistics import target_verdict, verdict_table

RULE = "all_but_ends"
PRIOR_CANDIDATE = "the prior ({})"  # select_by_plans' reference: replaced only where no worse
PRIOR_NAMES = {"chain_fisher": "chain-aware Fisher", "fisher": "one-step Fisher"}
COLUMNS = ["budget", "quantizer", "plan", "seed", "variant", "avg_bits", "a_bits", "size_mb", "paired_mse_vs_fp32",
           "paired_mse_median", "clf_fid", "clf_is", "fid", "plan_seconds"]


def lowbit_config(cfg):
    """``cfg`` with the comparison's sample budget, writing under runs/<run>/lowbit/ (GPTQ rounding:
    runs/<run>/lowbit_gptq/, so no cache or variant of one rounding is ever taken for the other's)."""
    return pipeline.sub_run_config(cfg, "lowbit" if cfg.lowbit.rounding == "nearest" else "lowbit_gptq", cfg.lowbit)


def lowbit_dir(cfg) -> str:
    return storage.run_dir(lowbit_config(cfg))


def _cache(c, name) -> str:
    """A cached artifact of the comparison's own baseline folder (``c``: the comparison's config)."""
    return os.path.join(storage.baseline_dir(c), name)


# ----------------------------------------------------------------------------- the tensors and their formats
class Table:
    """Every eligible tensor in every format of the menus: stored entries (read back from ``formats.safetensors``),
    their de-quantized values, squared errors and stored bits; the fixed bits of everything else."""

    def __init__(self, cfg, model, sha, progress=True, device="cpu"):
        lb = cfg.lowbit
        self.names = eligible_names(model, RULE)
        self.ends = end_convs(model)
        self.ops = {n: model.op_type(n) for n in self.names}
        self.formats = list(dict.fromkeys(lb.uniform_menu + lb.codebook_menu))
        self.menus = {"uniform": list(lb.uniform_menu), "codebook": list(lb.codebook_menu)}
        params, axes = dict(model.named_parameters()), channel_axes(model)
        self.total = sum(p.numel() for p in params.values())
        path = _cache(cfg, "formats.safetensors")
        inputs = {"checkpoint_sha256": sha, "formats": self.formats, "names": self.names, "ends": self.ends,
                  "keep_format": lb.keep_format}
        if any(format_spec(f).kind == "codebook" for f in self.formats):  # an older k-means rule: recomputed
            inputs["kmeans"] = KMEANS_VERSION
        if lb.rounding != "nearest":  # absent for round-to-nearest: its cached tables stay valid
            inputs["rounding"] = {"rule": lb.rounding, "images": lb.gptq_images, "seed": lb.gptq_seed,
                                  "damp": lb.gptq_damp, "sample": to_dict(cfg.sample)}
        blob = None
        if os.path.exists(path):
            try:
                blob = read_quantized(path)
                if blob["provenance"].get("inputs") != inputs:
                    blob = None
            except (ValueError, OSError) as e:
                print(f"[lowbit] {path}: {e}; rewriting it")
                blob = None
        if blob is not None and lb.rounding == "gptq" and "output_ratio" not in blob["provenance"].get("gptq", {}):
            blob = None  # written before the ratios were recorded: GPTQ is deterministic, the entries come back equal
        if blob is None:
            t0 = time.time()
            stored = {f"{n}@{f}": quantize_tensor(params[n], f, axes[n]) for n in self.names for f in self.formats}
            rounding = {}
            if lb.rounding == "gptq":
                entries, infos, rounding["gptq"] = gptq_entries(cfg, model, self.names, self.formats, device,
                                                                progress)
                stored.update({f"{n}@{f}": e for (n, f), e in entries.items()})
                rounding["gptq"]["output_ratio"] = {f"{n}@{f}": i["ratio"] for (n, f), i in infos.items()}
            stored.update({f"{n}@{lb.keep_format}": quantize_tensor(params[n], lb.keep_format, axes[n])
                           for n in self.ends})
            save_quantized(stored, path, arch_record(cfg),
                           {"inputs": inputs, "what": "every eligible tensor in every format of the menus",
                            "seconds": round(time.time() - t0, 1), **rounding})
            print(f"[lowbit] {len(self.names)} tensors x {len(self.formats)} formats in {time.time() - t0:.0f} s "
                  f"-> {path}")
            blob = read_quantized(path)  # from here on, what the file holds
        # how the entries were made, for every cache computed from them: the GPTQ settings ("rounding"; absent for
        # round-to-nearest, the keys its caches had before GPTQ existed) and the k-means rule of codebook entries
        self.recipe = {k: inputs[k] for k in ("kmeans", "rounding") if k in inputs}
        self.entries = {}
        for key, e in blob["tensors"].items():
            n, f = key.rsplit("@", 1)
            self.entries.setdefault(n, {})[f] = e
        self.values = {n: {f: dequantize_tensor(e) for f, e in fs.items()} for n, fs in self.entries.items()}
        self.errors = {n: {f: params[n].detach().cpu() - self.values[n][f] for f in self.formats} for n in self.names}
        self.sq_error = {n: {f: float(e.double().pow(2).sum()) for f, e in es.items()} for n, es in self.errors.items()}
        # the table's rounding's layer-output error over round-to-nearest's (1 where the entry is round-to-
        # nearest's): with ``rtn_errors``, what the chain_output costs are made of
        ratio = blob["provenance"].get("gptq", {}).get("output_ratio", {})
        self.output_ratio = {n: {f: float(ratio.get(f"{n}@{f}", 1.0)) for f in self.formats} for n in self.names}
        self._rtn = None if ratio else self.errors  # computed on first use: only chain_output needs them
        self._weights = {n: (params[n].detach().cpu(), axes[n]) for n in self.names}
        self.bits = format_bits(model, self.names, self.formats)
        eligible = set(self.names) | set(self.ends)
        self.fixed = 32 * sum(p.numel() for n, p in params.items() if n not in eligible) + sum(
            b[lb.keep_format] for b in format_bits(model, self.ends, [lb.keep_format]).values())

    @property
    def rtn_errors(self) -> dict:
        """{tensor: {format: W - RTN_f(W)}}: round-to-nearest's errors (the table's own ``errors`` where it is
        round-to-nearest's)."""
        if self._rtn is None:
            self._rtn = {n: {f: w - dequantize_tensor(quantize_tensor(w, f, axis)) for f in self.formats}
                         for n, (w, axis) in self._weights.items()}
        return self._rtn

    def menu_bits(self, menu):
        return {n: {f: self.bits[n][f] for f in self.menus[menu]} for n in self.names}

    def avg_bits(self, choice):
        return config_bits(choice, self.bits, self.fixed) / self.total

    def stored(self, model, choice, keep_format):
        """The stored entries of a variant: ``choice`` for the eligible tensors, the ends in ``keep_format``,
        everything else fp32."""
        out = {}
        for n, p in model.named_parameters():
            if n in choice:
                out[n] = self.entries[n][choice[n]]
            elif n in self.ends:
                out[n] = self.entries[n][keep_format]
            else:
                out[n] = {"format": "fp32", "data": p.detach().cpu().clone()}
        return out


def layer_hessians(cfg, model, layers, device, progress=True) -> dict:
    """{layer: H} (``quant.gptq.collect_hessians``) over the inputs of ``lowbit.gptq_images`` sampling trajectories of
    ``model`` itself at every sampler step (noise ``lowbit.gptq_seed``): the inputs each layer meets when sampling."""
    lb = cfg.lowbit
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    pairs = calibration_inputs(model, sampler, lb.gptq_images, shape, lb.gptq_seed, progress=progress)
    with torch.no_grad():
        return gptq.collect_hessians(model, layers, lambda: [model(x.to(device), t.to(device)) for x, t in pairs])


def gptq_entries(cfg, model, names, formats, device, progress=True) -> tuple:
    """({(weight, format): stored entry} by GPTQ for every weight of ``names`` and integer format of ``formats``
    that GPTQ covers (the others keep round-to-nearest), {(weight, format): its output-error proxies}, report):
    the report gives per format the median ratio of GPTQ's layer output error to round-to-nearest's, and the
    weights left to round-to-nearest."""
    mods = dict(model.named_modules())
    covered = {n: [f for f in formats if gptq.supports(mods[n.removesuffix(".weight")], f)] for n in names}
    layers = [n.removesuffix(".weight") for n, fs in covered.items() if fs]
    t0 = time.time()
    hessians = layer_hessians(cfg, model, layers, device, progress)
    entries, infos, ratios = {}, {}, {}
    work = [(n, f) for n, fs in covered.items() for f in fs]
    for n, f in tqdm(work, desc="gptq", disable=not progress):
        entries[(n, f)], infos[(n, f)] = gptq.gptq_entry(mods[n.removesuffix(".weight")].weight, f,
                                                         hessians[n.removesuffix(".weight")], cfg.lowbit.gptq_damp)
        ratios.setdefault(f, []).append(infos[(n, f)]["ratio"])
    report = {"median_error_ratio": {f: float(np.median(r)) for f, r in ratios.items()},
              "round_to_nearest": sorted(n for n, fs in covered.items() if not fs),
              "seconds": round(time.time() - t0, 1)}
    print(f"[gptq] {len(work)} (weight, format) pairs in {report['seconds']:.0f} s; layer output error x "
          + ", ".join(f"{v:.3g} ({f})" for f, v in report["median_error_ratio"].items()) + " of round-to-nearest; "
          f"{len(report['round_to_nearest'])} transposed / grouped convs round to nearest")
    return entries, infos, report


# ----------------------------------------------------------------------------- sensitivities (cached)
def ensure_fisher(cfg, model, ckpt_path, progress=True, device="cpu"):
    """The one-step Fisher over the ``all_but_ends`` tensors, bound to the checkpoint."""
    return pipeline.ensure_rule_fisher(cfg, model, ckpt_path, RULE, _cache(cfg, "fisher_all_but_ends.pt"), device,
                                       progress)


def ensure_chain(cfg, model, names, ckpt_path, progress=True, device="cpu"):
    lb = cfg.lowbit
    path = _cache(cfg, "chain_fisher.pt")
    inputs = {"chains": lb.chain_chains, "projections": lb.chain_projections, "seed": lb.chain_seed,
              "estimator": "chain groups",
              "sample": to_dict(cfg.sample), "diffusion": to_dict(cfg.diffusion), "names": names}
    art = storage.reusable_artifact(path, ckpt_path, inputs)
    if art is not None:
        print(f"[lowbit] reusing {path}")
        return art
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    art = chain_fisher(model, sampler, names, shape, lb.chain_chains, lb.chain_projections, lb.chain_seed,
                       device, progress)
    art["meta"]["inputs"] = inputs
    storage.save_for_checkpoint(art, path, ckpt_path)
    rel = [v for v in art["rel_sem"].values() if v == v]
    print(f"[lowbit] chain-aware Fisher ({lb.chain_chains} chains x {lb.chain_projections} projections) in "
          f"{art['meta']['seconds']} s, median relative s.e.m. over {art['meta']['groups']} chain groups "
          f"{np.median(rel):.2f} -> {path}")
    return art


def chain_jvp(cfg, model, device):
    """``ChainJVP`` of ``lowbit.jvp_chains`` chains on the chain-aware Fisher's noise (``lowbit.chain_seed``)."""
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    return ChainJVP(model, sampler, shape, cfg.lowbit.jvp_chains, cfg.lowbit.chain_seed, device)


def ensure_jvp(cfg, model, table, ckpt_path, progress=True, device="cpu"):
    """The JVP sensitivity (``importance.jvp``): ||J dW_{n,f}||^2 per pixel for every tensor and every format of
    the table, cached in ``jvp.pt`` bound to the checkpoint: every format, not only those of the menus that run
    the jvp plan, because its held-out τ sums costs over random configurations of every menu."""
    lb = cfg.lowbit
    path = _cache(cfg, "jvp.pt")
    formats = list(table.formats)
    inputs = {"chains": lb.jvp_chains, "seed": lb.chain_seed, "formats": formats, "names": table.names,
              "sample": to_dict(cfg.sample), "diffusion": to_dict(cfg.diffusion), **table.recipe}
    art = storage.reusable_artifact(path, ckpt_path, inputs)
    if art is not None:
        print(f"[lowbit] reusing {path}")
        return art
    t0 = time.time()
    costs = jvp_costs(chain_jvp(cfg, model, device),
                      {n: {f: table.errors[n][f] for f in formats} for n in table.names}, progress)
    art = {"costs": costs, "meta": {"inputs": inputs, "seconds": round(time.time() - t0, 1)}}
    storage.save_for_checkpoint(art, path, ckpt_path)
    print(f"[lowbit] JVP sensitivity ({len(table.names)} tensors x {len(formats)} formats, {lb.jvp_chains} chains) "
          f"in {art['meta']['seconds']} s -> {path}")
    return art


def eps_inputs(cfg, n, seed, device):
    """(x_t, t) of ``n`` noised training images, drawn like the Fisher's samples from ``seed``."""
    x0, t, eps = draw_samples(mnist_tensor(cfg.data, "train")[0], n, cfg.diffusion.timesteps, seed,
                              strata=min(n, cfg.fisher.profile_buckets))
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    return schedule.q_sample(x0, t, eps).to(device), t.to(device)


def make_measurer(cfg, model, table, device, n_images=None):
    """A ``ConfigMeasurer`` of ``n_images`` (default ``lowbit.predictor_images``) samples per configuration, the
    ends in ``keep_format``."""
    lb = cfg.lowbit
    n = n_images or lb.predictor_images
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    return ConfigMeasurer(model, sampler, shape, table.values, n, min(cfg.sample.batch_size, n),
                          eps_inputs(cfg, lb.eps_samples, lb.predictor_seed, device), device,
                          fixed={n: table.values[n][lb.keep_format] for n in table.ends})


def measurer_inputs(cfg, table, sha, n_images) -> dict:
    """What a ``make_measurer`` measurement depends on, but the configuration and the noise seed."""
    lb = cfg.lowbit
    return {"checkpoint_sha256": sha, "images": n_images, "eps_samples": lb.eps_samples, "eps_seed": lb.predictor_seed,
            "formats": table.formats, "names": table.names, "keep_format": lb.keep_format,
            "sample": to_dict(cfg.sample), **table.recipe}


def ensure_measurements(cfg, model, table, sha, progress=True, device="cpu"):
    """Random configurations over the union of the menus, measured under ``predictor_seed`` (all) and
    ``retest_seed`` (the held-out ones), cached in ``predictor.json``."""
    lb = cfg.lowbit
    path = _cache(cfg, "predictor.json")
    inputs = {"checkpoint_sha256": sha, "n": lb.predictor_configs, "holdout": lb.predictor_holdout,
              "images": lb.predictor_images, "bits": lb.predictor_bits, "seeds": [lb.predictor_seed, lb.retest_seed],
              "eps_samples": lb.eps_samples, "formats": table.formats, "names": table.names,
              "keep_format": lb.keep_format, "sample": to_dict(cfg.sample), **table.recipe}
    art = storage.reusable_record(path, inputs)
    if art is not None:
        print(f"[lowbit] reusing {len(art['configs'])} measured configurations {path}")
        return art
    t0 = time.time()
    configs = random_configs(table.bits, table.fixed, table.total, *lb.predictor_bits, lb.predictor_configs,
                             lb.predictor_seed)
    n_hold = max(2, round(lb.predictor_holdout * len(configs)))
    measurer = make_measurer(cfg, model, table, device)
    first = measure_all(measurer, configs, lb.predictor_seed, progress, "measure")
    t1 = time.time()
    retest = measure_all(measurer, configs[-n_hold:], lb.retest_seed, progress, "retest")
    art = {"inputs": inputs, "configs": configs, "measured": first, "retest": retest, "holdout": n_hold,
           "avg_bits": [table.avg_bits(c) for c in configs],
           "seconds": {"measure": round(t1 - t0, 1), "retest": round(time.time() - t1, 1)}}
    storage.atomic_write_record(art, path)
    print(f"[lowbit] {len(configs)} configurations measured in {t1 - t0:.0f} s (+{n_hold} retested) -> {path}")
    return art


def ensure_interaction(cfg, model, table, sha, progress=True, device="cpu"):
    """``lowbit.interaction_configs`` random configurations (their own draw, from ``predictor_seed + 1``, not the
    held-out ones') measured with ``lowbit.interaction_images`` images each under ``predictor_seed``, the data of
    the interaction predictor; cached in ``interaction.json``, saved as it goes. The draw is prefix-stable, so the
    record is keyed without the count: an interrupted run resumes, a larger count measures only the new ones, a
    smaller one uses the first."""
    lb = cfg.lowbit
    path = _cache(cfg, "interaction.json")
    inputs = {**measurer_inputs(cfg, table, sha, lb.interaction_images), "bits": lb.predictor_bits,
              "draw_seed": lb.predictor_seed + 1, "noise_seed": lb.predictor_seed}
    art = storage.reusable_record(path, inputs) or {"inputs": inputs, "damage": [], "seconds": 0.0}
    configs = random_configs(table.bits, table.fixed, table.total, *lb.predictor_bits, lb.interaction_configs,
                             lb.predictor_seed + 1)
    if len(art["damage"]) >= len(configs):
        print(f"[lowbit] reusing {len(configs)} configurations of the interaction predictor {path}")
        return {**art, "configs": configs, "damage": art["damage"][:len(configs)]}
    measurer = make_measurer(cfg, model, table, device, lb.interaction_images)
    t0, done = time.time() - art["seconds"], len(art["damage"])
    for i in tqdm(range(done, len(configs)), desc="interaction", initial=done, total=len(configs),
                  disable=not progress):
        art["damage"].append(float(measurer.measure_images(configs[i], lb.predictor_seed).mean()))
        if (i + 1) % 200 == 0 or i + 1 == len(configs):
            art["seconds"] = round(time.time() - t0, 1)
            storage.atomic_write_record(art, path)
    print(f"[lowbit] {len(configs)} configurations of the interaction predictor ({lb.interaction_images} images "
          f"each; {len(configs) - done} measured now) in {art['seconds']:.0f} s -> {path}")
    return {**art, "configs": configs}


def fit_interaction(cfg, model, table, sha, prior, progress=True, device="cpu"):
    """The interaction predictor (``importance.interaction``) on ``ensure_interaction``'s measurements, and the
    same model fitted on their first 1/8, 1/4, 1/2 (the learning curve: does more data raise its tau?).
    Returns (predictor, {training configurations: predictor}, seconds of the measurements)."""
    art = ensure_interaction(cfg, model, table, sha, progress, device)
    configs, damage = art["configs"], np.asarray(art["damage"])
    bits = np.array([table.avg_bits(c) for c in configs])
    groups = {n: stage_of(n) for n in table.names}
    curve = {}
    for n in sorted({max(20, len(configs) // k) for k in (8, 4, 2)} | {len(configs)}):
        if n <= len(configs):
            curve[n] = InteractionPredictor(table.names, table.formats, prior, groups).fit(
                configs[:n], damage[:n], bits[:n], list(quality.BANDS), seed=cfg.lowbit.predictor_seed)
    pred = curve[len(configs)]
    if progress:
        cv = next((r["cv_tau"] for r in pred.cv if r["alpha"] == pred.alpha), None)
        print(f"[lowbit] interaction predictor: ridge alpha {pred.alpha:g} (cross-validated tau within bands "
              f"{'-' if cv is None else f'{cv:.2f}'}), {len(configs)} configurations")
    return pred, curve, art["seconds"]


# ----------------------------------------------------------------------------- plans
def uniform_choice(table, menu, budget):
    """One format for every tensor: the one with most stored bits that fits ``budget`` bits."""
    fits = []
    for f in table.menus[menu]:
        choice = dict.fromkeys(table.names, f)
        used = config_bits(choice, table.bits, table.fixed)
        if used <= budget:
            fits.append((used, f))
    if not fits:
        floor = min(config_bits(dict.fromkeys(table.names, f), table.bits, table.fixed) for f in table.menus[menu])
        raise InfeasibleBudgetError(f"no uniform {menu} format fits {budget / table.total:.3f} bits per weight "
                                    f"(the smallest needs {floor / table.total:.3f})")
    return dict.fromkeys(table.names, max(fits)[1])


def ensure_iterative(cfg, model, ckpt_path, table, fisher, menu, size, progress=True, device="cpu"):
    """The iterative Fisher's (choice, last round's Fisher diagonal, history, seconds) for ``menu`` at the weight
    size ``size``, cached in ``iterative_<menu>_<size>.pt`` bound to the checkpoint and recomputed when an input
    changed (Fisher settings, the menu's formats, the budget in bits, the rounds, the tensors, the ends' format)."""
    lb = cfg.lowbit
    path = _cache(cfg, f"iterative_{menu}_{budget_tag(size)}.pt")
    budget = budget_bits(size, table.total)
    inputs = {"fisher": {**pipeline.fisher_inputs(cfg), "eligible": RULE}, "formats": table.menus[menu],
              "budget_bits": budget, "rounds": lb.iterative_rounds, "names": table.names, "ends": table.ends,
              "keep_format": lb.keep_format, "fixed_bits": table.fixed, **table.recipe}
    art = storage.reusable_artifact(path, ckpt_path, inputs)
    if art is not None:
        print(f"[lowbit] reusing {path}")
        return art["choice"], art["diag"], art["history"], art["meta"]["seconds"]
    t0 = time.time()
    errors = {n: {f: table.errors[n][f] for f in table.menus[menu]} for n in table.names}
    choice, diag, history = iterative_fisher(
        model, NoiseSchedule.from_config(cfg.diffusion), mnist_tensor(cfg.data, "train")[0], cfg.fisher, RULE, errors,
        table.values, table.menu_bits(menu), table.fixed, budget, fisher["diag"], lb.iterative_rounds, progress,
        device)
    seconds = time.time() - t0
    storage.save_for_checkpoint({"choice": choice, "diag": diag, "history": history,
                                 "meta": {"inputs": inputs, "seconds": seconds}}, path, ckpt_path)
    print(f"[lowbit] iterative Fisher ({menu}, {size}: {len(history) - 1} rounds) in {seconds:.0f} s -> {path}")
    return choice, diag, history, seconds


def fit_learned(cfg, model, table, measured, prior, sha, device="cpu", progress=True,
                prior_name=PRIOR_NAMES["chain_fisher"]):
    """The learned predictor: fitted on the training configurations, then refitted ``lowbit.predictor_rounds``
    times with its own allocator's plans (every weight size of ``lowbit.budgets``, every menu it is run with)
    measured under ``predictor_seed``; those measurements are cached in ``predictor_active.json`` by configuration.
    ``prior_name``: what ``prior`` is, for the selection table. Returns (Predictor, cross-validation table,
    [(configuration, damage)] added)."""
    lb = cfg.lowbit
    train = slice(0, len(measured["configs"]) - measured["holdout"])
    cache = ConfigCache(_cache(cfg, "predictor_active.json"), measured["inputs"])
    measurer = None

    def measure(config):
        nonlocal measurer
        measurer = measurer or make_measurer(cfg, model, table, device)
        return cache.get(config, lambda c: measurer.measure(c, lb.predictor_seed)["mse_mean"])

    sizes = list(dict.fromkeys(parse_size_at_bits(b)[0] for b in lb.budgets))
    menus = [m for m in lb.quantizers if m == "uniform" or "learned" in lb.codebook_plans]

    def plans(pred):
        out, costs = [], pred.costs()
        for size in sizes:
            for menu in menus:
                cost = {n: {f: costs[n][f] for f in table.menus[menu]} for n in table.names}
                try:
                    out.append(allocate(cost, table.menu_bits(menu), table.fixed, budget_bits(size, table.total))[0])
                except InfeasibleBudgetError:
                    pass
        return out

    reference = lb.keep_format if lb.keep_format in table.formats else table.formats[0]

    def fit(configs, damage, chosen):
        return fit_predictor(configs, damage, table.names, table.formats, table.sq_error, reference, prior=prior,
                             seed=lb.predictor_seed, floor=lb.predictor_floor, chosen=chosen)

    # the cross-validation grid costs minutes at full scale: its table is kept for the same training data
    cv_path = _cache(cfg, "predictor_cv.json")
    cv_inputs = {"checkpoint_sha256": measured["inputs"].get("checkpoint_sha256"),  # verify binds it to them
                 "measured": measured["inputs"], "train": train.stop, "seed": lb.predictor_seed,
                 "floor": lb.predictor_floor, "reference": reference,
                 "prior": storage.fingerprint(prior) if prior is not None else None}
    cv_old = (storage.reusable_record(cv_path, cv_inputs) or {}).get("cv")
    train_configs = measured["configs"][train]
    train_damage = [m["mse_mean"] for m in measured["measured"][train]]
    pred, cv, added = refit_with_plans(fit, plans, measure, train_configs, train_damage, lb.predictor_rounds,
                                       cv=cv_old)
    if cv_old is None:
        storage.atomic_write_record({"inputs": cv_inputs, "cv": cv}, cv_path)
    else:
        print(f"[lowbit] reusing the predictor's cross-validation table {cv_path}")
    if lb.predictor_floors:  # the fit whose plans do the least damage, the prior's own plans among the candidates
        configs = train_configs + [c for c, _ in added]  # what the last refit saw
        damage = train_damage + [d for _, d in added]
        candidates = {"cross-validated": pred}
        for floor in lb.predictor_floors:
            for alpha in lb.predictor_alphas:
                candidates[f"prior, alpha {alpha:g}, floor {floor:g}"] = fit_predictor(
                    configs, damage, table.names, table.formats, table.sq_error, reference, prior=prior,
                    floor=floor, chosen={"kind": "prior", "target": "raw", "alpha": alpha, "cv_tau": math.nan})[0]
        prior_candidate = PRIOR_CANDIDATE.format(prior_name)
        candidates[prior_candidate] = Predictor.of_prior(prior, reference)
        for p in candidates.values():
            p.active = len(added)
        name, pred, _ = select_by_plans(candidates, plans, measure, reference=prior_candidate)
        if progress:
            print(f"[lowbit] learned predictor chosen by its plans' measured damage: {name}")
    cache.save()
    if progress:
        print(f"[lowbit] learned predictor: {pred.kind}/{pred.target}, alpha {pred.alpha:g}, refitted with "
              f"{len(added)} of its own plans ({lb.predictor_rounds} rounds at most)")
    return pred, cv, added


class ConfigCache:
    """Values computed per configuration ({tensor: format}), kept in the JSON record ``path`` while ``inputs``
    (everything a value depends on but the configuration) stay the same; otherwise started afresh."""

    def __init__(self, path, inputs):
        self.path, self.inputs, self.values = path, inputs, {}
        art = storage.reusable_record(path, inputs)
        if art is not None:
            self.values = {json.dumps(c, sort_keys=True): v for c, v in art["values"]}

    def get(self, config, compute):
        key = json.dumps(config, sort_keys=True)
        if key not in self.values:
            self.values[key] = compute(config)
        return self.values[key]

    def save(self):
        storage.atomic_write_record({"inputs": self.inputs, "values": [[json.loads(k), v] for k, v in
                                                                       self.values.items()]}, self.path)


class Sensitivities:
    """What each plan allocates by, computed once per run (with the seconds each took); ``iterative`` /
    ``searched``: the (menu, weight size) pairs the ``fisher_iterative`` / ``search`` plan is run at, each an
    allocation of its own; ``searched_act``: the (menu, weight size, activation bits) of ``search_act``;
    ``searched_interaction``: the (menu, weight size) pairs of ``search_interaction``."""

    def __init__(self, cfg, model, ckpt_path, table, sha, device, progress, iterative=(), searched=(),
                 searched_act=(), searched_interaction=()):
        lb = cfg.lowbit
        self.seconds = {"uniform": 0.0, "magnitude": 0.0, "random": 0.0}
        self.costs = {}
        fisher = ensure_fisher(cfg, model, ckpt_path, progress, device)
        self.fisher = fisher
        self.seconds["fisher"] = float(fisher["meta"].get("seconds") or 0.0)
        self.costs["fisher"] = fisher_distortion_costs(fisher["diag"], table.errors)
        self.costs["magnitude"] = costs_from_scores(magnitude_scores(model, table.names), table.errors)
        self.costs["random"] = costs_from_scores(random_scores(table.names, cfg.importance.seed), table.errors)
        self.chain = None
        # a search may start from the chain-aware Fisher's plan
        if {"chain_fisher", "chain_output", "search", "search_wa", "search_act", "search_interaction"} & set(lb.plans):
            self.chain = ensure_chain(cfg, model, table.names, ckpt_path, progress, device)
            self.seconds["chain_fisher"] = self.seconds["chain_output"] = float(self.chain["meta"]["seconds"])
            self.costs["chain_fisher"] = fisher_distortion_costs(self.chain["diag"], table.errors)
            self.costs["chain_output"] = output_scaled_costs(self.chain["diag"], table)
        # the sensitivity the learned predictor corrects and a search starts from by default
        self.prior = "chain_fisher" if "chain_fisher" in self.costs else "fisher"
        self.jvp = None
        if "jvp" in lb.plans:
            self.jvp = ensure_jvp(cfg, model, table, ckpt_path, progress, device)
            self.seconds["jvp"] = self.jvp["meta"]["seconds"]
            self.costs["jvp"] = self.jvp["costs"]
        self.measured = self.predictor = None
        if "learned" in lb.plans:
            self.measured = ensure_measurements(cfg, model, table, sha, progress, device)
            t0 = time.time()
            self.predictor, self.cv, self.active = fit_learned(cfg, model, table, self.measured,
                                                               self.costs[self.prior], sha, device, progress,
                                                               PRIOR_NAMES[self.prior])
            self.seconds["learned"] = self.measured["seconds"]["measure"] + time.time() - t0
            self.costs["learned"] = self.predictor.costs()
        self.interaction = None  # a model of whole configurations (not additive): ranks them, allocates nothing
        self.interaction_curve = {}
        self.interaction_images = None  # what it was fitted on, once it is
        if lb.interaction_configs and self.measured is not None:
            self.interaction, self.interaction_curve, self.seconds["interaction"] = fit_interaction(
                cfg, model, table, sha, self.costs[self.prior], progress, device)
            self.interaction_images = lb.interaction_images
        self.jvp_plan = None  # the JVP of every held-out configuration as a whole: a feature with cross terms
        if self.jvp is not None and self.measured is not None:
            cj = None
            cache = ConfigCache(_cache(cfg, "jvp_plans.json"), {**self.jvp["meta"]["inputs"], "checkpoint_sha256": sha})

            def one(c):
                nonlocal cj
                cj = cj or chain_jvp(cfg, model, device)
                return plan_jvp(cj, c, table.errors)

            held = self.measured["configs"][len(self.measured["configs"]) - self.measured["holdout"]:]
            self.jvp_plan = [cache.get(c, one) for c in held]
            cache.save()
        self.search_fitness = None  # the search's own judge on the held-out configurations: a measurement, not a model
        self.search_statistic = lb.search_statistic  # how the judge sums up those images
        if "search" in lb.plans and self.measured is not None:
            self.search_fitness = heldout_search_fitness(cfg, model, table, self.measured, sha, device)
        self.iterative = {}  # (menu, size): (choice, diag, history, seconds), or the InfeasibleBudgetError
        for key in dict.fromkeys(iterative):
            try:
                self.iterative[key] = ensure_iterative(cfg, model, ckpt_path, table, fisher, *key, progress, device)
            except InfeasibleBudgetError as e:
                self.iterative[key] = e
        self.search = {}  # (menu, size): {"choice", "trace", "seconds", ...}, or the InfeasibleBudgetError
        self.search_act = {}  # (menu, size, activation bits): likewise, judged with quantized activations
        self.search_interaction = {}  # (menu, size): likewise, its moves proposed by the interaction predictor
        self.act_search = {}  # (menu, budget): search_wa's activation bits, set by run_lowbit once the searches are
        for found, keys, proposer in ((self.search, searched, "additive"), (self.search_act, searched_act, "additive"),
                                      (self.search_interaction, searched_interaction, "interaction")):
            for key in dict.fromkeys(keys):
                try:
                    found[key] = ensure_search(cfg, model, table, self, *key[:2], sha, progress, device, *key[2:],
                                               proposer=proposer)
                except InfeasibleBudgetError as e:
                    found[key] = e


# The search's best configurations kept in its record, what a re-ranking (lowbit.search_rerank) chooses among
FINALISTS = 32

# The sensitivities whose plans may start the search (lowbit.search_start: best), in order of preference on a tie
SEARCH_STARTS = ("chain_fisher", "fisher", "learned", "chain_output", "jvp", "magnitude", "random")


def judge_statistic(lb) -> tuple:
    """(file-name suffix, record inputs) of the searches' judge statistic (``lowbit.search_statistic``): both
    empty for the mean, so records written before the option keep their names and keys."""
    if lb.search_statistic == "mean":
        return "", {}
    return f"_{lb.search_statistic}", {"statistic": lb.search_statistic}


def search_judge(cfg, model, table, device="cpu", per_image=False, act=None, rerank=False):
    """fitness(configuration): the measured search's judge, the paired MSE of ``lowbit.search_images`` images
    under ``lowbit.search_seed`` (its measurer built at the first call), their mean or geometric mean
    (``lowbit.search_statistic``); ``per_image``: each image's, as a list;
    ``act``: an activation quantizer kept attached to the measured model (else float activations); ``rerank``:
    the re-ranking's instead (``lowbit.rerank_images`` under ``lowbit.rerank_seed``).
    One definition for the search and for the held-out τ rows that say how far the search can trust it."""
    lb = cfg.lowbit
    images, seed = (lb.rerank_images, lb.rerank_seed) if rerank else (lb.search_images, lb.search_seed)
    measurer = None

    def fitness(c):
        nonlocal measurer
        if measurer is None:
            measurer = make_measurer(cfg, model, table, device, images)
            if act is not None:
                act.attach(measurer.work)
        images_mse = measurer.measure_images(c, seed)
        return images_mse.tolist() if per_image else float(quality.image_statistic(images_mse, lb.search_statistic))

    return fitness


def ensure_search(cfg, model, table, sens, menu, size, sha, progress=True, device="cpu", a_bits=None,
                  proposer="additive"):
    """The measured search's result for ``menu`` at the weight size ``size`` (``experiments.search``): from a
    sensitivity's plan (``lowbit.search_start``: ``best``, the plan of least fitness among those of
    ``SEARCH_STARTS`` computed here, or always the chain-aware Fisher's), moves proposed by the learned costs (else
    the chain-aware Fisher's), fitness the paired MSE of ``lowbit.search_images`` images under
    ``lowbit.search_seed`` — with float activations, or (``a_bits``, plan ``search_act``) every quantized input at
    those bits with their ranges, as the budget's variant runs. ``proposer="interaction"`` (plan
    ``search_interaction``): the interaction predictor orders the proposed moves (the additive costs still pay for
    them). Cached in ``search_<menu>_<size>[_A<bits>[_mse]][_geomean][_probe<n>][_interaction].json`` (the wall
    clock makes a rerun differ: a cached result is reused, not redone), keyed by the plan it starts from, not by the
    candidates that lost: a run with another list of plans reuses it whenever the same plan wins. The candidates'
    fitness is cached per plan in ``search_starts_<menu>[_A<bits>[_mse]][_geomean].json``. With
    ``lowbit.search_rerank`` its best few are measured again on the re-ranking's noise and the best there is its
    ``choice`` (``search_choice``: its own)."""
    lb = cfg.lowbit
    # searches of both range methods are kept apart, as their variants are
    judged_at = "" if a_bits is None else f"_A{a_bits}{_range_tag(lb.range_method)}"
    ranked = proposer == "interaction"
    if ranked and sens.interaction is None:
        raise ValueError("the interaction-proposed search needs the interaction predictor (lowbit.interaction_configs)")
    # kept apart by judge and proposer, so switching either back finds its record again
    judged_by, statistic = judge_statistic(lb)
    probed = f"_probe{lb.search_probe}" if lb.search_probe and not ranked else ""
    path = _cache(cfg, f"search_{menu}_{budget_tag(size)}{judged_at}{judged_by}{probed}"
                       f"{'_interaction' if ranked else ''}.json")
    prior = sens.prior
    propose_by = "learned" if "learned" in sens.costs else prior
    limit = budget_bits(size, table.total) - table.fixed
    names = [k for k in SEARCH_STARTS if k in sens.costs] if lb.search_start == "best" else [prior]
    menu_costs = {k: {n: {f: sens.costs[k][n][f] for f in table.menus[menu]} for n in table.names}
                  for k in {*names, propose_by}}
    plans = {k: allocate(menu_costs[k], table.menu_bits(menu), table.fixed, limit + table.fixed)[0] for k in names}
    # everything its judge's measurements depend on (the menu, keep_format, rounding, ...)
    judge_inputs = {**measurer_inputs(cfg, table, sha, lb.search_images), **statistic}
    act_inputs = None if a_bits is None else {
        "a_bits": a_bits, "ranges": _ranges_inputs(cfg, sha, [a_bits]), "range_mode": lb.range_mode,
        **quantizer_inputs(cfg)}
    @functools.cache  # built at its first use (a cached search and cached starts need none), shared by both judges
    def act():
        return None if a_bits is None else activation_quantizer(
            _act_cfg(cfg), model, a_bits, ranges_by_bits(cfg, model, range_bits(cfg, [a_bits]), sha, device, progress))

    @functools.cache
    def judge(fresh=False):
        return search_judge(cfg, model, table, device, act=act(), rerank=fresh)

    def fitness(c):
        return judge()(c)

    def timed(c):
        t = time.time()
        return {"fitness": fitness(c), "seconds": round(time.time() - t, 2)}

    starts, starts_seconds = {}, 0.0
    if len(plans) > 1:  # two sensitivities may allocate the same plan (the learned one keeps the chain-aware's)
        cache = ConfigCache(_cache(cfg, f"search_starts_{menu}{judged_at}{judged_by}.json"),
                            {**judge_inputs, "seed": lb.search_seed, "act": act_inputs})
        try:
            got = {k: cache.get(c, timed) for k, c in plans.items()}
        finally:  # what was measured is kept even if a measurement fails
            cache.save()
        starts = {k: v["fitness"] for k, v in got.items()}
        # what choosing among this run's candidates costs: each distinct plan measured once, by whichever run did
        starts_seconds = sum({json.dumps(plans[k], sort_keys=True): v["seconds"] for k, v in got.items()}.values())
    start_by = min(plans, key=lambda k: (starts.get(k, 0.0), names.index(k)))
    mine = {"starts": starts, "starts_seconds": round(starts_seconds, 1)}  # this run's candidates, not the writer's
    # then the search's own inputs: the start it runs from (the chain-aware rule's records keep their keys)
    inputs = {**judge_inputs, "start": plans[start_by], "start_by": start_by, "propose_by": propose_by,
              "proposer": sens.predictor.describe() if propose_by == "learned" else None,
              # the costs that pick every move: a recomputed chain-aware Fisher or a refitted predictor proposes
              # other moves even where the start plans come out the same
              "proposer_costs": storage.fingerprint(menu_costs[propose_by]),
              "seconds": lb.search_seconds, "evals": lb.search_evals, "seed": lb.search_seed, "limit_bits": limit}
    if lb.search_probe and not ranked:  # the additive proposer calibrated by measurement (records without keep keys)
        inputs["probe"] = lb.search_probe
    if ranked:  # the model that orders the moves: its data (size and measurements) and its fitted weights
        inputs["rank_by"] = {**sens.interaction.describe(), "configurations": lb.interaction_configs,
                             "weights": storage.fingerprint([float(w) for w in sens.interaction.weights])}
    if act_inputs is not None:
        inputs["act"] = act_inputs
    art = storage.reusable_record(path, inputs)
    if art is not None and (not lb.search_rerank or "finalists" in art):  # older records kept no finalists
        print(f"[lowbit] reusing {path}")
    else:
        # each configuration measured once: the chosen start is the search's first row again
        seen = {json.dumps(plans[k], sort_keys=True): v for k, v in starts.items()}
        art = _search(cfg, table, menu, size, inputs, menu_costs[propose_by],
                      sens.interaction.predict_log if ranked else None, fitness, seen, path, mine)
    art = {**art, **mine}
    if lb.search_rerank:
        art = _reranked(cfg, art, path, {**measurer_inputs(cfg, table, sha, lb.rerank_images), "act": act_inputs,
                                         **statistic},
                        judge(fresh=True))
    return art


def _search(cfg, table, menu, size, inputs, costs, rank, fitness, measured, path, mine) -> dict:
    """``ensure_search``'s search itself from ``inputs["start"]`` (``measured``: the fitness already known, by
    configuration), written to ``path``; its ``FINALISTS`` best measured kept for a re-ranking."""
    lb = cfg.lowbit
    start, start_by, starts = inputs["start"], inputs["start_by"], mine["starts"]

    def once(c):
        key = json.dumps(c, sort_keys=True)
        if key not in measured:
            measured[key] = fitness(c)
        return measured[key]

    t0 = time.time()
    bits = table.menu_bits(menu)
    choice, trace = measured_search(start, bits, inputs["limit_bits"], costs, once,
                                    lb.search_seconds, lb.search_evals, seed=lb.search_seed, rank=rank,
                                    probe=inputs.get("probe", 0))
    art = {"inputs": inputs, "choice": choice, "trace": trace, "seconds": round(time.time() - t0, 1), **mine,
           "start_by": start_by, "changed": sum(choice[n] != start[n] for n in choice),
           # a probe may leave the budget: only configurations within it are finalists
           "finalists": finalists({k: v for k, v in measured.items()
                                   if used_bits(json.loads(k), bits) <= inputs["limit_bits"]}, FINALISTS)}
    storage.atomic_write_record(art, path)
    begun = f" from {start_by}'s plan (of {', '.join(f'{k} {v:.3g}' for k, v in starts.items())})" if starts else ""
    judged = "" if "act" not in inputs else f" judged at A{inputs['act']['a_bits']}"
    if rank is not None:
        judged += " proposed by the interaction predictor"
    print(f"[lowbit] search ({menu}, {size}){judged}{begun}: {len(trace) - 1} measured moves in "
          f"{art['seconds']:.0f} s, fitness {trace[0]['fitness']:.3g} -> {trace[-1]['best']:.3g}, "
          f"{art['changed']} tensors changed -> {path}")
    return art


def _reranked(cfg, art, search_path, judge_inputs, measure) -> dict:
    """``art`` (a search's record) with its ``lowbit.search_rerank`` best finalists re-ranked on the re-ranking's
    noise (``search.rerank``): ``choice`` the kept one, ``search_choice`` the search's own. The re-ranking is a
    record of its own beside the search's (``..._rerank.json``), keyed by the search it ranks, so turning it on or
    off never redoes a search."""
    lb = cfg.lowbit
    path = search_path.removesuffix(".json") + "_rerank.json"
    inputs = {**judge_inputs, "search": storage.fingerprint({k: art[k] for k in ("inputs", "finalists", "choice")}),
              "keep": lb.search_rerank, "seed": lb.rerank_seed}
    done = storage.reusable_record(path, inputs)
    if done is None:
        t0 = time.time()
        _, rows = rerank(art["finalists"], lb.search_rerank, measure)
        done = {"inputs": inputs, "rows": rows, "seconds": round(time.time() - t0, 1)}
        storage.atomic_write_record(done, path)
        kept = next(i for i, r in enumerate(rows) if r["chosen"])
        print(f"[lowbit] re-ranked the search's best {len(rows)} on fresh noise ({lb.rerank_images} images, seed "
              f"{lb.rerank_seed}) in {done['seconds']:.0f} s: kept its #{kept + 1} ({rows[kept]['rerank']:.3g} there; "
              f"its own best {rows[0]['rerank']:.3g}) -> {path}")
    else:
        print(f"[lowbit] reusing {path}")
    rows = done["rows"]
    choice = next(r["config"] for r in rows if r["chosen"])
    start = art["inputs"]["start"]
    return {**art, "choice": choice, "search_choice": art["choice"], "rerank": rows,
            "rerank_seconds": done["seconds"], "changed": sum(choice[n] != start[n] for n in choice)}


def search_start(art) -> str:
    """The sensitivity whose plan a stored search started from (older records: their inputs' ``start_by``)."""
    return art.get("start_by") or art["inputs"]["start_by"]


def ranges_by_bits(c, model, bits, sha, device, progress=True) -> dict:
    """{activation bits: calibrated ranges} for each of ``bits``: least-MSE at those bits (``lowbit.range_method:
    mse``), else the one min-max calibration for all."""
    ac, lb = _act_cfg(c), c.lowbit
    if lb.range_method == "mse":
        return {a: ensure_ranges(ac, model, lb.range_mode, sha, device, progress, mse_bits=a) for a in bits}
    return dict.fromkeys(bits, ensure_ranges(ac, model, lb.range_mode, sha, device, progress))


def _range_tag(range_method: str) -> str:
    """``_mse`` for least-MSE activation ranges (min-max variants and caches keep their names)."""
    return "_mse" if range_method == "mse" else ""


def _ranges_inputs(c, sha, bits):
    """What ``ranges_by_bits(c, ..., bits)`` depends on (keys as strings: JSON's)."""
    ac, lb = _act_cfg(c), c.lowbit
    if lb.range_method == "minmax":
        return range_inputs(ac, lb.range_mode, sha)
    return {str(b): range_inputs(ac, lb.range_mode, sha, b) for b in bits}


def act_search_options(c, model, table, weights) -> dict:
    """{module: {bits: BOPs}} of every quantized input at the fixed ``weights`` ({tensor: format}): MACs per image
    x its weights' stored bits per element (the ends in ``keep_format``, other weights fp32) x each of
    ``act_quant.a_bits``."""
    ac = _act_cfg(c)
    names, kept, _, _ = act_layout(ac, model)
    params = dict(model.named_parameters())
    macs = unet_macs(model, (c.model.in_channels, c.data.image_size, c.data.image_size))

    def w_bits(w):  # exact fractions: sums of BOPs then compare the same in any order
        f = weights.get(w) or (c.lowbit.keep_format if w in table.ends else None)
        return Fraction(32) if f is None else Fraction(format_bits(model, [w], [f])[w][f], params[w].numel())

    return bops_options(macs, {n: w_bits(f"{n}.weight") for n in names if n not in kept}, ac.act_quant.a_bits)


def ensure_act_search(c, model, table, weights, menu, budget, sha, progress=True, device="cpu"):
    """The activation half of the joint search (plan ``search_wa``) at ``budget`` (weight size @ activation bits),
    at ``weights`` (the ``search`` plan's formats): every quantized input's bits over ``act_quant.a_bits`` by the
    measured search (``experiments.search``) from every input at the budget's bits, within that start's BOPs —
    an input raised pays by lowering others — judged like the weight search (``lowbit.search_images`` images of
    ``lowbit.search_seed``'s noise, their ``lowbit.search_statistic``, now with the activations quantized), the
    activation Fisher proposing. Cached in ``search_wa_<menu>_<size>_A<bits>[_mse][_geomean].json``;
    {"bits": {module: bits}, "trace", ...}."""
    lb = c.lowbit
    size, a = parse_size_at_bits(budget)
    menu_a = sorted(c.act_quant.a_bits)
    if a is None or a in (menu_a[0], menu_a[-1]):  # at either end of the menu no input can pay for another
        raise InfeasibleBudgetError(f"search_wa at {budget}: " + (
            "the activations stay float" if a is None else f"no input can go {'above' if a == menu_a[-1] else 'below'}"
                                                              f" {a} bits (act_quant.a_bits {c.act_quant.a_bits})")
                                    + ": nothing to search")
    judged_by, statistic = judge_statistic(lb)
    path = _cache(c, f"search_wa_{menu}_{budget_tag(size)}_A{a}{_range_tag(lb.range_method)}{judged_by}.json")
    ac = _act_cfg(c)
    inputs = {**measurer_inputs(c, table, sha, lb.search_images), **statistic, "weights": weights, "a_bits": menu_a,
              "start_bits": a, "ranges": _ranges_inputs(c, sha, menu_a), "range_mode": lb.range_mode,
              "seconds": lb.act_search_seconds, "evals": lb.act_search_evals, "seed": lb.search_seed,
              **quantizer_inputs(c), "act_importance": act_importance_inputs(ac, lb.range_mode, sha)}
    art = storage.reusable_record(path, inputs)
    if art is not None:
        print(f"[lowbit] reusing {path}")
        return art
    options = act_search_options(c, model, table, weights)  # a forward pass for the MACs: only when searching
    start = dict.fromkeys(options, a)
    limit = sum(options[n][a] for n in start)
    ranges = ranges_by_bits(c, model, range_bits(c, menu_a), sha, device, progress)
    names, kept, _, _ = act_layout(ac, model)
    ends = end_bits(ac, kept)  # at keep_bits, never searched
    imp = ensure_act_importance(ac, model, lb.range_mode, ensure_ranges(ac, model, lb.range_mode, sha, device,
                                                                       progress), sha, device, progress)
    missing = [(n, b) for n in start for b in menu_a if b not in imp["fisher"].get(n, {})]
    if missing:  # a missing cost would make that move look free to the proposer
        raise KeyError(f"the activation Fisher has no cost for input {missing[0][0]} at {missing[0][1]} bits "
                       f"({len(missing)} missing); recompute it with --force")
    costs = {n: {b: float(imp["fisher"][n][b]) for b in menu_a} for n in start}
    measurer = make_measurer(c, model, table, device, lb.search_images)

    def fitness(bits):
        bits = {**bits, **ends}
        q = act_quantizer(ac, model, {n: ranges[b][n] for n, b in bits.items()}, bits, lb.range_mode)
        q.attach(measurer.work)
        try:
            return float(quality.image_statistic(measurer.measure_images(weights, lb.search_seed),
                                                 lb.search_statistic))
        finally:
            q.remove()

    t0 = time.time()
    bits, trace = measured_search(start, options, limit, costs, fitness, lb.act_search_seconds, lb.act_search_evals,
                                  seed=lb.search_seed)
    art = {"inputs": inputs, "bits": bits, "trace": trace, "seconds": round(time.time() - t0, 1),
           "bops": float(sum(options[n][b] for n, b in bits.items())), "limit_bops": float(limit),
           "changed": sum(b != a for b in bits.values())}
    storage.atomic_write_record(art, path)
    print(f"[lowbit] activation search ({menu}, {budget}): {len(trace) - 1} measured moves in {art['seconds']:.0f} s, "
          f"fitness {trace[0]['fitness']:.3g} -> {trace[-1]['best']:.3g}, {art['changed']} inputs changed -> {path}")
    return art


def output_scaled_costs(diag: dict, table) -> dict:
    """cost[n][f] = 1/2 sum F (W - RTN_f(W))^2 x (the table's layer-output error of f / round-to-nearest's).

    A diagonal Fisher prices an error by its size per weight; GPTQ's error is larger per weight than round-to-
    nearest's but lies where the layer's inputs have little energy, so the diagonal cost of GPTQ's own error
    overstates it, by a different factor per layer. Round-to-nearest's errors are near independent per weight,
    where the diagonal is a fair estimate; GPTQ's measured gain on the layer's output (``quant.gptq.output_error``)
    then scales it per tensor and format."""
    rtn = fisher_distortion_costs(diag, table.rtn_errors)
    return {n: {f: c * table.output_ratio[n].get(f, 1.0) for f, c in fs.items()} for n, fs in rtn.items()}


def choose(cfg, plan, menu, budget_text, table, sens, a_bits=None):
    """({tensor: format}, info) of ``plan`` on ``menu`` at the weight size ``budget_text`` (``search_act``: its
    search judged at ``a_bits``)."""
    budget = budget_bits(budget_text, table.total)
    bits = table.menu_bits(menu)
    t0 = time.time()
    if plan == "uniform":
        choice, info = uniform_choice(table, menu, budget), {}
    elif plan == "fisher_iterative":  # computed with the sensitivities, before the variants were handed out
        if isinstance(sens.iterative[(menu, budget_text)], InfeasibleBudgetError):
            raise sens.iterative[(menu, budget_text)]
        choice, _, history, seconds = sens.iterative[(menu, budget_text)]
        return choice, {"rounds": history, "seconds": sens.seconds["fisher"] + seconds}
    elif plan in ("search", "search_act", "search_interaction"):  # likewise
        art = sens.search_act[(menu, budget_text, a_bits)] if plan == "search_act" else \
            _weight_searches(sens, plan)[(menu, budget_text)]
        if isinstance(art, InfeasibleBudgetError):
            raise art
        considered = art.get("starts") or [search_start(art)]  # every sensitivity the start was chosen among
        if plan == "search_interaction":  # and the measurements its proposer was fitted to
            considered = [*considered, "interaction"]
        return art["choice"], {"evaluations": len(art["trace"]) - 1, "changed": art["changed"],
                               "start_by": search_start(art),
                               "seconds": sum(sens.seconds.get(k, 0.0) for k in considered)
                               + art.get("starts_seconds", 0.0) + art["seconds"] + art.get("rerank_seconds", 0.0)}
    else:
        cost = {n: {f: sens.costs[plan][n][f] for f in table.menus[menu]} for n in table.names}
        choice, info = allocate(cost, bits, table.fixed, budget)
    return choice, {**{k: v for k, v in info.items() if k != "choice"},
                    "seconds": sens.seconds.get(plan, 0.0) + time.time() - t0}


def activation_quantizer(cfg, model, a_bits, ranges):
    """Every quantizable input but the first and last conv's at ``a_bits`` (None: none quantized), those at
    ``act_quant.keep_bits`` where that is set; ``ranges``: {bits: ranges} (``ranges_by_bits`` of
    ``range_bits``), each input calibrated for its own bits."""
    names, kept, _, _ = act_layout(cfg, model)
    bits = input_bits(cfg, names, kept, a_bits)
    return act_quantizer(cfg, model, {n: ranges[b][n] for n, b in bits.items()}, bits, cfg.lowbit.range_mode)


def range_bits(cfg, a_bits) -> list:
    """The activation bits whose ranges quantizing at ``a_bits`` (a list: each of them) needs: those and the
    kept ends' ``act_quant.keep_bits``."""
    return sorted(set(a_bits) | ({cfg.act_quant.keep_bits} if cfg.act_quant.keep_bits else set()))


def check_budgets(lb, table):
    """Every budget must be reachable by every menu it is run with: a one-line error before anything is evaluated."""
    for budget in lb.budgets:
        size, _ = parse_size_at_bits(budget)
        want = budget_bits(size, table.total)
        for menu in lb.quantizers:
            floor = table.fixed + sum(min(table.bits[n][f] for f in table.menus[menu]) for n in table.names)
            if floor > want:
                raise InfeasibleBudgetError(
                    f"lowbit.budgets: {budget!r} is below what the {menu} menu ({table.menus[menu]}) can reach: "
                    f"{floor / table.total:.3f} bits per weight with every eligible tensor in its smallest format "
                    f"(the first and last conv in {lb.keep_format}, biases and norms fp32)")


def variant_name(plan, menu, budget, range_method="minmax"):
    """The variant's folder: least-MSE activation ranges add ``_mse`` (min-max variants keep their names)."""
    return f"{plan}_{menu}_{size_at_bits_tag(budget)}{_range_tag(range_method)}"


def run_lowbit(cfg, device, force=False, progress=True):
    """Every (budget, menu, plan) variant; returns ({variant: (budget, menu, plan, metrics)}, notes, sens, table)."""
    c = lowbit_config(cfg)
    lb = cfg.lowbit
    model, ckpt_path, fisher = pipeline.load_artifacts(cfg, device, force=False, progress=progress)
    sha = fisher["meta"]["checkpoint_sha256"]

    table = pipeline.shared(c, lambda: Table(c, model, sha, progress, device))
    check_budgets(lb, table)  # before the sensitivities, the costly part
    tasks = [(budget, menu, plan) for budget in lb.budgets for menu in lb.quantizers for plan in lb.plans
             if menu != "codebook" or plan in lb.codebook_plans]
    iterative = [(menu, parse_size_at_bits(budget)[0]) for budget, menu, plan in tasks if plan == "fisher_iterative"]
    searched = [(menu, parse_size_at_bits(budget)[0]) for budget, menu, plan in tasks  # search_wa continues it
                if plan == "search" or plan == "search_wa" and parse_size_at_bits(budget)[1] is not None]
    searched_act = [(menu, *parse_size_at_bits(budget)) for budget, menu, plan in tasks
                    if plan == "search_act" and parse_size_at_bits(budget)[1] is not None]
    searched_interaction = [(menu, parse_size_at_bits(budget)[0]) for budget, menu, plan in tasks
                            if plan == "search_interaction"]
    # every cache the variants read, computed once (rank 0 first, under the folder's lock) before they are handed out

    # {activation bits: ranges}: min-max for every budget, or least-MSE at each one's bits
    budget_bits_a = sorted({parse_size_at_bits(b)[1] for b in lb.budgets} - {None})
    sens, ranges = pipeline.shared(c, lambda: (
        Sensitivities(c, model, ckpt_path, table, sha, device, progress, iterative, searched, searched_act,
                      searched_interaction),
        ranges_by_bits(c, model, range_bits(c, budget_bits_a), sha, device, progress)))

    def act_searches():  # (menu, budget): the activation half of search_wa, or why it does not apply
        out = {}
        for budget, menu, plan in tasks:
            art = sens.search.get((menu, parse_size_at_bits(budget)[0]))
            if plan == "search_wa" and art is not None and not isinstance(art, InfeasibleBudgetError):
                try:
                    out[(menu, budget)] = found = ensure_act_search(c, model, table, art["choice"], menu, budget,
                                                                    sha, progress, device)
                except InfeasibleBudgetError as e:
                    out[(menu, budget)] = e
                    continue
                # the ranges its variant reads, built here under the lock (not once per rank inside map_tasks)
                ranges_by_bits(c, model, range_bits(c, found["bits"].values()), sha, device, progress)
        return out

    joint = sens.act_search = pipeline.shared(c, act_searches) if any(t[2] == "search_wa" for t in tasks) else {}
    done = {"fp32": (None, None, "fp32", distributed.rank0_first(
        lambda: pipeline.evaluate_fp32(c, model, ckpt_path, device, force, progress)))}

    def one(task):
        budget, menu, plan = task
        size, a_bits = parse_size_at_bits(budget)
        variant = variant_name(plan, menu, budget, lb.range_method)
        try:
            if plan in ("search_act", "search_wa") and a_bits is None:
                raise InfeasibleBudgetError(f"{plan} at {budget}: the activations stay float: plan search")
            choice, info = choose(c, "search" if plan == "search_wa" else plan, menu, size, table, sens, a_bits)
            act = joint.get((menu, budget)) if plan == "search_wa" else None
            if isinstance(act, InfeasibleBudgetError):
                raise act
        except InfeasibleBudgetError as e:
            print(f"[lowbit] {variant}: infeasible: {e}")
            return e
        extra = {"strategy": "lowbit", "plan": plan, "quantizer": menu, "budget": budget,
                 "checkpoint_sha256": sha, "eligible_rule": RULE, "keep_format": lb.keep_format,
                 "w_bits": table.avg_bits(choice), "a_bits": a_bits, "range_mode": lb.range_mode,
                 "range_method": lb.range_method}
        record = {"choice": choice, "allocation": {k: v for k, v in info.items() if k != "seconds"},
                  "plan_seconds": info.get("seconds", 0.0),
                  "formats_used": {f: sum(v == f for v in choice.values()) for f in table.menus[menu]}}
        provenance = {"plan": plan, "quantizer": menu, "budget": budget, "checkpoint_sha256": sha,
                      "fisher": {k: v for k, v in sens.fisher["meta"].items() if k != "timesteps"},
                      "fisher_file": os.path.relpath(_cache(c, "fisher_all_but_ends.pt"),
                                                     evaluate.variant_dir(c, variant)),
                      "act": {"bits": a_bits, "range_mode": lb.range_mode, "range_method": lb.range_method}}
        if act is None:
            q = activation_quantizer(_act_cfg(c), model, a_bits, ranges)
        else:  # search_wa: each input at its searched bits, the kept ends at keep_bits, with the ranges of those
            names, kept, _, _ = act_layout(_act_cfg(c), model)
            bits = {**act["bits"], **end_bits(c, kept)}
            every = ranges_by_bits(c, model, range_bits(c, bits.values()), sha, device, progress=False)
            q = act_quantizer(_act_cfg(c), model, {n: every[b][n] for n, b in bits.items()}, bits, lb.range_mode)
            extra["a_bits_searched"] = provenance["act"]["bits_per_input"] = act["bits"]
            # the mix it chose over the searched inputs (the kept ends left out), MAC-weighted, not the budget's
            # nominal bits
            macs = unet_macs(model, (c.model.in_channels, c.data.image_size, c.data.image_size))
            extra["a_bits_budget"] = a_bits
            extra["a_bits"] = sum(macs[n] * b for n, b in act["bits"].items()) / sum(macs[n] for n in act["bits"])
            record["act_search"] = {k: act[k] for k in ("bops", "limit_bops", "changed", "seconds")} | {
                "evaluations": len(act["trace"]) - 1}
            record["plan_seconds"] += act["seconds"]
        with lock.hold(evaluate.variant_dir(c, variant)):
            r = save_and_evaluate(c, variant, model, table.stored(model, choice, lb.keep_format), q, extra,
                                  provenance, record, device, force, progress)
        r["plan_seconds"] = record["plan_seconds"]
        return r

    notes = []
    # every variant on one rank of a torchrun (each alone, with its own lock and files), in this order
    for (budget, menu, plan), r in zip(tasks, distributed.map_tasks(tasks, one), strict=True):
        if isinstance(r, InfeasibleBudgetError):
            notes.append(f"{variant_name(plan, menu, budget, lb.range_method)}: {r}")
        else:
            done[variant_name(plan, menu, budget, lb.range_method)] = (budget, menu, plan, r)
    if distributed.is_main():  # the primary score of every sensitivity: what its plans do (rank 0 writes it)
        sens.plan_damage = measure_plans(c, model, table, sens, sha, device, progress)
    return done, notes, sens, table


def _act_cfg(c):
    """The W/A pipeline's calibration settings, with this comparison's range mode."""
    a = copy.deepcopy(c)
    a.act_quant.range_modes = [c.lowbit.range_mode]
    return a


# ----------------------------------------------------------------------------- predictor quality
SEARCH_FITNESS = quality.SEARCH_FITNESS


def heldout_predictions(sens, table, configs) -> dict:
    """{predictor: its estimate of every configuration's damage}."""
    preds = {name: np.array([sum(sens.costs[name][n][f] for n, f in c.items()) for c in configs])
             for name in ("fisher", "chain_fisher", "chain_output", "magnitude", "random") if name in sens.costs}
    runs = [r for r in sens.iterative.values() if not isinstance(r, InfeasibleBudgetError)]
    if runs:
        diag = runs[0][1]  # the last round's curvature, first (menu, budget) run
        it = fisher_distortion_costs(diag, table.errors)
        preds["fisher_iterative"] = np.array([sum(it[n][f] for n, f in c.items()) for c in configs])
    if "learned" in sens.costs:  # the costs that allocate (its floor applied), as every other row is scored
        preds["learned"] = np.array([sum(sens.costs["learned"][n][f] for n, f in c.items()) for c in configs])
    elif sens.predictor is not None:
        preds["learned"] = np.array([sens.predictor.predict(c) for c in configs])
    if getattr(sens, "interaction", None) is not None:
        preds["interaction"] = sens.interaction.predict_log(configs)  # a rank: the log is as good and never overflows
    if "jvp" in sens.costs:
        preds["jvp"] = np.array([sum(sens.costs["jvp"][n][f] for n, f in c.items()) for c in configs])
    if getattr(sens, "jvp_plan", None) is not None:
        preds["jvp_plan"] = np.array(sens.jvp_plan)
    if getattr(sens, "search_fitness", None) is not None:
        # per configuration: its images' statistic, as the search judges
        preds[SEARCH_FITNESS] = quality.image_statistic(sens.search_fitness, sens.search_statistic, 1)
    return preds


def predictor_quality(sens, table, seed=0) -> dict:
    """``lowbit_quality.predictor_quality`` on the held-out configurations, with the learned predictor's fit."""
    m = sens.measured
    if m is None:
        return {}
    hold = slice(len(m["configs"]) - m["holdout"], None)
    q = quality.predictor_quality(heldout_predictions(sens, table, m["configs"][hold]), m["measured"][hold],
                                  m["retest"], m["avg_bits"][hold], seed=seed)
    if getattr(sens, "search_fitness", None) is not None:
        q["judge_sizes"] = quality.judge_size_tau(np.array(sens.search_fitness), m["measured"][hold],
                                                  m["avg_bits"][hold], sens.search_statistic)
    curve = getattr(sens, "interaction_curve", None)
    if curve:
        held = m["configs"][hold]
        q["interaction_curve"] = quality.curve_tau({n: p.predict_log(held) for n, p in curve.items()},
                                                   m["measured"][hold], m["avg_bits"][hold], seed=seed)
        # its training measurements share predictor_seed's noise with the held-out damage: the same model against
        # the retest noise (disjoint from both) says whether that flatters it
        q["interaction_retest"] = quality.bands_tau(sens.interaction.predict_log(held),
                                                    [r["mse_mean"] for r in m["retest"]], m["avg_bits"][hold],
                                                    seed=seed)
        q["interaction_images"] = sens.interaction_images
        q["interaction"] = sens.interaction.describe()
    q.update(n_train=len(m["configs"]) - m["holdout"], images=m["inputs"]["images"],
             predictor=sens.predictor.describe() if sens.predictor else None, cv=getattr(sens, "cv", None))
    return q


def heldout_search_fitness(cfg, model, table, measured, sha, device="cpu") -> list:
    """The measured search's judge on every held-out configuration, per image (paired MSE of each of
    ``lowbit.search_images`` images under ``lowbit.search_seed``), cached in ``search_fitness.json``: how far the
    search can trust its own judge within a budget band, beside the predictors (its noise is neither the held-out
    nor the retest one), and how many of its images that takes (``lowbit_quality.judge_size_tau``)."""
    lb = cfg.lowbit
    cache = ConfigCache(_cache(cfg, "search_fitness.json"), {**measurer_inputs(cfg, table, sha, lb.search_images),
                                                              "seed": lb.search_seed, "per_image": True})
    judge = search_judge(cfg, model, table, device, per_image=True)
    held = measured["configs"][len(measured["configs"]) - measured["holdout"]:]
    out = [cache.get(c, judge) for c in held]
    cache.save()
    return out


def _weight_searches(sens, plan) -> dict:
    """{(menu, size): search record} of the weight search ``plan`` ("search" or "search_interaction"), else {}."""
    return {"search": sens.search, "search_interaction": sens.search_interaction}.get(plan) or {}


def _search_own_pick(sens, plan, menu, size):
    """A re-ranked search's own best ({tensor: format}) where the re-ranking kept another; else None."""
    art = _weight_searches(sens, plan).get((menu, size))
    if not isinstance(art, dict) or "search_choice" not in art or art["search_choice"] == art["choice"]:
        return None
    return art["search_choice"]


def measure_plans(cfg, model, table, sens, sha, device="cpu", progress=True) -> dict:
    """The primary score: {"<menu> <size>": {plan: measured damage}} of every plan's allocation at every weight
    size of ``lowbit.budgets``, under ``lowbit.retest_seed`` (weights only: the activations stay float)."""
    lb = cfg.lowbit
    measurer = None
    cache = ConfigCache(_cache(cfg, "plan_damage.json"), {**measurer_inputs(cfg, table, sha, lb.predictor_images),
                                                          "seed": lb.retest_seed})

    def measure(choice):
        nonlocal measurer
        measurer = measurer or make_measurer(cfg, model, table, device)
        return measurer.measure(choice, lb.retest_seed)

    out = {}
    for size in dict.fromkeys(parse_size_at_bits(b)[0] for b in lb.budgets):
        for menu in lb.quantizers:
            row = {}
            for plan in lb.plans if menu == "uniform" else [p for p in lb.plans if p in lb.codebook_plans]:
                if plan in ("search_wa", "search_act"):  # judged with quantized activations, not weights alone
                    continue
                try:
                    choice, _ = choose(cfg, plan, menu, size, table, sens)
                except InfeasibleBudgetError:
                    continue
                row[plan] = {**cache.get(choice, measure), "avg_bits": table.avg_bits(choice)}
                own = _search_own_pick(sens, plan, menu, size)
                if own is not None:  # what the re-ranking bought, on noise neither it nor the search saw
                    row[plan + quality.OWN_PICK] = {**cache.get(own, measure), "avg_bits": table.avg_bits(own)}
            if not row:  # only plans judged with activations at this size
                continue
            out[f"{menu} {size}"] = row
            if progress:
                print(f"[lowbit] plan damage {menu} {size}: "
                      + ", ".join(f"{p} {r['mse_mean']:.3g}" for p, r in row.items()))
    cache.save()
    return out


# ----------------------------------------------------------------------------- outputs
def sensitivity_rows(sens, table):
    """Per tensor: the learned cost and the Fisher estimate at int3 and int2 (and their ranks)."""
    rows = []
    # the symmetric grid's int3 / int2, else the midrise grid's
    three, two = next(((a, b) for a, b in (("int3", "int2"), ("int3m", "int2m"))
                       if a in table.formats and b in table.formats), (None, None))
    if three is None:
        return []
    names = table.names
    fis = {n: sens.costs["fisher"][n][two] for n in names}
    lrn = {n: sens.costs["learned"][n][two] for n in names} if "learned" in sens.costs else None
    rank = {k: {n: i + 1 for i, n in enumerate(sorted(names, key=lambda n, d=d: -d[n]))}
            for k, d in (("fisher", fis), ("learned", lrn)) if d is not None}
    for n in names:
        rows.append({"tensor": n, "op": table.ops[n], "two_bits": two,
                     "fisher_int3": sens.costs["fisher"][n][three],
                     "fisher_int2": fis[n], "fisher_rank": rank["fisher"][n],
                     "learned_int3": sens.costs["learned"][n][three] if lrn else None,
                     "learned_int2": lrn[n] if lrn else None, "learned_rank": rank["learned"][n] if lrn else None})
    return rows


def summary_markdown(cfg, done, notes, sens, table, q, seconds=None) -> str:
    lb = cfg.lowbit
    ref = done["fp32"][3]
    steps = len(build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion)).timesteps)
    ranges = "least-MSE (at the budget's bits)" if lb.range_method == "mse" else "min-max"
    ends = f"at {cfg.act_quant.keep_bits} bits" if cfg.act_quant.keep_bits else "float"
    lines = [f"# Below 4 bits (`{storage.run_dir(lowbit_config(cfg))}`)", "",
             f"{lb.n_images} images per seed × seeds {lb.seeds}, {cfg.sample.sampler.upper()} {steps} steps, "
             f"paired noise; "
             f"eligible: every conv / linear weight but the first and last conv ({lb.keep_format}); biases and norms "
             f"fp32; activations: every quantized input at the budget's bits, {lb.range_mode} {ranges} ranges "
             f"(first / last conv inputs {ends}). Avg bits = stored bits (scales and codebooks included) / all "
             f"parameters. Plan seconds: wall time on this machine to compute what the plan allocates by (the learned "
             f"predictor's includes its {lb.predictor_configs} measurements)."
             + (f" This invocation: {seconds / 60:.1f} min." if seconds else ""), "",
             "| budget | quantizer | plan | avg bits | paired MSE | median paired MSE | clf-FID | Δ clf-FID vs fp32 "
             "| clf-IS | plan s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| reference | – | fp32 | 32.00 | 0 | 0 | {mean_sd(per_seed(ref, 'clf_fid'))} | – | "
             f"{mean_sd(per_seed(ref, 'clf_is'))} | – |"]
    for v, (budget, menu, plan, r) in done.items():
        if v == "fp32":
            continue
        d = per_seed(r, "clf_fid") - per_seed(ref, "clf_fid")
        cells = [mean_sd(per_seed(r, k)) for k in ("paired_mse_vs_fp32", "paired_mse_median", "clf_fid")]
        lines.append(f"| {budget} | {menu} | {plan} | {r['w_bits']:.2f} | {' | '.join(cells)} | {mean_sd(d)} | "
                     f"{mean_sd(per_seed(r, 'clf_is'))} | {r.get('plan_seconds', 0):.0f} |")
    if notes:
        lines += ["", "Not evaluated: " + "; ".join(notes)]
    lines += ["", "## Verdicts", "", "B − A: mean paired per-seed difference (± s.e.m.); lower is better for both "
              "metrics, so a positive difference favours A; **better** when a two-sided paired t-test says so after "
              "the correction stated under the table.",
              "", "| comparison (A vs B) | paired MSE: B − A | clf-FID: B − A |", "|---|---|---|"]
    lines += verdict_table([(f"{a['budget']}, {a['quantizer']}: {a_name} vs {b_name}",
                             [per_seed(b, key) - per_seed(a, key) for key in ("paired_mse_vs_fp32", "clf_fid")],
                             (a_name, b_name)) for a_name, b_name, a, b in verdict_pairs(done)])
    lines += target_lines(lb, done)
    lines += ["", "## How well each sensitivity predicts the damage", ""]
    lines += quality.plan_damage_lines(getattr(sens, "plan_damage", None), lb.predictor_images, lb.retest_seed)
    lines += [""] + quality.quality_lines(q, q.get("images") if q else None)
    srows = sensitivity_rows(sens, table)
    if srows:
        lines += ["", "## Which layers tolerate 2–3 bits", "",
                  f"Estimated damage of {srows[0]['two_bits']} on one tensor (learned: the predictor's coefficient; "
                  "Fisher: "
                  "½ Σ F ΔW²), ranked 1 = most sensitive. Op types aggregate the tensors' ranks (median).", "",
                  "| op type | tensors | median learned rank | median Fisher rank |", "|---|---:|---:|---:|"]
        for op in sorted({r["op"] for r in srows}):
            rs = [r for r in srows if r["op"] == op]
            lr = [r["learned_rank"] for r in rs if r["learned_rank"]]
            lines.append(f"| {op} | {len(rs)} | {np.median(lr):.0f} | {np.median([r['fisher_rank'] for r in rs]):.0f} |"
                         if lr else f"| {op} | {len(rs)} | – | {np.median([r['fisher_rank'] for r in rs]):.0f} |")
        top = sorted(srows, key=lambda r: r["learned_rank"] or 1e9)[:8]
        lines += ["", "| tensor | op | learned rank | Fisher rank |", "|---|---|---:|---:|"]
        lines += [f"| {r['tensor']} | {r['op']} | {r['learned_rank'] or '–'} | {r['fisher_rank']} |" for r in top]
    lines += ["", "![lowbit](lowbit.png)", "", "![layer sensitivity](lowbit_layers.png)"]
    if sens.search or sens.search_act or sens.search_interaction:
        lb = cfg.lowbit
        how = "geometric mean" if lb.search_statistic == "geomean" else "mean"
        probed = (f"; the additive proposer calibrated with measured one-step probes (`search_probe` "
                  f"{lb.search_probe})" if lb.search_probe else "")
        lines += ["", f"The weight searches' fitness: the {how} of {lb.search_images} images' paired MSE under seed "
                  f"{lb.search_seed}{probed}.", "", "![measured search](lowbit_search.png)"]
    lines += rerank_lines(cfg.lowbit, sens)
    joint = {k: a for k, a in sens.act_search.items() if not isinstance(a, InfeasibleBudgetError)}
    if joint:
        lines += ["", "## The joint search's activation bits (`search_wa`)", "",
                  "From `search`'s weights with every quantized input at the budget's bits, each input's bits over "
                  "`act_quant.a_bits` by measured search within that start's BOPs (MACs x weight bits x activation "
                  "bits); fitness: the paired MSE of the weight search's images and noise, activations quantized.",
                  "", "| menu | budget | measured moves | seconds | fitness: start → best | inputs changed | "
                  "inputs at each bit width | BOPs / limit |", "|---|---|---:|---:|---|---:|---|---:|"]
        for (m, b), a in joint.items():
            counts = ", ".join(f"A{k}: {sum(v == k for v in a['bits'].values())}"
                               for k in sorted(set(a["bits"].values()), reverse=True))
            lines.append(f"| {m} | {b} | {len(a['trace']) - 1} | {a['seconds']:.0f} | {a['trace'][0]['fitness']:.3g} "
                         f"→ {a['trace'][-1]['best']:.3g} | {a['changed']} | {counts} | "
                         f"{a['bops'] / a['limit_bops']:.3f} |")
    return "\n".join(lines) + "\n"


def rerank_lines(lb, sens) -> list:
    """The re-ranked searches (``lowbit.search_rerank``): which of its best few each kept, and its own best's and
    the kept one's fitness on the search's noise and on the re-ranking's."""
    arts = [("search", m, b, art) for (m, b), art in sens.search.items()]
    arts += [("search_interaction", m, b, art) for (m, b), art in sens.search_interaction.items()]
    arts += [(f"search_act A{a}", m, b, art) for (m, b, a), art in sens.search_act.items()]
    arts = [x for x in arts if isinstance(x[3], dict) and "rerank" in x[3]]
    if not arts:
        return []
    out = ["", "## The searches' best few, re-ranked on fresh noise", "",
           f"Each search's {lb.search_rerank} configurations of least fitness on its own noise ({lb.search_images} "
           f"images, seed {lb.search_seed}) measured again on {lb.rerank_images} images of seed {lb.rerank_seed}; the "
           f"least there is the plan. The search's own best carries its judge's luck, and the kept one's fresh value "
           f"is in turn the least of several: only the plan-damage table above (a third noise) compares them fairly "
           f"(its `(own pick)` rows).", "",
           "| search | menu | size | kept (its rank) | own best: search → fresh | kept: search → fresh | seconds |",
           "|---|---|---|---:|---|---|---:|"]
    for kind, m, b, art in arts:
        rows = art["rerank"]
        k = next(i for i, r in enumerate(rows) if r["chosen"])
        own = next((r for r in rows if r["config"] == art["search_choice"]), rows[0])
        out.append(f"| {kind} | {m} | {b} | #{k + 1} of {len(rows)} | {own['fitness']:.3g} → "
                   f"{own['rerank']:.3g} | {rows[k]['fitness']:.3g} → {rows[k]['rerank']:.3g} | "
                   f"{art['rerank_seconds']:.0f} |")
    return out


def target_lines(lb, done) -> list:
    """Every plan at a budget with a ``lowbit.targets`` entry: its classifier-FID difference to fp32 (per seed,
    paired) with the 95% t-interval, judged against the target."""
    ref = done["fp32"][3]
    rows = [(budget, menu, plan, r) for budget, menu, plan, r in done.values() if budget in lb.targets]
    if not rows:
        return []
    out = ["", "## Targets", "", "Δ clf-FID = per-seed classifier-FID minus fp32's (paired noise), mean and 95% "
           "t-interval over the seeds. **target met** only when the whole interval lies within the target; "
           "*point estimate within target, interval not* when the mean does and the interval reaches past it.", "",
           "| budget | quantizer | plan | target Δ | Δ clf-FID | 95% interval | verdict |",
           "|---|---|---|---:|---:|---|---|"]
    for budget, menu, plan, r in sorted(rows, key=lambda x: (x[0], np.nanmean(per_seed(x[3], "clf_fid")))):
        verdict, mean, lo, hi = target_verdict(per_seed(r, "clf_fid") - per_seed(ref, "clf_fid"), lb.targets[budget])
        interval = "–" if lo is None else f"[{lo:+.3g}, {hi:+.3g}]"
        out.append(f"| {budget} | {menu} | {plan} | +{lb.targets[budget]:g} | {mean:+.3g} | {interval} | "
                   f"{verdict} |")
    return out + ["", "The intervals are per row (not corrected for the number of rows): each row answers its own "
                  "question, whether that plan meets its budget's target."]


def verdict_pairs(done):
    """(A name, B name, A metrics, B metrics): every plan vs uniform; learned, chain-aware, iterative and JVP vs
    Fisher; learned, both searches and JVP vs the chain-aware Fisher (the search's start, the learned costs' prior);
    the joint search, the search judged at the budget's activations and the interaction-proposed search vs the weight
    search."""
    by = {(b, m, p): r for b, m, p, r in done.values() if p != "fp32"}
    out = []
    for ref, plans in (("uniform", None), ("fisher", ("learned", "chain_fisher", "fisher_iterative", "jvp")),
                       ("chain_fisher", ("learned", "search", "search_act", "search_interaction", "jvp",
                                         "chain_output")),
                       ("search", ("search_wa", "search_act", "search_interaction"))):
        for (budget, menu, plan), r in by.items():
            if plan != ref and (plans is None or plan in plans) and (budget, menu, ref) in by:
                out.append((plan, ref, r, by[(budget, menu, ref)]))
    return out


def rows(done) -> list:
    out = []
    for v, (budget, menu, plan, r) in done.items():
        for s in r["seeds"]:
            ps = r["per_seed"][str(s)]
            out.append({"budget": budget or "", "quantizer": menu or "", "plan": plan, "seed": s, "variant": v,
                        "avg_bits": r.get("w_bits", 32.0), "a_bits": r.get("a_bits"), "size_mb": r["size_mb"],
                        "paired_mse_vs_fp32": ps["paired_mse_vs_fp32"],
                        "paired_mse_median": ps.get("paired_mse_median"),
                        "clf_fid": ps["clf_fid"], "clf_is": ps["clf_is"], "fid": ps.get("fid"),
                        "plan_seconds": r.get("plan_seconds")})
    return out


def plot(done, cfg, path):
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), squeeze=False)
    ref = done["fp32"][3]
    for ax, key, label in ((axes[0][0], "paired_mse_vs_fp32", "paired MSE vs fp32"),
                           (axes[0][1], "clf_fid", "classifier-FID")):
        for i, plan in enumerate(cfg.lowbit.plans):
            for menu, marker in (("uniform", "o"), ("codebook", "s")):
                pts = sorted((r["w_bits"], np.nanmean(per_seed(r, key)), spread(per_seed(r, key)))
                             for b, m, p, r in done.values() if p == plan and m == menu)
                if pts:
                    x, y, e = zip(*pts, strict=True)
                    ax.errorbar(x, y, yerr=e, marker=marker, capsize=3, color=f"C{i}", ls="-" if menu == "uniform"
                                else ":", label=f"{plan} ({menu})")
        if key == "clf_fid":
            ax.axhline(np.nanmean(per_seed(ref, key)), color="k", lw=1, ls="--", label="fp32")
        else:
            ax.set_yscale("log")
        ax.set_xlabel("average stored bits per weight (scales, codebooks counted)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs weight bits (mean ± std over seeds)")
    axes[0][1].legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def plot_layers(sens, table, path):
    srows = sensitivity_rows(sens, table)
    if not srows:
        return None
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.22 * len(srows) + 1.5), sharey=True)
    y = np.arange(len(srows))
    colors = {op: f"C{i}" for i, op in enumerate(sorted({r["op"] for r in srows}))}
    two = srows[0]["two_bits"]
    for ax, key, title in ((axes[0], "learned_int2", f"learned: damage of {two} on this tensor alone"),
                           (axes[1], "fisher_int2", f"Fisher: ½ Σ F ΔW² at {two}")):
        vals = [r[key] or 0.0 for r in srows]
        ax.barh(y, vals, color=[colors[r["op"]] for r in srows])
        ax.set_xscale("symlog" if key == "learned_int2" else "log", **({"linthresh": 1e-3} if key == "learned_int2"
                                                                         else {}))
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(y, [r["tensor"].removesuffix(".weight") for r in srows], fontsize=6)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    axes[1].legend(handles, list(colors), fontsize=6, loc="lower right")
    return save_figure(fig, path)


def doc_figures(cfg) -> list:
    """The figures ``summary.md`` links, as written by ``write_outputs`` (for ``--update-docs``)."""
    folder = lowbit_dir(cfg)
    names = ("lowbit.png", "lowbit_layers.png", "lowbit_search.png")
    return [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]


def write_outputs(cfg, done, notes, sens, table, seconds=None) -> str:
    folder = lowbit_dir(cfg)
    q = predictor_quality(sens, table, cfg.lowbit.predictor_seed)
    figs = [plot(done, cfg, os.path.join(folder, "lowbit.png")),
            plot_layers(sens, table, os.path.join(folder, "lowbit_layers.png"))]
    traces = {f"{m} {b}": a["trace"] for (m, b), a in sens.search.items() if not isinstance(a, InfeasibleBudgetError)}
    traces.update({f"{m} {b} judged at A{a}": art["trace"] for (m, b, a), art in sens.search_act.items()
                   if not isinstance(art, InfeasibleBudgetError)})
    traces.update({f"{m} {b} interaction-proposed": a["trace"] for (m, b), a in sens.search_interaction.items()
                   if not isinstance(a, InfeasibleBudgetError)})
    traces.update({f"{m} {b} activations": a["trace"] for (m, b), a in sens.act_search.items()
                   if not isinstance(a, InfeasibleBudgetError)})
    if traces:
        figs.append(plot_trace(traces, os.path.join(folder, "lowbit_search.png")))
    storage.atomic_write_record({"quality": q, "plan_damage": getattr(sens, "plan_damage", None),
                                 "layers": sensitivity_rows(sens, table),
                                 "chain_per_step": sens.chain["per_step"] if sens.chain else None,
                                 "chain_rel_sem": sens.chain["rel_sem"] if sens.chain else None,
                                 "iterative": {f"{m}@{b}": r[2] for (m, b), r in sens.iterative.items()
                                               if not isinstance(r, InfeasibleBudgetError)},
                                 "search": traces},
                                os.path.join(folder, "predictors.json"))
    md = summary_markdown(cfg, done, notes, sens, table, q, seconds)
    write_summary_files(folder, cfg, rows(done), COLUMNS, md, figs + [os.path.join(folder, "predictors.json")], done)
    return md

