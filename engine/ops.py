"""Primitive differentiable ops: one Function each, plus the functional form users call.

Every forward and backward is written with the array module of its inputs (``xp`` is numpy or
cupy), so each op runs on both devices unchanged. Gradients of broadcasting operands are summed
back to their shapes with ``unbroadcast``.
"""

from __future__ import annotations

import builtins
import math
from collections import namedtuple

import numpy as np

from engine import kernels
from engine.kernels import GELU_SQUARE_MAX as _GELU_SQUARE_MAX
from engine.kernels import accumulation_dtype
from engine import backend
from engine.amp.autocast_mode import autocast_op
from engine.fusion import fused_enabled
from engine.autograd import ON_CPU, Function, records_nothing, unbroadcast, view_result
from engine import dtypes
from engine.dtypes import is_floating
from engine.errors import DeviceError, DTypeError, GradError, ShapeError, describe
from engine.tensor import Tensor


def _xp(a):
    # A numpy array (most calls) without the call into backend: forward and backward ask per op.
    return np if type(a) is np.ndarray else backend.array_module(a)


def _is_float(dtype) -> bool:
    return is_floating(dtype)


# ---- integer and bool input to float-valued ops: PyTorch's rules -------------------------------

DEFAULT_FLOAT = np.dtype(np.float32)  # PyTorch's default dtype: what integer input promotes to


def _is_integral(dtype) -> bool:
    """Integer or bool (the dtypes PyTorch calls integral)."""
    return np.dtype(dtype).kind in "biu"


def _promoted(a: Tensor) -> Tensor:
    """``a`` for an op whose value is a float (exp, sigmoid ...): integer and bool tensors become
    float32, PyTorch's default dtype, as ``torch.exp(int_tensor)`` does (not float64, and never an
    integer result that truncates every value to 0)."""
    return cast(a, DEFAULT_FLOAT) if isinstance(a, Tensor) and a._data.dtype.kind in "biu" else a


def _require_float(op: str, a: Tensor, fix: str = "convert with .float()") -> None:
    """Refuse integer and bool input where PyTorch refuses it (softmax, gelu, mean, var ...)."""
    if _is_integral(a.dtype):
        raise DTypeError(f"{op}: expected a floating point input, got {describe(a)}; PyTorch refuses "
                         f"{a.dtype} input here too: {fix}")


# ---- operand coercion: PyTorch's type promotion ----------------------------------------------

def _binary_operands(op: str, a, b) -> tuple[Tensor, Tensor]:
    """Coerce the operands of a binary op to their common dtype, PyTorch's ``torch.result_type``:
    bfloat16 with float32 is float32, bfloat16 with float16 is float32, and a 0-d tensor (or a
    scalar) does not promote a tensor with dimensions of the same category (``bf16 * fp32_0d`` stays
    bfloat16). Both casts are differentiable, so each gradient comes back in its operand's dtype."""
    if isinstance(a, Tensor):
        if not isinstance(b, Tensor):
            b = _scalar_operand(b, a)
    elif isinstance(b, Tensor):
        a = _scalar_operand(a, b)
    else:
        raise TypeError(f"{op}: at least one operand must be a Tensor")
    a_dtype, b_dtype = a._data.dtype, b._data.dtype
    if a_dtype is not b_dtype and a_dtype != b_dtype:
        target = dtypes.result_type([t.dtype for t in (a, b) if t.ndim], [t.dtype for t in (a, b) if not t.ndim])
        a, b = cast(a, target), cast(b, target)
    return a, b


def result_type(a, b) -> np.dtype:
    """``torch.result_type(a, b)``: the dtype a binary op on ``a`` and ``b`` (tensors or Python
    scalars) computes in, by PyTorch's table (see :func:`_binary_operands`)."""
    groups = ([], [], [])
    for x in (a, b):
        if isinstance(x, Tensor):
            groups[0 if x.ndim else 1].append(x.dtype)
        else:
            groups[2].append(dtypes.scalar_dtype(x))
    return dtypes.result_type(*groups)


def _check_same_float_dtype(op: str, a, b) -> None:
    """Refuse two float tensors of different dtypes where PyTorch does (matmul, linear): these ops
    do not promote, so ``bf16 @ fp32`` is an error there, not a silent float32 product."""
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a._data.dtype != b._data.dtype and _is_float(a.dtype) \
            and _is_float(b.dtype):
        raise DTypeError(f"{op}: expected both operands to have the same dtype, got {describe(a)} and "
                         f"{describe(b)} (PyTorch refuses it too); convert one with .to({a.dtype.name}) or "
                         f".to({b.dtype.name})")


def _scalar_operand(value, like: Tensor) -> Tensor:
    """A non-Tensor operand (Python/numpy scalar or array) as a constant tensor on ``like``'s device.

    It takes ``like``'s dtype when ``like`` is floating (so ``0.5 * x`` stays float32) or when both
    are integral scalars, except that a bool tensor with an int gives int64 (``mask * 2`` is 2, not
    True); an integer tensor with a float scalar gives float32, as in PyTorch.
    """
    if backend.is_array(value) and not isinstance(value, np.ndarray):
        return Tensor(value)
    arr = np.asarray(value)
    if _is_float(like._data.dtype):
        dtype = like._data.dtype
    elif arr.dtype.kind in "iub":
        if arr.ndim:
            dtype = arr.dtype
        elif like.dtype == np.bool_ and arr.dtype.kind != "b":
            dtype = np.int64
        else:
            dtype = like.dtype
    else:  # a float scalar is PyTorch's default dtype; a float array keeps its own below float64
        dtype = np.float32 if arr.dtype == np.float64 or arr.ndim == 0 else arr.dtype
    arr = arr.astype(dtype, copy=False)
    if type(like._data) is np.ndarray:  # already where it must be: no device lookup
        return Tensor._from_op(arr, None)
    if arr.ndim == 0:  # a number: filled on the device by a kernel, not copied there (no wait; capturable)
        return Tensor._from_op(backend.full_on(like.device, (), arr.item(), arr.dtype), None)
    return Tensor(arr, device=like.device)


# ---- elementwise arithmetic --------------------------------------------------------------------

class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(g, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(-g, self.shapes[1])


class Mul(Function):
    # Each operand is kept only if the other one's gradient needs it (as PyTorch does), so an
    # in-place change of an operand whose value backward never reads is not an error.
    def forward(self, a, b):
        need_a, need_b = self.needs_input_grad
        self.shapes = a.shape, b.shape
        self.saved = (a if need_b else None, b if need_a else None)  # self.save's work, without its call
        return a * b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g * b, self.shapes[0]) if self.needs_input_grad[0] else None
        gb = unbroadcast(g * a, self.shapes[1]) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        self.save(a if self.needs_input_grad[1] else None, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g / b, self.shapes[0]) if self.needs_input_grad[0] else None
        gb = unbroadcast(-g * a / (b * b), self.shapes[1]) if self.needs_input_grad[1] else None
        return ga, gb


class Pow(Function):
    def forward(self, a, b):
        out = a ** b
        self.save(a, b, out)
        return out

    def backward(self, g):
        a, b, out = self.saved
        xp = _xp(a)
        ga = gb = None
        if self.needs_input_grad[0]:
            # b * a^(b-1), written so that a == 0 with b >= 1 gives a finite value
            ga = unbroadcast(g * b * a ** (b - 1), a.shape)
        if self.needs_input_grad[1]:
            safe_log = xp.log(xp.where(a > 0, a, 1))
            gb = unbroadcast(g * out * safe_log, b.shape)
        return ga, gb


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


