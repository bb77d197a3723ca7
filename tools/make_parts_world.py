#!/usr/bin/env python
"""Generate (or reuse) the synthetic parts world, print its summary, optionally draw a contact sheet.

    python tools/make_parts_world.py                      # $DETECTRON2_DATASETS/parts_world/<key>/
    python tools/make_parts_world.py --contact-sheet output/demo/contact_sheet.png
    python tools/make_parts_world.py --root /tmp/pw --seed 3 --num-train 50 --num-val 20 --image-size 256

Each world lives in its own folder <root>/<key>, key = hash of its settings; a world is generated
once and never rewritten, so worlds with other settings (another --seed) sit beside it. The
datasets parts_world_* stand for the world of the configured PARTS_WORLD.* (defaults: the defaults
here); to use another one, pass the same settings as PARTS_WORLD.* options to every command.
"""
import argparse
import logging
import types

from part_distill.data.contact_sheet import save_contact_sheet
from part_distill.data.datasets.parts_world import load_parts_world, parts_world_metadata, parts_world_root
from part_distill.data.parts_world import WorldSettings, ensure_parts_world, summarize_parts_world


def parse_args():
    d = WorldSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=None,
                   help="folder of all worlds, as PARTS_WORLD.ROOT (default: $DETECTRON2_DATASETS/parts_world)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-train", type=int, default=d.num_train)
    p.add_argument("--num-val", type=int, default=d.num_val)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--max-objects", type=int, default=d.max_objects)
    p.add_argument("--contact-sheet", default=None, metavar="PNG", help="write a contact sheet of val images here")
    p.add_argument("--sheet-images", type=int, default=12, help="images on the contact sheet")
    return p.parse_args()


def main():
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    args = parse_args()
    settings = WorldSettings(seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                             image_size=args.image_size, max_objects=args.max_objects)
    root = ensure_parts_world(args.root or parts_world_root(), settings)
    print(summarize_parts_world(root))
    print(f"\nworld folder: {root}\nfingerprint:  world:{settings.key}/<split>")
    if args.contact_sheet:
        records = load_parts_world(root, "val", with_parts=True)
        save_contact_sheet(args.contact_sheet, records, types.SimpleNamespace(**parts_world_metadata()),
                           num_images=args.sheet_images, title=f"parts world val (seed {args.seed}): "
                           "image | objects by class | parts by part type")
        print(f"contact sheet: {args.contact_sheet}")


if __name__ == "__main__":
    main()
