"""Ensembles: average several models' probabilities, or let them vote."""

from __future__ import annotations

import numpy as np

import engine.functional as F
from engine.nn import Module, ModuleList
from engine.ops import stack
from engine.tensor import Tensor


class Ensemble(Module):
    """Combine classifiers' outputs.

    ``mode="mean"`` averages the members' softmax probabilities and returns their log (so it can
    feed ``F.nll_loss`` or an argmax); ``mode="vote"`` returns one-hot-sum vote counts per class
    (argmax gives the majority class, ties going to the lowest class index).
    """

    def __init__(self, models, mode: str = "mean"):
        super().__init__()
        if mode not in ("mean", "vote"):
            raise ValueError(f"Ensemble: mode must be 'mean' or 'vote', got {mode!r}")
        if not models:
            raise ValueError("Ensemble: needs at least one model")
        self.members = ModuleList(models)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        outputs = [model(x) for model in self.members]
        if self.mode == "mean":
            probs = stack([F.softmax(o, axis=-1) for o in outputs], axis=0).mean(axis=0)
            return probs.log()
        classes = outputs[0].shape[-1]
        votes = np.zeros((outputs[0].shape[0], classes), dtype=np.float32)
        for o in outputs:
            votes[np.arange(len(votes)), o.argmax(axis=-1).numpy()] += 1
        return Tensor(votes, device=x.device)
