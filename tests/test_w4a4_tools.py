"""The W4A4 tools in common.quant: lowrank (an SVD branch beside a quantized layer), time_table (the time path
as a table over the sampler's timesteps), smoothing (per-channel scales folded into weights and producers) and
calibrate.mse_range: exactness, what each removes, storage round trips."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from common.core.config import load_config
from common.diffusion.model import build_model
from common.quant import lowrank, time_table
from common.quant.container import arch_record, load_quantized, save_quantized
from common.quant.formats import quantize_tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA = "0" * 64  # the checkpoint a cache is bound to (any SHA-256 spelling)


def _net(name, overrides=()):
    cfg = load_config(os.path.join(ROOT, "configs", name), overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # leave the DiT's zero start so every path carries signal
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return cfg, model


@pytest.mark.parametrize("kind", [nn.Linear, nn.Conv2d, nn.ConvTranspose2d])
def test_split_is_exact_and_full_rank_leaves_nothing(kind):
    torch.manual_seed(0)
    layer = {nn.Linear: lambda: nn.Linear(12, 10), nn.Conv2d: lambda: nn.Conv2d(6, 8, 3, padding=1),
             nn.ConvTranspose2d: lambda: nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)}[kind]().eval()
    x = torch.randn(2, 12) if kind is nn.Linear else torch.randn(2, layer.in_channels, 5, 5)
    ref, w = layer(x), layer.weight.detach().clone()
    model = nn.Sequential(layer)
    lowrank.decompose(model, {"0": 3})
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)  # branch + residual = the layer
    assert layer.weight.norm() < w.norm()  # the residual is what gets quantized: smaller than W
    for f in (layer.lowrank.down.weight, layer.lowrank.up.weight):  # what the fp16 file holds, in memory too
        assert torch.equal(f, f.half().float())
    mat = w.reshape(w.shape[0], -1)
    _, _, residual = lowrank.split(w, kind, min(mat.shape))
    # full rank leaves only the factors' fp16 rounding: |dL R + L dR| <= 2 * 2^-11 * max row norm of L = U sqrt(S)
    # * max column norm of R = sqrt(S) Vh <= 2^-10 * s_max (plus float32's error)
    assert residual.abs().max() <= 2**-10 * torch.linalg.matrix_norm(mat, ord=2) + 1e-6


def test_a_rank_above_the_layers_own_is_capped_not_a_shape_error():
    """w4a4.lowrank_rank above a small layer's width (e.g. the last conv's) built a branch wider than its SVD."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    x, model = torch.randn(5, 4), nn.Sequential(layer)
    ref = layer(x)
    assert lowrank.decompose(model, {"0": 8}) == {"0": 3}
    assert layer.lowrank.down.weight.shape == (3, 4)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)


def test_branch_sees_the_input_before_activation_quantizers_and_round_trips_through_the_file(tmp_path):
    cfg, model = _net("smoke.yaml")
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([3, 70])
    with torch.no_grad():
        ref = model(x, t)
    name = "Layer2.attention_layer.proj1"
    lowrank.decompose(model, {name: 4, "Layer3.ResBlock1.conv1": 2, "Layer4.conv": 2})
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref, atol=1e-4, rtol=1e-3)  # branches + residuals = the network
    mod = dict(model.named_modules())[name]
    seen = {}
    mod.register_forward_pre_hook(lambda m, a: (a[0] * 0,))  # an input quantizer that zeroes everything
    mod.lowrank.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(x, t)
    assert seen["x"].abs().sum() > 0  # the branch got the unquantized input
    cfg, model = _net("smoke.yaml")
    lowrank.decompose(model, {name: 4})
    stored = {}
    for n, p in model.named_parameters():
        fmt = lowrank.FACTOR_FORMAT if ".lowrank." in n else ("int8" if n.endswith("conv1.weight") else "fp32")
        stored[n] = {"format": "fp32", "data": p.detach().clone()} if fmt == "fp32" else quantize_tensor(p, fmt, 0)
    path = str(tmp_path / "q.safetensors")
    report = save_quantized(stored, path, arch_record(cfg, model), {})
    again, blob = load_quantized(path)
    assert blob["arch"]["extras"]["lowrank"] == {name: 4}
    assert report["stored_bytes"] == report["analytic_bytes"]
    from common.quant.formats import dequantize_tensor

    model.load_state_dict({n: e["data"] if e["format"] == "fp32" else dequantize_tensor(e) for n, e in stored.items()})
    model.requires_grad_(False)  # as loaded models are (kernels differ when weights require grad)
    with torch.no_grad():  # the file runs what was stored, branch included
        torch.testing.assert_close(again(x, t), model(x, t), atol=0, rtol=0)


