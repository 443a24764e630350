"""w4a4.py end to end on the smoke run: the damage study quantizes exactly the inputs each row names, the full
ablation row (every technique, distillation included) is stored, reloaded from its files and reproduces its
stored samples, and its weights are really 4-bit codes."""
import csv
import json
import os
import shutil

import pytest
import torch
from test_pipeline import ROOT, run

from common.core.config import load_config
from common.quant.formats import int_codes

pytestmark = pytest.mark.slow  # end to end: scripts on the smoke config

SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
# one seed, the plain and the full ablation row (GPTQ and activation blocks included): every code path, a third
# of the smoke cost
SETS = ("--set", "eval.classifier.train_limit=300", "--set", "w4a4.rows=[0,9]", "--set", "finetune.seeds=[0]",
        "--set", "w4a4.ablation=cumulative")


@pytest.fixture(scope="module")
def w4a4_run(smoke_baseline, tmp_path_factory):
    tmp = smoke_baseline(tmp_path_factory.mktemp("w4a4"))
    p = run("w4a4.py", tmp, *SETS)
    return tmp, p, tmp / "runs" / "smoke" / "finetune"


def _plan(vdir):
    return json.load(open(vdir / "plan.json"))


def test_outputs_name_every_variant_and_seed(w4a4_run):
    _, p, out = w4a4_run
    for f in ("w4a4.md", "w4a4.csv", "w4a4.png", "w4a4.json", "w4a4.sources.json"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "w4a4.csv")))
    variants = {r["variant"] for r in rows}
    assert {"fp32", "damage_w4", "damage_all", "w4a4_round",
            "w4a4_round_ranges_token_smooth_rotate_lowrank_time_table_gptq_block_distill"} <= variants
    assert all(sum(r["variant"] == v for r in rows) == 1 for v in variants)  # finetune.seeds=[0]
    md = (out / "w4a4.md").read_text()
    assert "Which 4-bit inputs do the damage" in md and "one technique at a time" in md
    assert "Which 4-bit inputs do the damage" in p.stdout
    errs = json.load(open(out / "w4a4.json"))["channel_errors"]
    assert errs and all(e["per_tensor"] >= 0 and e["per_channel"] >= 0 for e in errs)
    assert all(e["range_spread"] >= 1 and e["channels"] >= 1 for e in errs)  # max over median of >= 1 channels
    # where each row's minutes went (this invocation sampled every row, so none was reused)
    seconds = json.load(open(out / "w4a4.json"))["ablation_seconds"]
    ablation = {r["variant"] for r in rows if r["study"] == "ablation"}
    assert set(seconds) == ablation and all(min(s.values()) >= 0 for s in seconds.values())
    assert not any(f"[{v}] reusing" in p.stdout for v in seconds)
    assert [v for v, s in seconds.items() if "distill" in s] == [v for v in seconds if "distill" in v]
    assert "Minutes of this invocation per row" in md and "| row | transform | calibrate |" in md
    # cumulative rows 0 and 9: row 9 adds every technique to rounding, not distillation alone
    assert "| 9 | ranges+token+smooth+rotate+lowrank+time_table+gptq+block+distill |" in md


def test_gptq_damage_row_stores_the_same_format_with_other_codes(w4a4_run):
    """damage_w4_gptq: W4 by GPTQ, inputs float: every GPTQ-covered weight int4 with round-to-nearest's scales
    (the same bytes), the codes moved by the error compensation; nothing else differs from damage_w4."""
    from common.quant.container import read_quantized

    _, _, out = w4a4_run
    near = read_quantized(str(out / "damage_w4" / "quantized.safetensors"))["tensors"]
    gptq = read_quantized(str(out / "damage_w4_gptq" / "quantized.safetensors"))["tensors"]
    assert near.keys() == gptq.keys() and _plan(out / "damage_w4_gptq")["inputs_at_a4"] == 0
    moved = [n for n in near if near[n]["format"] == "int4" and not torch.equal(near[n]["data"], gptq[n]["data"])]
    assert moved and all(torch.equal(near[n]["scale"], gptq[n]["scale"]) for n in moved)
    assert all(near[n]["format"] == gptq[n]["format"] for n in near)