def _int64_with_int(ufunc, a, b):
    """``ufunc(a, b)`` for an int64 CPU tensor and a Python int, without a graph node (integers carry
    no gradient, and the result's dtype is the tensor's, as ``_binary_operands`` would make it);
    None when the operands are anything else. Index arithmetic in data loading (``i + block_size``
    on a 0-d tensor from ``randint``) otherwise pays the whole op machinery for one integer."""
    if type(b) is int and isinstance(a, Tensor):
        tensor = a
    elif type(a) is int and isinstance(b, Tensor):
        tensor = b
    else:
        return None
    data = tensor._data
    if data.dtype != np.int64 or not records_nothing(tensor):
        return None
    left, right = (data, b) if tensor is a else (a, data)
    return Tensor._from_op(np.asarray(ufunc(left, right)), None)


def add(a, b, *, alpha=1, out=None) -> Tensor:
    """``a + alpha * b`` (``torch.add``); ``out=`` writes the result into an existing tensor."""
    if out is None and alpha == 1 and (type(a) is int or type(b) is int):
        fast = _int64_with_int(np.add, a, b)
        if fast is not None:
            return fast
    if alpha != 1:
        b = mul(b, alpha) if isinstance(b, Tensor) else b * alpha
    result = Add.apply(*_binary_operands("add", a, b))
    return result if out is None else write_out("add", result, out)


def _is_bool_tensor(x) -> bool:
    return isinstance(x, Tensor) and x._data.dtype == np.bool_


def sub(a, b, *, alpha=1, out=None) -> Tensor:
    """``a - alpha * b`` (``torch.sub``); a bool tensor operand is refused, as in PyTorch."""
    if _is_bool_tensor(a) or _is_bool_tensor(b):
        raise DTypeError(f"sub: subtraction with a bool tensor is not supported (as in PyTorch): {describe(a)} - "
                         f"{describe(b)}; invert a mask with ~ or logical_not, or convert with .long() or .float()")
    if out is None and alpha == 1:
        fast = _int64_with_int(np.subtract, a, b)
        if fast is not None:
            return fast
    if alpha != 1:
        b = mul(b, alpha) if isinstance(b, Tensor) else b * alpha
    result = Sub.apply(*_binary_operands("sub", a, b))
    return result if out is None else write_out("sub", result, out)


def mul(a, b, *, out=None) -> Tensor:
    """Elementwise product (``torch.mul``)."""
    if out is None and (type(a) is int or type(b) is int):
        fast = _int64_with_int(np.multiply, a, b)
        if fast is not None:
            return fast
    result = Mul.apply(*_binary_operands("mul", a, b))
    return result if out is None else write_out("mul", result, out)


def div(a, b, *, out=None) -> Tensor:
    """True division (``torch.div``); integer operands give float32."""
    a, b = _binary_operands("div", a, b)
    if not _is_float(a.dtype):
        a, b = cast(a, np.float32), cast(b, np.float32)
    return write_out("div", Div.apply(a, b), out)


def write_out(op: str, result: Tensor, out) -> Tensor:
    """PyTorch's ``out=``: copy ``result`` into ``out`` and return ``out`` (``result`` if out is None).

    As in PyTorch, ``out=`` does not take part in autograd: refused in grad mode when either side
    requires grad. PyTorch resizes an ``out`` of another shape; the engine refuses it instead (a
    resize would silently drop the tensor's old memory, which views may share).
    """
    if out is None:
        return result
    if not isinstance(out, Tensor):
        raise TypeError(f"{op}: out= must be a Tensor, got {type(out).__name__}")
    from engine.autograd import is_grad_enabled

    if is_grad_enabled() and (result.requires_grad or out.requires_grad):
        raise GradError(f"{op}: out= does not support autograd, and {describe(result if result.requires_grad else out)} "
                        "requires grad (PyTorch refuses it too); drop out= or use engine.no_grad()")
    if out.shape != result.shape or out.device != result.device:
        raise ShapeError(f"{op}: out= {describe(out)} must have the result's shape and device {describe(result)}")
    if not np.can_cast(result.dtype, out.dtype, casting="same_kind"):
        raise DTypeError(f"{op}: the result {describe(result)} cannot be cast to out= {describe(out)}")
    return out.copy_(result)


def pow(a, b) -> Tensor:
    """``a ** b`` elementwise (``torch.pow``)."""
    if isinstance(a, Tensor) and _is_integral(a.dtype) and isinstance(b, (int, np.integer)) and b < 0:
        # the exponent would be cast to a's dtype first: -1 as uint8 is 255, a silent x ** 255
        raise DTypeError(f"pow: integers to negative integer powers are not allowed (as in PyTorch): {describe(a)} "
                         f"** {b}; convert with .float() first")
    return Pow.apply(*_binary_operands("pow", a, b))


def neg(a: Tensor) -> Tensor:
    return Neg.apply(a)


# ---- unary math ---------------------------------------------------------------------------------

class Exp(Function):
    def forward(self, a):
        out = _xp(a).exp(a)
        self.save(out)
        return out

    def backward(self, g):
        return g * self.saved[0]


class Log(Function):
    def forward(self, a):
        self.save(a)
        return _xp(a).log(a)

    def backward(self, g):
        return g / self.saved[0]


class Log1p(Function):
    """``log(1 + a)``, accurate for small ``a`` (``torch.log1p``)."""

    def forward(self, a):
        self.save(a)
        return _xp(a).log1p(a)

    def backward(self, g):
        return g / (1 + self.saved[0])


class Expm1(Function):
    """``exp(a) - 1``, accurate for small ``a`` (``torch.expm1``)."""

    def forward(self, a):
        out = _xp(a).expm1(a)
        self.save(out)
        return out

    def backward(self, g):
        return g * (self.saved[0] + 1)


class Sqrt(Function):
    def forward(self, a):
        out = _xp(a).sqrt(a)
        self.save(out)
        return out

    def backward(self, g):
        return g / (2 * self.saved[0])


class Abs(Function):
    def forward(self, a):
        self.save(a)
        return _xp(a).abs(a)

    def backward(self, g):
        return g * _xp(g).sign(self.saved[0])


class Tanh(Function):
    def forward(self, a):
        out = _xp(a).tanh(a)
        self.save(out)
        return out

    def backward(self, g):
        out = self.saved[0]
        return g * (1 - out * out)


class Sin(Function):
    def forward(self, a):
        self.save(a)
        return _xp(a).sin(a)

    def backward(self, g):
        return g * _xp(g).cos(self.saved[0])


class Cos(Function):
    def forward(self, a):
        self.save(a)
        return _xp(a).cos(a)

    def backward(self, g):
        return -g * _xp(g).sin(self.saved[0])


class LeakyReLU(Function):
    def forward(self, a, negative_slope=0.01):
        self.slope = a.dtype.type(negative_slope)
        self.save(a)
        return _xp(a).where(a > 0, a, a * self.slope)

    def backward(self, g):
        return _xp(g).where(self.saved[0] > 0, g, g * self.slope)


