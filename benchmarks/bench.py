"""Speed and memory of sampling, Fisher, training and the execution backends, side by side in one run.

    python benchmarks/bench.py --config configs/default.yaml      (make bench)
    python benchmarks/bench.py --part backends --quick --config configs/smoke.yaml   (the backend table, fast)

Uses the default model architecture with random weights (speed does not depend on training).
Each measurement runs in its own child process so its peak RSS is its own. Prints the machine it measured on
(``core.machine``: ISA, native bf16, VNNI, AMX) first, a table, and ends with one ``key=value`` line (bf16_speedup;
int8_ and int8bf16_ speedup, resident_ratio and paired_mse_ratio; int8bf16_vs_bf16 first; see
benchmarks/bench_backends.py; isa, native_bf16 and vnni last). Where bf16 is emulated (no AVX512-BF16 / AMX) the
bf16 rows, and the real-fp16 row always, time a tenth of the images at that smaller batch, against fp32 at the same
batch; every ratio is printed as measured, below 1 where it is.
"""
import argparse
import copy
import multiprocessing as mp
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_backends, bench_int8_sites  # noqa: E402
from common.core import machine  # noqa: E402
from common.core.config import load_config  # noqa: E402
from common.diffusion.checkpoint import resolve_bf16  # noqa: E402
from common.diffusion.model import build_model  # noqa: E402
from common.diffusion.samplers import build_sampler, sample  # noqa: E402
from common.diffusion.schedule import NoiseSchedule  # noqa: E402
from common.experiments.report import add_docs_argument, update_section  # noqa: E402
from common.importance.fisher import per_sample_sq_grads, per_sample_sq_grads_loop  # noqa: E402
from common.quant import backends  # noqa: E402
from common.quant.eligibility import eligible_names  # noqa: E402


def _model(cfg):
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval().requires_grad_(False)


def _timeit(fn, min_seconds=2.0, warmup=1):
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= min_seconds:
            return dt / n


def gemm_size(dtype, cap) -> int:
    """2048, or 512 for bf16 where it is emulated (a 2048^3 bf16 GEMM takes ~20 s there)."""
    return 512 if dtype == torch.bfloat16 and not cap["native_bf16"] else 2048


