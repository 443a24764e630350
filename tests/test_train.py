"""common.diffusion.train: the tiny config learns, checkpoints are complete, resume is bit-exact, stale configs
refused."""
import copy

import pytest
import torch

import common.diffusion.train as train_mod
from common.core.config import TrainConfig
from common.core.errors import StaleArtifactError
from common.diffusion.checkpoint import check_checkpoint_matches, load_ema, training_inputs
from common.diffusion.data import mnist_tensor
from common.diffusion.model import build_model
from common.diffusion.schedule import NoiseSchedule
from common.diffusion.train import NonFiniteLossError, _batch_indices, total_steps, train

CPU = torch.device("cpu")
CKPT_KEYS = {"model", "ema", "optimizer", "step", "total_steps", "finished", "config", "training_inputs",
             "fingerprint", "loss_history", "train_seconds"}


@pytest.fixture(scope="module")
def x_real(data_root):
    from types import SimpleNamespace
    x, _ = mnist_tensor(SimpleNamespace(root=data_root, download=False, image_size=32, train_limit=128), "train")
    return x


def fixed_batch_loss(cfg, state, x):
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
    model.load_state_dict(state)
    model.eval()
    s = NoiseSchedule.from_config(cfg.diffusion)
    g = torch.Generator().manual_seed(123)
    t = torch.randint(0, s.timesteps, (len(x),), generator=g)
    eps = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        return s.p_losses(model, x, t, eps).item()


