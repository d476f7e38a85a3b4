"""The search model (`python -m kdml.export --gallery=`): its top-k against the exact index,
in LiteRT, in the SavedModel's `search` signature and in the TF-free kit; bad galleries."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kdml
from kdml.embedding import load_uint8
from kdml.embedding.gallery_files import write_index_files
from kdml.export import load_embedder
from kdml.export.exporter import export_embedder
from kdml.export.search import decode_gallery, encode_gallery, load_search_gallery
from kdml.index import GalleryIndex, build_index, model_fingerprint
from kdml.embedding import load_source
from tests.helpers import write_glyph_folder

SIZE, DIM, K = 16, 16, 4
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """An untrained conv4 (16 px, d = 16), its index of 72 glyphs (threshold 0.5 stored),
    and the 72 images as uint8."""
    root = tmp_path_factory.mktemp("search")
    keras.utils.set_random_seed(0)
    model = str(root / "embedder.keras")
    kdml.models.build_embedder("conv4", embedding_dim=DIM, image_size=SIZE).save(model)
    folder = write_glyph_folder(root / "glyphs")
    index = build_index(model, f"folder:{folder}", str(root / "g.index"))
    index.set_threshold({"threshold": 0.5, "target": {"precision": 0.9}}, "by hand")
    index.save(str(root / "g.index"))
    images = load_uint8(load_source(f"folder:{folder}"), SIZE)
    return {"root": root, "model": model, "index": str(root / "g.index"), "images": images,
            "entry": model_fingerprint(load_embedder(model))}


def _run_search(path, images):
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=path).get_signature_runner("search")
    return runner(images=images)


@pytest.mark.parametrize("gallery_dtype", ["float16", "int8"])
def test_search_model_returns_the_exact_top_k(gallery, tmp_path, gallery_dtype):
    import tensorflow as tf

    index = load_search_gallery(gallery["index"], gallery["entry"])
    paths = export_embedder(gallery["model"], str(tmp_path), quantizations=("float32",),
                            search={"index": index, "gallery_dtype": gallery_dtype, "k": K,
                                    "model": gallery["entry"]})
    images = gallery["images"]
    found = _run_search(paths["search_float32"], images)
    assert found["indices"].shape == found["similarities"].shape == (len(images), K)
    # the exact index's top-k of the embedder file's embeddings
    queries = load_embedder(paths["tflite_float32"]).embed(images)
    exact = GalleryIndex.load(gallery["index"], backend="exact").query(queries, k=K + 1)
    scores = queries @ index.embeddings.T
    # every returned item is a true top-k item: its exact cosine equals the exact k-th best
    # ones up to the gallery encoding's error (float16 ~1e-3; int8 ~1e-2)
    tol = 2e-3 if gallery_dtype == "float16" else 2e-2
    np.testing.assert_allclose(np.take_along_axis(scores, found["indices"], 1),
                               exact.similarities[:, :K], atol=tol)
    np.testing.assert_allclose(found["similarities"], exact.similarities[:, :K], atol=tol)
    # the similarities are the float query's products with the stored rows (float16's
    # DEQUANTIZE is exact; int8 candidates are re-scored with the unquantized query)
    decoded = queries @ decode_gallery(encode_gallery(index.embeddings, gallery_dtype)).T
    np.testing.assert_allclose(found["similarities"],
                               np.sort(decoded, axis=1)[:, ::-1][:, :K], atol=1e-5)
    # where the exact ranking has no near-tie (the rank's gaps to the exact cosines above
    # and below it exceed twice the encoding's largest score error), the returned item is
    # the exact index's item of that rank
    error = np.abs(decoded - scores).max()
    gaps = -np.diff(exact.similarities, axis=1) > 2 * error + 1e-5  # rank r vs r + 1
    clear = gaps & np.pad(gaps[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    assert clear[:, 0].sum() >= 3 * len(images) // 4, (clear.sum(0), error)  # not vacuous
    np.testing.assert_array_equal(found["indices"][clear], exact.indices[:, :K][clear])
    # the calibrated threshold: match = similarity >= 0.5
    np.testing.assert_array_equal(found["match"], found["similarities"] >= np.float32(0.5))
    # the SavedModel's `search` signature computes the same: the float query's products
    # with the same decoded rows (int8: what the .tflite's re-scoring computes)
    signature = tf.saved_model.load(paths["saved_model"]).signatures["search"]
    saved = {k: v.numpy() for k, v in signature(images=tf.constant(images)).items()}
    np.testing.assert_allclose(saved["similarities"], found["similarities"], atol=1e-4)
    np.testing.assert_array_equal(saved["match"], saved["similarities"] >= np.float32(0.5))
    info = json.load(open(paths["search_float32"] + ".json"))
    assert info["labels"] == index.labels.tolist() and info["paths"] == index.paths.tolist()
    assert info["search"]["gallery_dtype"] == gallery_dtype and info["search"]["k"] == K
    assert info["search"]["rescored_candidates"] == (16 if gallery_dtype == "int8" else None)
    assert info["search"]["threshold"]["value"] == 0.5
    from kdml.export.tflite import tflite_ops

    ops = {op["op"] for op in tflite_ops(open(paths["search_float32"], "rb").read())}
    assert {"FULLY_CONNECTED", "TOPK_V2", "GREATER_EQUAL"} <= ops
    if gallery_dtype == "int8":  # the re-scoring reads the FULLY_CONNECTED weights' bytes
        assert {"GATHER", "CAST", "MUL", "SUM"} <= ops
        assert _buffer_of(paths["search_float32"], "gallery_codes") == _buffer_of(
            paths["search_float32"], "gallery_int8")
    size = os.path.getsize(paths["search_float32"]) - os.path.getsize(paths["tflite_float32"])
    bytes_per_value = 2 if gallery_dtype == "float16" else 1
    assert size >= len(index) * DIM * bytes_per_value


def test_the_kit_runs_the_search_model_without_tensorflow(gallery, tmp_path):
    index = load_search_gallery(gallery["index"], gallery["entry"])
    paths = export_embedder(gallery["model"], str(tmp_path), formats=("tflite",),
                            quantizations=("float32",),
                            search={"index": index, "gallery_dtype": "int8", "k": K,
                                    "model": gallery["entry"]})
    files = index.paths[::12].tolist()
    script = textwrap.dedent(f"""
        import sys, json
        for name in ("tensorflow", "kdml", "keras", "tf_keras"):
            sys.modules[name] = None
        sys.path.insert(0, {os.path.join(REPO, 'export')!r})
        import kdml_litert as kit
        model = kit.SearchModel({paths['search_float32']!r}, num_threads=1)
        print(json.dumps(model.search_files({files!r})))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    hits = json.loads(result.stdout.strip().splitlines()[-1])
    found = _run_search(paths["search_float32"], np.stack(
        [_kit_image(f) for f in files]))
    for q, record in enumerate(hits):
        # the query is a gallery file: its own row is left out of its results (k - 1 left)
        keep = index.paths[found["indices"][q]] != files[q]
        assert (~keep).sum() == 1
        rows = found["indices"][q][keep]
        assert record["query"] == files[q] and record["label"] == index.labels[
            index.paths.tolist().index(files[q])]
        assert [h["index"] for h in record["neighbours"]] == rows.tolist()
        assert [h["label"] for h in record["neighbours"]] == index.labels[rows].tolist()
        assert [h["path"] for h in record["neighbours"]] == index.paths[rows].tolist()
        assert [h["label_match"] for h in record["neighbours"]] == (
            index.labels[rows] == record["label"]).tolist()
        assert [h["accepted"] for h in record["neighbours"]] == (
            found["similarities"][q][keep] >= 0.5).tolist()
        assert record["no_match"] == (not found["similarities"][q][keep][0] >= 0.5)