@pytest.mark.parametrize("config", ["smoke.yaml", "smoke_dit.yaml"])
def test_time_table_replaces_the_time_path_exactly_at_the_sampler_steps(tmp_path, config):
    cfg, model = _net(config, ["model.time_embedding=mlp"])  # smoke.yaml's U-Net: the poster's fixed table
    steps = [99, 66, 33, 0]
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ref = model(x, torch.tensor(steps))
    tabled = copy.deepcopy(model)
    widths = time_table.build(tabled, steps, (1, 32, 32))
    assert set(widths) == set(model.time_outputs()) and widths
    with torch.no_grad():  # break the time path's weights: the table does not need them
        for n, p in tabled.named_parameters():
            if tabled.time_path(n.rsplit(".", 1)[0]):
                p.zero_()
        out = tabled(x, torch.tensor(steps))
        shapes = {}
        for net in (model, tabled):  # the table's rows have the shapes the time path's own outputs have
            mods, seen = dict(net.named_modules()), []
            hooks = [mods[n].register_forward_hook(lambda m, a, o, seen=seen: seen.append(tuple(o.shape)))
                     for n in widths]
            for t in ([33], [33, 33]):
                net(x[:2], torch.tensor(t))
            for h in hooks:
                h.remove()
            shapes[net is tabled] = seen
        assert shapes[True] == shapes[False] and shapes[True], shapes
        one_t = tabled(x[:2], torch.tensor([33]))  # one timestep for the whole batch: its row for every sample
        two_t = tabled(x[:2], torch.tensor([33, 33]))
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)  # fp16 rows
    torch.testing.assert_close(one_t, two_t, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not in the stored time table"):
        tabled(x[:1], torch.tensor([50]))
    stored = {n: {"format": "fp32", "data": p.detach().clone()} for n, p in tabled.named_parameters()}
    stored.update({n: ({"format": "fp32", "data": b.clone()} if b.dtype == torch.int32 else
                       quantize_tensor(b, time_table.TABLE_FORMAT, 0)) for n, b in tabled.named_buffers()
                   if n in time_table.table_entries(tabled)})
    path = str(tmp_path / "q.safetensors")
    save_quantized(stored, path, arch_record(cfg, tabled), {})
    again, blob = load_quantized(path)
    assert blob["arch"]["extras"]["time_table"]["steps"] == steps
    with torch.no_grad():
        torch.testing.assert_close(again(x, torch.tensor(steps)), out, atol=0, rtol=0)


def test_mse_range_clips_heavy_tails_and_keeps_a_uniform_range():
    from common.quant.activations import fake_quant, int_range, qparams
    from common.quant.calibrate import mse_range

    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(20000, generator=g) * 2 - 1
    lo, hi = mse_range(uniform, 4)
    assert lo == pytest.approx(-1, abs=0.06) and hi == pytest.approx(1, abs=0.06)  # nothing to clip
    tails = torch.randn(20000, generator=g)
    tails[:2] = 40.0  # 0.01 % far out: clipping them costs less than 16 levels over [-4, 40]
    lo, hi = mse_range(tails, 4)
    assert hi < 10

    def mse(lo, hi):
        s, z = qparams(torch.tensor(lo), torch.tensor(hi), 4, False)
        return float((fake_quant(tails, s, z, *int_range(4, False)) - tails).pow(2).mean())

    assert mse(lo, hi) < 0.5 * mse(float(tails.min()), float(tails.max()))


@pytest.mark.parametrize("config", ["smoke.yaml", "smoke_dit.yaml"])
def test_smoothing_folds_exactly_and_round_trips(tmp_path, config):
    from common.quant import smoothing
    from common.quant.activations import quantizable_modules

    cfg, model = _net(config, ["model.time_embedding=mlp"])
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 80])
    with torch.no_grad():
        ref = model(x, t)
    mods = dict(model.named_modules())
    g = torch.Generator().manual_seed(3)
    runtime = {}
    layers = [n for n in quantizable_modules(model) if not n.endswith(".lowrank.down")]
    for n in layers:
        c = mods[n].weight.shape[smoothing.weight_in_axis(mods[n])]
        smoothing.fold(model, n, torch.rand(c, generator=g) * 3 + 0.2, runtime)
    folded = {n for n in layers if n in model.smoothing_folds()}
    assert folded and runtime and not folded & set(runtime)
    smoothing.attach_divisors(model, {n: s.numel() for n, s in runtime.items()})
    with torch.no_grad():
        for n, s in runtime.items():
            mods[n].smooth_div.copy_(s)
        torch.testing.assert_close(model(x, t), ref, atol=1e-4, rtol=1e-3)  # x / s, W diag(s): the same net
    stored = {n: {"format": "fp32", "data": p.detach().clone()} for n, p in model.state_dict().items()}
    path = str(tmp_path / "q.safetensors")
    save_quantized(stored, path, arch_record(cfg, model), {})
    again, blob = load_quantized(path)
    assert set(blob["arch"]["extras"]["smooth"]) == set(runtime)
    model.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(again(x, t), model(x, t), atol=0, rtol=0)


