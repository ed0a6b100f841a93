"""``engine.backends.cuda``: PyTorch's ``torch.backends.cuda.matmul.allow_tf32`` and the
scaled-dot-product-attention switches.

``matmul.allow_tf32`` is a view of ``engine.set_float32_matmul_precision``, kept consistent with
it as in PyTorch: setting True selects "high", False "highest", and it reads True whenever the
precision is "high" or "medium". On the GPU the setting decides whether cuBLAS may run float32
GEMMs on TF32 tensor cores (engine/backend.py applies it); on the CPU it changes nothing.
"""

import contextlib

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


# ---- scaled_dot_product_attention's implementations ---------------------------------------------
#
# PyTorch picks among flash, memory-efficient, cuDNN and math kernels. The engine has two: its
# fused attention kernel (flash style: what PyTorch's flash, memory-efficient and cuDNN kernels are)
# and the unfused composition (PyTorch's math kernel). F.scaled_dot_product_attention reads these
# switches (on every device, as PyTorch's apply to its CPU kernels too) through fused_sdp_allowed()
# and math_sdp_enabled(); with every usable one switched off it raises, as PyTorch does.

_sdp_enabled = {"flash": True, "mem_efficient": True, "math": True, "cudnn": True}


def _set_sdp(name: str, enabled) -> None:
    if not isinstance(enabled, bool):
        raise TypeError(f"backends.cuda.enable_{name}_sdp: expected a bool, got {enabled!r}")
    _sdp_enabled[name] = enabled


def enable_flash_sdp(enabled: bool) -> None:
    """Allow (True) or forbid the flash attention kernel (the engine's fused attention kernel)."""
    _set_sdp("flash", enabled)


def enable_mem_efficient_sdp(enabled: bool) -> None:
    """Allow or forbid the memory-efficient kernel (also served by the engine's fused kernel)."""
    _set_sdp("mem_efficient", enabled)


def enable_math_sdp(enabled: bool) -> None:
    """Allow or forbid the math implementation (the engine's unfused composition)."""
    _set_sdp("math", enabled)


def enable_cudnn_sdp(enabled: bool) -> None:
    """Allow or forbid the cuDNN kernel (also served by the engine's fused kernel)."""
    _set_sdp("cudnn", enabled)


def flash_sdp_enabled() -> bool:
    """Whether the flash attention kernel may run (default True)."""
    return _sdp_enabled["flash"]


def mem_efficient_sdp_enabled() -> bool:
    """Whether the memory-efficient attention kernel may run (default True)."""
    return _sdp_enabled["mem_efficient"]


def math_sdp_enabled() -> bool:
    """Whether the math attention implementation may run (default True)."""
    return _sdp_enabled["math"]


def cudnn_sdp_enabled() -> bool:
    """Whether the cuDNN attention kernel may run (default True)."""
    return _sdp_enabled["cudnn"]


def fused_sdp_allowed() -> bool:
    """Whether any of the kernels the engine's fused attention stands for is switched on."""
    return _sdp_enabled["flash"] or _sdp_enabled["mem_efficient"] or _sdp_enabled["cudnn"]


@contextlib.contextmanager
def sdp_kernel(enable_flash: bool = True, enable_math: bool = True, enable_mem_efficient: bool = True,
               enable_cudnn: bool = True):
    """Context manager switching the attention implementations for the block and restoring them
    after it (PyTorch's deprecated ``torch.backends.cuda.sdp_kernel``; scripts still use it)."""
    previous = dict(_sdp_enabled)
    for name, enabled in (("flash", enable_flash), ("math", enable_math), ("mem_efficient", enable_mem_efficient),
                          ("cudnn", enable_cudnn)):
        _set_sdp(name, enabled)
    try:
        yield
    finally:
        _sdp_enabled.update(previous)
