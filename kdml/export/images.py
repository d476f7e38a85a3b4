"""Images for export: calibration images (training classes) and held-out images (test classes).

Both come through `kdml.embedding.load_uint8` (`kdml.data.eval_dataset`: centre crop,
antialiased resize, rounded to uint8), the camera pixels an exported model takes.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from kdml.data.image_set import ImageSet
from kdml.embedding.image_sets import image_subset, load_uint8


def calibration_images(train: ImageSet, image_size: int, count: int = 300, seed: int = 0,
                       crop_fraction: float = 0.875) -> np.ndarray:
    """`count` training images drawn uniformly without replacement, uint8 `(n, S, S, 3)`."""
    if count < 1:
        raise ValueError(f"--calibration_images must be >= 1. Received: {count}")
    rng = np.random.default_rng(seed)
    indices = np.sort(rng.permutation(train.num_images)[:count])
    return load_uint8(image_subset(train, indices), image_size, crop_fraction)


def heldout_images(test: ImageSet, image_size: int, max_images: int = 2000, seed: int = 0,
                   crop_fraction: float = 0.875) -> Tuple[np.ndarray, np.ndarray]:
    """Images of whole held-out classes, at most `max_images` (classes drawn at random).

    Whole classes keep every query's R (the class size) as in the full protocol.

    Returns:
        (uint8 `(n, S, S, 3)` images, `(n,)` labels).
    """
    counts = test.class_counts()
    if max_images and test.num_images > max_images:
        order = np.random.default_rng(seed).permutation(test.num_classes)
        keep = order[np.cumsum(counts[order]) <= max_images]
        if len(keep) < 2:
            keep = order[:2]
        indices = np.flatnonzero(np.isin(test.labels, keep))
    else:
        indices = np.arange(test.num_images)
    subset = image_subset(test, indices)
    return load_uint8(subset, image_size, crop_fraction), subset.labels.copy()