def test_smoothing_moves_an_outlier_channel_into_the_weights():
    from common.quant import smoothing
    from common.quant.formats import dequantize_tensor

    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(512, 16)
    x[:, 3] *= 30  # one channel 30x wider than the rest: per-tensor 4-bit steps are too coarse for the others
    wq = lambda w: dequantize_tensor(quantize_tensor(w, "int8", 0))  # noqa: E731
    alpha, s, errors = smoothing.choose_alpha(layer, x, x.abs().amax(0), wq, 4)
    assert alpha is not None and errors[alpha] < 0.9 * errors[None]
    assert s[3] == s.max()


@pytest.mark.parametrize("config", ["smoke.yaml", "smoke_dit.yaml"])
def test_rotation_is_exact_spreads_an_outlier_and_round_trips(tmp_path, config):
    from common.quant import rotation
    from common.quant.activations import quantizable_modules

    h = rotation.matrix(24, rotation.block_size(24))
    assert rotation.block_size(24) == 8 and torch.allclose(h @ h.T, torch.eye(24), atol=1e-6)
    x = torch.zeros(1, 8)
    x[0, 3] = 8.0
    assert (x @ rotation.hadamard(8)).abs().max() == pytest.approx(8 / 8 ** 0.5)  # spread over the block
    cfg, model = _net(config)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 80])
    with torch.no_grad():
        ref = model(x, t)
    blocks = rotation.rotate(model, quantizable_modules(model))
    model.requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), ref, atol=1e-4, rtol=1e-3)
    stored = {n: {"format": "fp32", "data": p.detach().clone()} for n, p in model.state_dict().items()}
    path = str(tmp_path / "q.safetensors")
    save_quantized(stored, path, arch_record(cfg, model), {})
    again, blob = load_quantized(path)
    assert blob["arch"]["extras"]["rotate"] == blocks
    with torch.no_grad():
        torch.testing.assert_close(again(x, t), model(x, t), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["smoke.yaml", "smoke_dit.yaml"])
