"""Execution backends x variants, side by side: speed, memory and what each does to the samples.

Part of ``make bench`` (``benchmarks/bench.py``; ``--part backends`` runs only this). Variants:
fp32, uniform int8, its smoothed twin (``uniform_int8_smooth``: SmoothQuant scales chosen at W8A8 folded into
the weights before rounding, fp16 run-time divisors where no producer can absorb them), the poster's best
rule (layer_ratio p = 0.25, the poster's best-FID row, with int8 as its low format because fp16 has no fast
CPU kernel) and a Fisher-allocated mix (fisher_distortion, 25% budget over fp32/fp16/int8/int4), each written
as quantized.safetensors and reloaded from it.
Backends: dequant (fp32 reference), bf16 eager, bf16 + torch.compile, int8 (PT2E W8A8 + torch.compile),
int8_bf16 (the same with attention and the non-fp32 float layers in bf16 islands).
Every (variant, backend) runs in its own process (its own peak RSS), samples the same noise (``--backend-seeds``,
default seed 0), and is compared with fp32-on-dequant: paired MSE of [0, 1] pixels and classifier-FID between the
two sets; the paired-MSE ratios of the headline carry a 95% bootstrap interval over the images.
On a CPU without native bf16 (``core.machine``), where the bf16 rows are emulated (~40x slower), every row runs
a tenth of the images (all rows alike, so they stay paired) and the ratios below 1 are printed as measured.
Then ``backend.name: auto``'s choice for each variant and for an all-bf16 plan (the one kind where it has a
choice), with its probe figures.
"""
import copy
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # runnable as a script too
from common.core import machine, storage
from common.diffusion.data import to_uint8
from common.diffusion.samplers import build_sampler, sample
from common.diffusion.schedule import NoiseSchedule
from common.evaluation import classifier, evaluate, metrics
from common.evaluation.generate import build_runner, load_weights
from common.experiments.statistics import ratio_interval
from common.quant import backends
from common.quant.container import QUANTIZED_FILE, arch_record, is_extra_tensor, save_quantized
from common.quant.eligibility import eligible_names
from common.quant.formats import quantize_model

# label: (backend, torch.compile, int8 activation ranges); the +pct rows calibrate with per-step percentiles
BACKEND_ROWS = {"dequant": ("dequant", False, None), "bf16": ("bf16", False, None),
                "bf16+compile": ("bf16", True, None), "int8": ("int8", True, "histogram"),
                "int8+pct": ("int8", True, "percentile"), "int8_bf16": ("int8_bf16", True, "histogram"),
                "int8_bf16+pct": ("int8_bf16", True, "percentile")}
VARIANTS = ("fp32", "uniform_int8", "uniform_int8_smooth", "layer_ratio_p0.25_int8", "mp_fisher_25%")
# up to alpha 1: with the default grid (to 0.9) 8 of the U-Net's 46 int8 layers chose its largest value; the
# wider grid lowered both the weight-only and the int8_bf16 paired MSE (docs/performance.md)
W8A8_ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.95, 1.0)
TARGETS = {"bf16": 1.8, "int8": 2.2, "int8bf16": 2.5, "int8pct": 2.2, "int8bf16pct": 2.5}
# headline key prefix: its int8 row of BACKEND_ROWS
INT8_FIGURES = {"int8": "int8", "int8bf16": "int8_bf16", "int8pct": "int8+pct", "int8bf16pct": "int8_bf16+pct"}


