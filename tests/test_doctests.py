"""The `>>>` examples in kdml's docstrings run and print what they show.

Every module under `kdml/` whose source holds an example is imported and run with
`doctest` (names available to examples: `np`, `keras`, `tf`, `kdml`, and the module's
own). Each public layer, loss and regularizer must carry an example, so
`help(kdml.layers.Proxies)` shows working code.
"""

import doctest
import importlib
import importlib.util
import io
import os
import pkgutil
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import kdml

_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules_with_examples():
    names = []
    for info in pkgutil.walk_packages(kdml.__path__, "kdml."):
        spec = importlib.util.find_spec(info.name)
        path = spec.origin if spec else None
        if path and path.endswith(".py") and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if ">>>" in f.read():
                    names.append(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def _run_examples(obj, name, module):
    """(failures, attempted, report) of the examples found in `obj` (a module or class)."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    report = io.StringIO()
    globs = {**vars(module), "np": np, "keras": keras, "tf": tf, "kdml": kdml}
    for test in finder.find(obj, name, module=module, globs=globs):
        runner.run(test, out=report.write)
    return runner.failures, runner.tries, report.getvalue()


def test_modules_with_examples_are_found():
    assert {"kdml.layers.proxies", "kdml.losses.proxy_anchor", "kdml.regularizers"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)  # a module that cannot be imported fails here
    failures, attempted, report = _run_examples(module, name, module)
    assert attempted > 0
    assert failures == 0, f"{failures} of {attempted} examples in {name} failed:\n{report}"


PUBLIC = [getattr(package, name) for package in (kdml.layers, kdml.losses, kdml.regularizers)
          for name in package.__all__]


@pytest.mark.parametrize("cls", PUBLIC, ids=lambda cls: cls.__name__)
def test_every_public_layer_loss_and_regularizer_has_an_example(cls):
    module = importlib.import_module(cls.__module__)
    finder = doctest.DocTestFinder(recurse=False)
    examples = sum(len(test.examples) for test in finder.find(cls, cls.__name__, module=module))
    assert examples > 0, f"{cls.__module__}.{cls.__name__}'s docstring has no >>> example"


DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
DOC_PAGES = sorted(name for name in os.listdir(DOCS) if name.endswith(".md") and re.search(
    r"^>>> ", open(os.path.join(DOCS, name), encoding="utf-8").read(), re.MULTILINE))


def test_doc_pages_with_examples_are_found():
    assert "methods.md" in DOC_PAGES


@pytest.mark.parametrize("page", DOC_PAGES)
def test_doc_page_examples(page):
    """The `>>>` examples of a page of docs/ run in order, sharing one namespace."""
    report = io.StringIO()
    parser = doctest.DocTestParser()
    path = os.path.join(DOCS, page)
    # the ```python blocks holding examples, in page order (the fences are not output)
    blocks = re.findall(r"```python\n(.*?)```", open(path, encoding="utf-8").read(), re.S)
    text = "\n".join(b for b in blocks if ">>>" in b)
    test = parser.get_doctest(text, {"np": np, "keras": keras, "tf": tf, "kdml": kdml},
                              page, path, 0)
    runner = doctest.DocTestRunner(optionflags=_FLAGS)
    runner.run(test, out=report.write)
    assert runner.tries > 0
    assert runner.failures == 0, f"{runner.failures} of {runner.tries} examples in docs/{page} " \
                                 f"failed:\n{report.getvalue()}"