def test_damage_rows_quantize_exactly_the_inputs_they_name(w4a4_run):
    from common.quant.activations import load_act_quant

    _, _, out = w4a4_run
    quantized = {}
    for vdir in out.glob("damage_*"):
        q, _ = load_act_quant(str(vdir / "act_quant.safetensors"))
        quantized[vdir.name] = {n for n, lq in q.layers.items() if lq.bits < 32}
        assert _plan(vdir)["inputs_at_a4"] == len(quantized[vdir.name]), vdir.name
    everything = quantized.pop("damage_all")
    assert everything and not quantized.pop("damage_w4")
    groups = [v.removeprefix("damage_only_") for v in quantized if v.startswith("damage_only_")]
    assert len(groups) >= 3  # the smoke U-Net has a time path, skip concatenations, sampling and ResBlock convs
    alone = [quantized[f"damage_only_{g}"] for g in groups]
    assert set().union(*alone) == everything and sum(map(len, alone)) == len(everything)  # a partition
    for g in groups:
        assert quantized[f"damage_but_{g}"] == everything - quantized[f"damage_only_{g}"]


def test_every_technique_is_stored_and_the_samples_come_from_the_files(w4a4_run):
    from common.diffusion.samplers import build_sampler, sample
    from common.diffusion.schedule import NoiseSchedule
    from common.quant.activations import load_act_quant
    from common.quant.container import load_quantized, read_quantized

    _, _, out = w4a4_run
    cfg = load_config(SMOKE)
    vdir = out / "w4a4_round_ranges_token_smooth_rotate_lowrank_time_table_gptq_block_distill"
    plan = _plan(vdir)
    assert plan["techniques"] == ["ranges", "token", "smooth", "rotate", "lowrank", "time_table", "gptq", "block",
                                  "distill"]
    assert plan["a_block"] == cfg.w4a4.block_size and plan["a_bits_effective"] == 4 + 8 / cfg.w4a4.block_size
    info = plan["transform"]
    # GPTQ rounded every covered layer (the distillation started from its weights) and lowered their output error
    assert info["gptq"]["layers"] and info["gptq"]["median_error_ratio"] < 1
    assert all(v["gptq_error"] >= 0 for v in info["gptq"]["layers"].values())
    assert info["distill"]["steps"] == cfg.w4a4.distill_steps and 0 <= info["distill"]["codes_changed"] <= 1
    assert info["distill"]["start_matches_stored"] == 1.0  # the distillation starts exactly on GPTQ's codes
    tensors = read_quantized(str(vdir / "quantized.safetensors"))["tensors"]
    assert any(".lowrank." in n for n in tensors) and any(n.endswith(".smooth_div") for n in tensors)
    # smoke.yaml's U-Net adds the poster's fixed time table with no layer on the time path: an empty table here
    # (test_w4a4_tools covers the table on the MLP time path); the sampler's steps are recorded all the same
    widths = info["time_table"]["widths"]
    assert sorted(n.removesuffix(".time_rows") for n in tensors if n.endswith(".time_rows")) == sorted(widths)
    assert len(info["time_table"]["steps"]) == cfg.sample.steps and "time_rows_steps" in tensors
    int4 = [n for n, e in tensors.items() if e["format"] == "int4"]
    assert int4 and all(int_codes(tensors[n]).abs().max() <= 7 for n in int4)
    plain = read_quantized(str(out / "w4a4_round" / "quantized.safetensors"))["tensors"]
    assert not any(".lowrank." in n for n in plain)
    model, _ = load_quantized(str(vdir / "quantized.safetensors"))
    q, _ = load_act_quant(str(vdir / "act_quant.safetensors"))
    # the block row's dynamic quantizers survive the distillation's export, on every input (test_finetune: the
    # per-token ones)
    assert {(lq.granularity, lq.block) for lq in q.layers.values()} == {("block", cfg.w4a4.block_size)}
    q.attach(model)
    torch.set_num_threads(cfg.run.threads)  # as the evaluation ran: oneDNN's reductions depend on the thread count
    x = sample(model, build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion)), cfg.finetune.n_images,
               (1, 32, 32), 0, min(cfg.sample.batch_size, cfg.finetune.n_images), progress=False)
    assert torch.equal((x.clamp(-1, 1) + 1) / 2, torch.load(vdir / "samples_seed0.pt"))
    m = json.load(open(vdir / "metrics.json"))
    assert m["size_bytes"] > json.load(open(out / "w4a4_round" / "metrics.json"))["size_bytes"]  # extras counted


