"""common.core.storage: loads that never unpickle code, one-line errors for damaged files, tmp-file cleanup."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from common.core import storage
from common.core.storage import CorruptFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Planted:
    """What a malicious file in runs/ would hold: unpickling it calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path, marker):
    torch.save({"meta": {}, "payload": Planted(str(marker))}, path)


def test_no_weights_only_false_and_one_loader():
    """Every torch file in common/ is read by storage.load_torch, which passes weights_only=True."""
    seen = 0
    for dirpath, _, files in os.walk(os.path.join(ROOT, "common")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel, text = os.path.relpath(path, ROOT), open(path).read()
                seen += 1
                assert "weights_only=False" not in text, rel
                if rel != os.path.join("common", "core", "storage.py"):
                    assert "torch.load(" not in text, f"{rel} calls torch.load; use storage.load_torch"
    assert seen > 30
    assert "weights_only=True" in open(os.path.join(ROOT, "common", "core", "storage.py")).read()


def _loaders(tmp_path):
    """(name, call on a planted path) for every loader of an artifact that lives in runs/ or the cache."""
    from common.diffusion.checkpoint import load_ema
    from common.importance.fisher import load_fisher
    from common.importance.weights import load_importance
    from common.quant.container import load_quantized

    ckpt = tmp_path / "real_checkpoint.pt"
    ckpt.write_bytes(b"checkpoint bytes")
    return [("checkpoint", lambda p: load_ema(p)), ("fisher", lambda p: load_fisher(p, str(ckpt))),
            ("importance", lambda p: load_importance(p, str(ckpt))), ("quantized", lambda p: load_quantized(p)),
            ("samples", lambda p: storage.load_torch(p))]


@pytest.mark.parametrize("which", ["checkpoint", "fisher", "importance", "quantized", "samples"])
def test_planted_pickle_is_refused_not_run(tmp_path, which):
    marker, path = tmp_path / "pwned", str(tmp_path / f"{which}.pt")
    plant(path, marker)
    load = dict(_loaders(tmp_path))[which]
    from common.quant.container import QuantizedFileError

    # quantized files are safetensors now: a .pt there is refused before any unpickling is attempted
    with pytest.raises(QuantizedFileError if which == "quantized" else CorruptFileError) as e:
        load(path)
    assert not marker.exists()  # the payload never ran
    msg = str(e.value)
    assert path in msg and "\n" not in msg
    if which != "quantized":
        assert "refused" in msg and "posix.mkdir" in msg


def test_planted_pickle_in_a_cache_is_recomputed(tmp_path, capsys):
    marker, path = tmp_path / "pwned", str(tmp_path / "ref_features.pt")
    plant(path, marker)
    assert storage.load_cache(path, "reference features") is None  # the caller recomputes and overwrites
    assert not marker.exists()
    assert "recomputing reference features" in capsys.readouterr().out


def test_a_flipped_byte_in_a_torch_cache_or_artifact_is_detected(tmp_path, capsys):
    """torch.load checks no checksum: a damaged tensor loads as a wrong number unless the file carries a digest of
    its contents (caches: save_cache / load_cache; artifacts bound to a checkpoint: save_for_checkpoint)."""
    def flip(path):  # one byte inside the tensor's payload: 1000.0 becomes another finite value
        raw = bytearray(path.read_bytes())
        at = raw.find(torch.tensor([1000.0] * 8).numpy().tobytes())
        assert at > 0
        raw[at + 2] ^= 0x10
        path.write_bytes(bytes(raw))

    cache = tmp_path / "ref_features.pt"
    storage.save_cache({"features": torch.full((8,), 1000.0), "provenance": {"n": 8}}, str(cache))
    assert storage.load_cache(str(cache), "reference features")["features"][0] == 1000.0
    flip(cache)
    assert torch.load(cache, weights_only=True)["features"].ne(1000.0).any()  # torch alone does not notice
    assert storage.load_cache(str(cache), "reference features") is None
    assert "do not match their digest" in capsys.readouterr().out

    ckpt = tmp_path / "ckpt.pt"
    torch.save({"w": torch.ones(2)}, ckpt)
    art = tmp_path / "fisher.pt"
    storage.save_for_checkpoint({"meta": {"inputs": 1}, "diag": {"w": torch.full((8,), 1000.0)}}, str(art), str(ckpt))
    assert storage.reusable_artifact(str(art), str(ckpt), 1)["diag"]["w"][0] == 1000.0
    flip(art)
    with pytest.raises(CorruptFileError, match="do not match their digest"):
        storage.load_for_checkpoint(str(art), str(ckpt), "recompute it")
    assert storage.reusable_artifact(str(art), str(ckpt), 1) is None
    torch.save({"something": "else"}, art)  # a foreign file where an artifact should be: recomputed, not a KeyError
    assert storage.reusable_artifact(str(art), str(ckpt), 1) is None
    torch.save([1, 2], cache)
    assert storage.load_cache(str(cache), "reference features") is None


def test_truncated_torch_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptFileError) as e:
        storage.load_torch(str(path), "retrain: python simplediffusion.py --retrain")
    msg = str(e.value)
    assert str(path) in msg and "truncated or corrupt" in msg and msg.endswith("--retrain") and "\n" not in msg
    with pytest.raises(FileNotFoundError, match="missing.pt not found; do X"):
        storage.load_torch(str(tmp_path / "missing.pt"), "do X")


