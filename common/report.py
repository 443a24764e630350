"""``python -m common.report runs/<run> [--update-docs docs/results.md]``: the command line of
``common.experiments.report`` (summary.md/csv, plots, verdicts), kept at the path users type."""
from common.experiments.report import main

if __name__ == "__main__":
    main()
