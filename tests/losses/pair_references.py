"""NumPy loops of the pair and triplet losses, written from the papers' formulas (float64).

One function per loss, each a plain loop over anchors / pairs / triplets, with the
reduction of pytorch-metric-learning's default reducer spelt out (docs/design.md 3.5):
the mean of the terms > 0 (AvgNonZeroReducer) or of all terms (MeanReducer).
"""

import math

import numpy as np


def _unit(emb):
    emb = np.asarray(emb, np.float64)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def _pairs(labels, a):
    """(positives, negatives) of anchor a: indices of the same label (not a) / another."""
    n = len(labels)
    return ([j for j in range(n) if j != a and labels[j] == labels[a]],
            [j for j in range(n) if labels[j] != labels[a]])


def _mean_nonzero(terms):
    kept = [t for t in terms if t > 0]
    return sum(kept) / len(kept) if kept else 0.0


def _metric(e, distance):
    """D(i, j): a distance, larger = farther (cosine: -cos, as in the triplet loss)."""
    def d(i, j):
        if distance == "cosine":
            return -float(e[i] @ e[j])
        squared = float(np.sum((e[i] - e[j]) ** 2))
        return squared if distance == "squared_euclidean" else math.sqrt(squared)
    return d


def triplet(labels, emb, margin=0.05, mining="all", distance="euclidean",
            normalize_embeddings=True):
    """FaceNet Eq. 1 per triplet; mining as TripletMarginLoss' docstring; mean of terms > 0."""
    e = _unit(emb) if normalize_embeddings else np.asarray(emb, np.float64)
    d = _metric(e, distance)
    terms = []
    for a in range(len(labels)):
        pos, neg = _pairs(labels, a)
        if not pos or not neg:
            continue
        if mining == "all":
            chosen = [(p, n) for p in pos for n in neg]
        elif mining == "semihard":
            chosen = [(p, n) for p in pos for n in neg if d(a, n) > d(a, p)]
        elif mining == "hard":
            chosen = [(max(pos, key=lambda p: d(a, p)), min(neg, key=lambda n: d(a, n)))]
        elif mining == "easy_positive":
            chosen = [(min(pos, key=lambda p: d(a, p)), min(neg, key=lambda n: d(a, n)))]
        else:
            raise ValueError(mining)
        terms += [max(0.0, d(a, p) - d(a, n) + margin) for p, n in chosen]
    return _mean_nonzero(terms)


def contrastive(labels, emb, pos_margin=0.0, neg_margin=1.0, distance="euclidean",
                normalize_embeddings=True):
    """Hadsell et al. Eq. 4 with a positive margin, over ordered pairs; each part's mean
    of the terms > 0."""
    e = _unit(emb) if normalize_embeddings else np.asarray(emb, np.float64)
    pos_terms, neg_terms = [], []
    for i in range(len(labels)):
        pos, neg = _pairs(labels, i)
        for j in pos + neg:
            if distance == "cosine":
                s = float(e[i] @ e[j])
                term = pos_margin - s if j in pos else s - neg_margin
            else:
                dist = _metric(e, distance)(i, j)
                term = dist - pos_margin if j in pos else neg_margin - dist
            (pos_terms if j in pos else neg_terms).append(max(0.0, term))
    return _mean_nonzero(pos_terms) + _mean_nonzero(neg_terms)


def _logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def circle(labels, emb, m=0.4, gamma=80.0, normalize_embeddings=True, weights_at=None):
    """Sun et al. Eq. 6 with the weights of Eq. 5 and margins of Eq. 8, per anchor; mean of > 0.

    The weights a_p, a_n are constants of the gradient (the paper's Sec. 3.1): `weights_at`
    computes them from other embeddings (for finite differences with the weights held).
    """
    e = _unit(emb) if normalize_embeddings else np.asarray(emb, np.float64)
    w = e if weights_at is None else (
        _unit(weights_at) if normalize_embeddings else np.asarray(weights_at, np.float64))
    terms = []
    for i in range(len(labels)):
        pos, neg = _pairs(labels, i)
        if not pos or not neg:
            continue
        logit_p = [-gamma * max(0.0, 1 + m - float(w[i] @ w[p])) * (float(e[i] @ e[p]) - (1 - m))
                   for p in pos]
        logit_n = [gamma * max(0.0, float(w[i] @ w[n]) + m) * (float(e[i] @ e[n]) - m)
                   for n in neg]
        x = _logsumexp(logit_p) + _logsumexp(logit_n)
        terms.append(math.log1p(math.exp(-abs(x))) + max(x, 0.0))  # softplus
    return _mean_nonzero(terms)


def supcon(labels, emb, temperature=0.1, normalize_embeddings=True):
    """Khosla et al. Eq. 2 (L_out) per anchor with a positive; mean of > 0."""
    e = _unit(emb) if normalize_embeddings else np.asarray(emb, np.float64)
    n = len(labels)
    if not any(_pairs(labels, i)[0] for i in range(n)) or not any(
            _pairs(labels, i)[1] for i in range(n)):
        return 0.0
    terms = []
    for i in range(n):
        pos, neg = _pairs(labels, i)
        if not pos:
            continue
        log_denominator = _logsumexp([float(e[i] @ e[a]) / temperature for a in pos + neg])
        terms.append(-sum(float(e[i] @ e[p]) / temperature - log_denominator
                          for p in pos) / len(pos))
    return _mean_nonzero(terms)


def ntxent(labels, emb, temperature=0.07, normalize_embeddings=True):
    """SimCLR Eq. 1 per ordered positive pair, against the anchor's negatives; plain mean."""
    e = _unit(emb) if normalize_embeddings else np.asarray(emb, np.float64)
    n = len(labels)
    if not any(_pairs(labels, i)[0] for i in range(n)) or not any(
            _pairs(labels, i)[1] for i in range(n)):
        return 0.0
    terms = []
    for i in range(n):
        pos, neg = _pairs(labels, i)
        for p in pos:
            positive = float(e[i] @ e[p]) / temperature
            logits = [positive] + [float(e[i] @ e[k]) / temperature for k in neg]
            terms.append(_logsumexp(logits) - positive)
    return sum(terms) / len(terms)


REFERENCES = {"TripletMarginLoss": triplet, "ContrastiveLoss": contrastive, "CircleLoss": circle,
              "SupConLoss": supcon, "NTXentLoss": ntxent}
