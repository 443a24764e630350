"""Beyond the poster: every importance metric in compare.metrics (fisher, fisher_distortion, magnitude,
random, orthogonality, quant_error) through the same exact allocator at every budget in compare.budgets, evaluated
with compare.seeds beside the fp32 baseline, uniform fp16/int8/int4 and the poster's four rules.
Writes runs/<run>/compare/{summary.csv, summary.md, compare.png} and one folder per variant.
Needs simplediffusion.py to have run (checkpoint and Fisher).
"""
from common.core import cli, distributed
from common.experiments import compare
from common.experiments.report import add_docs_argument, update_section_from_summary


def main():
    p = cli.parser(__doc__)
    add_docs_argument(p, "compare", "docs/compare.md")
    args = p.parse_args()
    cfg = cli.load(args)
    with cli.clear_errors():
        done, infeasible, scores = compare.run_comparison(cfg, cli.device(cfg), force=args.force,
                                                          progress=not args.no_progress)
        if not distributed.is_main():
            return  # the ranks shared the variants; rank 0 writes the summary
        md = compare.write_outputs(cfg, done, infeasible, scores)
        if args.update_docs:
            update_section_from_summary(args.update_docs, md, "compare", f"{compare.compare_dir(cfg)}/compare.png")
    print(md)


if __name__ == "__main__":
    cli.run(main)