def _buffer_of(path, tensor_name):
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(open(path, "rb").read()), 0)
    (buffer,) = [t.buffer for t in model.subgraphs[0].tensors
                 if t.name.decode() == tensor_name]
    return buffer


def _kit_image(path):
    sys.path.insert(0, os.path.join(REPO, "export"))
    import kdml_litert

    return kdml_litert.load_image(path, (SIZE, SIZE))


def _bad_index(path, embeddings, model):
    labels = np.array(["a"] * len(embeddings))
    write_index_files(path, embeddings, labels, labels, {
        "model": model, "similarity": "cosine", "seed": 0,
        "backend": {"name": "exact", "config": {}}})
    return path


def test_bad_galleries_are_one_line_errors_and_write_nothing(gallery, tmp_path):
    # python -m kdml.export in its own process: its absl flags (a required --model, an
    # --output_dir) must not join the flags of the commands other tests run in this one
    import subprocess
    import sys

    keras.utils.set_random_seed(5)
    other = str(tmp_path / "other.keras")
    kdml.models.build_embedder("conv4", embedding_dim=DIM, image_size=SIZE).save(other)
    nan = np.ones((3, DIM), np.float32)
    nan[1, 2] = np.nan
    cases = {
        "another model": (gallery["index"], other, "was built by model"),
        "empty": (_bad_index(str(tmp_path / "empty.index"), np.zeros((0, DIM), np.float32),
                             gallery["entry"]), gallery["model"], "is empty"),
        "nan": (_bad_index(str(tmp_path / "nan.index"), nan, gallery["entry"]),
                gallery["model"], "not finite"),
    }
    for name, (index, model, expected) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        result = subprocess.run(
            [sys.executable, "-m", "kdml.export", f"--model={model}", f"--gallery={index}",
             f"--output_dir={out}", "--quantization=float32", "--noparity"],
            capture_output=True, text=True)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        err = result.stderr.strip().splitlines()[-1]
        assert err.startswith("error: ") and expected in err, (name, err)
        assert not out.exists(), name
    with pytest.raises(ValueError, match="serve it with python -m kdml.index"):
        load_search_gallery(gallery["index"], gallery["entry"], max_items=10)


