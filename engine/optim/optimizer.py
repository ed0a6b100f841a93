"""The Optimizer base class: param groups, flat buffers, fused kernel launches, state dicts.

Storage. For each param group the optimizer keeps one :class:`_Bucket` per (device, dtype) of
its parameters. A bucket owns

* ``flat``: one contiguous buffer holding every parameter of the bucket; each parameter's
  ``._data`` is rebound to a shaped view into it, so the kernel updates the model in place with
  no copy;
* ``grad_flat``: one contiguous gradient buffer; gradients are copied into it before the step
  (one ``concatenate``) unless they already are views of it, which ``zero_grad(set_to_none=False)``
  arranges (backward then accumulates straight into the buffer);
* one flat buffer per state (``exp_avg``, ``momentum_buffer`` ...), allocated on first need.

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
"""

from __future__ import annotations

import collections

import math
import numbers

import numpy as np

from engine import backend, dtypes
from engine.autograd import enable_grad, no_grad
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


def _address(array) -> int:
    """Address of an array's first element (numpy: host memory; cupy: device memory)."""
    if isinstance(array, np.ndarray):
        return array.__array_interface__["data"][0]
    return array.data.ptr  # cupy: a MemoryPointer


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
    shift = (-_address(raw) % FLAT_ALIGNMENT_BYTES) // itemsize
    buffer = raw[shift:shift + numel]
    buffer.fill(fill)
    return buffer


