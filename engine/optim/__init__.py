"""Optimizers and learning-rate schedulers (PyTorch names and semantics).

Every optimizer keeps its parameters, gradients and states in flat buffers, one per param
group, device and dtype, and updates each with one fused kernel launch (see
engine/optim/optimizer.py and docs/optim.md).

Example:
    >>> from engine import optim                                            # doctest: +SKIP
    >>> opt = optim.AdamW(model.parameters(), lr=1e-3)                      # doctest: +SKIP
    >>> sched = optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)        # doctest: +SKIP
"""

from engine.optim import lr_scheduler
from engine.optim.adadelta import Adadelta
from engine.optim.adagrad import Adagrad
from engine.optim.adam import Adam, AdamW
from engine.optim.optimizer import Optimizer
from engine.optim.rmsprop import RMSprop
from engine.optim.sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "RMSprop", "lr_scheduler"]
