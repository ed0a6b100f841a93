"""Check analytic gradients against central finite differences in float64."""

from __future__ import annotations

import numpy as np

from engine import backend
from engine.dtypes import is_floating
from engine.tensor import Tensor


class GradcheckError(AssertionError):
    """An analytic gradient disagrees with its finite-difference estimate."""


def gradcheck(fn, inputs, eps: float = 1e-6, atol: float = 1e-5, rtol: float = 1e-3, seed: int = 0) -> bool:
    """Compare ``fn``'s backward with finite differences, on float64 copies of ``inputs``.

    ``fn`` maps tensors to one tensor of any shape; it is reduced to a scalar with a fixed random
    projection so every output element is checked. Inputs that are not float tensors (indices,
    masks) are passed through unchanged and not differentiated.

    Returns True, or raises :class:`GradcheckError` naming the input, the element and both values.

    Example:
        >>> x = engine.randn(3, 4)                                      # doctest: +SKIP
        >>> engine.gradcheck(lambda t: (t * t).sum(axis=1), [x])        # doctest: +SKIP
        True
    """
    args = [_float64_leaf(x) for x in inputs]
    diff = [i for i, x in enumerate(args) if isinstance(x, Tensor) and x.requires_grad]
    out = fn(*args)
    xp = out.xp
    weights = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))

    def objective() -> float:
        return float(backend.to_host((fn(*args)._data * weights).sum()))

    (out * Tensor(weights)).sum().backward()
    for i in diff:
        x = args[i]
        analytic = x.grad.numpy() if x.grad is not None else np.zeros(x.shape)
        numeric = np.zeros(x.shape)
        flat = x._data.reshape(-1)  # a view: perturbing it perturbs x
        for j in range(flat.size):
            original = flat[j].item()
            flat[j] = original + eps
            plus = objective()
            flat[j] = original - eps
            minus = objective()
            flat[j] = original
            numeric.reshape(-1)[j] = (plus - minus) / (2 * eps)
        bad = ~np.isclose(analytic, numeric, atol=atol, rtol=rtol)
        if bad.any():
            where = tuple(int(k) for k in np.argwhere(bad)[0])
            raise GradcheckError(f"gradcheck: input {i} (shape {x.shape}) element {where}: analytic "
                                 f"{analytic[where]:.6g} vs numeric {numeric[where]:.6g} "
                                 f"({int(bad.sum())} of {bad.size} elements differ)")
    return True


def _float64_leaf(x):
    if isinstance(x, Tensor) and is_floating(x.dtype):
        return Tensor(x._data.astype(np.float64), requires_grad=True)
    return x
