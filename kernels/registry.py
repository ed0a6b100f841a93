"""One name per fused kernel, several implementations, one dispatcher.

An implementation is registered as a ``"module:function"`` string so that listing and
choosing impls never imports numba or cupy; the module is imported on first call.

Choosing an impl for a call, first match wins:

1. ``impl=`` passed to the call;
2. the environment variable ``ENGINE_KERNEL_IMPL``: either one impl name for every kernel that
   has it (``numpy``) or a comma list of ``kernel=impl`` pairs (``adam_step=numpy,linear_relu_forward=cupy``).
   A name no kernel has, an unknown kernel, an impl the named kernel lacks, a malformed entry or a
   kernel listed twice is a KernelError at the first kernel call, naming the entry and the known
   names (a typo never silently falls back to the default);
3. the kernel's preference order among impls whose array kind matches the inputs, that take the
   inputs' dtype, and whose dependencies are importable.

Every impl declares the float dtypes it takes (``dtypes=`` in kernels/declarations.py; list them
with :func:`impl_dtypes`). The dtype of a call is the dtype of its first array argument (x,
logits, grad_out, param). An impl forced by ``impl=`` or the environment that does not take that
float dtype is a KernelError naming the kernel, the impl, the dtype given and the dtypes that impl
takes; an unforced call skips such impls and takes the next one in preference order (bfloat16
cupy arrays go to ``cupy``, as numba has no bfloat16). A dtype that is no float at all is left
to the chosen impl's validator, which names the argument that has it.

Example:
    >>> import numpy as np, kernels
    >>> kernels.impls("adam_step")            # doctest: +SKIP
    ['numba_cpu', 'numpy', 'cupy', 'numba_cuda']
    >>> p = np.ones(3, np.float32)
    >>> kernels.call("sgd_step", p, p.copy(), None, lr=0.1, impl="numpy")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .precision import FLOAT_NAMES, float_name

ENV_VAR = "ENGINE_KERNEL_IMPL"
DEFAULT_DTYPES = ("float32", "float64")  # what an impl takes unless it declares more


class KernelError(ValueError):
    """Bad input to a kernel, or no usable implementation for it."""


@dataclass(frozen=True)
class Impl:
    kernel: str
    name: str
    target: str  # "module:function"
    array_kind: str  # "numpy" or "cupy": the arrays this impl takes
    requires: tuple[str, ...]  # importable modules it needs
    dtypes: tuple[str, ...] = DEFAULT_DTYPES  # float dtype names it takes ("float32", "bfloat16" ...)

    def takes(self, dtype) -> bool:
        """Whether this impl takes arrays of ``dtype``: a float dtype must be among its ``dtypes``.

        Any other dtype (integers, bool; None for a call without arrays) is not the registry's to
        refuse: no impl computes it, and the impl's validator names the argument that has it.
        """
        name = None if dtype is None else float_name(dtype)
        return name is None or name in self.dtypes

    def available(self) -> bool:
        return all(_importable(mod) for mod in self.requires) and _device_ready(self)

    @functools.cached_property
    def fn(self) -> Callable:
        if self.name == "numba_cpu":
            configure_numba_threads()
            from .compile_notice import announce_compiles
            from .threads import ensure_default

            announce_compiles()  # a first run compiles: say so once (compile_notice.py)
            ensure_default()  # the engine's thread count for numba and the BLAS (kernels/threads.py)
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


# kernel name -> impl name -> Impl, in preference order (dicts keep insertion order).
_REGISTRY: dict[str, dict[str, Impl]] = {}
# (kernel, array kind, dtype) -> the impl an unforced call picks. Choosing runs on every kernel
# call, and an availability check imports and probes; what it finds does not change in a process.
_DEFAULT_CHOICE: dict[tuple, Impl] = {}


def register(kernel: str, name: str, target: str, *, array_kind: str, requires: tuple[str, ...] = (),
             dtypes: tuple[str, ...] = DEFAULT_DTYPES) -> None:
    """Declare one implementation of ``kernel``. Registration order is preference order.

    ``dtypes`` names the float dtypes the impl takes, among ``float32``, ``float64``, ``float16``
    and ``bfloat16``.
    """
    if array_kind not in ("numpy", "cupy"):
        raise ValueError(f"array_kind must be 'numpy' or 'cupy', got {array_kind!r}")
    unknown = [d for d in dtypes if d not in FLOAT_NAMES]
    if unknown or not dtypes:
        raise ValueError(f"dtypes must be a non-empty tuple of {FLOAT_NAMES}, got {dtypes!r}")
    _REGISTRY.setdefault(kernel, {})[name] = Impl(kernel, name, target, array_kind, tuple(requires), tuple(dtypes))
    _DEFAULT_CHOICE.clear()
    _parse_env.cache_clear()


def kernels() -> list[str]:
    """Names of every registered kernel."""
    _load_declarations()  # on a fresh import nothing has asked for a kernel yet
    return list(_REGISTRY)


def impls(kernel: str, *, available_only: bool = True) -> list[str]:
    """Impl names of ``kernel`` in preference order (only those usable here, by default)."""
    table = _table(kernel)
    return [name for name, impl in table.items() if not available_only or impl.available()]


def impl_dtypes(kernel: str) -> dict[str, tuple[str, ...]]:
    """The float dtypes each impl of ``kernel`` takes, impls in preference order (all registered ones).

    Example:
        >>> kernels.impl_dtypes("linear_relu_forward")["numba_cuda"]        # doctest: +SKIP
        ('float32', 'float64', 'float16')
    """
    return {name: impl.dtypes for name, impl in _table(kernel).items()}


def check_dtype(kernel: str, impl: str, dtype) -> None:
    """Raise the registry's KernelError if impl ``impl`` of ``kernel`` does not take ``dtype``.

    The registry asks this of every forced impl; an impl's function asks it too, so that a call
    through :func:`get` (which bypasses the registry) is refused with the same words.
    """
    chosen = _table(kernel)[impl]
    if not chosen.takes(dtype):
        raise KernelError(_dtype_refusal(chosen, dtype))


def _dtype_refusal(chosen: Impl, dtype, arrays=()) -> str:
    given = str(dtype)
    others = [i.name for i in _REGISTRY[chosen.kernel].values() if i.takes(dtype)]
    what = (f"kernel {chosen.kernel!r}: impl {chosen.name!r} does not take {given} arrays; it takes "
            f"{', '.join(chosen.dtypes)}")
    if not others:
        advice = f"No impl of {chosen.kernel!r} takes {given}: cast the inputs to one of those dtypes"
    else:
        advice = (f"Impls of {chosen.kernel!r} that take {given}: {others}; force one of them, or leave impl unset "
                  f"(and {ENV_VAR} unset for this kernel) so that the registry picks one, or cast the inputs")
    return f"{what}. {advice}{_inputs(arrays)}"


def _inputs(arrays) -> str:
    """`` (inputs: numpy.ndarray(2, 3) int32, ...)`` for an error message, or '' without arrays."""
    described = ", ".join(describe_array("", a)[1:] for a in arrays if a is not None)
    return f" (inputs: {described})" if described else ""


def get(kernel: str, impl: str) -> Callable:
    """The function of one named impl (importing its module)."""
    table = _table(kernel)
    if impl not in table:
        raise KernelError(f"kernel {kernel!r} has no impl {impl!r}; registered: {list(table)}")
    return table[impl].fn


def choose(kernel: str, arrays, impl: str | None = None) -> Impl:
    """The impl a call with these arrays would use (see the module docstring for the order)."""
    dtype = _call_dtype(arrays)
    if impl is None:
        # The hot path, run on every kernel call: an unforced call with arrays of one known kind
        # whose default impl is already chosen. Anything else takes the full path below.
        kind = _common_kind(arrays)
        if kind is not None and _env_choice(kernel) is None:
            chosen = _DEFAULT_CHOICE.get((kernel, kind, dtype))
            if chosen is not None:
                return chosen
    table = _table(kernel)
    kind = array_kind(arrays, kernel)
    forced = impl or _env_choice(kernel)
    if forced is not None:
        if forced not in table:
            raise KernelError(f"kernel {kernel!r} has no impl {forced!r}; registered: {list(table)}")
        chosen = table[forced]
        if not _accepts(chosen, kind):
            raise KernelError(
                f"kernel {kernel!r}: impl {forced!r} takes {chosen.array_kind} arrays but was given "
                f"{kind} arrays; move the inputs to the matching device or choose another impl")
        if not chosen.takes(dtype):
            raise KernelError(_dtype_refusal(chosen, dtype, arrays))
        if not chosen.available():
            raise KernelError(f"kernel {kernel!r}: impl {forced!r} is not usable here "
                              f"(needs {', '.join(chosen.requires) or 'nothing'} and a device)")
        return chosen
    chosen = _DEFAULT_CHOICE.get((kernel, kind, dtype))
    if chosen is not None:
        return chosen
    usable = [c for c in table.values() if c.array_kind == kind and c.available()]
    for candidate in usable:
        if candidate.takes(dtype):
            _DEFAULT_CHOICE[(kernel, kind, dtype)] = candidate
            return candidate
    if usable:
        offers = "; ".join(f"{c.name} takes {', '.join(c.dtypes)}" for c in usable)
        raise KernelError(f"kernel {kernel!r}: no usable impl for {kind} arrays takes {dtype}: {offers}. "
                          f"Cast the inputs to one of those dtypes{_inputs(arrays)}")
    raise KernelError(f"kernel {kernel!r}: no usable impl for {kind} arrays; registered: {list(table)}")


def _call_dtype(arrays):
    """The dtype of a call: its first array's (None when it has none)."""
    for a in arrays:
        if a is not None:
            return getattr(a, "dtype", None)
    return None


