"""Every ```python block of docs/*.md and docs/kernels/*.md runs as written (one test per block).

A page's blocks run in order in one namespace, as a reader runs them one after the other, in a
temporary directory of the page's own (files a block writes land there). A block whose first line
is ``# needs: cuda`` carries the ``gpu`` mark: it is skipped where no CUDA device answers and runs
under ``python -m pytest -m gpu`` (the CPU blocks before it run first, as its setup). ``# needs:
torch`` (or ``tensorboard``) skips a block only where that optional package does not import (CI
installs both). The convention is described in docs/contributing.md.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import engine

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*ROOT.glob("docs/*.md"), *ROOT.glob("docs/kernels/*.md")])
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NEEDS = re.compile(r"#\s*needs:\s*(.*)")
OPTIONAL_PACKAGES = {"torch", "tensorboard"}  # what a block may need besides the engine's own dependencies
KNOWN_NEEDS = {"cuda"} | OPTIONAL_PACKAGES


class Block:
    def __init__(self, page: Path, line: int, code: str):
        self.page, self.line, self.code = page, line, code
        first = code.split("\n", 1)[0].strip()
        match = NEEDS.fullmatch(first)
        self.needs = {word.strip() for word in match.group(1).split(",") if word.strip()} if match else set()

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The page's python blocks, each with the line its fence opens on."""
    text = page.read_text(encoding="utf-8")
    return [Block(page, text.count("\n", 0, m.start()) + 1, m.group(1)) for m in BLOCK.finditer(text)]


def _params():
    params = []
    for page in PAGES:
        for index, block in enumerate(blocks_of(page)):
            marks = [pytest.mark.gpu] if "cuda" in block.needs else []
            params.append(pytest.param(page, index, id=block.where, marks=marks))
    return params


class _PageRun:
    """One page's namespace and how far it has run; blocks run in order, each once."""

    def __init__(self, page: Path, directory: Path):
        self.blocks, self.directory = blocks_of(page), directory
        self.namespace = {"__name__": "__main__"}
        self.done = 0
        self.failed: Block | None = None

    def run_through(self, index: int, monkeypatch) -> None:
        monkeypatch.chdir(self.directory)
        while self.done <= index:
            block = self.blocks[self.done]
            self.done += 1
            if self.failed is not None:
                pytest.skip(f"{self.failed.where}, an earlier block of this page, failed")
            missing = _missing(block.needs)
            if missing:
                if self.done - 1 == index:
                    pytest.skip(f"needs {missing}")
                continue  # such a block is not the setup of a later one (docs/contributing.md)
            try:
                exec(compile(block.code, block.where, "exec"), self.namespace)
            except BaseException:
                self.failed = block
                raise


def _missing(needs: set) -> str | None:
    """What of ``needs`` this machine lacks (a CUDA device, an optional package), or None."""
    if "cuda" in needs and not engine.cuda_available():
        return "a CUDA device"
    for package in sorted(needs & OPTIONAL_PACKAGES):
        if importlib.util.find_spec(package) is None:
            return f"the optional package {package}"
    return None


_RUNS: dict[Path, _PageRun] = {}


@pytest.fixture(scope="module", autouse=True)
def _clean_up_after_the_pages():
    yield
    import engine.distributed as dist

    if dist.is_initialized():  # a page that forgot destroy_process_group must not leak into other tests
        dist.destroy_process_group()


@pytest.mark.parametrize("page,index", _params())
def test_docs_block_runs(page, index, tmp_path_factory, monkeypatch):
    if page not in _RUNS:
        engine.manual_seed(0)  # each page starts as a fresh session would
        _RUNS[page] = _PageRun(page, tmp_path_factory.mktemp(page.stem))
    _RUNS[page].run_through(index, monkeypatch)


def test_every_needs_marker_is_known():
    unknown = [(block.where, block.needs - KNOWN_NEEDS) for page in PAGES for block in blocks_of(page)
               if block.needs - KNOWN_NEEDS]
    assert not unknown, f"unknown '# needs:' markers (known: {sorted(KNOWN_NEEDS)}): {unknown}"


def test_the_marker_and_the_order(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nx = 1\n```\n\n```python\n# needs: cuda\ny = x + 1\n```\n\n"
                    "```text\nnot code\n```\n\n```python\nz = x + 2\n```\n")
    blocks = blocks_of(page)
    assert [(b.line, b.needs) for b in blocks] == [(3, set()), (7, {"cuda"}), (16, set())]
    run = _PageRun(page, tmp_path)
    run.run_through(2, monkeypatch)  # the GPU block in between is skipped where there is no GPU
    assert run.namespace["z"] == 3 and ("y" in run.namespace) == engine.cuda_available()
