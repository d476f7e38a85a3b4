"""kdml's on-device retrieval kit: a `.tflite` embedder and a cosine index, without TensorFlow.

Needs only `ai-edge-litert` and NumPy (Pillow too, to read image files). It does not
import TensorFlow or kdml, so it runs wherever LiteRT runs (a Raspberry Pi, a server
without TensorFlow).

    from kdml_litert import Embedder, CosineIndex, SearchModel
    embedder = Embedder("embedder_int8.tflite")           # from `python -m kdml.export`
    index = CosineIndex.from_folder(embedder, "gallery/")  # leaf folders are labels
    index.save("gallery.index")                            # a kdml index directory
    index = CosineIndex.load("gallery.index")              # or one `python -m kdml.index build` wrote
    index.query(embedder.embed_files(["query.jpg"]), k=5)  # [[(label, path, cosine), ...]]
    SearchModel("embedder_int8_search.tflite").search_files(["q.jpg"])  # gallery inside

Command line: `python kdml_litert.py index|query|search|embed --help`.

Its answers are `python -m kdml.index`'s: the same folder layout and labels (every leaf
folder is a class named by its path below the gallery folder), the same query records
(`query_record`: the query's label, `label_match`, `accepted`, `no_match`, its own
file left out) and the same one-line `error: <path>: <problem>; <fix>` for a bad file.

Models exported by kdml take uint8 RGB images `(N, H, W, 3)` in [0, 255] (normalisation
is inside the model) and return float32 `(N, d)` L2-normalised embeddings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import contextlib
import shutil
import sys
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np

# The files kdml's folder: source reads (kdml/data/sources/folder.py), so both label alike.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
METADATA_NAME = "kdml"
# kdml's gallery index directory (kdml/embedding/gallery_files.py): index.json + three .npy arrays.
INDEX_FORMAT, INDEX_VERSION, INDEX_METADATA = "kdml-gallery-index", 1, "index.json"
INDEX_ARRAYS = ("embeddings.npy", "labels.npy", "paths.npy")


@contextlib.contextmanager
def _native_stderr_hidden():
    """Sends file descriptor 2 to a temporary file for a call whose C++ code logs
    (LiteRT's "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."); replayed if the
    call raises."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _model_bytes(model_path: str, expected: str) -> bytes:
    """The `.tflite` file's bytes; ValueError `"<path>: <problem>; <fix>"` when it is
    missing, not a TFLite model, or the other kind ("embedder" / "search model") than
    `expected` (kdml/data/model_files.py reads the file the same way)."""
    if not os.path.isfile(model_path):
        raise ValueError(f"{model_path}: no such file; pass a kdml .tflite file "
                         "(python -m kdml.export)")
    with open(model_path, "rb") as f:
        content = f.read()
    if len(content) < 8 or content[4:8] != b"TFL3":
        raise ValueError(f"{model_path}: not a TFLite model ({'empty' if not content else 'no TFL3 identifier'}); "
                         "pass a kdml .tflite file (python -m kdml.export)")
    kind = _tflite_kind(content)
    if kind == expected:
        return content
    if expected == "embedder":
        raise ValueError(f"{model_path}: a search model (an embedder and its gallery: images -> "
                         "top-k gallery rows), but this command takes an embedder; pass the "
                         "embedder it was exported with (embedder_<q>.tflite, without _search), "
                         "or give this file to kdml_litert.py search")
    raise ValueError(f"{model_path}: an embedder (images -> embeddings, no gallery inside), but "
                     "this command takes a search model; pass embedder_<q>_search.tflite "
                     "(python -m kdml.export --gallery=<index>), or use kdml_litert.py query "
                     "--index=<index> with this file")


def _tflite_kind(content: bytes) -> str:
    """"search model" (a `search` signature or several outputs) or "embedder"."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover
        return "embedder"
    root = schema.Model.GetRootAs(content, 0)
    keys = [root.SignatureDefs(i).SignatureKey().decode() for i in range(root.SignatureDefsLength())]
    outputs = root.Subgraphs(0).OutputsLength() if root.SubgraphsLength() else 0
    return "search model" if "search" in keys or outputs > 1 else "embedder"


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("The kit needs LiteRT: pip install ai-edge-litert numpy pillow") from error
    return Interpreter


class Embedder:
    """A kdml `.tflite` embedder on the LiteRT interpreter.

    Args:
        model_path: the `.tflite` file.
        num_threads: interpreter threads (None: LiteRT's default).

    Attributes:
        image_size: (H, W) the model takes; embedding_dim: d; metadata: the "kdml"
        metadata embedded in the file (or its sidecar `<file>.json`), or None.
    """

    def __init__(self, model_path: str, num_threads: Optional[int] = None):
        content = _model_bytes(model_path, "embedder")
        self.path = model_path
        with _native_stderr_hidden():
            self._interpreter = _interpreter_class()(model_content=content,
                                                     num_threads=num_threads)
        (self._input,) = self._interpreter.get_input_details()
        (self._output,) = self._interpreter.get_output_details()
        shape = self._input["shape"]
        if len(shape) != 4 or shape[-1] != 3 or self._input["dtype"] != np.uint8:
            raise ValueError(
                f"{model_path}: not a kdml image embedder: expected a uint8 input "
                f"(N, H, W, 3). Received: shape={list(shape)}, dtype={self._input['dtype']}")
        self.image_size = (int(shape[1]), int(shape[2]))
        self.embedding_dim = int(self._output["shape"][-1])
        self.metadata = _tflite_metadata(content) or _sidecar(model_path)
        self.fingerprint = tflite_fingerprint(content, self.image_size, self.embedding_dim)
        self._batch = None

    @property
    def expected_shape(self) -> str:
        return f"(N, {self.image_size[0]}, {self.image_size[1]}, 3) uint8 RGB in [0, 255]"

    def _check(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        height, width = self.image_size
        if images.ndim != 4 or images.shape[1:] != (height, width, 3):
            channels = images.shape[-1] if images.ndim >= 3 else None
            hint = (" Convert grayscale / RGBA images to RGB." if channels not in (3, None)
                    and images.shape[1:3] == (height, width) else
                    " Resize the images (embed_files does it for image files).")
            raise ValueError(
                f"Expected images of shape {self.expected_shape}, or one image "
                f"({height}, {width}, 3). Received: shape={images.shape}.{hint}")
        if images.dtype != np.uint8:
            raise ValueError(
                f"Expected images of shape {self.expected_shape}. Received: dtype={images.dtype}. "
                "Pass raw pixels as uint8 (e.g. np.clip(x, 0, 255).astype(np.uint8)).")
        return np.ascontiguousarray(images)

    def embed(self, images, batch_size: int = 32) -> np.ndarray:
        """uint8 `(N, H, W, 3)` (or one `(H, W, 3)`) RGB -> float32 `(N, d)`, unit L2 norm."""
        images = self._check(images)
        out = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            if self._batch != len(batch):
                self._interpreter.resize_tensor_input(self._input["index"], list(batch.shape))
                with _native_stderr_hidden():
                    self._interpreter.allocate_tensors()
                self._batch = len(batch)
            self._interpreter.set_tensor(self._input["index"], batch)
            self._interpreter.invoke()
            out.append(self._interpreter.get_tensor(self._output["index"]).astype(np.float32))
        if not out:
            return np.zeros((0, self.embedding_dim), np.float32)
        # int8 models dequantise in-graph; their norm is 1 to within ~1e-3: renormalise.
        return _l2_normalise(np.concatenate(out))

    def embed_files(self, paths: Sequence[str], crop_fraction: float = 0.875,
                    batch_size: int = 32) -> np.ndarray:
        """Image files -> `(N, d)`; each is read as RGB, centre-cropped and resized."""
        images = np.stack([load_image(p, self.image_size, crop_fraction) for p in paths]) \
            if len(paths) else np.zeros((0, *self.image_size, 3), np.uint8)
        return self.embed(images, batch_size)


def load_image(path: str, size: Tuple[int, int], crop_fraction: float = 0.875) -> np.ndarray:
    """An image file as uint8 `(H, W, 3)` RGB: centre crop of `crop_fraction` of the
    shorter side, resized with antialiasing (kdml's evaluation preprocessing). Grayscale,
    palette and 16-bit files are converted (16-bit by their high byte, as TensorFlow's
    PNG decoder does); transparent pixels turn white. Needs Pillow.

    Raises:
        ValueError: `"<path>: <problem>; <fix>"` for a missing, empty, truncated, corrupt
            or non-image file (`image_file_problem`).
    """
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("Reading image files needs Pillow: pip install pillow") from error
    problem = _file_problem(path)
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image, size, crop_fraction)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        kind = _image_format(path) or "image"
        raise ValueError(f"{path}: truncated or corrupt {kind} data ({error}); re-copy or "
                         "re-save the image") from None


def _to_rgb(image, size, crop_fraction):
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit gray: keep the high byte
        values = np.asarray(image, dtype=np.int64) >> 8
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    width, height = image.size
    side = crop_fraction * min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (round(left), round(top), round(left + side), round(top + side))
    image = image.resize((size[1], size[0]), Image.BILINEAR, box=box)
    return np.asarray(image, dtype=np.uint8)


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
          (b"GIF89a", "GIF"), (b"BM", "BMP"))


def _image_format(path: str) -> Optional[str]:
    with open(path, "rb") as f:
        head = f.read(8)
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _file_problem(path: str) -> Optional[str]:
    """What kdml's `image_file_problem` says before decoding: missing, a folder, empty,
    or bytes of no image format kdml reads."""
    if not os.path.exists(path):
        return "no such file; check the path"
    if os.path.isdir(path):
        return "a folder, not an image file; pass the image files inside it"
    if os.path.getsize(path) == 0:
        return "empty file (0 bytes); re-copy or re-save the image"
    if _image_format(path) is None:
        return ("not an image: its bytes are no JPEG, PNG, GIF or BMP (is it a text or "
                "HTML file with an image name?); re-save it as PNG or JPEG")
    return None


def image_file_problem(path: str) -> Optional[str]:
    """Why `load_image` cannot read `path` (one phrase with its fix), or None."""
    try:
        load_image(path, (1, 1))
    except ValueError as error:
        return str(error)[len(f"{path}: "):]
    return None


class CosineIndex:
    """Exact cosine top-k over a gallery of L2-normalised embeddings.

    Args:
        embeddings: `(N, d)` float32 (normalised here), N >= 1, finite.
        labels: N labels (str); paths: N source paths (optional).
        model: the embedder's entry (`{"fingerprint", "format", "path", "image_size",
            "embedding_dim"}`), as kdml's gallery index stores it, or None.
        threshold: the calibrated "no match" threshold an index stores (`{"value":
            cosine, "target", "source", ...}`), or None.
    """

    def __init__(self, embeddings: np.ndarray, labels: Sequence[str],
                 paths: Optional[Sequence[str]] = None, model: Optional[dict] = None,
                 threshold: Optional[dict] = None):
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(labels):
            raise ValueError(f"Expected (N, d) embeddings and N labels. Received: "
                             f"{embeddings.shape} and {len(labels)} labels.")
        if len(embeddings) == 0:
            raise ValueError("The gallery is empty: no embeddings to index. Point it at a "
                             "folder of <label>/<image> files.")
        bad = ~np.isfinite(embeddings).all(axis=1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            where = f" ({paths[first]})" if paths is not None and paths[first] else ""
            raise ValueError(f"{int(bad.sum())} of {len(embeddings)} gallery embeddings are not "
                             f"finite (NaN or Inf), the first at row {first}{where}: check the "
                             "model and that image.")
        self.embeddings = _l2_normalise(embeddings)
        self.labels = [str(label) for label in labels]
        self.paths = [str(p) for p in paths] if paths is not None else [""] * len(self.labels)
        self.model = model or None
        self.threshold = threshold or None  # kdml.index build --calibrate: {"value", ...}

    def __len__(self):
        return len(self.labels)

    @classmethod
    def from_folder(cls, embedder: Embedder, folder: str, batch_size: int = 32,
                    crop_fraction: float = 0.875) -> "CosineIndex":
        """Indexes the images under `folder` as `python -m kdml.index build
        --source=folder:<folder>` does: every leaf folder is a label, its path below
        `folder` (`gallery_files`); unreadable files are skipped in one warning line."""
        paths, labels = gallery_files(folder)
        bad = [(p, image_file_problem(p)) for p in paths]
        skipped = [p for p, problem in bad if problem is not None]
        if skipped:
            _warn(f"{_gallery_name(folder)}: skipping {len(skipped)} of {len(paths)} image "
                  "file(s) that cannot be decoded (zero-byte, truncated, corrupt or not an "
                  f"image): {_listing(skipped)}")
            keep = [i for i, (_, problem) in enumerate(bad) if problem is None]
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        embeddings = embedder.embed_files(paths, crop_fraction=crop_fraction,
                                          batch_size=batch_size)
        return cls(embeddings, labels, paths, model=embedder_entry(embedder))

    def check_model(self, embedder: Embedder, allow_model_mismatch: bool = False) -> None:
        """ValueError (one line, naming both models) unless `embedder` built this index."""
        built = _describe(self.model)
        dim = self.embeddings.shape[1]
        if embedder.embedding_dim != dim:
            raise ValueError(
                f"The index holds embeddings of size {dim} from model {built}, but the query "
                f"model {embedder.fingerprint} ({embedder.path}) gives {embedder.embedding_dim}: "
                "rebuild the index with that model or query with the one that built it.")
        if self.model and not allow_model_mismatch and \
                self.model.get("fingerprint") != embedder.fingerprint:
            raise ValueError(
                f"The index was built by model {built}, but the query model is "
                f"{embedder.fingerprint} ({embedder.path}): embeddings of different models are "
                "not comparable. Rebuild the index with the query model, or pass "
                "--allow_model_mismatch if both are exports of the same weights.")

    def query_files(self, embedder: Embedder, paths: Sequence[str], k: int = 5,
                    crop_fraction: float = 0.875) -> list:
        """Per image file, its record (`query_record`): the query's label in the
        gallery's terms (`label_query_files`), the k best other gallery items, and with a
        threshold `accepted` / `no_match`. `python -m kdml.index query` gives the same."""
        queries = embedder.embed_files(paths, crop_fraction=crop_fraction)
        labels = label_query_files(paths, self.labels, self.paths)
        threshold = (self.threshold or {}).get("value")
        return [query_record(path, label, hits, k, threshold)
                for path, label, hits in zip(paths, labels, self.top_k(queries, k + 1))]

    def top_k(self, queries: np.ndarray, k: int = 5) -> list:
        """`(Q, d)` query embeddings -> per query the k best `{"index", "label", "path",
        "similarity"}`, best first."""
        rows, scores = self._search(queries, k)
        return [[{"index": int(j), "label": self.labels[j], "path": self.paths[j],
                  "similarity": float(scores[q, j])} for j in row]
                for q, row in enumerate(rows)]

    def query(self, queries: np.ndarray, k: int = 5) -> List[List[Tuple[str, str, float]]]:
        """`(Q, d)` query embeddings -> per query the k best (label, path, cosine), best first."""
        rows, scores = self._search(queries, k)
        return [[(self.labels[j], self.paths[j], float(scores[q, j])) for j in row]
                for q, row in enumerate(rows)]

    def _search(self, queries, k):
        """(rows (Q, k) best first, cosines (Q, N)) of `(Q, d)` (or one `(d,)`) queries."""
        queries = np.asarray(queries, np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(
                f"The index holds embeddings of size {self.embeddings.shape[1]} (model "
                f"{_describe(self.model)}). Received queries of shape {queries.shape}: embed "
                "them with the model that built the index.")
        k = min(int(k), len(self))
        scores = _l2_normalise(queries) @ self.embeddings.T
        return np.argsort(-scores, axis=1, kind="stable")[:, :k], scores

    def save(self, path: str) -> str:
        """Writes kdml's gallery index directory `path` atomically (temporary name, then
        rename); `python -m kdml.index` and `GalleryIndex.load` read it too."""
        path = os.path.normpath(path)
        parent, name = os.path.split(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        arrays = {"embeddings.npy": self.embeddings,
                  "labels.npy": np.asarray(self.labels, dtype=str),
                  "paths.npy": np.asarray(self.paths, dtype=str)}
        files = {}
        for file_name, array in arrays.items():
            full = os.path.join(tmp, file_name)
            with open(full, "wb") as f:
                np.save(f, array, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
            files[file_name] = {"bytes": os.path.getsize(full), "sha256": _sha256(full)}
        info = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "count": len(self),
                "embedding_dim": int(self.embeddings.shape[1]), "similarity": "cosine",
                "model": self.model, "backend": {"name": "exact", "config": {}},
                "files": files, "seed": 0, "kdml_version": None}
        if self.threshold:
            info["threshold"] = self.threshold
        with open(os.path.join(tmp, INDEX_METADATA), "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            old = os.path.join(parent, f".{name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str, verify: bool = True) -> "CosineIndex":
        """Reads a kdml gallery index directory (any backend: the kit searches exactly).

        Raises a one-line ValueError for an incomplete (killed) write, a truncated or
        corrupt file (size, and SHA-256 when `verify`), or another format version.
        """
        meta_path = os.path.join(path, INDEX_METADATA)
        fix = "rebuild it (python -m kdml.index build, or kdml_litert.py index)"
        if not os.path.isdir(path):
            raise ValueError(f"{path}: no such index directory; {fix}")
        if not os.path.isfile(meta_path):
            raise ValueError(f"{path} is not a complete kdml index (no {INDEX_METADATA}: its write "
                             f"was interrupted, or it is another folder); {fix}.")
        try:
            with open(meta_path) as f:
                info = json.load(f)
        except ValueError as error:
            raise ValueError(f"{meta_path} is corrupt ({error}); {fix}.") from None
        if not isinstance(info, dict) or info.get("format") != INDEX_FORMAT or \
                info.get("version") != INDEX_VERSION:
            got = (info.get("format"), info.get("version")) if isinstance(info, dict) else info
            raise ValueError(f"{path} is not a kdml gallery index of version {INDEX_VERSION} "
                             f"(format, version: {got}); {fix}.")
        for file_name in INDEX_ARRAYS:
            full, expected = os.path.join(path, file_name), info.get("files", {}).get(file_name)
            if expected is None or not os.path.isfile(full):
                raise ValueError(f"{path}: {file_name} is missing; {fix}.")
            if os.path.getsize(full) != expected["bytes"]:
                raise ValueError(f"{path}: {file_name} has {os.path.getsize(full)} bytes, "
                                 f"{INDEX_METADATA} says {expected['bytes']} (truncated); {fix}.")
            if verify and _sha256(full) != expected["sha256"]:
                raise ValueError(f"{path}: {file_name} does not match its SHA-256 (corrupt); {fix}.")
        embeddings, labels, paths = (np.load(os.path.join(path, n), allow_pickle=False)
                                     for n in INDEX_ARRAYS)
        if embeddings.shape != (info["count"], info["embedding_dim"]) or \
                labels.shape != (info["count"],) or paths.shape != (info["count"],):
            raise ValueError(f"{path}: arrays do not match {INDEX_METADATA}; {fix}.")
        return cls(embeddings, labels.tolist(), paths.tolist(), info.get("model"),
                   info.get("threshold"))


class SearchModel:
    """A kdml search model (`embedder_<q>_search.tflite`, `python -m kdml.export --gallery=`):
    images in, the top-k gallery items out, the gallery inside the file.

    Args:
        model_path: the `*_search.tflite` file; its labels, paths and threshold are read
            from its "kdml" metadata (or the sidecar `<file>.json`).
        num_threads: interpreter threads.

    Attributes:
        labels, paths: the gallery's; k; threshold: the calibrated cosine or None.
    """

    def __init__(self, model_path: str, num_threads: Optional[int] = None):
        content = _model_bytes(model_path, "search model")
        self.path = model_path
        self.metadata = _tflite_metadata(content) or _sidecar(model_path) or {}
        if "search" not in self.metadata:
            raise ValueError(f"{model_path}: a search model without kdml's 'search' metadata "
                             "(labels, paths); export it with python -m kdml.export "
                             "--gallery=<index>")
        search = self.metadata["search"]
        self.labels, self.paths = self.metadata["labels"], self.metadata["paths"]
        self.k = int(search["k"])
        self.threshold = (search.get("threshold") or {}).get("value")
        with _native_stderr_hidden():
            self._interpreter = _interpreter_class()(model_content=content,
                                                     num_threads=num_threads)
            self._runner = self._interpreter.get_signature_runner("search")
        height, width = self.metadata["image_size"]
        self.image_size = (int(height), int(width))

    def search(self, images) -> dict:
        """uint8 `(N, H, W, 3)` (or one image) -> `{"indices" (N, k) int32, "similarities"
        (N, k) float32[, "match" (N, k) bool]}`."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1:] != (*self.image_size, 3) or \
                images.dtype != np.uint8:
            raise ValueError(f"Expected images of shape (N, {self.image_size[0]}, "
                             f"{self.image_size[1]}, 3) uint8 RGB. Received: shape="
                             f"{images.shape}, dtype={images.dtype}.")
        with _native_stderr_hidden():  # the first call prepares the graph (XNNPACK's line)
            found = self._runner(images=np.ascontiguousarray(images))
        return {name: np.asarray(value) for name, value in found.items()}

    def search_files(self, paths: Sequence[str], crop_fraction: float = 0.875,
                     k: Optional[int] = None) -> list:
        """Per image file, its record (`query_record`, as `python -m kdml.index query`
        and the kit's `query` give it): the query's label (`label_query_files`), the
        model's top k without the query's own file (a gallery file gets k - 1), each
        with `label_match` and, when the model holds a threshold, `accepted` (the
        model's `match` output: cosine >= threshold) and the record's `no_match`.
        `k` (at most the model's): keep that many (a gallery file then gets k)."""
        k = self.k if k is None else int(k)
        if not 1 <= k <= self.k:
            raise ValueError(f"Expected 1 <= k <= {self.k} (the search model's k). Received: "
                             f"k={k}")
        images = np.stack([load_image(p, self.image_size, crop_fraction) for p in paths])
        found = self.search(images)
        labels = label_query_files(paths, self.labels, self.paths)
        records = []
        for q, path in enumerate(paths):
            hits = [{"index": int(j), "label": self.labels[j], "path": self.paths[j],
                     "similarity": float(score)}
                    for j, score in zip(found["indices"][q], found["similarities"][q])]
            record = query_record(path, labels[q], hits, k, self.threshold)
            if "match" in found:  # the model's own decision (equal to the float32 test)
                accepted = {int(j): bool(m) for j, m in zip(found["indices"][q], found["match"][q])}
                for entry in record["neighbours"]:
                    entry["accepted"] = accepted[entry["index"]]
                record["no_match"] = not (record["neighbours"] and
                                          record["neighbours"][0]["accepted"])
            records.append(record)
        return records


def file_key(path: str) -> str:
    """What two spellings of one file share: its real absolute path ("" and
    "<source>#<row>" items, which have no file, are their own key)."""
    path = str(path)
    if not path or "#" in os.path.basename(path):
        return path
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def query_record(query: str, label: str, hits: Sequence[dict], k: int,
                 threshold: Optional[float] = None) -> dict:
    """One query's JSON record, field for field `kdml.index.records.query_record`:
    `{"query", "label", ["threshold", "no_match",] "neighbours": [{"index", "label",
    "path", "similarity", "label_match"[, "accepted"]}, ...]}`.

    `hits` (best first) hold k + 1 items when the query may be a gallery file: the
    query's own file (same real path) is dropped, then the first k kept.
    `label_match`: the neighbour's label is the query's. `accepted`: its cosine >= the
    threshold (float32). `no_match`: the best kept neighbour is not accepted.
    """
    own = file_key(query)
    neighbours = []
    for hit in [h for h in hits if file_key(h["path"]) != own][:k]:
        entry = {"index": int(hit["index"]), "label": str(hit["label"]), "path": str(hit["path"]),
                 "similarity": float(hit["similarity"]),
                 "label_match": str(hit["label"]) == str(label)}
        if threshold is not None:
            entry["accepted"] = bool(np.float32(hit["similarity"]) >= np.float32(threshold))
        neighbours.append(entry)
    record = {"query": str(query), "label": str(label)}
    if threshold is not None:
        record["threshold"] = float(threshold)
        record["no_match"] = not (neighbours and neighbours[0]["accepted"])
    record["neighbours"] = neighbours
    return record


def _folder_of(path: str) -> str:
    return os.path.realpath(os.path.dirname(os.path.abspath(str(path))))


def label_query_files(query_paths: Sequence[str], gallery_labels: Sequence[str],
                      gallery_paths: Sequence[str]) -> list:
    """The label of each query file in the gallery's terms, the rule of
    `kdml.embedding.query_labels.label_query_files`: (1) its folder holds gallery items:
    their (most frequent) label; (2) its folder lies under a gallery root (a gallery
    item's folder minus its label): the folder's path relative to that root; (3) the
    folder's own name."""
    counts, roots = {}, set()
    for label, path in zip(gallery_labels, gallery_paths):
        label, path = str(label), str(path)
        if not path or "#" in os.path.basename(path):
            continue
        folder = _folder_of(path)
        counts.setdefault(folder, {}).setdefault(label, 0)
        counts[folder][label] += 1
        suffix = "/" + label.strip("/")
        if label and folder.replace(os.sep, "/").endswith(suffix):
            roots.add(folder[: len(folder) - len(suffix)] or os.sep)
    folders = {f: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
               for f, c in counts.items()}
    roots = sorted(roots, key=lambda r: (-len(r), r))
    names = []
    for path in query_paths:
        folder = _folder_of(path)
        if folder in folders:
            names.append(folders[folder])
            continue
        root = next((r for r in roots
                     if folder != r and folder.startswith(r.rstrip(os.sep) + os.sep)), None)
        names.append(os.path.relpath(folder, root).replace(os.sep, "/") if root is not None
                     else os.path.basename(folder))
    return names


def unknown_labels_warning(query_labels: Sequence[str], gallery_labels: Sequence[str]):
    """The warning of `kdml.data.labels.warn_unknown_query_labels` (no query label, or
    under half of them, occurs in the gallery), or None."""
    gallery = set(map(str, gallery_labels))
    distinct = sorted(set(map(str, query_labels)))
    missing = [label for label in distinct if label not in gallery]
    known = len(distinct) - len(missing)
    if not distinct or (known and 2 * known >= len(distinct)):
        return None
    return (f"{known} of {len(distinct)} query labels occur in the gallery (e.g. "
            f"{missing[0]!r}), so those queries cannot match: the gallery labels an image by "
            "its leaf folder's path below the gallery folder ('Latin/character01'), and a "
            "query file by the gallery folder it sits in; query with files inside the "
            "gallery's folder tree")


def tflite_fingerprint(content: bytes, image_size, embedding_dim: int) -> str:
    """kdml's model fingerprint of a `.tflite` file (kdml/embedding/fingerprint.py): the first
    16 hex digits of SHA-256 over "tflite|HxW|d|<SHA-256 of the file>"."""
    text = (f"tflite|{int(image_size[0])}x{int(image_size[1])}|{int(embedding_dim)}|"
            f"{hashlib.sha256(content).hexdigest()}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def embedder_entry(embedder: Embedder) -> dict:
    """The `model` entry an index stores for `embedder`."""
    return {"fingerprint": embedder.fingerprint, "format": "tflite",
            "path": os.path.abspath(embedder.path),
            "image_size": [int(s) for s in embedder.image_size],
            "embedding_dim": int(embedder.embedding_dim)}


def _describe(model: Optional[dict]) -> str:
    if not model:
        return "an unknown model"
    return f"{model.get('fingerprint', '?')} ({model.get('path') or model.get('format')})"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gallery_files(folder: str) -> Tuple[List[str], List[str]]:
    """(paths, labels) of the images under `folder`, by kdml's `folder:` rule
    (kdml/data/sources/folder.py): a leaf folder (one holding images and no sub-folder
    holding images) is a class, labelled by its path below `folder` with "/"
    (`<folder>/Latin/character01/x.png` -> "Latin/character01"); labels sorted, files
    sorted by name within a label; hidden files and folders are skipped; images
    beside sub-folders of images are ignored (one warning line). Paths are absolute."""
    root = os.path.abspath(os.path.expanduser(str(folder)))
    if not os.path.isdir(root):
        raise ValueError(f"{folder}: no such folder; pass a folder of <label>/<image> files "
                         "(or <group>/<label>/<image>)")
    walked, seen = [], set()
    for current, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(current)
        if real in seen:
            subdirs[:] = []
            continue
        seen.add(real)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        walked.append((current, subdirs, sorted(
            f for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))))
    leaves, ignored, holds = {}, [], {}
    for current, subdirs, images in reversed(walked):
        below = any(holds.get(os.path.join(current, d), False) for d in subdirs)
        holds[current] = bool(images) or below
        if not images:
            continue
        found = [os.path.join(current, f) for f in images]
        if below:
            ignored.extend(found)
        else:
            leaves[os.path.relpath(current, root).replace(os.sep, "/")] = found
    if ignored:
        _warn(f"{_gallery_name(folder)}: ignoring {len(ignored)} image(s) in folders that also "
              f"have sub-folders of images (only leaf folders are classes): {_listing(ignored)}")
    if not leaves:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in leaf "
                         "folders; expected <folder>/<label>/<image> or deeper, e.g. "
                         "<folder>/<alphabet>/<character>/<image>")
    paths, labels = [], []
    for label in sorted(leaves):
        paths.extend(leaves[label])
        labels.extend([label] * len(leaves[label]))
    return paths, labels


def _gallery_name(folder: str) -> str:
    return f"folder:{os.path.abspath(os.path.expanduser(str(folder)))}"


def _listing(paths: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def _sidecar(model_path: str) -> Optional[dict]:
    path = model_path + ".json"
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return None


def _tflite_metadata(content: bytes) -> Optional[dict]:
    """The "kdml" JSON entry of the flatbuffer's metadata list (via LiteRT's schema)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover
        return None
    root = schema.Model.GetRootAs(content, 0)
    for i in range(root.MetadataLength()):
        entry = root.Metadata(i)
        if entry.Name().decode("utf-8") == METADATA_NAME:
            return json.loads(bytes(root.Buffers(entry.Buffer()).DataAsNumpy()).decode("utf-8"))
    return None


def _warn_unknown(query_labels, gallery_labels) -> None:
    text = unknown_labels_warning(query_labels, gallery_labels)
    if text:
        _warn(text)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kdml_litert", description="Embed images and search a gallery with a kdml .tflite embedder.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_index = sub.add_parser("index", help="embed a gallery folder into an index directory")
    p_index.add_argument("--model", required=True)
    p_index.add_argument("--gallery", required=True,
                         help="folder of images, one class per leaf folder (<label>/<image> or "
                              "<group>/<label>/<image>), labelled as kdml.index build labels it")
    p_index.add_argument("--index", required=True, help="index directory to write")
    p_query = sub.add_parser("query", help="top-k gallery images for each query image")
    p_query.add_argument("--model", required=True)
    p_query.add_argument("--index", required=True,
                         help="index directory (this kit's or `python -m kdml.index build`'s)")
    p_query.add_argument("--k", type=int, default=5)
    p_query.add_argument("--allow_model_mismatch", action="store_true",
                         help="query an index another model file built (same weights)")
    p_query.add_argument("images", nargs="+")
    p_search = sub.add_parser("search", help="top-k of each image with a search model "
                              "(*_search.tflite: the gallery is inside)")
    p_search.add_argument("--model", required=True)
    p_search.add_argument("--k", type=int, default=None,
                          help="results per image, at most the model's k (default: its k; a "
                               "gallery file used as a query then gets k - 1)")
    p_search.add_argument("images", nargs="+")
    p_embed = sub.add_parser("embed", help="embeddings of image files as .npy")
    p_embed.add_argument("--model", required=True)
    p_embed.add_argument("--output", required=True)
    p_embed.add_argument("images", nargs="+")
    for p in (p_index, p_query, p_search, p_embed):
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--crop_fraction", type=float, default=0.875,
                       help="centre crop of the shorter side before resizing (kdml's 0.875)")
    args = parser.parse_args(argv)
    try:
        if args.command == "search":
            model = SearchModel(args.model, num_threads=args.threads)
            records = model.search_files(args.images, crop_fraction=args.crop_fraction,
                                         k=args.k)
            _warn_unknown([r["label"] for r in records], model.labels)
            print(json.dumps(records, indent=1))
            return 0
        embedder = Embedder(args.model, num_threads=args.threads)
        if args.command == "index":
            index = CosineIndex.from_folder(embedder, args.gallery,
                                            crop_fraction=args.crop_fraction)
            path = index.save(args.index)
            print(f"Indexed {len(index)} images of {len(set(index.labels))} labels: {path}")
        elif args.command == "query":
            index = CosineIndex.load(args.index)
            index.check_model(embedder, args.allow_model_mismatch)
            for path in args.images:  # every file checked before any is embedded
                problem = _file_problem(path)
                if problem is not None:
                    raise ValueError(f"{path}: {problem}")
            records = index.query_files(embedder, args.images, k=args.k,
                                        crop_fraction=args.crop_fraction)
            _warn_unknown([r["label"] for r in records], index.labels)
            print(json.dumps(records, indent=1))
        else:
            vectors = embedder.embed_files(args.images, crop_fraction=args.crop_fraction)
            np.save(args.output, vectors)
            print(f"Wrote {args.output}")
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
