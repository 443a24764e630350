"""Activation quantization: quantizer maths, calibration, timestep groups, activation Fisher, BOPs, file."""
import copy
import os

import pytest
import torch
from torch import nn

from common.core.config import load_config
from common.diffusion.model import build_model
from common.diffusion.samplers import DDIMSampler, sample
from common.diffusion.schedule import NoiseSchedule
from common.importance.activations import activation_importance
from common.quant.activations import (
    ActQuantizer,
    LayerQuant,
    block_fake_quant,
    build_quantizer,
    concat_splits,
    e4m3_scale,
    fake_quant,
    group_of,
    int_range,
    load_act_quant,
    qparams,
    quantizable_modules,
    quantizer_digest,
    save_act_quant,
    token_fake_quant,
)
from common.quant.bops import bops, count_macs, unet_macs
from common.quant.calibrate import calibration_timesteps, collect_ranges

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


@pytest.fixture(scope="module")
def unet():
    """(config, smoke-sized U-Net with random weights, its schedule)."""
    cfg = load_config(SMOKE)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    return cfg, model, NoiseSchedule.from_config(cfg.diffusion)


# ----------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("symmetric", [False, True])
def test_enough_bits_reproduce_the_input_and_fewer_bits_err_by_at_most_half_a_step(symmetric):
    # Seeded: unseeded, about one draw in three failed at 16 bits, where float32 rounding of x / scale + zp
    # (codes up to 65535) can exceed half a step by more than the 1e-5 allowed below.
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    lo, hi = x.min(), x.max()
    for bits, tol in ((16, 1e-3), (8, None), (4, None)):
        scale, zp = qparams(lo, hi, bits, symmetric)
        xq = fake_quant(x, scale, zp, *int_range(bits, symmetric))
        err = (xq - x).abs().max()
        assert err <= scale / 2 * (1 + 1e-5)  # round to nearest inside the range
        if tol:
            assert err < tol
    assert torch.allclose(token_fake_quant(x, 16, symmetric), x, atol=1e-3)
    # zero is exact (zero padding, ReLU zeros) and values outside the range clamp to its ends
    scale, zp = qparams(torch.tensor(-1.0), torch.tensor(3.0), 4, symmetric)
    qmin, qmax = int_range(4, symmetric)
    assert fake_quant(torch.zeros(3), scale, zp, qmin, qmax).abs().max() == 0
    assert fake_quant(torch.tensor([100.0]), scale, zp, qmin, qmax).item() == pytest.approx(
        float((qmax - zp) * scale))


@pytest.mark.parametrize("symmetric", [False, True])
def test_bits_per_timestep_group_quantize_each_sample_at_its_groups_bits(tmp_path, symmetric):
    """A LayerQuant with ``group_bits``: each sample is quantized exactly as a one-group quantizer at its group's
    bits would (per tensor and per token), and the file keeps the widths (older files: none)."""
    ranges = torch.tensor([[[-1.0, 2.0]], [[-0.5, 3.0]], [[-2.0, 1.0]]])
    gen = torch.Generator().manual_seed(0)
    group = torch.tensor([0, 1, 2, 2, 1, 0])
    for granularity, x in (("tensor", torch.randn(6, 4, 5, 5, generator=gen)),
                           ("token", torch.randn(6, 7, 16, generator=gen))):
        lq = LayerQuant.from_ranges(ranges, [3, 8, 4], symmetric, granularity)
        assert lq.bits == 8 and lq.group_bits == (3, 8, 4)
        y = lq.apply(x, group)
        for i, g in enumerate(group.tolist()):
            one = LayerQuant.from_ranges(ranges[g:g + 1], [3, 8, 4][g], symmetric, granularity)
            assert torch.equal(y[i:i + 1], one.apply(x[i:i + 1], torch.tensor([0]))), (granularity, i)
    q = ActQuantizer({"a": LayerQuant.from_ranges(ranges, [3, 8, 4], symmetric),
                      "b": LayerQuant.from_ranges(ranges, 6, symmetric)}, 3, 1000)
    save_act_quant(q, str(tmp_path / "q.safetensors"), {})
    back, _ = load_act_quant(str(tmp_path / "q.safetensors"))
    assert back.layers["a"].group_bits == (3, 8, 4) and back.layers["b"].group_bits is None
    assert quantizer_digest(back) == quantizer_digest(q)
    with pytest.raises(ValueError, match="2 bit widths for 3 timestep groups"):
        LayerQuant.from_ranges(ranges, [4, 4], symmetric)


