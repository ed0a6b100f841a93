"""The Optimizer base class: param groups, flat buffers, fused kernel launches, state dicts.

Storage. For each param group the optimizer keeps one :class:`_Bucket` per (device, dtype) of
its parameters. A bucket owns

* ``flat``: one contiguous buffer holding every parameter of the bucket; each parameter's
  ``._data`` is rebound to a shaped view into it, so the kernel updates the model in place with
  no copy;
* ``grad_flat``: one contiguous gradient buffer, made with the bucket. Each parameter's slice of it is
  the parameter's gradient home (``engine.autograd.GradHome``): when the optimizer steps with the
  fused kernels, backward writes a leaf's fresh gradient into its home and ``.grad`` is a Tensor
  over it, so the step finds the gradients in the buffer and copies nothing; so does
  ``zero_grad(set_to_none=False)`` (backward then accumulates straight into the buffer). Gradients
  elsewhere (assigned by the user, or made while a home was busy) are copied in before the step
  (one ``concatenate`` when all are). A home whose memory a tensor or array the user kept still
  sees (the ``.grad`` of before ``zero_grad(set_to_none=True)``) is never written: the gradient
  goes to new memory, and a step that must copy such a gradient in first gives the bucket a new
  ``grad_flat``, leaving the old one to the tensors that see it (PyTorch's ``set_to_none``
  semantics: the old tensor keeps its values);
* one flat buffer per state (``exp_avg``, ``momentum_buffer`` ...), allocated on first need;
* for float16 / bfloat16 parameters (``master_weights`` on, the default): ``master``, a float32
  copy of ``flat``; the states are then float32, and the kernels update the master and write it
  rounded into ``flat`` in the same pass.

Every parameter's view, in every one of these buffers, starts at a multiple of
:data:`FLAT_ALIGNMENT_BYTES` (see there why); the gaps between parameters are padding, kept at 0
in ``flat`` and ``grad_flat`` and at the state's fill value in the state buffers. A launch may
span padding: with a zero gradient every optimizer maps a zero parameter and fill-valued states
to themselves (weight decay of 0 is 0, m and v stay 0, the update is 0 / eps = 0), so padding
stays finite and, the kernels being elementwise, never touches a parameter. Where that does not
hold (a zero eps over a zero state would give 0 / 0 = NaN) a launch never spans padding
(:meth:`Optimizer._padding_is_safe`).

So one kernel launch updates a whole bucket. Parameters whose grad is ``None`` are skipped and
their state does not advance (PyTorch semantics); the update then runs once per maximal run of
consecutive parameters that share the same step count.

If anything rebinds a parameter's ``._data`` (``Module.to()``, a ``model.load_state_dict`` that
assigns new arrays, ``p._data = ...``), the next call notices (an identity check per parameter)
and rebuilds that group's buckets, carrying the state over to the new device and dtype.

``fused=False`` keeps the same storage but updates one parameter at a time with plain
array-module code (``_reference_update``): the unfused reference the parity tests compare with.

Loss scaling (``engine.amp.GradScaler``): a step may come with a ``found_inf`` device flag, and
then whether it is taken is known only on the device. Each parameter's step count is then kept on
the device too (:class:`_OnDevice`), the kernels read it there, and ``state_dict`` reads it back:
no host read per step.

CUDA graphs (``capturable=True``, PyTorch's flag, on the optimizers that set
``_supports_capturable``): a captured ``step()`` replays the kernels, not the Python, so every
scalar a kernel takes must live in device memory and change in place. Such a group keeps its
learning rate in a one-element device array per device (:class:`_ParamGroup`: assigning
``group["lr"]``, as the schedulers do, fills it) and each parameter's step count in a device array
that the step increments in place. Both are made by an eager step (a warm-up before the capture);
an optimizer without the flag refuses to step inside a capture, since a replay would repeat the
capture's learning rate and step count.
"""

from __future__ import annotations

import collections
import contextlib
import math
import numbers
import weakref

import numpy as np

from engine import backend, dtypes
from engine.amp.grad_scaler import check_and_unscale_
from engine.autograd import GradHome, enable_grad, no_grad
from engine.backend import CaptureError
from engine.dtypes import is_floating
from engine.errors import EngineError, describe
from engine.tensor import Tensor

# Dtypes the fused kernels take; parameters of any other float dtype use the unfused path.
_KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Byte alignment of every parameter's view in the flat buffers (params, grads and states).
# Packed end to end, one odd-sized parameter (a bias of 5 floats) would shift every later
# weight off 16-byte alignment: cuBLAS then falls back to slower GEMM kernels and the
# vectorised CUDA epilogues to their scalar paths. 256 bytes is what cudaMalloc returns, so an
# aligned view is as good as a freshly allocated array; the padding costs < 256 bytes a param.
FLAT_ALIGNMENT_BYTES = 256