def test_tiny_training_reduces_loss_and_writes_a_full_checkpoint(tiny_cfg, x_real, tmp_path):
    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.lr, cfg.train.checkpoint_every = 25, 2e-3, 10
    torch.manual_seed(cfg.run.seed)
    init = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).state_dict()
    path = str(tmp_path / "ckpt.pt")
    ema, ckpt = train(cfg, x_real, path, CPU, progress=False)
    assert CKPT_KEYS <= set(ckpt)
    assert ckpt["step"] == ckpt["total_steps"] == 25 and ckpt["finished"] is True
    assert len(ckpt["loss_history"]) == 25
    assert all(torch.isfinite(torch.tensor(ckpt["loss_history"])))
    assert ckpt["training_inputs"] == training_inputs(cfg)
    assert ckpt["config"]["train"]["max_steps"] == 25
    # the initial weights are the ones train() starts from (same seed), the fitted ones do better
    x = x_real[:32]
    before, after = fixed_batch_loss(cfg, init, x), fixed_batch_loss(cfg, ckpt["model"], x)
    print("fixed-batch loss", before, after)
    assert after < 0.8 * before, (before, after)
    # the returned EMA is what load_ema rebuilds from disk
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    loaded, on_disk = load_ema(path)
    for (n, a), (_, b) in zip(ema.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert on_disk["fingerprint"] == ckpt["fingerprint"]


def _cfg_for_resume(cfg):
    cfg.train.max_steps, cfg.train.checkpoint_every, cfg.train.batch_size = 4, 2, 8
    cfg.model.dropout = 0.1  # dropout masks must be replayed on resume too
    return cfg


class Interrupt(Exception):
    pass


def test_resume_is_bit_exact(tiny_cfg, tmp_path, monkeypatch):
    cfg = _cfg_for_resume(tiny_cfg)
    cfg.train.snapshot_every = 1
    snapshot_loss = {}  # {(path, step): the running loss a snapshot records}
    monkeypatch.setattr(train_mod, "save_snapshot", lambda cfg, ema, path, step, seconds, loss, bf16=None:
                        snapshot_loss.__setitem__((path, step), loss))
    x = torch.rand(20, 1, 32, 32) * 2 - 1  # 20 images, batch 8: epochs of 3 steps, a partial last batch
    straight_path, resumed_path = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    ema_a, ck_a = train(cfg, x, straight_path, CPU, progress=False)

    real_save = train_mod.save_cache

    def save_then_die(obj, path):
        real_save(obj, path)
        if path == resumed_path and obj["step"] == 2:
            raise Interrupt

    monkeypatch.setattr(train_mod, "save_cache", save_then_die)
    with pytest.raises(Interrupt):
        train(cfg, x, resumed_path, CPU, progress=False)
    partial = torch.load(resumed_path, weights_only=False)
    assert partial["step"] == 2 and partial["finished"] is False and len(partial["loss_history"]) == 2
    with pytest.raises(RuntimeError, match="partial checkpoint"):
        load_ema(resumed_path)

    monkeypatch.setattr(train_mod, "save_cache", real_save)
    ema_b, ck_b = train(cfg, x, resumed_path, CPU, resume=True, progress=False)
    assert ck_b["step"] == 4 and ck_b["finished"]
    assert ck_b["loss_history"] == ck_a["loss_history"]
    # the running loss the snapshots after the resume record continues the interrupted run's, as if never stopped
    assert [snapshot_loss[(resumed_path, k)] for k in (1, 2, 3, 4)] == [snapshot_loss[(straight_path, k)]
                                                                        for k in (1, 2, 3, 4)]
    for key in ("ema", "model"):
        for n, a in ck_a[key].items():
            assert torch.equal(a, ck_b[key][n]), f"{key}.{n}"
    for (n, a), (_, b) in zip(ema_a.state_dict().items(), ema_b.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    opt_a, opt_b = ck_a["optimizer"]["state"], ck_b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    assert all(torch.equal(opt_a[k]["exp_avg_sq"], opt_b[k]["exp_avg_sq"]) for k in opt_a)
    # a resume on other images, or over another number of steps, is refused with what differs
    with pytest.raises(StaleArtifactError, match="other images"):
        train(cfg, x.flip(0), resumed_path, CPU, resume=True, progress=False)
    with pytest.raises(StaleArtifactError, match="training for 4 steps; this config and data give 6"):
        train_mod.check_resume(ck_b, resumed_path, 6, ck_b["data_sha256"], "data")  # e.g. more epochs
    # and the EMA really moved away from the initial weights
    torch.manual_seed(cfg.run.seed)
    init = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).state_dict()
    assert not torch.equal(init["output_conv.weight"], ck_a["ema"]["output_conv.weight"])


def test_interrupting_without_resume_restarts_from_scratch(tiny_cfg, tmp_path):
    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.batch_size = 2, 4
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    _, a = train(cfg, x, str(tmp_path / "a.pt"), CPU, progress=False)
    _, b = train(cfg, x, str(tmp_path / "a.pt"), CPU, resume=False, progress=False)  # same weights again
    assert a["loss_history"] == b["loss_history"]
    assert all(torch.equal(a["ema"][n], b["ema"][n]) for n in a["ema"])


def test_check_checkpoint_matches(tiny_cfg, tmp_path):
    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.batch_size = 1, 4
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    path = str(tmp_path / "c.pt")
    _, ckpt = train(cfg, x, path, CPU, progress=False)
    check_checkpoint_matches(ckpt, cfg, path)  # same config: fine

    harmless = copy.deepcopy(cfg)
    harmless.run.out_dir, harmless.data.root, harmless.train.checkpoint_every = "/elsewhere", "/x", 7
    check_checkpoint_matches(ckpt, harmless, path)  # paths and checkpoint cadence do not change weights

    for mutate, key in ((lambda c: setattr(c.train, "lr", 5e-4), "train.lr"),
                        (lambda c: setattr(c.model, "dropout", 0.2), "model.dropout"),
                        (lambda c: setattr(c.run, "seed", 1), "seed"),
                        (lambda c: setattr(c.data, "train_limit", 100), "data.train_limit")):
        other = copy.deepcopy(cfg)
        mutate(other)
        with pytest.raises(StaleArtifactError) as e:
            check_checkpoint_matches(ckpt, other, path)
        assert key in str(e.value) and path in str(e.value)

    other = copy.deepcopy(cfg)
    other.train.lr = 5e-4
    with pytest.raises(StaleArtifactError, match="train.lr"):
        train(other, x, path, CPU, resume=True, progress=False)


def test_non_finite_loss_is_an_error_and_saves_nothing(tiny_cfg, tmp_path):
    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.batch_size = 2, 4
    x = torch.full((8, 1, 32, 32), float("nan"))
    path = tmp_path / "nan.pt"
    with pytest.raises(NonFiniteLossError, match="step 0"):
        train(cfg, x, str(path), CPU, progress=False)
    assert not path.exists()


def test_a_nan_on_another_rank_stops_this_rank_before_it_steps(tiny_cfg, tmp_path, monkeypatch):
    """Under torchrun the loss is checked after summing over ranks: a rank whose own loss is finite must raise
    too (raising alone, the NaN rank left the others waiting in the gradient all-reduce)."""
    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.batch_size = 2, 4
    monkeypatch.setattr(train_mod.distributed, "all_reduce_sum", lambda t: t + float("nan"))  # the other rank's
    stepped = []
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: stepped.append(1))
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 0"):
        train(cfg, torch.rand(8, 1, 32, 32) * 2 - 1, str(tmp_path / "a.pt"), CPU, progress=False)
    assert not stepped


