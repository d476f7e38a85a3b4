"""`build_index`: embed a labelled image source with a saved embedder into a `GalleryIndex`.

Sources: `folder:<dir>` (every leaf folder is a class, all of them kept), a dataset spec
(`synthetic`, `tfds:<name>`; `split` picks its classes), an `ImageSet`, or a
`tf.data.Dataset` of `(images (b, S, S, 3) RGB in [0, 255], labels (b,))` batches.

Distribution (`strategy`, the names of `kdml.distribute.create_strategy`, as training):

- `mirrored` (or `auto` with several GPUs): each batch is split over the local replicas
  (`.keras` models; other formats run on one device).
- `multi_worker`: the processes listed in `TF_CONFIG` split the files. The file list is
  cut into shards of `shard_size` images; worker w embeds shards w, w + W, ... and writes
  each atomically into `<output>.shards/` (temporary name, then rename), tagged with a key
  of the model fingerprint, the file list and the preprocessing. The chief (worker 0) waits
  for every shard, merges them in file order, writes the index and removes the shards.
  A re-run (after a kill, with any strategy) skips every shard already written under the
  same key. The output's parent folder must be shared by the workers (NFS, GCS fuse).

Embeddings are those of `kdml.embedding.embed_image_set` (centre crop
`crop_fraction`, antialiased resize): what `python -m kdml.evaluate` measures.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import time
from typing import Optional

import numpy as np
from absl import logging

from kdml.distribute import create_strategy, worker_role
from kdml.embedding import (embed_image_set, image_subset, load_image_embedder, load_source,
                            model_fingerprint)
from kdml.evaluation.threshold import calibrate_threshold
from kdml.index.gallery_index import GalleryIndex, check_embeddings

SHARD_PATTERN = "shard-{index:05d}-of-{count:05d}-{key}.npy"


def _item_paths(image_set) -> np.ndarray:
    if image_set.paths is not None:
        return image_set.paths
    return np.asarray([f"{image_set.name}#{i}" for i in range(image_set.num_images)], dtype=str)


class _ReplicatedEmbedder:
    """`embed(images)` of a Keras `LoadedEmbedder`, each batch split over a strategy's replicas."""

    def __init__(self, loaded, strategy):
        import tensorflow as tf

        self.loaded, self.strategy = loaded, strategy
        self.image_size, self.embedding_dim = loaded.image_size, loaded.embedding_dim
        model = loaded.model
        self._step = tf.function(lambda x: model(x, training=False))

    def embed(self, images, batch_size: int = 256) -> np.ndarray:
        import tensorflow as tf

        images = self.loaded.check_images(images).astype(np.float32)
        data = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
        out = []
        for batch in self.strategy.experimental_distribute_dataset(data):
            result = self.strategy.run(self._step, args=(batch,))
            out.append(self.strategy.gather(result, axis=0).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.embedding_dim), np.float32)


def _resolve_strategy(strategy):
    """(strategy for the local embedding, WorkerRole)."""
    import tensorflow as tf

    if strategy is None:
        strategy = "auto"
    if isinstance(strategy, str):
        strategy = create_strategy(strategy)
    role = worker_role(strategy)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        devices = list(strategy.extended.worker_devices)
        local = (tf.distribute.MirroredStrategy(devices) if len(devices) > 1
                 else tf.distribute.get_strategy())
        return local, role
    return strategy, role


def _load_model(model_path, strategy):
    """(LoadedEmbedder, what embeds: itself, or its replicated wrapper under `strategy`)."""
    replicated = strategy.num_replicas_in_sync > 1
    if model_path.endswith(".keras") and replicated:
        with strategy.scope():
            loaded = load_image_embedder(model_path)
        return loaded, _ReplicatedEmbedder(loaded, strategy)
    if replicated:
        logging.info("%s runs on one device (replicated embedding needs a .keras model).",
                     model_path)
    loaded = load_image_embedder(model_path)
    return loaded, loaded


