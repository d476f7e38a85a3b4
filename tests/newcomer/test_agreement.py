"""The same queries through `python -m kdml.index query`, the kit's `query` and `search`
and `SearchModel.search_files` give the same JSON records, field by field; the kit's
`index` labels a folder as `kdml.index build` does.

Queries: gallery files (absolute, and relative from the gallery folder: left out of
their own results), a copy of a gallery image in a new class folder under the gallery
root (labelled by its path below the root) and one outside every gallery root (its
folder's name). Every tool reads the same 16 px pixels (`--crop_fraction=1`) with the
same float32 `.tflite` embedder; the search model's float16 gallery moves cosines by
up to ~1e-3, the other tools agree to 1e-5.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KIT = os.path.join(REPO, "export", "kdml_litert.py")
K = 4  # 4 images a class: a gallery file has 3 same-class neighbours, then others


def _kit():
    spec = importlib.util.spec_from_file_location("kdml_litert", KIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kit_json(argv, cwd):
    result = subprocess.run([sys.executable, KIT, *argv], cwd=cwd, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def queries(newcomer, tmp_path_factory):
    gallery = newcomer["gallery"]
    new_class = os.path.join(gallery, "alpha1", "char09")  # under the root: "alpha1/char09"
    outside = str(tmp_path_factory.mktemp("elsewhere") / "mystery")
    for folder in (new_class, outside):
        os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(gallery, "alpha0", "char01", "1_0.png"),
                os.path.join(new_class, "copy.png"))
    shutil.copy(os.path.join(gallery, "alpha1", "char03", "7_2.png"),
                os.path.join(outside, "copy.png"))
    yield [os.path.join(gallery, "alpha0", "char00", "0_0.png"),
           os.path.join(gallery, "alpha1", "char02", "6_3.png"),
           os.path.join("alpha0", "char03", "3_1.png"),  # relative to the gallery folder
           os.path.join(new_class, "copy.png"), os.path.join(outside, "copy.png")]
    shutil.rmtree(new_class)


def test_index_query_kit_query_search_and_search_files_agree_field_by_field(
        newcomer, queries, tmp_path, monkeypatch):
    from kdml.index.__main__ import main

    gallery = newcomer["gallery"]
    monkeypatch.chdir(gallery)
    crop = "--crop_fraction=1"
    assert main(["query", f"--index={newcomer['index']}", f"--model={newcomer['tflite']}",
                 "--allow_model_mismatch", f"--k={K}", crop, f"--output_dir={tmp_path}",
                 *queries]) == 0
    with open(tmp_path / "query.json") as f:
        server = json.load(f)
    kit_query = _kit_json(["query", f"--model={newcomer['tflite']}",
                           f"--index={newcomer['index']}", "--allow_model_mismatch", f"--k={K}",
                           crop, *queries], gallery)
    kit_search = _kit_json(["search", f"--model={newcomer['search']}", f"--k={K}", crop,
                            *queries], gallery)
    records = _kit().SearchModel(newcomer["search"]).search_files(queries, crop_fraction=1.0, k=K)

    # the expected labels and self-exclusion, derived by hand
    assert [r["label"] for r in server] == ["alpha0/char00", "alpha1/char02", "alpha0/char03",
                                            "alpha1/char09", "mystery"]
    own = [os.path.realpath(q) for q in queries[:3]]
    for record, path in zip(server, own):
        assert path not in {os.path.realpath(n["path"]) for n in record["neighbours"]}
    # the copies' own image is their best neighbour, with the gallery's label
    assert server[3]["neighbours"][0]["path"].endswith("alpha0/char01/1_0.png")
    assert server[4]["neighbours"][0]["label"] == "alpha1/char03"
    for record in server:
        assert record["threshold"] == pytest.approx(newcomer["threshold"])
        assert len(record["neighbours"]) == K
        for n in record["neighbours"]:
            assert n["label_match"] == (n["label"] == record["label"])
            assert n["accepted"] == (np.float32(n["similarity"]) >=
                                     np.float32(record["threshold"]))
        assert record["no_match"] == (not record["neighbours"][0]["accepted"])
    # same-class neighbours are accepted, the others not (the threshold splits them)
    assert any(n["accepted"] for r in server for n in r["neighbours"])
    assert not all(n["accepted"] for r in server for n in r["neighbours"])

    for name, other, tolerance in (("kit query", kit_query, 1e-5),
                                   ("kit search", kit_search, 3e-3),
                                   ("SearchModel.search_files", records, 3e-3)):
        assert len(other) == len(server), name
        for mine, theirs in zip(server, other):
            assert list(theirs) == list(mine), (name, list(theirs))  # same fields, same order
            for field in ("query", "label", "threshold", "no_match"):
                assert theirs[field] == pytest.approx(mine[field]), (name, field)
            assert len(theirs["neighbours"]) == len(mine["neighbours"]), name
            for a, b in zip(mine["neighbours"], theirs["neighbours"]):
                assert list(b) == list(a), (name, list(b))
                for field in ("index", "label", "path", "label_match", "accepted"):
                    assert b[field] == a[field], (name, mine["query"], field, a, b)
                assert b["similarity"] == pytest.approx(a["similarity"], abs=tolerance), name


def test_the_kit_labels_a_folder_as_kdml_index_build(newcomer, tmp_path):
    """A tree with two levels, a one-level class, images beside sub-folders (ignored),
    hidden files and folders, an upper-case extension and a single-image class."""
    from PIL import Image

    from kdml.embedding import load_source

    root = tmp_path / "tree"
    pixels = np.full((16, 16, 3), 200, np.uint8)
    files = ["Latin/a/1.png", "Latin/a/2.PNG", "Latin/b/1.jpg", "Greek/alpha/x.bmp",
             "flat/1.png", "flat/2.gif", "single/only.png", "Latin/beside.png",
             ".hidden/c/1.png", "Latin/a/.dot.png", "Latin/a/notes.txt"]
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            path.write_text("x")
        else:
            fmt = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP", ".gif": "GIF"}[
                os.path.splitext(name)[1].lower()]
            Image.fromarray(pixels).save(path, format=fmt)
    images = load_source(f"folder:{root}")
    kdml_labels = np.asarray(images.class_names)[images.labels].tolist()
    kit = _kit()
    paths, labels = kit.gallery_files(str(root))
    assert labels == kdml_labels
    assert paths == images.paths.tolist()
    assert labels == ["Greek/alpha", "Latin/a", "Latin/a", "Latin/b", "flat", "flat", "single"]
    assert kit.IMAGE_EXTENSIONS == __import__(
        "kdml.data.sources.folder", fromlist=["IMAGE_EXTENSIONS"]).IMAGE_EXTENSIONS


def test_the_kit_index_of_the_nested_gallery_equals_kdml_index_build(newcomer, tmp_path):
    from kdml.index import GalleryIndex

    out = str(tmp_path / "kit.index")
    result = subprocess.run([sys.executable, KIT, "index", f"--model={newcomer['tflite']}",
                             f"--gallery={newcomer['gallery']}", f"--index={out}",
                             "--crop_fraction=1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    ours, theirs = GalleryIndex.load(newcomer["index"]), GalleryIndex.load(out)
    assert theirs.labels.tolist() == ours.labels.tolist()
    assert theirs.paths.tolist() == ours.paths.tolist()
    assert sorted(set(ours.labels.tolist())) == [f"alpha{c // 4}/char{c % 4:02d}"
                                                 for c in range(8)]
    np.testing.assert_allclose(theirs.embeddings, ours.embeddings, atol=1e-5)
