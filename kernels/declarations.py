"""Every fused kernel and its implementations, in preference order.

Adding an impl is one line here plus the function itself. All impls of a kernel share the
signature documented on its public wrapper in kernels/__init__.py. File layout per kernel:

    kernels/cpu/<module>.py         <kernel>_numpy (the reference) and <kernel>_numba (njit)
    kernels/cuda/<module>.py        <kernel>: cupy wrapper around kernels/cuda/<module>.cu
    kernels/numba_cuda/<module>.py  <kernel>: numba.cuda.jit version

Each impl names the float dtypes it takes (``dtypes``: impl -> names; float32 and float64 where a
kernel gives none). The 16-bit dtypes are computed in float32 and rounded once at the store
(kernels/precision.py); numba has no bfloat16, so a numba_cuda impl takes float16 at most.
"""

from .registry import DEFAULT_DTYPES, register

# Every float dtype, natively on the GPU, through float32 at the boundary on the CPU.
ALL_FLOATS = ("float32", "float64", "float16", "bfloat16")
# numba.cuda has float16 (numba.cuda.fp16) but no bfloat16: bfloat16 cupy arrays go to cupy.
NO_BFLOAT16 = ("float32", "float64", "float16")
LOW_PRECISION_DTYPES = {"numba_cpu": ALL_FLOATS, "numpy": ALL_FLOATS, "cupy": ALL_FLOATS, "numba_cuda": NO_BFLOAT16}


def _declare(kernel: str, module: str, cpu_order: tuple[str, ...] = ("numba_cpu", "numpy"),
             dtypes: dict[str, tuple[str, ...]] | None = None) -> None:
    """Register the four impls of ``kernel``: CPU ones in ``cpu_order``, then cupy, then numba_cuda.

    ``dtypes`` maps impl name -> the float dtypes it takes (DEFAULT_DTYPES for an impl not named).
    """
    dtypes = dtypes or {}
    cpu = {
        "numba_cpu": (f"{__package__}.cpu.{module}:{kernel}_numba", ("numba",)),
        "numpy": (f"{__package__}.cpu.{module}:{kernel}_numpy", ()),
    }
    for name in cpu_order:
        target, requires = cpu[name]
        register(kernel, name, target, array_kind="numpy", requires=requires,
                 dtypes=dtypes.get(name, DEFAULT_DTYPES))
    register(kernel, "cupy", f"{__package__}.cuda.{module}:{kernel}", array_kind="cupy", requires=("cupy",),
             dtypes=dtypes.get("cupy", DEFAULT_DTYPES))
    register(kernel, "numba_cuda", f"{__package__}.numba_cuda.{module}:{kernel}", array_kind="cupy",
             requires=("numba", "numba.cuda"), dtypes=dtypes.get("numba_cuda", DEFAULT_DTYPES))


_declare("linear_relu_forward", "linear_relu", dtypes=LOW_PRECISION_DTYPES)
_declare("linear_relu_backward", "linear_relu", dtypes=LOW_PRECISION_DTYPES)
_declare("softmax_cross_entropy", "softmax_cross_entropy", dtypes=LOW_PRECISION_DTYPES)
_declare("layer_norm_forward", "layer_norm", dtypes=LOW_PRECISION_DTYPES)
_declare("layer_norm_backward", "layer_norm", dtypes=LOW_PRECISION_DTYPES)
_declare("adam_step", "optim")
_declare("sgd_step", "optim")
_declare("adagrad_step", "optim")
_declare("rmsprop_step", "optim")
# Attention: float64 only on the CPU; numba_cuda stays the readable float32 SIMT kernel.
ATTENTION_DTYPES = {"numba_cpu": ALL_FLOATS, "numpy": ALL_FLOATS, "cupy": ("float32", "float16", "bfloat16"),
                    "numba_cuda": ("float32",)}
_declare("attention_forward", "attention", dtypes=ATTENTION_DTYPES)
_declare("attention_backward", "attention", dtypes=ATTENTION_DTYPES)
_declare("gelu_forward", "gelu", dtypes=LOW_PRECISION_DTYPES)
_declare("gelu_backward", "gelu", dtypes=LOW_PRECISION_DTYPES)
