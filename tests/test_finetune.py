"""finetune.py and the learned quantizers: AdaRound starts at the identity and exports codes in range, the
straight-through export equals round-to-nearest, LSQ steps stay positive and learn, finetuning lowers its loss and
leaves frozen layers alone, samples come from the stored files, and an interrupted run writes nothing half-way."""
import json
import os

import numpy as np
import pytest
import torch
from test_pipeline import ROOT, run

from common.core.config import load_config
from common.quant.activations import LayerQuant, qparams, quantizable_modules
from common.quant.formats import int_codes, quantize_tensor
from common.quant.learnable import LearnedActQuant, WeightQuant, export_weight

SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["int4", "int3", "int2"])
def test_adaround_starts_at_the_weights_and_exports_codes_in_range(fmt):
    w = rand(6, 5, 3, 3)
    wq = WeightQuant(w, fmt, 0, "adaround")
    qmax = wq.qmax
    inside = (w.flatten(1).abs() < w.flatten(1).abs().amax(1, keepdim=True) * 0.999).view_as(w)
    assert torch.allclose(wq(w)[inside], w[inside], atol=1e-5)  # h(V) = fractional part: no rounding yet
    e = export_weight(wq, w)
    codes = int_codes(e)
    assert codes.abs().max() <= qmax
    # each learned code is floor or ceil of w / s
    s = e["scale"][:, None]
    ratio = w.flatten(1) / s
    assert torch.all((codes.float() == torch.floor(ratio).clamp(-qmax, qmax)) |
                     (codes.float() == torch.ceil(ratio).clamp(-qmax, qmax)))
    assert wq.regularizer(2.0) > 0


def test_ste_export_equals_round_to_nearest_and_passes_gradients():
    w = rand(8, 12, seed=1).requires_grad_(True)
    wq = WeightQuant(w, "int4", 0, "ste")
    e, ref = export_weight(wq, w), quantize_tensor(w.detach(), "int4")
    assert torch.equal(e["data"], ref["data"]) and torch.allclose(e["scale"], ref["scale"])
    wq(w).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    # every weight inside the range trains, those whose code is a limit too (each row's largest: its scale's own)
    codes = (w.detach() / e["scale"][:, None]).round()
    assert (codes.abs() == 7).any() and bool((w.grad != 0).all())


@pytest.mark.parametrize("mode", ["ste", "lsq", "adaround"])
def test_group_wise_formats_train_and_export_what_the_forward_computes(mode):
    """A plan's group-wise formats (one fp16 scale per group of inputs of a row) train like per-channel ones:
    untrained, the export is quantize_tensor's entry bit for bit; after training (weights and, for lsq, the scales
    at their fp16 values) the stored entry de-quantizes to exactly what the forward computed."""
    from common.quant.formats import dequantize_tensor

    w = (rand(6, 100, seed=7) * 0.1).requires_grad_(True)  # 100 inputs: groups of 32 leave a shorter last one
    wq = WeightQuant(w.detach(), "int3_g32", 0, mode)
    e, ref = export_weight(wq, w), quantize_tensor(w.detach(), "int3_g32")
    assert e["format"] == "int3_g32" and e["scale"].dtype == torch.float16 and e["scale"].shape == (6, 4)
    if mode != "adaround":  # adaround's export rounds its learned h, which starts at the fractional part
        assert torch.equal(e["data"], ref["data"]) and torch.equal(e["scale"], ref["scale"])
    trained = [w] + [p for p in wq.parameters()]
    opt = torch.optim.Adam(trained, lr=0.01)
    for _ in range(5):
        loss = (wq(w) - 0.05).pow(2).sum() + wq.regularizer(2.0) * 1e-3
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained if p is not w or mode != "adaround")
    e = export_weight(wq, w)
    with torch.no_grad():
        assert torch.equal(wq(w) if mode != "adaround" else wq.codes(w, hard=True)[0] * wq.codes(w)[1],
                           dequantize_tensor(e))
    if mode == "lsq":
        assert not torch.equal(e["scale"], ref["scale"])  # the scales learned, and were stored as trained
    with pytest.raises(ValueError, match="integer formats"):
        WeightQuant(w.detach(), "km3", 0, mode)


