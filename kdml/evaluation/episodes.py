"""N-way K-shot episodes: few-shot classification accuracy with a 95% confidence interval.

The one-shot protocol of Lake et al. (Science 2015; "20-way within-alphabet" on
Omniglot) and of the few-shot literature (Vinyals et al. 2016, Snell et al. 2017): an
episode draws `n_way` classes, `k_shot` exemplars (the support set) and
`queries_per_class` other images (queries) of each; a query is classified as the class
whose exemplar is nearest by cosine similarity (for `k_shot > 1`, the class whose mean
of L2-normalised exemplars is nearest: the prototype of Snell et al., eq. 1, with cosine
instead of squared Euclidean distance). The accuracy of an episode is the fraction of
its `n_way * queries_per_class` queries classified right; the reported accuracy is the
mean over episodes and `ci95 = 1.96 * std / sqrt(episodes)` (population std over
episodes), the interval the few-shot papers report.

With `groups` (one group id per image, e.g. the Omniglot alphabet of the character),
every episode draws its classes from a single group, picked uniformly among the groups
that have at least `n_way` classes.

Ties (a query equally similar to two exemplars or prototypes) go to the class drawn
first in the episode (`argmax` takes the first maximum), so results are a pure
function of the inputs and `seed`.
"""

import math

import numpy as np


def few_shot_accuracy(
    embeddings,
    labels,
    *,
    n_way=20,
    k_shot=1,
    queries_per_class=1,
    num_episodes=1000,
    groups=None,
    seed=0,
):
    """Mean N-way K-shot accuracy over random episodes, with its 95% interval.

    Args:
        embeddings: `(N, d)` float array; L2-normalised here (cosine similarity).
        labels: `(N,)` integer class labels.
        n_way: classes per episode (N of N-way), at least 2.
        k_shot: exemplars per class (K of K-shot), at least 1.
        queries_per_class: query images per class per episode, at least 1.
        num_episodes: number of episodes, at least 1.
        groups: optional `(N,)` group id per image (e.g. the Omniglot alphabet); every
            image of a class must share one group. Each episode's classes come from one
            group.
        seed: seed of the episode sampler (`numpy.random.default_rng`); the result is
            a pure function of the inputs and `seed`.

    Returns:
        `{"accuracy": float in [0, 1], "ci95": float, "episodes": int}`.

    Example:

    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> few_shot_accuracy(x, np.array([0, 0, 1, 1]), n_way=2, num_episodes=5)
    {'accuracy': 1.0, 'ci95': 0.0, 'episodes': 5}
    """
    embeddings, labels, groups = _validate(embeddings, labels, groups)
    for name, value, minimum in (("n_way", n_way, 2), ("k_shot", k_shot, 1),
                                 ("queries_per_class", queries_per_class, 1),
                                 ("num_episodes", num_episodes, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(
                f"Expected `{name}` to be an integer >= {minimum}. Received: {name}={value!r}"
            )
    per_class = k_shot + queries_per_class

    classes, class_of_item = np.unique(labels, return_inverse=True)
    members = [np.flatnonzero(class_of_item == c) for c in range(len(classes))]
    small = [int(classes[c]) for c, m in enumerate(members) if len(m) < per_class]
    if small:
        raise ValueError(
            f"Every class needs at least k_shot + queries_per_class = {per_class} images. "
            f"Received: {len(small)} class(es) with fewer, e.g. label {small[0]} with "
            f"{len(members[classes.tolist().index(small[0])])}. Lower --k_shot or "
            "--queries_per_class (`k_shot`, `queries_per_class`), or drop those classes."
        )

    pools = _class_pools(classes, class_of_item, groups, n_way)

    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    normalised = embeddings / np.maximum(norms, 1e-12)
    rng = np.random.default_rng(seed)
    accuracies = np.empty(num_episodes, dtype=np.float64)
    for episode in range(num_episodes):
        pool = pools[rng.integers(len(pools))]
        chosen = rng.choice(pool, size=n_way, replace=False)
        support, queries = [], []
        for c in chosen:
            picked = rng.choice(members[c], size=per_class, replace=False)
            support.append(picked[:k_shot])
            queries.append(picked[k_shot:])
        support = normalised[np.stack(support)]  # (n_way, k_shot, d)
        prototypes = support.mean(axis=1)  # (n_way, d); = the exemplar when k_shot == 1
        query_rows = normalised[np.concatenate(queries)]  # (n_way * q, d)
        scores = query_rows @ prototypes.T
        if k_shot > 1:  # cosine to the mean: divide by its norm (a per-column scale)
            scores = scores / np.maximum(np.linalg.norm(prototypes, axis=1), 1e-12)
        predicted = np.argmax(scores, axis=1)
        truth = np.repeat(np.arange(n_way), queries_per_class)
        accuracies[episode] = np.mean(predicted == truth)

    return {
        "accuracy": float(accuracies.mean()),
        "ci95": float(1.96 * accuracies.std() / math.sqrt(num_episodes)),
        "episodes": int(num_episodes),
    }


def _class_pools(classes, class_of_item, groups, n_way):
    """Class-index pools an episode may draw from: all classes, or one pool per group."""
    num_classes = len(classes)
    if groups is None:
        if num_classes < n_way:
            raise ValueError(
                f"Expected at least n_way = {n_way} classes. Received: {num_classes} "
                "classes. Lower --n_way (`n_way`)."
            )
        return [np.arange(num_classes)]
    group_of_class = np.empty(num_classes, dtype=groups.dtype)
    for c in range(num_classes):
        class_groups = np.unique(groups[class_of_item == c])
        if len(class_groups) != 1:
            raise ValueError(
                "Expected every image of a class to share one group. Received: label "
                f"{classes[c]} in groups {class_groups[:5].tolist()}."
            )
        group_of_class[c] = class_groups[0]
    group_ids, group_of_class_index = np.unique(group_of_class, return_inverse=True)
    classes_per_group = np.bincount(group_of_class_index, minlength=len(group_ids))
    too_small = group_ids[classes_per_group < n_way]
    if len(too_small):
        shown = ", ".join(repr(g.item()) for g in too_small[:5])
        raise ValueError(
            f"Expected every group to have at least n_way = {n_way} classes. Received: "
            f"{len(too_small)} of {len(group_ids)} group(s) with fewer ({shown}; the "
            f"smallest has {int(classes_per_group.min())}). Lower --n_way (`n_way`) or drop "
            "those groups."
        )
    pools = [np.flatnonzero(group_of_class_index == g) for g in range(len(group_ids))]
    return pools


def _validate(embeddings, labels, groups):
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if not np.issubdtype(embeddings.dtype, np.floating) or embeddings.ndim != 2:
        raise ValueError(
            "Expected `embeddings` to be a 2-D floating-point (N, d) array. "
            f"Received: shape={embeddings.shape}, dtype={embeddings.dtype}"
        )
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("Expected `embeddings` to be finite. Received NaN or infinite values.")
    if labels.ndim != 1 or labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            "Expected `labels` to be a 1-D integer array. "
            f"Received: shape={labels.shape}, dtype={labels.dtype}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            "Expected one label per embedding. Received: "
            f"embeddings.shape={embeddings.shape}, labels.shape={labels.shape}"
        )
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(
                "Expected one group id per embedding. Received: "
                f"groups.shape={groups.shape}, labels.shape={labels.shape}"
            )
    return embeddings.astype(np.float64), labels, groups
