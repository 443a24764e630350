"""End to end on configs/smoke.yaml: scripts, reuse, staleness, paired noise, report."""
import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

from common.core.process_state import reset_process_state

pytestmark = pytest.mark.slow  # end to end: scripts on the smoke config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["simplediffusion.py", "whole_threshold.py", "layer_group.py", "layer_ratio.py", "layer_math.py"]


# Scripts run in the test's own process unless LAQFI_TEST_SUBPROCESS=1: a new interpreter spends ~3.5 s importing
# torch, torchvision and the metrics before the smoke run's first step, about a third of the whole suite.
IN_PROCESS = os.environ.get("LAQFI_TEST_SUBPROCESS", "0") in ("", "0")


def run_in_process(cmd, cwd) -> subprocess.CompletedProcess:
    """``cmd`` ([python, script, args...]) as ``__main__`` in this process, in ``cwd``, with its stdout / stderr
    captured, returning what ``subprocess.run`` would: exit status 1 and the traceback for an uncaught exception,
    ``sys.exit``'s message on stderr, warnings printed there under a new interpreter's filters (pytest would
    otherwise record them, and a test of a one-line error would not see one it printed). The working directory,
    argv, environment and torch's threads come back."""
    import contextlib
    import io
    import traceback
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv[:], os.getcwd(), dict(os.environ), torch.get_num_threads()
    reset_process_state()
    code = 0
    try:
        sys.argv = list(cmd[1:])
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.resetwarnings()  # Python's own defaults, as a script started with `python` has them
            for action, category in (("ignore", ResourceWarning), ("ignore", ImportWarning),
                                     ("ignore", PendingDeprecationWarning), ("ignore", DeprecationWarning)):
                warnings.simplefilter(action, category)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            warnings.showwarning = show
            try:
                runpy.run_path(cmd[1], run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, int) or e.code is None:
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, cwd0, env, threads = saved
        os.chdir(cwd0)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(threads)
        reset_process_state()
    return subprocess.CompletedProcess(cmd, code, out.getvalue(), err.getvalue())


def script_cmd(script, tmp, *extra) -> list:
    """The command line of ``script`` on the smoke config, writing under ``tmp``."""
    return [sys.executable, os.path.join(ROOT, script), "--config", os.path.join(ROOT, "configs/smoke.yaml"),
            "--set", f"run.out_dir={tmp}/runs", "--set", f"run.cache_dir={tmp}/cache", "--no-progress", *extra]


def run_in_subprocess(cmd, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=cwd)


def run(script, tmp, *extra, check=True):
    p = (run_in_process if IN_PROCESS else run_in_subprocess)(script_cmd(script, tmp, *extra), tmp)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, smoke_baseline):
    tmp = smoke_baseline(tmp_path_factory.mktemp("pipe"))  # the shared training and Fisher; evaluation here
    outs = {s: run(s, tmp) for s in SCRIPTS}
    return tmp, outs