def test_split_ranges_quantize_each_part_with_its_own_scale():
    x = torch.cat([torch.rand(2, 3, 4, 4) * 0.01, torch.rand(2, 5, 4, 4) * 100], dim=1)
    ranges = torch.tensor([[[0.0, 0.01], [0.0, 100.0]]])  # (G=1, P=2, 2)
    q = LayerQuant.from_ranges(ranges, 8, split=3)
    xq = q.apply(x, torch.zeros(2, dtype=torch.long))
    assert (xq[:, :3] - x[:, :3]).abs().max() <= 0.01 / 255 / 2 * 1.0001  # not the 100/255 of one shared range
    assert (xq[:, 3:] - x[:, 3:]).abs().max() <= 100 / 255 / 2 * 1.0001


def test_e4m3_block_scales_keep_three_mantissa_bits_below_the_largest():
    """Block scales are stored as float8 e4m3 times one fp32 scale per sample: within e4m3's normal range (2^-6 of
    its largest value and up) each is off by at most half a mantissa step, 2^-4 relative; none is ever zero."""
    gen = torch.Generator().manual_seed(0)
    s = torch.exp(torch.empty(3, 200).uniform_(-7, 0, generator=gen))  # ratios to the largest down to ~1e-3
    s[:, 0] = 1.0
    q = e4m3_scale(s * torch.tensor([[1e-3], [1.0], [50.0]]))
    rel = (q / (s * torch.tensor([[1e-3], [1.0], [50.0]])) - 1).abs()
    assert rel.max() <= 2.0 ** -4 * (1 + 1e-6)
    assert (e4m3_scale(torch.tensor([[1.0, 0.0]])) > 0).all()


@pytest.mark.parametrize("symmetric", [False, True])
def test_block_ranges_keep_an_outlier_channel_in_its_own_block(symmetric):
    """Per block of channels at one token / pixel: at most 2^b values per block, each block's error bounded by
    its own range (e4m3 scale rounding and zero-point rounding can clip one end by up to 1.5 steps), so one outlier
    channel costs only its own block; conv inputs block along dim 1, exactly as the channel-last tensor would;
    channels that do not fill a block are padded, not dropped."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=gen) * 0.01
    x[..., 0] = 100.0  # one outlier channel in block 0
    y = block_fake_quant(x, 4, symmetric, 16, -1)
    assert y.shape == x.shape
    qmin, qmax = int_range(4, symmetric)
    xb = torch.nn.functional.pad(x, (0, 8)).unflatten(-1, (3, 16))
    yb = torch.nn.functional.pad(y, (0, 8)).unflatten(-1, (3, 16))
    lo, hi = xb.amin(-1).clamp(max=0), xb.amax(-1).clamp(min=0)
    step = (torch.maximum(lo.abs(), hi) / qmax) if symmetric else (hi - lo) / (qmax - qmin)
    assert ((yb - xb).abs().amax(-1) <= 1.5 * step + 1e-7).all()
    small = (y - x)[..., 16:].abs().max()  # per token the outlier's step (100 / 15) rounds them all to 0
    assert small < 0.01 and token_fake_quant(x, 4, symmetric)[..., 16:].sub(x[..., 16:]).abs().max() > 4 * small
    assert all(len(v.unique()) <= 2 ** 4 for v in yb.reshape(-1, 16))
    conv = torch.randn(2, 24, 3, 3, generator=gen)
    assert torch.equal(block_fake_quant(conv, 4, symmetric, 8, 1),
                       block_fake_quant(conv.movedim(1, -1), 4, symmetric, 8, -1).movedim(-1, 1))


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_dynamic_quantizers_pass_gradients_straight_through_and_infer_bit_for_bit(granularity):
    """Trained through (distillation, finetuning), a dynamic quantizer's gradient is the identity (rounding has
    none: only each block's / row's min and max would get any); outside autograd its output is the quantizer's
    own, bit for bit; one inf / NaN breaks only its own block, and half-precision inputs stay finite."""
    lq = LayerQuant(4, False, granularity, block=8 if granularity == "block" else None)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    group = torch.zeros(2, dtype=torch.long)
    y = lq.apply(x, group, -1)
    w = torch.randn(y.shape, generator=g)
    (y * w).sum().backward()
    assert torch.equal(x.grad, w)
    with torch.no_grad():
        plain = (block_fake_quant(x, 4, False, 8, -1) if granularity == "block" else token_fake_quant(x, 4, False))
        assert torch.equal(lq.apply(x, group, -1), plain) and torch.equal(y.detach(), plain)
    if granularity == "block":
        bad = x.detach().clone()
        bad[0, 0, 3] = float("inf")
        out = lq.apply(bad, group, -1)
        assert torch.isfinite(out[1]).all() and torch.isfinite(out[0, 1:]).all()  # only the inf's block is lost
        assert torch.isfinite(out[0, 0, 8:]).all()
        half = lq.apply(torch.cat([x.detach()[:, :, :8] * 0, x.detach()[:, :, 8:]], -1).half(), group, -1)
        assert half.dtype == torch.float16 and torch.isfinite(half).all()


def test_block_quantizers_follow_group_bits_and_round_trip_through_the_file(tmp_path):
    """A block LayerQuant quantizes each sample at its timestep group's bits, the hook finds the channel axis of
    conv and linear inputs, and the file rebuilds it (block size recorded; a block entry without one is refused)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    ranges = torch.zeros(2, 1, 2)  # unused: dynamic
    lq = LayerQuant.from_ranges(ranges, [3, 8], granularity="block", block=8)
    assert lq.block == 8 and lq.scale is None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 4, 4, generator=gen)
    y = lq.apply(x, torch.tensor([0, 1]), dim=1)
    assert torch.equal(y[:1], block_fake_quant(x[:1], 3, False, 8, 1))
    assert torch.equal(y[1:], block_fake_quant(x[1:], 8, False, 8, 1))
    with pytest.raises(ValueError, match="positive block size"):
        LayerQuant.from_ranges(ranges, 4, granularity="block")
    with pytest.raises(ValueError, match="needs the input's channel axis"):  # conv and linear differ: never guessed
        lq.apply(x, torch.tensor([0, 1]))
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.Flatten(2), nn.Linear(4, 4))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, t):
            return self.net(x)

    net = Net()
    q = build_quantizer({"net.0": ranges, "net.2": ranges}, {"net.0": 4, "net.2": 4}, 2, 10, block=2)
    path = str(tmp_path / "q.safetensors")
    save_act_quant(q, path, {})
    back, _ = load_act_quant(path)
    assert {lq.granularity for lq in back.layers.values()} == {"block"} and back.layers["net.0"].block == 2
    assert quantizer_digest(back) == quantizer_digest(q)
    xin = torch.randn(2, 3, 2, 2, generator=gen)
    outs = []
    for quant in (q, back):
        quant.attach(net)
        with torch.no_grad():
            outs.append(net(xin, torch.tensor([1, 7])))
        quant.remove()
    with torch.no_grad():  # conv input blocked along dim 1, linear input along its last dim
        ref = model[2](block_fake_quant(model[1](model[0](block_fake_quant(xin, 4, False, 2, 1))), 4, False, 2, -1))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], ref)
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
    layers = json.loads(meta["act_layers"])
    del layers["net.0"]["block"]
    save_file({}, str(tmp_path / "bad.safetensors"), {**meta, "act_layers": json.dumps(layers)})
    with pytest.raises(ValueError, match="bad.safetensors: net.0 has granularity 'block' block None"):
        load_act_quant(str(tmp_path / "bad.safetensors"))


