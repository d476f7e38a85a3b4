"""PNG figures of an evaluation: retrieval grid, Recall@K curve, similarity histograms, 2-D map.

The retrieval grid is the one to look at first: one row per query, its thumbnail then
its top-k results framed green (same class) or orange (another), for a seeded sample of
queries and for the worst ones (`select_grid_rows`: the latest first same-class result,
then the widest margin by which another class beats the query's own); each row names
the query, its class and how it fared. With a match threshold, a query whose best
similarity is below it has its results faded under a "no match (best 0.9987 < threshold
0.9996)" caption, printed with as many digits as the comparison needs. `python -m
kdml.evaluate --plots` and `python -m kdml.index query --plot` draw it.

The similarity histograms span the data's range (the threshold drawn when there is
one); the 2-D map colours 10 classes, with a legend, over the others in grey.

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


THRESHOLD_COLOUR = "black"


def histogram_range(*arrays, threshold=None, margin: float = 0.05) -> tuple:
    """`(low, high)` of the x-axis: the data's range (and the threshold), widened by
    `margin` of its span on each side (at least 1e-3), within [-1, 1]."""
    values = [np.asarray(a, np.float64).ravel() for a in arrays if len(a)]
    values += [np.asarray([threshold], np.float64)] if threshold is not None else []
    if not values:
        return -1.0, 1.0
    low, high = min(v.min() for v in values), max(v.max() for v in values)
    pad = max(margin * (high - low), 1e-3)
    return max(-1.0, low - pad), min(1.0, high + pad)


def threshold_text(threshold: float) -> str:
    """A threshold as written on a figure: its value to 6 decimals, trailing zeros
    dropped, at least 2 (0.52, 0.995, 0.9996)."""
    text = f"{float(threshold):.6f}".rstrip("0")
    return text + "0" * max(0, 2 - len(text.partition(".")[2]))


def plot_similarity_histograms(positive, negative, path: str, title: str = "",
                               threshold=None) -> str:
    """Overlaid density histograms of positive and negative pair similarities.

    The x-axis spans the data (`histogram_range`), not [-1, 1]: an embedding whose pairs
    all lie in [0.9, 1.0] still shows two distributions. `threshold` (a calibrated
    cosine): drawn as a dashed vertical line, named with its value in the legend.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    low, high = histogram_range(positive, negative, threshold=threshold)
    bins = np.linspace(low, high, 81)
    if len(negative):
        ax.hist(negative, bins=bins, density=True, alpha=0.6,
                label=f"negative pairs ({len(negative):,})")
    if len(positive):
        ax.hist(positive, bins=bins, density=True, alpha=0.6,
                label=f"positive pairs ({len(positive):,})")
    if threshold is not None:
        ax.axvline(float(threshold), color=THRESHOLD_COLOUR, ls="--", lw=1.2,
                   label=f"threshold {threshold_text(threshold)}")
    ax.set_xlim(low, high)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
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


MAP_HIGHLIGHT = 10
MAP_OTHERS_COLOUR = (0.8, 0.8, 0.8)


def highlighted_classes(labels, count: int = MAP_HIGHLIGHT, seed: int = 0) -> np.ndarray:
    """The `count` classes a 2-D map colours: the largest ones, ties in a seeded order."""
    classes, sizes = np.unique(np.asarray(labels), return_counts=True)
    tie_order = np.random.default_rng(seed).permutation(len(classes))
    return classes[np.lexsort((tie_order, -sizes))[:count]]


