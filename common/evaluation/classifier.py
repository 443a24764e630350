"""The MNIST classifier behind the classifier metrics (classifier-FID / KID / IS, the class histogram).

One instrument for every machine: with ``eval.classifier.weights`` set (``configs/default.yaml``) the released
file is used, verified against ``eval.classifier.sha256`` and its image size, never retrained, so a CPU of another
kind scores samples with the same weights (retraining on each machine gave classifier-FID 24.78 on one CPU and
25.18 on another). ``python -m common.release_classifier FILE`` trains one with ``eval.classifier``'s recipe and
writes FILE (safetensors: the state dict; metadata: recipe, test accuracy, digest of the training images, the
machine, the commit) and its provenance ``<FILE>.json``. With ``weights: null`` a classifier is trained here and
cached under ``run.cache_dir``, keyed by its recipe and its training images (what tests with ``train_limit`` use).

Either way ``info["sha256"]`` identifies the classifier, and the reference features cached from it are keyed on it.
"""
import json
import os
import shlex

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core import lock, machine
from ..core.errors import UserError
from ..core.storage import atomic_save_safetensors, atomic_write_json, load_cache, save_cache, sha256_file
from ..diffusion.baseline import code_commit, verified_release
from ..diffusion.data import load_mnist, to_model_space, to_uint8
from .metrics import tensor_digest

FORMAT = "laqfi-mnist-classifier"
VERSION = "1"
RELEASE_MODULE = "common.release_classifier"


class ClassifierError(UserError, RuntimeError):
    """A released classifier file that is missing, corrupt, foreign or made for another image size."""


class MNISTClassifier(nn.Module):
    """Small CNN on (B, 1, S, S) images in [0, 1]; ``features`` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(128 * 16, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def train_classifier(x_train_u8, y_train, clf_cfg, progress=True):
    """Train on uint8 (N, 1, S, S) images; returns the model in eval mode."""
    torch.manual_seed(clf_cfg.seed)
    model = MNISTClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=clf_cfg.lr)
    gen = torch.Generator().manual_seed(clf_cfg.seed)
    n = len(x_train_u8)
    steps = clf_cfg.epochs * ((n + clf_cfg.batch_size - 1) // clf_cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=clf_cfg.lr * 3, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier", disable=not progress)
    for _ in range(clf_cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, clf_cfg.batch_size):
            idx = perm[s: s + clf_cfg.batch_size]
            x = x_train_u8[idx].float() / 255.0
            # Small random shifts make the classifier robust to off-centre generated digits.
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x)[1], y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


@torch.inference_mode()
def classifier_outputs(model, images_u8, batch_size=500):
    """uint8 (N, 1, S, S) -> (features (N, 128) float64 numpy, probabilities (N, 10) float64)."""
    feats, probs = [], []
    for s in range(0, len(images_u8), batch_size):
        f, logits = model(images_u8[s: s + batch_size].float() / 255.0)
        feats.append(f.double())
        probs.append(F.softmax(logits.double(), dim=1))
    return torch.cat(feats).numpy(), torch.cat(probs)


def classifier_score(probs: torch.Tensor) -> float:
    """Classifier-IS over all images at once: exp(E KL(p(y|x) || p(y))); at most 10 for MNIST."""
    py = probs.mean(0, keepdim=True)
    kl = (probs * (torch.log(probs + 1e-12) - torch.log(py + 1e-12))).sum(1).mean()
    return float(torch.exp(kl))


def _training_images(data_cfg, clf_cfg):
    """(uint8 (N, 1, S, S) training images, labels, digest of the 28x28 images and labels) of the recipe."""
    xtr, ytr = load_mnist(data_cfg.root, "train", data_cfg.download)
    xtr, ytr = xtr[:clf_cfg.train_limit], ytr[:clf_cfg.train_limit]
    return to_uint8(to_model_space(xtr, data_cfg.image_size)), ytr, tensor_digest(xtr, ytr)


def _test_accuracy(model, data_cfg, limit=None) -> tuple:
    """(accuracy on the 10,000 MNIST test digits, or the first ``limit`` of them, their number)."""
    xte, yte = load_mnist(data_cfg.root, "test", data_cfg.download)
    xte, yte = xte[:limit], yte[:limit]
    _, probs = classifier_outputs(model, to_uint8(to_model_space(xte, data_cfg.image_size)))
    return float((probs.argmax(1) == yte).double().mean()), len(xte)


def _warn_if_weak(acc, clf_cfg):
    if acc < 0.99 and not clf_cfg.train_limit:
        print(f"[classifier] WARNING: test accuracy {acc:.4f} is below the 0.99 the classifier metrics assume; "
              f"raise eval.classifier.epochs")


TRAINED_HERE = "trained here"  # info["source"] of a classifier this machine trained (its floats are this CPU's)


def load_or_train_classifier(cache_dir, data_cfg, clf_cfg, progress=True, source="the config"):
    """The classifier of ``clf_cfg`` for this image size; returns (model in eval mode, info).

    info: source ("released" or "trained here"), path, sha256 (of the file the weights come from), test_accuracy,
    image_size. With ``clf_cfg.weights`` the released file (``load_released``; ``source`` names the config in its
    errors); else a cached classifier trained here with ``clf_cfg``'s recipe (trained now if there is none)."""
    if clf_cfg.weights:
        return load_released(clf_cfg, data_cfg.image_size, source)
    with lock.hold(cache_dir):  # the ranks of one torchrun (or two runs) train it once; the others wait, then reuse
        return _trained_here(cache_dir, data_cfg, clf_cfg, progress)