# ----------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("method", ["minmax", "percentile"])
def test_calibrated_ranges_cover_the_calibration_activations(unet, method):
    cfg, model, schedule = unet
    sampler = DDIMSampler(schedule, 6)
    names, splits = quantizable_modules(model), concat_splits(model)
    ts = calibration_timesteps(sampler, 4)
    assert len(ts) == 4 and ts[0] == sampler.timesteps[0] and ts[-1] == sampler.timesteps[-1]  # the whole chain
    seen, state = {n: [] for n in names}, {}
    mods = dict(model.named_modules())
    spies = [model.register_forward_pre_hook(lambda m, a: state.__setitem__("t", int(a[1][0])))]
    spies += [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append((state["t"], a[0].detach().clone())) if state["t"] in ts else None)
        for n in names]
    try:
        ranges = collect_ranges(model, sampler, names, (1, 32, 32), 6, ts, 2, method, 99.0, splits, seed=5,
                                batch_size=3, progress=False)
    finally:
        for h in spies:
            h.remove()
    T = schedule.timesteps
    outside = total = 0
    for n in names:
        assert ranges[n].shape == (2, 1 if n not in splits else 2, 2)
        for g in range(2):
            for p in range(ranges[n].shape[1]):
                k = splits.get(n)
                vals = torch.cat([(x if k is None else (x[:, :k] if p == 0 else x[:, k:])).flatten()
                                  for t, x in seen[n] if int(group_of(t, 2, T)) == g])
                lo, hi = ranges[n][g, p]
                if method == "minmax":  # exactly the extremes of what was seen
                    assert lo == vals.min() and hi == vals.max()
                else:
                    assert vals.min() <= lo <= hi <= vals.max()
                    outside += int(((vals < lo) | (vals > hi)).sum())
                    total += vals.numel()
    if method == "percentile":
        assert 0 < outside / total < 0.05  # clipped the 1% tails (estimated from a subsample)


