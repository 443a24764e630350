"""DDPM training of the U-Net with an EMA copy, atomic checkpoints and exact resume."""
import copy
import math
import os
import time

import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.config import to_dict
from ..core.errors import StaleArtifactError, UserError
from ..core.storage import (
    CorruptFileError,
    atomic_write_record,
    fingerprint,
    load_json,
    save_cache,
    seal_ok,
    sha256_file,
    tensor_digest,
)
from .baseline import running_loss, running_step, save_weights, verified_release
from .checkpoint import announce_bf16, check_checkpoint_matches, load_checkpoint, recorded_bf16, training_inputs
from .model import build_model
from .schedule import NoiseSchedule


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the weights became NaN/inf; nothing after the last good checkpoint is saved."""


def total_steps(train_cfg, n_train: int) -> int:
    if train_cfg.max_steps is not None:
        return train_cfg.max_steps
    return train_cfg.epochs * math.ceil(n_train / train_cfg.batch_size)


def _step_rng(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7_919 + step)


def _batch_indices(seed: int, step: int, n: int, batch: int) -> torch.Tensor:
    """Indices of ``step``'s batch: epoch-wise permutations, so resume replays the same order."""
    per_epoch = math.ceil(n / batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 104_729 + epoch))
    return perm[k * batch: (k + 1) * batch]


def _ema_decay(train_cfg, step: int) -> float:
    if train_cfg.ema_warmup:
        return min(train_cfg.ema_decay, (1 + step) / (10 + step))
    return train_cfg.ema_decay


def lr_at(train_cfg, step: int, steps: int) -> float:
    """Learning rate of ``step``: a pure function of the step, so a resumed run follows the same curve."""
    lr = train_cfg.lr
    if train_cfg.warmup_steps and step < train_cfg.warmup_steps:
        return lr * (step + 1) / train_cfg.warmup_steps
    if train_cfg.lr_schedule == "cosine":
        done = (step - train_cfg.warmup_steps) / max(1, steps - train_cfg.warmup_steps)
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return lr


def _checkpoint(cfg, model, ema, opt, step, steps, finished, losses, bf16, data_sha):
    inputs = training_inputs(cfg, bf16)  # the resolved bf16 choice, so a resume continues as it started
    return {
        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
        "step": step, "total_steps": steps, "finished": finished, "config": to_dict(cfg),
        "training_inputs": inputs, "fingerprint": fingerprint(inputs),
        "data_sha256": data_sha,  # the training images themselves: data.root is a path, not what it holds
        "loss_history": losses,
    }


def check_resume(ckpt: dict, path: str, steps: int, data_sha: str, root):
    """A resume continues the same training: on the same images (checkpoints since 2026-12-06 record their
    digest; the fingerprint holds no path) and over the same number of steps (the lr schedule spans them)."""
    if ckpt.get("data_sha256") not in (None, data_sha):
        raise StaleArtifactError(
            f"{path} was trained on other images (digest {ckpt['data_sha256']}) than data.root {root!r} holds "
            f"({data_sha}): point data.root at the data it started on, or start over with --retrain")
    if ckpt.get("total_steps") not in (None, steps):
        raise StaleArtifactError(
            f"{path} was training for {ckpt['total_steps']} steps; this config and data give {steps} (the lr "
            f"schedule spans the whole run): resume with the settings it started with, or start over with --retrain")


def _remedy(train_cfg) -> str:
    if train_cfg.grad_clip:
        return f"Lower train.lr (now {train_cfg.lr:g}; train.grad_clip={train_cfg.grad_clip:g} is already set)."
    return f"Lower train.lr (now {train_cfg.lr:g}) or set train.grad_clip (e.g. 1.0)."


