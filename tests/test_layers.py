"""The import rule of docs/architecture.md: each layer imports only the layers below it.

Walks every module's import statements (including ones inside functions) with ast.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# engine.kernels is the kernels/ folder (mounted by _kernels_package).
# Lower rank = lower layer. A module may import modules of its own rank or lower. autograd,
# tensor and ops are one layer: Function builds Tensors, Tensor methods call ops.
# utils only re-exports under PyTorch's import paths (utils.data, utils.checkpoint, utils.tensorboard
# from train), so it sits with train; nothing in the engine imports it.
ENGINE_RANKS = {
    "kernels": 0, "_kernels_package": 0, "_host_memory": 0, "errors": 0, "fusion": 0, "backend": 1, "dtypes": 1, "dlpack": 1, "backends": 1, "_dynamo": 1, "_compile": 1, "amp": 2, "autograd": 2, "tensor": 2,
    "ops": 2, "indexing": 2, "shaping": 2, "cpu": 2, "conv": 3, "functional": 3, "gradcheck": 3, "nn": 4,
    "optim": 4, "io": 4, "safetensors": 4, "torch_format": 4, "metrics": 4, "distributed": 4, "cuda": 4, "accelerator": 4,
    "data": 5, "text": 5, "train": 6, "utils": 6, "examples": 7,
    "testing": 4,
}
# The only places allowed to import cupy / cupyx.
# engine/distributed/nccl.py drives cupy.cuda.nccl (communicators, streams, events): a cupy facility
# that is no array operation for engine/backend.py to wrap.
CUPY_ALLOWED = ("kernels/", "engine/backend.py", "bench/", "engine/distributed/nccl.py")


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("path", _files("kernels"), ids=_rel)
def test_kernels_import_neither_engine_nor_bench(path):
    bad = [m for m in _imports(path) if m.split(".")[0] in ("engine", "bench", "tests")]
    assert not bad, f"{_rel(path)} imports {bad}: kernels/ is the bottom layer"


@pytest.mark.parametrize("path", _files("engine"), ids=_rel)
def test_engine_modules_import_only_lower_layers(path):
    rel = path.relative_to(ROOT / "engine").parts
    own = rel[0].removesuffix(".py")
    if own == "__init__":
        return  # the package's front door re-exports everything
    own_rank = ENGINE_RANKS[own]
    for module in _imports(path):
        parts = module.split(".")
        assert parts[0] not in ("bench", "tests"), f"{_rel(path)} imports {module}"
        if parts[0] == "engine" and len(parts) > 1 and parts[1] in ENGINE_RANKS:
            assert ENGINE_RANKS[parts[1]] <= own_rank, (
                f"{_rel(path)} (layer {own}) imports engine.{parts[1]}, a higher layer")


@pytest.mark.parametrize("path", _files("engine") + _files("kernels"), ids=_rel)
def test_only_backend_and_kernels_know_cupy(path):
    if _rel(path).startswith(CUPY_ALLOWED):
        return
    bad = [m for m in _imports(path) if m.split(".")[0] in ("cupy", "cupyx")]
    assert not bad, f"{_rel(path)} imports {bad}; go through engine.backend"


def test_every_engine_module_has_a_layer():
    tops = {p.relative_to(ROOT / "engine").parts[0].removesuffix(".py") for p in _files("engine")}
    assert tops - {"__init__"} <= set(ENGINE_RANKS), tops - set(ENGINE_RANKS)


@pytest.mark.parametrize("path", _files("engine"), ids=_rel)
def test_engine_asks_kernels_for_limits_not_their_impl_modules(path):
    """Limits and shared formulas come from ``engine.kernels`` itself (its _SHARED table), so that
    each has one home; the impl modules (kernels.cpu.*, .cuda.*, .precision) stay the kernels' own."""
    if _rel(path) == "engine/_kernels_package.py":
        return
    impl_modules = {"cpu", "cuda", "numba_cuda", "precision", "declarations"}
    bad = [m for m in _imports(path) if m.startswith("engine.kernels.") and m.split(".")[2] in impl_modules]
    assert not bad, f"{_rel(path)} imports {bad}: ask engine.kernels (kernels/__init__.py _SHARED)"
