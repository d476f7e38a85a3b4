"""The search model: an embedder plus its gallery as a constant, `image -> top-k gallery items`.

`python -m kdml.export --model=embedder.keras --gallery=gallery.index` writes, beside
the embedder files:

- `embedder_<quantization>_search.tflite`: the embedder `.tflite` of that quantization
  (unchanged ops and weights) followed by builtin ops only: `L2_NORMALIZATION` (in
  float: an int8 embedder's output norm is 1 only within a few percent),
  `FULLY_CONNECTED`
  (embeddings `(B, d)` x gallery `(N, d)` -> cosines `(B, N)`), `TOPK_V2` (int8: a
  re-scoring of candidates, below) and, with a
  stored threshold, `GREATER_EQUAL`. Inputs `images` uint8 `(B, H, W, 3)`; outputs
  `indices` int32 `(B, k)` (gallery rows, best first), `similarities` float32 `(B, k)`,
  and `match` bool `(B, k)` (`similarity >= threshold`) when the index holds one.
- a `search` signature in the SavedModel, the same function in TensorFlow.

The gallery constant (`gallery_dtype`):

- `"float16"`: the unit rows in float16 (2 bytes per value) and a `DEQUANTIZE` to
  float32 when the interpreter prepares the graph (cosine error <= ~1e-3).
- `"int8"`: each row `g` as the code `c = round(g / step)` in int8, `step = max|g| / 127`,
  with its own score-aware scale `s = |g|^2 / (c . g)` (1 byte per value + 16 per row):
  the decoded row `s c` has the projection `|g|` on `g`, so its error is orthogonal to
  `g` and a query parallel to `g` (a near neighbour) scores it exactly (the parallel
  term of ScaNN's score-aware loss, Guo et al., ICML 2020; docs/export.md). A
  per-channel quantized `FULLY_CONNECTED` weight, run by LiteRT's hybrid kernel (each
  query quantized to int8 on the fly), scores all rows; `TOPK_V2` keeps its best
  `max(4 k, 16)`, which `GATHER` (the same int8 bytes, no copy), `CAST`, `MUL` and `SUM`
  re-score with the float query before the final `TOPK_V2`: the query's int8 rounding
  no longer reorders near-ties, and the outputs are the SavedModel's float product with
  the decoded rows unless its top k lies outside those candidates.

The labels, paths, threshold, k and the fingerprints of the index and the model go in
the file's `"kdml"` metadata and its sidecar `<file>.json`, which the TF-free kit
(`export/kdml_litert.py`, `SearchModel`) reads.

A constant gallery is searched in full for every query, and the whole file is loaded
in memory: past `MAX_SEARCH_ITEMS` items (measured, docs/export.md) an approximate
index (`python -m kdml.index build --backend=faiss`) serves better; the export says so.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from kdml.embedding import read_gallery
from kdml.evaluation.threshold import calibrate_threshold, leave_one_out_top1, rates_at
from kdml.evaluation.verification import normalized_rows
from kdml.export.saved_model import serving_function

GALLERY_DTYPES = ("float16", "int8")
MAX_SEARCH_ITEMS = 100_000
DEFAULT_K = 5
RESCORED_PER_RESULT, MIN_RESCORED = 4, 16  # int8: max(4 k, 16) rows re-scored in float


def search_filename(quantization: str) -> str:
    return f"embedder_{quantization}_search.tflite"


def load_search_gallery(index_path: str, model_entry: Optional[dict], *,
                        max_items: int = MAX_SEARCH_ITEMS, allow_model_mismatch: bool = False):
    """Loads and checks a `kdml.index` directory for a search model of the model
    `model_entry` (`kdml.embedding.model_fingerprint`); one-line ValueErrors otherwise.

    Returns:
        The `kdml.embedding.StoredGallery` (the index's items, without its search backend).
    """
    index = read_gallery(index_path)  # empty / NaN / partial: refused
    if model_entry is not None and not allow_model_mismatch:
        if not index.model:
            raise ValueError(
                f"The gallery {index_path} holds vectors of unknown origin (no model entry), so "
                "its rows cannot be checked against --model: rebuild it with python -m "
                f"kdml.index build --model={model_entry.get('path')} ...")
        index.check_model(model_entry)
    if len(index) > max_items:
        raise ValueError(
            f"The gallery {index_path} has {len(index):,} items; a search model scans a "
            f"constant gallery in full for every query and is only written up to "
            f"{max_items:,} (docs/export.md): serve it with python -m kdml.index (e.g. "
            "--backend=faiss) instead, or pass a smaller index.")
    return index


def encode_gallery(embeddings, gallery_dtype: str) -> dict:
    """`{"dtype", "values" (N, d) float16 | int8, "scale" (N,) float32 (int8 only)}` of
    unit rows (module docstring)."""
    if gallery_dtype not in GALLERY_DTYPES:
        raise ValueError(f"Expected a gallery dtype in {GALLERY_DTYPES}. Received: "
                         f"{gallery_dtype!r}")
    g = np.asarray(embeddings, np.float32)
    if g.ndim != 2 or len(g) == 0 or not np.isfinite(g).all():
        raise ValueError(f"Expected a non-empty, finite (N, d) gallery. Received: shape "
                         f"{g.shape}, finite: {bool(np.isfinite(g).all())}")
    if gallery_dtype == "float16":
        return {"dtype": "float16", "values": g.astype(np.float16)}
    step = np.maximum(np.abs(g).max(axis=1), 1e-12) / 127.0
    values = np.clip(np.round(g / step[:, None]), -127, 127).astype(np.int8)
    # score-aware scale (ScaNN's parallel error, docs/export.md): s = |g|^2 / (c . g) makes
    # the decoded row's projection on g equal |g|, so a query parallel to g scores exactly
    parallel = (values.astype(np.float64) * g).sum(axis=1)
    scale = np.where(parallel > 0, (g.astype(np.float64) ** 2).sum(axis=1)
                     / np.where(parallel > 0, parallel, 1.0), step).astype(np.float32)
    return {"dtype": "int8", "values": values, "scale": scale}


def decode_gallery(encoded: dict) -> np.ndarray:
    """The float32 `(N, d)` gallery the search model scores against."""
    values = encoded["values"].astype(np.float32)
    return values * encoded["scale"][:, None] if encoded["dtype"] == "int8" else values


DUPLICATE_SLACK = 1e-5  # float rounding between NumPy's and LiteRT's re-scoring


def check_search_threshold(index_threshold: dict, queries, reference, labels,
                           encoded: dict) -> dict:
    """The "no match" threshold of one search model, re-checked on the index's
    calibration data as that model scores it.

    The index's threshold was calibrated on float32 embeddings; a search model scores
    its query embedder's (float16, dynamic or int8 `.tflite`) against the gallery
    stored as float16 or int8, and an exact duplicate of a gallery image loses up to
    ~1e-3 of its cosine there. So, with the index's target (`index_threshold["target"]`):

    1. `calibrate_threshold(queries, labels, gallery=decoded)`: each calibration image
       through this model's embedder against the other calibration images as this
       model stores gallery rows (`encode_gallery` then `decode_gallery` of their
       float32 embeddings `reference`);
    2. capped at the lowest duplicate score `min_i q_i . decoded_i` (less
       `DUPLICATE_SLACK`): an exact duplicate of a gallery image is a match in every
       search model, as in the float32 index (where it scores 1.0).

    Args:
        index_threshold: the index's `threshold` entry (`GalleryIndex.set_threshold`).
        queries: `(N, d)` the calibration images through this model's embedder.
        reference: `(N, d)` the same images through the model that built the index.
        labels: `(N,)` their classes.
        encoded: this model's gallery encoding (`encode_gallery`).

    Returns:
        The threshold entry this model stores: `"value"`, the rates it achieves on the
        calibration set (`"precision"`, `"recall"`, `"far"`, `"accepted"`,
        `"acceptance"`, ...), `"index_value"` (the index's), `"duplicate_floor"` and
        `"limited_by"`: `"target"`, `"duplicates"` (step 2 lowered it) or `"unreachable"`
        (no threshold meets the target on this model: the duplicate floor, whose
        rates are reported).
    """
    queries = normalized_rows(queries, "queries")
    decoded = normalized_rows(decode_gallery(encode_gallery(reference, encoded["dtype"])),
                              "gallery")
    labels = np.asarray(labels)
    target = dict(index_threshold.get("target") or {"precision": 0.95})
    options = {f"target_{name}": value for name, value in target.items()}
    floor = float(np.einsum("nd,nd->n", queries, decoded).min()) - DUPLICATE_SLACK
    try:
        result = calibrate_threshold(queries, labels, gallery=decoded, warn=False, **options)
        limited_by = "target"
    except ValueError:  # the target cannot be met on this model's scores
        result, limited_by = None, "unreachable"
    if result is None or result["threshold"] > floor:
        similarity, correct = leave_one_out_top1(queries, labels, gallery=decoded)
        _, class_of, size = np.unique(labels, return_inverse=True, return_counts=True)
        result = rates_at(floor, similarity, correct, queries, labels, target=target,
                          known=int((size[class_of] > 1).sum()), gallery=decoded, warn=False)
        limited_by = "duplicates" if limited_by == "target" else limited_by
    keep = {k: v for k, v in index_threshold.items()
            if k not in result and k not in ("value", "checked")}
    return {**keep, "value": float(result["threshold"]),
            **{k: v for k, v in result.items() if k != "threshold"},
            "index_value": float(index_threshold["value"]), "duplicate_floor": floor,
            "limited_by": limited_by, "checked": True}


def search_metadata(index, encoded: dict, k: int, *, model_entry: Optional[dict],
                    base: Optional[dict] = None, threshold: Optional[dict] = None) -> dict:
    """The `"kdml"` metadata of a search model: the embedder's entries plus `search`,
    `labels` and `paths`. `threshold`: this model's threshold entry
    (`check_search_threshold`; default: the index's)."""
    threshold = threshold if threshold is not None else index.threshold
    return {**(base or {}),
            "search": {"k": int(k), "gallery_items": len(index), "gallery_dtype": encoded["dtype"],
                       "rescored_candidates": (rescored_candidates(k, len(index))
                                               if encoded["dtype"] == "int8" else None),
                       "embedding_dim": index.dim, "similarity": "cosine",
                       "outputs": ["indices", "similarities"] + (["match"] if threshold else []),
                       "threshold": threshold, "index": os.path.abspath(index.directory or ""),
                       "index_model": index.model, "model": model_entry},
            "labels": index.labels.tolist(), "paths": index.paths.tolist()}


def append_search(embedder_tflite: bytes, encoded: dict, k: int,
                  threshold: Optional[float] = None) -> bytes:
    """A `.tflite` embedder (input `images`, output `(B, d)` embeddings) followed by the
    gallery search (module docstring); returns the new flatbuffer."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(embedder_tflite), 0)
    graph = model.subgraphs[0]
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ValueError("Expected a kdml embedder .tflite: one input (images), one output "
                         f"(embeddings). Received: {len(graph.inputs)} inputs, "
                         f"{len(graph.outputs)} outputs.")
    images, embeddings = graph.inputs[0], graph.outputs[0]
    num_items, dim = encoded["values"].shape
    if list(graph.tensors[embeddings].shape)[-1] != dim:
        raise ValueError(f"The embedder gives {graph.tensors[embeddings].shape[-1]}-d "
                         f"embeddings, the gallery has {dim} columns.")
    k = int(min(k, num_items))
    if k < 1:
        raise ValueError(f"Expected k >= 1. Received: k={k}")
    types, ops = schema.TensorType, schema.BuiltinOperator

    def buffer(array=None):
        entry = schema.BufferT()
        if array is not None:
            entry.data = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8)
        model.buffers.append(entry)
        return len(model.buffers) - 1

    def tensor(name, shape, dtype, data=None, signature=None, quantization=None,
               shared_buffer=None):
        entry = schema.TensorT()
        entry.name, entry.shape, entry.type = name, list(shape), dtype
        entry.buffer = buffer(data) if shared_buffer is None else shared_buffer
        if signature is not None:
            entry.shapeSignature = list(signature)
        if quantization is not None:
            entry.quantization = quantization
        graph.tensors.append(entry)
        return len(graph.tensors) - 1

    def opcode(builtin):
        for i, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return i
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def operator(builtin, inputs, outputs, options_type=0, options=None):
        entry = schema.OperatorT()
        entry.opcodeIndex, entry.inputs, entry.outputs = opcode(builtin), inputs, outputs
        entry.builtinOptionsType, entry.builtinOptions = options_type, options
        graph.operators.append(entry)

    if encoded["dtype"] == "float16":
        stored = tensor("gallery_float16", (num_items, dim), types.FLOAT16, encoded["values"])
        weights = tensor("gallery", (num_items, dim), types.FLOAT32)
        operator(ops.DEQUANTIZE, [stored], [weights])
    else:
        quantization = schema.QuantizationParametersT()
        quantization.scale = encoded["scale"].astype(np.float32).tolist()
        quantization.zeroPoint = [0] * num_items
        quantization.quantizedDimension = 0
        weights = tensor("gallery_int8", (num_items, dim), types.INT8, encoded["values"],
                         quantization=quantization)
    # int8 embedders' outputs have a norm of 1 only within a few percent (their int8
    # L2_NORMALIZATION has a 1/128 step): renormalise in float, so cosines are cosines
    unit = tensor("query_embeddings", (1, dim), types.FLOAT32, signature=(-1, dim))
    operator(ops.L2_NORMALIZATION, [embeddings], [unit], schema.BuiltinOptions.L2NormOptions,
             schema.L2NormOptionsT())
    embeddings = unit
    scores = tensor("cosines", (1, num_items), types.FLOAT32, signature=(-1, num_items))
    fully_connected = schema.FullyConnectedOptionsT()
    fully_connected.asymmetricQuantizeInputs = True  # hybrid int8: per-query input range
    operator(ops.FULLY_CONNECTED, [embeddings, weights, -1], [scores],
             schema.BuiltinOptions.FullyConnectedOptions, fully_connected)

    def top_k(values, count, name):
        best = tensor(f"{name}_values", (1, count), types.FLOAT32, signature=(-1, count))
        where = tensor(f"{name}_indices", (1, count), types.INT32, signature=(-1, count))
        operator(ops.TOPK_V2, [values, tensor(f"{name}_k", (), types.INT32,
                                              np.array(count, np.int32))],
                 [best, where], schema.BuiltinOptions.TopKV2Options, schema.TopKV2OptionsT())
        return best, where

    def gather(params, positions, shape, dtype, name, axis=0, batch_dims=0):
        out = tensor(name, (1, *shape), dtype, signature=(-1, *shape))
        options = schema.GatherOptionsT()
        options.axis, options.batchDims = axis, batch_dims
        operator(ops.GATHER, [params, positions], [out], schema.BuiltinOptions.GatherOptions,
                 options)
        return out

    if encoded["dtype"] == "float16":
        similarities, indices = top_k(scores, k, "top")
    else:
        # the hybrid kernel quantizes each query to int8 (its own range): re-score its
        # best `candidates` rows with the float query, int8 codes x float row scales
        candidates = rescored_candidates(k, num_items)
        _, rows = top_k(scores, candidates, "candidate")
        codes = tensor("gallery_codes", (num_items, dim), types.INT8,
                       shared_buffer=graph.tensors[weights].buffer)  # same bytes, no copy
        picked = gather(codes, rows, (candidates, dim), types.INT8, "candidate_codes")
        picked_float = tensor("candidate_rows", (1, candidates, dim), types.FLOAT32,
                              signature=(-1, candidates, dim))
        operator(ops.CAST, [picked], [picked_float])
        query_rows = tensor("query_rows", (1, 1, dim), types.FLOAT32, signature=(-1, 1, dim))
        reshape = schema.ReshapeOptionsT()
        reshape.newShape = [-1, 1, dim]
        operator(ops.RESHAPE, [embeddings, tensor("query_rows_shape", (3,), types.INT32,
                                                   np.array([-1, 1, dim], np.int32))],
                 [query_rows], schema.BuiltinOptions.ReshapeOptions, reshape)
        products = tensor("candidate_products", (1, candidates, dim), types.FLOAT32,
                          signature=(-1, candidates, dim))
        operator(ops.MUL, [picked_float, query_rows], [products],
                 schema.BuiltinOptions.MulOptions, schema.MulOptionsT())
        dots = tensor("candidate_dots", (1, candidates), types.FLOAT32,
                      signature=(-1, candidates))
        reducer = schema.ReducerOptionsT()
        reducer.keepDims = False
        operator(ops.SUM, [products, tensor("candidate_axis", (1,), types.INT32,
                                            np.array([2], np.int32))], [dots],
                 schema.BuiltinOptions.ReducerOptions, reducer)
        row_scale = gather(tensor("gallery_scale", (num_items,), types.FLOAT32,
                                  encoded["scale"].astype(np.float32)),
                           rows, (candidates,), types.FLOAT32, "candidate_scale")
        cosines = tensor("candidate_cosines", (1, candidates), types.FLOAT32,
                         signature=(-1, candidates))
        operator(ops.MUL, [dots, row_scale], [cosines], schema.BuiltinOptions.MulOptions,
                 schema.MulOptionsT())
        similarities, order = top_k(cosines, k, "top")
        indices = gather(rows, order, (k,), types.INT32, "top_rows", axis=1, batch_dims=1)
    similarities = _renamed(graph, similarities, "similarities")
    indices = _renamed(graph, indices, "indices")
    outputs = {"indices": indices, "similarities": similarities}
    if threshold is not None:
        match = tensor("match", (1, k), types.BOOL, signature=(-1, k))
        operator(ops.GREATER_EQUAL,
                 [similarities, tensor("threshold", (), types.FLOAT32,
                                       np.array(threshold, np.float32))], [match])
        outputs["match"] = match
    graph.outputs = list(outputs.values())
    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = "search", 0

    def tensor_map(name, index):
        entry = schema.TensorMapT()
        entry.name, entry.tensorIndex = name, index
        return entry

    signature.inputs = [tensor_map("images", images)]
    signature.outputs = [tensor_map(name, index) for name, index in outputs.items()]
    model.signatureDefs = [signature]
    builder = flatbuffers.Builder(len(embedder_tflite) + encoded["values"].nbytes + 2**16)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def rescored_candidates(k: int, num_items: int) -> int:
    """How many of an int8 gallery's hybrid-kernel best rows the search model re-scores
    with the float query (module docstring)."""
    return int(min(num_items, max(RESCORED_PER_RESULT * k, MIN_RESCORED)))


def _renamed(graph, index: int, name: str) -> int:
    graph.tensors[index].name = name
    return index


def search_function(embedder, encoded: dict, k: int, threshold: Optional[float] = None):
    """`(serve, spec, variables)`: the SavedModel's `search` signature, uint8 images ->
    `{"indices" int32, "similarities" float32, ["match" bool]}` `(B, k)`, over the same
    stored gallery (float16, or int8 and its row scales, as non-trainable variables)."""
    import tensorflow as tf

    serve_embeddings, spec = serving_function(embedder)
    values = tf.Variable(encoded["values"], trainable=False, name="search_gallery")
    scale = (tf.Variable(encoded["scale"], trainable=False, name="search_gallery_scale")
             if encoded["dtype"] == "int8" else None)
    k = int(min(k, encoded["values"].shape[0]))

    def serve(images):
        queries = serve_embeddings(images)["embeddings"]
        gallery = tf.cast(values, tf.float32)
        if scale is not None:
            gallery = gallery * scale[:, None]
        cosines = tf.linalg.matmul(queries, gallery, transpose_b=True)
        similarities, indices = tf.math.top_k(cosines, k=k)
        out = {"indices": tf.cast(indices, tf.int32), "similarities": similarities}
        if threshold is not None:
            out["match"] = similarities >= tf.constant(threshold, tf.float32)
        return out

    return serve, spec, [v for v in (values, scale) if v is not None]
