"""Make the repository's top-level ``kernels/`` folder importable as ``engine.kernels``.

The folder keeps its place at the top of the tree (the layers stay visible: kernels below
engine), but its import name is ``engine.kernels``: a top-level ``kernels`` would clash with
other distributions (Hugging Face's ``kernels``, a dependency of transformers 5, installs one).

An installed wheel holds the folder as ``engine/kernels`` (pyproject.toml maps it there), and an
editable install's finder maps it; both are found the normal way. Run from a source checkout
with nothing installed (the GPU machines, ``python -m pytest`` in the repository), neither
exists, so this module mounts ``<repo>/kernels`` under that name before any engine module
imports it. ``kernels/`` itself imports only relatively, so it never needs to know its name.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

NAME = "engine.kernels"


def mount():
    """``engine.kernels``, importing it from ``<repo>/kernels`` if no installed copy is found."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    folder = Path(__file__).resolve().parent.parent / "kernels"
    # This engine's own checkout first: an editable install of another checkout (a git worktree
    # beside it) maps engine.kernels to that checkout's kernels/, which would pair this engine with
    # foreign kernels. In site-packages there is no pyproject.toml beside engine/.
    if _is_checkout(folder.parent) or importlib.util.find_spec(NAME) is None:
        finder = _CheckoutKernels(folder)
        if finder not in sys.meta_path:
            sys.meta_path.insert(0, finder)
    # The import system does the rest, as for any package: sys.modules, the engine.kernels
    # attribute, and no half-run module left behind when kernels/__init__.py fails.
    return importlib.import_module(NAME)


@dataclass(frozen=True)
class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """Finds ``engine.kernels`` (and no other name) in this checkout's kernels/ folder; its
    submodules then come from the package's ``__path__`` as usual."""

    folder: Path

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(NAME, self.folder / "__init__.py",
                                                      submodule_search_locations=[str(self.folder)])


def _is_checkout(root: Path) -> bool:
    """Is ``root`` a source checkout of this project (engine/, kernels/ and pyproject.toml side by side)?"""
    return (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file() \
        and (root / "engine" / "__init__.py").is_file()
