"""What an exported embedder carries: name, embedding size, image size, kdml version.

Every exported file gets a sidecar JSON next to it (`<file>.json`, e.g.
`embedder_int8.tflite.json`, `saved_model.json`), and each `.tflite` also embeds the
same JSON in its flatbuffer as a custom metadata entry named `"kdml"` (TFLite's
`Model.metadata` list; runtimes ignore entries they do not know, MediaPipe included).

Why not TFLite Support metadata (`tflite-support`): its last release (0.4.4) pins
`protobuf<4`, which would downgrade the protobuf that TensorFlow 2.21 needs. MediaPipe's
`ImageEmbedder` needs no metadata for a uint8 input (it feeds pixels as they are).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from kdml.version import __version__

METADATA_NAME = "kdml"


def sidecar_path(path: str) -> str:
    """`<path>.json`; for a SavedModel directory `dir/` it is `dir.json` beside it."""
    return os.path.normpath(path) + ".json"


def embedder_metadata(*, name: str, embedding_dim: int, image_size, fmt: str,
                      quantization: Optional[str] = None, backbone: Optional[str] = None,
                      source: Optional[str] = None) -> dict:
    """The metadata dict written beside (and, for TFLite, inside) an exported file."""
    height, width = (int(s) for s in image_size)
    return {
        "name": name,
        "format": fmt,
        "quantization": quantization,
        "backbone": backbone,
        "embedding_dim": int(embedding_dim),
        "image_size": [height, width],
        "input": {"name": "images", "dtype": "uint8", "shape": [None, height, width, 3],
                  "range": [0, 255], "channels": "RGB"},
        "output": {"name": "embeddings", "dtype": "float32", "shape": [None, int(embedding_dim)],
                   "l2_normalized": True},
        "kdml_version": __version__,
        "source": source,
    }


def write_sidecar(path: str, metadata: dict) -> str:
    out = sidecar_path(path)
    with open(out, "w") as f:
        json.dump(metadata, f, indent=2)
    return out


def read_sidecar(path: str) -> Optional[dict]:
    out = sidecar_path(path)
    if not os.path.isfile(out):
        return None
    with open(out) as f:
        return json.load(f)


def embed_tflite_metadata(model: bytes, metadata: dict) -> bytes:
    """Returns the flatbuffer `model` with `metadata` (JSON) added as entry "kdml"."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    tree = schema.ModelT.InitFromPackedBuf(bytearray(model), 0)
    tree.buffers = list(tree.buffers or [])
    tree.metadata = [m for m in (tree.metadata or []) if _name(m.name) != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = list(json.dumps(metadata).encode("utf-8"))
    tree.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(tree.buffers) - 1
    tree.metadata.append(entry)
    builder = flatbuffers.Builder(len(model) + 4096)
    builder.Finish(tree.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_tflite_metadata(model: bytes) -> Optional[dict]:
    """The "kdml" metadata JSON embedded in a `.tflite` flatbuffer, or None."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAs(model, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if _name(entry.Name()) == METADATA_NAME:
            data = root.Buffers(entry.Buffer()).DataAsNumpy()
            return json.loads(bytes(data).decode("utf-8"))
    return None


def _name(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