def test_rerun_reuses_every_variant(w4a4_run):
    tmp, _, _ = w4a4_run
    again = run("w4a4.py", tmp, *SETS)
    assert "[w4a4_round] reusing" in again.stdout and "[damage_all] reusing" in again.stdout
    assert "reusing the distillation" in again.stdout and "distill:" not in again.stderr  # trained once
    assert "[w4a4_average_fisher] reusing" in again.stdout
    # GPTQ's rounding is computed once per transformed model: the rerun's rows and damage study load it
    assert "reusing GPTQ's rounding" in again.stdout and "[gptq]" not in again.stdout


def test_a4_on_average_spends_uniform_a4s_bops_on_the_allowed_bits(w4a4_run):
    """The Fisher and random plans choose per input from w4a4.average_a_bits within uniform W4A4's BOPs, keep
    the weights of uniform A4 (every allocatable weight int4), and are reported beside it."""
    from common.quant.activations import load_act_quant

    _, _, out = w4a4_run
    cfg = load_config(SMOKE)
    plans = {p: _plan(out / f"w4a4_average_{p}") for p in ("uniform", "fisher", "random")}
    uniform_bops = plans["uniform"]["bops"]
    allowed = set(cfg.w4a4.average_a_bits) | {4}
    for name, plan in plans.items():
        assert plan["bops"] <= uniform_bops, name
        mods = plan["modules"]
        assert {m["w_format"] for m in mods.values()} <= {"int4", "fp32"}, name
        assert {m["w_format"] for m in mods.values() if m["w_format"] != "fp32"} == {"int4"}
        free = {m["a_bits"] for m in mods.values()} - {cfg.act_quant.keep_bits}
        assert free <= allowed, name
        q, _ = load_act_quant(str(out / f"w4a4_average_{name}" / "act_quant.safetensors"))
        assert {n: lq.bits for n, lq in q.layers.items() if n in mods and mods[n]["a_bits"]} == {
            n: m["a_bits"] for n, m in mods.items() if m["a_bits"]}, name  # the stored quantizer is the plan
    assert {m["a_bits"] for n, m in plans["uniform"]["modules"].items()} - {cfg.act_quant.keep_bits} == {4}
    # per sampler-step group: bits per (input, timestep group) from the same menu within the same BOPs, as stored
    steps = _plan(out / "w4a4_average_fisher_steps")
    assert steps["bops"] <= uniform_bops and steps["allocation"]["steps"]["limits"]["bops"] == uniform_bops
    groups = len(steps["group_sensitivity_shares"])
    assert groups > 1 and abs(sum(steps["group_sensitivity_shares"]) - 1) < 1e-6
    lists = {n: m["a_bits"] for n, m in steps["modules"].items() if isinstance(m["a_bits"], list)}
    assert lists and all(len(b) == groups and set(b) <= allowed for b in lists.values())
    q, _ = load_act_quant(str(out / "w4a4_average_fisher_steps" / "act_quant.safetensors"))
    assert {n: list(q.layers[n].group_bits) for n in lists} == lists
    md = (out / "w4a4.md").read_text()
    assert "Uniform A4 and A4 on average" in md and "A4 on average, bits by the activation Fisher" in md
    assert "MAC-weighted activation bits per timestep group" in md


def test_channels_study_alone_writes_the_outlier_table_and_samples_nothing(w4a4_run):
    """(After the tests that read the first run's outputs: it rewrites them.) The outlier table alone, no variant
    sampled."""
    tmp, _, out = w4a4_run
    p = run("w4a4.py", tmp, *SETS, "--set", "w4a4.studies=[channels]")
    md = (out / "w4a4.md").read_text()
    assert "Where the activation outliers are" in md and "range spread (median)" in md
    assert "Which 4-bit inputs do the damage" not in md
    assert not any(line.startswith("[damage_") and "B of weights" in line for line in p.stdout.splitlines())
    assert not any(line.startswith("[fp32]") for line in p.stdout.splitlines())  # not even the reference
    assert "fp32: clf-FID" not in md
    assert not (out / "w4a4_grids.png").exists()  # the first run's figure is not left beside a summary without it


