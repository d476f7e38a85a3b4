"""`multi_branch_model`: the embedder plus auxiliary heads on its backbone's features.

Multi-size CRT (docs/design.md 3.3) trains several heads of different size on one shared
backbone; only the embedder's own head (the main branch) is kept for retrieval and
export, so `embedder.keras` needs nothing special.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras


def multi_branch_model(embedder: keras.Model, aux_heads: Sequence[keras.layers.Layer],
                       proxies: Optional[Sequence[keras.layers.Layer]] = None,
                       name: str = "multi_branch") -> keras.Model:
    """Training model: images -> packed [x_0 | ... | x_n | e_0 | ... | e_n] float32.

    Branch 0 is the embedder itself (its layers "pixel_normalization", "backbone",
    "head" are reused, so weights and variable paths are shared); branch i >= 1 is
    `aux_heads[i - 1]` applied to the same backbone features. Given the head model of
    `kdml.models.split_embedder` instead (a frozen-backbone run), the model takes the
    backbone's features `(B, ...)` as input and every branch reads them. e_b is branch b's
    embedding and x_b what its base loss consumes: `proxies[b](e_b)` when `proxies`
    is given (one layer per branch), else e_b itself. The packing is what
    `kdml.losses.MultiBranchLoss` unpacks.

    Args:
        embedder: a model from `kdml.models.build_embedder`, or the head model of
            `kdml.models.split_embedder`.
        aux_heads: head layers mapping the backbone features to (B, d_i) embeddings.
        proxies: None, or one layer per branch (main first) mapping e_b to x_b.
        name: model name.

    Returns:
        A functional `keras.Model` `(B, S, S, 3)` -> `(B, sum dims of x + sum d_b)` float32.
    """
    names = {layer.name for layer in embedder.layers}
    # A frozen-backbone run trains the head model of `split_embedder` on cached features.
    on_features = "head" in names and "backbone" not in names
    if not on_features and not {"pixel_normalization", "backbone", "head"} <= names:
        raise ValueError(
            "multi_branch_model needs an embedder from kdml.models.build_embedder (layers "
            "'pixel_normalization', 'backbone', 'head') or its head model "
            f"(kdml.models.split_embedder). Received: {embedder.name!r}")
    head = embedder.get_layer("head")
    if proxies is not None and len(proxies) != len(aux_heads) + 1:
        raise ValueError(
            f"`proxies` needs one layer per branch ({len(aux_heads) + 1}, main first). "
            f"Received {len(proxies)}.")
    images = keras.Input(embedder.input_shape[1:], name="features" if on_features else "images")
    features = images if on_features else embedder.get_layer("backbone")(
        embedder.get_layer("pixel_normalization")(images))
    embeddings = [head(features)] + [aux(features) for aux in aux_heads]
    inputs = embeddings if proxies is None else [p(e) for p, e in zip(proxies, embeddings)]
    # float32 concatenation: the mixed policy must not round similarities to 16 bits.
    packed = keras.layers.Concatenate(axis=-1, dtype="float32", name="packed")(inputs + embeddings)
    return keras.Model(images, packed, name=name)