@pytest.mark.parametrize("fmt", ["int3_g32", "int3"])
def test_a_plans_scales_are_kept_where_its_codes_do_not_reach_qmax(fmt):
    """After GPTQ's error compensation a row or group need not hold a code at +-qmax; max|w| / qmax of its values
    would then shrink its scale and re-round every code. Given the entry's scales, the untrained export is the
    entry itself, bit for bit."""
    from common.quant.formats import dequantize_tensor, group_entry, int_entry

    ref = quantize_tensor(rand(6, 100, seed=8) * 0.1, fmt)
    codes = int_codes(ref).clamp(-2, 2)  # int3: qmax 3 is reached nowhere
    entry = (group_entry if "_g" in fmt else int_entry)(fmt, ref["shape"], 0, codes, ref["scale"])
    values = dequantize_tensor(entry)
    for mode in ("ste", "lsq"):  # lsq holds log(scale): fp32 per-channel scales come back to the last bit or so
        kept = export_weight(WeightQuant(values, fmt, 0, mode, scale=entry["scale"]), values)
        assert torch.equal(kept["data"], entry["data"]), mode
        assert torch.allclose(kept["scale"].float(), entry["scale"].float(), rtol=1e-6, atol=0), mode
        assert mode == "lsq" and "_g" not in fmt or torch.equal(kept["scale"], entry["scale"]), mode
    assert not torch.equal(export_weight(WeightQuant(values, fmt, 0, "ste"), values)["scale"], entry["scale"])


def test_lsq_matches_the_calibrated_quantizer_then_learns_a_positive_step():
    x = rand(16, 4, 5, 5, seed=2) * 3
    lo, hi = x.amin().view(1, 1), x.amax().view(1, 1)
    scale, zp = qparams(lo, hi, 4, False)
    lq = LayerQuant(4, False, "tensor", None, scale, zp)
    lsq = LearnedActQuant(lq)
    g = torch.zeros(16, dtype=torch.long)
    assert torch.allclose(lsq.apply(x, g), lq.apply(x, g))
    opt = torch.optim.Adam(lsq.parameters(), lr=0.05)
    before = (lsq.apply(x, g) - x).pow(2).mean().item()
    for _ in range(50):
        loss = (lsq.apply(x, g) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (lsq.apply(x, g) - x).pow(2).mean().item() < before
    assert torch.all(lsq.export().scale > 0)
    # what trains is what is exported, bit for bit (the gradient-scaled step used to land an ulp away)
    steps = torch.rand(4000, 1, generator=torch.Generator().manual_seed(3)) * 0.1 + 1e-3
    many = LearnedActQuant(LayerQuant(6, False, "tensor", None, steps, zp.expand(4000, 1).clone()))
    gg = torch.arange(4000)
    xx = rand(4000, 2, 3, 3, seed=4) * 3
    assert torch.equal(many.apply(xx, gg), many.export().apply(xx, gg))


@pytest.mark.parametrize("split", [None, 3])
def test_lsq_fused_pass_equals_the_expression_autograd_differentiates(split):
    """``LSQFakeQuant`` against (round_ste(clamp(x / s + z)) - z) s differentiated by autograd (LSQ's clip before
    rounding: values that round to a limit keep their gradient): the same values
    (bit for bit: the same float operations) and gradients to float32 rounding (x's: exactly 1 where autograd
    gets s / s; the step's: sums reordered, within Higham's bound on float32 summation)."""
    from common.quant.learnable import round_ste

    x = rand(16, 7, 5, 5, seed=3) * 3
    g = torch.arange(16) % 3
    scale = torch.rand(3, 2, generator=torch.Generator().manual_seed(4)) * 0.4 + 0.3
    zp = torch.randint(0, 16, (3, 2), generator=torch.Generator().manual_seed(5)).float()
    lq = LayerQuant(4, False, "tensor", split, scale, zp)
    up = rand(*x.shape, seed=6)
    lsq = LearnedActQuant(lq)
    xa = x.clone().requires_grad_(True)
    fused = lsq.apply(xa, g)
    fused.backward(up)

    step = lsq.step.detach().clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    gs = 1.0 / (x[0].numel() * 15) ** 0.5
    s, z = (step * gs + (step - step * gs).detach())[g], zp[g]
    k = 7 if split is None else split

    def fq(v, j):
        sj, zj = s[:, j].view(-1, 1, 1, 1), z[:, j].view(-1, 1, 1, 1)
        return (round_ste(torch.clamp(v / sj + zj, 0, 15)) - zj) * sj

    ref = fq(xb, 0) if split is None else torch.cat([fq(xb[:, :k], 0), fq(xb[:, k:], 1)], dim=1)
    ref.backward(up)
    assert torch.equal(fused, ref)
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-6, atol=0)
    assert (xa.grad == 0).any() and (xa.grad != 0).any()  # both sides of the range are exercised
    # The step's gradient sums one term per element of its (group, part), gs * up * (q - x / s) or gs * up * q with
    # |q - z| <= 15: two float32 sums of those K terms in different orders are within 2 gamma_K sum |term| of each
    # other (Higham 2002, eq. 4.4), bounded here with |term| <= 15 gs |up|, computed in float64.
    u = 2.0 ** -24
    bound = torch.zeros(3, 2, dtype=torch.float64)
    for i in range(3):
        for j in range(2 if split else 1):
            part = up[g == i] if split is None else (up[g == i][:, :k] if j == 0 else up[g == i][:, k:])
            n = part.numel()
            bound[i, j] = 2 * (n * u / (1 - n * u)) * 15 * gs * part.double().abs().sum()
    assert torch.all((lsq.step.grad.double() - step.grad.double()).abs() <= bound)
    assert (lsq.step.grad != 0).sum() == (2 if split else 1) * 3


