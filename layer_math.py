"""Poster strategy 4: per-stage mean/std rule. In every stage quantize tensors with
Fisher < mean - k*std, k = clamp(alpha*mean/std, k_min, k_max) (strategies.layer_math).
Writes runs/<run>/layer_math/. Needs simplediffusion.py to have run (checkpoint and Fisher).
"""
from common.experiments.pipeline import run_strategy_script

if __name__ == "__main__":
    run_strategy_script(__doc__, lambda cfg: [
        ("layer_math", "layer_math", {"alpha": cfg.strategies.layer_math.alpha,
                                      "k_min": cfg.strategies.layer_math.k_min,
                                      "k_max": cfg.strategies.layer_math.k_max})])
