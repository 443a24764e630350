"""The stages every script shares: baseline training, Fisher, quantized variants, evaluation.

Each stage records what it was computed from; a finished stage with the same inputs is reused
(and says so), one with different inputs is an error unless ``force`` is given. A stage holds its
folder's lock (``common.core.lock``) while it writes there, so concurrent runs wait instead of mixing files.
"""
import copy
import json
import os
import shlex
import time

from ..core import cli, distributed, lock, storage
from ..core.cli import command
from ..core.config import to_dict
from ..core.errors import StaleArtifactError
from ..diffusion.baseline import from_scratch_command, load_weights, release, verify_released
from ..diffusion.checkpoint import check_checkpoint_matches, ema_model, load_checkpoint
from ..diffusion.data import mnist_tensor, to_uint8
from ..diffusion.model import count_params
from ..diffusion.samplers import build_sampler, sample
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.train import check_resume, total_steps, train
from ..evaluation import evaluate
from ..evaluation.grids import save_grid
from ..importance.fisher import FisherMismatchError, compute_fisher, load_fisher, save_fisher
from ..importance.weights import artifact_inputs, compute_importance, load_importance
from ..quant import allocate, strategies
from ..quant.container import QUANTIZED_FILE, arch_record, load_quantized, save_quantized, stored_digest
from ..quant.formats import quantize_model
from ..quant.strategies import describe_plan
from .report import plan_table


def ensure_baseline(cfg, device, force=False, resume=False, retrain=False, progress=True):
    """Train the baseline unless a finished checkpoint for this config exists; returns (ema, ckpt path).

    ``force`` retrains only a checkpoint of a *different* training config (the minutes of a finished
    training of this config are never thrown away by accident); ``retrain`` always starts over.
    """
    with lock.hold(storage.baseline_dir(cfg)):
        return _ensure_baseline(cfg, device, force, resume, retrain, progress)


def _ensure_baseline(cfg, device, force, resume, retrain, progress):
    if cfg.baseline.weights:
        return released_baseline(cfg, device, progress)
    out = storage.baseline_dir(cfg)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if os.path.exists(ckpt_path) and not retrain:
        retrain_hint = f"start over with `{command(cfg, 'simplediffusion.py', '--retrain')}`"
        ckpt = load_checkpoint(ckpt_path, retrain_hint, map_location=device)
        try:
            check_checkpoint_matches(ckpt, cfg, ckpt_path)
            if ckpt.get("finished"):
                _check_reused_checkpoint(cfg, ckpt, ckpt_path)
        except StaleArtifactError:
            if not force:
                raise
            ckpt = None
            print(f"[baseline] --force: {ckpt_path} has another training config or data; retraining")
        if ckpt is not None and ckpt.get("finished"):
            print(f"[baseline] reusing finished checkpoint {ckpt_path} ({ckpt['step']} steps)")
            model, _ = ema_model(ckpt, ckpt_path, device, retrain_hint)
            write_baseline_outputs(cfg, model, _checkpoint_info(ckpt, ckpt_path), device, progress,
                                   only_missing=True)
            return model, ckpt_path
        if ckpt is not None and not resume:
            raise StaleArtifactError(f"{ckpt_path} is a partial checkpoint at step {ckpt['step']}: continue it "
                                     f"with `{command(cfg, 'simplediffusion.py', '--resume')}` or pass --retrain "
                                     f"to start over")
        resume = resume and ckpt is not None
    x_train, _ = mnist_tensor(cfg.data, "train")
    print(f"[baseline] training on {len(x_train)} MNIST images -> {ckpt_path}")
    model, ckpt = train(cfg, x_train, ckpt_path, device, resume=resume and not retrain, progress=progress)
    write_baseline_outputs(cfg, model, _checkpoint_info(ckpt, ckpt_path), device, progress)
    return model, ckpt_path