def test_mse_ranges_per_input_bits_are_each_inputs_own_search(unet):
    """``mse_bits`` as {name: bits} (A4 on average with least-MSE ranges): each input's range is the one a
    search at its own bits finds, from the same recorded values (the subsample draws do not depend on bits)."""
    cfg, model, schedule = unet
    sampler = DDIMSampler(schedule, 4)
    names = ["shallow_conv", "late_conv"]
    args = (model, sampler, names, (1, 32, 32), 2, sampler.timesteps, 2, "mse")
    kw = dict(seed=3, batch_size=2, progress=False, values_per_call=512)
    mixed = collect_ranges(*args, mse_bits={"shallow_conv": 2, "late_conv": 8}, **kw)
    at2, at8 = collect_ranges(*args, mse_bits=2, **kw), collect_ranges(*args, mse_bits=8, **kw)
    assert torch.equal(mixed["shallow_conv"], at2["shallow_conv"]) and torch.equal(mixed["late_conv"], at8["late_conv"])
    assert not torch.equal(at2["late_conv"], at8["late_conv"])  # the bits matter: 2-bit ranges clip more
    # with act_quant.symmetric the search is for the symmetric quantizer the ranges will feed, and cached apart
    sym = collect_ranges(*args, mse_bits=2, symmetric=True, **kw)
    assert not torch.equal(sym["late_conv"], at2["late_conv"])
    from common.experiments.act_pipeline import range_inputs
    cfg2 = copy.deepcopy(cfg)
    cfg2.act_quant.symmetric = True
    assert range_inputs(cfg2, "single", "sha", 4) != range_inputs(cfg, "single", "sha", 4)
    assert range_inputs(cfg2, "single", "sha") == range_inputs(cfg, "single", "sha")  # min-max: the same ranges


def test_a_timestep_group_without_calibration_data_is_an_error(unet):
    cfg, model, schedule = unet
    sampler = DDIMSampler(schedule, 2)  # t = 99 and 0 only
    with pytest.raises(ValueError, match="timestep groups"):
        collect_ranges(model, sampler, ["late_conv"], (1, 32, 32), 2, sampler.timesteps, 3, seed=1, batch_size=2,
                       progress=False)


def test_concat_splits_point_at_the_skip_part(unet):
    """late_conv's input channels from the split on are exactly the skip Layer1 hands over."""
    _, model, _ = unet
    splits = concat_splits(model)
    assert set(splits) == {"Layer5.ResBlock1.conv1", "Layer6.ResBlock1.conv1", "late_conv"}
    got = {}
    hooks = [model.Layer1.ResBlock2.register_forward_hook(lambda m, a, out: got.__setitem__("skip", out)),
             model.late_conv.register_forward_pre_hook(lambda m, a: got.__setitem__("in", a[0]))]
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32), torch.tensor([3, 40]))
    for h in hooks:
        h.remove()
    assert torch.equal(got["in"][:, splits["late_conv"]:], got["skip"])


# ----------------------------------------------------------------------------- timestep groups
def test_group_ranges_follow_the_timestep_being_sampled(unet):
    cfg, model, schedule = unet
    T, G, name = schedule.timesteps, 4, "Layer3.ResBlock1.conv1"
    # very different ranges per group: quantizing with the wrong group's scale would show
    ranges = {name: torch.tensor([[[-s, s]] for s in (0.5, 2.0, 8.0, 32.0)])}
    q = build_quantizer(ranges, {name: 4}, G, T).attach(model)
    calls = []
    mod = model.get_submodule(name)
    before = mod.register_forward_pre_hook(lambda m, a: calls.append([a[0].clone()]), prepend=True)
    after = mod.register_forward_pre_hook(lambda m, a: calls[-1].append(a[0].clone()))  # runs after q's hook
    root = model.register_forward_pre_hook(lambda m, a: calls.append(int(a[1][0])), prepend=True)
    try:
        sample(model, DDIMSampler(schedule, 8), 3, (1, 32, 32), 0, 3, progress=False)
    finally:
        for h in (before, after, root):
            h.remove()
        q.remove()
    steps = [(calls[i], *calls[i + 1]) for i in range(0, len(calls), 2)]
    assert {t * G // T for t, _, _ in steps} == set(range(G))  # the chain visits every group
    lq = q.layers[name]
    for t, raw, quantized in steps:
        g = t * G // T
        expect = fake_quant(raw, lq.scale[g, 0], lq.zero_point[g, 0], *int_range(4, False))
        assert torch.equal(quantized, expect)
        wrong = fake_quant(raw, lq.scale[(g + 1) % G, 0], lq.zero_point[(g + 1) % G, 0], *int_range(4, False))
        assert not torch.equal(quantized, wrong)
    # a batch of mixed timesteps: each sample uses its own group's parameters
    x, t = torch.randn(4, 1, 32, 32), torch.tensor([5, 30, 60, 99])
    assert group_of(t, G, T).tolist() == [0, 1, 2, 3]
    seen = {}
    q.attach(model)
    h = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("q", a[0]))
    hr = mod.register_forward_pre_hook(lambda m, a: seen.__setitem__("raw", a[0]), prepend=True)
    with torch.no_grad():
        model(x, t)
    h.remove(), hr.remove(), q.remove()
    for b in range(4):
        assert torch.equal(seen["q"][b], fake_quant(seen["raw"][b], lq.scale[b, 0], lq.zero_point[b, 0], 0, 15))