def _trained_here(cache_dir, data_cfg, clf_cfg, progress):
    xtr_u8, ytr, data_tag = _training_images(data_cfg, clf_cfg)
    tag = (f"mnist_classifier_s{data_cfg.image_size}_e{clf_cfg.epochs}_b{clf_cfg.batch_size}_lr{clf_cfg.lr}"
           f"_seed{clf_cfg.seed}")
    if clf_cfg.train_limit:
        tag += f"_n{clf_cfg.train_limit}"
    # Keyed by the training images too: another data root (e.g. a test's synthetic IDX files) never
    # reuses a classifier trained on different data.
    path = os.path.join(cache_dir, f"{tag}_d{data_tag}.pt")
    blob = load_cache(path, "the MNIST classifier")
    model = MNISTClassifier()
    if blob is not None:
        try:  # a foreign file under the cache's name is retrained over, not a KeyError
            model.load_state_dict(blob["state_dict"])
            float(blob["info"]["test_accuracy"])
        except (KeyError, TypeError, RuntimeError) as e:
            print(f"[cache] {path} is not a classifier of this architecture ({type(e).__name__}); retraining")
            blob = None
    if blob is not None:
        print(f"[classifier] reusing {path} (test accuracy {blob['info']['test_accuracy']:.4f})")
        return model.eval(), {**blob["info"], "source": TRAINED_HERE, "path": path, "sha256": sha256_file(path)}
    model = train_classifier(xtr_u8, ytr, clf_cfg, progress)
    acc, n_test = _test_accuracy(model, data_cfg, clf_cfg.test_limit)
    # the file holds no path: its SHA-256 names the weights, so another run.cache_dir finds the same classifier
    info = {"test_accuracy": acc, "n_train": len(xtr_u8), "n_test": n_test, "epochs": clf_cfg.epochs,
            "image_size": data_cfg.image_size}
    save_cache({"state_dict": model.state_dict(), "info": info}, path)
    print(f"[classifier] trained, MNIST test accuracy {acc:.4f} -> {path}")
    _warn_if_weak(acc, clf_cfg)
    return model, {**info, "source": TRAINED_HERE, "path": path, "sha256": sha256_file(path)}


def release_command(config: str, out_path: str, overrides=()) -> str:
    """The command that retrains and releases ``config``'s classifier (with its ``--set overrides``) as ``out_path``."""
    sets = [a for o in overrides if not o.startswith("run.") for a in ("--set", o)]
    return shlex.join(["python", "-m", RELEASE_MODULE, "--config", config, *sets, out_path])


def _recover(path: str, source: str) -> str:
    """What to do about a missing or wrong released file."""
    return (f"retrain and release it: `{release_command(source, path)}` (then paste the sha256 "
            f"it prints into eval.classifier.sha256), or set eval.classifier.weights=null to train one here")


