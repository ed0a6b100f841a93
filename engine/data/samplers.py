"""PyTorch's samplers: the orders a DataLoader draws dataset indices in.

A sampler is any iterable of int indices; these classes are the ones PyTorch scripts name
(``torch.utils.data.RandomSampler`` ...). Every random sampler owns a numpy Generator, seeded
when it is built (``generator=`` an int seed or a ``np.random.Generator``; default: a seed drawn
from the engine's RNG, so ``engine.manual_seed`` fixes it), and has ``state_dict`` /
``load_state_dict`` so that a DataLoader resumes mid-epoch with exactly the same batches.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np

from engine.data.dataset import make_generator
from engine.errors import EngineError


def chunks(iterable, size: int, drop_last: bool):
    """Lists of ``size`` consecutive items of ``iterable``, read lazily (an endless one is fine); the
    last, shorter list is dropped when ``drop_last``. Nothing is read past a short list (the end)."""
    items = iter(iterable)
    while True:
        chunk = list(itertools.islice(items, size))
        if not chunk or (drop_last and len(chunk) < size):
            return
        yield chunk
        if len(chunk) < size:
            return


class Sampler:
    """Base class: subclasses implement ``__iter__`` (yielding int indices) and, if finite, ``__len__``.

    ``data_source`` is accepted for PyTorch compatibility (older PyTorch passed it) and ignored.
    """

    def __init__(self, data_source=None):
        pass

    def __iter__(self):
        raise NotImplementedError(f"{type(self).__name__} must implement __iter__")


class SequentialSampler(Sampler):
    """Indices ``0 .. len(data_source) - 1`` in order."""

    def __init__(self, data_source):
        self.data_source = data_source

    def __iter__(self):
        return iter(range(len(self.data_source)))

    def __len__(self) -> int:
        return len(self.data_source)


class _SeededSampler(Sampler):
    """A sampler with its own generator, whose state at the start of an epoch can be saved."""

    def _init_generator(self, generator, where: str) -> None:
        self.generator = make_generator(generator=generator, where=where)

    def state_dict(self) -> dict:
        return {"generator": copy.deepcopy(self.generator.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.bit_generator.state = copy.deepcopy(state["generator"])


class RandomSampler(_SeededSampler):
    """Indices in a random order: a permutation per epoch, or ``num_samples`` draws with replacement.

    Args:
        data_source: the dataset (only its length is used).
        replacement: draw with replacement (then ``num_samples`` may exceed the dataset's length).
        num_samples: how many indices per epoch (default ``len(data_source)``). Without replacement
            and larger than the dataset, further permutations are appended, as in PyTorch.
        generator: int seed or ``np.random.Generator`` (default: seeded from ``engine.manual_seed``).
    """

    def __init__(self, data_source, replacement: bool = False, num_samples=None, generator=None):
        self.data_source, self.replacement = data_source, bool(replacement)
        self._num_samples = num_samples
        n = self.num_samples
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise EngineError(f"RandomSampler: num_samples must be a positive int, got {num_samples!r}")
        self._init_generator(generator, "RandomSampler")

    @property
    def num_samples(self) -> int:
        return len(self.data_source) if self._num_samples is None else self._num_samples

    _CHUNK = 4096  # draws with replacement made at a time: num_samples may be huge (minGPT asks for 1e10)

    def __iter__(self):
        n, total = len(self.data_source), self.num_samples
        if self.replacement:
            return self._draws_with_replacement(n, total)
        rounds = -(-total // n)
        order = np.concatenate([self.generator.permutation(n) for _ in range(rounds)])[:total]
        return iter(order.tolist())

    def _draws_with_replacement(self, n: int, total: int):
        """Indices drawn lazily, a chunk at a time, as PyTorch's sampler draws them: building all
        ``num_samples`` at once would need 8 bytes each."""
        while total > 0:
            chunk = min(self._CHUNK, total)
            yield from self.generator.integers(0, n, size=chunk).tolist()
            total -= chunk

    def __len__(self) -> int:
        return self.num_samples


class SubsetRandomSampler(_SeededSampler):
    """The given ``indices`` in a random order (a new one every epoch)."""

    def __init__(self, indices, generator=None):
        self.indices = list(indices)
        self._init_generator(generator, "SubsetRandomSampler")

    def __iter__(self):
        return iter(self.indices[i] for i in self.generator.permutation(len(self.indices)).tolist())

    def __len__(self) -> int:
        return len(self.indices)


class BatchSampler(Sampler):
    """Group another sampler's indices into lists of ``batch_size`` (pass it as ``batch_sampler=``).

    Example:
        >>> list(BatchSampler(SequentialSampler(range(5)), batch_size=2, drop_last=False))
        [[0, 1], [2, 3], [4]]
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise EngineError(f"BatchSampler: batch_size must be a positive int, got {batch_size!r}")
        self.sampler, self.batch_size, self.drop_last = sampler, int(batch_size), bool(drop_last)

    def __iter__(self):
        return chunks(self.sampler, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict:
        return self.sampler.state_dict() if hasattr(self.sampler, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self.sampler, "load_state_dict"):
            self.sampler.load_state_dict(state)


__all__ = ["Sampler", "SequentialSampler", "RandomSampler", "SubsetRandomSampler", "BatchSampler"]
