"""Frozen-backbone training (`--freeze_backbone`): the backbone's features once, then the head.

The cheapest recipe of a retrieval project: keep a (pretrained) backbone as it is,
compute its features of every image once, and train only the head and the method's
own weights (proxies, class weights, a PDDM unit, CRT's auxiliary heads) on them. An
epoch then costs the head's forward and backward pass, not the backbone's.

- Features: the embedder is split (`kdml.models.split_embedder`) into its feature
  extractor (pixel normalisation + backbone, run in inference mode: BatchNorm uses its
  moving statistics) and its head model. The training images are cropped as an
  unaugmented training batch crops them (`kdml.data.unaugmented_dataset`), the test
  images as the evaluation does (`kdml.data.eval_dataset`), so the head sees exactly
  what it would see on the fly with `--augmentation=none` and a non-trainable backbone.
- Cache: `<output_dir>/features/<split>-<key>.npy` (float32 `(N, ...)`, read back as a
  memory map) and a `.json` beside it. The key hashes the backbone's fingerprint
  (`backbone_fingerprint`: its layers' configurations and its weights, with the pixel
  normalisation) and the image list (`image_list_key`: the paths with their sizes and
  modification times, or the pixels, the labels, the image size and the crop). A
  second run, or a resumed one, with the same backbone and images reuses the file;
  other weights or another image list compute new features. `prepare_features(...,
  cache_dir=None)` keeps them in memory only (Python API).
- Size: N x the backbone's feature size x 4 bytes, e.g. conv4 at 28 px 1 KiB per
  image, ResNet-50 at 224 px 392 KiB (7 x 7 x 2048), DeiT-S 297 KiB (198 x 384 tokens).
- Training: the methods' objectives are built on the head model (their inputs are
  features), fed by `kdml.data.feature_train_dataset` (the same P x K batches).
  Checkpoints hold the training model's weights only (head, method weights, optimizer)
  and the backbone's fingerprint, checked on `--resume`; `embedder.keras` is the whole
  image -> embedding embedder (the untouched backbone and the trained head).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from kdml.config import TrainConfig
from kdml.data.image_set import ImageSet
from kdml.data.pipeline import eval_dataset, unaugmented_dataset
from kdml.training.checkpointing import write_json_atomic

FEATURES_DIR = "features"
_HASH_CHUNK = 1 << 24  # bytes of a weight hashed per update (16 MiB)


def check_frozen_options(config: TrainConfig) -> None:
    """Raises a ValueError naming the fix for settings that contradict `--freeze_backbone`.

    Call it on the config as the flags gave it (before `TrainConfig.resolved`), where
    an explicit `--augmentation` can still be told from the data kind's default.
    """
    if not config.freeze_backbone:
        return
    if config.augmentation not in (None, "none"):
        raise ValueError(
            "--freeze_backbone computes each image's features once, without augmentation. "
            f"Received: --augmentation={config.augmentation}. Fix: --augmentation=none (or drop "
            "it), or train the whole model without --freeze_backbone.")
    if config.warmup_epochs:
        raise ValueError(
            "--warmup_epochs trains the head with the backbone frozen before fine-tuning it; "
            f"--freeze_backbone keeps it frozen throughout. Received: --warmup_epochs="
            f"{config.warmup_epochs}. Fix: --warmup_epochs=0 (or drop it).")
    if config.method == "ntxent" and config.ntxent_positives == "views":
        raise ValueError(
            "--method=ntxent with --ntxent_positives=views learns from two augmented views of "
            "each image; with --freeze_backbone there is no augmentation and both views are the "
            "same features. Fix: --ntxent_positives=class, or train without --freeze_backbone.")


def frozen_config(config: TrainConfig) -> TrainConfig:
    """The resolved config of a frozen-backbone run: augmentation "none", no warm-up."""
    if not config.freeze_backbone:
        return config
    return dataclasses.replace(config, augmentation="none", warmup_epochs=0)


def _leaf_layers(model: keras.layers.Layer):
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if not list(layer._flatten_layers(include_self=False, recursive=False))]


def backbone_fingerprint(extractor: keras.Model) -> str:
    """SHA-256 of what decides a feature extractor's output: architecture and weights.

    The architecture is each leaf layer's class and configuration without its name
    (Keras numbers automatic names per process), in order, with its dtype policy; the
    weights are every variable's shape, dtype and bytes, trainable or not (BatchNorm's
    moving statistics included).

    Returns:
        64 hexadecimal digits.
    """
    digest = hashlib.sha256()
    for layer in _leaf_layers(extractor):
        config = {k: v for k, v in layer.get_config().items() if k != "name"}
        digest.update(type(layer).__name__.encode())
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for weight in extractor.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{value.shape}{value.dtype}".encode())
        data = value.reshape(-1).view(np.uint8)  # any dtype (bfloat16 too)
        for start in range(0, len(data), _HASH_CHUNK):
            digest.update(data[start:start + _HASH_CHUNK])
    return digest.hexdigest()


def image_list_key(image_set: ImageSet, image_size: int, crop: str) -> str:
    """SHA-256 of an image list as the features see it.

    Covers the labels, the image size, the crop ("train": the unaugmented training
    crop, "eval<f>": the centred crop of fraction f) and the images: each file's path,
    size and modification time, or the decoded pixels of an in-memory set.
    """
    digest = hashlib.sha256(f"{image_size}|{crop}|{image_set.num_images}|".encode())
    digest.update(np.ascontiguousarray(image_set.labels, dtype=np.int64).tobytes())
    if image_set.paths is not None:
        for path in image_set.paths:
            try:
                stat = os.stat(path)
                digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}|missing\n".encode())
    else:
        digest.update(np.ascontiguousarray(image_set.pixels).tobytes())
    return digest.hexdigest()


def extract_features(extractor: keras.Model, dataset: tf.data.Dataset, num_images: int,
                     path: Optional[str] = None) -> np.ndarray:
    """Runs `extractor` once over `dataset` (batches of (images, labels), in order): the
    float32 features `(N, ...)`, written to the `.npy` file `path` (atomically) when given.

    Returns:
        The features: a read-only memory map of `path`, or an array in memory.
    """
    shape = (num_images, *(int(s) for s in extractor.output_shape[1:]))
    if path is None:
        out = np.empty(shape, dtype=np.float32)
    else:
        tmp = f"{path}.tmp-{os.getpid()}.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    row = 0
    for images, _ in dataset:
        # Keras' compiled predict step, inference mode (BatchNorm's moving statistics).
        batch = np.asarray(extractor.predict_on_batch(images), dtype=np.float32)
        out[row:row + len(batch)] = batch
        row += len(batch)
    if row != num_images:
        raise ValueError(f"The feature pass gave {row} rows for {num_images} images.")
    if path is None:
        return out
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


@dataclasses.dataclass
class CachedFeatures:
    """Features of one image list: `features` `(N, ...)` float32 (a memory map of the
    cache file `path`, or an array in memory when `path` is None), whether they were
    reused (False: computed by this run) and the seconds that took."""

    features: np.ndarray
    path: Optional[str]
    reused: bool
    seconds: float


def cached_features(extractor: keras.Model, image_set: ImageSet, make_dataset: Callable[[], tf.data.Dataset],
                    *, cache_dir: Optional[str], name: str, fingerprint: str,
                    image_key: str) -> CachedFeatures:
    """The features of `image_set` from `cache_dir`, computed and written when missing
    (`cache_dir=None`: computed and kept in memory only; `path` is then None).

    A file of the same `name` with another key (other backbone weights, other images)
    is replaced.

    Args:
        extractor: the feature extractor (`kdml.models.split_embedder`).
        image_set: the images, in the order of `make_dataset()`'s batches.
        make_dataset: () -> `tf.data.Dataset` of (images, labels) batches.
        cache_dir: the cache folder (created when missing), or None.
        name: the file's prefix ("train", "test").
        fingerprint: `backbone_fingerprint(extractor)`.
        image_key: `image_list_key(image_set, ...)`.
    """
    key = hashlib.sha256(f"{fingerprint}|{image_key}".encode()).hexdigest()
    if cache_dir is None:
        start = time.perf_counter()
        features = extract_features(extractor, make_dataset(), image_set.num_images)
        return CachedFeatures(features, None, False, time.perf_counter() - start)
    path = os.path.join(cache_dir, f"{name}-{key[:16]}.npy")
    meta_path = path[:-len(".npy")] + ".json"
    start = time.perf_counter()
    if os.path.isfile(path) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        features = np.load(path, mmap_mode="r")
        if (meta.get("key") == key and features.shape[0] == image_set.num_images
                and features.dtype == np.float32):
            return CachedFeatures(features, path, True, time.perf_counter() - start)
    os.makedirs(cache_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(cache_dir, f"{name}-*.npy")) + glob.glob(
            os.path.join(cache_dir, f"{name}-*.json")):
        if not stale.startswith(path[:-len(".npy")]):
            os.remove(stale)
    features = extract_features(extractor, make_dataset(), image_set.num_images, path)
    write_json_atomic(meta_path, {"key": key, "backbone_fingerprint": fingerprint,
                                  "image_list_key": image_key, "images": image_set.num_images,
                                  "shape": list(features.shape), "dtype": "float32",
                                  "source": image_set.name})
    return CachedFeatures(features, path, False, time.perf_counter() - start)


@dataclasses.dataclass
class FrozenFeatures:
    """The cached features of a frozen-backbone run's training and test images."""

    train: CachedFeatures
    test: CachedFeatures
    fingerprint: str

    def summary(self) -> dict:
        """For metrics.json: per split the file, shape, whether reused, seconds spent."""
        return {name: {"path": c.path, "shape": list(c.features.shape), "reused": c.reused,
                       "seconds": round(c.seconds, 3)}
                for name, c in (("train", self.train), ("test", self.test))}

    def describe(self) -> str:
        """One line for the run's output: shapes, sizes, computed or reused."""
        def part(name, cached):
            what = "reused" if cached.reused else f"computed in {cached.seconds:.1f} s"
            size = cached.features.size * 4 / 2**20
            return (f"{name} {tuple(cached.features.shape)} ({size:.1f} MiB, {what})")

        where = (f"in {os.path.dirname(self.train.path)}" if self.train.path
                 else "in memory")
        return f"features: {part('train', self.train)}, {part('test', self.test)} {where}"


