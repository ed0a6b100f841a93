"""Language-modelling datasets over a token stream: windows of ``block_size`` ids and their next ids.

One text becomes one long stream of ids (tokenize it once); training draws windows at random
offsets, validation walks non-overlapping windows in order:

    train_ids, val_ids = split_tokens(ids, val_fraction=0.1)
    train = LanguageModelDataset(train_ids, block_size=128)              # every offset is a window
    loader = DataLoader(train, batch_size=32,
                        sampler=train.random_windows(num_samples=100 * 32))  # 100 random batches
    val = LanguageModelDataset(val_ids, block_size=128, stride=128)      # non-overlapping windows
    x, y = train[0]     # y[t] == x[t + 1]: the next token at every position
"""

from __future__ import annotations

import numpy as np

from engine.data import Dataset, RandomSampler
from engine.tensor import Tensor


def _token_array(where: str, tokens) -> np.ndarray:
    """``tokens`` (a list, array or Tensor of ints) as a 1-D int64 host array of ids >= 0."""
    if isinstance(tokens, Tensor):
        tokens = tokens.numpy()
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"{where}: expected a 1-D stream of token ids, got shape {array.shape}")
    if not array.size:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{where}: token ids must be integers, got dtype {array.dtype}")
    # checked before the cast: a uint64 id past int64's range would wrap to a negative id
    low, high = array.min(), array.max()
    if low < 0 or high > np.iinfo(np.int64).max:
        bad = int(low) if low < 0 else int(high)
        raise ValueError(f"{where}: token id {bad} at position {int(np.flatnonzero(array == bad)[0])} is not an id "
                         f"(ids lie in [0, 2**63))")
    return array.astype(np.int64, copy=False)


def split_tokens(tokens, val_fraction: float = 0.1):
    """Split a stream into a training head and a validation tail (contiguous, so no window of one
    overlaps the other). Returns two int64 numpy arrays."""
    array = _token_array("split_tokens", tokens)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"split_tokens: val_fraction must be in (0, 1), got {val_fraction!r}")
    cut = len(array) - int(round(len(array) * val_fraction))
    if cut <= 0 or cut >= len(array):
        raise ValueError(f"split_tokens: a stream of {len(array)} tokens is too short to split at "
                         f"val_fraction={val_fraction}")
    return array[:cut], array[cut:]


class LanguageModelDataset(Dataset):
    """Windows of a token stream with next-token targets: item ``i`` is ``(x, y)`` where
    ``x = tokens[i*stride : i*stride + block_size]`` and ``y = tokens[i*stride + 1 : i*stride + block_size + 1]``.

    Args:
        tokens: the stream (list, 1-D array or Tensor of ints); kept on the host as int64.
        block_size: the window (context) length.
        stride: offset between consecutive items. 1 (default): every offset is an item, so a
            random index is a random window (train with :meth:`random_windows` or ``shuffle=True``).
            ``block_size``: non-overlapping windows that cover the stream once (validation).

    Items are numpy int64 arrays, batched by the DataLoader's default collate into ``(batch,
    block_size)`` Tensors.
    """

    def __init__(self, tokens, block_size: int, stride: int = 1):
        self.tokens = _token_array("LanguageModelDataset", tokens)
        for name, value in (("block_size", block_size), ("stride", stride)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"LanguageModelDataset: {name} must be a positive int, got {value!r}")
        if len(self.tokens) < block_size + 1:
            raise ValueError(f"LanguageModelDataset: a stream of {len(self.tokens)} tokens holds no window of "
                             f"block_size={block_size} plus its next token; use a smaller block_size or more text")
        self.block_size, self.stride = int(block_size), int(stride)

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"LanguageModelDataset: index must be an int, got {type(index).__name__}")
        if not -n <= index < n:
            raise IndexError(f"LanguageModelDataset: index {index} out of range for {n} windows")
        start = (int(index) % n) * self.stride
        window = self.tokens[start:start + self.block_size + 1]
        return window[:-1], window[1:]

    def random_windows(self, num_samples: int, generator=None) -> RandomSampler:
        """A sampler of ``num_samples`` random window indices (with replacement), for ``DataLoader(sampler=)``.

        It draws from its own numpy generator, seeded from the engine's RNG (``engine.manual_seed``)
        or from ``generator`` (an int seed or ``np.random.Generator``); its state is part of the
        DataLoader's ``state_dict``, so a resumed run sees the same windows.
        """
        return RandomSampler(self, replacement=True, num_samples=num_samples, generator=generator)

    def __repr__(self) -> str:
        return (f"LanguageModelDataset({len(self.tokens)} tokens, block_size={self.block_size}, "
                f"stride={self.stride}, {len(self)} windows)")


def unigram_baseline(train_tokens, val_tokens, vocab_size: int) -> dict:
    """The unigram model's figures in nats: ``entropy`` of the training token distribution, and its
    ``cross_entropy`` on the validation tokens (add-one smoothed, so a token unseen in training
    costs a finite amount). A language model that learned anything beats the cross-entropy.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"unigram_baseline: vocab_size must be a positive int, got {vocab_size!r}")
    train = _token_array("unigram_baseline", train_tokens)
    val = _token_array("unigram_baseline", val_tokens)
    if train.size == 0 or val.size == 0:
        raise ValueError("unigram_baseline: needs non-empty train and validation streams")
    if train.max() >= vocab_size or val.max() >= vocab_size:
        raise ValueError(f"unigram_baseline: token ids must lie in [0, {vocab_size})")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    smoothed = (counts + 1.0) / (counts.sum() + vocab_size)
    return {"entropy": entropy, "cross_entropy": float(-np.log(smoothed[val]).mean())}