def plot_embedding_map(coordinates, labels, path: str, title: str = "", *, class_names=None,
                       highlight: int = MAP_HIGHLIGHT, seed: int = 0) -> str:
    """Scatter of 2-D coordinates: `highlight` classes (`highlighted_classes`) in distinct
    colours (tab10) named in a legend, every other class light grey beneath them; the
    title says how many classes are coloured. `class_names`: the labels' names."""
    plt = _pyplot()
    labels = np.asarray(labels)
    coordinates = np.asarray(coordinates)
    shown = highlighted_classes(labels, highlight, seed)
    total = len(np.unique(labels))
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    others = ~np.isin(labels, shown)
    if others.any():
        ax.scatter(coordinates[others, 0], coordinates[others, 1], color=MAP_OTHERS_COLOUR,
                   s=5, linewidths=0, label=f"other {total - len(shown)} classes")
    palette = plt.get_cmap("tab10").colors
    for i, label in enumerate(shown):
        name = str(class_names[label]) if class_names is not None else str(label)
        if len(name) > 24:
            name = "..." + name[-21:]
        members = labels == label
        ax.scatter(coordinates[members, 0], coordinates[members, 1], color=palette[i % 10],
                   s=9, linewidths=0, label=f"{name} ({int(members.sum())})")
    ax.set_xticks([])
    ax.set_yticks([])
    coloured = (f"all {total} classes coloured" if len(shown) == total
                else f"{len(shown)} of {total} classes coloured, the rest grey")
    ax.set_title(f"{title or 'Test embeddings'}\n{coloured}", fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=1.5,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_plots(embeddings, labels, recall_at_k: dict, directory: str, *, map_method="auto",
                map_points=2000, seed=0, title="", threshold=None, class_names=None) -> dict:
    """Writes the three figures into `directory`; returns `{figure: path}`.

    The map uses at most `map_points` images (a seeded random subset of whole classes),
    and colours `MAP_HIGHLIGHT` of its classes (`plot_embedding_map`; `class_names` name
    them). `threshold`: a match threshold drawn on the similarity histograms.
    """
    os.makedirs(directory, exist_ok=True)
    paths = {"recall_curve": plot_recall_curve(
        recall_at_k, os.path.join(directory, "recall_at_k.png"), title)}
    positive, negative = pair_similarities(embeddings, labels, seed=seed)
    paths["similarity_histograms"] = plot_similarity_histograms(
        positive, negative, os.path.join(directory, "similarity_histograms.png"), title,
        threshold=threshold)
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
        f"{title} ({used}, {len(keep_index)} images)".strip(), class_names=class_names,
        seed=seed)
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
_BORDER, _PAD, _HEADER, _LABEL_WIDTH, _DPI = 4, 2, 22, 128, 100
_FONT_SIZE = 8


def first_positive_rank(query_labels, neighbour_labels) -> np.ndarray:
    """`(Q,)` 1-based rank of each query's first same-class result; K + 1 when none of
    its K results `neighbour_labels (Q, K)` is of its class."""
    matches = np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]
    k = matches.shape[1]
    return np.where(matches.any(axis=1), matches.argmax(axis=1) + 1, k + 1)


def best_same_class_similarity(query_embeddings, query_labels, gallery_embeddings,
                               gallery_labels, own_rows=None) -> np.ndarray:
    """`(Q,)` each query's highest cosine to a gallery item of its class; NaN when the
    gallery holds none (a lone query).

    Scored class by class (`sum_c Q_c N_c d` products, not `Q N d`). `own_rows`: `(Q,)`
    the gallery row that is the query itself (leave-one-out), or -1; it is left out.
    """
    q = np.asarray(query_embeddings, np.float32)
    g = np.asarray(gallery_embeddings, np.float32)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    own = np.full(len(q), -1) if own_rows is None else np.asarray(own_rows)
    best = np.full(len(q), np.nan, np.float32)
    order = np.argsort(gallery_labels, kind="stable")
    sorted_labels = gallery_labels[order]
    query_order = np.argsort(query_labels, kind="stable")
    labels, starts = np.unique(query_labels[query_order], return_index=True)
    for label, rows in zip(labels, np.split(query_order, starts[1:])):
        members = order[np.searchsorted(sorted_labels, label, "left"):
                        np.searchsorted(sorted_labels, label, "right")]
        if len(members) == 0:
            continue
        scores = q[rows] @ g[members].T
        scores[own[rows][:, None] == members[None, :]] = -np.inf
        top = scores.max(axis=1)
        best[rows] = np.where(np.isfinite(top), top, np.nan)
    return best