def test_greedy_ablation_drops_a_technique_that_does_not_help(w4a4_run):
    """Greedy rows: each technique is tried on the last kept row (paired MSE on selection noise, decided from the
    stored files), and a row that raised it by more than w4a4.drop_margin standard errors is reported but not
    built on."""
    tmp, _, out = w4a4_run
    p = run("w4a4.py", tmp, *SETS, "--set", "w4a4.ablation=greedy", "--set", "w4a4.rows=[0,3,9]",
            "--set", "w4a4.studies=[ablation]", "--set", "w4a4.select_images=4")
    decisions = [line for line in p.stdout.splitlines() if line.startswith("[w4a4] row ")]
    assert len(decisions) == 3 and "plain rounding" in decisions[0] and "-> kept" in decisions[0]
    smooth_kept = decisions[1].endswith("kept")
    last = "w4a4_round_smooth_distill" if smooth_kept else "w4a4_round_distill"
    assert (out / last / "metrics.json").is_file(), last
    assert _plan(out / last)["techniques"] == (["smooth", "distill"] if smooth_kept else ["distill"])
    # kept exactly when its per-image damages (stored) are not worse than the base's by more than the margin
    from common.experiments.w4a4 import costs_more, keeps, row_cost

    rows = ("w4a4_round", "w4a4_round_smooth")
    per_image = {v: json.load(open(out / v / "selection.json"))["per_image"] for v in rows}
    assert all(len(x) == 4 for x in per_image.values())
    cost = {v: row_cost(json.load(open(out / v / "metrics.json"))) for v in rows}
    more = costs_more(cost["w4a4_round_smooth"], cost["w4a4_round"])
    assert more  # smoothing stores its fp16 divisors
    kept, z = keeps(per_image["w4a4_round_smooth"], per_image["w4a4_round"], 2.0, more)
    assert smooth_kept == kept and f"{z:+.2f} s.e. against its base" in decisions[1]
    md = (out / "w4a4.md").read_text()
    assert "built on" in md and "selection noise" in md
    assert "| 3 | smooth | rounding |" in md and ("| 9 | distill | rounding + smooth |" if smooth_kept
                                                 else "| 9 | distill | rounding |") in md
    # the selection damage is stored with each variant: a rerun decides the same from it, an edited record is
    # recomputed (to the same value: the same files, the same selection noise)
    record = out / "w4a4_round" / "selection.json"
    edited = json.loads(record.read_text()) | {"paired_mse": 0.0}
    record.write_text(json.dumps(edited))
    again = run("w4a4.py", tmp, *SETS, "--set", "w4a4.ablation=greedy", "--set", "w4a4.rows=[0,3,9]",
                "--set", "w4a4.studies=[ablation]", "--set", "w4a4.select_images=4")
    assert [line for line in again.stdout.splitlines() if line.startswith("[w4a4] row ")] == decisions
    assert again.stdout.count("reusing its selection damage") == 2 and "[w4a4_round] reusing its" not in again.stdout
    # make verify binds each selection.json to its row's files: a row re-stored after it was measured shows
    from common.experiments.verify import verify_run

    assert not [f for f in verify_run(str(out.parent)) if f.problem]
    copy = tmp / "verify_copy"
    shutil.copytree(out.parent, copy)
    shutil.copy(copy / "finetune" / last / "act_quant.safetensors",
                copy / "finetune" / "w4a4_round" / "act_quant.safetensors")
    row = {os.path.relpath(f.path, copy): f for f in verify_run(str(copy))}["finetune/w4a4_round/selection.json"]
    assert row.status == "MISMATCH" and "selection damage" in row.detail
    shutil.rmtree(copy)