def test_total_steps_and_epoch_batches(tiny_cfg):
    tc = copy.deepcopy(tiny_cfg.train)
    tc.max_steps, tc.epochs, tc.batch_size = None, 2, 16
    assert total_steps(tc, 33) == 6
    tc.max_steps = 5
    assert total_steps(tc, 33) == 5
    # each epoch visits every image exactly once; epochs use different orders
    e0 = torch.cat([_batch_indices(0, s, 10, 4) for s in range(3)])
    e1 = torch.cat([_batch_indices(0, s, 10, 4) for s in range(3, 6)])
    assert sorted(e0.tolist()) == list(range(10)) == sorted(e1.tolist())
    assert [len(_batch_indices(0, s, 10, 4)) for s in range(3)] == [4, 4, 2]
    assert not torch.equal(e0, e1)
    assert torch.equal(_batch_indices(3, 4, 10, 4), _batch_indices(3, 4, 10, 4))


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_decay_schedule(tiny_cfg, tmp_path, monkeypatch, warmup):
    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.checkpoint_every, cfg.train.batch_size = 3, 1, 4
    cfg.train.ema_decay, cfg.train.ema_warmup = 0.5, warmup
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    saved = []
    real_save = train_mod.save_cache
    monkeypatch.setattr(train_mod, "save_cache",
                        lambda obj, path: (saved.append(copy.deepcopy(obj)), real_save(obj, path)))
    train(cfg, x, str(tmp_path / "e.pt"), CPU, progress=False)
    assert [s["step"] for s in saved] == [1, 2, 3] and [s["finished"] for s in saved] == [False, False, True]
    torch.manual_seed(cfg.run.seed)
    ema = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).state_dict()
    for step, ck in enumerate(saved):
        d = min(0.5, (1 + step) / (10 + step)) if warmup else 0.5  # warmup: 0.1, 0.18, 0.25
        for n, w in ck["model"].items():
            want = ema[n] + (1 - d) * (w - ema[n])
            torch.testing.assert_close(ck["ema"][n], want, rtol=1e-5, atol=1e-7, msg=f"step {step} {n}")
        ema = ck["ema"]


