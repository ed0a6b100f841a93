"""Autocast: inside a region, listed ops cast their floating inputs before they run (PyTorch's
``torch.autocast``).

One table per device type (``_POLICIES``, PyTorch's lists from ``autocast_mode.cpp``) maps an op
name to its policy:

- ``"lower"``: floating inputs other than float64 are cast to the region's dtype (matmul, linear,
  conv, attention);
- ``"fp32"``: floating inputs other than float64 are cast to float32 (losses; on CUDA also
  softmax, layer_norm, exp, log, pow, sum, ...);
- ``"promote"``: floating inputs are cast to the widest of them and the region's dtype (cat, stack).

Ops not listed run in their inputs' dtypes. Two hooks apply the table: ``Function.apply``
(engine/autograd.py) by the Function's op name, and :func:`autocast_op` on the entry points of
composite ops (mse_loss, nll_loss, ...) whose inner ops Function.apply would see one by one.

State is thread-local, one region state per device type: a "cpu" region does not touch CUDA
tensors. Casts go through ``engine.ops.cast`` so they are differentiable. The "lower" cast of a
leaf tensor that requires grad (a weight) is cached until the outermost region exits.
"""

from __future__ import annotations

import functools
import threading
import warnings

import numpy as np

from engine import dtypes

DEVICE_TYPES = ("cpu", "cuda")
_DEFAULT_DTYPE = {"cpu": np.dtype(dtypes.bfloat16), "cuda": np.dtype(np.float16)}
_SUPPORTED = {"cpu": dtypes.LOW_PRECISION, "cuda": dtypes.LOW_PRECISION}

# ---- PyTorch's op lists (aten/src/ATen/autocast_mode.cpp), one place -----------------------------

_CPU_LOWER = """conv1d conv2d conv3d bmm mm linalg_vecdot baddbmm addmm addbmm linear linear_relu
    matmul conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d prelu
    scaled_dot_product_attention multi_head_attention_forward"""
_CPU_FP32 = """avg_pool3d binary_cross_entropy grid_sampler polar prod quantile nanquantile stft cdist
    trace view_as_complex cholesky cholesky_inverse cholesky_solve inverse lu_solve orgqr ormqr
    pinverse max_pool3d max_unpool2d max_unpool3d adaptive_avg_pool3d reflection_pad1d
    reflection_pad2d replication_pad1d replication_pad2d replication_pad3d mse_loss
    cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss poisson_nll_loss smooth_l1_loss
    cross_entropy l1_loss huber_loss margin_ranking_loss soft_margin_loss triplet_margin_loss
    multi_margin_loss ctc_loss kl_div multilabel_margin_loss binary_cross_entropy_with_logits"""
_CPU_PROMOTE = "stack cat index_copy"

_CUDA_LOWER = """conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d
    prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear linear_relu addbmm baddbmm bmm
    chain_matmul linalg_multi_dot lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell
    scaled_dot_product_attention multi_head_attention_forward"""
_CUDA_FP32 = """acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow
    softplus layer_norm group_norm norm frobenius_norm nuclear_norm cosine_similarity
    poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss
    smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss
    triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm
    logsumexp upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d
    upsample_bilinear2d upsample_trilinear3d upsample_bicubic2d prod softmax log_softmax cumprod
    cumsum linalg_vector_norm linalg_matrix_norm sum cross_entropy"""
_CUDA_PROMOTE = """addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put scatter_add
    tensordot cat stack index_copy"""


def _table(lower: str, fp32: str, promote: str) -> dict[str, str]:
    table = {}
    for names, policy in ((lower, "lower"), (fp32, "fp32"), (promote, "promote")):
        table.update(dict.fromkeys(names.split(), policy))
    return table


_POLICIES = {"cpu": _table(_CPU_LOWER, _CPU_FP32, _CPU_PROMOTE),
             "cuda": _table(_CUDA_LOWER, _CUDA_FP32, _CUDA_PROMOTE)}
# Engine Function names that differ from PyTorch's op names.
_ALIASES = {"logsoftmax": "log_softmax", "norm2": "norm", "concatenate": "cat"}


