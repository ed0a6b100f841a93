"""Tensor: an array (numpy or cupy) plus what autograd needs; and the factory functions.

Operators and methods delegate to engine/ops.py, where each op is one Function or a short
composite of them. Python scalars take the tensor's dtype, so float32 stays float32.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from engine import backend, dlpack, dtypes
from engine.amp.autocast_mode import state as _autocast_state
from engine.autograd import Version
from engine.autograd import backward as _run_backward
from engine.autograd import grad_lock, is_grad_enabled, notify_watcher, records_nothing, view_result
from engine.dtypes import is_floating
from engine.errors import DeviceError, DTypeError, EngineError, GradError, describe

float16, float32, float64 = np.float16, np.float32, np.float64
bfloat16 = dtypes.bfloat16  # ml_dtypes' bfloat16, the type JAX uses
int32, int64, bool_ = np.int32, np.int64, np.bool_


_new_tensor = object.__new__
_ndarray = np.ndarray


class Tensor:
    """An n-dimensional array on a device, recording the ops that made it when grad is on.

    Args:
        data: array, nested list or scalar. Python floats become float32, ints int64.
        requires_grad: accumulate gradients into ``.grad`` during ``backward()``.
        dtype: numpy dtype (``engine.float32`` ...); default from ``data``.
        device: "cpu", "cuda", "cuda:N" or a Device; default: where ``data`` lives (cpu for lists).

    Example:
        >>> w = engine.tensor([[1.0, 2.0]], requires_grad=True)   # doctest: +SKIP
        >>> (w * w).sum().backward(); w.grad                      # doctest: +SKIP
        tensor([[2., 4.]])
    """

    __slots__ = ("_data", "_grad", "requires_grad", "grad_fn", "_retains_grad", "_version", "_base",
                 "_post_grad_hooks", "_grad_home", "__weakref__")
    __array_priority__ = 1000  # numpy scalars defer to Tensor's reflected operators
    # False for a subclass that defines its own ``device``: ops then ask it, rather than assuming
    # that a numpy array's tensor is on the CPU (Function.apply's fast path).
    _device_is_its_arrays = True
    __hash__ = object.__hash__  # == is elementwise, so hash by identity like PyTorch

    def __init__(self, data=None, *sizes, requires_grad: bool = False, dtype=None, device=None):
        if data is None or sizes or (isinstance(data, int) and not isinstance(data, bool)):
            # PyTorch's legacy constructor: Tensor(2, 3) is an uninitialised float32 tensor of that shape.
            # A lone numpy integer stays data (a 0-d tensor), as engine code builds tensors from reductions.
            data = _legacy_empty((data, *sizes) if data is not None else (0,), dtype, device)
        elif dtype is None and isinstance(data, (list, tuple)):
            dtype = float32  # PyTorch's legacy Tensor([0]) is a FloatTensor, whatever the numbers' type
        self._data = as_array(data, dtype, device)
        self._grad: Tensor | None = None
        self.grad_fn = None
        self._retains_grad = False
        self._version = Version()  # shared with every tensor viewing the same memory
        self._base = None  # the tensor this one is a view of (made by an op), if any
        self._post_grad_hooks = self._grad_home = None
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "device" in cls.__dict__:
            cls._device_is_its_arrays = False

    @classmethod
    def _from_op(cls, data, grad_fn) -> "Tensor":
        t = _new_tensor(Tensor)
        if type(data) is not _ndarray and isinstance(data, np.generic):  # numpy reductions return scalars: 0-d arrays
            data = np.asarray(data)
        t._data = data
        t._grad = t._base = t._post_grad_hooks = t._grad_home = None
        t.grad_fn = grad_fn
        t._retains_grad = False
        t._version = Version()
        t.requires_grad = grad_fn is not None
        return t

    @property
    def grad(self) -> "Tensor | None":
        """The accumulated gradient (a Tensor of this tensor's shape, dtype and device), or None."""
        return self._grad

    @grad.setter
    def grad(self, value) -> None:
        if value is not None:
            if not isinstance(value, Tensor):
                raise GradError(f"grad: assign a Tensor or None to the .grad of {describe(self)}, got "
                                f"{type(value).__name__}")
            if value.shape != self.shape or value.dtype != self.dtype or value.device != self.device:
                raise GradError(f"grad: assigned gradient {describe(value)} does not match {describe(self)}: a "
                                "gradient must have the tensor's shape, dtype and device (PyTorch refuses it too)")
        self._grad = value

    @property
    def data(self) -> "Tensor":
        """This tensor's memory as a new Tensor outside the graph, as PyTorch's ``.data``.

        It shares the storage (``p.data.normal_()`` and ``p.data -= lr * p.grad`` change ``p``) but
        not the version counter, so autograd does not see changes made through it: PyTorch's
        contract, and the reason ``.detach()`` is the safer spelling. Assigning ``p.data = t``
        rebinds ``p`` to ``t``'s memory (a Tensor or an array, on any device and dtype).
        """
        return Tensor._from_op(self._data, None)

    @data.setter
    def data(self, value) -> None:
        if isinstance(value, Tensor):
            value = value._data
        elif not backend.is_array(value):
            raise TypeError(f"data: assign a Tensor or an array to the .data of {describe(self)}, got "
                            f"{type(value).__name__}")
        self._data = value

    @property
    def _version_value(self) -> int:
        """How many in-place changes this tensor's memory has had (PyTorch's ``_version``)."""
        return self._version.value

    # ---- properties --------------------------------------------------------------------------
    shape = property(lambda self: tuple(self._data.shape))
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    device = property(lambda self: backend.device_of(self._data))
    xp = property(lambda self: backend.array_module(self._data), doc="numpy or cupy")
    is_leaf = property(lambda self: self.grad_fn is None)
    T = property(lambda self: self.transpose())

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(self._data.size)

    def __iter__(self):
        """The sub-tensors along dim 0 (views), as PyTorch's iteration; a 0-d tensor is not iterable."""
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        if records_nothing(self):  # no graph to record: the rows straight from the array (loops over indices)
            data = self._data
            if data.ndim == 1:
                return (Tensor._from_op(value, None) for value in data)  # numpy scalars: 0-d copies, as self[i]
            return (view_result(row, self) for row in data)
        return (self[i] for i in range(self.shape[0]))

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    # ---- autograd ----------------------------------------------------------------------------
    def backward(self, gradient=None, retain_graph: bool = False) -> None:
        """Accumulate the gradient of this tensor w.r.t. every leaf that requires grad."""
        _run_backward(self, gradient, retain_graph)

    def requires_grad_(self, requires_grad: bool = True) -> "Tensor":
        if requires_grad and not is_floating(np.dtype(self.dtype)):
            raise DTypeError(f"requires_grad_: only floating-point tensors can require grad, got {describe(self)}")
        if not self.is_leaf and not requires_grad:
            raise GradError("requires_grad_(False) on a non-leaf tensor; use .detach() instead")
        self.requires_grad = requires_grad
        return self

    def retain_grad(self) -> None:
        """Also keep ``.grad`` on this non-leaf tensor during backward."""
        self._retains_grad = True

    def register_post_accumulate_grad_hook(self, hook) -> "RemovableHandle":
        """Call ``hook(tensor)`` each time backward has finished accumulating this leaf's ``.grad``
        (PyTorch's hook of that name): the gradient of this pass is final when it runs.
        DistributedDataParallel starts a bucket's all-reduce from it. Returns a handle whose
        ``remove()`` unregisters the hook."""
        if not self.is_leaf:
            raise GradError(f"register_post_accumulate_grad_hook: {describe(self)} is not a leaf; such hooks "
                            "fire where .grad accumulates, on leaves only (PyTorch refuses it too)")
        if not self.requires_grad:
            raise GradError(f"register_post_accumulate_grad_hook: {describe(self)} does not require grad, so "
                            "no gradient will accumulate into it")
        with grad_lock(self):  # two threads registering must not each make a list and lose one
            hooks = getattr(self, "_post_grad_hooks", None)
            if hooks is None:
                hooks = self._post_grad_hooks = []
            hooks.append(hook)
        return RemovableHandle(hooks, hook)

    def _accumulate_grad(self, g) -> None:
        with grad_lock(self):  # backward() may run in several threads at once (see grad_lock)
            if self._grad is None:
                # Copy: ``g`` may be a view shared with another tensor's gradient. Into the home an
                # optimizer prepared (its flat gradient buffer, see GradHome) where it is free.
                home = self._grad_home
                home = home() if home is not None else None
                if home is not None and home.takes(self._data, g):
                    home.array[...] = g
                    self._grad = Tensor._from_op(home.array, None)
                else:
                    self._grad = Tensor._from_op(g.copy(), None)
            else:
                self._grad._data += g
                self._grad._version.value += 1

    def detach(self) -> "Tensor":
        """The same data, cut from the graph (in-place changes to it show in this tensor's version)."""
        t = Tensor._from_op(self._data, None)
        t._version = self._version
        return t

    def detach_(self) -> "Tensor":
        """Cut this tensor from the graph in place: it becomes a leaf that does not require grad
        (``torch.Tensor.detach_``; a view of a graph tensor is refused, as PyTorch refuses it)."""
        if self._base is not None and self._base.requires_grad:
            raise GradError(f"detach_: {describe(self)} is a view of a tensor in a graph; views cannot be detached "
                            "in place (as in PyTorch): use detach() instead")
        self.grad_fn, self.requires_grad = None, False
        return self

    # ---- copying and pickling: never through the graph ----------------------------------------
    def __deepcopy__(self, memo) -> "Tensor":
        """A leaf's independent copy: its values, ``requires_grad`` and ``.grad`` (hooks are not
        copied), as PyTorch. The graph is never walked: a non-leaf is refused, as PyTorch does (the
        default deepcopy followed ``grad_fn`` through every op, a RecursionError 1,000 ops deep)."""
        if self.grad_fn is not None:
            raise GradError(f"deepcopy: only Tensors created explicitly by the user (graph leaves) support the "
                            f"deepcopy protocol (as in PyTorch); {describe(self)} is the result of "
                            f"{self.grad_fn!r}. Copy its values with .detach().clone(), or keep it in the graph "
                            "with .clone()")
        copied = _rebuild(type(self), copy.deepcopy(self._data, memo), self.requires_grad)
        memo[id(self)] = copied
        if self._grad is not None:
            copied._grad = copy.deepcopy(self._grad, memo)
        if hasattr(self, "__dict__"):  # a subclass's own attributes
            copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def __reduce_ex__(self, protocol):
        """Pickling and ``copy.copy``: the values and ``requires_grad``, as a leaf, as PyTorch does
        (no graph, no ``.grad``, no hooks; ``copy.copy`` shares the values)."""
        return _rebuild, (type(self), self._data, self.requires_grad, getattr(self, "__dict__", None))

    # ---- devices, dtypes, host values ----------------------------------------------------------
    def to(self, target=None, dtype=None, non_blocking: bool = False, copy: bool = False, *, device=None) -> "Tensor":
        """Move to a device and/or cast: ``t.to("cuda")``, ``t.to(engine.float64)``, ``t.to("cpu", float32)``,
        ``t.to(device=d, dtype=dt)``, ``t.to(other)`` (other's device and dtype). ``non_blocking`` is
        accepted (transfers are ordered on the device anyway); ``copy=True`` always gives new memory.

        Differentiable: gradients flow back to the source device and dtype.
        """
        from engine import ops

        if isinstance(target, Tensor):
            target, dtype = target.device, dtype or target.dtype
        if device is not None:
            if target is not None and not _is_dtype(target):
                raise TypeError(f"to: got a device twice ({target!r} and device={device!r})")
            target, dtype = device, dtype if target is None else target
        if target is not None and _is_dtype(target):
            target, dtype = None, target
        out = self
        if dtype is not None and np.dtype(dtype) != self.dtype:
            out = ops.cast(out, dtype)
        if target is not None:
            dev = backend.check_available(backend.device(target))
            if dev != out.device:
                out = ops.transfer(out, dev)
        return ops.clone(out) if copy and out is self else out

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def cuda(self, index: int = 0) -> "Tensor":
        return self.to(f"cuda:{index}")

    def float(self) -> "Tensor":
        return self.to(float32)

    def double(self) -> "Tensor":
        return self.to(float64)

    def half(self) -> "Tensor":
        return self.to(float16)

    def bfloat16(self) -> "Tensor":
        return self.to(bfloat16)

    def long(self) -> "Tensor":
        return self.to(int64)

    def int(self) -> "Tensor":
        return self.to(int32)

    def bool(self) -> "Tensor":
        return self.to(bool_)

    def type(self, dtype=None):
        """With no argument the type name (``'torch.FloatTensor'``, as PyTorch); else cast to ``dtype``
        (a dtype or such a name)."""
        if dtype is None:
            name = _TYPE_NAMES.get(np.dtype(self.dtype), np.dtype(self.dtype).name)
            return f"torch.{'cuda.' if self.device.type == 'cuda' else ''}{name}"
        if isinstance(dtype, str):
            names = {v: k for k, v in _TYPE_NAMES.items()}
            key = dtype.removeprefix("torch.").removeprefix("cuda.")
            if key not in names:
                raise DTypeError(f"type: unknown tensor type {dtype!r}; use one of {sorted(names)} or a dtype")
            out = self.to(names[key])
            return out.cuda() if ".cuda." in dtype and out.device.type != "cuda" else out
        return self.to(dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def dim(self) -> int:
        return self.ndim

    def is_floating_point(self) -> bool:
        """float16, bfloat16, float32 or float64 (``np.issubdtype`` says False for bfloat16)."""
        return dtypes.is_floating(self.dtype)

    def element_size(self) -> int:
        return int(np.dtype(self.dtype).itemsize)

    def numpy(self) -> np.ndarray:
        """The data as a numpy array, detached from the graph: a copy from a GPU; on the CPU this
        tensor's own memory, as PyTorch's (writes through it change the tensor, and autograd does not
        see them). While a graph that has not yet run its backward keeps this memory for it, the array
        is read-only, so such a write raises instead of silently corrupting the gradient."""
        host = backend.to_host(self._data)
        if host is self._data and self._version.in_live_graph():
            host = host.view()
            host.flags.writeable = False
        return host

    def item(self):
        if self._data.size != 1:
            raise EngineError(f"item: only one-element tensors convert to a Python scalar, got {describe(self)}")
        return backend.to_host(self._data).item()

    def tolist(self):
        return self.numpy().tolist()

    def __repr__(self) -> str:
        values = self.numpy()
        if dtypes.is_low_precision(values.dtype):  # print as PyTorch does: 4 decimals, not every digit
            values = values.astype(float32)
        body = np.array2string(values, separator=", ", precision=4, threshold=50, prefix="tensor(")
        extras = "" if self.device.type == "cpu" else f", device='{self.device}'"
        extras += "" if self.dtype == np.float32 else f", dtype={self.dtype}"
        if self.grad_fn is not None:
            extras += f", grad_fn={self.grad_fn!r}"
        elif self.requires_grad:
            extras += ", requires_grad=True"
        return f"tensor({body}{extras})"

    def __bool__(self) -> bool:
        if self._data.size != 1:
            raise EngineError(f"bool() of {describe(self)} is ambiguous; use .any() or .all()")
        return bool(self.item())  # item() reads through backend.to_host: a counted host sync

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        if self._data.size != 1 or self._data.dtype.kind not in "iu":  # integers only (not bool), as PyTorch
            raise TypeError(f"only integer tensors of a single element can be converted to an index, got "
                            f"{describe(self)}")
        return int(self.item())

    def __format__(self, spec: str) -> str:
        if self.ndim == 0:
            return self.item().__format__(spec)  # f"{loss:.4f}" as in PyTorch
        return object.__format__(self, spec)

    def __array__(self, dtype=None, copy=None):
        """``np.asarray(t)`` / ``np.array(t)``, with NumPy 2's ``copy``: True copies; None shares the
        memory of a CPU tensor when no dtype change is asked (as PyTorch); False shares or raises
        ValueError. As in PyTorch, a tensor that requires grad is refused (use ``t.detach()``). A GPU
        tensor gives a host copy (PyTorch refuses it; the engine's own tests pass device tensors to
        ``np.testing``), and ``copy=False`` is a ValueError since GPU memory cannot be shared. A
        shared array is :meth:`numpy`'s: read-only while a graph keeps the memory for backward."""
        if self.requires_grad:
            raise GradError(f"numpy conversion (np.asarray / np.array) of {describe(self)}, which requires grad; "
                            "use t.detach() first (PyTorch refuses it too)")
        on_host = self.device.type == "cpu"
        converts = dtype is not None and np.dtype(dtype) != self.dtype
        if copy is False and (converts or not on_host):
            why = "a dtype change" if on_host else "its memory is on the GPU"
            raise ValueError(f"np.array(copy=False) of {describe(self)}{f' as {np.dtype(dtype)}' if converts else ''} "
                             f"needs a copy ({why}); use np.asarray to allow one")
        host = self.numpy()  # a GPU tensor: a copy, through backend.to_host
        if converts or (copy and on_host):
            return np.array(host, dtype=dtype, copy=True)
        return host

    # ---- DLPack and the CUDA array interface (engine/dlpack.py) -----------------------------------
    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        """A DLPack capsule sharing this tensor's memory (``torch.from_dlpack(t)``,
        ``np.from_dlpack(t)``, ``cupy.from_dlpack(t)``, ``jax.dlpack.from_dlpack(t)``).

        Args:
            stream: the consumer's CUDA stream (an int: a ``cudaStream_t``, 1 the legacy default
                stream, 2 the per-thread default stream, -1 no synchronisation), as the DLPack
                spec defines it; cupy makes the work queued on this tensor's current stream visible
                there before the capsule is returned. None on the CPU.
            max_version, dl_device, copy: the DLPack 2023 keywords, passed on to numpy / cupy.

        Raises:
            GradError: the tensor requires grad (export ``t.detach()``, as in PyTorch).

        bfloat16 crosses as DLPack's ``kDLBfloat`` (PyTorch's ``torch.bfloat16``). While a graph
        that has not yet run its backward keeps this memory, a CPU export is read-only (DLPack 1.0
        consumers see the flag; older ones are refused), as :meth:`numpy` is.
        """
        if self.requires_grad:
            raise GradError(f"__dlpack__: cannot export {describe(self)}, which requires grad; export "
                            "t.detach() (PyTorch refuses it too)")
        data = self.numpy() if self.device.type == "cpu" else self._data
        return dlpack.export(data, stream=stream, max_version=max_version, dl_device=dl_device, copy=copy)

    def __dlpack_device__(self) -> tuple[int, int]:
        """``(1, 0)`` for a CPU tensor (``kDLCPU``), ``(2, n)`` for one on cuda:n (``kDLCUDA``)."""
        return dlpack.device_tuple(self._data)

    @property
    def __cuda_array_interface__(self) -> dict:
        """Numba's CUDA array interface (version 3, with the stream) of a CUDA tensor: what
        ``numba.cuda.as_cuda_array(t)`` and ``cupy.asarray(t)`` read. A CPU tensor has none
        (AttributeError, so ``hasattr`` is False), and one that requires grad is refused, as in PyTorch."""
        if self.device.type != "cuda":
            raise AttributeError(f"__cuda_array_interface__: {describe(self)} is not a CUDA tensor; use "
                                 "__array_interface__ through np.asarray(t), or __dlpack__")
        if self.requires_grad:
            raise GradError(f"__cuda_array_interface__: {describe(self)} requires grad; use t.detach() "
                            "(PyTorch refuses it too)")
        return self._data.__cuda_array_interface__

    # ---- in-place updates ------------------------------------------------------------------------
    # Every in-place op bumps the version of this tensor's memory (shared with its views), so a
    # backward that needs the old values refuses to run (engine/autograd.py). Under grad mode:
    # - a leaf that requires grad, or a view of a tensor that requires grad, is refused (PyTorch
    #   refuses the first; for the second it rebases the base's graph, which the engine does not);
    # - any other tensor that requires grad, or whose operand does, is updated through the graph:
    #   the op is recorded (its input is the tensor's previous value) and the tensor takes its
    #   result, so gradients flow through the in-place op as they would through ``y = y * 10``.
    # Under no_grad (optimizers, initialisers) the update is a plain write, never recorded.

    def _check_inplace(self, op: str) -> None:
        if not is_grad_enabled():
            return
        if self.requires_grad and self.is_leaf:
            raise GradError(f"{op}: in-place change of a leaf {describe(self)} that requires grad; "
                            "do it under engine.no_grad() (as optimizers do)")
        base = self._base
        if base is not None and base.requires_grad:
            what = "a leaf that requires grad" if base.is_leaf else "a tensor that is part of a graph"
            raise GradError(f"{op}: in-place change of {describe(self)}, a view of {what} ({describe(base)}); "
                            "it would change that tensor behind autograd's back. Do it under engine.no_grad() "
                            "if it is an update (as optimizers do), or work on a .clone()")

    def _inplace_operand(self, op: str, other):
        value = other._data if isinstance(other, Tensor) else other
        if isinstance(other, Tensor) and other.device != self.device:
            raise EngineError(f"{op}: operands on different devices: {describe(self)} and {describe(other)}")
        return value

    def _inplace(self, op: str, other, write, through_graph) -> "Tensor":
        """Run one in-place op: ``write(value)`` changes the memory directly; ``through_graph(old)``
        computes the new value out of place from a tensor standing for the old one (recorded)."""
        self._check_inplace(op)
        notify_watcher((self, other), op)  # checkpointing must see an operand requiring grad read here too
        value = self._inplace_operand(op, other)
        other_needs_grad = isinstance(other, Tensor) and other.requires_grad
        if is_grad_enabled() and (self.requires_grad or other_needs_grad):
            self._rebase(op, through_graph, keep_old=other_needs_grad)
        else:
            write(value)
        self._version.value += 1
        return self

    def _rebase(self, op: str, through_graph, keep_old: bool) -> None:
        # The old value as its own node; a copy when the op's backward may need it (the operand
        # requires grad), since the write below overwrites this memory.
        old = Tensor._from_op(self._data.copy() if keep_old else self._data, self.grad_fn)
        old.requires_grad = self.requires_grad
        if not keep_old:
            old._version, old._base = self._version, self._base
        result = through_graph(old)
        if result.dtype != self.dtype and dtypes.can_cast(result.dtype, self.dtype):
            result = ops.cast(result, self.dtype)  # bf16.add_(fp32): promoted, written back as bf16
        if result.dtype != self.dtype or result.shape != self.shape:
            raise DTypeError(f"{op}: the result {describe(result)} cannot be written into {describe(self)} in "
                             "place (PyTorch refuses it too); use the out-of-place op")
        self._data[...] = result._data
        self.grad_fn, self.requires_grad = result.grad_fn, result.requires_grad

    def copy_(self, src) -> "Tensor":
        def write(value):
            if isinstance(value, np.ndarray) and self.device.type == "cuda":
                value = backend.to_device(value, self.device)
            self._data[...] = value
        return self._inplace("copy_", src, write, lambda old: ops.overwrite(old, src))

    def fill_(self, value) -> "Tensor":
        """Set every entry to ``value``: a number, or a 0-d tensor (differentiable), as PyTorch's."""
        if isinstance(value, Tensor):
            if value.ndim != 0:
                raise EngineError(f"fill_: only a 0-dimension value tensor (or a number) can fill {describe(self)}, "
                                  f"got {describe(value)} (PyTorch refuses it too); use copy_ for tensors")

            def write(raw):
                self._data[...] = raw
            return self._inplace("fill_", value, write, lambda old: ops.overwrite(old, value))
        return self._inplace("fill_", value, self._data.fill, lambda old: ops.overwrite(old, value))

    def zero_(self) -> "Tensor":
        return self.fill_(0)

    def add_(self, other, alpha=1.0) -> "Tensor":
        def write(value):
            self._data += value if alpha == 1.0 else value * alpha
        return self._inplace("add_", other, write,
                             lambda old: ops.add(old, other if alpha == 1.0 else ops.mul(other, alpha)
                                                 if isinstance(other, Tensor) else other * alpha))

    def sub_(self, other, alpha=1.0) -> "Tensor":
        return self.add_(other, alpha=-alpha)

    def mul_(self, other) -> "Tensor":
        def write(value):
            self._data *= value
        return self._inplace("mul_", other, write, lambda old: ops.mul(old, other))

    def div_(self, other) -> "Tensor":
        if not is_floating(np.dtype(self.dtype)):
            raise DTypeError(f"div_: true division of the integer {describe(self)} gives floats, which cannot "
                             "be written back in place (PyTorch refuses it too); use the out-of-place /")

        def write(value):
            self._data /= value
        return self._inplace("div_", other, write, lambda old: ops.div(old, other))

    def clamp_(self, min=None, max=None) -> "Tensor":
        """Clamp in place to [min, max] (numbers; either may be None)."""
        if isinstance(min, Tensor) or isinstance(max, Tensor):
            raise TypeError("clamp_: min and max must be numbers here (tensor bounds are not supported)")
        if min is None and max is None:
            raise ValueError("clamp_: give at least one of min and max")

        def write(_):
            self.xp.clip(self._data, min, max, out=self._data)
        # Clip's backward reads its input, which the write overwrites: clip a copy of the old value.
        return self._inplace("clamp_", None, write, lambda old: ops.clip(ops.clone(old), min, max))

    clip_ = clamp_

    def normal_(self, mean: float = 0.0, std: float = 1.0) -> "Tensor":
        """Fill in place with N(mean, std^2) samples from the engine's seeded generator."""
        return self._fill_random("normal_", lambda gen, dt: mean + std * _standard_normal(gen, self.device,
                                                                                          self.shape, dt))

    def uniform_(self, a: float = 0.0, b: float = 1.0) -> "Tensor":
        """Fill in place with U(a, b) samples from the engine's seeded generator."""
        return self._fill_random("uniform_", lambda gen, dt: a + (b - a) * _unit_uniform(gen, self.device,
                                                                                         self.shape, dt),
                                 upper=b if b > a else None)

    def _fill_random(self, op: str, draw, upper: float | None = None) -> "Tensor":
        if not is_floating(np.dtype(self.dtype)):
            raise DTypeError(f"{op}: needs a floating-point tensor, got {describe(self)}")
        self._check_inplace(op)  # before drawing, so a refused call leaves the generator's state alone
        dev = self.device
        with backend.on_device(dev):
            values = draw(backend.generator(dev), float64 if self.dtype == float64 else float32)
            values = values.astype(self.dtype, copy=False)
            values = values if upper is None else _below(values, upper)  # [a, b): never b itself
        return self._inplace(op, None, lambda _: self._data.__setitem__(Ellipsis, values),
                             lambda old: ops.overwrite(old, Tensor(values)))

    def __iadd__(self, other): return self.add_(other)
    def __isub__(self, other): return self.sub_(other)
    def __imul__(self, other): return self.mul_(other)
    def __itruediv__(self, other): return self.div_(other)

    def __setitem__(self, index, value) -> None:
        """``t[index] = value`` (a number or a tensor), in place. In a graph (``t`` or ``value``
        requires grad) it is recorded as PyTorch's CopySlices: the gradient reaches ``t``'s earlier
        value outside ``index`` and ``value`` at it; a graph that saved ``t`` refuses to backward."""
        def write(raw):
            if not isinstance(value, Tensor) and np.ndim(raw) == 0:
                _check_fill("__setitem__", raw, np.dtype(self.dtype))  # numpy would wrap or write INT64_MIN
            self._data[ops._unwrap_index(index, self)] = raw
        self._inplace("__setitem__", value, write, lambda old: indexing.index_put(old, index, value))

    # ---- operators and methods: see engine/ops.py ----------------------------------------------
    # Two tensors of one dtype go straight to the op's Function: ops.add / sub / mul would promote
    # nothing and check nothing else for them (sub refuses bool), and their layers cost as much as
    # the numpy op. Anything else takes the general path.
    def __add__(self, other):
        if isinstance(other, Tensor) and other._data.dtype is self._data.dtype:
            return ops.Add.apply(self, other)
        return ops.add(self, other)

    def __radd__(self, other): return ops.add(other, self)

    def __sub__(self, other):
        if isinstance(other, Tensor) and other._data.dtype is self._data.dtype and self._data.dtype.kind != "b":
            return ops.Sub.apply(self, other)
        return ops.sub(self, other)

    def __rsub__(self, other): return ops.sub(other, self)

    def __mul__(self, other):
        if isinstance(other, Tensor) and other._data.dtype is self._data.dtype:
            return ops.Mul.apply(self, other)
        return ops.mul(self, other)

    def __rmul__(self, other): return ops.mul(other, self)
    def __truediv__(self, other): return ops.div(self, other)
    def __rtruediv__(self, other): return ops.div(other, self)
    def __pow__(self, other): return ops.pow(self, other)
    def __rpow__(self, other): return ops.pow(other, self)
    def __neg__(self): return ops.neg(self)
    def __abs__(self): return ops.abs(self)
    def __matmul__(self, other):
        if isinstance(other, Tensor) and other._data.dtype is self._data.dtype and not _autocast_state.regions:
            return ops.matmul_of_one_dtype(self, other)
        return ops.matmul(self, other)

    def __rmatmul__(self, other): return ops.matmul(other, self)
    def __getitem__(self, index): return ops.getitem(self, index)
    def __lt__(self, other): return ops.lt(self, other)
    def __le__(self, other): return ops.le(self, other)
    def __gt__(self, other): return ops.gt(self, other)
    def __ge__(self, other): return ops.ge(self, other)
    def __eq__(self, other): return ops.eq(self, other)  # noqa: E704
    def __ne__(self, other): return ops.ne(self, other)

    def add(self, other, *, alpha=1): return ops.add(self, other, alpha=alpha)
    def sub(self, other, *, alpha=1): return ops.sub(self, other, alpha=alpha)
    def mul(self, other): return ops.mul(self, other)
    def div(self, other): return ops.div(self, other)
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def log1p(self): return ops.log1p(self)
    def expm1(self): return ops.expm1(self)
    def sqrt(self): return ops.sqrt(self)
    def abs(self): return ops.abs(self)
    def tanh(self): return ops.tanh(self)
    def sigmoid(self): return ops.sigmoid(self)
    def relu(self): return ops.relu(self)
    def matmul(self, other): return ops.matmul(self, other)
    def clip(self, min=None, max=None): return ops.clip(self, min, max)
    clamp = clip
    def maximum(self, other): return ops.maximum(self, other)
    def minimum(self, other): return ops.minimum(self, other)
    def sum(self, dim=None, keepdim=False, **kw): return ops.sum(self, dim, keepdim, **kw)
    def mean(self, dim=None, keepdim=False, **kw): return ops.mean(self, dim, keepdim, **kw)
    def prod(self, dim=None, keepdim=False, **kw): return ops.prod(self, dim, keepdim, **kw)
    def max(self, dim=None, keepdim=False, **kw): return ops.max(self, dim, keepdim, **kw)
    def min(self, dim=None, keepdim=False, **kw): return ops.min(self, dim, keepdim, **kw)
    def amax(self, dim=None, keepdim=False, **kw): return ops.amax(self, dim, keepdim, **kw)
    def amin(self, dim=None, keepdim=False, **kw): return ops.amin(self, dim, keepdim, **kw)
    def var(self, dim=None, unbiased=None, keepdim=False, **kw): return ops.var(self, dim, unbiased, keepdim, **kw)
    def std(self, dim=None, unbiased=None, keepdim=False, **kw): return ops.std(self, dim, unbiased, keepdim, **kw)
    def argmax(self, dim=None, keepdim=False, **kw): return ops.argmax(self, dim, keepdim, **kw)
    def argmin(self, dim=None, keepdim=False, **kw): return ops.argmin(self, dim, keepdim, **kw)
    def norm(self, p=2, dim=None, keepdim=False, **kw): return ops.norm(self, p, dim, keepdim, **kw)
    def pow(self, exponent): return ops.pow(self, exponent)
    def square(self): return ops.square(self)
    def sin(self): return ops.sin(self)
    def cos(self): return ops.cos(self)
    def mm(self, other): return ops.mm(self, other)
    def __and__(self, other): return ops.bitwise_and(self, other)
    def __rand__(self, other): return ops.bitwise_and(other, self)
    def __or__(self, other): return ops.bitwise_or(self, other)
    def __ror__(self, other): return ops.bitwise_or(other, self)
    def __xor__(self, other): return ops.bitwise_xor(self, other)
    def __rxor__(self, other): return ops.bitwise_xor(other, self)
    def __invert__(self): return ops.bitwise_not(self)
    def logical_not(self): return ops.logical_not(self)
    def any(self, dim=None, keepdim=False, **kw): return ops.any(self, dim, keepdim, **kw)
    def all(self, dim=None, keepdim=False, **kw): return ops.all(self, dim, keepdim, **kw)
    def reshape(self, *shape): return ops.reshape(self, _shape_arg(shape))
    view = reshape
    def flatten(self, start_dim=0, end_dim=-1): return ops.flatten(self, start_dim, end_dim)
    def transpose(self, dim0=-2, dim1=-1): return ops.transpose(self, dim0, dim1)
    def t(self): return ops.t(self)
    def permute(self, *dims): return ops.permute(self, _shape_arg(dims))
    def expand(self, *shape): return ops.broadcast_to(self, _shape_arg(shape))
    def broadcast_to(self, shape): return ops.broadcast_to(self, tuple(shape))
    def unsqueeze(self, dim): return ops.unsqueeze(self, dim)
    def squeeze(self, dim=None): return ops.squeeze(self, dim)
    def softmax(self, dim=None, **kw): return ops.softmax(self, dim, **kw)
    def log_softmax(self, dim=None, **kw): return ops.log_softmax(self, dim, **kw)
    def clone(self): return ops.clone(self)

    # ---- PyTorch's further methods: engine/indexing.py and engine/shaping.py ------------------------
    def tril(self, diagonal=0): return indexing.tril(self, diagonal)
    def triu(self, diagonal=0): return indexing.triu(self, diagonal)
    def tril_(self, diagonal=0): return self._inplace_via("tril_", None, lambda old: indexing.tril(old, diagonal))
    def triu_(self, diagonal=0): return self._inplace_via("triu_", None, lambda old: indexing.triu(old, diagonal))
    def masked_fill(self, mask, value): return indexing.masked_fill(self, mask, value)
    def masked_select(self, mask): return indexing.masked_select(self, mask)
    def gather(self, dim, index, *, sparse_grad=False): return indexing.gather(self, dim, index)
    def index_select(self, dim, index): return indexing.index_select(self, dim, index)
    def index_fill(self, dim, index, value): return indexing.index_fill(self, dim, index, value)
    def index_copy(self, dim, index, source): return indexing.index_copy(self, dim, index, source)
    def scatter_add(self, dim, index, src): return indexing.scatter_add(self, dim, index, src)

    def scatter(self, dim, index, src=None, *, value=None, reduce=None):
        return indexing.scatter(self, dim, index, src, value=value, reduce=reduce)

    def masked_fill_(self, mask, value) -> "Tensor":
        """In-place :func:`engine.indexing.masked_fill`; the mask must broadcast to this tensor's shape."""
        if isinstance(mask, Tensor) and np.broadcast_shapes(mask.shape, self.shape) != self.shape:
            raise EngineError(f"masked_fill_: mask {describe(mask)} does not broadcast to {describe(self)}")
        return self._inplace_via("masked_fill_", value, lambda old: indexing.masked_fill(old, mask, value))

    def index_fill_(self, dim, index, value) -> "Tensor":
        return self._inplace_via("index_fill_", value, lambda old: indexing.index_fill(old, dim, index, value))

    def index_copy_(self, dim, index, source) -> "Tensor":
        """In-place :func:`engine.indexing.index_copy`: ``source``'s slices written at ``index`` along
        ``dim`` of this memory, and nothing else touched (no copy of the whole tensor). With the
        index in a device tensor the write position needs no host read: a static KV cache's update
        inside a CUDA graph."""
        dim, idx, shape = indexing.index_copy_operands("index_copy_", self, dim, index, source)
        notify_watcher((index,), "index_copy_")  # a capture notes the index as a tensor it reads

        def write(value):
            indexing._as_1d(self._data)[(slice(None),) * dim + (idx,)] = value.reshape(shape)
        return self._inplace("index_copy_", source, write, lambda old: indexing.index_copy(old, dim, index, source))

    def scatter_(self, dim, index, src=None, *, value=None, reduce=None) -> "Tensor":
        operand = src if src is not None else value
        return self._inplace_via("scatter_", operand,
                                 lambda old: indexing.scatter(old, dim, index, src, value=value, reduce=reduce))

    def scatter_add_(self, dim, index, src) -> "Tensor":
        return self._inplace_via("scatter_add_", src, lambda old: indexing.scatter_add(old, dim, index, src))

    def topk(self, k, dim=-1, largest=True, sorted=True): return indexing.topk(self, k, dim, largest, sorted)
    def sort(self, dim=-1, descending=False, stable=False): return indexing.sort(self, dim, descending, stable)
    def argsort(self, dim=-1, descending=False, stable=False): return indexing.argsort(self, dim, descending, stable)
    def nonzero(self, *, as_tuple=False): return indexing.nonzero(self, as_tuple=as_tuple)
    def argwhere(self): return indexing.argwhere(self)
    def count_nonzero(self, dim=None): return indexing.count_nonzero(self, dim)

    def isclose(self, other, rtol=1e-05, atol=1e-08, equal_nan=False):
        return indexing.isclose(self, other, rtol, atol, equal_nan)

    def allclose(self, other, rtol=1e-05, atol=1e-08, equal_nan=False):
        return indexing.allclose(self, other, rtol, atol, equal_nan)

    def equal(self, other): return indexing.equal(self, other)

    def multinomial(self, num_samples, replacement=False, *, generator=None):
        return indexing.multinomial(self, num_samples, replacement, generator=generator)

    def split(self, split_size, dim=0): return shaping.split(self, split_size, dim)
    def chunk(self, chunks, dim=0): return shaping.chunk(self, chunks, dim)
    def unbind(self, dim=0): return shaping.unbind(self, dim)
    def narrow(self, dim, start, length): return shaping.narrow(self, dim, start, length)
    def flip(self, *dims): return shaping.flip(self, *dims)
    def fliplr(self): return shaping.fliplr(self)
    def flipud(self): return shaping.flipud(self)
    def roll(self, shifts, dims=None): return shaping.roll(self, shifts, dims)
    def repeat(self, *sizes): return shaping.repeat(self, *sizes)
    def tile(self, *dims): return shaping.tile(self, _shape_arg(dims))
    def movedim(self, source, destination): return shaping.movedim(self, source, destination)
    moveaxis = movedim
    def swapaxes(self, axis0, axis1): return ops.transpose(self, axis0, axis1)
    swapdims = swapaxes
    def cumsum(self, dim, *, dtype=None): return shaping.cumsum(self, dim, dtype=dtype)
    def bmm(self, mat2): return shaping.bmm(self, mat2)
    def contiguous(self, memory_format=None): return shaping.contiguous(self)
    def is_contiguous(self, memory_format=None) -> bool: return self._data.flags.c_contiguous

    def repeat_interleave(self, repeats, dim=None, *, output_size=None):
        return shaping.repeat_interleave(self, repeats, dim, output_size=output_size)

    def view_as(self, other): return ops.reshape(self, other.shape)
    reshape_as = view_as
    def expand_as(self, other): return ops.broadcast_to(self, other.shape)
    def type_as(self, other): return self.to(other.dtype)
    def nelement(self) -> int: return self.numel()
    def eq(self, other): return ops.eq(self, other)
    def ne(self, other): return ops.ne(self, other)
    def lt(self, other): return ops.lt(self, other)
    def le(self, other): return ops.le(self, other)
    def gt(self, other): return ops.gt(self, other)
    def ge(self, other): return ops.ge(self, other)
    greater, greater_equal, less, less_equal, not_equal = gt, ge, lt, le, ne

    def new_zeros(self, *size, dtype=None, device=None, requires_grad=False):
        return zeros(*size, dtype=dtype or self.dtype, device=device or self.device, requires_grad=requires_grad)

    def new_ones(self, *size, dtype=None, device=None, requires_grad=False):
        return ones(*size, dtype=dtype or self.dtype, device=device or self.device, requires_grad=requires_grad)

    def new_empty(self, *size, dtype=None, device=None, requires_grad=False):
        return empty(*size, dtype=dtype or self.dtype, device=device or self.device, requires_grad=requires_grad)

    def new_full(self, size, fill_value, *, dtype=None, device=None, requires_grad=False):
        return full(size, fill_value, dtype=dtype or self.dtype, device=device or self.device,
                    requires_grad=requires_grad)

    def new_tensor(self, data, *, dtype=None, device=None, requires_grad=False):
        return tensor(data, dtype=dtype or self.dtype, device=device or self.device, requires_grad=requires_grad)

    def pin_memory(self) -> "Tensor":
        """This tensor (host memory is not pinned on the CPU; PyTorch copies into pinned memory)."""
        return self

    def _inplace_via(self, op: str, operand, out_of_place) -> "Tensor":
        """An in-place op as its out-of-place form written back into this memory, recorded in the
        graph as the in-place ops are (see the in-place section above)."""
        def write(_):
            result = out_of_place(Tensor._from_op(self._data, None))
            self._data[...] = result._data
        return self._inplace(op, operand, write, out_of_place)


def _rebuild(cls, data, requires_grad: bool, attributes=None) -> Tensor:
    """A leaf of type ``cls`` over ``data`` (what unpickling, copy.copy and deepcopy make)."""
    t = cls.__new__(cls)
    t._data, t._grad, t.grad_fn, t._retains_grad = data, None, None, False
    t._version, t._base, t.requires_grad = Version(), None, bool(requires_grad)
    t._post_grad_hooks = t._grad_home = None
    if attributes:
        t.__dict__.update(attributes)
    return t


def _shape_arg(args) -> tuple:
    """Accept both ``t.reshape(2, 3)`` and ``t.reshape((2, 3))``."""
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)


def _is_size(obj) -> bool:
    return isinstance(obj, (int, np.integer)) and not isinstance(obj, (bool, np.bool_))


def _legacy_empty(sizes, dtype, device):
    shape = _shape_arg(sizes)
    if not all(_is_size(n) and n >= 0 for n in shape):
        raise TypeError(f"Tensor(*sizes): sizes must be non-negative ints, got {sizes}; to build a tensor from "
                        "data pass one list or array (engine.tensor(data))")
    dev = backend.check_available(backend.device(device))
    with backend.on_device(dev):
        return backend.xp_for(dev).empty(shape, dtype=dtype or float32)


_TYPE_NAMES = {np.dtype(np.float32): "FloatTensor", np.dtype(np.float64): "DoubleTensor",
               np.dtype(np.float16): "HalfTensor", np.dtype(np.int64): "LongTensor", np.dtype(np.int32): "IntTensor",
               np.dtype(np.int16): "ShortTensor", np.dtype(np.int8): "CharTensor", np.dtype(np.uint8): "ByteTensor",
               np.dtype(np.bool_): "BoolTensor", np.dtype(bfloat16): "BFloat16Tensor"}


class _LegacyTensorType(type):
    """PyTorch's legacy tensor types (``engine.LongTensor`` ...): calling one builds a tensor of its
    dtype from data (``LongTensor([1, 2])``) or an uninitialised one of a shape (``FloatTensor(2, 3)``,
    ``LongTensor()`` is empty); ``isinstance(t, engine.LongTensor)`` checks the dtype and device type."""

    def __instancecheck__(cls, obj) -> bool:
        return isinstance(obj, Tensor) and obj.dtype == cls.dtype and obj.device.type == cls.device_type

    def __call__(cls, *args, device=None):
        device = device or cls.device_type
        if not args or all(_is_size(a) for a in args):
            return Tensor(_legacy_empty(args or (0,), cls.dtype, device))
        if len(args) > 1:
            raise TypeError(f"{cls.__name__}: pass one sequence of data or int sizes, got {args}")
        return tensor(args[0], dtype=cls.dtype, device=device)


def legacy_tensor_types(device_type: str) -> dict:
    """``{"FloatTensor": <type>, ...}`` for ``device_type`` ("cpu": engine.*, "cuda": engine.cuda.*)."""
    return {name: _LegacyTensorType(name, (), {"dtype": dtype, "device_type": device_type,
                                                "__module__": "engine" if device_type == "cpu" else "engine.cuda"})
            for dtype, name in _TYPE_NAMES.items()}


def _unit_uniform(gen, dev, shape, dtype):
    return gen.random(shape, dtype=dtype) if dev.type == "cpu" else gen.random_sample(shape, dtype=dtype)


def _standard_normal(gen, dev, shape, dtype):
    return gen.standard_normal(shape, dtype=dtype)


def _is_dtype(obj) -> bool:
    if isinstance(obj, str):
        return obj not in ("cpu", "cuda") and not obj.startswith("cuda:")
    return isinstance(obj, (type, np.dtype))


def unwrap(x, where: str):
    """The raw numpy/cupy array behind ``x``: a Tensor's data, an array as it is, other array-like
    data as numpy (dtype and device kept, unlike :func:`as_array`); ``where`` names the caller in errors."""
    if isinstance(x, Tensor):
        return x._data
    if backend.is_array(x):
        return x
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise EngineError(f"{where}: expected a numpy/cupy array or Tensor, got {type(x).__name__}") from exc


def as_array(data, dtype=None, device=None):
    """``data`` as a numpy/cupy array on ``device``; Python floats and lists become float32."""
    if isinstance(data, Tensor):
        data = data._data
    if not backend.is_array(data):
        foreign = dlpack.foreign_array(data)  # a torch / JAX tensor: its memory, through DLPack
        data = data if foreign is None else foreign
    if backend.is_array(data):
        arr = data
    else:
        arr = np.asarray(data)
        if dtype is None and arr.dtype == np.float64:
            arr = arr.astype(np.float32)  # the engine's default float dtype, as in PyTorch
    if dtype is not None and arr.dtype != np.dtype(dtype):
        arr = arr.astype(dtype)
    if device is not None:
        arr = backend.to_device(arr, backend.check_available(backend.device(device)))
    elif not backend.is_array(data) and backend.default_device().type == "cuda":
        arr = backend.to_device(arr, backend.default_device())
    return arr


# ---- factories (PyTorch names) ----------------------------------------------------------------

def tensor(data, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    """A new tensor holding a copy of ``data`` (a list, number, array, Tensor, or a torch / JAX tensor
    or anything else with ``__dlpack__``)."""
    data = data._data if isinstance(data, Tensor) else data
    foreign = dlpack.foreign_array(data)
    data = data if foreign is None else foreign
    arr = as_array(data, dtype, device)
    if arr is data:
        arr = arr.copy()
    return Tensor(arr, requires_grad=requires_grad)


def as_tensor(data, dtype=None, device=None) -> Tensor:
    """``data`` as a tensor, sharing its memory where it can, as ``torch.as_tensor``.

    A Tensor of the asked dtype and device is returned as it is; another dtype or device gives a
    converted tensor (recorded by autograd, like ``t.to(...)``). A numpy array, a cupy array or a
    torch / JAX tensor (through DLPack) on the asked device and of the asked dtype is shared, not
    copied; lists and numbers are copied (Python floats become float32).
    """
    if isinstance(data, Tensor):
        return data.to(backend.device(device) if device is not None else None, dtype=dtype)
    return Tensor(as_array(data, dtype, device))


def _device_for(device, dtype):
    """The available device ``device`` names, refusing a dtype it cannot hold (bfloat16 on CuPy < 14)."""
    dev = backend.check_available(backend.device(device))
    if dev.type == "cuda" and dtype is not None:
        backend.check_cuda_dtype(np.dtype(dtype), backend.xp_for(dev))
    return dev


def _new(fill, shape, dtype, device, requires_grad, **kw) -> Tensor:
    dev = _device_for(device, dtype)
    xp = backend.xp_for(dev)
    with backend.on_device(dev):
        arr = getattr(xp, fill)(_shape_arg(shape), dtype=dtype or float32, **kw)
    return Tensor(arr, requires_grad=requires_grad)


def zeros(*shape, dtype=None, device=None, requires_grad=False) -> Tensor:
    return _new("zeros", shape, dtype, device, requires_grad)


def ones(*shape, dtype=None, device=None, requires_grad=False) -> Tensor:
    return _new("ones", shape, dtype, device, requires_grad)


def empty(*shape, dtype=None, device=None, requires_grad=False) -> Tensor:
    return _new("empty", shape, dtype, device, requires_grad)


def full(shape, fill_value, dtype=None, device=None, requires_grad=False) -> Tensor:
    """A tensor of ``shape`` filled with ``fill_value``, PyTorch's ``torch.full``.

    Without ``dtype`` the value's kind decides, as in PyTorch: bool -> bool, int -> int64, float ->
    float32, complex -> complex64. A value the dtype cannot hold is refused instead of wrapping
    (nan, inf or an out-of-range number into an integer dtype, a finite float that overflows to
    inf); a float into an integer dtype is truncated toward zero, as PyTorch does.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if isinstance(fill_value, Tensor):
        fill_value = fill_value.item()
    dtype = np.dtype(dtype) if dtype is not None else dtypes.scalar_dtype(fill_value)
    _check_fill("full", fill_value, dtype)
    return _new("full", (shape,), dtype, device, requires_grad, fill_value=fill_value)


def _check_fill(op: str, value, dtype: np.dtype) -> None:
    """Refuse a fill value that ``dtype`` cannot hold (numpy would wrap it, or write INT64_MIN for nan)."""
    if dtype.kind in "iu" and not isinstance(value, (bool, np.bool_)):
        if isinstance(value, (complex, np.complexfloating)):
            raise DTypeError(f"{op}: fill_value={value!r} is complex; an integer dtype {dtype} cannot hold it")
        info = np.iinfo(dtype)
        finite = isinstance(value, (int, np.integer)) or math.isfinite(value)
        if not finite or not info.min <= int(value) <= info.max:
            raise DTypeError(f"{op}: fill_value={value!r} cannot be converted to {dtype} (whole numbers in "
                             f"[{info.min}, {info.max}]) without overflow")
    elif dtypes.is_floating(dtype) and dtypes.overflows(value, dtype):
        raise DTypeError(f"{op}: fill_value={value!r} overflows {dtype} (largest {dtypes.finfo(dtype).max})")


def zeros_like(t: Tensor, dtype=None, requires_grad=False) -> Tensor:
    return zeros(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def ones_like(t: Tensor, dtype=None, requires_grad=False) -> Tensor:
    return ones(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


class RemovableHandle:
    """What registering a hook returns: ``remove()`` unregisters it (once; later calls do nothing)."""

    def __init__(self, hooks: list, hook):
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        if self._hook is not None and self._hook in self._hooks:
            self._hooks.remove(self._hook)
        self._hook = None


def full_like(t: Tensor, fill_value, dtype=None, requires_grad=False) -> Tensor:
    return full(t.shape, fill_value, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def rand_like(t: Tensor, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Uniform [0, 1) samples of ``t``'s shape (dtype and device default to ``t``'s)."""
    return _random_like("rand_like", rand, t, dtype, device, requires_grad)


def randn_like(t: Tensor, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Standard normal samples of ``t``'s shape (dtype and device default to ``t``'s)."""
    return _random_like("randn_like", randn, t, dtype, device, requires_grad)


def _random_like(op: str, draw, t: Tensor, dtype, device, requires_grad) -> Tensor:
    dtype = np.dtype(dtype or t.dtype)
    if not is_floating(dtype):
        raise DTypeError(f"{op}: random samples need a floating dtype, got {dtype} from {describe(t)}; pass "
                         "dtype=engine.float (PyTorch refuses integer dtypes too)")
    return draw(t.shape, dtype=dtype, device=device or t.device, requires_grad=requires_grad)


def eye(n: int, m: int | None = None, dtype=None, device=None, requires_grad=False) -> Tensor:
    dev = _device_for(device, dtype)
    with backend.on_device(dev):
        arr = backend.xp_for(dev).eye(n, m, dtype=dtype or float32)
    return Tensor(arr, requires_grad=requires_grad)


def arange(start, end=None, step=1, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Like ``torch.arange``: int64 for integer arguments, float32 otherwise."""
    if end is None:
        start, end = 0, start
    if dtype is None:
        dtype = int64 if all(isinstance(v, (int, np.integer)) for v in (start, end, step)) else float32
    dev = _device_for(device, dtype)
    with backend.on_device(dev):
        arr = backend.xp_for(dev).arange(start, end, step, dtype=dtype)
    return Tensor(arr, requires_grad=requires_grad)


def randn(*shape, size=None, generator=None, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Standard normal samples from the engine's seeded generator (see ``engine.manual_seed``) or
    ``generator``; the shape as ``randn(2, 3)``, ``randn((2, 3))`` or ``randn(size=(2, 3))``."""
    shape = _size_arg("randn", shape, size)
    dev = _device_for(device, dtype)
    with backend.on_device(dev):
        arr = backend.rng_for(generator, dev).standard_normal(shape).astype(dtype or float32)
    return Tensor(arr, requires_grad=requires_grad)


def rand(*shape, size=None, generator=None, dtype=None, device=None, requires_grad=False) -> Tensor:
    """Uniform samples in [0, 1) from the engine's seeded generator (or ``generator``)."""
    shape = _size_arg("rand", shape, size)
    dev = _device_for(device, dtype)
    gen = backend.rng_for(generator, dev)
    with backend.on_device(dev):
        sample = gen.random(shape) if dev.type == "cpu" else gen.random_sample(shape)
        arr = _below(sample.astype(dtype or float32))
    return Tensor(arr, requires_grad=requires_grad)


def _size_arg(op: str, shape: tuple, size) -> tuple:
    """The shape given positionally (``2, 3`` or ``(2, 3)``) or as ``size=``, not both (as PyTorch)."""
    if size is not None:
        if shape:
            raise TypeError(f"{op}: give the shape positionally or as size=, not both (got {shape} and size={size})")
        shape = (size,)
    shape = _shape_arg(shape)
    if not all(_is_size(n) and n >= 0 for n in shape):
        raise TypeError(f"{op}: the size must be non-negative ints, got {shape}")
    return tuple(int(n) for n in shape)


def _below(arr, bound: float = 1.0):
    """Uniform samples kept in [low, bound): rounding a sample to a narrow dtype can give ``bound``
    (for bfloat16 in [0, 1), about one sample in 500), which PyTorch's rand and uniform_ never return."""
    xp = backend.array_module(arr)
    return xp.minimum(arr, xp.asarray(dtypes.largest_below(bound, arr.dtype), dtype=arr.dtype))


def randint(*args, size=None, low=None, high=None, generator=None, dtype=None, device=None,
            requires_grad=False) -> Tensor:
    """Integers drawn uniformly from [low, high), as ``torch.randint``: ``randint(high, size)``,
    ``randint(low, high, size)``, with ``size=``/``low=``/``high=`` as keywords too; int64 unless
    ``dtype`` says otherwise. ``size`` is a tuple (a bare int is refused, as PyTorch does)."""
    args = list(args)
    if size is None:
        if not args:
            raise TypeError("randint: missing the size argument (a tuple such as (4,))")
        size = args.pop()
    bounds = [v for v in (low, high) if v is not None]
    if len(args) + len(bounds) not in (1, 2) or (low is not None and high is None):
        raise TypeError("randint: pass randint(high, size), randint(low, high, size) or the keywords low=, high=, "
                        f"size=; got positional {tuple(args)} with low={low!r}, high={high!r}")
    values = args + bounds
    low, high = (0, values[0]) if len(values) == 1 else values
    if not isinstance(size, (tuple, list)) or not all(_is_size(n) and n >= 0 for n in size):
        raise TypeError(f"randint: size must be a tuple of non-negative ints, got {size!r}")
    low, high = int(low), int(high)
    if high <= low:
        raise ValueError(f"randint: the range [low, high) = [{low}, {high}) is empty; high must exceed low")
    dtype = np.dtype(dtype or int64)
    if requires_grad and not is_floating(dtype):
        raise DTypeError(f"randint: only floating-point tensors can require grad, got dtype {dtype}")
    dev = backend.check_available(backend.device(device))
    gen = backend.rng_for(generator, dev)
    with backend.on_device(dev):
        arr = gen.integers(low, high, tuple(size)) if dev.type == "cpu" else gen.randint(low, high, tuple(size))
    return Tensor(arr.astype(dtype), requires_grad=requires_grad)


def linspace(start, end, steps: int, dtype=None, device=None, requires_grad=False) -> Tensor:
    """``steps`` evenly spaced values from ``start`` to ``end`` inclusive (float32 by default)."""
    dev = _device_for(device, dtype)
    with backend.on_device(dev):
        arr = backend.xp_for(dev).linspace(start, end, int(steps), dtype=float64).astype(dtype or float32)
    return Tensor(arr, requires_grad=requires_grad)


def normal(mean=0.0, std=1.0, size=None, *, generator=None, dtype=None, device=None,
           requires_grad=False) -> Tensor:
    """Samples of N(mean, std^2) from the engine's seeded generator, as ``torch.normal``: ``mean`` and
    ``std`` are numbers (then ``size`` is required) or tensors (broadcast together; the result has
    their shape and, for tensors, their dtype and device)."""
    like = mean if isinstance(mean, Tensor) else std if isinstance(std, Tensor) else None
    if like is None:
        if size is None:
            raise TypeError("normal: with number mean and std, pass size=(...)")
        shape, dev = _shape_arg(size if isinstance(size, (tuple, list)) else (size,)), device
        dtype = dtype or float32
    else:
        m, s = (unwrap(v, "normal") for v in (mean, std))
        shape = tuple(np.broadcast_shapes(np.shape(m), np.shape(s)))
        dev, dtype = like.device, dtype or like.dtype
    dev = backend.check_available(backend.device(dev))
    sample_dtype = float64 if np.dtype(dtype) == float64 else float32
    with backend.on_device(dev):
        unit = backend.rng_for(generator, dev).standard_normal(shape, dtype=sample_dtype)
    mean_v = mean._data if isinstance(mean, Tensor) else mean
    std_v = std._data if isinstance(std, Tensor) else std
    return Tensor((mean_v + std_v * unit).astype(dtype), requires_grad=requires_grad)


def randperm(n: int, *, generator=None, dtype=int64, device=None, requires_grad=False) -> Tensor:
    """A random permutation of 0 .. n-1 from the engine's seeded generator (or ``generator``)."""
    dev = backend.check_available(backend.device(device))
    gen = backend.rng_for(generator, dev)
    with backend.on_device(dev):
        arr = gen.permutation(int(n))
    return Tensor(arr.astype(dtype, copy=False))


def from_dlpack(ext_tensor, *, device=None, copy=None) -> Tensor:
    """A tensor sharing the memory of ``ext_tensor``, as ``torch.from_dlpack``.

    Args:
        ext_tensor: an object with ``__dlpack__`` and ``__dlpack_device__`` (a torch tensor, a numpy
            or cupy array, a JAX array, another engine Tensor) or a DLPack capsule (consumed).
            bfloat16 comes in as ``engine.bfloat16``.
        device: where the result lives; None (the producer's device, no copy) or a device
            (copied there when it is another one).
        copy: None (copy only when ``device`` asks for it), True (always a copy), False (never;
            a device change then raises).

    On CUDA the producer is handed cupy's current stream, so its queued writes are visible to
    the engine's next kernels (DLPack's stream semantics). A torch tensor that requires grad must
    be detached first, as in PyTorch.

    Example:
        >>> t = engine.from_dlpack(torch.arange(4.0))   # doctest: +SKIP
    """
    array = dlpack.array_from_dlpack(ext_tensor)
    target = backend.device_of(array) if device is None else backend.check_available(backend.device(device))
    moves = target != backend.device_of(array)
    if moves and copy is False:
        raise DeviceError(f"from_dlpack: copy=False but the data is on {backend.device_of(array)} and device={target} "
                          "asks for a copy")
    if moves:
        array = backend.to_device(array, target)
    elif copy:
        array = array.copy()
    return Tensor(array)


def from_numpy(array: np.ndarray) -> Tensor:
    """A CPU tensor sharing ``array``'s memory (writes to one show in the other), as ``torch.from_numpy``."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"from_numpy: expected a numpy.ndarray, got {type(array).__name__}")
    return Tensor(array)


int8, int16, uint8 = np.int8, np.int16, np.uint8


from engine import ops  # noqa: E402  (ops imports Tensor from this module)
from engine import indexing, shaping  # noqa: E402  (both import Tensor from this module)
