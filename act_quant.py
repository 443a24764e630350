"""Beyond the poster: quantize activations too. For every budget in act_quant.budgets ('W8A8' = the BOPs of
uniform 8-bit weights and activations, '1.5GBOPs', or a stored size), every range mode in act_quant.range_modes
(one activation range for all timesteps, or one per timestep group) and every plan in act_quant.plans (uniform,
or the exact allocator choosing weight and activation bits per module by Fisher, magnitude, random or squared
error): calibrate the activation ranges along the sampling trajectory, allocate, save the weights
(quantized.safetensors) and activation scales (act_quant.safetensors), rebuild the model from those files and evaluate
it with act_quant.seeds beside the fp32 baseline under the same noise. Writes runs/<run>/act_quant/
{summary.csv, summary.md, act_quant.png} and one folder per variant. Needs simplediffusion.py to have run.
"""
import time

from common.core import cli, distributed
from common.experiments import act_compare
from common.experiments.report import add_docs_argument, update_section_from_summary


def main():
    p = cli.parser(__doc__)
    add_docs_argument(p, "actquant", "docs/actquant.md")
    args = p.parse_args()
    cfg = cli.load(args)
    t0 = time.time()
    with cli.clear_errors():
        done, notes = act_compare.run_act_comparison(cfg, cli.device(cfg), force=args.force,
                                                     progress=not args.no_progress)
        if not distributed.is_main():
            return  # the ranks shared the variants; rank 0 writes the summary
        md = act_compare.write_outputs(cfg, done, notes, seconds=time.time() - t0)
        if args.update_docs:
            update_section_from_summary(args.update_docs, md, "actquant", f"{act_compare.act_dir(cfg)}/act_quant.png")
    print(md)


if __name__ == "__main__":
    cli.run(main)
