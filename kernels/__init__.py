"""Fused kernels: arrays in, arrays out, on numpy (CPU) or cupy (GPU) arrays.

Each kernel has several implementations (``numpy`` reference, ``numba_cpu``, ``numba_cuda``,
``cupy``) behind one registry that picks by the arrays it is given (their kind and dtype); see
kernels/registry.py. Each impl declares the float dtypes it takes (:func:`impl_dtypes`); a forced
impl given a dtype it does not take is a KernelError that names both. float16 and bfloat16
(``ml_dtypes.bfloat16``) are computed in float32 and rounded once when stored (kernels/precision.py).
This package imports only numpy at import time; numba, cupy and ml_dtypes load on first use.

The wrappers below document the one signature every impl of a kernel shares.
"""

if __name__ == "kernels":  # pragma: no cover - exercised in a child process by tests/test_packaging.py
    # This folder is engine.kernels. It was found as a top-level `kernels` because the repository
    # root is on sys.path (`python -m pytest` in a checkout puts it there), so a library's own
    # `import kernels` (transformers imports Hugging Face's `kernels`) would get the engine's
    # kernels. Hand the name to the distribution that owns it, or say what happened.
    from ._top_level_name import hand_over

    hand_over(__file__)
else:
    from .deferred import eager_checks, raise_deferred_errors
    from .registry import KernelError, call, choose, get, impl_dtypes, impls, kernels

__all__ = [
    "KernelError", "call", "choose", "get", "impl_dtypes", "impls", "kernels", "eager_checks", "raise_deferred_errors",
    "linear_relu_forward", "linear_relu_backward", "softmax_cross_entropy",
    "layer_norm_forward", "layer_norm_backward",
    "adam_step", "sgd_step", "adagrad_step", "rmsprop_step",
    "attention_forward", "attention_backward",
    "gelu_forward", "gelu_backward",
]


def linear_relu_forward(x, weight, bias=None, *, impl=None):
    """``relu(x @ weight.T + bias)`` for x (N, K), weight (M, K), bias (M,) or None -> (N, M).

    The output doubles as the saved state for backward (its sign is the ReLU mask). The three
    arrays share one dtype: float32 or float64, or float16 / bfloat16 (every impl but numba_cuda,
    which takes float16 only), accumulated in float32 and rounded to the dtype once. The ``cupy``
    impl rounds the cuBLAS GEMM's output before its bias + ReLU pass, a second rounding where a
    bias is given (docs/kernels/linear_relu.md).
    """
    return call("linear_relu_forward", x, weight, bias, impl=impl)


def linear_relu_backward(grad_out, x, weight, out, *, compute_grad_x=True, impl=None):
    """Gradients of :func:`linear_relu_forward` -> ``(grad_x, grad_weight, grad_bias)``.

    ``out`` is the forward output; the mask ``out > 0`` and the bias reduction are fused into
    one pass over ``grad_out``. ``compute_grad_x=False`` skips the ``grad_out @ weight`` GEMM
    and returns None for grad_x: the first layer of a network needs no input gradient. The
    gradients have the inputs' dtype; 16-bit ones are accumulated in float32 (the GEMMs and the
    bias sum) and rounded once.
    """
    return call("linear_relu_backward", grad_out, x, weight, out, compute_grad_x=compute_grad_x, impl=impl)