def test_finetuning_lowers_its_loss_and_freezes_what_it_does_not_train(data_root, monkeypatch):
    from common.core.config import to_dict
    from common.diffusion.model import build_model
    from common.experiments import finetune as ft

    monkeypatch.setenv("LAQFI_DATA_ROOT", data_root)
    cfg = load_config(SMOKE, ["finetune.steps=40", "finetune.lr=1e-3"])
    c = ft.finetune_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    ranges = {n: torch.tensor([[[-3.0, 3.0]]]).repeat(2, 2, 1) for n in quantizable_modules(model)}
    student = ft.Student(c, model, 4, 8, ranges, "ste")
    pool = (rand(32, 1, 32, 32, seed=3), torch.randint(0, cfg.diffusion.timesteps, (32,)))
    layers = ft.quest_layers(model)[:2] or [student.names[0].removesuffix(".weight")]
    frozen = {n: student.original(n).detach().clone() for n in student.names
              if n.removesuffix(".weight") not in layers}
    steps, info = ft.finetune(c, student, model, pool, layers, progress=False)
    assert steps == 40 and info["last_loss"] < info["first_loss"]
    for n, w in frozen.items():
        assert torch.equal(student.original(n), w), n
    assert any(not torch.equal(student.original(f"{m}.weight"), dict(model.named_parameters())[f"{m}.weight"])
               for m in layers)
    stored, q = student.export(model)
    assert all(torch.all(lq.scale > 0) for lq in q.layers.values())
    assert to_dict(c.finetune) == to_dict(cfg.finetune)


def _ranges(model, groups=2):
    return {n: torch.tensor([[[-3.0, 3.0]]]).repeat(groups, 2, 1) for n in quantizable_modules(model)}


