"""Poster strategy 1: one global threshold. Quantize (to quant.format) every eligible tensor whose
Fisher, normalized by the maximum over all eligible tensors, is below strategies.whole_threshold.threshold.
Writes runs/<run>/whole_threshold/{quantized.safetensors, plan.json, metrics.json}.
Needs simplediffusion.py to have run (checkpoint and Fisher).
"""
from common.experiments.pipeline import run_strategy_script

if __name__ == "__main__":
    run_strategy_script(__doc__, lambda cfg: [
        ("whole_threshold", "whole_threshold", {"threshold": cfg.strategies.whole_threshold.threshold})])
