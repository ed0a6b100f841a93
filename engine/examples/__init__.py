"""Runnable examples: ``python -m engine.examples.<name>``."""

import argparse

import engine

DEVICE_HELP = "auto (the GPU if cupy finds one, else the CPU), cpu, cuda, cuda:N"


def argument_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The command line parser of example ``name``: its ``--help`` names the command that runs it
    (``python -m engine.examples.<name>``) and shows each option's default."""
    return argparse.ArgumentParser(prog=f"python -m engine.examples.{name}", description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def chosen_device(name: str):
    """The device a ``--device`` option names: ``auto`` is :func:`engine.best_device`."""
    return engine.best_device() if name == "auto" else engine.device(name)
