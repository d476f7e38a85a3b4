"""`embed_image_set`: an `ImageSet` through an embedder, in batches, in order.

Images go through `kdml.data.eval_dataset` (centre crop `crop_fraction` of the shorter
side, antialiased resize to the embedder's square input, float32 pixels in [0, 255]),
which is what `python -m kdml.evaluate` measures and what `kdml.index` stores. A long
set (`PROGRESS_MIN_IMAGES` or more) embedded with stderr on a terminal shows a progress
line there; a pipe, a log file or a test sees nothing.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

import numpy as np

from kdml.data.image_set import ImageSet
from kdml.data.pipeline import eval_dataset

PROGRESS_MIN_IMAGES = 5_000


class Progress:
    """One `\\r`-rewritten line `<label>: <done>/<total> images (<p>%)` on `stream`.

    Args:
        total: images to embed.
        label: what is embedded (the set's name).
        stream: where the line goes (default `sys.stderr`).
        enabled: True, False, or "auto": when `total >= PROGRESS_MIN_IMAGES` and
            `stream` is a terminal.
    """

    def __init__(self, total: int, label: str = "Embedding", stream: Optional[TextIO] = None,
                 enabled="auto"):
        self.total, self.label, self.done = int(total), label, 0
        self.stream = sys.stderr if stream is None else stream
        if enabled == "auto":
            isatty = getattr(self.stream, "isatty", None)
            enabled = self.total >= PROGRESS_MIN_IMAGES and bool(isatty and isatty())
        self.enabled = bool(enabled)

    def update(self, count: int) -> None:
        """Adds `count` embedded images and rewrites the line."""
        self.done += int(count)
        if self.enabled:
            percent = 100 * self.done // max(self.total, 1)
            self.stream.write(f"\r{self.label}: {self.done:,}/{self.total:,} images ({percent}%)")
            self.stream.flush()

    def close(self) -> None:
        """Ends the line (once something was written)."""
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


def embed_image_set(embedder, image_set: ImageSet, *, batch_size: int = 256,
                    crop_fraction: float = 0.875, progress="auto",
                    progress_stream: Optional[TextIO] = None) -> np.ndarray:
    """`(N, d)` float32 embeddings of an `ImageSet` in its order, through `embedder.embed`.

    Args:
        embedder: anything with `image_size` `(S, S)` and `embed((b, S, S, 3) float32
            pixels in [0, 255], batch_size) -> (b, d)`: a `LoadedEmbedder`, or
            `kdml.index`'s replicated wrapper of one.
        image_set: N labelled images (paths or pixels).
        batch_size: images per `eval_dataset` batch and per `embed` call.
        crop_fraction: centre crop, as a fraction of the shorter side.
        progress: True, False or "auto" (`Progress`).
        progress_stream: where the progress line goes (default stderr).

    Raises:
        ValueError: the embedder's input is not square.
    """
    height, width = embedder.image_size
    if height != width:
        raise ValueError(
            f"The model's input is {height} x {width}; kdml.evaluate feeds square RGB images "
            f"(N, S, S, 3). Export the embedder with a square input.")
    data = eval_dataset(image_set, image_size=int(height), batch_size=batch_size,
                        crop_fraction=crop_fraction)
    bar = Progress(image_set.num_images, f"Embedding {image_set.name or 'images'}",
                   progress_stream, progress)
    out = []
    try:
        for images, _ in data:
            out.append(embedder.embed(images.numpy(), batch_size=batch_size))
            bar.update(len(out[-1]))
    finally:
        bar.close()
    return np.concatenate(out, axis=0)