def _aligned_layout(sizes: list[int], itemsize: int) -> tuple[list[int], list[int], int]:
    """Start and stop element offsets of each param in a flat buffer, and the buffer's length.

    Each start is a multiple of FLAT_ALIGNMENT_BYTES (in elements); so is the length, so that a
    buffer's trailing padding is as harmless as the padding between params.
    """
    step = FLAT_ALIGNMENT_BYTES // itemsize
    starts, stops, end = [], [], 0
    for size in sizes:
        start = -(-end // step) * step
        starts.append(start)
        stops.append(start + size)
        end = start + size
    return starts, stops, -(-end // step) * step


def _aligned_full(xp, numel: int, fill: float, dtype):
    """A 1-D buffer of ``numel`` elements filled with ``fill``, starting at an aligned address.

    numpy aligns allocations to 16 or 64 bytes only, so allocate one alignment more and slice;
    cupy's pool hands out 512-byte-aligned blocks, so there the slice starts at 0.
    """
    itemsize = np.dtype(dtype).itemsize
    raw = xp.empty(numel + FLAT_ALIGNMENT_BYTES // itemsize, dtype=dtype)
    shift = (-backend.address(raw) % FLAT_ALIGNMENT_BYTES) // itemsize
    buffer = raw[shift:shift + numel]
    buffer.fill(fill)
    return buffer


class _OnDevice:
    """A per-parameter count or flag held in a one-element device array.

    After a step that a GradScaler may have skipped (its ``found_inf`` is a device flag), a
    parameter's step count is only known on the device: it stays there, and the kernels read it
    there, until a checkpoint reads it (:meth:`_Bucket.host_step`). Compared by identity, so the
    parameters that went through the same steps share one object and one kernel launch.
    """

    __slots__ = ("array",)

    def __init__(self, array):
        self.array = backend.array_module(array).asarray(array)  # numpy's 0-d arithmetic gives scalars

    def __add__(self, n):
        return backend.array_module(self.array).asarray(self.array + n)

    def to(self, device) -> "_OnDevice":
        return self if backend.device_of(self.array) == device else _OnDevice(backend.to_device(self.array, device))


class _ParamGroup(dict):
    """A param group: a dict, as in PyTorch, that also keeps a capturable group's learning rate on the
    device (``device_lr``: device -> a one-element float64 array). Assigning ``"lr"`` fills those
    arrays (a fill kernel, no wait), so that a step captured in a CUDA graph reads the rate a
    scheduler or the user set since, at every replay."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.device_lr: dict = {}

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        device_lr = getattr(self, "device_lr", None)  # unpickling sets items before attributes
        if key == "lr" and device_lr:
            for array in device_lr.values():
                array.fill(float(value))

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


class _Bucket:
    """The parameters of one group that share a device and dtype, laid out in flat buffers.

    With ``master`` (float16 / bfloat16 parameters, ``master_weights`` on) the bucket also keeps a
    float32 copy of the parameters, ``master``, laid out like ``flat``, and its states are float32:
    the fused kernels update the master and write it rounded into ``flat`` (the parameters) in the
    same pass. Every buffer uses the same element offsets, aligned for the narrowest dtype.
    """

    def __init__(self, params: list[Tensor], master: bool = False):
        first = params[0]._data
        self.params = params
        self.device = backend.device_of(first)
        self.dtype = first.dtype
        self.xp = backend.array_module(first)
        self.state_dtype = dtypes.COMPUTE_DTYPE if master else self.dtype
        self.shapes = [p.shape for p in params]  # as bound; a rebound ._data may have another
        self.starts, self.stops, self.numel = _aligned_layout(
            [int(p._data.size) for p in params], min(self.dtype.itemsize, self.state_dtype.itemsize))
        with backend.on_device(self.device):
            self.flat = _aligned_full(self.xp, self.numel, 0, self.dtype)  # padding: 0
            for p, start, stop in zip(params, self.starts, self.stops):
                self.flat[start:stop] = p._data.reshape(-1)
            self.master = None
            if master:
                self.master = _aligned_full(self.xp, self.numel, 0, self.state_dtype)
                self.master[...] = self.flat
        self.views = [self._view(self.flat, i) for i in range(len(params))]
        self.grad_flat = None
        self.grad_views: list = []
        self.homes: list[GradHome] = []  # where backward writes each param's fresh gradient (views of grad_flat)
        self.homes_in_use = False  # are the homes given to the params (fused steps gather from grad_flat)?
        self.grads_copied = 0  # how many gradients were copied into grad_flat (a statistic for tests)
        self._zero_pad = None  # zeros as long as the longest gap, to gather grads with one concatenate
        self.buffers: dict = {}  # state name -> flat array
        self.steps: list = [0] * len(params)  # int, or _OnDevice after a step a GradScaler may have skipped
        self.has: list[set[str]] = [set() for _ in params]  # state names initialized per param
        self.pending: dict = {}  # param index -> _OnDevice flag an optimizer keeps on the device (SGD)
        self.capturable = False  # step counts stay on the device, updated in place (capturable=True)

    @property
    def fusable(self) -> bool:
        """Do the fused kernels take this bucket (float32 / float64, or 16-bit with a master)?"""
        return self.master is not None or self.dtype in _KERNEL_DTYPES

    @property
    def target(self):
        """The flat array the update runs on: the master copy, or the parameters themselves."""
        return self.flat if self.master is None else self.master

    def _view(self, flat, i: int):
        return flat[self.starts[i]:self.stops[i]].reshape(self.shapes[i])

    def bind(self, homes: bool = False) -> None:
        """Rebind every parameter's ``._data`` to its view of ``flat``; with ``homes`` (the step reads
        the gradients from ``grad_flat``) make ``grad_flat`` and give each parameter its home there."""
        for p, view in zip(self.params, self.views):
            p._data = view
        self.homes_in_use = homes
        if homes:
            self._ensure_grad_flat()
        self._give_homes()

    def _give_homes(self) -> None:
        for i, p in enumerate(self.params):
            p._grad_home = weakref.ref(self.homes[i]) if self.homes_in_use else None

    def is_bound(self) -> bool:
        return all(p._data is view for p, view in zip(self.params, self.views))

    def buffer(self, name: str, fill: float):
        """The flat state buffer ``name``, created filled with ``fill`` on first use."""
        if name not in self.buffers:
            with backend.on_device(self.device):
                self.buffers[name] = _aligned_full(self.xp, self.numel, fill, self.state_dtype)
        return self.buffers[name]

    def state_view(self, name: str, i: int):
        return self._view(self.buffers[name], i)

    def master_view(self, i: int):
        return self._view(self.master, i)

    def host_step(self, i: int) -> int:
        """Param ``i``'s step count as an int; a count on the device is read (a host sync) and kept,
        except in a capturable bucket, whose device counts a captured step goes on incrementing."""
        count = self.steps[i]
        if not isinstance(count, _OnDevice):
            return count
        value = int(backend.to_host(count.array).reshape(-1)[0])
        if not self.capturable:
            self.steps[i] = value
        return value

    def steps_to_device(self, active: list[int]) -> None:
        """Give each active param a device step count (params with equal counts share one array)."""
        made: dict = {}
        for i in active:
            count = self.steps[i]
            if isinstance(count, _OnDevice):
                continue
            if count not in made:
                _refuse_state_in_capture("its step counts")
                with backend.on_device(self.device):
                    made[count] = _OnDevice(self.xp.full((1,), count, dtype=np.int64))
            self.steps[i] = made[count]

    def advance_in_place(self, active: list[int], scaling: "_BucketScaling") -> None:
        """Add 1 (or ``scaling.taken()``) to the active params' device step counts, in place, so that
        a CUDA graph replay of the step advances them too. A count shared with a param that did not
        step is copied first (outside a capture only: a copy in a capture would restart from the
        capture's value at every replay)."""
        stepping = set(active)
        own: dict = {}
        for i in active:
            count = self.steps[i]
            if id(count) not in own:
                shared = any(c is count and j not in stepping for j, c in enumerate(self.steps))
                if shared:
                    _refuse_state_in_capture("a step count shared with a parameter that has no gradient")
                    with backend.on_device(self.device):
                        own[id(count)] = _OnDevice(count.array.copy())
                else:
                    own[id(count)] = count
            self.steps[i] = own[id(count)]
        increment = 1 if scaling.skipped is None else scaling.taken()
        with backend.on_device(self.device):
            for count in {id(c): c for c in own.values()}.values():
                count.array += increment

    def _ensure_grad_flat(self):
        if self.grad_flat is None:
            with backend.on_device(self.device):
                self.grad_flat = _aligned_full(self.xp, self.numel, 0, self.dtype)  # padding: 0
                self._zero_pad = self.xp.zeros(FLAT_ALIGNMENT_BYTES // self.dtype.itemsize, dtype=self.dtype)
            self.grad_views = [backend.rooted_view(self.grad_flat, start, stop, shape)
                               for start, stop, shape in zip(self.starts, self.stops, self.shapes)]
            self.homes = [GradHome(self.grad_views[i], self.views[i]) for i in range(len(self.params))]
            for home in self.homes:  # the views are held by grad_views and the homes only
                home.settle()
        return self.grad_flat

    def _writable(self, slots) -> bool:
        """Before writing the ``slots`` of ``grad_flat`` for gradients that do not live there: if a tensor
        or array someone kept still sees one of them, leave the buffer to it and take a new one (True)."""
        if all(self.homes[i].is_free() for i in slots):
            return False
        self.grad_flat = None
        self._ensure_grad_flat()
        self._give_homes()
        return True

    def _stale(self, indices) -> list[int]:
        """The params among ``indices`` whose grad is not their view of ``grad_flat``."""
        return [i for i in indices if self.params[i].grad._data is not self.grad_views[i]]

    def gather_grads(self, active: list[int]):
        """``grad_flat`` holding the grads of the ``active`` params (other slices: stale).

        Grads that already are views of ``grad_flat`` (backward wrote them into their homes, or
        see :meth:`zero_grads`) are not copied; the others are copied in, with one ``concatenate``
        (of the grads and zero padding) when every grad needs copying, after :meth:`_writable`.
        Padding is only ever written with zeros.
        """
        self._ensure_grad_flat()
        stale = self._stale(active)
        if stale and self._writable(stale):  # a new buffer: no grad lives in it yet
            stale = self._stale(active)
        grad_flat = self.grad_flat
        self.grads_copied += len(stale)
        if len(stale) == len(self.params):
            self.xp.concatenate(self._grads_and_padding(), out=grad_flat)
        else:
            for i in stale:
                grad_flat[self.starts[i]:self.stops[i]] = self.params[i].grad._data.reshape(-1)
        return grad_flat

    def adopt_grads(self, active: list[int]):
        """:meth:`gather_grads`, then each active param's ``.grad`` a view of ``grad_flat``: what the
        flat buffer then holds (an unscaled gradient) is what ``p.grad`` shows."""
        grad_flat = self.gather_grads(active)
        for i in active:
            grad = self.params[i].grad
            if grad._data is not self.grad_views[i]:
                grad._data = self.grad_views[i]
        return grad_flat

    def _grads_and_padding(self) -> list:
        pieces = []
        for i, p in enumerate(self.params):
            pieces.append(p.grad._data.reshape(-1))
            gap = (self.starts[i + 1] if i + 1 < len(self.params) else self.numel) - self.stops[i]
            if gap:
                pieces.append(self._zero_pad[:gap])
        return pieces

    def zero_grads(self) -> None:
        """Zero the existing grads, making each one's ``._data`` a view of ``grad_flat``.

        One fill zeros them all (after :meth:`_writable`, for the slices of grads that live
        elsewhere); the next backward accumulates in place into the views, so the next step
        copies nothing. The grad Tensors stay the same objects (only their ``._data``
        is rebound), so a caller holding ``p.grad`` sees zeros, as with an in-place zero.
        """
        if all(p.grad is None for p in self.params):
            return
        self._ensure_grad_flat()
        self._writable([i for i, p in enumerate(self.params) if p.grad is None or p.grad._data is not self.grad_views[i]])
        self.grad_flat.fill(0)
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not None:
                p.grad._data = view

    def export(self, i: int, step: bool, copy: bool, first_step_pending=None) -> dict | None:
        """The state of param ``i`` as {"step"?, name: Tensor, "master_param"?}, or None when it has
        none. A step count on the device is read. ``first_step_pending``: a state name whose buffer
        is left out while the device says no step has written it yet (SGD's momentum buffer)."""
        count = self.host_step(i)
        names = set(self.has[i])
        if first_step_pending in names and i in self.pending:
            if bool(backend.to_host(self.pending[i].array).reshape(-1)[0]):
                names.discard(first_step_pending)  # every step that would have made it was skipped
            else:
                del self.pending[i]
        stepped_master = self.master is not None and count
        if not names and not (step and count) and not stepped_master:
            return None
        entry = {"step": count} if step else {}
        for name in sorted(names):
            view = self.state_view(name, i)
            entry[name] = Tensor(view.copy() if copy else view)
        if stepped_master:  # the master's low bits: a resumed run continues exactly
            view = self.master_view(i)
            entry[MASTER_PARAM] = Tensor(view.copy() if copy else view)
        return entry

    def unpack(self) -> dict:
        """Per-parameter state, detached from the flat buffers: {param: {"step", name: array}}."""
        out = {}
        for i, p in enumerate(self.params):
            entry = {"step": self.steps[i]}
            for name in self.has[i]:
                entry[name] = self.state_view(name, i).copy()
            if self.master is not None:
                entry[MASTER_PARAM] = self.master_view(i).copy()
            if i in self.pending:
                entry[_PENDING] = self.pending[i]
            out[p] = entry
        return out


def _refuse_state_in_capture(what: str) -> None:
    region = backend.capture_region()
    if region is not None:
        raise CaptureError(f"optimizer.step (capturable=True) inside {region}: {what} would be created in the "
                           "capture, so every replay would start them afresh; take one eager step before "
                           "capturing (a warm-up), as with PyTorch's capturable optimizers")


# unpack() key of a per-parameter device flag an optimizer keeps (never in a state dict).
_PENDING = "_pending_on_device"
MASTER_PARAM = "master_param"


class Optimizer:
    """Base class of the optimizers: param groups, flat state buffers, fused steps, state dicts.

    Subclasses define the hyperparameter checks, which flat state buffers a group needs, and the
    update twice: ``_fused_update`` (one kernel launch on flat slices) and ``_reference_update``
    (plain array code on one parameter).

    Args:
        params: an iterable of Tensors, or of dicts each holding ``"params"`` (an iterable of
            Tensors) and per-group hyperparameters that override ``defaults``.
        defaults: the hyperparameters of a group that does not set them. ``master_weights``
            (every optimizer takes it): for float16 / bfloat16 parameters, ``None`` (default) or
            ``True`` keeps a float32 master copy and float32 states, updated by the fused kernels,
            which write the rounded parameter in the same pass; ``False`` keeps the states in the
            parameter's dtype and computes each step in float32, rounded once. Ignored for
            float32 / float64 parameters.
        fused: ``True`` or ``None`` (default): update each bucket with one fused kernel launch;
            ``False``: the unfused per-parameter reference path.

    Loss scaling: like PyTorch's fused optimizers, :meth:`step` honours the ``grad_scale`` and
    ``found_inf`` attributes that ``engine.amp.GradScaler.step`` sets (``_step_supports_amp_scaling``):
    gradients are unscaled inside the update, and a nonzero ``found_inf`` leaves parameters,
    states and step counts as they were, all decided on the device (no host read).
    """

    # Does the per-parameter state carry a "step" count (exported in state_dict)?
    _exports_step = True
    # GradScaler.step sets grad_scale / found_inf on the optimizer and calls step() (PyTorch's protocol).
    _step_supports_amp_scaling = True
    # A state whose first write depends on the step being taken (SGD's momentum buffer), or None.
    _first_step_state = None
    # Does the optimizer take capturable=True (device lr and step counts, for CUDA graph capture)?
    _supports_capturable = False

    def __init__(self, params, defaults: dict, fused: bool | None = None):
        self.defaults = dict(defaults)
        self.fused = True if fused is None else bool(fused)
        self.param_groups: list[dict] = []
        self._buckets: list[list[_Bucket]] = []
        self._group_params: list[tuple] = []
        for group in _as_param_groups(type(self).__name__, params):
            self.add_param_group(group)

    # ---- hooks for subclasses ------------------------------------------------------------------
    def _check_hyperparams(self, group: dict) -> None:
        """Raise EngineError if a hyperparameter of ``group`` is out of range."""
        raise NotImplementedError

    def _buffer_names(self, group: dict) -> tuple[str, ...]:
        """Names of the flat state buffers that ``group``'s hyperparameters need."""
        raise NotImplementedError

    def _buffer_fill(self, group: dict, name: str) -> float:
        """Initial value of state buffer ``name`` (before a parameter's first step)."""
        return 0.0

    def _initial_param_state(self, group: dict) -> set[str] | None:
        """State names initialized when a parameter is added (Adagrad's sum); None: lazily."""
        return None

    def _run_key(self, group: dict, bucket: _Bucket, i: int):
        """Per-parameter value the update depends on; params with equal keys share a launch."""
        return bucket.steps[i]

    def _after_step(self, group: dict, bucket: _Bucket, i: int, key, skipped, memo: dict) -> None:
        """Called for each parameter a step updated, with its run key and ``skipped`` (the device
        flag "this step was skipped", or None when the step was certainly taken)."""

    def _padding_is_safe(self, group: dict, dtype) -> bool:
        """Does one update keep zero params with zero grads, and states at their fill value,
        exactly as they are (so that a launch may span the padding between params)?"""
        return True

    def _fused_update(self, group: dict, param, grad, buffers: dict, key) -> None:
        """Update flat slices in place with one kernel launch."""
        raise NotImplementedError

    def _reference_update(self, group: dict, param, grad, buffers: dict, key) -> None:
        """Update one parameter's arrays in place with plain array-module code."""
        raise NotImplementedError

    def _check_group(self, group: dict) -> None:
        """The subclass's hyperparameter checks, and ``master_weights`` (None, True or False)."""
        master = group.get("master_weights")
        if master is not None and not isinstance(master, (bool, np.bool_)):
            raise EngineError(f"{type(self).__name__}: master_weights must be None, True or False, got {master!r}")
        if not isinstance(group.get("capturable", False), (bool, np.bool_)):
            raise EngineError(f"{type(self).__name__}: capturable must be True or False, got {group['capturable']!r}")
        self._check_hyperparams(group)

    def _capturable(self, group: dict) -> bool:
        return self._supports_capturable and bool(group.get("capturable", False))

    # ---- param groups --------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a group of parameters (a dict with ``"params"`` and optional hyperparameters).

        Example:
            >>> opt.add_param_group({"params": head.parameters(), "lr": 1e-2})  # doctest: +SKIP
        """
        name = type(self).__name__
        if not isinstance(param_group, dict):
            raise EngineError(f"{name}.add_param_group: expected a dict with a 'params' key, "
                              f"got {type(param_group).__name__}")
        group = _ParamGroup(self.defaults)
        group.update(param_group)
        group["params"] = _as_param_list(name, param_group.get("params"))
        self._check_group(group)
        self._sync()
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in group["params"]):
            raise EngineError(f"{name}.add_param_group: some parameters already belong to another group; "
                              "each parameter may appear in one group only")
        initial = self._initial_param_state(group)
        state = {}
        if initial is not None:
            state = {p: {"step": 0, **{n: None for n in initial}} for p in group["params"]}
        buckets = self._pack(group, state)
        for bucket in buckets:
            bucket.bind(homes=self.fused and bucket.fusable)
        self.param_groups.append(group)
        self._buckets.append(buckets)
        self._group_params.append(tuple(group["params"]))

    def _pack(self, group: dict, state: dict) -> list[_Bucket]:
        """New buckets for ``group`` holding ``state`` ({param: {"step", name: array or None}}).

        A state array of None means "initialized to the buffer's fill value". A saved
        ``master_param`` becomes the master of a 16-bit parameter (the kernels restart it from the
        parameter where the two disagree); it is dropped for a float32 / float64 parameter, whose
        own value is the one to keep. Nothing is bound: the caller binds once every group has been
        built, so a failure changes nothing.
        """
        by_kind: dict[tuple, list[Tensor]] = {}
        for p in group["params"]:
            by_kind.setdefault((backend.device_of(p._data), p._data.dtype.str), []).append(p)
        master = group.get("master_weights") is not False
        buckets = [_Bucket(params, master and dtypes.is_low_precision(params[0]._data.dtype))
                   for params in by_kind.values()]
        for bucket in buckets:
            for i, p in enumerate(bucket.params):
                entry = state.get(p)
                if not entry:
                    continue
                step = entry.get("step", 0)
                bucket.steps[i] = step.to(bucket.device) if isinstance(step, _OnDevice) else int(step)
                if _PENDING in entry:
                    bucket.pending[i] = entry[_PENDING].to(bucket.device)
                for name, value in entry.items():
                    if name in ("step", _PENDING):
                        continue
                    if value is not None and tuple(value.shape) != p.shape:
                        raise EngineError(f"{type(self).__name__}: parameter {describe(p)} changed shape since "
                                          f"its state {name!r} {tuple(value.shape)} was made; the state no "
                                          "longer fits: build a new optimizer for the resized model")
                    if name == MASTER_PARAM:
                        if bucket.master is not None:
                            view = bucket.master_view(i)
                            view[...] = backend.to_device(value, bucket.device).astype(view.dtype, copy=False)
                        continue
                    bucket.buffer(name, self._buffer_fill(group, name))
                    if value is not None:
                        view = bucket.state_view(name, i)
                        view[...] = backend.to_device(value, bucket.device).astype(bucket.state_dtype, copy=False)
                    bucket.has[i].add(name)
        return buckets

    def _unpack(self, group_index: int) -> dict:
        state = {}
        for bucket in self._buckets[group_index]:
            state.update(bucket.unpack())
        return state

    def _sync(self) -> None:
        """Rebuild the buckets of groups whose params were rebound or whose param list changed."""
        if len(self._buckets) != len(self.param_groups):
            raise EngineError(f"{type(self).__name__}: param_groups was changed directly; "
                              "add groups with add_param_group()")
        for index, group in enumerate(self.param_groups):
            params, known = group["params"], self._group_params[index]
            same_params = len(params) == len(known) and all(a is b for a, b in zip(params, known))
            if same_params and all(bucket.is_bound() for bucket in self._buckets[index]):
                continue
            group["params"] = _as_param_list(type(self).__name__, params)
            state = self._unpack(index)
            buckets = self._pack(group, state)
            for bucket in buckets:
                bucket.bind(homes=self.fused and bucket.fusable)
            self._buckets[index] = buckets
            self._group_params[index] = tuple(group["params"])

    # ---- the step ------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter.

        Args:
            set_to_none: ``True`` (default) sets ``.grad`` to None: the next backward writes each
                fresh gradient into the parameter's slice of the flat grad buffer (with the fused
                kernels) and the step copies nothing; a ``.grad`` Tensor kept from before keeps its
                values. ``False`` zeros the existing grads with one fill per bucket and makes them
                views of the flat grad buffer: backward then accumulates straight into it and the
                step copies nothing. Grads that are None stay None.
        """
        self._sync()
        for buckets in self._buckets:
            for bucket in buckets:
                if set_to_none:
                    for p in bucket.params:
                        p.grad = None
                else:
                    bucket.zero_grads()

    def step(self, closure=None):
        """Update every parameter that has a gradient; return ``closure()``'s loss if given.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss
                (run with gradients enabled).
        """
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        with no_grad():
            self._sync()
            for group in self.param_groups:  # validate all before touching any state
                self._check_group(group)
            amp = self._amp_inputs()
            plans = [[(bucket, self._active(index, bucket)) for bucket in buckets]
                     for index, buckets in enumerate(self._buckets)]
            self._check_capture(plans)
            for group, group_plan in zip(self.param_groups, plans):
                for bucket, active in group_plan:
                    if active:
                        self._step_bucket(group, bucket, active, amp)
        return loss

    def _check_capture(self, plans) -> None:
        """Refuse what a CUDA graph replay of this step would get wrong, before any state changes: a
        step inside a capture needs capturable=True (its lr and step counts read from device memory),
        and capturable=True needs the parameters on a CUDA device (as PyTorch asserts)."""
        name = type(self).__name__
        region = backend.capture_region()
        for group, group_plan in zip(self.param_groups, plans):
            if not any(active for _, active in group_plan):
                continue
            if not self._capturable(group):
                if region is not None:
                    hint = ("build it with capturable=True" if self._supports_capturable else
                            "step it outside the captured region (Adam, AdamW and SGD take capturable=True)")
                    raise CaptureError(f"{name}.step inside {region}: its learning rate and step counts are host "
                                       f"numbers, so every replay would repeat the values they had at capture; {hint}")
                continue
            for bucket, active in group_plan:
                if active and bucket.device.type != "cuda":
                    raise EngineError(f"{name}.step: capturable=True needs the parameters and step counts on a CUDA "
                                      f"device (PyTorch: 'If capturable=True, params and state_steps must be on "
                                      f"supported devices'), got {describe(bucket.params[active[0]])}; move the "
                                      "model to 'cuda' or leave capturable=False on the CPU")

    def _device_lr(self, group: dict, bucket: _Bucket):
        """A capturable group's learning rate on the bucket's device, as a 0-d float64 view; made by
        the first eager step there and filled whenever ``group["lr"]`` is assigned."""
        array = group.device_lr.get(bucket.device)
        if array is None:
            _refuse_state_in_capture("its device learning rate")
            with backend.on_device(bucket.device):
                array = group.device_lr[bucket.device] = bucket.xp.full((1,), float(group["lr"]), dtype=np.float64)
        return array.reshape(())

    def _amp_inputs(self) -> tuple | None:
        """``(found_inf, grad_scale)`` raw arrays (either may be None) from the attributes a
        GradScaler sets before calling :meth:`step`; None without them."""
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        if found_inf is None and grad_scale is None:
            return None
        arrays = []
        for name, value in (("found_inf", found_inf), ("grad_scale", grad_scale)):
            if isinstance(value, Tensor):
                value = value._data
            if value is not None and not (backend.is_array(value) and int(np.prod(value.shape)) == 1):
                raise EngineError(f"{type(self).__name__}.step: {name} must be a one-element tensor (as "
                                  f"engine.amp.GradScaler sets it), got {describe(value)}")
            arrays.append(value)
        return tuple(arrays)

    def _active(self, group_index: int, bucket: _Bucket) -> list[int]:
        """Indices of the bucket's params that have a grad; checks each grad fits its param."""
        active = []
        for i, p in enumerate(bucket.params):
            g = p.grad
            if g is None:
                continue
            if bucket.grad_views and g._data is bucket.grad_views[i]:  # a view of the grad buffer: fits
                active.append(i)
                continue
            if not isinstance(g, Tensor):
                raise EngineError(f"{type(self).__name__}.step: param_groups[{group_index}] has a parameter "
                                  f"whose .grad is a {type(g).__name__}, not a Tensor")
            if not _fits(g._data, p._data):
                raise EngineError(f"{type(self).__name__}.step: the gradient {describe(g)} does not match its "
                                  f"parameter {describe(p)} in param_groups[{group_index}]; a gradient "
                                  "must have its parameter's shape, dtype and device")
            active.append(i)
        return active

    def _step_bucket(self, group: dict, bucket: _Bucket, active: list[int], amp) -> None:
        names = self._buffer_names(group)
        capturable = self._capturable(group)
        if capturable:  # the kernels read lr and the step counts from device memory
            if any(name not in bucket.buffers for name in names):
                _refuse_state_in_capture(f"its state buffers ({', '.join(names)})")
            bucket.capturable = True
            bucket.steps_to_device(active)
            group = dict(group, lr=self._device_lr(group, bucket))
        for name in names:
            bucket.buffer(name, self._buffer_fill(group, name))
        scaling = _BucketScaling.of(amp, bucket)
        keys = [self._run_key(group, bucket, i) for i in active]  # before any count advances
        if self.fused and bucket.fusable:
            grad_flat = bucket.adopt_grads(active) if scaling.inv_scale is not None else bucket.gather_grads(active)
            target = bucket.target
            for first, last, key in self._runs(group, bucket, active):
                lo, hi = bucket.starts[first], bucket.stops[last]  # spans the padding between
                if hi > lo:
                    buffers = {name: bucket.buffers[name][lo:hi] for name in names}
                    extra = scaling.kernel_args()
                    if bucket.master is not None:
                        extra["param_out"] = bucket.flat[lo:hi]
                    self._fused_update(group, target[lo:hi], grad_flat[lo:hi], buffers, key, **extra)
        else:
            for i, key in zip(active, keys):
                self._reference_step(group, bucket, i, names, key, scaling)
        memo: dict = {}
        if capturable:
            bucket.advance_in_place(active, scaling)
        for i, key in zip(active, keys):
            if not capturable:
                bucket.steps[i] = scaling.advance(bucket.steps[i], memo)
            self._after_step(group, bucket, i, key, scaling.skipped, memo)
            bucket.has[i].update(names)
            bucket.params[i]._version.value += 1  # an in-place change: a graph that saved it must not backward

    def _reference_step(self, group: dict, bucket: _Bucket, i: int, names, key, scaling: "_BucketScaling") -> None:
        """One parameter through ``_reference_update`` (plain array code), with what the fused path
        does around it: the master copy, loss scaling and the skip, as array ops (no host read).

        A float16 / bfloat16 parameter without a master is computed in float32 and rounded once
        into the parameter and its states (the engine's compute rule, see engine/dtypes.py): op by
        op in 16 bits, Adam's eps (1e-8) rounds to 0 in float16 and sqrt(v) + eps divides by zero.
        """
        param, grad = bucket.params[i]._data, bucket.params[i].grad._data
        target = bucket.master_view(i) if bucket.master is not None else param
        buffers = {name: bucket.state_view(name, i) for name in names}
        if bucket.master is not None:  # as the kernels: a parameter written since restarts its master
            xp = bucket.xp
            xp.copyto(target, param.astype(target.dtype), where=target.astype(param.dtype) != param)
        saved = scaling.save(target, buffers)
        wide = {name: dtypes.upcast(b) for name, b in buffers.items()}
        wide_target = dtypes.upcast(target)
        g = scaling.unscaled(grad)
        # A step that may be skipped computes on inf/NaN gradients before it is undone: no warnings.
        with np.errstate(all="ignore") if saved is not None else contextlib.nullcontext():
            self._reference_update(group, wide_target, g, wide, key)
        if wide_target is not target:
            target[...] = wide_target
        for name, b in buffers.items():
            if wide[name] is not b:
                b[...] = wide[name]
        scaling.restore(saved, target, buffers, grad, g)
        if bucket.master is not None:
            param[...] = target

    def _runs(self, group: dict, bucket: _Bucket, active: list[int]):
        """Maximal runs (first, last, key) of consecutive active params with the same key.

        A run spans the padding between its params only where that padding stays harmless.
        Keys on the device (:class:`_OnDevice`) are equal only when they are the same object.
        """
        runs = []
        span_padding = self._padding_is_safe(group, bucket.state_dtype)
        for i in active:
            key = self._run_key(group, bucket, i)
            if (runs and runs[-1][1] == i - 1 and _same_key(runs[-1][2], key)
                    and (span_padding or bucket.stops[i - 1] == bucket.starts[i])):
                runs[-1][1] = i
            else:
                runs.append([i, i, key])
        return runs

    # ---- the finite check and loss scaling -------------------------------------------------------
    def _grad_spans(self):
        """Per bucket with gradients: ``(bucket, grad_flat, spans)``, every active grad gathered into
        ``grad_flat`` and made a view of it (the copy ``step`` makes anyway, so the step copies
        nothing more); ``spans`` are (lo, hi) ranges covering the runs of consecutive active params
        (one range per bucket when every parameter has a grad; the padding between is 0)."""
        self._sync()
        for index, buckets in enumerate(self._buckets):
            for bucket in buckets:
                active = self._active(index, bucket)
                if not active:
                    continue
                grad_flat = bucket.adopt_grads(active)
                spans = [(0, bucket.numel)] if len(active) == len(bucket.params) else _active_spans(bucket, active)
                yield bucket, grad_flat, spans

    def grads_finite(self):
        """A device flag: are all the gradients that the next :meth:`step` would apply finite?

        Gathers each bucket's gradients into its flat grad buffer (the copy ``step`` makes anyway;
        the grads become views of the buffer, so the step copies nothing more) and reduces it
        with one ``isfinite(...).all()`` per run of consecutive parameters that have a grad (one
        per bucket when every parameter has one). Nothing is read on the host: the result is a
        1-element bool array (on a GPU if any bucket is on one), for the caller to read where it
        syncs anyway; ``None`` when no parameter has a gradient.

        Example:
            >>> loss.backward()                                                   # doctest: +SKIP
            >>> ok = opt.grads_finite()              # no host sync               # doctest: +SKIP
            >>> opt.step(); ...; bool(ok)            # read it at the next sync   # doctest: +SKIP
        """
        flag = None
        for bucket, grad_flat, spans in self._grad_spans():
            xp = bucket.xp
            with backend.on_device(bucket.device):
                for lo, hi in spans:
                    flag = _and_flags(flag, xp.all(xp.isfinite(grad_flat[lo:hi]), keepdims=True))
        return flag

    def _amp_unscale_grads_(self, inv_scale, allow_fp16: bool) -> dict:
        """GradScaler's check (and unscale) of this optimizer's gradients, bucket by bucket.

        ``{device: found_inf}``: a 0-d float32 array per device holding 1.0 where some gradient
        there is inf or NaN (checked before unscaling, as torch's
        ``_amp_foreach_non_finite_check_and_unscale_``), else 0.0. With ``inv_scale`` (a 0-d
        float32 array) every gradient is multiplied by it in place. Nothing is read on the host.
        Refuses float16 gradients unless ``allow_fp16``, as PyTorch does.
        """
        found: dict = {}
        for bucket, grad_flat, spans in self._grad_spans():
            if not allow_fp16 and bucket.dtype == np.float16:
                raise EngineError("Attempting to unscale FP16 gradients. (GradScaler.unscale_ refuses float16 "
                                  "gradients, as PyTorch does: unscaled in float16 they underflow; let "
                                  "scaler.step(optimizer) unscale them in float32 inside the update instead)")
            inv = None if inv_scale is None else backend.to_device(inv_scale, bucket.device)
            with backend.on_device(bucket.device):
                for lo, hi in spans:
                    found[bucket.device] = check_and_unscale_(grad_flat[lo:hi], inv, found.get(bucket.device))
        return found

    # ---- inspection and checkpoints ------------------------------------------------------------
    @property
    def state(self) -> dict:
        """{param: {"step": int, name: Tensor}} for every param with state; the Tensors are live
        views of the flat buffers (read them; they go stale when the buckets are rebuilt). A 16-bit
        parameter's float32 master copy is its ``"master_param"``. Step counts that a GradScaler
        left on the device are read here (a host sync, as torch's ``.item()``)."""
        self._sync()
        out = {}
        for buckets in self._buckets:
            for bucket in buckets:
                for i, p in enumerate(bucket.params):
                    entry = bucket.export(i, self._exports_step, False, self._first_step_state)
                    if entry is not None:
                        out[p] = entry
        return out

    def state_dict(self) -> dict:
        """A snapshot of the optimizer: ``{"state": {index: {...}}, "param_groups": [...]}``.

        Parameters are named by their index in the order of ``param_groups``; state arrays are
        copied Tensors on the parameter's device, hyperparameters plain numbers, so the result
        can be stored with :func:`engine.save` and restored with :meth:`load_state_dict`. A 16-bit
        parameter with a master copy saves it as ``"master_param"`` (float32), so a resumed run
        continues exactly. Step counts a GradScaler left on the device are read (a host sync).
        """
        self._sync()
        state, groups, index = {}, [], 0
        for group, buckets in zip(self.param_groups, self._buckets):
            where = {id(p): (b, i) for b in buckets for i, p in enumerate(b.params)}
            indices = []
            for p in group["params"]:
                bucket, i = where[id(p)]
                entry = bucket.export(i, self._exports_step, True, self._first_step_state)
                if entry is not None:
                    state[index] = entry
                indices.append(index)
                index += 1
            saved = {k: v for k, v in group.items() if k != "params"}
            saved["params"] = indices
            groups.append(saved)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (hyperparameters and per-parameter state).

        The saved groups must match this optimizer's groups in number and size; a saved
        hyperparameter must have the kind of value this optimizer holds for it (a bool for a
        flag, a real number for a rate, a pair for ``betas``) and pass the constructor's range
        checks; ``step`` must be a non-negative int (a Python or numpy int, or a one-element
        integer array; never a float, bool, NaN or inf); state arrays must have their
        parameter's shape (they are moved to its device and cast to its dtype). Any violation
        raises an ``EngineError`` saying what was expected, and nothing changes. A saved
        ``"master_param"`` restores a 16-bit parameter's float32 master copy (a parameter loaded
        with another value since restarts its master from that value at the next step); for a
        float32 / float64 parameter it is dropped (the parameter's own value is the one kept).
        """
        name = f"{type(self).__name__}.load_state_dict"
        self._sync()
        saved_groups, saved_state = _split_state_dict(name, state_dict)
        if len(saved_groups) != len(self.param_groups):
            raise EngineError(f"{name}: the state dict has {len(saved_groups)} param group(s) but this optimizer "
                              f"has {len(self.param_groups)}; build the optimizer with the same groups")
        every_index = [i for g, saved in enumerate(saved_groups) for i in _saved_indices(name, g, saved)]
        repeated = sorted(i for i, n in collections.Counter(every_index).items() if n > 1)
        if repeated:  # two parameters would share (and both update) one saved state
            raise EngineError(f"{name}: the state dict lists parameter indices {repeated} more than once in its "
                              "param groups; each parameter has one index")
        new_groups, states = [], []
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            indices = _saved_indices(name, g, saved)
            if len(indices) != len(group["params"]):
                raise EngineError(f"{name}: param group {g} has {len(indices)} parameter(s) in the state dict but "
                                  f"{len(group['params'])} in this optimizer")
            new_group = dict(group)
            for key, value in saved.items():
                if key != "params":
                    new_group[key] = _saved_hyperparam(name, g, key, _plain(value), group.get(key))
            new_group["params"] = group["params"]
            self._check_group(new_group)
            allowed = set(self._all_buffer_names()) | {MASTER_PARAM}
            states.append({p: self._restore_entry(name, index, saved_state.get(index), p, allowed)
                           for index, p in zip(indices, group["params"])})
            new_groups.append(new_group)
        unknown = set(saved_state) - set(every_index)
        if unknown:
            raise EngineError(f"{name}: the state dict has state for parameter indices {sorted(unknown)} that "
                              "no param group lists")
        buckets = [self._pack(group, {p: e for p, e in state.items() if e}) for group, state in zip(new_groups, states)]
        for group_buckets in buckets:  # commit: nothing below can fail
            for bucket in group_buckets:
                bucket.bind(homes=self.fused and bucket.fusable)
        for group, new_group in zip(self.param_groups, new_groups):
            group.clear()
            group.update(new_group)
        self._buckets = buckets
        self._group_params = [tuple(group["params"]) for group in self.param_groups]

    def _all_buffer_names(self) -> tuple[str, ...]:
        """Every state name this optimizer may store (for validating loaded state)."""
        raise NotImplementedError

    def _restore_entry(self, name: str, index, entry, param: Tensor, allowed: set[str]) -> dict | None:
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise EngineError(f"{name}: state of parameter {index} must be a dict, got {type(entry).__name__}")
        restored = {}
        for key, value in entry.items():
            if key == "step":
                restored["step"] = _as_step(name, index, value)
                continue
            if key not in allowed:
                raise EngineError(f"{name}: state of parameter {index} has unknown entry {key!r}; "
                                  f"{type(self).__name__} keeps {sorted(allowed)}")
            array = value._data if isinstance(value, Tensor) else value
            if not backend.is_array(array):
                raise EngineError(f"{name}: state {key!r} of parameter {index} must be a Tensor or array, "
                                  f"got {type(value).__name__}")
            if tuple(array.shape) != param.shape:
                raise EngineError(f"{name}: state {key!r} of parameter {index} has shape {tuple(array.shape)} but "
                                  f"the parameter is {describe(param)}; the state dict belongs to another model")
            if not is_floating(np.dtype(array.dtype)):
                raise EngineError(f"{name}: state {key!r} of parameter {index} has dtype {array.dtype}; "
                                  "expected a floating dtype")
            restored[key] = array
        if not self._exports_step:
            restored.pop("step", None)
        return restored

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines += [f"    {k}: {v}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join(lines + [")"])


# ---- helpers -----------------------------------------------------------------------------------

def _fits(grad, param) -> bool:
    """Same shape, dtype, array kind and (for cupy) device: cheap enough to run every step."""
    if grad.shape != param.shape or grad.dtype != param.dtype or type(grad) is not type(param):
        return False
    return isinstance(param, np.ndarray) or grad.device == param.device


def _and_flags(flag, ok):
    """``flag & ok`` on a GPU where either is on one (moving a flag to the host would be a sync)."""
    if flag is None:
        return ok
    here, there = backend.device_of(flag), backend.device_of(ok)
    if here == there:
        return flag & ok
    if here.type == "cpu":
        return backend.to_device(flag, there) & ok
    return flag & backend.to_device(ok, here)


def _same_key(a, b) -> bool:
    """Do two run keys give the same update? Keys on the device only when they are one object."""
    if isinstance(a, _OnDevice) or isinstance(b, _OnDevice):
        return a is b
    return a == b


class _BucketScaling:
    """What a GradScaler asked of one bucket's step, as arrays on the bucket's device.

    ``found_inf`` / ``inv_scale``: 0-d float32 arrays or None; ``skipped``: the 0-d bool array
    ``found_inf != 0`` or None (the step is certainly taken). Everything here is array ops: a step
    with a scaler decides on the device, never on the host.
    """

    def __init__(self, device=None, found_inf=None, inv_scale=None):
        self.device, self.found_inf, self.inv_scale = device, found_inf, inv_scale
        self.skipped = None if found_inf is None else backend.array_module(found_inf).asarray(found_inf != 0)
        self._taken = None

    @classmethod
    def of(cls, amp, bucket: _Bucket) -> "_BucketScaling":
        if amp is None:
            return _NO_SCALING
        found_inf, grad_scale = amp
        xp = bucket.xp
        with backend.on_device(bucket.device):
            if found_inf is not None:
                found_inf = xp.asarray(backend.to_device(found_inf, bucket.device), dtype=np.float32).reshape(())
            inv_scale = None
            if grad_scale is not None:  # the reciprocal in float64, as torch's unscale_
                scale = backend.to_device(grad_scale, bucket.device).astype(np.float64).reshape(())
                inv_scale = xp.asarray(1.0 / scale, dtype=np.float32)
        return cls(bucket.device, found_inf, inv_scale)

    def kernel_args(self) -> dict:
        return {name: value for name, value in (("found_inf", self.found_inf), ("inv_scale", self.inv_scale))
                if value is not None}

    def unscaled(self, grad):
        """The gradient the reference update uses: in the compute dtype, times inv_scale."""
        g = dtypes.upcast(grad)
        return g if self.inv_scale is None else g * self.inv_scale

    def save(self, target, buffers: dict):
        """Copies to restore on a skipped step (None when no step can be skipped)."""
        if self.skipped is None:
            return None
        return target.copy(), {name: b.copy() for name, b in buffers.items()}

    def restore(self, saved, target, buffers: dict, grad, unscaled) -> None:
        """After a reference update: put back what a skipped step changed, and give the gradient
        its unscaled value where the step was taken (the kernels' contract)."""
        xp = backend.array_module(target)
        if self.inv_scale is not None:
            grad[...] = unscaled if self.skipped is None else xp.where(self.skipped, dtypes.upcast(grad), unscaled)
        if saved is not None:
            xp.copyto(target, saved[0], where=self.skipped)
            for name, b in buffers.items():
                xp.copyto(b, saved[1][name], where=self.skipped)

    def taken(self):
        """1 where the step was taken, 0 where skipped: a 0-d int64 array."""
        if self._taken is None:
            with backend.on_device(self.device):
                self._taken = backend.array_module(self.skipped).asarray(~self.skipped, dtype=np.int64)
        return self._taken

    def advance(self, count, memo: dict):
        """A parameter's step count after this step: +1, or +taken() on the device when the step
        may have been skipped. Equal counts go to one new object (one launch next step)."""
        if self.skipped is None and not isinstance(count, _OnDevice):
            return count + 1
        key = ("step", id(count) if isinstance(count, _OnDevice) else count)
        if key not in memo:  # the old count is kept in the memo too: its id stays its own
            with backend.on_device(self.device):
                xp = backend.xp_for(self.device)
                start = count.array if isinstance(count, _OnDevice) else xp.asarray(count, dtype=np.int64)
                memo[key] = (count, _OnDevice(start + (1 if self.skipped is None else self.taken())))
        return memo[key][1]


_NO_SCALING = _BucketScaling()


def _active_spans(bucket: _Bucket, active: list[int]) -> list[tuple[int, int]]:
    """(lo, hi) element ranges of ``grad_flat`` covering each run of consecutive ``active`` params."""
    spans = []
    for i in active:
        if spans and spans[-1][2] == i - 1:
            spans[-1][1:] = [bucket.stops[i], i]
        else:
            spans.append([bucket.starts[i], bucket.stops[i], i])
    return [(lo, hi) for lo, hi, _ in spans]


def _as_param_groups(name: str, params) -> list[dict]:
    if isinstance(params, Tensor) or backend.is_array(params) or isinstance(params, dict):
        raise EngineError(f"{name}: params must be an iterable of Tensors or of dicts, got "
                          f"{type(params).__name__}; wrap a single tensor in a list")
    try:
        items = list(params)
    except TypeError:
        raise EngineError(f"{name}: params must be an iterable of Tensors or of dicts, got "
                          f"{type(params).__name__}") from None
    if not items:
        raise EngineError(f"{name}: got an empty parameter list")
    if all(isinstance(item, dict) for item in items):
        return items
    if any(isinstance(item, dict) for item in items):
        raise EngineError(f"{name}: params mixes Tensors and dicts; pass either Tensors or param-group dicts")
    return [{"params": items}]


def _as_param_list(name: str, params) -> list[Tensor]:
    if params is None:
        raise EngineError(f"{name}: a param group needs a 'params' entry")
    items = [params] if isinstance(params, Tensor) else list(params)
    for p in items:
        if not isinstance(p, Tensor):
            raise EngineError(f"{name}: parameters must be Tensors, got {type(p).__name__}")
        if not p.is_leaf:
            raise EngineError(f"{name}: cannot optimize a non-leaf tensor {describe(p)}; optimize the leaf "
                              "tensors it was computed from (or .detach() it and set requires_grad)")
        if not is_floating(np.dtype(p.dtype)):
            raise EngineError(f"{name}: parameters must be floating point, got {describe(p)}")
    if len({id(p) for p in items}) != len(items):
        raise EngineError(f"{name}: a param group lists the same parameter more than once")
    return items


def _split_state_dict(name: str, state_dict) -> tuple[list, dict]:
    if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
        keys = sorted(map(str, state_dict)) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise EngineError(f"{name}: expected a dict with keys 'state' and 'param_groups', got {keys}")
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups):
        raise EngineError(f"{name}: 'param_groups' must be a list of dicts")
    if not isinstance(state, dict):
        raise EngineError(f"{name}: 'state' must be a dict of parameter index -> state")
    return list(groups), {_as_index(name, k): v for k, v in state.items()}


def _as_index(name: str, key) -> int:
    if isinstance(key, str) and key.isdigit():
        return int(key)  # JSON-style keys
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise EngineError(f"{name}: parameter indices must be ints, got {key!r}")
    return int(key)


def _saved_indices(name: str, g: int, saved: dict) -> list[int]:
    if "params" not in saved or not isinstance(saved["params"], (list, tuple)):
        raise EngineError(f"{name}: param group {g} of the state dict has no 'params' list of indices")
    return [_as_index(name, k) for k in saved["params"]]


# A step count must leave room for step + 1 in the kernels' int64.
_MAX_STEP = 2**63 - 2


def _as_step(name: str, index, value) -> int:
    """A saved step count as an int: a non-negative Python/numpy int or a one-element integer array."""
    expected = (f"{name}: 'step' of parameter {index} must be a non-negative int (the number of steps taken, "
                f"at most {_MAX_STEP})")
    if isinstance(value, Tensor) or backend.is_array(value):
        if int(np.prod(value.shape)) != 1 or np.dtype(value.dtype).kind not in "iu":
            raise EngineError(f"{expected}, got an array of shape {tuple(value.shape)} and dtype {value.dtype}")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise EngineError(f"{expected}, got {value!r} of type {type(value).__name__}")
    if not 0 <= value <= _MAX_STEP:
        raise EngineError(f"{expected}, got {value!r}")
    return int(value)


def _saved_hyperparam(name: str, g: int, key: str, value, current):
    """``value`` if it is the kind of value this optimizer holds for ``key`` (the constructor's range checks
    run afterwards); keys this optimizer does not have are kept as they are, as PyTorch does."""
    def is_real(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))

    if isinstance(current, bool):
        ok, expected = isinstance(value, (bool, np.bool_)), "True or False"
        value = bool(value) if ok else value
    elif is_real(current):
        ok, expected = is_real(value), "a real number"
    elif isinstance(current, tuple):
        ok = isinstance(value, tuple) and len(value) == len(current) and all(map(is_real, value))
        expected = f"a tuple of {len(current)} real numbers"
    elif isinstance(current, str):
        ok, expected = isinstance(value, str), "a string"
    else:
        return value
    if not ok:
        raise EngineError(f"{name}: param group {g} of the state dict has {key}={value!r}; expected {expected}, "
                          f"like this optimizer's {key}={current!r}")
    return value


def _plain(value):
    """Loaded hyperparameters as plain Python values (tuples stay tuples, lists become tuples
    where PyTorch uses tuples, e.g. betas)."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---- what the optimizers' updates share ---------------------------------------------------------

def sqrt_for(value):
    """``math.sqrt`` for a number, the array module's sqrt for a (device) array."""
    return backend.array_module(value).sqrt if backend.is_array(value) else math.sqrt


def as_step_scalars(dtype, *values):
    """Per-step scalars in the parameters' dtype: Python floats stay (they never promote), arrays
    computed from a device step count are cast (a float64 0-d array would promote float32 math)."""
    return tuple(v.astype(dtype) if backend.is_array(v) else v for v in values)


# ---- hyperparameter checks shared by the optimizers -------------------------------------------

def is_normal_positive(value: float, dtype) -> bool:
    """Is ``value`` a positive normal number in ``dtype`` (so not flushed to zero by -ftz)?"""
    return value >= np.finfo(dtype).tiny


def check_number(opt: str, name: str, value, low: float = 0.0, high: float | None = None,
                 high_open: bool = False) -> None:
    """Raise EngineError unless ``low <= value <= high`` (or ``< high`` when ``high_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise EngineError(f"{opt}: {name} must be a finite real number, got {value!r}")
    if value < low:
        raise EngineError(f"{opt}: invalid {name}={value!r}; it must be >= {low}")
    if high is not None and (value >= high if high_open else value > high):
        raise EngineError(f"{opt}: invalid {name}={value!r}; it must be {'<' if high_open else '<='} {high}")
