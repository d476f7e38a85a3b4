"""kdml's import graph runs one way down (docs/development.md, "Floors").

Every module of `kdml/` is parsed with `ast`; each `import` / `from ... import` of a kdml
module, at module level or inside a function, is an arrow of the module graph. The
tests assert:

- no circle: no module reaches itself through the arrows (importing `kdml.P.m` from
  outside `kdml.P` also runs `kdml/P/__init__.py`: that arrow counts too);
- the floors: an arrow runs to the same floor or a lower one, and on the workflow floor
  (training, index, export) never to a sibling package; the command entry points sit
  on top and may use every floor;
- no private name (`_x`, or a `_module`) imported from another kdml package;
- an import of a kdml module inside a function carries a one-line reason comment
  naming what it defers (`DEFERRED_REASONS`): everything else sits at the module top.

`graph_counts(root)` gives the four counts docs/development.md reports:

    python -c "from tests.test_import_graph import graph_counts; print(graph_counts())"
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Floors, low -> high (docs/development.md). A module's floor is the one of its longest
# matching prefix.
FLOORS = (
    ("data", ("kdml.data",)),
    ("building", ("kdml.layers", "kdml.losses", "kdml.regularizers", "kdml.models",
                  "kdml.optimizers", "kdml.distribute", "kdml.config",
                  "kdml.command_line", "kdml.quiet_startup", "kdml.version")),
    ("embedding", ("kdml.embedding",)),
    ("evaluation", ("kdml.evaluation",)),
    ("workflows", ("kdml.training", "kdml.methods", "kdml.index", "kdml.export")),
    ("commands", ("kdml", "kdml.train", "kdml.evaluate", "kdml.index.__main__",
                  "kdml.export.__main__", "kdml.benchmark")),
)
WORKFLOWS = "workflows"
# The method table composes building blocks with training callbacks and evaluation's
# re-ranking: it is part of the training workflow.
WORKFLOW_OF = {"kdml.methods": "kdml.training"}
# What a function-level import of a kdml module may defer (its comment names one).
DEFERRED_REASONS = ("TensorFlow", "Keras", "faiss", "ScaNN", "UMAP", "matplotlib",
                    "scikit-learn", "LiteRT", "start-up")


def _module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def kdml_modules(root: str = ROOT) -> dict:
    """`{module name: file path}` of every `.py` file under `<root>/kdml`."""
    modules = {}
    for folder, dirs, files in os.walk(os.path.join(root, "kdml")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                modules[_module_name(path, root)] = path
    return modules


class _Import:
    """One imported kdml module: where, what, and how."""

    def __init__(self, source, target, names, line, in_function, comment, text, implicit=False):
        self.source, self.target, self.names = source, target, names
        self.line, self.in_function, self.comment, self.text = line, in_function, comment, text
        self.implicit = implicit  # the package __init__ that importing its module runs

    def where(self, modules) -> str:
        path = os.path.relpath(modules[self.source], ROOT)
        return f"{path}:{self.line}: {self.text}"


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _existing(name: str, modules) -> str:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def module_imports(root: str = ROOT) -> tuple[dict, list]:
    """`(modules, imports)`: every import of a kdml module by a kdml module."""
    modules = kdml_modules(root)
    imports = []
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            source = f.read()
        lines = source.splitlines()
        tree = ast.parse(source, path)
        parents = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node

        def in_function(node):
            while node in parents:
                node = parents[node]
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    return True
            return False

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(alias.name, ()) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node, path.endswith("__init__.py"))
                targets = []
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append((full, ()) if full in modules else (base, (alias.name,)))
            else:
                continue
            statement = lines[node.lineno - 1:node.end_lineno]
            comments = [line.split("#", 1)[1].strip() for line in statement if "#" in line]
            for name, names in targets:
                target = _existing(name, modules)
                if not target or not (target == "kdml" or target.startswith("kdml.")):
                    continue
                args = (node.lineno, in_function(node), " ".join(comments), statement[0].strip())
                imports.append(_Import(module, target, names, *args))
                package = package_of(target)
                if package != target and package != package_of(module) and package in modules:
                    imports.append(_Import(module, package, (), *args, implicit=True))
    return modules, imports


def floor_of(module: str):
    """`(index, floor name)` of a kdml module (longest matching prefix), or None."""
    best = None
    for index, (name, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[2]:
                    best = (index, name, len(prefix))
    return best[:2] if best else None


def package_of(module: str) -> str:
    """`kdml.<package>` of a module in a subpackage; a top-level module is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def workflow_of(module: str) -> str:
    """The workflow a module on the workflow floor belongs to (`WORKFLOW_OF`)."""
    package = package_of(module)
    return WORKFLOW_OF.get(package, package)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_crossings(imports) -> list:
    """Imports of a `_private` name or `_module` of another kdml package."""
    found = []
    for imp in imports:
        if imp.implicit or package_of(imp.source) == package_of(imp.target):
            continue
        inner = imp.target.split(".")[2:]
        if any(_is_private(n) for n in imp.names) or any(_is_private(p) for p in inner):
            found.append(imp)
    return found


