"""``torch.utils.data.sampler``'s import path: the samplers of :mod:`engine.data`."""

from engine.data.preprocessing import WeightedRandomSampler  # noqa: F401
from engine.data.samplers import (BatchSampler, RandomSampler, Sampler, SequentialSampler,  # noqa: F401
                                  SubsetRandomSampler)

__all__ = ["Sampler", "SequentialSampler", "RandomSampler", "SubsetRandomSampler", "BatchSampler",
           "WeightedRandomSampler"]
