"""Fixtures shared by the test modules."""
import contextlib
import os

import pytest


@contextlib.contextmanager
def parts_world_at(root, settings):
    """A tiny parts world registered under ``root`` (as $DETECTRON2_DATASETS) while the block runs; the
    environment and the default world's registration are restored afterwards."""
    from part_distill.data.datasets.parts_world import register_parts_world

    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(root)
    register_parts_world(settings)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DETECTRON2_DATASETS", None)
        else:
            os.environ["DETECTRON2_DATASETS"] = old
        register_parts_world()


@pytest.fixture(scope="module")
def tiny_world_factory(tmp_path_factory):
    """``tiny_world_factory(settings)`` registers a tiny world for the rest of the module."""
    stack = contextlib.ExitStack()

    def make(settings):
        stack.enter_context(parts_world_at(tmp_path_factory.mktemp("ds"), settings))

    yield make
    stack.close()


def file_tree(root):
    """{relative path: bytes} of every file under ``root``: compares whole output directories byte for byte."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out