def test_softmax_quantization_and_detach(unet):
    _, model, _ = unet
    probs = []
    h = model.Layer2.attention_layer.softmax.register_forward_hook(lambda m, a, out: probs.append(out))
    q = ActQuantizer({}, 1, 100, softmax_bits=2).attach(model)
    assert not model.Layer2.attention_layer.fused
    with torch.no_grad():
        model(torch.randn(1, 1, 32, 32), torch.tensor([10]))
    q.remove()
    h.remove()
    assert model.Layer2.attention_layer.fused  # restored
    assert set(torch.unique(probs[-1] * 3).round().tolist()) <= {0.0, 1.0, 2.0, 3.0}


# ----------------------------------------------------------------------------- file
def test_act_quant_file_rebuilds_the_same_quantized_model(unet, tmp_path):
    cfg, model, _ = unet
    names = quantizable_modules(model)
    g = torch.Generator().manual_seed(0)
    ranges = {n: torch.sort(torch.randn(3, 2 if n in concat_splits(model) else 1, 2, generator=g), -1)[0]
              for n in names}
    bits = {n: [4, 6, 8, None][i % 4] for i, n in enumerate(names)}
    bits.update({"late_conv": 6, "Layer2.attention_layer.proj1": 8})  # a split input and a per-token one
    q = build_quantizer(ranges, bits, 3, 100, symmetric=False, token_layers={"Layer2.attention_layer.proj1"},
                        splits=concat_splits(model))
    path = str(tmp_path / "act_quant.safetensors")
    save_act_quant(q, path, {"note": "test"})
    loaded, prov = load_act_quant(path)
    assert prov == {"note": "test"} and loaded.layers["Layer2.attention_layer.proj1"].granularity == "token"
    late = loaded.layers["late_conv"]
    assert late.scale.shape == (3, 2) and late.zero_point.dtype == torch.int32
    assert late.split == 24  # smoke: Layer6 hands over 24 channels, the Layer1 skip the 8 after them
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10, 90])
    outs = []
    for quant in (q, loaded):
        m = copy.deepcopy(model)
        quant.attach(m)
        with torch.no_grad():
            outs.append(m(x, t))
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        assert not torch.equal(outs[0], model(x, t))  # the quantizers did act
    from safetensors.torch import save_file

    other = str(tmp_path / "other.safetensors")  # e.g. a ranges cache: a safetensors file of another kind
    save_file({"late_conv": torch.zeros(1, 2, 2)}, other)
    with pytest.raises(ValueError, match="other.safetensors: not a LAQFI activation-quantization file"):
        load_act_quant(other)


# ----------------------------------------------------------------------------- activation Fisher
class SharedInput(nn.Module):
    """Two convs read the same tensor; only one of them reaches the output."""

    def __init__(self):
        super().__init__()
        self.used, self.dead = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x, t):
        return self.head(torch.relu(self.used(x))) + 0.0 * self.dead(x)


def _candidates(model, names, G, bits=(4, 8)):
    ranges = {n: torch.tensor([[[-3.0, 3.0]]] * G) for n in names}
    return {n: {b: LayerQuant.from_ranges(ranges[n], b) for b in bits} for n in names}


def test_activation_fisher_is_zero_for_an_input_that_does_not_reach_the_output():
    torch.manual_seed(0)
    model, schedule = SharedInput().eval(), NoiseSchedule(100, 1e-4, 0.02)
    x_pool = torch.rand(16, 1, 8, 8) * 2 - 1
    art = activation_importance(model, schedule, x_pool, _candidates(model, ["used", "dead", "head"], 2), 2, 8, 4,
                                seed=0, progress=False)
    assert all(v == 0.0 for v in art["fisher"]["dead"].values())  # its own path only, though `used` shares x
    assert all(v > 0 for v in art["fisher"]["used"].values()) and all(v > 0 for v in art["mse"]["dead"].values())
    assert art["fisher"]["used"][4] > art["fisher"]["used"][8]  # coarser quantizer, larger estimate


