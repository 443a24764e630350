"""common.diffusion.baseline: EMA weights files (snapshots and the released baseline), verification, no pickle."""
import json
import os
import pickle

import pytest
import torch

from common.core.config import ConfigError, load_config
from common.core.storage import sha256_file
from common.diffusion import baseline
from common.diffusion.checkpoint import training_inputs
from common.diffusion.model import build_model
from common.diffusion.train import snapshot_dir, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def weights(tiny_cfg, tmp_path):
    """A smoke U-Net saved in the baseline format; returns (cfg, model, path)."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg.model, tiny_cfg.diffusion.timesteps)
    path = str(tmp_path / "w.safetensors")
    baseline.save_weights(path, model.state_dict(), tiny_cfg, training_inputs(tiny_cfg), 12, 3.5, 0.25)
    return tiny_cfg, model, path


def _released(cfg, path, sha=None):
    cfg.baseline.weights = path
    cfg.baseline.sha256 = sha or __import__("common.core.storage", fromlist=["x"]).sha256_file(path)
    return cfg


def test_round_trip_without_pickle(weights, monkeypatch):
    cfg, model, path = weights
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used"))
    loaded, meta = baseline.load_weights(path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert not loaded.training
    assert meta["step"] == "12" and meta["images_seen"] == str(12 * cfg.train.batch_size)
    assert json.loads(meta["training_inputs"]) == training_inputs(cfg)
    assert baseline.config_of(path).model.channels == cfg.model.channels


def test_verify_released_accepts_the_right_file(weights):
    cfg, _, path = weights
    sha = baseline.verify_released(_released(cfg, path), "retrain")
    assert len(sha) == 64


def test_verify_released_refuses_a_changed_or_missing_file(weights, tmp_path):
    cfg, _, path = weights
    cfg = _released(cfg, path)
    with open(path, "r+b") as fh:  # one flipped byte in the tensor data
        fh.seek(-3, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-3, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(baseline.BaselineError, match=r"SHA-256.*corrupt or not the released one.*retrain") as e:
        baseline.verify_released(cfg, "retrain")
    assert "git checkout" not in str(e.value)  # a file outside the repository: git cannot restore it
    cfg.baseline.weights = str(tmp_path / "gone.safetensors")
    with pytest.raises(baseline.BaselineError, match=r"gone.safetensors not found.*retrain"):
        baseline.verify_released(cfg, "retrain")


def test_verify_released_refuses_weights_of_another_training_config(weights):
    cfg, _, path = weights
    cfg = _released(cfg, path)
    cfg.train.lr = 0.5
    with pytest.raises(baseline.BaselineError, match=r"differs in: train.lr.*retrain"):
        baseline.verify_released(cfg, "retrain")


def test_verify_released_resolves_auto_to_what_the_file_recorded(weights, monkeypatch):
    """A file trained with bf16 verifies under train.bf16: auto on any CPU; an explicit false refuses it."""
    from common.core import machine

    cfg, model, path = weights
    cfg.train.bf16 = True
    baseline.save_weights(path, model.state_dict(), cfg, training_inputs(cfg), 12, 3.5, 0.25)
    cfg = _released(cfg, path)
    real = machine.capability()
    for native in (False, True):
        monkeypatch.setattr(machine, "capability", lambda *a, native=native: {**real, "native_bf16": native})
        cfg.train.bf16 = "auto"
        assert baseline.verify_released(cfg, "retrain") == cfg.baseline.sha256
    cfg.train.bf16 = False
    with pytest.raises(baseline.BaselineError, match=r"differs in: train.bf16"):
        baseline.verify_released(cfg, "retrain")


def test_provenance_records_the_machine(weights, tmp_path):
    from common.core import machine

    cfg, _, path = weights
    meta = baseline.read_metadata(path)
    prov = json.load(open(baseline.write_provenance(path, meta, "make retrain")))
    assert prov["exported_on"] == machine.capability() and prov["sha256"] == sha256_file(path)


def test_truncated_or_foreign_files_are_refused_with_the_file_named(weights, tmp_path):
    _, model, path = weights
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(baseline.BaselineError, match="cut.safetensors"):
        baseline.load_weights(str(cut))
    from safetensors.torch import save_file

    foreign = str(tmp_path / "foreign.safetensors")
    save_file(model.state_dict(), foreign)
    with pytest.raises(baseline.BaselineError, match="not a LAQFI baseline"):
        baseline.load_weights(foreign)


def test_config_needs_a_sha256_with_released_weights(tmp_path):
    with pytest.raises(ConfigError, match="baseline.sha256"):
        load_config(os.path.join(ROOT, "configs", "smoke.yaml"), ["baseline.weights=x.safetensors"])


def test_training_writes_loadable_snapshots(tiny_cfg, tmp_path):
    from common.diffusion.data import mnist_tensor

    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.snapshot_every = 4, 2
    x, _ = mnist_tensor(cfg.data, "train")
    ckpt = str(tmp_path / "b" / "checkpoint.pt")
    ema, _ = train(cfg, x, ckpt, torch.device("cpu"), progress=False)
    snaps = sorted(f for f in os.listdir(snapshot_dir(ckpt)) if f.endswith(".safetensors"))
    assert snaps == ["ema_step0000002.safetensors", "ema_step0000004.safetensors"]
    index = json.load(open(os.path.join(snapshot_dir(ckpt), "index.json")))["files"]  # their SHA-256 (verify)
    assert index == {s: sha256_file(os.path.join(snapshot_dir(ckpt), s)) for s in snaps}
    last, meta = baseline.load_weights(os.path.join(snapshot_dir(ckpt), snaps[-1]))
    for (n, a), (_, b) in zip(ema.state_dict().items(), last.state_dict().items(), strict=True):
        assert torch.equal(a, b), n  # the last snapshot is the finished EMA
    assert meta["step"] == "4" and float(meta["train_seconds"]) > 0


def test_an_edited_snapshot_index_is_kept_aside_not_resealed(tiny_cfg, tmp_path, capsys):
    """An index whose seal no longer matches (edited by hand, or damaged) was read and re-sealed, laundering the
    edit; a corrupt one was silently reset. Now it is moved aside, said so, and a new index begins."""
    from common.diffusion.train import save_snapshot

    cfg = tiny_cfg
    ckpt = str(tmp_path / "b" / "checkpoint.pt")
    ema = torch.nn.Linear(2, 2)
    save_snapshot(cfg, ema, ckpt, 1, 1.0, 0.5, False)
    path = os.path.join(snapshot_dir(ckpt), "index.json")
    record = json.load(open(path))
    record["files"]["ema_step0000001.safetensors"] = "0" * 64  # a hash edited to match some other file
    json.dump(record, open(path, "w"))
    save_snapshot(cfg, ema, ckpt, 2, 1.0, 0.5, False)
    assert "was damaged or edited" in capsys.readouterr().out
    assert list(json.load(open(path))["files"]) == ["ema_step0000002.safetensors"]
    aside = [f for f in os.listdir(snapshot_dir(ckpt)) if f.startswith("index.damaged-")]
    assert len(aside) == 1 and json.load(open(os.path.join(snapshot_dir(ckpt), aside[0]))) == record


@pytest.mark.parametrize("config, network", [("default.yaml", "U-Net"), ("dit.yaml", "DiT"), ("dit_long.yaml", "DiT"),
                                             ("dit_stage2.yaml", "DiT")])
def test_released_checkpoint_matches_its_config_and_provenance(config, network):
    cfg = load_config(os.path.join(ROOT, "configs", config))
    path = os.path.join(ROOT, cfg.baseline.weights)
    cfg.baseline.weights = path
    assert baseline.verify_released(cfg, "retrain") == cfg.baseline.sha256
    model, meta = baseline.load_weights(path)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).parameters())
    prov = json.load(open(os.path.splitext(path)[0] + ".json"))
    assert prov["sha256"] == cfg.baseline.sha256 and prov["step"] == int(meta["step"])
    assert "simplediffusion.py" in prov["retrain_command"] or "make" in prov["retrain_command"]
    assert network in prov["what"]


def test_restore_hint_only_for_files_git_tracks(tiny_cfg):
    """The hint names `git checkout` for the committed baseline (when this checkout is a git repository), and a
    retrain command that does not repeat the --set it replaces."""
    import subprocess

    from common.core.config import load_config

    path = os.path.join(ROOT, "checkpoints", "default.safetensors")
    cfg = load_config(os.path.join(ROOT, "configs", "default.yaml"),
                      [f"baseline.weights={path}", "baseline.sha256=" + "f" * 64])
    git = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True)
    tracked = git.returncode == 0
    with pytest.raises(baseline.BaselineError) as e:
        baseline.verify_released(cfg)
    msg = str(e.value)
    assert ("git checkout -- " + path in msg) == tracked
    assert "--set baseline.weights=null" in msg and f"baseline.weights={path}" not in msg.split("train from scratch")[1]
    assert "baseline.sha256=" not in msg.split("train from scratch")[1]
