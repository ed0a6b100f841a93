"""Activation checkpointing: keep a block's inputs, recompute its activations during backward.

:func:`checkpoint` runs a function under ``no_grad`` in forward, so none of its intermediate
activations are kept, and records one graph node holding only its inputs. When backward reaches
that node it runs the function again with grad enabled (the RNG restored first, so dropout draws
the same masks) and back-propagates the incoming gradient through the recomputed graph. Memory
for a block's activations drops to its inputs and outputs, for one extra forward of the block.

The public import path is PyTorch's: ``engine.utils.checkpoint`` re-exports this module's names.
"""

from __future__ import annotations

import warnings

from engine import backend
from engine.autograd import Function, _propagate, enable_grad, is_grad_enabled, no_grad, watch_grad_inputs
from engine.errors import GradError
from engine.tensor import Tensor

__all__ = ["checkpoint", "checkpoint_sequential"]


def checkpoint(function, *args, use_reentrant: bool | None = None, preserve_rng_state: bool = True,
               determinism_check: str = "default", **kwargs):
    """Run ``function(*args, **kwargs)`` without keeping its activations; recompute them in backward.

    As ``torch.utils.checkpoint.checkpoint``: the forward runs under ``no_grad`` and only the
    inputs are kept; backward re-runs ``function`` with grad enabled and back-propagates through
    it. Gradients reach the tensor arguments and every tensor requiring grad that ``function``
    reads (its parameters, tensors it closes over), exactly as without checkpointing.

    Args:
        function: a callable (a Module, a bound method, a function) returning a Tensor or a tuple
            or list of values (Tensors among them get gradients).
        *args: its positional arguments; Tensors among them are kept for the recomputation.
        use_reentrant: PyTorch's switch. False (the default here) allows keyword arguments and
            gives parameters gradients even when no argument requires grad. True keeps the
            reentrant variant's rules: keyword arguments are refused, and when no argument
            requires grad the output requires none (with a warning). Both compute the same
            gradients otherwise.
        preserve_rng_state: restore the random generators to their state at the forward before
            recomputing, so random ops (dropout) draw the same values. False skips it (faster
            when the block draws nothing random, wrong gradients when it does).
        determinism_check: "default" checks that the recomputation returns outputs of the same
            shapes and dtypes as the forward did; "none" skips the check.
        **kwargs: keyword arguments for ``function``.

    Returns:
        What ``function`` returned, its Tensors attached to the graph.

    Raises:
        TypeError: ``function`` is not callable, or keyword arguments with ``use_reentrant=True``.
        GradError: in backward, an input was changed in place since the forward, or the
            recomputation returned something else than the forward.

    Example:
        >>> from engine.utils.checkpoint import checkpoint          # doctest: +SKIP
        >>> h = checkpoint(self.block, x, use_reentrant=False)      # doctest: +SKIP
    """
    if not callable(function):
        raise TypeError(f"checkpoint: function must be callable, got {type(function).__name__}")
    if use_reentrant is None:
        use_reentrant = False
    if not isinstance(use_reentrant, bool):
        raise TypeError(f"checkpoint: use_reentrant must be a bool, got {use_reentrant!r}")
    if determinism_check not in ("default", "none"):
        raise ValueError(f"checkpoint: determinism_check must be 'default' or 'none', got {determinism_check!r}")
    if use_reentrant and kwargs:
        raise TypeError(f"checkpoint: unexpected keyword arguments {sorted(kwargs)}: use_reentrant=True "
                        "passes positional arguments only (as in PyTorch); use use_reentrant=False")
    if not is_grad_enabled():
        return function(*args, **kwargs)  # nothing will run backward: no graph, nothing to save

    tensor_args = [a for a in args if isinstance(a, Tensor)]
    if use_reentrant and not any(t.requires_grad for t in tensor_args):
        warnings.warn("checkpoint: none of the inputs has requires_grad=True; with use_reentrant=True the "
                      "gradients of this block will be None (use use_reentrant=False)", stacklevel=2)
        with no_grad():
            return function(*args, **kwargs)

    rng = _RNGSnapshot(tensor_args) if preserve_rng_state else None
    with no_grad(), watch_grad_inputs() as read, _forked(rng, restore=False):
        outputs = function(*args, **kwargs)
    arg_ids = {id(t) for t in tensor_args}
    captured = [t for key, t in read.items() if key not in arg_ids]
    flat, kind = _flatten(outputs)
    run = _Recompute(function, args, kwargs, tensor_args, captured, rng, flat, kind == "single", determinism_check)
    attached = _CheckpointFunction.apply(run, *tensor_args, *captured)
    run.outputs = None  # attached to the node now; the node must not hold its own outputs
    return _unflatten(attached, kind)


