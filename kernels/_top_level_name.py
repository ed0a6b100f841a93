"""What ``import kernels`` gets in a checkout whose root is on sys.path: not this folder.

This folder's import name is ``engine.kernels`` (docs/architecture.md, "Import names"). With the
repository root on sys.path, Python also finds it as a top-level ``kernels``, the name of Hugging
Face's distribution that transformers imports. :func:`hand_over` loads that distribution in this
module's place, or raises an ImportError that says which package the name belongs to.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path


def hand_over(init_file: str) -> None:
    """Replace ``sys.modules["kernels"]`` (this folder, being imported) by the installed ``kernels``
    found on sys.path outside this repository; the import system then returns that one."""
    root = Path(init_file).resolve().parent.parent
    elsewhere = [entry for entry in sys.path if Path(entry or os.getcwd()).resolve() != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    if spec is None or spec.origin is None:
        del sys.modules["kernels"]
        raise ImportError(
            f"'kernels' found {root / 'kernels'}, which is the engine's kernels package: import it as "
            "engine.kernels (from engine import kernels). No other top-level 'kernels' is installed.",
            name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop(__name__, None)  # this helper, loaded as kernels._top_level_name: not the other's
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise
