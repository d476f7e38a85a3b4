"""Class-disjoint train / validation / test splits that keep whole groups together.

A folder dataset `<root>/<group>/<class>/<image>` (Omniglot: `<alphabet>/<character>/`)
is split by group, so no character of a test alphabet, and no other character of its
alphabet, is seen in training (the protocol of Musgrave et al., "A Metric Learning
Reality Check", ECCV 2020, with groups as the unit). The test groups are named once, up
front (or drawn first from the seed), then validation groups are drawn from the rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from kdml.data.sources.folder import load_folder

SPLIT_NAMES = ("train", "validation", "train+validation", "test")


def group_of(class_name: str) -> str:
    """"Japanese_(katakana)/character01" -> "Japanese_(katakana)" (a flat name is its own group)."""
    return class_name.replace(os.sep, "/").split("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class ClassSplit:
    """Train, validation and test groups and their classes (sorted class names)."""

    train_groups: Tuple[str, ...]
    validation_groups: Tuple[str, ...]
    test_groups: Tuple[str, ...]
    classes: Dict[str, Tuple[str, ...]]  # split name (SPLIT_NAMES) -> class names
    seed: int
    # class name -> `folder_digest` of its files (relative path and size of each); None:
    # class names only (a split not made from folders).
    contents: Optional[Dict[str, str]] = dataclasses.field(default=None, compare=False)

    def fingerprint(self, split_name: str) -> str:
        """A short hash of `split_name`'s classes and, when known, of each class's files
        (relative path and size): part of every run's cache key, so another copy of the
        data with the same class names but other files gets other keys."""
        names = list(self.classes[split_name])
        if self.contents is not None:
            missing = [n for n in names if n not in self.contents]
            if missing:
                raise ValueError(f"No file digest for class(es) {missing[:3]} of split {split_name!r}.")
            payload = json.dumps([[n, self.contents[n]] for n in names]).encode()
        else:
            payload = json.dumps(names).encode()
        return hashlib.sha1(payload).hexdigest()[:12]

    def to_json(self) -> Dict:
        return {"seed": self.seed, "train_groups": list(self.train_groups),
                "validation_groups": list(self.validation_groups),
                "test_groups": list(self.test_groups),
                "classes": {k: len(v) for k, v in self.classes.items()}}


def group_split(class_names: Sequence[str], *, num_validation_groups: int = 1,
                num_test_groups: int = 2, test_groups: Optional[Sequence[str]] = None,
                seed: int = 0) -> ClassSplit:
    """Splits classes by group into train / validation / test, deterministically from `seed`.

    Args:
        class_names: names `"<group>/<class>"` (a name without "/" is a group of one
            class, i.e. a plain class-disjoint split).
        num_validation_groups: groups drawn for validation (hyperparameter selection).
        num_test_groups: groups drawn for test when `test_groups` is not given.
        test_groups: the test groups, named up front; drawn from `seed` when None.
        seed: seed of `numpy.random.default_rng` for the draws.

    Returns:
        A `ClassSplit` whose train, validation and test classes (and groups) are disjoint
        and cover `class_names`.
    """
    groups = sorted({group_of(name) for name in class_names})
    rng = np.random.default_rng(seed)
    if test_groups is None:
        if not 0 < num_test_groups < len(groups):
            raise ValueError(
                f"Expected `num_test_groups` in [1, {len(groups) - 1}] for {len(groups)} groups. "
                f"Received: num_test_groups={num_test_groups}. Lower it or name the test "
                "groups with `test_groups`.")
        test = sorted(rng.permutation(groups)[:num_test_groups].tolist())
    else:
        test = sorted(test_groups)
        unknown = [g for g in test if g not in groups]
        if unknown or not test:
            raise ValueError(
                f"`test_groups` must name groups of the dataset. Received: "
                f"test_groups={list(test_groups)} ({', '.join(map(repr, unknown)) or 'empty'} "
                f"not found). Valid groups: {', '.join(groups)}.")
    rest = [g for g in groups if g not in test]
    if not 0 < num_validation_groups < len(rest):
        raise ValueError(
            f"Expected `num_validation_groups` in [1, {len(rest) - 1}]: {len(rest)} groups remain "
            f"after the {len(test)} test groups. Received: num_validation_groups={num_validation_groups}.")
    validation = sorted(rng.permutation(rest)[:num_validation_groups].tolist())
    train = [g for g in rest if g not in validation]

    def classes_of(chosen):
        return tuple(sorted(n for n in class_names if group_of(n) in set(chosen)))

    classes = {"train": classes_of(train), "validation": classes_of(validation),
               "train+validation": classes_of(train + validation), "test": classes_of(test)}
    return ClassSplit(tuple(train), tuple(validation), tuple(test), classes, seed)


def folder_digest(folder: str) -> str:
    """sha1 (12 hex digits) of the sorted `(relative path, size in bytes)` of every file
    under `folder`, symlinks followed: the files of one class, without reading them."""
    entries = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs.sort()
        for name in files:
            path = os.path.join(directory, name)
            entries.append([os.path.relpath(path, folder).replace(os.sep, "/"),
                            os.path.getsize(path)])
    return hashlib.sha1(json.dumps(sorted(entries)).encode()).hexdigest()[:12]


def with_contents(split: ClassSplit, folders: Dict[str, str]) -> ClassSplit:
    """`split` with the file digest of each class (`folder_digest` of `folders[name]`)."""
    return dataclasses.replace(split, contents={name: folder_digest(folders[name])
                                                for name in sorted(folders)})


def class_folders(roots: Sequence[str]) -> Dict[str, str]:
    """`{"<group>/<class>": folder}` of the leaf class folders of one or more dataset roots.

    A class present in several roots (Omniglot's `images_background_small1` and
    `_small2` both hold Greek and Latin) is taken from the first root that has it.
    """

    folders: Dict[str, str] = {}
    for root in roots:
        image_set = load_folder(root, verify_images=False)
        first_path = {}
        for path, label in zip(image_set.paths, image_set.labels):
            first_path.setdefault(int(label), path)
        for label, path in sorted(first_path.items()):
            folders.setdefault(image_set.class_names[label], os.path.dirname(path))
    return folders


class SplitFolders:
    """Materialises splits as folders of symlinks, `<root>/<split>-<fingerprint>/<group>/<class>`.

    `load_split(name)` is the only way a run gets a split's images: the benchmark
    calls it for "test" only after every method's hyperparameters are chosen (the
    tests spy on it). Each folder is named by the hash of its own class list
    (`ClassSplit.fingerprint`), built complete in a temporary folder and renamed into
    place, so a folder never holds classes of another split (e.g. after `split_seed`
    changes) and an interrupted build leaves nothing that looks finished.
    """

    def __init__(self, folders: Dict[str, str], split: ClassSplit, root: str):
        self.folders, self.split, self.root = folders, split, root

    def load_split(self, name: str) -> str:
        """The folder of split `name` (one of SPLIT_NAMES), as a `folder:` dataset root."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"Unknown split {name!r}. Valid splits: {', '.join(SPLIT_NAMES)}.")
        classes = self.split.classes[name]
        target = os.path.join(self.root, f"{name.replace('+', '_')}-{self.split.fingerprint(name)}")
        if not os.path.isdir(target):
            tmp = f"{target}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            for class_name in classes:
                link = os.path.join(tmp, *class_name.split("/"))
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(os.path.abspath(self.folders[class_name]), link)
            try:
                os.rename(tmp, target)
            except OSError:  # another process finished the same folder first
                shutil.rmtree(tmp, ignore_errors=True)
        found = sorted(_leaf_classes(target))
        if found != sorted(classes):
            extra = sorted(set(found) - set(classes))[:3]
            raise ValueError(
                f"Split folder {target} holds other classes than split {name!r} "
                f"(e.g. {extra or sorted(set(classes) - set(found))[:3]}). Delete it; it is "
                "rebuilt from the split.")
        for class_name in classes:  # each link must point where this split's class lives
            link = os.path.join(target, *class_name.split("/"))
            pointed = os.path.join(os.path.dirname(link), os.readlink(link))
            if os.path.realpath(pointed) != os.path.realpath(self.folders[class_name]):
                raise ValueError(
                    f"Split folder {target}: {class_name} links to {os.readlink(link)}, not to "
                    f"{os.path.abspath(self.folders[class_name])}. Delete the folder; it is "
                    "rebuilt from the split.")
        return target


def _leaf_classes(root: str):
    """Names (`"<group>/<class>"`, "/"-joined) of the symlinked class folders under `root`."""
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                yield os.path.relpath(path, root).replace(os.sep, "/")
