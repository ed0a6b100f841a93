"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay."""

from __future__ import annotations

from engine import kernels
from engine import backend
from engine.errors import EngineError
from engine.kernels import sgd_update
from engine.optim.optimizer import Optimizer, _OnDevice, check_number


class SGD(Optimizer):
    r"""Stochastic gradient descent (PyTorch semantics).

    With :math:`g_t` the gradient (negated when ``maximize``), per step:

    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \quad (\text{weight decay } \lambda)\\
        b_t &= g_t \text{ on the first step, else } \mu\,b_{t-1} + (1-\tau)\,g_t \quad (\mu \ne 0)\\
        g_t &\leftarrow g_t + \mu\,b_t \text{ if nesterov, else } b_t\\
        \theta_t &= \theta_{t-1} - \gamma\,g_t

    Args:
        params: iterable of Tensors or of param-group dicts.
        lr: learning rate :math:`\gamma`.
        momentum: momentum factor :math:`\mu`.
        dampening: dampening :math:`\tau` of the momentum.
        weight_decay: L2 penalty :math:`\lambda`.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening = 0).
        maximize: maximize the objective instead of minimizing it.
        fused: None/True: one fused ``sgd_step`` launch per bucket; False: unfused reference.
        master_weights: float16 / bfloat16 parameters: None/True keep a float32 master copy and
            float32 states (see :class:`~engine.optim.Optimizer`); False keeps 16-bit states.
        capturable: keep the learning rate in device memory, read there by the kernel, so that a step
            captured in a CUDA graph sees the rate set since (``group["lr"] = ...``, a scheduler) at
            every replay; parameters on a CUDA device only. An engine extension, named after Adam's
            flag: torch's SGD has no ``capturable`` (it takes a Tensor ``lr`` instead). Take one
            eager step before capturing (it creates the momentum buffer and the device lr).

    Example:
        >>> opt = engine.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # doctest: +SKIP
        >>> opt.zero_grad(); loss.backward(); opt.step()                       # doctest: +SKIP
    """

    _exports_step = False  # like PyTorch, SGD's state is only its momentum buffer
    # The momentum buffer's first write differs (buf = g): a step a GradScaler skipped did not make it.
    _first_step_state = "momentum_buffer"
    _supports_capturable = True

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 capturable: bool = False, fused: bool | None = None, master_weights: bool | None = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, capturable=capturable, master_weights=master_weights)
        super().__init__(params, defaults, fused)

    def _check_hyperparams(self, group: dict) -> None:
        check_number("SGD", "lr", group["lr"])
        check_number("SGD", "momentum", group["momentum"])
        check_number("SGD", "dampening", group["dampening"], low=-float("inf"))
        check_number("SGD", "weight_decay", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise EngineError(f"SGD: nesterov=True requires momentum > 0 and dampening = 0, got "
                              f"momentum={group['momentum']}, dampening={group['dampening']}")

    def _buffer_names(self, group: dict) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _all_buffer_names(self) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def _run_key(self, group: dict, bucket, i: int):
        # The only per-parameter input of the update: is this the momentum buffer's first step?
        # After steps a GradScaler may have skipped, only the device knows (bucket.pending).
        if group["momentum"] == 0:
            return False
        return bucket.pending.get(i, "momentum_buffer" not in bucket.has[i])

    def _after_step(self, group, bucket, i, key, skipped, memo) -> None:
        if group["momentum"] == 0 or key is False:
            return
        if skipped is None:  # taken: the buffer has had its first step
            bucket.pending.pop(i, None)
            return
        # Still on the first step where this step was skipped (and, for a device flag, every one before).
        memo_key = ("first", id(key) if isinstance(key, _OnDevice) else key)
        if memo_key not in memo:
            memo[memo_key] = (key, _OnDevice(skipped if key is True else key.array & skipped))
        bucket.pending[i] = memo[memo_key][1]

    def _fused_update(self, group, param, grad, buffers, first_step, **scaling) -> None:
        kernels.sgd_step(param, grad, buffers.get("momentum_buffer"), lr=group["lr"], momentum=group["momentum"],
                         dampening=group["dampening"], weight_decay=group["weight_decay"],
                         nesterov=group["nesterov"], maximize=group["maximize"],
                         first_step=first_step.array if isinstance(first_step, _OnDevice) else first_step, **scaling)

    def _reference_update(self, group, param, grad, buffers, first_step) -> None:
        sgd_update(backend.array_module(param), param, -grad if group["maximize"] else grad,
                   buffers.get("momentum_buffer"), lr=group["lr"], momentum=group["momentum"],
                   dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                   first_step=first_step.array if isinstance(first_step, _OnDevice) else first_step)
