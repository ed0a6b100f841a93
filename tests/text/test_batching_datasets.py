"""Padding, the key-padding mask, PadCollate through a DataLoader; language-modelling windows."""

import re

import numpy as np
import pytest

import engine
from engine.data import DataLoader
from engine.errors import DTypeError
from engine.nn.utils.rnn import pad_sequence
from engine.text import ByteTokenizer, LanguageModelDataset, PadCollate, pad_batch, split_tokens, unigram_baseline


def test_pad_batch_pads_and_masks_padding_as_true():
    padded, mask, lengths = pad_batch([[5, 6, 7], [8], np.array([9, 10])], padding_value=0, return_lengths=True)
    assert padded.dtype == engine.int64 and padded.tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert mask.dtype == engine.bool_
    assert mask.tolist() == [[False, False, False], [False, True, True], [False, False, True]]
    assert lengths.tolist() == [3, 1, 2]
    # time-first output; the mask stays (batch, length), as attention layers take it
    padded_t, mask_t = pad_batch([[1, 2], [3]], padding_value=-1, batch_first=False)
    assert padded_t.shape == (2, 2) and padded_t.tolist() == [[1, 3], [2, -1]]
    assert mask_t.tolist() == [[False, False], [False, True]]


def test_pad_batch_feature_sequences_and_errors():
    seqs = [engine.randn(4, 3), engine.randn(2, 3)]
    padded, mask = pad_batch(seqs, padding_value=0.0)
    assert padded.shape == (2, 4, 3) and padded.dtype == engine.float32
    np.testing.assert_array_equal(padded.numpy()[1, :2], seqs[1].numpy())
    assert (padded.numpy()[1, 2:] == 0).all() and mask.numpy().sum() == 2
    with pytest.raises(ValueError, match="non-empty list"):
        pad_batch([])
    with pytest.raises(ValueError, match="sequence 1 is a scalar"):
        pad_batch([[1, 2], 3])


def test_pad_collate_through_a_dataloader():
    tok = ByteTokenizer(special_tokens=["<pad>"])
    texts = ["a", "hello", "hey", "longest one", "mid"]
    items = [(tok.encode(t), k % 2) for k, t in enumerate(texts)]
    loader = DataLoader(items, batch_size=2, collate_fn=PadCollate(tok.pad_id))
    batches = list(loader)
    assert len(batches) == 3
    tokens, mask, labels = batches[0]
    assert tokens.shape == (2, 5) and tokens.tolist()[0] == [97] + [256] * 4
    assert (mask.numpy() == (tokens.numpy() == 256)).all()
    assert labels.tolist() == [0, 1] and labels.dtype == engine.int64
    for (tokens, mask, _), chunk in zip(batches, (texts[0:2], texts[2:4], texts[4:])):
        assert [tok.decode(row[~m]) for row, m in zip(tokens.numpy(), mask.numpy())] == chunk


def test_pad_collate_pads_sequence_labels_with_ignore_index():
    collate = PadCollate(pad_id=0)
    tokens, mask, labels = collate([([1, 2, 3], [4, 5, 6]), ([7], [8])])
    assert labels.tolist() == [[4, 5, 6], [8, -100, -100]]
    assert mask.tolist() == [[False] * 3, [False, True, True]]
    with pytest.raises(ValueError, match=r"\(sequence, label\) pairs"):
        collate([[1, 2, 3]])
    with pytest.raises(TypeError, match="pad_id must be an int"):
        PadCollate(None)


def test_pad_batch_empty_sequences_take_the_others_dtype():
    # the ids of "" are [], which numpy alone would make float64 (then float32): a dtype clash with the ids
    padded, mask = pad_batch([[], [1, 2]], padding_value=7)
    assert padded.dtype == engine.int64 and padded.tolist() == [[7, 7], [1, 2]]
    assert mask.tolist() == [[True, True], [False, False]]
    features, _ = pad_batch([engine.randn(2, 3), []])  # an empty list takes the trailing dims too
    assert features.shape == (2, 2, 3) and features.dtype == engine.float32
    assert (features.numpy()[1] == 0).all()
    # all empty: int64 ids of length 0, as torch's pad_sequence gives (2, 0)
    padded, mask, lengths = pad_batch([[], []], return_lengths=True)
    assert padded.shape == (2, 0) and padded.dtype == engine.int64 and mask.shape == (2, 0)
    assert lengths.tolist() == [0, 0]
    tok = ByteTokenizer(special_tokens=["<pad>"])
    tokens, mask, labels = PadCollate(tok.pad_id)([(tok.encode(""), 0), (tok.encode("ab"), 1)])
    assert tokens.tolist() == [[256, 256], [97, 98]] and labels.tolist() == [0, 1]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1.5, 2**63, -2**63 - 1, np.float32("nan")])
def test_pad_batch_refuses_a_padding_value_the_ids_cannot_hold(value):
    with pytest.raises(DTypeError, match=rf"pad_batch: padding_value={re.escape(repr(value))} cannot be stored "
                                         r"exactly in the sequences' dtype int64"):
        pad_batch([[1, 2], [3]], padding_value=value)
    with pytest.raises(DTypeError, match="pad_sequence: padding_value=.* dtype int64"):
        pad_sequence([engine.tensor([1, 2]), engine.tensor([3])], padding_value=value)


