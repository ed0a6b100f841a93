"""PyTorch-compatibility tests: PyTorch idioms run with only the import changed."""
