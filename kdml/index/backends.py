"""Search backends of a `GalleryIndex`: exact (kdml's blocked k-NN) and approximate.

- `"exact"`: `kdml.evaluation.exact_knn` (blocked matmul + top-k, on the GPU when one is
  visible, across a strategy's replicas when given one). No state beyond the vectors.
- `"faiss"`: faiss `IndexIVFFlat` with inner product on the L2-normalised vectors
  (= cosine). `nlist` cells from a k-means of the gallery; `nprobe` (cells visited per
  query) is calibrated at build time: the smallest power of 2 whose recall@k against
  the exact search, on a seeded sample of gallery vectors, reaches `target_recall`.
  Galleries too small for IVF (fewer than 39 training points per cell, faiss' rule)
  use `IndexFlatIP` (exact).
- `"scann"`: Google's ScaNN (`scann.scann_ops_pybind`), used only when `import scann`
  works. The PyPI wheel 1.4.2 loads a TensorFlow op library at import and fails beside
  TensorFlow 2.21, so faiss is the tested backend.

Every backend maps `(Q, d)` float32 queries to `(indices (Q, k) int64, similarities
(Q, k) float32)`, best first.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import numpy as np

BACKENDS = ("exact", "faiss", "scann")
_MIN_POINTS_PER_CELL = 39  # faiss warns below this many k-means training points per centroid


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def scann_available() -> bool:
    try:
        import scann  # noqa: F401
    except Exception:  # the 1.4.2 wheel raises at import beside TF 2.21 (undefined symbol)
        return False
    return True


def _require(backend: str):
    if backend == "faiss" and not faiss_available():
        raise ValueError("backend='faiss' needs faiss: pip install 'kdml[ann]' (faiss-cpu), "
                         "or use backend='exact'.")
    if backend == "scann" and not scann_available():
        raise ValueError("backend='scann' needs an importable ScaNN (pip install scann; the "
                         "1.4.2 wheel fails to import beside TensorFlow 2.21): use "
                         "backend='faiss' or backend='exact'.")


class ExactBackend:
    """Exact cosine top-k by `kdml.evaluation.exact_knn`.

    Args:
        max_memory_bytes: tile budget of the blocked search.
        strategy: optional `tf.distribute.Strategy` whose replicas share the queries.
    """

    name = "exact"

    def __init__(self, max_memory_bytes: int = 256 * 2**20, strategy=None):
        self.max_memory_bytes = int(max_memory_bytes)
        self.strategy = strategy
        self._vectors = None

    def build(self, vectors: np.ndarray, seed: int = 0) -> None:
        self._vectors = vectors

    def add(self, vectors: np.ndarray, all_vectors: np.ndarray) -> None:
        self._vectors = all_vectors

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        from kdml.evaluation import exact_knn

        return exact_knn(queries, self._vectors, k=k, max_memory_bytes=self.max_memory_bytes,
                         similarity="inner_product", strategy=self.strategy)

    def config(self) -> dict:
        return {}

    def save(self, directory: str) -> Optional[str]:
        return None

    def load(self, directory: str, vectors: np.ndarray, config: dict) -> None:
        self._vectors = vectors


def default_nlist(num_vectors: int) -> int:
    """IVF cells for N training points: the power of 2 nearest 4 sqrt(N), at most N / 39."""
    if num_vectors < 2 * _MIN_POINTS_PER_CELL:
        return 1
    nlist = 2 ** round(math.log2(4 * math.sqrt(num_vectors)))
    while nlist > 1 and nlist * _MIN_POINTS_PER_CELL > num_vectors:
        nlist //= 2
    return int(nlist)


def sample_recall(approximate, exact, k: int) -> float:
    """Mean over queries of |approximate top-k ∩ exact top-k| / k."""
    hits = [len(np.intersect1d(a, e)) for a, e in zip(approximate[:, :k], exact[:, :k])]
    return float(np.mean(hits)) / k


class FaissBackend:
    """faiss IVF-Flat (inner product on unit vectors), `nprobe` calibrated at build.

    Args:
        nlist: IVF cells (default `default_nlist(N)`; 1 means an exact `IndexFlatIP`).
        nprobe: cells visited per query (default: calibrated to `target_recall`).
        target_recall: recall@`calibration_k` against exact the calibration aims for.
        calibration_queries: gallery vectors (seeded sample) used to calibrate.
        train_size: k-means training points at most (seeded sample of the gallery);
            the default `nlist` keeps 39 of them per cell (faiss' minimum).
        kmeans_iterations: Lloyd iterations of the coarse k-means.
        threads: faiss OpenMP threads (None: faiss' default, all cores).
    """

    name = "faiss"

    def __init__(self, nlist: Optional[int] = None, nprobe: Optional[int] = None,
                 target_recall: float = 0.97, calibration_k: int = 10,
                 calibration_queries: int = 500, train_size: int = 131_072,
                 kmeans_iterations: int = 10, threads: Optional[int] = None):
        _require("faiss")
        self.kmeans_iterations = int(kmeans_iterations)
        self.nlist, self.nprobe = nlist, nprobe
        self.target_recall = float(target_recall)
        self.calibration_k = int(calibration_k)
        self.calibration_queries = int(calibration_queries)
        self.train_size = int(train_size)
        self.threads = threads
        self.calibrated_recall = None
        self._index = None

    def _faiss(self):
        import faiss

        if self.threads:
            faiss.omp_set_num_threads(int(self.threads))
        return faiss

    def build(self, vectors: np.ndarray, seed: int = 0) -> None:
        faiss = self._faiss()
        n, d = vectors.shape
        nlist = self.nlist or default_nlist(min(n, self.train_size))
        self.nlist = int(nlist)
        if nlist == 1:
            self._index = faiss.IndexFlatIP(d)
            self._index.add(vectors)
            self.nprobe = 1
            return
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(seed)
        index.cp.niter = self.kmeans_iterations
        rng = np.random.default_rng(seed)
        train = vectors if n <= self.train_size else vectors[
            np.sort(rng.choice(n, self.train_size, replace=False))]
        index.train(np.ascontiguousarray(train))
        index.add(vectors)
        self._index = index
        if self.nprobe is None:
            self.nprobe = self._calibrate(vectors, rng)
        index.nprobe = int(self.nprobe)

    def _calibrate(self, vectors: np.ndarray, rng) -> int:
        """Smallest power-of-2 `nprobe` with recall@k >= target on gallery-vector queries
        (each query's own row excluded from both result lists)."""
        from kdml.evaluation import exact_knn

        n = len(vectors)
        k = min(self.calibration_k, n - 1)
        rows = np.sort(rng.choice(n, min(self.calibration_queries, n), replace=False))
        queries = vectors[rows]
        exact, _ = exact_knn(queries, vectors, k=k + 1, similarity="inner_product")
        exact = drop_query_rows(exact, rows, k)
        nprobe = 1
        while True:
            self._index.nprobe = nprobe
            _, found = self._index.search(queries, k + 1)
            recall = sample_recall(drop_query_rows(found, rows, k), exact, k)
            if recall >= self.target_recall or nprobe >= self.nlist:
                self.calibrated_recall = recall
                return nprobe
            nprobe = min(2 * nprobe, self.nlist)

    def add(self, vectors: np.ndarray, all_vectors: np.ndarray) -> None:
        self._index.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        self._faiss()
        similarities, indices = self._index.search(np.ascontiguousarray(queries, np.float32), k)
        return indices.astype(np.int64), similarities.astype(np.float32)

    def config(self) -> dict:
        return {"nlist": self.nlist, "nprobe": self.nprobe, "target_recall": self.target_recall,
                "calibrated_recall": self.calibrated_recall}

    def save(self, directory: str) -> str:
        path = os.path.join(directory, "faiss.index")
        self._faiss().write_index(self._index, path)
        return path

    def load(self, directory: str, vectors: np.ndarray, config: dict) -> None:
        faiss = self._faiss()
        self._index = faiss.read_index(os.path.join(directory, "faiss.index"))
        self.nlist, self.nprobe = config.get("nlist"), config.get("nprobe")
        self.calibrated_recall = config.get("calibrated_recall")
        if self.nprobe and hasattr(self._index, "nprobe"):
            self._index.nprobe = int(self.nprobe)
        if self._index.ntotal != len(vectors):
            raise ValueError(f"{directory}: faiss.index holds {self._index.ntotal} vectors but the "
                             f"index {len(vectors)}; rebuild it with backend='faiss'.")


class ScannBackend:
    """ScaNN tree + asymmetric hashing + exact re-scoring (`dot_product` on unit vectors).

    Used only when `import scann` works (see the module docstring); not saved: it is
    rebuilt from the stored vectors at load.
    """

    name = "scann"

    def __init__(self, num_leaves: Optional[int] = None, leaves_to_search: Optional[int] = None,
                 reorder: int = 100):
        _require("scann")
        self.num_leaves, self.leaves_to_search, self.reorder = num_leaves, leaves_to_search, reorder
        self._searcher = None

    def build(self, vectors: np.ndarray, seed: int = 0) -> None:
        import scann

        n = len(vectors)
        self.num_leaves = self.num_leaves or max(1, default_nlist(n))
        self.leaves_to_search = self.leaves_to_search or max(1, self.num_leaves // 16)
        builder = scann.scann_ops_pybind.builder(vectors, 10, "dot_product")
        if n >= 2 * _MIN_POINTS_PER_CELL:
            builder = builder.tree(num_leaves=self.num_leaves,
                                   num_leaves_to_search=self.leaves_to_search,
                                   training_sample_size=min(n, 250_000))
        self._searcher = builder.score_ah(2, anisotropic_quantization_threshold=0.2) \
            .reorder(self.reorder).build()

    def add(self, vectors: np.ndarray, all_vectors: np.ndarray) -> None:
        self.build(all_vectors)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        indices, similarities = self._searcher.search_batched(queries, final_num_neighbors=k)
        return np.asarray(indices, np.int64), np.asarray(similarities, np.float32)

    def config(self) -> dict:
        return {"num_leaves": self.num_leaves, "leaves_to_search": self.leaves_to_search,
                "reorder": self.reorder}

    def save(self, directory: str) -> Optional[str]:
        return None

    def load(self, directory: str, vectors: np.ndarray, config: dict) -> None:
        self.num_leaves = config.get("num_leaves")
        self.leaves_to_search = config.get("leaves_to_search")
        self.build(vectors)


def make_backend(name: str, **options):
    """The backend `name` ("exact" | "faiss" | "scann") with its options."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown index backend {name!r}. Valid backends: {', '.join(BACKENDS)}.")
    _require(name)
    return {"exact": ExactBackend, "faiss": FaissBackend, "scann": ScannBackend}[name](**options)


def drop_query_rows(neighbours: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's neighbours without the query's own gallery row, first k kept."""
    out = np.empty((len(rows), k), np.int64)
    for i, (row, found) in enumerate(zip(rows, neighbours)):
        out[i] = found[found != row][:k]
    return out
