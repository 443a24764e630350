"""common.quant.backends, common.evaluation.generate, sample.py: each backend on the smoke model vs dequant under
the same noise."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.core.config import load_config
from common.diffusion.samplers import build_sampler, sample
from common.diffusion.schedule import NoiseSchedule
from common.quant import backends, int8_sites
from common.quant.container import QUANTIZED_FILE, save_quantized
from common.quant.eligibility import eligible_names
from common.quant.formats import Assignment, _from_channel_first, quantize_model, unpack_int4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
SHAPE = (1, 32, 32)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def mixed(tiny_model_fisher):
    """Smoke U-Net quantized with a plan touching every case: int8 and int4 convs and linears, an fp16
    tensor, an element-masked int8 tensor and an int8 ConvTranspose2d."""
    cfg, model, _ = tiny_model_fisher
    return _quantized_mixed(cfg, model, "Layer2.attention_layer.proj1", "Layer3.ResBlock1.conv2",
                            "Layer3.ResBlock2.conv1")


def _quantized_mixed(cfg, model, int4_attention, fp16, masked):
    """(cfg, the model quantized int8 but for an int4 conv (Layer1's first) and int4 attention projection, an
    fp16 and an element-masked int8 tensor, its sampler, its samples)."""
    plan = {n: Assignment("int8") for n in eligible_names(model, "poster")}
    plan["Layer1.ResBlock1.conv1.weight"] = Assignment("int4")
    plan[f"{int4_attention}.weight"] = Assignment("int4")
    plan[f"{fp16}.weight"] = Assignment("fp16")
    w = dict(model.named_parameters())[f"{masked}.weight"]
    plan[f"{masked}.weight"] = Assignment("int8", torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    qmodel, stored = quantize_model(model, plan)
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    ref = sample(qmodel.eval(), sampler, 8, SHAPE, 0, 8, progress=False)
    return cfg, qmodel.eval().requires_grad_(False), stored, sampler, ref


def test_dequant_is_the_reference(mixed):
    _, qmodel, stored, sampler, ref = mixed
    r = backends.prepare(qmodel, stored, "dequant")
    assert torch.equal(sample(r, sampler, 8, SHAPE, 0, 8, progress=False), ref)
    assert r.resident_bytes == backends.module_bytes(qmodel)
    assert r.precision["Layer1.ResBlock1.conv1.weight"] == "fp32 (int4 values)"
    assert r.precision["Layer3.ResBlock2.conv1.weight"] == "fp32 (int8 masked values)"


def test_bf16_runs_bf16_and_stays_close(mixed):
    _, qmodel, stored, sampler, ref = mixed
    r = backends.prepare(qmodel, stored, "bf16", warmup_shape=(2, *SHAPE))
    assert all(p.dtype == torch.bfloat16 for p in r.fn.parameters())
    assert r.resident_bytes * 2 == backends.module_bytes(qmodel)  # every weight and buffer at half the bytes
    out = sample(r, sampler, 8, SHAPE, 0, 8, progress=False)
    assert out.dtype == torch.float32 and 0 < rel_err(out, ref) < 0.02
    assert r.precision["Layer3.ResBlock1.conv2.weight"] == "bf16 (rounded from fp16)"
    assert r.precision["output_conv.bias"] == "bf16 (rounded from fp32)"


def test_fp16_needs_cuda_and_unknown_backend(mixed):
    _, qmodel, stored, _, _ = mixed
    with pytest.raises(ValueError, match="needs a CUDA device.*bf16"):
        backends.prepare(qmodel, stored, "fp16", device="cpu")
    with pytest.raises(ValueError, match="unknown backend 'int4'.*dequant, bf16, fp16, int8"):
        backends.prepare(qmodel, stored, "int4")
    with pytest.raises(ValueError, match="calibration"):
        backends.prepare(qmodel, stored, "int8")


def test_int8_plan_says_what_cannot_run_int8(mixed):
    _, qmodel, stored, _, _ = mixed
    plan = backends.int8_plan(qmodel, stored)
    assert "Layer1.ResBlock1.conv1" in plan.scales and "Layer2.attention_layer.proj1" in plan.scales  # int4
    assert "Layer3.ResBlock1.conv2" not in plan.scales  # fp16 stays fp16 values, fp32 compute
    assert "mask" in plan.kept["Layer3.ResBlock2.conv1.weight"]
    assert plan.subpixel == ["Layer4.conv", "Layer5.conv", "Layer6.conv"]  # the up-samplers, as 4 convs each
    assert "Layer4.conv.phases.3" in plan.scales and "Layer4.conv" not in plan.scales
    assert backends.int8_plan(qmodel, None).scales == {}
    # an up-sampler carrying a rotation or a low-rank branch (hooks of its own) is not rewritten without them
    import copy

    from common.quant import lowrank, rotation

    other = copy.deepcopy(qmodel)
    rotation.attach(other, {"Layer4.conv": 4})
    lowrank.attach(other, {"Layer5.conv": 2})
    plan = backends.int8_plan(other, stored)
    assert plan.subpixel == ["Layer6.conv"]
    assert "rotation" in plan.kept["Layer4.conv.weight"] and "lowrank" in plan.kept["Layer5.conv.weight"]


@pytest.mark.parametrize("cin, cout, h, w", [(8, 4, 5, 7), (6, 6, 4, 4)])
def test_subpixel_conv_transpose_is_exact(cin, cout, h, w):
    torch.manual_seed(cin)
    ct = torch.nn.ConvTranspose2d(cin, cout, 4, 2, 1)
    x = torch.randn(3, cin, h, w)
    sub = backends.SubPixelConvTranspose(ct)
    torch.testing.assert_close(sub(x), ct(x), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in sub.parameters()) == ct.weight.numel() + 4 * cout  # same weights, 4 bias copies
    assert not backends.SubPixelConvTranspose.fits(torch.nn.ConvTranspose2d(4, 4, 3, 2, 1))


def test_calibration_inputs_span_the_chain(mixed):
    _, qmodel, _, sampler, _ = mixed
    calib = backends.calibration_inputs(qmodel, sampler, 4, SHAPE, 7)
    assert [int(t[0]) for _, t in calib] == sampler.timesteps  # every step of the (3-step) chain
    assert all(x.shape == (4, *SHAPE) for x, _ in calib)
    two = backends.calibration_inputs(qmodel, sampler, 4, SHAPE, 7, steps=2)
    assert [int(t[0]) for _, t in two] == [sampler.timesteps[0], sampler.timesteps[-1]]
    with pytest.raises(ValueError, match="at least 2"):  # one step would be pure noise only (t = T)
        backends.calibration_inputs(qmodel, sampler, 4, SHAPE, 7, steps=1)
    from common.core.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="calib_steps"):
        load_config("configs/default.yaml", ["backend.calib_steps=1"])


@pytest.fixture(scope="module")
def int8_reference(mixed):
    """The converted PT2E graph without torch.compile: int8 numerics, no compilation cost."""
    _, qmodel, stored, sampler, _ = mixed
    calib = backends.calibration_inputs(qmodel, sampler, 8, SHAPE, 1234)
    return backends.prepare(qmodel, stored, "int8", calib=calib, compile_model=False), calib


def _graph_weights(gm):
    """(int8 weight, scale) of every per-channel dequantize in the converted graph."""
    out = []
    for node in gm.graph.nodes:
        if node.target is torch.ops.quantized_decomposed.dequantize_per_channel.default:
            w, s = (backends._attr(gm, a.target) for a in node.args[:2])
            out.append((w, s))
    return out


def test_int8_executes_the_plans_own_codes(mixed, int8_reference):
    _, qmodel, stored, _, _ = mixed
    runner, _ = int8_reference
    got = _graph_weights(runner.fn)
    plan = backends.int8_plan(qmodel, stored)
    assert len(got) == len(plan.scales)
    expected = {}  # module name in the rewritten net -> int8 codes of its weight
    for name, e in stored.items():
        mod_name = name.rpartition(".")[0]
        if name.endswith(".weight") and (mod_name in plan.scales or mod_name in plan.subpixel):
            n, shape = int(np.prod(e["shape"])), e["shape"]
            flat = e["data"] if e["format"] == "int8" else unpack_int4(e["data"], n)
            codes = _from_channel_first(flat.reshape(shape[e["axis"]], -1), shape, e["axis"])  # stored channel-first
            if mod_name in plan.subpixel:
                expected.update({f"{mod_name}.phases.{i}": c for i, c in
                                 enumerate(backends.SubPixelConvTranspose.phase_weights(codes))})
            else:
                expected[mod_name] = codes
    assert set(expected) == set(plan.scales)
    for mod_name, codes in expected.items():
        match = [s for w, s in got if w.shape == codes.shape and torch.equal(w, codes)]
        assert match and torch.equal(match[0], plan.scales[mod_name]), mod_name  # same codes, same scales
    assert runner.precision["Layer1.ResBlock1.conv1.weight"] == "int8 W8A8 (int4 codes, plan scales)"
    assert runner.precision["Layer4.conv.weight"].endswith("as 4 sub-pixel 2x2 convs)")
    assert runner.precision["Layer3.ResBlock2.conv1.weight"].startswith("fp32 (int8 masked values; element mask")
    assert runner.resident_bytes < 0.4 * backends.module_bytes(qmodel)


def test_int8_reference_stays_close_to_dequant(mixed, int8_reference):
    _, _, _, sampler, ref = mixed
    runner, _ = int8_reference
    out = sample(runner, sampler, 8, SHAPE, 0, 8, progress=False)
    assert 0 < rel_err(out, ref) < 0.05
    # batch 1 is padded to the graph's minimum 2: the same image as in a real batch of 2 (the same shape, so the
    # same kernels; batch 8's may differ by an ulp, enough to move an int8 code)
    one = sample(runner, sampler, 1, SHAPE, 0, 8, progress=False)
    assert torch.equal(one, sample(runner, sampler, 2, SHAPE, 0, 2, progress=False)[:1])


def test_percentile_observer_clips_each_steps_outliers_and_covers_every_step():
    obs = backends._percentile_observer()(percentile=99.0, dtype=torch.quint8)
    g = torch.Generator().manual_seed(0)
    small = torch.rand(10_000, generator=g)  # values in [0, 1) at one step ...
    small[0] = 50.0  # ... with one outlier
    obs(small)
    obs(torch.rand(10_000, generator=g) * 4 - 2)  # a later step with a wider range
    lo, hi = float(obs.min_val), float(obs.max_val)
    assert -2.0 < lo < -1.9 and 1.9 < hi < 2.0  # the second step's 1st / 99th percentiles, the outlier clipped
    with pytest.raises(ValueError, match="unknown int8 activation ranges 'mse'.*histogram, percentile"):
        backends._activation_spec(None, "mse", 99.9)


def test_int8_percentile_ranges_run_the_same_codes(mixed, int8_reference):
    """Only the activation observer changes: the same weight codes and scales, samples close to dequant."""
    _, qmodel, stored, sampler, ref = mixed
    reference, calib = int8_reference
    runner = backends.prepare(qmodel, stored, "int8", calib=calib, compile_model=False, int8_ranges="percentile",
                              int8_percentile=99.9)
    assert "activation ranges: percentile 99.9" in runner.notes
    assert "activation ranges: histogram" in reference.notes
    assert [(w.tolist(), s.tolist()) for w, s in _graph_weights(runner.fn)] == [
        (w.tolist(), s.tolist()) for w, s in _graph_weights(reference.fn)]
    out = sample(runner, sampler, 8, SHAPE, 0, 8, progress=False)
    assert 0 < rel_err(out, ref) < 0.05


def test_int8_reduce_range_quantizes_activations_to_7_bits(mixed, int8_reference):
    """``backend.int8_reduce_range``: every activation quantize op of the graph uses codes 0..127 (8-bit: 0..255),
    the weight codes stay those of the plan, and the samples stay close to dequant."""
    _, qmodel, stored, sampler, ref = mixed
    reference, calib = int8_reference
    runner = backends.prepare(qmodel, stored, "int8", calib=calib, compile_model=False, int8_reduce_range=True)
    assert "activation ranges: histogram, 7-bit codes (reduce_range)" in runner.notes

    def act_qmax(gm):
        return {n.args[4] for n in gm.graph.nodes
                if n.target is torch.ops.quantized_decomposed.quantize_per_tensor.default}

    assert act_qmax(runner.fn) == {127} and act_qmax(reference.fn) == {255}
    assert [(w.tolist(), s.tolist()) for w, s in _graph_weights(runner.fn)] == [
        (w.tolist(), s.tolist()) for w, s in _graph_weights(reference.fn)]
    out = sample(runner, sampler, 8, SHAPE, 0, 8, progress=False)
    assert 0 < rel_err(out, ref) < 0.05


def test_int8_reduce_range_auto_follows_vnni():
    """auto: 7-bit codes exactly where the CPU lacks VNNI (its 16-bit pair sums would saturate); explicit values
    win; a bad value in the YAML is refused by the config loader, naming the key."""
    assert backends.resolve_reduce_range("auto", {"vnni": False}) is True
    assert backends.resolve_reduce_range("auto", {"vnni": True}) is False
    assert backends.resolve_reduce_range(False, {"vnni": False}) is False
    assert backends.resolve_reduce_range(True, {"vnni": True}) is True
    with pytest.raises(ValueError, match="int8_reduce_range"):
        load_config("configs/default.yaml", ["backend.int8_reduce_range=sometimes"])


@pytest.fixture(scope="module")
def mixed_two_stages():
    """``mixed``'s cases on a two-stage U-Net (down with a ResBlock conv in int4, up with int4 attention, an
    int8 ConvTranspose2d, an fp16 and an element-masked int8 tensor): a third of the six stages' graph, so
    inductor's cold compile (C++ per kernel) costs a third of theirs."""
    from common.diffusion.model import build_model

    cfg = load_config(SMOKE)
    arch = copy.deepcopy(cfg.model)  # the model alone: the config's stage groups name six stages
    arch.channels, arch.attentions, arch.upscales = [8, 16], [False, True], [False, True]
    torch.manual_seed(0)
    model = build_model(arch, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    assert isinstance(model.Layer2.conv, torch.nn.ConvTranspose2d)  # the int8 transposed conv
    return _quantized_mixed(cfg, model, "Layer2.attention_layer.proj1", "Layer2.ResBlock1.conv2",
                            "Layer1.ResBlock2.conv1")


@pytest.mark.slow
def test_int8_compiled(mixed_two_stages):
    """The one torch.compile test: oneDNN int8 kernels agree with the reference graph, small batches are padded."""
    _, qmodel, stored, sampler, ref = mixed_two_stages
    calib = backends.calibration_inputs(qmodel, sampler, 8, SHAPE, 1234)
    # as the product runs it: 7-bit codes where the CPU has no VNNI (its saturating 16-bit pair sums overflow 8-bit)
    reduce = backends.resolve_reduce_range("auto")
    reference = backends.prepare(qmodel, stored, "int8", calib=calib, compile_model=False, int8_reduce_range=reduce)
    runner = backends.prepare(qmodel, stored, "int8", calib=calib, batch_size=8, warmup_shape=(8, *SHAPE),
                              int8_reduce_range=reduce)
    assert runner.batch_size == 8 and runner.prepare_seconds > 0
    out = sample(runner, sampler, 8, SHAPE, 0, 8, progress=False)
    assert rel_err(out, ref) < 0.05
    assert rel_err(out, sample(reference, sampler, 8, SHAPE, 0, 8, progress=False)) < 0.02
    part = sample(runner, sampler, 5, SHAPE, 0, 8, progress=False)
    torch.testing.assert_close(part, out[:5], rtol=1e-4, atol=1e-4)



def test_int8_mixed_bf16(mixed, int8_reference):
    """int8_bf16: the same int8 codes; attention and the non-fp32 float convolutions in bf16 islands, everything
    between them (the int8 kernels' outputs, norms, the residual stream) fp32: close to int8's samples, not equal.
    An element-masked tensor stays fp32 as on int8: its kept elements are fp32 by the plan's choice."""
    _, qmodel, stored, sampler, ref = mixed
    reference, calib = int8_reference
    runner = backends.prepare(qmodel, stored, "int8_bf16", calib=calib, compile_model=False)
    assert runner.backend == "int8_bf16" and any("bf16 islands" in n for n in runner.notes)
    assert runner.precision["Layer1.ResBlock1.conv1.weight"] == "int8 W8A8 (int4 codes, plan scales)"
    assert runner.precision["Layer3.ResBlock2.conv1.weight"].startswith("fp32 (int8 masked values; element mask")
    assert runner.precision["Layer3.ResBlock2.conv1.bias"] == "fp32 (fp32 values)"  # added after the bf16 conv
    assert runner.precision["shallow_conv.weight"] == "fp32 (fp32 values)"  # the plan's fp32 tensors stay fp32
    assert runner.precision["Layer1.ResBlock1.gnorm1.weight"] == "fp32 (fp32 values)"  # no autocast around norms
    nodes = list(runner.fn.graph.nodes)
    assert sum(n.target is backends._sdpa_bf16 for n in nodes) == 2  # both attention layers
    assert {n.args[1].target for n in nodes if n.target is backends._conv2d_bf16} == {
        "Layer3.ResBlock1.conv2.weight"}  # the fp16 conv; not the masked one
    # the residual stream stays fp32: every float tensor the graph computes is fp32 (under PT2E's
    # int8-mixed-bf16 autocast the int8 kernels' outputs and everything after them were bf16)
    dtypes = set()

    class Dtypes(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                dtypes.add(out.dtype)
            return out

    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        Dtypes(runner.fn).run(x, torch.tensor([3, 17]))
    assert dtypes == {torch.float32}
    out = sample(runner, sampler, 8, SHAPE, 0, 8, progress=False)
    assert out.dtype == torch.float32
    int8 = sample(reference, sampler, 8, SHAPE, 0, 8, progress=False)
    assert 0 < rel_err(out, int8) < 0.05 and rel_err(out, ref) < 0.08


@pytest.fixture(scope="module")
def mixed_mlp_time():
    """``mixed_two_stages`` with the released recipe's MLP time embedding: every ResBlock has a time projection."""
    from common.diffusion.model import build_model

    cfg = load_config(SMOKE)
    arch = copy.deepcopy(cfg.model)
    arch.channels, arch.attentions, arch.upscales, arch.time_embedding = [8, 16], [False, True], [False, True], "mlp"
    torch.manual_seed(0)
    model = build_model(arch, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    _, qmodel, stored, sampler, _ = _quantized_mixed(cfg, model, "Layer2.attention_layer.proj1",
                                                     "Layer2.ResBlock1.time_proj", "Layer1.ResBlock2.conv1")
    return qmodel, stored, backends.calibration_inputs(qmodel, sampler, 4, SHAPE, 1234)


@pytest.mark.parametrize("backend", ["int8", "int8_bf16"])
def test_int8_time_path_fp32_runs_the_time_projections_weight_only_in_fp32(mixed_mlp_time, backend):
    """backend.int8_time_path: fp32: every time-path module the plan stores int8 runs its stored values in fp32
    (no int8 kernel, no activation quantizer, no bf16 island); the rest of the graph as before."""
    qmodel, stored, calib = mixed_mlp_time
    time = {n for n, e in stored.items() if n.endswith(".weight") and qmodel.time_path(n.removesuffix(".weight"))
            and e["format"] != "fp32"}  # the time MLP is fp32 under the poster's rule
    fp16 = "Layer2.ResBlock1.time_proj.weight"  # fp16 values: a bf16 island on int8_bf16 unless kept fp32
    assert len(time) == 4 and all(".time_proj." in n for n in time) and stored[fp16]["format"] == "fp16"
    plain = backends.int8_plan(qmodel, stored)
    plan = backends.int8_plan(qmodel, stored, "fp32")
    int8 = time - {fp16}
    assert plan.fp32 == time and set(plain.scales) - set(plan.scales) == {n.removesuffix(".weight") for n in int8}
    runner = backends.prepare(qmodel, stored, backend, calib=calib, compile_model=False, int8_time_path="fp32")
    assert {runner.precision[n] for n in int8} == {"fp32 (int8 values; time path, one row per image "
                                                   "(backend.int8_time_path: fp32))"}
    assert runner.precision[fp16] == "fp32 (fp16 values; time path, backend.int8_time_path: fp32)"
    if backend == "int8_bf16":  # without the setting the fp16 projection is an island
        islands = backends.prepare(qmodel, stored, backend, calib=calib, compile_model=False)
        assert islands.precision[fp16].startswith("bf16")
    assert any("time path fp32" in n for n in runner.notes)
    assert len(_graph_weights(runner.fn)) == len(plan.scales)  # the rest stays int8 (sub-pixel phases included)
    linear = {n.args[1].target: n.target for n in runner.fn.graph.nodes
              if n.op == "call_function" and len(n.args) > 1 and getattr(n.args[1], "op", None) == "get_attr"}
    assert {linear[n] for n in time} == {torch.ops.aten.linear.default}  # fp32, on the stored values
    for n in time:
        torch.testing.assert_close(backends._attr(runner.fn, n), dict(qmodel.named_parameters())[n], rtol=0, atol=0)


def test_int8_time_path_reaches_the_runner_and_names_its_sample_folder(mixed_mlp_time, monkeypatch):
    """The setting goes from the config through build_runner (sample.py, the bench) to prepare, and sample.py's
    default folder tells the two sides of an A/B apart; a bad value, or a model that cannot name its time
    path, is refused."""
    from common.evaluation import generate

    qmodel, stored, _ = mixed_mlp_time
    cfg = load_config(SMOKE, ["backend.int8_time_path=fp32"])
    seen = {}
    monkeypatch.setattr(backends, "prepare", lambda *a, **k: seen.update(k))
    generate.build_runner(cfg, qmodel, stored, "dequant", "cpu", 2)
    assert seen["int8_time_path"] == "fp32"
    assert generate.int8_settings_tag(cfg, "int8_bf16") == "_tpfp32" and generate.int8_settings_tag(cfg, "bf16") == ""
    assert generate.int8_settings_tag(load_config(SMOKE), "int8") == ""
    with pytest.raises(ValueError, match="int8_time_path"):
        load_config(SMOKE, ["backend.int8_time_path=bf16"])
    with pytest.raises(ValueError, match="valid: int8, fp32"):
        backends.int8_plan(qmodel, stored, "FP32")
    with pytest.raises(ValueError, match="Sequential does not say which modules"):
        backends.int8_plan(torch.nn.Sequential(torch.nn.Linear(2, 2)), {}, "fp32")


@pytest.mark.parametrize("backend", ["int8", "int8_bf16"])
def test_int8_float_inputs_run_those_modules_weight_only_on_their_stored_values(mixed_mlp_time, backend):
    """backend.int8_float_inputs: a named module (or every module under a named prefix) loses its activation
    quantizer and int8 kernel and runs its stored int8 values as a float op (a bf16 island under int8_bf16); the
    rest of the graph keeps its int8 kernels; a name that matches no module is refused, naming the key."""
    qmodel, stored, calib = mixed_mlp_time
    plain = backends.int8_plan(qmodel, stored)
    kept = {n for n in plain.scales if n.startswith("Layer1.ResBlock2.")}
    assert kept  # the fixture stores int8 under that prefix
    plan = backends.int8_plan(qmodel, stored, float_inputs=("Layer1.ResBlock2",))
    assert set(plain.scales) - set(plan.scales) == kept
    assert {plan.kept[f"{n}.weight"] for n in kept} == {"input kept float (backend.int8_float_inputs)"}
    runner = backends.prepare(qmodel, stored, backend, calib=calib, compile_model=False,
                              int8_float_inputs=["Layer1.ResBlock2"])
    want = "bf16" if backend == "int8_bf16" else "fp32"
    assert {runner.precision[f"{n}.weight"].split(" ")[0] for n in kept} == {want}
    assert len(_graph_weights(runner.fn)) == len(plan.scales)
    for n in kept:  # the stored values, as a float weight of the graph (rounded to bf16 only when the op runs)
        torch.testing.assert_close(backends._attr(runner.fn, f"{n}.weight"),
                                   dict(qmodel.named_parameters())[f"{n}.weight"], rtol=0, atol=0)
    assert any("inputs kept float: Layer1.ResBlock2" in n for n in runner.notes)
    with pytest.raises(ValueError, match="int8_float_inputs: 'Layer9' names no module"):
        backends.int8_plan(qmodel, stored, float_inputs=("Layer9",))
    with pytest.raises(ValueError, match="names no module"):  # a prefix must end at a module boundary
        backends.int8_plan(qmodel, stored, float_inputs=("Layer1.ResBlock",))
    cfg = load_config(SMOKE, ["backend.int8_float_inputs=[Layer1.ResBlock2]"])
    from common.evaluation import generate

    tag = generate.int8_settings_tag(cfg, "int8")
    assert tag.startswith("_float1-") and tag != generate.int8_settings_tag(
        load_config(SMOKE, ["backend.int8_float_inputs=[Layer1.ResBlock1]"]), "int8")


def test_without_input_quantizers_is_the_graph_with_those_inputs_float(mixed_mlp_time):
    """The int8-sites study's graph surgery: with every quantized input skipped, the int8 graph computes the
    stored weights' float model (the sub-pixel rewrite only reorders sums); skipping one module's input changes
    the output and leaves the original graph untouched; a module without a quantized input is refused."""
    qmodel, stored, calib = mixed_mlp_time
    gm = backends.prepare(qmodel, stored, "int8", calib=calib, compile_model=False).fn
    sites = int8_sites.activation_sites(gm)
    plan = backends.int8_plan(qmodel, stored)
    assert set(sites) == {n.split(".phases.")[0] for n in plan.scales}  # a ConvTranspose2d once, not per phase
    x, t = torch.randn(3, *SHAPE), torch.tensor([5, 40, 90])
    with torch.no_grad():
        want, int8 = qmodel(x, t), gm(x, t)
        none = int8_sites.without_input_quantizers(gm, sites)(x, t)
        one = int8_sites.without_input_quantizers(gm, sites[:1])(x, t)
    assert rel_err(int8, want) > 1e-4  # the activations' rounding is visible ...
    torch.testing.assert_close(none, want, rtol=1e-4, atol=1e-5)  # ... and gone with every input float
    assert 0 < rel_err(one, int8) and not torch.equal(one, none)
    with torch.no_grad():
        torch.testing.assert_close(gm(x, t), int8, rtol=0, atol=0)  # the surgery worked on a copy
    with pytest.raises(ValueError, match="no quantized input in this int8 graph for \\['Layer9'\\]"):
        int8_sites.without_input_quantizers(gm, ["Layer9"])


def test_the_study_cut_is_close_to_what_int8_float_inputs_runs(mixed_mlp_time):
    """The int8-sites study ranks an input by cutting its quantizer out of one calibration; the setting it
    informs recalibrates with that input float. Both leave the same input float, so their outputs differ only by
    the other inputs' recalibrated ranges: far less than either differs from the all-int8 graph."""
    qmodel, stored, calib = mixed_mlp_time
    gm = backends.prepare(qmodel, stored, "int8", calib=calib, compile_model=False).fn
    site = "Layer2.attention_layer.proj1"
    assert site in int8_sites.activation_sites(gm)
    kept = backends.prepare(qmodel, stored, "int8", calib=calib, compile_model=False, int8_float_inputs=[site]).fn
    x, t = torch.randn(4, *SHAPE), torch.tensor([5, 30, 60, 90])
    with torch.no_grad():
        cut, run, every = int8_sites.without_input_quantizers(gm, [site])(x, t), kept(x, t), gm(x, t)
    assert rel_err(cut, run) < 0.2 * rel_err(every, run)


def test_every_config_names_modules_its_model_has():
    """A config's backend.int8_float_inputs must name modules of the model it builds (the default's four are the
    released U-Net's; the DiT configs keep none); sample.py would refuse it only after calibrating."""
    import glob

    from common.diffusion.model import build_model

    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        cfg = load_config(path)
        if cfg.backend.int8_float_inputs:
            with torch.device("meta"):  # names only: no memory for the poster-scale weights
                model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size)
            backends.float_input_match(model, cfg.backend.int8_float_inputs)


def test_build_runner_refuses_a_bad_name_before_calibrating(mixed_mlp_time, monkeypatch):
    from common.evaluation import generate

    qmodel, stored, _ = mixed_mlp_time
    monkeypatch.setattr(backends, "calibration_inputs", lambda *a, **k: pytest.fail("calibrated first"))
    with pytest.raises(ValueError, match="int8_float_inputs: 'Layer9' names no module"):
        generate.build_runner(load_config(SMOKE, ["backend.int8_float_inputs=[Layer9]"]), qmodel, stored, "int8",
                              "cpu", 2)


# ----------------------------------------------------------------------------- loading and sample.py
def test_load_weights_plain_state_dict(tiny_model_fisher, tmp_path):
    from common.core.config import load_config
    from common.core.storage import atomic_save_safetensors
    from common.evaluation.generate import load_weights

    cfg, model, _ = tiny_model_fisher
    path = str(tmp_path / "ema.safetensors")
    atomic_save_safetensors(model.state_dict(), path, {"step": "3"})
    loaded, stored, info = load_weights(path, cfg)
    assert stored is None and info["kind"] == "state dict"
    pairs = zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    other = load_config(os.path.join(ROOT, "configs", "smoke.yaml"), ["model.time_embedding=mlp"])
    with pytest.raises(ValueError, match=f"{path}.*does not fit.*smoke.yaml"):
        load_weights(path, other)


@pytest.mark.slow
def test_sample_script(tiny_model_fisher, tmp_path):
    cfg, model, _ = tiny_model_fisher
    _, stored = quantize_model(model, {n: Assignment("int8") for n in eligible_names(model, "poster")})
    from common.core.config import to_dict

    qpath = str(tmp_path / "v" / QUANTIZED_FILE)
    save_quantized(stored, qpath, {"model": to_dict(cfg.model), "timesteps": cfg.diffusion.timesteps}, {})
    outs = {}
    from common.core import machine

    for backend in ("dequant", "bf16", "auto"):
        out = tmp_path / backend
        p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--config",
                            os.path.join(ROOT, "configs", "smoke.yaml"), "--variant-file", qpath, "--backend", backend,
                            "--n", "5", "--out", str(out), "--no-progress"],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert (out / "samples.png").exists()
        npz = np.load(out / "samples.npz")
        assert npz["images"].shape == (5, 1, 32, 32) and npz["images"].dtype == np.uint8
        assert npz["x"].dtype == np.float32
        info = json.load(open(out / "sample.json"))
        assert info["n"] == 5 and info["source"]["kind"] == "quantized"
        assert info["backend"] == ("dequant" if backend == "auto" else backend)
        assert "[sample] machine: " in p.stdout and info["machine"]["isa"] == machine.capability()["isa"]
        outs[backend] = torch.from_numpy(npz["x"])
    assert 0 < rel_err(outs["bf16"], outs["dequant"]) < 0.02  # same noise: paired
    # auto on an int8 plan: only dequant runs it exactly (bf16 would round its values), said and recorded
    assert torch.equal(outs["auto"], outs["dequant"]) and "backend auto -> dequant: only dequant" in p.stdout
    assert info["backend_auto"]["kind"] == "fp32" and info["backend_auto"]["measured"] is None
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--config",
                        os.path.join(ROOT, "configs", "smoke.yaml"), "--variant-file", qpath, "--backend", "fp16"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=tmp_path)
    assert p.returncode != 0 and "needs a CUDA device" in p.stderr and "Traceback" not in p.stderr


