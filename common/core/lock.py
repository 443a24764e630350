"""Exclusive per-folder locks, so two runs never write one variant (or one baseline) at the same time.

``with hold(folder):`` takes ``<folder>/.lock`` with ``fcntl.flock``. The kernel drops the lock when the
holder closes it or ends, however it ends (exception, Ctrl-C, SIGKILL), so a crash never leaves a stale
lock behind. Another process that wants the folder waits (``wait=False``: fails) with a message naming
the holder's pid, start time and command. Re-entering a folder this process already holds is a no-op, so
a function that locks may call another that locks the same folder.
"""
import contextlib
import datetime
import fcntl
import os
import shlex
import sys

from . import distributed
from .errors import UserError

LOCK_NAME = ".lock"
_HELD = {}  # real path of a lock file this process holds -> nesting depth


class LockedError(UserError, RuntimeError):
    """The folder is locked by another process (raised only with ``wait=False``)."""


def holder(lock_path: str) -> str:
    """Who holds ``lock_path``, as its holder wrote it ("pid N (since <time>): <command>")."""
    try:
        with open(lock_path) as fh:
            text = fh.read().strip()
    except OSError:
        text = ""
    return text or "another process (it has not written its pid yet)"


@contextlib.contextmanager
def hold(folder: str, wait: bool = True):
    """Hold ``folder``'s lock for the duration of the ``with`` block (creating the folder if needed). Ranks that
    share one task under torchrun leave it to rank 0 (it writes; they wait for it in collectives)."""
    os.makedirs(folder, exist_ok=True)
    if distributed.world_size() > 1 and not distributed.is_main():
        yield
        return
    path = os.path.realpath(os.path.join(folder, LOCK_NAME))
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            msg = f"{folder} is locked by {holder(path)}"
            if not wait:
                raise LockedError(f"{msg}; wait for it to finish (or end it)") from None
            print(f"[lock] {msg}; waiting for it to finish (Ctrl-C stops waiting)", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print(f"[lock] {folder} acquired", flush=True)
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} (since {since}): {shlex.join(sys.argv)}\n".encode(), 0)
        _HELD[path] = 1
        try:
            yield
        finally:
            del _HELD[path]
            os.ftruncate(fd, 0)  # an unheld lock names nobody
    finally:
        os.close(fd)  # closing the descriptor releases the flock
