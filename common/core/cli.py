"""Argument parsing shared by the top-level scripts: --config, --set, --force."""
import argparse
import contextlib
import os
import shlex
import sys

import torch

from . import distributed
from .config import ConfigError, load_config
from .errors import UserError
from .storage import resolve_device


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default where it says something: not 'None', and not twice where the help states it."""

    def _get_help_string(self, action):
        if action.default is None or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(description: str, force=True) -> argparse.ArgumentParser:
    """The options every script shares; ``force``: whether it keeps results it could recompute (a script that
    writes nothing it reuses offers no --force)."""
    p = argparse.ArgumentParser(description=description, formatter_class=_DefaultsHelpFormatter)
    p.add_argument("--config", default="configs/default.yaml", help="YAML experiment config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=10 (repeatable; value is YAML)")
    if force:
        p.add_argument("--force", action="store_true",
                       help="recompute and overwrite results made with a different config or checkpoint "
                            "(a finished training of the same config is kept; see simplediffusion.py --retrain)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def load(args):
    """Load the config named by parsed ``args``; exit with the message on a config error."""
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    return cfg


def device(cfg, alone=False):
    """This process's device: ``run.device``; under torchrun this rank's (the process group is initialised, and
    ranks other than 0 print nothing to stdout: their errors still reach stderr). ``alone``: the script's work is
    one task (sampling one file, a learning curve): rank 0 does all of it as a single process would, and the
    other ranks get None and stop."""
    d = distributed.init(resolve_device(cfg.run.device))
    if alone and not distributed.shows_progress():
        return None
    if not distributed.shows_progress():
        sys.stdout = open(os.devnull, "w")  # kept open for the life of the process
    if alone:
        distributed.work_alone()
    return d


def command(cfg, script=None, *flags, drop=()) -> str:
    """The shell command that runs ``script`` (default: the running one, as it was typed) on ``cfg``'s YAML
    file with all its ``--set`` overrides, plus ``flags``: hints repeat it, so following one never
    silently switches to another run or config. ``drop``: keys whose ``--set`` the flags replace."""
    parts = ["python", script or sys.argv[0], "--config", cfg.source]
    parts += [a for o in cfg.overrides if o.split("=", 1)[0].strip() not in drop for a in ("--set", o)]
    return shlex.join(parts + list(flags))


def run(main):
    """A script's entry point: ``main()``, then, under torchrun on CPUs, an immediate clean exit
    (``distributed.leave``: the gloo teardown's rare SIGABRT at exit cannot fail a finished run)."""
    main()
    distributed.leave()


@contextlib.contextmanager
def clear_errors():
    """Turn the errors a user can fix (missing or stale artifacts, bad files, busy folders, impossible budgets:
    every ``errors.UserError``) into one-line exits."""
    try:
        yield
    except (FileNotFoundError, UserError) as e:
        sys.exit(f"error: {e}")
