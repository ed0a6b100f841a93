"""A readable tensor engine: numpy on CPU, cupy on CUDA, define-by-run autograd, fused kernels.

Example:
    >>> import engine
    >>> x = engine.randn(4, 3, requires_grad=True)
    >>> loss = (x @ engine.ones(3, 2)).relu().mean()
    >>> loss.backward()
    >>> x.grad.shape
    (4, 3)
"""

from engine import data, functional, io, metrics, nn, optim  # noqa: F401  (engine.nn.Linear ...)
from engine.autograd import Function, enable_grad, is_grad_enabled, no_grad
from engine.backend import (CPU, Device, best_device, cuda_available, cuda_device_count, default_device,
                            device, get_rng_state, manual_seed, set_default_device, set_rng_state, synchronize)
from engine.errors import DeviceError, DTypeError, EngineError, GradError, ShapeError
from engine.gradcheck import GradcheckError, gradcheck
from engine.ops import (abs, argmax, argmin, cat, clip, concatenate, exp, log, matmul, maximum, mean, minimum,
                        permute, reshape, sigmoid, sqrt, stack, std, sum, tanh, transpose, var, where)
from engine.ops import max as amax  # noqa: F401
from engine.ops import min as amin  # noqa: F401
from engine.ops import relu, softmax, log_softmax, gelu  # noqa: F401
from engine.tensor import (Tensor, arange, bool_, empty, eye, float16, float32, float64, full, full_like, int32,
                           int64, ones, ones_like, rand, randint, randn, tensor, zeros, zeros_like)

from engine.io import CheckpointError, load, save

clamp = clip

__version__ = "0.1.0"
from engine import utils  # noqa: E402,F401  (torch.utils.data's import path: engine.utils.data)