def _weights(cfg, ckpt_path):
    """(fp32 model, Fisher artifact, description): the trained baseline if there is one, else random
    weights with squared weights standing in for Fisher (plans then only exercise the machinery)."""
    fisher_path = os.path.join(storage.baseline_dir(cfg), "fisher.pt")  # beside the released weights' results
    if os.path.exists(ckpt_path) and os.path.exists(fisher_path):
        from common.importance.fisher import load_fisher

        model, _, _ = load_weights(ckpt_path, cfg)
        return model, load_fisher(fisher_path, ckpt_path), f"trained baseline {ckpt_path}"
    from common.diffusion.model import build_model

    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval().requires_grad_(False)
    params = dict(model.named_parameters())
    diag = {n: params[n].detach().pow(2) for n in eligible_names(model, cfg.fisher.eligible)}
    fisher = {"diag": diag, "per_tensor": {n: float(d.mean()) for n, d in diag.items()},
              "meta": {"eligible_rule": cfg.fisher.eligible}}
    return model, fisher, (f"random weights ({ckpt_path} or its fisher.pt missing): samples are noise, so the "
                           f"paired figures only show the machinery works; squared weights stand in for Fisher")


def smoothed_for_int8(cfg, model, plan) -> tuple:
    """(copy of ``model`` smoothed for W8A8, what smoothing did): every conv / linear the int8 plan ``plan``
    quantizes gets per-input-channel scales (SmoothQuant; alpha per layer from ``W8A8_ALPHAS`` by the W8A8
    output error, ``smoothing.smooth``), so that the int8 backend's per-tensor uint8 activations see flattened
    channels; the int8 weights are rounded after the scaling. The inputs are recorded on trajectories of the
    fp32 model drawn with the int8 backend's calibration settings (``backend.calib_*``: its noise, count and
    steps; the backend later calibrates on the quantized model's)."""
    from common.quant.formats import channel_axes, dequantize_tensor, quantize_tensor
    from common.quant.smoothing import smooth

    m = copy.deepcopy(model)
    mods, axes = dict(m.named_modules()), channel_axes(m)
    layers = [n.removesuffix(".weight") for n in plan if n.endswith(".weight") and
              type(mods[n.removesuffix(".weight")]) in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)]
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    calib = backends.calibration_inputs(m, sampler, cfg.backend.calib_images, shape, cfg.backend.calib_seed,
                                        cfg.backend.calib_steps)
    info = smooth(m, layers, lambda: [m(x, t) for x, t in calib],
                  lambda n: lambda w: dequantize_tensor(quantize_tensor(w, "int8", axes[f"{n}.weight"])), 8,
                  grid=W8A8_ALPHAS)
    return m.eval().requires_grad_(False), info


def write_variants(cfg, ckpt_path, out_dir, names=VARIANTS) -> tuple:
    """quantized.safetensors of the ``names`` variants under ``out_dir``; returns ({name: path}, description)."""
    from common.importance.weights import compute_importance
    from common.quant import strategies
    from common.quant.allocate import allocate_model
    from common.quant.formats import quantize_tensor

    model, fisher, source = _weights(cfg, ckpt_path)
    plans = {"fp32": lambda: {}, "uniform_int8": lambda: strategies.uniform(fisher, fmt="int8")[0],
             "uniform_int8_smooth": lambda: strategies.uniform(fisher, fmt="int8")[0],
             "layer_ratio_p0.25_int8": lambda: strategies.layer_ratio(fisher, 0.25, fmt="int8")[0],
             "mp_fisher_25%": lambda: allocate_model(model, compute_importance(
                 "fisher_distortion", model, fisher, cfg.importance), "25%", ["fp32", "fp16", "int8", "int4"])[0]}
    paths = {}
    for name in names:
        plan, net, provenance = plans[name](), model, {"bench": name, "source": source}
        if name.endswith("_smooth"):
            net, provenance["smoothing"] = smoothed_for_int8(cfg, model, plan)
        _, stored = quantize_model(net, plan)
        stored.update({n: quantize_tensor(b, "fp16", 0) for n, b in net.named_buffers()
                       if is_extra_tensor(n)})  # run-time divisors: stored fp16, counted in the size
        paths[name] = os.path.join(out_dir, name, QUANTIZED_FILE)
        save_quantized(stored, paths[name], arch_record(cfg, net), provenance)
    return paths, source


def _top_ops(runner, x, t, k=5) -> str:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        runner(x, t)  # a compiled graph may recompile for this mode: keep that out of the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runner(x, t)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:k]
    return ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in top)


