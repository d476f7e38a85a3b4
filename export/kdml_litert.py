"""kdml's on-device retrieval kit: a `.tflite` embedder and a cosine index, without TensorFlow.

Needs only `ai-edge-litert` and NumPy (Pillow too, to read image files). It does not
import TensorFlow or kdml, so it runs wherever LiteRT runs (a Raspberry Pi, a server
without TensorFlow).

    from kdml_litert import Embedder, CosineIndex, SearchModel
    embedder = Embedder("embedder_int8.tflite")           # from `python -m kdml.export`
    index = CosineIndex.from_folder(embedder, "gallery/")  # gallery/<label>/<image files>
    index.save("gallery.index")                            # a kdml index directory
    index = CosineIndex.load("gallery.index")              # or one `python -m kdml.index build` wrote
    index.query(embedder.embed_files(["query.jpg"]), k=5)  # [[(label, path, cosine), ...]]
    SearchModel("embedder_int8_search.tflite").search_files(["q.jpg"])  # gallery inside

Command line: `python kdml_litert.py index|query|search|embed --help`.

Models exported by kdml take uint8 RGB images `(N, H, W, 3)` in [0, 255] (normalisation
is inside the model) and return float32 `(N, d)` L2-normalised embeddings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
METADATA_NAME = "kdml"
# kdml's gallery index directory (kdml/embedding/gallery_files.py): index.json + three .npy arrays.
INDEX_FORMAT, INDEX_VERSION, INDEX_METADATA = "kdml-gallery-index", 1, "index.json"
INDEX_ARRAYS = ("embeddings.npy", "labels.npy", "paths.npy")


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
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"No .tflite model at {model_path}.")
        with open(model_path, "rb") as f:
            content = f.read()
        self.path = model_path
        self._interpreter = _interpreter_class()(model_content=content, num_threads=num_threads)
        (self._input,) = self._interpreter.get_input_details()
        (self._output,) = self._interpreter.get_output_details()
        shape = self._input["shape"]
        if len(shape) != 4 or shape[-1] != 3 or self._input["dtype"] != np.uint8:
            raise ValueError(
                f"{model_path} is not a kdml image embedder: expected a uint8 input "
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
    shorter side, resized with antialiasing (kdml's evaluation preprocessing). Needs Pillow."""
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError("Reading image files needs Pillow: pip install pillow") from error
    with Image.open(path) as image:
        if image.mode in ("RGBA", "LA", "P"):
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
    def from_folder(cls, embedder: Embedder, folder: str, batch_size: int = 32) -> "CosineIndex":
        """Indexes `folder/<label>/<image>` (one subfolder per label); images directly
        in `folder` are labelled by their file name without extension."""
        paths, labels = gallery_files(folder)
        embeddings = embedder.embed_files(paths, batch_size=batch_size)
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

    def query(self, queries: np.ndarray, k: int = 5) -> List[List[Tuple[str, str, float]]]:
        """`(Q, d)` query embeddings -> per query the k best (label, path, cosine), best first."""
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
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], self.paths[j], float(scores[q, j])) for j in row]
                for q, row in enumerate(top)]

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
            raise FileNotFoundError(f"No index directory at {path}.")
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
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"No .tflite model at {model_path}.")
        with open(model_path, "rb") as f:
            content = f.read()
        self.path = model_path
        self.metadata = _tflite_metadata(content) or _sidecar(model_path) or {}
        if "search" not in self.metadata:
            raise ValueError(f"{model_path} is not a kdml search model (no 'search' metadata): "
                             "export one with python -m kdml.export --gallery=<index>.")
        search = self.metadata["search"]
        self.labels, self.paths = self.metadata["labels"], self.metadata["paths"]
        self.k = int(search["k"])
        self.threshold = (search.get("threshold") or {}).get("value")
        self._interpreter = _interpreter_class()(model_content=content, num_threads=num_threads)
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
        return {name: np.asarray(value)
                for name, value in self._runner(images=np.ascontiguousarray(images)).items()}

    def search_files(self, paths: Sequence[str], crop_fraction: float = 0.875) -> list:
        """Per image file: `[{"label", "path", "cosine", ["match"]}, ...]`, best first."""
        images = np.stack([load_image(p, self.image_size, crop_fraction) for p in paths])
        found = self.search(images)
        return [[{"label": self.labels[j], "path": self.paths[j], "cosine": float(score),
                  **({"match": bool(found["match"][q, r])} if "match" in found else {})}
                 for r, (j, score) in enumerate(zip(found["indices"][q],
                                                    found["similarities"][q]))]
                for q in range(len(paths))]


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
    """(paths, labels) of the images under `folder` (see `CosineIndex.from_folder`)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No gallery folder at {folder}.")
    paths, labels = [], []
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        if os.path.isdir(full):
            for name in sorted(os.listdir(full)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(full, name))
                    labels.append(entry)
        elif entry.lower().endswith(IMAGE_EXTENSIONS):
            paths.append(full)
            labels.append(os.path.splitext(entry)[0])
    if not paths:
        raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}.")
    return paths, labels


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kdml_litert", description="Embed images and search a gallery with a kdml .tflite embedder.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_index = sub.add_parser("index", help="embed a gallery folder into an index directory")
    p_index.add_argument("--model", required=True)
    p_index.add_argument("--gallery", required=True, help="folder: <label>/<image files>")
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
    p_search.add_argument("images", nargs="+")
    p_embed = sub.add_parser("embed", help="embeddings of image files as .npy")
    p_embed.add_argument("--model", required=True)
    p_embed.add_argument("--output", required=True)
    p_embed.add_argument("images", nargs="+")
    for p in (p_index, p_query, p_search, p_embed):
        p.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "search":
            model = SearchModel(args.model, num_threads=args.threads)
            results = model.search_files(args.images)
            print(json.dumps([{"query": q, **({"no_match": not hits[0]["match"]}
                                              if "match" in hits[0] else {}),
                               "neighbours": hits} for q, hits in zip(args.images, results)],
                             indent=1))
            return 0
        embedder = Embedder(args.model, num_threads=args.threads)
        if args.command == "index":
            index = CosineIndex.from_folder(embedder, args.gallery)
            path = index.save(args.index)
            print(f"Indexed {len(index)} images of {len(set(index.labels))} labels: {path}")
        elif args.command == "query":
            index = CosineIndex.load(args.index)
            index.check_model(embedder, args.allow_model_mismatch)
            results = index.query(embedder.embed_files(args.images), k=args.k)
            threshold = (index.threshold or {}).get("value")
            print(json.dumps([{"query": q, **({} if threshold is None else {
                "no_match": bool(np.float32(hits[0][2]) < np.float32(threshold))}),
                "neighbours": [{"label": label, "path": path, "cosine": round(score, 6)}
                               for label, path, score in hits]}
                for q, hits in zip(args.images, results)], indent=1))
        else:
            np.save(args.output, embedder.embed_files(args.images))
            print(f"Wrote {args.output}")
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
