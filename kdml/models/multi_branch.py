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
    `aux_heads[i - 1]` applied to the same backbone features. e_b is branch b's
    embedding and x_b what its base loss consumes: `proxies[b](e_b)` when `proxies`
    is given (one layer per branch), else e_b itself. The packing is what
    `kdml.losses.MultiBranchLoss` unpacks.

    Args:
        embedder: a model from `kdml.models.build_embedder`.
        aux_heads: head layers mapping the backbone features to (B, d_i) embeddings.
        proxies: None, or one layer per branch (main first) mapping e_b to x_b.
        name: model name.

    Returns:
        A functional `keras.Model` `(B, S, S, 3)` -> `(B, sum dims of x + sum d_b)` float32.
    """
    try:
        normalize = embedder.get_layer("pixel_normalization")
        backbone = embedder.get_layer("backbone")
        head = embedder.get_layer("head")
    except ValueError as error:
        raise ValueError(
            "multi_branch_model needs an embedder from kdml.models.build_embedder (layers "
            f"'pixel_normalization', 'backbone', 'head'). Received: {embedder.name!r}") from error
    if proxies is not None and len(proxies) != len(aux_heads) + 1:
        raise ValueError(
            f"`proxies` needs one layer per branch ({len(aux_heads) + 1}, main first). "
            f"Received {len(proxies)}.")
    images = keras.Input(embedder.input_shape[1:], name="images")
    features = backbone(normalize(images))
    embeddings = [head(features)] + [aux(features) for aux in aux_heads]
    inputs = embeddings if proxies is None else [p(e) for p, e in zip(proxies, embeddings)]
    # float32 concatenation: the mixed policy must not round similarities to 16 bits.
    packed = keras.layers.Concatenate(axis=-1, dtype="float32", name="packed")(inputs + embeddings)
    return keras.Model(images, packed, name=name)
