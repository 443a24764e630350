"""Poster strategy 3: per-stage ratio. In every stage keep the top-p fraction of tensors (by Fisher)
at fp32 and quantize the rest; strategies.layer_ratio.p is one value or a list to sweep.
Writes runs/<run>/layer_ratio_p<p>/ for each p. Needs simplediffusion.py to have run (checkpoint and Fisher).
"""
from common.experiments.pipeline import run_strategy_script

if __name__ == "__main__":
    run_strategy_script(__doc__, lambda cfg: [
        (f"layer_ratio_p{p:g}", "layer_ratio", {"p": p}) for p in cfg.strategies.layer_ratio.p])
