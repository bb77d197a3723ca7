"""Training from a part store without holding it: the streaming dataset against the list loader and
pycocotools, its memory per image, and the resumable data stream (sampler, loader, trainer)."""
import itertools
import os
import tracemalloc

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

import part_distill  # noqa: F401  (registers datasets and models)
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import HookBase
from part_distill.data.pseudo_labels import PseudoLabelFilters, load_pseudo_labels, register_pseudo_labels
from part_distill.data.samplers import ResumableTrainingSampler
from part_distill.data.store_dataset import INDEX_DTYPE, StoreDataset, build_store_train_set
from part_distill.data.store_simulation import write_synthetic_store
from part_distill.mining.store import read_manifest

FILTERS = PseudoLabelFilters()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # 8 template variants, one of which keeps no part: 300 images over 10 shards of 32.
    return write_synthetic_store(str(tmp_path_factory.mktemp("sim") / "store"), 300, shard_size=32)


@pytest.fixture
def registered(store):
    name = "test_store_dataset_sim"
    register_pseudo_labels(name, store, FILTERS)
    yield name
    DatasetCatalog.pop(name, None)
    MetadataCatalog.pop(name, None)


def _reference(manifest_path, filters):
    """Brute force with pycocotools: per kept image (store order), the ids of its parts that pass the filters."""
    root = os.path.dirname(manifest_path)
    out = []
    for entry in read_manifest(manifest_path)["shards"]:
        coco = COCO(os.path.join(root, entry["file"]))
        objects = {o["id"]: o for o in coco.dataset["objects"]}
        for img_id in sorted(coco.getImgIds()):
            img = coco.loadImgs(img_id)[0]
            kept = []
            for a in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
                obj = objects[a["object_id"]]
                r = a["area"] / obj["area"]
                if obj["area"] >= filters.min_object_area_ratio * img["height"] * img["width"] and \
                        filters.min_part_area_ratio <= r <= filters.max_part_area_ratio:
                    kept.append(a["id"])
            if kept:
                out.append((img_id, kept))
    return out


def test_stream_yields_the_list_loaders_dicts_in_the_samplers_order(store, registered):
    dicts = get_detection_dataset_dicts([registered], filter_empty=True)  # the list path of detectron2
    stream = build_store_train_set([registered])
    assert isinstance(stream, StoreDataset)
    assert len(load_pseudo_labels(store)) == 300 > len(dicts) == len(stream) > 0
    assert [(d["image_id"], [a["id"] for a in d["annotations"]]) for d in stream] == _reference(store, FILTERS)
    for seed in (0, 7):
        order = list(itertools.islice(TrainingSampler(len(dicts), seed=seed), 400))
        assert [stream[i] for i in order] == [dicts[i] for i in order]
    # Without FILTER_EMPTY_ANNOTATIONS every image is kept, as in the list loader.
    assert len(StoreDataset(store, FILTERS, drop_empty=False, cache=False)) == 300
    # A second build maps the cached index; the dicts are the same.
    cached = StoreDataset(store, FILTERS)
    assert isinstance(cached.index, np.memmap) and [cached[i] for i in range(20)] == dicts[:20]


def test_index_memory_per_image_is_constant(tmp_path):
    """Memory a dataset keeps, by tracemalloc (numpy reports its buffers there), per added image:
    the 40-byte index row (+ a shard path per 32 images) for the stream, kilobytes for the list."""
    paths = [write_synthetic_store(str(tmp_path / f"s{n}"), n, shard_size=32) for n in (64, 640)]

    def kept_bytes(build):
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        ds = build()
        kept = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return kept, len(ds)

    (s0, n0), (s1, n1) = [kept_bytes(lambda p=p: StoreDataset(p, FILTERS, cache=False)) for p in paths]
    (l0, m0), (l1, m1) = [kept_bytes(lambda p=p: load_pseudo_labels(p, FILTERS)) for p in paths]
    stream_per_image = (s1 - s0) / (n1 - n0)
    list_per_image = (l1 - l0) / (m1 - m0)
    assert INDEX_DTYPE.itemsize == 40 <= stream_per_image < 64, stream_per_image
    assert list_per_image > 1000, list_per_image  # control: the measurement sees a growing dataset


def test_resumable_sampler_continues_detectron2s_stream():
    n = 37
    full = list(itertools.islice(TrainingSampler(n, seed=5), 200))
    assert list(itertools.islice(ResumableTrainingSampler(n, seed=5), 200)) == full
    for start in (1, 10, 37, 80):
        s = ResumableTrainingSampler(n, seed=5, start=start)
        assert list(itertools.islice(s, 50)) == full[start:start + 50]
    # Two ranks: rank r continues with every second index of the global stream from r.
    for rank in (0, 1):
        s = ResumableTrainingSampler(n, seed=5, start=12)
        s._rank, s._world_size = rank, 2
        assert list(itertools.islice(s, 40)) == full[12 + rank:12 + rank + 80:2]


def test_loader_resumes_at_the_batch_after_the_checkpoint(store, registered):
    stream = build_store_train_set([registered])

    def batches(start, count):
        sampler = ResumableTrainingSampler(len(stream), seed=3, start=start)
        loader = build_detection_train_loader(stream, mapper=lambda d: d["image_id"], sampler=sampler,
                                              total_batch_size=4, aspect_ratio_grouping=False, num_workers=0)
        return list(itertools.islice(loader, count))

    full = batches(0, 8)
    assert batches(5 * 4, 3) == full[5:8]
    assert full[5:8] != full[0:3]  # control: restarting from the first batch would be seen


