"""Stand-ins for the torchvision data sets that PyTorch tutorials download, built on the engine's
bundled 8x8 digits (engine.data.load_digits), since the compatibility scripts run without torchvision
and without network.

``DigitsMNIST`` takes torchvision's MNIST/FashionMNIST arguments (root, train, download, transform,
target_transform) and gives the same kind of sample: a 28x28 uint8 image (each 8x8 digit pixel
becomes a 3x3 block, giving a 24x24 digit centred with a 2-pixel border, as MNIST centres a 20x20
digit in 28x28; the 0..16 counts are scaled to 0..255) and an int label in 0..9. So models written
for 28*28 inputs run unchanged. ``ToTensor`` is torchvision's: an HxW uint8 image becomes a float32
(1, H, W) tensor in [0, 1].

The split is fixed: 1,497 images for training and 300 for testing, drawn once with a seeded
permutation (the same images on every run).
"""

from __future__ import annotations

import numpy as np

import engine
from engine.data import Dataset, load_digits

TEST_SIZE = 300
SPLIT_SEED = 0


def _digits_28x28() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_digits(as_images=True)                          # (1797, 8, 8) in 0..16
    big = np.kron(images, np.ones((1, 3, 3), dtype=images.dtype))         # (1797, 24, 24)
    big = np.pad(big, ((0, 0), (2, 2), (2, 2)))                           # (1797, 28, 28)
    return np.round(big * (255.0 / 16.0)).astype(np.uint8), labels


def digits_split(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The 28x28 uint8 digits of one side of the fixed train/test split, as ``(images, labels)``."""
    images, labels = _digits_28x28()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    chosen = order[TEST_SIZE:] if train else order[:TEST_SIZE]
    return images[chosen], labels[chosen]


class ToTensor:
    """torchvision.transforms.ToTensor: an HxW (or HxWxC) uint8 image -> float32 (C, H, W) in [0, 1]."""

    def __call__(self, image) -> engine.Tensor:
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        return engine.tensor(np.ascontiguousarray(array.transpose(2, 0, 1)).astype(np.float32) / 255.0)


class DigitsMNIST(Dataset):
    """The bundled digits in MNIST's shape, with torchvision's dataset arguments (root and download
    are accepted and ignored: nothing is read from or written to disk)."""

    def __init__(self, root: str = "data", train: bool = True, download: bool = False, transform=None,
                 target_transform=None):
        self.root, self.train = root, train
        self.transform, self.target_transform = transform, target_transform
        self.data, self.targets = digits_split(train)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index):
        image, target = self.data[index], int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


def digits_mnist_pickle():
    """The digits in the layout of deeplearning.net's ``mnist.pkl.gz`` that nn_tutorial.py unpickles:
    ``((x_train, y_train), (x_valid, y_valid), (x_test, y_test))`` with each image a float32 row of
    784 values in [0, 1] and int64 labels. The train and valid sides are DigitsMNIST's fixed split;
    the test side (which the tutorial discards) repeats the valid side."""
    def side(train: bool):
        images, labels = digits_split(train)
        return (images.reshape(len(images), 784).astype(np.float32) / 255.0), labels.astype(np.int64)
    train, valid = side(True), side(False)
    return train, valid, valid
