"""Learning curve of a training run: classifier-IS, classifier-FID/KID and FID/KID of every EMA snapshot
(train.snapshot_every) against training images seen, sampled and scored like every variant.
Writes runs/<run>/learning_curve.{json,md,png}; a rerun only evaluates new snapshots.
"""
import os

from common import cli, curve
from common.storage import atomic_write_text, resolve_device, run_dir


def main():
    p = cli.parser(__doc__)
    p.add_argument("--snapshots", help="folder, glob or file of snapshots "
                                       "(default: runs/<run>/baseline/snapshots/)")
    p.add_argument("--update-readme", metavar="README", help="also write the table and plot into this README")
    args = p.parse_args()
    cfg = cli.load(args)
    with cli.clear_errors():
        paths = curve.snapshot_paths(args.snapshots or os.path.join(run_dir(cfg), "baseline", "snapshots"))
        rows = curve.learning_curve(cfg, paths, resolve_device(cfg.run.device), progress=not args.no_progress)
        md = curve.curve_table(rows, cfg)
        out = run_dir(cfg)
        atomic_write_text(md + "\n", os.path.join(out, "learning_curve.md"))
        png = curve.plot_curve(rows, os.path.join(out, "learning_curve.png"))
        if args.update_readme:
            from common.report import update_readme

            update_readme(args.update_readme, md + "\n\n![learning curve](docs/learning_curve.png)",
                          marker="learning-curve", figures=[png])
    print(md)
    print(f"[curve] {out}/learning_curve.md, learning_curve.png")


if __name__ == "__main__":
    main()
