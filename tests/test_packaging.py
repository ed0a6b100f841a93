"""The engine's import names: one package, ``engine``, with the kernels/ folder as ``engine.kernels``.

Hugging Face's ``kernels`` distribution (a dependency of transformers 5) installs a top-level
``kernels``; the engine must import, and pick its own kernels, beside it.
"""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)


def test_the_engine_imports_beside_a_foreign_top_level_kernels_package(tmp_path):
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("FOREIGN = True\n")  # like huggingface's kernels: no KernelError
    code = ("import kernels, engine, engine.kernels as ours, numpy as np\n"
            "assert kernels.FOREIGN and not hasattr(kernels, 'KernelError'), kernels.__file__\n"
            "assert ours.__file__.endswith('kernels/__init__.py') and ours is not kernels\n"
            "p = np.ones(8, np.float32); g = np.full(8, 0.5, np.float32)\n"
            "ours.sgd_step(p, g, lr=0.1)\n"
            "assert np.allclose(p, 0.95), p\n"
            "x = engine.randn(3, 4, requires_grad=True); (x.relu().sum()).backward(); assert x.grad is not None\n")
    run = _run(code, cwd=tmp_path, PYTHONPATH=f"{tmp_path}:{ROOT}")  # the foreign one first
    assert run.returncode == 0, run.stderr[-3000:]


def test_kernels_import_only_relatively_so_their_name_can_change():
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "kernels").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if line.lstrip().startswith(("import kernels", "from kernels", "import engine", "from engine"))]
    assert not offenders, offenders


def test_nothing_imports_a_top_level_kernels():
    """Statements, and code in strings run by child processes (`python -c "import sys, kernels"`):
    with Hugging Face's kernels installed, a top-level `kernels` is theirs."""
    pattern = re.compile(r"""(?:^\s*|["';]\s*)(?:import (?:[\w.]+ *, *)*kernels\b|from kernels\b)""")
    folders = [ROOT / d for d in ("engine", "bench", "tests", ".ci")]
    offenders = [f"{p.relative_to(ROOT)}:{i}" for folder in folders for p in folder.rglob("*.py")
                 if p.name != "test_packaging.py"  # imports the foreign one on purpose
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_pyproject_lists_every_package_and_maps_kernels_under_engine():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {"engine.kernels": "kernels"}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "engine").rglob("__init__.py")}
    found |= {".".join(("engine", *p.parent.relative_to(ROOT).parts)) for p in (ROOT / "kernels").rglob("__init__.py")}
    assert set(setup["packages"]) == found
    assert "engine.kernels.cuda" in setup["package-data"]


def test_a_source_checkout_with_nothing_installed_mounts_kernels_as_engine_kernels(tmp_path):
    """The GPU machines run from the tree (``python -m pytest`` in a copy, nothing installed)."""
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')\n"
            "                    and '__editable__' not in type(f).__module__]\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('engine').origin.startswith(sys.argv[1])\n"
            "import engine, engine.kernels as k, engine.kernels.cpu.optim as o\n"
            "assert k.__file__ == sys.argv[1] + '/kernels/__init__.py', k.__file__\n"
            "assert engine.kernels is k and o.__name__ == 'engine.kernels.cpu.optim'\n"
            "assert k.impls('adam_step')[0] in ('numba_cpu', 'numpy')\n")
    run = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]


def test_a_checkout_uses_its_own_kernels_beside_an_editable_install_of_another(tmp_path):
    """A git worktree run with PYTHONPATH while the venv holds an editable install of the main
    checkout: that install's finder maps engine.kernels to the other kernels/; the worktree's
    engine must still import its own kernels."""
    other = tmp_path / "other_kernels"
    other.mkdir()
    (other / "__init__.py").write_text("raise ImportError('the other checkout kernels were imported')\n")
    code = ("import importlib.machinery, importlib.util, sys\n"
            "class OtherCheckout:  # what an editable install's finder does for engine.kernels\n"
            "    @classmethod\n"
            "    def find_spec(cls, name, path=None, target=None):\n"
            "        if name == 'engine.kernels':\n"
            "            return importlib.util.spec_from_file_location(name, sys.argv[2] + '/__init__.py',\n"
            "                                                          submodule_search_locations=[sys.argv[2]])\n"
            "sys.meta_path.insert(0, OtherCheckout)\n"
            "import engine, engine.kernels as k\n"
            "assert k.__file__ == sys.argv[1] + '/kernels/__init__.py', k.__file__\n")
    run = subprocess.run([sys.executable, "-c", code, str(ROOT), str(other)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]


def test_no_other_installed_distribution_ships_engine_or_uses_our_names():
    import importlib.metadata as md
    owners = md.packages_distributions()
    assert set(owners.get("engine", [])) == {"gpu-engine"}, owners.get("engine")
    assert "gpu-engine" not in owners.get("kernels", []), owners.get("kernels")  # we install no top-level kernels


def test_import_kernels_in_a_checkout_gets_the_installed_distribution_not_ours(tmp_path):
    """`python -m pytest` in the checkout puts its root on sys.path, where kernels/ is found as a
    top-level `kernels`: transformers' `import kernels` must still get Hugging Face's."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("FOREIGN = True\nclass CUDAProperties: pass\n")
    code = ("import sys\n"
            "import engine, kernels\n"
            "assert kernels.FOREIGN and kernels.__file__.startswith(sys.argv[1]), kernels.__file__\n"
            "from kernels import CUDAProperties\n"
            "assert engine.kernels.impls('adam_step') and engine.kernels is not kernels\n"
            "assert 'kernels._top_level_name' not in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": f"{ROOT}:{site}"})  # ours first on the path
    assert run.returncode == 0, run.stderr[-3000:]


def test_import_kernels_in_a_checkout_without_another_says_whose_it_is(tmp_path):
    code = "import kernels\n"
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # -S: no site-packages, no other kernels
    assert run.returncode == 1
    assert "engine's kernels package: import it as engine.kernels" in run.stderr, run.stderr[-2000:]
