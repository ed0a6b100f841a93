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

import importlib.util
import sys
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
    if not _is_checkout(folder.parent) and importlib.util.find_spec(NAME) is not None:
        return importlib.import_module(NAME)  # an installed engine/kernels, or an editable mapping
    spec = importlib.util.spec_from_file_location(NAME, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[NAME]
        raise
    parent, _, child = NAME.rpartition(".")
    setattr(sys.modules[parent], child, module)  # as the import system does: engine.kernels is an attribute
    return module


def _is_checkout(root: Path) -> bool:
    """Is ``root`` a source checkout of this project (engine/, kernels/ and pyproject.toml side by side)?"""
    return (root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file() \
        and (root / "engine" / "__init__.py").is_file()
