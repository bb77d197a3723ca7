"""Step I of PARTICLE (Sec 3.1, Algorithm 1 PARTDISCOVERY): per-image k-means of hypercolumns.

The hypercolumn is :class:`~part_distill.mining.features.BackboneFeatures` with every level
L2-normalised and resized to the finest level's grid (the paper interpolates to 64 x 64 for a
224 px input; the finest grid of res2 is 48 x 48 for 192 px). Each image is clustered on its own
with the miner's batched cosine k-means; from the second iteration on, k-means starts from the
image's centroids of the previous iteration (Sec 6.3), so part ids stay consistent over iterations.
Labels live on the feature grid; views upsample them with nearest neighbour.
"""
import numpy as np
import torch
from tqdm import tqdm

from ..data.image_io import SkipCounter
from ..mining.features import BackboneFeatures
from ..mining.kmeans import batched_kmeans
from .images import read_square_image

__all__ = ["PartDiscovery", "discovery_seed", "build_hypercolumn_extractor"]


def discovery_seed(seed, iteration, index):
    """k-means++ seed of image ``index``: a function of the image alone, so sharding cannot change it."""
    return int(np.random.SeedSequence([int(seed), int(iteration), int(index)]).generate_state(1)[0] >> 1)


def build_hypercolumn_extractor(backbone, levels, pixel_mean, pixel_std, input_format):
    """BackboneFeatures over ``levels`` on the finest of their grids, each level L2-normalised."""
    shapes = backbone.output_shape()
    missing = [lv for lv in levels if lv not in shapes]
    if missing:
        raise ValueError(f"PARTICLE levels {missing} are not outputs of the backbone (it returns {sorted(shapes)}; "
                         f"add them to its OUT_FEATURES, e.g. MODEL.EFFICIENTNET.OUT_FEATURES)")
    grid = min(levels, key=lambda lv: shapes[lv].stride)
    return BackboneFeatures(backbone=backbone, levels=list(levels), grid_level=grid, normalize=True,
                            pixel_mean=tuple(pixel_mean), pixel_std=tuple(pixel_std), input_format=input_format)


class PartDiscovery:
    """Part-label maps of images under the current encoder; call on each rank with its own images."""

    def __init__(self, extractor, num_parts, image_size, batch_size=16, max_iter=100, tol=1e-4, seed=0,
                 device="cpu"):
        if image_size % extractor.size_divisibility:
            raise ValueError(f"PARTICLE.IMAGE_SIZE={image_size} must be a multiple of the backbone's "
                             f"size divisibility {extractor.size_divisibility}")
        self.extractor = extractor
        self.k = int(num_parts)
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.seed = int(seed)
        self.device = torch.device(device)

    def discover_batch(self, images, indices, iteration, init_centers=None):
        """images: list of uint8 [S, S, 3]; returns labels [B, g, g] (int64, -1 = not clustered),
        centers [B, k, D] and the skipped flags [B]."""
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().to(self.device)
        was_training = self.extractor.backbone.training
        self.extractor.backbone.eval()
        try:
            feats = self.extractor(x)  # no-grad by construction of the mining extractors
        finally:
            self.extractor.backbone.train(was_training)
        b, d, gh, gw = feats.shape
        points = feats.flatten(2).transpose(1, 2).contiguous()
        seeds = [discovery_seed(self.seed, iteration, i) for i in indices]
        init = "k-means++" if init_centers is None else init_centers.to(points)
        res = batched_kmeans(points, None, k=self.k, metric="cosine", max_iter=self.max_iter, tol=self.tol,
                             init=init, instance_seeds=seeds, nan_policy="skip")
        return res.labels.view(b, gh, gw), res.centers, res.skipped

    def discover(self, dicts, indices, iteration, prev_centers=None, show_progress=True):
        """Discover the parts of ``dicts[i]`` for i in ``indices``.

        ``prev_centers``: {index: [k, D] tensor} of the previous iteration (warm start) or None.
        Returns ({index: int8/int16 label grid}, {index: centers [k, D]}, SkipCounter).
        """
        counter = SkipCounter("PARTICLE discovery images")
        labels, centers = {}, {}
        bar = tqdm(total=len(indices), desc=f"particle discovery it{iteration}", unit="img",
                   disable=not show_progress)
        for s in range(0, len(indices), self.batch_size):
            chunk, images = [], []
            for i in indices[s:s + self.batch_size]:
                im = read_square_image(dicts[i], self.image_size, counter)
                if im is not None:
                    chunk.append(i)
                    images.append(im)
            bar.update(len(indices[s:s + self.batch_size]))
            if not chunk:
                continue
            init = None
            if prev_centers is not None:
                have = [i in prev_centers for i in chunk]
                if all(have):
                    init = torch.stack([prev_centers[i] for i in chunk])
                elif any(have):
                    # A mixed batch cannot be half warm-started: fit the unseen images on their own.
                    self._discover_split(chunk, images, have, iteration, prev_centers, labels, centers, counter)
                    continue
            lab, cen, skipped = self.discover_batch(images, chunk, iteration, init)
            self._collect(chunk, lab, cen, skipped, labels, centers, counter)
        bar.close()
        return labels, centers, counter

    def _discover_split(self, chunk, images, have, iteration, prev_centers, labels, centers, counter):
        for flag in (True, False):
            sub = [j for j, h in enumerate(have) if h == flag]
            idx = [chunk[j] for j in sub]
            init = torch.stack([prev_centers[i] for i in idx]) if flag else None
            lab, cen, skipped = self.discover_batch([images[j] for j in sub], idx, iteration, init)
            self._collect(idx, lab, cen, skipped, labels, centers, counter)

    @staticmethod
    def _collect(chunk, lab, cen, skipped, labels, centers, counter):
        dtype = np.int8 if lab.max() < 127 else np.int16
        for j, i in enumerate(chunk):
            if bool(skipped[j]):
                counter.skip("kmeans_skipped", f"image index {i}: non-finite features or too few cells")
                continue
            labels[i] = lab[j].cpu().numpy().astype(dtype)
            centers[i] = cen[j].cpu()


def discover_sharded(discovery, dicts, indices, iteration, prev_centers=None):
    """:meth:`PartDiscovery.discover` with ``indices`` split across ranks (rank r takes every
    world-size-th image), then all-gathered: every rank returns the labels and centers of all images.
    Results do not depend on the world size (per-image seeds and warm starts)."""
    from detectron2.utils import comm

    rank, world = comm.get_rank(), comm.get_world_size()
    mine = list(indices)[rank::world]
    labels, centers, counter = discovery.discover(dicts, mine, iteration, prev_centers,
                                                  show_progress=comm.is_main_process())
    if world > 1:
        parts = comm.all_gather((labels, centers, counter))
        labels, centers = {}, {}
        counter = SkipCounter("PARTICLE discovery images")
        for lab, cen, sk in parts:
            labels.update(lab)
            centers.update(cen)
            counter.merge(sk)
    return labels, centers, counter
