"""Atomic writes: a crash leaves either the old file or the new one, never a truncated file.

A write goes to a temp file ``.<name>.<random>.tmp`` beside its target and is renamed over it when
complete; a kill mid-write leaves that temp file behind, which :func:`remove_stale_temps` deletes
when a resumed job starts. :func:`read_json` names the file when one is damaged anyway (a copy cut
short, a full disk in an older run), so callers can re-make it instead of failing on a bare
``JSONDecodeError``.

Fault injection for the kill-anywhere tests (tests/_kill_harness.py), read at every atomic write:

    PART_DISTILL_KILL_AT_WRITE="N"      SIGKILL this process right after its N-th atomic write
                                         has been renamed into place
    PART_DISTILL_KILL_AT_WRITE="N@F"    SIGKILL it during its N-th atomic write, once the fraction
                                         F (0 <= F < 1) of the file's bytes is on disk
    PART_DISTILL_WRITE_TRACE=path       append the target path of every completed atomic write

Writes are counted per process from :data:`write_count` (a forked child resets it).
"""
import contextlib
import json
import logging
import os
import re
import signal
import tempfile

__all__ = ["atomic_open", "atomic_write_json", "atomic_write_bytes", "read_json", "remove_stale_temps",
           "DamagedFileError", "KILL_AT_WRITE_ENV", "WRITE_TRACE_ENV"]

logger = logging.getLogger(__name__)

KILL_AT_WRITE_ENV = "PART_DISTILL_KILL_AT_WRITE"
WRITE_TRACE_ENV = "PART_DISTILL_WRITE_TRACE"
# Atomic writes this process has started (the fault injection counts them).
write_count = 0
_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


class DamagedFileError(ValueError):
    """A file that should hold a complete JSON document / checkpoint cannot be parsed."""


def _kill_point():
    """(N, fraction or None) of $PART_DISTILL_KILL_AT_WRITE, or None."""
    spec = os.environ.get(KILL_AT_WRITE_ENV)
    if not spec:
        return None
    n, _, frac = spec.partition("@")
    try:
        return int(n), (float(frac) if frac else None)
    except ValueError:
        raise ValueError(f"${KILL_AT_WRITE_ENV} must be 'N' or 'N@F' (e.g. '3@0.5'), got {spec!r}") from None


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Open a temp file beside ``path``; it replaces ``path`` only when the block exits cleanly."""
    global write_count
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    write_count += 1
    kill = _kill_point()
    kill = kill if kill is not None and kill[0] == write_count else None
    # mkstemp makes owner-only files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            if kill is not None and kill[1] is not None:
                # What a kill at that byte leaves on disk: a prefix of the file, under the temp name.
                f.truncate(int(f.tell() * kill[1]))
                os.fsync(f.fileno())
                _die()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    trace = os.environ.get(WRITE_TRACE_ENV)
    if trace:
        with open(trace, "a") as t:
            t.write(path + "\n")
    if kill is not None:
        _die()


def atomic_write_json(path, obj, **json_kwargs):
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **json_kwargs)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def read_json(path, what="file"):
    """``json.load`` of ``path``; a file that does not parse raises :class:`DamagedFileError` naming it."""
    with open(path) as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DamagedFileError(f"{what} {path} is damaged (not complete JSON: {e})") from None


def remove_stale_temps(directory, recursive=False):
    """Delete the temp files a killed :func:`atomic_open` left in ``directory``; returns their paths.

    Call it only while no atomic write into ``directory`` is in progress (a job's start, one process).
    """
    removed = []
    if not os.path.isdir(directory):
        return removed
    walk = os.walk(directory) if recursive else [(directory, None, os.listdir(directory))]
    for d, _, names in walk:
        for name in names:
            p = os.path.join(d, name)
            if _TEMP.match(name) and os.path.isfile(p):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
                    removed.append(p)
    if removed:
        logger.warning("Removed %d temp file(s) left by an interrupted write in %s: %s", len(removed), directory,
                       [os.path.basename(p) for p in removed[:5]])
    return removed