def test_padding_values_each_dtype_holds():
    ids = [np.array([1, 2], np.uint8), np.array([3], np.uint8)]
    assert pad_batch(ids, padding_value=255)[0].tolist() == [[1, 2], [3, 255]]
    assert pad_batch([[1, 2], [3]], padding_value=2.0)[0].tolist() == [[1, 2], [3, 2]]  # a whole float is exact
    for value in (-1, 256):
        with pytest.raises(DTypeError, match=f"padding_value={value} .* dtype uint8 .*in \\[0, 255\\]"):
            pad_batch(ids, padding_value=value)
    flags = [np.array([True]), np.array([], bool)]
    assert pad_batch(flags, padding_value=True)[0].tolist() == [[True], [True]]
    with pytest.raises(DTypeError, match="padding_value=2 .* dtype bool"):
        pad_batch(flags, padding_value=2)
    # float features: nan and inf are values a float holds; a finite value that overflows to inf is not
    padded, _ = pad_batch([[1.0, 2.0], [3.0]], padding_value=float("nan"))
    assert np.isnan(padded.numpy()[1, 1])
    with pytest.raises(DTypeError, match="padding_value=1e\\+40 overflows the sequences' dtype float32"):
        pad_batch([[1.0, 2.0], [3.0]], padding_value=1e40)
    with pytest.raises(TypeError, match="padding_value must be a real number, got None"):
        pad_batch([[1], [2, 3]], padding_value=None)
    with pytest.raises(TypeError, match="label_pad_id must be an int"):
        PadCollate(0, label_pad_id=float("nan"))


def test_language_model_windows_and_targets():
    stream = np.arange(100) * 3 % 256
    ds = LanguageModelDataset(stream, block_size=8)
    assert len(ds) == 100 - 8  # every offset whose window and next token fit
    for i in (0, 17, len(ds) - 1, -1):
        x, y = ds[i]
        start = i % len(ds)
        assert x.dtype == np.int64 and x.shape == y.shape == (8,)
        np.testing.assert_array_equal(x, stream[start:start + 8])
        np.testing.assert_array_equal(y, stream[start + 1:start + 9])  # y is x shifted by one
    with pytest.raises(IndexError):
        ds[len(ds)]
    sequential = LanguageModelDataset(stream, block_size=8, stride=8)
    assert len(sequential) == (100 - 1) // 8
    covered = np.concatenate([sequential[i][0] for i in range(len(sequential))])
    np.testing.assert_array_equal(covered, stream[:len(covered)])  # non-overlapping, in order
    with pytest.raises(ValueError, match="holds no window"):
        LanguageModelDataset(stream[:8], block_size=8)
    with pytest.raises(ValueError, match="expected a 1-D stream"):
        LanguageModelDataset(stream.reshape(10, 10), block_size=4)


def test_random_windows_are_seeded_and_resume_exactly():
    stream = np.random.default_rng(0).integers(0, 50, 1000)
    ds = LanguageModelDataset(stream, block_size=16)

    def batches(seed, resume_from=None):
        engine.manual_seed(seed)
        loader = DataLoader(ds, batch_size=4, sampler=ds.random_windows(num_samples=40))
        if resume_from is not None:
            loader.load_state_dict(resume_from)
        return [x.numpy().copy() for x, _ in loader]

    first, again, other = batches(1), batches(1), batches(2)
    assert len(first) == 10 and all(b.shape == (4, 16) for b in first)
    assert all((a == b).all() for a, b in zip(first, again))
    assert not all((a == b).all() for a, b in zip(first, other))
    # windows start at varied offsets (not a fixed grid)
    starts = {int(np.flatnonzero((np.lib.stride_tricks.sliding_window_view(stream, 16) == row).all(1))[0])
              for b in first for row in b}
    assert len(starts) > 30
    # a loader's state mid-epoch gives the remaining batches
    engine.manual_seed(1)
    loader = DataLoader(ds, batch_size=4, sampler=ds.random_windows(num_samples=40))
    iterator = iter(loader)
    [next(iterator) for _ in range(3)]
    state = loader.state_dict()
    rest = batches(5, resume_from=state)
    assert len(rest) == 7 and all((a == b).all() for a, b in zip(rest, first[3:]))


def test_split_tokens_and_unigram_baseline():
    train, val = split_tokens(list(range(10)) * 10, val_fraction=0.2)
    assert len(train) == 80 and len(val) == 20 and train.dtype == np.int64
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens([1, 2, 3], val_fraction=1.5)
    # uniform over 4 symbols: entropy log 4; validation from the same distribution costs about as much
    base = unigram_baseline(np.tile([0, 1, 2, 3], 50), np.array([0, 1, 2, 3]), vocab_size=4)
    assert base["entropy"] == pytest.approx(np.log(4))
    assert base["cross_entropy"] == pytest.approx(np.log(4))
    # a token never seen in training costs a finite, large amount (add-one smoothing)
    unseen = unigram_baseline(np.zeros(100, np.int64), np.array([1]), vocab_size=2)
    assert unseen["entropy"] == 0.0 and unseen["cross_entropy"] == pytest.approx(np.log(102))


def test_token_streams_refuse_ids_that_would_wrap():
    # a uint64 id past int64's range would become a negative id in the int64 stream
    with pytest.raises(ValueError, match=r"token id 9223372036854775808 at position 1 is not an id"):
        LanguageModelDataset(np.array([1, 2**63, 2, 3], np.uint64), block_size=2)
    with pytest.raises(ValueError, match="token id -5 at position 2 is not an id"):
        split_tokens([1, 2, -5, 3], val_fraction=0.5)
    with pytest.raises(ValueError, match="vocab_size must be a positive int, got 2.5"):
        unigram_baseline([0, 1], [1], vocab_size=2.5)
    assert LanguageModelDataset(np.array([1, 2, 3], np.uint64), block_size=2)[0][0].tolist() == [1, 2]