def matmul_peak(cap):
    """fp32 (and bf16) GEMM FLOP/s of this machine, the MFU denominator."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        n = gemm_size(dtype, cap)
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out[str(dtype).split(".")[1]] = 2 * n ** 3 / _timeit(lambda a=a, b=b: a @ b, 2.0)
    return out


def forward_flops(model, batch, shape, backward=False):
    from torch.utils.flop_counter import FlopCounterMode

    x, t = torch.randn(batch, *shape), torch.randint(0, 100, (batch,))
    with FlopCounterMode(display=False) as fc:
        if backward:
            model.train().requires_grad_(True)
            model(x, t).pow(2).mean().backward()
            model.eval().requires_grad_(False)
        else:
            with torch.inference_mode():
                model(x, t)
    return fc.get_total_flops()


def bench_sampling(cfg, n_batch, n_single, variant="fp32", batch=None):
    model = _model(cfg)
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    steps = len(sampler.timesteps)
    channels_last = False
    autocast = None
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        channels_last = True
    elif variant == "bf16_weights":  # real bf16 weights and activations
        model = model.to(torch.bfloat16)
    elif variant == "fp16_weights":  # real fp16 weights and activations (CPU fp16 kernels)
        model = model.to(torch.float16)
    elif variant == "bf16_autocast":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    elif variant == "torchao_int8_wo":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())  # nn.Linear only: convolutions stay fp32
    elif variant == "fp16_stored_dequant":  # what evaluation runs: fp16-rounded weights computed in fp32
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    elif variant == "torch_compile":
        model = torch.compile(model)
    if variant in ("bf16_weights", "fp16_weights"):
        dtype = next(model.parameters()).dtype
        inner = model

        class Cast(torch.nn.Module):
            def forward(self, x, t):
                return inner(x.to(dtype), t).float()

        model = Cast()

    def run(n, bs):
        if autocast is not None:
            with autocast:
                return sample(model, sampler, n, shape, 0, bs, progress=False, channels_last=channels_last)
        return sample(model, sampler, n, shape, 0, bs, progress=False, channels_last=channels_last)

    bs = batch or cfg.sample.batch_size
    t0 = time.perf_counter()
    run(min(bs, n_batch), bs)  # warm-up (and, for torch_compile, the compilation)
    if n_batch > bs and n_batch % bs:  # the timed run's last, smaller batch: another shape, compiled here too
        run(n_batch % bs, bs)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(n_batch, bs)
    batched = n_batch / (time.perf_counter() - t0)
    out = {"variant": variant, "batched_img_s": batched, "steps": steps, "batch": min(bs, n_batch),
           "warmup_s": warmup_s}
    if n_single:
        run(1, 1)
        t0 = time.perf_counter()
        run(n_single, 1)  # the original's way: one image at a time
        out["per_image_img_s"] = n_single / (time.perf_counter() - t0)
        out["flops_per_image"] = steps * forward_flops(_model(cfg), 1, shape)
    out["peak_rss_mb"] = machine.peak_rss_mb()
    return out


def bench_fisher(cfg, n):
    model = _model(cfg).requires_grad_(True)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    names = eligible_names(model, cfg.fisher.eligible)
    g = torch.Generator().manual_seed(0)
    shape = (n, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    x0, eps = torch.randn(shape, generator=g).clamp(-1, 1), torch.randn(shape, generator=g)
    t = torch.randint(0, schedule.timesteps, (n,), generator=g)
    chunk = cfg.fisher.chunk_size

    def vectorized(model=model, x0=x0, eps=eps):
        acc = {k: 0 for k in names}
        for s in range(0, n, chunk):
            sq = per_sample_sq_grads(model, schedule, names, x0[s:s + chunk], t[s:s + chunk], eps[s:s + chunk])
            for k in names:
                acc[k] = acc[k] + sq[k].sum(0)
        return acc

    def loop(model=model, x0=x0, eps=eps):
        sq = per_sample_sq_grads_loop(model, schedule, names, x0, t, eps)
        return {k: v.sum(0) for k, v in sq.items()}

    vectorized()  # warm-up
    t0 = time.perf_counter()
    a = vectorized()
    t_vec = time.perf_counter() - t0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:  # what one chunk spends its time on
        per_sample_sq_grads(model, schedule, names, x0[:chunk], t[:chunk], eps[:chunk])
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:4]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    profile_top = ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in top)
    rss_vec = machine.peak_rss_mb()
    t0 = time.perf_counter()
    b = loop()
    t_loop = time.perf_counter() - t0
    def rel_err(a, b):  # relative to each tensor's largest entry
        return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in names)

    err = rel_err(a, b)
    # Whether the two compute the same thing is asked in float64. In float32 they differ by float32's own error,
    # which an ill-conditioned sample amplifies: with the default model and seed one of the 64 samples puts each
    # path 4-7e-4 of a time_proj tensor's maximum away from float64, so no float32 threshold tells a bug from
    # rounding. In float64 they agree to ~2e-7 (2026-12-06; not 1e-15: some kernel on one path keeps less
    # precision, not traced); a wrong per-sample gradient differs by O(1).
    m64, x64, e64 = copy.deepcopy(model).double(), x0.double(), eps.double()
    err64 = rel_err(vectorized(m64, x64, e64), loop(m64, x64, e64))
    return {"n": n, "chunk": chunk, "vectorized_s": t_vec, "loop_s": t_loop, "allclose": err64 < 1e-5,
            "max_rel_err": err, "max_rel_err_float64": err64, "peak_rss_mb": rss_vec, "profile_top": profile_top}


def bench_training(cfg, steps=5):
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).train()
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    bs = cfg.train.batch_size
    shape = (bs, cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    x0, eps, t = torch.randn(shape), torch.randn(shape), torch.randint(0, schedule.timesteps, (bs,))
    out = {}
    compiled = torch.compile(model)  # train.compile: the network compiled, the optimizer eager (compiled on warm-up)
    for label, net, bf16 in (("fp32", model, False), ("bf16_autocast", model, True),
                             ("fp32_compiled", compiled, False)):
        def step(net=net, bf16=bf16):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = schedule.p_losses(net, x0, t, eps)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[label] = _timeit(step, 3.0)
    fresh = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
    out["flops_per_step"] = forward_flops(fresh, bs, shape[1:], backward=True)
    out["batch"] = bs
    return out


def _child(q, fn, args):
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    try:
        q.put(fn(*args))
    except Exception as e:  # reported, not fatal: e.g. torchao missing
        q.put({"error": f"{type(e).__name__}: {e}"})


def isolated(fn, *args):
    """Run ``fn`` in a fresh process so its peak RSS is its own. A child that dies without answering (a segfault
    in a compiled kernel, the OOM killer) is a row with an error, not a bench that waits forever."""
    import queue

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, fn, args))
    p.start()
    while True:
        alive = p.is_alive()  # read before waiting: a child that answered just before exiting is still heard
        try:
            r = q.get(timeout=1)
            break
        except queue.Empty:
            if not alive:
                r = {"error": f"the row's process died without a result (exit code {p.exitcode})"}
                break
    p.join()
    return r


def core(cfg, args, peak, cap) -> dict:
    """Sampling variants, batch sweep, per-image loop, Fisher and training; returns the figures."""
    base = isolated(bench_sampling, cfg, args.n_batch, args.n_single, "fp32")
    rows = [base]
    # Real fp16 on CPU has no fast kernels (measured 3-20x slower), nor bf16 where it is emulated: time fewer
    # images, so at a smaller batch, and compare them with fp32 at that same batch (a tenth of the batch is
    # itself slower per image)
    slow = {"fp16_weights"} | (set() if cap["native_bf16"] else {"bf16_autocast", "bf16_weights"})
    n_slow = max(2, args.n_batch // 10)
    small = isolated(bench_sampling, cfg, n_slow, 0, "fp32")
    for v in ("channels_last", "torch_compile", "fp16_stored_dequant", "bf16_autocast", "bf16_weights",
              "fp16_weights", "torchao_int8_wo"):
        r = isolated(bench_sampling, cfg, n_slow if v in slow else args.n_batch, 0, v)
        r.setdefault("variant", v)
        rows.append(r)
    sweep = [isolated(bench_sampling, cfg, max(b, args.n_batch // 2), 0, "fp32", b) for b in args.batch_sweep]
    fisher = isolated(bench_fisher, cfg, args.fisher_n)
    train = isolated(bench_training, cfg, 5)

    print(f"\n{'sampling variant':20s} {'img/s':>8s} {'vs fp32':>8s} {'batch':>6s} {'peak RSS MB':>12s} "
          f"{'warm-up s':>10s}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:20s} unavailable: {r['error']}")
            continue
        ref = small if r["variant"] in slow else base  # fp32 at the row's own batch
        print(f"{r['variant']:20s} {r['batched_img_s']:8.1f} {r['batched_img_s'] / ref['batched_img_s']:8.2f} "
              f"{r['batch']:6d} {r['peak_rss_mb']:12.0f} {r['warmup_s']:10.1f}")
    print("batch sweep (fp32): " + ", ".join(f"batch {r['batch']}: {r['batched_img_s']:.1f} img/s" for r in sweep))
    speedup = base["batched_img_s"] / base["per_image_img_s"]
    achieved = base["batched_img_s"] * base["flops_per_image"]
    sampling_mfu = achieved / peak["float32"]
    # MFU against the peak of the precision that runs: an autocast step does its GEMMs in bf16
    # (none for bf16 where it is emulated: its convolutions do not even run as GEMMs there)
    train_mfu = {"fp32": train["flops_per_step"] / train["fp32"] / peak["float32"],
                 "bf16": (train["flops_per_step"] / train["bf16_autocast"] / peak["bfloat16"]
                          if cap["native_bf16"] else None)}
    trains_bf16 = resolve_bf16(cfg.train, "cpu")  # what a new training of this config does on this machine
    training_mfu = train_mfu["bf16" if trains_bf16 else "fp32"]
    print(f"\nper-image loop: {base['per_image_img_s']:.2f} img/s; batched (batch {base['batch']}): "
          f"{base['batched_img_s']:.1f} img/s -> {speedup:.1f}x")
    print(f"sampling: {base['flops_per_image'] / 1e9:.2f} GFLOP/image ({base['steps']} steps), "
          f"{achieved / 1e9:.1f} GFLOP/s = MFU {sampling_mfu:.2f} of fp32 GEMM")
    bf16_step = (f"MFU {train_mfu['bf16']:.2f} of bf16 GEMM" if cap["native_bf16"] else
                 f"{train['bf16_autocast'] / train['fp32']:.1f}x the fp32 step: bf16 is emulated on this CPU")
    print(f"training step (batch {train['batch']}): fp32 {train['fp32']:.2f} s = MFU {train_mfu['fp32']:.2f} of fp32 "
          f"GEMM; bf16 autocast {train['bf16_autocast']:.2f} s = {bf16_step} "
          f"(the config trains in {'bf16' if trains_bf16 else 'fp32'} here: train.bf16 {cfg.train.bf16}); "
          f"fp32 compiled (train.compile) {train['fp32_compiled']:.2f} s = "
          f"{train['fp32'] / train['fp32_compiled']:.2f}x the eager step")
    print(f"fisher ({fisher['n']} samples, chunk {fisher['chunk']}): vectorized {fisher['vectorized_s']:.2f} s, "
          f"loop {fisher['loop_s']:.2f} s -> {fisher['loop_s'] / fisher['vectorized_s']:.1f}x, "
          f"max error / tensor max {fisher['max_rel_err']:.1e} (float64: {fisher['max_rel_err_float64']:.1e}), "
          f"peak RSS {fisher['peak_rss_mb']:.0f} MB")
    fisher_speedup = fisher["loop_s"] / fisher["vectorized_s"]
    # Where a target is missed, say what limits it from the figures of this run.
    batch1_mfu = base["per_image_img_s"] * base["flops_per_image"] / peak["float32"]
    if speedup < 10:
        print(f"  sampling target (>= 10x) missed: one image at a time already reaches MFU {batch1_mfu:.2f}, and "
              f"batched sampling MFU {sampling_mfu:.2f}; the speedup is bounded by their ratio "
              f"({sampling_mfu / batch1_mfu:.1f}x) on this CPU")
    if fisher_speedup < 5:
        print(f"  fisher target (>= 5x) missed: the per-sample weight gradients of convolutions cost as many FLOPs "
              f"as the loop's; one chunk's top ops: {fisher['profile_top']}")
    if sampling_mfu < 0.3:
        print("  sampling MFU target (>= 0.30) missed")
    figures = {
        "sampling_speedup_vs_per_image": round(speedup, 2),
        "fisher_speedup_vs_loop": round(fisher_speedup, 2),
        "fisher_allclose": fisher["allclose"],
        "sampling_mfu": round(sampling_mfu, 3),
        "training_mfu": round(training_mfu, 3) if training_mfu is not None else None,
        "training_mfu_fp32": round(train_mfu["fp32"], 3),
        "training_mfu_bf16": round(train_mfu["bf16"], 3) if train_mfu["bf16"] is not None else None,
        "sampling_img_s": round(base["batched_img_s"], 1),
        "fp32_gemm_gflops": round(peak["float32"] / 1e9, 1),
        "peak_rss_mb_sampling": round(base["peak_rss_mb"]),
        "peak_rss_mb_fisher": round(fisher["peak_rss_mb"]),
    }
    # What batching buys the reproduction itself: every evaluation image of `make reproduce`.
    n_variants = 5 + len(cfg.strategies.layer_ratio.p)  # fp32, uniform, whole, group, math + the p sweep
    n_img = n_variants * cfg.eval.n_images * len(cfg.eval.seeds)
    print(f"make reproduce samples {n_img} images ({n_variants} variants x {cfg.eval.n_images} x "
          f"{len(cfg.eval.seeds)} seeds): {n_img / base['per_image_img_s'] / 60:.1f} min one at a time vs "
          f"{n_img / base['batched_img_s'] / 60:.1f} min batched")
    return figures


def check_backend_seeds(seeds, calib_seed, ap):
    """The intervals treat every pooled image as independent: a seed given twice would count its images twice
    (an interval ~1.4x too narrow), and the int8 calibration's seed would share its noise with the evaluation."""
    if len(set(seeds)) != len(seeds):
        ap.error(f"--backend-seeds {' '.join(map(str, seeds))}: a seed appears twice; give each once")
    if calib_seed in seeds:
        ap.error(f"--backend-seeds: {calib_seed} is backend.calib_seed, the int8 calibration's noise; pick others")


