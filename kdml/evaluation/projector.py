"""Embeddings for TensorBoard's embedding projector (`kdml.evaluate --projector`).

The projector plugin (`tensorboard.plugins.projector`) shows embeddings in 3-D (PCA,
t-SNE, UMAP) with each point's label and thumbnail. It reads, from a log directory:

- `projector_config.pbtxt`: a `ProjectorConfig` proto (text format) naming, per
  embedding, its tensor file (`tensor_path`, resolved against the config's folder),
  its metadata file and its sprite (`sprite.image_path`, `sprite.single_image_dim`);
- `embeddings.tsv`: the `(N, d)` tensor, one row per line, tab-separated values
  (written with 9 significant digits, so every float32 reads back exactly);
- `metadata.tsv`: a header line and one line per point; with more than one column
  the plugin takes the first line for the header (columns `class`, `class_id`);
- `sprite.png`: the thumbnails in row-major order on a square grid of
  ceil(sqrt(N)) x ceil(sqrt(N)) cells of `single_image_dim` pixels (the plugin cuts
  the sprite by that size; TensorBoard's limit is an 8192 px sprite, so the cell
  shrinks for large N).

    tensorboard --logdir <run>/eval_test_projector   # then the "Projector" tab
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

from kdml.data.image_set import ImageSet
from kdml.data.pipeline import eval_dataset

MAX_SPRITE_SIDE = 8192  # pixels: the largest sprite TensorBoard's projector loads
TENSOR_FILE = "embeddings.tsv"
METADATA_FILE = "metadata.tsv"
SPRITE_FILE = "sprite.png"


def sprite_cell_size(num_points: int, thumbnail: int = 64) -> int:
    """The thumbnail side in pixels: `thumbnail`, shrunk so the square grid of
    ceil(sqrt(N)) cells fits `MAX_SPRITE_SIDE`."""
    grid = max(1, math.ceil(math.sqrt(num_points)))
    return max(1, min(int(thumbnail), MAX_SPRITE_SIDE // grid))


def sprite_image(thumbnails: np.ndarray) -> np.ndarray:
    """`(N, t, t, 3)` uint8 thumbnails -> `(g t, g t, 3)` uint8 sprite, g = ceil(sqrt(N)).

    Thumbnail i sits in cell (i // g, i % g); the cells after the last are white.

    >>> sprite = sprite_image(np.zeros((3, 2, 2, 3), np.uint8))  # 3 black 2 px cells
    >>> sprite.shape, int(sprite[:2, :4].max()), int(sprite[2:, 2:].min())
    ((4, 4, 3), 0, 255)
    """
    thumbnails = np.asarray(thumbnails)
    n, t = thumbnails.shape[0], thumbnails.shape[1]
    if thumbnails.ndim != 4 or thumbnails.shape[2] != t or thumbnails.shape[3] != 3:
        raise ValueError(f"Thumbnails must be (N, t, t, 3). Received: {thumbnails.shape}")
    grid = max(1, math.ceil(math.sqrt(n)))
    cells = np.full((grid * grid, t, t, 3), 255, dtype=np.uint8)
    cells[:n] = thumbnails
    return cells.reshape(grid, grid, t, t, 3).transpose(0, 2, 1, 3, 4).reshape(grid * t, grid * t, 3)


def _tsv_field(text: str) -> str:
    """A metadata value on one TSV field (tabs and line breaks would split it)."""
    return " ".join(str(text).split()) or "-"


def write_projector(directory: str, embeddings: np.ndarray, labels: np.ndarray,
                    class_names: Sequence[str], thumbnails: Optional[np.ndarray] = None,
                    *, tensor_name: str = "embeddings") -> dict:
    """Writes the projector's files for `embeddings` to `directory`.

    Args:
        directory: the log directory (created when missing) to point TensorBoard at.
        embeddings: `(N, d)` float embeddings.
        labels: `(N,)` class ids, indices into `class_names`.
        class_names: the names of the classes.
        thumbnails: None, or `(N, t, t, 3)` uint8 images, one per point, for the sprite.
        tensor_name: the embedding's name in the projector.

    Returns:
        {"directory", "config", "tensor", "metadata", "sprite" (or None), "points", "dim",
        "thumbnail"} with the files' paths.
    """
    from google.protobuf import text_format
    from PIL import Image
    from tensorboard.plugins import projector

    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or len(labels) != len(embeddings) or not len(labels):
        raise ValueError(f"The projector needs (N, d) embeddings and N labels, N > 0. Received: "
                         f"embeddings {embeddings.shape}, labels {labels.shape}")
    os.makedirs(directory, exist_ok=True)
    np.savetxt(os.path.join(directory, TENSOR_FILE), embeddings, fmt="%.9g", delimiter="\t")
    with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as f:
        f.write("class\tclass_id\n")
        for label in labels:
            f.write(f"{_tsv_field(class_names[int(label)])}\t{int(label)}\n")

    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = tensor_name
    embedding.tensor_path = TENSOR_FILE
    embedding.tensor_shape.extend(embeddings.shape)
    embedding.metadata_path = METADATA_FILE
    sprite_path, cell = None, None
    if thumbnails is not None:
        thumbnails = np.asarray(thumbnails)
        if len(thumbnails) != len(labels):
            raise ValueError(f"{len(thumbnails)} thumbnails for {len(labels)} points.")
        cell = int(thumbnails.shape[1])
        sprite_path = os.path.join(directory, SPRITE_FILE)
        Image.fromarray(sprite_image(thumbnails)).save(sprite_path)
        embedding.sprite.image_path = SPRITE_FILE
        embedding.sprite.single_image_dim.extend([cell, cell])
    projector.visualize_embeddings(directory, config)
    config_path = os.path.join(directory, "projector_config.pbtxt")
    with open(config_path) as f:  # what the plugin parses
        text_format.Parse(f.read(), projector.ProjectorConfig())
    return {"directory": directory, "config": config_path,
            "tensor": os.path.join(directory, TENSOR_FILE),
            "metadata": os.path.join(directory, METADATA_FILE), "sprite": sprite_path,
            "points": int(len(labels)), "dim": int(embeddings.shape[1]), "thumbnail": cell}


def write_image_set_projector(directory: str, embeddings: np.ndarray, image_set, *,
                              max_points: int = 10_000, thumbnail: int = 64,
                              seed: int = 0) -> dict:
    """`write_projector` for the embeddings of an `ImageSet` (in its order), with thumbnails.

    At most `max_points` points: a seeded sample of the images, kept in their order
    when the set is larger. The thumbnails are each image's centred square (the shorter
    side) resized to `sprite_cell_size(N, thumbnail)` pixels.

    Returns:
        `write_projector`'s dict plus "rows": the sampled rows of the image set.
    """
    embeddings = np.asarray(embeddings)
    n = image_set.num_images
    if len(embeddings) != n:
        raise ValueError(f"{len(embeddings)} embeddings for {n} images.")
    if max_points < 1:
        raise ValueError(f"--projector_points must be positive. Received: {max_points}")
    rows = np.arange(n)
    if n > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    subset = ImageSet(labels=image_set.labels[rows], class_names=image_set.class_names,
                      paths=None if image_set.paths is None else image_set.paths[rows],
                      pixels=None if image_set.pixels is None else image_set.pixels[rows],
                      name=image_set.name)
    cell = sprite_cell_size(len(rows), thumbnail)
    thumbnails = np.concatenate([
        np.round(images.numpy()).astype(np.uint8)
        for images, _ in eval_dataset(subset, image_size=cell, crop_fraction=1.0)])
    result = write_projector(directory, embeddings[rows], subset.labels, subset.class_names,
                             thumbnails)
    result["rows"] = rows
    return result
