"""Linear layer fused with ReLU on the CPU: ``y = relu(x @ W.T + b)`` and its backward.

Shapes: x (N, K), weight W (M, K), bias b (M,) or None, output y (N, M). The forward output
is the only saved state: backward reads the ReLU mask as ``y > 0``.

Backward, with ``g = dy * (y > 0)``::

    dx = g @ W        (N, K)
    dW = g.T @ x      (M, K)
    db = g.sum(0)     (M,)

Every impl (``numpy`` and ``numba_cpu`` here, ``numba_cuda`` and ``cupy`` elsewhere) calls the
validators of this module first (:func:`validate_forward`, :func:`validate_backward`); they
accept numpy and cupy arrays alike.

The ``numba_cpu`` impl leaves the GEMMs to numpy's BLAS (``np.matmul(..., out=)``: numba's own
``np.dot`` needs SciPy, which the project does not depend on) and fuses everything else:

- forward: one pass over the GEMM output adds the bias and applies ReLU in place;
- backward: one pass over ``dy`` and ``y`` writes ``g`` and the per-chunk column sums of ``g``,
  which a second tiny pass adds up into ``db`` in a fixed order (deterministic: the chunking
  depends only on N).

The fused passes are single-threaded on purpose (``njit`` without ``parallel=True``). Measured
on a 2-core machine at N=4096, K=M=1024 float32, the ``prange`` versions made the whole call
*slower* than the numpy reference (backward 0.94x): numba's OpenMP threads spin-wait after a
parallel region and fight OpenBLAS's own threads for the cores during the GEMM that follows
(``OMP_WAIT_POLICY=passive`` or numba's ``workqueue`` layer removes the loss, but both are
process-wide settings a kernel must not make). The serial passes already beat numpy's three
separate passes 2-3x, and the chunked reduction keeps a ``prange`` one word away (a parallel
build would be called through ``registry.numba_parallel``, as optim's and cross-entropy's are: two
threads in parallel regions at once abort the process under workqueue). Serial, these passes are
safe to call from any number of Python threads; so is numpy's BLAS.

float16 and bfloat16 (kernels/precision.py): both CPU impls compute them in float32 and round
each result once, as PyTorch's CPU kernels do. BLAS has no 16-bit GEMM and numba takes no 16-bit
arrays, so the inputs are widened to float32 copies at the boundary and the outputs narrowed back:
forward converts x and W (N K + M K values) and y (N M), backward converts dy, x, W and y and the
three gradients (``numpy``: NumPy's astype; ``numba_cpu``: the bit loops of kernels/cpu/convert.py,
equal bits, faster). Their cost is measured in docs/kernels/linear_relu.md.

``import engine.kernels.cpu.linear_relu`` does not import numba: the jitted functions are built on
first use.
"""

from __future__ import annotations

import functools

import numpy as np

from ..cpu import convert
from ..precision import FLOAT_NAMES, float_name, is_low_precision, narrow, widen
from ..registry import KernelError
from ..registry import describe_array as _describe
from ..registry import different_gpus as _different_gpus
from ..registry import misplaced_arrays_message as _misplaced_arrays_message
from ..threads import for_gemm

_FLOATS = ", ".join(FLOAT_NAMES[:-1]) + " or " + FLOAT_NAMES[-1]  # for the error messages

# Row chunks of the numba_cpu backward prologue: one partial column sum per chunk. A function of
# N only, so the summation order (and the result, bit for bit) does not depend on the threads.
_DB_CHUNKS = 64


# --------------------------------------------------------------------------------------------
# Validation, shared by every impl
# --------------------------------------------------------------------------------------------


def _check(kernel: str, arrays: dict, ndims: dict, shapes_ok, shape_rule: str):
    """Common checks of one call; return the arrays' common float dtype.

    ``arrays`` maps argument name -> array or None (None means "absent": only the bias may be),
    ``ndims`` argument name -> required ndim, ``shapes_ok`` a function telling whether the
    shapes agree (called once the ndims are known to be right) and ``shape_rule`` the rule to
    print when they do not.
    """
    def fail(what: str):  # described only on failure: this check runs on every call
        described = ", ".join(_describe(n, a) for n, a in arrays.items())
        raise KernelError(f"{kernel}({described}): {what}")

    present = {n: a for n, a in arrays.items() if a is not None}
    problem = _misplaced_arrays_message(present)
    if problem:
        fail(problem)
    for name, a in present.items():
        if a.ndim != ndims[name]:
            fail(f"{name} must be {ndims[name]}-D, got {a.ndim}-D")
    dtypes = {np.dtype(a.dtype) for a in present.values()}
    if len(dtypes) > 1:
        fail(f"the arrays must share one float dtype ({_FLOATS}); cast them explicitly, "
             "e.g. a.astype(np.float32) - nothing is promoted silently")
    dtype = dtypes.pop()
    if float_name(dtype) is None:
        fail(f"dtype {dtype} is not supported; use {_FLOATS}")
    for name, a in present.items():
        if not a.flags.c_contiguous:
            fail(f"{name} is not C-contiguous; pass np.ascontiguousarray({name}) "
                 f"(cupy.ascontiguousarray on the GPU)")
    if not shapes_ok():
        fail(f"shapes do not agree: {shape_rule}")
    return dtype