def floor_violations(imports) -> list:
    """Arrows up a floor, or between sibling workflow packages; `(import, why)`."""
    found = []
    for imp in imports:
        if imp.implicit:
            continue
        source, target = floor_of(imp.source), floor_of(imp.target)
        if source is None or target is None:
            unknown = imp.source if source is None else imp.target
            found.append((imp, f"{unknown} belongs to no floor (tests/test_import_graph.py "
                               "FLOORS)"))
        elif target[0] > source[0]:
            found.append((imp, f"up from {source[1]} to {target[1]}"))
        elif (source[1] == target[1] == WORKFLOWS
              and workflow_of(imp.source) != workflow_of(imp.target)):
            found.append((imp, f"between sibling workflows {workflow_of(imp.source)} and "
                               f"{workflow_of(imp.target)}"))
    return found


def undocumented_deferrals(imports) -> list:
    """Function-level kdml imports whose comment names no `DEFERRED_REASONS` entry."""
    pattern = re.compile("|".join(re.escape(r) for r in DEFERRED_REASONS), re.IGNORECASE)
    return [imp for imp in imports
            if imp.in_function and not imp.implicit and not pattern.search(imp.comment)]


def cycles(imports) -> list:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    graph = {}
    for imp in imports:
        if imp.source != imp.target:
            graph.setdefault(imp.source, set()).add(imp.target)
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):  # recursion depth is bounded by the module count
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def graph_counts(root: str = ROOT) -> dict:
    """The counts of docs/development.md: circles (and the modules on them), upward
    arrows (sibling-workflow arrows included), private names imported across packages,
    function-level imports of kdml modules (statements)."""
    _, imports = module_imports(root)
    circles = cycles(imports)
    return {"circles": len(circles), "modules_on_circles": sum(len(c) for c in circles),
            "upward_arrows": len(floor_violations(imports)),
            "private_cross_package": len(private_crossings(imports)),
            "function_level_imports": len({(i.source, i.line) for i in imports
                                           if i.in_function and not i.implicit})}


def _report(items) -> str:
    return "\n".join(items)


def test_every_module_is_found_and_parsed():
    modules, imports = module_imports()
    assert "kdml.embedding.loading" in modules and "kdml.evaluation.protocols" in modules
    spec = importlib.util.find_spec("kdml.embedding")
    assert spec is not None and os.path.dirname(spec.origin).startswith(os.path.join(ROOT, "kdml"))
    edges = {(i.source, i.target) for i in imports}
    assert ("kdml.evaluation.protocols", "kdml.embedding") in edges or any(
        s == "kdml.evaluation.protocols" and t.startswith("kdml.embedding") for s, t in edges)


def test_no_circles():
    _, imports = module_imports()
    found = cycles(imports)
    assert not found, "import circles:\n" + _report(" -> ".join(c) for c in found)


def test_floors_run_down():
    modules, imports = module_imports()
    found = floor_violations(imports)
    assert not found, "imports against the floor order:\n" + _report(
        f"{imp.where(modules)}  ({why})" for imp, why in found)


def test_no_private_name_crosses_a_package():
    modules, imports = module_imports()
    found = private_crossings(imports)
    assert not found, "private names imported from another kdml package:\n" + _report(
        imp.where(modules) for imp in found)


def test_function_level_imports_say_what_they_defer():
    modules, imports = module_imports()
    found = undocumented_deferrals(imports)
    assert not found, (
        "kdml imports inside functions without a reason comment naming what they defer "
        f"({', '.join(DEFERRED_REASONS)}); move them to the module top:\n"
        + _report(imp.where(modules) for imp in found))


def test_the_checks_catch_what_they_look_for(tmp_path):
    """A circle, an upward and a sibling arrow, a private crossing and an unexplained
    deferred import, each written on purpose, are each found and named."""
    package = tmp_path / "kdml"
    for folder in ("data", "evaluation", "index", "export"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "data" / "reader.py").write_text(
        "from kdml.evaluation.metrics import score\n")
    (package / "evaluation" / "metrics.py").write_text(
        "from kdml.data.reader import _helper\n\ndef score():\n    pass\n")
    (package / "index" / "build.py").write_text(
        "def run():\n    from kdml.export.tool import x\n"
        "    from kdml.data import reader  # defers TensorFlow\n")
    (package / "export" / "tool.py").write_text("x = 1\n")
    _, imports = module_imports(str(tmp_path))
    assert cycles(imports) == [["kdml.data.reader", "kdml.evaluation.metrics"]]
    violations = {(i.source, why) for i, why in floor_violations(imports)}
    assert ("kdml.data.reader", "up from data to evaluation") in violations
    assert ("kdml.index.build", "between sibling workflows kdml.index and kdml.export") \
        in violations
    assert [(i.source, i.names) for i in private_crossings(imports)] == [
        ("kdml.evaluation.metrics", ("_helper",))]
    assert [(i.source, i.line) for i in undocumented_deferrals(imports)] == [
        ("kdml.index.build", 2)]
    counts = graph_counts(str(tmp_path))
    assert counts == {"circles": 1, "modules_on_circles": 2, "upward_arrows": 2,
                      "private_cross_package": 1, "function_level_imports": 2}
