"""``engine.backends.mps``: there is no Apple MPS backend; both queries answer False."""


def is_available() -> bool:
    """False: the engine runs on CPUs and CUDA GPUs only."""
    return False


def is_built() -> bool:
    """False: the engine has no MPS backend."""
    return False
