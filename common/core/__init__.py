"""Shared plumbing: typed config, budgets, errors, atomic storage, locks, CLI helpers, per-process state.
Imports nothing of ours."""