class Sigmoid(Function):
    def forward(self, a):
        xp = _xp(a)
        # exp of a non-positive number only: no overflow for large |a|
        e = xp.exp(-xp.abs(a))
        out = xp.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)
        self.save(out)
        return out

    def backward(self, g):
        out = self.saved[0]
        return g * out * (1 - out)


class ReLU(Function):
    def forward(self, a):
        out = _MAXIMUM(a, _zero_of(a.dtype)) if type(a) is np.ndarray else _xp(a).maximum(a, 0)
        self.save(out)
        return out

    def backward(self, g):
        return g * (self.saved[0] > 0)


_MAXIMUM = np.maximum
_ZEROS: dict = {}


def _zero_of(dtype):
    """A numpy zero of ``dtype``, made once: the Python int 0 costs a ufunc a conversion per call
    (its value is the same, so are the results)."""
    zero = _ZEROS.get(dtype)
    if zero is None:
        zero = _ZEROS[dtype] = dtype.type(0)
    return zero


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
# The dtypes kernels.gelu_* take: the 16-bit ones natively (float32 math inside, one rounding).
_GELU_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), np.dtype(dtypes.bfloat16))


class GELU(Function):
    """x * Phi(x); ``approximate="tanh"`` uses the tanh formula, "none" the exact erf form.

    The unfused reference: array expressions, float16 / bfloat16 computed in float32 by
    ``Function.apply``. :func:`gelu` runs :class:`FusedGELU` instead when the fused kernels are on.
    """

    def forward(self, a, approximate="none"):
        self.approximate = approximate
        self.save(a)
        if approximate == "tanh":
            out = _gelu_tanh_inner(a)
            out += 1
            out *= 0.5  # before the multiply by a: (1 + t) a overflows at |a| > 1.7e38 where y = a
            out *= a
            return out
        return a * _normal_cdf(a)

    def backward(self, g):
        a = self.saved[0]
        xp = _xp(a)
        if self.approximate == "tanh":
            # d/da 0.5 a (1 + t) = 0.5 (1 + t) + 0.5 a (1 - t^2) * sqrt(2/pi) (1 + 3 * 0.044715 a^2),
            # in place on two buffers: the expression form made ten temporaries (docs/benchmarks.md)
            # (1 - t^2) a first and a^2 capped: where 1 - t^2 = 0 (|a| > ~10) a^2 and a^3 may overflow,
            # and 0 * inf would make the slope NaN instead of 1 (a -> inf) or 0 (a -> -inf)
            t = _gelu_tanh_inner(a)
            slope = t * t
            xp.subtract(1, slope, out=slope)
            slope *= a
            square = a * a
            xp.minimum(square, _GELU_SQUARE_MAX, out=square)
            square *= 3 * 0.044715
            square += 1
            square *= 0.5 * _SQRT_2_OVER_PI
            slope *= square
            t += 1
            t *= 0.5
            t += slope
            t *= g
            return t
        pdf = xp.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
        return g * (_normal_cdf(a) + a * pdf.astype(a.dtype, copy=False))


class FusedGELU(Function):
    """GELU in one pass each way through kernels.gelu_forward/backward, saving only x.

    The kernels take float16 and bfloat16 themselves (float32 math, one rounding at the store), so
    ``apply`` hands them the 16-bit arrays as they are (``computes_in_float32 = False``): no
    float32 copy of the input, and the saved x stays 16-bit.
    """

    name = "gelu"
    computes_in_float32 = False  # the kernels compute 16-bit inputs in float32 themselves

    def forward(self, a, approximate="none"):
        self.approximate = approximate
        a = a if a.flags.c_contiguous else a.copy(order="C")  # the kernels walk the flat buffer
        self.save(a)
        return kernels.gelu_forward(a, approximate=approximate)

    def backward(self, g):
        a = self.saved[0]
        # the gradient in x's dtype, as PyTorch casts an incoming gradient to its output's dtype
        g = g.astype(a.dtype, order="C") if g.dtype != a.dtype or not g.flags.c_contiguous else g
        return kernels.gelu_backward(g, a, approximate=self.approximate)


def _gelu_tanh_inner(a):
    """tanh(sqrt(2/pi) (a + 0.044715 a^3)) in one new buffer. a * a, not a ** 3: numpy's float32
    power is much slower than multiplies (docs/benchmarks.md)."""
    t = a * a
    t *= 0.044715
    t += 1
    t *= a
    t *= _SQRT_2_OVER_PI
    return _xp(a).tanh(t, out=t)


def _normal_cdf(a):
    """Phi(a) = erfc(-a / sqrt 2) / 2 in float64, cast to a's dtype: the kernels' one erfc (~1e-13)."""
    from engine.kernels import erfc

    return (0.5 * erfc(a.astype(np.float64, copy=False) * -_INV_SQRT_2)).astype(a.dtype, copy=False)


_INV_SQRT_2 = 1 / math.sqrt(2)


# Float-valued functions of integer or bool input give float32, as in PyTorch.
def exp(a): return Exp.apply(_promoted(a))
def log(a): return Log.apply(_promoted(a))
def log1p(a): return Log1p.apply(_promoted(a))
def expm1(a): return Expm1.apply(_promoted(a))
def sqrt(a): return Sqrt.apply(_promoted(a))
def tanh(a): return Tanh.apply(_promoted(a))
def sigmoid(a): return Sigmoid.apply(_promoted(a))
def sin(a): return Sin.apply(_promoted(a))
def cos(a): return Cos.apply(_promoted(a))


def abs(a: Tensor) -> Tensor:
    """|a|, of a's dtype; bool input is refused, as in PyTorch."""
    if a.dtype == np.bool_:
        raise DTypeError(f"abs: bool input is not supported (as in PyTorch), got {describe(a)}")
    return Abs.apply(a)


def relu(a: Tensor) -> Tensor:
    """max(a, 0); integer input stays integer, bool input is refused (both as in PyTorch)."""
    if (a._data.dtype if isinstance(a, Tensor) else a.dtype).kind == "b":  # bool, the only kind "b"
        raise DTypeError(f"relu: bool input is not supported (as in PyTorch), got {describe(a)}; "
                         "convert with .float() or .long()")
    return ReLU.apply(a)


def square(a: Tensor) -> Tensor:
    """``a * a``; a bool tensor gives int64, as ``torch.square`` (it is ``a ** 2``)."""
    if a.dtype == np.bool_:
        a = cast(a, np.int64)
    return mul(a, a)


def leaky_relu(a: Tensor, negative_slope: float = 0.01) -> Tensor:
    _require_float("leaky_relu", a)  # an integer slope product would truncate to 0
    return LeakyReLU.apply(a, negative_slope=float(negative_slope))


def gelu(a: Tensor, approximate: str = "none") -> Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    _require_float("gelu", a)
    if fused_enabled() and a.dtype in _GELU_KERNEL_DTYPES:
        return FusedGELU.apply(a, approximate=approximate)
    return GELU.apply(a, approximate=approximate)


# ---- comparisons and selection -----------------------------------------------------------------

class Maximum(Function):
    def forward(self, a, b):
        self.save(a, b)
        return _xp(a).maximum(a, b)

    def backward(self, g):
        a, b = self.saved
        # ties share the gradient equally, as in PyTorch
        wa = (a > b) + 0.5 * (a == b)
        return unbroadcast(g * wa, a.shape), unbroadcast(g * (1 - wa), b.shape)


