"""Reference values of pytorch-metric-learning for kdml's pair and triplet losses.

Runs where torch and pytorch-metric-learning are installed (not in kdml's environment):

    python tools/make_pml_fixtures_pairs.py [--output tests/losses/fixtures/pml_pairs.npz]

For every (loss setting, batch) case it writes the batch (labels, float64 embeddings,
not normalised), PML's loss and its gradient with respect to the embeddings, computed
in float64, to one `.npz` file; its `meta` entry (JSON) names the library versions and,
per case, the kdml class and arguments that must reproduce it and the PML objects used.
Then, for a few settings wrapped in PML's `CrossBatchMemory`, a sequence of batches that
wraps the memory around, with the loss and gradient of each step (`xbm_cases`).
`tests/losses/test_pml_agreement.py` compares kdml with these values (no torch needed).
"""

import argparse
import json

import numpy as np

# The batches: (name, labels, embedding size). Embeddings are standard normal rows.
BATCHES = [
    ("balanced", [0, 0, 1, 1, 2, 2, 3, 3], 5),
    ("singleton_class", [0, 0, 0, 1, 1, 2, 2, 5], 4),  # class 5 has one image
    ("no_valid_triplet", [0, 1, 2, 3, 4, 5], 3),  # all distinct: no positive pair
    ("one_class", [7, 7, 7, 7, 7], 3),  # no negative pair
    ("uneven", [3, 1, 3, 1, 3, 1, 7, 7, 7, 7, 2, 2], 16),
    ("two_views", [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5], 8),
]

# (kdml class, kdml kwargs, PML loss, PML loss kwargs, PML miner, miner kwargs, distance).
SETTINGS = [
    ("TripletMarginLoss", {}, "TripletMarginLoss", {}, None, {}, "lp1"),
    ("TripletMarginLoss", {"margin": 0.5}, "TripletMarginLoss", {"margin": 0.5}, None, {}, "lp1"),
    ("TripletMarginLoss", {"margin": 0.5, "distance": "squared_euclidean"},
     "TripletMarginLoss", {"margin": 0.5}, None, {}, "lp2"),
    ("TripletMarginLoss", {"margin": 0.3, "distance": "cosine"},
     "TripletMarginLoss", {"margin": 0.3}, None, {}, "cos"),
    ("TripletMarginLoss", {"margin": 0.5, "mining": "hard"},
     "TripletMarginLoss", {"margin": 0.5}, "BatchHardMiner", {}, "lp1"),
    ("TripletMarginLoss", {"margin": 0.3, "mining": "hard", "distance": "cosine"},
     "TripletMarginLoss", {"margin": 0.3}, "BatchHardMiner", {}, "cos"),
    ("TripletMarginLoss", {"margin": 0.5, "mining": "semihard"},
     "TripletMarginLoss", {"margin": 0.5}, "TripletMarginMiner",
     {"margin": 0.5, "type_of_triplets": "semihard"}, "lp1"),
    ("TripletMarginLoss", {"margin": 0.5, "mining": "semihard", "distance": "squared_euclidean"},
     "TripletMarginLoss", {"margin": 0.5}, "TripletMarginMiner",
     {"margin": 0.5, "type_of_triplets": "semihard"}, "lp2"),
    ("TripletMarginLoss", {"margin": 0.5, "mining": "easy_positive"},
     "TripletMarginLoss", {"margin": 0.5}, "BatchEasyHardMiner",
     {"pos_strategy": "easy", "neg_strategy": "hard"}, "lp1"),
    ("ContrastiveLoss", {}, "ContrastiveLoss", {}, None, {}, "lp1"),
    ("ContrastiveLoss", {"pos_margin": 0.3, "neg_margin": 1.2},
     "ContrastiveLoss", {"pos_margin": 0.3, "neg_margin": 1.2}, None, {}, "lp1"),
    ("ContrastiveLoss", {"pos_margin": 0.2, "neg_margin": 1.5, "distance": "squared_euclidean"},
     "ContrastiveLoss", {"pos_margin": 0.2, "neg_margin": 1.5}, None, {}, "lp2"),
    ("ContrastiveLoss", {"pos_margin": 0.8, "neg_margin": 0.1, "distance": "cosine"},
     "ContrastiveLoss", {"pos_margin": 0.8, "neg_margin": 0.1}, None, {}, "cos"),
    ("CircleLoss", {}, "CircleLoss", {}, None, {}, "cos"),
    ("CircleLoss", {"m": 0.25, "gamma": 32.0}, "CircleLoss", {"m": 0.25, "gamma": 32.0},
     None, {}, "cos"),
    ("SupConLoss", {}, "SupConLoss", {}, None, {}, "cos"),
    ("SupConLoss", {"temperature": 0.5}, "SupConLoss", {"temperature": 0.5}, None, {}, "cos"),
    ("NTXentLoss", {}, "NTXentLoss", {}, None, {}, "cos"),
    ("NTXentLoss", {"temperature": 0.5}, "NTXentLoss", {"temperature": 0.5}, None, {}, "cos"),
]


def _distance(kind):
    from pytorch_metric_learning import distances

    if kind == "cos":
        return distances.CosineSimilarity()
    return distances.LpDistance(normalize_embeddings=True, p=2, power=1 if kind == "lp1" else 2)


