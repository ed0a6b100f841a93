"""Every fused kernel and its implementations, in preference order.

Adding an impl is one line here plus the function itself. All impls of a kernel share the
signature documented on its public wrapper in kernels/__init__.py. File layout per kernel:

    kernels/cpu/<module>.py         <kernel>_numpy (the reference) and <kernel>_numba (njit)
    kernels/cuda/<module>.py        <kernel>: cupy wrapper around kernels/cuda/<module>.cu
    kernels/numba_cuda/<module>.py  <kernel>: numba.cuda.jit version
"""

from kernels.registry import register


def _declare(kernel: str, module: str, cpu_order: tuple[str, ...] = ("numba_cpu", "numpy")) -> None:
    """Register the four impls of ``kernel``: CPU ones in ``cpu_order``, then cupy, then numba_cuda."""
    cpu = {
        "numba_cpu": (f"kernels.cpu.{module}:{kernel}_numba", ("numba",)),
        "numpy": (f"kernels.cpu.{module}:{kernel}_numpy", ()),
    }
    for name in cpu_order:
        target, requires = cpu[name]
        register(kernel, name, target, array_kind="numpy", requires=requires)
    register(kernel, "cupy", f"kernels.cuda.{module}:{kernel}", array_kind="cupy", requires=("cupy",))
    register(kernel, "numba_cuda", f"kernels.numba_cuda.{module}:{kernel}", array_kind="cupy",
             requires=("numba", "numba.cuda"))


_declare("linear_relu_forward", "linear_relu")
_declare("linear_relu_backward", "linear_relu")
_declare("softmax_cross_entropy", "softmax_cross_entropy")
_declare("layer_norm_forward", "layer_norm")
_declare("layer_norm_backward", "layer_norm")
_declare("adam_step", "optim")
_declare("sgd_step", "optim")
_declare("adagrad_step", "optim")
_declare("rmsprop_step", "optim")
_declare("attention_forward", "attention")
_declare("attention_backward", "attention")
_declare("gelu_forward", "gelu")
_declare("gelu_backward", "gelu")
