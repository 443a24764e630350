"""How quantization sensitivity moves with training: uniform int8, uniform int4 and a Fisher-allocated
mix (sensitivity.budget) on several EMA snapshots of one training run, same seeds and noise; paired MSE
and classifier-FID/KID against each snapshot's own fp32 samples, and each snapshot's per-stage Fisher.
Writes runs/<run>/sensitivity/{summary.md, sensitivity.png} and one folder per snapshot.
"""
from common.core import cli
from common.core.storage import run_dir
from common.experiments import sensitivity
from common.experiments.curve import snapshot_paths
from common.experiments.report import add_docs_argument, update_section_from_summary


def main():
    p = cli.parser(__doc__)
    p.add_argument("--snapshots", nargs="+", required=True, metavar="FILE",
                   help="snapshot files (baseline weights format), at least 2: e.g. early, middle, final")
    add_docs_argument(p, "sensitivity", "docs/baseline.md")
    args = p.parse_args()
    cfg = cli.load(args)
    device = cli.device(cfg, alone=True)
    if device is None:
        return  # under torchrun rank 0 runs the snapshots
    with cli.clear_errors():
        paths = sensitivity.distinct_snapshots([q for s in args.snapshots for q in snapshot_paths(s)])
        rows = sensitivity.run_sensitivity(cfg, paths, device, force=args.force,
                                           progress=not args.no_progress)
        md = sensitivity.write_outputs(cfg, rows)
        if args.update_docs:
            update_section_from_summary(args.update_docs, md, "sensitivity",
                                        f"{run_dir(cfg)}/sensitivity/sensitivity.png")
    print(md)


if __name__ == "__main__":
    cli.run(main)
