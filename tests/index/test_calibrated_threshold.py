"""`kdml.index build --calibrate`: the stored threshold, and "no match" in `query`."""

import json
import os

import numpy as np
import pytest

from kdml.evaluation.plots import no_match_caption
from kdml.embedding import embed_image_set
from kdml.evaluation.threshold import calibrate_threshold
from kdml.export import load_embedder
from kdml.index import GalleryIndex
from kdml.index.__main__ import main
from kdml.embedding import load_source
from tests.index.test_retrieval_grid import capture_grid_texts


@pytest.mark.slow  # about 6 s: five builds and two queries through the command line
def test_build_stores_the_calibrated_threshold_and_query_answers_no_match(
        index_assets, tmp_path, capsys, monkeypatch):
    output = str(tmp_path / "t.index")
    source = index_assets["source"]
    assert main(["build", f"--model={index_assets['model']}", f"--source={source}",
                 f"--output_dir={output}", f"--calibrate={source}", "--target_far=0.05"]) == 0
    assert "Threshold cosine >= " in capsys.readouterr().out
    index = GalleryIndex.load(output)
    stored = json.load(open(f"{output}/index.json"))["threshold"]
    # the same as calibrating the source's embeddings directly
    images = load_source(source)
    embeddings = embed_image_set(load_embedder(index_assets["model"]), images)
    want = calibrate_threshold(embeddings, images.labels, target_far=0.05)
    assert stored["value"] == want["threshold"] == index.threshold["value"]
    assert stored["target"] == {"far": 0.05} and stored["source"] == source
    assert stored["far"] == want["far"] <= 0.05 and stored["precision"] == want["precision"]

    files = index.paths[::6].tolist()  # one query per class
    results = str(tmp_path / "hits")
    texts = capture_grid_texts(monkeypatch)
    assert main(["query", f"--index={output}", f"--model={index_assets['model']}", "--k=2",
                 f"--output_dir={results}", f"--plot={tmp_path / 'grid.png'}",
                 f"--plot_sampled={len(files)}", "--plot_worst=0", *files]) == 0
    hits = json.load(open(os.path.join(results, "query.json")))
    top1 = np.array([h["neighbours"][0]["similarity"] for h in hits])
    flags = np.array([h["no_match"] for h in hits])
    np.testing.assert_array_equal(flags, top1 < np.float32(stored["value"]))
    assert all(h["threshold"] == stored["value"] for h in hits)
    # the grid (every query shown) captions exactly the "no match" rows, with their numbers
    assert flags.any() and not flags.all(), flags
    captions = sorted(t for t, _, _ in texts if t.startswith("no match ("))
    assert captions == sorted(no_match_caption(float(np.float32(b)), stored["value"])
                              for b in top1[flags])

    # an --add keeps the threshold; an index built without --calibrate has none
    assert main(["build", f"--model={index_assets['model']}", f"--source={source}",
                 f"--output_dir={output}", "--add"]) == 0
    assert GalleryIndex.load(output).threshold["value"] == stored["value"]
    plain = str(tmp_path / "plain.index")
    assert main(["build", f"--model={index_assets['model']}", f"--source={source}",
                 f"--output_dir={plain}"]) == 0
    assert GalleryIndex.load(plain).threshold is None
    assert main(["query", f"--index={plain}", f"--model={index_assets['model']}", "--k=2",
                 f"--output_dir={results}", *files[:1]]) == 0
    assert "no_match" not in json.load(open(os.path.join(results, "query.json")))[0]


def test_unreachable_precision_is_a_one_line_error_and_writes_nothing(
        index_assets, tmp_path, capsys):
    output = tmp_path / "none.index"
    assert main(["build", f"--model={index_assets['model']}",
                 f"--source={index_assets['source']}", f"--output_dir={output}",
                 f"--calibrate={index_assets['source']}", "--target_precision=1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: No threshold reaches precision 1") and "\n" not in err
    assert not output.exists()
