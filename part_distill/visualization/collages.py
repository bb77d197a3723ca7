"""Purity collages (paper Sec 5.2, Fig 5): per (object class, part cluster) a 3x3 grid of random
instances, each tile the object crop with the part tinted red and outlined and the rest dimmed.

Output directory (what ``part_distill.rating`` serves)::

    <id>.png      one collage per (class, cluster); id = "class{C:04d}_cluster{K:03d}"
    index.json    {"format", "version", "method", "seed", "grid", "tile_size", "gap",
                   "collages": {id: {"object_class", "class_name", "cluster_id", "file",
                                     "num_instances", "num_shown", "instances": [...]}}}
    index.html    every collage with its class, cluster and counts

Layout, relied upon by tests and the rating app: tile ``i`` (row-major) occupies
``[gap + r*(tile+gap), +tile) x [gap + c*(tile+gap), +tile)`` with ``r, c = divmod(i, grid)``; the
rest of the canvas is ``BACKGROUND``. Tiles without an instance (cluster has fewer than grid**2)
are ``EMPTY_FILL`` crossed by an ``EMPTY_MARK`` X. Sampling is seeded per (seed, class, cluster),
so adding images of another class never changes a collage.
"""
import collections
import html
import logging
import os

import cv2
import numpy as np

from ..data.image_io import UnreadableImageError, SkipCounter, read_image
from ..utils.io import atomic_write_bytes, atomic_write_json
from ..utils.masks import decode_rle, mask_to_bbox_xywh

__all__ = [
    "COLLAGE_FORMAT", "BACKGROUND", "LETTERBOX", "EMPTY_FILL", "EMPTY_MARK", "TINT", "TINT_ALPHA",
    "OUTLINE", "OBJECT_DIM", "BACKGROUND_DIM",
    "collage_id", "part_boundary", "highlight_part", "render_tile", "tile_origin", "collage_size",
    "group_instances", "sample_order", "draw_collage", "make_collages",
]

logger = logging.getLogger(__name__)

COLLAGE_FORMAT = "part_distill.collages"
BACKGROUND = (32, 32, 32)          # BGR canvas between tiles
LETTERBOX = (0, 0, 0)              # tile area outside a non-square crop
EMPTY_FILL = (64, 64, 64)          # tile with no instance
EMPTY_MARK = (110, 110, 110)       # X across an empty tile
TINT = (0, 0, 255)                 # part colour (red, as in the paper's Fig 5)
TINT_ALPHA = 0.5                   # weight of TINT over the part's own pixels
OUTLINE = (0, 0, 255)              # part boundary
OBJECT_DIM = 0.6                   # object pixels outside the part keep 60% brightness (context)
BACKGROUND_DIM = 0.3               # pixels outside the object keep 30%


def collage_id(object_class, cluster_id):
    """File-name-safe id of a (class, cluster) collage."""
    return f"class{int(object_class):04d}_cluster{int(cluster_id):03d}"


def part_boundary(mask):
    """Pixels of ``mask`` with a 4-neighbour outside it (pixels beyond the array count as outside)."""
    m = np.pad(mask, 1, constant_values=False)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~interior


def highlight_part(image, part_mask, object_mask=None):
    """Dim everything (to OBJECT_DIM inside the object or everywhere without an object mask, else
    BACKGROUND_DIM), tint the part with TINT and outline its boundary (uint8 BGR in and out)."""
    img = image.astype(np.float32)
    scale = np.full(part_mask.shape, BACKGROUND_DIM if object_mask is not None else OBJECT_DIM, np.float32)
    if object_mask is not None:
        scale[object_mask] = OBJECT_DIM
    out = img * scale[..., None]
    out[part_mask] = (1.0 - TINT_ALPHA) * img[part_mask] + TINT_ALPHA * np.array(TINT, np.float32)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    out[part_boundary(part_mask)] = OUTLINE
    return out