def softmax_cross_entropy(logits, targets, weight=None, *, ignore_index=-100, label_smoothing=0.0,
                          grad_scale=1.0, compute_grad=True, denominator_out=None, impl=None):
    """Per-row cross-entropy of ``logits`` (N, C) and, in the same pass, its gradient.

    Args:
        logits: (N, C) float32, float64, float16 or bfloat16 array (numba_cuda: no bfloat16). A
            16-bit row is read once, the math runs in float32 and the gradient is rounded once.
        targets: (N,) integer class indices, or (N, C) float probabilities (soft targets) of the
            logits' dtype.
        weight: optional (C,) class weights of the logits' dtype (hard targets), PyTorch semantics.
        ignore_index: rows whose target equals it get loss 0 and gradient 0 (hard targets).
        label_smoothing: epsilon in [0, 1], PyTorch semantics.
        grad_scale: the gradient is multiplied by this scalar (e.g. 1 / weight-sum for 'mean'):
            a number, or a one-element array on the logits' device of their accumulation dtype
            (the logits' dtype; float32 for 16-bit logits), which the GPU impls read on the
            device (so a scale computed there costs no host sync).
        compute_grad: if False only the loss is computed.
        denominator_out: reduction='mean' folded in, for hard targets without weight: a one-element
            array of the accumulation dtype beside the logits, into which the call writes the number
            of rows whose target is not ``ignore_index`` (PyTorch's 'mean' denominator), counted on
            the device by the pass that checks the targets (cupy); the gradient is scaled by its
            reciprocal (0 when every row is ignored), so ``grad_scale`` must be 1. Nothing is read
            on the host.

    Returns:
        ``(loss, grad)``: loss (N,) per row (weighted, 0 where ignored) in the accumulation dtype
        (float32 for 16-bit logits: the caller reduces it before rounding, once), grad (N, C) in
        the logits' dtype, or None.

    A hard target outside [0, C) that is not ``ignore_index`` raises KernelError: at once on the
    CPU; on a GPU at the next sync point (kernels/deferred.py), the row meanwhile getting a NaN
    loss and a zero gradient.
    """
    extra = {} if denominator_out is None else {"denominator_out": denominator_out}
    return call("softmax_cross_entropy", logits, targets, weight, ignore_index=ignore_index,
                label_smoothing=label_smoothing, grad_scale=grad_scale, compute_grad=compute_grad, impl=impl,
                **extra)


def layer_norm_forward(x, weight=None, bias=None, *, eps=1e-5, impl=None):
    """Layer norm over the last dimension of ``x`` (N, D): ``(x - mean) * rstd * weight + bias``.

    Args:
        x: (N, D) C-contiguous float32, float64, float16 or bfloat16 array; N may be 0, D any
            length >= 1. A 16-bit x is computed in float32 and y rounded once.
        weight, bias: optional (D,) arrays of x's dtype, or float32 with a 16-bit x (None: no
            scale / no shift), PyTorch semantics.
        eps: added to the (biased) variance.

    Returns:
        ``(y, mean, rstd)``: y (N, D) in x's dtype, and the per-row mean and ``1 / sqrt(var + eps)``
        (N,) in x's dtype (float32 for a 16-bit x), which :func:`layer_norm_backward` takes
        instead of a saved normalised copy of x.

    Example:
        >>> y, mean, rstd = kernels.layer_norm_forward(x, w, b)              # doctest: +SKIP
        >>> dx, dw, db = kernels.layer_norm_backward(dy, x, w, mean, rstd)   # doctest: +SKIP
    """
    return call("layer_norm_forward", x, weight, bias, eps=eps, impl=impl)


def layer_norm_backward(grad_y, x, weight, mean, rstd, *, compute_weight_grads=True, impl=None):
    """Gradients of :func:`layer_norm_forward` -> ``(grad_x, grad_weight, grad_bias)``.

    ``mean`` and ``rstd`` are what the forward returned for this ``x``; grad_y has x's dtype and
    grad_x comes back in it. grad_weight and grad_bias (column sums over the rows, in weight's
    dtype) are None when ``weight`` is None or ``compute_weight_grads`` is False; a bias-only
    layer's grad_bias is ``grad_y.sum(0)``. The column sums are reduced as
    per-chunk partial rows plus one small final sum, never with atomics per element.
    """
    return call("layer_norm_backward", grad_y, x, weight, mean, rstd, compute_weight_grads=compute_weight_grads,
                impl=impl)


