"""`GalleryIndex`: labelled gallery embeddings, searchable top-k, saved as one directory.

    index = GalleryIndex(embeddings, labels, paths, model=model_fingerprint(embedder))
    result = index.query(query_embeddings, k=5)   # result.labels[q], result.paths[q] ...
    index.add(more_embeddings, more_labels, more_paths)
    index.save("gallery.index");  GalleryIndex.load("gallery.index", backend="exact")

Built from a model and images by `kdml.index.build_index`. Rows are stored
L2-normalised; the similarity is their cosine (inner product of unit rows).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from kdml.embedding.gallery_files import (SIMILARITY, StoredGallery, check_embeddings,
                                          model_summary, read_index_files, write_index_files)
from kdml.index.backends import make_backend


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """Top-k of Q queries, best first.

    Attributes:
        indices: `(Q, k)` int64 gallery rows.
        similarities: `(Q, k)` float32 cosines.
        labels: `(Q, k)` str gallery labels.
        paths: `(Q, k)` str gallery paths.
    """

    indices: np.ndarray
    similarities: np.ndarray
    labels: np.ndarray
    paths: np.ndarray

    def as_records(self) -> list:
        """Per query, a list of `{"label", "path", "similarity", "index"}` dicts."""
        return [[{"label": str(label), "path": str(path), "similarity": float(score),
                  "index": int(index)}
                 for index, score, label, path in zip(*row)]
                for row in zip(self.indices, self.similarities, self.labels, self.paths)]


class GalleryIndex(StoredGallery):
    """Labelled, L2-normalised gallery embeddings with an exact or approximate search.

    A `kdml.embedding.StoredGallery` (the items, their checks, `check_model`) with a
    search backend, a threshold to set, and incremental adds.

    Args:
        embeddings: `(N, d)` float (normalised here), N >= 1, all finite.
        labels: N class names (str).
        paths: N source paths (default: "").
        model: the embedder's entry (`kdml.index.model_fingerprint`), or None for vectors
            of unknown origin (then queries are not checked against a model).
        backend: "exact" (default), "faiss" or "scann" (`kdml.index.backends`).
        backend_options: keyword arguments of the backend (e.g. `faiss_index="hnsw"`,
            `nprobe`, `strategy`).
        seed: seed of the approximate backend's training (k-means) and calibration.
        threshold: optional calibrated "no match" threshold: `{"value": cosine, "target",
            "source", "precision", "recall", "far", ...}` (`set_threshold`).
    """

    def __init__(self, embeddings, labels: Sequence[str], paths: Optional[Sequence[str]] = None,
                 *, model: Optional[dict] = None, backend: str = "exact",
                 backend_options: Optional[dict] = None, seed: int = 0,
                 threshold: Optional[dict] = None, _backend_state=None):
        super().__init__(embeddings, labels, paths, model=model, threshold=threshold)
        self.seed = int(seed)
        self.backend = make_backend(backend, **(backend_options or {}))
        if _backend_state is None:
            self.backend.build(self.embeddings, seed=self.seed)
        else:
            self.backend.load(_backend_state["directory"], self.embeddings,
                              _backend_state["config"])

    def __repr__(self):
        return (f"GalleryIndex({len(self)} x {self.dim}, backend={self.backend.name!r}, "
                f"model={model_summary(self.model)})")

    def set_threshold(self, calibration: dict, source: str) -> "GalleryIndex":
        """Stores a `kdml.evaluation.calibrate_threshold` result (and the name of the data
        it came from) as the index's "no match" threshold; returns self."""
        value = float(calibration["threshold"])
        if not -1.0 <= value <= 1.0 + 1e-6:
            raise ValueError(f"Expected a cosine threshold in [-1, 1]. Received: {value}")
        self.threshold = {"value": value, "source": str(source),
                          **{k: v for k, v in calibration.items() if k != "threshold"}}
        return self

    def matches(self, similarities) -> np.ndarray:
        """`similarities >= threshold` (bool, same shape); all True without a threshold."""
        similarities = np.asarray(similarities, np.float32)
        if not self.threshold:
            return np.ones(similarities.shape, bool)
        return similarities >= np.float32(self.threshold["value"])

    def query(self, queries, k: int = 5) -> QueryResult:
        """`(Q, d)` query embeddings (or one `(d,)`) -> the k most similar gallery items."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"The index holds embeddings of size {self.dim} (model "
                f"{model_summary(self.model)}); the queries have shape {queries.shape}: embed "
                f"them with the model that built the index, (Q, {self.dim}).")
        if isinstance(k, bool) or int(k) < 1:
            raise ValueError(f"Expected k >= 1. Received: k={k}")
        k = min(int(k), len(self))
        queries = check_embeddings(queries, source="the queries")
        indices, similarities = self.backend.search(queries, k)
        found = np.where(indices < 0, 0, indices)  # faiss returns -1 for unfilled slots
        return QueryResult(indices, similarities, self.labels[found], self.paths[found])

    def add(self, embeddings, labels: Sequence[str], paths: Optional[Sequence[str]] = None,
            model: Optional[dict] = None, allow_model_mismatch: bool = False) -> "GalleryIndex":
        """Appends items (from the model that built the index); returns self.

        faiss adds them to its existing IVF cells (no re-training) or links them into its
        HNSW graph.
        """
        self.check_model(model, allow_model_mismatch)
        labels = [str(label) for label in labels]
        paths = [""] * len(labels) if paths is None else [str(p) for p in paths]
        new = check_embeddings(embeddings, paths, source="the added items")
        if new.shape[1] != self.dim or len(new) != len(labels) or len(labels) != len(paths):
            raise ValueError(f"Expected ({len(labels)}, {self.dim}) embeddings with as many labels "
                             f"and paths. Received: embeddings {new.shape}, {len(labels)} labels, "
                             f"{len(paths)} paths.")
        self.embeddings = np.concatenate([self.embeddings, new])
        self.labels = np.concatenate([self.labels, np.asarray(labels, dtype=str)])
        self.paths = np.concatenate([self.paths, np.asarray(paths, dtype=str)])
        self.backend.add(new, self.embeddings)
        return self

    def save(self, path: str) -> str:
        """Writes the index directory atomically (`kdml.embedding.gallery_files`); returns it."""
        metadata = {"model": self.model, "similarity": SIMILARITY, "seed": self.seed,
                    "backend": {"name": self.backend.name, "config": self.backend.config()}}
        if self.threshold:
            metadata["threshold"] = self.threshold
        write_index_files(path, self.embeddings, self.labels, self.paths, metadata,
                          write_extra=lambda d: [p for p in [self.backend.save(d)] if p])
        self.directory = path
        return path

    @classmethod
    def load(cls, path: str, backend: Optional[str] = None,
             backend_options: Optional[dict] = None, verify: bool = True) -> "GalleryIndex":
        """Loads and validates an index directory.

        Args:
            backend: None keeps the saved backend; another name rebuilds that search
                over the stored vectors (e.g. "exact" for an index saved with "faiss").
            verify: check every file's SHA-256 (sizes are always checked).
        """
        stored = read_index_files(path, verify=verify)
        metadata = stored["metadata"]
        saved = (metadata.get("backend") or {}).get("name", "exact")
        name = backend or saved
        state = ({"directory": path, "config": metadata["backend"].get("config") or {}}
                 if name == saved and saved != "exact" else None)
        index = cls(stored["embeddings"], stored["labels"], stored["paths"],
                    model=metadata.get("model"), backend=name, backend_options=backend_options,
                    seed=metadata.get("seed", 0), threshold=metadata.get("threshold"),
                    _backend_state=state)
        index.directory = path
        return index