def test_rounded_weights_are_the_parameters_stored_entries(name):
    """``w4a4.rounded_weights`` (plain rounding, every damage variant) is ``stored_entries`` over the parameters:
    bit-identical to its former own loop (RULE weights int4, the ends in keep_format, the rest fp32)."""
    from common.experiments import lowbit
    from common.experiments.w4a4 import rounded_weights, stored_entries
    from common.quant.eligibility import eligible_names, end_convs
    from common.quant.formats import channel_axes

    cfg, model = _net(name)
    got = rounded_weights(cfg, model, 4)
    axes, quantized, ends = channel_axes(model), set(eligible_names(model, lowbit.RULE)), set(end_convs(model))
    assert quantized and ends
    for n, p in model.named_parameters():
        fmt = "int4" if n in quantized else cfg.lowbit.keep_format if n in ends else "fp32"
        want = quantize_tensor(p, fmt, axes[n]) if fmt != "fp32" else {"format": "fp32", "data": p.detach()}
        assert got[n].keys() == want.keys() and got[n]["format"] == fmt, n
        assert all(torch.equal(got[n][k], v) if torch.is_tensor(v) else got[n][k] == v for k, v in want.items()), n
    assert got.keys() == dict(model.named_parameters()).keys()
    assert set(stored_entries(cfg, model, 4)) == set(model.state_dict()) >= set(got)  # the whole state: buffers too


def test_gptq_rounding_is_cached_per_model_state(tmp_path, capsys):
    """w4a4's GPTQ rounding is computed once per transformed model: the same model reuses it (the same entries),
    a model whose weights differ anywhere computes its own, and a corrupt cache file is recomputed, not used."""
    from common.experiments.finetune import finetune_config
    from common.experiments.w4a4 import gptq_weights
    from common.quant.container import stored_digest

    cfg, model = _net("smoke.yaml", [f"run.out_dir={tmp_path}"])
    c = finetune_config(cfg)
    first, info = gptq_weights(c, model, SHA, "cpu", progress=False)
    assert "[gptq]" in capsys.readouterr().out and info["layers"]
    again, info2 = gptq_weights(c, model, SHA, "cpu", progress=False)
    out = capsys.readouterr().out
    assert "reusing GPTQ's rounding" in out and "[gptq]" not in out
    assert stored_digest(again) == stored_digest(first) and info2 == info
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(other.parameters())).add_(1e-3)
    gptq_weights(c, other, SHA, "cpu", progress=False)
    assert "[gptq]" in capsys.readouterr().out
    gptq_weights(c, model, "1" * 64, "cpu", progress=False)  # bound to its checkpoint: another one recomputes
    assert "[gptq]" in capsys.readouterr().out
    wider = copy.deepcopy(c)  # the same weights sampled at another resolution: other Hessians, other rounding
    wider.data.image_size = c.data.image_size + 8
    gptq_weights(wider, model, SHA, "cpu", progress=False)
    assert "[gptq]" in capsys.readouterr().out
    from common.core import storage

    files = sorted(Path(storage.baseline_dir(c)).glob("gptq_*.pt"))
    assert len(files) == 3
    for f in files:
        f.write_bytes(b"not a torch file")
    third, _ = gptq_weights(c, model, SHA, "cpu", progress=False)
    assert "[gptq]" in capsys.readouterr().out and stored_digest(third) == stored_digest(first)


