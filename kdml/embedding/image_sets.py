"""Image sets to embed: a source spec, a list of files, a subset, their uint8 pixels.

- `read_image_set(spec, split)`: `synthetic`, `tfds:<name>` or `folder:<dir>` as an
  `ImageSet` (`split` "test", "train", or "all": every class; `folder:` with "all"
  keeps single-image classes, which a gallery or a query set may have).
- `read_image_files(paths, gallery_labels, gallery_paths)`: query files labelled in a
  gallery's terms (`kdml.embedding.query_labels`).
- `image_subset(image_set, rows)`: the rows of a set, in the given order.
- `load_uint8(image_set, image_size)`: its pixels through `kdml.data.eval_dataset`
  (centre crop, antialiased resize) rounded to uint8, `(N, S, S, 3)`.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from kdml.data.image_set import ImageSet
from kdml.data.pipeline import eval_dataset
from kdml.data.sources import load_dataset
from kdml.data.sources.folder import drop_unreadable, scan_leaf_folders
from kdml.embedding.query_labels import label_query_files

SPLITS = ("test", "train", "all")


def read_image_set(spec: str, split: str = "test", data_dir: Optional[str] = None,
                   seed: int = 0) -> ImageSet:
    """`ImageSet` of a source spec: its `split` ("test", "train" or "all" classes).

    `folder:<dir>` with split "all" keeps every leaf folder as a class, single-image
    classes included (training sources drop them); a dataset with split "all" is its
    train classes followed by its test classes (labels `0 .. C_train + C_test - 1`).
    """
    kind, _, root = spec.partition(":")
    if kind == "folder" and root and split == "all":
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"folder:{root}: no such folder.")
        leaves, _ = scan_leaf_folders(root)
        if not leaves:
            raise ValueError(f"folder:{root}: found no images in leaf folders "
                             "(<root>/<class>/<image>).")
        names = sorted(leaves)
        paths = np.array([p for c in names for p in leaves[c]], dtype=str)
        labels = np.repeat(np.arange(len(names)), [len(leaves[c]) for c in names])
        paths, labels = drop_unreadable(paths, labels, f"folder:{root}")  # skipped, named
        return ImageSet(labels=labels, class_names=names, paths=paths, name=f"folder:{root}")
    splits = load_dataset(spec, data_dir=data_dir, seed=seed)
    if split != "all":
        return getattr(splits, split)
    train, test = splits.train, splits.test
    stored = {"pixels": None, "paths": None}
    field = "pixels" if train.pixels is not None else "paths"
    stored[field] = np.concatenate([getattr(train, field), getattr(test, field)])
    return ImageSet(labels=np.concatenate([train.labels, test.labels + train.num_classes]),
                    class_names=tuple(train.class_names) + tuple(test.class_names),
                    name=splits.name, **stored)


def read_image_files(paths: Sequence[str], gallery_labels: Sequence[str],
                     gallery_paths: Sequence[str], name: str = "query images") -> ImageSet:
    """Image files as an `ImageSet` labelled in a gallery's terms, in the given order.

    Each file's class name is `label_query_files` of the gallery's `(N,)` labels and
    paths; `class_names` are the sorted distinct names.

    >>> s = read_image_files(["/g/Latin/a/9.png", "/q/c/2.png"], ["Latin/a"], ["/g/Latin/a/0.png"])
    >>> s.class_names, s.labels.tolist()
    (('Latin/a', 'c'), [0, 1])
    """
    file_labels = label_query_files(paths, gallery_labels, gallery_paths)
    names = sorted(set(file_labels))
    return ImageSet(labels=[names.index(label) for label in file_labels], class_names=names,
                    paths=list(paths), name=name)


def load_source(source, *, split: str = "all", data_dir=None, seed: int = 0):
    """An `ImageSet` of a source spec (`folder:<dir>`: every class, single images kept)."""
    if isinstance(source, ImageSet):
        return source
    if not isinstance(source, str):
        raise ValueError(f"Expected a source 'folder:<dir>', 'synthetic', 'tfds:<name>', an "
                         f"ImageSet or a tf.data.Dataset. Received: {type(source).__name__}")
    image_set = read_image_set(source, "all" if source.startswith("folder:") else split, data_dir,
                             seed)
    if image_set.num_images == 0:
        raise ValueError(f"The gallery {source} holds no images: point --source at a folder of "
                         "<class>/<image> files.")
    return image_set


def image_subset(image_set: ImageSet, rows) -> ImageSet:
    """The images `rows` (`(n,)` int indices, in that order) of `image_set`, with its
    class names and labels unchanged."""
    return ImageSet(labels=image_set.labels[rows], class_names=image_set.class_names,
                    paths=None if image_set.paths is None else image_set.paths[rows],
                    pixels=None if image_set.pixels is None else image_set.pixels[rows],
                    name=image_set.name)


def load_uint8(image_set: ImageSet, image_size: int, crop_fraction: float = 0.875,
               batch_size: int = 256) -> np.ndarray:
    """All images of `image_set`, in order, as uint8 `(N, S, S, 3)` RGB."""
    chunks = [np.clip(np.round(images.numpy()), 0, 255).astype(np.uint8)
              for images, _ in eval_dataset(image_set, image_size=image_size,
                                            batch_size=batch_size, crop_fraction=crop_fraction)]
    if not chunks:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    return np.concatenate(chunks)