def read_metadata(path) -> dict:
    """The header metadata of a released classifier file, or a ``ClassifierError`` naming the file and the problem."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers
        raise ClassifierError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise ClassifierError(f"{path} is not a LAQFI MNIST classifier file (metadata format {meta.get('format')!r}, "
                              f"expected {FORMAT!r})")
    return meta


def load_released(clf_cfg, image_size: int, source="the config"):
    """The released classifier ``clf_cfg.weights``, verified: the SHA-256 ``clf_cfg.sha256`` and the image size it
    was trained for; returns (model in eval mode, info). Every failure is a one-line ``ClassifierError`` naming the
    file and the command that restores or retrains it."""
    from safetensors.torch import load_file

    path = clf_cfg.weights
    remedy = _recover(path, source)
    have = verified_release(path, clf_cfg.sha256, "eval.classifier", source, ClassifierError, remedy, remedy)
    meta = read_metadata(path)
    if int(meta["image_size"]) != image_size:
        raise ClassifierError(f"eval.classifier.weights: {path} classifies {meta['image_size']}x{meta['image_size']} "
                              f"images, but data.image_size is {image_size}: release one for this size "
                              f"(`{release_command(source, '<file>')}`) or set eval.classifier.weights=null")
    model = MNISTClassifier()
    try:
        model.load_state_dict(load_file(path))
    except Exception as e:
        raise ClassifierError(f"eval.classifier.weights: {path}: its tensors do not load into the MNIST classifier "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    print(f"[classifier] released {path} (SHA-256 {have[:12]}..., test accuracy {float(meta['test_accuracy']):.4f})")
    return model.eval(), {"source": "released", "path": path, "sha256": have,
                          "test_accuracy": float(meta["test_accuracy"]), "image_size": image_size,
                          "n_train": int(meta["n_train"]), "n_test": int(meta["n_test"])}


def release_classifier(data_cfg, clf_cfg, out_path: str, retrain_command: str, progress=True) -> tuple:
    """Train a classifier with ``clf_cfg``'s recipe (its ``weights`` / ``sha256`` ignored) on MNIST and release it:
    ``out_path`` (safetensors) and ``<out_path>.json`` (SHA-256, test accuracy, recipe, training-image digest, the
    machine it was trained on, the commit, ``retrain_command``). Returns (SHA-256, provenance path, record)."""
    xtr_u8, ytr, data_tag = _training_images(data_cfg, clf_cfg)
    model = train_classifier(xtr_u8, ytr, clf_cfg, progress)
    acc, n_test = _test_accuracy(model, data_cfg, clf_cfg.test_limit)
    _warn_if_weak(acc, clf_cfg)
    recipe = {k: getattr(clf_cfg, k) for k in ("epochs", "batch_size", "lr", "seed", "train_limit")}
    cap = machine.capability()
    meta = {"format": FORMAT, "version": VERSION, "image_size": str(data_cfg.image_size),
            "test_accuracy": f"{acc:.6f}", "n_train": str(len(xtr_u8)), "n_test": str(n_test),
            "recipe": json.dumps(recipe, sort_keys=True), "training_images": data_tag,
            "trained_on": json.dumps(cap, sort_keys=True), "code_commit": code_commit()}
    atomic_save_safetensors(model.state_dict(), out_path, meta)
    sha = sha256_file(out_path)
    record = {"file": os.path.basename(out_path), "sha256": sha, "bytes": os.path.getsize(out_path),
              "what": "the MNIST classifier behind classifier-FID / KID / IS (fp32 state dict of "
                      "common.evaluation.classifier.MNISTClassifier)",
              "test_accuracy": acc, "n_train": len(xtr_u8), "n_test": n_test, "image_size": data_cfg.image_size,
              "recipe": recipe, "training_images_digest": data_tag, "trained_on": cap,
              "trained_on_text": machine.describe(cap), "code_commit": meta["code_commit"],
              "retrain_command": retrain_command}
    prov = os.path.splitext(out_path)[0] + ".json"
    atomic_write_json(record, prov)
    return sha, prov, record