def test_w4a4_rows_switch_token_and_block_quantizers():
    """An ablation row's activation quantizer: per tensor by default, per token on the attention projections with
    ``token``, and per block of ``w4a4.block_size`` channels on every input with ``block`` (which supersedes
    both); the row's block size is the config's only when the row has the technique."""
    from common.experiments.finetune import finetune_config
    from common.experiments.w4a4 import _quantizer, row_block
    from common.quant.activations import attention_projections, quantizable_modules

    cfg, model = _net("smoke.yaml")
    c = finetune_config(cfg)
    names = quantizable_modules(model)
    ranges = {n: torch.tensor([[[-1.0, 1.0]] * (2 if n in model.concat_splits() else 1)] * 4) for n in names}
    bits = {n: 4 for n in names}
    attn = attention_projections(model)
    assert attn
    plain = _quantizer(c, model, ranges, bits, "group", token=False)
    token = _quantizer(c, model, ranges, bits, "group", token=True)
    block = _quantizer(c, model, ranges, bits, "group", token=True, block=row_block(cfg, ("token", "block")))
    assert {lq.granularity for lq in plain.layers.values()} == {"tensor"}
    assert {n for n, lq in token.layers.items() if lq.granularity == "token"} == attn
    assert {(lq.granularity, lq.block) for lq in block.layers.values()} == {("block", cfg.w4a4.block_size)}
    assert row_block(cfg, ("ranges", "token")) == 0
    # dynamic rows skip calibration: no ranges, the same quantizer; a per-tensor row cannot do without them
    from common.experiments.w4a4 import row_ranges
    from common.quant.activations import quantizer_digest

    assert row_ranges(c, model, names, "mse", 4, "group", cfg.w4a4.block_size, "cpu", "0" * 64) is None
    blind = _quantizer(c, model, None, bits, "group", token=True, block=cfg.w4a4.block_size)
    assert quantizer_digest(blind) == quantizer_digest(block)
    with pytest.raises(ValueError, match="no calibrated activation ranges for the per-tensor inputs"):
        _quantizer(c, model, None, bits, "group", token=False)
    with pytest.raises(ValueError, match="2 bit widths for 1 timestep groups"):  # checked without ranges too
        _quantizer(c, model, None, {n: [4, 8] for n in names}, "single", token=False, block=16)


def test_w4a4_calibration_is_cached_per_model_and_setting(tmp_path, capsys):
    """A row's ranges are computed once per transformed model and calibration setting: the same call reuses
    them (equal tensors), another method, other MSE bits or other weights recalibrate, a damaged file is
    recomputed to the same values."""
    from common.core import storage
    from common.experiments.act_pipeline import act_layout
    from common.experiments.finetune import finetune_config
    from common.experiments.w4a4 import calibrate, range_cache_inputs

    cfg, model = _net("smoke.yaml", [f"run.out_dir={tmp_path}"])
    c = finetune_config(cfg)
    c.act_quant.calib_images = 2  # what is cached, not how well: two trajectories suffice
    names = act_layout(c, model)[0]
    first = calibrate(c, model, names, "mse", 4, "group", "cpu", "0" * 64, progress=False)
    assert "reusing calibrated ranges" not in capsys.readouterr().out
    again = calibrate(c, model, names, "mse", 4, "group", "cpu", "0" * 64, progress=False)
    assert "reusing calibrated ranges" in capsys.readouterr().out
    assert again.keys() == first.keys() and all(torch.equal(again[n], first[n]) for n in first)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(iter(other.parameters())).add_(1e-3)
    for args in ((model, "minmax", 4), (model, "mse", 6), (other, "mse", 4)):
        calibrate(c, args[0], names, args[1], args[2], "group", "cpu", "0" * 64, progress=False)
        assert "reusing calibrated ranges" not in capsys.readouterr().out, args[1:]
    files = sorted(Path(storage.baseline_dir(c)).glob("ranges_*.safetensors"))
    assert len(files) == 4
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))  # the last values damaged
    third = calibrate(c, model, names, "mse", 4, "group", "cpu", "0" * 64, progress=False)
    out = capsys.readouterr().out
    assert "reusing calibrated ranges" not in out and "stale, foreign or damaged: recomputing it" in out
    assert all(torch.equal(third[n], first[n]) for n in first)
    # the key: every rank of a torchrun shares one file; the sampled shape, groups and seed are in it
    key = lambda cc, mode="group", dev="cpu": range_cache_inputs(cc, model, names, "mse", 4, mode, dev, "0" * 64)  # noqa: E731
    assert key(c, dev=torch.device("cuda", 0)) == key(c, dev=torch.device("cuda", 1)) != key(c)
    changed = [copy.deepcopy(c) for _ in range(3)]
    changed[0].data.image_size += 8
    changed[1].act_quant.calib_seed += 1
    changed[2].act_quant.symmetric = not c.act_quant.symmetric  # least-MSE ranges are searched for one quantizer
    assert len({json.dumps(k, sort_keys=True) for k in [key(c), key(c, "single"), *map(key, changed)]}) == 5


