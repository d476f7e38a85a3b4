"""PNG figures of an evaluation: Recall@K curve, similarity histograms, 2-D embedding map.

matplotlib (a dependency of tensorflow-similarity) draws with the non-interactive Agg
backend. The 2-D map uses UMAP (`umap-learn`, also brought by tensorflow-similarity)
when it is installed, else scikit-learn's t-SNE; both run offline.
"""

from __future__ import annotations

import os

import numpy as np

MAP_METHODS = ("auto", "umap", "tsne")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_recall_curve(recall_at_k: dict, path: str, title: str = "") -> str:
    """Recall@K against K (log2 axis). `recall_at_k`: `{K: recall in [0, 1]}`."""
    plt = _pyplot()
    ks = sorted(recall_at_k)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(ks, [100.0 * recall_at_k[k] for k in ks], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "Recall@K")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def pair_similarities(embeddings, labels, *, max_pairs=200_000, seed=0):
    """Cosine similarities of sampled positive (same class) and negative pairs.

    Pairs `(i, j)`, `i != j`, are drawn uniformly at random (`max_pairs` of them) and
    split by label; positives are rare among random pairs, so up to `max_pairs` more are
    drawn inside classes (a random second member of the first item's class).

    Returns:
        `(positive (P,), negative (M,))` float32 similarity arrays.
    """
    x = np.asarray(embeddings, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    n = len(x)
    rng = np.random.default_rng(seed)
    i = rng.integers(n, size=max_pairs)
    j = (i + rng.integers(1, n, size=max_pairs)) % n  # j != i
    same = labels[i] == labels[j]
    negative = np.einsum("nd,nd->n", x[i[~same]], x[j[~same]])
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, labels, side="left")
    sizes = np.searchsorted(sorted_labels, labels, side="right") - starts
    anchors = rng.permutation(np.flatnonzero(sizes > 1))[:max_pairs]
    offset = rng.integers(1, np.maximum(sizes[anchors], 2))
    # position of the anchor in its class block, then a different member of the block
    anchor_rank = np.empty(n, np.int64)
    anchor_rank[order] = np.arange(n)
    within = anchor_rank[anchors] - starts[anchors]
    partner = order[starts[anchors] + (within + offset) % sizes[anchors]]
    positive = np.einsum("nd,nd->n", x[anchors], x[partner])
    return positive.astype(np.float32), negative.astype(np.float32)


def plot_similarity_histograms(positive, negative, path: str, title: str = "") -> str:
    """Overlaid density histograms of positive and negative pair similarities."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    bins = np.linspace(-1.0, 1.0, 81)
    if len(negative):
        ax.hist(negative, bins=bins, density=True, alpha=0.6,
                label=f"negative pairs ({len(negative):,})")
    if len(positive):
        ax.hist(positive, bins=bins, density=True, alpha=0.6,
                label=f"positive pairs ({len(positive):,})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(title or "Pair similarities")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def embedding_map(embeddings, *, method="auto", seed=0):
    """2-D coordinates of `(N, d)` embeddings: UMAP (cosine) or t-SNE (cosine).

    Returns `(coordinates (N, 2), method_used)`.
    """
    if method not in MAP_METHODS:
        raise ValueError(f"Expected `method` in {MAP_METHODS}. Received: method={method!r}")
    x = np.asarray(embeddings, np.float32)
    if method in ("auto", "umap"):
        try:
            import umap  # noqa: F401
        except ImportError:
            if method == "umap":
                raise ValueError(
                    "method='umap' needs umap-learn: pip install 'kdml[plots]' "
                    "(or umap-learn), or use method='tsne'.") from None
        else:
            import umap

            reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed,
                                n_neighbors=min(15, len(x) - 1))
            return reducer.fit_transform(x), "umap"
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    tsne = TSNE(n_components=2, metric="cosine", init="pca", random_state=seed,
                perplexity=perplexity)
    return tsne.fit_transform(x), "tsne"


def plot_embedding_map(coordinates, labels, path: str, title: str = "") -> str:
    """Scatter of 2-D coordinates coloured by class (a cyclic palette of 20 colours)."""
    plt = _pyplot()
    labels = np.asarray(labels)
    _, colour_index = np.unique(labels, return_inverse=True)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.scatter(coordinates[:, 0], coordinates[:, 1], c=colour_index % 20, cmap="tab20",
               s=6, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "Test embeddings")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(embeddings, labels, recall_at_k: dict, directory: str, *, map_method="auto",
                map_points=2000, seed=0, title="") -> dict:
    """Writes the three figures into `directory`; returns `{figure: path}`.

    The map uses at most `map_points` images (a seeded random subset of whole classes
    first, so that colours stay readable).
    """
    os.makedirs(directory, exist_ok=True)
    paths = {"recall_curve": plot_recall_curve(
        recall_at_k, os.path.join(directory, "recall_at_k.png"), title)}
    positive, negative = pair_similarities(embeddings, labels, seed=seed)
    paths["similarity_histograms"] = plot_similarity_histograms(
        positive, negative, os.path.join(directory, "similarity_histograms.png"), title)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    keep = np.zeros(len(labels), bool)
    for c in classes:
        members = np.flatnonzero(labels == c)
        if keep.sum() + len(members) > map_points and keep.any():
            break
        keep[members] = True
    keep_index = np.flatnonzero(keep)[:map_points]
    coordinates, used = embedding_map(np.asarray(embeddings)[keep_index], method=map_method,
                                      seed=seed)
    paths["embedding_map"] = plot_embedding_map(
        coordinates, labels[keep_index], os.path.join(directory, f"embedding_map_{used}.png"),
        f"{title} ({used}, {len(keep_index)} images)".strip())
    return paths