def test_activation_fisher_matches_a_per_sample_loop():
    """1/2 E_n[sum_j (dL_n/da_nj)^2 (a_nj - Q(a_nj))^2] against one autograd call per sample."""
    torch.manual_seed(1)
    model, schedule = SharedInput().eval(), NoiseSchedule(100, 1e-4, 0.02)
    x_pool = torch.rand(16, 1, 8, 8) * 2 - 1
    cands = _candidates(model, ["head"], 2, bits=(4,))
    art = activation_importance(model, schedule, x_pool, cands, 2, 6, 4, seed=3, progress=False)
    from common.importance.fisher import draw_samples

    x0, t, eps = draw_samples(x_pool, 6, 100, 3)
    total = 0.0
    for i in range(6):
        h = torch.relu(model.used(schedule.q_sample(x0[i:i + 1], t[i:i + 1], eps[i:i + 1]))).detach().requires_grad_()
        loss = (model.head(h) - eps[i:i + 1]).pow(2).mean()
        (g,) = torch.autograd.grad(loss, h)
        dq = h.detach() - cands["head"][4].apply(h.detach(), group_of(t[i:i + 1], 2, 100))
        total += float((g.pow(2) * dq.pow(2)).sum())
    assert art["fisher"]["head"][4] == pytest.approx(0.5 * total / 6, rel=1e-5)


def test_activation_fisher_on_the_unet_sees_a_dead_branch(unet):
    """With Layer6's attention output projection zeroed, nothing upstream of it reaches eps_theta except the
    Layer1 skip into late_conv: exactly those inputs have zero activation Fisher."""
    cfg, model, schedule = unet
    dead = copy.deepcopy(model)
    with torch.no_grad():
        dead.Layer6.attention_layer.proj2.weight.zero_()
    names = ["Layer1.ResBlock1.conv1", "late_conv", "Layer1.conv", "Layer3.ResBlock1.conv1",
             "Layer6.ResBlock1.conv1", "Layer6.attention_layer.proj1", "Layer6.attention_layer.proj2",
             "Layer6.ResBlock2.conv1"]
    art = activation_importance(dead, schedule, torch.rand(8, 1, 32, 32) * 2 - 1, _candidates(dead, names, 1, (4,)),
                                1, 4, 4, seed=0, progress=False)
    alive = {"Layer1.ResBlock1.conv1", "late_conv", "Layer6.ResBlock2.conv1"}
    for n in names:
        assert (art["fisher"][n][4] > 0) == (n in alive), n


def test_activation_fisher_of_an_input_made_of_constants_is_measured():
    """The time MLP's first Linear reads rows of the fixed sinusoidal table, which need no gradient; its
    input still reaches eps_theta, so its activation Fisher must be positive (not skipped, not an error)."""
    cfg = load_config(os.path.join(ROOT, "configs", "smoke.yaml"), ["model.time_embedding=mlp"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    names = ["time_mlp.0", "Layer1.ResBlock1.conv1"]
    art = activation_importance(model, NoiseSchedule.from_config(cfg.diffusion), torch.rand(8, 1, 32, 32) * 2 - 1,
                                _candidates(model, names, 1, (4,)), 1, 4, 4, seed=0, progress=False)
    assert all(art["fisher"][n][4] > 0 for n in names)


# ----------------------------------------------------------------------------- BOPs
class Known(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)  # 8x8 -> 8x8
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)  # -> 4x4
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)  # -> 8x8
        self.lin = nn.Linear(4, 12)

    def forward(self, x, t):
        h = self.up(self.down(self.conv(x)))
        return self.lin(h.flatten(2).transpose(1, 2))  # (B, 64 tokens, 4) -> (B, 64, 12)


def test_bops_of_a_known_model_are_exact(unet):
    macs = count_macs(Known(), (torch.zeros(3, 1, 8, 8), None))
    assert macs == {"conv": 4 * 8 * 8 * 1 * 9, "down": 8 * 4 * 4 * 4 * 9, "up": 8 * 4 * 4 * 4 * 16, "lin": 64 * 4 * 12}
    w, a = {"conv": 8, "down": 4, "up": 4, "lin": 8}, {"conv": 8, "down": 6, "up": None, "lin": 4}
    assert bops(macs, w, a) == 2304 * 64 + 4608 * 24 + 8192 * 4 * 32 + 3072 * 32
    # and every U-Net module agrees with torch's own FLOP counter (2 FLOPs per MAC)
    from torch.utils.flop_counter import FlopCounterMode

    _, model, _ = unet
    macs = unet_macs(model, (1, 32, 32))
    with FlopCounterMode(display=False, depth=None) as fc:
        model(torch.zeros(1, 1, 32, 32), torch.zeros(1, dtype=torch.long))
    counts = fc.get_flop_counts()
    assert set(macs) == set(quantizable_modules(model))
    for n, m in macs.items():
        assert sum(counts[f"UNet.{n}"].values()) == 2 * m, n