def call(kernel: str, *args, impl: str | None = None, **kwargs):
    """Run ``kernel`` on ``args`` with the impl :func:`choose` picks."""
    if impl is None:
        chosen = _numpy_default(kernel, args)
        if chosen is not None:
            return chosen.fn(*args, **kwargs)
    arrays = [a for a in args if _is_array_type(type(a))]
    return choose(kernel, arrays, impl).fn(*args, **kwargs)


def _numpy_default(kernel: str, args) -> Impl | None:
    """:func:`choose`'s answer for the CPU's common call, or None (then choose runs): every array
    argument a numpy array, ``ENGINE_KERNEL_IMPL`` unset, the default impl already chosen. The
    same answer as choose's own hot path, without building the list of arrays first."""
    dtype = None
    for a in args:
        cls = type(a)
        if cls is _NDARRAY:
            if dtype is None:
                dtype = a.dtype
        elif a is not None and cls is not float and cls is not int and _is_array_type(cls):
            return None
    if dtype is None or _env_value():
        return None
    return _DEFAULT_CHOICE.get((kernel, "numpy", dtype))


@functools.cache
def _is_array_type(cls: type) -> bool:
    return hasattr(cls, "__array_interface__") or hasattr(cls, "__cuda_array_interface__")


def array_kind(arrays, kernel: str = "kernel") -> str:
    """'numpy' or 'cupy' for a set of arrays; mixing the two is an error."""
    kinds = {_kind_of(a) for a in arrays if a is not None}
    if len(kinds) > 1:
        described = ", ".join(f"{type(a).__module__}.{type(a).__name__}{tuple(a.shape)}" for a in arrays if a is not None)
        raise KernelError(f"{kernel}: inputs are on different devices ({described}); "
                          "move them all to the CPU (numpy) or all to the GPU (cupy)")
    return kinds.pop() if kinds else "numpy"