def _check_reused_checkpoint(cfg, ckpt, ckpt_path):
    """Before a finished checkpoint is reused: it is still the file ``model.json`` recorded when it was trained (a
    changed file would otherwise have its new hash recorded as if it were the training's), and it was trained on
    the images ``data.root`` holds now (the fingerprint names no path)."""
    info_path = os.path.join(os.path.dirname(ckpt_path), "model.json")
    try:
        recorded = storage.load_json(info_path).get("sha256") if os.path.exists(info_path) else None
    except storage.CorruptFileError:
        recorded = None  # a damaged model.json is rewritten; the checkpoint's own digest still guards it
    if recorded is not None and recorded != storage.sha256_file(ckpt_path):
        raise storage.CorruptFileError(
            f"{ckpt_path} is not the file {info_path} recorded when it was trained (SHA-256 {recorded[:12]}...): it "
            f"was changed or replaced since. Restore it, start over with "
            f"`{command(cfg, 'simplediffusion.py', '--retrain')}`, or delete {info_path} to adopt this checkpoint")
    if ckpt.get("data_sha256") is not None:  # the check a resume makes, on the images data.root holds now
        x_train, _ = mnist_tensor(cfg.data, "train")
        check_resume(ckpt, ckpt_path, total_steps(cfg.train, len(x_train)), storage.tensor_digest(x_train),
                     cfg.data.root)


def release_baseline(cfg, out_path, note=None):
    """Export this config's finished training (``baseline.weights`` null) as released weights + provenance."""
    if cfg.baseline.weights:
        raise StaleArtifactError(f"--release exports a training of this config, but {cfg.source} uses released "
                                 f"weights ({cfg.baseline.weights}); add --set baseline.weights=null")
    ckpt_path = os.path.join(storage.baseline_dir(cfg), "checkpoint.pt")
    if not os.path.exists(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path} not found: train it first ({from_scratch_command(cfg)})")
    retrain = shlex.join(["python", "simplediffusion.py", "--config", cfg.source, "--set", "baseline.weights=null",
                          "--set", f"run.name={cfg.run.name}"])
    return release(ckpt_path, out_path, f"make reproduce-from-scratch CONFIG={cfg.source}   # = {retrain}",
                   extra={"note": note} if note else None)


def released_baseline(cfg, device, progress=True):
    """The released EMA weights named by ``baseline.weights``, verified (SHA-256, training config);
    returns (model, weights path). The weights path plays the checkpoint's part downstream: Fisher and
    every variant are bound to its SHA-256."""
    path = cfg.baseline.weights
    sha = verify_released(cfg)
    model, meta = load_weights(path, device)
    print(f"[baseline] released weights {path} (SHA-256 {sha[:12]}..., {int(meta['step']):,} steps, "
          f"{int(meta['images_seen']):,} images seen, exported at commit {meta['code_commit'][:12]}); no training")
    info = {"steps": int(meta["step"]), "train_seconds": float(meta["train_seconds"]),
            "final_loss": float(meta["loss_ema"]), "source": path, "sha256": sha,
            "config": json.loads(meta["config"])}
    write_baseline_outputs(cfg, model, info, device, progress, only_missing=True)
    return model, path


def _checkpoint_info(ckpt, ckpt_path) -> dict:
    losses = ckpt["loss_history"][-100:]
    return {"steps": ckpt["step"], "train_seconds": ckpt.get("train_seconds"),
            "final_loss": sum(losses) / max(1, len(losses)), "config": ckpt["config"],
            "sha256": storage.sha256_file(ckpt_path)}  # what fisher.pt and every metrics.json must name


def write_baseline_outputs(cfg, model, info, device, progress=True, only_missing=False):
    """``model.json`` (size, steps, loss, config, the grid's SHA-256) and the sample grid of the baseline (rank 0
    writes them; under torchrun the other ranks go on)."""
    if not distributed.is_main():
        return
    out = storage.baseline_dir(cfg)
    info_path, grid_path = os.path.join(out, "model.json"), os.path.join(out, "samples.png")
    if only_missing and os.path.exists(info_path):
        try:
            old = storage.load_json(info_path)
            grid = storage.sha256_file(grid_path) if os.path.exists(grid_path) else None
            # another released file, or a grid that is not the one recorded: rewrite both
            only_missing = old.get("sha256") == info.get("sha256") and old.get("files", {}).get("samples.png") == grid
        except storage.CorruptFileError:
            only_missing = False  # a damaged model.json is rewritten
    new_grid = not (only_missing and os.path.exists(grid_path))
    if new_grid:
        write_sample_grid(cfg, model, grid_path, device, progress)
    if new_grid or not (only_missing and os.path.exists(info_path)):
        n = count_params(model)
        storage.atomic_write_record({
            "n_params": n, "fp32_size_mb": n * 4 / 2 ** 20, "size_unit": "MiB (2^20 bytes)", **info,
            "files": {"samples.png": storage.sha256_file(grid_path)},
        }, info_path)


