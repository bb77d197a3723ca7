"""Few-shot training subsets: 1/5/10/20/50/100 % of a training set, deterministic and nested.

Every image gets a rank from ``md5("fewshot:<seed>:<image_id>")``: the order depends on the
seed and the image ids only, not on the order the loader listed the files in. A subset of p %
is the first ``max(1, round(N * p / 100))`` images of that order, so for one seed the 1 % subset
lies inside the 5 % subset, which lies inside the 10 % one, and so on.

``balanced=True`` orders images round-robin over object classes instead (each class in turn
takes its next image, by the same hash rank, that holds an object of that class and is not yet
taken); images without objects come last. In any prefix of that order the numbers of images
picked for each class differ by at most one between classes that still have images left, and
prefixes nest.

Subsets become datasets named ``<name>_fewshot<pct>[_seed<seed>][_balanced]``, registered on
demand by ``register_few_shot``; ``apply_few_shot_config`` rewrites ``cfg.DATASETS.TRAIN`` from
``cfg.DATASETS.FEW_SHOT`` (PERCENT, SEED, BALANCED) and is a no-op at 100 %.
"""
import hashlib
import logging

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["few_shot_order", "few_shot_count", "select_few_shot", "few_shot_name", "register_few_shot",
           "few_shot_train_datasets", "apply_few_shot_config"]

logger = logging.getLogger(__name__)


def _rank(seed, image_id):
    return hashlib.md5(f"fewshot:{seed}:{image_id}".encode("utf-8")).hexdigest()


def few_shot_count(num_images, percent):
    """Images kept for ``percent`` of ``num_images``: round half up, at least 1 (0 for an empty set)."""
    if not 0 < percent <= 100:
        raise ValueError(f"few-shot percent must be in (0, 100], got {percent}")
    if num_images == 0:
        return 0
    return min(num_images, max(1, int(num_images * percent / 100.0 + 0.5)))


def few_shot_order(dataset_dicts, seed, balanced=False):
    """Indices of ``dataset_dicts`` in few-shot order (every prefix is a valid, nested subset)."""
    ids = [d["image_id"] for d in dataset_dicts]
    if len(set(ids)) != len(ids):
        raise ValueError("few-shot selection needs unique image_id values in the dataset")
    by_rank = sorted(range(len(dataset_dicts)), key=lambda i: _rank(seed, ids[i]))
    if not balanced:
        return by_rank
    queues = {}  # class -> its images in rank order
    for i in by_rank:
        for c in sorted({a["category_id"] for a in dataset_dicts[i].get("annotations", ())}):
            queues.setdefault(c, []).append(i)
    taken, order = set(), []
    heads = {c: 0 for c in queues}
    active = sorted(queues)
    while active:
        still = []
        for c in active:
            q, h = queues[c], heads[c]
            while h < len(q) and q[h] in taken:
                h += 1
            if h < len(q):
                taken.add(q[h])
                order.append(q[h])
                h += 1
            heads[c] = h
            if h < len(q):
                still.append(c)
        active = still
    order += [i for i in by_rank if i not in taken]  # images without objects
    return order


def select_few_shot(dataset_dicts, percent, seed=0, balanced=False):
    """The few-shot subset of ``dataset_dicts`` (same dict objects, original relative order)."""
    keep = few_shot_order(dataset_dicts, seed, balanced)[: few_shot_count(len(dataset_dicts), percent)]
    return [dataset_dicts[i] for i in sorted(keep)]


def few_shot_name(name, percent, seed=0, balanced=False):
    """``<name>_fewshot<pct>[_seed<seed>][_balanced]`` (seed 0 and unbalanced are left out)."""
    return (f"{name}_fewshot{percent:g}" + (f"_seed{seed}" if seed else "")
            + ("_balanced" if balanced else ""))


def register_few_shot(name, percent, seed=0, balanced=False):
    """Register the few-shot subset of dataset ``name``; returns its name (``name`` itself at 100 %).

    The subset's metadata copies ``name``'s and adds ``few_shot`` (source, percent, seed, balanced).
    """
    few_shot_count(1, percent)  # validate now, not when the loader first runs
    if percent >= 100:
        return name
    if name not in DatasetCatalog.list():
        raise KeyError(f"few-shot: dataset {name!r} is not registered")
    if MetadataCatalog.get(name).get("few_shot") is not None:
        return name  # already a subset: applying the config twice must not shrink it again
    new = few_shot_name(name, percent, seed, balanced)
    if new in DatasetCatalog.list():
        return new

    def load():
        dicts = DatasetCatalog.get(name)
        subset = select_few_shot(dicts, percent, seed, balanced)
        logger.info(f"few-shot {new}: kept {len(subset)} of {len(dicts)} images of {name} "
                    f"({percent:g}%, seed {seed}, balanced={balanced})")
        return subset

    DatasetCatalog.register(new, load)
    meta = MetadataCatalog.get(name).as_dict()
    meta.pop("name", None)
    MetadataCatalog.get(new).set(**meta, few_shot={"source": name, "percent": float(percent), "seed": int(seed),
                                                   "balanced": bool(balanced)})
    return new


def few_shot_train_datasets(cfg):
    """``cfg.DATASETS.TRAIN`` with every name replaced by its ``cfg.DATASETS.FEW_SHOT`` subset."""
    fs = cfg.DATASETS.FEW_SHOT
    return tuple(register_few_shot(n, fs.PERCENT, fs.SEED, fs.BALANCED) for n in cfg.DATASETS.TRAIN)


def apply_few_shot_config(cfg):
    """Rewrite ``cfg.DATASETS.TRAIN`` in place (cfg must be unfrozen), e.g. from setup(); idempotent."""
    cfg.DATASETS.TRAIN = few_shot_train_datasets(cfg)
    return cfg
