"""Text: tokenizers, batching of variable-length sequences, and language-modelling datasets.

Example:
    >>> from engine.text import ByteTokenizer, LanguageModelDataset, split_tokens
    >>> tok = ByteTokenizer()
    >>> train_ids, val_ids = split_tokens(tok.encode("hello world " * 100), val_fraction=0.1)
    >>> x, y = LanguageModelDataset(train_ids, block_size=8)[0]
    >>> tok.decode(x), tok.decode(y)
    ('hello wo', 'ello wor')
"""

from engine.text.batching import PadCollate, pad_batch
from engine.text.datasets import LanguageModelDataset, split_tokens, unigram_baseline
from engine.text.tokenizers import BPETokenizer, ByteTokenizer, CharTokenizer

__all__ = ["ByteTokenizer", "CharTokenizer", "BPETokenizer", "pad_batch", "PadCollate", "LanguageModelDataset",
           "split_tokens", "unigram_baseline"]
