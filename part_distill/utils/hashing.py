"""Stable short hashes: of JSON-like settings and of file contents."""
import hashlib
import json

__all__ = ["config_hash", "file_sha256"]


def config_hash(obj):
    """Stable short hash of a JSON-serialisable object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path):
    """First 16 hex digits of the SHA-256 of the file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
