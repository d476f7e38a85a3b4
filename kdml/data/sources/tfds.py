"""`tfds:<name>` source: the standard DML benchmarks from TensorFlow Datasets.

The images are written out once as files, so that the shared `tf.data` pipeline reads
them by path like any folder source (SOP's ~3 GB of encoded images could not be a
graph constant):

    <data_dir>/kdml_images/<name>/<tfds class id:05d>/<index:06d>.<jpg|png|gif|bmp>
    <data_dir>/kdml_images/<name>/manifest.json

The folder is filled under a temporary sibling name and renamed into place when
complete, so an interrupted run leaves nothing half-written behind; later runs only
read `manifest.json` (tfds itself is not touched again). The manifest stores the tfds
labels and splits as they are; the kdml protocol (which classes train, which test) is
applied when it is read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from kdml.data.image_set import DatasetSplits, ImageSet

# Split rules.
FIRST_HALF_CLASSES = "first_half_classes"
"""tfds train + test merged; classes 0 .. C/2 - 1 train, C/2 .. C - 1 test."""
TFDS_SPLITS = "tfds_splits"
"""tfds `train` split trains, tfds `test` split tests (their classes are disjoint)."""

_MANIFEST = "manifest.json"
_MANIFEST_FORMAT = 1
_TFDS_SPLIT_NAMES = ("train", "test")


class DatasetNotPreparedError(ValueError):
    """A tfds dataset is neither prepared in `data_dir` nor allowed to download."""


def _class_label_name(info, example, label_key: str, label: int) -> str:
    """The ClassLabel's own name (real names for cars196, "17" where tfds has none)."""
    return info.features[label_key].int2str(label)


def _cub_name(info, example, label_key: str, label: int) -> str:
    """"001.black_footed_albatross", like CUB's own folder names."""
    name = example.get("label_name", b"")
    name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
    return f"{label + 1:03d}.{name}" if name else _class_label_name(info, example, label_key, label)


def _omniglot_name(info, example, label_key: str, label: int) -> str:
    """"<alphabet>/characterNN", like Omniglot's own folder layout.

    Alphabet names are real once the dataset is prepared (tfds restores them from its
    metadata) and numbers before that.
    """
    alphabet = info.features["alphabet"].int2str(int(example["alphabet"]))
    return f"{alphabet}/character{int(example['alphabet_char_id']) + 1:02d}"


class TfdsSource(NamedTuple):
    """How one kdml dataset name reads from tfds.

    Feature names are those of `tfds.builder(tfds_name).info.features` (tfds 4.9.10;
    `info` is available offline without the data).
    """

    tfds_name: str
    split_rule: str  # FIRST_HALF_CLASSES or TFDS_SPLITS
    label_key: str
    image_key: str = "image"
    name_keys: tuple = ()  # extra features that `class_name` reads
    class_name: Callable = _class_label_name


TFDS_DATASETS = {
    # CUB-200-2011: classes 1-100 train / 101-200 test (tfds labels 0-99 / 100-199).
    "cub200": TfdsSource("caltech_birds2011", FIRST_HALF_CLASSES, "label",
                         name_keys=("label_name",), class_name=_cub_name),
    # Cars196: classes 1-98 train / 99-196 test.
    "cars196": TfdsSource("cars196", FIRST_HALF_CLASSES, "label"),
    # Stanford Online Products: the tfds splits are the protocol's 11,318 train and
    # 11,316 test classes. `class_id` is the product (`super_class_id` the category).
    "sop": TfdsSource("stanford_online_products", TFDS_SPLITS, "class_id"),
    # Omniglot: background set trains, evaluation set tests; `label` is the character.
    "omniglot": TfdsSource("omniglot", TFDS_SPLITS, "label",
                           name_keys=("alphabet", "alphabet_char_id"),
                           class_name=_omniglot_name),
}


def _source(name: str) -> TfdsSource:
    if name not in TFDS_DATASETS:
        raise ValueError(
            f"Unknown tfds dataset {name!r}. Expected one of: "
            f"{', '.join(sorted(TFDS_DATASETS))} (as --dataset=tfds:<name>)."
        )
    return TFDS_DATASETS[name]


def _default_data_dir() -> str:
    return os.path.expanduser(tfds.core.constants.DATA_DIR)  # honours $TFDS_DATA_DIR


