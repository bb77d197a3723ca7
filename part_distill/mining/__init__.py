"""part_distill.mining: batched k-means and dense-CRF refinement, the compute core of part mining."""
from .kmeans import (  # noqa: F401
    BatchedKMeans,
    KMeansResult,
    assign,
    batched_kmeans,
    batched_kmeans_packed,
    dataset_kmeans,
    pad_packed,
)
from .dense_crf import DenseCRFRefiner, refine_part_labels  # noqa: F401
# -- the miner and its store (object sources, features, miner, COCO-shard store)
from .object_sources import OBJECT_SOURCE_REGISTRY, MinedObject, build_object_source  # noqa: F401
from .features import MINING_FEATURE_REGISTRY, build_feature_extractor  # noqa: F401
from .store import ConfigMismatchError, PartStore, read_manifest  # noqa: F401
from .miner import PartMiner, mine_parts  # noqa: F401
