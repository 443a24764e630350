"""Learning curve of a training run: classifier-IS, classifier-FID/KID and FID/KID of every EMA snapshot
(train.snapshot_every) against training images seen, sampled and scored like every variant.
Writes runs/<run>/learning_curve.{json,md,png}; a rerun only evaluates new snapshots.
"""
import os

from common.core import cli
from common.core.storage import atomic_write_text, run_dir, write_sources
from common.experiments import curve
from common.experiments.report import add_docs_argument, update_section


def main():
    p = cli.parser(__doc__, force=False)
    p.add_argument("--snapshots", help="folder, glob or file of snapshots "
                                       "(default: runs/<run>/baseline/snapshots/)")
    add_docs_argument(p, "learning-curve", "docs/baseline.md")
    args = p.parse_args()
    cfg = cli.load(args)
    device = cli.device(cfg, alone=True)
    if device is None:
        return  # under torchrun rank 0 evaluates the snapshots: their cache is one file
    with cli.clear_errors():
        paths = curve.snapshot_paths(args.snapshots or os.path.join(run_dir(cfg), "baseline", "snapshots"))
        rows = curve.learning_curve(cfg, paths, device, progress=not args.no_progress)
        md = curve.curve_table(rows, cfg)
        out = run_dir(cfg)
        atomic_write_text(md + "\n", os.path.join(out, "learning_curve.md"))
        png = curve.plot_curve(rows, os.path.join(out, "learning_curve.png"))
        write_sources(os.path.join(out, "learning_curve.sources.json"), [os.path.join(out, "learning_curve.md"), png],
                      [os.path.join(out, "learning_curve.json")], cli.command(cfg))
        if args.update_docs:
            update_section(args.update_docs, "learning-curve", md + "\n\n![learning curve](learning_curve.png)",
                           figures=[png])
    print(md)
    print(f"[curve] {out}/learning_curve.md, learning_curve.png")


if __name__ == "__main__":
    cli.run(main)
