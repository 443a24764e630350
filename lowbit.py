"""Below 4 bits: sub-4-bit weight formats (int3/int2, group-wise scales, k-means codebooks) allocated under
lowbit.budgets ('3.5bits@A8': average stored bits per weight, scales and codebooks counted, with 8-bit activations)
by every plan in lowbit.plans (uniform, one-step Fisher, chain-aware Fisher and its output-scaled chain_output,
iterative Fisher, a predictor learned from measured configurations, magnitude, random, the JVP of x_0 along the
real weight error, a measured search; opt-in: search_act, the same search judged with the budget's quantized
activations, search_wa, the search's weights with each input's activation bits searched within the same BOPs, and
search_interaction, the search with its moves proposed by the interaction predictor (lowbit.interaction_configs)),
for the uniform and the codebook menu of formats. Every conv / linear weight but the first and last conv may be
quantized. Each variant is saved, rebuilt from its files and evaluated with lowbit.seeds x lowbit.n_images paired
samples; each sensitivity is judged by the measured damage of its plans and by Kendall tau per budget band beside
the test-retest ceiling. Writes runs/<run>/lowbit/{summary.csv, summary.md, predictors.json, lowbit.png,
lowbit_layers.png, lowbit_search.png} and one folder per variant (lowbit_gptq/ with lowbit.rounding: gptq, as in
default.yaml). Needs simplediffusion.py to have run.
"""
import time

from common.core import cli, distributed
from common.experiments import lowbit
from common.experiments.report import add_docs_argument, update_section


def main():
    p = cli.parser(__doc__)
    add_docs_argument(p, "lowbit", "docs/lowbit.md")
    args = p.parse_args()
    cfg = cli.load(args)
    t0 = time.time()
    with cli.clear_errors():
        done, notes, sens, table = lowbit.run_lowbit(cfg, cli.device(cfg), force=args.force,
                                                     progress=not args.no_progress)
        if not distributed.is_main():
            return  # the ranks shared the variants; rank 0 writes the summary
        md = lowbit.write_outputs(cfg, done, notes, sens, table, seconds=time.time() - t0)
        if args.update_docs:
            update_section(args.update_docs, "lowbit", md.split("\n", 2)[2], figures=lowbit.doc_figures(cfg))
    print(md)


if __name__ == "__main__":
    cli.run(main)
