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


@pytest.mark.parametrize("script", SCRIPTS)
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
            assert (run_dir / v / "quantized.pt").exists()
    fp32 = json.load(open(run_dir / "fp32" / "metrics.json"))
    uni = json.load(open(run_dir / "uniform_fp16" / "metrics.json"))
    assert fp32["paired_mse_vs_fp32"] == 0.0 and fp32["reduction_pct"] == 0.0
    assert uni["paired_mse_vs_fp32"] > 0  # the quantized weights were really used for sampling
    assert 45 < uni["reduction_pct"] < 50  # fp16 on (almost) every weight


def test_quantized_samples_come_from_the_stored_file(pipeline_run):
    """Re-sampling the reloaded quantized.pt gives exactly the stored samples (same noise)."""
    from common.config import load_config
    from common.diffusion import NoiseSchedule, build_sampler, sample
    from common.quantize import load_quantized

    tmp, _ = pipeline_run
    cfg = load_config(os.path.join(ROOT, "configs/smoke.yaml"))
    vdir = tmp / "runs" / "smoke" / "uniform_fp16"
    model, _ = load_quantized(str(vdir / "quantized.pt"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    w = dict(model.named_parameters())["Layer1.ResBlock1.conv1.weight"]
    assert torch.equal(w, w.half().float())  # values are exactly fp16-representable
    x = sample(model, build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion)), cfg.eval.n_images,
               (1, 32, 32), 0, cfg.sample.batch_size, progress=False)
    stored = torch.load(vdir / "samples_seed0.pt")
    assert torch.equal((x.clamp(-1, 1) + 1) / 2, stored)


def test_rerun_reuses_and_changed_config_is_refused(pipeline_run):
    tmp, _ = pipeline_run
    again = run("layer_math.py", tmp)
    assert "[layer_math] reusing" in again.stdout
    metrics = tmp / "runs" / "smoke" / "layer_math" / "metrics.json"
    before = metrics.read_text()
    p = run("layer_math.py", tmp, "--set", "strategies.layer_math.alpha=0.9", check=False)
    assert p.returncode != 0 and "--force" in p.stderr
    assert metrics.read_text() == before  # nothing overwritten
    forced = run("layer_math.py", tmp, "--set", "strategies.layer_math.alpha=0.9", "--force")
    assert "[layer_math] reusing" not in forced.stdout
    assert json.loads(metrics.read_text())["params"]["alpha"] == 0.9


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
    assert rows[0].startswith("variant,fid") and len(rows) == 1 + 6
    for name in ("tradeoff.png", "grids.png"):
        assert (tmp / "runs" / "smoke" / "plots" / name).exists()


def test_poster_config_runs_one_step_on_cpu(tmp_path, data_root):
    """The real 35 M-parameter architecture, one training step, through the real script."""
    os.environ["LAQFI_DATA_ROOT"] = data_root
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "simplediffusion.py"), "--config",
                        os.path.join(ROOT, "configs/poster.yaml"), "--set", f"run.out_dir={tmp_path}",
                        "--set", "train.max_steps=1", "--set", "train.batch_size=2", "--set", "data.train_limit=64",
                        "--set", "sample.sampler=ddim", "--set", "sample.steps=1", "--set", "sample.grid_images=2",
                        "--set", "sample.batch_size=2", "--skip-eval", "--set", "fisher.n_samples=1",
                        "--set", "fisher.chunk_size=1", "--no-progress"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    info = json.load(open(tmp_path / "poster" / "baseline" / "model.json"))
    assert info["n_params"] == 35_178_689 and info["steps"] == 1
