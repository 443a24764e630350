"""Draw images from a baseline or any quantized variant, on a real low-precision backend.

--checkpoint takes a training checkpoint or a plain safetensors state dict (EMA weights; architecture from
its metadata, else from --config); default: the config's released baseline.weights, else
runs/<run>/baseline/checkpoint.pt. --variant-file takes a quantized.safetensors; an act_quant.py
variant's activation quantizers (act_quant.safetensors beside it) are applied too, as fake quantization on
--backend dequant only. --backend: dequant (fp32 compute of the stored values, the reference), bf16, fp16
(CUDA only), int8 (static W8A8 on x86 through PT2E + torch.compile), int8_bf16 (the same with attention and
the convolutions / linears of non-fp32 float weights in bf16, everything between them fp32), or auto (the
fastest backend that is exact for the plan on this machine, measured once by a short probe and cached; see
docs/backends.md). Writes
<out>/samples.png, samples.npz (uint8 images and float32 samples) and sample.json (source, backend, what each
tensor ran in, speed, the machine). Same --seed, same batch size: same noise, so outputs of two backends or
variants are paired.
"""
import os

from common.core import cli, machine
from common.core.storage import baseline_dir, run_dir
from common.diffusion.baseline import verify_released
from common.evaluation.generate import generate, int8_settings_tag
from common.quant.backends import AUTO, BACKENDS


def source_tag(path: str) -> str:
    """What names a source in the default output folder: the folder of a variant's ``quantized.safetensors`` or a
    run's ``checkpoint.pt`` (their file names say nothing), else the weights file's own name, so two files of one
    folder (checkpoints/default.safetensors, checkpoints/default_step004000.safetensors) never share a folder."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.basename(os.path.dirname(os.path.abspath(path))) if stem in ("quantized", "checkpoint") else stem


def main():
    p = cli.parser(__doc__, force=False)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="baseline weights: checkpoint.pt or a safetensors state dict "
                                          "(default: baseline.weights, else runs/<run>/baseline/checkpoint.pt)")
    src.add_argument("--variant-file", help="a quantized.safetensors written by a strategy script")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the evaluation's seeds are eval.seeds)")
    p.add_argument("--like-n", type=int, help="draw the noise as an evaluation of this many images per seed does, so "
                                              "--n up to it gives that evaluation's first images (default: "
                                              "n_images of the metrics.json beside the file, else eval.n_images)")
    p.add_argument("--backend", choices=(AUTO, *BACKENDS),
                   help="execution backend (default: backend.name from the config)")
    p.add_argument("--out", help="output folder (default: runs/<run>/samples/<source>_<backend>[_<int8 settings>]_"
                                 "seed<seed>; source: the variant's folder, or a weights file's name; the int8 "
                                 "backends' settings that differ from their defaults are named, e.g. _tpfp32)")
    args = p.parse_args()
    cfg = cli.load(args)
    if args.n < 1:
        p.error("--n must be at least 1")
    if args.like_n is not None and args.like_n < 1:
        p.error("--like-n must be at least 1")
    backend = args.backend or cfg.backend.name
    path = (args.variant_file or args.checkpoint or cfg.baseline.weights
            or os.path.join(baseline_dir(cfg), "checkpoint.pt"))
    if os.path.isdir(path):
        p.error(f"{path} is a folder; name the file in it (a variant's quantized.safetensors, a checkpoint.pt or a "
                f"weights .safetensors)")
    tag = source_tag(path)
    out = args.out or os.path.join(run_dir(cfg), "samples",
                                   f"{tag}_{backend}{int8_settings_tag(cfg, backend)}_seed{args.seed}")
    device = cli.device(cfg, alone=True)
    if device is None:
        return  # under torchrun rank 0 samples; one file, one process
    print(f"[sample] machine: {machine.describe()}")
    with cli.clear_errors():
        if cfg.baseline.weights and os.path.abspath(path) == os.path.abspath(cfg.baseline.weights):
            verify_released(cfg)  # SHA-256 and training config, as every other script checks them
        try:
            r = generate(cfg, path, backend, args.n, args.seed, out, device,
                         progress=not args.no_progress, like_n=args.like_n)
        except ValueError as e:  # a bad file or a backend this machine cannot run: one line, not a traceback
            raise SystemExit(f"error: {e}") from None
    print(f"[sample] {args.n} images of {path} on {r['backend']}: {r['images_per_second']} img/s, "
          f"prepare {r['prepare_seconds']} s, resident weights {r['resident_bytes'] / 2 ** 20:.2f} MB")
    for how, count in r["tensors_by_execution"].items():
        print(f"  {count:4d} tensors: {how}")
    print(f"[sample] -> {out}/samples.png, samples.npz, sample.json")


if __name__ == "__main__":
    cli.run(main)
