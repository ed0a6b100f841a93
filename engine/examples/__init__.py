"""Runnable examples: ``python -m engine.examples.<name>``."""
