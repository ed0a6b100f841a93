"""Adam and AdamW (decoupled weight decay), with AMSGrad."""

from __future__ import annotations

from engine import kernels
from engine import backend
from engine.errors import EngineError
from engine.optim.optimizer import Optimizer, as_step_scalars, check_number, is_normal_positive, sqrt_for
from engine.kernels import adam_bias_corrections, adam_update


class Adam(Optimizer):
    r"""Adam (Kingma & Ba), PyTorch semantics, optionally AMSGrad.

    With :math:`g_t` the gradient (negated when ``maximize``) and :math:`t` the parameter's own
    step count:

    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \quad (\text{Adam's L2 weight decay})\\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2)\,g_t^2\\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (amsgrad) else } v_t\\
        \theta_t &= \theta_{t-1} - \gamma\,\frac{m_t / (1-\beta_1^t)}{\sqrt{\hat v_t / (1-\beta_2^t)} + \epsilon}

    Args:
        params: iterable of Tensors or of param-group dicts.
        lr: learning rate :math:`\gamma`.
        betas: :math:`(\beta_1, \beta_2)`, decay rates of the moment estimates.
        eps: :math:`\epsilon`, added to the denominator.
        weight_decay: :math:`\lambda` (L2 penalty added to the gradient; see AdamW for decoupled).
        amsgrad: use the running maximum of :math:`v_t` (AMSGrad).
        maximize: maximize the objective instead of minimizing it.
        fused: None/True: one fused ``adam_step`` launch per bucket; False: unfused reference.
        master_weights: float16 / bfloat16 parameters: None/True keep a float32 master copy and
            float32 states (see :class:`~engine.optim.Optimizer`); False keeps 16-bit states.
        capturable: keep the learning rate and the step counts in device memory, read there by the
            kernels and updated in place, so that a step captured in a CUDA graph sees, at every
            replay, the learning rate set since (``group["lr"] = ...``, a scheduler) and the step
            count it advanced (PyTorch's flag; the parameters must be on a CUDA device). Take one
            eager step before capturing: it creates the states and the device scalars.

    Example:
        >>> opt = engine.optim.Adam(model.parameters(), lr=3e-4)  # doctest: +SKIP
    """

    _decoupled = False
    _supports_capturable = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 capturable: bool = False, fused: bool | None = None, master_weights: bool | None = None):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, capturable=capturable, master_weights=master_weights)
        super().__init__(params, defaults, fused)

    def _check_hyperparams(self, group: dict) -> None:
        name = type(self).__name__
        check_number(name, "lr", group["lr"])
        check_number(name, "eps", group["eps"])
        check_number(name, "weight_decay", group["weight_decay"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise EngineError(f"{name}: betas must be a pair (beta1, beta2), got {betas!r}")
        check_number(name, "betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_number(name, "betas[1]", betas[1], 0.0, 1.0, high_open=True)

    def _buffer_names(self, group: dict) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def _all_buffer_names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _padding_is_safe(self, group: dict, dtype) -> bool:
        return is_normal_positive(group["eps"], dtype)  # else 0 / (sqrt(0) + 0) = NaN

    def _fused_update(self, group, param, grad, buffers, step, **scaling) -> None:
        beta1, beta2 = group["betas"]
        kernels.adam_step(param, grad, buffers["exp_avg"], buffers["exp_avg_sq"], buffers.get("max_exp_avg_sq"),
                          lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"], decoupled_weight_decay=self._decoupled,
                          amsgrad=group["amsgrad"], maximize=group["maximize"], step=step + 1, **scaling)

    def _reference_update(self, group, param, grad, buffers, step) -> None:
        beta1, beta2 = group["betas"]
        lr, weight_decay, t = group["lr"], group["weight_decay"], step + 1
        step_size, bc2_sqrt = as_step_scalars(param.dtype, *adam_bias_corrections(lr, beta1, beta2, t, sqrt_for(t)))
        adam_update(backend.array_module(param), param, -grad if group["maximize"] else grad, buffers["exp_avg"],
                    buffers["exp_avg_sq"], buffers.get("max_exp_avg_sq"), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=weight_decay, decoupled=self._decoupled, amsgrad=group["amsgrad"],
                    step_size=step_size, bias_correction2_sqrt=bc2_sqrt, decay_factor=1.0 - lr * weight_decay)


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter), PyTorch semantics.

    Same as :class:`Adam` except that weight decay shrinks the parameter directly instead of
    entering the gradient: :math:`\theta \leftarrow \theta\,(1 - \gamma\lambda)` before the
    Adam update. Default ``weight_decay=1e-2``.

    Example:
        >>> opt = engine.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)  # doctest: +SKIP
    """

    _decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 capturable: bool = False, fused: bool | None = None, master_weights: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, capturable=capturable, fused=fused, master_weights=master_weights)

