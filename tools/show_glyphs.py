"""Writes a PNG contact sheet of the synthetic glyphs, so a person can look at the data.

One row per class (its first `--images` images), a grey gutter between images, each
pixel magnified `--zoom` times. The classes come from `kdml.data.sources.synthetic`
with its default jitter, so the sheet shows exactly what `--dataset=synthetic` trains on.

    python tools/show_glyphs.py --output=/tmp/glyphs.png --classes=100,101,102,103

Needs Pillow (installed with Keras' image utilities) to write the PNG.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image

if __name__ == "__main__":  # a script run: TensorFlow starts quietly (before kdml imports it)
    import quiet  # tools/quiet.py

    quiet.quiet_startup()

from kdml.data.sources import synthetic  # noqa: E402


def contact_sheet(
    pixels: np.ndarray, rows: int, cols: int, zoom: int = 4, gutter: int = 2
) -> np.ndarray:
    """(rows * cols, S, S, 3) uint8 -> one (H, W, 3) uint8 grid, row-major."""
    s = pixels.shape[1] * zoom
    sheet = np.full(
        (rows * (s + gutter) + gutter, cols * (s + gutter) + gutter, 3), 128, np.uint8
    )
    for k, image in enumerate(pixels[: rows * cols]):
        r, c = divmod(k, cols)
        big = image.repeat(zoom, axis=0).repeat(zoom, axis=1)
        y, x = gutter + r * (s + gutter), gutter + c * (s + gutter)
        sheet[y : y + s, x : x + s] = big
    return sheet


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="/tmp/kdml_glyphs.png")
    parser.add_argument(
        "--classes", default="100,101,102,103,104,105,106,107",
        help="comma-separated class ids (default: unseen test classes 100-107)",
    )
    parser.add_argument("--images", type=int, default=12, help="images per class shown")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zoom", type=int, default=4)
    args = parser.parse_args(argv)

    class_ids = [int(c) for c in args.classes.split(",")]
    image_set = synthetic.glyphs(
        num_classes=max(class_ids) + 1,
        images_per_class=max(args.images, 2),
        image_size=args.image_size,
        seed=args.seed,
    )
    k = max(args.images, 2)
    chosen = np.concatenate(
        [image_set.pixels[c * k : c * k + args.images] for c in class_ids]
    )
    sheet = contact_sheet(chosen, rows=len(class_ids), cols=args.images, zoom=args.zoom)
    Image.fromarray(sheet).save(args.output)
    print(f"wrote {args.output}: classes {class_ids}, {args.images} images each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
