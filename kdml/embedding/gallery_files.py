"""The saved format of a gallery index: one directory, written atomically, NumPy-readable.

    <index>/
      index.json        {"format": "kdml-gallery-index", "version": 1, "count": N,
                         "embedding_dim": d, "similarity": "cosine", "model": {...},
                         "backend": {"name", "config"}, "files": {name: {bytes, sha256}},
                         "kdml_version", ["threshold": {"value", "target", "source",
                         "precision", "recall", "far", ...}] (build --calibrate)}
      embeddings.npy    float32 (N, d), rows L2-normalised
      labels.npy        str (N,)   class name of each gallery item
      paths.npy         str (N,)   its image file ("" when it came from arrays)
      faiss.index       the approximate backend's state (backend "faiss" only)

`model` identifies the embedder: `fingerprint` (see `kdml.embedding.fingerprint`),
`format`, `path`, `image_size`, `embedding_dim`. The directory is written under a
temporary name (`.<name>.tmp-<pid>`), `index.json` last, and renamed into place, so a
write killed midway never leaves a directory that loads: `read_index_files` needs
`index.json`, and checks every file's byte size (and SHA-256 when `verify=True`)
against it. The arrays load with `numpy.load(allow_pickle=False)`, so the LiteRT kit
(`export/kdml_litert.py`) reads the same directory without TensorFlow.

The format sits below both workflows that use it: `kdml.index.GalleryIndex` writes and
searches it, and the search model of `kdml.export` reads it (`read_gallery`, no search
backend needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np

from kdml.version import __version__

SIMILARITY = "cosine"
FORMAT_NAME = "kdml-gallery-index"
FORMAT_VERSION = 1
METADATA_FILE = "index.json"
ARRAY_FILES = ("embeddings.npy", "labels.npy", "paths.npy")


class IndexFormatError(ValueError):
    """A directory that is not a complete, valid kdml gallery index."""


def sha256_file(path: str, block: int = 2**22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_index_files(path: str, embeddings: np.ndarray, labels: np.ndarray, paths: np.ndarray,
                      metadata: dict, write_extra=None) -> str:
    """Writes the index directory `path` atomically (replacing an existing one).

    Args:
        embeddings, labels, paths: the arrays (validated by the caller).
        metadata: `model`, `backend`, `similarity` ... (count, sizes, version and file
            checksums are added here).
        write_extra: optional `f(temp_dir) -> [file names]` writing backend files.

    Returns:
        `path`.
    """
    path = os.path.normpath(path)
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        arrays = {"embeddings.npy": np.ascontiguousarray(embeddings, np.float32),
                  "labels.npy": np.asarray(labels, dtype=str),
                  "paths.npy": np.asarray(paths, dtype=str)}
        for file_name, array in arrays.items():
            with open(os.path.join(tmp, file_name), "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        extra = list(write_extra(tmp) or []) if write_extra else []
        files = {}
        for file_name in list(arrays) + [os.path.basename(e) for e in extra]:
            full = os.path.join(tmp, file_name)
            files[file_name] = {"bytes": os.path.getsize(full), "sha256": sha256_file(full)}
        info = {**metadata, "format": FORMAT_NAME, "version": FORMAT_VERSION,
                "count": int(len(arrays["labels.npy"])),
                "embedding_dim": int(arrays["embeddings.npy"].shape[1]),
                "files": files, "kdml_version": __version__}
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if os.path.exists(path):
            old = os.path.join(parent, f".{name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_index_files(path: str, verify: bool = True, mmap: bool = False) -> dict:
    """Reads and validates an index directory.

    Returns:
        `{"metadata": dict, "embeddings": (N, d) float32, "labels": (N,) str,
        "paths": (N,) str, "directory": path}`.

    Raises:
        FileNotFoundError: no such directory.
        IndexFormatError: incomplete (a write killed midway), truncated, corrupt, of
            another format version, or inconsistent; the one-line message says what.
    """
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise IndexFormatError(f"{path} is a file, not a kdml index directory; build one with "
                                   "`python -m kdml.index build`.")
        raise FileNotFoundError(f"No index at {path}. Build one with `python -m kdml.index build "
                                f"--model=<embedder> --source=folder:<gallery> --output_dir={path}`.")
    meta_path = os.path.join(path, METADATA_FILE)
    rebuild = "rebuild it with `python -m kdml.index build`"
    if not os.path.isfile(meta_path):
        raise IndexFormatError(f"{path} is not a complete kdml index (no {METADATA_FILE}: its write "
                               f"was interrupted, or it is another folder); {rebuild}.")
    try:
        with open(meta_path) as f:
            metadata = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise IndexFormatError(f"{meta_path} is corrupt ({error}); {rebuild}.") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path}: {METADATA_FILE} is not a kdml gallery index "
                               f"(format {metadata.get('format') if isinstance(metadata, dict) else None!r}, "
                               f"expected {FORMAT_NAME!r}); {rebuild}.")
    if metadata.get("version") != FORMAT_VERSION:
        raise IndexFormatError(f"{path} has index format version {metadata.get('version')!r}; this "
                               f"kdml reads version {FORMAT_VERSION}: {rebuild}.")
    files = metadata.get("files") or {}
    for file_name in ARRAY_FILES + tuple(f for f in files if f not in ARRAY_FILES):
        full = os.path.join(path, file_name)
        expected = files.get(file_name)
        if expected is None or not os.path.isfile(full):
            raise IndexFormatError(f"{path}: {file_name} is missing; {rebuild}.")
        size = os.path.getsize(full)
        if size != expected["bytes"]:
            raise IndexFormatError(f"{path}: {file_name} has {size} bytes, {METADATA_FILE} says "
                                   f"{expected['bytes']} (truncated or replaced); {rebuild}.")
        if verify and sha256_file(full) != expected["sha256"]:
            raise IndexFormatError(f"{path}: {file_name} does not match its SHA-256 in "
                                   f"{METADATA_FILE} (corrupt); {rebuild}.")
    try:
        embeddings = np.load(os.path.join(path, "embeddings.npy"), allow_pickle=False,
                             mmap_mode="r" if mmap else None)
        labels = np.load(os.path.join(path, "labels.npy"), allow_pickle=False)
        paths = np.load(os.path.join(path, "paths.npy"), allow_pickle=False)
    except ValueError as error:
        raise IndexFormatError(f"{path}: unreadable array ({error}); {rebuild}.") from None
    count, dim = metadata.get("count"), metadata.get("embedding_dim")
    if (embeddings.dtype != np.float32 or embeddings.shape != (count, dim)
            or labels.shape != (count,) or paths.shape != (count,)):
        raise IndexFormatError(
            f"{path}: arrays do not match {METADATA_FILE} (count {count}, embedding_dim {dim}): "
            f"embeddings {embeddings.dtype} {embeddings.shape}, labels {labels.shape}, paths "
            f"{paths.shape}; {rebuild}.")
    return {"metadata": metadata, "embeddings": embeddings, "labels": labels, "paths": paths,
            "directory": path}


def model_summary(model: Optional[dict]) -> str:
    """'<fingerprint> (<path>)' of an index's model entry, for error messages."""
    if not model:
        return "an unknown model"
    where = model.get("path") or model.get("format") or "?"
    return f"{model.get('fingerprint', '?')} ({where})"


