"""What a poster-scale sweep costs on 1 and on N GPUs, from measured per-image costs and the sharding rules.

    python benchmarks/sweep_cost.py                                   (measure here, project to GPUs)
    python benchmarks/sweep_cost.py --device cuda --gpus 1 8          (on a GPU: its own measured costs)
    python benchmarks/sweep_cost.py --update-docs docs/distributed.md (make sweep-cost)

Measures, on ``--device``, the config's U-Net (default ``configs/poster.yaml``: 35 M parameters): seconds per
image of one fp32 forward call (the sampler's unit of work: evaluation always runs the dequantized weights in
fp32) and of one training image (forward + backward, under bf16 autocast where ``train.bf16`` resolves to it on
this device: ``auto`` means where bf16 is native), and counts both calls' FLOPs; the table names the machine.
Where the device is not a GPU, GPU seconds are projected from the FLOPs at ``--gpu-tflops`` sustained per GPU:
an assumption, stated in every table, not a measurement. Then applies the sharding of docs/distributed.md:
training, Fisher and a variant's evaluation split across the N ranks (assumed linear: communication and the
smaller per-rank batch are not charged); a sweep hands whole variants to ranks, so it takes ceil(V / N) rounds of
one variant each.
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench import forward_flops  # noqa: E402
from common.core import machine  # noqa: E402
from common.core.cli import clear_errors  # noqa: E402
from common.core.config import load_config  # noqa: E402
from common.diffusion.checkpoint import resolve_bf16  # noqa: E402
from common.diffusion.model import build_model  # noqa: E402
from common.diffusion.schedule import NoiseSchedule  # noqa: E402
from common.experiments.report import add_docs_argument, update_section  # noqa: E402
from common.importance.fisher import per_sample_sq_grads  # noqa: E402
from common.quant.eligibility import eligible_names  # noqa: E402

MNIST_TRAIN = 60_000


def _seconds_per_call(fn, min_seconds):
    fn()  # warm-up (allocator, cuDNN autotuning)
    n, t0 = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def measure(cfg, device, batch, min_seconds=3.0) -> dict:
    """Seconds and FLOPs per image of one fp32 sampling call and one training image (bf16 autocast where training
    would use it on ``device``: ``train.bf16`` resolved there)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    flops = {"sample": forward_flops(model.eval().requires_grad_(False), 1, shape),
             "train": forward_flops(model, 1, shape, backward=True)}
    model = model.to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    x = torch.randn(batch, *shape, device=device)
    t = torch.randint(0, cfg.diffusion.timesteps, (batch,), device=device)

    def sample_call():
        with torch.inference_mode():
            model(x, t)
        sync()

    bf16 = resolve_bf16(cfg.train, torch.device(device).type)

    def train_call():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, t).float().pow(2).mean()
        loss.backward()
        sync()

    # the Fisher: per-sample squared gradients of its chunk (vmap over samples), in fp32 and eval mode, as
    # compute_fisher runs them; dearer per image than a training image (its per-sample gradients)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    names = eligible_names(model, cfg.fisher.eligible)
    chunk = min(cfg.fisher.chunk_size, batch)
    eps = torch.randn_like(x[:chunk])

    def fisher_call():
        per_sample_sq_grads(model, schedule, names, x[:chunk], t[:chunk], eps)
        sync()

    model.eval().requires_grad_(False)
    s_sample = _seconds_per_call(sample_call, min_seconds) / batch
    s_fisher = _seconds_per_call(fisher_call, min_seconds) / chunk
    flops["fisher"] = flops["train"]  # forward + backward per sample, in fp32
    model.train().requires_grad_(True)
    s_train = _seconds_per_call(train_call, min_seconds) / batch
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "flops": flops, "seconds": {"sample": s_sample, "train": s_train, "fisher": s_fisher},
            "batch": batch, "fisher_chunk": chunk, "bf16": bf16, "machine": machine.describe()}


def workload(cfg) -> dict:
    """U-Net image-calls of each stage of ``make reproduce`` and ``make compare`` under ``cfg``."""
    steps = cfg.sample.steps
    per_variant = cfg.eval.n_images * len(cfg.eval.seeds) * steps
    compare_variants = len(cfg.compare.metrics) * len(cfg.compare.budgets)
    train_steps = cfg.train.max_steps
    if train_steps is None:
        train_steps = cfg.train.epochs * math.ceil(MNIST_TRAIN / cfg.train.batch_size)
    reproduce = 5 + len(cfg.strategies.layer_ratio.p)  # fp32, uniform, whole, group, math + the p sweep (as bench.py)
    return {
        "training": ("train", train_steps * cfg.train.batch_size, None),
        "Fisher": ("fisher", cfg.fisher.n_samples, None),
        f"reproduce: {reproduce} variants evaluated": ("sample", reproduce * per_variant, None),
        f"compare: {compare_variants} variants": ("sample", compare_variants * cfg.compare.n_images
                                                  * len(cfg.compare.seeds) * steps, compare_variants),
    }


