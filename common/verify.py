"""``python -m common.verify runs/<run> [--problems]``: whether a run folder is intact (every recorded hash and
cross-reference; see ``common.experiments.verify``). Prints one table and ``verify: N files, K problems``;
exit status 1 if any."""
from common.experiments.verify import main

if __name__ == "__main__":
    main()