def test_the_student_quantizes_the_ends_at_keep_bits_like_actquant_and_its_variants_say_so():
    """act_quant.keep_bits quantizes the first / last conv inputs in make actquant and w4a4; the student left them
    float, so its variants were another model than the rows they were compared with."""
    from common.diffusion.model import build_model
    from common.experiments import finetune as ft
    from common.experiments.act_pipeline import act_layout, quantizer_inputs

    cfg = load_config(SMOKE, ["act_quant.keep_bits=8"])
    c = ft.finetune_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    student = ft.Student(c, model, 4, 4, _ranges(model), "ste")
    names, kept, _, _ = act_layout(c, model)
    assert kept and set(student.quantizer.layers) == set(names)
    assert {n: student.quantizer.layers[n].bits for n in kept} == dict.fromkeys(kept, 8)
    assert quantizer_inputs(c) != quantizer_inputs(ft.finetune_config(load_config(SMOKE)))  # a variant's key moves


def test_the_student_quantizes_every_input_it_reports_and_runs_without_dropout():
    """Two bugs of the student before: with act_quant.per_token_attention the attention projections' inputs stayed
    float (the per-token quantizers were dropped while the report said every input was quantized), and the copy ran
    in train mode, so a model with dropout gave a random student against a deterministic teacher."""
    from common.diffusion.model import build_model
    from common.experiments import finetune as ft
    from common.experiments.act_pipeline import act_layout
    from common.quant.activations import attention_projections

    cfg = load_config(SMOKE, ["act_quant.per_token_attention=true", "model.dropout=0.5"])
    c = ft.finetune_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval()
    student = ft.Student(c, model, 4, 4, _ranges(model), "ste")
    names, kept, _, token = act_layout(c, model)
    assert token == attention_projections(model) and token
    assert set(student.quantizer.layers) == set(names) - kept  # every allocatable input, the projections included
    assert {n for n, q in student.quantizer.layers.items() if q.granularity == "token"} == token
    assert set(student.aq) == set(names) - kept - token  # LSQ steps where there is a step to learn
    assert not any(m.training for m in student.model.modules())
    x, t = rand(2, 1, 32, 32, seed=4), torch.tensor([5, 60])
    proj = sorted(token)[0]
    seen = {}
    hook = dict(student.model.named_modules())[proj].register_forward_hook(
        lambda m, a, o: seen.__setitem__("in", a[0].detach()))
    with torch.no_grad():
        a, b = student.model(x, t), student.model(x, t)
    hook.remove()
    assert torch.equal(a, b)  # no dropout: the same input gives the same output
    rows = seen["in"].reshape(-1, seen["in"].shape[-1])  # 4-bit per token: at most 16 values per row
    assert max(len(r.unique()) for r in rows) <= 16
    _, q = student.export(model)
    assert {n for n, lq in q.layers.items() if lq.granularity == "token"} == token
    pool = (rand(16, 1, 32, 32, seed=3), torch.randint(0, cfg.diffusion.timesteps, (16,)))
    rc = load_config(SMOKE, ["act_quant.per_token_attention=true", "finetune.recon_iters=2"])
    steps, info = ft.reconstruct(ft.finetune_config(rc), ft.Student(ft.finetune_config(rc), model, 4, 4,
                                                                     _ranges(model), "adaround"),
                                 model, pool, progress=False)
    assert steps == 2 * len(student.names) and np.isfinite(info["last_mse_mean"])


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device on this machine: the finetuning's device path runs only where one is")
def test_finetuning_keeps_every_tensor_on_the_model_device():
    """Teacher, student, calibration pool batches, the Fisher layer choice and the exported codes on CUDA: each
    method runs there and exports what the CPU path exports for the same rounding."""
    from common.diffusion.model import build_model
    from common.experiments import finetune as ft

    cfg = load_config(SMOKE, ["finetune.steps=4", "finetune.recon_iters=2", "act_quant.per_token_attention=true"])
    c = ft.finetune_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion.timesteps, cfg.data.image_size).eval().cuda()
    pool = (rand(16, 1, 32, 32, seed=3), torch.randint(0, cfg.diffusion.timesteps, (16,)))  # on the CPU, as cached
    recon = ft.Student(c, model, 4, 4, _ranges(model), "adaround")
    steps, info = ft.reconstruct(c, recon, model, pool, progress=False)
    assert np.isfinite(info["last_mse_mean"])
    student = ft.Student(c, model, 4, 4, _ranges(model), "ste")
    none_stored, _ = student.export(model)
    layers = ft.quest_layers(model)[:2]
    steps, info = ft.finetune(c, student, model, pool, layers, progress=False)
    assert steps == 4 and np.isfinite(info["last_loss"])
    for s in (recon, student):
        stored, q = s.export(model)
        assert all(t.device.type == "cpu" for e in stored.values() for t in e.values() if isinstance(t, torch.Tensor))
        assert all(lq.scale is None or lq.scale.device.type == "cpu" for lq in q.layers.values())
    cpu = model.cpu()
    for n, e in none_stored.items():  # untrained straight-through export = round to nearest of the CPU path
        if e["format"] == "int4":
            assert torch.equal(e["data"], quantize_tensor(dict(cpu.named_parameters())[n], "int4", e["axis"])["data"])
    model.cuda()
    diag = {n: torch.rand(p.shape) for n, p in model.named_parameters() if n in student.wq}
    imp = {"fisher": {n.removesuffix(".weight"): {4: 1.0} for n in diag}}
    chosen, score = ft.fisher_layers(model, {"diag": diag}, imp, 4, 4, 3)
    assert len(chosen) == 3 and all(np.isfinite(v) for v in score.values())


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory, smoke_baseline):
    tmp = smoke_baseline(tmp_path_factory.mktemp("finetune"))  # the shared smoke run: trained + Fisher only
    return tmp, run("finetune.py", tmp, "--set", "eval.classifier.train_limit=300")


