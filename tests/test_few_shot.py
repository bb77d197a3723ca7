"""Few-shot subsets: counts, determinism, nesting, order independence, class balance, registration."""
import random
from collections import Counter

import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog

from part_distill.config import add_part_distill_config
from part_distill.data.few_shot import (
    apply_few_shot_config, few_shot_count, few_shot_name, few_shot_order, register_few_shot, select_few_shot,
)

PERCENTS = (1, 5, 10, 20, 50, 100)


def _dataset(class_sizes, start_id=0):
    """Single-class images: ``class_sizes[c]`` images holding one or two objects of class c."""
    dicts, image_id = [], start_id
    for c, n in enumerate(class_sizes):
        for k in range(n):
            anns = [{"category_id": c}] * (1 + k % 2)
            dicts.append({"image_id": image_id, "file_name": f"{image_id}.jpg", "annotations": anns})
            image_id += 1
    return dicts


def _ids(dicts):
    return [d["image_id"] for d in dicts]


def test_counts_round_half_up_and_keep_at_least_one():
    assert [few_shot_count(200, p) for p in PERCENTS] == [2, 10, 20, 40, 100, 200]
    assert few_shot_count(3, 1) == 1 and few_shot_count(30, 5) == 2 and few_shot_count(10, 25) == 3
    assert few_shot_count(0, 10) == 0
    for bad in (0, -5, 150):
        with pytest.raises(ValueError, match="percent"):
            few_shot_count(10, bad)


@pytest.mark.parametrize("balanced", [False, True])
def test_deterministic_nested_and_order_independent(balanced):
    dicts = _dataset([120, 50, 30])
    subsets = [set(_ids(select_few_shot(dicts, p, seed=3, balanced=balanced))) for p in PERCENTS]
    assert [len(s) for s in subsets] == [few_shot_count(200, p) for p in PERCENTS]
    for small, big in zip(subsets, subsets[1:]):
        assert small < big
    assert subsets[-1] == set(_ids(dicts))
    # Same seed -> same subset, whatever order the loader listed the images in.
    shuffled = dicts[:]
    random.Random(0).shuffle(shuffled)
    assert set(_ids(select_few_shot(shuffled, 10, seed=3, balanced=balanced))) == subsets[2]
    # The subset keeps the dataset's own order (dict objects, not copies).
    sub = select_few_shot(dicts, 20, seed=3, balanced=balanced)
    assert _ids(sub) == sorted(_ids(sub)) and all(any(s is d for d in dicts) for s in sub)
    # Another seed gives another subset.
    assert set(_ids(select_few_shot(dicts, 10, seed=4, balanced=balanced))) != subsets[2]


def test_balanced_prefixes_are_balanced_by_brute_force():
    sizes = [80, 10, 10]
    dicts = _dataset(sizes)
    cls = {d["image_id"]: d["annotations"][0]["category_id"] for d in dicts}
    order = few_shot_order(dicts, seed=0, balanced=True)
    for n in range(1, len(dicts) + 1):
        counts = Counter(cls[dicts[i]["image_id"]] for i in order[:n])
        active = [c for c in range(3) if counts[c] < sizes[c]]  # classes with images left
        picked = [counts[c] for c in active]
        assert not picked or max(picked) - min(picked) <= 1
    assert Counter(cls[d["image_id"]] for d in select_few_shot(dicts, 15, balanced=True)) == {0: 5, 1: 5, 2: 5}
    assert Counter(cls[d["image_id"]] for d in select_few_shot(dicts, 50, balanced=True)) == {0: 30, 1: 10, 2: 10}
    # The plain prefix follows the class frequencies instead (80 % of the images are class 0).
    plain = Counter(cls[d["image_id"]] for d in select_few_shot(dicts, 15, balanced=False))
    assert plain[0] > 5


def test_balanced_multi_class_and_empty_images():
    dicts = [
        {"image_id": "a", "annotations": [{"category_id": 0}, {"category_id": 1}]},
        {"image_id": "b", "annotations": [{"category_id": 1}]},
        {"image_id": "c", "annotations": []},
        {"image_id": "d", "annotations": [{"category_id": 2}]},
    ]
    order = few_shot_order(dicts, seed=0, balanced=True)
    assert sorted(order) == [0, 1, 2, 3] and order[-1] == 2  # the image without objects comes last
    # In the first round every class that still has an unpicked image contributes one.
    first_round = {dicts[i]["image_id"] for i in order[:3]}
    assert "d" in first_round and first_round & {"a", "b"}
    with pytest.raises(ValueError, match="unique image_id"):
        few_shot_order(dicts + [dicts[0]], seed=0)


def test_registration_and_config():
    base = "test_few_shot_base"
    DatasetCatalog.pop(base, None)
    MetadataCatalog.pop(base, None)
    dicts = _dataset([40, 40, 20])
    DatasetCatalog.register(base, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(base).set(thing_classes=["a", "b", "c"], evaluator_type="coco")

    assert register_few_shot(base, 100) == base
    name = register_few_shot(base, 5, seed=2, balanced=True)
    assert name == few_shot_name(base, 5, 2, True) == f"{base}_fewshot5_seed2_balanced"
    assert few_shot_name(base, 0.5) == f"{base}_fewshot0.5"
    got = DatasetCatalog.get(name)
    assert _ids(got) == _ids(select_few_shot(dicts, 5, seed=2, balanced=True))
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["a", "b", "c"] and meta.evaluator_type == "coco"
    assert meta.few_shot == {"source": base, "percent": 5.0, "seed": 2, "balanced": True}

    cfg = add_part_distill_config(get_cfg())
    cfg.DATASETS.TRAIN = (base,)
    assert apply_few_shot_config(cfg).DATASETS.TRAIN == (base,)  # 100 % is a no-op
    cfg.DATASETS.FEW_SHOT.PERCENT = 10.0
    apply_few_shot_config(cfg)
    assert cfg.DATASETS.TRAIN == (f"{base}_fewshot10",)
    apply_few_shot_config(cfg)  # applying twice must not shrink the subset again
    assert cfg.DATASETS.TRAIN == (f"{base}_fewshot10",)
    assert len(DatasetCatalog.get(cfg.DATASETS.TRAIN[0])) == 10
    with pytest.raises(KeyError, match="not registered"):
        register_few_shot("no_such_dataset_xyz", 10)
