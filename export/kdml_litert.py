"""kdml's on-device retrieval kit: a `.tflite` embedder and a cosine index, without TensorFlow.

Needs only `ai-edge-litert` and NumPy (Pillow too, to read image files). It does not
import TensorFlow or kdml, so it runs wherever LiteRT runs (a Raspberry Pi, a server
without TensorFlow).

    from kdml_litert import Embedder, CosineIndex
    embedder = Embedder("embedder_int8.tflite")           # from `python -m kdml.export`
    index = CosineIndex.from_folder(embedder, "gallery/")  # gallery/<label>/<image files>
    index.save("gallery_index")                            # gallery_index.npy + .json
    index.query(embedder.embed_files(["query.jpg"]), k=5)  # [[(label, path, cosine), ...]]

Command line: `python kdml_litert.py index|query|embed --help`.

Models exported by kdml take uint8 RGB images `(N, H, W, 3)` in [0, 255] (normalisation
is inside the model) and return float32 `(N, d)` L2-normalised embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
METADATA_NAME = "kdml"


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
        embeddings: `(N, d)` float32 (normalised here).
        labels: N labels (str); paths: N source paths (optional).
    """

    def __init__(self, embeddings: np.ndarray, labels: Sequence[str],
                 paths: Optional[Sequence[str]] = None, model: Optional[dict] = None):
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(labels):
            raise ValueError(f"Expected (N, d) embeddings and N labels. Received: "
                             f"{embeddings.shape} and {len(labels)} labels.")
        self.embeddings = _l2_normalise(embeddings)
        self.labels = [str(label) for label in labels]
        self.paths = list(paths) if paths is not None else [""] * len(self.labels)
        self.model = model or {}

    def __len__(self):
        return len(self.labels)

    @classmethod
    def from_folder(cls, embedder: Embedder, folder: str, batch_size: int = 32) -> "CosineIndex":
        """Indexes `folder/<label>/<image>` (one subfolder per label); images directly
        in `folder` are labelled by their file name without extension."""
        paths, labels = gallery_files(folder)
        embeddings = embedder.embed_files(paths, batch_size=batch_size)
        return cls(embeddings, labels, paths, model={"path": embedder.path,
                                                     "metadata": embedder.metadata})

    def query(self, queries: np.ndarray, k: int = 5) -> List[List[Tuple[str, str, float]]]:
        """`(Q, d)` query embeddings -> per query the k best (label, path, cosine), best first."""
        queries = np.asarray(queries, np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"Expected query embeddings (Q, {self.embeddings.shape[1]}). "
                             f"Received: {queries.shape}")
        k = min(int(k), len(self))
        scores = _l2_normalise(queries) @ self.embeddings.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(self.labels[j], self.paths[j], float(scores[q, j])) for j in row]
                for q, row in enumerate(top)]

    def save(self, prefix: str) -> Tuple[str, str]:
        """Writes `<prefix>.npy` (embeddings) and `<prefix>.json` (labels, paths, model)."""
        np.save(prefix + ".npy", self.embeddings)
        with open(prefix + ".json", "w") as f:
            json.dump({"labels": self.labels, "paths": self.paths, "model": self.model}, f,
                      indent=1)
        return prefix + ".npy", prefix + ".json"

    @classmethod
    def load(cls, prefix: str) -> "CosineIndex":
        with open(prefix + ".json") as f:
            info = json.load(f)
        return cls(np.load(prefix + ".npy"), info["labels"], info["paths"], info.get("model"))


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
    p_index = sub.add_parser("index", help="embed a gallery folder into <index>.npy + <index>.json")
    p_index.add_argument("--model", required=True)
    p_index.add_argument("--gallery", required=True, help="folder: <label>/<image files>")
    p_index.add_argument("--index", required=True, help="output prefix")
    p_query = sub.add_parser("query", help="top-k gallery images for each query image")
    p_query.add_argument("--model", required=True)
    p_query.add_argument("--index", required=True)
    p_query.add_argument("--k", type=int, default=5)
    p_query.add_argument("images", nargs="+")
    p_embed = sub.add_parser("embed", help="embeddings of image files as .npy")
    p_embed.add_argument("--model", required=True)
    p_embed.add_argument("--output", required=True)
    p_embed.add_argument("images", nargs="+")
    for p in (p_index, p_query, p_embed):
        p.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        embedder = Embedder(args.model, num_threads=args.threads)
        if args.command == "index":
            index = CosineIndex.from_folder(embedder, args.gallery)
            npy, meta = index.save(args.index)
            print(f"Indexed {len(index)} images of {len(set(index.labels))} labels: {npy}, {meta}")
        elif args.command == "query":
            index = CosineIndex.load(args.index)
            results = index.query(embedder.embed_files(args.images), k=args.k)
            print(json.dumps([{"query": q, "neighbours": [
                {"label": label, "path": path, "cosine": round(score, 6)}
                for label, path, score in hits]} for q, hits in zip(args.images, results)],
                indent=1))
        else:
            np.save(args.output, embedder.embed_files(args.images))
            print(f"Wrote {args.output}")
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
