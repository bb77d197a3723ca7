"""Part segmentation evaluators (paper Sec 5.1): AR@k, mIoU with cluster association, NMI/ARI.

Each is a detectron2 ``DatasetEvaluator`` registered in ``PARTS_EVALUATOR_REGISTRY``;
``build_part_evaluators(cfg, dataset_name, output_dir)`` builds those in ``cfg.TEST.PARTS.EVALUATORS``.
Every evaluator keeps only a small per-image record (match counts or pixel contingency counts,
never dense masks), gathers the records to rank 0 with ``detectron2.utils.comm.gather``, returns
``OrderedDict(task -> {metric: value in %})`` and writes ``<task>.csv`` / ``<task>.md`` under the
output dir (atomically).

Ground truth: the dataset dicts of a ``*_parts`` dataset (docs/formats.md), looked up by the
input's ``image_id``; each object annotation holds ``parts`` with COCO RLE ``segmentation`` and a
contiguous ``category_id`` into ``metadata.part_classes``.

Prediction format (``process(inputs, outputs)``; ``outputs[i]`` for ``inputs[i]``)::

    outputs[i]["parts"] = Instances(image_size=(H, W),     # H, W = the GT image's height, width
        pred_masks     Bool[N, H, W]   part masks at the original image resolution
        scores         Float[N]        ranks parts (AR's top-k, who wins an overlapped pixel)
        pred_clusters  Long[N]         cluster id within the owning object's class; -1 = none
                                       (such parts count for AR but are dropped for mIoU/NMI/ARI)
        object_index   Long[N]         owning object; a row of the image's GT annotations when
                                       TEST.PARTS.OBJECT_ASSIGNMENT="object_index"; -1 = none
        object_classes Long[N])        object class of the owner; -1 = none

Any other keys (``"instances"``, ``pred_features``) are ignored. A predicted part's label for
mIoU/NMI/ARI is the pair ``(object_classes, pred_clusters)``. By default
(``OBJECT_ASSIGNMENT="max_overlap"``) each part belongs to the GT object it shares most pixels
with, so predictions made with predicted objects are evaluated the same way.
Ties in score keep the model's order (stable sort), as pycocotools does.
"""
from .build import PARTS_EVALUATOR_REGISTRY, build_part_evaluators  # noqa: F401
from .average_recall import PartAREvaluator  # noqa: F401
from .reference_ar import PartARReferenceEvaluator  # noqa: F401
from .miou import PartMIoUEvaluator  # noqa: F401
from .nmi_ari import PartNMIARIEvaluator  # noqa: F401
