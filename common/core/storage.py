"""Atomic writes, safe loads, file hashes, config fingerprints and run-directory paths."""
import hashlib
import json
import os
import pickle
import re
import tempfile
import time

import torch

from .errors import UnavailableDeviceError, UserError
from .process_state import per_process


class CorruptFileError(UserError, ValueError):
    """A file exists but cannot be read as what it should be (truncated, corrupt, or not ours)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_tmp(path, legacy_age_s=3600, quiet_s=120):
    """Delete temp files that earlier atomic writes of ``path`` left behind when killed mid-save.

    Only names of this writer's pattern count: ``.<name>.<pid>-<random>.tmp`` whose pid is no longer
    running (another process may be writing the same path right now) and that nothing has written to for
    ``quiet_s`` (a pid is only this machine's and this namespace's: a writer on another host or in another
    container sharing the folder looks dead here while its file still grows), and the pid-less
    ``.<name>.<random 8>.tmp`` of older versions once they are ``legacy_age_s`` old.
    """
    folder, base = os.path.split(os.path.abspath(path))
    own = re.compile(rf"\.{re.escape(base)}\.(\d+)-[a-z0-9_]+\.tmp")
    legacy = re.compile(rf"\.{re.escape(base)}\.[a-z0-9_]{{8}}\.tmp")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        m = own.fullmatch(name)
        if not (m or legacy.fullmatch(name)):
            continue
        full = os.path.join(folder, name)
        try:
            age = time.time() - os.path.getmtime(full)
            if (m and not _pid_alive(int(m.group(1))) and age > quiet_s) or (not m and age > legacy_age_s):
                os.unlink(full)
        except FileNotFoundError:  # removed by someone else meanwhile
            pass


def _umask() -> int:
    """The process's umask, read without setting it (os.umask(0) would leave other threads a umask of 0 meanwhile);
    where /proc is missing, read and restored once per call as before."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _atomic(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_tmp(path)
    # The writer's pid in the name lets a later write tell a dead writer's leftover from a live one's file.
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.{os.getpid()}-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename: readable as any new file is
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


def tensor_digest(*tensors) -> str:
    """Short SHA-256 of tensors' bytes (identifies a data set in cache file names, seals a tensor cache)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:10]


def _tensors_digest(tensors: dict) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: an edited header is caught as well as the data."""
    h = hashlib.sha256()
    for n in sorted(tensors):
        t = tensors[n].detach().cpu().contiguous()
        h.update(f"{n}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tensors_seal_ok(metadata: dict, tensors: dict) -> bool | None:
    """Whether the tensors of a ``save_sealed_tensors`` file match the digest its metadata records; None for a
    file without one."""
    return None if "digest" not in metadata else metadata["digest"] == _tensors_digest(tensors)


def save_sealed_tensors(tensors: dict, path, inputs: dict):
    """``atomic_save_safetensors`` of a cache that records what it was computed from (``inputs``) and a digest of
    its own tensors, so a stale, foreign or damaged file is told apart (``reusable_tensors``)."""
    atomic_save_safetensors(tensors, path, {"inputs": json.dumps(inputs, sort_keys=True, default=str),
                                            "digest": _tensors_digest(tensors)})


def reusable_tensors(path, inputs: dict) -> dict | None:
    """The tensors of ``save_sealed_tensors``' file at ``path`` if it records ``inputs`` and its tensors match
    their digest; None when it is missing, stale, foreign or damaged (the caller recomputes and overwrites it)."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, framework="pt") as fh:  # one handle: a file replaced meanwhile is not read half-old
            meta = fh.metadata() or {}
            if meta.get("inputs") == json.dumps(inputs, sort_keys=True, default=str):
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
                if tensors_seal_ok(meta, tensors):
                    return tensors
    except (OSError, SafetensorError, ValueError, KeyError, RuntimeError):
        pass
    print(f"[cache] {path} is stale, foreign or damaged: recomputing it")
    return None


def atomic_write_text(text: str, path):
    _atomic(path, lambda fh: fh.write(text.encode()))


def atomic_write_json(obj, path):
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


SEAL = "record_sha256"  # a JSON record's own SHA-256, over everything else in it


def _canonical(obj) -> str:
    return json.dumps(json.loads(json.dumps(obj, default=str)), sort_keys=True)


def atomic_write_record(obj: dict, path):
    """``atomic_write_json`` of a record that carries its own SHA-256 (``SEAL``), so an edited or damaged field
    is told apart from what the program wrote (``seal_ok``)."""
    body = {k: v for k, v in obj.items() if k != SEAL}
    atomic_write_json({**body, SEAL: hashlib.sha256(_canonical(body).encode()).hexdigest()}, path)


def seal_ok(record: dict):
    """True if ``record`` (read from JSON) still has the content its seal was computed over, False if not, None
    if it carries no seal (written before records were sealed)."""
    if not isinstance(record, dict) or SEAL not in record:
        return None
    body = {k: v for k, v in record.items() if k != SEAL}
    return hashlib.sha256(_canonical(body).encode()).hexdigest() == record[SEAL]


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


def write_sources(path, outputs, sources, command=None):
    """A ``<name>.sources.json`` manifest: the SHA-256 of derived files (``outputs``: a summary, its plots) and of
    the files they were made from (``sources``: metrics.json, fisher.pt), paths relative to the manifest's
    folder, so ``python -m common.verify`` can tell a summary that no longer matches its inputs."""
    folder = os.path.dirname(os.path.abspath(path))

    def rel(paths):
        return {os.path.relpath(os.path.abspath(p), folder): sha256_file(p) for p in paths if p}

    atomic_write_record({"outputs": rel(outputs), "sources": rel(sources), "command": command}, path)


_HASHES = per_process({}, what="storage._HASHES")  # (real path, device, inode, size, mtime_ns) -> SHA-256
RACY_S = 2.0  # a file modified this recently may change again within its timestamp's resolution: never cached


def sha256_file(path) -> str:
    """SHA-256 of a file's bytes, read once per process while the file is unchanged: cached under (real path,
    device, inode, size, mtime_ns). An atomic rewrite is a new inode and an in-place edit moves the mtime, so
    either is hashed again. A file modified less than ``RACY_S`` seconds before it is read is not cached: a
    second write within the filesystem's timestamp resolution would leave the key unchanged (git's "racily
    clean" rule)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    started = time.time_ns()
    digest = _hash_bytes(real)
    if started - st.st_mtime_ns > RACY_S * 1e9 and os.stat(real).st_mtime_ns == st.st_mtime_ns:
        _HASHES[key] = digest
    return digest