def test_every_method_is_evaluated_from_its_files(ft_run):
    from common.diffusion.samplers import build_sampler, sample
    from common.diffusion.schedule import NoiseSchedule
    from common.quant.activations import load_act_quant
    from common.quant.container import load_quantized, read_quantized

    tmp, _ = ft_run
    cfg = load_config(SMOKE)
    out = tmp / "runs" / "smoke" / "finetune"
    ms = {m: json.load(open(out / f"{m}_W4A4" / "metrics.json")) for m in cfg.finetune.methods}
    assert ms["none"]["trainable_params"] == 0 and ms["all"]["trainable_params"] > ms["quest"]["trainable_params"] > 0
    assert ms["fisher"]["layers_trained"] and len(ms["fisher"]["layers_trained"]) == len(ms["quest"]["layers_trained"])
    none = read_quantized(str(out / "none_W4A4" / "quantized.safetensors"))["tensors"]
    quest = read_quantized(str(out / "quest_W4A4" / "quantized.safetensors"))["tensors"]
    for n, e in quest.items():
        if e["format"] == "int4":
            assert int_codes(e).abs().max() <= 7
            if n.removesuffix(".weight") not in ms["quest"]["layers_trained"]:  # frozen: round to nearest
                assert torch.equal(e["data"], none[n]["data"]), n
    vdir = out / "reconstruction_W4A4"
    model, _ = load_quantized(str(vdir / "quantized.safetensors"))
    q, _ = load_act_quant(str(vdir / "act_quant.safetensors"))
    assert all(torch.all(lq.scale > 0) for lq in q.layers.values())
    q.attach(model)
    torch.set_num_threads(cfg.run.threads)  # as the evaluation ran: oneDNN's reductions depend on the thread count
    x = sample(model, build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion)), cfg.finetune.n_images,
               (1, 32, 32), 0, min(cfg.sample.batch_size, cfg.finetune.n_images), progress=False)
    assert torch.equal((x.clamp(-1, 1) + 1) / 2, torch.load(vdir / "samples_seed0.pt"))
    md = (out / "summary.md").read_text()
    assert "W4A4: fisher vs quest" in md and "share of `all`'s paired-MSE reduction" in md


