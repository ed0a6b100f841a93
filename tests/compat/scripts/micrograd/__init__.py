# Vendored from karpathy/micrograd (MIT licence), micrograd/__init__.py (empty there too), so that
# micrograd_test_engine.py keeps its own `from micrograd.engine import Value` line.
