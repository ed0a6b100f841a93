"""Adagrad: per-coordinate learning rates from the running sum of squared gradients."""

from __future__ import annotations

from engine import kernels
from engine import backend
from engine.optim.optimizer import Optimizer, as_step_scalars, check_number, is_normal_positive
from engine.kernels import adagrad_decayed_lr, adagrad_update


class Adagrad(Optimizer):
    r"""Adagrad (Duchi et al.), PyTorch semantics.

    With :math:`g_t` the gradient (negated when ``maximize``) and :math:`t` the parameter's own
    step count:

    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1}\\
        \tilde\gamma &= \gamma / (1 + (t-1)\,\eta)\\
        s_t &= s_{t-1} + g_t^2 \qquad (s_0 = \text{initial\_accumulator\_value})\\
        \theta_t &= \theta_{t-1} - \tilde\gamma\, g_t / (\sqrt{s_t} + \epsilon)

    Args:
        params: iterable of Tensors or of param-group dicts.
        lr: learning rate :math:`\gamma`.
        lr_decay: :math:`\eta`, decay of the learning rate with the step count.
        weight_decay: L2 penalty :math:`\lambda`.
        initial_accumulator_value: starting value :math:`s_0` of the sum of squares.
        eps: :math:`\epsilon`, added to the denominator.
        maximize: maximize the objective instead of minimizing it.
        fused: None/True: one fused ``adagrad_step`` launch per bucket; False: unfused reference.
        master_weights: float16 / bfloat16 parameters: None/True keep a float32 master copy and
            float32 states (see :class:`~engine.optim.Optimizer`); False keeps 16-bit states.
    """

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, *, maximize: bool = False,
                 fused: bool | None = None, master_weights: bool | None = None):
        defaults = dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, eps=eps, maximize=maximize,
                        master_weights=master_weights)
        super().__init__(params, defaults, fused)

    def _check_hyperparams(self, group: dict) -> None:
        check_number("Adagrad", "lr", group["lr"])
        check_number("Adagrad", "lr_decay", group["lr_decay"])
        check_number("Adagrad", "weight_decay", group["weight_decay"])
        check_number("Adagrad", "initial_accumulator_value", group["initial_accumulator_value"])
        check_number("Adagrad", "eps", group["eps"])

    def _buffer_names(self, group: dict) -> tuple[str, ...]:
        return ("sum",)

    def _all_buffer_names(self) -> tuple[str, ...]:
        return ("sum",)

    def _buffer_fill(self, group: dict, name: str) -> float:
        return float(group["initial_accumulator_value"])

    def _initial_param_state(self, group: dict) -> set[str]:
        # Like PyTorch, Adagrad's state exists from construction (step 0, sum = s_0).
        return {"sum"}

    def _padding_is_safe(self, group: dict, dtype) -> bool:
        # The padding of "sum" holds initial_accumulator_value; both zero: 0 / (sqrt(0) + 0) = NaN.
        return (is_normal_positive(group["eps"], dtype)
                or is_normal_positive(group["initial_accumulator_value"], dtype))

    def _fused_update(self, group, param, grad, buffers, step, **scaling) -> None:
        kernels.adagrad_step(param, grad, buffers["sum"], lr=group["lr"], lr_decay=group["lr_decay"],
                             weight_decay=group["weight_decay"], eps=group["eps"], step=step + 1,
                             maximize=group["maximize"], **scaling)

    def _reference_update(self, group, param, grad, buffers, step) -> None:
        clr, = as_step_scalars(param.dtype, adagrad_decayed_lr(group["lr"], group["lr_decay"], step + 1))
        adagrad_update(backend.array_module(param), param, -grad if group["maximize"] else grad, buffers["sum"],
                       clr=clr, weight_decay=group["weight_decay"], eps=group["eps"])
