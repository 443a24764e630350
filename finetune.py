"""W/A plans recovered by training: for every budget in finetune.budgets ('WxAy', default W4A6 and W4A8: x-bit
weight codes for every conv / linear but the first and last conv, y-bit activations with per-timestep-group ranges;
W4A4 is w4a4.py's ablation), every make lowbit plan in finetune.plans ('3bits@A8': its stored per-tensor
formats, GPTQ's codes as the start), and every method in
finetune.methods -- none (round to nearest, min-max ranges), reconstruction (per-layer AdaRound + LSQ steps
against the fp32 layer), quest / fisher / all (finetuning with the quantizer in the loop against the fp32 teacher:
QuEST's choice of layers, the same number chosen by Fisher information, or every layer) -- optimise on the
teacher's own sampling trajectories, export codes and steps to quantized.safetensors / act_quant.safetensors,
rebuild the model from those files and evaluate it with finetune.seeds x finetune.n_images paired samples.
Writes runs/<run>/finetune/{summary.csv, summary.md, finetune.png} and one folder per variant. Needs
simplediffusion.py to have run. An interrupted run leaves finished variants intact and restarts the others.
"""
import time

from common.core import cli, distributed
from common.experiments import finetune
from common.experiments.report import add_docs_argument, update_section_from_summary


def main():
    p = cli.parser(__doc__)
    add_docs_argument(p, "finetune", "docs/finetune.md")
    args = p.parse_args()
    cfg = cli.load(args)
    t0 = time.time()
    with cli.clear_errors():
        done = finetune.run_finetune(cfg, cli.device(cfg), force=args.force,
                                     progress=not args.no_progress)
        if not distributed.is_main():
            return  # the ranks shared the variants; rank 0 writes the summary
        md = finetune.write_outputs(cfg, done, seconds=time.time() - t0)
        if args.update_docs:
            update_section_from_summary(args.update_docs, md, "finetune", f"{finetune.finetune_dir(cfg)}/finetune.png")
    print(md)


if __name__ == "__main__":
    cli.run(main)
