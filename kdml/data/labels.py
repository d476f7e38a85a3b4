"""`warn_unknown_query_labels`: one warning when the query labels miss the gallery's.

Query and gallery items match by label text. A `folder:<dir>` source labels an image
by its leaf folder's path relative to `<dir>` (`kdml.data.sources.folder`), so the
same character is `Latin/character01` under `folder:omniglot` and `character01` under
`folder:omniglot/Latin`: every query then misses, and Recall@1 is 0 without any error.
"""

from __future__ import annotations

from typing import Optional, Sequence

import warnings

LAYOUT_RULE = ("a folder: source labels an image by its leaf folder's path relative to the "
               "folder given (<dir>/Latin/character01/x.png under folder:<dir> is "
               "'Latin/character01')")


def unknown_query_labels(query_labels: Sequence[str], gallery_labels: Sequence[str]) -> dict:
    """`{"labels", "known_labels", "queries", "known_queries", "example"}`: how many of
    the distinct query labels (and of the queries) occur among `gallery_labels`;
    `example` is one query label that does not (or None)."""
    gallery = {str(label) for label in gallery_labels}
    queries = [str(label) for label in query_labels]
    distinct = sorted(set(queries))
    missing = [label for label in distinct if label not in gallery]
    return {"labels": len(distinct), "known_labels": len(distinct) - len(missing),
            "queries": len(queries), "known_queries": sum(q in gallery for q in queries),
            "example": missing[0] if missing else None}


def warn_unknown_query_labels(query_labels: Sequence[str], gallery_labels: Sequence[str], *,
                              fix: str = "") -> Optional[str]:
    """Warns once (`warnings.warn`: a `warning: ...` line in a kdml command), and returns
    the text, when no query label or under half of the
    distinct ones occur among `gallery_labels` (None otherwise).

    >>> warn_unknown_query_labels(["a", "a", "b"], ["a", "c"]) is None
    True
    """
    count = unknown_query_labels(query_labels, gallery_labels)
    known, total = count["known_labels"], count["labels"]
    if not total or (known and 2 * known >= total):
        return None
    near = sorted(str(g) for g in set(map(str, gallery_labels))
                  if str(g).endswith("/" + count["example"]) or
                  count["example"].endswith("/" + str(g)))
    example = f"query label {count['example']!r}" + (
        f" vs gallery label {near[0]!r}" if near else
        f", gallery labels like {sorted(set(map(str, gallery_labels)))[0]!r}")
    text = (f"{count['known_labels']} of {count['labels']} query labels "
            f"({count['known_queries']} of {count['queries']} queries) occur in the gallery "
            f"({example}), so those queries cannot match: {LAYOUT_RULE}"
            + (f"; {fix}" if fix else ""))
    warnings.warn(text, UserWarning)
    return text