def test_a4_on_average_on_the_ablations_techniques_keeps_the_plain_allocation(w4a4_run):
    """(Rewrites w4a4.md.) ``w4a4.average_on``: the same per-input bits as plain rounding's plan, on the
    techniques' model (per-block quantizers on every input, so no ranges calibrated, their scales counted in the
    reported bits), reported beside uniform A4 on the same techniques."""
    from common.quant.activations import load_act_quant

    tmp, _, out = w4a4_run
    cfg = load_config(SMOKE)
    p = run("w4a4.py", tmp, *SETS, "--set", "w4a4.studies=[average]", "--set", "w4a4.average_on=['ranges+block']")
    assert "[w4a4_average_fisher] reusing" not in p.stdout  # the plain rows are not this invocation's
    plain = _plan(out / "w4a4_average_fisher")["modules"]
    stacked = _plan(out / "w4a4_average_fisher_ranges_block")
    assert stacked["techniques"] == ["ranges", "block"] and stacked["range_method"] == "mse" and stacked["a_block"]
    assert stacked["a_bits_by_input"] == {n: m["a_bits"] for n, m in plain.items() if n in stacked["a_bits_by_input"]}
    q, _ = load_act_quant(str(out / "w4a4_average_fisher_ranges_block" / "act_quant.safetensors"))
    assert {n: lq.bits for n, lq in q.layers.items() if n in stacked["a_bits_by_input"]} == stacked["a_bits_by_input"]
    assert {(lq.granularity, lq.block) for lq in q.layers.values()} == {("block", cfg.w4a4.block_size)}
    extra = stacked["a_bits_effective"] - stacked["a_bits"]  # 8 / block on the quantized inputs' share of MACs
    assert stacked["a_block"] == cfg.w4a4.block_size and 0 < extra <= 8 / cfg.w4a4.block_size + 1e-9
    md = (out / "w4a4.md").read_text()
    assert "A4 on average, bits by the activation Fisher, on rounding + ranges + block" in md
    assert "with block scales)" in md
    assert md.count("vs uniform A4") == 1 and "| uniform A4 (every allocatable input at 4 bits), on rounding + " in md


def test_verify_accounts_for_every_file_w4a4_writes(w4a4_run, tmp_path):
    """make verify on a w4a4 run finds nothing wrong: GPTQ's rounding and the distillation's learned steps (caches
    in the baseline folder) name the checkpoint (and a greedy row's selection.json, when another test made one,
    the files it was measured on); and learned steps that are not the ones the distillation cache records show."""
    from common.experiments.verify import verify_run
    from common.quant.activations import load_act_quant, save_act_quant

    _, _, out = w4a4_run
    assert list((out / "baseline").glob("gptq_*.pt")) and list((out / "baseline").glob("distill_*_act.safetensors"))
    # whichever studies other tests of this module reran last (w4a4.md, its figures and manifest agree)
    assert [f for f in verify_run(str(out.parent)) if f.problem] == []
    copy = tmp_path / "run"
    shutil.copytree(out.parent, copy)
    fin = copy / "finetune"
    act = str(next((fin / "baseline").glob("distill_*_act.safetensors")))
    gptq = str(next((fin / "baseline").glob("gptq_*.pt")))

    def row(path):
        return {os.path.relpath(f.path, copy): f for f in verify_run(str(copy))}[os.path.relpath(path, copy)]

    # the steps are bound through their .pt (whatever their own provenance says); GPTQ's file needs its own SHA
    save_act_quant(load_act_quant(act)[0], act, {"what": "w4a4 distillation cache"})
    art = torch.load(gptq, weights_only=True)
    art["meta"].pop("checkpoint_sha256")
    torch.save(art, gptq)
    assert row(act).status == "OK"
    assert row(gptq).status == "MISMATCH" and "names no baseline weights" in row(gptq).detail
    save_act_quant(load_act_quant(str(fin / "w4a4_round" / "act_quant.safetensors"))[0], act, load_act_quant(act)[1])
    assert row(act).status == "MISMATCH" and "not the ones" in row(act).detail
    os.remove(act.removesuffix("_act.safetensors") + ".pt")  # steps left behind by their .pt
    assert row(act).status == "MISMATCH" and "no distill_" in row(act).detail