# Loss scaling and master weights, shared by the four optimizer steps (kernels/cpu/optim.py has the
# details): found_inf (a nonzero value skips the step, read on the device), inv_scale (unscale the
# gradient in the step and write it back), param_out (a float16 / bfloat16 parameter updated through
# the float32 master ``param``); step counts may be one-element device arrays.
_AMP_ARGS_DOC = """
    Loss scaling and master weights (every optimizer step): ``found_inf`` (one-element float32
    array: nonzero skips the step, nothing is written), ``inv_scale`` (one-element float32 array:
    the gradient is multiplied by it and the unscaled gradient written back into ``grad``),
    ``param_out`` (float16 / bfloat16: ``param`` and the states are then the float32 master and its
    states, ``grad`` has ``param_out``'s dtype, and the new master is rounded into ``param_out``).
    The GPU impls read found_inf, inv_scale and a step count given as a one-element device array
    on the device: a skipped step costs no host read.
"""


def adam_step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, lr, beta1=0.9, beta2=0.999,
              eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False,
              step, found_inf=None, inv_scale=None, param_out=None, impl=None):
    """One Adam / AdamW step, in place on same-shape contiguous arrays (typically flat buffers).

    ``step`` is the 1-based step count after this update (bias correction uses it): an int, or a
    one-element integer array on the arrays' device; ``decoupled_weight_decay=True`` is AdamW;
    ``max_exp_avg_sq`` is required iff ``amsgrad``.
    """
    return call("adam_step", param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr=lr, beta1=beta1,
                beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                amsgrad=amsgrad, maximize=maximize, step=step, found_inf=found_inf, inv_scale=inv_scale,
                param_out=param_out, impl=impl)


def sgd_step(param, grad, momentum_buf=None, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False, maximize=False, first_step=False, found_inf=None, inv_scale=None, param_out=None,
             impl=None):
    """One SGD step (PyTorch semantics), in place; ``momentum_buf`` required iff momentum != 0.

    On ``first_step`` (a bool, or a one-element array on the arrays' device) the momentum buffer is
    set to the gradient (no dampening), as PyTorch does.
    """
    return call("sgd_step", param, grad, momentum_buf, lr=lr, momentum=momentum, dampening=dampening,
                weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, first_step=first_step,
                found_inf=found_inf, inv_scale=inv_scale, param_out=param_out, impl=impl)


def adagrad_step(param, grad, state_sum, *, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, step,
                 maximize=False, found_inf=None, inv_scale=None, param_out=None, impl=None):
    """One Adagrad step (PyTorch semantics), in place; ``step`` is 1-based (an int or a device array)."""
    return call("adagrad_step", param, grad, state_sum, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                eps=eps, step=step, maximize=maximize, found_inf=found_inf, inv_scale=inv_scale,
                param_out=param_out, impl=impl)


def rmsprop_step(param, grad, square_avg, momentum_buf=None, grad_avg=None, *, lr, alpha=0.99, eps=1e-8,
                 weight_decay=0.0, momentum=0.0, centered=False, maximize=False, found_inf=None, inv_scale=None,
                 param_out=None, impl=None):
    """One RMSprop step (PyTorch semantics), in place; ``grad_avg`` required iff ``centered``,
    ``momentum_buf`` iff momentum != 0."""
    return call("rmsprop_step", param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha, eps=eps,
                weight_decay=weight_decay, momentum=momentum, centered=centered, maximize=maximize,
                found_inf=found_inf, inv_scale=inv_scale, param_out=param_out, impl=impl)


for _step in (adam_step, sgd_step, adagrad_step, rmsprop_step):
    _step.__doc__ += _AMP_ARGS_DOC
del _step