def prepare_features(extractor: keras.Model, train_set: ImageSet, test_set: ImageSet,
                     config: TrainConfig, cache_dir: Optional[str],
                     fingerprint: Optional[str] = None) -> FrozenFeatures:
    """The training and test features of a frozen-backbone run, from the cache folder
    `cache_dir` or computed once (`cached_features`; None: in memory, not written).

    Uses `config.image_size`, `config.eval_crop_fraction` (the test crop) and
    `config.eval_batch_size` (the feature pass's batch)."""
    fingerprint = fingerprint or backbone_fingerprint(extractor)
    batch = config.eval_batch_size
    train = cached_features(
        extractor, train_set,
        lambda: unaugmented_dataset(train_set, image_size=config.image_size, batch_size=batch),
        cache_dir=cache_dir, name="train", fingerprint=fingerprint,
        image_key=image_list_key(train_set, config.image_size, "train"))
    test = cached_features(
        extractor, test_set,
        lambda: eval_dataset(test_set, image_size=config.image_size, batch_size=batch,
                             crop_fraction=config.eval_crop_fraction),
        cache_dir=cache_dir, name="test", fingerprint=fingerprint,
        image_key=image_list_key(test_set, config.image_size, f"eval{config.eval_crop_fraction}"))
    return FrozenFeatures(train, test, fingerprint)


def check_fingerprint(state: dict, fingerprint: str, checkpoint: str) -> None:
    """Raises a ValueError when a checkpoint's head was trained on another backbone."""
    recorded = state.get("backbone_fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise ValueError(
            f"--resume: {checkpoint} trained its head on the features of another backbone "
            f"(fingerprint {recorded[:12]}, now {fingerprint[:12]}): other --weights, or a "
            "backbone built differently. Resume with the run's backbone, or choose another "
            "--output_dir.")