def test_int8_rows_keep_their_own_scale_and_score_parallel_queries_exactly():
    rng = np.random.default_rng(0)
    g = rng.normal(size=(50, 32)).astype(np.float32)
    g[7] *= 1e-3  # a tiny row keeps its relative precision with its own scale
    g[9] = 0.0  # a zero row decodes to zero, not NaN
    encoded = encode_gallery(g, "int8")
    assert encoded["values"].dtype == np.int8 and encoded["scale"].shape == (50,)
    # codes: each row rounded on its own grid, step max|g| / 127
    step = np.maximum(np.abs(g).max(axis=1), 1e-12) / 127
    codes = np.round(g / step[:, None])
    np.testing.assert_array_equal(encoded["values"], codes)
    # scale: |g|^2 / (c . g), the decoded row's projection on g is |g| (zero parallel error)
    dot = (codes * g.astype(np.float64)).sum(axis=1)
    norm2 = (g.astype(np.float64) ** 2).sum(axis=1)
    live = np.arange(50) != 9
    np.testing.assert_allclose(encoded["scale"][live], norm2[live] / dot[live], rtol=1e-6)
    decoded = decode_gallery(encoded)
    assert np.isfinite(decoded).all() and not decoded[9].any()
    np.testing.assert_allclose((decoded * g).sum(axis=1)[live], norm2[live], rtol=1e-5)
    # the scale stays within 1 % of the grid's step, so |g_i - s c_i| <= step / 2 +
    # 127 |s - step|
    np.testing.assert_allclose(encoded["scale"][live], step[live], rtol=1e-2)
    error = np.abs(decoded - g).max(axis=1)
    assert (error <= step / 2 + 127 * np.abs(encoded["scale"] - step) + 1e-9).all()
    # one scale for the whole gallery would round row 7 to ~zero: an error of ~|g[7]|
    assert error[7] < 0.01 * np.abs(g).max() / 127
    # near-parallel unit queries (cosine ~0.95 to their row): the score error is mostly
    # the parallel one, which the scale removes; the grid's own scale keeps it
    rows = g[live] / np.linalg.norm(g[live], axis=1, keepdims=True)
    unit = encode_gallery(rows, "int8")
    noise = rng.normal(size=rows.shape)
    noise -= (noise * rows).sum(axis=1, keepdims=True) * rows
    queries = 0.95 * rows + np.sqrt(1 - 0.95 ** 2) * noise / np.linalg.norm(
        noise, axis=1, keepdims=True)
    grid = unit["values"] * (np.abs(rows).max(axis=1) / 127)[:, None]
    exact = (queries * rows).sum(axis=1)
    new_error = np.abs((queries * decode_gallery(unit)).sum(axis=1) - exact).mean()
    grid_error = np.abs((queries * grid).sum(axis=1) - exact).mean()
    assert new_error < 0.6 * grid_error, (new_error, grid_error)