def policy_for(op_name: str, device_type: str) -> str | None:
    """The autocast policy of ``op_name`` on ``device_type``: "lower", "fp32", "promote" or None."""
    _check_device_type(device_type)
    return _POLICIES[device_type].get(_ALIASES.get(op_name, op_name))


# ---- thread-local state ------------------------------------------------------------------------

class _State(threading.local):
    def __init__(self):
        self.regions = {}  # device type -> (dtype, cache_enabled), enabled regions only
        self.nesting = 0  # autocast blocks entered (enabled or not); the cache dies at 0
        self.cache = {}  # id(leaf) -> (leaf, its lower cast, the leaf's version when cast)
        self.dtypes = dict(_DEFAULT_DTYPE)  # what get_autocast_dtype answers, per device type


state = _State()


def _check_device_type(device_type) -> None:
    if not isinstance(device_type, str):
        raise ValueError(f"autocast: expected `device_type` of type `str`, got: `{type(device_type)}`")
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"autocast: device_type must be one of {DEVICE_TYPES}, got {device_type!r}")


def is_autocast_enabled(device_type: str = "cuda") -> bool:
    """Whether an enabled autocast region of ``device_type`` is active in this thread."""
    _check_device_type(device_type)
    return device_type in state.regions


def get_autocast_dtype(device_type: str) -> np.dtype:
    """The low dtype autocast uses for ``device_type`` (bfloat16 on CPU, float16 on CUDA by default)."""
    _check_device_type(device_type)
    return state.dtypes[device_type]


class autocast:
    """``with engine.autocast("cpu"):`` runs listed ops in low precision (PyTorch's torch.autocast).

    Args:
        device_type: "cpu" or "cuda"; a region touches only tensors of that device type.
        dtype: bfloat16 or float16 (default bfloat16 on CPU, float16 on CUDA); another dtype warns
            and disables the region, as PyTorch does.
        enabled: False makes a region in which autocast is off (an inner one restores float32).
        cache_enabled: cache the low casts of weights (leaves that require grad) in the region.

    Also a decorator: ``@engine.autocast("cpu")`` runs the function inside a region.
    """

    def __init__(self, device_type: str, dtype=None, enabled: bool = True, cache_enabled: bool = True):
        _check_device_type(device_type)
        self.device_type = device_type
        self.fast_dtype = _DEFAULT_DTYPE[device_type] if dtype is None else np.dtype(dtype)
        self._enabled = bool(enabled)
        self._cache_enabled = bool(cache_enabled)
        if self._enabled and self.fast_dtype not in _SUPPORTED[device_type]:
            warnings.warn(f"In {device_type.upper()} autocast, but the target dtype {self.fast_dtype} is not "
                          f"supported. Disabling autocast. {device_type.upper()} Autocast only supports "
                          f"dtypes of bfloat16, float16 currently.", stacklevel=2)
            self._enabled = False
        self._saved = []  # (previous region, previous dtype) per entry: a region may be re-entered

    def __enter__(self):
        kind = self.device_type
        self._saved.append((state.regions.get(kind), state.dtypes[kind]))
        state.nesting += 1
        state.dtypes[kind] = self.fast_dtype
        if self._enabled:
            state.regions[kind] = (self.fast_dtype, self._cache_enabled)
        else:
            state.regions.pop(kind, None)
        return self

    def __exit__(self, *exc):
        kind = self.device_type
        region, state.dtypes[kind] = self._saved.pop()
        if region is None:
            state.regions.pop(kind, None)
        else:
            state.regions[kind] = region
        state.nesting -= 1
        if state.nesting == 0:
            state.cache.clear()
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with autocast(self.device_type, self.fast_dtype, self._enabled, self._cache_enabled):
                return fn(*args, **kwargs)
        return wrapper


# ---- applying a policy ---------------------------------------------------------------------------

def _device_type(tensor) -> str:
    return "cpu" if isinstance(tensor._data, (np.ndarray, np.generic)) else "cuda"


