"""The layering rule of CONTRIBUTING.md ("Layers"), checked on the syntax trees of moe/ and parallel/.

The oracle is ``tools/import_graph.py``; these tests also check that it sees what a hand-written
file tree says it should (a circle, a function-level import, a marked deferred import, a relative import).
"""
from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import import_graph  # noqa: E402


def test_parallel_imports_nothing_from_moe():
    s = import_graph.summary(import_graph.build_graph())
    assert s["cross_package_lines"]["parallel->moe"] == []


def test_no_import_into_a_higher_layer():
    s = import_graph.summary(import_graph.build_graph())
    assert s["upward_imports"] == []


def test_layers_order_the_packages():
    assert import_graph.layer_of("parallel.zero_fsdp") < import_graph.layer_of("moe.layer")
    assert import_graph.layer_of("moe.layer") < import_graph.layer_of("moe.models.transformer")
    assert import_graph.layer_of("moe.models.sharding") < import_graph.layer_of("moe.tasks.lm")
    assert import_graph.layer_of("moe.tasks") < import_graph.layer_of("moe.trainer.loop")
    assert import_graph.layer_of("moe.trainer.loop") < import_graph.layer_of("moe.train")


def test_no_import_circles():
    s = import_graph.summary(import_graph.build_graph())
    assert s["circles"] == []


def test_no_function_level_project_imports_except_marked_deferred():
    s = import_graph.summary(import_graph.build_graph())
    assert s["function_level_project_imports"] == []
    # a deferred import names its reason after the mark
    for where in s["deferred_imports"]:
        src, line = where.split(" -> ")[0].split(":")
        path = Path(ROOT, *src.split(".")).with_suffix(".py")
        if not path.exists():
            path = Path(ROOT, *src.split("."), "__init__.py")
        text = path.read_text().splitlines()[int(line) - 1]
        reason = text.split(import_graph.DEFERRED_MARK, 1)[1].strip()
        assert reason, f"{where}: '# deferred:' without a reason"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return tmp_path


def test_graph_sees_circles_function_imports_and_cross_lines(tmp_path):
    root = _tree(tmp_path, {
        "moe/__init__.py": "",
        "moe/a.py": "from .b import f\n",
        "moe/b.py": "def f():\n    from moe import a  # noqa\n",
        "moe/c.py": "def g():\n    import parallel.x  # deferred: heavy engine\n",
        "moe/models/__init__.py": "",
        "moe/models/m.py": "",
        "moe/d.py": "from moe.models import m\n",
        "parallel/__init__.py": "",
        "parallel/x.py": "from moe.a import f\n",
        "parallel/y.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from moe import a\n",
    })
    s = import_graph.summary(import_graph.build_graph(root))
    assert s["circles"] == [["moe.a", "moe.b"]]
    assert s["cross_package"] == {"moe->parallel": 1, "parallel->moe": 1}  # TYPE_CHECKING imports don't count
    assert s["function_level_project_imports"] == ["moe.b:2 -> moe.a"]
    assert s["deferred_imports"] == ["moe.c:2 -> parallel.x"]
    assert sorted(s["upward_imports"]) == ["moe.d:1 -> moe.models.m", "parallel.x:1 -> moe.a"]