def write_sample_grid(cfg, model, path, device, progress=True, seed=None):
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    sampler = build_sampler(cfg.sample, schedule)
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    # the evaluation's first images: a stochastic sampler draws each step's noise for the whole batch, so the
    # grid samples the evaluation's first batch (not grid_images alone, whose noise would differ) and shows its head
    n = max(cfg.sample.grid_images, min(cfg.sample.batch_size, cfg.eval.n_images))
    x = sample(model, sampler, n, shape, seed=cfg.eval.seeds[0] if seed is None else seed,
               batch_size=cfg.sample.batch_size, device=device, progress=progress, desc="grid")
    save_grid(to_uint8(x[:cfg.sample.grid_images]).float() / 255, path)
    print(f"[baseline] sample grid -> {path}")


def sub_run_config(cfg, name: str, section):
    """``cfg`` for an experiment of its own under runs/<run>/<name>/: ``section``'s sample budget (its
    ``n_images``, ``seeds`` and ``inception``) replaces the evaluation's; every other setting is the run's."""
    c = copy.deepcopy(cfg)
    c.run.name = f"{cfg.run.name}/{name}"
    c.eval.n_images, c.eval.seeds, c.eval.inception = section.n_images, list(section.seeds), section.inception
    c.eval.inception_n_images = min(cfg.eval.inception_n_images or section.n_images, section.n_images)
    c.sample.batch_size = min(cfg.sample.batch_size, section.n_images)
    return c


def shared(cfg, compute):
    """``compute()`` of a cache every rank reads (calibrated ranges, a Fisher, teacher trajectories), under the lock
    of ``cfg``'s baseline folder, where it is written: rank 0 first (it computes and writes), then the other ranks
    (they reuse what it wrote), all before a sweep hands its variants to the ranks."""
    def locked():
        with lock.hold(storage.baseline_dir(cfg)):
            return compute()

    return distributed.rank0_first(locked)


# ----------------------------------------------------------------------------- Fisher
def fisher_inputs(cfg) -> dict:
    """The fisher settings that change the result (chunk_size only trades memory for speed)."""
    inputs = to_dict(cfg.fisher)
    inputs.pop("chunk_size")
    return inputs


def ensure_fisher(cfg, model, ckpt_path, device, recompute=False, force=False, progress=True):
    """The Fisher artifact for this checkpoint: reused if present and matching, else computed
    (a mismatching or corrupt one is an error unless ``force``; ``recompute`` always recomputes)."""
    with lock.hold(storage.baseline_dir(cfg)):
        return _ensure_fisher(cfg, model, ckpt_path, device, recompute, force, progress)


def _ensure_fisher(cfg, model, ckpt_path, device, recompute, force, progress):
    path = os.path.join(storage.baseline_dir(cfg), "fisher.pt")
    inputs = fisher_inputs(cfg)
    redo = f"recompute it with `{command(cfg, 'simplediffusion.py', '--recompute-fisher')}` (or add --force)"
    if os.path.exists(path) and not recompute:
        try:
            art = load_fisher(path, ckpt_path, redo)
        except (FisherMismatchError, storage.CorruptFileError):
            if not force:
                raise
            art = None
        if art is not None and art["meta"].get("config") == inputs:
            print(f"[fisher] reusing {path} ({art['meta']['n_samples']} samples)")
            return art, path
        if not force:
            old = art["meta"].get("config") or {}
            changed = ", ".join(f"fisher.{k}" for k in storage.diff_keys(old, inputs))
            raise StaleArtifactError(f"{path} was computed with other fisher settings (differs in: {changed}; "
                                     f"it has {old}, the config asks for {inputs}): {redo}")
        print(f"[fisher] --force: {path} is corrupt or belongs to another checkpoint or settings; recomputing")
    x_pool, _ = mnist_tensor(cfg.data, "train")
    t0 = time.time()
    art = compute_fisher(model, NoiseSchedule.from_config(cfg.diffusion), x_pool, cfg.fisher,
                         progress=progress, device=device)
    art["meta"]["config"] = inputs
    art["meta"]["seconds"] = round(time.time() - t0, 1)
    if distributed.is_main():
        save_fisher(art, path, ckpt_path)
    distributed.barrier()
    if not distributed.is_main():  # the file rank 0 wrote, with the checkpoint binding it recorded
        art = load_fisher(path, ckpt_path, redo)
    print(f"[fisher] {art['meta']['n_samples']} per-sample gradients in {art['meta']['seconds']} s -> {path}")
    return art, path


