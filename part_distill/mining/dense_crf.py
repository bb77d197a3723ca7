"""Dense-CRF refinement of mined part maps (pydensecrf), in-process or in a bounded worker pool.

k-means parts follow feature-grid blocks; a fully connected CRF on the RGB image snaps their
boundaries to image edges (paper Fig 6). Each object is refined on the crop of its box (plus a
margin of context): labels inside the object mask are the unary evidence (``gt_prob``), pixels
outside the mask or without a label are "unsure" (uniform unary) and the result is only read
inside the mask, so parts never leak out of their object.

The reference implementation ran a CRF worker that polled a queue forever. Here a
``concurrent.futures.ProcessPoolExecutor`` with a fixed number of workers maps over the jobs in
order and shuts down when the refiner is closed (use it as a context manager).
"""
import concurrent.futures
import multiprocessing

import numpy as np
from detectron2.config import configurable

__all__ = ["refine_part_labels", "DenseCRFRefiner"]


def refine_part_labels(
    image,
    labels,
    mask=None,
    num_labels=None,
    gt_prob=0.7,
    num_iters=10,
    gaussian_sxy=3.0,
    gaussian_compat=3.0,
    bilateral_sxy=20.0,
    bilateral_srgb=13.0,
    bilateral_compat=10.0,
    crop_margin=8,
):
    """Refine one object's part label map with a dense CRF.

    Args:
        image: HxWx3 uint8 RGB image.
        labels: HxW int map, part id in [0, num_labels) inside the object, -1 elsewhere / unknown.
        mask: HxW bool object mask (default: ``labels >= 0``).
        num_labels: number of parts (default: ``labels.max() + 1``).
        gt_prob ... bilateral_compat: pydensecrf unary confidence and Potts kernel parameters.
        crop_margin: pixels of context kept around the mask's box.

    Returns:
        HxW int64 map: refined part ids inside ``mask``, -1 outside. Masks with fewer than two
        labels present are returned unchanged (nothing to refine).
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    image = np.asarray(image)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"dense CRF needs an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels {labels.shape} do not match image {image.shape[:2]}")
    mask = labels >= 0 if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != labels.shape:
        raise ValueError(f"mask {mask.shape} does not match labels {labels.shape}")
    out = np.full(labels.shape, -1, dtype=np.int64)
    inside = mask & (labels >= 0)
    if num_labels is None:
        num_labels = int(labels[inside].max()) + 1 if inside.any() else 0
    if (labels[inside] >= num_labels).any():
        raise ValueError(f"labels must be < num_labels={num_labels}")
    out[inside] = labels[inside]
    if num_labels < 2 or np.unique(labels[inside]).size < 2:
        return out

    ys, xs = np.nonzero(mask)
    h, w = labels.shape
    y0, y1 = max(0, ys.min() - crop_margin), min(h, ys.max() + 1 + crop_margin)
    x0, x1 = max(0, xs.min() - crop_margin), min(w, xs.max() + 1 + crop_margin)
    crop_lab = np.where(inside, labels + 1, 0)[y0:y1, x0:x1]  # 0 = unsure
    crop_img = np.ascontiguousarray(image[y0:y1, x0:x1])
    ch, cw = crop_lab.shape

    crf = dcrf.DenseCRF2D(cw, ch, num_labels)
    crf.setUnaryEnergy(unary_from_labels(crop_lab, num_labels, gt_prob=gt_prob, zero_unsure=True))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=crop_img, compat=bilateral_compat)
    q = np.asarray(crf.inference(num_iters)).reshape(num_labels, ch, cw)
    refined = q.argmax(0)
    crop_mask = mask[y0:y1, x0:x1]
    out[y0:y1, x0:x1][crop_mask] = refined[crop_mask]
    return out


def _refine_job(args):
    # Top-level so worker processes can unpickle it.
    image, labels, mask, num_labels, params = args
    return refine_part_labels(image, labels, mask, num_labels, **params)


class DenseCRFRefiner:
    """Refine many instances' part maps, optionally in a pool of ``num_workers`` processes.

    ``with DenseCRFRefiner(cfg) as crf: maps = crf.refine_many(jobs)`` where each job is
    ``(image, labels, mask)`` or ``(image, labels, mask, num_labels)``; results come back in job
    order and equal the in-process results. The pool starts lazily and ``close()`` (or leaving
    the ``with`` block) shuts it down, waiting for the workers.
    """

    @configurable
    def __init__(
        self,
        *,
        gt_prob=0.7,
        num_iters=10,
        gaussian_sxy=3.0,
        gaussian_compat=3.0,
        bilateral_sxy=20.0,
        bilateral_srgb=13.0,
        bilateral_compat=10.0,
        crop_margin=8,
        num_workers=0,
        start_method="fork",
    ):
        self._pool = None
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.params = dict(
            gt_prob=gt_prob, num_iters=num_iters, gaussian_sxy=gaussian_sxy,
            gaussian_compat=gaussian_compat, bilateral_sxy=bilateral_sxy,
            bilateral_srgb=bilateral_srgb, bilateral_compat=bilateral_compat, crop_margin=crop_margin,
        )
        self.num_workers = num_workers
        self.start_method = start_method

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MINING.CRF
        return {
            "gt_prob": c.GT_PROB,
            "num_iters": c.NUM_ITERS,
            "gaussian_sxy": c.GAUSSIAN_SXY,
            "gaussian_compat": c.GAUSSIAN_COMPAT,
            "bilateral_sxy": c.BILATERAL_SXY,
            "bilateral_srgb": c.BILATERAL_SRGB,
            "bilateral_compat": c.BILATERAL_COMPAT,
            "crop_margin": c.CROP_MARGIN,
            "num_workers": c.NUM_WORKERS,
            "start_method": c.START_METHOD,
        }

    def refine(self, image, labels, mask=None, num_labels=None):
        """Refine one instance in the calling process."""
        return refine_part_labels(image, labels, mask, num_labels, **self.params)

    def refine_many(self, jobs):
        """Refine a sequence of ``(image, labels, mask[, num_labels])`` jobs; list of maps in order."""
        args = []
        for job in jobs:
            if len(job) not in (3, 4):
                raise ValueError("each dense-CRF job is (image, labels, mask) or (image, labels, mask, num_labels)")
            args.append((job[0], job[1], job[2], job[3] if len(job) == 4 else None, self.params))
        if self.num_workers == 0 or len(args) <= 1:
            return [_refine_job(a) for a in args]
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.num_workers, mp_context=multiprocessing.get_context(self.start_method)
            )
        chunksize = max(1, len(args) // (4 * self.num_workers))
        return list(self._pool.map(_refine_job, args, chunksize=chunksize))

    def close(self):
        """Shut the worker pool down (waits for running jobs); safe to call twice."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()
