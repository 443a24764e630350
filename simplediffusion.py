"""Train the baseline DDPM on MNIST, then compute its Fisher diagonal and evaluate it (fp32).

Writes runs/<run>/baseline/{checkpoint.pt, model.json, samples.png, fisher.pt, plots}.
"""
from common import cli, pipeline
from common.storage import resolve_device


def main():
    p = cli.parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue a partial checkpoint")
    args = p.parse_args()
    cfg = cli.load(args)
    device = resolve_device(cfg.run.device)
    pipeline.ensure_baseline(cfg, device, force=args.force, resume=args.resume,
                             progress=not args.no_progress)


if __name__ == "__main__":
    main()
