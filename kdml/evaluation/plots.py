"""PNG figures of an evaluation: retrieval grid, Recall@K curve, similarity histograms, 2-D map.

The retrieval grid is the one to look at first: one row per query, its thumbnail then
its top-k results framed green (same class) or orange (another), for a seeded sample of
queries and for the worst ones (`select_grid_rows`); with a calibrated threshold, a
query whose best similarity is below it has its results faded under a "no match (best
0.41 < threshold 0.52)" caption. `python -m kdml.evaluate --plots`
and `python -m kdml.index query --plot` draw it.

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


def plot_tar_far_curve(far, tar, path: str, title: str = "", negative_pairs: int = 0) -> str:
    """TAR against FAR (log axis) from ROC vertices `(far, tar)`
    (`kdml.evaluation.verification_metrics(return_curve=True)`); FARs below one impostor
    pair (`1 / negative_pairs`) are not drawn."""
    plt = _pyplot()
    far, tar = np.asarray(far, np.float64), np.asarray(tar, np.float64)
    floor = 1.0 / negative_pairs if negative_pairs else 1e-6
    keep = far >= floor
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot(far[keep], 100.0 * tar[keep], drawstyle="default")
    for level in (1e-4, 1e-3, 1e-2):
        if level >= floor:
            ax.axvline(level, color="grey", alpha=0.3, lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(max(floor, 1e-6), 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("FAR (false accept rate, all impostor pairs)")
    ax.set_ylabel("TAR (%)")
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "TAR-FAR")
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


# --- Retrieval grid -------------------------------------------------------------------

# Okabe-Ito colours (told apart with red-green colour blindness); the header's legend
# names them: GRID_LEGEND.
MATCH_COLOUR = (0, 158, 115)      # green: the result is of the query's class
MISMATCH_COLOUR = (213, 94, 0)    # orange (vermillion): another class
QUERY_COLOUR = (90, 90, 90)       # the query's own frame
GRID_LEGEND = "green: same class, orange: other"
# a row whose best similarity is below the match threshold ("no match"): its results
# faded toward white (each pixel p drawn as 255 - NO_MATCH_FADE * (255 - p)) under a
# caption in NO_MATCH_COLOUR (Okabe-Ito blue: not a frame colour); NO_MATCH_LEGEND
NO_MATCH_COLOUR = (0, 114, 178)
NO_MATCH_FADE = 0.3
NO_MATCH_LEGEND = "faded: no match"
_BORDER, _PAD, _HEADER, _LABEL_WIDTH, _DPI = 4, 2, 22, 112, 100


def first_positive_rank(query_labels, neighbour_labels) -> np.ndarray:
    """`(Q,)` 1-based rank of each query's first same-class result; K + 1 when none of
    its K results `neighbour_labels (Q, K)` is of its class."""
    matches = np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]
    k = matches.shape[1]
    return np.where(matches.any(axis=1), matches.argmax(axis=1) + 1, k + 1)


def select_grid_rows(query_labels, neighbour_labels, *, num_sampled: int = 6,
                     num_worst: int = 6, seed: int = 0):
    """The queries a retrieval grid shows: `(sampled, worst)` row indices.

    `worst`: the `num_worst` queries whose first same-class result comes last (highest
    `first_positive_rank`, none at all first), ties to the lower query index. `sampled`:
    `num_sampled` of the remaining queries, drawn with `numpy.random.default_rng(seed)`,
    in increasing order.
    """
    ranks = first_positive_rank(query_labels, neighbour_labels)
    order = np.lexsort((np.arange(len(ranks)), -ranks))
    worst = order[:max(0, int(num_worst))]
    rest = np.setdiff1d(np.arange(len(ranks)), worst)
    rng = np.random.default_rng(seed)
    sampled = np.sort(rng.choice(rest, size=min(max(0, int(num_sampled)), len(rest)),
                                 replace=False))
    return sampled, worst


def grid_size(rows: int, k: int, thumb: int = 64) -> tuple:
    """(width, height) in pixels of a retrieval grid of `rows` queries and `k` results."""
    cell = thumb + 2 * (_BORDER + _PAD)
    return _LABEL_WIDTH + (k + 1) * cell + cell // 2, _HEADER + rows * cell


def _thumbnail(image, size: int) -> np.ndarray:
    """An `(H, W, 3)` (or `(H, W)`) image as uint8 `(size, size, 3)`: centre square,
    nearest-neighbour resize."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    if image.dtype != np.uint8:
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    pick = (np.arange(size) * side // size)
    return image[top + pick][:, left + pick]


def faded(image) -> np.ndarray:
    """A uint8 image as drawn in a "no match" row: `255 - NO_MATCH_FADE * (255 - p)`."""
    image = np.asarray(image, np.float32)
    return np.round(255.0 - NO_MATCH_FADE * (255.0 - image)).astype(np.uint8)


def no_match_caption(best: float, threshold: float) -> str:
    """`"no match (best 0.41 < threshold 0.52)"`: 2 decimals, more (up to 6) until the
    two numbers differ as printed."""
    for digits in range(2, 7):
        a, b = f"{best:.{digits}f}", f"{threshold:.{digits}f}"
        if a != b:
            break
    return f"no match (best {a} < threshold {b})"


def plot_retrieval_grid(query_images, neighbour_images, matches, path: str, *,
                        row_labels=None, no_match=None, thumb: int = 64,
                        title: str = "") -> str:
    """Draws one row per query: its thumbnail, then its top-k results, best first.

    Args:
        query_images: Q images, each `(H, W, 3)` RGB (uint8, or float in [0, 255]).
        neighbour_images: Q sequences of k images.
        matches: `(Q, k)` bool, True where the result shares the query's class: framed
            green (`MATCH_COLOUR`), else orange (`MISMATCH_COLOUR`); queries are framed grey.
        row_labels: Q short strings written left of each row (e.g. "worst, rank 7").
        no_match: Q captions or None: a row with a caption (`no_match_caption`) is one
            whose best similarity is below the match threshold: its results are drawn
            faded (`faded`; frames kept) and the caption is written across them in
            `NO_MATCH_COLOUR`; the header adds `NO_MATCH_LEGEND`.
        thumb: thumbnail side in pixels.

    Returns:
        `path`; the PNG is `grid_size(Q, k, thumb)` pixels.
    """
    plt = _pyplot()
    matches = np.asarray(matches, bool)
    rows, k = matches.shape
    if len(query_images) != rows or any(len(n) != k for n in neighbour_images):
        raise ValueError(f"Expected {rows} query images and {rows} rows of {k} results (the shape "
                         f"of `matches`). Received: {len(query_images)} queries.")
    no_match = list(no_match) if no_match is not None else [None] * rows
    if len(no_match) != rows:
        raise ValueError(f"Expected {rows} no_match entries (a caption or None per query row). "
                         f"Received: {len(no_match)}.")
    width, height = grid_size(rows, k, thumb)
    cell = thumb + 2 * (_BORDER + _PAD)
    canvas = np.full((height, width, 3), 255, np.uint8)

    def put(image, row, column, colour, fade=False):
        top = _HEADER + row * cell + _PAD
        left = _LABEL_WIDTH + column * cell + (cell // 2 if column else 0) + _PAD
        frame = thumb + 2 * _BORDER
        canvas[top:top + frame, left:left + frame] = colour
        image = _thumbnail(image, thumb)
        canvas[top + _BORDER:top + _BORDER + thumb, left + _BORDER:left + _BORDER + thumb] = \
            faded(image) if fade else image

    for r in range(rows):
        put(query_images[r], r, 0, QUERY_COLOUR)
        for j in range(k):
            put(neighbour_images[r][j], r, j + 1,
                MATCH_COLOUR if matches[r, j] else MISMATCH_COLOUR, fade=bool(no_match[r]))
    fig = plt.figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    font = dict(fontsize=8, va="center")
    ax.text(_LABEL_WIDTH + cell / 2, _HEADER / 2, "query", ha="center", **font)
    legend = GRID_LEGEND + (f"; {NO_MATCH_LEGEND}" if any(no_match) else "")
    ax.text(_LABEL_WIDTH + 1.5 * cell, _HEADER / 2, f"top {k} ({legend})", ha="left", **font)
    for r, caption in enumerate(no_match):
        if caption:  # across the row's results, centred
            ax.text(_LABEL_WIDTH + 1.5 * cell + k * cell / 2, _HEADER + (r + 0.5) * cell,
                    caption, ha="center", color=np.asarray(NO_MATCH_COLOUR) / 255,
                    fontweight="bold", bbox=dict(facecolor="white", edgecolor="none",
                                                 alpha=0.85, pad=2), **font)
    if title:
        ax.text(4, _HEADER / 2, title, ha="left", **font)
    for r, label in enumerate(row_labels or []):
        ax.text(4, _HEADER + (r + 0.5) * cell, str(label), ha="left", **font)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def retrieval_grid(query_labels, neighbours, gallery_labels, load_query, load_gallery,
                   path: str, *, num_sampled: int = 6, num_worst: int = 6, seed: int = 0,
                   thumb: int = 64, title: str = "", best_similarities=None,
                   threshold=None) -> dict:
    """Selects the rows (`select_grid_rows`), loads their images and draws the grid.

    Args:
        query_labels: `(Q,)` labels; neighbours: `(Q, k)` gallery rows, best first;
            gallery_labels: `(N,)`.
        load_query, load_gallery: `f(rows) -> list of (H, W, 3) images`.
        best_similarities, threshold: `(Q,)` each query's best similarity and the
            calibrated match threshold: rows with `best < threshold` are marked "no
            match" (`plot_retrieval_grid`'s `no_match`). Both or neither.

    Returns:
        `{"path", "sampled": [query rows], "worst": [query rows], "worst_ranks": [...],
        "no_match": [shown query rows below the threshold]}`.
    """
    if (best_similarities is None) != (threshold is None):
        raise ValueError("Pass best_similarities and threshold together (the grid marks "
                         "queries whose best similarity is below the threshold), or neither.")
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    neighbour_labels = gallery_labels[np.asarray(neighbours)]
    sampled, worst = select_grid_rows(query_labels, neighbour_labels, num_sampled=num_sampled,
                                      num_worst=num_worst, seed=seed)
    ranks = first_positive_rank(query_labels, neighbour_labels)
    k = neighbour_labels.shape[1]
    shown = np.concatenate([sampled, worst]).astype(np.int64)
    labels = [f"query {q}\nsample" for q in sampled] + [
        f"query {q}, worst\n" + (f"1st same class: {ranks[q]}" if ranks[q] <= k
                                  else f"no same class in {k}")
        for q in worst]
    captions = [None] * len(shown)
    if threshold is not None:
        best = np.asarray(best_similarities, np.float32)
        threshold = np.float32(threshold)
        captions = [no_match_caption(float(best[q]), float(threshold)) if best[q] < threshold
                    else None for q in shown]
    queries = load_query(shown)
    rows_neighbours = np.asarray(neighbours)[shown]
    flat = load_gallery(rows_neighbours.reshape(-1))
    nested = [flat[i * k:(i + 1) * k] for i in range(len(shown))]
    plot_retrieval_grid(queries, nested, neighbour_labels[shown] == query_labels[shown][:, None],
                        path, row_labels=labels, no_match=captions, thumb=thumb, title=title)
    return {"path": path, "sampled": sampled.tolist(), "worst": worst.tolist(),
            "worst_ranks": ranks[worst].tolist(),
            "no_match": [int(q) for q, c in zip(shown, captions) if c]}


def load_image_files(paths, size: int = 96) -> list:
    """Image files as uint8 RGB thumbnails `(size, size, 3)` (Pillow; transparency over white)."""
    from PIL import Image

    out = []
    for path in paths:
        with Image.open(str(path)) as image:
            if image.mode in ("RGBA", "LA", "P"):
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
            out.append(_thumbnail(np.asarray(image.convert("RGB")), size))
    return out