def module_of(a) -> str:
    """The top-level package of an array's type: 'numpy', 'cupy' ..."""
    return _module_of_type(type(a))


@functools.cache
def _module_of_type(cls: type) -> str:
    # Cached per type: every validator asks several times per call, and split builds a list.
    return cls.__module__.split(".")[0]


def describe_array(name: str, a) -> str:
    """``x=numpy.ndarray(4, 5) float32`` (``... float32 on cuda:1`` for cupy) for kernel error messages."""
    if a is None:
        return f"{name}=None"
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
        return f"{name}={type(a).__module__}.{type(a).__name__}"
    module = module_of(a)
    where = f" on cuda:{a.device.id}" if module == "cupy" else ""
    return f"{name}={module}.{type(a).__name__}{tuple(a.shape)} {a.dtype}{where}"


_NDARRAY = np.ndarray


def misplaced_arrays_message(arrays: dict) -> str | None:
    """What is wrong with the arrays handed to a kernel (name -> array, None for an absent
    optional one), or None: each must be a numpy or cupy array, all on one device, cupy ones on one
    GPU. Every kernel's validator asks this first, so the messages are the same across kernels.
    """
    for a in arrays.values():  # the common case, numpy arrays only: nothing can be wrong
        if a is not None and type(a) is not _NDARRAY:
            break
    else:
        return None
    present = {name: a for name, a in arrays.items() if a is not None}
    for name, a in present.items():
        if not (hasattr(a, "shape") and hasattr(a, "dtype") and hasattr(a, "flags")) \
                or module_of(a) not in ("numpy", "cupy"):
            return (f"{name} must be a numpy or cupy array (CPU or GPU), got "
                    f"{type(a).__module__}.{type(a).__name__}")
    if len({module_of(a) for a in present.values()}) > 1:
        return "the arrays are on different devices (numpy = CPU, cupy = GPU); move them all to one device"
    spread = different_gpus(a for a in present.values() if module_of(a) == "cupy")
    if spread:
        return f"the arrays are on different GPUs ({spread}); move them all to one device"
    return None