def test_sample_help():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0 and "--variant-file" in p.stdout and "--backend" in p.stdout


# ----------------------------------------------------------------------------- backend.name: auto
def _bf16_plan(model):
    """A copy of ``model`` whose every parameter holds a bf16 value: the plan bf16 runs exactly."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return out


def test_plan_kind_and_exact_backends(mixed):
    _, qmodel, _, _, _ = mixed
    assert backends.plan_kind(qmodel) == "fp32"  # int8 / int4 values and fp32 tensors
    assert backends.plan_kind(qmodel, act_quant=True) == "act_quant"
    bf16 = _bf16_plan(qmodel)
    assert "bf16" in backends.plan_kind(bf16).split("+")
    # a stored buffer is part of the plan: an fp16 smoothing divisor that bf16 cannot hold makes bf16 inexact
    conv = bf16.get_submodule("Layer1.ResBlock1.conv1")
    conv.register_buffer("smooth_div", torch.full((conv.in_channels,), 1 + 2 ** -9).half().float())
    assert "bf16" not in backends.plan_kind(bf16).split("+")
    del conv.smooth_div
    assert backends.exact_backends("fp32") == backends.exact_backends("act_quant") == ["dequant"]
    assert backends.exact_backends("bf16") == ["dequant", "bf16"]
    assert backends.exact_backends("fp16", "cpu") == ["dequant"]  # fp16 runs on CUDA only


def _never(*a, **k):
    pytest.fail("probed")


def test_auto_without_a_choice_is_dequant_and_probes_nothing(mixed, tmp_path):
    _, qmodel, _, _, _ = mixed
    c = backends.choose_auto(qmodel, "cpu", str(tmp_path), SHAPE, 100, probe=_never)
    assert c["backend"] == "dequant" and c["measured"] is None and "only dequant" in c["reason"]
    assert not (tmp_path / backends.AUTO_FILE).exists()


@pytest.mark.parametrize("bf16_speed, expected", [(20.0, "bf16"), (10.4, "dequant"), (0.2, "dequant")])
def test_auto_takes_bf16_only_when_clearly_faster(mixed, tmp_path, bf16_speed, expected):
    _, qmodel, _, _, _ = mixed
    speeds = {"dequant": 10.0, "bf16": bf16_speed}
    c = backends.choose_auto(_bf16_plan(qmodel), "cpu", str(tmp_path), SHAPE, 100,
                             probe=lambda m, b, *a: speeds[b])
    assert c["backend"] == expected and c["measured"] == speeds and not c["cached"]
    assert c["measured"][c["backend"]] >= c["measured"]["dequant"]  # never slower than dequant in its own probe


def test_auto_is_measured_once_per_machine(mixed, tmp_path, monkeypatch):
    from common.core import machine

    _, qmodel, _, _, _ = mixed
    plan = _bf16_plan(qmodel)
    first = backends.choose_auto(plan, "cpu", str(tmp_path), SHAPE, 100, probe=lambda m, b, *a: {"dequant": 1.0,
                                                                                                 "bf16": 3.0}[b])
    again = backends.choose_auto(plan, "cpu", str(tmp_path), SHAPE, 100, probe=_never)  # cached for this machine
    assert (first["backend"], again["backend"], again["cached"]) == ("bf16", "bf16", True)
    assert again["measured"] == first["measured"] and "cached probe" in again["reason"]
    real = machine.capability()
    monkeypatch.setattr(machine, "capability", lambda *a: {**real, "isa": "OTHER", "native_bf16": False})
    other = backends.choose_auto(plan, "cpu", str(tmp_path), SHAPE, 100, probe=lambda m, b, *a: {"dequant": 2.0,
                                                                                                 "bf16": 0.1}[b])
    assert other["backend"] == "dequant" and not other["cached"] and "OTHER" in other["reason"]
    cache = json.load(open(tmp_path / backends.AUTO_FILE))
    assert len(cache) == 2 and {e["isa"] for e in cache.values()} == {real["isa"], "OTHER"}
    (tmp_path / backends.AUTO_FILE).write_text("{not json")  # a damaged cache is measured again, not an error
    assert backends.choose_auto(plan, "cpu", str(tmp_path), SHAPE, 100, probe=lambda m, b, *a: 1.0)["cached"] is False
    # a probe at another batch or input shape is another measurement; a hand-damaged entry is measured again
    assert backends.choose_auto(plan, "cpu", str(tmp_path), SHAPE, 100, batch=8,
                                probe=lambda m, b, *a: 1.0)["cached"] is False
    wider = (SHAPE[0], 2 * SHAPE[1], 2 * SHAPE[2])
    assert backends.choose_auto(plan, "cpu", str(tmp_path), wider, 100, probe=lambda m, b, *a: 1.0)["cached"] is False
    cache = json.load(open(tmp_path / backends.AUTO_FILE))
    json.dump({k: "garbage" for k in cache}, open(tmp_path / backends.AUTO_FILE, "w"))
    assert backends.choose_auto(plan, "cpu", str(tmp_path), SHAPE, 100, probe=lambda m, b, *a: 1.0)["cached"] is False


def test_auto_probe_on_this_machine_is_never_slower_than_dequant(mixed, tmp_path):
    """The real probe, tiny: two U-Net calls per backend at batch 2, whatever bf16 costs on this ISA."""
    _, qmodel, _, _, _ = mixed
    c = backends.choose_auto(_bf16_plan(qmodel), "cpu", str(tmp_path), SHAPE, 100, batch=2)
    assert set(c["measured"]) == {"dequant", "bf16"} and all(v > 0 for v in c["measured"].values())
    assert c["measured"][c["backend"]] >= c["measured"]["dequant"]


def test_subpixel_rewrite_keeps_a_smoothing_divisor():
    """A smoothed ConvTranspose2d with a run-time divisor, rewritten into sub-pixel convs for the int8 backend, must
    still divide its input (the rewrite once dropped the pre-hook: the int8 graph then ran the unsmoothed input)."""
    from torch import nn

    from common.quant import smoothing

    torch.manual_seed(0)
    net = nn.Sequential(nn.ConvTranspose2d(6, 4, 4, 2, 1))
    smoothing.attach_divisors(net, {"0": 6})
    with torch.no_grad():
        net[0].smooth_div.copy_(torch.rand(6) * 4 + 0.25)
    x = torch.randn(2, 6, 5, 5)
    kept = smoothing.carry_divisor(net[0], backends.SubPixelConvTranspose(net[0]))
    torch.testing.assert_close(kept(x), net(x), rtol=1e-5, atol=1e-5)  # float32 sums of 36 products, reordered
    assert not torch.allclose(backends.SubPixelConvTranspose(net[0])(x), net(x), atol=1e-2)


def test_smoothed_int8_plan_is_exact_stored_and_runs_int8(tmp_path):
    """The bench's ``uniform_int8_smooth``: SmoothQuant scales folded into the weights before int8 rounding. In real
    arithmetic it is the same network (checked on the fp32 copy), its file holds the fp16 divisors and rebuilds them
    on load, and the int8 graph (divisors before the quantized inputs, transposed convs included) stays close to the
    same file on dequant."""
    from benchmarks import bench_backends
    from common.evaluation.generate import load_weights
    from common.quant import strategies

    cfg = load_config(SMOKE, [f"run.out_dir={tmp_path}/runs", f"run.cache_dir={tmp_path}/cache",
                              "backend.calib_images=4"])
    model, fisher, _ = bench_backends._weights(cfg, str(tmp_path / "none.pt"))
    plan = strategies.uniform(fisher, fmt="int8")[0]
    net, info = bench_backends.smoothed_for_int8(cfg, model, plan)
    assert set(info["alpha"]) == {n.removesuffix(".weight") for n in plan}
    transposed = [n for n in ("Layer4.conv", "Layer5.conv", "Layer6.conv") if n in info["runtime"]]
    assert transposed  # a transposed conv with a run-time divisor: what the int8 backend's rewrite must carry
    x, t = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 40, 90])
    with torch.no_grad():  # exact up to float32 rounding (fp16-exact scales): products reordered, ~1e-6 relative
        torch.testing.assert_close(net(x, t), model(x, t), rtol=1e-4, atol=1e-5)
    paths, _ = bench_backends.write_variants(cfg, str(tmp_path / "none.pt"), str(tmp_path / "bench"),
                                             ("uniform_int8_smooth",))
    loaded, stored, _ = load_weights(paths["uniform_int8_smooth"], cfg)
    divisors = {n for n, e in stored.items() if n.endswith(".smooth_div")}
    assert divisors == {f"{n}.smooth_div" for n in info["runtime"]}
    assert all(stored[n]["format"] == "fp16" for n in divisors)
    bufs = dict(loaded.named_buffers())
    assert all(torch.equal(bufs[n], dict(net.named_buffers())[n]) for n in divisors)  # fp16-exact, rebuilt
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    ref = sample(backends.prepare(loaded, stored, "dequant"), sampler, 4, SHAPE, 0, 4, progress=False)
    calib = backends.calibration_inputs(loaded, sampler, 4, SHAPE, 1234)
    runner = backends.prepare(loaded, stored, "int8", calib=calib, compile_model=False)
    assert runner.precision[f"{transposed[0]}.weight"].endswith("as 4 sub-pixel 2x2 convs)")
    out = sample(runner, sampler, 4, SHAPE, 0, 4, progress=False)
    assert 0 < rel_err(out, ref) < 0.05
    # the same graph with the sub-pixel rewrite dropping the divisors (as it once did) computes something else
    from common.quant import smoothing

    carry = smoothing.carry_divisor
    try:
        smoothing.carry_divisor = lambda src, dst: dst
        dropped = backends.prepare(loaded, stored, "int8", calib=calib, compile_model=False)
    finally:
        smoothing.carry_divisor = carry
    assert rel_err(sample(dropped, sampler, 4, SHAPE, 0, 4, progress=False), out) > 1e-3


def test_sample_py_default_folder_tells_two_weights_files_of_one_folder_apart():
    """checkpoints/default.safetensors and checkpoints/default_step004000.safetensors both wrote
    samples/checkpoints_<backend>_seed<k>, the second silently over the first."""
    import runpy

    tag = runpy.run_path(os.path.join(ROOT, "sample.py"))["source_tag"]
    assert tag("checkpoints/default.safetensors") != tag("checkpoints/default_step004000.safetensors")
    assert tag("runs/default/mp_fisher_25%/quantized.safetensors") == "mp_fisher_25%"
    assert tag("runs/default/baseline/checkpoint.pt") == "baseline"
