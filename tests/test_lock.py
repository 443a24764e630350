"""common.core.lock: one writer per folder across processes; released on exceptions and on process death."""
import os
import signal
import subprocess
import sys

import pytest

from common.core import lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def holder(folder, seconds=60):
    """Another process (no torch import: starts in ~0.1 s) that takes ``folder``'s lock and sleeps (``seconds``
    None: holds it until a line arrives on its stdin)."""
    wait = "sys.stdin.readline()" if seconds is None else f"time.sleep({seconds})"
    code = (f"import sys, time; from common.core import lock\nwith lock.hold({str(folder)!r}):\n"
            f"    print('held', flush=True); {wait}")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_told_who_holds_it_and_death_releases(tmp_path):
    p = holder(tmp_path)
    try:
        with pytest.raises(lock.LockedError) as e:
            with lock.hold(str(tmp_path), wait=False):
                pass
        assert f"pid {p.pid}" in str(e.value) and str(tmp_path) in str(e.value)
    finally:
        p.send_signal(signal.SIGKILL)  # no cleanup code runs: the kernel drops the flock
        p.wait()
    with lock.hold(str(tmp_path), wait=False):
        assert f"pid {os.getpid()}" in lock.holder(os.path.join(tmp_path, lock.LOCK_NAME))
    assert lock.holder(os.path.join(tmp_path, lock.LOCK_NAME)).startswith("another process")  # released: blank


def test_waits_with_a_message_until_released(tmp_path, capsys, monkeypatch):
    import fcntl

    p = holder(tmp_path, seconds=None)
    real = fcntl.flock

    def flock(fd, op):  # the blocking wait begins: only now does the holder let go (however late we got here)
        if op == fcntl.LOCK_EX:
            p.stdin.write("go\n")
            p.stdin.flush()
        return real(fd, op)

    monkeypatch.setattr(lock.fcntl, "flock", flock)
    with lock.hold(str(tmp_path)):
        assert p.wait(timeout=60) == 0  # we got it only once the holder let go
    out = capsys.readouterr().out
    assert f"is locked by pid {p.pid}" in out and "waiting" in out and "acquired" in out


def test_reentrant_and_released_on_exception(tmp_path):
    with pytest.raises(KeyError):
        with lock.hold(str(tmp_path)):
            with lock.hold(str(tmp_path), wait=False):  # the same process may nest
                raise KeyError("boom")
    # Released: another process can take it at once.
    code = (f"from common.core import lock\nwith lock.hold({str(tmp_path)!r}, wait=False): print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.stdout.strip() == "ok", r.stderr