def test_strategy_without_baseline_names_simplediffusion(tmp_path, data_root):
    os.environ["LAQFI_DATA_ROOT"] = data_root
    p = run("layer_math.py", tmp_path, "--set", "run.name=mine", check=False)
    assert p.returncode != 0
    assert "simplediffusion.py" in p.stderr and "checkpoint.pt" in p.stderr
    # Following the hint trains the run the user asked for, not the config's default one.
    assert f"--set run.out_dir={tmp_path}/runs --set run.cache_dir={tmp_path}/cache --set run.name=mine" in p.stderr
    assert not os.path.exists(tmp_path / "runs" / "mine")  # the error leaves no empty run folder behind


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
    from common.core.config import load_config
    from common.diffusion.samplers import build_sampler, sample
    from common.diffusion.schedule import NoiseSchedule
    from common.quant.container import load_quantized

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
    run_dir = copy_run(pipeline_run, "rerun")  # a copy: the shared smoke run keeps its default results
    vdir = run_dir / "layer_math"
    again = run("layer_math.py", tmp, "--set", "run.name=rerun")
    assert "[layer_math] reusing" in again.stdout
    qfile = vdir / "quantized.safetensors"
    qfile.rename(vdir / "kept.safetensors")
    (vdir / "quantized.pt").write_bytes(b"an old torch.save container")  # a run made before file version 3
    # results whose file is not there are not reused
    gone = run("layer_math.py", tmp, "--set", "run.name=rerun", check=False)
    assert gone.returncode != 0 and str(qfile) in gone.stderr and "--force" in gone.stderr
    (vdir / "kept.safetensors").rename(qfile)
    metrics = vdir / "metrics.json"
    before = metrics.read_text()
    p = run("layer_math.py", tmp, "--set", "run.name=rerun", "--set", "strategies.layer_math.alpha=0.9", check=False)
    assert p.returncode != 0 and "--force" in p.stderr
    assert metrics.read_text() == before  # nothing overwritten
    forced = run("layer_math.py", tmp, "--set", "run.name=rerun", "--set", "strategies.layer_math.alpha=0.9", "--force")
    assert "[layer_math] reusing" not in forced.stdout
    assert not (vdir / "quantized.pt").exists()  # the superseded pickle container is removed
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
    from common.core.config import load_config
    from common.core.errors import StaleArtifactError
    from common.evaluation.evaluate import paired_mse

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
    art = torch.load(tmp / "runs" / "smoke" / "baseline" / "fisher.pt", weights_only=True)
    for k in ("diag", "per_tensor", "per_layer", "timestep_profile", "meta"):
        assert k in art
    assert art["meta"]["n_samples"] == 8 and art["meta"]["eligible_rule"] == "poster"
    assert len(art["meta"]["checkpoint_sha256"]) == 64
    assert "| Layer1 |" in outs["simplediffusion.py"].stdout
    for name in ("fisher_per_layer.png", "fisher_per_tensor.png", "fisher_timestep_profile.png"):
        assert (tmp / "runs" / "smoke" / "plots" / name).stat().st_size > 1000


def test_report(pipeline_run):
    tmp, _ = pipeline_run
    from common.experiments import report

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
    # write_summary now writes through the experiments' write_summary_files: the files it wrote itself before
    import csv
    import io

    from common.core.storage import seal_ok, sha256_file

    results = report.load_results(run_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=report.COLUMNS)
    w.writeheader()
    w.writerows(report.rows(results))
    assert (tmp / "runs" / "smoke" / "summary.csv").read_bytes() == buf.getvalue().encode()  # \r\n kept
    assert (tmp / "runs" / "smoke" / "summary.md").read_text() == text
    man = json.load(open(tmp / "runs" / "smoke" / "summary.sources.json"))
    assert seal_ok(man) and man["command"] == "python -m common.report " + run_dir
    assert set(man["sources"]) == {f"{v}/metrics.json" for v in results} | {"baseline/fisher.pt"}
    assert {"summary.csv", "summary.md", "plots/tradeoff.png", "plots/grids.png"} <= set(man["outputs"])
    assert not any("fisher_" in k for k in man["outputs"])  # the Fisher plots have their own record
    assert man["sources"]["baseline/fisher.pt"] == sha256_file(tmp / "runs" / "smoke" / "baseline" / "fisher.pt")


