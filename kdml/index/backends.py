"""Search backends of a `GalleryIndex`: exact (kdml's blocked k-NN) and approximate.

- `"exact"`: `kdml.evaluation.exact_knn` (blocked matmul + top-k, on the GPU when one is
  visible, across a strategy's replicas when given one). No state beyond the vectors.
- `"faiss"`: inner product on the L2-normalised vectors (= cosine), one of two faiss
  indexes (`faiss_index`):
  - `"ivf"` (default): `IndexIVFFlat`. `nlist` cells from a k-means of the gallery;
    `nprobe` (cells visited per query) is calibrated at build time: the smallest power
    of 2 whose recall@k against the exact search, on a seeded sample of gallery
    vectors, reaches `target_recall`. Galleries too small for IVF (fewer than 39
    training points per cell, faiss' rule) use `IndexFlatIP` (exact).
  - `"hnsw"`: `IndexHNSWFlat` (a graph of `hnsw_m` links per node, built with
    `ef_construction` candidates); `ef_search` calibrated like `nprobe` (the smallest
    power of 2 from 16 reaching `target_recall`). Supports `add` (new nodes are linked
    into the graph). Deterministic when built with one thread (`threads=1`): faiss
    draws node levels from a fixed-seed generator, but its multi-threaded insertion
    order varies, so a multi-threaded build can differ between runs (searches of a
    given graph are deterministic).
- `"scann"`: Google's ScaNN (`scann.scann_ops_pybind`), used only when `import scann`
  works. The PyPI wheel 1.4.2 loads a TensorFlow op library at import and fails beside
  TensorFlow 2.21, so faiss is the tested backend.

Every backend maps `(Q, d)` float32 queries to `(indices (Q, k) int64, similarities
(Q, k) float32)`, best first.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Optional, Tuple

import numpy as np

from kdml.evaluation import exact_knn

BACKENDS = ("exact", "faiss", "scann")
FAISS_INDEXES = ("ivf", "hnsw")
_MIN_POINTS_PER_CELL = 39  # faiss warns below this many k-means training points per centroid
_MAX_EF_SEARCH = 4096  # the HNSW calibration stops here


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
    """faiss IVF-Flat or HNSW-Flat (inner product on unit vectors), `nprobe` or
    `ef_search` calibrated at build.

    Args:
        faiss_index: `"ivf"` (`IndexIVFFlat`) or `"hnsw"` (`IndexHNSWFlat`).
        nlist: IVF cells (default `default_nlist(N)`; 1 means an exact `IndexFlatIP`).
        nprobe: cells visited per query (default: calibrated to `target_recall`).
        hnsw_m: HNSW links per node (`M`).
        ef_construction: HNSW candidates per insertion (`efConstruction`).
        ef_search: HNSW candidates per query (`efSearch`; default: calibrated).
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
                 kmeans_iterations: int = 10, threads: Optional[int] = None,
                 faiss_index: str = "ivf", hnsw_m: int = 32, ef_construction: int = 40,
                 ef_search: Optional[int] = None):
        _require("faiss")
        if faiss_index not in FAISS_INDEXES:
            raise ValueError(f"Unknown faiss index {faiss_index!r}. Valid: "
                             f"{', '.join(FAISS_INDEXES)} (--faiss_index).")
        for name, value in (("hnsw_m", hnsw_m), ("ef_construction", ef_construction),
                            ("ef_search", ef_search)):
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                raise ValueError(f"Expected `{name}` to be a positive integer. Received: "
                                 f"{name}={value!r}")
        self.faiss_index = faiss_index
        self.hnsw_m, self.ef_construction = int(hnsw_m), int(ef_construction)
        self.ef_search = None if ef_search is None else int(ef_search)
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
        if self.faiss_index == "hnsw":
            self._build_hnsw(vectors, seed)
            return
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

    def _build_hnsw(self, vectors: np.ndarray, seed: int) -> None:
        faiss = self._faiss()
        index = faiss.IndexHNSWFlat(vectors.shape[1], self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.add(np.ascontiguousarray(vectors, np.float32))
        self._index = index
        if self.ef_search is None:
            self.ef_search = self._calibrate(vectors, np.random.default_rng(seed))
        index.hnsw.efSearch = int(self.ef_search)

    def _calibrate(self, vectors: np.ndarray, rng) -> int:
        """Smallest power-of-2 `nprobe` (IVF, from 1 to nlist) or `ef_search` (HNSW, from
        16 to 4096) with recall@k >= target on gallery-vector queries (each query's own
        row excluded from both result lists)."""
        n = len(vectors)
        k = min(self.calibration_k, n - 1)
        rows = np.sort(rng.choice(n, min(self.calibration_queries, n), replace=False))
        queries = np.ascontiguousarray(vectors[rows])
        exact, _ = exact_knn(queries, vectors, k=k + 1, similarity="inner_product")
        exact = drop_query_rows(exact, rows, k)
        hnsw = self.faiss_index == "hnsw"
        value, last = (16, _MAX_EF_SEARCH) if hnsw else (1, self.nlist)
        while True:
            if hnsw:
                self._index.hnsw.efSearch = value
            else:
                self._index.nprobe = value
            _, found = self._index.search(queries, k + 1)
            recall = sample_recall(drop_query_rows(found, rows, k), exact, k)
            if recall >= self.target_recall or value >= last:
                self.calibrated_recall = recall
                return value
            value = min(2 * value, last)

    def add(self, vectors: np.ndarray, all_vectors: np.ndarray) -> None:
        self._index.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        self._faiss()
        similarities, indices = self._index.search(np.ascontiguousarray(queries, np.float32), k)
        return indices.astype(np.int64), similarities.astype(np.float32)

    def config(self) -> dict:
        if self.faiss_index == "hnsw":
            return {"faiss_index": "hnsw", "hnsw_m": self.hnsw_m,
                    "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                    "target_recall": self.target_recall,
                    "calibrated_recall": self.calibrated_recall}
        return {"faiss_index": "ivf", "nlist": self.nlist, "nprobe": self.nprobe,
                "target_recall": self.target_recall, "calibrated_recall": self.calibrated_recall}

    def save(self, directory: str) -> str:
        path = os.path.join(directory, "faiss.index")
        self._faiss().write_index(self._index, path)
        return path

    def load(self, directory: str, vectors: np.ndarray, config: dict) -> None:
        faiss = self._faiss()
        self._index = faiss.read_index(os.path.join(directory, "faiss.index"))
        self.faiss_index = config.get("faiss_index", "ivf")  # indexes saved before HNSW: ivf
        self.nlist, self.nprobe = config.get("nlist"), config.get("nprobe")
        self.hnsw_m = config.get("hnsw_m", self.hnsw_m)
        self.ef_construction = config.get("ef_construction", self.ef_construction)
        self.ef_search = config.get("ef_search")
        self.calibrated_recall = config.get("calibrated_recall")
        if self.nprobe and hasattr(self._index, "nprobe"):
            self._index.nprobe = int(self.nprobe)
        if self.ef_search and hasattr(self._index, "hnsw"):
            self._index.hnsw.efSearch = int(self.ef_search)
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
    cls = {"exact": ExactBackend, "faiss": FaissBackend, "scann": ScannBackend}[name]
    accepted = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"backend={name!r} does not take {', '.join(unknown)} (options of "
                         f"another backend): drop them, or choose the backend they belong to "
                         f"(e.g. --backend=faiss for --faiss_index).")
    return cls(**options)


def drop_query_rows(neighbours: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's neighbours without the query's own gallery row, first k kept."""
    out = np.empty((len(rows), k), np.int64)
    for i, (row, found) in enumerate(zip(rows, neighbours)):
        out[i] = found[found != row][:k]
    return out