def check_sites_seed(seed, cfg, backend_seeds, ap):
    """The int8-sites study picks inputs to keep float; the backend rows and the evaluation judge the pick, so
    it must not be made on their noise (nor on the calibration's)."""
    if seed in {*cfg.eval.seeds, *backend_seeds, cfg.backend.calib_seed}:
        ap.error(f"--sites-seed {seed} is an evaluation, backend-row or calibration seed; a set chosen on it would "
                 f"be judged on its own noise: pick another")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--n-batch", type=int, default=500, help="images for the batched sampler")
    ap.add_argument("--n-single", type=int, default=8, help="images for the per-image loop")
    ap.add_argument("--fisher-n", type=int, default=64, help="samples for the Fisher comparison")
    ap.add_argument("--batch-sweep", type=int, nargs="*", default=[25, 100, 300], help="sampling batch sizes")
    ap.add_argument("--part", choices=("all", "core", "backends", "int8-sites"), default="all",
                    help="core: sampling/Fisher/training; backends: execution backends x variants; int8-sites "
                         "(not in all): which int8 activation quantizers move the samples")
    ap.add_argument("--backend-n", type=int, default=400, help="images per seed and (variant, backend) row")
    ap.add_argument("--backend-seeds", type=int, nargs="+", default=[0],
                    help="noise seeds of the backend rows (the ratios' intervals pool their images)")
    ap.add_argument("--variants", nargs="+", default=list(bench_backends.VARIANTS), choices=bench_backends.VARIANTS,
                    help="variants of the backend table (fp32 is always measured: it is the reference)")
    ap.add_argument("--backends", nargs="+", default=list(bench_backends.BACKEND_ROWS),
                    choices=list(bench_backends.BACKEND_ROWS), help="rows of the backend table (dequant always)")
    ap.add_argument("--sites-n", type=int, default=128, help="int8-sites: images per site")
    ap.add_argument("--sites-seed", type=int, default=778,
                    help="int8-sites: noise seed (not an evaluation, backend-row or calibration seed)")
    ap.add_argument("--checkpoint", help="baseline for the backend table (default: baseline.weights, else runs/<run>/"
                                         "baseline/checkpoint.pt; with runs/<run>/baseline/fisher.pt, else random "
                                         "weights)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    add_docs_argument(ap, "perf", "docs/performance.md")
    args = ap.parse_args()
    if args.update_docs:
        sys.stdout = _Tee(sys.stdout)
    cfg = load_config(args.config, args.overrides)
    check_backend_seeds(args.backend_seeds, cfg.backend.calib_seed, ap)
    if args.part == "int8-sites":
        check_sites_seed(args.sites_seed, cfg, args.backend_seeds, ap)
    if args.quick:
        args.n_batch, args.n_single, args.fisher_n, args.batch_sweep, args.backend_n = 16, 2, 8, [4], 16
        args.sites_n = 4
    cap = machine.capability()
    arch = (f"U-Net, channels {cfg.model.channels}" if cfg.model.arch == "unet" else
            f"DiT, width {cfg.model.hidden}, {sum(cfg.model.stage_blocks)} blocks, patch {cfg.model.patch_size}")
    print(f"[bench] {args.config}: {arch}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"[bench] machine: {machine.describe(cap)}")
    peak = matmul_peak(cap)
    print(f"[bench] GEMM: fp32 {peak['float32'] / 1e9:.1f} GFLOP/s (2048^3), bf16 {peak['bfloat16'] / 1e9:.1f} GFLOP/s "
          f"({gemm_size(torch.bfloat16, cap)}^3{'' if cap['native_bf16'] else ', emulated'})")

    figures = {}
    if args.part in ("all", "core"):
        figures.update(core(cfg, args, peak, cap))
    ckpt = args.checkpoint or bench_backends.default_checkpoint(cfg)  # the backend table's and the sites study's
    out_dir = os.path.join(cfg.run.out_dir, "bench", cfg.run.name)
    if args.part == "int8-sites":
        paths, _ = bench_backends.write_variants(cfg, ckpt, out_dir, ["fp32", bench_int8_sites.VARIANT])
        bench_int8_sites.run(cfg, paths[bench_int8_sites.VARIANT], paths["fp32"], out_dir, args.sites_n,
                             args.sites_seed)
        return
    if args.part in ("all", "backends"):
        # the four figures the backend targets are judged by come first on the last line
        figures = {**bench_backends.run(cfg, ckpt, out_dir, args.backend_n, isolated, args.variants, args.backends,
                                          args.backend_seeds),
                   **figures}
    figures.update(isa=cap["isa"], native_bf16=cap["native_bf16"], vnni=cap["vnni"],  # what every figure ran on
                   int8_time_path=cfg.backend.int8_time_path,  # and the int8 settings the int8 rows ran under
                   int8_float_inputs=len(cfg.backend.int8_float_inputs),
                   int8_reduce_range=backends.resolve_reduce_range(cfg.backend.int8_reduce_range, cap))
    # key=value pairs separated by spaces, so an interval is printed without them
    print(" ".join(f"{k}={'[' + ','.join(map(str, v)) + ']' if isinstance(v, list) else v}"
                   for k, v in figures.items()))
    if args.update_docs:
        update_section(args.update_docs, "perf", "```\n" + sys.stdout.text().strip() + "\n```")
        sys.stdout = sys.stdout.stream
        print(f"[bench] table -> {args.update_docs}")


class _Tee:
    """stdout that also keeps what was printed (for --update-docs)."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, s):
        self.parts.append(s)
        return self.stream.write(s)

    def flush(self):
        self.stream.flush()

    def text(self):
        return "".join(self.parts)


if __name__ == "__main__":
    main()
