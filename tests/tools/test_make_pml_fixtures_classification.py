"""tools/make_pml_fixtures_classification.py needs torch (not in kdml's environment), so
this checks that the committed fixture is what the tool's tables describe."""

import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "losses", "fixtures", "pml_classification.npz")
_SPEC = importlib.util.spec_from_file_location(
    "make_pml_fixtures_classification",
    os.path.join(ROOT, "tools", "make_pml_fixtures_classification.py"))
tool = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tool)  # imports only NumPy at module level


def test_the_fixture_holds_every_case_of_the_tool_with_its_shapes():
    data = np.load(FIXTURE)
    meta = json.loads(str(data["meta"]))
    assert meta["generated_by"] == "tools/make_pml_fixtures_classification.py"
    expected = {f"{name}/{tag}/{batch}" for name, (_, settings) in tool.LOSSES.items()
                for tag, _ in settings for batch in tool.BATCHES}
    assert set(meta["cases"]) == expected
    for key, case in meta["cases"].items():
        name, tag, batch = key.split("/")
        size, dim, classes, labels = tool.BATCHES[batch]
        kwargs = dict(tool.LOSSES[name][1])[tag]
        assert case["kwargs"] == kwargs
        k = tool._centers(name, kwargs)
        assert data[f"{key}/embeddings"].shape == data[f"{key}/grad_embeddings"].shape == (size, dim)
        assert data[f"{key}/weights"].shape == data[f"{key}/grad_weights"].shape == (classes * k, dim)
        np.testing.assert_array_equal(data[f"{key}/labels"], labels)
