"""Reference values of the classification-based losses from pytorch-metric-learning.

    python tools/make_pml_fixtures_classification.py [--out tests/losses/fixtures/pml_classification.npz]

Runs where torch and pytorch-metric-learning are installed (kdml's own environment and
CI have neither), e.g. a virtual environment of its own:

    python3 -m venv /tmp/pml && /tmp/pml/bin/pip install torch pytorch-metric-learning numpy
    /tmp/pml/bin/python tools/make_pml_fixtures_classification.py

The committed fixture was made with pytorch-metric-learning 2.9.0 and torch 2.13.0
(CPU). For each loss that kdml and pytorch-metric-learning (PML) share
(NormalizedSoftmaxLoss, CosFaceLoss, ArcFaceLoss, SubCenterArcFaceLoss, ProxyNCALoss,
SoftTripleLoss), with PML's default settings and one other setting, on several seeded
batches (a class with one image, absent classes, one class only, B = 1), it writes the
embeddings, labels and class weights fed to PML, the loss value, and the gradients
w.r.t. the embeddings and the class weights, all in float64; for SubCenterArcFaceLoss
also `get_outliers` (thresholds 75 and 40 degrees): the outlier indices and the dominant
centres of the classes present.

The class weights are stored in kdml's layout, `kdml.layers.Proxies(C * k).proxies`
(C * k, d): PML's W / fc (d, C * k) transposed (ProxyNCA's proxies are (C, d) in both),
with column c * k + j of PML's matrix = row c * k + j here. The file's `meta` entry (a
JSON string) names the library versions used and, per case, the loss, its arguments
and the batch shape. `tests/losses/test_pml_classification.py` compares kdml with it.
"""

import argparse
import json
import os

import numpy as np

# (B, d, C, labels or None for random with every class): the batch shapes of the fixtures.
BATCHES = {
    "all_classes_b8": (8, 6, 4, [0, 1, 2, 3, 0, 1, 2, 3]),
    "singleton_and_absent_b7": (7, 5, 6, [0, 0, 0, 2, 2, 5, 1]),  # class 1 once, 3 and 4 absent
    "one_class_b4": (4, 8, 3, [2, 2, 2, 2]),
    "single_image_b1": (1, 4, 3, [1]),
    "wide_b16": (16, 32, 10, [9, 9, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6, 7, 8]),
}

# kdml name -> (PML class name, settings: list of (tag, kwargs common to both libraries)).
# The kwargs are passed unchanged to PML and to the kdml class of the same name.
LOSSES = {
    "NormalizedSoftmaxLoss": ("NormalizedSoftmaxLoss", [("default", {}),
                                                         ("t0.5", {"temperature": 0.5})]),
    "CosFaceLoss": ("CosFaceLoss", [("default", {}), ("m0.2_s8", {"margin": 0.2, "scale": 8.0})]),
    # margin 80 deg: targets past 100 deg take the monotonic branch (cos theta - m sin m).
    "ArcFaceLoss": ("ArcFaceLoss", [("default", {}), ("m80_s4", {"margin": 80.0, "scale": 4.0})]),
    "SubCenterArcFaceLoss": ("SubCenterArcFaceLoss", [
        ("default", {}), ("k2_m20_s16", {"sub_centers": 2, "margin": 20.0, "scale": 16.0})]),
    "ProxyNCALoss": ("ProxyNCALoss", [("default", {}), ("scale9", {"softmax_scale": 9.0})]),
    "SoftTripleLoss": ("SoftTripleLoss", [
        ("default", {}), ("k3", {"centers_per_class": 3, "la": 8.0, "gamma": 0.5, "margin": 0.2})]),
}


def _centers(name, kwargs):
    if name == "SubCenterArcFaceLoss":
        return kwargs.get("sub_centers", 3)
    if name == "SoftTripleLoss":
        return kwargs.get("centers_per_class", 10)
    return 1


