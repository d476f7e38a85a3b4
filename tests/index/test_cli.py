"""`python -m kdml.index build|query|evaluate` (its `main`, in process)."""

import json
import os

import numpy as np

from kdml.index import GalleryIndex
from kdml.index.__main__ import main


def test_build_query_evaluate(index_assets, tmp_path, capsys):
    output = str(tmp_path / "g.index")
    assert main(["build", f"--model={index_assets['model']}", f"--source={index_assets['source']}",
                 f"--output_dir={output}", "--backend=faiss", "--shard_size=30"]) == 0
    assert "Indexed 72 images of 12 classes (d = 16, backend faiss" in capsys.readouterr().out
    index = GalleryIndex.load(output)
    assert index.backend.name == "faiss" and len(index) == 72

    # query with gallery files: each file itself is left out, the rest is the exact top 3
    rows = [0, 7, 30]
    files = index.paths[rows].tolist()
    plot = str(tmp_path / "grid.png")
    assert main(["query", f"--index={output}", f"--model={index_assets['model']}", "--k=3",
                 f"--plot={plot}", "--plot_sampled=1", "--plot_worst=1",
                 f"--output_dir={tmp_path / 'hits'}", *files]) == 0
    hits = json.load(open(tmp_path / "hits" / "query.json"))
    scores = index.embeddings[rows] @ index.embeddings.T
    scores[np.arange(3), rows] = -np.inf
    want = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    assert [h["query"] for h in hits] == files
    for i, (record, path) in enumerate(zip(hits, files)):
        assert [n["path"] for n in record["neighbours"]] == index.paths[want[i]].tolist()
        np.testing.assert_allclose([n["similarity"] for n in record["neighbours"]],
                                   scores[i, want[i]], atol=1e-5)
        assert record["label"] == os.path.basename(os.path.dirname(path))
    assert open(plot, "rb").read(4) == b"\x89PNG"

    # evaluate: the faiss index (nlist 1 at this size: exact) against exact search
    assert main(["evaluate", f"--index={output}", "--k=5", "--num_queries=40",
                 f"--output_dir={tmp_path / 'eval'}"]) == 0
    figures = json.load(open(tmp_path / "eval" / "evaluate.json"))
    assert figures["recall_at_k"] == 1.0 and figures["queries"] == 40 and figures["k"] == 5
    assert figures["exact_qps"] > 0 and figures["approximate_qps"] > 0

    # incremental add of the same folder doubles the index
    assert main(["build", f"--model={index_assets['model']}", f"--source={index_assets['source']}",
                 f"--output_dir={output}", "--add"]) == 0
    assert len(GalleryIndex.load(output)) == 144


def test_errors_are_one_line_with_exit_code_2(index_assets, tmp_path, capsys):
    output = str(tmp_path / "g.index")
    assert main(["build", f"--model={index_assets['model']}", f"--source={index_assets['source']}",
                 f"--output_dir={output}"]) == 0
    capsys.readouterr()
    image = GalleryIndex.load(output).paths[0]
    for args, expected in (
            (["query", f"--index={output}", f"--model={index_assets['other_model']}", image],
             "but the query model is"),
            (["query", f"--index={output}", f"--model={index_assets['d8_model']}", image],
             "holds embeddings of size 16"),
            (["query", f"--index={tmp_path / 'none'}", f"--model={index_assets['model']}", image],
             "No index at"),
            (["query", f"--index={output}", f"--model={index_assets['model']}"], "either as files")):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, err
    np.testing.assert_equal(len(GalleryIndex.load(output)), 72)
