"""Train the baseline DDPM on MNIST, compute its Fisher diagonal, and evaluate the two reference
points every strategy is compared with: the fp32 baseline and uniform quantization (every eligible
tensor in quant.format).

Writes runs/<run>/baseline/{checkpoint.pt, model.json, samples.png, fisher.pt}, runs/<run>/plots/fisher_*.png,
runs/<run>/fp32/ and runs/<run>/uniform_<format>/, and prints the Fisher per stage and by op type (over every
conv / linear weight: the all-weights Fisher act_quant.py uses, cached). Finished stages are reused.
"""
from common.core import cli, distributed, lock
from common.core.storage import baseline_dir, run_dir
from common.experiments import act_pipeline, pipeline, report


def main():
    p = cli.parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue a partial checkpoint")
    p.add_argument("--retrain", action="store_true",
                   help="train from scratch even if a finished checkpoint of this config exists "
                        "(implies --recompute-fisher)")
    p.add_argument("--recompute-fisher", action="store_true", help="recompute fisher.pt even if present")
    p.add_argument("--skip-eval", action="store_true", help="stop after training and Fisher")
    p.add_argument("--release", metavar="FILE.safetensors",
                   help="export the finished checkpoint's EMA weights as a released baseline (with FILE.json "
                        "provenance) and stop; put the printed SHA-256 in the config's baseline.sha256")
    p.add_argument("--release-note", metavar="TEXT", default=None,
                   help="with --release: a note kept in the provenance file (e.g. how the training was run)")
    args = p.parse_args()
    if args.release_note is not None and not args.release:
        p.error("--release-note is kept in a release's provenance: use it with --release FILE.safetensors")
    cfg = cli.load(args)
    if (args.retrain or args.resume) and cfg.baseline.weights:
        flag = "--retrain" if args.retrain else "--resume"
        p.error(f"{flag} trains a baseline, but baseline.weights names the released file {cfg.baseline.weights} "
                f"(verified, never trained here): add --set baseline.weights=null and a new --set run.name=... "
                f"to train one (make reproduce-from-scratch does)")
    progress = not args.no_progress
    with cli.clear_errors():
        if args.release:
            sha, prov = pipeline.release_baseline(cfg, args.release, args.release_note)
            print(f"[release] {args.release} (SHA-256 {sha}) and {prov}\n"
                  f"use it with:\n  baseline:\n    weights: {args.release}\n    sha256: {sha}")
            return
        device = cli.device(cfg)
        with lock.hold(baseline_dir(cfg)):  # the Fisher must belong to the checkpoint just trained or checked
            model, ckpt_path = pipeline.ensure_baseline(cfg, device, force=args.force, resume=args.resume,
                                                        retrain=args.retrain, progress=progress)
            fisher, _ = pipeline.ensure_fisher(cfg, model, ckpt_path, device,
                                               recompute=args.recompute_fisher or args.retrain, force=args.force,
                                               progress=progress)
        print(report.fisher_table(fisher))
        # where the sensitivity sits by what a tensor does, over every conv / linear (rank 0 computes, others reuse)
        every = pipeline.shared(cfg, lambda: act_pipeline.ensure_weight_fisher(cfg, model, ckpt_path, fisher, device,
                                                                               progress))
        if distributed.is_main():
            print(f"Fisher by op type ({len(every['diag'])} conv / linear weights):\n"
                  + report.fisher_op_table(every, model.op_type))
        plots = f"{run_dir(cfg)}/plots"
        for path in report.plot_fisher_recorded(fisher, f"{baseline_dir(cfg)}/fisher.pt", plots) \
                if distributed.is_main() else []:
            print(f"[fisher] plot -> {path}")
        if args.skip_eval:
            return
        force = args.force or args.retrain  # a new checkpoint makes every earlier result stale
        done = {"fp32": pipeline.evaluate_fp32(cfg, model, ckpt_path, device, force=force, progress=progress)}
        fmt = cfg.quant.format
        done[f"uniform_{fmt}"] = pipeline.run_variant(cfg, f"uniform_{fmt}", "uniform", {}, model, ckpt_path,
                                                      fisher, device, force=force, progress=progress)
        pipeline.print_comparison(done)


if __name__ == "__main__":
    cli.run(main)
