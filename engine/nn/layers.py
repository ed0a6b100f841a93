"""Layers: containers (Sequential, ModuleList, ModuleDict), Linear, activations, Dropout(2d), LayerNorm, BatchNorm1d/2d,
Embedding.

``Sequential`` runs a ``Linear`` directly followed by a ``ReLU`` as the fused kernel
``engine.functional.linear_relu`` whenever fused kernels are enabled, with no change to the model.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from engine import functional as F
from engine import ops
from engine.autograd import no_grad
from engine.dtypes import is_floating, is_low_precision
from engine.errors import DTypeError, describe
from engine.nn import init
from engine.nn.module import Module, Parameter
from engine.tensor import Tensor, empty, ones, zeros


# ---- containers ----------------------------------------------------------------------------------

def _check_module(container: str, index, module) -> Module:
    if not isinstance(module, Module):
        raise TypeError(f"{container}: element {index!r} is a {type(module).__name__}, not a Module; "
                        "wrap functions in a Module (or use nn.Identity as a placeholder)")
    return module


class _ModuleSequence(Module):
    """What Sequential and ModuleList share: modules named by position, appended, counted, iterated
    and indexed. ``_from_slice`` makes a container of the same kind from a slice of (name, module)."""

    def append(self, module: Module):
        """Add ``module`` at the end (named by its position)."""
        index = len(self._modules)
        self.add_module(str(index), _check_module(f"{type(self).__name__}.append", index, module))
        return self

    def extend(self, modules):
        for module in modules:
            self.append(module)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        items = list(self._modules.items())
        if isinstance(index, slice):
            return self._from_slice(items[index])
        try:
            return items[index][1]
        except (IndexError, TypeError):
            raise IndexError(f"{type(self).__name__} index {index!r} out of range for {len(items)} modules") from None

    def _from_slice(self, items: list) -> "_ModuleSequence":
        raise NotImplementedError


class Sequential(_ModuleSequence):
    """Modules applied one after another: ``Sequential(a, b, c)``, ``Sequential([a, b, c])`` or
    ``Sequential(OrderedDict(name=module, ...))``.

    Consecutive ``Linear`` and ``ReLU`` run as one fused ``linear_relu`` call while
    ``engine.functional.fused_enabled()`` is True (``with F.fused_kernels(False):`` turns it off).

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))   # doctest: +SKIP
        >>> model[0], len(model)                                                          # doctest: +SKIP
        (Linear(in_features=784, out_features=128, bias=True), 3)
    """

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            for name, module in modules[0].items():
                self.add_module(name, _check_module("Sequential", name, module))
            return
        if len(modules) == 1 and isinstance(modules[0], (list, tuple)):
            modules = tuple(modules[0])  # Keras style: one list of layers
        for module in modules:
            self.append(module)

    def _from_slice(self, items: list) -> "Sequential":
        return Sequential(OrderedDict(items))  # keeps the names

    def forward(self, x):
        layers = list(self._modules.values())
        fuse = F.fused_enabled()
        i = 0
        while i < len(layers):
            if fuse and i + 1 < len(layers) and _is_plain(layers[i], Linear) and _is_plain(layers[i + 1], ReLU):
                x = F.linear_relu(x, layers[i].weight, layers[i].bias, fused=True)
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x


def _is_plain(module: Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls.forward``: a subclass that overrides forward
    does something else, so fusing it would silently skip the user's code."""
    return isinstance(module, cls) and type(module).forward is cls.forward


class ModuleList(_ModuleSequence):
    """A list of modules whose parameters are registered (a plain Python list would hide them).

    Example:
        >>> self.blocks = nn.ModuleList([Block() for _ in range(4)])   # doctest: +SKIP
    """

    def __init__(self, modules=None):
        super().__init__()
        for module in modules or ():
            self.append(module)

    def _from_slice(self, items: list) -> "ModuleList":
        return ModuleList(module for _, module in items)


