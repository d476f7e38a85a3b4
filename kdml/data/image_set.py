"""`ImageSet`: labelled images of one split, the unit every data source returns."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from absl import logging


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Labelled images held either as file paths or as decoded pixels.

    Exactly one of `paths` and `pixels` is set. Labels are contiguous integers
    `0 .. num_classes - 1` that index `class_names`.

    Attributes:
        labels: (N,) int64 class ids.
        class_names: (C,) names, `class_names[labels[i]]` is image i's class.
        paths: (N,) str array of encoded image files (JPEG, PNG, GIF, BMP), or None.
        pixels: (N, H, W, 3) uint8 RGB array, or None.
        name: human-readable name of the source, used in logs and errors.
    """

    labels: np.ndarray
    class_names: tuple
    paths: Optional[np.ndarray] = None
    pixels: Optional[np.ndarray] = None
    name: str = ""

    def __post_init__(self):
        labels = np.asarray(self.labels, dtype=np.int64)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if (self.paths is None) == (self.pixels is None):
            raise ValueError(
                f"ImageSet {self.name!r} needs exactly one of `paths` and `pixels`."
            )
        if self.paths is not None:
            object.__setattr__(self, "paths", np.asarray(self.paths, dtype=str))
            n = len(self.paths)
        else:
            pixels = np.asarray(self.pixels)
            if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
                raise ValueError(
                    f"ImageSet {self.name!r}: `pixels` must be uint8 (N, H, W, 3). "
                    f"Received: dtype={pixels.dtype}, shape={pixels.shape}"
                )
            n = len(pixels)
        if labels.shape != (n,):
            raise ValueError(
                f"ImageSet {self.name!r}: {n} images but labels of shape {labels.shape}."
            )
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(
                f"ImageSet {self.name!r}: labels must lie in [0, {len(self.class_names)}). "
                f"Received: min={labels.min()}, max={labels.max()}"
            )

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """(C,) number of images per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def select_classes(self, class_ids: Sequence[int], name: str = "") -> "ImageSet":
        """The images of `class_ids`, relabelled `0 .. len(class_ids) - 1` in that order."""
        class_ids = np.asarray(class_ids, dtype=np.int64)
        new_label = np.full(self.num_classes, -1, dtype=np.int64)
        new_label[class_ids] = np.arange(len(class_ids))
        keep = new_label[self.labels] >= 0
        return ImageSet(
            labels=new_label[self.labels[keep]],
            class_names=tuple(self.class_names[c] for c in class_ids),
            paths=None if self.paths is None else self.paths[keep],
            pixels=None if self.pixels is None else self.pixels[keep],
            name=name or self.name,
        )

    def drop_small_classes(self, min_images: int = 2) -> "ImageSet":
        """Drops classes with fewer than `min_images` images, with a warning.

        A class of one image cannot form a positive pair: it is useless to a metric
        loss and undefined for leave-one-out retrieval.
        """
        counts = self.class_counts()
        small = np.flatnonzero(counts < min_images)
        if not len(small):
            return self
        names = ", ".join(repr(self.class_names[c]) for c in small[:10])
        more = f" and {len(small) - 10} more" if len(small) > 10 else ""
        logging.warning(
            "%s: dropping %d class(es) with fewer than %d images (no positive pair "
            "possible): %s%s",
            self.name or "dataset", len(small), min_images, names, more,
        )
        return self.select_classes(np.flatnonzero(counts >= min_images))


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """The zero-shot DML protocol: train classes and disjoint, unseen test classes."""

    train: ImageSet
    test: ImageSet
    name: str = ""
    kind: str = "photo"  # "photo" or "glyph": picks augmentation, backbone and image size defaults


def split_classes(image_set: ImageSet, num_train_classes: int, kind: str = "photo") -> DatasetSplits:
    """Splits by class: the first `num_train_classes` classes train, the rest test."""
    c = image_set.num_classes
    if not 0 < num_train_classes < c:
        raise ValueError(
            f"{image_set.name or 'dataset'}: cannot split {c} classes into "
            f"{num_train_classes} train classes and a non-empty test set."
        )
    return DatasetSplits(
        train=image_set.select_classes(range(num_train_classes), name=f"{image_set.name}/train"),
        test=image_set.select_classes(range(num_train_classes, c), name=f"{image_set.name}/test"),
        name=image_set.name,
        kind=kind,
    )
