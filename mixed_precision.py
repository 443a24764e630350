"""Beyond the poster: budgeted mixed precision. For each importance metric in mixed_precision.metric
and each size budget in mixed_precision.budget ('25%' of fp32, '4.5bits' average, or '2.1MB'), choose one
format per eligible tensor among mixed_precision.formats that minimises the summed estimated loss
increase within the budget (exact MILP, common/quant/allocate.py), then quantize, reload and evaluate like any
strategy. Writes runs/<run>/mp_<metric>_<budget>/ and caches runs/<run>/baseline/importance/<metric>.pt.
"""
from common.core.budget import budget_tag
from common.experiments.pipeline import run_strategy_script

if __name__ == "__main__":
    run_strategy_script(__doc__, lambda cfg: [
        (f"mp_{m}_{budget_tag(b)}", "mixed_precision",
         {"metric": m, "budget": b, "formats": list(cfg.mixed_precision.formats)})
        for m in cfg.mixed_precision.metric for b in cfg.mixed_precision.budget])