def _pml_loss(losses, pml_name, num_classes, dim, kwargs):
    cls = getattr(losses, pml_name)
    if pml_name == "SubCenterArcFaceLoss":  # its __init__ takes these as keywords only
        return cls(num_classes=num_classes, embedding_size=dim, **kwargs)
    return cls(num_classes, dim, **kwargs)


def _weight(loss):
    """(parameter, is_transposed): PML's class-weight matrix and whether it is (d, C*k)."""
    if hasattr(loss, "proxies"):
        return loss.proxies, False
    if hasattr(loss, "fc"):
        return loss.fc, True
    return loss.W, True


def make_case(torch, losses, name, pml_name, kwargs, batch, seed):
    size, dim, num_classes, labels = batch
    centers = _centers(name, kwargs)
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(size, dim))
    weights = rng.normal(size=(num_classes * centers, dim))  # kdml layout
    loss = _pml_loss(losses, pml_name, num_classes, dim, kwargs).double()
    param, transposed = _weight(loss)
    param.data = torch.tensor(weights.T.copy() if transposed else weights, dtype=torch.float64)
    x = torch.tensor(embeddings, dtype=torch.float64, requires_grad=True)
    y = torch.tensor(labels, dtype=torch.int64)
    value = loss(x, y)
    value.backward()
    weight_grad = param.grad.numpy()
    extra = {}
    if name == "SubCenterArcFaceLoss":  # the clean-up, at PML's threshold and a tighter one
        for threshold in (75, 40):
            outliers, dominant = loss.get_outliers(x.detach(), y, threshold=threshold)
            extra[f"outliers_{threshold}"] = np.sort(outliers.numpy().astype(np.int64))
            present = np.unique(labels)  # PML leaves the columns of absent classes unset
            extra[f"dominant_{threshold}"] = dominant.numpy().T[present].copy()
    return {
        **extra,
        "embeddings": embeddings, "labels": np.asarray(labels, np.int64), "weights": weights,
        "loss": np.float64(value.item()), "grad_embeddings": x.grad.numpy().copy(),
        "grad_weights": (weight_grad.T if transposed else weight_grad).copy(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(
        here, "..", "tests", "losses", "fixtures", "pml_classification.npz"))
    args = parser.parse_args(argv)

    import pytorch_metric_learning
    import torch
    from pytorch_metric_learning import losses

    arrays, cases = {}, {}
    for seed, (name, (pml_name, settings)) in enumerate(sorted(LOSSES.items())):
        for tag, kwargs in settings:
            for batch_seed, (batch_name, batch) in enumerate(sorted(BATCHES.items())):
                key = f"{name}/{tag}/{batch_name}"
                case = make_case(torch, losses, name, pml_name, kwargs, batch,
                                 seed=[seed, batch_seed])
                for field, value in case.items():
                    arrays[f"{key}/{field}"] = value
                cases[key] = {"loss": name, "pml_class": f"pytorch_metric_learning.losses.{pml_name}",
                              "kwargs": kwargs, "batch": batch_name,
                              "batch_size": batch[0], "embedding_dim": batch[1],
                              "num_classes": batch[2], "centers_per_class": _centers(name, kwargs)}
    meta = {
        "library": "pytorch-metric-learning", "version": pytorch_metric_learning.__version__,
        "torch": torch.__version__, "numpy": np.__version__, "dtype": "float64",
        "generated_by": "tools/make_pml_fixtures_classification.py",
        "weights_layout": "kdml Proxies (C * k, d): PML's W / fc (d, C * k) transposed",
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, meta=np.array(json.dumps(meta, indent=1, sort_keys=True)),
                        **arrays)
    print(f"{len(cases)} cases, pytorch-metric-learning {pytorch_metric_learning.__version__}, "
          f"torch {torch.__version__} -> {os.path.normpath(args.out)}")


if __name__ == "__main__":
    main()
