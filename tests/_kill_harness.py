"""SIGKILL harness for the kill-anywhere resume tests.

A job (a picklable-free callable: the child is forked, so closures work) runs in a child process
that is SIGKILLed at a chosen point; the same job is then rerun in a fresh child to completion.
Two kinds of kill point:

* write-indexed, deterministic: ``"N"`` kills the child right after its N-th atomic write was
  renamed into place, ``"N@F"`` during its N-th atomic write once the fraction F of the bytes is
  on disk (``part_distill.utils.io`` reads ``$PART_DISTILL_KILL_AT_WRITE`` at every write, and the
  kill is a real ``SIGKILL`` the child sends itself, so no ``finally`` or ``atexit`` code runs);
* external: the parent SIGKILLs the child after a delay (where it lands depends on the machine's
  load; the assertions after the rerun must hold wherever it lands).

Children are forked from the test process, which has imported torch and detectron2 already, so a
kill/rerun pair costs the job's own work only; they compute on one thread.
"""
import multiprocessing
import hashlib
import os
import random
import signal
import time

from part_distill.utils import io

__all__ = ["run_in_child", "trace_writes", "draw_kill_points", "leftover_temps", "tree_bytes", "elapsed", "KILLED"]

KILLED = -signal.SIGKILL


def _child(job, args, kill_at, trace):
    import torch

    # The parent's OpenMP threads do not exist in a forked child; a parallel region would wait for
    # them forever (torch's DataLoader workers do the same for the same reason).
    torch.set_num_threads(1)
    io.write_count = 0
    os.environ.pop(io.KILL_AT_WRITE_ENV, None)
    os.environ.pop(io.WRITE_TRACE_ENV, None)
    if kill_at:
        os.environ[io.KILL_AT_WRITE_ENV] = kill_at
    if trace:
        os.environ[io.WRITE_TRACE_ENV] = trace
    job(*args)


def run_in_child(job, *args, kill_at=None, kill_after_s=None, trace=None, timeout=300):
    """Run ``job(*args)`` in a forked child; returns its exit code (``KILLED`` when SIGKILLed).

    ``kill_at``: a write-indexed kill point (see module docstring); ``kill_after_s``: the parent
    SIGKILLs the child after that many seconds if it is still running.
    """
    p = multiprocessing.get_context("fork").Process(target=_child, args=(job, args, kill_at, trace))
    p.start()
    if kill_after_s is not None:
        p.join(kill_after_s)
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        raise TimeoutError(f"{job.__name__} did not finish in {timeout} s")
    return p.exitcode


def trace_writes(job, *args, trace_file):
    """Run ``job`` to completion in a child; returns the target paths of its atomic writes, in order."""
    code = run_in_child(job, *args, trace=str(trace_file))
    assert code == 0, f"the uninterrupted {job.__name__} exited with {code}"
    with open(trace_file) as f:
        return [line.rstrip("\n") for line in f]


def draw_kill_points(writes, n, seed, select=lambda path: True):
    """``n`` kill points at distinct writes (while there are enough) among those whose path passes
    ``select``: each after its write (``"N"``) or inside it at a random byte offset (``"N@F"``)."""
    rng = random.Random(seed)
    candidates = [i + 1 for i, p in enumerate(writes) if select(p)]
    assert len(candidates) * 2 >= n, f"only {len(candidates)} writes to kill at"
    points = set()
    while len(points) < n:
        left = [i for i in candidates if not any(p.split("@")[0] == str(i) for p in points)] or candidates
        index = rng.choice(left)
        points.add(str(index) if rng.random() < 0.5 else f"{index}@{rng.uniform(0.0, 0.999):.3f}")
    return sorted(points, key=lambda s: (int(s.split("@")[0]), s))


def leftover_temps(root):
    """Files under ``root`` that look like temp files (hidden or ``*.tmp``): a rerun must leave none.

    Deliberately broader than the cleaner's own pattern, so a temp name it misses is caught."""
    out = []
    for d, _, names in os.walk(root):
        out += [os.path.join(d, n) for n in names if n.startswith(".") or n.endswith(".tmp")]
    return out


# Readers' caches inside a store (data/store_dataset.py): derived data, written by whoever trains on it.
DERIVED_DIRS = ("stream_index",)


def tree_bytes(root, ignore=()):
    """{relative path: bytes} of every file under ``root`` except names in ``ignore`` and readers'
    caches (``DERIVED_DIRS``)."""
    out = {}
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in DERIVED_DIRS]
        for n in names:
            if n in ignore:
                continue
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def elapsed(fn, *args, **kwargs):
    """(result, seconds) of one call (to size external kill delays, never asserted on)."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def state_digest(state):
    """sha256 over a state dict's names and tensor bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
