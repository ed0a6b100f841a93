"""``engine.backends.cuda``: PyTorch's ``torch.backends.cuda.matmul.allow_tf32``.

``matmul.allow_tf32`` is a view of ``engine.set_float32_matmul_precision``, kept consistent with
it as in PyTorch: setting True selects "high", False "highest", and it reads True whenever the
precision is "high" or "medium". On the GPU the setting decides whether cuBLAS may run float32
GEMMs on TF32 tensor cores (engine/backend.py applies it); on the CPU it changes nothing.
"""

from engine import backend


class cuBLASModule:  # noqa: N801 - PyTorch's class name
    """``backends.cuda.matmul``: ``allow_tf32`` (a bool, default False)."""

    def __getattr__(self, name):
        if name == "allow_tf32":
            return backend.matmul_allows_tf32()
        raise AttributeError(f"backends.cuda.matmul has no attribute {name!r}; the engine supports allow_tf32")

    def __setattr__(self, name, value):
        if name == "allow_tf32":
            backend.set_matmul_allow_tf32(value)
            return
        raise AttributeError(f"backends.cuda.matmul has no attribute {name!r}; the engine supports allow_tf32")

    def __repr__(self) -> str:
        return f"backends.cuda.matmul(allow_tf32={backend.matmul_allows_tf32()})"


matmul = cuBLASModule()