def checkpoint_sequential(functions, segments: int, input, use_reentrant: bool | None = None,
                          preserve_rng_state: bool = True):
    """Run a sequence of modules in ``segments`` chunks, checkpointing every chunk but the last.

    As ``torch.utils.checkpoint.checkpoint_sequential``: only each chunk's input is kept; the last
    chunk runs normally, since backward starts there and would recompute it at once.

    Args:
        functions: an ``nn.Sequential`` or a list/tuple of callables applied in order.
        segments: how many chunks (1 to the number of functions).
        input: the Tensor fed to the first function.
        use_reentrant: as for :func:`checkpoint`.
        preserve_rng_state: as for :func:`checkpoint`.

    Returns:
        The output of the last function.

    Example:
        >>> model = nn.Sequential(*blocks)                              # doctest: +SKIP
        >>> out = checkpoint_sequential(model, 4, x, use_reentrant=False)  # doctest: +SKIP
    """
    try:
        layers = list(functions)
    except TypeError:
        raise TypeError(f"checkpoint_sequential: functions must be an nn.Sequential or a list of callables, got "
                        f"{type(functions).__name__}") from None
    bad = [i for i, f in enumerate(layers) if not callable(f)]
    if bad:
        raise TypeError(f"checkpoint_sequential: functions[{bad[0]}] is a {type(layers[bad[0]]).__name__}, not "
                        "callable")
    if isinstance(segments, bool) or not isinstance(segments, int) or not 1 <= segments <= max(len(layers), 1):
        raise ValueError(f"checkpoint_sequential: segments must be an int from 1 to the number of functions "
                         f"({len(layers)}), got {segments!r}")
    if not layers:
        return input
    size = len(layers) // segments
    end = 0
    for start in range(0, size * (segments - 1), size):
        end = start + size
        input = checkpoint(_Chain(layers[start:end]), input, use_reentrant=use_reentrant,
                           preserve_rng_state=preserve_rng_state)
    return _Chain(layers[end:])(input)


class _Chain:
    """Functions applied in order (one checkpointed segment)."""

    def __init__(self, layers):
        self.layers = layers

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


# ---- the graph node ---------------------------------------------------------------------------

class _CheckpointFunction(Function):
    """The one node a checkpointed call leaves in the graph: its inputs are the tensor arguments and
    the captured tensors; backward recomputes the block and returns their gradients."""

    computes_in_float32 = False  # moves or views memory: no arithmetic to do in float32

    @staticmethod
    def forward(ctx, run, *tensors):
        ctx.run = run
        # Versions recorded here: an input or parameter changed in place before backward would make
        # the recomputation use the new values, a silently wrong gradient; saved_tensors refuses it.
        ctx.save_for_backward(*tensors)
        return run.outputs

    @staticmethod
    def backward(ctx, *grad_outputs):
        ctx.saved_tensors  # noqa: B018  (the in-place check)
        return (None, *ctx.run.backward(grad_outputs))


class _Recompute:
    """What one checkpointed call keeps: the function, its inputs, the RNG snapshot."""

    def __init__(self, function, args, kwargs, tensor_args, captured, rng, outputs, single, determinism_check):
        self.function, self.args, self.kwargs = function, args, kwargs
        self.tensor_args, self.captured, self.rng = tensor_args, captured, rng
        self.meta = [(o.shape, o.dtype) if isinstance(o, Tensor) else None for o in outputs]
        self.check = determinism_check == "default"
        # The outputs only pass through apply, which attaches them to the node; dropped after.
        self.outputs = outputs[0] if single else tuple(outputs)

    def backward(self, grad_outputs) -> tuple:
        detached = {id(t): _detached(t) for t in self.tensor_args}
        args = tuple(detached[id(a)] if isinstance(a, Tensor) else a for a in self.args)
        with _forked(self.rng, restore=True), enable_grad():
            outputs, _ = _flatten(self.function(*args, **self.kwargs))
        self._check_same(outputs)
        roots = [(o, g._data) for o, g in zip(outputs, grad_outputs)
                 if isinstance(o, Tensor) and o.requires_grad and g is not None]
        wrt = [detached[id(t)] for t in self.tensor_args] + list(self.captured)
        grads = _grads_wrt(roots, wrt)
        return tuple(None if g is None else Tensor._from_op(g, None) for g in grads)

    def _check_same(self, outputs) -> None:
        if not self.check:
            return
        meta = [(o.shape, o.dtype) if isinstance(o, Tensor) else None for o in outputs]
        if meta != self.meta:
            raise GradError(f"checkpoint: recomputing {_name(self.function)} in backward returned {_shapes(meta)}, "
                            f"but the forward returned {_shapes(self.meta)}; the function must compute the same "
                            "thing both times (pass determinism_check='none' to skip this check)")


