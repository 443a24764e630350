"""benchmarks/: the headline figures of the backend table and the sweep-cost arithmetic (no timing asserted)."""
import math
import os
import subprocess
import sys

import pytest

from benchmarks import bench_backends, sweep_cost
from common.core.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(img_s, resident, mse):
    return {"img_s": img_s, "resident_bytes": resident, "paired_mse": mse, "top_ops": "op 100%"}


def test_headline_keys_and_ratios():
    rows = {("fp32", "dequant"): _row(10, 1000, 0.0),
            ("uniform_int8", "dequant"): _row(10, 1000, 1e-4),
            ("uniform_int8", "bf16"): _row(15, 500, 3e-4),
            ("uniform_int8", "bf16+compile"): _row(20, 500, 3e-4),
            ("uniform_int8", "int8"): _row(18, 330, 2e-4),
            ("uniform_int8", "int8_bf16"): _row(26, 320, 3e-4),
            ("uniform_int8", "int8+pct"): _row(18, 330, 1e-4)}
    out = bench_backends.headline(rows)
    assert out == {"bf16_speedup": 2.0, "int8_speedup": 1.8, "int8_resident_ratio": 0.33, "int8_paired_mse_ratio": 2.0,
                   "int8bf16_speedup": 2.6, "int8bf16_resident_ratio": 0.32, "int8bf16_paired_mse_ratio": 3.0,
                   "int8pct_speedup": 1.8, "int8pct_resident_ratio": 0.33, "int8pct_paired_mse_ratio": 1.0,
                   "int8bf16pct_speedup": None, "int8bf16pct_resident_ratio": None,
                   "int8bf16pct_paired_mse_ratio": None, "int8bf16_vs_bf16": 1.3,
                   **{f"{k}_paired_mse_ratio_ci": None for k in ("int8", "int8bf16", "int8pct", "int8bf16pct")},
                   **{f"smooth_{k}_{f}": None for k in ("int8", "int8bf16", "int8pct", "int8bf16pct")
                      for f in ("speedup", "paired_mse_ratio", "paired_mse_ratio_ci", "vs_plain", "vs_plain_ci")}}
    # the smoothed twin: its MSE against its own dequant row and against the plain plan's, speed against the plain's
    rows["uniform_int8_smooth", "dequant"] = _row(10, 1000, 2e-4)
    rows["uniform_int8_smooth", "int8_bf16+pct"] = _row(25, 330, 3e-4)
    out = bench_backends.headline(rows)
    assert (out["smooth_int8bf16pct_speedup"], out["smooth_int8bf16pct_paired_mse_ratio"],
            out["smooth_int8bf16pct_vs_plain"], out["smooth_int8_speedup"]) == (2.5, 1.5, 3.0, None)
    rows["uniform_int8", "int8_bf16"] = {"error": "no oneDNN"}
    out = bench_backends.headline(rows)
    assert out["int8bf16_speedup"] is None and out["int8bf16_vs_bf16"] is None and out["int8_speedup"] == 1.8


def test_paired_mse_ratio_has_a_bootstrap_interval_over_the_images():
    """Per-image paired MSEs give the ratio an interval: it holds the ratio, is paired (a constant per-image
    factor has no spread at all), and widens when one image carries the damage."""
    import numpy as np

    from common.experiments.statistics import ratio_interval

    rng = np.random.default_rng(1)
    den = rng.exponential(1e-4, 300)
    base = {"paired_mse": den.mean(), "per_image": den}
    r = {"paired_mse": 2 * den.mean(), "per_image": 2 * den}
    assert bench_backends._mse_ratio(r, base) == (2.0, [2.0, 2.0])
    num = den * rng.uniform(1, 3, 300)
    ratio, (lo, hi) = bench_backends._mse_ratio({"paired_mse": num.mean(), "per_image": num}, base)
    assert lo < ratio < hi and 1 < lo and hi < 3
    spiky = num.copy()
    spiky[0] += 300 * num.mean()  # one image that changed digit doubles the mean
    lo2, hi2 = ratio_interval(spiky, den)
    assert hi2 - lo2 > 3 * (hi - lo)
    assert ratio_interval(num[:1], den[:1]) is None and ratio_interval(num, den[:10]) is None
    diverged = num.copy()
    diverged[5] = float("nan")  # a row whose samples went NaN has no interval, not [nan, nan]
    assert ratio_interval(diverged, den) is None
    with pytest.raises(ValueError, match="one value per image"):
        ratio_interval(num.reshape(3, 100), den.reshape(3, 100))


