"""Under torchrun (2 ranks, gloo, CPU) the scripts give what one process gives: a training step, the Fisher,
the evaluation's samples and metrics, a sweep's variants; and a rank that fails ends the run quickly."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from test_pipeline import ROOT, run

from common.core.config import load_config
from common.core.storage import fingerprint
from common.diffusion.checkpoint import training_inputs

SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
CLF = ["--set", "eval.classifier.train_limit=300"]


def torchrun(script, tmp, *extra, ranks=2, timeout=600, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", LAQFI_DIST_TIMEOUT="120")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           os.path.join(ROOT, script), "--config", SMOKE, "--set", f"run.out_dir={tmp}/runs", "--set",
           f"run.cache_dir={tmp}/cache", "--no-progress", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"torchrun {script} failed:\n{p.stdout[-3000:]}\n" + "\n".join(
            ln for ln in p.stderr.splitlines() if "rank0]" not in ln)[-4000:])
    return p


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, data_root):
    """The reference: a plain run (training, Fisher, fp32 and uniform evaluation)."""
    tmp = tmp_path_factory.mktemp("dist")
    os.environ["LAQFI_DATA_ROOT"] = data_root
    run("simplediffusion.py", tmp, *CLF)
    return tmp


def test_two_ranks_evaluate_and_compute_fisher_like_one(one_rank):
    tmp = one_rank
    ref, two = tmp / "runs" / "smoke", tmp / "runs" / "two"
    (two / "baseline").mkdir(parents=True)
    shutil.copy(ref / "baseline" / "checkpoint.pt", two / "baseline" / "checkpoint.pt")  # same weights; Fisher,
    torchrun("simplediffusion.py", tmp, "--set", "run.name=two", *CLF)  # samples and metrics recomputed on 2 ranks
    for v in ("fp32", "uniform_fp16"):
        a, b = (json.load(open(d / v / "metrics.json")) for d in (ref, two))
        for seed in a["per_seed"]:
            xa, xb = (torch.load(d / v / f"samples_seed{seed}.pt") for d in (ref, two))
            assert torch.equal(xa, xb), (v, seed)  # each image's noise comes from its batch index, not the rank
            for key in ("clf_fid", "clf_is", "paired_mse_vs_fp32", "samples_sha256"):
                assert a["per_seed"][seed][key] == b["per_seed"][seed][key], (v, key)
        assert b["world_size"] == 2 and a["world_size"] == 1
    fa, fb = (torch.load(d / "baseline" / "fisher.pt") for d in (ref, two))
    for n in fa["diag"]:
        assert torch.allclose(fa["diag"][n], fb["diag"][n], rtol=1e-5, atol=1e-12), n


def test_two_ranks_train_the_same_step_as_one(one_rank):
    tmp = one_rank
    step = ["--set", "train.max_steps=1", "--skip-eval"]
    run("simplediffusion.py", tmp, "--set", "run.name=t1", *step)
    torchrun("simplediffusion.py", tmp, "--set", "run.name=t2", *step)
    a, b = (torch.load(tmp / "runs" / n / "baseline" / "checkpoint.pt", weights_only=True) for n in ("t1", "t2"))
    assert a["step"] == b["step"] == 1
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6), k
    assert abs(a["loss_history"][0] - b["loss_history"][0]) < 1e-5
    # --resume across a changed N: the 2 ranks' step 1, made the partial checkpoint of a 2-step run (what an
    # interruption after step 1 leaves: the smoke config's learning rate does not depend on the step count),
    # continued by one process = 2 steps of one process
    two_steps = load_config(SMOKE, ["train.max_steps=2"])
    path = tmp / "runs" / "t2" / "baseline" / "checkpoint.pt"
    b["config"]["train"]["max_steps"], b["total_steps"], b["finished"] = 2, 2, False
    b["training_inputs"], b["fingerprint"] = training_inputs(two_steps), fingerprint(training_inputs(two_steps))
    for f in path.parent.iterdir():  # an interrupted training leaves only its checkpoint
        f.unlink()
    torch.save(b, path)
    run("simplediffusion.py", tmp, "--set", "run.name=t2", "--set", "train.max_steps=2", "--skip-eval", "--resume")
    run("simplediffusion.py", tmp, "--set", "run.name=s1", "--set", "train.max_steps=2", "--skip-eval")
    a, b = (torch.load(tmp / "runs" / n / "baseline" / "checkpoint.pt", weights_only=True) for n in ("s1", "t2"))
    assert a["step"] == b["step"] == 2 and b["finished"]
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6), k
    bad = torchrun("simplediffusion.py", tmp, "--set", "run.name=t3", "--set", "train.batch_size=15", *step,
                   check=False)
    assert bad.returncode != 0 and "does not divide among 2 ranks" in bad.stderr


def test_a_sweep_hands_whole_variants_to_ranks(one_rank):
    tmp = one_rank
    grid = ["--set", "act_quant.budgets=[W4A6]", "--set", "act_quant.plans=[uniform, fisher]", "--set",
            "act_quant.range_modes=[single]", *CLF]
    run("act_quant.py", tmp, *grid)
    other = tmp / "runs" / "sweep2"
    shutil.copytree(tmp / "runs" / "smoke" / "baseline", other / "baseline")
    torchrun("act_quant.py", tmp, "--set", "run.name=sweep2", *grid)
    for v in ("fp32", "uniform_W4A6_single", "fisher_W4A6_single"):
        a, b = (json.load(open(d / "act_quant" / v / "metrics.json")) for d in (tmp / "runs" / "smoke", other))
        assert a["paired_mse_vs_fp32"] == b["paired_mse_vs_fp32"] and a["clf_fid"] == b["clf_fid"], v
    assert (other / "act_quant" / "summary.md").exists()


def test_a_failing_rank_ends_the_run_quickly(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys, torch\nfrom common.core import distributed\n"
                      "distributed.init(torch.device('cpu'))\n"
                      "if distributed.rank() == 1:\n    raise SystemExit('rank 1 fails on purpose')\n"
                      "distributed.barrier()\nprint('unreachable')\n")
    env = dict(os.environ, PYTHONPATH=ROOT, LAQFI_DIST_TIMEOUT="30")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode != 0 and "rank 1 fails on purpose" in p.stderr and "unreachable" not in p.stdout
    assert time.time() - t0 < 120
