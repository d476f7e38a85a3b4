"""`folder:<dir>` source: one class per leaf folder of image files.

A leaf folder is a folder that holds image files and has no sub-folder holding
images, so both common layouts load without configuration:

    omniglot/images_background/Korean/character01/0001_01.png   -> "Korean/character01"
    CUB_200_2011/images/001.Black_footed_Albatross/xxx.jpg      -> "001.Black_footed_Albatross"
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
from absl import logging

from kdml.data.decoding import find_unreadable
from kdml.data.image_set import DatasetSplits, ImageSet, split_classes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")

_MAX_LISTED = 5


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_leaf_folders(root: str) -> tuple[dict, list]:
    """Walks `root` once and finds the leaf folders.

    Returns:
        ({class name: sorted image paths} for every leaf folder,
         image paths ignored because they sit in a folder that also has
         sub-folders holding images).
    """
    walked, seen = [], set()
    # Top-down, to prune hidden folders (".git") and symlink loops; hidden files
    # ("__MACOSX/._x.png" resource forks) are not images.
    for folder, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        walked.append((folder, subdirs, sorted(f for f in files if _is_image(f))))

    leaves, ignored = {}, []
    holds_images = {}  # folder -> its subtree holds images
    # Reversed top-down order visits every folder after all of its sub-folders.
    for folder, subdirs, images in reversed(walked):
        child_has_images = any(holds_images.get(os.path.join(folder, d), False) for d in subdirs)
        holds_images[folder] = bool(images) or child_has_images
        if not images:
            continue
        paths = [os.path.join(folder, f) for f in images]
        if child_has_images:
            ignored.extend(paths)
        else:
            leaves[os.path.relpath(folder, root).replace(os.sep, "/")] = paths
    return leaves, ignored


def _listing(paths, limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def drop_unreadable(paths: np.ndarray, labels: np.ndarray, name: str) -> tuple:
    """`(paths, labels)` without the files `find_unreadable` refuses, named in one warning.

    Zero-byte, truncated, corrupt and non-image files (a text file named `.png`) are
    skipped; grayscale, palette, 16-bit and alpha images are read (as uint8 RGB).
    """
    unreadable = find_unreadable(paths)
    if unreadable.any():
        logging.warning(
            "%s: skipping %d of %d image file(s) that cannot be decoded (zero-byte, "
            "truncated, corrupt or not an image): %s",
            name, int(unreadable.sum()), len(paths), _listing(list(paths[unreadable])),
        )
    return paths[~unreadable], labels[~unreadable]


def load_folder(root: str, verify_images: bool = True) -> ImageSet:
    """Loads a folder tree of images, one class per leaf folder.

    The class name is the leaf folder's path relative to `root` with "/" separators;
    classes are sorted by name and labelled `0 .. C - 1` in that order, images are
    sorted by file name within their class. Files ending in .jpg .jpeg .png .gif .bmp
    (any case) are images; hidden files and folders are ignored.

    Args:
        root: the top folder.
        verify_images: decode every image once (`find_unreadable`) and skip the
            unreadable ones (zero-byte, truncated, corrupt, not an image) with one
            warning, so that training never stops on a broken file.

    Returns:
        An `ImageSet` of paths. Classes with fewer than 2 images are dropped with a
        warning (no positive pair possible).

    Raises:
        FileNotFoundError: `root` does not exist or is not a folder.
        ValueError: `root` holds no images, or fewer than 2 classes remain.
    """
    root = os.path.abspath(os.path.expanduser(str(root)))
    name = f"folder:{root}"
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{name}: no such folder. Pass an existing folder whose leaf sub-folders "
            f"hold one class of images each, e.g. --dataset=folder:/data/omniglot/images_background."
        )
    leaves, ignored = scan_leaf_folders(root)
    if ignored:
        logging.warning(
            "%s: ignoring %d image(s) in folders that also have sub-folders of images "
            "(only leaf folders are classes): %s",
            name, len(ignored), _listing(ignored),
        )
    if not leaves:
        raise ValueError(
            f"{name}: found no image files ({', '.join(IMAGE_EXTENSIONS)}) in leaf "
            f"folders. Expected <root>/<class>/<image> or deeper, "
            f"e.g. <root>/<alphabet>/<character>/<image>."
        )
    class_names = sorted(leaves)
    paths = np.array([p for c in class_names for p in leaves[c]], dtype=str)
    labels = np.repeat(np.arange(len(class_names)), [len(leaves[c]) for c in class_names])

    if verify_images:
        paths, labels = drop_unreadable(paths, labels, name)

    image_set = ImageSet(labels=labels, class_names=class_names, paths=paths, name=name)
    # Classes left empty by skipped files go with the small ones.
    image_set = image_set.drop_small_classes(min_images=2)
    if image_set.num_classes < 2:
        single = len(class_names) - image_set.num_classes
        fix = (f"{single} class folder(s) hold fewer than 2 readable images: add a second image "
               "of the same class to each" if single else
               f"put each class's images in its own sub-folder of {root}")
        raise ValueError(
            f"{name}: {image_set.num_classes} usable class(es) (a class needs at least "
            f"2 readable images); metric learning needs at least 2. Fix: {fix}."
        )
    return image_set


def load_folder_splits(
    root: str, eval_root: Optional[str] = None, verify_images: bool = True
) -> DatasetSplits:
    """The zero-shot protocol on folders.

    Without `eval_root`: the classes of `root`, sorted by name, are split in half:
    the first floor(C / 2) train and the rest are the unseen test classes. With
    `eval_root`: every class of `root` trains and every class of `eval_root` tests
    (e.g. Omniglot's images_background / images_evaluation).

    Args:
        root: folder of training classes (and test classes without `eval_root`).
        eval_root: optional folder of test classes.
        verify_images: see `load_folder`.

    Returns:
        `DatasetSplits` whose train and test classes are disjoint.
    """
    image_set = load_folder(root, verify_images=verify_images)
    if eval_root is None:
        return split_classes(image_set, image_set.num_classes // 2)
    test = load_folder(eval_root, verify_images=verify_images)
    return DatasetSplits(
        train=dataclasses.replace(image_set, name=f"{image_set.name}/train"),
        test=dataclasses.replace(test, name=f"{test.name}/test"),
        name=image_set.name,
    )