def test_backend_seeds_are_distinct_and_not_the_calibration_seed(capsys):
    """Pooled seeds are independent images only if each is given once and none is the int8 calibration's noise."""
    import argparse

    from benchmarks.bench import check_backend_seeds

    ap = argparse.ArgumentParser(prog="bench.py")
    check_backend_seeds([0, 1, 2], 1234, ap)
    for seeds, text in (([0, 1, 0], "appears twice"), ([0, 1234], "backend.calib_seed")):
        with pytest.raises(SystemExit):
            check_backend_seeds(seeds, 1234, ap)
        assert text in capsys.readouterr().err
    assert bench_backends._mse_ratio(_row(1, 1, 1e-4), _row(1, 1, 1e-4)) == (1.0, None)  # no per-image figures


def test_int8_sites_study_rows_every_quantized_input_and_writes_its_table(tmp_path, capsys):
    """bench.py --part int8-sites on a tiny plan: one row per module whose input the int8 graph quantizes, the
    per-image damages of every row on the same images, the JSON and the plot written; its noise may not be a
    seed that judges the pick."""
    import argparse
    import json

    from benchmarks import bench, bench_int8_sites
    from common.evaluation.generate import build_runner, load_weights
    from common.quant import int8_sites

    cfg = load_config(os.path.join(ROOT, "configs", "smoke.yaml"), [f"run.out_dir={tmp_path}/runs",
                                                                      f"run.cache_dir={tmp_path}/cache",
                                                                      "backend.calib_images=4",
                                                                      "backend.int8_float_inputs=[Layer1]"])
    paths, _ = bench_backends.write_variants(cfg, str(tmp_path / "none.pt"), str(tmp_path / "bench"),
                                             ("fp32", "uniform_int8"))  # the bench's plan, less its smoothing
    rows = bench_int8_sites.run(cfg, paths["uniform_int8"], paths["fp32"], str(tmp_path), 4, 777)
    model, stored, _ = load_weights(paths["uniform_int8"], cfg)
    every = load_config(os.path.join(ROOT, "configs", "smoke.yaml"), ["backend.calib_images=4"])
    sites = int8_sites.activation_sites(build_runner(every, model, stored, "int8", "cpu", 4, False, False).fn)
    # every site of the all-int8 graph, the config's kept-float Layer1 included
    assert sorted(r["site"] for r in rows) == sorted(sites) and any(s.startswith("Layer1.") for s in sites)
    assert [r["median_vs_int8"] for r in rows] == sorted(r["median_vs_int8"] for r in rows)
    assert all(math.isfinite(r["mean_vs_int8"]) for r in rows)
    assert max(r["one_step_share"] for r in rows) > 0  # some input's rounding shows in one step
    saved = json.load(open(tmp_path / "int8_sites.json"))
    assert saved["seed"] == 777 and {len(v) for v in saved["per_image"]["sites"].values()} == {4}
    assert os.path.getsize(tmp_path / "int8_sites.png") > 0 and "input kept float" in capsys.readouterr().out
    ap = argparse.ArgumentParser(prog="bench.py")
    bench.check_sites_seed(777, cfg, [0, 1], ap)
    for seed in (cfg.eval.seeds[0], 1, cfg.backend.calib_seed):
        with pytest.raises(SystemExit):
            bench.check_sites_seed(seed, cfg, [0, 1], ap)