def _detached(t: Tensor) -> Tensor:
    """A leaf standing for argument ``t`` in the recomputation, so its graph ends there."""
    d = t.detach()
    d.requires_grad = t.requires_grad
    return d


def _grads_wrt(roots, wrt) -> list:
    """Gradients of ``roots`` (tensor, gradient array) w.r.t. the tensors ``wrt``, walking the
    recomputed graph in reverse and stopping at them (``.grad`` of ``wrt`` is not touched: the
    gradients go back to the outer graph, which accumulates them as for any op). Other leaves
    reached (tensors made with requires_grad inside the function) accumulate as usual. The
    recomputed activations are freed as soon as they are used (no retain_graph)."""
    grads = _propagate(roots, retain_graph=False, stop={id(t) for t in wrt})
    return [grads.get(id(t)) for t in wrt]


# ---- outputs ------------------------------------------------------------------------------------

def _flatten(outputs):
    """(values as a tuple, how to rebuild): a Tensor, or a tuple or list of values."""
    if isinstance(outputs, Tensor):
        return (outputs,), "single"
    if isinstance(outputs, (tuple, list)):
        return tuple(outputs), type(outputs)
    raise TypeError(f"checkpoint: the function must return a Tensor or a tuple or list of values, got "
                    f"{type(outputs).__name__}")


def _unflatten(attached, kind):
    if kind == "single":
        return attached
    return kind(attached) if kind is list else attached


def _name(function) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


def _shapes(meta) -> str:
    return "(" + ", ".join("non-tensor" if m is None else f"{m[1]}{list(m[0])}" for m in meta) + ")"


# ---- random generators --------------------------------------------------------------------------

class _RNGSnapshot:
    """The generators' state at the forward, to replay in the recomputation.

    The CPU generator's state is read and written back exactly (numpy's bit generator state), so
    a checkpointed block draws the same numbers as an uncheckpointed one. A cupy generator's state
    cannot be read back, so each GPU device the inputs live on gets its own generator for the
    block, seeded from the CPU generator (reproducible under ``engine.manual_seed``; reading it
    needs no host sync): forward and recomputation draw the same masks, though not the ones an
    uncheckpointed run would.
    """

    def __init__(self, tensors):
        gpus = sorted({t.device for t in tensors if t.device.type != "cpu"}, key=str)
        cpu = backend.generator(backend.CPU)
        self.gpu_seeds = {dev: int(cpu.integers(0, 2 ** 63 - 1)) for dev in gpus}
        self.cpu_state = cpu.bit_generator.state


class _forked:
    """Run a block with the generators set from a snapshot, then put the outer ones back.

    ``restore=False`` (the forward): the CPU generator runs on from where it is (it is the snapshot),
    so the draws advance it exactly as without checkpointing. ``restore=True`` (the
    recomputation): the CPU generator is rewound to the snapshot for the block and returned to
    its current state afterwards, so backward leaves the random stream untouched.
    """

    def __init__(self, rng: _RNGSnapshot | None, restore: bool):
        self.rng, self.restore = rng, restore

    def __enter__(self):
        if self.rng is None:
            return self
        self.outer_gpu = {dev: backend._generators.get(dev) for dev in self.rng.gpu_seeds}
        for dev, seed in self.rng.gpu_seeds.items():
            with backend.on_device(dev):
                backend._generators[dev] = backend.xp_for(dev).random.RandomState(seed)
        if self.restore:
            cpu = backend.generator(backend.CPU)
            self.outer_cpu = cpu.bit_generator.state
            cpu.bit_generator.state = self.rng.cpu_state
        return self

    def __exit__(self, *exc):
        if self.rng is None:
            return False
        for dev, gen in self.outer_gpu.items():
            if gen is None:
                backend._generators.pop(dev, None)
            else:
                backend._generators[dev] = gen
        if self.restore:
            backend.generator(backend.CPU).bit_generator.state = self.outer_cpu
        return False