def _check_finite(model, step, train_cfg):
    """A finite loss can still follow a step that broke the weights; never save those."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteLossError(f"weights became non-finite by step {step} ({bad[0]} and {len(bad) - 1} more); "
                                 f"not saved. {_remedy(train_cfg)}")


def _rank_share(n: int):
    """(this rank's slice of a global batch of ``n``, the weight of its mean loss). Slices are contiguous, sizes
    differing by at most one, and the weights world * size / n make DDP's average over ranks the global batch's
    mean loss. A batch smaller than the number of ranks (an epoch's last partial batch) would leave a rank
    without a sample, whose mean loss is NaN: that rank takes the batch's last sample at weight 0, so it still
    joins the gradient all-reduce but adds nothing to it."""
    r, world = distributed.rank(), distributed.world_size()
    edges = [n * k // world for k in range(world + 1)]
    if edges[r] == edges[r + 1]:
        return slice(n - 1, n), 0.0
    return slice(edges[r], edges[r + 1]), world * (edges[r + 1] - edges[r]) / n


def _start_from(cfg, model):
    """Load ``train.init_from`` (a released weights file of the same architecture, checked against
    ``train.init_sha256``) into ``model``: the second stage of a two-stage recipe starts where the first ended."""
    from safetensors.torch import load_file

    path = cfg.train.init_from
    remedy = "name the released weights file this recipe starts from (checkpoints/...)"
    have = verified_release(path, cfg.train.init_sha256, "train", cfg.source, UserError, remedy, remedy,
                            keys=("train.init_from", "train.init_sha256"))
    try:
        model.load_state_dict(load_file(path, device="cpu"))
    except Exception as e:
        raise UserError(f"train.init_from: {path} does not load into the configured model "
                        f"({type(e).__name__}: {str(e)[:200]}); model: must match the file's architecture") from None
    print(f"starting from {path} (SHA-256 {have[:16]}...)")


def train(cfg, x_train: torch.Tensor, ckpt_path: str, device, resume=False, progress=True):
    """Train (or resume) and write ``ckpt_path``; returns (ema model in eval mode, checkpoint dict).

    x_train: (N, 1, S, S) float32 in [-1, 1] on the CPU. Under torchrun with N ranks the model is wrapped in
    DistributedDataParallel and every step's global batch (``train.batch_size``, the same images, timesteps
    and noise as a single process draws) is split across the ranks; each rank's loss is scaled so the
    averaged gradient is that of the global batch's mean loss. Only rank 0 writes checkpoints and snapshots;
    ``--resume`` works across a changed N (without dropout the weights do not depend on N up to float summation
    order; with dropout each rank draws its own masks, so they do).
    """
    world = distributed.world_size()
    if cfg.train.batch_size % world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} does not divide among {world} ranks: the global "
                         f"batch must split evenly (use a batch size that is a multiple of {world})")
    torch.manual_seed(cfg.run.seed)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
    if cfg.train.init_from:
        _start_from(cfg, model)
    model = model.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:  # the EMA, the checkpoints and the state dicts keep the plain module
        net = torch.compile(net)
    steps = total_steps(cfg.train, len(x_train))
    data_sha = tensor_digest(x_train)
    start, losses, seconds_before, recorded = 0, [], 0.0, None
    if resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, "start over with simplediffusion.py --retrain", map_location=device)
        check_checkpoint_matches(ckpt, cfg, ckpt_path)
        check_resume(ckpt, ckpt_path, steps, data_sha, cfg.data.root)
        recorded = recorded_bf16(ckpt.get("training_inputs"))
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        start, losses = ckpt["step"], ckpt["loss_history"]
        seconds_before = ckpt.get("train_seconds", 0.0)
        print(f"resuming {ckpt_path} at step {start}/{steps}")
    model.train()
    bf16 = announce_bf16(cfg.train, device.type, recorded, say=print if distributed.is_main() else (lambda _: None))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train",
               disable=not progress or not distributed.is_main())
    t0 = time.time()
    running = running_loss(losses)  # a resumed run's running loss (snapshots record it) as the uninterrupted run's
    for step in bar:
        idx = _batch_indices(cfg.run.seed, step, len(x_train), cfg.train.batch_size)
        gen = _step_rng(cfg.run.seed, step)
        x0 = x_train[idx]
        t = torch.randint(0, schedule.timesteps, (len(idx),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        # dropout masks, replayable on resume; each rank its own stream (one process: the same seed as ever)
        torch.manual_seed((cfg.run.seed * 31 + step) * world + distributed.rank())
        mine, weight = _rank_share(len(idx))
        with autocast:
            loss = schedule.p_losses(net, x0[mine].to(device), t[mine].to(device), eps[mine].to(device),
                                     cfg.train.min_snr_gamma)
        if world > 1:  # DDP averages over ranks: weigh each rank's mean so the result is the global batch's mean
            loss = loss * weight
        # the global batch's loss, summed over ranks before anything steps: a NaN on one rank stops every rank
        # here (each raising alone would leave the others waiting in the gradient all-reduce)
        value = float(distributed.all_reduce_sum(loss.detach().float().clone())) / world
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss became {value} at step {step}; {ckpt_path} keeps the last checkpoint written "
                f"before it (if any), nothing later. {_remedy(cfg.train)}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg.train, step, steps)
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        with torch.no_grad():
            d = _ema_decay(cfg.train, step)
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - d)
        running = running_step(running, value)
        losses.append(value)
        bar.set_postfix(loss=f"{running:.4f}")
        if not distributed.is_main():
            continue  # every rank holds the same weights; rank 0 alone writes them
        if cfg.train.snapshot_every and (step + 1) % cfg.train.snapshot_every == 0:
            save_snapshot(cfg, ema, ckpt_path, step + 1, seconds_before + time.time() - t0, running, bf16)
        if (step + 1) % cfg.train.checkpoint_every == 0 and step + 1 < steps:
            _check_finite(model, step, cfg.train)
            ckpt = _checkpoint(cfg, model, ema, opt, step + 1, steps, False, losses, bf16, data_sha)
            ckpt["train_seconds"] = seconds_before + time.time() - t0  # summed over resumed sessions
            save_cache(ckpt, ckpt_path)  # with its contents' digest (load_checkpoint)
    bar.close()
    _check_finite(model, steps - 1, cfg.train)
    ckpt = _checkpoint(cfg, model, ema, opt, steps, steps, True, losses, bf16, data_sha)
    ckpt["train_seconds"] = seconds_before + time.time() - t0
    if distributed.is_main():
        save_cache(ckpt, ckpt_path)
    distributed.barrier()  # the others read the checkpoint only once it is complete
    return ema, ckpt


def snapshot_dir(ckpt_path: str) -> str:
    return os.path.join(os.path.dirname(ckpt_path), "snapshots")


def save_snapshot(cfg, ema, ckpt_path, step, seconds, loss, bf16=None):
    """EMA weights at ``step`` in the baseline weights format (``common.diffusion.baseline``), for learning curves;
    ``bf16``: the training's resolved train.bf16 (None: resolved on this machine)."""
    path = os.path.join(snapshot_dir(ckpt_path), f"ema_step{step:07d}.safetensors")
    save_weights(path, ema.state_dict(), cfg, training_inputs(cfg, bf16), step, seconds, loss)
    # snapshots/index.json: {file: SHA-256}, so a damaged snapshot is told apart (python -m common.verify)
    index_path = os.path.join(snapshot_dir(ckpt_path), "index.json")
    index = {}
    if os.path.exists(index_path):
        try:
            record = load_json(index_path)
            ok = seal_ok(record) is not False and isinstance(record.get("files"), dict)
        except (CorruptFileError, AttributeError):
            ok = False
        if ok:
            index = record["files"]
        else:  # never re-seal an edited index, never drop its record silently: keep it aside and say so
            aside = index_path.removesuffix(".json") + f".damaged-{time.strftime('%Y%m%d-%H%M%S')}.json"
            os.replace(index_path, aside)
            print(f"[train] {index_path} was damaged or edited (its seal does not match): kept as {aside}; a new "
                  f"index starts with this snapshot (python -m common.verify lists the earlier ones as unreferenced)")
    index[os.path.basename(path)] = sha256_file(path)
    atomic_write_record({"files": dict(sorted(index.items()))}, index_path)
    return path