def attention_forward(q, k, v, mask=None, *, scale=None, causal=False, precision=None, impl=None):
    """Scaled-dot-product attention, flash style -> ``(out, lse)``; no L x S matrix is kept.

    ``softmax(scale * q @ k^T + mask) @ v`` per batch row, as PyTorch's
    ``F.scaled_dot_product_attention`` with batch and heads flattened into B.

    Args:
        q: (B, L, E), k: (B, S, E), v: (B, S, Ev); C-contiguous, one dtype: float32, bfloat16
            (``ml_dtypes.bfloat16``) or float16 (16-bit inputs are computed in float32 and rounded
            once; numba_cuda takes float32 only), float64 on the CPU impls. The GPU impls take head
            dims E, Ev <= 128.
        mask: None, or an additive bias of q's dtype (or float32 for 16-bit inputs) shaped
            (1 or B, 1 or L, S): (1, L, S) shared by every batch row, (B, 1, S) key padding,
            (B, L, S) full. Size-1 dims are broadcast inside the kernels (never expanded). Boolean
            masks: pass 0 / -inf. The mask gets no gradient.
        scale: the score scale; None means 1 / sqrt(E), PyTorch's default.
        causal: PyTorch's ``is_causal``: query i sees keys j <= i (top-left aligned), on top of mask.
        precision: how the cupy impl multiplies: None (float32 on CUDA cores, bfloat16 / float16 on
            tensor cores where E = Ev is 64 or 128), ``"exact"`` (every dtype on CUDA cores) or
            ``"3xtf32"`` (float32 on tensor cores too, as three TF32 products: float32-level error).
            The CPU impls and numba_cuda compute exactly whatever it says.

    Returns:
        ``(out, lse)``: out (B, L, Ev) in q's dtype; lse (B, L), the log-sum-exp of each row's
        scaled, masked scores (what :func:`attention_backward` needs; float32 for 16-bit inputs).
        A row that sees no key gets out 0 and lse -inf (PyTorch's math path gives NaN), and no
        gradient.

    Example:
        >>> out, lse = kernels.attention_forward(q, k, v, scale=q.shape[-1] ** -0.5, causal=True)  # doctest: +SKIP
        >>> dq, dk, dv = kernels.attention_backward(dout, q, k, v, out, lse, scale=..., causal=True)  # doctest: +SKIP
    """
    return call("attention_forward", q, k, v, mask, scale=scale, causal=causal, precision=precision, impl=impl)


def attention_backward(grad_out, q, k, v, out, lse, mask=None, *, scale=None, causal=False, precision=None,
                       impl=None):
    """Gradients of :func:`attention_forward` -> ``(dq, dk, dv)`` (flash-attention-2), in q's dtype.

    ``out`` and ``lse`` are the forward's results; ``mask``, ``scale`` and ``causal`` must be the
    forward's. The probabilities are recomputed from lse tile by tile (D_i = rowsum(dO * O)), so
    the fused impls hold no L x S matrix. ``precision`` must be the forward's: the cupy impl runs
    the backward on tensor cores where it ran the forward there (bfloat16 / float16 at E = Ev in
    {64, 128}; float32 with ``"3xtf32"`` at E = Ev = 64), on CUDA cores otherwise.
    """
    return call("attention_backward", grad_out, q, k, v, out, lse, mask, scale=scale, causal=causal,
                precision=precision, impl=impl)


def gelu_forward(x, *, approximate="none", impl=None):
    """GELU of ``x`` elementwise, PyTorch ``F.gelu`` semantics -> y (x's shape and dtype).

    Args:
        x: C-contiguous float32, float64, float16 or bfloat16 array of any shape, size 0 included
            (the kernels walk the flat buffer; a non-contiguous x is refused with KernelError). A
            16-bit x is computed in float32 and rounded once.
        approximate: "none", the exact ``x Phi(x)`` (Phi the standard normal CDF, from erfc), or
            "tanh", ``x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2`` (GPT-2's form).

    Both forms are evaluated as ``x erfc(-x / sqrt 2) / 2`` and ``x sigmoid(2 z)``: equal to the
    textbook forms, and accurate in relative terms for negative x, where ``1 + erf`` and
    ``1 + tanh`` cancel.

    Example:
        >>> y = kernels.gelu_forward(x, approximate="tanh")              # doctest: +SKIP
        >>> dx = kernels.gelu_backward(dy, x, approximate="tanh")        # doctest: +SKIP
    """
    return call("gelu_forward", x, approximate=approximate, impl=impl)


