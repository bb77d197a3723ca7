"""A PNG contact sheet of a part dataset: image | objects coloured by class | parts coloured by type.

Works on any dataset in the ``*_parts`` format of docs/formats.md (objects with nested ``parts``),
so the synthetic world and the real part datasets can be eyeballed the same way.
"""
import colorsys
import math

import cv2
import numpy as np

from ..utils.io import atomic_write_bytes
from .image_io import read_image
from ..utils.masks import decode_rle

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BG = (32, 32, 32)


def palette(n, offset=0.0):
    """``n`` well separated BGR colours (golden-ratio hues, alternating brightness)."""
    colours = []
    for i in range(n):
        h = (offset + i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.8 if i % 2 else 0.6, 1.0 if i % 2 else 0.85)
        colours.append((int(b * 255), int(g * 255), int(r * 255)))
    return colours


def _text(img, text, org, scale=0.4, colour=(255, 255, 255)):
    """Text with a dark outline, readable on any background."""
    cv2.putText(img, text, org, _FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, org, _FONT, scale, colour, 1, cv2.LINE_AA)


def _fit(mask_or_img, size, interpolation):
    return cv2.resize(mask_or_img, (size, size), interpolation=interpolation)


def _overlay(base, masks, colours, edge_colour):
    """Dim ``base`` and paint each mask in its colour with a 1 px outline."""
    out = (base.astype(np.float32) * 0.3).astype(np.uint8)
    for m, c in zip(masks, colours):
        out[m] = (0.35 * base[m] + 0.65 * np.array(c, np.float32)).astype(np.uint8)
    for m in masks:
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, edge_colour, 1)
    return out


def _tile(record, size, thing_classes, obj_colours, part_colours):
    image = read_image(record["file_name"], format="BGR")  # UnreadableImageError names the file
    image = _fit(image, size, cv2.INTER_AREA)
    objs, obj_cols, parts, part_cols = [], [], [], []
    for ann in record["annotations"]:
        m = _fit(decode_rle(ann["segmentation"]).astype(np.uint8), size, cv2.INTER_NEAREST).astype(bool)
        objs.append(m)
        obj_cols.append(obj_colours[ann["category_id"]])
        for p in ann.get("parts", []):
            parts.append(_fit(decode_rle(p["segmentation"]).astype(np.uint8), size,
                              cv2.INTER_NEAREST).astype(bool))
            part_cols.append(part_colours[p["category_id"]])
    obj_panel = _overlay(image, objs, obj_cols, (255, 255, 255))
    for ann, m in zip(record["annotations"], objs):
        ys, xs = np.nonzero(m)
        if len(xs):
            _text(obj_panel, thing_classes[ann["category_id"]], (int(xs.min()), max(10, int(ys.min()) - 2)), 0.35)
    part_panel = _overlay(image, parts, part_cols, (20, 20, 20))
    for m in objs:  # object outlines on top, so part groups read as objects
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(part_panel, contours, -1, (255, 255, 255), 1)
    gap = np.full((size, 2, 3), _BG, np.uint8)
    return np.concatenate([image, gap, obj_panel, gap, part_panel], 1), len(objs), len(parts)


def _legend(width, entries, title):
    """Rows of colour swatches with names, wrapped to ``width``."""
    rows, x, row_h = [[]], 8 + cv2.getTextSize(title, _FONT, 0.45, 1)[0][0] + 12, 20
    for name, colour in entries:
        w = 16 + cv2.getTextSize(name, _FONT, 0.42, 1)[0][0] + 18
        if x + w > width and rows[-1]:
            rows.append([])
            x = 8 + cv2.getTextSize(title, _FONT, 0.45, 1)[0][0] + 12
        rows[-1].append((x, name, colour))
        x += w
    img = np.full((row_h * len(rows) + 6, width, 3), _BG, np.uint8)
    _text(img, title, (8, 15), 0.45)
    for r, row in enumerate(rows):
        y = r * row_h + 4
        for x, name, colour in row:
            cv2.rectangle(img, (x, y), (x + 12, y + 12), colour, -1)
            _text(img, name, (x + 16, y + 11), 0.42)
    return img


def draw_contact_sheet(records, metadata, num_images=12, columns=2, panel_size=192, title=None):
    """BGR uint8 sheet of the first ``num_images`` records (dicts in the ``*_parts`` format).

    ``metadata`` needs ``thing_classes`` and ``part_classes``; with ``object_part_classes`` the
    legend marks part types shared by several object classes with ``*``.
    """
    records = list(records)[:num_images]
    if not records:
        raise ValueError("contact sheet: no images to draw")
    things, part_names = list(metadata.thing_classes), list(metadata.part_classes)
    obj_colours, part_colours = palette(len(things)), palette(len(part_names), offset=0.31)
    users = {}
    for obj, pids in getattr(metadata, "object_part_classes", {}).items():
        for p in pids:
            users.setdefault(p, set()).add(obj)
    tiles = []
    for rec in records:
        tile, n_obj, n_parts = _tile(rec, panel_size, things, obj_colours, part_colours)
        caption = np.full((18, tile.shape[1], 3), _BG, np.uint8)
        name = rec.get("file_name", "").rsplit("/", 1)[-1]
        _text(caption, f"{name}   {n_obj} object{'s' * (n_obj != 1)}, {n_parts} parts", (4, 13), 0.4, (220, 220, 220))
        tiles.append(np.concatenate([caption, tile], 0))
    th, tw = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / columns)
    pad = 10
    width = columns * tw + (columns + 1) * pad
    grid = np.full((rows * (th + pad) + pad, width, 3), _BG, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        grid[y:y + th, x:x + tw] = t
    header = np.full((30, width, 3), _BG, np.uint8)
    _text(header, title or "image  |  objects (by class)  |  parts (by part type)", (pad, 21), 0.6)
    objects_legend = _legend(width, list(zip(things, obj_colours)), "objects:")
    part_entries = [(n + ("*" if len(users.get(i, ())) > 1 else ""), c)
                    for i, (n, c) in enumerate(zip(part_names, part_colours))]
    parts_legend = _legend(width, part_entries, "parts:")
    footer = np.full((20, width, 3), _BG, np.uint8)
    if users:
        _text(footer, "* part type shared by several object classes", (pad, 14), 0.4, (200, 200, 200))
    return np.concatenate([header, grid, objects_legend, parts_legend, footer], 0)


def save_contact_sheet(path, records, metadata, **kwargs):
    """Draw the sheet (see ``draw_contact_sheet``) and write it to ``path`` as PNG, atomically."""
    sheet = draw_contact_sheet(records, metadata, **kwargs)
    ok, png = cv2.imencode(".png", sheet)
    if not ok:
        raise RuntimeError("contact sheet: PNG encoding failed")
    atomic_write_bytes(path, png.tobytes())
    return path