def test_every_quantization_gets_its_search_file(gallery, tmp_path):
    """The search part is appended to each embedder file as it is (same quantization):
    each file's top-1 is the exact top-1 of that file's own embeddings."""
    from kdml.export.tflite import tflite_ops

    index = load_search_gallery(gallery["index"], gallery["entry"])
    exact_index = GalleryIndex.load(gallery["index"], backend="exact")
    calibration = np.random.default_rng(0).integers(0, 255, (16, SIZE, SIZE, 3), np.uint8)
    paths = export_embedder(gallery["model"], str(tmp_path), formats=("tflite",),
                            quantizations=("dynamic", "int8"), calibration_images=calibration,
                            search={"index": index, "gallery_dtype": "int8", "k": 1,
                                    "model": gallery["entry"]})
    for quantization in ("dynamic", "int8"):
        embedder_ops = tflite_ops(open(paths[f"tflite_{quantization}"], "rb").read())
        search_ops = tflite_ops(open(paths[f"search_{quantization}"], "rb").read())
        assert search_ops[:len(embedder_ops)] == embedder_ops  # the embedder, unchanged
        assert all(op["builtin"] for op in search_ops)
        found = _run_search(paths[f"search_{quantization}"], gallery["images"])
        queries = load_embedder(paths[f"tflite_{quantization}"]).embed(gallery["images"])
        exact = exact_index.query(queries, k=1)
        np.testing.assert_allclose(found["similarities"][:, 0], exact.similarities[:, 0],
                                   atol=2e-2)
        # int8 gallery: the re-scored best is the float query's best decoded row (the
        # search graph renormalises: an int8 embedder's norm is 1 only within ~1 %)
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        decoded = unit @ decode_gallery(encode_gallery(index.embeddings, "int8")).T
        np.testing.assert_allclose(found["similarities"][:, 0], decoded.max(axis=1), atol=1e-5)


