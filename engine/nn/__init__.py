"""Neural-network building blocks (``from engine import nn``), with PyTorch's names.

Example:
    >>> from engine import nn                                               # doctest: +SKIP
    >>> model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    >>> loss = nn.CrossEntropyLoss()(model(x), labels)
"""

from engine.nn import functional, init, parallel, utils
from engine.nn.conv import AdaptiveAvgPool2d, AvgPool2d, Conv1d, Conv2d, MaxPool2d
from engine.nn.layers import (GELU, BatchNorm1d, BatchNorm2d, Dropout, Dropout2d, Embedding, Flatten, Identity,
                              LayerNorm, LeakyReLU, Linear, LogSoftmax, ModuleDict, ModuleList, ReLU, Sequential,
                              Sigmoid, Softmax, Tanh)
from engine.nn.layers import (CircularPad1d, CircularPad2d, CircularPad3d, ConstantPad1d, ConstantPad2d,  # noqa: F401
                              ConstantPad3d, ReflectionPad1d, ReflectionPad2d, ReflectionPad3d, ReplicationPad1d,
                              ReplicationPad2d, ReplicationPad3d, ZeroPad1d, ZeroPad2d, ZeroPad3d)
from engine.nn.losses import (BCELoss, BCEWithLogitsLoss, CosineEmbeddingLoss, CrossEntropyLoss, KLDivLoss,
                               HuberLoss, L1Loss, MSELoss, NLLLoss, SmoothL1Loss)
from engine.nn.module import IncompatibleKeys, Module, Parameter, StateDictError
from engine.nn.parallel import DataParallel
from engine.nn.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNBase, RNNCell, RNNCellBase
from engine.nn.transformer import (MultiheadAttention, Transformer, TransformerDecoder, TransformerDecoderLayer,
                                   TransformerEncoder, TransformerEncoderLayer)

__all__ = [
    "functional", "init", "parallel", "utils",
    "Module", "Parameter", "IncompatibleKeys", "StateDictError",
    "Sequential", "ModuleList", "ModuleDict", "DataParallel", "Linear", "Identity", "ReLU", "Sigmoid", "Tanh", "GELU", "Softmax", "LogSoftmax",
    "Flatten", "Dropout", "LayerNorm", "BatchNorm1d", "Embedding", "LeakyReLU",
    "Conv1d", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "BatchNorm2d", "Dropout2d",
    "MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder", "TransformerDecoderLayer",
    "TransformerDecoder", "Transformer",
    "CrossEntropyLoss", "NLLLoss", "MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "BCELoss", "BCEWithLogitsLoss", "KLDivLoss",
    "CosineEmbeddingLoss",
    "RNNBase", "RNN", "LSTM", "GRU", "RNNCellBase", "RNNCell", "LSTMCell", "GRUCell",
    "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d", "ReflectionPad1d",
    "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d", "ReplicationPad2d", "ReplicationPad3d",
    "CircularPad1d", "CircularPad2d", "CircularPad3d",
]
