"""The first run says once that numba is compiling the kernels; a cached run and ENGINE_QUIET_COMPILE say nothing.

Each case runs in a fresh process with its own NUMBA_CACHE_DIR, so that numba really compiles
(or really loads from that cache) whatever this test process has compiled before.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.kernels import compile_notice

ROOT = Path(__file__).resolve().parents[2]
NOTICE = compile_notice.MESSAGE
# Two kernels through the registry, as a training step reaches them: one notice for both.
SCRIPT = ("import numpy as np, engine.kernels as k\n"
          "p = np.ones(8, np.float32); g = np.full(8, 0.5, np.float32)\n"
          "assert k.impls('sgd_step')[0] == 'numba_cpu'\n"
          "k.sgd_step(p, g, lr=0.1)\n"
          "k.sgd_step(p, g, lr=0.1, impl='numba_cpu')\n"
          "print('ran', flush=True)\n")


def _run(cache_dir: Path, **env_extra) -> str:
    env = {k: v for k, v in os.environ.items() if k != compile_notice.ENV_VAR}
    env.update(PYTHONPATH=str(ROOT), NUMBA_CACHE_DIR=str(cache_dir), **env_extra)
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0 and "ran" in run.stdout, run.stderr[-3000:]
    return run.stderr


@pytest.mark.slow
def test_first_run_says_it_once_and_the_cached_run_says_nothing(tmp_path):
    first = _run(tmp_path / "cache")
    assert first.count(NOTICE) == 1, first
    assert any(tmp_path.joinpath("cache").iterdir())  # numba did write its cache there
    assert NOTICE not in _run(tmp_path / "cache")  # loaded from the cache: nothing compiles


@pytest.mark.slow
def test_the_environment_variable_silences_it(tmp_path):
    assert NOTICE not in _run(tmp_path / "fresh", ENGINE_QUIET_COMPILE="1")


def test_configured_logging_receives_it_instead_of_stderr(monkeypatch, capsys, caplog):
    monkeypatch.setattr(compile_notice, "_said", False)
    with caplog.at_level(logging.INFO, logger="engine.kernels"):
        compile_notice._say_once()
        compile_notice._say_once()
    assert [r.getMessage() for r in caplog.records] == [NOTICE]
    assert NOTICE not in capsys.readouterr().err


def test_without_logging_configured_it_goes_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(compile_notice, "_said", False)
    logger = logging.getLogger("engine.kernels")
    monkeypatch.setattr(logger, "hasHandlers", lambda: False)
    compile_notice._say_once()
    compile_notice._say_once()
    assert capsys.readouterr().err.count(NOTICE) == 1
