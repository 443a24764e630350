"""Learning curve of a training run: classifier-IS, classifier-FID/KID and FID/KID of every EMA snapshot
(train.snapshot_every) against training images seen, sampled and scored like every variant.
Writes runs/<run>/learning_curve.{json,md,png}; a rerun only evaluates new snapshots.
"""
import os

from common.core import cli
from common.core.storage import atomic_write_text, resolve_device, run_dir
from common.experiments import curve
from common.experiments.report import add_docs_argument, update_section


def main():
    p = cli.parser(__doc__)
    p.add_argument("--snapshots", help="folder, glob or file of snapshots "
                                       "(default: runs/<run>/baseline/snapshots/)")
    add_docs_argument(p, "learning-curve", "docs/baseline.md")
    args = p.parse_args()
    cfg = cli.load(args)
    with cli.clear_errors():
        paths = curve.snapshot_paths(args.snapshots or os.path.join(run_dir(cfg), "baseline", "snapshots"))
        rows = curve.learning_curve(cfg, paths, resolve_device(cfg.run.device), progress=not args.no_progress)
        md = curve.curve_table(rows, cfg)
        out = run_dir(cfg)
        atomic_write_text(md + "\n", os.path.join(out, "learning_curve.md"))
        png = curve.plot_curve(rows, os.path.join(out, "learning_curve.png"))
        if args.update_docs:
            update_section(args.update_docs, "learning-curve", md + "\n\n![learning curve](learning_curve.png)",
                           figures=[png])
    print(md)
    print(f"[curve] {out}/learning_curve.md, learning_curve.png")


if __name__ == "__main__":
    main()
