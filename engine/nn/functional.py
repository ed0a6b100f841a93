"""``import engine.nn.functional as F`` works as in PyTorch: the same functions as engine.functional."""

from engine.functional import (adaptive_avg_pool2d, avg_pool1d, avg_pool2d, binary_cross_entropy,
                               binary_cross_entropy_with_logits, conv1d, conv2d, cosine_embedding_loss, cross_entropy,
                               dropout, dropout2d, embedding, fused_enabled, fused_kernels, gelu, kl_div, l1_loss, layer_norm, leaky_relu, linear, linear_relu,
                               log_softmax, max_pool2d, mse_loss, nll_loss, one_hot, pad, relu,
                               scaled_dot_product_attention, sigmoid, softmax, tanh)
from engine.functional import huber_loss, smooth_l1_loss  # noqa: E402

__all__ = [
    "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "conv1d", "conv2d", "dropout2d", "max_pool2d",
    "cosine_embedding_loss",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy", "dropout", "embedding",
    "fused_enabled", "fused_kernels", "gelu", "kl_div", "l1_loss", "layer_norm", "leaky_relu", "linear",
    "linear_relu", "log_softmax", "mse_loss", "nll_loss", "one_hot", "pad", "relu", "scaled_dot_product_attention", "sigmoid",
    "softmax", "tanh", "huber_loss", "smooth_l1_loss",
]
