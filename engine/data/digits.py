"""The built-in 8x8 handwritten digits (1,797 images, 10 classes), loaded without network access.

Origin: the test set of the UCI "Optical Recognition of Handwritten Digits" data set
(E. Alpaydin and C. Kaynak, 1998; https://doi.org/10.24432/C50P49), licensed CC BY 4.0, as
bundled with scikit-learn (``sklearn.datasets.load_digits``, BSD-3-Clause). Each 32x32 bitmap
was divided into 4x4 blocks and the "on" pixels counted, giving 8x8 images with values 0..16.

``digits.npz`` (next to this module) stores ``images`` uint8 (1797, 8, 8) and ``labels`` uint8
(1797,), compressed, identical to scikit-learn's copy; it is read with ``allow_pickle=False``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIGITS_FILE = Path(__file__).with_name("digits.npz")


def load_digits(as_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 digits as ``(x, y)``.

    Args:
        as_images: return x as (1797, 8, 8) images instead of (1797, 64) rows.

    Returns:
        x: float32 pixel counts in [0, 16], shape (1797, 64) (or (1797, 8, 8)).
        y: int64 digit labels 0..9, shape (1797,).

    Example:
        >>> x, y = load_digits()
        >>> x.shape, x.dtype, y[:5]
        ((1797, 64), dtype('float32'), array([0, 1, 2, 3, 4]))
    """
    if not DIGITS_FILE.is_file():
        raise FileNotFoundError(f"load_digits: the data file {str(DIGITS_FILE)!r} is missing from the installation; "
                                "reinstall the package (it ships as package data)")
    with np.load(DIGITS_FILE, allow_pickle=False) as archive:
        images, labels = archive["images"], archive["labels"]
    x = images.astype(np.float32)
    return (x if as_images else x.reshape(len(x), -1)), labels.astype(np.int64)
