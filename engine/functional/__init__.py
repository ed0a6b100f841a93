"""Functional API (``import engine.functional as F``): activations, linear layers, losses.

``linear_relu`` and ``cross_entropy`` run the fused kernels of kernels/ on both devices. The
unfused composition of core ops stays available with ``fused=False`` or, for a whole block of
code, ``with F.fused_kernels(False):`` so fused-vs-reference parity can be tested end to end.
"""

from engine.conv import adaptive_avg_pool2d, avg_pool1d, avg_pool2d, conv1d, conv2d, max_pool2d
from engine.ops import gelu, leaky_relu, log_softmax, relu, sigmoid, softmax, tanh
from engine.fusion import fused_enabled, fused_kernels
from engine.functional.linear import (
    linear, linear_relu,
)
from engine.functional.losses import (
    binary_cross_entropy, binary_cross_entropy_with_logits, cosine_embedding_loss, cross_entropy, huber_loss,
    kl_div, l1_loss, mse_loss, nll_loss, smooth_l1_loss,
)
from engine.functional.dropout import (
    dropout, dropout2d,
)
from engine.functional.normalization import (
    layer_norm,
)
from engine.functional.attention import (
    attention_unfused, scaled_dot_product_attention,
)
from engine.functional.embedding import (
    embedding, one_hot,
)
from engine.functional.padding import (
    pad,
)

# The public API (engine.nn.functional re-exports exactly this). Helpers and Function classes are
# imported from their module: engine.functional.losses, .attention, ...
__all__ = [
    "adaptive_avg_pool2d", "attention_unfused", "avg_pool1d", "avg_pool2d", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "conv1d", "conv2d", "cosine_embedding_loss", "cross_entropy", "dropout",
    "dropout2d", "embedding", "fused_enabled", "fused_kernels", "gelu", "huber_loss", "kl_div", "l1_loss",
    "layer_norm", "leaky_relu", "linear", "linear_relu", "log_softmax", "max_pool2d", "mse_loss", "nll_loss",
    "one_hot", "pad", "relu", "scaled_dot_product_attention", "sigmoid", "smooth_l1_loss", "softmax", "tanh",
]