def ranking_margins(similarities, matches, best_same) -> np.ndarray:
    """`(Q,)` best other-class similarity minus best same-class similarity (higher: the
    query's own class loses by more).

    The best other-class similarity is the first non-match of the top k
    (`similarities`, `matches` `(Q, k)`, best first); a query whose k results are all of
    its class takes the k-th similarity, an upper bound. NaN where `best_same` is NaN.
    """
    similarities, matches = np.asarray(similarities, np.float32), np.asarray(matches, bool)
    first_other = np.argmax(~matches, axis=1)
    other = np.where((~matches).any(axis=1),
                     similarities[np.arange(len(matches)), first_other], similarities[:, -1])
    return other - np.asarray(best_same, np.float32)


def select_grid_rows(query_labels, neighbour_labels, *, num_sampled: int = 6,
                     num_worst: int = 6, seed: int = 0, margins=None):
    """The queries a retrieval grid shows: `(sampled, worst)` row indices.

    When all Q queries fit (`Q <= num_sampled + num_worst`) every one is shown, in
    order, as `sampled`, and `worst` is empty: a row is called worst only when it was
    picked from more. Otherwise `worst`: the `num_worst` queries whose first same-class
    result comes last (highest `first_positive_rank`, none in the top k first), ties
    broken by `margins` (`ranking_margins`, highest first; then the lower query index).
    A query with a NaN margin has no same-class item to find and is never "worst".
    `sampled`: `num_sampled` of the remaining queries, drawn with
    `numpy.random.default_rng(seed)`, in increasing order.
    """
    ranks = first_positive_rank(query_labels, neighbour_labels)
    num_sampled, num_worst = max(0, int(num_sampled)), max(0, int(num_worst))
    if len(ranks) <= num_sampled + num_worst:
        return np.arange(len(ranks)), np.zeros(0, np.int64)
    margins = np.zeros(len(ranks)) if margins is None else np.asarray(margins, np.float64)
    candidates = np.flatnonzero(~np.isnan(margins))
    order = candidates[np.lexsort((candidates, -margins[candidates], -ranks[candidates]))]
    worst = order[:num_worst]
    rest = np.setdiff1d(np.arange(len(ranks)), worst)
    rng = np.random.default_rng(seed)
    sampled = np.sort(rng.choice(rest, size=min(num_sampled, len(rest)), replace=False))
    return sampled, worst


