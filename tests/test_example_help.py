"""``--help`` of every runnable example: the command that runs it, a line per option, the defaults."""

import argparse
import runpy
import sys
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "engine" / "examples"
RUNNABLE = sorted(p.stem for p in EXAMPLES.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_every_runnable_example_is_checked():
    assert {"digits", "gpt", "quickstart"} <= set(RUNNABLE)


@pytest.mark.parametrize("name", RUNNABLE)
def test_help_names_the_command_each_option_and_its_default(name, monkeypatch, capsys):
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return parse_args(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module may be imported already
        with pytest.raises(SystemExit) as exit_:
            runpy.run_module(f"engine.examples.{name}", run_name="__main__")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m engine.examples.{name} ")
    (parser,) = parsers
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    flat = " ".join(text.split())  # help lines wrap
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name}: {action.option_strings} has no help line"
        assert action.option_strings[0] in text
        if not action.required:
            assert f"(default: {action.default})" in flat, f"{name}: {action.option_strings} shows no default"
