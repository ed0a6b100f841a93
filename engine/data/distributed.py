"""DistributedSampler: each rank of a data-parallel job reads its own shard of the dataset.

PyTorch's index semantics: every rank gets ``num_samples = ceil(len / num_replicas)`` indices
(``ceil((len - num_replicas) / num_replicas)`` with ``drop_last`` when the length does not
divide), the order is one permutation per epoch drawn from a generator seeded ``seed + epoch``
(the same on every rank, so the shards are disjoint), padded by repeating its head up to
``num_samples * num_replicas`` (or cut there with ``drop_last``), and rank r takes every
``num_replicas``-th index from position r. The permutation itself comes from numpy's PCG64, so
it differs from torch.randperm's; the structure is PyTorch's.
"""

from __future__ import annotations

import math

import numpy as np

from engine.data.samplers import Sampler


class DistributedSampler(Sampler):
    """The shard of ``dataset`` for rank ``rank`` out of ``num_replicas`` (defaults: the process group's).

    Call ``set_epoch(epoch)`` at the start of every epoch so that each epoch has its own order
    (the Trainer does it). Pass it to a DataLoader as ``sampler=`` (with ``shuffle`` left False).

    Example:
        >>> sampler = DistributedSampler(range(10), num_replicas=3, rank=0, shuffle=False)
        >>> list(sampler)
        [0, 3, 6, 9]
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if num_replicas is None or rank is None:
            from engine.distributed import core as dist

            if not dist.is_initialized():
                raise RuntimeError("DistributedSampler: pass num_replicas and rank, or call "
                                   "engine.distributed.init_process_group() first")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not isinstance(num_replicas, (int, np.integer)) or num_replicas < 1:
            raise ValueError(f"DistributedSampler: num_replicas must be a positive int, got {num_replicas!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < num_replicas:
            raise ValueError(f"DistributedSampler: invalid rank {rank!r}, rank should be in the interval "
                             f"[0, {num_replicas - 1}]")
        self.dataset, self.num_replicas, self.rank = dataset, int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last, self.epoch = bool(shuffle), int(seed), bool(drop_last), 0
        n = len(dataset)
        if self.drop_last and n % self.num_replicas != 0:
            self.num_samples = math.ceil((n - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(n / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            indices = np.random.Generator(np.random.PCG64(self.seed + self.epoch)).permutation(n).tolist()
        else:
            indices = list(range(n))
        if not self.drop_last:
            padding = self.total_size - len(indices)
            if padding <= len(indices):
                indices += indices[:padding]
            else:
                indices += (indices * math.ceil(padding / len(indices)))[:padding]
        else:
            indices = indices[:self.total_size]
        assert len(indices) == self.total_size
        shard = indices[self.rank:self.total_size:self.num_replicas]
        assert len(shard) == self.num_samples
        return iter(shard)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration gives (seed + epoch seeds the permutation)."""
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])


__all__ = ["DistributedSampler"]