def _shard_key(fingerprint: str, paths, crop_fraction: float) -> str:
    digest = hashlib.sha256(f"{fingerprint}|{crop_fraction}|{len(paths)}\n".encode())
    for path in paths:
        digest.update(str(path).encode() + b"\n")
    return digest.hexdigest()[:12]


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_shard(path: str, rows: int, dim: int) -> Optional[np.ndarray]:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return array if array.shape == (rows, dim) and array.dtype == np.float32 else None


def embed_sharded(embedder, image_set, shard_dir: str, *, key: str, shard_size: int,
                  role, batch_size: int, crop_fraction: float) -> list:
    """Embeds this worker's shards into `shard_dir` (skipping those already written).

    Returns:
        The shard file paths of all workers, in file order.
    """
    count = max(1, -(-image_set.num_images // shard_size))
    os.makedirs(shard_dir, exist_ok=True)
    files = [os.path.join(shard_dir, SHARD_PATTERN.format(index=s, count=count, key=key))
             for s in range(count)]
    for s in range(role.index, count, role.count):
        rows = np.arange(s * shard_size, min((s + 1) * shard_size, image_set.num_images))
        if _read_shard(files[s], len(rows), embedder.embedding_dim) is not None:
            logging.info("Shard %d/%d already written: skipped.", s + 1, count)
            continue
        embeddings = embed_image_set(embedder, image_subset(image_set, rows), batch_size=batch_size,
                                     crop_fraction=crop_fraction).astype(np.float32)
        _save_npy_atomic(files[s], embeddings)
        logging.info("Worker %d wrote shard %d/%d (%d images).", role.index, s + 1, count,
                     len(rows))
    return files


def _wait_for_shards(files, sizes, dim, timeout_s):
    deadline = time.monotonic() + timeout_s
    while True:
        arrays = [_read_shard(f, n, dim) if os.path.exists(f) else None
                  for f, n in zip(files, sizes)]
        missing = [f for f, a in zip(files, arrays) if a is None]
        if not missing:
            return arrays
        if time.monotonic() > deadline:
            raise ValueError(f"{len(missing)} of {len(files)} shards were not written within "
                             f"{timeout_s} s (first: {missing[0]}): a worker failed or is slow; "
                             "re-run the same command on every worker (written shards are kept).")
        time.sleep(0.5)


def build_index(model: str, source, output: Optional[str] = None, *, backend: str = "exact",
                backend_options: Optional[dict] = None, strategy=None, split: str = "all",
                data_dir=None, batch_size: int = 256, crop_fraction: float = 0.875,
                shard_size: int = 10_000, seed: int = 0, wait_timeout_s: float = 3600.0,
                add_to: Optional[GalleryIndex] = None,
                allow_model_mismatch: bool = False, calibrate=None,
                target_precision: Optional[float] = None,
                target_far: Optional[float] = None) -> Optional[GalleryIndex]:
    """Embeds `source` with the embedder at `model` and indexes it.

    Args:
        model: a `.keras` file, a SavedModel directory or a `.tflite` file.
        source: see the module docstring.
        output: where to save the index directory (None: not saved; needed for a
            multi-worker build, whose shards go to `<output>.shards/`).
        backend, backend_options: the search (`GalleryIndex`).
        strategy: a `kdml.distribute` strategy name or a `tf.distribute.Strategy`.
        shard_size: images per shard of a file source.
        wait_timeout_s: how long the chief waits for the other workers' shards.
        add_to: an existing index to append to (incremental add), instead of a new one.
        calibrate: a labelled validation source (a source spec or `ImageSet`): embedded
            with the same model, it sets the index's "no match" threshold
            (`kdml.evaluation.calibrate_threshold` with `target_precision` or
            `target_far`; neither: precision 0.95).

    Returns:
        The `GalleryIndex` (also written to `output` by the chief), or None on a
        non-chief worker.
    """
    import tensorflow as tf

    local, role = _resolve_strategy(strategy)
    loaded, embedder = _load_model(model, local)
    model_entry = model_fingerprint(loaded)
    if add_to is not None:
        add_to.check_model(model_entry, allow_model_mismatch)

    if isinstance(source, tf.data.Dataset):
        if role.count > 1:
            raise ValueError("A tf.data source cannot be split over workers: use a folder: or "
                             "dataset source with --strategy=multi_worker.")
        chunks, labels = [], []
        for images, batch_labels in source:
            chunks.append(embedder.embed(np.asarray(images), batch_size=batch_size))
            labels.extend(np.asarray(batch_labels).tolist())
        if not chunks:
            raise ValueError("The tf.data gallery source yielded no images.")
        embeddings = np.concatenate(chunks)
        paths = np.asarray([f"tf.data#{i}" for i in range(len(labels))], dtype=str)
        names = np.asarray([str(label) for label in labels], dtype=str)
    else:
        image_set = load_source(source, split=split, data_dir=data_dir, seed=seed)
        paths = _item_paths(image_set)
        names = np.asarray(image_set.class_names, dtype=str)[image_set.labels]
        if output is None and role.count > 1:
            raise ValueError("A multi-worker build needs --output_dir (its shards are written "
                             "beside it, on storage every worker shares).")
        if output is None:
            embeddings = embed_image_set(embedder, image_set, batch_size=batch_size,
                                         crop_fraction=crop_fraction)
        else:
            shard_dir = os.path.normpath(output) + ".shards"
            key = _shard_key(model_entry["fingerprint"], paths, crop_fraction)
            files = embed_sharded(embedder, image_set, shard_dir, key=key,
                                  shard_size=int(shard_size), role=role, batch_size=batch_size,
                                  crop_fraction=crop_fraction)
            if not role.is_chief:
                return None
            sizes = [min(shard_size, image_set.num_images - s * shard_size)
                     for s in range(len(files))]
            embeddings = np.concatenate(_wait_for_shards(files, sizes, loaded.embedding_dim,
                                                         wait_timeout_s))
            stale = sorted(set(glob.glob(os.path.join(shard_dir, "shard-*"))) - set(files))
            if stale:
                logging.info("Ignored %d shard(s) of another model or file list.", len(stale))
    source_name = source if isinstance(source, str) else type(source).__name__
    embeddings = check_embeddings(embeddings, paths, source=f"the gallery {source_name}")
    if add_to is not None:
        index = add_to.add(embeddings, names, paths, model=None)
    else:
        index = GalleryIndex(embeddings, names, paths, model=model_entry, backend=backend,
                             backend_options=backend_options, seed=seed)
    if calibrate is not None:
        calibrate_index(index, embedder, calibrate, target_precision=target_precision,
                        target_far=target_far, split=split, data_dir=data_dir, seed=seed,
                        batch_size=batch_size, crop_fraction=crop_fraction)
    if output is not None:
        index.save(output)
        shutil.rmtree(os.path.normpath(output) + ".shards", ignore_errors=True)
    return index


def calibrate_index(index: GalleryIndex, embedder, source, *, target_precision=None,
                    target_far=None, split="all", data_dir=None, seed=0, batch_size=256,
                    crop_fraction=0.875) -> dict:
    """Embeds the labelled `source` with `embedder` and stores the calibrated threshold
    in `index` (`GalleryIndex.set_threshold`); returns `index.threshold`."""
    if target_precision is None and target_far is None:
        target_precision = 0.95
    image_set = load_source(source, split=split, data_dir=data_dir, seed=seed)
    name = source if isinstance(source, str) else image_set.name
    embeddings = check_embeddings(
        embed_image_set(embedder, image_set, batch_size=batch_size, crop_fraction=crop_fraction),
        _item_paths(image_set), source=f"the calibration set {name}")
    calibration = calibrate_threshold(embeddings, image_set.labels,
                                      target_precision=target_precision, target_far=target_far,
                                      source=name)  # warns when it accepts too little
    # what the export needs to re-check the threshold on these images, embedded the same way
    spec = source
    if isinstance(source, str) and source.startswith("folder:"):
        spec = "folder:" + os.path.abspath(os.path.expanduser(source[len("folder:"):]))
    recorded = {"source": spec, "split": split, "seed": int(seed),
                "crop_fraction": float(crop_fraction)} if isinstance(spec, str) else {}
    index.set_threshold({**calibration, **({"calibration": recorded} if recorded else {})},
                        name)
    return index.threshold