def bench_backend(cfg, path, backend, compile_model, n, batch, int8_ranges=None, seeds=(0,)):
    """One (variant file, backend) in this process: prepare, sample ``n`` images per seed of ``seeds``, profile one
    call. ``int8_ranges``: the int8 activation observer (``backend.int8_ranges``; None keeps the config's)."""
    if int8_ranges is not None:
        cfg = copy.deepcopy(cfg)
        cfg.backend.int8_ranges = int8_ranges
    model, stored, _ = load_weights(path, cfg)
    runner = build_runner(cfg, model, stored, backend, "cpu", batch, compile_model, progress=False)
    del model, stored
    gc.collect()
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    t0 = time.perf_counter()
    x = torch.cat([sample(runner, sampler, n, shape, seed, batch, progress=False) for seed in seeds])
    seconds = time.perf_counter() - t0
    probe = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    return {"img_s": len(x) / seconds, "prepare_s": runner.prepare_seconds, "resident_bytes": runner.resident_bytes,
            # numpy, not a tensor: torch would share the tensor through a file descriptor of this (exiting) process
            "peak_rss_mb": machine.peak_rss_mb(), "x01": ((x.clamp(-1, 1) + 1) / 2).numpy(),
            "summary": runner.summary(),
            "top_ops": _top_ops(runner, probe, torch.full((batch,), cfg.diffusion.timesteps // 2))}


def _clf_features(cfg, x01):
    clf, _ = evaluate.classifier(cfg, progress=False)
    return classifier.classifier_outputs(clf, to_uint8(x01 * 2 - 1))[0]


BF16_ROWS = ("bf16", "bf16+compile", "int8_bf16")


def images_per_row(n: int, rows, cap) -> int:
    """``n``, or a tenth of it (at least 2) where bf16 rows would run emulated kernels on this CPU."""
    if cap["native_bf16"] or not set(rows) & set(BF16_ROWS):
        return n
    return max(2, n // 10)


def auto_choices(cfg, paths: dict, probe=backends.probe_speed) -> dict:
    """``backend.name: auto`` on this machine for every variant file in ``paths`` and for the fp32 baseline with every
    parameter rounded to bf16 (a plan bf16 runs exactly, so the probe decides); prints one line each and returns
    {variant: choice}."""
    import copy

    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    out = {}
    for variant, path in paths.items():
        model, _, _ = load_weights(path, cfg)
        out[variant] = backends.choose_auto(model, "cpu", cfg.run.cache_dir, shape, cfg.diffusion.timesteps,
                                            probe=probe)
        if variant == "fp32":
            bf16 = copy.deepcopy(model)
            with torch.no_grad():
                for p in bf16.parameters():
                    p.copy_(p.to(torch.bfloat16).float())
            out["uniform_bf16 (every parameter)"] = backends.choose_auto(
                bf16, "cpu", cfg.run.cache_dir, shape, cfg.diffusion.timesteps, probe=probe)
    print(f"\nbackend.name: auto on this machine ({machine.describe()}):")
    for variant, c in out.items():
        print(f"  {variant:32s} -> {c['backend']:8s} {c['reason']}")
    return out


def run(cfg, ckpt_path, out_dir, n, isolated, variants=VARIANTS, rows_wanted=tuple(BACKEND_ROWS), seeds=(0,)):
    """Measure every (variant, backend); print the table and return the headline figures.

    fp32 on dequant is the reference of the paired figures and is always measured. ``n`` images per seed of
    ``seeds``; the paired-MSE ratios get a bootstrap interval over the images."""
    variants = ["fp32"] + [v for v in variants if v != "fp32"]
    paths, source = write_variants(cfg, ckpt_path, out_dir, variants)
    cap = machine.capability()
    if images_per_row(n, rows_wanted, cap) != n:
        print(f"\n[backends] this CPU ({cap['isa']}) has no native bf16: the bf16 rows run emulated kernels, so every "
              f"row samples {images_per_row(n, rows_wanted, cap)} images instead of {n} (all rows alike: still paired)")
        n = images_per_row(n, rows_wanted, cap)
    batch = min(n, cfg.sample.batch_size)
    print(f"\n[backends] {source}\n[backends] {n} images per seed and row, batch {batch}, seeds {list(seeds)}, "
          f"{cfg.sample.sampler} {cfg.sample.steps} steps; int8 calibration: {cfg.backend.calib_images} "
          f"trajectories x {cfg.backend.calib_steps} steps (seed {cfg.backend.calib_seed})")
    rows = {}
    for variant, path in paths.items():
        for label in ["dequant"] + [b for b in rows_wanted if b != "dequant"]:
            backend, comp, ranges = BACKEND_ROWS[label]
            r = isolated(bench_backend, cfg, path, backend, comp, n, batch, ranges, tuple(seeds))
            if "x01" in r:
                r["x01"] = torch.from_numpy(r["x01"])
            rows[variant, label] = r
    ref = rows["fp32", "dequant"]
    try:
        ref_feats = _clf_features(cfg, ref["x01"])
    except (FileNotFoundError, OSError) as e:  # no MNIST to train the classifier on: paired MSE only
        print(f"[backends] classifier-FID unavailable: {e}")
        ref_feats = None
    fp32_resident = ref["resident_bytes"]
    print(f"\nmeasured on {machine.describe(cap)}")
    print(f"{'variant':24s} {'backend':16s} {'img/s':>7s} {'vs fp32':>8s} {'prepare s':>10s} {'peak RSS MB':>12s} "
          f"{'weights MB':>11s} {'vs fp32':>8s} {'paired MSE':>11s} {'clf-FID':>8s}")
    for (variant, label), r in rows.items():
        if "error" in r:
            print(f"{variant:24s} {label:16s} unavailable: {r['error']}")
            continue
        r["per_image"] = (r["x01"] - ref["x01"]).pow(2).flatten(1).mean(1).double().numpy()
        r["paired_mse"] = float(r["per_image"].mean())
        r["clf_fid"] = (metrics.frechet_from_features(_clf_features(cfg, r["x01"]), ref_feats)
                        if ref_feats is not None else None)
        fid = f"{r['clf_fid']:8.3f}" if r["clf_fid"] is not None else f"{'n/a':>8s}"
        print(f"{variant:24s} {label:16s} {r['img_s']:7.1f} {r['img_s'] / ref['img_s']:8.2f} {r['prepare_s']:10.1f} "
              f"{r['peak_rss_mb']:12.0f} {r['resident_bytes'] / 2 ** 20:11.3f} "
              f"{r['resident_bytes'] / fp32_resident:8.2f} {r['paired_mse']:11.2e} {fid}")
    if {"int8", "int8_bf16"} & set(rows_wanted):
        print("\nwhat runs in which precision (int8 rows):")
    for variant, label in ((v, b) for v in paths for b in ("int8", "int8_bf16", "int8+pct", "int8_bf16+pct")):
        r = rows.get((variant, label), {})
        if "summary" in r:
            variant = f"{variant} ({label})"
            parts = "; ".join(f"{c} {how}" for how, c in r["summary"]["tensors_by_execution"].items())
            held = ", ".join(f"{k} {v / 2 ** 20:.3f} MB" for k, v in sorted(r["summary"]["resident_by_dtype"].items()))
            print(f"  {variant}: {parts}\n    resident: {held}")
    figures = headline(rows)
    auto = auto_choices(cfg, paths)
    figures["auto_uniform_bf16"] = auto["uniform_bf16 (every parameter)"]["backend"]
    measured = auto["uniform_bf16 (every parameter)"]["measured"] or {}
    figures["auto_probe_bf16_vs_dequant"] = (round(measured["bf16"] / measured["dequant"], 2)
                                             if "bf16" in measured else None)
    return figures


def _mse_ratio(r, base) -> tuple:
    """(paired-MSE ratio of row ``r`` over row ``base``, its 95% bootstrap interval over the images or None)."""
    if base["paired_mse"] <= 0:
        return None, None
    ci = (ratio_interval(r["per_image"], base["per_image"]) if "per_image" in r and "per_image" in base
          else None)
    return round(r["paired_mse"] / base["paired_mse"], 2), (None if ci is None else [round(c, 2) for c in ci])


def headline(rows) -> dict:
    """The last-line figures, on the uniform int8 variant against its own dequant row (fp32 compute), and
    ``smooth_*`` for its smoothed twin; None where a row was not measured."""
    def ok(label):
        r = rows.get(("uniform_int8", label))
        return r if r is not None and "error" not in r else None

    base = ok("dequant")
    bf16 = max(filter(None, (ok("bf16"), ok("bf16+compile"))), key=lambda r: r["img_s"], default=None)
    out = {"bf16_speedup": None}
    if base is not None and bf16 is not None:
        out["bf16_speedup"] = round(bf16["img_s"] / base["img_s"], 2)
    for key, label in INT8_FIGURES.items():
        r = ok(label)
        fig = dict.fromkeys((f"{key}_speedup", f"{key}_resident_ratio", f"{key}_paired_mse_ratio",
                             f"{key}_paired_mse_ratio_ci"))
        if base is not None and r is not None:
            fig = {f"{key}_speedup": round(r["img_s"] / base["img_s"], 2),
                   f"{key}_resident_ratio": round(r["resident_bytes"] / rows["fp32", "dequant"]["resident_bytes"], 3)}
            fig[f"{key}_paired_mse_ratio"], fig[f"{key}_paired_mse_ratio_ci"] = _mse_ratio(r, base)
        out.update(fig)
    # the smoothed plan: its MSE against its own dequant row (the target's ratio) and against the plain plan's
    # dequant row (what smoothing costs or buys in the weights), its speed against the plain plan's dequant row
    own = rows.get(("uniform_int8_smooth", "dequant"))
    own = own if own is not None and "error" not in own else None
    for key, label in INT8_FIGURES.items():
        r = rows.get(("uniform_int8_smooth", label))
        fig = dict.fromkeys(f"smooth_{key}_{f}" for f in ("speedup", "paired_mse_ratio", "paired_mse_ratio_ci",
                                                          "vs_plain", "vs_plain_ci"))
        if base is not None and r is not None and "error" not in r:
            fig[f"smooth_{key}_speedup"] = round(r["img_s"] / base["img_s"], 2)
            fig[f"smooth_{key}_vs_plain"], fig[f"smooth_{key}_vs_plain_ci"] = _mse_ratio(r, base)
        if own is not None and r is not None and "error" not in r:
            fig[f"smooth_{key}_paired_mse_ratio"], fig[f"smooth_{key}_paired_mse_ratio_ci"] = _mse_ratio(r, own)
        out.update(fig)
    mixed = ok("int8_bf16")
    out["int8bf16_vs_bf16"] = round(mixed["img_s"] / bf16["img_s"], 2) if mixed and bf16 else None
    if base is None:
        return out
    for name, r in (("bf16", bf16), ("int8", ok("int8")), ("int8bf16", mixed), ("int8pct", ok("int8+pct")),
                    ("int8bf16pct", ok("int8_bf16+pct"))):
        if r is not None and out[f"{name}_speedup"] < TARGETS[name]:
            print(f"  {name} target (>= {TARGETS[name]}x the same plan on dequant) missed ({out[f'{name}_speedup']}x); "
                  f"top ops of one "
                  f"{name} U-Net call: {r['top_ops']}")
    print(f"  fp32 (dequant) top ops: {base['top_ops']}")
    return out


def default_checkpoint(cfg) -> str:
    return cfg.baseline.weights or os.path.join(storage.baseline_dir(cfg), "checkpoint.pt")


if __name__ == "__main__":  # a part of bench.py, not a command of its own: run as its backends part
    import subprocess

    raise SystemExit(subprocess.call([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                   "bench.py"), "--part", "backends", *sys.argv[1:]]))