class ModuleDict(Module):
    """Modules held by name, each registered as a child (``torch.nn.ModuleDict``): ``d["head"]``,
    ``d.head``, ``"head" in d``, iteration over the keys, ``keys()``/``values()``/``items()``,
    ``update``, ``pop``, ``clear``; insertion order is kept (a plain dict's too).

    Example:
        >>> self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(50, 8), ln_f=nn.LayerNorm(8)))  # doctest: +SKIP
        >>> self.transformer.wte(idx)                                                               # doctest: +SKIP
    """

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str) -> Module:
        if key not in self._modules:
            raise KeyError(f"ModuleDict has no module {key!r} (keys: {list(self._modules)})")
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        self.add_module(key, _check_module("ModuleDict", key, module))

    def __delitem__(self, key: str) -> None:
        del self._modules[key]

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def __contains__(self, key) -> bool:
        return key in self._modules

    def clear(self) -> None:
        self._modules.clear()

    def pop(self, key: str) -> Module:
        module = self[key]
        del self[key]
        return module

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()

    def values(self):
        return self._modules.values()

    def update(self, modules) -> None:
        """Add or replace modules from a mapping (dict, OrderedDict, ModuleDict) or an iterable of
        ``(name, module)`` pairs."""
        if hasattr(modules, "items") and callable(modules.items):
            pairs = modules.items()
        else:
            pairs = []
            for i, pair in enumerate(modules):
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise TypeError(f"ModuleDict.update: element #{i} should be a (name, module) pair, got {pair!r}")
                pairs.append(pair)
        for key, module in pairs:
            self[key] = module


# ---- linear ----------------------------------------------------------------------------------------

class Linear(Module):
    """``y = x @ weight.T + bias`` with weight (out_features, in_features), as in PyTorch.

    Initialised like PyTorch: weight from ``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(in), 1/sqrt(in)),
    and bias from U(-1/sqrt(in_features), 1/sqrt(in_features)).

    Args:
        in_features: size of each input's last dim.
        out_features: size of each output's last dim.
        bias: learn an additive bias.
        device, dtype: where and in which floating dtype to create the parameters.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(empty(out_features, in_features, dtype=dtype, device=device))
        if bias:
            self.bias = Parameter(empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw fresh weights and bias with PyTorch's default scheme."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Identity(Module):
    """Returns its input; accepts and ignores any constructor arguments (a placeholder layer)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


# ---- activations -------------------------------------------------------------------------------------

class ReLU(Module):
    """``max(x, 0)``. ``inplace=True`` is accepted for PyTorch compatibility; the result is computed
    out of place (same values and gradients, one more buffer)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)

    def forward(self, x: Tensor) -> Tensor:
        return ops.relu(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class LeakyReLU(Module):
    """``x`` where positive, ``negative_slope * x`` elsewhere. ``inplace`` is accepted and computed out of place."""

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__()
        self.negative_slope, self.inplace = float(negative_slope), bool(inplace)

    def forward(self, x: Tensor) -> Tensor:
        return ops.leaky_relu(x, self.negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}" + (", inplace=True" if self.inplace else "")


class Sigmoid(Module):
    """``1 / (1 + exp(-x))``, stable for large |x|."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.sigmoid(x)


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.tanh(x)


