"""Atomic writes: a crash leaves either the old file or the new one, never a truncated file."""
import contextlib
import json
import logging
import os
import tempfile

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Open a temp file beside ``path``; it replaces ``path`` only when the block exits cleanly."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    # mkstemp makes owner-only files; give the result the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj, **json_kwargs):
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **json_kwargs)


def atomic_write_bytes(path, data):
    """Write ``data`` (bytes) to ``path`` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def remove_stale_temp_files(directory):
    """Delete the temp files ``atomic_open`` left in ``directory`` when a process was killed mid-write.

    Call it only where no other process is writing into ``directory`` at the time (e.g. on the main
    process before a barrier). Returns the number removed.
    """
    if not os.path.isdir(directory):
        return 0
    stale = [n for n in os.listdir(directory) if n.startswith(".") and n.endswith(".tmp")]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    if stale:
        logger.info("Removed %d temp files a killed run left in %s", len(stale), directory)
    return len(stale)