def _arrays_pass(arrays: dict, ndims: dict):
    """The arrays' common dtype when every per-array check of :func:`_check` passes, else None.

    The same checks in one pass with no error text prepared (they run on every call); arrays of
    exactly numpy.ndarray or one cupy type only, anything else gets the full checks.
    """
    cls = dtype = None
    for name, a in arrays.items():
        if a is None:
            continue
        if cls is None:
            cls = type(a)
            if cls is not np.ndarray and cls.__module__.split(".")[0] != "cupy":
                return None
            dtype = a.dtype
            if float_name(dtype) is None:
                return None
        elif type(a) is not cls or a.dtype != dtype:
            return None
        if a.ndim != ndims[name] or not a.flags.c_contiguous:
            return None
    if cls is not np.ndarray and _different_gpus(arrays.values()):
        return None
    return dtype


def validate_forward(x, weight, bias, kernel: str = "linear_relu_forward"):
    """Check the arguments of ``linear_relu_forward``; return their common dtype."""
    arrays = {"x": x, "weight": weight, "bias": bias}
    ndims = {"x": 2, "weight": 2, "bias": 1}

    def shapes_ok():
        if x.shape[1] != weight.shape[1]:
            return False
        return bias is None or bias.shape[0] == weight.shape[0]

    dtype = _arrays_pass(arrays, ndims)
    if dtype is not None and shapes_ok():
        return dtype
    return _check(kernel, arrays, ndims, shapes_ok,
                  "need x (N, K), weight (M, K) and bias (M,) or None")


def validate_backward(grad_out, x, weight, out, kernel: str = "linear_relu_backward"):
    """Check the arguments of ``linear_relu_backward``; return their common dtype."""
    arrays = {"grad_out": grad_out, "x": x, "weight": weight, "out": out}
    for name, a in arrays.items():
        if a is None:
            raise KernelError(f"{kernel}: {name} is None; every argument is required "
                              "(out is the forward output)")
    ndims = {"grad_out": 2, "x": 2, "weight": 2, "out": 2}

    def shapes_ok():
        n, k = x.shape
        m = weight.shape[0]
        return weight.shape[1] == k and tuple(out.shape) == (n, m) and tuple(grad_out.shape) == (n, m)

    dtype = _arrays_pass(arrays, ndims)
    if dtype is not None and shapes_ok():
        return dtype
    return _check(kernel, arrays, ndims, shapes_ok,
                  "need grad_out (N, M), x (N, K), weight (M, K) and out (N, M), "
                  "out being the forward output")


# --------------------------------------------------------------------------------------------
# numpy: the reference
# --------------------------------------------------------------------------------------------


def linear_relu_forward_numpy(x, weight, bias=None):
    """Reference forward: the GEMM, then the bias, then ReLU (NaN propagates, as in PyTorch).

    16-bit inputs: all of it in float32, y rounded once.
    """
    dtype = validate_forward(x, weight, bias)
    if is_low_precision(dtype):
        return narrow(linear_relu_forward_numpy(*(widen(a) for a in (x, weight, bias))), dtype)
    y = x @ weight.T
    if bias is not None:
        y += bias
    np.maximum(y, 0, out=y)
    return y


def linear_relu_backward_numpy(grad_out, x, weight, out, *, compute_grad_x=True):
    """Reference backward -> ``(grad_x, grad_weight, grad_bias)``; grad_x None if not computed.

    16-bit inputs: all of it in float32, each gradient rounded once.
    """
    dtype = validate_backward(grad_out, x, weight, out)
    if is_low_precision(dtype):
        grads = linear_relu_backward_numpy(*(widen(a) for a in (grad_out, x, weight, out)),
                                           compute_grad_x=compute_grad_x)
        return tuple(narrow(g, dtype) for g in grads)
    g = grad_out * (out > 0)
    return (g @ weight if compute_grad_x else None), g.T @ x, g.sum(axis=0)