def gelu_backward(grad_y, x, *, approximate="none", impl=None):
    """Gradient of :func:`gelu_forward` -> ``grad_y * gelu'(x)`` (x's shape and dtype).

    Needs only the forward's input ``x`` (the slope is recomputed, nothing else is saved);
    ``grad_y`` must have x's shape and dtype, both C-contiguous, and ``approximate`` the forward's.
    """
    return call("gelu_backward", grad_y, x, approximate=approximate, impl=impl)


# ---- limits and formulas the layers above share with the kernels --------------------------------
# The engine asks these of ``engine.kernels`` (never of kernels.cpu.*), so a limit or a formula has
# one home. Loaded on first use: the modules that hold them import numba helpers or ml_dtypes.
_SHARED = {
    "ATTENTION_GPU_DTYPES": ("cpu.attention", "GPU_DTYPES"),  # the dtypes the GPU attention kernels take
    "ATTENTION_GPU_MAX_HEAD_DIM": ("cpu.attention", "GPU_MAX_HEAD_DIM"),  # E and Ev the GPU kernels hold
    "attention_default_scale": ("cpu.attention", "default_scale"),  # PyTorch's 1/sqrt(E)
    # attention of strided (N, H, L, E) heads for short sequences on the CPU (kernels/cpu/attention_heads.py)
    "attention_heads_takes": ("cpu.attention_heads", "takes"),
    "attention_heads_forward": ("cpu.attention_heads", "forward"),
    "attention_heads_backward": ("cpu.attention_heads", "backward"),
    "GELU_SQUARE_MAX": ("cpu.gelu", "SQUARE_MAX"),  # where the tanh form's x^2 is capped
    "erfc": ("cpu.gelu", "erfc"),  # the one erfc (float64, ~1e-13)
    "adam_bias_corrections": ("cpu.optim", "adam_bias_corrections"),
    "adagrad_decayed_lr": ("cpu.optim", "adagrad_decayed_lr"),
    # the optimizers' formulas on whole arrays (numpy or cupy): the engine's unfused optimizer path
    "adam_update": ("cpu.optim", "adam_update"),
    "sgd_update": ("cpu.optim", "sgd_update"),
    "adagrad_update": ("cpu.optim", "adagrad_update"),
    "rmsprop_update": ("cpu.optim", "rmsprop_update"),
    # LayerNorm's formulas on whole arrays (numpy or cupy): the engine's unfused LayerNorm Function
    "layer_norm_normalize": ("cpu.layer_norm", "normalize"),
    "layer_norm_input_grad": ("cpu.layer_norm", "input_grad"),
    "accumulation_dtype": ("precision", "accumulation_dtype"),  # float32 for 16-bit data
    # ``a @ b`` on cupy arrays through libcublas itself: the engine's one GEMM entry on the GPU (capturable)
    "gpu_matmul": ("cuda.gemm", "matmul"),
    # ``g.sum(0)`` of a contiguous (N, M) cupy array in one or two launches (a Linear's bias gradient; capturable)
    "gpu_bias_grad": ("cuda.linear_relu", "bias_grad"),
    # np.add.at(target, rows, values) for an integer row index, bit for bit, compiled (CPU arrays)
    "scatter_add_rows": ("cpu.scatter", "add_rows"),
    "scatter_add_rows_takes": ("cpu.scatter", "takes"),
}


def __getattr__(name):
    if name in _SHARED:
        import importlib

        module, attr = _SHARED[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
