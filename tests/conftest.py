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
    """``tiny_world_factory(settings)`` registers a tiny world for the rest of the module and returns its
    root (what a subprocess sets as $DETECTRON2_DATASETS to register the same world)."""
    stack = contextlib.ExitStack()

    def make(settings):
        root = str(tmp_path_factory.mktemp("ds"))
        stack.enter_context(parts_world_at(root, settings))
        return root

    yield make
    stack.close()


@pytest.fixture(autouse=True, scope="session")
def _private_fingerprint_cache(tmp_path_factory):
    """File-hash cache of part_distill/data/fingerprint.py in a temp folder, not the user's ~/.cache."""
    old = os.environ.get("PART_DISTILL_CACHE_DIR")
    os.environ["PART_DISTILL_CACHE_DIR"] = str(tmp_path_factory.mktemp("fingerprint_cache"))
    yield
    if old is None:
        os.environ.pop("PART_DISTILL_CACHE_DIR", None)
    else:
        os.environ["PART_DISTILL_CACHE_DIR"] = old


# The detector vocabulary a config naming an image collection needs at build time (configs/imagenet).
TINY_VOCABULARY = ["cat", "cup", "person"]


@pytest.fixture(scope="session")
def detector_vocabulary(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("vocab") / "vocabulary.json"
    path.write_text(json.dumps(TINY_VOCABULARY))
    return str(path)