class Minimum(Function):
    def forward(self, a, b):
        self.save(a, b)
        return _xp(a).minimum(a, b)

    def backward(self, g):
        a, b = self.saved
        wa = (a < b) + 0.5 * (a == b)
        return unbroadcast(g * wa, a.shape), unbroadcast(g * (1 - wa), b.shape)


class Clip(Function):
    def forward(self, a, lo=None, hi=None):
        self.save(a)
        self.bounds = lo, hi
        return _xp(a).clip(a, lo, hi)

    def backward(self, g):
        (a,), (lo, hi) = self.saved, self.bounds
        keep = _xp(a).ones_like(a, dtype=bool)
        if lo is not None:
            keep &= a >= lo
        if hi is not None:
            keep &= a <= hi
        return g * keep


class Where(Function):
    def forward(self, a, b, cond=None):
        self.cond, self.shapes = cond, (a.shape, b.shape)
        return _xp(a).where(cond, a, b)

    def backward(self, g):
        zero = g.dtype.type(0)
        return (unbroadcast(_xp(g).where(self.cond, g, zero), self.shapes[0]),
                unbroadcast(_xp(g).where(self.cond, zero, g), self.shapes[1]))


def maximum(a, b): return Maximum.apply(*_binary_operands("maximum", a, b))
def minimum(a, b): return Minimum.apply(*_binary_operands("minimum", a, b))


def clip(a: Tensor, min=None, max=None) -> Tensor:
    return Clip.apply(a, lo=min, hi=max)


def where(condition, a, b) -> Tensor:
    """``a`` where ``condition`` is true, else ``b`` (broadcasting); differentiable in a and b."""
    a, b = _binary_operands("where", a, b)
    cond = condition._data if isinstance(condition, Tensor) else condition
    if backend.is_array(cond) and backend.device_of(cond) != a.device:
        raise DeviceError(f"where: condition on {backend.device_of(cond)} but operands {describe(a)} "
                          f"and {describe(b)}; move the condition with .to('{a.device}')")
    cond = a.xp.asarray(cond, dtype=bool)
    return Where.apply(a, b, cond=cond)


def _compare(name, a, b) -> Tensor:
    a, b = _binary_operands(name, a, b)
    return Tensor._from_op(getattr(a.xp, name)(a._data, b._data), None)


def lt(a, b): return _compare("less", a, b)
def le(a, b): return _compare("less_equal", a, b)
def gt(a, b): return _compare("greater", a, b)
def ge(a, b): return _compare("greater_equal", a, b)
def eq(a, b): return _compare("equal", a, b)
def ne(a, b): return _compare("not_equal", a, b)


def _bitwise(op: str, name: str, a, b) -> Tensor:
    a, b = _binary_operands(op, a, b)
    if _is_float(a.dtype):
        raise DTypeError(f"{op}: only bool and integer tensors, got {describe(a)} and {describe(b)}")
    return Tensor._from_op(getattr(a.xp, name)(a._data, b._data), None)


def bitwise_and(a, b): return _bitwise("bitwise_and (&)", "bitwise_and", a, b)
def bitwise_or(a, b): return _bitwise("bitwise_or (|)", "bitwise_or", a, b)
def bitwise_xor(a, b): return _bitwise("bitwise_xor (^)", "bitwise_xor", a, b)


def bitwise_not(a: Tensor) -> Tensor:
    """``~a``: logical not of a bool tensor, bitwise not of an integer one."""
    if _is_float(a.dtype):
        raise DTypeError(f"bitwise_not (~): only bool and integer tensors, got {describe(a)}")
    return Tensor._from_op(a.xp.invert(a._data), None)


def logical_and(a, b): return ne(a, 0) & ne(b, 0) if isinstance(a, Tensor) else ne(b, 0) & bool(a)
def logical_or(a, b): return ne(a, 0) | ne(b, 0) if isinstance(a, Tensor) else ne(b, 0) | bool(a)
def logical_not(a: Tensor) -> Tensor: return eq(a, 0)


# ---- reductions ---------------------------------------------------------------------------------

_ADD_REDUCE = np.add.reduce
_ALL_AXES = tuple(tuple(range(ndim)) for ndim in range(8))


def _norm_axis(axis, ndim):
    if axis is None:
        return _ALL_AXES[ndim] if ndim < 8 else tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim if ndim else a for a in axes))


def _expand_reduced(g, shape, axes, keepdims):
    """Reshape a reduced gradient so it broadcasts against the input of shape ``shape``."""
    if not keepdims:
        g = g.reshape([1 if i in axes else n for i, n in enumerate(shape)])
    return g


class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axes, self.keepdims = a.shape, _norm_axis(axis, a.ndim), keepdims
        if type(a) is np.ndarray:  # what ndarray.sum calls, without its Python wrapper
            return _ADD_REDUCE(a, self.axes, None, None, keepdims)
        return a.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        g = _expand_reduced(g, self.shape, self.axes, self.keepdims)
        out = _xp(g).empty(self.shape, dtype=g.dtype)  # a broadcast write: a quarter of broadcast_to + copy
        out[...] = g
        return out


