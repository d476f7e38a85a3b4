"""`model_fingerprint`: what identifies the embedder that made an index's vectors.

The fingerprint is the first 16 hex digits of SHA-256 over the format, the input size
`H x W`, the embedding size d and a digest of the model's content:

- `.keras`: every weight array (name, shape, dtype, bytes) in the model's order, so two
  saves of the same weights agree (the file itself holds a save date);
- SavedModel: every file of the directory (relative path and bytes), sorted;
- `.tflite`: the file's bytes (the LiteRT kit computes the same with `hashlib` only).

Two formats of the same weights have different fingerprints: a float32 `.tflite` and its
`.keras` agree to 1e-6, an int8 file does not, so an index says which file built it.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np


def _digest_bytes(chunks) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _file_chunks(path, block=2**22):
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(block), b"")


def content_digest(embedder) -> str:
    """SHA-256 hex of a `LoadedEmbedder`'s content (see the module docstring)."""
    if embedder.format == "tflite":
        return _digest_bytes(_file_chunks(embedder.path))
    if embedder.format == "keras":
        def chunks():
            for weight in embedder.model.weights:
                value = np.ascontiguousarray(weight.numpy())
                yield f"{weight.path}|{value.shape}|{value.dtype}|".encode()
                yield value.tobytes()
        return _digest_bytes(chunks())
    root = embedder.path

    def chunks():
        for folder, dirs, files in sorted(os.walk(root)):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(folder, name)
                yield os.path.relpath(full, root).replace(os.sep, "/").encode() + b"\0"
                yield from _file_chunks(full)
    return _digest_bytes(chunks())


def fingerprint_from_digest(fmt: str, image_size, embedding_dim: int, digest: str) -> str:
    height, width = (int(s) for s in image_size)
    text = f"{fmt}|{height}x{width}|{int(embedding_dim)}|{digest}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_fingerprint(embedder) -> dict:
    """The `model` entry of an index for a `LoadedEmbedder` (`kdml.embedding.load_embedder`).

    Returns:
        `{"fingerprint", "format", "path", "image_size", "embedding_dim"}`.
    """
    return {"fingerprint": fingerprint_from_digest(embedder.format, embedder.image_size,
                                                   embedder.embedding_dim,
                                                   content_digest(embedder)),
            "format": embedder.format, "path": os.path.abspath(embedder.path),
            "image_size": [int(s) for s in embedder.image_size],
            "embedding_dim": int(embedder.embedding_dim)}