def test_layer_table_kept_inputs_and_stored_bits(unet):
    """Kept first/last conv: fp32 weights and keep_bits inputs; the bits the allocator counts are the bits
    quantize.py stores."""
    from common.experiments.act_pipeline import layer_table
    from common.quant.allocate import uniform_wa_choice
    from common.quant.formats import Assignment, quantize_model, size_report

    _, model, _ = unet
    cfg = load_config(SMOKE, ["act_quant.keep_bits=8"])
    names = quantizable_modules(model)
    eligible = {f"{n}.weight" for n in names if n not in ("shallow_conv", "output_conv")}
    layers, fixed, total = layer_table(cfg, model, unet_macs(model, (1, 32, 32)), eligible)
    assert layers["shallow_conv"]["a"] == {8: 0.0} and list(layers["output_conv"]["w"]) == ["fp32"]
    assert set(layers["late_conv"]["w"]) == {"int8", "int4"} and set(layers["late_conv"]["a"]) == {16, 8, 6, 4}
    choice = uniform_wa_choice(layers, 4, 6)
    assert choice["shallow_conv"] == ("fp32", 8) and choice["late_conv"] == ("int4", 6)
    _, stored = quantize_model(model, {f"{n}.weight": Assignment(f) for n, (f, _) in choice.items() if f != "fp32"})
    counted = fixed + sum(layers[n]["w"][f][1] for n, (f, _) in choice.items())
    assert size_report(stored)["analytic_bytes"] * 8 == counted


@pytest.mark.parametrize("keep", [None, 8])
def test_every_uniform_quantizer_puts_the_ends_at_keep_bits(unet, keep):
    """lowbit's activations and w4a4's ablation rows left the first / last conv's inputs float under
    act_quant.keep_bits, where make actquant, the finetune student and w4a4's average study quantize them."""
    from common.experiments import lowbit
    from common.experiments.act_pipeline import act_layout, input_bits

    _, model, _ = unet
    cfg = load_config(SMOKE, [f"act_quant.keep_bits={keep or 'null'}"])
    names, kept, _, _ = act_layout(cfg, model)
    bits = input_bits(cfg, names, kept, 4)
    assert kept and {n: bits.get(n) for n in kept} == dict.fromkeys(kept, keep)
    assert {bits[n] for n in names if n not in kept} == {4} and input_bits(cfg, names, kept, None) == {}
    ranges = {b: _random_ranges(model, 1, seed=b) for b in lowbit.range_bits(cfg, [4])}  # least-MSE: per bits
    assert list(ranges) == ([4, 8] if keep else [4])
    q = lowbit.activation_quantizer(cfg, model, 4, ranges)
    assert {n: lq.bits for n, lq in q.layers.items()} == bits
    for n, lq in q.layers.items():  # each input with the ranges fitted for its own bits
        want = LayerQuant.from_ranges(ranges[bits[n]][n], bits[n], cfg.act_quant.symmetric, lq.granularity,
                                      lq.split)
        assert torch.equal(lq.scale, want.scale), n


def test_a_rank_that_built_another_variant_refuses_to_evaluate_it(unet, monkeypatch):
    """Ranks that evaluate one variant together (w4a4 under torchrun) compare its weights_id with rank 0's: a GPU
    backward or SVD that differs in the last bits could otherwise give a rank another plan, whose samples would
    be pooled with rank 0's under rank 0's files."""
    from common.core import distributed
    from common.experiments import act_pipeline

    _, model, _ = unet
    cfg = load_config(SMOKE)
    q = act_pipeline.act_quantizer(cfg, model, {}, {}, "single")
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: "0" * 64)  # rank 0 built something else
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    with pytest.raises(RuntimeError, match="rank 1 built other weights"):
        act_pipeline.save_and_evaluate(cfg, "v", model, {}, q, {}, {}, {}, "cpu")


def test_the_uniform_plan_keeps_the_size_part_of_a_combined_budget(unet):
    """'W8A8&20%': both parts must hold (allocate_wa enforces both for the other plans); the uniform plan used to
    drop the size part and was tabulated under a budget it broke."""
    from common.experiments.act_pipeline import choose
    from common.quant.allocate import InfeasibleBudgetError

    _, model, _ = unet
    cfg = load_config(SMOKE)
    macs = unet_macs(model, (1, 32, 32))
    choice, info = choose(cfg, "uniform", "W8A8&90%", model, macs, None, None, None, "cpu")  # 8 bits fit 90%
    assert info["avg_bits"] < 0.9 * 32
    with pytest.raises(InfeasibleBudgetError, match="above the size part '20%'"):
        choose(cfg, "uniform", "W8A8&20%", model, macs, None, None, None, "cpu")