def indices_in_range(indices, count: int) -> bool:
    """Whether every value of a numpy integer array lies in [0, count): the validators' fast test
    before they look for the first bad index (one reduction instead of three comparisons).

    Signed values are read as unsigned of the same width, so a negative one becomes larger than
    any ``count`` (NumPy 2 compares with a Python int exactly, even beyond the dtype's range).
    """
    if indices.size == 0:
        return True
    signed = _SIGNED.get(indices.dtype)
    if signed is None:  # already unsigned
        return int(indices.max()) < count
    unsigned, largest = signed
    if count > largest:  # a negative one read as unsigned could be below count
        return int(indices.min()) >= 0
    return int(indices.view(unsigned).max()) < count


# signed dtype -> (the unsigned one of its width, its largest value)
_SIGNED = {np.dtype(f"i{n}"): (np.dtype(f"u{n}"), int(np.iinfo(f"i{n}").max)) for n in (1, 2, 4, 8)}


def real_number(op: str, name: str, value, *, finite: bool = True) -> float:
    """A scalar argument as a float, or a KernelError naming the kernel and the argument: not a real
    number, beyond float's range, or (``finite``) inf or NaN."""
    try:
        x = float(value)
    except OverflowError:  # an int beyond float's range
        wanted = "finite" if finite else "a real number in float range"
        raise KernelError(f"{op}: {name} must be {wanted}, got {value!r}") from None
    except (TypeError, ValueError):
        raise KernelError(f"{op}: {name} must be a real number, got {value!r}") from None
    if finite and not math.isfinite(x):
        raise KernelError(f"{op}: {name} must be finite, got {value!r}")
    return x


def different_gpus(arrays) -> str | None:
    """``'cuda:0, cuda:1'`` when the cupy arrays among ``arrays`` live on more than one GPU, else None.

    The validators call it once the arrays are known to be cupy arrays: a kernel runs on one device
    and must not be handed a pointer into another's memory.
    """
    devices = {a.device.id for a in arrays if a is not None}
    if len(devices) < 2:
        return None
    return ", ".join(f"cuda:{d}" for d in sorted(devices))


