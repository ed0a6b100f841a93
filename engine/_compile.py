"""``engine.compile``: PyTorch's ``torch.compile`` signature, returning its argument unchanged.

The engine has no graph compiler: its speed comes from fused kernels called eagerly (and CUDA
graphs through ``engine.cuda.graphs``). Scripts written for PyTorch 2 wrap their model in
``torch.compile`` and expect the result to behave like the model; the engine gives back the model
(or function) itself, so training, ``state_dict`` keys and checkpoints are those of the plain
model (PyTorch's compiled module prefixes its keys with ``_orig_mod.``; the engine's does not).
The arguments are checked as PyTorch checks them, so a misspelt mode is an error here as there.
"""

from __future__ import annotations

from engine import _dynamo
from engine.errors import EngineError

_MODES = ("default", "lite", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def compile(model=None, *, fullgraph: bool = False, dynamic: bool | None = None, backend="inductor",  # noqa: A001
            mode: str | None = None, options: dict | None = None, disable: bool = False, **kwargs):
    """Return ``model`` unchanged (the engine runs eagerly; see the module docstring).

    Used as ``compiled = engine.compile(model)``, as a decorator ``@engine.compile``, or with
    arguments ``@engine.compile(fullgraph=True)`` (then it returns the decorator).

    Args:
        model: a Module or function; None returns a decorator taking it.
        fullgraph, dynamic, disable: accepted as in PyTorch; they change nothing here.
        backend: a PyTorch backend name (``"inductor"``, ``"eager"``, ``"aot_eager"`` ...) or a callable.
        mode: None or one of PyTorch's modes ("default", "reduce-overhead", "max-autotune" ...).
        options: inductor options; not together with ``mode``, as in PyTorch.
        **kwargs: PyTorch's newer keywords (``name``, ``recompile_limit`` ...), accepted.

    Raises:
        EngineError: an unknown mode or backend name, both ``mode`` and ``options``, or a model
            that is not callable.

    Example:
        >>> import engine
        >>> net = engine.nn.Linear(3, 2)
        >>> engine.compile(net, mode="reduce-overhead") is net
        True
    """
    if mode is not None and mode not in _MODES:
        raise EngineError(f"compile: unrecognized mode={mode!r}, should be one of: {', '.join(_MODES)}")
    if mode is not None and options is not None:
        raise EngineError("compile: either mode or options can be specified, but both can't be specified at the "
                          "same time (as in PyTorch)")
    if isinstance(backend, str) and not _dynamo.known_backend(backend):
        raise EngineError(f"compile: invalid backend {backend!r}; see engine._dynamo.list_backends() for the "
                          "names PyTorch knows")
    if backend is not None and not isinstance(backend, str) and not callable(backend):
        raise EngineError(f"compile: backend must be a name or a callable, got {type(backend).__name__}")
    return _checked if model is None else _checked(model)


def _checked(model):
    """``model`` itself, once known to be callable (also the decorator ``engine.compile(...)`` returns)."""
    if not callable(model):
        raise EngineError(f"compile: a callable function or Module is expected, but {type(model).__name__} "
                          "is provided")
    return model
