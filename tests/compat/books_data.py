"""The dataset swap for the ported book/course scripts (tests/compat/scripts/).

The originals download Fashion-MNIST or MNIST; the ports use the engine's built-in 8x8 digits
(engine/data/digits.py) instead, scaled to [0, 1] as ``transforms.ToTensor()`` scales pixels, and
split deterministically: the first 1437 images train, the last 360 test (about 80/20).
"""

from __future__ import annotations

import engine
from engine.data.digits import load_digits
from engine.utils.data import DataLoader, TensorDataset

NUM_TRAIN = 1437


def digits_tensors():
    """``(X_train, y_train, X_test, y_test)``: float32 (N, 64) in [0, 1] and int64 labels."""
    x, y = load_digits()
    x = x / 16.0
    return (engine.tensor(x[:NUM_TRAIN]), engine.tensor(y[:NUM_TRAIN]),
            engine.tensor(x[NUM_TRAIN:]), engine.tensor(y[NUM_TRAIN:]))


def digits_datasets():
    """The train and test splits as ``TensorDataset``s of (image row, label)."""
    x_train, y_train, x_test, y_test = digits_tensors()
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


def load_data_digits(batch_size):
    """Stands in for d2l's ``load_data_fashion_mnist(batch_size)``: (train_iter, test_iter)."""
    train, test = digits_datasets()
    return (DataLoader(train, batch_size, shuffle=True),
            DataLoader(test, batch_size, shuffle=False))
