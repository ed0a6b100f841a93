"""The README's promises: its test command is what CI runs, and its example trains."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _commands():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_the_two_commands():
    main_job, tests = _commands()
    assert "pip install -e ." in main_job and "python -m engine.examples." in main_job
    # The test extra, with the CUDA extra that gives the no-GPU compile checks NVRTC and NVVM.
    assert re.search(r'pip install -e "\.\[test(,cuda1[23])?\]"', tests) and "python -m pytest" in tests


def test_ci_runs_the_readme_test_command():
    tests = _commands()[1]
    after_venv = tests.split("&& . .venv/bin/activate && ", 1)[1]
    assert after_venv in (ROOT / ".ci" / "run").read_text()


def test_readme_gives_the_fast_subset_command_and_the_marker_exists():
    assert 'python -m pytest -m "not slow"' in README
    assert '"slow:' in (ROOT / "pyproject.toml").read_text()


def test_readme_example_trains(capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert len(code.splitlines()) <= 25
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["loss"].item() < 0.4, "the README example should learn the XOR-like task"
    assert "loss" in capsys.readouterr().out
