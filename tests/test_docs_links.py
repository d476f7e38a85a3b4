"""The documentation holds together: every relative link of README.md and docs/*.md points
at a file of the repository and every `#anchor` at a heading of its target page (GitHub's
slug rule); every `docs/design.md <section>` cited in the code is a section of that page;
docs/api.md names every public name; nothing points outside the repository."""

import ast
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted([os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md")))
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_slug(heading):
    """GitHub's anchor of a heading: lower case, drop punctuation but '-' and '_', spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path):
    text = _FENCE.sub("", open(path, encoding="utf-8").read())
    slugs, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def _relative_links(path):
    text = _FENCE.sub("", open(path, encoding="utf-8").read())
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_github_slug_matches_hand_worked_headings():
    assert github_slug("PDDM (`--method=pddm`)") == "pddm---methodpddm"
    assert github_slug("3.2 Soft-orthogonal proxies (SO)") == "32-soft-orthogonal-proxies-so"
    assert github_slug("`make train`") == "make-train"


def test_documentation_pages_exist():
    names = {os.path.relpath(p, ROOT) for p in PAGES}
    for page in ("README.md", "docs/README.md", "docs/design.md", "docs/api.md"):
        assert page in names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    broken = []
    for target in _relative_links(page):
        file_part, _, anchor = target.partition("#")
        path = os.path.normpath(os.path.join(os.path.dirname(page), file_part)) if file_part else page
        if not os.path.exists(path):
            broken.append(f"{target} (no file {os.path.relpath(path, ROOT)})")
        elif anchor and path.endswith(".md") and anchor not in _anchors(path):
            broken.append(f"{target} (no heading #{anchor} in {os.path.relpath(path, ROOT)})")
    assert not broken, f"{os.path.relpath(page, ROOT)} has broken links: {broken}"


def test_no_reference_outside_the_repository():
    outside = ("DESIGN" + ".md", ".." + "/shared")  # split so this file does not match either
    for page in PAGES:
        text = open(page, encoding="utf-8").read()
        assert not [name for name in outside if name in text], page


def _public_names(package_init):
    """The `__all__` list of a package's `__init__.py`, read without importing it."""
    for node in ast.parse(open(package_init, encoding="utf-8").read()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    return []


def test_api_page_names_every_public_name():
    api = open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8").read()
    missing = []
    for init in sorted(glob.glob(os.path.join(ROOT, "kdml", "*", "__init__.py"))):
        package = "kdml." + os.path.basename(os.path.dirname(init))
        assert f"## {package}" in api, f"docs/api.md has no section for {package}"
        missing += [f"{package}.{name}" for name in _public_names(init) if f"`{name}`" not in api]
    assert not missing, f"docs/api.md does not list: {missing}; add one line for each"


def test_design_sections_cited_in_the_code_exist():
    design = open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8").read()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[ .]", design, re.M))
    cited = {}
    for folder in ("kdml", "tests", "tools"):
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
            text = open(path, encoding="utf-8").read()
            for section in re.findall(r"docs/design\.md,? (?:section )?(\d+(?:\.\d+)?)", text):
                cited.setdefault(section, os.path.relpath(path, ROOT))
    assert {"3.1", "3.2", "3.3", "3.4", "4"} <= sections
    unknown = {s: where for s, where in cited.items() if s not in sections}
    assert not unknown, f"code cites sections that docs/design.md lacks: {unknown}"
