"""Atomic writes, file hashes, config fingerprints and run-directory paths."""
import hashlib
import json
import os
import tempfile

import torch


def _atomic(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path):
    _atomic(path, lambda fh: torch.save(obj, fh))


def atomic_save_safetensors(tensors: dict, path, metadata=None):
    """safetensors file (no pickle on load); ``metadata`` values must be strings."""
    from safetensors.torch import save

    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    _atomic(path, lambda fh: fh.write(blob))


def atomic_write_text(text: str, path):
    _atomic(path, lambda fh: fh.write(text.encode()))


def atomic_write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


def atomic_write_csv(rows: list, columns: list, path):
    """One CSV row per dict in ``rows``, in ``columns`` order (with a header)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def atomic_write_bytes(data: bytes, path):
    _atomic(path, lambda fh: fh.write(data))


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(obj) -> str:
    """Stable short hash of a JSON-able object (used to tell whether a stage's inputs changed)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_keys(a: dict, b: dict, prefix="") -> list:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, key + ".")
        elif va != vb:
            out.append(key)
    return out


def run_dir(cfg) -> str:
    return os.path.join(cfg.run.out_dir, cfg.run.name)


def baseline_dir(cfg) -> str:
    return os.path.join(run_dir(cfg), "baseline")


def load_json(path):
    with open(path) as fh:
        return json.load(fh)


class CheckpointMismatchError(RuntimeError):
    """An artifact derived from one checkpoint was asked for on behalf of another."""


def save_for_checkpoint(artifact: dict, path: str, ckpt_path: str):
    """Write ``artifact`` atomically, bound (by SHA-256) to the checkpoint it was computed from."""
    artifact["meta"]["checkpoint_sha256"] = sha256_file(ckpt_path)
    artifact["meta"]["checkpoint"] = os.path.abspath(ckpt_path)
    atomic_torch_save(artifact, path)


def load_for_checkpoint(path: str, ckpt_path: str, recompute_hint: str) -> dict:
    """Load an artifact written by ``save_for_checkpoint`` and check it belongs to ``ckpt_path``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {recompute_hint}")
    art = torch.load(path, map_location="cpu", weights_only=False)
    want, have = sha256_file(ckpt_path), art["meta"].get("checkpoint_sha256")
    if want != have:
        raise CheckpointMismatchError(
            f"{path} was computed for a checkpoint with SHA-256 {have[:12] if have else None}..., "
            f"but {ckpt_path} has {want[:12]}...; recompute: {recompute_hint}")
    return art


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device: 'cuda' requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)