# ----------------------------------------------------------------------------- variants
def fp32_size(model) -> dict:
    n = count_params(model)
    return {"size_bytes": 4 * n, "fp32_bytes": 4 * n, "quantized_fraction": 0.0,
            "analytic_bytes": 4 * n, "stored_bytes": 4 * n}


def evaluate_fp32(cfg, model, ckpt_path, device, force=False, progress=True):
    sha = storage.sha256_file(ckpt_path)
    return evaluate.evaluate_variant(cfg, "fp32", model, fp32_size(model), device, weights_id=sha, force=force,
                                     progress=progress, extra={"strategy": "fp32", "checkpoint_sha256": sha})


def ensure_rule_fisher(cfg, model, ckpt_path, rule: str, path: str, device, progress=True) -> dict:
    """The Fisher with this config's settings over the tensors of eligibility ``rule`` (same samples as
    ``fisher.pt``, so equal values on the tensors both cover), cached at ``path`` bound to the checkpoint:
    reused if current, else computed (a corrupt or stale cache is recomputed)."""
    inputs = {**fisher_inputs(cfg), "eligible": rule}
    art = storage.reusable_artifact(path, ckpt_path, inputs, key="config")  # the key fisher.pt records them under
    if art is not None:
        print(f"[fisher] reusing {path}")
        return art
    t0 = time.time()
    art = compute_fisher(model, NoiseSchedule.from_config(cfg.diffusion), mnist_tensor(cfg.data, "train")[0],
                         cfg.fisher, rule=rule, progress=progress, device=device)
    art["meta"].update(config=inputs, seconds=round(time.time() - t0, 1))
    save_fisher(art, path, ckpt_path)
    print(f"[fisher] {rule} Fisher over {len(art['diag'])} tensors in {art['meta']['seconds']} s -> {path}")
    return art


def load_artifacts(cfg, device, force=False, progress=True):
    """(EMA model, checkpoint path, Fisher artifact) of a finished baseline, or a clear error.

    A Fisher artifact computed with other ``fisher`` settings than ``cfg``'s is an error, or with
    ``force`` recomputed: a strategy never ranks tensors by a Fisher the config did not ask for.
    """
    base = storage.baseline_dir(cfg)
    ckpt_path, fisher_path = os.path.join(base, "checkpoint.pt"), os.path.join(base, "fisher.pt")
    missing = FileNotFoundError(f"{ckpt_path} not found: train the baseline first with "
                                f"`{command(cfg, 'simplediffusion.py')}`")
    if not cfg.baseline.weights and not os.path.isdir(base):  # no training began here: say so, make no folder
        raise missing
    with lock.hold(base):  # waits while simplediffusion.py is (re)training this baseline
        if cfg.baseline.weights:
            model, ckpt_path = released_baseline(cfg, device, progress=False)
        else:
            if not os.path.exists(ckpt_path):
                raise missing
            retrain = f"start over with `{command(cfg, 'simplediffusion.py', '--retrain')}`"
            ckpt = load_checkpoint(ckpt_path, retrain, map_location=device)
            check_checkpoint_matches(ckpt, cfg, ckpt_path)
            if not ckpt.get("finished"):
                raise StaleArtifactError(f"{ckpt_path} is unfinished (step {ckpt['step']}): "
                                         f"`{command(cfg, 'simplediffusion.py', '--resume')}`")
            model, _ = ema_model(ckpt, ckpt_path, device, retrain)
        if not os.path.exists(fisher_path):
            raise FileNotFoundError(f"{fisher_path} not found: compute it with `{command(cfg, 'simplediffusion.py')}`")
        fisher, _ = ensure_fisher(cfg, model, ckpt_path, device, force=force, progress=progress)
    return model, ckpt_path, fisher


