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
            ("uniform_int8", "int8_bf16"): _row(26, 320, 3e-4)}
    out = bench_backends.headline(rows)
    assert out == {"bf16_speedup": 2.0, "int8_speedup": 1.8, "int8_resident_ratio": 0.33, "int8_paired_mse_ratio": 2.0,
                   "int8bf16_speedup": 2.6, "int8bf16_resident_ratio": 0.32, "int8bf16_paired_mse_ratio": 3.0,
                   "int8bf16_vs_bf16": 1.3}
    rows["uniform_int8", "int8_bf16"] = {"error": "no oneDNN"}
    out = bench_backends.headline(rows)
    assert out["int8bf16_speedup"] is None and out["int8bf16_vs_bf16"] is None and out["int8_speedup"] == 1.8


def _seconds(cell):
    value, unit = cell.split()
    return float(value.replace(",", "")) * {"h": 3600, "min": 60, "s": 1}[unit]


def test_sweep_cost_sharding():
    cfg = load_config(os.path.join(ROOT, "configs", "poster.yaml"), [])
    m = {"params": 35e6, "batch": 8, "flops": {"sample": 1e10, "train": 3e10},
         "seconds": {"sample": 0.5, "train": 2.0}}
    work = sweep_cost.workload(cfg)
    kind, calls, variants = work["reproduce: 6 variants evaluated"]
    assert (kind, calls, variants) == ("sample", 6 * 5000 * 1 * 1000, None)
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
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sweep_cost.py"), "--gpu-tflops", "0"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert bad.returncode != 0 and "--gpu-tflops" in bad.stderr
