"""Adadelta: step sizes from running averages of squared gradients and squared updates."""

from __future__ import annotations

from engine import backend
from engine.errors import EngineError
from engine.optim.optimizer import Optimizer, check_number, is_normal_positive


class Adadelta(Optimizer):
    r"""Adadelta (Zeiler, 2012), PyTorch semantics.

    With :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1}\\
        v_t &= \rho v_{t-1} + (1-\rho)\,g_t^2\\
        \Delta_t &= \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}}\,g_t\\
        u_t &= \rho u_{t-1} + (1-\rho)\,\Delta_t^2\\
        \theta_t &= \theta_{t-1} - \gamma\,\Delta_t

    The states are ``square_avg`` (:math:`v`) and ``acc_delta`` (:math:`u`), PyTorch's names.
    There is no dedicated kernel: the update is elementwise array code, run once over each span
    of the flat buffers (``fused=True``, the default) or once per parameter (``fused=False``).

    Args:
        params: iterable of Tensors or of param-group dicts.
        lr: coefficient :math:`\gamma` that scales the update (default 1.0, as in PyTorch).
        rho: decay :math:`\rho` of the running averages.
        eps: :math:`\epsilon`, added inside both square roots.
        weight_decay: L2 penalty :math:`\lambda`.
        foreach: accepted for PyTorch compatibility (the flat buffers already batch the update).
        maximize: maximize the objective instead of minimizing it.
        capturable: accepted for PyTorch compatibility (no CUDA-graph capture here).
        differentiable: must be False (an optimizer step is not recorded in the graph).
        fused: None/True: one update per span of the flat buffers; False: one per parameter.

    Example:
        >>> optimizer = optim.Adadelta(model.parameters(), lr=1.0)      # doctest: +SKIP
    """

    def __init__(self, params, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0,
                 foreach: bool | None = None, *, capturable: bool = False, maximize: bool = False,
                 differentiable: bool = False, fused: bool | None = None):
        if differentiable:
            raise EngineError("Adadelta: differentiable=True (recording the step in the graph) is not supported")
        defaults = dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        capturable=capturable, differentiable=False)
        super().__init__(params, defaults, fused)

    def _check_hyperparams(self, group: dict) -> None:
        check_number("Adadelta", "lr", group["lr"])
        check_number("Adadelta", "rho", group["rho"], high=1.0)
        check_number("Adadelta", "eps", group["eps"])
        check_number("Adadelta", "weight_decay", group["weight_decay"])

    def _buffer_names(self, group: dict) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def _all_buffer_names(self) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def _run_key(self, group: dict, bucket, i: int):
        return None  # the update does not depend on the step count: one run per bucket

    def _padding_is_safe(self, group: dict, dtype) -> bool:
        return is_normal_positive(group["eps"], dtype)  # else sqrt(0) / sqrt(0) = NaN in the padding

    def _fused_update(self, group, param, grad, buffers, key) -> None:
        self._reference_update(group, param, grad, buffers, key)  # elementwise: a span is as good as a parameter

    def _reference_update(self, group, param, grad, buffers, key) -> None:
        xp = backend.array_module(param)
        rho, eps = group["rho"], group["eps"]
        g = -grad if group["maximize"] else grad
        if group["weight_decay"] != 0:
            g = g + group["weight_decay"] * param
        square_avg, acc_delta = buffers["square_avg"], buffers["acc_delta"]
        square_avg *= rho
        square_avg += (1.0 - rho) * (g * g)
        delta = xp.sqrt(acc_delta + eps) / xp.sqrt(square_avg + eps) * g
        acc_delta *= rho
        acc_delta += (1.0 - rho) * (delta * delta)
        param -= group["lr"] * delta