def _text_width(text: str, bold: bool = False, size: float = _FONT_SIZE) -> float:
    """Width in pixels (at the grid's `_DPI`) of `text`'s widest line, as Agg draws it."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties

    renderer = RendererAgg(1, 1, _DPI)
    font = FontProperties(size=size, weight="bold" if bold else "normal")
    return max(renderer.get_text_width_height_descent(line, font, ismath=False)[0]
               for line in str(text).split("\n"))


def _fitted(text: str, width: float) -> str:
    """`text`, each line wider than `width` pixels cut from the left to "..." and its
    longest end that fits (a class path keeps its most specific part)."""
    lines = []
    for line in str(text).split("\n"):
        start = 0
        if _text_width(line) > width:
            start = 1
            while start < len(line) and _text_width("..." + line[start:]) > width:
                start += 1
        lines.append(line if start == 0 else "..." + line[start:])
    return "\n".join(lines)


def _grid_legend(k: int, no_match: bool) -> str:
    return f"top {k} ({GRID_LEGEND}" + (f"; {NO_MATCH_LEGEND})" if no_match else ")")


def grid_size(rows: int, k: int, thumb: int = 64, captions=()) -> tuple:
    """(width, height) in pixels of a retrieval grid of `rows` queries and `k` results.

    At least the query column and k result columns; wider when the header's legend or a
    "no match" caption (`captions`) needs it (k = 1 or 2): texts never leave the canvas
    nor reach left over the query column.
    """
    cell = thumb + 2 * (_BORDER + _PAD)
    results = _LABEL_WIDTH + cell + cell // 2
    captions = [c for c in captions if c]
    needed = [k * cell, _text_width(_grid_legend(k, bool(captions))) + 2 * _PAD]
    needed += [_text_width(c, bold=True) + 4 * _PAD for c in captions]
    return results + int(np.ceil(max(needed))), _HEADER + rows * cell


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


def comparison_digits(a: float, b: float, least: int = 2, most: int = 9) -> int:
    """Decimals that show `a` and `b` as different numbers in the right order: at least
    `least`, and enough that one printed step (`10^-digits`) is no larger than `|a - b|`
    (within 1 %, for float32 inputs), the two differ as printed, and neither reads as
    exactly 1 (or -1) unless it is (0.9987 vs 0.9996: 4, never "1.00 vs 1.00" or "0.999
    vs 1.000"; 0.998 vs 0.99999: "0.99800 vs 0.99999"); up to `most`."""
    gap = abs(float(a) - float(b)) * 1.01

    def reads_as_one(value, digits):
        return abs(float(f"{value:.{digits}f}")) == 1.0 and abs(value) != 1.0

    digits = least
    while digits < most and (10.0 ** -digits > gap
                             or f"{a:.{digits}f}" == f"{b:.{digits}f}"
                             or reads_as_one(a, digits) or reads_as_one(b, digits)):
        digits += 1
    return digits


def no_match_caption(best: float, threshold: float) -> str:
    """`"no match (best 0.41 < threshold 0.52)"`, with `comparison_digits` decimals."""
    digits = comparison_digits(best, threshold)
    return f"no match (best {best:.{digits}f} < threshold {threshold:.{digits}f})"


def plot_retrieval_grid(query_images, neighbour_images, matches, path: str, *,
                        row_labels=None, no_match=None, thumb: int = 64,
                        title: str = "") -> str:
    """Draws one row per query: its thumbnail, then its top-k results, best first.

    Args:
        query_images: Q images, each `(H, W, 3)` RGB (uint8, or float in [0, 255]).
        neighbour_images: Q sequences of k images.
        matches: `(Q, k)` bool, True where the result shares the query's class: framed
            green (`MATCH_COLOUR`), else orange (`MISMATCH_COLOUR`); queries are framed grey.
        row_labels: Q short strings written left of each row (up to three lines, e.g.
            "q7, worst\\ncharacter01\\nno same class in 8"), each line cut to the label
            column's width from the left ("...", `_fitted`).
        no_match: Q captions or None: a row with a caption (`no_match_caption`) is one
            whose best similarity is below the match threshold: its results are drawn
            faded (`faded`; frames kept) and the caption is written across them in
            `NO_MATCH_COLOUR`, centred over the result columns (widened when k
            results are narrower than the caption); the header adds `NO_MATCH_LEGEND`.
        thumb: thumbnail side in pixels.

    Returns:
        `path`; the PNG is `grid_size(Q, k, thumb, no_match)` pixels.
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
    width, height = grid_size(rows, k, thumb, no_match)
    cell = thumb + 2 * (_BORDER + _PAD)
    results = _LABEL_WIDTH + cell + cell // 2  # left edge of the first result column
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
    font = dict(fontsize=_FONT_SIZE, va="center")
    ax.text(_LABEL_WIDTH + cell / 2, _HEADER / 2, "query", ha="center", **font)
    ax.text(results, _HEADER / 2, _grid_legend(k, any(no_match)), ha="left", **font)
    area = width - results  # the result columns and any room the captions needed
    for r, caption in enumerate(no_match):
        if caption:  # across the row's results, centred
            ax.text(results + area / 2, _HEADER + (r + 0.5) * cell,
                    caption, ha="center", color=np.asarray(NO_MATCH_COLOUR) / 255,
                    fontweight="bold",
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=2), **font)
    if title:
        ax.text(4, _HEADER / 2, _fitted(title, _LABEL_WIDTH - 8), ha="left", **font)
    for r, label in enumerate(row_labels or []):
        ax.text(4, _HEADER + (r + 0.5) * cell, _fitted(label, _LABEL_WIDTH - 8), ha="left",
                **font)
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def grid_row_label(query: int, label: str, rank: int, k: int, kind: str = "",
                   lone: bool = False) -> str:
    """The text left of a grid row: `"q<index>[, kind]"`, the query's class, and how it
    fared (`"1st same class: 3"`, `"no same class in 8"`, or `"class not in gallery"`)."""
    outcome = ("class not in gallery" if lone and rank > k
               else f"1st same class: {rank}" if rank <= k else f"no same class in {k}")
    return f"q{query}" + (f", {kind}" if kind else "") + f"\n{label}\n{outcome}"


def retrieval_grid(query_labels, neighbours, gallery_labels, load_query, load_gallery,
                   path: str, *, num_sampled: int = 6, num_worst: int = 6, seed: int = 0,
                   thumb: int = 64, title: str = "", best_similarities=None,
                   threshold=None, similarities=None, best_same=None,
                   class_names=None) -> dict:
    """Selects the rows (`select_grid_rows`), loads their images and draws the grid.

    Args:
        query_labels: `(Q,)` int labels; neighbours: `(Q, k)` gallery rows, best first;
            gallery_labels: `(N,)` in the same label space.
        load_query, load_gallery: `f(rows) -> list of (H, W, 3) images`.
        best_similarities, threshold: `(Q,)` each query's best similarity and the
            calibrated match threshold: rows with `best < threshold` are marked "no
            match" (`plot_retrieval_grid`'s `no_match`). `best_similarities` defaults to
            `similarities[:, 0]`.
        similarities: `(Q, k)` the neighbours' cosines, and best_same: `(Q,)`
            `best_same_class_similarity`: together they rank the worst rows' ties
            (`ranking_margins`) and keep lone queries out of them; without them ties go
            to the lower query index.
        class_names: names of the labels, written on each row (default: the label).

    Returns:
        `{"path", "sampled": [query rows], "worst": [query rows], "worst_ranks": [...],
        "no_match": [shown query rows below the threshold]}`.
    """
    if similarities is not None and best_similarities is None:
        best_similarities = np.asarray(similarities)[:, 0]
    if (best_similarities is None) != (threshold is None) and threshold is not None:
        raise ValueError("Pass best_similarities and threshold together (or similarities; the "
                         "grid marks queries whose best similarity is below the threshold), or "
                         "neither.")
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    neighbour_labels = gallery_labels[np.asarray(neighbours)]
    matches = neighbour_labels == query_labels[:, None]
    margins = (ranking_margins(similarities, matches, best_same)
               if similarities is not None and best_same is not None else None)
    sampled, worst = select_grid_rows(query_labels, neighbour_labels, num_sampled=num_sampled,
                                      num_worst=num_worst, seed=seed, margins=margins)
    ranks = first_positive_rank(query_labels, neighbour_labels)
    k = neighbour_labels.shape[1]
    shown = np.concatenate([sampled, worst]).astype(np.int64)
    lone = np.isnan(margins) if margins is not None else np.zeros(len(ranks), bool)
    kind = {"sampled": "sample" if len(worst) else "", "worst": "worst"}

    def name(label):
        return str(class_names[label]) if class_names is not None else str(label)

    labels = [grid_row_label(int(q), name(query_labels[q]), int(ranks[q]), k,
                             kind["sampled" if i < len(sampled) else "worst"], bool(lone[q]))
              for i, q in enumerate(shown)]
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
    plot_retrieval_grid(queries, nested, matches[shown], path, row_labels=labels,
                        no_match=captions, thumb=thumb, title=title)
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
