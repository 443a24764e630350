"""act_quant.py end to end on configs/smoke.yaml: files, budgets, reuse, sampling from the saved files."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # end to end: scripts on the smoke config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The classifier only has to exist here (its quality is tested elsewhere): 300 images train it in seconds.
GRID = ["act_quant.budgets=[W4A6]", "act_quant.plans=[uniform, fisher]", "eval.classifier.train_limit=300"]


def run(script, tmp, *sets, flags=(), check=True):
    """test_pipeline's runner (smoke config, outputs under ``tmp``) with ``--set`` for each of ``sets``."""
    from test_pipeline import run as run_script

    return run_script(script, tmp, *[a for kv in sets for a in ("--set", kv)], *flags, check=check)


@pytest.fixture(scope="module")
def act_run(tmp_path_factory, smoke_baseline):
    tmp = smoke_baseline(tmp_path_factory.mktemp("act"))  # the shared smoke run: trained + Fisher only
    return tmp, run("act_quant.py", tmp, *GRID)


def test_help_and_config_errors():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "act_quant.py"), "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0 and "--config" in p.stdout and "--update-docs" in p.stdout
    from common.core.config import ConfigError, load_config
    from common.quant.calibrate import check_act_quant_groups

    with pytest.raises(ConfigError, match="act_quant.budgets.*W4A5.*act_quant.a_bits"):
        load_config(os.path.join(ROOT, "configs/smoke.yaml"), ["act_quant.budgets=[W4A5]"])
    four = load_config(os.path.join(ROOT, "configs/smoke.yaml"), ["act_quant.timestep_groups=4"])  # loads: other
    with pytest.raises(ConfigError, match="act_quant.timestep_groups"):  # scripts may sample with fewer steps, but
        check_act_quant_groups(four)  # act_quant.py cannot fill 4 groups from 3 DDIM steps


def test_every_variant_is_evaluated_with_its_bits_and_bops(act_run):
    tmp, _ = act_run
    out = tmp / "runs" / "smoke" / "act_quant"
    m = {v: json.load(open(out / v / "metrics.json")) for v in
         ("uniform_W4A6_single", "fisher_W4A6_single", "uniform_W4A6_group", "fisher_W4A6_group")}
    for v, r in m.items():
        assert {"w_bits", "a_bits", "bops"} <= set(r) and r["paired_mse_vs_fp32"] > 0
        assert (out / v / "act_quant.safetensors").exists() and (out / v / "quantized.safetensors").exists()
        plan = json.load(open(out / v / "plan.json"))
        assert sum(x["bops"] for x in plan["modules"].values()) == r["bops"]
        first = plan["modules"]["shallow_conv"]
        assert (first["w_format"], first["a_bits"]) == ("fp32", None)  # kept: fp32 weights, float input
    for mode in ("single", "group"):  # the same BOPs budget for both plans
        assert m[f"fisher_W4A6_{mode}"]["bops"] <= m[f"uniform_W4A6_{mode}"]["bops"]
        assert m[f"uniform_W4A6_{mode}"]["a_bits"] == pytest.approx(6, abs=0.2)  # all 6 bits but the float first/last
    md = (out / "summary.md").read_text()
    assert "W4A6, single ranges: fisher vs uniform" in md and "W4A6, uniform: per-group vs single ranges" in md
    assert (out / "act_quant.png").stat().st_size > 1000
    assert len((out / "summary.csv").read_text().splitlines()) == 1 + 5 * 2  # fp32 + 4 variants, 2 seeds


def test_samples_come_from_the_saved_files(act_run):
    from common.core.config import load_config
    from common.diffusion.samplers import build_sampler, sample
    from common.diffusion.schedule import NoiseSchedule
    from common.quant.activations import load_act_quant
    from common.quant.container import load_quantized

    tmp, _ = act_run
    cfg = load_config(os.path.join(ROOT, "configs/smoke.yaml"))
    vdir = tmp / "runs" / "smoke" / "act_quant" / "fisher_W4A6_group"
    model, _ = load_quantized(str(vdir / "quantized.safetensors"))
    q, prov = load_act_quant(str(vdir / "act_quant.safetensors"))
    assert prov["range_mode"] == "group" and q.groups == cfg.act_quant.timestep_groups
    q.attach(model)
    x = sample(model, build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion)), cfg.act_quant.n_images,
               (1, 32, 32), 0, cfg.sample.batch_size, progress=False)
    assert torch.equal((x.clamp(-1, 1) + 1) / 2, torch.load(vdir / "samples_seed0.pt"))


def test_rerun_reuses_everything(act_run):
    tmp, _ = act_run
    again = run("act_quant.py", tmp, *GRID)
    for v in ("uniform_W4A6_single", "fisher_W4A6_group"):
        assert f"[{v}] reusing" in again.stdout
    assert "reusing calibrated ranges" in again.stdout and "reusing activation importance" in again.stdout


def test_sample_py_applies_the_activation_quantizers(act_run):
    """sample.py on an act_quant variant reproduces the evaluation's samples (same seed and batch), and a
    backend that would ignore the activation plan is refused."""
    import numpy as np

    tmp, _ = act_run
    vdir = tmp / "runs" / "smoke" / "act_quant" / "fisher_W4A6_group"
    n = torch.load(vdir / "samples_seed0.pt").shape[0]
    run("sample.py", tmp, flags=["--variant-file", str(vdir / "quantized.safetensors"), "--n", str(n), "--seed", "0",
                                 "--backend", "dequant", "--out", str(tmp / "s")])
    x = torch.from_numpy(np.load(tmp / "s" / "samples.npz")["x"])
    assert torch.equal((x.clamp(-1, 1) + 1) / 2, torch.load(vdir / "samples_seed0.pt"))
    assert json.load(open(tmp / "s" / "sample.json"))["source"]["act_quant"]["sha256"]
    bad = run("sample.py", tmp, flags=["--variant-file", str(vdir / "quantized.safetensors"), "--n", "2",
                                       "--backend", "int8", "--out", str(tmp / "s8")], check=False)
    assert bad.returncode != 0 and "act_quant.safetensors" in bad.stderr and "Traceback" not in bad.stderr
    # the activation file gone (or swapped): refused, never sampled weight-only or with another plan
    other = vdir.parent / "uniform_W4A6_group" / "act_quant.safetensors"
    work = vdir.parent / "damaged_copy"  # beside the original: its fp32 reference resolves the same
    for damage in (lambda p: p.unlink(), lambda p: p.write_bytes(other.read_bytes())):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(vdir, work)
        damage(work / "act_quant.safetensors")
        bad = run("sample.py", tmp, flags=["--variant-file", str(work / "quantized.safetensors"), "--n", "2",
                                           "--out", str(tmp / "s_bad")], check=False)
        assert bad.returncode != 0 and "act_quant.safetensors" in bad.stderr and "Traceback" not in bad.stderr
        assert not (tmp / "s_bad").exists()
    shutil.rmtree(work)