@functools.cache
def _kind_of_type(cls: type) -> str | None:
    module = _module_of_type(cls)
    return module if module in ("numpy", "cupy") else None


def _common_kind(arrays) -> str | None:
    """'numpy' or 'cupy' when every array (None aside) is of that kind ('numpy' for none), else None."""
    kind = None
    for a in arrays:
        if a is None:
            continue
        this = _kind_of_type(type(a))
        if this is None or (kind is not None and this != kind):
            return None
        kind = this
    return kind or "numpy"


def _kind_of(a) -> str:
    module = _module_of_type(type(a))
    if module == "cupy":
        return "cupy"
    if module == "numpy":
        return "numpy"
    raise KernelError(f"expected a numpy or cupy array, got {type(a).__module__}.{type(a).__name__}")


def _table(kernel: str) -> dict[str, Impl]:
    _load_declarations()
    if kernel not in _REGISTRY:
        raise KernelError(f"unknown kernel {kernel!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kernel]


def _env_choice(kernel: str) -> str | None:
    value = _env_value()
    if not value:
        return None
    return _parse_env(value).get(kernel)


def _env_value() -> str:
    """ENGINE_KERNEL_IMPL, stripped ('' when unset), read on every kernel call.

    os.environ.get encodes the key on every call; reading the mapping's own dict with the key
    encoded once costs a quarter of that and sees every change made through os.environ (setenv,
    monkeypatch). Where the mapping has no such dict, os.environ.get.
    """
    data = getattr(os.environ, "_data", None)
    if type(data) is not dict:
        return os.environ.get(ENV_VAR, "").strip()
    raw = data.get(_ENV_KEY)
    return "" if raw is None else os.environ.decodevalue(raw).strip()


_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else ENV_VAR


@functools.lru_cache(maxsize=8)
def _parse_env(value: str) -> dict[str, str]:
    """ENGINE_KERNEL_IMPL as {kernel: impl}, every name checked against the registry.

    Cached per value (the check runs on every kernel call); register() clears the cache. A bad
    value raises, and exceptions are not cached, so every call raises until it is fixed.
    """
    _load_declarations()
    if "=" not in value and "," not in value:  # one impl name for every kernel that has it
        chosen = {kernel: value for kernel, table in _REGISTRY.items() if value in table}
        if not chosen:
            known = sorted({name for table in _REGISTRY.values() for name in table})
            raise KernelError(f"{ENV_VAR}={value!r}: no kernel has an impl {value!r}; known impls: {known} "
                              "(or give kernel=impl pairs separated by commas)")
        return chosen
    chosen: dict[str, str] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue  # "a=b," or "a=b,,c=d": an empty entry asks for nothing
        kernel, equals, impl = (part.strip() for part in entry.partition("="))
        if not equals or not kernel or not impl:
            raise KernelError(f"{ENV_VAR}={value!r}: the entry {entry!r} is not kernel=impl; a list must be "
                              "kernel=impl pairs only (e.g. adam_step=numpy,softmax_cross_entropy=numba_cpu)")
        if kernel not in _REGISTRY:
            raise KernelError(f"{ENV_VAR}={value!r}: the entry {entry!r} names an unknown kernel {kernel!r}; "
                              f"known kernels: {sorted(_REGISTRY)}")
        if impl not in _REGISTRY[kernel]:
            raise KernelError(f"{ENV_VAR}={value!r}: the entry {entry!r} names an impl that kernel {kernel!r} "
                              f"does not have; its impls: {list(_REGISTRY[kernel])}")
        if chosen.get(kernel, impl) != impl:
            raise KernelError(f"{ENV_VAR}={value!r}: kernel {kernel!r} is given two impls "
                              f"({chosen[kernel]!r} and {impl!r})")
        chosen[kernel] = impl
    return chosen


@functools.cache
def configure_numba_threads() -> None:
    """Use numba's 'workqueue' threading layer unless the user chose one (NUMBA_THREADING_LAYER).

    The OpenMP layer's threads spin-wait after each parallel loop; on a small machine they then
    compete with BLAS's threads in the GEMM that follows (and with anything else running), which
    made small training steps several times slower than with workqueue, whose threads sleep.
    Numba fixes the layer at its first parallel launch: code that runs its own parallel loops
    before any kernel (the benchmarks' copy ceiling) calls this first.

    workqueue is not thread-safe: two Python threads inside parallel regions at once abort the
    process (SIGABRT, "Concurrent access has been detected"). Every call into a ``parallel=True``
    function therefore goes through :func:`numba_parallel`, which serialises them.
    """
    if "NUMBA_THREADING_LAYER" not in os.environ:
        import numba

        numba.config.THREADING_LAYER = "workqueue"


# Held for the whole of every call into a numba parallel=True function, in every Python thread.
NUMBA_PARALLEL_LOCK = threading.Lock()


def numba_parallel(dispatcher: Callable) -> Callable:
    """``dispatcher`` (a ``parallel=True`` njit function) made safe to call from any Python thread.

    The returned function takes :data:`NUMBA_PARALLEL_LOCK` around each call, so that at most one
    parallel region runs at a time in the process: workqueue, the threading layer chosen by
    :func:`configure_numba_threads`, aborts the process when two threads launch parallel regions
    at once (training in a thread pool, a server that fine-tunes per request). One region already
    occupies every core, so serialising them costs little throughput: the lock and the wrapper's
    call are small against any call large enough to run in parallel (docs/benchmarks.md, "Why the
    thresholds are where they are").
    It also sets the calling thread's numba thread count to the engine's (kernels/threads.py):
    numba keeps that count per Python thread, and a new thread would start at numba's pool size.
    Serial njit functions need no lock (they never enter the threading layer); thread-safe layers
    (tbb, omp) need none either, and it is harmless there. The lock is not re-entrant: a parallel
    region never calls back into Python, so it is never taken twice. Parallel numba code outside
    kernels/ that may run beside the kernels in other threads should go through this too.
    """
    lock = NUMBA_PARALLEL_LOCK
    from .threads import reapply_blas_limit, sync_numba_threads

    first = [True]

    def serialised(*args):
        with lock:
            sync_numba_threads()  # numba's count is per Python thread: each region runs the owner's
            result = dispatcher(*args)
            if first[0]:  # compiling may have loaded another BLAS (numba's linalg loads scipy's)
                first[0] = False
                reapply_blas_limit()
            return result

    serialised.__wrapped__ = dispatcher
    serialised.__name__ = serialised.__qualname__ = getattr(dispatcher, "__name__", "numba_parallel")
    return serialised


def _cudasim() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "") not in ("", "0")


def _accepts(impl: Impl, kind: str) -> bool:
    # Under the Numba CUDA simulator the numba_cuda impls run on numpy arrays: that is how CI
    # executes GPU kernels without a GPU.
    return impl.array_kind == kind or (impl.name == "numba_cuda" and kind == "numpy" and _cudasim())


@functools.cache
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _device_ready(impl: Impl) -> bool:
    if impl.name == "numba_cuda":
        return _numba_cuda_ready()
    if impl.array_kind == "cupy":
        return _cupy_ready()
    return True


@functools.cache
def _numba_cuda_ready() -> bool:
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver or toolkit means "not usable", never a crash
        return False


@functools.cache
def _cupy_ready() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - a broken driver or toolkit means no usable GPU, never a crash
        return False


_loaded = False


def _load_declarations() -> None:
    """Import kernels/declarations.py once: it registers every kernel's impls."""
    global _loaded
    if not _loaded:
        _loaded = True
        importlib.import_module(".declarations", __package__)