def test_map_with_retry_replaces_failed_images_and_keeps_no_index_set():
    from part_distill.data.train_loader import MapWithRetry

    data = list(range(50))
    mapped = MapWithRetry(data, lambda x: None if x % 5 == 0 else x * 10)
    assert [mapped[i] for i in (1, 2, 3)] == [10, 20, 30]
    got = mapped[5]
    # Another image instead of 5 (seeded: the same one again), and only failed indices are remembered.
    assert got % 10 == 0 and (got // 10) % 5 != 0 and got // 10 in data
    assert 5 in mapped._failed and all(i % 5 == 0 for i in mapped._failed)
    assert MapWithRetry(data, lambda x: None if x % 5 == 0 else x * 10)[5] == got
    with pytest.raises(RuntimeError, match="every one of the 3"):
        MapWithRetry([0, 1, 2], lambda x: None)[0]


# ---------------------------------------------------------------- the trainer's resume
class _RecordBatches(HookBase):
    """Records the image ids of every batch the trainer draws (wraps its loader iterator)."""

    def __init__(self, seen):
        self.seen = seen

    def before_train(self):
        inner = self.trainer._trainer._data_loader_iter

        def recording():
            for batch in inner:
                self.seen.append(sorted(d["image_id"] for d in batch))
                yield batch

        self.trainer._trainer._data_loader_iter_obj = recording()


class _Stop(Exception):
    pass


class _StopAfter(HookBase):
    def __init__(self, it):
        self.it = it

    def after_step(self):
        if self.trainer.iter == self.it:
            raise _Stop


def _train(cfg, hooks, np_seed):
    from part_distill.engine.trainer import PartDistillTrainer

    # detectron2's TrainingSampler seed is comm.shared_random_seed(), a draw from numpy's global RNG.
    np.random.seed(np_seed)
    trainer = PartDistillTrainer(cfg)
    trainer.register_hooks(hooks)
    trainer.resume_or_load(resume=True)
    trainer.train()


def test_trainer_resume_continues_the_data_stream(tmp_path, registered):
    from _tiny_part_model import tiny_part_cfg

    def cfg(out):
        return tiny_part_cfg("INPUT.DATASET_MAPPER_NAME", "PartTargetLSJMapper", "INPUT.IMAGE_SIZE", "32",
                             "DATASETS.TRAIN", f"('{registered}',)", "DATASETS.TEST", "()",
                             "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4",
                             "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.BASE_LR", "0.0001", "SOLVER.STEPS", "()",
                             "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(tmp_path / out), size=32)

    full = []
    _train(cfg("full"), [_RecordBatches(full)], np_seed=1)
    first, resumed = [], []
    with pytest.raises(_Stop):
        _train(cfg("killed"), [_RecordBatches(first), _StopAfter(2)], np_seed=1)
    # Another numpy state: the resumed sampler must take its seed from the checkpoint (iteration 1).
    _train(cfg("killed"), [_RecordBatches(resumed)], np_seed=2)
    assert len(full) == 4 and first == full[:3]
    assert resumed == full[2:4]
    assert full[2:4] != full[0:2]  # control: a stream restarted from its beginning would be seen
    state = torch.load(str(tmp_path / "killed" / "model_0000001.pth"), weights_only=False)
    assert "seed" in state["trainer"]["data_stream"]


def _gloo_index_worker(rank, init_file, store, out_dir):
    from _gloo import gloo_group

    with gloo_group(rank, init_file):
        ds = StoreDataset(store, FILTERS, cache=rank == 0, collective=True)
        np.save(os.path.join(out_dir, f"index{rank}.npy"), np.asarray(ds.index))


@pytest.mark.slow  # two spawned interpreters import torch and detectron2
def test_two_gloo_ranks_build_the_one_process_index(tmp_path):
    import multiprocessing

    store = write_synthetic_store(str(tmp_path / "store"), 150, shard_size=16)
    single = StoreDataset(store, FILTERS, cache=False).index
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent may hold torch/OpenMP threads
    procs = [ctx.Process(target=_gloo_index_worker, args=(r, str(tmp_path / "pg"), store, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        if p.is_alive():
            p.terminate()
            pytest.fail("a gloo worker hung")
        assert p.exitcode == 0
    for r in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"index{r}.npy"), single)
    # The main rank cached it; a later build maps that file.
    np.testing.assert_array_equal(StoreDataset(store, FILTERS).index, single)


def test_non_ascii_shard_decodes_by_byte_spans(tmp_path):
    import json

    store = write_synthetic_store(str(tmp_path / "store"), 20, shard_size=10)
    path = tmp_path / "store" / "shards" / "shard_00000.json"
    shard = json.loads(path.read_text())
    for img in shard["images"]:
        img["file_name"] = img["file_name"].replace("synthetic_", "s\u00e9q_\u4e2d_")
    # Written as UTF-8 with multi-byte characters: byte offsets differ from character offsets.
    path.write_text(json.dumps(shard, ensure_ascii=False, indent=1), encoding="utf-8")
    ds = StoreDataset(store, FILTERS, cache=False, drop_empty=False)
    assert [ds[i] for i in range(len(ds))] == load_pseudo_labels(store, FILTERS)
    assert "\u4e2d" in ds[0]["file_name"]