def _pml_loss_and_grad(setting, labels, embeddings):
    import torch
    from pytorch_metric_learning import losses, miners

    _, _, loss_name, loss_kwargs, miner_name, miner_kwargs, distance = setting
    loss_fn = getattr(losses, loss_name)(distance=_distance(distance), **loss_kwargs)
    emb = torch.tensor(embeddings, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor(labels, dtype=torch.int64)
    indices = None
    if miner_name is not None:
        miner = getattr(miners, miner_name)(distance=_distance(distance), **miner_kwargs)
        indices = miner(emb, lab)
    loss = loss_fn(emb, lab, indices)
    if loss.requires_grad:
        loss.backward()
        grad = emb.grad.numpy().copy() if emb.grad is not None else np.zeros_like(embeddings)
    else:  # PML's zero loss for a batch without any pair: no graph, zero gradient
        grad = np.zeros_like(embeddings)
    return float(loss.detach()), grad


# Cross-batch memory: (setting index in SETTINGS) wrapped in PML's CrossBatchMemory with
# memory_size XBM_MEMORY, fed XBM_STEPS batches of XBM_BATCH rows (it wraps around).
XBM_SETTINGS = [1, 9, 13, 15, 17]
XBM_MEMORY, XBM_BATCH, XBM_STEPS, XBM_DIM = 10, 4, 4, 5


def _pml_xbm_sequence(setting, batches):
    """(loss, grad) of each batch through one PML CrossBatchMemory, in order."""
    import torch
    from pytorch_metric_learning import losses

    _, _, loss_name, loss_kwargs, _, _, distance = setting
    inner = getattr(losses, loss_name)(distance=_distance(distance), **loss_kwargs)
    xbm = losses.CrossBatchMemory(inner, embedding_size=XBM_DIM, memory_size=XBM_MEMORY)
    results = []
    for labels, embeddings in batches:
        emb = torch.tensor(embeddings, dtype=torch.float64, requires_grad=True)
        loss = xbm(emb, torch.tensor(labels, dtype=torch.int64))
        if loss.requires_grad:
            loss.backward()
            grad = emb.grad.numpy().copy() if emb.grad is not None else np.zeros_like(embeddings)
        else:
            grad = np.zeros_like(embeddings)
        results.append((float(loss.detach()), grad))
    return results


def _describe(setting):
    _, _, loss_name, loss_kwargs, miner_name, miner_kwargs, distance = setting
    dist = {"cos": "CosineSimilarity()", "lp1": "LpDistance(power=1)",
            "lp2": "LpDistance(power=2)"}[distance]
    text = f"losses.{loss_name}(distance={dist}, **{loss_kwargs})"
    if miner_name:
        text += f" with miners.{miner_name}(distance={dist}, **{miner_kwargs})"
    return text


def main():
    import pytorch_metric_learning
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="tests/losses/fixtures/pml_pairs.npz")
    args = parser.parse_args()
    torch.manual_seed(0)
    arrays, cases = {}, []
    rng = np.random.default_rng(2026)
    batches = [(name, np.array(labels), rng.normal(size=(len(labels), dim)))
               for name, labels, dim in BATCHES]
    for setting in SETTINGS:
        for batch_name, labels, embeddings in batches:
            key = f"case{len(cases):03d}"
            loss, grad = _pml_loss_and_grad(setting, labels, embeddings)
            arrays[f"{key}_labels"] = labels.astype(np.int64)
            arrays[f"{key}_embeddings"] = embeddings
            arrays[f"{key}_loss"] = np.array(loss)
            arrays[f"{key}_grad"] = grad
            cases.append({"key": key, "batch": batch_name, "kdml_class": setting[0],
                          "kdml_kwargs": setting[1], "pml": _describe(setting)})
    xbm_cases = []
    for index in XBM_SETTINGS:
        setting = SETTINGS[index]
        batches = [(rng.integers(0, 3, size=XBM_BATCH), rng.normal(size=(XBM_BATCH, XBM_DIM)))
                   for _ in range(XBM_STEPS)]
        key = f"xbm{len(xbm_cases):02d}"
        for step, ((labels, embeddings), (loss, grad)) in enumerate(
                zip(batches, _pml_xbm_sequence(setting, batches))):
            arrays[f"{key}_step{step}_labels"] = labels.astype(np.int64)
            arrays[f"{key}_step{step}_embeddings"] = embeddings
            arrays[f"{key}_step{step}_loss"] = np.array(loss)
            arrays[f"{key}_step{step}_grad"] = grad
        xbm_cases.append({"key": key, "kdml_class": setting[0], "kdml_kwargs": setting[1],
                          "memory_size": XBM_MEMORY, "embedding_size": XBM_DIM,
                          "steps": XBM_STEPS,
                          "pml": f"losses.CrossBatchMemory({_describe(setting)}, "
                                 f"embedding_size={XBM_DIM}, memory_size={XBM_MEMORY})"})
    meta = {
        "library": f"pytorch-metric-learning {pytorch_metric_learning.__version__}",
        "torch": torch.__version__,
        "dtype": "float64",
        "tool": "tools/make_pml_fixtures_pairs.py",
        "cases": cases,
        "xbm_cases": xbm_cases,
    }
    np.savez_compressed(args.output, meta=np.array(json.dumps(meta)), **arrays)
    print(f"{len(cases)} cases, {len(xbm_cases)} cross-batch memory sequences, "
          f"{meta['library']}, torch {meta['torch']} -> {args.output}")


if __name__ == "__main__":
    main()