def test_a_damaged_calibration_pool_is_recomputed_not_reused(ft_run, tmp_path):
    """The teacher's calibration pool is sealed like every other tensor cache: a flipped byte in its tensors (the
    fingerprint in its header intact) is told apart by the digest, so it is recomputed and `verify` flags it."""
    import shutil

    from common.core import storage
    from common.experiments import finetune as ft

    tmp, _ = ft_run
    path = tmp / "runs" / "smoke" / "finetune" / "baseline" / "calib_pool.safetensors"
    cfg = ft.finetune_config(load_config(SMOKE, [f"run.out_dir={tmp}/runs", f"run.cache_dir={tmp}/cache"]))
    sha = json.load(open(tmp / "runs" / "smoke" / "baseline" / "model.json"))["sha256"]
    inputs = ft.pool_inputs(cfg, sha)
    assert storage.reusable_tensors(str(path), inputs) is not None  # this run's pool, sealed with these inputs
    damaged = tmp_path / "calib_pool.safetensors"
    shutil.copy(path, damaged)
    raw = bytearray(damaged.read_bytes())
    raw[-3] ^= 0x40  # a byte of the last tensor's data, the header untouched
    damaged.write_bytes(bytes(raw))
    assert storage.reusable_tensors(str(damaged), inputs) is None


def test_rerun_reuses_and_an_interrupted_method_writes_nothing(ft_run, monkeypatch, data_root):
    import shutil

    from common.core.storage import resolve_device
    from common.experiments import finetune as ft

    tmp, _ = ft_run
    again = run("finetune.py", tmp, "--set", "eval.classifier.train_limit=300")
    assert "[quest_W4A4] reusing" in again.stdout
    monkeypatch.setenv("LAQFI_DATA_ROOT", data_root)
    cfg = load_config(SMOKE, [f"run.out_dir={tmp}/runs", f"run.cache_dir={tmp}/cache",
                              "eval.classifier.train_limit=300", "finetune.methods=[all]"])
    vdir = tmp / "runs" / "smoke" / "finetune" / "all_W4A4"
    shutil.rmtree(vdir)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "finetune", killed)
    with pytest.raises(KeyboardInterrupt):
        ft.run_finetune(cfg, resolve_device("cpu"), progress=False)
    assert not [p for p in vdir.glob("*") if p.name != ".lock"]  # nothing half-written
    monkeypatch.undo()
    monkeypatch.setenv("LAQFI_DATA_ROOT", data_root)
    done = ft.run_finetune(cfg, resolve_device("cpu"), progress=False)
    assert (vdir / "metrics.json").exists() and done["all_W4A4"][1] == "all"


def test_a_finetuned_variant_measured_with_another_classifier_is_stale(ft_run, monkeypatch, data_root):
    """finetune reuses its variants by its own inputs, not the evaluation fingerprint: it checks the instruments
    (here a classifier trained here whose SHA-256 changed) as every other script's reuse does."""
    from common.core.errors import StaleArtifactError
    from common.evaluation import evaluate
    from common.experiments import finetune as ft

    tmp, _ = ft_run
    monkeypatch.setenv("LAQFI_DATA_ROOT", data_root)
    cfg = load_config(SMOKE, [f"run.out_dir={tmp}/runs", f"run.cache_dir={tmp}/cache",
                              "eval.classifier.train_limit=300"])
    c = ft.finetune_config(cfg)
    inputs = json.load(open(tmp / "runs" / "smoke" / "finetune" / "quest_W4A4" / "metrics.json"))["inputs"]
    assert ft._reusable(cfg, c, "quest_W4A4", inputs, False)
    monkeypatch.setattr(evaluate, "classifier", lambda c, progress=True: (None, {"sha256": "f" * 64}))
    with pytest.raises(StaleArtifactError, match="classifier trained here"):
        ft._reusable(cfg, c, "quest_W4A4", inputs, False)


