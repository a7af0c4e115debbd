"""The examples in the library's docstrings run and print what they claim (doctest)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import muonlab

MODULES = sorted(m.name for m in pkgutil.walk_packages(muonlab.__path__, "muonlab.") if not m.name.endswith("__main__"))


def test_the_package_has_docstring_examples() -> None:
    total = sum(len([t for t in doctest.DocTestFinder().find(importlib.import_module(name)) if t.examples])
                for name in MODULES)
    assert total >= 5, total  # the walk found the modules, and the examples are collected


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