class GELU(Module):
    """``x * Phi(x)``; ``approximate="tanh"`` uses the tanh approximation (as in GPT-2)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return ops.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class Softmax(Module):
    """Softmax along ``dim`` (default the last dim; PyTorch's implicit-dim legacy is not copied)."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return ops.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    """``log(softmax(x))`` along ``dim``, computed stably in one op."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.log_softmax(x, self.dim)


class Flatten(Module):
    """Merge dims ``start_dim`` .. ``end_dim`` into one (default: all but the batch dim)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Tensor) -> Tensor:
        return ops.flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


# ---- regularisation and normalisation ------------------------------------------------------------------

class Dropout(Module):
    """Zero each element with probability ``p`` in training mode (scaling the rest by 1 / (1 - p));
    the identity in eval mode. Seeded by ``engine.manual_seed``."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be a probability in [0, 1], got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm(Module):
    """Normalise over the trailing ``normalized_shape`` dims, then apply a learned scale and shift.

    Args:
        normalized_shape: int or tuple, the trailing dims to normalise over.
        eps: added to the variance.
        elementwise_affine: learn ``weight`` (ones) and ``bias`` (zeros) of that shape.
        bias: learn the bias too (when elementwise_affine).
        device, dtype: where and in which dtype to create the parameters.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps, self.elementwise_affine = shape, float(eps), elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(ones(shape, dtype=dtype, device=device))
            if bias:
                self.bias = Parameter(zeros(shape, dtype=dtype, device=device))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class BatchNorm1d(Module):
    """Batch normalisation over the batch (and length) dims of (N, C) or (N, C, L) input, as PyTorch's.

    In training mode each channel is normalised with the batch's mean and biased variance, and
    ``running_mean`` / ``running_var`` move towards the batch's mean and *unbiased* variance by
    ``momentum`` (``momentum=None``: a cumulative average over ``num_batches_tracked``). In eval mode
    the running statistics are used (with ``track_running_stats=False``, the batch's, always).

    Args:
        num_features: C, the channel count.
        eps: added to the variance.
        momentum: weight of the new batch in the running statistics, or None.
        affine: learn a per-channel ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep running statistics (buffers saved in the state dict).
        device, dtype: where and in which dtype to create parameters and buffers.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        if self.affine:
            self.weight = Parameter(ones(num_features, dtype=dtype, device=device))
            self.bias = Parameter(zeros(num_features, dtype=dtype, device=device))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", zeros(num_features, dtype=dtype, device=device))
            self.register_buffer("running_var", ones(num_features, dtype=dtype, device=device))
            self.register_buffer("num_batches_tracked", zeros((), dtype="int64", device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim not in (2, 3) or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm1d: expected (N, {self.num_features}) or (N, {self.num_features}, L) input, "
                             f"got shape {x.shape}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not is_floating(x.dtype):  # as PyTorch; ops.mean below would name itself instead
            raise DTypeError(f"{type(self).__name__}: input must be floating point, got {describe(x)}; "
                             "convert with .float()")
        axes = (0,) + tuple(range(2, x.ndim))  # statistics per channel, over the batch and every spatial dim
        shape = (1, self.num_features) + (1,) * (x.ndim - 2)
        # A 16-bit input is normalised in float32 and rounded once to its dtype, also with float32
        # parameters and statistics (PyTorch's mixed dtype CPU rule: a BatchNorm after a conv in autocast).
        out_dtype, x = x.dtype, (x.float() if is_low_precision(x.dtype) else x)
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            count = math.prod(x.shape) // self.num_features
            if self.training and count <= 1:
                raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel when training, got "
                                 f"input of shape {x.shape}")
            mean = ops.mean(x, dim=axes, keepdim=True)
            centered = x - mean
            var = ops.mean(centered * centered, dim=axes, keepdim=True)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, count)
        else:
            mean = ops.reshape(self.running_mean, shape)
            var = ops.reshape(self.running_var, shape)
            centered = x - mean
        out = centered / ops.sqrt(var + self.eps)
        if self.affine:
            out = out * ops.reshape(self.weight, shape) + ops.reshape(self.bias, shape)
        return out.to(out_dtype)

    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        with no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average: 1 / batches so far (a device value, no host read)
                factor = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
            else:
                factor = self.momentum
            batch_mean = ops.reshape(mean.detach(), (self.num_features,))
            unbiased = ops.reshape(var.detach(), (self.num_features,)) * (count / (count - 1))
            self.running_mean.add_((batch_mean - self.running_mean) * factor)
            self.running_var.add_((unbiased - self.running_var) * factor)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


class BatchNorm2d(BatchNorm1d):
    """Batch normalisation of (N, C, H, W) input, statistics per channel over (N, H, W); otherwise
    as BatchNorm1d (same arguments, momentum rule, unbiased running variance and state-dict buffers).

    Example:
        >>> nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())   # doctest: +SKIP
    """

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d: expected (N, {self.num_features}, H, W) input, got shape {x.shape}")


class Dropout2d(Dropout):
    """Zero whole channels of (N, C, H, W) input with probability ``p`` in training mode, scaling the
    rest by 1 / (1 - p) (``F.dropout2d``); the identity in eval mode."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout2d(x, self.p, self.training)


class Embedding(Module):
    """A lookup table of ``num_embeddings`` vectors of size ``embedding_dim``, initialised N(0, 1).

    Args:
        num_embeddings: table size (indices must be in [0, num_embeddings)).
        embedding_dim: vector size.
        padding_idx: this row starts at zeros and receives no gradient.
        device, dtype: where and in which dtype to create the table.

    Example:
        >>> emb = nn.Embedding(1000, 64, padding_idx=0); vectors = emb(token_ids)   # doctest: +SKIP
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx={padding_idx} must be within the {num_embeddings} rows")
            padding_idx %= num_embeddings
        self.padding_idx = padding_idx
        self.weight = Parameter(empty(num_embeddings, embedding_dim, dtype=dtype, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight._data[self.padding_idx] = 0

    def forward(self, indices) -> Tensor:
        return F.embedding(indices, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        return text if self.padding_idx is None else f"{text}, padding_idx={self.padding_idx}"


# ---- padding --------------------------------------------------------------------------------------

class _PadNd(Module):
    """A padding layer: ``F.pad`` of the last ``_dims`` dims in ``_mode`` (PyTorch's padding modules).
    ``padding`` is one int for every side or a tuple (left, right[, top, bottom[, front, back]])."""

    _mode, _dims = "constant", 1

    def __init__(self, padding, value: float = 0.0):
        super().__init__()
        sides = 2 * self._dims
        self.padding = (int(padding),) * sides if isinstance(padding, (int, np.integer)) else tuple(padding)
        if len(self.padding) != sides:
            raise ValueError(f"{type(self).__name__}: padding must be an int or a tuple of {sides} ints, got "
                             f"{padding!r}")
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.padding, self._mode, self.value if self._mode == "constant" else None)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, value={self.value}" if self._mode == "constant" else f"{self.padding}"


class _ConstantPadNd(_PadNd):
    def __init__(self, padding, value: float):
        super().__init__(padding, value)


class _ZeroPadNd(_PadNd):
    def __init__(self, padding):
        super().__init__(padding, 0.0)

    def extra_repr(self) -> str:
        return f"{self.padding}"


def _padding_layer(name: str, base: type, mode: str, dims: int) -> type:
    doc = f"Pad the last {dims} dim(s) in {mode!r} mode (``torch.nn.{name}``; see ``F.pad``)."
    return type(name, (base,), {"_mode": mode, "_dims": dims, "__doc__": doc, "__module__": __name__})


ZeroPad1d, ZeroPad2d, ZeroPad3d = (_padding_layer(f"ZeroPad{d}d", _ZeroPadNd, "constant", d) for d in (1, 2, 3))
ConstantPad1d, ConstantPad2d, ConstantPad3d = (_padding_layer(f"ConstantPad{d}d", _ConstantPadNd, "constant", d)
                                               for d in (1, 2, 3))
ReflectionPad1d, ReflectionPad2d, ReflectionPad3d = (_padding_layer(f"ReflectionPad{d}d", _PadNd, "reflect", d)
                                                     for d in (1, 2, 3))
ReplicationPad1d, ReplicationPad2d, ReplicationPad3d = (_padding_layer(f"ReplicationPad{d}d", _PadNd, "replicate", d)
                                                        for d in (1, 2, 3))
CircularPad1d, CircularPad2d, CircularPad3d = (_padding_layer(f"CircularPad{d}d", _PadNd, "circular", d)
                                               for d in (1, 2, 3))
