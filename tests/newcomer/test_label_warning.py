"""Query labels that match nothing get one warning naming the layout rule."""

import json
import os
import warnings

import pytest

from kdml.data.labels import LAYOUT_RULE, unknown_query_labels, warn_unknown_query_labels


def test_counts_and_the_half_rule():
    gallery = ["Latin/a", "Latin/b", "Greek/c"]
    assert unknown_query_labels(["a", "a", "Latin/b"], gallery) == {
        "labels": 2, "known_labels": 1, "queries": 3, "known_queries": 1, "example": "a"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_unknown_query_labels(["Latin/a", "Latin/b", "x"], gallery) is None  # 2 of 3
        assert warn_unknown_query_labels(["Latin/a", "x"], gallery) is None  # half: no warning
        assert warn_unknown_query_labels([], gallery) is None
    with pytest.warns(UserWarning) as caught:
        text = warn_unknown_query_labels(["a", "b", "a"], gallery)
    assert len(caught) == 1 and str(caught[0].message) == text
    assert text.startswith("0 of 2 query labels (0 of 3 queries) occur in the gallery")
    assert "query label 'a' vs gallery label 'Latin/a'" in text and LAYOUT_RULE in text
    with pytest.warns(UserWarning, match="1 of 3 query labels"):  # under half
        warn_unknown_query_labels(["Latin/a", "y", "z"], gallery)


def test_index_query_warns_once_when_a_sub_folder_is_the_query_source(newcomer, tmp_path):
    """The issue's case: `--query_source=folder:<gallery>/alpha1` labels `char00` what the
    gallery calls `alpha1/char00`: 0 matches, and now one warning says why."""
    from kdml.index.__main__ import main

    with pytest.warns(UserWarning) as caught:
        assert main(["query", f"--index={newcomer['index']}", f"--model={newcomer['keras']}",
                     f"--query_source=folder:{os.path.join(newcomer['gallery'], 'alpha1')}",
                     "--k=1", f"--output_dir={tmp_path}"]) == 0
    texts = [str(w.message) for w in caught if "query labels" in str(w.message)]
    assert len(texts) == 1
    assert "0 of 4 query labels (0 of 16 queries)" in texts[0]
    assert "query label 'char00' vs gallery label 'alpha0/char00'" in texts[0]  # first sorted
    with open(tmp_path / "query.json") as f:
        records = json.load(f)
    assert not any(n["label_match"] for r in records for n in r["neighbours"])
    # the gallery root as the source: every label known, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main(["query", f"--index={newcomer['index']}", f"--model={newcomer['keras']}",
                     f"--query_source=folder:{newcomer['gallery']}", "--k=1",
                     f"--output_dir={tmp_path / 'root'}"]) == 0


@pytest.mark.filterwarnings("ignore:16 of 16 queries have no other image")  # the same cause
def test_evaluate_query_gallery_warns_when_the_query_folder_is_a_sub_folder(newcomer):
    from kdml.evaluation.protocols import evaluate_model

    gallery = newcomer["gallery"]
    with pytest.warns(UserWarning, match=r"0 of 4 query labels \(0 of 16 queries\)"):
        report = evaluate_model(newcomer["keras"], query=f"folder:{gallery}/alpha1",
                                gallery=f"folder:{gallery}", ks=(1,), nmi=False,
                                ranking_metrics=False, crop_fraction=1.0)
    assert report["metrics"]["recall@1"] == 0.0  # nothing can match: why the warning exists
