"""The compiled extension ``part_distill._C``, when it is built; the library falls back without it."""
import functools
import logging

__all__ = ["native_module", "native_status"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from .. import _C
    except ImportError as e:
        return None, str(e)
    return _C, ""


def native_module():
    """``part_distill._C`` or None; says once, in the log, why it is missing and what it costs."""
    module, error = _load()
    if module is None and not getattr(native_module, "_warned", False):
        native_module._warned = True
        logger.warning(
            "part_distill._C is not built (%s): CPU k-means runs the torch path, several times slower. "
            "Build it with `make setup` or `pip install --no-build-isolation -e .`.", error,
        )
    return module


def native_status():
    """One line for logs and benchmarks: the kernel's instruction set, or why it is missing."""
    module, error = _load()
    return f"part_distill._C ({module.kmeans_isa()})" if module is not None else f"no part_distill._C ({error})"