@pytest.mark.parametrize("config", ["smoke.yaml", "smoke_dit.yaml"])
def test_transformed_model_computes_the_fp32_network_with_every_exact_technique(config):
    """Smoothing folds divisors into the time path's outputs on the DiT (adaLN modulation rows), so the time table
    must hold the transformed model's rows, not the original's: the float transformed model is the same net."""
    from common.diffusion.samplers import build_sampler
    from common.diffusion.schedule import NoiseSchedule
    from common.experiments.w4a4 import transformed_model

    cfg, model = _net(config, ["model.time_embedding=mlp"])
    steps = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion)).timesteps
    g = torch.Generator().manual_seed(4)
    size = cfg.data.image_size
    picks = torch.randint(len(steps), (16,), generator=g)
    pool = (torch.randn(16, 1, size, size, generator=g), torch.as_tensor(steps)[picks])
    m, info = transformed_model(cfg, model, ("smooth", "rotate", "lowrank", "time_table"), pool, "cpu", rank=2,
                                smooth_samples=16, progress=False)
    assert info["smooth"]["alpha"] and info["time_table"]["widths"]
    x, t = torch.randn(len(steps), 1, size, size, generator=g), torch.as_tensor(steps)
    with torch.no_grad():
        ref, out = model(x, t), m(x, t)
    # fp16 divisors and table rows: each rounding is off by at most 2^-11 (4.9e-4) relatively, and they do not
    # compound beyond a few of that; the original model's rows in the table were off by ~1e-2 on this random net
    assert float((out - ref).norm() / ref.norm()) < 2e-3


def test_greedy_rule_drops_only_measurable_harm():
    """w4a4.keeps: a row is dropped only when its per-image selection damage exceeds its base's by more than the
    margin in standard errors of the paired difference; a tie inside the images' noise is kept; margin 0 is the
    strict rule (kept only when the mean went down); the first row has no base and is kept."""
    from common.experiments.w4a4 import keeps

    base = [0.010, 0.002, 0.030, 0.004, 0.008, 0.006]
    noisy_tie = [b + d for b, d in zip(base, (0.003, -0.002, 0.002, -0.001, 0.001, -0.002), strict=True)]
    kept, z = keeps(noisy_tie, base, 2.0)
    assert kept and 0 < z < 2  # worse on average, but by less than two standard errors
    assert not keeps(noisy_tie, base, 0.0)[0]  # the strict rule drops it
    harm = [b * 1.5 + 0.001 for b in base]  # every image worse
    kept, z = keeps(harm, base, 2.0)
    assert not kept and z > 2
    better = [b * 0.5 for b in base]
    assert keeps(better, base, 2.0)[0] and keeps(better, base, 0.0)[0] and keeps(better, base, 2.0)[1] < 0
    assert keeps(base, None, 2.0) == (True, 0.0)
    assert keeps(base, base, 2.0) == (True, 0.0) and not keeps(base, base, 0.0)[0]  # equal: a tie, not a gain
    # a technique that stores more bytes or spends more activation bits must pay: a tie or a small gain is dropped
    small_gain = [b - d for b, d in zip(base, (0.003, -0.002, 0.002, -0.001, 0.001, -0.002), strict=True)]
    kept, z = keeps(small_gain, base, 2.0, costs_more=True)
    assert not kept and -2 < z < 0
    assert keeps(better, base, 2.0, costs_more=True)[0] and not keeps(noisy_tie, base, 2.0, costs_more=True)[0]
    assert not keeps([float("nan")] + base[1:], base, 2.0)[0]  # a broken row is never built on


