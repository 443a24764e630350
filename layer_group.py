"""Poster strategy 2: per-group thresholds. Stages are grouped (default Layer1-2 / Layer3-5 / Layer6);
within each group, quantize tensors whose Fisher normalized by the group's maximum is below the group's
threshold (strategies.layer_group.groups). Writes runs/<run>/layer_group/.
Needs simplediffusion.py to have run (checkpoint and Fisher).
"""
from common.experiments.pipeline import run_strategy_script

if __name__ == "__main__":
    run_strategy_script(__doc__, lambda cfg: [
        ("layer_group", "layer_group", {"groups": cfg.strategies.layer_group.groups})])
