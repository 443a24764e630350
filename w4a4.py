"""W4A4 that holds: where uniform W4A4's damage comes from, and what each technique buys.

damage: with every conv / linear but the ends in 4-bit codes (as make finetune stores them), A4 on every
quantized input but one group, and on one group alone (time path, skip concatenations, sampling convs,
attention projections, ResBlock convs; the DiT's op types), each variant sampled from its files; plus per input
the relative output error of 4-bit rounding per tensor against per input channel. ablation: W4A4 from plain
rounding, adding one technique at a time (w4a4.rows): least-MSE ranges, per-token attention ranges, smoothing,
rotation, a 16-bit low-rank branch (w4a4.lowrank_rank), the time path as a table, GPTQ rounding, per-block
activation ranges, distillation that moves the weights (cached once trained). average: uniform A4 against
A4 on average (activation bits from w4a4.average_a_bits chosen by the activation Fisher, or at random, within
uniform W4A4's BOPs). channels: the per-input outlier table alone (range spread per channel, per-tensor vs
per-channel error; seconds, nothing sampled; also part of damage). Studies: w4a4.studies. Writes
runs/<run>/finetune/{w4a4.md, w4a4.csv, w4a4.png} and one folder per variant. Needs simplediffusion.py first.
"""
import os
import time

from common.core import cli, distributed
from common.experiments import w4a4
from common.experiments.report import add_docs_argument, update_section_from_summary


def main():
    p = cli.parser(__doc__)
    add_docs_argument(p, "w4a4", "docs/finetune.md")
    args = p.parse_args()
    cfg = cli.load(args)
    t0 = time.time()
    with cli.clear_errors():
        done = w4a4.run_w4a4(cfg, cli.device(cfg), cfg.w4a4.studies, force=args.force, progress=not args.no_progress)
        if not distributed.is_main():
            return
        md = w4a4.write_outputs(cfg, done, seconds=time.time() - t0)
        if args.update_docs:
            folder = w4a4.w4a4_dir(cfg)
            figures = [f"{folder}/{f}" for f in ("w4a4.png", "w4a4_grids.png") if os.path.exists(f"{folder}/{f}")]
            update_section_from_summary(args.update_docs, md, "w4a4", figures)
    print(md)


if __name__ == "__main__":
    cli.run(main)