# --------------------------------------------------------------------------------------------
# numba_cpu: BLAS GEMMs, fused element-wise stages
# --------------------------------------------------------------------------------------------


def linear_relu_forward_numba(x, weight, bias=None):
    """Forward with numpy's BLAS GEMM into a fresh output and a fused bias+ReLU pass in place.

    16-bit inputs: the same on float32 copies (BLAS and numba take no 16-bit arrays), y rounded once.
    """
    dtype = validate_forward(x, weight, bias)
    if is_low_precision(dtype):
        return convert.narrow(linear_relu_forward_numba(*(convert.widen(a) for a in (x, weight, bias))), dtype)
    n, m = x.shape[0], weight.shape[0]
    y = np.empty((n, m), dtype=dtype)
    for_gemm(n, m, x.shape[1])
    np.matmul(x, weight.T, out=y)
    if y.size:
        has_bias = bias is not None
        _jitted().forward_epilogue(y, bias if has_bias else np.zeros(1, dtype), has_bias)
    return y


def linear_relu_backward_numba(grad_out, x, weight, out, *, compute_grad_x=True):
    """Backward: one fused pass makes ``g`` and ``db``; the two GEMMs go to numpy's BLAS.

    16-bit inputs: the same on float32 copies, each gradient rounded once.
    """
    dtype = validate_backward(grad_out, x, weight, out)
    if is_low_precision(dtype):
        grads = linear_relu_backward_numba(*(convert.widen(a) for a in (grad_out, x, weight, out)),
                                           compute_grad_x=compute_grad_x)
        return tuple(convert.narrow(g, dtype) for g in grads)
    n, k = x.shape
    m = weight.shape[0]
    g = np.empty((n, m), dtype=dtype)
    grad_bias = np.zeros(m, dtype=dtype)
    if g.size:
        chunks = min(n, _DB_CHUNKS)
        partial = np.empty((chunks, m), dtype=dtype)
        _jitted().backward_prologue(grad_out, out, g, partial, grad_bias)
    grad_x = None
    for_gemm(n, m, k)
    if compute_grad_x:
        grad_x = np.empty((n, k), dtype=dtype)
        np.matmul(g, weight, out=grad_x)
    grad_weight = np.empty((m, k), dtype=dtype)
    np.matmul(g.T, x, out=grad_weight)
    return grad_x, grad_weight, grad_bias


class _Jitted:
    def __init__(self, forward_epilogue, backward_prologue):
        self.forward_epilogue = forward_epilogue
        self.backward_prologue = backward_prologue


@functools.cache
def _jitted() -> _Jitted:
    import numba

    # Serial on purpose: see the module docstring (parallel regions slow down the BLAS GEMMs).
    @numba.njit(cache=True)
    def forward_epilogue(y, bias, has_bias):
        """y = relu(y + bias) in place, one pass."""
        n, m = y.shape
        zero = y.dtype.type(0)
        for i in range(n):
            row = y[i]
            if has_bias:
                for j in range(m):
                    v = row[j] + bias[j]
                    # ``v <= 0`` is False for NaN, so NaN propagates like np.maximum.
                    row[j] = zero if v <= zero else v
            else:
                for j in range(m):
                    v = row[j]
                    row[j] = zero if v <= zero else v

    @numba.njit(cache=True)
    def backward_prologue(dy, y, g, partial, db):
        """g = dy * (y > 0) and db = g.sum(0) in one pass over dy and y.

        Rows are cut into ``partial.shape[0]`` contiguous chunks, each summed into its own row
        of ``partial``; the chunks are then added up in chunk order. Two short sums instead of
        one long one (smaller rounding error), and each chunk is independent work, ready for a
        ``prange``. The order of every addition is fixed by N alone: deterministic.
        """
        n, m = dy.shape
        chunks = partial.shape[0]
        zero = dy.dtype.type(0)
        for c in range(chunks):
            start = c * n // chunks
            stop = (c + 1) * n // chunks
            # A chunk-local accumulator: LLVM can see it aliases nothing and vectorizes the row loop.
            acc = np.zeros(m, dtype=dy.dtype)
            for i in range(start, stop):
                for j in range(m):
                    # A product, not a select, exactly like the numpy reference (inf * 0 is NaN).
                    v = dy[i, j] * (y[i, j] > zero)
                    g[i, j] = v
                    acc[j] += v
            partial[c] = acc
        # Row by row (contiguous, vectorized); each column still adds its chunks in order.
        db[:] = zero
        for c in range(chunks):
            for j in range(m):
                db[j] += partial[c, j]

    return _Jitted(forward_epilogue, backward_prologue)