def test_sub_run_configs_have_one_spelling(tmp_path):
    """``sensitivity.snapshot_config`` is ``sub_run_config`` plus the snapshot as baseline: the same config as the
    code it replaced (copied here)."""
    import copy

    from common.core.config import load_config, to_dict
    from common.core.storage import sha256_file
    from common.experiments import pipeline, sensitivity

    cfg = load_config(os.path.join(ROOT, "configs", "smoke.yaml"), ["sensitivity.n_images=6",
                                                                     "eval.inception_n_images=40"])
    path = tmp_path / "ema_step0000004.safetensors"
    path.write_bytes(b"weights")
    want = copy.deepcopy(cfg)  # before the fold
    want.run.name = f"{cfg.run.name}/sensitivity/ema_step0000004"
    want.baseline.weights, want.baseline.sha256 = str(path), sha256_file(path)
    s = cfg.sensitivity
    want.eval.n_images, want.eval.seeds, want.eval.inception = s.n_images, list(s.seeds), s.inception
    want.eval.inception_n_images = min(cfg.eval.inception_n_images or s.n_images, s.n_images)
    want.sample.batch_size = min(cfg.sample.batch_size, s.n_images)
    got = sensitivity.snapshot_config(cfg, str(path))
    assert to_dict(got) == to_dict(want) and got.eval.n_images == 6 and got.sample.batch_size == 6
    assert to_dict(pipeline.sub_run_config(cfg, "x", s))["eval"] == to_dict(want)["eval"]


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
    # each metric's scores computed once, where the allocator reads them (they were computed twice, in two folders)
    made = [line for line in p.stdout.splitlines() if line.startswith("[importance] magnitude in")]
    assert len(made) <= 1 and all(os.path.join("compare", "baseline", "importance") in line for line in made)


def test_released_weights_are_verified_and_used_without_training(pipeline_run):
    """--release exports the smoke training; a run naming it (baseline.weights + sha256) trains nothing, binds
    every result to the file's SHA-256, and a changed file is refused with what to do."""
    tmp, _ = pipeline_run
    out = tmp / "released" / "smoke.safetensors"
    p = run("simplediffusion.py", tmp, "--release", str(out))
    sha = next(line.split("sha256: ")[1] for line in p.stdout.splitlines() if "sha256: " in line).strip()
    prov = json.load(open(tmp / "released" / "smoke.json"))
    assert prov["sha256"] == sha and prov["step"] == 3 and "simplediffusion.py" in prov["retrain_command"]
    # its loss_ema is the training's running loss (as the snapshots record it), not a plain mean of the last steps
    from common.core.storage import load_torch
    from common.diffusion.baseline import running_loss

    history = load_torch(str(tmp / "runs" / "smoke" / "baseline" / "checkpoint.pt"))["loss_history"]
    assert prov["final_loss_ema"] == pytest.approx(running_loss(history), abs=1e-6)
    assert running_loss(history) != pytest.approx(sum(history) / len(history), abs=1e-6)
    rel = ["--set", f"baseline.weights={out}", "--set", f"baseline.sha256={sha}", "--set", "run.name=rel"]
    first = run("simplediffusion.py", tmp, *rel)
    assert "released weights" in first.stdout and "no training" in first.stdout
    assert not (tmp / "runs" / "rel" / "baseline" / "checkpoint.pt").exists()
    run("layer_ratio.py", tmp, *rel)
    m = json.load(open(tmp / "runs" / "rel" / "layer_ratio_p0.25" / "metrics.json"))
    assert m["checkpoint_sha256"] == sha and {"kid", "kid_std", "clf_kid", "clf_kid_std"} <= set(m)
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF
    out.write_bytes(bytes(data))
    bad = run("layer_ratio.py", tmp, *rel, check=False)
    assert bad.returncode != 0 and "SHA-256" in bad.stderr and "Traceback" not in bad.stderr
    hint = bad.stderr.split("train from scratch:")[1]
    assert "git checkout" not in bad.stderr  # the file lies outside the repository
    assert "--set baseline.weights=null" in hint and f"baseline.weights={out}" not in hint
    samp = run("sample.py", tmp, *rel, "--n", "2", check=False)  # sample.py verifies it the same way
    assert samp.returncode != 0 and samp.stderr.strip() == bad.stderr.strip()


# ----------------------------------------------------------------------------- reliability (issue 18)
def copy_run(pipeline_run, name):
    """A private copy of the finished smoke run (every artifact reusable) as run ``name``, for tests that
    damage files; returns its folder."""
    tmp, _ = pipeline_run
    shutil.copytree(tmp / "runs" / "smoke", tmp / "runs" / name)
    return tmp / "runs" / name


