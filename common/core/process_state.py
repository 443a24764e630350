"""State a module keeps for the life of one process (caches, warnings already printed, nesting depths).

Each module registers such state where it defines it, so ``reset_process_state()`` can give a process back what a
fresh interpreter has: the test suite runs the scripts inside its workers and calls it before and after each run
(tests/test_pipeline.py). A cache added later is covered by registering it here, not by a list in the tests.
"""
_RESETS = []  # (what, reset) in registration order


def per_process(state, reset=None, what: str = ""):
    """Registers ``state`` (a dict, set or list whose ``clear()`` empties it, or anything with ``reset``, a
    callable that restores a fresh process's value) and returns it, so a module writes
    ``_CACHE = per_process({})``."""
    if reset is None:
        if not callable(getattr(state, "clear", None)):
            raise TypeError(f"per_process({type(state).__name__}): no clear(); pass reset=")
        reset = state.clear
    _RESETS.append((what or type(state).__name__, reset))
    return state


def reset_process_state() -> list:
    """Restores every registered per-process state; returns the names registered (for a caller that reports)."""
    for _, reset in _RESETS:
        reset()
    return [what for what, _ in _RESETS]