class _Bucket:
    """The parameters of one group that share a device and dtype, laid out in flat buffers."""

    def __init__(self, params: list[Tensor]):
        first = params[0]._data
        self.params = params
        self.device = backend.device_of(first)
        self.dtype = first.dtype
        self.xp = backend.array_module(first)
        self.shapes = [p.shape for p in params]  # as bound; a rebound ._data may have another
        self.starts, self.stops, self.numel = _aligned_layout([int(p._data.size) for p in params],
                                                              self.dtype.itemsize)
        with backend.on_device(self.device):
            self.flat = _aligned_full(self.xp, self.numel, 0, self.dtype)  # padding: 0
            for p, start, stop in zip(params, self.starts, self.stops):
                self.flat[start:stop] = p._data.reshape(-1)
        self.views = [self._view(self.flat, i) for i in range(len(params))]
        self.grad_flat = None
        self.grad_views: list = []
        self._zero_pad = None  # zeros as long as the longest gap, to gather grads with one concatenate
        self.buffers: dict = {}  # state name -> flat array
        self.steps = [0] * len(params)
        self.has: list[set[str]] = [set() for _ in params]  # state names initialized per param

    def _view(self, flat, i: int):
        return flat[self.starts[i]:self.stops[i]].reshape(self.shapes[i])

    def bind(self) -> None:
        """Rebind every parameter's ``._data`` to its view of ``flat``."""
        for p, view in zip(self.params, self.views):
            p._data = view

    def is_bound(self) -> bool:
        return all(p._data is view for p, view in zip(self.params, self.views))

    def buffer(self, name: str, fill: float):
        """The flat state buffer ``name``, created filled with ``fill`` on first use."""
        if name not in self.buffers:
            with backend.on_device(self.device):
                self.buffers[name] = _aligned_full(self.xp, self.numel, fill, self.dtype)
        return self.buffers[name]

    def state_view(self, name: str, i: int):
        return self._view(self.buffers[name], i)

    def _ensure_grad_flat(self):
        if self.grad_flat is None:
            with backend.on_device(self.device):
                self.grad_flat = _aligned_full(self.xp, self.numel, 0, self.dtype)  # padding: 0
                self._zero_pad = self.xp.zeros(FLAT_ALIGNMENT_BYTES // self.dtype.itemsize, dtype=self.dtype)
            self.grad_views = [self._view(self.grad_flat, i) for i in range(len(self.params))]
        return self.grad_flat

    def gather_grads(self, active: list[int]):
        """``grad_flat`` holding the grads of the ``active`` params (other slices: stale).

        Grads that already are views of ``grad_flat`` (see :meth:`zero_grads`) are not copied;
        the others are copied in, with one ``concatenate`` (of the grads and zero padding) when
        every grad needs copying. Padding is only ever written with zeros.
        """
        grad_flat = self._ensure_grad_flat()
        stale = [i for i in active if self.params[i].grad._data is not self.grad_views[i]]
        if len(stale) == len(self.params):
            self.xp.concatenate(self._grads_and_padding(), out=grad_flat)
        else:
            for i in stale:
                grad_flat[self.starts[i]:self.stops[i]] = self.params[i].grad._data.reshape(-1)
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

        One fill zeros them all; the next backward accumulates in place into the views, so the
        next step copies nothing. The grad Tensors stay the same objects (only their ``._data``
        is rebound), so a caller holding ``p.grad`` sees zeros, as with an in-place zero.
        """
        if all(p.grad is None for p in self.params):
            return
        self._ensure_grad_flat().fill(0)
        for p, view in zip(self.params, self.grad_views):
            if p.grad is not None:
                p.grad._data = view

    def export(self, i: int, step: bool, copy: bool) -> dict | None:
        """The state of param ``i`` as {"step"?, name: Tensor}, or None when it has none."""
        if not self.has[i] and not (step and self.steps[i]):
            return None
        entry = {"step": self.steps[i]} if step else {}
        for name in sorted(self.has[i]):
            view = self.state_view(name, i)
            entry[name] = Tensor(view.copy() if copy else view)
        return entry

    def unpack(self) -> dict:
        """Per-parameter state, detached from the flat buffers: {param: {"step", name: array}}."""
        out = {}
        for i, p in enumerate(self.params):
            entry = {"step": self.steps[i]}
            for name in self.has[i]:
                entry[name] = self.state_view(name, i).copy()
            out[p] = entry
        return out


class Optimizer:
    """Base class of the optimizers: param groups, flat state buffers, fused steps, state dicts.

    Subclasses define the hyperparameter checks, which flat state buffers a group needs, and the
    update twice: ``_fused_update`` (one kernel launch on flat slices) and ``_reference_update``
    (plain array code on one parameter).

    Args:
        params: an iterable of Tensors, or of dicts each holding ``"params"`` (an iterable of
            Tensors) and per-group hyperparameters that override ``defaults``.
        defaults: the hyperparameters of a group that does not set them.
        fused: ``True`` or ``None`` (default): update each bucket with one fused kernel launch;
            ``False``: the unfused per-parameter reference path.
    """

    # Does the per-parameter state carry a "step" count (exported in state_dict)?
    _exports_step = True

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
        group = dict(self.defaults)
        group.update(param_group)
        group["params"] = _as_param_list(name, param_group.get("params"))
        self._check_hyperparams(group)
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
            bucket.bind()
        self.param_groups.append(group)
        self._buckets.append(buckets)
        self._group_params.append(tuple(group["params"]))

    def _pack(self, group: dict, state: dict) -> list[_Bucket]:
        """New buckets for ``group`` holding ``state`` ({param: {"step", name: array or None}}).

        A state array of None means "initialized to the buffer's fill value". Nothing is bound:
        the caller binds once every group has been built, so a failure changes nothing.
        """
        by_kind: dict[tuple, list[Tensor]] = {}
        for p in group["params"]:
            by_kind.setdefault((backend.device_of(p._data), p._data.dtype.str), []).append(p)
        buckets = [_Bucket(params) for params in by_kind.values()]
        for bucket in buckets:
            for i, p in enumerate(bucket.params):
                entry = state.get(p)
                if not entry:
                    continue
                bucket.steps[i] = int(entry.get("step", 0))
                for name, value in entry.items():
                    if name == "step":
                        continue
                    bucket.buffer(name, self._buffer_fill(group, name))
                    if value is not None:
                        if tuple(value.shape) != p.shape:
                            raise EngineError(f"{type(self).__name__}: parameter {describe(p)} changed shape since "
                                              f"its state {name!r} {tuple(value.shape)} was made; the state no "
                                              "longer fits: build a new optimizer for the resized model")
                        view = bucket.state_view(name, i)
                        view[...] = backend.to_device(value, bucket.device).astype(bucket.dtype, copy=False)
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
                bucket.bind()
            self._buckets[index] = buckets
            self._group_params[index] = tuple(group["params"])

    # ---- the step ------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter.

        Args:
            set_to_none: ``True`` (default) sets ``.grad`` to None (the next backward allocates
                fresh grads; the step then copies them into the flat grad buffer, one
                ``concatenate`` per bucket). ``False`` zeros the existing grads with one fill per
                bucket and makes them views of the flat grad buffer: backward then accumulates
                straight into it and the step copies nothing. Grads that are None stay None.
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
                self._check_hyperparams(group)
            plans = [[(bucket, self._active(index, bucket)) for bucket in buckets]
                     for index, buckets in enumerate(self._buckets)]
            for group, group_plan in zip(self.param_groups, plans):
                for bucket, active in group_plan:
                    if active:
                        self._step_bucket(group, bucket, active)
        return loss

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

    def _step_bucket(self, group: dict, bucket: _Bucket, active: list[int]) -> None:
        names = self._buffer_names(group)
        for name in names:
            bucket.buffer(name, self._buffer_fill(group, name))
        if self.fused and bucket.dtype in _KERNEL_DTYPES:
            grad_flat = bucket.gather_grads(active)
            for first, last, key in self._runs(group, bucket, active):
                lo, hi = bucket.starts[first], bucket.stops[last]  # spans the padding between
                if hi > lo:
                    buffers = {name: bucket.buffers[name][lo:hi] for name in names}
                    self._fused_update(group, bucket.flat[lo:hi], grad_flat[lo:hi], buffers, key)
        else:
            for i in active:
                buffers = {name: bucket.state_view(name, i) for name in names}
                update = self._low_precision_update if dtypes.is_low_precision(bucket.dtype) else self._reference_update
                update(group, bucket.params[i]._data, bucket.params[i].grad._data, buffers,
                       self._run_key(group, bucket, i))
        for i in active:
            bucket.steps[i] += 1
            bucket.has[i].update(names)
            bucket.params[i]._version.value += 1  # an in-place change: a graph that saved it must not backward

    def _low_precision_update(self, group: dict, param, grad, buffers: dict, key) -> None:
        """The update of a float16/bfloat16 parameter computed in float32 and rounded once into the
        parameter and its states (the engine's compute rule, see engine/dtypes.py): op by op in 16
        bits, Adam's eps (1e-8) rounds to 0 in float16 and sqrt(v) + eps divides by zero."""
        wide = {name: dtypes.upcast(b) for name, b in buffers.items()}
        wide_param = dtypes.upcast(param)
        self._reference_update(group, wide_param, dtypes.upcast(grad), wide, key)
        param[...] = wide_param
        for name, b in buffers.items():
            if b is not None:
                b[...] = wide[name]

    def _runs(self, group: dict, bucket: _Bucket, active: list[int]):
        """Maximal runs (first, last, key) of consecutive active params with the same key.

        A run spans the padding between its params only where that padding stays harmless.
        """
        runs = []
        span_padding = self._padding_is_safe(group, bucket.dtype)
        for i in active:
            key = self._run_key(group, bucket, i)
            if (runs and runs[-1][1] == i - 1 and runs[-1][2] == key
                    and (span_padding or bucket.stops[i - 1] == bucket.starts[i])):
                runs[-1][1] = i
            else:
                runs.append([i, i, key])
        return runs

    # ---- the finite check ----------------------------------------------------------------------
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
        self._sync()
        for index, buckets in enumerate(self._buckets):
            for bucket in buckets:
                active = self._active(index, bucket)
                if not active:
                    continue
                grad_flat, views = bucket.gather_grads(active), bucket.grad_views
                for i in active:
                    grad = bucket.params[i].grad
                    if grad._data is not views[i]:
                        grad._data = views[i]
                # The padding between params is 0: one span covers a run of consecutive params.
                spans = [(0, bucket.numel)] if len(active) == len(bucket.params) else _active_spans(bucket, active)
                xp = bucket.xp
                with backend.on_device(bucket.device):
                    for lo, hi in spans:
                        flag = _and_flags(flag, xp.all(xp.isfinite(grad_flat[lo:hi]), keepdims=True))
        return flag

    # ---- inspection and checkpoints ------------------------------------------------------------
    @property
    def state(self) -> dict:
        """{param: {"step": int, name: Tensor}} for every param with state; the Tensors are live
        views of the flat buffers (read them; they go stale when the buckets are rebuilt)."""
        self._sync()
        out = {}
        for buckets in self._buckets:
            for bucket in buckets:
                for i, p in enumerate(bucket.params):
                    entry = bucket.export(i, self._exports_step, copy=False)
                    if entry is not None:
                        out[p] = entry
        return out

    def state_dict(self) -> dict:
        """A snapshot of the optimizer: ``{"state": {index: {...}}, "param_groups": [...]}``.

        Parameters are named by their index in the order of ``param_groups``; state arrays are
        copied Tensors on the parameter's device, hyperparameters plain numbers, so the result
        can be stored with :func:`engine.save` and restored with :meth:`load_state_dict`.
        """
        self._sync()
        state, groups, index = {}, [], 0
        for group, buckets in zip(self.param_groups, self._buckets):
            where = {id(p): (b, i) for b in buckets for i, p in enumerate(b.params)}
            indices = []
            for p in group["params"]:
                bucket, i = where[id(p)]
                entry = bucket.export(i, self._exports_step, copy=True)
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
        raises an ``EngineError`` saying what was expected, and nothing changes.
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
            self._check_hyperparams(new_group)
            allowed = set(self._all_buffer_names())
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
                bucket.bind()
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
