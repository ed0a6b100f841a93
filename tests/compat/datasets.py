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

``DigitsCIFAR10`` is the CIFAR-10 stand-in: the same digits as 32x32 RGB uint8 images (HxWx3, like
torchvision's ``CIFAR10.data``), each 8x8 digit pixel a 3x3 block (24x24) placed at a random offset,
drawn in a random light colour on a random dark background with Gaussian noise; 10 classes,
its own fixed split of 1,297 train and 500 test images. ``Compose`` and ``Normalize`` are
torchvision's transforms, so ``Compose([ToTensor(), Normalize(mean, std)])`` gives a normalised
float32 (3, 32, 32) tensor as in the CIFAR tutorials.
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


class Compose:
    """torchvision.transforms.Compose: apply the transforms in order."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Normalize:
    """torchvision.transforms.Normalize: ``(x - mean[c]) / std[c]`` per channel of a (C, H, W) tensor."""

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    def __call__(self, tensor: engine.Tensor) -> engine.Tensor:
        return engine.tensor((tensor.numpy() - self.mean) / self.std)


CIFAR_TEST_SIZE = 500
CIFAR_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_cifar_split(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """The digits as coloured, noisy 32x32x3 uint8 images (one fixed rendering, seeded) and their
    labels, for one side of DigitsCIFAR10's fixed split."""
    images, labels = load_digits(as_images=True)                          # (1797, 8, 8) in 0..16
    rng = np.random.default_rng(SPLIT_SEED)
    n = len(images)
    ink = np.kron(images / 16.0, np.ones((1, 3, 3)))                     # (n, 24, 24) in [0, 1]
    alpha = np.zeros((n, 32, 32))
    for i, (dy, dx) in enumerate(rng.integers(2, 7, size=(n, 2))):
        alpha[i, dy:dy + 24, dx:dx + 24] = ink[i]
    background = rng.uniform(0.0, 0.4, size=(n, 1, 1, 3))               # dark background,
    foreground = rng.uniform(0.5, 1.0, size=(n, 1, 1, 3))               # light ink, random hues
    pictures = background + (foreground - background) * alpha[..., None]
    pictures += rng.normal(0.0, 0.08, size=pictures.shape)
    pictures = np.round(np.clip(pictures, 0.0, 1.0) * 255).astype(np.uint8)
    order = rng.permutation(n)
    chosen = order[CIFAR_TEST_SIZE:] if train else order[:CIFAR_TEST_SIZE]
    return pictures[chosen], labels[chosen]


class DigitsCIFAR10(DigitsMNIST):
    """The bundled digits in CIFAR-10's shape (32x32 RGB, ``data`` is (N, 32, 32, 3) uint8, ``targets`` a
    list of ints, ``classes`` ten names), with torchvision's CIFAR10 arguments (root and download are
    accepted and ignored)."""

    classes = CIFAR_CLASSES

    def __init__(self, root: str = "data", train: bool = True, download: bool = False, transform=None,
                 target_transform=None):
        self.root, self.train = root, train
        self.transform, self.target_transform = transform, target_transform
        self.data, labels = digits_cifar_split(train)
        self.targets = [int(label) for label in labels]


def write_tiny_corpus(directory, seed: int = 0, lines: tuple = (300, 60, 60)) -> None:
    """Stand-in for the word-level corpora (Wikitext-2) the language-model examples read: writes
    ``train.txt``, ``valid.txt`` and ``test.txt`` into ``directory``, sentences of a small grammar
    (a determiner, an optional adjective, a noun, a verb that depends on the noun, an object), one
    per line, so a model has structure to learn: about 30 words, perplexity far below the vocabulary
    size once learned."""
    import pathlib

    rng = np.random.default_rng(seed)
    nouns = {"cat": ["chases", "sees"], "dog": ["chases", "bites"], "bird": ["sees", "hears"],
             "child": ["hears", "likes", "sees"], "farmer": ["feeds", "likes"]}
    objects = {"chases": ["mouse", "ball"], "sees": ["tree", "river", "mouse"], "bites": ["bone", "ball"],
               "hears": ["song", "river"], "likes": ["song", "apple"], "feeds": ["horse", "dog"]}
    adjectives = ["big", "small", "old", "happy"]

    def sentence() -> str:
        noun = rng.choice(list(nouns))
        words = [rng.choice(["the", "a"])]
        if rng.random() < 0.4:
            words.append(rng.choice(adjectives))
        verb = rng.choice(nouns[noun])
        words += [noun, verb, "the", rng.choice(objects[verb]), "."]
        return " ".join(words)

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, count in zip(("train.txt", "valid.txt", "test.txt"), lines):
        (directory / name).write_text("\n".join(sentence() for _ in range(count)) + "\n")


def write_tiny_shakespeare(path, seed: int = 0, sentences: int = 1500, first_line: str = "") -> None:
    """Stand-in for tiny Shakespeare (``input.txt``, 1.1 MB, which Karpathy's lecture scripts
    download): the small grammar of :func:`write_tiny_corpus` as one character stream, capitalised,
    with line breaks, about 50 kB and ~30 distinct characters. A character model has structure to
    learn: within a word the next character is nearly fixed, so a bigram model drops from
    ln(vocab) ~ 3.4 nats to ~2 and a small GPT below 1. ``first_line`` is put before the rest (a
    prompt a script samples from must consist of characters the text has)."""
    import pathlib

    rng = np.random.default_rng(seed)
    path = pathlib.Path(path)
    tmp = path.parent / (path.name + ".parts")
    write_tiny_corpus(tmp, seed=int(rng.integers(1 << 30)), lines=(sentences, 1, 1))
    lines = (tmp / "train.txt").read_text().splitlines()
    text = "\n".join(([first_line] if first_line else []) + [line[:1].upper() + line[1:] for line in lines]) + "\n"
    path.write_text(text)
    for part in tmp.iterdir():
        part.unlink()
    tmp.rmdir()


def write_names(path, count: int = 2000, seed: int = 0) -> None:
    """Stand-in for makemore's ``names.txt`` (32k first names, one per line): ``count`` invented
    names of 2 to 4 syllables from a small syllable set, lowercase a-z only, one per line, so a
    character model has structure to learn (which letter may follow which, and where names end)."""
    import pathlib

    rng = np.random.default_rng(seed)
    onsets = ["b", "d", "j", "k", "l", "m", "n", "r", "s", "t", "v", "z", "ch", "sh"]
    vowels = ["a", "e", "i", "o", "u", "ay", "ee"]
    endings = ["", "", "n", "h", "l", "s"]
    names = []
    for _ in range(count):
        syllables = [rng.choice(onsets) + rng.choice(vowels) for _ in range(int(rng.integers(2, 5)))]
        names.append("".join(syllables) + rng.choice(endings))
    pathlib.Path(path).write_text("\n".join(names) + "\n")


def save_image(tensor, fp, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> None:
    """torchvision.utils.save_image for the ported examples: a (B, C, H, W) (or (C, H, W)) float
    tensor in [0, 1] laid out as a grid of ``nrow`` images per row with ``padding`` pixels between
    them, written as an 8-bit PNG (through Pillow), as torchvision does."""
    from PIL import Image

    images = np.asarray(tensor.detach().numpy() if hasattr(tensor, "detach") else tensor, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = -(-count // columns)
    grid = np.full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding), pad_value,
                   dtype=np.float32)
    for k in range(count):
        top, left = (k // columns) * (height + padding) + padding, (k % columns) * (width + padding) + padding
        grid[:, top:top + height, left:left + width] = images[k]
    pixels = np.clip(grid * 255 + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels).save(fp)