def table(cfg, m, device, gpus, gpu_tflops) -> str:
    gpu_measured = torch.device(device).type == "cuda"

    def gpu_seconds(kind):
        return m["seconds"][kind] if gpu_measured else m["flops"][kind] / (gpu_tflops * 1e12)

    def hours(s):
        return f"{s / 3600:,.1f} h" if s >= 3600 else f"{s / 60:,.1f} min" if s >= 60 else f"{s:.1f} s"

    lines = [f"Config `{cfg.source}`: {m['params'] / 1e6:.2f} M parameters, {cfg.sample.sampler} "
             f"{cfg.sample.steps} steps, {cfg.eval.n_images} images × {len(cfg.eval.seeds)} seed(s) per variant. "
             f"Per image: sampling call {m['flops']['sample'] / 1e9:.2f} GFLOP (fp32), training image "
             f"{m['flops']['train'] / 1e9:.2f} GFLOP (forward + backward, "
             f"{'bf16 autocast' if m.get('bf16', True) else 'fp32'}). Measured on {device}"
             f"{' (' + m['machine'] + ')' if m.get('machine') else ''} at batch {m['batch']}: "
             f"{m['seconds']['sample'] * 1e3:.1f} ms per sampling call-image, "
             f"{m['seconds']['train'] * 1e3:.1f} ms per training image, "
             f"{m['seconds']['fisher'] * 1e3:.1f} ms per Fisher sample (fp32 per-sample gradients, chunk "
             f"{m.get('fisher_chunk', cfg.fisher.chunk_size)}).",
             "",
             ("GPU columns: **measured** on this GPU." if gpu_measured else
              f"GPU columns: **projected** at {gpu_tflops:g} TFLOP/s sustained per GPU — an assumption, not a "
              f"measurement: about a third of an A100's dense bf16 peak (312) and two thirds of its TF32 peak "
              f"(156; PyTorch runs fp32 convolutions as TF32 by default). Sampling at batch "
              f"{cfg.sample.batch_size} may come near it; training at batch {cfg.train.batch_size} of "
              f"{cfg.data.image_size} × {cfg.data.image_size} images, far less so. Scale the columns by your GPU's "
              f"measured rate, or run with `--device cuda` to measure it."),
             "",
             f"| stage | U-Net image-calls | this {device} | "
             + " | ".join(f"{n} GPU{'s' * (n > 1)}" for n in gpus) + " |",
             "|---|---:|---:|" + "---:|" * len(gpus)]
    for stage, (kind, calls, whole_variants) in workload(cfg).items():
        here = calls * m["seconds"][kind]
        cols = []
        for n in gpus:
            total = calls * gpu_seconds(kind)
            if whole_variants:  # a sweep: ceil(V / N) rounds of one variant per rank
                total = math.ceil(whole_variants / n) * total / whole_variants
            else:
                total /= n
            cols.append(hours(total))
        lines.append(f"| {stage} | {calls:,} | {hours(here)} | " + " | ".join(cols) + " |")
    most = max(gpus)
    lines += ["", f"Not charged: Inception / classifier features (one forward of "
                  f"{cfg.eval.n_images * len(cfg.eval.seeds):,} small images per variant), the collectives (a gather "
                  f"of the images per seed; one all-reduce of the Fisher sums; DDP's gradient all-reduce per step) "
                  f"and the lower utilisation of a smaller per-rank batch ({cfg.train.batch_size} / {most} = "
                  f"{cfg.train.batch_size / most:g} training images per GPU at {most} GPUs)."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/poster.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cpu", help="where to measure (cuda: the GPU columns are measured)")
    ap.add_argument("--batch", type=int, default=None, help="images per measured call (default: 8 on CPU, the "
                                                            "config's sample.batch_size capped at 256 on a GPU)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="GPU counts to cost")
    ap.add_argument("--gpu-tflops", type=float, default=100.0, help="assumed sustained TFLOP/s per GPU (CPU runs)")
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per timed measurement")
    add_docs_argument(ap, "sweep-cost", "docs/distributed.md")
    args = ap.parse_args(argv)
    if args.gpu_tflops <= 0 or any(n < 1 for n in args.gpus):
        raise SystemExit("--gpu-tflops must be > 0 and every --gpus count >= 1")
    with clear_errors():
        cfg = load_config(args.config, args.overrides)
    batch = args.batch or (8 if args.device == "cpu" else min(cfg.sample.batch_size, 256))
    torch.set_num_threads(cfg.run.threads or torch.get_num_threads())
    m = measure(cfg, args.device, batch, args.seconds)
    text = table(cfg, m, args.device, args.gpus, args.gpu_tflops)
    print(text)
    if args.update_docs:
        update_section(args.update_docs, "sweep-cost", text)


if __name__ == "__main__":
    main()