def _extension(encoded: bytes) -> str:
    """File extension from the magic bytes."""
    if encoded.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if encoded.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if encoded.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if encoded.startswith(b"BM"):
        return "bmp"
    raise ValueError(
        f"Unrecognised image encoding (first bytes {encoded[:8]!r}); expected JPEG, "
        f"PNG, GIF or BMP."
    )


def _encoded_image(image) -> bytes:
    """Encoded bytes of one tfds image: the stored bytes under `SkipDecoding`, or
    PNG-encoded pixels where a (mocked or custom) builder yields a decoded array."""
    if isinstance(image, bytes):
        return image
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(
            f"Expected encoded bytes or a uint8 (H, W, C) image from tfds. "
            f"Received: dtype={pixels.dtype}, shape={pixels.shape}"
        )
    return tf.io.encode_png(pixels).numpy()


def _not_prepared(name: str, source: TfdsSource, data_dir: Optional[str]) -> DatasetNotPreparedError:
    where = data_dir or _default_data_dir()
    return DatasetNotPreparedError(
        f"tfds:{name}: tfds dataset {source.tfds_name!r} is not prepared in {where} "
        f"and download=False. Download it once with "
        f"`python -m kdml.train --dataset=tfds:{name} --download` or "
        f"`tfds build {source.tfds_name} --data_dir={where}`, "
        f"or point --data_dir at a folder that already holds it."
    )


def _read_tfds(name: str, source: TfdsSource, data_dir: Optional[str], download: bool):
    """The tfds builder and its train/test datasets of undecoded images."""
    try:
        builder = tfds.builder(source.tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"tfds:{name}: this tensorflow-datasets has no builder "
            f"{source.tfds_name!r} ({e}). Upgrade tensorflow-datasets."
        ) from None
    if download:
        builder.download_and_prepare()
    # PartialDecoding reads only the features used here: SkipDecoding keeps each
    # image's stored bytes, and CUB's segmentation masks are never decoded.
    keys = (source.image_key, source.label_key) + tuple(source.name_keys)
    decoders = tfds.decode.PartialDecoding(
        {k: True for k in keys}, decoders={source.image_key: tfds.decode.SkipDecoding()}
    )
    datasets = {}
    for split in _TFDS_SPLIT_NAMES:
        try:
            datasets[split] = builder.as_dataset(split=split, decoders=decoders)
        except AssertionError:
            # tfds 4.9 asserts "Dataset <name>: could not find data in <dir>" when the
            # dataset is not prepared there.
            raise _not_prepared(name, source, data_dir) from None
    return builder, datasets


def _write_images(name, source, builder, datasets, folder) -> dict:
    """Writes every image of `datasets` under `folder`; returns the manifest."""
    info = builder.info
    splits, class_names, made = {}, {}, set()
    index = 0
    for split, ds in datasets.items():
        files, labels = [], []
        for example in ds.as_numpy_iterator():
            label = int(example[source.label_key])
            encoded = _encoded_image(example[source.image_key])
            class_dir = f"{label:05d}"
            if class_dir not in made:
                os.makedirs(os.path.join(folder, class_dir), exist_ok=True)
                made.add(class_dir)
            rel = f"{class_dir}/{index:06d}.{_extension(encoded)}"
            with open(os.path.join(folder, rel), "wb") as f:
                f.write(encoded)
            if label not in class_names:
                class_names[label] = source.class_name(info, example, source.label_key, label)
            files.append(rel)
            labels.append(label)
            index += 1
            if index % 10000 == 0:
                logging.info("tfds:%s: wrote %d images", name, index)
        splits[split] = {"files": files, "labels": labels}
    return {
        "format": _MANIFEST_FORMAT,
        "name": name,
        "tfds_name": source.tfds_name,
        "tfds_version": str(builder.info.version),
        "num_classes": int(info.features[source.label_key].num_classes),
        "class_names": {str(k): v for k, v in sorted(class_names.items())},
        "splits": splits,
    }


