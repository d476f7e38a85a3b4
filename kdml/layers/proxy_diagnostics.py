"""Proxy diagnostics: how spread out the class proxies are, logged every epoch.

The soft-orthogonal proxies paper argues from two properties of the proxy matrix P
(C, d), measured on the row-normalised P^ so the proxies' scale does not matter:

- coherence: the mean and the max of |cos(p_i, p_j)| over distinct proxies i != j
  (0 for orthonormal proxies; at best the Welch bound sqrt((C - d) / (d (C - 1)))
  for the root-mean-square when C > d);
- effective rank (Roy & Vetterli, "The effective rank: a measure of effective
  dimensionality", EUSIPCO 2007, eq. 1-2): with singular values s_1..s_K of P^
  (K = min(C, d)) and q_k = s_k / sum_j s_j, erank = exp(-sum_k q_k log q_k), the
  exponential of the Shannon entropy of the normalised spectrum (0 log 0 = 0). It lies
  in [1, K]: 1 when all proxies are parallel, K when all singular values are equal
  (orthonormal proxies, or a tight frame when C > d).

`ProxyDiagnostics` reads the proxy weight at the end of each epoch (no pass over the
data; the Gram matrix is formed in row blocks, so C = 11,318 SOP proxies need
O(block x C) memory and a few seconds of CPU) and adds the three numbers to the epoch
logs, where the callbacks after it (metrics.json through the retrieval evaluation's
record, TensorBoard) see them.
"""

from __future__ import annotations

from typing import Dict

import keras
import numpy as np

MEAN_ABS_COSINE = "proxy_mean_abs_cosine"
MAX_ABS_COSINE = "proxy_max_abs_cosine"
EFFECTIVE_RANK = "proxy_effective_rank"


def _normalised_rows(proxies) -> np.ndarray:
    p = np.asarray(proxies, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 2:
        raise ValueError(
            "Proxy diagnostics need a (C, d) matrix with C >= 2 proxies. "
            f"Received: shape={p.shape}")
    return p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)


def effective_rank(matrix) -> float:
    """Roy & Vetterli (2007) effective rank of a (C, d) matrix: exp(entropy of s / sum s)."""
    s = np.linalg.svd(np.asarray(matrix, dtype=np.float64), compute_uv=False)
    total = s.sum()
    if total <= 0:
        return 0.0
    q = s[s > 0] / total
    return float(np.exp(-np.sum(q * np.log(q))))


def proxy_diagnostics(proxies, block_size: int = 1024) -> Dict[str, float]:
    """Mean / max |off-diagonal cosine| and effective rank of the proxies (C, d).

    The C x C cosine matrix is formed `block_size` rows at a time, never whole.
    """
    p = _normalised_rows(proxies)
    num = p.shape[0]
    abs_sum, abs_max = 0.0, 0.0
    for start in range(0, num, block_size):
        block = np.abs(p[start:start + block_size] @ p.T)  # (b, C)
        rows = np.arange(block.shape[0])
        block[rows, start + rows] = 0.0  # drop the diagonal (|cos(p, p)| = 1)
        abs_sum += float(block.sum())
        abs_max = max(abs_max, float(block.max()))
    return {
        MEAN_ABS_COSINE: abs_sum / (num * (num - 1)),
        MAX_ABS_COSINE: abs_max,
        EFFECTIVE_RANK: effective_rank(p),
    }


class ProxyDiagnostics(keras.callbacks.Callback):
    """Adds `proxy_diagnostics` of a proxy weight to the logs at every epoch end.

    Args:
        proxies: the (C, d) proxy variable (e.g. `kdml.layers.Proxies(...).proxies`;
            a mirrored variable under a distribution strategy is read as one value).
        block_size: rows of the cosine matrix formed at once.
    """

    def __init__(self, proxies, block_size: int = 1024):
        super().__init__()
        self.proxies = proxies
        self.block_size = int(block_size)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(proxy_diagnostics(keras.ops.convert_to_numpy(self.proxies),
                                          self.block_size))