def run_here(script, tmp, name, *extra, monkeypatch):
    """Run ``script`` in this process on run ``name`` (no interpreter start-up); returns the SystemExit
    message ('error: ...', one line) or 0."""
    argv = [script, "--config", os.path.join(ROOT, "configs/smoke.yaml"), "--set", f"run.out_dir={tmp}/runs",
            "--set", f"run.cache_dir={tmp}/cache", "--set", f"run.name={name}", "--no-progress", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    reset_process_state()  # as run_in_process: each run hashes and reports like a new process
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as e:
        return e.code or 0
    finally:
        reset_process_state()
    return 0


def half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_two_runs_of_one_variant_wait_and_never_mix(pipeline_run):
    """Two whole_threshold.py processes with different thresholds on one variant: both queue on its lock
    (held here meanwhile), then one computes and the other refuses; the files agree with each other."""
    from common.core import lock, storage

    tmp, _ = pipeline_run
    run_dir = copy_run(pipeline_run, "race")
    vdir = run_dir / "whole_threshold"
    shutil.rmtree(vdir)
    env = dict(os.environ, PYTHONPATH=ROOT)
    procs = {}
    with lock.hold(str(vdir)):
        for thr in ("0.01", "0.9"):
            procs[thr] = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "whole_threshold.py"), "--config",
                 os.path.join(ROOT, "configs/smoke.yaml"), "--set", f"run.out_dir={tmp}/runs", "--set",
                 f"run.cache_dir={tmp}/cache", "--set", "run.name=race", "--set",
                 f"strategies.whole_threshold.threshold={thr}", "--no-progress"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp)
        for p in procs.values():  # both are waiting for the variant's lock before we let go
            line = ""  # a process may first wait briefly for baseline/, which the other is reading
            while not ("[lock]" in line and str(vdir) in line):
                line = p.stdout.readline()
                assert line, p.stderr.read()
            assert f"is locked by pid {os.getpid()}" in line and "waiting" in line
    outs = {thr: (p.wait(), p.stdout.read(), p.stderr.read()) for thr, p in procs.items()}
    winners = [thr for thr, (rc, _, _) in outs.items() if rc == 0]
    assert len(winners) == 1, outs
    loser = next(thr for thr in outs if thr not in winners)
    assert "holds results of a different configuration" in outs[loser][2] and "--force" in outs[loser][2]
    metrics = json.load(open(vdir / "metrics.json"))
    plan = json.load(open(vdir / "plan.json"))
    assert metrics["params"]["threshold"] == plan["params"]["threshold"] == float(winners[0])
    assert metrics["quantized_sha256"] == storage.sha256_file(vdir / "quantized.safetensors")


@pytest.mark.parametrize("victim", ["quantized.safetensors", "metrics.json"])
def test_truncated_result_file_is_caught_on_reuse_and_force_recovers(pipeline_run, monkeypatch, victim):
    from common.core import storage
    from common.experiments import report

    run_dir = copy_run(pipeline_run, f"trunc_{victim[:-3]}")
    tmp, vdir = pipeline_run[0], run_dir / "layer_math"
    half(vdir / victim)
    msg = run_here("layer_math.py", tmp, run_dir.name, monkeypatch=monkeypatch)
    assert str(vdir / victim) in msg and "--force" in msg and "\n" not in msg
    assert "reusing" not in msg
    with pytest.raises(ValueError, match=victim):  # the report does not print a row it cannot trust
        report.load_results(str(run_dir))
    assert run_here("layer_math.py", tmp, run_dir.name, "--force", monkeypatch=monkeypatch) == 0
    metrics = storage.load_json(vdir / "metrics.json")
    assert metrics["quantized_sha256"] == storage.sha256_file(vdir / "quantized.safetensors")
    assert run_here("layer_math.py", tmp, run_dir.name, monkeypatch=monkeypatch) == 0  # and is reused again


def test_the_report_never_tabulates_rows_measured_with_other_instruments(pipeline_run):
    """One row measured with another classifier (a retrained one, another CPU's) beside the others: the
    fingerprint holds the same settings, so only the recorded instruments tell them apart."""
    from common.core import storage
    from common.experiments import report

    run_dir = copy_run(pipeline_run, "instruments")
    report.load_results(str(run_dir))  # as written: one instrument
    path = run_dir / "layer_math" / "metrics.json"
    m = json.load(open(path))
    m["classifier"]["sha256"] = "0" * 64
    storage.atomic_write_record(m, path)  # sealed as the evaluation writes it: only the instrument differs
    with pytest.raises(ValueError, match="instruments: .*layer_math"):
        report.load_results(str(run_dir))