def test_emulated_bf16_rows_run_a_tenth_of_the_images():
    from benchmarks import bench

    avx2, native = {"native_bf16": False}, {"native_bf16": True}
    assert bench_backends.images_per_row(300, ["dequant", "bf16"], avx2) == 30  # all rows alike: still paired
    assert bench_backends.images_per_row(10, ["int8_bf16"], avx2) == 2
    assert bench_backends.images_per_row(300, ["dequant", "int8"], avx2) == 300
    assert bench_backends.images_per_row(300, ["bf16"], native) == 300
    import torch

    assert bench.gemm_size(torch.bfloat16, avx2) == 512 and bench.gemm_size(torch.bfloat16, native) == 2048
    assert bench.gemm_size(torch.float32, avx2) == 2048


def test_auto_choices_are_stated_per_variant(tmp_path, capsys):
    """The bench's auto section: dequant for fp32 and int8 plans (nothing else is exact), the probe for an all-bf16
    plan; a bf16 slower than dequant is never chosen."""
    cfg = load_config(os.path.join(ROOT, "configs", "smoke.yaml"), [f"run.out_dir={tmp_path}/runs",
                                                                      f"run.cache_dir={tmp_path}/cache"])
    paths, _ = bench_backends.write_variants(cfg, str(tmp_path / "none.pt"), str(tmp_path / "bench"),
                                             ("fp32", "uniform_int8"))
    speeds = {"dequant": 10.0, "bf16": 0.3}
    out = bench_backends.auto_choices(cfg, paths, probe=lambda m, b, *a: speeds[b])
    assert {v: c["backend"] for v, c in out.items()} == {"fp32": "dequant", "uniform_int8": "dequant",
                                                         "uniform_bf16 (every parameter)": "dequant"}
    assert out["uniform_bf16 (every parameter)"]["measured"] == speeds
    said = capsys.readouterr().out
    from common.core import machine

    assert f"auto on this machine ({machine.describe()})" in said and "bf16 0.03x dequant's speed" in said


def _seconds(cell):
    value, unit = cell.split()
    return float(value.replace(",", "")) * {"h": 3600, "min": 60, "s": 1}[unit]


def test_sweep_cost_sharding():
    cfg = load_config(os.path.join(ROOT, "configs", "poster.yaml"), [])
    m = {"params": 35e6, "batch": 8, "flops": {"sample": 1e10, "train": 3e10, "fisher": 3e10},
         "seconds": {"sample": 0.5, "train": 2.0, "fisher": 5.0}}
    work = sweep_cost.workload(cfg)
    assert work["Fisher"] == ("fisher", cfg.fisher.n_samples, None)  # priced as a Fisher sample, not a training image
    kind, calls, variants = work["reproduce: 6 variants evaluated"]
    assert (kind, calls, variants) == ("sample", 6 * 5000 * 1 * 1000, None)
    # the p sweep's variants count: the same rule as bench.py's reproduction figure (it was a fixed 6)
    two = load_config(os.path.join(ROOT, "configs", "poster.yaml"), ["strategies.layer_ratio.p=[0.25,0.4]"])
    assert sweep_cost.workload(two)["reproduce: 7 variants evaluated"][1] == 7 * 5000 * 1000
    compare = next(k for k in work if k.startswith("compare"))
    assert work[compare][2] == len(cfg.compare.metrics) * len(cfg.compare.budgets)
    text = sweep_cost.table(cfg, m, "cpu", [1, 8], 100.0)
    assert "**projected** at 100 TFLOP/s" in text
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {compare} "))
    one, eight = (_seconds(c) for c in line.strip("| ").split(" | ")[3:5])
    v = work[compare][2]
    assert eight == pytest.approx(one * math.ceil(v / 8) / v, rel=0.02)  # whole variants per rank: ceil(V/N) rounds
    line = next(ln for ln in text.splitlines() if ln.startswith("| reproduce"))
    one, eight = (_seconds(c) for c in line.strip("| ").split(" | ")[3:5])
    assert eight == pytest.approx(one / 8, rel=0.02)  # a variant's images split over the ranks
    fisher = next(ln for ln in text.splitlines() if ln.startswith("| Fisher"))
    assert _seconds(fisher.strip("| ").split(" | ")[2]) == pytest.approx(cfg.fisher.n_samples * 5.0, rel=0.02)
    assert f"batch {cfg.sample.batch_size} may come near" in text and "64 / 8 = 8 training images" in text


