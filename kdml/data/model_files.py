"""What a `--model` path holds: an embedder, a search model, or no kdml model at all.

kdml writes two kinds of model files. An *embedder* (`embedder.keras`, a SavedModel
directory, `embedder_<q>.tflite`) maps images to embeddings; `kdml.evaluate`,
`kdml.index build|query`, `kdml.export` and the kit's `index`, `query` and `embed` take
one. A *search model* (`embedder_<q>_search.tflite`, `python -m kdml.export --gallery=`)
holds a gallery and maps images to its top-k rows; only the kit's `search` command and
`SearchModel` take it. `model_file_kind` tells them apart from the file alone (the
TFLite flatbuffer's `search` signature or its number of outputs), without building an
interpreter, so a wrong file is one line naming what it is and which command takes it
(`check_model_file`) instead of an error from deep inside the loader.
"""

from __future__ import annotations

import os
from typing import Optional

EMBEDDER, SEARCH_MODEL = "embedder", "search model"
# Who takes which kind (the fix an error names).
TAKES = {
    EMBEDDER: "python -m kdml.evaluate, python -m kdml.index or kdml_litert.py query",
    SEARCH_MODEL: "kdml_litert.py search (or SearchModel)",
}
_TFLITE_IDENTIFIER = b"TFL3"


def tflite_kind(content: bytes) -> tuple[Optional[str], str]:
    """`(kind, detail)` of `.tflite` bytes: kind EMBEDDER, SEARCH_MODEL or None (not a
    TFLite model: `detail` says why)."""
    if len(content) < 8 or content[4:8] != _TFLITE_IDENTIFIER:
        what = "empty (0 bytes)" if not content else "no TFLite flatbuffer (no 'TFL3' identifier)"
        return None, what
    try:
        from ai_edge_litert import schema_py_generated as schema

        model = schema.Model.GetRootAs(content, 0)
        keys = [model.SignatureDefs(i).SignatureKey().decode()
                for i in range(model.SignatureDefsLength())]
        outputs = model.Subgraphs(0).OutputsLength() if model.SubgraphsLength() else 0
    except Exception as error:  # a truncated flatbuffer raises from struct / IndexError
        return None, f"a damaged TFLite flatbuffer ({type(error).__name__})"
    if "search" in keys or outputs > 1:
        return SEARCH_MODEL, "images -> top-k gallery rows (a search model)"
    return EMBEDDER, "images -> embeddings"


def model_file_kind(path: str) -> tuple[Optional[str], str]:
    """`(kind, detail)` of a model path: a `.tflite` is read (`tflite_kind`); a `.keras`
    file and a SavedModel directory are embedders (kdml writes no other kind in them);
    kind None with the reason otherwise."""
    path = str(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            return EMBEDDER, "a SavedModel"
        return None, "a folder without saved_model.pb, not a SavedModel"
    if not os.path.exists(path):
        return None, "no such file"
    if path.endswith(".tflite"):
        with open(path, "rb") as f:
            return tflite_kind(f.read())
    if path.endswith(".keras"):
        with open(path, "rb") as f:
            head = f.read(4)
        if head != b"PK\x03\x04":
            return None, "not a .keras file (no zip archive)"
        return EMBEDDER, "a Keras model"
    return None, "not a .keras file, a .tflite file or a SavedModel directory"


def check_model_file(path: str, expected: str = EMBEDDER) -> None:
    """ValueError `"<path>: <what it is>; <which command takes it>"` unless `path` is a
    model of kind `expected` (EMBEDDER or SEARCH_MODEL)."""
    kind, detail = model_file_kind(path)
    if kind == expected:
        return
    if kind is None:
        what = {EMBEDDER: ("an embedder: embedder.keras (python -m kdml.train), a SavedModel "
                           "directory or embedder_<q>.tflite (python -m kdml.export)"),
                SEARCH_MODEL: "a search model: embedder_<q>_search.tflite (python -m "
                              "kdml.export --gallery=<index>)"}[expected]
        raise ValueError(f"{path}: {detail}; pass {what}")
    got = {EMBEDDER: "an embedder (images -> embeddings, no gallery inside)",
           SEARCH_MODEL: "a search model (an embedder and its gallery: images -> top-k "
                         "gallery rows)"}[kind]
    fix = {EMBEDDER: "pass the embedder it was exported with (embedder_<q>.tflite, without "
                     "_search)",
           SEARCH_MODEL: "pass embedder_<q>_search.tflite (python -m kdml.export "
                         "--gallery=<index>)"}[expected]
    raise ValueError(f"{path}: {got}, but this command takes {expected_article(expected)}; "
                     f"{fix}, or give this file to {TAKES[kind]}")


def expected_article(kind: str) -> str:
    return "an embedder" if kind == EMBEDDER else "a search model"
