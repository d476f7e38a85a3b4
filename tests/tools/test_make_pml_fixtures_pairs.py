"""`tools/make_pml_fixtures_pairs.py` (which needs torch, absent here) and the fixture file
it wrote agree: every setting and batch of the tool is in the file, with the same kdml
arguments, the same PML objects and the same batch labels, so a changed tool cannot
leave stale fixtures unnoticed."""

import importlib.util
import json
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "make_pml_fixtures_pairs", os.path.join(ROOT, "tools", "make_pml_fixtures_pairs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports torch only when run
    return module


def test_the_fixture_file_holds_exactly_what_the_tool_describes():
    tool = _load_tool()
    data = np.load(os.path.join(ROOT, "tests", "losses", "fixtures", "pml_pairs.npz"))
    meta = json.loads(str(data["meta"]))
    assert meta["tool"] == "tools/make_pml_fixtures_pairs.py"
    expected = [(setting[0], setting[1], tool._describe(setting), name, labels)
                for setting in tool.SETTINGS for name, labels, _ in tool.BATCHES]
    got = [(c["kdml_class"], c["kdml_kwargs"], c["pml"], c["batch"],
            data[c["key"] + "_labels"].tolist()) for c in meta["cases"]]
    assert got == expected
    for case, (_, labels, dim) in zip(meta["cases"], tool.BATCHES * len(tool.SETTINGS)):
        assert data[case["key"] + "_embeddings"].shape == (len(labels), dim)
    xbm = [(c["kdml_class"], c["kdml_kwargs"], c["memory_size"], c["steps"])
           for c in meta["xbm_cases"]]
    assert xbm == [(tool.SETTINGS[i][0], tool.SETTINGS[i][1], tool.XBM_MEMORY, tool.XBM_STEPS)
                   for i in tool.XBM_SETTINGS]
