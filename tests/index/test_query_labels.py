"""Query files labelled in the gallery's terms: a nested `<root>/<group>/<class>/` gallery."""

import json
import os

import numpy as np
import pytest

from kdml.embedding.query_labels import label_query_files
from kdml.index import GalleryIndex
from kdml.index.__main__ import main
from tests.helpers import write_glyph_folder


@pytest.fixture(scope="module")
def nested_gallery(tmp_path_factory):
    """6 classes in 2 groups (`g0/c00` ...), 6 images each, and a copy of class 5 outside."""
    root = tmp_path_factory.mktemp("nested")
    folder = write_glyph_folder(root / "gallery", num_classes=6, images_per_class=6,
                                class_dir=lambda label: f"g{label % 2}/c{label:02d}")
    return folder


def test_labels_by_gallery_folder_then_root_then_parent(tmp_path):
    gallery = tmp_path / "g"
    labels = ["Latin/a", "Latin/a", "Greek/b"]
    paths = [str(gallery / "Latin/a/0.png"), str(gallery / "Latin/a/1.png"),
             str(gallery / "Greek/b/0.png")]
    queries = [str(gallery / "Latin/a/7.png"),    # a gallery folder
               str(gallery / "Greek/z/1.png"),    # under the root, a class it does not hold
               str(tmp_path / "elsewhere/b/2.png"),  # outside: the parent folder's name
               os.path.relpath(str(gallery / "Greek/b/5.png"))]  # relative spelling
    assert label_query_files(queries, labels, paths) == ["Latin/a", "Greek/z", "b", "Greek/b"]
    # items of arrays or tf.data ("" / "tf.data#3") give no folder and no root
    assert label_query_files(queries[:1], ["x", "y"], ["", "tf.data#3"]) == ["a"]


def test_query_files_of_a_nested_gallery_match_and_the_grid_is_green(
        index_assets, nested_gallery, tmp_path):
    """Fails on the parent-folder labels (`c01` against `g1/c01`): every match was 'other'."""
    from PIL import Image

    from kdml.evaluation.plots import _BORDER, _HEADER, _LABEL_WIDTH, _PAD, MATCH_COLOUR

    output = str(tmp_path / "nested.index")
    assert main(["build", f"--model={index_assets['model']}", f"--source=folder:{nested_gallery}",
                 f"--output_dir={output}"]) == 0
    index = GalleryIndex.load(output)
    assert sorted(set(index.labels.tolist())) == sorted(f"g{c % 2}/c{c:02d}" for c in range(6))
    files = index.paths[[0, 13, 35]].tolist()
    results, plot = str(tmp_path / "hits"), str(tmp_path / "grid.png")
    assert main(["query", f"--index={output}", f"--model={index_assets['model']}", "--k=5",
                 f"--output_dir={results}", f"--plot={plot}", "--plot_sampled=3", "--plot_worst=0",
                 *files]) == 0
    hits = json.load(open(os.path.join(results, "query.json")))
    for record, row in zip(hits, [0, 13, 35]):
        assert record["label"] == index.labels[row]  # g0/c00, g0/c04, g1/c05 (sorted order)
        for n in record["neighbours"]:
            assert n["label_match"] == (n["label"] == record["label"])
    # the (untrained) embedder finds some same-class neighbours: each must be marked a match
    matched = [(q, j) for q, record in enumerate(hits)
               for j, n in enumerate(record["neighbours"]) if n["label"] == record["label"]]
    assert matched and all(hits[q]["neighbours"][j]["label_match"] for q, j in matched)
    with Image.open(plot) as png:
        pixels = np.asarray(png.convert("RGB"))
    cell = 64 + 2 * (_BORDER + _PAD)
    for q, j in matched:  # 3 sampled rows = the 3 queries, in order
        top = _HEADER + q * cell + _PAD
        left = _LABEL_WIDTH + (j + 1) * cell + cell // 2 + _PAD
        assert tuple(pixels[top + 1, left + 1]) == MATCH_COLOUR, (q, j)


def test_query_source_labels_queries_as_source_labels_the_gallery(
        index_assets, nested_gallery, tmp_path):
    output = str(tmp_path / "nested.index")
    assert main(["build", f"--model={index_assets['model']}", f"--source=folder:{nested_gallery}",
                 f"--output_dir={output}"]) == 0
    results = str(tmp_path / "hits")
    assert main(["query", f"--index={output}", f"--model={index_assets['model']}", "--k=3",
                 f"--query_source=folder:{nested_gallery}", f"--output_dir={results}"]) == 0
    hits = json.load(open(os.path.join(results, "query.json")))
    index = GalleryIndex.load(output)
    assert [h["label"] for h in hits] == index.labels.tolist()
    # with each query's own file left out, the match flags are the label comparisons
    assert all(n["label_match"] == (n["label"] == h["label"]) for h in hits for n in h["neighbours"])
    assert any(n["label_match"] for h in hits for n in h["neighbours"])