def _crop_box(box_xywh, height, width, margin):
    """Integer [x0, y0, x1, y1) of the box grown by ``margin`` * its longer side, clipped to the image."""
    x, y, w, h = box_xywh
    pad = margin * max(w, h)
    x0, y0 = int(np.floor(max(0.0, x - pad))), int(np.floor(max(0.0, y - pad)))
    x1, y1 = int(np.ceil(min(float(width), x + w + pad))), int(np.ceil(min(float(height), y + h + pad)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def render_tile(image, part_mask, object_box, tile_size, object_mask=None, margin=0.1):
    """The object crop (``object_box`` XYWH grown by ``margin``) fitted into a square tile, letterboxed,
    with the part highlighted. Masks are resized nearest-neighbour so highlighted pixels stay crisp."""
    height, width = part_mask.shape
    x0, y0, x1, y1 = _crop_box(object_box, height, width, margin)
    crop, pm = image[y0:y1, x0:x1], part_mask[y0:y1, x0:x1]
    om = object_mask[y0:y1, x0:x1] if object_mask is not None else None
    ch, cw = pm.shape
    scale = tile_size / max(ch, cw)
    nh, nw = max(1, int(round(ch * scale))), max(1, int(round(cw * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (nw, nh), interpolation=interp)
    pm = cv2.resize(pm.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
    if om is not None:
        om = cv2.resize(om.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(bool)
    tile = np.empty((tile_size, tile_size, 3), np.uint8)
    tile[:] = LETTERBOX
    oy, ox = (tile_size - nh) // 2, (tile_size - nw) // 2
    tile[oy:oy + nh, ox:ox + nw] = highlight_part(crop, pm, om)
    return tile


def _empty_tile(tile_size):
    tile = np.empty((tile_size, tile_size, 3), np.uint8)
    tile[:] = EMPTY_FILL
    cv2.line(tile, (0, 0), (tile_size - 1, tile_size - 1), EMPTY_MARK, 1)
    cv2.line(tile, (0, tile_size - 1), (tile_size - 1, 0), EMPTY_MARK, 1)
    return tile


def tile_origin(index, tile_size, grid=3, gap=4):
    """(y, x) of tile ``index``'s top-left corner in the collage."""
    r, c = divmod(index, grid)
    return gap + r * (tile_size + gap), gap + c * (tile_size + gap)


def collage_size(tile_size, grid=3, gap=4):
    return grid * tile_size + (grid + 1) * gap


def draw_collage(tiles, tile_size, grid=3, gap=4):
    """Canvas with ``tiles`` (<= grid**2 uint8 BGR tiles) in row-major order; missing ones marked empty."""
    if len(tiles) > grid * grid:
        raise ValueError(f"draw_collage: {len(tiles)} tiles do not fit a {grid}x{grid} grid")
    side = collage_size(tile_size, grid, gap)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = BACKGROUND
    for i in range(grid * grid):
        y, x = tile_origin(i, tile_size, grid, gap)
        canvas[y:y + tile_size, x:x + tile_size] = tiles[i] if i < len(tiles) else _empty_tile(tile_size)
    return canvas


def group_instances(records, counter, min_score=0.0, max_part_area_fraction=None):
    """{(object_class, cluster_id): [(record index, part index), ...]} in record order.

    Parts without a cluster or class, below ``min_score``, or (paper Sec 5.4) covering more than
    ``max_part_area_fraction`` of their object are counted in ``counter`` and left out.
    """
    groups = collections.defaultdict(list)
    for i, rec in enumerate(records):
        for j, p in enumerate(rec["parts"]):
            if p["cluster_id"] < 0 or p["object_class"] < 0:
                counter.skip("no_cluster_or_class", f"{rec['file_name']} part {j}")
                continue
            if p["score"] < min_score:
                counter.skip("below_min_score")
                continue
            if max_part_area_fraction is not None:
                if "object_segmentation" not in p:
                    raise ValueError("max_part_area_fraction needs 'object_segmentation' in every part "
                                     f"({rec['file_name']} part {j} has none)")
                obj_area = decode_rle(p["object_segmentation"]).sum()
                if decode_rle(p["segmentation"]).sum() > max_part_area_fraction * obj_area:
                    counter.skip("part_too_large")
                    continue
            groups[(int(p["object_class"]), int(p["cluster_id"]))].append((i, j))
    return dict(sorted(groups.items()))


def sample_order(num, seed, object_class, cluster_id):
    """Random order of a group's ``num`` instances, seeded by (seed, class, cluster) only."""
    return np.random.default_rng([int(seed), int(object_class), int(cluster_id)]).permutation(num)


class _ImageCache:
    """The last few decoded images: a collage reads several parts of the same image."""

    def __init__(self, image_root, size=32):
        self.root, self.size, self.items = image_root, size, collections.OrderedDict()

    def get(self, file_name):
        path = os.path.join(self.root, file_name) if self.root else file_name
        if path in self.items:
            self.items.move_to_end(path)
            return self.items[path]
        img = read_image(path, format="BGR")
        self.items[path] = img
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return img


def _instance_tile(rec, part, images, tile_size, margin):
    img = images.get(rec["file_name"])
    mask = decode_rle(part["segmentation"])
    if mask.shape != img.shape[:2]:
        raise ValueError(f"mask {mask.shape} != image {img.shape[:2]}")
    obj = decode_rle(part["object_segmentation"]) if "object_segmentation" in part else None
    if obj is not None and obj.shape != mask.shape:
        raise ValueError(f"object mask {obj.shape} != image {img.shape[:2]}")
    box = part.get("object_bbox") or (mask_to_bbox_xywh(obj) if obj is not None else mask_to_bbox_xywh(mask))
    return render_tile(img, mask, box, tile_size, object_mask=obj, margin=margin)


def _index_html(index, title):
    rows = []
    for cid, e in index["collages"].items():
        rows.append(
            f'<div class="c"><a href="{html.escape(e["file"])}"><img src="{html.escape(e["file"])}" '
            f'width="240" alt="{html.escape(cid)}"></a><br><b>{html.escape(e["class_name"])}</b> '
            f'cluster {e["cluster_id"]}<br>{e["num_shown"]} shown / {e["num_instances"]} instances</div>')
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;background:#222;color:#ddd}.c{display:inline-block;"
            "margin:6px;vertical-align:top;font-size:13px}</style></head><body><h1>" + html.escape(title)
            + f"</h1><p>{len(index['collages'])} collages (seed {index['seed']}).</p>" + "".join(rows)
            + "</body></html>\n")


def make_collages(records, thing_classes, output_dir, *, seed=0, grid=3, tile_size=160, gap=4, margin=0.1,
                  min_score=0.0, max_part_area_fraction=None, min_instances=1, method=None, image_root=None):
    """Write one collage PNG per (class, cluster) plus index.json and index.html; returns the index.

    ``records``: image records of part_distill/visualization/records.py. Unreadable images and
    instances whose mask does not match the image are skipped, counted (``index["skipped"]``) and
    replaced by the next instance of the random order.
    """
    counter = SkipCounter("collages")
    groups = group_instances(records, counter, min_score, max_part_area_fraction)
    images = _ImageCache(image_root)
    collages = {}
    for (cls, cluster), members in groups.items():
        if len(members) < min_instances:
            counter.skip("cluster_below_min_instances")
            continue
        if not 0 <= cls < len(thing_classes):
            raise ValueError(f"object class {cls} is outside thing_classes (len {len(thing_classes)})")
        tiles, shown = [], []
        for k in sample_order(len(members), seed, cls, cluster):
            if len(tiles) == grid * grid:
                break
            i, j = members[k]
            try:
                tiles.append(_instance_tile(records[i], records[i]["parts"][j], images, tile_size, margin))
            except UnreadableImageError as e:
                counter.skip("unreadable_image", e)
                continue
            except ValueError as e:
                counter.skip("size_mismatch", f"{records[i]['file_name']} part {j}: {e}")
                continue
            shown.append({"file_name": records[i]["file_name"], "part_index": int(j)})
        cid = collage_id(cls, cluster)
        ok, png = cv2.imencode(".png", draw_collage(tiles, tile_size, grid, gap))
        if not ok:
            raise RuntimeError(f"collages: PNG encoding of {cid} failed")
        atomic_write_bytes(os.path.join(output_dir, cid + ".png"), png.tobytes())
        collages[cid] = {"object_class": cls, "class_name": str(thing_classes[cls]), "cluster_id": cluster,
                         "file": cid + ".png", "num_instances": len(members), "num_shown": len(shown),
                         "instances": shown}
    counter.warn_summary(logger)
    index = {"format": COLLAGE_FORMAT, "version": 1, "method": method, "seed": seed, "grid": grid,
             "tile_size": tile_size, "gap": gap, "collages": collages, "skipped": counter.as_dict()}
    atomic_write_json(os.path.join(output_dir, "index.json"), index, indent=1)
    with_title = f"Purity collages{' - ' + method if method else ''}"
    atomic_write_bytes(os.path.join(output_dir, "index.html"), _index_html(index, with_title).encode("utf-8"))
    return index
