"""A readable tensor engine: numpy on CPU, cupy on CUDA, define-by-run autograd, fused kernels.

Example:
    >>> import engine
    >>> x = engine.randn(4, 3, requires_grad=True)
    >>> loss = (x @ engine.ones(3, 2)).relu().mean()
    >>> loss.backward()
    >>> x.grad.shape
    (4, 3)
"""

import os as _os
import sys as _sys

# OpenBLAS's workers spin about 0.1 s after each threaded GEMM before they sleep, taking a core
# from the numba regions and the attention threads that follow (docs/architecture.md, "CPU
# threads"). OpenBLAS reads this once, when numpy loads it: so only before numpy's first import,
# and a value the user set wins. 4 is OpenBLAS's smallest: 2^4 cycles of spinning.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from engine import _host_memory  # noqa: E402

_host_memory.keep_freed_memory()  # no page faults for the arrays a step frees and allocates again

from engine import _kernels_package  # noqa: E402  (after the OpenBLAS setting: it imports numpy)

_kernels_package.mount()  # engine.kernels: the repository's kernels/ folder (engine/_kernels_package.py says why)

from engine import amp, data, functional, io, metrics, nn, optim  # noqa: F401  (engine.nn.Linear ...)
from engine.amp import autocast, get_autocast_dtype, is_autocast_enabled
from engine.autograd import Function, enable_grad, is_grad_enabled, no_grad
from engine.autograd import inference_mode, is_inference_mode_enabled  # noqa: F401
from engine.backend import (CPU, Device, best_device, cuda_available, cuda_device_count, default_device,
                            device, get_rng_state, manual_seed, set_default_device, set_rng_state, synchronize)
from engine.backend import get_float32_matmul_precision, set_float32_matmul_precision  # noqa: F401
from engine.backend import get_num_threads, set_num_threads  # noqa: F401
from engine.errors import DeviceError, DTypeError, EngineError, GradError, ShapeError
from engine.gradcheck import GradcheckError, gradcheck
from engine.ops import (abs, add, amax, amin, argmax, argmin, bitwise_and, bitwise_not, bitwise_or, bitwise_xor, cat,
                        clip, concatenate, cos, div, exp, flatten, log, logical_and, logical_not, logical_or, matmul,
                        max, maximum, mean, min, minimum, mm, mul, norm, permute, pow, prod, reshape, return_types,
                        sigmoid, sin, sqrt, square, stack, std, sub, sum, t, tanh, transpose, var, where)
from engine.ops import relu, softmax, log_softmax, gelu  # noqa: F401
from engine.ops import all, any  # noqa: F401,E402  (torch.any / torch.all: tensors, as PyTorch)
from engine.tensor import (Tensor, arange, bool_, empty, eye, float16, float32, float64, from_numpy, full, full_like,
                           int8, int16, int32, int64, linspace, normal, ones, ones_like, rand, rand_like, randint, randn,
                           randn_like, randperm, tensor, uint8, zeros, zeros_like)
from engine.tensor import bfloat16  # noqa: F401,E402  (ml_dtypes.bfloat16, as torch.bfloat16)
from engine.tensor import as_tensor, from_dlpack  # noqa: F401,E402  (torch.as_tensor, DLPack: docs/interop.md)
from engine.backend import Generator  # noqa: E402
from engine.indexing import (allclose, argsort, argwhere, count_nonzero, equal, gather, index_copy, index_fill,  # noqa: E402
                             index_select, isclose, masked_fill, masked_select, multinomial, nonzero, scatter,
                             scatter_add, sort, topk, tril, triu)
from engine.ops import eq, ge, gt, le, lt, ne, squeeze, unsqueeze  # noqa: E402
from engine.ops import expm1, log1p  # noqa: E402
from engine.shaping import (bmm, chunk, cumsum, flip, fliplr, flipud, movedim, narrow, repeat_interleave,  # noqa: E402
                            roll, split, tile, unbind)
from engine.tensor import legacy_tensor_types as _legacy_tensor_types  # noqa: E402

globals().update(_legacy_tensor_types("cpu"))  # engine.FloatTensor, engine.LongTensor, ... (PyTorch's legacy types)
greater, greater_equal, less, less_equal, not_equal = gt, ge, lt, le, ne
moveaxis, swapaxes, swapdims = movedim, transpose, transpose

from engine.io import CheckpointError, load, save
from engine.kernels import threads as _threads  # noqa: E402

_threads.ensure_default()  # BLAS and numba sized to the CPUs this process may use (docs/architecture.md)

import builtins  # noqa: E402  (this module rebinds float, int, bool to dtypes below)

clamp = clip


class set_grad_enabled:
    """Turn gradient recording on or off, as ``torch.set_grad_enabled``: as a function call
    (``engine.set_grad_enabled(False)``), a context manager (``with engine.set_grad_enabled(train):``)
    restoring the previous mode on exit, or a decorator."""

    def __init__(self, mode: bool):
        from engine import autograd

        self._previous = autograd.is_grad_enabled()
        self._mode = mode is True or (mode is not False and builtins.bool(mode))
        autograd._mode.enabled = self._mode and not autograd._mode.inference  # the thread's grad mode (no_grad's switch)

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        from engine import autograd

        autograd._mode.enabled = self._previous
        return False

    def __call__(self, fn):
        import functools

        from engine import autograd

        autograd._mode.enabled = self._previous  # as a decorator it changes the mode only inside fn

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(self._mode):
                return fn(*args, **kwargs)
        return wrapper


# PyTorch's torch.cuda / torch.cpu / torch.backends: real packages (import no cupy)
from engine import backends, cpu, cuda  # noqa: E402
from engine import _dynamo, accelerator  # noqa: E402,F401  (torch.accelerator, torch._dynamo.reset)
from engine._compile import compile  # noqa: E402,A001  (torch.compile: returns its argument unchanged)

# PyTorch's dtype names (numpy dtypes underneath: t.dtype == engine.float is True)
float, double, half = float32, float64, float16  # noqa: A001
from engine.dtypes import can_cast, finfo, promote_types  # noqa: E402,F401  (torch's names; finfo knows bfloat16)
from engine.ops import result_type  # noqa: E402,F401
long, int, short, bool = int64, int32, int16, bool_  # noqa: A001

__version__ = "0.1.0"
from engine import utils  # noqa: E402,F401  (torch.utils.data's import path: engine.utils.data)
from engine import testing  # noqa: E402,F401  (torch.testing: engine.testing.assert_close)
