"""Module and Parameter: the containers every layer and model is built from (PyTorch's API).

A Module registers the Parameters, buffers and sub-Modules assigned to its attributes, in
assignment order, so that ``parameters()``, ``state_dict()``, ``to()`` and ``train()`` reach the
whole tree without the model listing anything by hand.
"""

from __future__ import annotations

import numbers
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Iterator, NamedTuple

import numpy as np

from engine import backend, dlpack, dtypes
from engine._compile import compile as engine_compile
from engine.autograd import no_grad
from engine.dtypes import is_floating
from engine.errors import DTypeError, EngineError, ShapeError, describe
from engine.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module registers as a learnable parameter; requires grad by default.

    Args:
        data: a Tensor (its array is shared, not copied), an array or nested lists.
        requires_grad: whether the optimizer should train it.

    Example:
        >>> self.scale = nn.Parameter(engine.ones(8))   # doctest: +SKIP
    """

    __slots__ = ()

    def __init__(self, data=None, requires_grad: bool = True):
        super().__init__(np.zeros(0, np.float32) if data is None else data, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class IncompatibleKeys(NamedTuple):
    """What :meth:`Module.load_state_dict` returns: keys the model has that the state lacked, and
    keys of the state the model does not have."""

    missing_keys: list
    unexpected_keys: list


class StateDictError(EngineError):
    """A state dict does not fit the module (missing or unexpected keys under ``strict=True``)."""


class Module:
    """Base class of layers and models: subclass it, assign layers in ``__init__``, write ``forward``.

    Example:
        >>> class MLP(nn.Module):                                   # doctest: +SKIP
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.hidden = nn.Linear(784, 128)
        ...         self.out = nn.Linear(128, 10)
        ...     def forward(self, x):
        ...         return self.out(self.hidden(x).relu())
        >>> model = MLP(); logits = model(engine.randn(32, 784))    # doctest: +SKIP
    """

    def __init__(self):
        # object.__setattr__: our own __setattr__ needs these dicts to exist already.
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ---- calling --------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} is missing the required 'forward' method")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- registration ---------------------------------------------------------------------------
    def __setattr__(self, name: str, value) -> None:
        params = self.__dict__.get("_parameters")
        if isinstance(value, (Parameter, Module)) and params is None:
            raise AttributeError(f"cannot assign {type(value).__name__} {name!r} before Module.__init__() has run; "
                                 f"call super().__init__() first in {type(self).__name__}.__init__")
        if isinstance(value, Parameter):
            self._forget(name, keep=params)
            params[name] = value
        elif isinstance(value, Module):
            self._forget(name, keep=self._modules)
            self._modules[name] = value
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as parameter {name!r} of "
                                f"{type(self).__name__} (an nn.Parameter or None is expected); "
                                f"wrap it: nn.Parameter(value)")
            params[name] = None
        elif params is not None and name in self._modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} as child module {name!r} of "
                                f"{type(self).__name__} (a Module or None is expected)")
            self._modules[name] = None
        elif params is not None and name in self._buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign {type(value).__name__} as buffer {name!r} "
                                "(a Tensor or None is expected)")
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: parameters, buffers and children live in dicts.
        for store in ("_parameters", "_buffers", "_modules"):
            table = self.__dict__.get(store)
            if table is not None and name in table:
                return table[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        if not self._forget(name):
            object.__delattr__(self, name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._buffers) | set(self._modules))

    def _forget(self, name: str, keep=None) -> bool:
        """Drop ``name`` from every registry but ``keep`` (reassigning a parameter keeps its place
        in the order, as in PyTorch) and from the instance dict; True if it was registered."""
        found = False
        for table in (self._parameters, self._buffers, self._modules):
            if name in table and table is not keep:
                del table[name]
                found = True
        self._non_persistent.discard(name)
        self.__dict__.pop(name, None)
        return found

    def _check_new_name(self, kind: str, name: str) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot register {kind} {name!r} before Module.__init__() has run")
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"{kind} name must be a non-empty string without '.', got {name!r}")
        if hasattr(type(self), name):
            raise KeyError(f"{kind} name {name!r} clashes with an attribute of {type(self).__name__}")

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register ``param`` (or None, a declared-but-absent parameter such as a disabled bias)."""
        self._check_new_name("parameter", name)
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter: {name!r} must be an nn.Parameter or None, got {type(param).__name__}")
        self._forget(name, keep=self._parameters)
        self._parameters[name] = param

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Register a tensor that is state but not trained (running statistics, class weights ...).

        Buffers move with ``to()`` and, when ``persistent``, are saved in ``state_dict()``.
        """
        self._check_new_name("buffer", name)
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"register_buffer: {name!r} must be a Tensor or None, got {type(tensor).__name__}")
        self._forget(name, keep=self._buffers)
        self._non_persistent.discard(name)
        self._buffers[name] = tensor
        if not persistent:
            self._non_persistent.add(name)

    def add_module(self, name: str, module: Module | None) -> None:
        """Register ``module`` as a child called ``name`` (for names that are not identifiers)."""
        if "_modules" not in self.__dict__:
            raise AttributeError(f"cannot add module {name!r} before Module.__init__() has run")
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} must be a Module or None, got {type(module).__name__}")
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"module name must be a non-empty string without '.', got {name!r}")
        self._forget(name, keep=self._modules)
        self._modules[name] = module

    # ---- traversal ------------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        """Direct sub-modules with their attribute names, in registration order."""
        seen = set()
        for name, module in self._modules.items():
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module

    def children(self) -> Iterator[Module]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "", _seen: set | None = None) -> Iterator[tuple[str, Module]]:
        """This module and every descendant, pre-order, with dotted names ("" for this one).

        A module reachable twice (shared) is listed once, under its first name.
        """
        seen = set() if _seen is None else _seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, module in self._modules.items():
            if module is not None:
                yield from module.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self) -> Iterator[Module]:
        for _, module in self.named_modules():
            yield module

    def _named_members(self, store: str, recurse: bool, remove_duplicate: bool = True):
        seen = set()
        modules = self.named_modules() if recurse else [("", self)]
        for prefix, module in modules:
            for name, value in getattr(module, store).items():
                if value is None or (remove_duplicate and id(value) in seen):
                    continue
                seen.add(id(value))
                yield (f"{prefix}.{name}" if prefix else name), value

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """``(dotted name, Parameter)`` pairs; a parameter shared by two layers is listed once."""
        for name, param in self._named_members("_parameters", recurse, remove_duplicate):
            yield (f"{prefix}.{name}" if prefix else name), param

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """Every parameter once, in registration order: what an optimizer takes."""
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Tensor]]:
        for name, buf in self._named_members("_buffers", recurse):
            yield (f"{prefix}.{name}" if prefix else name), buf

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        for _, buf in self.named_buffers(recurse=recurse):
            yield buf

    def apply(self, fn) -> "Module":
        """Call ``fn(module)`` on every sub-module (children first) and on this one; e.g. custom init."""
        for module in self.children():
            module.apply(fn)
        fn(self)
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of scalar parameters (shared ones counted once); only trainable ones if asked."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- modes and gradients --------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        """Set training mode (dropout active ...) on this module and all descendants."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        """Evaluation mode: ``train(False)``."""
        return self.train(False)

    def compile(self, *args, **kwargs) -> None:
        """PyTorch's in-place ``Module.compile``: checks the arguments as ``engine.compile`` does and
        leaves the module as it is (the engine runs eagerly; engine/_compile.py says why)."""
        engine_compile(self, *args, **kwargs)

    def requires_grad_(self, requires_grad: bool = True) -> "Module":
        """Freeze (False) or unfreeze every parameter; frozen ones get no ``.grad`` in backward."""
        for param in self.parameters():
            param.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients: drop them (default, frees memory) or fill them with zeros."""
        for param in self.parameters():
            if set_to_none:
                param.grad = None
            elif param.grad is not None:
                param.grad._data.fill(0)

    # ---- devices and dtypes ---------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> "Module":
        """Move parameters and buffers to ``device`` and/or cast floating ones to ``dtype``, in place.

        The Parameter objects stay the same (their ``._data`` is replaced), so an optimizer that
        already holds them keeps working; gradients move with them. Integer buffers are not cast.

        Example:
            >>> model.to("cuda")            # doctest: +SKIP
            >>> model.to(engine.float64)    # doctest: +SKIP
        """
        if device is not None and _is_dtype(device):
            device, dtype = None, device
        target = backend.check_available(backend.device(device)) if device is not None else None
        if dtype is not None and not is_floating(np.dtype(dtype)):
            raise DTypeError(f"Module.to: dtype must be a floating dtype, got {np.dtype(dtype)} "
                             "(integer buffers are never cast; parameters must stay floating)")
        tensors = {id(t): t for t in (*self.parameters(), *self.buffers())}
        for tensor in tensors.values():
            tensor._data = _moved(tensor._data, target, dtype)
            if tensor.grad is not None:
                tensor.grad._data = _moved(tensor.grad._data, target, dtype)
        return self

    def cpu(self) -> "Module":
        return self.to("cpu")

    def cuda(self, index: int = 0) -> "Module":
        return self.to(f"cuda:{index}")

    def float(self) -> "Module":
        return self.to(np.float32)

    def double(self) -> "Module":
        return self.to(np.float64)

    def half(self) -> "Module":
        """Floating parameters and buffers to float16 (integer buffers stay), as PyTorch's."""
        return self.to(np.float16)

    def bfloat16(self) -> "Module":
        """Floating parameters and buffers to bfloat16 (integer buffers stay), as PyTorch's."""
        return self.to(dtypes.bfloat16)

    # ---- state dicts ----------------------------------------------------------------------------
    def _state_items(self) -> Iterator[tuple[str, Tensor]]:
        """Every saved tensor by dotted name: each module's parameters, then its persistent buffers.

        Shared parameters appear under each of their names, as in PyTorch.
        """
        for prefix, module in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            for name, param in module._parameters.items():
                if param is not None:
                    yield dot + name, param
            for name, buf in module._buffers.items():
                if buf is not None and name not in module._non_persistent:
                    yield dot + name, buf

    def state_dict(self) -> "OrderedDict[str, Tensor]":
        """Name -> detached tensor for every parameter and persistent buffer.

        The tensors share memory with the module (no copy); copy them (or save them to disk)
        for a snapshot that later training steps will not change.
        """
        return OrderedDict((name, tensor.detach()) for name, tensor in self._state_items())

    def load_state_dict(self, state_dict, strict: bool = True) -> IncompatibleKeys:
        """Copy the values of ``state_dict`` into this module's parameters and buffers.

        Values keep each parameter's device (a CPU checkpoint loads into a GPU model) and must have
        its shape and dtype. Nothing is copied unless every check passes.

        Args:
            state_dict: name -> Tensor, numpy or cupy array, torch tensor (read through DLPack), number or
                nested list, as returned by :meth:`state_dict` (this one's or a torch module's).
            strict: raise on missing or unexpected keys (shape and dtype mismatches always raise).

        Returns:
            ``IncompatibleKeys(missing_keys, unexpected_keys)``.

        Raises:
            ShapeError: a value's shape differs from the module's (message names key and shapes).
            DTypeError: a value's dtype differs from the module's, or a value is not a Tensor,
                array, number or (nested) list of numbers.
            StateDictError: ``state_dict`` is not a mapping (a path, a list ...), or missing or
                unexpected keys with ``strict=True``.
        """
        own, values, keys = self._checked_state(state_dict, strict)
        with no_grad():
            for key, value in values.items():
                target = own[key]
                target.copy_(backend.to_device(value, target.device))
        return keys

    def _checked_state(self, state_dict, strict: bool):
        """``(own tensors, values to copy, IncompatibleKeys)`` once every check of
        :meth:`load_state_dict` has passed; raises as it does, changing nothing (the Trainer checks
        a whole checkpoint with it before applying any part)."""
        if not isinstance(state_dict, Mapping):
            hint = ("; it looks like a file path: read the file first, e.g. "
                    "model.load_state_dict(engine.load(path)['model'])" if isinstance(state_dict, (str, os.PathLike))
                    else "")
            raise StateDictError(f"load_state_dict: expected a mapping (dict) of parameter and buffer names to "
                                 f"Tensors or arrays, as returned by state_dict(), got {type(state_dict).__name__}"
                                 f"{hint}")
        own = OrderedDict(self._state_items())
        missing = [key for key in own if key not in state_dict]
        unexpected = [key for key in state_dict if key not in own]
        values, shape_errors, dtype_errors = {}, [], []
        for key, target in own.items():
            if key not in state_dict:
                continue
            value = _raw_array(state_dict[key], target)
            if tuple(value.shape) != target.shape:
                shape_errors.append(f"size mismatch for {key!r}: the checkpoint has shape {tuple(value.shape)}, "
                                    f"the module has shape {target.shape}")
            elif value.dtype != target.dtype:
                dtype_errors.append(f"dtype mismatch for {key!r}: the checkpoint has {value.dtype}, the module has "
                                    f"{target.dtype} (convert the model with .to(dtype) or the value before loading)")
            values[key] = value
        key_errors = []
        if strict and missing:
            key_errors.append("missing key(s): " + ", ".join(repr(k) for k in missing))
        if strict and unexpected:
            key_errors.append("unexpected key(s): " + ", ".join(repr(k) for k in unexpected))
        problems = shape_errors + dtype_errors + key_errors
        if problems:
            hint = "\n(pass strict=False to skip missing or unexpected keys)" if key_errors else ""
            message = (f"load_state_dict: error(s) loading a state dict into {type(self).__name__}:\n  "
                       + "\n  ".join(problems) + hint)
            error = ShapeError if shape_errors else DTypeError if dtype_errors else StateDictError
            raise error(message)
        return own, values, IncompatibleKeys(missing, unexpected)

    # ---- printing -------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The text inside this module's parentheses in ``repr`` (layers override it)."""
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        children = [f"({name}): {_indent(repr(module), 2)}" for name, module in self._modules.items()
                    if module is not None]
        if not children:
            return f"{type(self).__name__}({extra})" if "\n" not in extra else \
                f"{type(self).__name__}(\n  {_indent(extra, 2)}\n)"
        lines = (extra.split("\n") if extra else []) + children
        return f"{type(self).__name__}(\n  " + "\n  ".join(lines) + "\n)"