def _eligible(tensor, device_type) -> bool:
    dtype = tensor._data.dtype
    return dtype != np.float64 and dtypes.is_floating(dtype) and _device_type(tensor) == device_type


def _target_dtype(policy, region_dtype, tensors, device_type):
    if policy == "lower":
        return region_dtype
    if policy == "fp32":
        return dtypes.COMPUTE_DTYPE
    widest = region_dtype  # "promote" starts from the region's dtype, as PyTorch's promote_type
    for t in tensors:
        if _eligible(t, device_type):
            widest = dtypes.promote_types(widest, t._data.dtype)
    return widest


def _cast(tensor, dtype, cacheable: bool):
    """``tensor`` cast to ``dtype``; a leaf that requires grad is cast once per region. Unlike
    PyTorch, a cast made with grad off (it has no graph) is not cached, and a leaf changed in place
    since its cast is cast again, so a cached cast is never a stale or gradient-less copy."""
    from engine.autograd import is_grad_enabled  # same layer
    from engine.ops import cast  # the differentiable cast

    if not (cacheable and tensor.requires_grad and tensor.grad_fn is None and is_grad_enabled()):
        return cast(tensor, dtype)
    version = tensor._version.value
    hit = state.cache.get(id(tensor))
    if hit is None or hit[0] is not tensor or hit[1].dtype != dtype or hit[2] != version:
        hit = (tensor, cast(tensor, dtype), version)  # the leaf is kept, so its id stays its own
        state.cache[id(tensor)] = hit
    return hit[1]


def cast_inputs(op_name: str, tensors):
    """``tensors`` (a sequence of Tensors and others) cast per ``op_name``'s policy in every active
    region, or the same sequence object when no policy applies."""
    from engine.tensor import Tensor

    result = tensors
    for device_type, (region_dtype, cache_enabled) in state.regions.items():
        policy = _POLICIES[device_type].get(_ALIASES.get(op_name, op_name))
        if policy is None:
            continue
        candidates = [t for t in result if isinstance(t, Tensor)]
        target = _target_dtype(policy, region_dtype, candidates, device_type)
        cacheable = cache_enabled and policy == "lower"
        result = [_cast(t, target, cacheable)
                  if isinstance(t, Tensor) and _eligible(t, device_type) and t._data.dtype != target else t
                  for t in result]
    return result


class _Suspended:
    """Autocast off in this thread while a composite op runs on its already cast inputs (PyTorch
    runs the op below its autocast layer)."""

    def __enter__(self):
        self.regions, state.regions = state.regions, {}

    def __exit__(self, *exc):
        state.regions = self.regions
        return False


def autocast_op(op_name: str):
    """Decorator for the entry point of a composite op: in a region whose list has ``op_name``, its
    Tensor arguments are cast per the policy and its inner ops run without autocast; elsewhere the
    op runs as written (its inner ops meet autocast one by one)."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            regions = state.regions
            if not regions or not any(_POLICIES[kind].get(op_name) for kind in regions):  # as written
                return fn(*args, **kwargs)
            args = cast_inputs(op_name, args)
            keys = list(kwargs)
            kwargs = dict(zip(keys, cast_inputs(op_name, [kwargs[k] for k in keys])))
            with _Suspended():
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def _device_autocast(device_type: str):
    """``engine.cpu.amp.autocast`` / ``engine.cuda.amp.autocast``: PyTorch's deprecated spellings
    of ``autocast(device_type, ...)``, warning as PyTorch does."""

    class DeviceAutocast(autocast):
        def __init__(self, enabled: bool = True, dtype=None, cache_enabled: bool = True):
            warnings.warn(f"`engine.{device_type}.amp.autocast(args...)` is deprecated. Please use "
                          f"`engine.amp.autocast('{device_type}', args...)` instead.", FutureWarning, stacklevel=2)
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    DeviceAutocast.__name__ = DeviceAutocast.__qualname__ = "autocast"
    return DeviceAutocast


cpu_autocast = _device_autocast("cpu")
cuda_autocast = _device_autocast("cuda")