def test_shared_caches_come_first_and_every_setting_that_changes_a_variant_recomputes_it(ft_run, monkeypatch,
                                                                                        data_root, capsys):
    """The teacher's calibration pool, the weight Fisher and the activation importance are written (once, rank 0
    first, under their folder's lock) before the variants are handed to the ranks; a finished variant is reused
    only while the ends' format, the activation quantizers and their ranges are the ones it was made with."""
    from common.core import distributed
    from common.core.storage import resolve_device
    from common.experiments import finetune as ft

    tmp, _ = ft_run
    monkeypatch.setenv("LAQFI_DATA_ROOT", data_root)
    runs = tmp / "runs" / "smoke"
    caches = [runs / "finetune" / "baseline" / "calib_pool.safetensors",
              runs / "lowbit" / "baseline" / "fisher_all_but_ends.pt",
              runs / "finetune" / "baseline" / "act_quant" / "act_importance_group.json"]
    base = [f"run.out_dir={tmp}/runs", f"run.cache_dir={tmp}/cache", "eval.classifier.train_limit=300"]
    real, seen = distributed.map_tasks, []

    def spy(tasks, fn):
        seen.append([p.exists() for p in caches])
        return real(tasks, fn)

    monkeypatch.setattr(ft.distributed, "map_tasks", spy)
    pools = []
    monkeypatch.setattr(ft, "calibration_pool", lambda *a, real=ft.calibration_pool, **k: pools.append(1) or
                        real(*a, **k))

    def rerun(*overrides, methods="[none, fisher]"):
        capsys.readouterr()
        cfg = load_config(SMOKE, base + [f"finetune.methods={methods}", *overrides])
        ft.run_finetune(cfg, resolve_device("cpu"), progress=False)
        return capsys.readouterr().out

    for p in caches:
        p.unlink()
    out = rerun("lowbit.keep_format=int4")  # a changed keep_format: both variants again, from new caches
    assert seen == [[True] * 3] and len(pools) == 1
    assert "[none_W4A4] reusing" not in out and "[fisher_W4A4] reusing" not in out
    out = rerun("lowbit.keep_format=int4")
    assert "[none_W4A4] reusing" in out and "[fisher_W4A4] reusing" in out and len(pools) == 1
    for setting in ("act_quant.symmetric=true", "act_quant.per_token_attention=true",  # the quantizers
                    "act_quant.calib_seed=77", "act_quant.range_method=percentile"):  # their ranges
        out = rerun("lowbit.keep_format=int4", setting, methods="[none]")
        assert "[none_W4A4] reusing" not in out, setting
        assert "[none_W4A4] reusing" in rerun("lowbit.keep_format=int4", setting, methods="[none]"), setting


def test_a_variant_does_not_depend_on_which_other_variants_the_run_makes():
    """Adding a budget or a method to finetune.budgets / methods reuses the variants already made (their inputs
    leave the two lists out); a setting that changes the optimisation still changes them."""
    from common.experiments import finetune as ft

    def inputs(*sets, method="none"):
        cfg = load_config(SMOKE, list(sets))
        return ft.variant_inputs(cfg, ft.finetune_config(cfg), "0" * 64, method)

    small = inputs("finetune.budgets=[W4A4]", "finetune.methods=[none]")
    assert small == inputs("finetune.budgets=[W4A8, W4A4]", "finetune.methods=[none, quest, fisher]")
    assert small == inputs("finetune.plans=['3bits@A8']", "finetune.plan_source=chain_fisher")  # plans: their own
    assert small != inputs("finetune.budgets=[W4A4]", "finetune.methods=[none]", "finetune.steps=7")


def test_plans_to_train_are_lowbit_budgets_with_activation_bits_the_config_allows():
    from common.core.config import ConfigError
    from common.experiments import finetune as ft

    cfg = load_config(SMOKE, ["finetune.plans=[' 3.0bits @ a8']", "finetune.budgets=[]"])
    assert cfg.finetune.plans == ["3bits@A8"] and ft.variant_name("all", "3bits@A8") == "all_search_3bits_A8"
    assert ft.variant_name("all", "W4A8") == "all_W4A8" and not ft.is_plan("W4A8")
    for bad, msg in (("['3bits']", r"needs quantized activations"), ("['3bits@A5']", r"act_quant.a_bits"),
                     ("['W4A8']", r"expected a percentage of the fp32 size")):
        with pytest.raises(ConfigError, match=rf"finetune.plans.*{msg}"):
            load_config(SMOKE, [f"finetune.plans={bad}"])
    with pytest.raises(ConfigError, match=r"finetune.budgets: needs at least one entry \(or finetune.plans one\)"):
        load_config(SMOKE, ["finetune.budgets=[]"])
