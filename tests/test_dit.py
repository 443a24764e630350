"""The DiT (common.diffusion.dit): shapes, adaLN-Zero, a training step, the baseline format, and that every
quantizer, activation hook and Fisher reaches every linear; end to end on configs/smoke_dit.yaml."""
import os

import pytest
import torch
from test_fisher import assert_same_sq_grads
from torch import nn

from common.core.config import ConfigError, load_config
from common.diffusion.dit import DiT, pos_embed_2d
from common.diffusion.model import build_model, count_params, stage_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_DIT = os.path.join(ROOT, "configs", "smoke_dit.yaml")


def tiny_dit(depth=2, hidden=32, patch=4, **kw) -> DiT:
    torch.manual_seed(0)
    return DiT(image_size=32, patch_size=patch, in_channels=1, hidden=hidden, stage_blocks=[1] * depth,
               num_heads=2, mlp_ratio=4.0, dropout=0.0, timesteps=100, **kw)


def randomize(model):
    """Leave adaLN-Zero's zero start so every path carries signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_shapes_patches_and_stages():
    model = tiny_dit()
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([0, 50, 99])
    assert model(x, t).shape == x.shape
    assert model.grid == 8 and model.pos_embed.shape == (64, 32)
    assert "pos_embed" not in model.state_dict() and "t_embedder.table" not in model.state_dict()
    assert {stage_of(n) for n, _ in model.named_parameters()} == {None, "Layer1", "Layer2"}
    # unpatchify inverts the patch layout: a token's p*p values land in its own p x p square
    tokens = torch.arange(64 * 16, dtype=torch.float32).view(1, 64, 16)
    img = model.unpatchify(tokens)
    assert img[0, 0, :4, :4].flatten().tolist() == list(range(16))
    assert img[0, 0, 4:8, 28:32].flatten().tolist() == list(range(15 * 16, 16 * 16))
    pe = pos_embed_2d(8, 32)
    assert len({tuple(r.tolist()) for r in pe}) == 64  # every position distinct


def test_adaln_zero_starts_as_identity():
    """At initialisation every block returns its input and the output is zero (adaLN-Zero)."""
    model = tiny_dit()
    tokens, c = torch.randn(2, 64, 32), torch.randn(2, 32)
    for i in (1, 2):
        assert torch.equal(getattr(model, f"Layer{i}")(tokens, c), tokens)
    assert torch.equal(model(torch.randn(2, 1, 32, 32), torch.tensor([3, 7])), torch.zeros(2, 1, 32, 32))


def test_training_step_moves_every_weight_group():
    from common.diffusion.schedule import NoiseSchedule

    model = tiny_dit().train()
    sched = NoiseSchedule(100, 1e-4, 0.02)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # step 1 moves the output linear, step 2 the zero-initialised gates, step 3 the rest
        x0 = torch.randn(4, 1, 32, 32, generator=g)
        loss = sched.p_losses(model, x0, torch.randint(0, 100, (4,), generator=g), torch.randn(x0.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before)


def test_unfused_attention_matches_fused():
    from common.diffusion.model import unfused_attention

    model = randomize(tiny_dit()).eval()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([1, 90])
    with torch.no_grad():
        fused = model(x, t)
        with unfused_attention(model):
            plain = model(x, t)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)


def test_config_builds_the_dit_and_checks_it():
    cfg = load_config(os.path.join(ROOT, "configs", "dit.yaml"))
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
    assert isinstance(model, DiT) and 2.5e6 < count_params(model) <= 3.0e6
    assert model.ends == ("patch_embed", "final_layer.linear")
    with pytest.raises(ConfigError, match="model.num_heads"):
        load_config(os.path.join(ROOT, "configs", "dit.yaml"), ["model.num_heads=3"])
    with pytest.raises(ConfigError, match="model.patch_size"):
        load_config(os.path.join(ROOT, "configs", "dit.yaml"), ["model.patch_size=5"])


def test_training_fingerprint_keeps_each_architectures_keys_only():
    from common.diffusion.checkpoint import training_inputs

    unet = training_inputs(load_config(os.path.join(ROOT, "configs", "default.yaml")))["model"]
    dit = training_inputs(load_config(os.path.join(ROOT, "configs", "dit.yaml")))["model"]
    assert "arch" not in unet and "hidden" not in unet and "channels" in unet  # as before the DiT existed
    assert dit["arch"] == "dit" and dit["hidden"] == 160 and "channels" not in dit


def test_every_linear_is_reached_by_quantizers_activation_hooks_and_fisher():
    from common.diffusion.schedule import NoiseSchedule
    from common.importance.fisher import per_sample_sq_grads, per_sample_sq_grads_loop
    from common.quant.activations import ActQuantizer, LayerQuant, quantizable_modules
    from common.quant.eligibility import eligible_names, end_convs
    from common.quant.formats import quantize_tensor

    model = randomize(tiny_dit()).eval()
    linears = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert set(quantizable_modules(model)) == linears
    assert {n.removesuffix(".weight") for n in eligible_names(model, "all_weights")} == linears
    assert set(end_convs(model)) == {"patch_embed.weight", "final_layer.linear.weight"}
    poster = {n.removesuffix(".weight") for n in eligible_names(model, "poster")}
    assert poster == {n for n in linears if n.startswith("Layer")}  # patch embedding, time MLP, final layer stay
    # every activation hook fires and changes what its module sees
    seen = set()
    layers = {n: LayerQuant(bits=2, granularity="token") for n in linears}
    aq = ActQuantizer(layers, groups=1, timesteps=100).attach(model)
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.add(n)) for n, m in model.named_modules()
             if n in linears]
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 60])
    with torch.no_grad():
        quantized = model(x, t)
    aq.remove()
    for h in hooks:
        h.remove()
    with torch.no_grad():
        plain = model(x, t)
    assert seen == linears and not torch.allclose(quantized, plain)
    # every weight quantizes and the Fisher diagonal covers every linear with a non-zero value
    params = dict(model.named_parameters())
    for n in eligible_names(model, "all_weights"):
        quantize_tensor(params[n].detach(), "int4", 0)
    names = eligible_names(model, "all_weights")
    sched, eps = NoiseSchedule(100, 1e-4, 0.02), torch.randn_like(x)
    sq = per_sample_sq_grads(model, sched, names, x, t, eps)
    ref = per_sample_sq_grads_loop(model, sched, names, x, t, eps)
    assert set(sq) == set(names) and all(float(v.sum()) > 0 for v in sq.values())
    # vmap over the unfused attention = one backward per sample; the longest sum: a linear's weight gradient over
    # the tokens (at most 32 x 32 of them)
    assert_same_sq_grads(sq, ref, layers=len(names), reduction=32 * 32)


def test_op_types_and_time_path():
    model = tiny_dit()
    ops = {n: model.op_type(n) for n in (n.removesuffix(".weight") for n, _ in model.named_parameters()
                                          if n.endswith(".weight"))}
    assert ops["Layer1.blocks.0.attn.proj1"] == "attention qkv" and ops["Layer2.blocks.0.mlp.fc2"] == "MLP fc2"
    assert ops["Layer1.blocks.0.adaLN_modulation.1"] == "adaLN modulation"
    assert ops["t_embedder.mlp.0"] == "time MLP" and ops["patch_embed"] == "patch embedding"
    assert ops["final_layer.linear"] == "final layer"
    assert model.time_path("Layer2.blocks.0.adaLN_modulation.1") and not model.time_path("Layer2.blocks.0.mlp.fc1")
    assert model.concat_splits() == {}


@pytest.mark.slow
def test_smoke_dit_pipeline_samples_from_its_stored_files(tmp_path, data_root):
    """configs/smoke_dit.yaml end to end (train, Fisher, a strategy), and the stored quantized DiT resampled
    gives its stored samples bit for bit."""
    import subprocess
    import sys

    from common.diffusion.samplers import build_sampler, sample
    from common.diffusion.schedule import NoiseSchedule
    from common.quant.container import load_quantized

    env = dict(os.environ, PYTHONPATH=ROOT, LAQFI_DATA_ROOT=data_root)
    for script in ("simplediffusion.py", "whole_threshold.py"):
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), "--config", SMOKE_DIT, "--set",
                            f"run.out_dir={tmp_path}/runs", "--set", f"run.cache_dir={tmp_path}/cache",
                            "--set", "eval.classifier.train_limit=300", "--no-progress"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
    cfg = load_config(SMOKE_DIT)
    vdir = tmp_path / "runs" / "smoke_dit" / "whole_threshold"
    model, blob = load_quantized(str(vdir / "quantized.safetensors"))
    assert isinstance(model, DiT)
    assert any(e["format"] == "fp16" for e in blob["tensors"].values())
    x = sample(model, build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion)), cfg.eval.n_images,
               (1, 32, 32), 0, cfg.sample.batch_size, progress=False)
    assert torch.equal((x.clamp(-1, 1) + 1) / 2, torch.load(vdir / "samples_seed0.pt"))