def ensure_importance(cfg, metric, model, ckpt_path, fisher, device, folder="importance"):
    """The importance artifact of ``metric`` for this checkpoint over the tensors ``fisher`` covers, cached in
    ``folder`` of the run's baseline folder: reused if current, else computed."""
    path = os.path.join(storage.baseline_dir(cfg), folder, f"{metric}.pt")  # not beside released weights
    inputs = artifact_inputs(metric, cfg.importance, fisher)
    if os.path.exists(path):
        try:
            art = load_importance(path, ckpt_path)
        except (storage.CheckpointMismatchError, storage.CorruptFileError):
            art = None
        if art is not None and art["meta"].get("inputs") == inputs:
            print(f"[importance] reusing {path}")
            return art
        print(f"[importance] {path} is corrupt or was computed for another checkpoint or settings: recomputing")
    x_pool = mnist_tensor(cfg.data, "train")[0] if metric == "orthogonality" else None
    art = compute_importance(metric, model, fisher, cfg.importance, NoiseSchedule.from_config(cfg.diffusion),
                             x_pool, device)
    art["meta"]["inputs"] = inputs
    if distributed.is_main():  # every rank computed the same artifact; one writes it, all read it back
        storage.save_for_checkpoint(art, path, ckpt_path)
    distributed.barrier()
    if not distributed.is_main():
        art = load_importance(path, ckpt_path)
    print(f"[importance] {metric} in {art['meta']['seconds']} s -> {path}")
    return art


def build_plan(cfg, strategy, params, model, ckpt_path, fisher, device):
    """(plan, what decided it for plan.json, the inputs that fix the weights) of one strategy."""
    if strategy == "mixed_precision":
        importance = ensure_importance(cfg, params["metric"], model, ckpt_path, fisher, device)
        plan, info = allocate.allocate_model(model, importance, params["budget"], params["formats"])
        return plan, {"allocation": info}, {"format": "mixed", "granularity": "tensor",
                                            "importance": importance["meta"]["inputs"]}
    fmt, gran = cfg.quant.format, cfg.quant.granularity
    plan, thresholds = getattr(strategies, strategy)(fisher, **params, fmt=fmt, granularity=gran)
    return plan, {"thresholds": thresholds}, {"format": fmt, "granularity": gran}


def run_variant(cfg, variant, strategy, params, model, ckpt_path, fisher, device, force=False,
                progress=True):
    """Build ``strategy``'s plan (a poster rule from ``common.quant.strategies`` or ``mixed_precision``),
    quantize, save, reload from the file and evaluate. The variant's folder is locked throughout: from the
    reuse check to metrics.json nobody else writes there."""
    with lock.hold(evaluate.variant_dir(cfg, variant)):
        return _run_variant(cfg, variant, strategy, params, model, ckpt_path, fisher, device, force, progress)