def test_a_row_costs_more_by_its_bytes_or_activation_bits():
    from common.experiments.w4a4 import costs_more, row_cost

    base = row_cost({"size_bytes": 1_316_000, "a_bits_effective": 4.0})
    assert row_cost({"size_bytes": 5}) == (5, 4)
    assert not costs_more((1_316_500, 4.0), base)  # metadata-sized growth is not a cost
    assert costs_more((1_353_000, 4.0), base) and costs_more((1_316_000, 4.5), base)  # a table; block scales
    assert not costs_more((1_316_000, 4.0), base) and not costs_more((2_000_000, 8.0), None)  # the first row


@pytest.mark.parametrize("config", ["smoke.yaml", "smoke_dit.yaml"])
def test_time_table_lives_on_the_models_device(config):
    """A model already on a GPU is never moved again before it samples (w4a4's transformed model): the tables
    and the steps they cover are created on the model's device, and a row handed out follows the output's
    device. Checked with the meta device, which no CPU tensor can mix with, so this runs without a GPU."""
    _, model = _net(config, ["model.time_embedding=mlp"])
    model = model.to("meta")
    time_table.attach(model, [99, 66, 33, 0], {n: 8 for n in model.time_outputs()})
    assert {b.device.type for _, b in model.named_buffers()} == {"meta"}
    out = torch.empty(2, 8, device="meta")
    model._time_rows = torch.zeros(2, dtype=torch.long, device="meta")
    mod = dict(model.named_modules())[next(iter(model.time_outputs()))]
    assert time_table._row(mod, (), out).device.type == "meta"


def test_distillation_starts_on_the_stored_codes_not_round_to_nearest():
    """GPTQ keeps round-to-nearest's scales and changes codes; the distillation copied only the scales, so it
    started from round-to-nearest's codes and threw GPTQ's compensation away. With no step taken, what it
    exports must be the stored entries it was given."""
    from common.experiments.finetune import finetune_config
    from common.experiments.w4a4 import distill
    from common.quant.activations import quantizable_modules
    from common.quant.formats import channel_axes, int_codes, pack_signed

    cfg, model = _net("smoke.yaml", ["w4a4.distill_steps=0", "w4a4.onpolicy_every=0"])
    c = finetune_config(cfg)
    names = quantizable_modules(model)
    ranges = {n: torch.tensor([[[-1.0, 1.0]] * (2 if n in model.concat_splits() else 1)] * 4) for n in names}
    start = {}
    g = torch.Generator().manual_seed(5)
    axes = channel_axes(model)
    for n, p in model.named_parameters():  # int4 entries whose codes are not round-to-nearest's (as GPTQ's)
        if n.endswith(".weight") and p.dim() > 1 and n.removesuffix(".weight") in names and axes[n] == 0:
            e = quantize_tensor(p.detach(), "int4", 0)
            codes = int_codes(e)
            moved = (codes + torch.randint(-1, 2, codes.shape, generator=g)).clamp(-7, 7).to(torch.int8)
            start[n] = {**e, "data": pack_signed(moved, 4)}  # axis 0: channel-first is the stored order
    size = cfg.data.image_size
    pool = (torch.randn(8, 1, size, size, generator=g), torch.randint(0, cfg.diffusion.timesteps, (8,), generator=g))
    stored, _, info = distill(cfg, c, model, model, ranges, pool, False, "cpu", progress=False, start=start)
    assert info["start_matches_stored"] == 1.0
    trained = [n for n in start if stored[n]["format"] == "int4"]  # the ends keep lowbit.keep_format (int8)
    assert len(trained) > 5 and all(torch.equal(int_codes(stored[n]), int_codes(start[n])) for n in trained)
