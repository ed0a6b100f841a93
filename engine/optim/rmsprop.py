"""RMSprop, optionally centered and with momentum."""

from __future__ import annotations

from engine import kernels
from engine import backend
from engine.kernels import rmsprop_update
from engine.optim.optimizer import Optimizer, check_number, is_normal_positive


class RMSprop(Optimizer):
    r"""RMSprop (Hinton), PyTorch semantics.

    With :math:`g_t` the gradient (negated when ``maximize``):

    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1}\\
        v_t &= \alpha v_{t-1} + (1-\alpha)\,g_t^2\\
        \bar g_t &= \alpha \bar g_{t-1} + (1-\alpha)\,g_t,\quad
            d_t = \sqrt{v_t - \bar g_t^2} + \epsilon \text{ (centered) else } \sqrt{v_t} + \epsilon\\
        b_t &= \mu b_{t-1} + g_t / d_t,\quad \theta_t = \theta_{t-1} - \gamma\,b_t \quad (\mu > 0)\\
        \theta_t &= \theta_{t-1} - \gamma\,g_t / d_t \quad (\mu = 0)

    Args:
        params: iterable of Tensors or of param-group dicts.
        lr: learning rate :math:`\gamma`.
        alpha: smoothing constant :math:`\alpha`.
        eps: :math:`\epsilon`, added to the denominator.
        weight_decay: L2 penalty :math:`\lambda`.
        momentum: momentum factor :math:`\mu`.
        centered: normalize by the estimated variance of the gradient instead of its second moment.
        maximize: maximize the objective instead of minimizing it.
        fused: None/True: one fused ``rmsprop_step`` launch per bucket; False: unfused reference.
        master_weights: float16 / bfloat16 parameters: None/True keep a float32 master copy and
            float32 states (see :class:`~engine.optim.Optimizer`); False keeps 16-bit states.
    """

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False, *, maximize: bool = False,
                 fused: bool | None = None, master_weights: bool | None = None):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        centered=centered, maximize=maximize, master_weights=master_weights)
        super().__init__(params, defaults, fused)

    def _check_hyperparams(self, group: dict) -> None:
        check_number("RMSprop", "lr", group["lr"])
        check_number("RMSprop", "alpha", group["alpha"])
        check_number("RMSprop", "eps", group["eps"])
        check_number("RMSprop", "weight_decay", group["weight_decay"])
        check_number("RMSprop", "momentum", group["momentum"])

    def _buffer_names(self, group: dict) -> tuple[str, ...]:
        names = ("square_avg",)
        if group["momentum"] > 0:
            names += ("momentum_buffer",)
        if group["centered"]:
            names += ("grad_avg",)
        return names

    def _all_buffer_names(self) -> tuple[str, ...]:
        return ("square_avg", "momentum_buffer", "grad_avg")

    def _run_key(self, group: dict, bucket, i: int):
        return None  # the update does not depend on the step count: one launch per bucket

    def _padding_is_safe(self, group: dict, dtype) -> bool:
        return is_normal_positive(group["eps"], dtype)  # else 0 / (sqrt(0) + 0) = NaN

    def _fused_update(self, group, param, grad, buffers, key, **scaling) -> None:
        kernels.rmsprop_step(param, grad, buffers["square_avg"], buffers.get("momentum_buffer"),
                             buffers.get("grad_avg"), lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                             weight_decay=group["weight_decay"], momentum=group["momentum"],
                             centered=group["centered"], maximize=group["maximize"], **scaling)

    def _reference_update(self, group, param, grad, buffers, key) -> None:
        rmsprop_update(backend.array_module(param), param, -grad if group["maximize"] else grad,
                       buffers["square_avg"], buffers.get("momentum_buffer"), buffers.get("grad_avg"), lr=group["lr"],
                       alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                       momentum=group["momentum"], centered=group["centered"])
