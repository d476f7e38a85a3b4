"""The JSON record of one query, the same in `python -m kdml.index query` and the kit.

`export/kdml_litert.py` (`query`, `search`, `SearchModel.search_files`) builds the same
records without importing kdml (`tests/export/test_agreement.py` compares them field by
field). One record per query image:

    {"query": <path as given>, "label": <its label in the gallery's terms>,
     ["threshold": <cosine>, "no_match": <bool>,]
     "neighbours": [{"index", "label", "path", "similarity", "label_match"[, "accepted"]},
                    ...]}                                            # best first

- `label_match`: the neighbour's label equals the query's (label agreement).
- `accepted` (only when the index or search model holds a calibrated threshold): the
  neighbour's cosine is >= the threshold, compared in float32 (threshold acceptance).
- `no_match` (same condition): the best remaining neighbour is not accepted.
- Self-exclusion: a query that is a gallery file (the same file after `abspath` and
  `realpath`, so relative and symlinked spellings count) is left out of its own
  results; the other k follow. A search model returns a fixed k, so there a gallery
  file gets k - 1 neighbours.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np


def file_key(path) -> str:
    """What two spellings of one file share: its real absolute path (items without a file,
    `""` or `"<source>#<row>"`, are their own key)."""
    path = str(path)
    if not path or "#" in os.path.basename(path):
        return path
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def query_record(query: str, label: str, hits: Sequence[dict], k: int,
                 threshold: Optional[float] = None) -> dict:
    """The record of one query (module docstring) from its hits `[{"index", "label",
    "path", "similarity"}, ...]`, best first, with at least k + 1 of them when the query
    may be a gallery file: its own file is dropped, then the first k are kept."""
    own = file_key(query)
    kept = [hit for hit in hits if file_key(hit["path"]) != own][:k]
    neighbours = []
    for hit in kept:
        entry = {"index": int(hit["index"]), "label": str(hit["label"]), "path": str(hit["path"]),
                 "similarity": float(hit["similarity"]),
                 "label_match": str(hit["label"]) == str(label)}
        if threshold is not None:
            entry["accepted"] = bool(np.float32(hit["similarity"]) >= np.float32(threshold))
        neighbours.append(entry)
    record = {"query": str(query), "label": str(label)}
    if threshold is not None:
        record["threshold"] = float(threshold)
        record["no_match"] = not (neighbours and neighbours[0]["accepted"])
    record["neighbours"] = neighbours
    return record
