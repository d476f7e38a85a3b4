"""`label_query_files`: the class label of query image files, in the gallery's terms.

A `folder:<root>` gallery labels an item by its leaf folder's path relative to the root
(`Balinese/character01`), so a query file must be labelled the same way for its results
to count as matches. For each query file, in order:

1. its folder holds gallery items: their label (the gallery's own name for that folder);
2. its folder lies under a gallery root (a root is where a gallery item's folder path
   minus its label ends: `<root>/Balinese/character01/x.png` labelled
   `Balinese/character01` has root `<root>`): the folder's path relative to that root
   (a class the gallery does not hold, named as `--source` would name it);
3. otherwise: the folder's own name (a query outside every gallery root).

Paths are compared after `os.path.abspath` + `realpath`, so relative and symlinked
spellings of the same folder agree.
"""

from __future__ import annotations

import collections
import os
from typing import Sequence


def _folder(path: str) -> str:
    return os.path.realpath(os.path.dirname(os.path.abspath(str(path))))


def gallery_folders(labels: Sequence[str], paths: Sequence[str]) -> tuple[dict, list]:
    """`({folder: label}, [roots])` of a gallery's items (items without a path skipped).

    A folder holding items of several labels maps to its most frequent one (ties: the
    first in sorted order); roots are sorted longest first, so the deepest one wins.
    """
    counts = collections.defaultdict(collections.Counter)
    roots = set()
    for label, path in zip(labels, paths):
        label, path = str(label), str(path)
        if not path or "#" in os.path.basename(path):  # "<source>#<row>": not a file
            continue
        folder = _folder(path)
        counts[folder][label] += 1
        suffix = "/" + label.strip("/")
        posix = folder.replace(os.sep, "/")
        if label and posix.endswith(suffix):
            roots.add(folder[: len(folder) - len(suffix)] or os.sep)
    folders = {folder: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
               for folder, c in counts.items()}
    return folders, sorted(roots, key=lambda r: (-len(r), r))


def label_query_files(query_paths: Sequence[str], gallery_labels: Sequence[str],
                      gallery_paths: Sequence[str]) -> list:
    """The label of each query file (module docstring: gallery folder, root, parent name).

    >>> label_query_files(["/g/Latin/a/9.png", "/g/Greek/b/1.png", "/q/c/2.png"],
    ...                   ["Latin/a", "Latin/a"], ["/g/Latin/a/0.png", "/g/Latin/a/1.png"])
    ['Latin/a', 'Greek/b', 'c']
    """
    folders, roots = gallery_folders(gallery_labels, gallery_paths)
    names = []
    for path in query_paths:
        folder = _folder(path)
        if folder in folders:
            names.append(folders[folder])
            continue
        root = next((r for r in roots
                     if folder != r and folder.startswith(r.rstrip(os.sep) + os.sep)), None)
        if root is not None:
            names.append(os.path.relpath(folder, root).replace(os.sep, "/"))
        else:
            names.append(os.path.basename(folder))
    return names
