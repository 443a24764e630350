"""Shared plumbing: typed config, budgets, errors, atomic storage, locks, CLI helpers. Imports nothing of ours."""