def test_lr_schedule_is_a_function_of_the_step():
    from types import SimpleNamespace

    from common.diffusion.train import lr_at

    c = SimpleNamespace(lr=1.0, warmup_steps=0, lr_schedule="constant")
    assert [lr_at(c, s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    c = SimpleNamespace(lr=1.0, warmup_steps=4, lr_schedule="cosine")
    assert lr_at(c, 0, 104) == pytest.approx(0.25) and lr_at(c, 3, 104) == pytest.approx(1.0)
    assert lr_at(c, 4, 104) == pytest.approx(1.0) and lr_at(c, 54, 104) == pytest.approx(0.5)
    assert lr_at(c, 103, 104) < 0.001


# ----------------------------------------------------------------------------- train.bf16: auto
@pytest.fixture
def as_cpu(monkeypatch):
    """``as_cpu(native_bf16)``: this machine seen as a CPU with (or without) native bf16 kernels, and autocast recorded
    instead of run, so no bf16 kernel runs whatever the real ISA; returns the list of ``enabled`` flags."""
    import contextlib

    from common.core import machine
    from common.diffusion import checkpoint

    flags = []
    real = machine.capability()

    def fake_autocast(*args, enabled=True, **kwargs):
        flags.append(enabled)
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", fake_autocast)
    monkeypatch.setattr(machine, "bf16_matmul_cost", lambda: {"n": 256, "fp32_gflops": 50.0, "bf16_gflops": 1.0,
                                                              "slowdown": 50.0})
    monkeypatch.setattr(checkpoint, "_WARNED", set())

    def set_native(native):
        isa = "AVX512" if native else "AVX2"
        monkeypatch.setattr(machine, "capability", lambda *a: {**real, "native_bf16": native, "isa": isa})
        return flags

    return set_native


def _short(cfg):
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.checkpoint_every = 2, 4, 1
    cfg.train.bf16 = "auto"  # configs/smoke.yaml pins fp32 so its numbers are the same on every CPU
    return cfg, torch.rand(8, 1, 32, 32) * 2 - 1


@pytest.mark.parametrize("native", [False, True])
def test_auto_resolves_from_the_machine_for_a_new_training(tiny_cfg, tmp_path, as_cpu, capsys, native):
    from common.diffusion.checkpoint import resolve_bf16

    enabled = as_cpu(native)
    cfg, x = _short(tiny_cfg)
    assert cfg.train.bf16 == "auto" and TrainConfig().bf16 == "auto"  # the default
    assert resolve_bf16(cfg.train, "cpu") is native and training_inputs(cfg)["train"]["bf16"] is native
    _, ckpt = train(cfg, x, str(tmp_path / "a.pt"), CPU, progress=False)
    assert set(enabled) == {native}
    assert ckpt["training_inputs"]["train"]["bf16"] is native  # the resolved choice, never "auto"
    said = capsys.readouterr().out
    assert f"train.bf16: auto -> {'bf16 autocast' if native else 'fp32'}" in said
    assert ("native bf16 kernels" if native else "AVX2") in said and "WARNING" not in said


def test_explicit_true_and_false_are_kept(tiny_cfg, as_cpu):
    from common.diffusion.checkpoint import resolve_bf16

    as_cpu(False)
    for value in (True, False):
        tiny_cfg.train.bf16 = value
        assert resolve_bf16(tiny_cfg.train, "cpu", recorded=not value) is value
        assert training_inputs(tiny_cfg)["train"]["bf16"] is value


def test_explicit_true_without_native_bf16_warns_once_with_the_cost(tiny_cfg, tmp_path, as_cpu, capsys):
    enabled = as_cpu(False)
    cfg, x = _short(tiny_cfg)
    cfg.train.bf16 = True
    train(cfg, x, str(tmp_path / "a.pt"), CPU, progress=False)
    train(cfg, x, str(tmp_path / "b.pt"), CPU, progress=False)
    said = capsys.readouterr().out
    assert said.count("WARNING") == 1 and "no native bf16" in said and "50x slower" in said
    assert set(enabled) == {True}
    as_cpu(True)
    train(cfg, x, str(tmp_path / "c.pt"), CPU, progress=False)
    assert "WARNING" not in capsys.readouterr().out


def test_auto_resumes_as_the_checkpoint_started(tiny_cfg, tmp_path, as_cpu, capsys, monkeypatch):
    """A bf16 checkpoint resumed under auto on a CPU without native bf16 continues in bf16 (same fingerprint), and
    says so once; an explicit false is a different training config."""
    enabled = as_cpu(True)
    cfg, x = _short(tiny_cfg)
    cfg.train.max_steps = 4
    path = str(tmp_path / "a.pt")
    real_save = train_mod.save_cache

    def save_then_die(obj, p):
        real_save(obj, p)
        if obj["step"] == 2:
            raise Interrupt

    monkeypatch.setattr(train_mod, "save_cache", save_then_die)
    with pytest.raises(Interrupt):
        train(cfg, x, path, CPU, progress=False)
    monkeypatch.setattr(train_mod, "save_cache", real_save)
    partial = torch.load(path, weights_only=False)
    assert partial["training_inputs"]["train"]["bf16"] is True
    enabled.clear()
    as_cpu(False)
    assert training_inputs(cfg)["train"]["bf16"] is False  # a new training here would be fp32 ...
    check_checkpoint_matches(partial, cfg, path)  # ... yet auto accepts the bf16 checkpoint
    _, ckpt = train(cfg, x, path, CPU, resume=True, progress=False)
    assert set(enabled) == {True} and ckpt["fingerprint"] == partial["fingerprint"] and ckpt["step"] == 4
    said = capsys.readouterr().out
    assert "as the checkpoint being resumed was trained" in said and said.count("WARNING") == 1
    explicit = copy.deepcopy(cfg)
    explicit.train.bf16 = False
    with pytest.raises(StaleArtifactError, match="train.bf16"):
        check_checkpoint_matches(ckpt, explicit, path)


def test_released_config_fingerprint_is_machine_independent(monkeypatch):
    """configs/default.yaml says auto; checked against the released file (trained with bf16) it verifies on a CPU
    with and without native bf16, and dit.yaml's explicit false records false everywhere."""
    import os

    from common.core import machine
    from common.core.config import load_config
    from common.diffusion.baseline import verify_released

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    real = machine.capability()
    for native in (False, True):
        monkeypatch.setattr(machine, "capability", lambda *a, native=native: {**real, "native_bf16": native})
        cfg = load_config(os.path.join(root, "configs", "default.yaml"))
        cfg.baseline.weights = os.path.join(root, cfg.baseline.weights)
        assert cfg.train.bf16 == "auto" and verify_released(cfg, "retrain") == cfg.baseline.sha256
        dit = load_config(os.path.join(root, "configs", "dit.yaml"))
        assert dit.train.bf16 is False and training_inputs(dit)["train"]["bf16"] is False


def test_a_second_stage_starts_from_the_released_file_it_names(tiny_cfg, tmp_path):
    """train.init_from: model and EMA start from the named file's weights, checked by SHA-256; the hash (not the
    path) enters the fingerprint; a wrong hash, a missing file or another architecture is an error naming the key."""
    from safetensors.torch import save_file

    from common.core.config import _cross_checks
    from common.core.errors import UserError
    from common.core.storage import sha256_file

    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr = 1, 4, 1e-12  # one step that cannot move the weights
    torch.manual_seed(99)
    start = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).state_dict()
    path = str(tmp_path / "stage1.safetensors")
    save_file(start, path)
    cfg.train.init_from, cfg.train.init_sha256 = path, sha256_file(path)
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    ema, ckpt = train(cfg, x, str(tmp_path / "c.pt"), CPU, progress=False)
    for name, w in start.items():
        assert torch.allclose(ckpt["model"][name], w, atol=1e-9), name
        assert torch.allclose(ema.state_dict()[name], w, atol=1e-9), name
    inputs = training_inputs(cfg)
    assert inputs["train"]["init_sha256"] == cfg.train.init_sha256 and "init_from" not in inputs["train"]
    moved = copy.deepcopy(cfg)
    moved.train.init_from = str(tmp_path / "elsewhere.safetensors")
    assert training_inputs(moved) == inputs  # where the file lies does not matter
    plain = copy.deepcopy(cfg)
    plain.train.init_from = plain.train.init_sha256 = None
    assert "init_sha256" not in training_inputs(plain)["train"]  # older checkpoints keep their fingerprint

    wrong = copy.deepcopy(cfg)
    wrong.train.init_sha256 = "0" * 64
    with pytest.raises(UserError, match="train.init_from.*train.init_sha256"):
        train(wrong, x, str(tmp_path / "w.pt"), CPU, progress=False)
    with pytest.raises(UserError, match="train.init_from.*not found"):
        train(moved, x, str(tmp_path / "m.pt"), CPU, progress=False)
    other = copy.deepcopy(cfg)
    save_file({k: v[..., :1].contiguous() if v.dim() else v for k, v in start.items()}, path)
    other.train.init_sha256 = sha256_file(path)
    with pytest.raises(UserError, match="does not load into the configured model"):
        train(other, x, str(tmp_path / "o.pt"), CPU, progress=False)
    for bad, key in ((dict(init_sha256=None), "train.init_sha256: needs"), (dict(init_from=None), "init_from is not")):
        broken = copy.deepcopy(cfg)
        for k, v in bad.items():
            setattr(broken.train, k, v)
        with pytest.raises(Exception, match=key):
            _cross_checks(broken, "cfg.yaml")


def test_a_foreign_torch_file_as_checkpoint_is_a_one_line_error(tmp_path):
    """A torch file that is not a training checkpoint of this project: named as such, not a KeyError or a
    'partial checkpoint (step None)'."""
    from common.core.errors import UserError
    from common.diffusion.checkpoint import load_ema

    path = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(UserError, match=r"not a training checkpoint of this project \(no config, ema, finished\)"):
        load_ema(str(path))
    torch.save({"finished": True, "ema": {}}, path)
    with pytest.raises(UserError, match=r"\(no config\)"):
        load_ema(str(path))


def test_a_damaged_replaced_or_foreign_data_checkpoint_is_refused_not_reused(tiny_cfg, monkeypatch):
    """A finished checkpoint is reused only as it was written: a flipped value in its weights is a CorruptFileError
    wherever it is loaded (the digest training writes into it), a changed file without one is refused rather than
    having its hash recorded in model.json as the training's, and images other than the ones it was trained on
    (data.root is a path, not what it holds) are a StaleArtifactError."""
    import os

    from common.core import storage
    from common.core.storage import CONTENT, CorruptFileError
    from common.experiments import pipeline

    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.batch_size = 2, 4
    reuse = lambda: pipeline._ensure_baseline(cfg, CPU, False, False, False, False)  # noqa: E731
    _, path = reuse()  # trains
    info = os.path.join(os.path.dirname(path), "model.json")
    recorded, good = storage.load_json(info)["sha256"], open(path, "rb").read()
    reuse()  # the same file: reused

    ckpt = torch.load(path, weights_only=True)
    assert storage.content_ok(ckpt) is True
    name = next(n for n, v in ckpt["ema"].items() if v.is_floating_point())
    ckpt["ema"][name].view(-1)[0] += 1.0  # one value changed, the digest kept
    storage.atomic_torch_save(ckpt, path)
    for load in (reuse, lambda: load_ema(path), lambda: train(cfg, torch.zeros(8, 1, 32, 32), path, CPU, resume=True,
                                                               progress=False)):
        with pytest.raises(CorruptFileError, match="do not match the digest"):
            load()

    ckpt.pop(CONTENT)  # a changed file that carries no digest (as checkpoints written before digests)
    storage.atomic_torch_save(ckpt, path)
    with pytest.raises(CorruptFileError, match="model.json recorded"):
        reuse()
    assert storage.load_json(info)["sha256"] == recorded  # not re-recorded as the training's

    with open(path, "wb") as f:
        f.write(good)
    real = pipeline.mnist_tensor
    monkeypatch.setattr(pipeline, "mnist_tensor", lambda data, split: (-real(data, split)[0], None))
    with pytest.raises(StaleArtifactError, match="other images"):
        reuse()


@pytest.mark.slow  # a cold inductor compile of the smoke U-Net's forward and backward (~30 s)
def test_compiled_training_follows_the_eager_run_and_keeps_the_fingerprint(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.checkpoint_every, cfg.train.lr = 1, 8, 10, 1e-3
    x = torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _, eager = train(cfg, x, str(tmp_path / "eager.pt"), CPU, progress=False)
    compiled_calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled_calls.append(m) or real_compile(m, **kw))
    cfg.train.compile = True
    _, compiled = train(cfg, x, str(tmp_path / "compiled.pt"), CPU, progress=False)
    assert len(compiled_calls) == 1  # the network really ran compiled
    # not a training input: the same recipe, so the same fingerprint (a compiled run resumes an eager one)
    assert compiled["fingerprint"] == eager["fingerprint"]
    # The same arithmetic in another order. The loss (before any update) agrees to float32 reordering. Adam's first
    # step moves every weight by lr * g / (|g| + eps), i.e. lr * sign(g) wherever |g| >> eps (and clipping scales
    # g, never flips it): the two runs' weights may differ only where a gradient is so close to 0 that rounding
    # flips its sign. A wrong backward flips about half of them.
    # (the loss sums 8 x 32 x 32 weighted squares: reordered, within gamma_8192 ~ 5e-4 of their sum)
    assert eager["loss_history"][0] == pytest.approx(compiled["loss_history"][0], rel=1e-3)
    flipped = total = 0
    for n, a in eager["model"].items():
        if a.is_floating_point():
            flipped += int(((a - compiled["model"][n]).abs() > cfg.train.lr / 2).sum())
            total += a.numel()
    assert flipped <= 0.01 * total, (flipped, total)