def _random_ranges(model, groups, seed=0):
    """(G, P, 2) ranges with lo < 0 < hi for every quantizable module (two parts for a skip concatenation)."""
    g = torch.Generator().manual_seed(seed)
    splits = concat_splits(model)
    out = {}
    for n in quantizable_modules(model):
        lo = -torch.rand(groups, 2 if n in splits else 1, 1, generator=g) * 3
        out[n] = torch.cat([lo, torch.rand(groups, lo.shape[1], 1, generator=g) * 4 + 0.1], dim=-1)
    return out


@pytest.mark.parametrize("overrides", [[], ["act_quant.per_token_attention=true"], ["act_quant.split_concat=false"],
                                       ["act_quant.symmetric=true", "act_quant.softmax_bits=8"],
                                       ["act_quant.keep_bits=8"]])
def test_one_activation_quantizer_builder_for_lowbit_actquant_and_finetune(unet, overrides):
    """``act_pipeline.input_quants`` replaced three hand-written builders. The code each had before (copied here)
    gives the same ``act_quant.safetensors`` content (``quantizer_digest``: metadata and tensors) through the new one:
    lowbit's quantizer, the W/A pipeline's candidates and chosen quantizer, and the finetuning student's, which
    before the fold dropped the per-token attention quantizers (so that case is compared with the fixed rule)."""
    from common.experiments import lowbit
    from common.experiments.act_pipeline import act_layout, act_quantizer, candidates, mode_groups
    from common.experiments.finetune import Student, finetune_config
    from common.quant.activations import quantizer_digest

    _, model, _ = unet
    cfg = lowbit.lowbit_config(load_config(SMOKE, overrides))
    aq = cfg.act_quant
    groups = mode_groups(cfg, cfg.lowbit.range_mode)
    ranges = _random_ranges(model, groups)
    names, kept, splits, token = act_layout(cfg, model)

    def old(layers, mode_groups_=groups):  # the builders' shared shape before the fold
        return ActQuantizer(layers, mode_groups_, cfg.diffusion.timesteps, aq.softmax_bits)

    def lq(n, b):
        return LayerQuant.from_ranges(ranges[n], b, aq.symmetric, "token" if n in token else "tensor", splits.get(n))

    # lowbit.activation_quantizer (since 2026-12-07 with the ends at keep_bits where that is set)
    want = old({n: lq(n, aq.keep_bits if n in kept else 6) for n in names if aq.keep_bits or n not in kept})
    by_bits = dict.fromkeys(lowbit.range_bits(cfg, [6]), ranges)  # min-max: one calibration for all bits
    assert quantizer_digest(lowbit.activation_quantizer(cfg, model, 6, by_bits)) == quantizer_digest(want)
    assert lowbit.activation_quantizer(cfg, model, None, by_bits).layers == {}
    # act_pipeline.candidates and the quantizer of a chosen W/A plan
    for allocatable in (True, False):
        got = candidates(cfg, model, ranges, allocatable)
        opts = {n: ([aq.keep_bits] if aq.keep_bits else []) if n in kept else aq.a_bits for n in names
                if not (n in kept and allocatable)}
        assert list(got) == list(opts) and all(list(got[n]) == list(b) for n, b in opts.items())
        for n, bs in opts.items():
            for b in bs:
                assert quantizer_digest(old({n: got[n][b]})) == quantizer_digest(old({n: lq(n, b)})), (n, b)
    choice = {n: (None, aq.keep_bits if n in kept else aq.a_bits[i % len(aq.a_bits)]) for i, n in enumerate(names)}
    quants = candidates(cfg, model, ranges, allocatable=False)
    want = old({n: quants[n][b] for n, (_, b) in choice.items() if b is not None})
    got = act_quantizer(cfg, model, ranges, {n: b for n, (_, b) in choice.items()}, cfg.lowbit.range_mode)
    assert quantizer_digest(got) == quantizer_digest(want)
    # the finetuning student: untrained LSQ steps export the calibrated scales, per-token inputs as they are (and,
    # since 2026-12-06, the ends at keep_bits where that is set, as the W/A pipeline's choice above)
    c = finetune_config(cfg)
    student = Student(c, model, 4, 6, ranges, "ste")
    _, q = student.export(model)
    bits = {n: aq.keep_bits if n in kept else 6 for n in names}
    want = old({n: lq(n, b) for n, b in bits.items() if b is not None}, mode_groups(c, c.finetune.range_mode))
    assert quantizer_digest(q) == quantizer_digest(want)