def _run_variant(cfg, variant, strategy, params, model, ckpt_path, fisher, device, force, progress):
    plan, decided_by, weight_inputs = build_plan(cfg, strategy, params, model, ckpt_path, fisher, device)
    out = evaluate.variant_dir(cfg, variant)
    plan_inputs = {"strategy": strategy, "params": params, **weight_inputs,
                   "checkpoint_sha256": fisher["meta"]["checkpoint_sha256"],
                   "fisher": {k: v for k, v in fisher["meta"].items() if k != "timesteps"}}
    _, stored = quantize_model(model, plan)
    # The stored tensors themselves identify the weights, so a changed quantizer is never mistaken for reuse.
    weights_id = stored_digest(stored)
    extra = {"strategy": strategy, "params": params, "checkpoint_sha256": fisher["meta"]["checkpoint_sha256"],
             "eligible_rule": fisher["meta"].get("eligible_rule")}
    metrics_path, qpath = os.path.join(out, "metrics.json"), os.path.join(out, QUANTIZED_FILE)
    # Refuse before writing anything if this directory holds another configuration's results.
    old = evaluate.reusable(cfg, metrics_path, evaluate.result_fingerprint(cfg, weights_id, extra), force)
    if old is not None:
        print(f"[{variant}] reusing {metrics_path}")
        return old
    arch = arch_record(cfg)
    summary = describe_plan(plan, model, fisher)
    plan_path = os.path.join(out, "plan.json")  # bound to the file it describes, and by metrics.json to the results
    size = None
    if distributed.is_main():
        size = save_quantized(stored, qpath, arch, plan_inputs)
        _remove_old_container(out)
        size["size_bytes"] = size["stored_bytes"]
        size["fp32_bytes"] = 4 * count_params(model)
        storage.atomic_write_record({"variant": variant, "strategy": strategy, "params": params, **weight_inputs,
                                     "eligible_rule": extra["eligible_rule"], **decided_by, **summary, "size": size,
                                     "quantized_file": QUANTIZED_FILE, "quantized_sha256": storage.sha256_file(qpath)},
                                    plan_path)
    size = distributed.broadcast_object(size)  # the others sample from the file rank 0 wrote
    # Sample from what was stored: the reloaded low-precision checkpoint, not the in-memory copy.
    qmodel, _ = load_quantized(qpath, device)
    print(f"[{variant}] {size['quantized_fraction']:.1%} of weights quantized; size {size['stored_bytes']:,} B "
          f"stored = {size['analytic_bytes']:,} B analytic; file {size['file_bytes']:,} B "
          f"({size['header_bytes']:,} B safetensors header) {qpath}\n{plan_table(summary)}")
    # rebuilt from its file alone: a variant of this run with the same tensors lends its samples (make compare's
    # metrics that rank a budget's tensors alike, e.g. fisher and fisher_distortion)
    return evaluate.evaluate_variant(cfg, variant, qmodel, size, device, weights_id, force=force,
                                     progress=progress, extra=extra, quantized_path=qpath, bound=[plan_path],
                                     samples_key=evaluate.samples_key(weights_id, arch))


def _remove_old_container(variant_dir: str):
    """quantized.pt (file version 2, read with pickle) is superseded by quantized.safetensors."""
    old = os.path.join(variant_dir, "quantized.pt")
    if os.path.exists(old):
        os.remove(old)
        print(f"removed {old} (superseded by quantized.safetensors)")


def run_strategy_script(description: str, variants):
    """Body of the four strategy scripts: ``variants(cfg)`` -> [(variant name, strategy, params)]."""
    args = cli.parser(description).parse_args()
    cfg = cli.load(args)
    with cli.clear_errors():
        device = cli.device(cfg)
        progress = not args.no_progress
        model, ckpt_path, fisher = load_artifacts(cfg, device, force=args.force, progress=progress)
        done = {"fp32": evaluate_fp32(cfg, model, ckpt_path, device, force=args.force, progress=progress)}
        for variant, strategy, params in variants(cfg):
            done[variant] = run_variant(cfg, variant, strategy, params, model, ckpt_path, fisher, device,
                                        force=args.force, progress=progress)
        print_comparison(done)
    distributed.leave()  # the script's end: under torchrun, exit before the gloo teardown can abort (cli.run)


def print_comparison(results: dict):
    print(f"\n{'variant':24s} {'FID':>9s} {'clf-FID':>9s} {'clf-IS':>7s} {'paired MSE':>11s} {'MB':>8s} {'red.%':>6s}")
    for v, r in results.items():
        fid = f"{r['fid']:9.2f}" if r["fid"] is not None else f"{'n/a':>9s}"
        print(f"{v:24s} {fid} {r['clf_fid']:9.3f} {r['clf_is']:7.3f} {r['paired_mse_vs_fp32']:11.2e} "
              f"{r['size_mb']:8.3f} {r['reduction_pct']:6.1f}")
    r = next(iter(results.values()))
    print(f"({r['n_images']} images x seeds {r['seeds']}, {r['sampler']} {r['sampling_steps']} steps; "
          f"FID on {r['inception_n_images']} images/seed, Inception: {r['inception_weights']})")
