"""Binary-mask <-> COCO RLE conversions shared by datasets, miner, evaluators and the store."""
import numpy as np
from pycocotools import mask as mask_util


def encode_rle(mask):
    """Encode an HxW boolean/uint8 mask as a JSON-ready COCO RLE dict (``counts`` is ``str``)."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_rle(rle):
    """Decode a COCO RLE dict (str or bytes counts, or uncompressed list counts) to an HxW bool mask."""
    if isinstance(rle.get("counts"), list):
        rle = mask_util.frPyObjects(rle, *rle["size"])
    elif isinstance(rle["counts"], str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_util.decode(rle).astype(bool)


def polygons_to_mask(polygons, height, width):
    """Rasterise COCO polygon lists to an HxW bool mask."""
    rles = mask_util.frPyObjects(polygons, height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def segmentation_to_mask(segmentation, height, width):
    """HxW bool mask of a COCO segmentation (RLE dict or polygon list) that must be ``height`` x ``width``."""
    if isinstance(segmentation, dict):
        mask = decode_rle(segmentation)
    elif isinstance(segmentation, list):
        mask = polygons_to_mask(segmentation, height, width)
    else:
        raise ValueError(f"Unsupported segmentation type {type(segmentation).__name__}; "
                         "expected a COCO RLE dict or a polygon list")
    if mask.shape != (height, width):
        raise ValueError(f"segmentation of size {mask.shape} does not match the image ({height}, {width})")
    return mask


def mask_to_bbox_xywh(mask):
    """Tight XYWH box of a bool mask (pixel-inclusive, COCO convention); zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) - x0 + 1.0, float(ys.max()) - y0 + 1.0]
