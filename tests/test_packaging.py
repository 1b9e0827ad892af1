"""pyproject.toml ships every package of the source tree (its package list is explicit) and the recipe files."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_of_the_tree_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(("flowkern", *p.parent.relative_to(ROOT / "flowkern").parts))
             for p in (ROOT / "flowkern").rglob("__init__.py")}
    found |= {".".join(("flowkern", "kernels", *p.parent.relative_to(ROOT / "kernels").parts))
              for p in (ROOT / "kernels").rglob("__init__.py")}
    found.add("flowkern.csrc")
    assert found == listed
    assert "recipes/*.toml" in config["package-data"]["flowkern.train"]