@pytest.mark.slow
def test_sweep_cost_script_measures_and_writes_docs(tmp_path):
    md = tmp_path / "d.md"
    md.write_text("# x\n<!-- sweep-cost:start -->\nold\n<!-- sweep-cost:end -->\ntail\n")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep_cost.py"), "--config",
                        os.path.join(ROOT, "configs", "smoke.yaml"), "--batch", "2", "--seconds", "0.05",
                        "--gpus", "1", "4", "--update-docs", str(md)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, p.stderr
    text = md.read_text()
    assert "old" not in text and text.endswith("tail\n") and "| 4 GPUs |" in text and "ms per sampling" in text
    assert "ms per Fisher sample" in text
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep_cost.py"), "--gpu-tflops", "0"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert bad.returncode != 0 and "--gpu-tflops" in bad.stderr


def test_a_spawned_row_reports_its_own_peak_rss_not_its_parents():
    """The bench runs each row in a spawned process for its own peak RSS; Linux carries ru_maxrss across fork +
    exec, so every row used to report at least the parent's RSS (2462 MB in each row of one run)."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc: peak_rss_mb falls back to ru_maxrss")
    import torch

    from benchmarks.bench import isolated
    from common.core import machine

    held = torch.ones(2**28)  # 1 GiB resident in the parent
    parent = machine.peak_rss_mb()
    child = isolated(machine.peak_rss_mb)
    assert parent > 1024 and child < parent - 700, (parent, child)
    del held


def test_a_row_whose_process_dies_is_an_error_not_a_hang():
    """A child that dies without answering (segfault, OOM killer) left the bench waiting on its queue forever."""
    from benchmarks.bench import isolated

    r = isolated(os._exit, 3)
    assert "died without a result (exit code 3)" in r["error"]
    assert isolated(math.sqrt, 16.0) == 4.0


def test_peak_rss_without_proc_reads_ru_maxrss_in_the_platforms_unit(monkeypatch):
    """Where /proc is missing, ru_maxrss is KB on Linux / BSD but bytes on macOS."""
    import builtins
    import resource
    import types

    from common.core import machine

    def no_proc(*a, **k):
        raise OSError("no /proc")

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=512 * 2 ** 20))
    monkeypatch.setattr(machine.sys, "platform", "darwin")
    assert machine.peak_rss_mb() == 512
    monkeypatch.setattr(machine.sys, "platform", "linux")
    assert machine.peak_rss_mb() == 512 * 1024


def test_sampling_warm_up_covers_the_timed_runs_last_batch(monkeypatch):
    """500 images at batch 300 end with a batch of 200: a compiled model recompiled for it inside the timed run."""
    from benchmarks import bench

    calls = []
    monkeypatch.setattr(bench, "sample", lambda model, sampler, n, shape, seed, bs, **kw: calls.append((n, bs)))
    cfg = load_config(os.path.join(ROOT, "configs", "smoke.yaml"), [])
    bench.bench_sampling(cfg, 5, 0, "fp32", batch=2)
    assert calls == [(2, 2), (1, 2), (5, 2)]  # warm-up: a full batch and the last one's shape; then the timed run
    # fewer images than the batch size: the batch it reports is the one that ran (the slow rows time a tenth of the
    # images and are compared with fp32 at that batch)
    assert bench.bench_sampling(cfg, 3, 0, "fp32", batch=8)["batch"] == 3