def check_embeddings(embeddings, paths=None, source: str = "the gallery") -> np.ndarray:
    """`(N, d)` finite float32 rows, L2-normalised; a one-line ValueError otherwise.

    Raises for an empty array (no images) and for non-finite rows (how many, and the
    first one's row and path).
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"Expected embeddings of shape (N, d) for {source}. Received: "
                         f"shape={embeddings.shape}")
    if len(embeddings) == 0:
        raise ValueError(f"{source} is empty: no embeddings to index. Point the source at a "
                         "folder with images (<root>/<class>/<image>) or pass a non-empty array.")
    embeddings = embeddings.astype(np.float32, copy=False)
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        where = f" ({paths[first]})" if paths is not None and len(paths) > first and \
            str(paths[first]) else ""
        raise ValueError(
            f"{int(bad.sum())} of {len(embeddings)} embeddings of {source} are not finite (NaN "
            f"or Inf), the first at row {first}{where}: the model produced them; check the model "
            "(a diverged training gives NaN weights) and that image, then rebuild.")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def check_model_entry(built_by: Optional[dict], dim: int, model: Optional[dict],
                      allow_model_mismatch: bool = False, directory: Optional[str] = None) -> None:
    """Raises a one-line ValueError when `model` did not build the gallery that `built_by`
    (its model entry, or None) built with `dim`-sized embeddings.

    A different embedding size always raises; another fingerprint raises unless
    `allow_model_mismatch` (e.g. the `.tflite` export of the `.keras` that built it).
    `model` None checks nothing.
    """
    if model is None:
        return
    where = f"The index at {directory}" if directory else "The index"
    built = model_summary(built_by)
    if int(model["embedding_dim"]) != dim:
        raise ValueError(
            f"{where} holds embeddings of size {dim} from model {built}, but the "
            f"query model {model_summary(model)} gives {model['embedding_dim']}: rebuild "
            f"the index with that model (python -m kdml.index build --model="
            f"{model.get('path')} ...) or query with the model that built it.")
    if (built_by and not allow_model_mismatch
            and model["fingerprint"] != built_by["fingerprint"]):
        raise ValueError(
            f"{where} was built by model {built}, but the query model is "
            f"{model_summary(model)}: embeddings of different models are not comparable. "
            f"Rebuild the index with the query model (python -m kdml.index build --model="
            f"{model.get('path')} ...), or pass allow_model_mismatch=True "
            "(--allow_model_mismatch) if both are exports of the same weights.")


class StoredGallery:
    """A gallery's items, checked: what a saved index holds without its search backend
    (`read_gallery`), and the base of `kdml.index.GalleryIndex`.

    Args:
        embeddings: `(N, d)` float (normalised here), N >= 1, all finite.
        labels: N class names; paths: N source paths (None: "").
        model, threshold, directory: as the attributes.

    Attributes:
        embeddings: `(N, d)` float32 unit rows (`check_embeddings`).
        labels, paths: `(N,)` str.
        model: the entry of the model that built it (`model_fingerprint`), or None.
        threshold: the calibrated "no match" threshold dict, or None.
        directory: where it was read from.
    """

    def __init__(self, embeddings, labels: Sequence[str], paths: Optional[Sequence[str]] = None,
                 *, model: Optional[dict] = None, threshold: Optional[dict] = None,
                 directory: Optional[str] = None):
        labels = np.asarray([str(label) for label in labels], dtype=str)
        paths = (np.full(len(labels), "", dtype=str) if paths is None
                 else np.asarray([str(p) for p in paths], dtype=str))
        self.embeddings = check_embeddings(embeddings, paths)
        if not (len(labels) == len(paths) == len(self.embeddings)):
            raise ValueError(f"Expected N embeddings, N labels and N paths. Received: "
                             f"{len(self.embeddings)} embeddings, {len(labels)} labels, "
                             f"{len(paths)} paths.")
        if model and int(model.get("embedding_dim", self.dim)) != self.dim:
            raise ValueError(f"The model {model_summary(model)} gives embeddings of size "
                             f"{model['embedding_dim']}, but the arrays have {self.dim} columns.")
        self.labels, self.paths = labels, paths
        self.model = dict(model) if model else None
        self.threshold = dict(threshold) if threshold else None
        self.directory = directory

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self):
        return f"StoredGallery({len(self)} x {self.dim}, model={model_summary(self.model)})"

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def check_model(self, model: Optional[dict], allow_model_mismatch: bool = False) -> None:
        """`check_model_entry` of this gallery."""
        check_model_entry(self.model, self.dim, model, allow_model_mismatch, self.directory)


def read_gallery(path: str, verify: bool = True) -> StoredGallery:
    """The items of the index directory `path` (`read_index_files`, then the checks of
    `StoredGallery`: empty, non-finite or inconsistent arrays are refused)."""
    stored = read_index_files(path, verify=verify)
    metadata = stored["metadata"]
    return StoredGallery(stored["embeddings"], stored["labels"], stored["paths"],
                         model=metadata.get("model"), threshold=metadata.get("threshold"),
                         directory=path)