class Mean(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axes, self.keepdims = a.shape, _norm_axis(axis, a.ndim), keepdims
        self.count = int(np.prod([a.shape[i] for i in self.axes])) if self.axes else 1
        return a.mean(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        g = _expand_reduced(g, self.shape, self.axes, self.keepdims) / self.count
        return _xp(g).broadcast_to(g, self.shape).astype(g.dtype, copy=True)


class MaxOrMin(Function):
    """max or min over axes; the gradient is shared equally among tied extrema (like amax)."""

    def forward(self, a, axis=None, keepdims=False, mode="max"):
        axes = _norm_axis(axis, a.ndim)
        if a.size == 0:
            raise ShapeError(f"{mode}: cannot reduce an empty array of shape {a.shape}")
        out = a.max(axis=axes, keepdims=True) if mode == "max" else a.min(axis=axes, keepdims=True)
        self.save(a, out)
        self.axes = axes
        return out if keepdims else out.reshape([n for i, n in enumerate(a.shape) if i not in axes])

    def backward(self, g):
        a, out = self.saved
        hit = a == out
        count = hit.sum(axis=self.axes, keepdims=True)
        g = g.reshape(out.shape)
        return (g * hit / count).astype(a.dtype, copy=False)


def _dim(op: str, dim, axis):
    """PyTorch's ``dim=`` with numpy's ``axis=`` as an alias (giving both, differently, is an error)."""
    if axis is not None:
        if dim is not None and dim != axis:
            raise TypeError(f"{op}: got dim={dim!r} and axis={axis!r}; pass one of them (axis is an alias of dim)")
        return axis
    return dim


def _axis_or(axis, default):
    return default if axis is None else axis


def _keep(keepdim, keepdims) -> bool:
    """PyTorch's ``keepdim=`` with numpy's ``keepdims=`` as an alias."""
    return bool(keepdims) if keepdims is not None else bool(keepdim)


def sum(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None, dtype=None) -> Tensor:
    """Sum over ``dim`` (an int, a tuple, or None for all); ``axis=``/``keepdims=`` are aliases."""
    if dtype is not None:
        a = cast(a, dtype)
    if axis is None and keepdims is None:  # PyTorch's spelling: no alias to reconcile
        return _int64_if_integral(Sum.apply(a, axis=dim, keepdims=bool(keepdim)))
    return _int64_if_integral(Sum.apply(a, axis=_dim("sum", dim, axis), keepdims=_keep(keepdim, keepdims)))


def _int64_if_integral(result: Tensor) -> Tensor:
    """PyTorch's sum and prod of integer or bool input are int64 (NumPy's of uint8 are uint64)."""
    return cast(result, np.int64) if result._data.dtype.kind in "biu" else result


def mean(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None, dtype=None) -> Tensor:
    """Mean over ``dim``; as in PyTorch an integer or bool input needs ``dtype=`` (a float dtype)."""
    if dtype is not None:
        a = cast(a, dtype)
    _require_float("mean", a, "pass dtype=engine.float32 or convert with .float()")
    return Mean.apply(a, axis=_dim("mean", dim, axis), keepdims=_keep(keepdim, keepdims))


class _ReturnTypes:
    """Named tuples of PyTorch's ``torch.return_types``: ``values, indices = x.max(1)``."""

    max = namedtuple("max", ["values", "indices"])
    min = namedtuple("min", ["values", "indices"])
    sort = namedtuple("sort", ["values", "indices"])
    topk = namedtuple("topk", ["values", "indices"])


return_types = _ReturnTypes()


class IndexedExtremum(Function):
    """max or min along one dim with its indices; the gradient goes to the selected element only,
    as in PyTorch's ``max(dim)`` (``amax`` shares it among ties instead)."""

    def forward(self, a, axis=0, keepdims=False, mode="max"):
        xp = _xp(a)
        if a.shape[axis] == 0:
            raise ShapeError(f"{mode}: cannot reduce the empty dim {axis} of an array of shape {a.shape}")
        idx = (xp.argmax if mode == "max" else xp.argmin)(a, axis=axis, keepdims=True)
        out = xp.take_along_axis(a, idx, axis=axis)
        self.shape, self.axis, self.idx, self.keepdims = a.shape, axis, idx, keepdims
        return out if keepdims else out.squeeze(axis)

    def backward(self, g):
        xp = _xp(g)
        if not self.keepdims:
            g = xp.expand_dims(g, self.axis)
        positions = xp.arange(self.shape[self.axis]).reshape([-1 if i == self.axis else 1
                                                              for i in range(len(self.shape))])
        return xp.where(positions == self.idx, g, g.dtype.type(0))


def _extremum(mode: str, a: Tensor, dim, keepdim, axis, keepdims):
    if not isinstance(a, Tensor) and backend.is_array(a):
        a = Tensor(a)  # engine.max(array, 1): a raw numpy/cupy array is taken as a tensor
    if isinstance(dim, Tensor) or (dim is not None and not isinstance(dim, (int, np.integer, tuple, list))):
        # torch.max(a, b): the elementwise maximum
        return (maximum if mode == "max" else minimum)(a, dim)
    dim, keep = _dim(mode, dim, axis), _keep(keepdim, keepdims)
    if dim is None or isinstance(dim, (tuple, list)):  # all dims, or several: values only (amax)
        return MaxOrMin.apply(a, axis=dim, keepdims=keep, mode=mode)
    if a.ndim == 0:
        if dim not in (0, -1):
            raise ShapeError(f"{mode}: dim {dim} is out of range for the 0-d {describe(a)}")
        values = reshape(a, ())  # a new tensor (a view), as PyTorch returns
        indices = Tensor._from_op(a.xp.zeros((), dtype=np.int64), None)
        return getattr(return_types, mode)(values, indices)
    if not -a.ndim <= dim < a.ndim:
        raise ShapeError(f"{mode}: dim {dim} is out of range for {describe(a)}")
    dim = int(dim) % a.ndim
    values = IndexedExtremum.apply(a, axis=dim, keepdims=keep, mode=mode)
    indices = (argmax if mode == "max" else argmin)(a, dim, keep)
    return getattr(return_types, mode)(values, indices)


def max(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None):
    """As ``torch.max``: ``max(a)`` the 0-d maximum; ``max(a, dim)`` the named tuple ``(values, indices)``
    along ``dim`` (``axis=`` is an alias); ``max(a, b)`` with a tensor ``b`` the elementwise maximum.
    A tuple of dims (a numpy convenience) gives the values only, as ``amax``."""
    return _extremum("max", a, dim, keepdim, axis, keepdims)


def min(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None):
    """As ``torch.min``: see :func:`max`."""
    return _extremum("min", a, dim, keepdim, axis, keepdims)


def amax(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """The maximum over ``dim`` (an int, a tuple, or None for all): values only, ties share the gradient."""
    return MaxOrMin.apply(a, axis=_dim("amax", dim, axis), keepdims=_keep(keepdim, keepdims), mode="max")


def amin(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    return MaxOrMin.apply(a, axis=_dim("amin", dim, axis), keepdims=_keep(keepdim, keepdims), mode="min")


def _correction(unbiased, correction) -> int:
    if correction is not None:
        return correction
    return 1 if unbiased is None or unbiased else 0


def var(a: Tensor, dim=None, unbiased=None, keepdim: bool = False, *, correction=None, axis=None,
        keepdims=None) -> Tensor:
    """Variance over ``dim`` with ``correction`` (1 = unbiased, PyTorch's default; 0 = population).

    As in PyTorch, the third positional argument is ``unbiased`` (legacy); ``var(a, False)`` is the
    population variance over all elements.
    """
    if isinstance(dim, bool):  # torch.var(input, unbiased)
        dim, unbiased = None, dim
    _require_float("var", a)
    axes = _norm_axis(_dim("var", dim, axis), a.ndim)
    keep, corr = _keep(keepdim, keepdims), _correction(unbiased, correction)
    count = int(np.prod([a.shape[i] for i in axes])) if axes else 1
    centered = a - mean(a, axes, keepdim=True)
    return sum(centered * centered, axes, keep) / builtins.max(count - corr, 0)


def std(a: Tensor, dim=None, unbiased=None, keepdim: bool = False, *, correction=None, axis=None,
        keepdims=None) -> Tensor:
    """Standard deviation: see :func:`var`."""
    _require_float("std", a)
    return sqrt(var(a, dim, unbiased, keepdim, correction=correction, axis=axis, keepdims=keepdims))


class Prod(Function):
    """Product over one dim (or all elements); the gradient is the product of the other elements,
    from exclusive cumulative products, so zeros in the input are handled exactly."""

    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        self.save(a)
        if axis is None:
            out = a.prod()
            return out.reshape((1,) * a.ndim) if keepdims else out
        return a.prod(axis=axis, keepdims=keepdims)

    def backward(self, g):
        a = self.saved[0]
        xp = _xp(a)
        axis = self.axis
        moved = a.reshape(-1, 1) if axis is None else xp.moveaxis(a, axis, -1)
        if axis is None:
            moved = moved.reshape(1, -1)
        ones = xp.ones(moved.shape[:-1] + (1,), dtype=a.dtype)
        left = xp.concatenate([ones, xp.cumprod(moved, axis=-1)[..., :-1]], axis=-1)
        right = xp.flip(xp.concatenate([ones, xp.cumprod(xp.flip(moved, -1), axis=-1)[..., :-1]], axis=-1), -1)
        others = left * right
        if axis is None:
            return (others.reshape(self.shape) * g.reshape(())).astype(a.dtype, copy=False)
        if not self.keepdims:
            g = xp.expand_dims(g, axis)
        return xp.moveaxis(others, -1, axis) * g


def prod(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None, dtype=None) -> Tensor:
    """Product over ``dim`` (one int, or None for all elements), as ``torch.prod``."""
    if dtype is not None:
        a = cast(a, dtype)
    dim = _dim("prod", dim, axis)
    if dim is not None:
        if not -builtins.max(a.ndim, 1) <= dim < builtins.max(a.ndim, 1):
            raise ShapeError(f"prod: dim {dim} is out of range for {describe(a)}")
        dim = int(dim) % builtins.max(a.ndim, 1) if a.ndim else None
    return _int64_if_integral(Prod.apply(a, axis=dim, keepdims=_keep(keepdim, keepdims)))


class EuclideanNorm(Function):
    """sqrt(sum(x * x)) over axes; the gradient at a zero norm is 0 (PyTorch's subgradient)."""

    def forward(self, a, axis=None, keepdims=False):
        xp = _xp(a)
        self.shape, self.axes, self.keepdims = a.shape, _norm_axis(axis, a.ndim), keepdims
        out = xp.sqrt((a * a).sum(axis=self.axes, keepdims=True))
        self.save(a, out)
        return out if keepdims else out.reshape([n for i, n in enumerate(a.shape) if i not in self.axes])

    def backward(self, g):
        a, out = self.saved
        xp = _xp(a)
        g = g.reshape(out.shape)
        safe = xp.where(out == 0, a.dtype.type(1), out)
        return xp.where(out == 0, a.dtype.type(0), g * a / safe).astype(a.dtype, copy=False)


@autocast_op("norm")
def norm(a: Tensor, p=2, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """As ``torch.norm``: the ``p``-norm (2, 'fro', 1, inf, -inf or any positive number) over ``dim``
    (None: all elements, so a matrix's Frobenius norm). ``'nuc'`` is not supported."""
    dim, keep = _dim("norm", dim, axis), _keep(keepdim, keepdims)
    _require_float("norm", a)
    if p is None or p in ("fro", 2):
        return EuclideanNorm.apply(a, axis=dim, keepdims=keep)
    if isinstance(p, str):
        raise ValueError(f"norm: p={p!r} is not supported; use 2, 'fro', 1, inf, -inf or a positive number")
    if p == math.inf:
        return amax(abs(a), dim, keep)
    if p == -math.inf:
        return amin(abs(a), dim, keep)
    if p == 1:
        return sum(abs(a), dim, keep)
    if p <= 0:
        raise ValueError(f"norm: p={p} is not supported; use a positive p, inf or -inf")
    return pow(sum(pow(abs(a), p), dim, keep), 1.0 / p)


def argmax(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    dim, keep = _dim("argmax", dim, axis), _keep(keepdim, keepdims)
    a = a if isinstance(a, Tensor) else Tensor(a)
    if dim is None and keep:  # PyTorch: the flat index, in a tensor of the input's ndim of ones
        return Tensor._from_op(a.xp.argmax(a._data).reshape((1,) * a.ndim), None)
    return Tensor._from_op(a.xp.argmax(a._data, axis=dim, keepdims=keep), None)


def any(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """Is any element non-zero (over ``dim``: an int, a tuple, or None for all)? A bool tensor on
    ``a``'s device (uint8 for a uint8 input, as PyTorch), never read on the host: ``bool(t.any())``
    is the read."""
    return _logical_reduction("any", a, _dim("any", dim, axis), _keep(keepdim, keepdims))


def all(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    """Are all elements non-zero (over ``dim``)? As :func:`any`."""
    return _logical_reduction("all", a, _dim("all", dim, axis), _keep(keepdim, keepdims))


def _logical_reduction(op: str, a, dim, keepdim: bool) -> Tensor:
    a = a if isinstance(a, Tensor) else Tensor(a)
    dims = (dim,) if isinstance(dim, (int, np.integer)) else dim
    if dims is not None:
        rank = builtins.max(a.ndim, 1)  # a 0-d tensor takes dim 0 or -1, as in PyTorch
        bad = [d for d in dims if not -rank <= d < rank]
        if bad:
            raise ShapeError(f"{op}: dim {bad[0]} is out of range for {describe(a)} (expected a dim in "
                             f"[{-rank}, {rank - 1}])")
        dims = tuple(int(d) % rank for d in dims) if a.ndim else None
    out = getattr(a.xp, op)(a._data, axis=dims, keepdims=keepdim)
    if a.dtype == np.uint8:
        out = out.astype(np.uint8)
    return Tensor._from_op(out, None)


def argmin(a: Tensor, dim=None, keepdim: bool = False, *, axis=None, keepdims=None) -> Tensor:
    dim, keep = _dim("argmin", dim, axis), _keep(keepdim, keepdims)
    a = a if isinstance(a, Tensor) else Tensor(a)
    if dim is None and keep:
        return Tensor._from_op(a.xp.argmin(a._data).reshape((1,) * a.ndim), None)
    return Tensor._from_op(a.xp.argmin(a._data, axis=dim, keepdims=keep), None)


# ---- shape ops ----------------------------------------------------------------------------------

class Reshape(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def forward(self, a, shape=()):
        self.shape = a.shape
        return a.reshape(shape)

    def backward(self, g):
        return g.reshape(self.shape)


class Permute(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def forward(self, a, dims=()):
        self.dims = dims
        return a.transpose(dims)

    def backward(self, g):
        return g.transpose(np.argsort(self.dims))


class BroadcastTo(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def forward(self, a, shape=()):
        self.shape = a.shape
        return _xp(a).broadcast_to(a, shape)

    def backward(self, g):
        return unbroadcast(g, self.shape)


def reshape(a: Tensor, shape) -> Tensor:
    shape = tuple(shape)
    # math.prod, not np.prod: far cheaper, and reshape runs ~100 times a GPT step (docs/benchmarks.md)
    known = math.prod([n for n in shape if n != -1])
    if shape.count(-1) > 1 or (-1 not in shape and known != a.numel()) or (
            -1 in shape and (known == 0 or a.numel() % known)):
        raise ShapeError(f"reshape: cannot reshape {describe(a)} ({a.numel()} elements) to {shape}")
    return Reshape.apply(a, shape=shape)


def flatten(a: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    if a.ndim == 0:
        return reshape(a, (1,))
    start, end = start_dim % a.ndim, end_dim % a.ndim
    shape = a.shape[:start] + (-1,) + a.shape[end + 1:]
    if a.numel() == 0:
        shape = a.shape[:start] + (int(np.prod(a.shape[start:end + 1])),) + a.shape[end + 1:]
    return reshape(a, shape)


def permute(a: Tensor, dims) -> Tensor:
    dims = tuple(d % a.ndim for d in dims)
    if sorted(dims) != list(range(a.ndim)):
        raise ShapeError(f"permute: {dims} is not a permutation of the {a.ndim} dims of {describe(a)}")
    return Permute.apply(a, dims=dims)


def transpose(a: Tensor, dim0: int = -2, dim1: int = -1) -> Tensor:
    if a.ndim < 2:
        return a
    dims = list(range(a.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return permute(a, dims)


def t(a: Tensor) -> Tensor:
    """``torch.t``: transpose a 2-D tensor; 0-D and 1-D tensors come back unchanged, as in PyTorch."""
    if a.ndim > 2:
        raise ShapeError(f"t: expects a tensor with <= 2 dims, got {describe(a)}; use transpose(dim0, dim1) "
                         "or permute for more dims")
    return a if a.ndim < 2 else transpose(a, 0, 1)


def broadcast_to(a: Tensor, shape) -> Tensor:
    shape = tuple(a.shape[i - len(shape) + a.ndim] if n == -1 else n for i, n in enumerate(shape))
    try:
        np.broadcast_shapes(a.shape, shape)
    except ValueError:
        raise ShapeError(f"expand/broadcast_to: cannot broadcast {describe(a)} to {shape}") from None
    return BroadcastTo.apply(a, shape=shape)


def unsqueeze(a: Tensor, dim: int) -> Tensor:
    """A view with a new dim of size 1 at ``dim`` (in [-ndim - 1, ndim], as ``torch.unsqueeze``)."""
    if not -(a.ndim + 1) <= dim <= a.ndim:
        raise ShapeError(f"unsqueeze: dim {dim} is out of range for {describe(a)} (expected a dim in "
                         f"[{-(a.ndim + 1)}, {a.ndim}])")
    dim = dim % (a.ndim + 1)
    return reshape(a, a.shape[:dim] + (1,) + a.shape[dim:])


def squeeze(a: Tensor, dim=None) -> Tensor:
    """A view without the size-1 dims among ``dim`` (an int, a tuple, or None for all), as ``torch.squeeze``."""
    if dim is None:
        return reshape(a, tuple(n for n in a.shape if n != 1))
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    span = builtins.max(a.ndim, 1)
    if not builtins.all(-span <= d < span for d in dims):
        raise ShapeError(f"squeeze: dim {dim} is out of range for {describe(a)}")
    drop = {d % span for d in dims}
    shape = tuple(n for i, n in enumerate(a.shape) if not (i in drop and n == 1))
    return a if shape == a.shape else reshape(a, shape)


# ---- indexing, joining ---------------------------------------------------------------------------

class GetItem(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def forward(self, a, index=None):
        self.shape, self.dtype, self.index = a.shape, a.dtype, index
        # backward's gradient is zeros with g at a basic index: the engine adds g into the input's
        # gradient itself (autograd._Scattered), and calls backward below only for other indices
        self.scatters = _is_basic_index(index)
        return a[index]

    def backward(self, g):
        xp = _xp(g)
        if _is_basic_index(self.index):
            grad = xp.zeros(self.shape, dtype=self.dtype)
            grad[self.index] = g  # basic slices select each element at most once
            return grad
        # Repeated integer indices accumulate (an embedding row looked up by many tokens): in float32
        # for a 16-bit tensor, rounded once, as every sum here (PyTorch's CUDA embedding backward
        # does the same; its CPU one adds in the low dtype and loses most of a frequent row's sum).
        acc = dtypes.COMPUTE_DTYPE if dtypes.is_low_precision(self.dtype) else self.dtype
        grad = xp.zeros(self.shape, dtype=acc)
        backend.scatter_add(grad, self.index, g.astype(acc, copy=False))
        return grad.astype(self.dtype, copy=False)


def _is_basic_index(index) -> bool:
    if type(index) is slice or type(index) is int:  # the common cases, answered without a loop
        return True
    items = index if isinstance(index, tuple) else (index,)
    return builtins.all(isinstance(i, (int, np.integer, slice)) or i is None or i is Ellipsis for i in items)


def getitem(a: Tensor, index) -> Tensor:
    index = _unwrap_index(index, a)
    if records_nothing(a) and _is_basic_index(index):  # a view and no graph node: apply's result, less its cost
        try:
            return view_result(a._data[index], a)
        except (IndexError, TypeError) as e:
            raise type(e)(f"getitem: {e} (operands: {describe(a)})") from e
    return GetItem.apply(a, index=index)


def _unwrap_index(index, a: Tensor):
    if isinstance(index, tuple):
        return tuple(_unwrap_index(i, a) for i in index)
    if isinstance(index, Tensor):
        if index.device != a.device:
            raise DeviceError(f"getitem: index {describe(index)} and {describe(a)} are on different devices")
        return index._data
    if isinstance(index, list):
        return a.xp.asarray(index)
    return index


class Concatenate(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def forward(self, *arrays, axis=0):
        self.axis = axis
        self.sizes = [x.shape[axis] for x in arrays]
        return _xp(arrays[0]).concatenate(arrays, axis=axis)

    def backward(self, g):
        splits = np.cumsum(self.sizes)[:-1].tolist()
        return tuple(_xp(g).split(g, splits, axis=self.axis))


def concatenate(tensors, dim: int | None = None, *, axis=None) -> Tensor:
    """Join tensors along an existing dim (default 0, ``torch.cat``); ``axis=`` is an alias of ``dim=``."""
    axis = _axis_or(_dim("cat", dim, axis), 0)
    tensors = list(tensors)
    if not tensors:
        raise ShapeError("concatenate: needs at least one tensor")
    tensors = _promoted_together(tensors)
    ndim = tensors[0].ndim
    axis = axis % ndim
    for t in tensors:
        if t.ndim != ndim or t.shape[:axis] + t.shape[axis + 1:] != tensors[0].shape[:axis] + tensors[0].shape[axis + 1:]:
            shapes = ", ".join(str(x.shape) for x in tensors)
            raise ShapeError(f"concatenate: shapes {shapes} differ outside axis {axis}")
    return Concatenate.apply(*tensors, axis=axis)


cat = concatenate


def stack(tensors, dim: int | None = None, *, axis=None) -> Tensor:
    """Join tensors along a new dim (default 0); ``axis=`` is an alias of ``dim=``."""
    axis = _axis_or(_dim("stack", dim, axis), 0)
    tensors = list(tensors)
    if not tensors:
        raise ShapeError("stack: needs at least one tensor")
    promoted = _promoted_together(tensors)  # checks that each is a Tensor
    if len({t._data.shape for t in tensors}) > 1:
        raise ShapeError(f"stack: all shapes must be equal, got {', '.join(str(t.shape) for t in tensors)}")
    axis = axis % (tensors[0].ndim + 1)
    return Stack.apply(*promoted, axis=axis)


class Stack(Function):
    """One graph node for ``stack`` (not an unsqueeze per tensor and a concatenate)."""
    computes_in_float32 = False  # moves memory: no arithmetic to do in float32

    def forward(self, *arrays, axis=0):
        self.axis = axis
        return _xp(arrays[0]).stack(arrays, axis=axis)

    def backward(self, g):
        return tuple(_xp(g).moveaxis(g, self.axis, 0))


def _promoted_together(tensors) -> list:
    """``tensors`` cast to their common dtype, as ``torch.cat`` promotes (bf16 with fp32 is fp32);
    each cast is differentiable, so each gradient comes back in its tensor's dtype."""
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"concatenate: expected Tensors, got {type(t).__name__}")
    if len({t._data.dtype for t in tensors}) == 1:  # nothing to promote (the usual case)
        return tensors
    target = dtypes.result_type([t.dtype for t in tensors])
    return [cast(t, target) for t in tensors]


# ---- matmul --------------------------------------------------------------------------------------

def _size_gemm(a, b) -> None:
    """The BLAS pool sized for one (m, k) x (k, n) product of a @ b (a batch runs them one by one)."""
    m = a.shape[-2] if a.ndim > 1 else 1
    n = b.shape[-1] if b.ndim > 1 else 1
    backend.size_cpu_gemm(a, m, n, a.shape[-1])


class MatMul(Function):
    """``a @ b``. 16-bit GPU arrays are multiplied as they are: cuBLAS reads them, accumulates in
    float32 on tensor cores and rounds once (``ON_CPU``); numpy ones go through float32 copies."""

    computes_in_float32 = ON_CPU

    def forward(self, a, b):
        self.save(a, b)
        _size_gemm(a, b)
        return backend.matmul(a, b)

    def backward(self, g):
        a, b = self.saved
        g = g.astype(a.dtype, copy=False)  # the GEMMs take one dtype (16-bit operands on the GPU)
        acc = accumulation_dtype(g.dtype)  # a broadcast operand's batch sum: in float32 for 16 bits
        xp = _xp(g)
        _size_gemm(a, b)
        # Treat 1-D operands as matrices so one formula serves every case.
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        g2 = g
        if a.ndim == 1:
            g2 = xp.expand_dims(g2, -2)
        if b.ndim == 1:
            g2 = xp.expand_dims(g2, -1)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(backend.matmul(g2, xp.swapaxes(b2, -1, -2)), a2.shape, acc).reshape(a.shape)
        if self.needs_input_grad[1]:
            gb = unbroadcast(backend.matmul(xp.swapaxes(a2, -1, -2), g2), b2.shape, acc).reshape(b.shape)
        return ga, gb


@autocast_op("matmul")
def matmul(input, other, *, out=None) -> Tensor:
    """Matrix product with broadcasting (``torch.matmul(input, other)``, PyTorch's argument names).

    ``out=`` writes the result into an existing tensor (see :func:`write_out`)."""
    if out is not None:
        return write_out("matmul", matmul(input, other), out)
    _check_same_float_dtype("matmul", input, other)
    return matmul_of_one_dtype(*_binary_operands("matmul", input, other))


def matmul_of_one_dtype(a: Tensor, b: Tensor) -> Tensor:
    """:func:`matmul` of two tensors of one dtype outside any autocast region, where it has nothing
    to promote or cast (``Tensor.__matmul__`` calls it directly then): the operand checks and the op."""
    ad, bd = a._data, b._data  # read from the arrays: Tensor's properties are a Python call each
    if ad.dtype.kind == "b":  # bool, the only kind "b" (a dtype's == converts its other side first)
        raise DTypeError(f"matmul: bool operands are not supported (as in PyTorch): {describe(a)} @ {describe(b)}; "
                         "convert with .float() or .long()")
    if ad.ndim == 0 or bd.ndim == 0:
        raise ShapeError(f"matmul: operands must have at least 1 dim: {describe(a)} @ {describe(b)}")
    k_a = ad.shape[-1]
    k_b = bd.shape[0] if bd.ndim == 1 else bd.shape[-2]
    if k_a != k_b:
        raise ShapeError(f"matmul: inner dimensions differ ({k_a} != {k_b}) for {describe(a)} @ {describe(b)}; "
                         "transpose one operand or fix the layer sizes")
    return MatMul.apply(a, b)


@autocast_op("mm")
def mm(input: Tensor, mat2: Tensor) -> Tensor:
    """Matrix product of two 2-D tensors (``torch.mm``); use :func:`matmul` for batches and vectors."""
    a, b = input, mat2
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.ndim != 2 or b.ndim != 2:
        raise ShapeError(f"mm: both operands must be 2-D tensors, got {describe(a)} and {describe(b)}; "
                         "use matmul for other shapes")
    return matmul(a, b)


# ---- softmax family (numerically stable: subtract the row max) -----------------------------------

class Softmax(Function):
    def forward(self, a, axis=-1):
        xp = _xp(a)
        e = xp.exp(a - a.max(axis=axis, keepdims=True))
        out = e / e.sum(axis=axis, keepdims=True)
        self.save(out)
        self.axis = axis
        return out

    def backward(self, g):
        out = self.saved[0]
        return out * (g - (g * out).sum(axis=self.axis, keepdims=True))


class LogSoftmax(Function):
    def forward(self, a, axis=-1):
        xp = _xp(a)
        shifted = a - a.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.save(out)
        self.axis = axis
        return out

    def backward(self, g):
        out = self.saved[0]
        return g - _xp(g).exp(out) * g.sum(axis=self.axis, keepdims=True)


@autocast_op("softmax")
def softmax(a: Tensor, dim: int | None = None, *, axis=None, dtype=None) -> Tensor:
    """Softmax along ``dim`` (default the last; ``axis=`` is an alias), optionally cast to ``dtype`` first."""
    if dtype is not None:
        a = cast(a, dtype)
    _require_float("softmax", a, "pass dtype=engine.float32 or convert with .float()")
    return Softmax.apply(a, axis=_axis_or(_dim("softmax", dim, axis), -1))


@autocast_op("log_softmax")
def log_softmax(a: Tensor, dim: int | None = None, *, axis=None, dtype=None) -> Tensor:
    """``log(softmax(a))`` along ``dim``, computed stably in one op."""
    if dtype is not None:
        a = cast(a, dtype)
    _require_float("log_softmax", a, "pass dtype=engine.float32 or convert with .float()")
    return LogSoftmax.apply(a, axis=_axis_or(_dim("log_softmax", dim, axis), -1))


# ---- dtype and device moves ----------------------------------------------------------------------

class Cast(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def forward(self, a, dtype=None):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return g.astype(self.dtype)


class Transfer(Function):
    """Copy to another device; the gradient is copied back. Exempt from the same-device check."""

    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def forward(self, a, target=None):
        self.source = backend.device_of(a)
        return backend.to_device(a, target)

    def backward(self, g):
        return backend.to_device(g, self.source)


class Clone(Function):
    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def forward(self, a):
        return a.copy()

    def backward(self, g):
        return g


class BroadcastCopy(Function):
    """The value of ``copy_`` / ``fill_`` done through the graph: ``b`` broadcast to ``a``'s shape
    and dtype; no gradient reaches the overwritten ``a``."""

    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    def forward(self, a, b):
        self.shape = b.shape
        out = _xp(a).empty_like(a)
        out[...] = b
        return out

    def backward(self, g):
        zero = _xp(g).zeros_like(g) if self.needs_input_grad[0] else None
        return zero, (unbroadcast(g, self.shape) if self.needs_input_grad[1] else None)


def overwrite(a: Tensor, b) -> Tensor:
    """``b`` (a tensor or a number) broadcast into a new tensor of ``a``'s shape and dtype."""
    if isinstance(b, Tensor):
        if b.device != a.device:
            raise DeviceError(f"copy_: {describe(b)} and {describe(a)} are on different devices")
        return BroadcastCopy.apply(a, b)
    return BroadcastCopy.apply(a, Tensor(np.asarray(b, dtype=a.dtype), device=a.device))


def cast(a: Tensor, dtype) -> Tensor:
    if a.dtype == np.dtype(dtype):
        return a
    if a.requires_grad and not _is_float(dtype):
        return Tensor._from_op(a._data.astype(dtype), None)
    return Cast.apply(a, dtype=np.dtype(dtype))


def transfer(a: Tensor, target) -> Tensor:
    return Transfer.apply(a, target=target)


def clone(a: Tensor) -> Tensor:
    return Clone.apply(a)
