"""One launcher convention: every script runs plainly (one process, nothing initialised) or under
``torchrun --nproc_per_node N script.py ...`` (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on CPU, one device per
rank. Rank 0 alone writes shared files and shows progress bars. A rank that dies ends the run: torchrun stops
the others with the failing rank's error and a non-zero exit status. Collectives time out after
``LAQFI_DIST_TIMEOUT`` seconds (default ``DEFAULT_TIMEOUT``, 6 h): ranks wait inside them while another works
alone (rank 0 building a shared cache, a rank's longer share of a sweep), which takes tens of minutes on a CPU,
so the timeout only ends a rank that is alive but stuck.
"""
import atexit
import contextlib
import datetime
import gc
import os
import sys

import torch
import torch.distributed as dist

from .process_state import per_process

# depth of ``local()``: inside, this rank works alone on whole tasks (cli.device(alone=True) makes the rest of a
# run rank-local, so a fresh process starts at 0)
_LOCAL = per_process([0], reset=lambda: _LOCAL.__setitem__(0, 0), what="distributed._LOCAL")
_GLOO = [False]  # whether ``init`` made a gloo group in this process (``leave`` acts only then)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks that share the work at hand: 1 in a plain run and inside ``local()``."""
    return dist.get_world_size() if _active() and not _LOCAL[0] else 1


def rank() -> int:
    return dist.get_rank() if _active() and not _LOCAL[0] else 0


def is_main() -> bool:
    """Whether this process writes the work at hand's files (rank 0, or any rank inside ``local()``)."""
    return rank() == 0


def shows_progress() -> bool:
    """Progress bars: rank 0's only, also inside ``local()``."""
    return not _active() or dist.get_rank() == 0


@contextlib.contextmanager
def local():
    """Each rank runs whole tasks of its own (a sweep's variants): no collective inside, its own locks and files."""
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def work_alone():
    """From now on this rank behaves as a single process (``local()`` for the rest of the run)."""
    _LOCAL[0] += 1


def rank0_first(fn):
    """``fn()`` on rank 0 alone first (it computes and writes, e.g. a sweep's fp32 reference or a shared cache),
    then on the other ranks, which find and reuse what it wrote. Every rank returns its own ``fn()``."""
    if world_size() == 1:
        return fn()
    me = dist.get_rank()
    out = None
    if me == 0:
        with local():
            out = fn()
    barrier()
    if me != 0:
        with local():
            out = fn()
    return out


def map_tasks(tasks: list, fn) -> list:
    """``fn(task)`` for every task, each on one rank (``shard``, alone: ``local()``); the results in task order
    on every rank. A rank that raises ends its process; torchrun then stops the others and exits non-zero."""
    share = shard(tasks)  # before local(), which makes this rank look alone
    with local():
        mine = [fn(t) for t in share]
    return gather_in_order(mine, len(tasks))


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


DEFAULT_TIMEOUT = 6 * 3600.0  # 600 s killed healthy runs: a rank waited at a barrier while rank 0 worked longer


def timeout_seconds() -> float:
    """``LAQFI_DIST_TIMEOUT`` (seconds) or ``DEFAULT_TIMEOUT``."""
    value = os.environ.get("LAQFI_DIST_TIMEOUT", "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT
    except ValueError:
        raise ValueError(f"LAQFI_DIST_TIMEOUT={value!r}: expected seconds, e.g. 3600") from None
    if not seconds > 0:
        raise ValueError(f"LAQFI_DIST_TIMEOUT={value!r}: must be > 0 seconds")
    return seconds


def init(device: torch.device) -> torch.device:
    """Initialise the process group when launched with several ranks; returns this rank's device (the local
    GPU under NCCL, the CPU under gloo). A plain run returns ``device`` unchanged and initialises nothing."""
    if not launched() or dist.is_initialized():
        return device
    timeout = datetime.timedelta(seconds=timeout_seconds())
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        # NCCL reduces CUDA tensors only; the sums some steps keep on the CPU (the Fisher's per-tensor totals)
        # go through gloo in the same group
        dist.init_process_group("cuda:nccl,cpu:gloo", timeout=timeout)
        return torch.device("cuda", local)
    dist.init_process_group("gloo", timeout=timeout)
    _GLOO[0] = True
    atexit.register(_shut_down)
    return device


def _shut_down():
    """Tear the gloo process group down at exit, before the interpreter's own teardown: left to that, gloo's
    background threads can outlive the objects they use and the rank dies with SIGABRT ("terminate called
    without an active exception") after its work is done. Gloo's teardown waits for no peer, so a rank that
    exits on an error still exits (not registered for NCCL, whose teardown waits for queued work)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        # a Work or group object kept alive by a reference cycle would otherwise be freed (its gloo threads
        # joined) only in the interpreter's static teardown: the abort seen once more under a loaded suite
        gc.collect()


def leave():
    """End a gloo rank whose script finished normally: tear the group down, flush the output, and exit with
    status 0 at once, skipping the interpreter's static teardown. There, rarely and only under load, a gloo or
    store thread still joinable is destroyed and the rank dies with SIGABRT ("terminate called without an
    active exception") after all its work is written, failing a run that succeeded. Every file this project
    writes is complete (atomic rename) before this point. Does nothing in a plain run or under NCCL."""
    if not _GLOO[0]:
        return
    _shut_down()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def barrier():
    if world_size() > 1:
        dist.barrier()


def shard(items: list) -> list:
    """This rank's share of ``items`` (every N-th, starting at its rank): whole tasks, in a fixed order."""
    return items[rank()::world_size()]


def gather_in_order(mine: list, total: int) -> list:
    """The inverse of ``shard`` for per-item results (any picklable objects): every rank gets all ``total``
    items back in their original order."""
    if world_size() == 1:
        return list(mine)
    parts = [None] * world_size()
    dist.all_gather_object(parts, mine)
    out = [None] * total
    for r, part in enumerate(parts):
        out[r::world_size()] = part
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