def _hash_bytes(path) -> str:
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


def load_json(path, hint=""):
    """Parsed JSON of ``path``; a truncated or corrupt file raises CorruptFileError naming it and ``hint``."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON (truncated or corrupt: {e})"
                               + (f"; {hint}" if hint else "")) from None


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message (torch's run to paragraphs), for one-line errors."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0].split(". ")[0][:160] if lines else type(e).__name__


def load_torch(path, hint="", map_location="cpu"):
    """``torch.load`` that never runs code from the file (``weights_only=True``: tensors and plain containers
    only). A missing file raises FileNotFoundError, a truncated, corrupt or code-carrying one
    CorruptFileError; both name ``path`` and ``hint`` (the command that recovers) in one line."""
    tail = f"; {hint}" if hint else ""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found{tail}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page long; the line naming the refused global is the one that matters.
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln),
                   _first_line(e))
        raise CorruptFileError(f"{path} holds more than tensors and plain containers and is refused unread "
                               f"(it could run code: {why}){tail}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise CorruptFileError(f"{path} is truncated or corrupt ({_first_line(e)}){tail}") from None


CONTENT = "content_sha256"  # the digest a torch artifact carries of its own contents


def content_digest(obj) -> str:
    """SHA-256 over a nested structure of dicts, lists, tensors and plain values (names, dtypes, shapes, bytes):
    torch.load checks no checksum, so a flipped byte in a saved tensor would otherwise load as a wrong number."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"T|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            h.update(f"D{len(o)}|".encode())
            for k in sorted(o, key=repr):
                h.update(f"{k!r}=".encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"L{len(o)}|".encode())
            for v in o:
                walk(v)
        else:
            h.update(f"V{o!r}|".encode())

    walk(obj)
    return h.hexdigest()


def _digest_ok(blob: dict, holder: dict) -> bool | None:
    """Whether ``blob`` still has the contents ``holder[CONTENT]`` was computed over; None if it carries none
    (written before artifacts carried one)."""
    if CONTENT not in holder:
        return None
    want = holder.pop(CONTENT)
    try:
        return content_digest(blob) == want
    finally:
        holder[CONTENT] = want