def test_changed_or_corrupt_fisher_is_refused_and_force_recomputes(pipeline_run, monkeypatch):
    from common.core.storage import load_torch

    run_dir = copy_run(pipeline_run, "fisher_change")
    tmp, fisher = pipeline_run[0], run_dir / "baseline" / "fisher.pt"
    msg = run_here("layer_math.py", tmp, run_dir.name, "--set", "fisher.n_samples=4", monkeypatch=monkeypatch)
    assert str(fisher) in msg and "fisher.n_samples" in msg and "--recompute-fisher" in msg
    half(fisher)
    msg = run_here("layer_math.py", tmp, run_dir.name, monkeypatch=monkeypatch)
    assert str(fisher) in msg and "truncated or corrupt" in msg and "--recompute-fisher" in msg and "\n" not in msg
    assert run_here("layer_math.py", tmp, run_dir.name, "--set", "fisher.n_samples=4", "--force",
                    monkeypatch=monkeypatch) == 0
    assert load_torch(str(fisher))["meta"]["n_samples"] == 4


@pytest.mark.parametrize("damage", ["truncate", "plant"])
def test_damaged_checkpoint_is_one_line_naming_it(pipeline_run, monkeypatch, damage):
    """A truncated checkpoint, or a pickle planted in its place that would run code when unpickled."""
    run_dir = copy_run(pipeline_run, f"ckpt_{damage}")
    tmp, ckpt, marker = pipeline_run[0], run_dir / "baseline" / "checkpoint.pt", run_dir / "pwned"
    if damage == "truncate":
        half(ckpt)
    else:
        class Planted:
            def __reduce__(self):
                return os.mkdir, (str(marker),)

        torch.save({"ema": Planted()}, ckpt)
    for script in ("layer_math.py", "simplediffusion.py"):
        msg = run_here(script, tmp, run_dir.name, monkeypatch=monkeypatch)
        assert msg.startswith(f"error: {ckpt} ") and "\n" not in msg
        assert "--retrain" in msg and f"--set run.name={run_dir.name}" in msg
    assert not marker.exists()


def test_baseline_grid_shows_the_evaluations_first_images(tiny_model_fisher, tmp_path):
    """A stochastic sampler draws each step's noise for its whole batch: a grid of fewer images than the batch
    drawn alone showed other digits than the evaluation's seed (baseline/samples.png vs fp32/samples.png)."""
    import copy

    import numpy as np
    from PIL import Image

    from common.diffusion.data import to_uint8
    from common.diffusion.samplers import build_sampler, sample
    from common.diffusion.schedule import NoiseSchedule
    from common.evaluation.grids import save_grid
    from common.experiments.pipeline import write_sample_grid

    cfg, model, _ = tiny_model_fisher
    cfg = copy.deepcopy(cfg)
    cfg.sample.grid_images, cfg.sample.batch_size, cfg.eval.n_images, cfg.sample.steps = 4, 8, 8, 3
    cfg.sample.eta = 1.0  # stochastic DDIM, as configs/default.yaml samples
    sampler = build_sampler(cfg.sample, NoiseSchedule.from_config(cfg.diffusion))
    assert sampler.stochastic  # per-step noise
    write_sample_grid(cfg, model, str(tmp_path / "grid.png"), "cpu", progress=False)
    x = sample(model, sampler, 8, (1, 32, 32), cfg.eval.seeds[0], 8, progress=False)  # the evaluation's batch
    save_grid(to_uint8(x[:4]).float() / 255, str(tmp_path / "eval.png"))
    assert (np.asarray(Image.open(tmp_path / "grid.png")) == np.asarray(Image.open(tmp_path / "eval.png"))).all()