def _indent(text: str, spaces: int) -> str:
    """Indent every line of ``text`` but the first (it follows a ``(name): `` prefix)."""
    return text.replace("\n", "\n" + " " * spaces)


def _is_dtype(obj) -> bool:
    if isinstance(obj, str):
        return obj not in ("cpu", "cuda") and not obj.startswith("cuda:")
    return isinstance(obj, (type, np.dtype))


def _moved(array, device, dtype):
    """``array`` on ``device`` (None: where it is) with floating data cast to ``dtype`` (None: kept)."""
    if dtype is not None and is_floating(array.dtype) and array.dtype != np.dtype(dtype):
        array = array.astype(dtype)
    return array if device is None else backend.to_device(array, device)


def _raw_array(value, like: Tensor):
    """A state-dict value as a numpy/cupy array (lists and scalars take ``like``'s dtype; a torch
    tensor, or another DLPack producer, is read through DLPack without a copy)."""
    if isinstance(value, Tensor):
        return value._data
    if backend.is_array(value):
        return value
    foreign = dlpack.foreign_array(value)
    if foreign is not None:
        return foreign
    expected = "expected a Tensor, an array, a number or a nested list of numbers"
    try:
        # None, str, dict ... are no values; [None, 1] would become [nan, 1] under a float dtype
        plain = np.asarray(value) if isinstance(value, (numbers.Number, np.generic, list, tuple)) else None
        if plain is None or plain.dtype.kind not in ("biufc" if np.dtype(like.dtype).kind == "c" else "biuf"):
            raise TypeError(f"it holds {type(value).__name__ if plain is None else plain.dtype} values")
        return np.asarray(value, dtype=like.dtype)
    except (TypeError, ValueError) as e:
        raise DTypeError(f"load_state_dict: cannot use a {type(value).__name__} as a value for {describe(like)} "
                         f"({e}); {expected}") from None
