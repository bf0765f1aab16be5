"""Repository hygiene: documentation links resolve in a fresh clone, and test files
stay independent of each other (shared code lives in tests/helpers/)."""
from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(
    os.path.relpath(p, ROOT)
    for pattern in ("*.md", "docs/**/*.md", "examples/**/*.md")
    for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
)
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not images
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _anchors(path: str) -> set:
    """GitHub-style anchors of a markdown file's headings."""
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    out = set()
    for title in re.findall(r"^#+\s+(.*?)\s*#*\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_docs_exist():
    for name in ("README.md", "CONTRIBUTING.md", "LICENSE", "docs/architecture.md", "docs/algorithms.md"):
        assert os.path.isfile(os.path.join(ROOT, name)), name


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
        if not os.path.exists(full):
            broken.append(f"{target} (no such path)")
        elif anchor and full.endswith(".md") and anchor not in _anchors(full):
            broken.append(f"{target} (no heading with anchor #{anchor})")
    assert not broken, f"{doc}: broken links: {broken}"


def test_no_test_file_imports_another():
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if re.match(r"\s*(from|import)\s+(tests\.(gpu\.)?)?(test_|conftest)\w*", line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not offenders, "test files import test files (move shared code to tests/helpers/):\n" + "\n".join(offenders)