def test_the_kit_query_answers_no_match_below_the_index_threshold(gallery, tmp_path):
    """`kdml_litert.py query` on an index that holds a threshold, TF-free."""
    index = GalleryIndex.load(gallery["index"], backend="exact")
    paths = export_embedder(gallery["model"], str(tmp_path), formats=("tflite",),
                            quantizations=("float32",))
    folder = write_glyph_folder(tmp_path / "queries", num_classes=6, images_per_class=2,
                                seed=11)  # glyphs the gallery does not hold
    queries = load_source(f"folder:{folder}")
    files = queries.paths.tolist()
    sys.path.insert(0, os.path.join(REPO, "export"))
    import kdml_litert  # in this process too: the kit's own image reading and embedding

    kit_embeddings = kdml_litert.Embedder(paths["tflite_float32"]).embed_files(files)
    top1 = kdml_litert.CosineIndex(index.embeddings, index.labels.tolist()).query(
        kit_embeddings, k=1)
    top1 = np.array([row[0][2] for row in top1], np.float32)
    index.set_threshold({"threshold": float(np.median(top1)), "target": {"far": 0.1}}, "test")
    index.save(str(tmp_path / "t.index"))  # half the queries above the threshold, half below
    script = textwrap.dedent(f"""
        import sys
        for name in ("tensorflow", "kdml", "keras", "tf_keras"):
            sys.modules[name] = None
        sys.path.insert(0, {os.path.join(REPO, 'export')!r})
        import kdml_litert as kit
        sys.exit(kit.main(["query", "--model", {paths['tflite_float32']!r}, "--index",
                           {str(tmp_path / 't.index')!r}, "--k=2", "--allow_model_mismatch",
                           *{files!r}]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    hits = json.loads(result.stdout)
    assert len(hits) == len(files)
    threshold = np.float32(np.median(top1))
    flags = [record["no_match"] for record in hits]
    np.testing.assert_array_equal(flags, top1 < threshold)
    assert any(flags) and not all(flags)


@pytest.mark.slow  # about 30 s: an int8 conversion and two calibrations
def test_each_search_model_rechecks_the_threshold_and_accepts_exact_duplicates(gallery,
                                                                              tmp_path):
    """Issue 33: a threshold calibrated near 1.0 on float32 embeddings, copied into an
    int8 search model, refused exact duplicates of gallery images there. The export now
    re-calibrates it on each model's own scores (same data, same target) and keeps it
    at or below the lowest duplicate score."""
    from kdml.evaluation.threshold import calibrate_threshold
    from kdml.export.search import DUPLICATE_SLACK
    from kdml.export.workflow import run_export

    import shutil

    from PIL import Image

    # the glyphs, and copies of class char00 filed as another class, one pixel
    # changed by 20 levels: impostor pairs at cosine ~0.99997, where FAR 0 puts the threshold
    folder = tmp_path / "glyphs"
    shutil.copytree(gallery["root"] / "glyphs", folder)
    os.makedirs(folder / "twin")
    for name in sorted(os.listdir(folder / "char00")):
        pixels = np.array(Image.open(folder / "char00" / name)).astype(int)
        pixels[10, 10] += np.where(pixels[10, 10] > 128, -20, 20)
        pixels = pixels.astype(np.uint8)
        Image.fromarray(pixels).save(folder / "twin" / name)
    source = f"folder:{folder}"
    output = str(tmp_path / "c.index")
    with pytest.warns(UserWarning, match="within 0.002 of 1.0"):  # the degenerate case
        index = build_index(gallery["model"], source, output, calibrate=source,
                            target_far=0.0)
    stored = index.threshold
    assert stored["calibration"]["source"] == source and stored["value"] > 0.998
    paths, _ = run_export(gallery["model"], str(tmp_path / "export"), formats=("tflite",),
                          quantizations=("float32", "int8"), dataset="synthetic",
                          calibration_count=32, parity=False, gallery=output,
                          gallery_dtype="int8", search_k=K)
    images = load_uint8(load_source(source), SIZE)  # the gallery's own: exact duplicates
    decoded = decode_gallery(encode_gallery(index.embeddings, "int8"))
    decoded /= np.linalg.norm(decoded, axis=1, keepdims=True)
    for quantization in ("float32", "int8"):
        found = _run_search(paths[f"search_{quantization}"], images)
        assert found["match"][:, 0].all(), quantization  # every duplicate is a match
        entry = json.load(open(paths[f"search_{quantization}"] + ".json"))["search"]
        entry = entry["threshold"]
        # independently: the calibration on this model's scores, capped at the duplicates
        queries = load_embedder(paths[f"tflite_{quantization}"]).embed(images)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        labels = load_source(source).labels
        want = calibrate_threshold(queries, labels, gallery=decoded, target_far=0.0,
                                   warn=False)["threshold"]
        floor = float(np.einsum("nd,nd->n", queries, decoded).min()) - DUPLICATE_SLACK
        assert entry["value"] == pytest.approx(min(want, floor), abs=2e-6)
        assert entry["limited_by"] == ("target" if want <= floor else "duplicates")
        assert entry["index_value"] == stored["value"] and entry["checked"]
        assert entry["duplicate_floor"] == pytest.approx(floor, abs=2e-6)
        assert entry["queries"] == len(images) and 0 <= entry["far"] <= 1
        if quantization == "int8":  # the index's threshold would have refused duplicates
            assert (found["similarities"][:, 0] < np.float32(stored["value"])).any()
            assert entry["value"] < stored["value"]


def test_an_unreadable_calibration_source_keeps_the_threshold_unchecked_with_a_warning():
    from kdml.export.workflow import _search_calibration

    threshold = {"value": 0.5, "target": {"precision": 0.9}, "source": "by hand"}
    with pytest.warns(UserWarning) as caught:
        assert _search_calibration(threshold, "unused.keras") is None
    (line,) = [str(w.message) for w in caught]
    assert line.startswith("the search models keep the index's threshold 0.5000 unchecked: "
                           "its calibration data 'by hand' cannot be read") and "\n" not in line
    assert line.endswith("pass --search_calibration=<labelled source> to re-check it on each "
                         "model.")
    with pytest.raises(ValueError):  # a source the user names must be read
        _search_calibration(threshold, "unused.keras", source="by hand")
