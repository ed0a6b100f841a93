"""``engine._dynamo``: the parts of ``torch._dynamo`` that training scripts call around ``torch.compile``.

The engine runs eagerly and ``engine.compile`` returns what it is given unchanged, so there is no
compiled-code cache: :func:`reset` has nothing to clear, and the ``config`` knobs scripts set
(``suppress_errors``, ``cache_size_limit`` ...) are kept as plain attributes that nothing reads.
"""

from __future__ import annotations

import types

__all__ = ["config", "list_backends", "reset"]

# torch._dynamo.list_backends(exclude_tags=()) of PyTorch 2.13 that a script may name, with their tags.
_BACKENDS = {"inductor": (), "cudagraphs": (), "openxla": (), "tvm": (), "eager": ("debug",),
             "aot_eager": ("debug",), "aot_eager_decomp_partition": ("debug",), "ts": ("experimental",),
             "aot_ts": ("experimental",), "openxla_eval": ("experimental",), "eager_debug": ("debug",)}

config = types.SimpleNamespace(suppress_errors=False, cache_size_limit=8, recompile_limit=8,
                               optimize_ddp=True, verbose=False)


def reset() -> None:
    """Clear the compiled-code caches (``torch._dynamo.reset``). ``engine.compile`` compiles nothing,
    so there is nothing to clear: this exists so that scripts calling it run unchanged."""


def list_backends(exclude_tags=("debug", "experimental")) -> list[str]:
    """The backend names ``engine.compile`` accepts (PyTorch's), less those with an excluded tag."""
    excluded = set(exclude_tags or ())
    return sorted(name for name, tags in _BACKENDS.items() if not excluded.intersection(tags))


def known_backend(name: str) -> bool:
    """Whether ``name`` is one of PyTorch's registered backend names."""
    return name in _BACKENDS