def test_plain_artifacts_load_with_weights_only(tmp_path):
    """The checkpoint layout (state dicts, optimizer state with tuples, config dicts, loss lists) is plain."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "config": {"a": [1, None, "x"]},
            "loss_history": [0.5, 0.25], "finished": True}
    storage.atomic_torch_save(blob, tmp_path / "c.pt")
    back = storage.load_torch(str(tmp_path / "c.pt"))
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999) and back["config"] == blob["config"]


def test_corrupt_json_names_file_and_hint(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"a": list(range(50))})[:40])
    with pytest.raises(CorruptFileError) as e:
        storage.load_json(str(path), "recompute with `x --force`")
    assert str(path) in str(e.value) and str(e.value).endswith("`x --force`") and "\n" not in str(e.value)


def _tmp_names(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_save_killed_midway_leaves_tmp_that_the_next_write_removes(tmp_path):
    """SIGKILL during a save: the target is untouched and its temp file is cleaned by a later write, once nothing
    has written to it for a while (a writer in another pid namespace looks dead here)."""
    target = tmp_path / "checkpoint.pt"
    storage.atomic_torch_save({"v": torch.zeros(3)}, target)
    code = ("import os, signal, sys; from common.core import storage\n"
            "def write(fh):\n    fh.write(b'half a checkpoint'); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            f"storage._atomic({str(target)!r}, write)")
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == -9
    left = _tmp_names(tmp_path)
    assert len(left) == 1 and re.fullmatch(r"\.checkpoint\.pt\.\d+-[a-z0-9_]+\.tmp", left[0])
    assert torch.equal(storage.load_torch(str(target))["v"], torch.zeros(3))  # the old file is intact

    storage.atomic_torch_save({"v": torch.zeros(3)}, target)
    assert _tmp_names(tmp_path) == left  # its writer is dead, but it was written a moment ago: kept a while
    os.utime(tmp_path / left[0], (0, 0))  # ... and nothing has written to it since
    live = tmp_path / f".checkpoint.pt.{os.getpid()}-abcdefgh.tmp"  # a writer that is still running
    legacy_old, legacy_new = tmp_path / ".checkpoint.pt.abcdefgh.tmp", tmp_path / ".checkpoint.pt.zyxwvuts.tmp"
    other = tmp_path / ".checkpoint.pt.bak.1-abcdefgh.tmp"  # another file's temp file
    for f in (live, legacy_old, legacy_new, other):
        f.write_bytes(b"x")
    os.utime(legacy_old, (0, 0))  # pid-less name of an older version, from 1970
    os.utime(live, (0, 0))  # a live writer's file is never removed, however old
    storage.atomic_torch_save({"v": torch.ones(3)}, target)
    assert _tmp_names(tmp_path) == sorted([live.name, legacy_new.name, other.name])
    assert torch.equal(storage.load_torch(str(target))["v"], torch.ones(3))


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    import hashlib

    reads = []
    real = storage._hash_bytes
    monkeypatch.setattr(storage, "_hash_bytes", lambda p: reads.append(p) or real(p))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 100)
    old = os.stat(path).st_mtime_ns - 10 ** 10
    os.utime(path, ns=(old, old))  # written 10 s ago: past the racy window
    want = hashlib.sha256(b"a" * 100).hexdigest()
    assert storage.sha256_file(path) == storage.sha256_file(str(path)) == want
    assert len(reads) == 1  # the second call (and the same file under another spelling of its path) is cached
    path.write_bytes(b"b" * 100)  # same size, changed in place: a new mtime
    assert storage.sha256_file(path) == hashlib.sha256(b"b" * 100).hexdigest() and len(reads) == 2
    os.utime(path, ns=(old, old))  # the old mtime back, but another inode after an atomic replace
    storage.atomic_write_bytes(b"c" * 100, path)
    os.utime(path, ns=(old, old))
    assert storage.sha256_file(path) == hashlib.sha256(b"c" * 100).hexdigest() and len(reads) == 3
    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"d")  # modified just now: hashed on every call, never cached
    storage.sha256_file(fresh)
    storage.sha256_file(fresh)
    assert len(reads) == 5


def test_sealed_tensor_cache_is_reused_only_when_inputs_and_bytes_match(tmp_path, capsys):
    """The one tensor cache of calibrated ranges (act_quant and w4a4): reused when it records the same inputs and
    its tensors match their digest; other inputs, damaged bytes or no file at all -> None (recompute)."""
    path = tmp_path / "ranges.safetensors"
    tensors = {"b": torch.arange(6.0).reshape(3, 2), "a": torch.ones(4)}
    inputs = {"method": "mse", "groups": [[0, 9]], "images": 8}
    assert storage.reusable_tensors(path, inputs) is None and capsys.readouterr().out == ""  # missing: silent
    storage.save_sealed_tensors(tensors, path, inputs)
    back = storage.reusable_tensors(path, dict(reversed(inputs.items())))  # key order does not matter
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert storage.reusable_tensors(path, {**inputs, "images": 16}) is None
    assert "stale, foreign or damaged" in capsys.readouterr().out
    data = path.read_bytes()
    path.write_bytes(data[:-4] + bytes(b ^ 0xFF for b in data[-4:]))  # the last value's bytes flipped
    assert storage.reusable_tensors(path, inputs) is None
    path.write_bytes(data[: len(data) // 2])  # truncated
    assert storage.reusable_tensors(path, inputs) is None
    # the same bytes under another shape, with the metadata copied: the digest covers names, dtypes and shapes
    from safetensors import safe_open
    from safetensors.torch import save_file

    path.write_bytes(data)
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
    save_file({"b": tensors["b"].reshape(2, 3), "a": tensors["a"]}, str(path), metadata=meta)
    assert storage.reusable_tensors(path, inputs) is None
    save_file(tensors, str(path), metadata=meta)  # and with the shapes it was written with, it is reused
    assert storage.reusable_tensors(path, inputs) is not None
    # a file of the code before the seal (inputs recorded, no digest) is recomputed once, never trusted
    save_file(tensors, str(path), metadata={"inputs": meta["inputs"], "fingerprint": storage.fingerprint(inputs)})
    assert storage.reusable_tensors(path, inputs) is None


def test_atomic_writes_get_the_permissions_of_any_new_file(tmp_path):
    """mkstemp makes its file 0600 and the rename kept that: results, caches and docs unreadable by others."""
    old = os.umask(0o022)
    try:
        storage.atomic_write_text("x", tmp_path / "a.txt")
        storage.atomic_torch_save({"x": 1}, tmp_path / "b.pt")
        os.umask(0o077)
        storage.atomic_write_bytes(b"y", tmp_path / "c.bin")
    finally:
        os.umask(old)
    modes = [os.stat(tmp_path / n).st_mode & 0o777 for n in ("a.txt", "b.pt", "c.bin")]
    assert modes == [0o644, 0o644, 0o600]


def test_a_missing_cuda_device_is_a_one_line_user_error():
    from common.core.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UserError, match="run.device: 'cuda' requested but no CUDA device"):
        storage.resolve_device("cuda")


def test_reset_process_state_gives_back_what_a_fresh_interpreter_has(tmp_path):
    """The in-process script runner relies on it: every per-process cache the scripts fill is registered and
    emptied by one call (a cache that stayed would make a second run skip hashing or a printed warning)."""
    from common.core import distributed
    from common.core.process_state import per_process, reset_process_state
    from common.diffusion import checkpoint
    from common.evaluation import evaluate

    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    os.utime(path, (0, 0))  # old enough to be cached (storage.RACY_S)
    storage.sha256_file(str(path))
    assert storage._HASHES
    evaluate._CACHE["probe"] = 1
    checkpoint._WARNED.add("probe")
    distributed.work_alone()  # what cli.device(alone=True) does for the rest of a run
    assert distributed._LOCAL[0] == 1
    names = reset_process_state()
    assert distributed._LOCAL[0] == 0
    assert {"storage._HASHES", "evaluate._CACHE", "checkpoint._WARNED", "distributed._LOCAL",
            "machine.bf16_matmul_cost"} <= set(names)
    assert not storage._HASHES and not evaluate._CACHE and not checkpoint._WARNED
    with pytest.raises(TypeError, match="reset="):
        per_process(object())