def _read_manifest(folder: str) -> Optional[dict]:
    path = os.path.join(folder, _MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != _MANIFEST_FORMAT:
        return None
    return manifest


def _materialise(name, source, data_dir, download, folder) -> dict:
    """Writes the images and manifest into a temporary sibling, then renames it into place."""
    builder, datasets = _read_tfds(name, source, data_dir, download)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the images from other users
    try:
        logging.info("tfds:%s: writing images to %s (once)", name, folder)
        manifest = _write_images(name, source, builder, datasets, tmp)
        with open(os.path.join(tmp, _MANIFEST), "w") as f:
            json.dump(manifest, f)
        stale = None
        if os.path.isdir(folder):  # unreadable or outdated manifest: replace it
            stale = tempfile.mkdtemp(prefix=f".{name}.stale-", dir=parent)
            os.rename(folder, os.path.join(stale, name))
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process finished first: use its folder.
            other = _read_manifest(folder)
            if other is None:
                raise
            manifest = other
        if stale:
            shutil.rmtree(stale, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _image_set(name, folder, manifest, files, labels, role) -> ImageSet:
    """Relabels tfds class ids contiguously, in increasing order."""
    labels = np.asarray(labels, dtype=np.int64)
    class_ids = np.unique(labels)
    names = manifest["class_names"]
    image_set = ImageSet(
        labels=np.searchsorted(class_ids, labels),
        class_names=tuple(names.get(str(c), str(c)) for c in class_ids),
        paths=np.array([os.path.join(folder, f) for f in files], dtype=str),
        name=f"tfds:{name}/{role}",
    )
    return image_set.drop_small_classes(min_images=2)


def _apply_split_rule(name, source, folder, manifest) -> DatasetSplits:
    splits = manifest["splits"]
    if source.split_rule == FIRST_HALF_CLASSES:
        files = [f for s in _TFDS_SPLIT_NAMES for f in splits[s]["files"]]
        labels = np.array([l for s in _TFDS_SPLIT_NAMES for l in splits[s]["labels"]], np.int64)
        is_train = labels < manifest["num_classes"] // 2
        files = np.array(files, dtype=object)
        parts = {
            "train": (files[is_train], labels[is_train]),
            "test": (files[~is_train], labels[~is_train]),
        }
    elif source.split_rule == TFDS_SPLITS:
        parts = {s: (splits[s]["files"], splits[s]["labels"]) for s in _TFDS_SPLIT_NAMES}
    else:
        raise ValueError(
            f"tfds:{name}: unknown split rule {source.split_rule!r}. Expected "
            f"{FIRST_HALF_CLASSES!r} or {TFDS_SPLITS!r}."
        )
    sets = {
        role: _image_set(name, folder, manifest, f, l, role) for role, (f, l) in parts.items()
    }
    for role, image_set in sets.items():
        if image_set.num_classes == 0:
            raise ValueError(
                f"tfds:{name}: no {role} class with 2 or more images in {folder}. "
                f"Delete that folder to rebuild it from tfds."
            )
    kind = "glyph" if name == "omniglot" else "photo"
    return DatasetSplits(train=sets["train"], test=sets["test"], name=f"tfds:{name}", kind=kind)


def load_tfds(name: str, data_dir: Optional[str] = None, download: bool = False) -> DatasetSplits:
    """Loads a DML benchmark from TensorFlow Datasets with its zero-shot class split.

    `cub200` (caltech_birds2011: classes 1-100 train / 101-200 test), `cars196`
    (1-98 / 99-196), `sop` (stanford_online_products: 11,318 / 11,316 classes) and
    `omniglot` (background set / evaluation set). Labels are relabelled contiguously
    within each split, in increasing tfds class id. The first call writes the images
    as files under `<data_dir>/kdml_images/<name>/`; later calls read its manifest.

    Args:
        name: a key of `TFDS_DATASETS`.
        data_dir: tfds data folder; default: tfds's (`$TFDS_DATA_DIR` or
            ~/tensorflow_datasets).
        download: download and prepare the tfds dataset if needed (network).

    Returns:
        `DatasetSplits` of `ImageSet`s of paths.

    Raises:
        ValueError: unknown `name`.
        DatasetNotPreparedError: the dataset is not in `data_dir` and `download=False`.
    """
    source = _source(name)
    folder = os.path.join(data_dir or _default_data_dir(), "kdml_images", name)
    manifest = None
    try:
        manifest = _read_manifest(folder)
    except (OSError, ValueError) as e:
        logging.warning("tfds:%s: unreadable %s (%s); rebuilding it.", name, folder, e)
    if manifest is None:
        manifest = _materialise(name, source, data_dir, download, folder)
    else:
        logging.info(
            "tfds:%s: reading %s (tfds %s %s)", name, folder,
            manifest["tfds_name"], manifest["tfds_version"],
        )
    return _apply_split_rule(name, source, folder, manifest)
