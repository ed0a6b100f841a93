"""Seeded, composable augmentation of image batches.

Every transform takes a batch ``(N, H, W)`` or ``(N, C, H, W)`` (channels first) as a numpy or
cupy array or a Tensor, and returns a batch of the same kind, dtype and device; each sample gets
its own random parameters. Parameters are drawn on the host from the transform's numpy
Generator (``seed=`` / ``generator=``, else seeded from the engine's RNG), so a given seed gives
the same augmentation on CPU and GPU; the pixel work runs with the batch's array module (numpy
or cupy), without scipy. Integer images are computed in float32 and rounded back.

Example:
    >>> augment = Compose([RandomRotation(10, seed=0), RandomShift(2, seed=1), GaussianNoise(0.05, seed=2)])
    >>> batch = augment(images)   # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np

from engine import backend
from engine.data.dataset import make_generator, rewrap, unwrap
from engine.errors import DTypeError, EngineError, ShapeError, describe


class Transform:
    """Base class: subclasses implement ``_apply(batch (N, C, H, W) float) -> batch``."""

    def __init__(self, seed=None, generator=None):
        self.generator = make_generator(seed, generator, type(self).__name__)

    def __call__(self, images):
        data = unwrap(images, type(self).__name__)
        _check_images(data, images, type(self).__name__)
        work_dtype = data.dtype if data.dtype.kind == "f" else np.float32
        batch = data.astype(work_dtype, copy=False)
        batch = batch[:, None] if data.ndim == 3 else batch
        with backend.on_device(backend.device_of(batch)):
            out = self._apply(batch) if len(batch) else batch
        out = out[:, 0] if data.ndim == 3 else out
        return rewrap(_to_dtype(out, data.dtype), images)

    def _apply(self, batch):
        raise NotImplementedError

    def _to_device(self, host_array, batch):
        """Random parameters (drawn on the host) moved next to ``batch``."""
        return backend.to_device(np.ascontiguousarray(host_array), backend.device_of(batch))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "generator")
        return f"{type(self).__name__}({fields})"


class Compose:
    """Apply ``transforms`` in order: ``Compose([RandomShift(2), GaussianNoise(0.1)])(batch)``."""

    def __init__(self, transforms):
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise EngineError(f"Compose: every transform must be callable, got {type(t).__name__}")

    def __call__(self, images):
        for transform in self.transforms:
            images = transform(images)
        return images

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


# ---- shifts and crops: integer offsets, a gather from a padded batch ------------------------------

class RandomCrop(Transform):
    """Crop a random ``size`` window from each image, after padding it with ``fill`` on every side.

    Args:
        size: output (height, width), or an int for a square.
        padding: pixels of ``fill`` added on each side before cropping.
        fill: value of the padding.
        seed, generator: randomness.
    """

    def __init__(self, size, padding: int = 0, fill: float = 0.0, seed=None, generator=None):
        super().__init__(seed, generator)
        self.size = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
        if len(self.size) != 2 or min(self.size) < 1 or padding < 0:
            raise EngineError(f"RandomCrop: size must be a positive int or (h, w) and padding >= 0, got size={size}, "
                              f"padding={padding}")
        self.padding, self.fill = int(padding), fill

    def _apply(self, batch):
        n, _, h, w = batch.shape
        out_h, out_w = self.size
        room_h, room_w = h + 2 * self.padding - out_h, w + 2 * self.padding - out_w
        if room_h < 0 or room_w < 0:
            raise ShapeError(f"RandomCrop: crop {self.size} is larger than the padded images "
                             f"({h + 2 * self.padding}, {w + 2 * self.padding}); lower size or raise padding")
        top = self.generator.integers(0, room_h + 1, n)
        left = self.generator.integers(0, room_w + 1, n)
        return _crop(batch, self._to_device(top, batch), self._to_device(left, batch), out_h, out_w, self.padding,
                     self.fill)


class RandomShift(Transform):
    """Translate each image by a random whole number of pixels in ``[-max_shift, max_shift]`` per axis.

    Pixels shifted in are ``fill``; the output keeps the input's size.

    Args:
        max_shift: largest shift in pixels (int, or (max_dy, max_dx)).
        fill: value of the uncovered pixels.
        seed, generator: randomness.
    """

    def __init__(self, max_shift, fill: float = 0.0, seed=None, generator=None):
        super().__init__(seed, generator)
        self.max_shift = (int(max_shift),) * 2 if np.isscalar(max_shift) else tuple(int(s) for s in max_shift)
        if len(self.max_shift) != 2 or min(self.max_shift) < 0:
            raise EngineError(f"RandomShift: max_shift must be a non-negative int or (dy, dx), got {max_shift!r}")
        self.fill = fill

    def _apply(self, batch):
        n, _, h, w = batch.shape
        my, mx = self.max_shift
        pad = max(my, mx)
        # A window starting at pad - dy in the padded image shows the image moved by +dy.
        dy = self.generator.integers(-my, my + 1, n)
        dx = self.generator.integers(-mx, mx + 1, n)
        return _crop(batch, self._to_device(pad - dy, batch), self._to_device(pad - dx, batch), h, w, pad, self.fill)


def _crop(batch, top, left, out_h: int, out_w: int, pad: int, fill):
    """Per-sample windows ``padded[i, :, top[i]:top[i]+out_h, left[i]:left[i]+out_w]``."""
    xp = backend.array_module(batch)
    n, c = batch.shape[:2]
    padded = xp.pad(batch, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=fill) if pad else batch
    rows = top[:, None] + xp.arange(out_h)
    cols = left[:, None] + xp.arange(out_w)
    return padded[xp.arange(n)[:, None, None, None], xp.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


# ---- rotations and zooms: an affine map about the image centre, sampled per output pixel ----------

_INTERPOLATIONS = ("bilinear", "nearest")


class _AffineTransform(Transform):
    def __init__(self, interpolation: str, fill: float, seed, generator):
        super().__init__(seed, generator)
        if interpolation not in _INTERPOLATIONS:
            raise EngineError(f"{type(self).__name__}: interpolation must be one of {_INTERPOLATIONS}, "
                              f"got {interpolation!r}")
        self.interpolation, self.fill = interpolation, fill

    def _apply(self, batch):
        matrices = self._matrices(len(batch))
        return affine_sample(batch, self._to_device(matrices.astype(batch.dtype), batch), self.interpolation,
                             self.fill)

    def _matrices(self, n: int) -> np.ndarray:
        raise NotImplementedError


class RandomRotation(_AffineTransform):
    """Rotate each image about its centre by a random angle (degrees, counter-clockwise as displayed).

    Args:
        degrees: angles are drawn uniformly from ``[-degrees, degrees]``, or from ``(lo, hi)``.
        interpolation: "bilinear" or "nearest".
        fill: value outside the source image.
        seed, generator: randomness.
    """

    def __init__(self, degrees, interpolation: str = "bilinear", fill: float = 0.0, seed=None, generator=None):
        super().__init__(interpolation, fill, seed, generator)
        self.degrees = _symmetric_range(degrees, "RandomRotation", "degrees")

    def _matrices(self, n: int) -> np.ndarray:
        theta = np.deg2rad(self.generator.uniform(*self.degrees, n))
        cos, sin = np.cos(theta), np.sin(theta)
        # Output offset (dy, dx) from the centre samples the input at R(theta) (dy, dx), y pointing down.
        return np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], 1)


class RandomScale(_AffineTransform):
    """Zoom each image about its centre by a random factor (> 1 enlarges the content).

    Args:
        scale_range: (lo, hi) factors, drawn uniformly; both > 0.
        interpolation: "bilinear" or "nearest".
        fill: value outside the source image (seen when zooming out).
        seed, generator: randomness.
    """

    def __init__(self, scale_range=(0.9, 1.1), interpolation: str = "bilinear", fill: float = 0.0, seed=None,
                 generator=None):
        super().__init__(interpolation, fill, seed, generator)
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise EngineError(f"RandomScale: scale_range must be (lo, hi) with 0 < lo <= hi, got {scale_range!r}")
        self.scale_range = (lo, hi)

    def _matrices(self, n: int) -> np.ndarray:
        factor = self.generator.uniform(*self.scale_range, n)
        return np.eye(2)[None] / factor[:, None, None]


def affine_sample(batch, matrices, interpolation: str = "bilinear", fill: float = 0.0):
    """Resample ``batch`` (N, C, H, W): output pixel at offset ``d`` from the centre reads ``matrices[i] @ d``.

    Offsets are measured from the centre ``((H - 1) / 2, (W - 1) / 2)`` as (row, column). The
    image is taken as surrounded by ``fill``; bilinear mixes the four neighbours of the source
    point, nearest takes the closest one.
    """
    xp = backend.array_module(batch)
    n, c, h, w = batch.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    dy = (xp.arange(h, dtype=batch.dtype) - cy)[None, :, None]
    dx = (xp.arange(w, dtype=batch.dtype) - cx)[None, None, :]
    m = matrices[:, :, :, None, None]
    src_y = m[:, 0, 0] * dy + m[:, 0, 1] * dx + cy
    src_x = m[:, 1, 0] * dy + m[:, 1, 1] * dx + cx
    if interpolation == "nearest":
        return _gather(batch, xp.rint(src_y).astype(np.int64), xp.rint(src_x).astype(np.int64), fill)
    y0, x0 = xp.floor(src_y), xp.floor(src_x)
    wy, wx = (src_y - y0)[:, None], (src_x - x0)[:, None]
    y0, x0 = y0.astype(np.int64), x0.astype(np.int64)
    top = _gather(batch, y0, x0, fill) * (1 - wx) + _gather(batch, y0, x0 + 1, fill) * wx
    bottom = _gather(batch, y0 + 1, x0, fill) * (1 - wx) + _gather(batch, y0 + 1, x0 + 1, fill) * wx
    return top * (1 - wy) + bottom * wy


def _gather(batch, rows, cols, fill):
    """``batch[i, :, rows[i], cols[i]]`` per output pixel, ``fill`` where the index leaves the image."""
    xp = backend.array_module(batch)
    n, c, h, w = batch.shape
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    values = batch[xp.arange(n)[:, None, None, None], xp.arange(c)[None, :, None, None],
                   xp.clip(rows, 0, h - 1)[:, None], xp.clip(cols, 0, w - 1)[:, None]]
    return xp.where(inside[:, None], values, batch.dtype.type(fill))


# ---- flips and noise ------------------------------------------------------------------------------

class _RandomFlip(Transform):
    _axis = -1

    def __init__(self, p: float = 0.5, seed=None, generator=None):
        super().__init__(seed, generator)
        if not 0.0 <= p <= 1.0:
            raise EngineError(f"{type(self).__name__}: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def _apply(self, batch):
        xp = backend.array_module(batch)
        flip = self._to_device(self.generator.random(len(batch)) < self.p, batch)
        return xp.where(flip[:, None, None, None], xp.flip(batch, self._axis), batch)


class RandomHorizontalFlip(_RandomFlip):
    """Mirror each image left-right with probability ``p``."""

    _axis = -1


class RandomVerticalFlip(_RandomFlip):
    """Mirror each image top-bottom with probability ``p``."""

    _axis = -2


class GaussianNoise(Transform):
    """Add independent N(mean, std^2) noise to every pixel.

    Args:
        std: noise standard deviation (in the images' units: 0-255 for uint8 images).
        mean: noise mean.
        clip: optional (lo, hi) to clip the result to (integer images are always clipped to their
            dtype's range).
        seed, generator: randomness.
    """

    def __init__(self, std: float, mean: float = 0.0, clip=None, seed=None, generator=None):
        super().__init__(seed, generator)
        if not std >= 0:
            raise EngineError(f"GaussianNoise: std must be >= 0, got {std!r}")
        self.std, self.mean, self.clip = float(std), float(mean), clip

    def _apply(self, batch):
        noise = self.generator.standard_normal(batch.shape, dtype=np.float32) * np.float32(self.std) + np.float32(
            self.mean)
        out = batch + self._to_device(noise.astype(batch.dtype, copy=False), batch)
        return out if self.clip is None else backend.array_module(out).clip(out, *self.clip)


# ---- helpers --------------------------------------------------------------------------------------

def _check_images(data, images, where: str) -> None:
    if data.ndim not in (3, 4):
        raise ShapeError(f"{where}: expected a batch of images (N, H, W) or (N, C, H, W), got {describe(images)}; "
                         "add the batch dimension with x[None] for a single image")
    if data.dtype.kind not in "uif":
        raise DTypeError(f"{where}: images must be integers or floats, got {describe(images)}")


def _to_dtype(out, dtype):
    """Back to the input dtype; integers are rounded and clipped to their range."""
    if out.dtype == dtype:
        return out
    if np.dtype(dtype).kind in "ui":
        info = np.iinfo(dtype)
        xp = backend.array_module(out)
        return xp.clip(xp.rint(out), info.min, info.max).astype(dtype)
    return out.astype(dtype)


def _symmetric_range(value, where: str, name: str) -> tuple[float, float]:
    if np.isscalar(value):
        if value < 0:
            raise EngineError(f"{where}: {name} as a single number must be >= 0, got {value!r}")
        return -float(value), float(value)
    lo, hi = (float(v) for v in value)
    if not lo <= hi or not all(math.isfinite(v) for v in (lo, hi)):
        raise EngineError(f"{where}: {name} must be a number or (lo, hi) with lo <= hi, got {value!r}")
    return lo, hi