def content_ok(blob) -> bool | None:
    """Whether a loaded torch artifact still has the contents its digest was computed over (``save_cache`` keeps
    it at the top level, ``save_for_checkpoint`` in ``meta``); None if it carries none."""
    if not isinstance(blob, dict):
        return None
    meta = blob.get("meta")
    return _digest_ok(blob, meta if isinstance(meta, dict) and CONTENT in meta else blob)


def save_cache(blob: dict, path):
    """``atomic_torch_save`` of a cache dict with the digest of its contents (``load_cache`` checks it)."""
    blob.pop(CONTENT, None)
    blob[CONTENT] = content_digest(blob)
    atomic_torch_save(blob, path)


def load_cache(path, what: str):
    """A cache file's contents, or None (the caller recomputes and overwrites it) if it is missing, unreadable,
    foreign (not a dict) or damaged (its contents no longer match the digest ``save_cache`` wrote): a cache is
    never worth an error."""
    if not os.path.exists(path):
        return None
    try:
        blob = load_torch(path)
    except CorruptFileError as e:
        print(f"[cache] {e}; recomputing {what}")
        return None
    if not isinstance(blob, dict):
        print(f"[cache] {path} is not one of our caches (a {type(blob).__name__}); recomputing {what}")
        return None
    if content_ok(blob) is False:
        print(f"[cache] {path}: its contents do not match their digest (damaged); recomputing {what}")
        return None
    return blob


class CheckpointMismatchError(UserError, RuntimeError):
    """An artifact derived from one checkpoint was asked for on behalf of another."""


def save_for_checkpoint(artifact: dict, path: str, ckpt_path: str):
    """Write ``artifact`` atomically, bound (by SHA-256) to the checkpoint it was computed from."""
    artifact["meta"]["checkpoint_sha256"] = sha256_file(ckpt_path)
    artifact["meta"]["checkpoint"] = os.path.abspath(ckpt_path)
    artifact["meta"].pop(CONTENT, None)
    artifact["meta"][CONTENT] = content_digest(artifact)  # load_for_checkpoint checks it
    atomic_torch_save(artifact, path)


def load_for_checkpoint(path: str, ckpt_path: str, recompute_hint: str) -> dict:
    """Load an artifact written by ``save_for_checkpoint`` and check it belongs to ``ckpt_path``."""
    art = load_torch(path, recompute_hint)
    if not isinstance(art, dict) or not isinstance(art.get("meta"), dict):
        raise CorruptFileError(f"{path} is not one of our artifacts (no meta record); {recompute_hint}")
    if content_ok(art) is False:
        raise CorruptFileError(f"{path}: its contents do not match their digest (damaged); {recompute_hint}")
    want, have = sha256_file(ckpt_path), art["meta"].get("checkpoint_sha256")
    if want != have:
        raise CheckpointMismatchError(
            f"{path} was computed for a checkpoint with SHA-256 {have[:12] if have else None}..., "
            f"but {ckpt_path} has {want[:12]}...; recompute: {recompute_hint}")
    return art


def reusable_artifact(path: str, ckpt_path: str, inputs, key="inputs") -> dict | None:
    """The cached artifact at ``path`` (``save_for_checkpoint``) if it is bound to ``ckpt_path`` and records
    ``inputs`` in its meta (under ``key``); None when it is missing, stale, foreign or corrupt (the caller
    recomputes it)."""
    if not os.path.exists(path):
        return None
    try:
        art = load_for_checkpoint(path, ckpt_path, "it is recomputed")
    except (CheckpointMismatchError, CorruptFileError) as e:
        if isinstance(e, CorruptFileError):
            print(f"[cache] {e}")
        return None
    return art if art["meta"].get(key) == inputs else None


def reusable_record(path: str, inputs) -> dict | None:
    """The sealed JSON record at ``path`` (``atomic_write_record``) if it records ``inputs``; None when it is
    missing, stale, edited or corrupt (the caller recomputes it)."""
    if not os.path.exists(path):
        return None
    try:
        art = load_json(path)
    except CorruptFileError:
        return None
    return art if isinstance(art, dict) and art.get("inputs") == inputs and seal_ok(art) else None  # a list: foreign


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UnavailableDeviceError("run.device: 'cuda' requested but no CUDA device is available; use 'auto' "
                                     "or 'cpu'")
    return torch.device(name)
