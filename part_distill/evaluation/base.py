"""What the three part evaluators share: ground truth, per-image compression, gathering, reports."""
import copy
import csv
import io
import itertools
import logging
import os

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..utils.io import atomic_open
from .ground_truth import PartGroundTruth
from .predictions import parse_parts

logger = logging.getLogger(__name__)


def write_tables(output_dir, stem, header, rows, notes=()):
    """Write ``rows`` as ``<stem>.csv`` and ``<stem>.md`` (markdown table + notes) atomically."""
    if not output_dir:
        return
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    with atomic_open(os.path.join(output_dir, stem + ".csv")) as f:
        f.write(buf.getvalue())
    fmt = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in header]
    lines = ["| " + " | ".join(fmt) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) + " |")
    lines += [""] + [f"{n}" for n in notes]
    with atomic_open(os.path.join(output_dir, stem + ".md")) as f:
        f.write("\n".join(lines) + "\n")


class PartEvaluatorBase(DatasetEvaluator):
    """Keeps one small record per image (never dense masks); rank 0 turns all records into metrics.

    Subclasses implement ``_process_image(image_id, gt, parts) -> record`` and
    ``_compute(records) -> OrderedDict``. ``needs_part_maps`` says whether GT part label maps are decoded.
    """

    needs_part_maps = True

    def __init__(self, dataset_name=None, *, dataset_dicts=None, metadata=None, output_dir=None,
                 distributed=True):
        self._gt = PartGroundTruth(dataset_name, dataset_dicts, metadata)
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._records = []

    def reset(self):
        self._records = []

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            gt = self._gt.image(inp["image_id"], need_part_maps=self.needs_part_maps)
            parts = parse_parts(out, gt.height, gt.width)
            self._records.append(self._process_image(inp["image_id"], gt, parts))

    def evaluate(self):
        if self._distributed and comm.get_world_size() > 1:
            comm.synchronize()
            records = list(itertools.chain(*comm.gather(self._records, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            records = self._records
        if not records:
            logger.warning(f"{type(self).__name__} received no predictions")
        return copy.deepcopy(self._compute(records))

    def _process_image(self, image_id, gt, parts):
        raise NotImplementedError

    def _compute(self, records):
        raise NotImplementedError
