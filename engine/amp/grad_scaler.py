"""``engine.amp.GradScaler``: dynamic loss scaling, PyTorch's ``torch.amp.GradScaler``.

Same API and semantics as PyTorch's (``scale``, ``unscale_``, ``step``, ``update``, the
``get_*`` / ``set_*`` accessors, ``state_dict`` with the same keys, pickling), and the same
device-side design: the scale, the growth tracker and the inf/NaN flags are device arrays, and
nothing in ``scale`` / ``unscale_`` / ``step`` / ``update`` reads them on the host.

- ``unscale_(opt)`` checks every gradient for inf/NaN and multiplies it by ``1 / scale`` in place,
  recording one ``found_inf`` flag per device (PyTorch's ``_amp_foreach_non_finite_check_and_unscale_``).
- ``step(opt)``: engine optimizers say ``_step_supports_amp_scaling`` (as PyTorch's fused ones do):
  the scaler checks the gradients (without unscaling them, unless ``unscale_`` already did), sets
  ``opt.grad_scale`` and ``opt.found_inf`` and calls ``opt.step()``; the fused kernels unscale the
  gradient inside the update and write nothing when ``found_inf`` is set. Step counts stay on the
  device until a checkpoint reads them (engine/optim/optimizer.py), so a skipped step leaves
  parameters, states and step counts exactly as PyTorch's host-side skip does. Other optimizers
  get PyTorch's generic path: ``unscale_``, then a host read of ``found_inf`` to decide whether to
  call ``opt.step()`` (one sync per step, as in PyTorch).
- ``update()`` is PyTorch's ``_amp_update_scale_`` as array ops (:func:`_amp_update_scale_`).

A misuse that PyTorch answers with a ``RuntimeError`` (``unscale_`` twice, ``step`` twice
before ``update``) raises :class:`GradScalerError`, an ``EngineError`` that is also a ``RuntimeError``.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections import abc, defaultdict
from enum import Enum

import numpy as np

from engine import backend, dtypes
from engine.errors import EngineError, describe
from engine.tensor import Tensor

__all__ = ["GradScaler", "GradScalerError", "OptState"]


class GradScalerError(EngineError, RuntimeError):
    """GradScaler methods called out of order (PyTorch raises RuntimeError for these)."""


class OptState(Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


def _refresh_per_optimizer_state() -> dict:
    return {"stage": OptState.READY, "found_inf_per_device": {}}


def check_and_unscale_(grads, inv_scale=None, found_inf=None):
    """One array's part of PyTorch's ``_amp_foreach_non_finite_check_and_unscale_``.

    Returns ``found_inf`` (a 0-d float32 array) set to 1.0 if ``grads`` holds an inf or NaN
    (checked before unscaling), and multiplies ``grads`` in place by ``inv_scale`` (a 0-d float32
    array on its device) unless that is None; a float16 / bfloat16 array is unscaled in float32
    and rounded once. Array ops only: nothing is read on the host.
    """
    xp = backend.array_module(grads)
    bad = xp.asarray(~xp.all(xp.isfinite(grads)), dtype=np.float32)  # numpy gives a scalar: keep a 0-d array
    found = bad if found_inf is None else xp.maximum(found_inf, bad)
    if inv_scale is not None:
        if dtypes.is_low_precision(grads.dtype):
            grads[...] = dtypes.upcast(grads) * inv_scale
        else:
            grads *= inv_scale
    return found


def _amp_update_scale_(scale, growth_tracker, found_inf, growth_factor: float, backoff_factor: float,
                       growth_interval: int) -> None:
    """PyTorch's ``torch._amp_update_scale_``, in place on device arrays, with no host read.

    An inf/NaN found: ``scale *= backoff_factor`` and the tracker restarts at 0. Otherwise the
    tracker counts the successful step; at ``growth_interval`` the scale grows by
    ``growth_factor`` (unless that would overflow float32) and the tracker restarts. The products
    are computed in float64 and rounded to float32, as PyTorch's kernels multiply a float scale by
    a double factor.
    """
    xp = backend.array_module(scale)
    found = found_inf != 0
    successful = growth_tracker + 1
    grow = ~found & (successful == growth_interval)
    wide = scale.astype(np.float64)
    grown = (wide * growth_factor).astype(np.float32)
    backed_off = (wide * backoff_factor).astype(np.float32)
    new_scale = xp.where(found, backed_off, xp.where(grow & xp.isfinite(grown), grown, scale))
    new_tracker = xp.where(found | grow, 0, successful)
    scale[...] = new_scale
    growth_tracker[...] = new_tracker


def _as_tensor(array) -> Tensor:
    return Tensor._from_op(array, None)


def _raw(value):
    return value._data if isinstance(value, Tensor) else value


class GradScaler:
    """Dynamic loss scaling for float16 training (PyTorch's ``torch.amp.GradScaler``).

    ``scale(loss)`` multiplies the loss by the current scale factor, ``step(optimizer)`` unscales
    the gradients and steps unless they hold an inf or NaN, and ``update()`` adapts the scale:
    times ``backoff_factor`` after a skipped step, times ``growth_factor`` after
    ``growth_interval`` consecutive steps without one. Every decision is made on the device: a
    training step with a scaler reads nothing on the host (engine optimizers; see the module
    docstring).

    Args:
        device: ``"cuda"`` (default, as PyTorch) or ``"cpu"``. ``"cuda"`` on a machine without a
            GPU warns and disables the scaler, as PyTorch does.
        init_scale: the first scale factor.
        growth_factor: factor the scale grows by after ``growth_interval`` steps without inf/NaN
            gradients; must be > 1.
        backoff_factor: factor the scale shrinks by when a step finds inf/NaN gradients; must be < 1.
        growth_interval: consecutive unskipped steps before the scale grows.
        enabled: ``False`` makes every method a pass-through (``step`` calls ``optimizer.step()``).

    Example:
        >>> scaler = engine.amp.GradScaler("cpu")                    # doctest: +SKIP
        >>> scaler.scale(loss).backward()                            # doctest: +SKIP
        >>> scaler.step(optimizer)                                   # doctest: +SKIP
        >>> scaler.update()                                          # doctest: +SKIP
    """

    def __init__(self, device: str = "cuda", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True) -> None:
        self._device = device
        self._enabled = enabled
        if self._device == "cuda" and enabled and not backend.cuda_available():
            warnings.warn("engine.amp.GradScaler is enabled, but CUDA is not available.  Disabling.", stacklevel=2)
            self._enabled = False
        if self._enabled:
            if growth_factor <= 1.0:
                raise EngineError(f"GradScaler: The growth factor must be > 1.0, got {growth_factor!r}")
            if backoff_factor >= 1.0:
                raise EngineError(f"GradScaler: The backoff factor must be < 1.0, got {backoff_factor!r}")
            self._init_scale = init_scale
            self._scale = None  # a 0-d float32 device array, made by the first scale()
            self._growth_factor = growth_factor
            self._backoff_factor = backoff_factor
            self._growth_interval = growth_interval
            self._init_growth_tracker = 0
            self._growth_tracker = None  # a 0-d int32 device array, made with _scale
            self._per_optimizer_states: dict = defaultdict(_refresh_per_optimizer_state)

    # ---- the scale ----------------------------------------------------------------------------
    def _check_scale_growth_tracker(self, funcname: str):
        fix = "This may indicate your script did not use scaler.scale(loss or outputs) earlier in the iteration."
        if self._scale is None:
            raise EngineError(f"Attempted {funcname} but _scale is None.  " + fix)
        if self._growth_tracker is None:
            raise EngineError(f"Attempted {funcname} but _growth_tracker is None.  " + fix)
        return self._scale, self._growth_tracker

    def _lazy_init_scale_growth_tracker(self, device) -> None:
        xp = backend.xp_for(device)
        with backend.on_device(device):
            self._scale = xp.full((), self._init_scale, dtype=np.float32)
            self._growth_tracker = xp.full((), self._init_growth_tracker, dtype=np.int32)

    def scale(self, outputs):
        """Multiply ``outputs`` (a Tensor, or nested lists / tuples / iterables of Tensors) by the
        scale factor; the result has the structure of ``outputs``. A pass-through when disabled.

        The scale is a 0-d float32 tensor, so PyTorch's promotion applies: a float16 loss of one
        element becomes float32, a float16 tensor with dimensions stays float16.
        """
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            if self._scale is None:
                self._lazy_init_scale_growth_tracker(backend.device_of(outputs._data))
            return outputs * _as_tensor(backend.to_device(self._scale, backend.device_of(outputs._data)))
        per_device: dict = {}

        def apply_scale(val):
            if isinstance(val, Tensor):
                device = backend.device_of(val._data)
                if self._scale is None:
                    self._lazy_init_scale_growth_tracker(device)
                if device not in per_device:
                    per_device[device] = _as_tensor(backend.to_device(self._scale, device))
                return val * per_device[device]
            if isinstance(val, abc.Iterable) and not isinstance(val, (str, bytes)):
                iterable = map(apply_scale, val)
                if isinstance(val, (list, tuple)):
                    return type(val)(iterable)
                return iterable
            raise EngineError(f"GradScaler.scale: outputs must be a Tensor or an iterable of Tensors, got "
                              f"{describe(val)}")

        return apply_scale(outputs)

    # ---- unscale and step ---------------------------------------------------------------------
    def _unscale_grads_(self, optimizer, inv_scale, allow_fp16: bool) -> dict:
        """{device: found_inf} for ``optimizer``'s gradients, unscaled in place by ``inv_scale``
        (None: only checked). Engine optimizers do it on their flat gradient buffers; any other
        optimizer is walked parameter by parameter."""
        own = getattr(optimizer, "_amp_unscale_grads_", None)
        if callable(own):
            return own(inv_scale, allow_fp16)
        found: dict = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad._data
                if not allow_fp16 and grad.dtype == np.float16:
                    raise EngineError("Attempting to unscale FP16 gradients.")
                device = backend.device_of(grad)
                inv = None if inv_scale is None else backend.to_device(inv_scale, device)
                with backend.on_device(device):
                    found[device] = check_and_unscale_(grad, inv, found.get(device))
        return found

    def unscale_(self, optimizer) -> None:
        """Divide ("unscale") ``optimizer``'s gradients by the scale factor, in place.

        Optional: call it between ``backward`` and :meth:`step` to work with the true gradients
        (gradient clipping); :meth:`step` then does not unscale again. At most once per optimizer
        between two :meth:`update` calls, and before :meth:`step`. float16 gradients are refused,
        as PyTorch does. Reads nothing on the host.

        Example:
            >>> scaler.scale(loss).backward()                                     # doctest: +SKIP
            >>> scaler.unscale_(optimizer)                                        # doctest: +SKIP
            >>> engine.nn.utils.clip_grad_norm_(model.parameters(), 1.0)          # doctest: +SKIP
            >>> scaler.step(optimizer); scaler.update()                           # doctest: +SKIP
        """
        if not self._enabled:
            return
        self._check_scale_growth_tracker("unscale_")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.UNSCALED:
            raise GradScalerError("unscale_() has already been called on this optimizer since the last update().")
        if optimizer_state["stage"] is OptState.STEPPED:
            raise GradScalerError("unscale_() is being called after step().")
        # The reciprocal in float64, as PyTorch does (float32 division can be imprecise).
        xp = backend.array_module(self._scale)
        inv_scale = xp.asarray(1.0 / self._scale.astype(np.float64), dtype=np.float32)
        optimizer_state["found_inf_per_device"] = self._unscale_grads_(optimizer, inv_scale, False)
        optimizer_state["stage"] = OptState.UNSCALED

    def _check_inf_per_device(self, optimizer) -> dict:
        self._check_scale_growth_tracker("_check_inf_per_device")
        self._per_optimizer_states[id(optimizer)]["found_inf_per_device"] = self._unscale_grads_(optimizer, None, True)
        return self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]

    def _found_inf_per_device(self, optimizer) -> dict:
        return self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]

    def _combined_found_inf(self, found_infs):
        """The sum of ``found_infs`` on the scale's device (a 0-d float32 array; 0 for none)."""
        device = backend.device_of(self._scale)
        xp = backend.xp_for(device)
        total = xp.zeros((), dtype=np.float32)
        for found_inf in found_infs:
            total = total + backend.to_device(found_inf, device)
        return xp.asarray(total, dtype=np.float32)

    def _maybe_opt_step(self, optimizer, optimizer_state: dict, *args, **kwargs):
        # PyTorch's path for optimizers without device-side scaling support: a host read per step.
        found = sum(float(backend.to_host(v)) for v in optimizer_state["found_inf_per_device"].values())
        return None if found else optimizer.step(*args, **kwargs)

    def step(self, optimizer, *args, **kwargs):
        """Step ``optimizer`` with unscaled gradients, unless they hold an inf or NaN.

        Unscales first unless :meth:`unscale_` was called for this optimizer in this iteration.
        With an engine optimizer the check, the unscale and the skip all happen on the device
        (``optimizer.step()`` is always called, with ``grad_scale`` / ``found_inf`` set, and its
        fused kernels write nothing when an inf or NaN was found); other optimizers are stepped
        only if no inf/NaN was found, which reads the flag on the host. ``*args`` / ``**kwargs``
        go to ``optimizer.step``; a ``closure`` is refused, as in PyTorch.

        Returns:
            What ``optimizer.step`` returns (None for a skipped step on the host path).
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise GradScalerError("Closure use is not currently supported if GradScaler is enabled.")
        self._check_scale_growth_tracker("step")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        if optimizer_state["stage"] is OptState.STEPPED:
            raise GradScalerError("step() has already been called since the last update().")
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            return self._device_step(optimizer, optimizer_state, *args, **kwargs)
        if optimizer_state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        if len(optimizer_state["found_inf_per_device"]) == 0:
            raise EngineError("No inf checks were recorded for this optimizer.")
        retval = self._maybe_opt_step(optimizer, optimizer_state, *args, **kwargs)
        optimizer_state["stage"] = OptState.STEPPED
        return retval

    def _device_step(self, optimizer, optimizer_state: dict, *args, **kwargs):
        """PyTorch's path for optimizers with ``_step_supports_amp_scaling``: they read
        ``grad_scale`` (None once unscale_ ran) and ``found_inf`` and skip on the device."""
        if optimizer_state["stage"] is OptState.READY:
            self._check_inf_per_device(optimizer)
        found_inf = self._combined_found_inf(optimizer_state["found_inf_per_device"].values())
        if optimizer_state["stage"] is OptState.UNSCALED:
            grad_scale = getattr(optimizer, "grad_scale", None)
        else:
            grad_scale = _as_tensor(self._scale) * getattr(optimizer, "grad_scale", 1)
        optimizer.grad_scale, optimizer.found_inf = grad_scale, _as_tensor(found_inf)
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:  # never left behind for a later plain optimizer.step() to honour
            del optimizer.grad_scale
            del optimizer.found_inf
        optimizer_state["stage"] = OptState.STEPPED
        return retval

    def update(self, new_scale=None) -> None:
        """Update the scale factor for the next iteration (call it once per iteration, after
        :meth:`step` for every optimizer).

        Without ``new_scale``: times ``backoff_factor`` if any optimizer's step found an inf/NaN,
        times ``growth_factor`` after ``growth_interval`` consecutive clean steps (on the device).
        ``new_scale`` (a float, or a one-element tensor on the scaler's device type that does not
        require grad) sets the scale instead.
        """
        if not self._enabled:
            return
        _scale, _growth_tracker = self._check_scale_growth_tracker("update")
        if new_scale is not None:
            self._set_scale(new_scale)
        else:
            found_infs = [found_inf for state in self._per_optimizer_states.values()
                          for found_inf in state["found_inf_per_device"].values()]
            if len(found_infs) == 0:
                raise EngineError("No inf checks were recorded prior to update.")
            with backend.on_device(backend.device_of(_scale)):
                _amp_update_scale_(_scale, _growth_tracker, self._combined_found_inf(found_infs),
                                   self._growth_factor, self._backoff_factor, self._growth_interval)
        self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)

    def _set_scale(self, new_scale) -> None:
        if isinstance(new_scale, numbers.Real) and not isinstance(new_scale, bool):
            self._scale.fill(float(new_scale))
            return
        reason = ("new_scale should be a float or a 1-element torch.cuda.FloatTensor or "
                  "torch.FloatTensor with requires_grad=False.")
        if (not isinstance(new_scale, Tensor) or new_scale.device.type != self._device or new_scale.numel() != 1
                or new_scale.requires_grad):
            raise EngineError(f"GradScaler.update: {reason} Got {describe(new_scale)} for a {self._device!r} scaler.")
        device = backend.device_of(self._scale)
        self._scale[...] = backend.to_device(new_scale._data, device).reshape(()).astype(np.float32)

    # ---- accessors ----------------------------------------------------------------------------
    def _get_scale_async(self):
        return None if self._scale is None else _as_tensor(self._scale)

    def get_scale(self) -> float:
        """The current scale as a Python float (1.0 when disabled). Reads the device (a sync)."""
        if self._enabled:
            return self._init_scale if self._scale is None else float(backend.to_host(self._scale))
        return 1.0

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def set_growth_factor(self, new_factor: float) -> None:
        self._growth_factor = new_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def set_backoff_factor(self, new_factor: float) -> None:
        self._backoff_factor = new_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def set_growth_interval(self, new_interval: int) -> None:
        self._growth_interval = new_interval

    def _get_growth_tracker(self) -> int:
        if self._enabled:
            if self._growth_tracker is None:
                return self._init_growth_tracker
            return int(backend.to_host(self._growth_tracker))
        return 0

    def is_enabled(self) -> bool:
        return self._enabled

    # ---- checkpoints --------------------------------------------------------------------------
    _STATE_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")

    def state_dict(self) -> dict:
        """PyTorch's five entries: ``scale``, ``growth_factor``, ``backoff_factor``,
        ``growth_interval``, ``_growth_tracker`` (Python numbers; {} when disabled). Reads the
        device: call it after :meth:`update`, where the loop syncs anyway."""
        if self._enabled:
            return {"scale": self.get_scale(), "growth_factor": self._growth_factor,
                    "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                    "_growth_tracker": self._get_growth_tracker()}
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (a no-op when disabled)."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise GradScalerError("The source state dict is empty, possibly because it was saved "
                                  "from a disabled instance of GradScaler.")
        missing = [key for key in self._STATE_KEYS if key not in state_dict]
        if missing:
            raise EngineError(f"GradScaler.load_state_dict: the state dict lacks {missing}; expected the keys "
                              f"{list(self._STATE_KEYS)} of GradScaler.state_dict()")
        self._init_scale = float(state_dict["scale"])
        if self._scale is not None:
            self._scale.fill(self._init_scale)
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        if self._growth_tracker is not None:
            self._growth_tracker.fill(self._init_growth_tracker)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self._enabled:
            if len(self._per_optimizer_states) != 0:
                raise GradScalerError("A GradScaler instance may only be pickled at the beginning "
                                      "of an iteration, or at the end after scaler.update().")
            state["_init_scale"] = self.get_scale()
            state["_init_growth_tracker"] = self._get_growth_tracker()
            state["_scale"] = None
            state["_growth_tracker"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


@functools.cache
def legacy_grad_scaler(device_type: str) -> type:
    """``engine.cuda.amp.GradScaler`` / ``engine.cpu.amp.GradScaler``: PyTorch's deprecated
    spellings of ``GradScaler(device_type, ...)``, warning as PyTorch does."""

    class DeviceGradScaler(GradScaler):
        def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                     growth_interval: int = 2000, enabled: bool = True) -> None:
            warnings.warn(f"`engine.{device_type}.amp.GradScaler(args...)` is deprecated. Please use "
                          f"`engine.amp.GradScaler('{device_type}', args...)` instead.", FutureWarning, stacklevel=2)
            super().__init__(device_type, init_scale=init_scale, growth_factor=growth_factor,
                             backoff_factor=backoff_factor, growth_interval=growth_interval, enabled=enabled)

    DeviceGradScaler.__name__ = DeviceGradScaler.__qualname__ = "GradScaler"
    return DeviceGradScaler
