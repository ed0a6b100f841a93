"""What the Trainer does differently under data parallelism (``Trainer(distributed=True)``).

- the model is wrapped in DistributedDataParallel (gradients averaged over the ranks);
- the training DataLoader is rebuilt over the same dataset with a DistributedSampler (each rank
  reads its shard; ``set_epoch`` at every epoch start, so the shuffle differs per epoch and is the
  same permutation on every rank);
- the epoch's training figures are combined over the ranks once per epoch, with one all-reduce of
  their sample-weighted sums: the loss and accuracy are exactly those of the whole epoch; a
  macro-averaged metric (precision, recall, F1) is the sample-weighted mean of the ranks' values;
  samples/s is the sum over ranks. Validation runs the whole validation set on every rank (the
  replicas are identical, so every rank gets the same figures and takes the same early-stopping
  and checkpoint decisions);
- only rank 0 prints (epoch lines, progress bar) and writes checkpoints; the others wait for the
  write at a barrier. Checkpoints hold the unwrapped model's state dict, so they load in a
  single process too.
"""

from __future__ import annotations

import numpy as np

from engine.data import DataLoader, DistributedSampler
from engine.distributed import core as dist
from engine.nn.parallel import DistributedDataParallel


def enabled(distributed: bool | None) -> bool:
    """``distributed`` as given; None means: whether a process group is initialized."""
    if distributed is None:
        return dist.is_initialized()
    if distributed and not dist.is_initialized():
        dist.init_process_group()
    return bool(distributed)


def is_main() -> bool:
    """Rank 0, or a process outside any process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def wrap(model):
    return model if isinstance(model, DistributedDataParallel) else DistributedDataParallel(model)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard(loader):
    """``loader`` reading this rank's shard: a DataLoader rebuilt with a DistributedSampler (one
    that already has a DistributedSampler, or any other iterable of batches, is returned as is:
    it is taken to be sharded by its maker)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.sampler, DistributedSampler):
        return loader
    if loader.sampler is not None or loader.batch_sampler is not None or loader.iterable:
        raise ValueError("Trainer(distributed=True): the training DataLoader has its own sampler; give it a "
                         "DistributedSampler (engine.data.DistributedSampler) so that each rank reads its shard")
    sampler = DistributedSampler(loader.dataset, shuffle=loader.shuffle)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                      drop_last=loader.drop_last, num_workers=loader.num_workers, device=loader.device,
                      prefetch=loader.prefetch)


def set_epoch(loader, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def reduce_epoch_logs(logs: dict, samples: int) -> dict:
    """The ranks' training figures combined: one all-reduce of [samples, figure * samples ...]."""
    if dist.get_world_size() == 1:
        return logs
    from engine.tensor import Tensor

    keys = [k for k in logs if not k.startswith("val_") and k != "epoch_time"]
    summed = {"samples_per_s"}
    vector = np.array([float(samples)] + [float(logs[k]) * (1.0 if k in summed else samples) for k in keys],
                      dtype=np.float64)
    total = Tensor(vector)
    dist.all_reduce(total)
    values = total.numpy()
    combined = dict(logs)
    for k, v in zip(keys, values[1:]):
        combined[k] = float(v) if k in summed else float(v / max(values[0], 1.0))
    return combined


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
