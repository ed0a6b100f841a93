"""Augmentation: exact geometry against NumPy references (np.rot90, flips, loops), seeding, dtypes, kinds."""

import math

import numpy as np
import pytest

import engine
from engine.data import (Compose, GaussianNoise, RandomCrop, RandomHorizontalFlip, RandomRotation, RandomScale,
                         RandomShift, RandomVerticalFlip)
from engine.errors import DTypeError, EngineError, ShapeError
from tests.conftest import DEVICES


def _images(n=6, c=None, h=7, w=7, seed=0):
    rng = np.random.default_rng(seed)
    shape = (n, h, w) if c is None else (n, c, h, w)
    return (rng.permutation(int(np.prod(shape))).reshape(shape) + 1).astype(np.float32)  # distinct, non-zero


def _shifted(img, dy, dx):
    """``img`` moved down by dy and right by dx, zeros shifted in."""
    out = np.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        img[..., max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def _sample_reference(img, matrix, interpolation, fill=0.0):
    """Per-pixel loop: output (i, j) reads the input at centre + matrix @ (offset from centre)."""
    h, w = img.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2

    def at(r, c):
        return img[r, c] if 0 <= r < h and 0 <= c < w else fill

    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            sy = matrix[0][0] * (i - cy) + matrix[0][1] * (j - cx) + cy
            sx = matrix[1][0] * (i - cy) + matrix[1][1] * (j - cx) + cx
            if interpolation == "nearest":
                out[i, j] = at(int(np.rint(sy)), int(np.rint(sx)))
                continue
            y0, x0 = math.floor(sy), math.floor(sx)
            fy, fx = sy - y0, sx - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
                         + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
    return out


# ---- shifts and crops -------------------------------------------------------------------------------

def test_random_shift_is_a_zero_filled_translation_within_range():
    images = _images(12)
    out = RandomShift(2, seed=0)(images)
    shifts = []
    for img, res in zip(images, out):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if np.array_equal(_shifted(img, dy, dx), res)]
        assert len(matches) == 1, "each output must be exactly one translation of its input"
        shifts.append(matches[0])
    assert len(set(shifts)) > 3  # per-sample parameters


def test_random_crop_takes_windows_of_the_padded_image():
    images = _images(8, c=2)
    out = RandomCrop((4, 5), padding=1, seed=1)(images)
    assert out.shape == (8, 2, 4, 5)
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for img, res in zip(padded, out):
        assert any(np.array_equal(img[:, t:t + 4, l:l + 5], res) for t in range(6) for l in range(5))
    with pytest.raises(ShapeError, match="larger than the padded images"):
        RandomCrop(10, seed=0)(images)


# ---- rotations and zooms ----------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_rotation_by_90_degrees_is_rot90_counter_clockwise(interpolation):
    images = _images(3, c=2, h=6, w=6)
    out = RandomRotation((90, 90), interpolation=interpolation, seed=0)(images)
    np.testing.assert_allclose(out, np.rot90(images, k=1, axes=(2, 3)), atol=1e-4)
    half_turn = RandomRotation((180, 180), interpolation=interpolation, seed=0)(images)
    np.testing.assert_allclose(half_turn, images[..., ::-1, ::-1], atol=1e-4)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_rotation_matches_a_per_pixel_reference(interpolation):
    images = _images(2, h=8, w=9)
    theta = math.radians(30)
    matrix = [[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]]
    out = RandomRotation((30, 30), interpolation=interpolation, fill=-1.0, seed=0)(images)
    for img, res in zip(images, out):
        np.testing.assert_allclose(res, _sample_reference(img, matrix, interpolation, fill=-1.0), rtol=1e-5, atol=1e-3)


def test_scale_matches_a_per_pixel_reference_and_identity():
    images = _images(2, h=8, w=8)
    out = RandomScale((1.5, 1.5), seed=0)(images)
    for img, res in zip(images, out):
        np.testing.assert_allclose(res, _sample_reference(img, [[1 / 1.5, 0], [0, 1 / 1.5]], "bilinear"), rtol=1e-5,
                                   atol=1e-3)
    np.testing.assert_allclose(RandomScale((1.0, 1.0), seed=0)(images), images)


def test_random_angles_differ_per_sample_and_stay_in_range():
    one = _images(1, h=9, w=9)
    batch = np.repeat(one, 20, axis=0)
    out = RandomRotation(15, interpolation="nearest", seed=4)(batch)
    grid = np.arange(-15, 15.01, 0.25)
    candidates = {a: RandomRotation((a, a), interpolation="nearest", seed=0)(one)[0] for a in grid}
    outputs = {tuple(o.ravel()) for o in out}
    assert len(outputs) > 5
    # every output is one of the rotations within +-15 degrees: on a 0.25 degree grid, nearest
    # interpolation moves at most a pixel or two between the drawn angle and the closest grid angle
    assert all(min(np.count_nonzero(o != c) for c in candidates.values()) <= 2 for o in out)
    wider = RandomRotation((40, 60), interpolation="nearest", seed=4)(batch)
    assert all(min(np.count_nonzero(o != c) for c in candidates.values()) > 2 for o in wider)


def test_uint8_images_keep_dtype_and_identity_is_exact():
    images = (np.arange(2 * 5 * 5).reshape(2, 5, 5) * 7 % 256).astype(np.uint8)
    out = RandomRotation((0, 0), seed=0)(images)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


# ---- flips and noise --------------------------------------------------------------------------------

def test_flips_with_certain_and_random_probability():
    images = _images(40, c=3)
    np.testing.assert_array_equal(RandomHorizontalFlip(1.0, seed=0)(images), images[..., ::-1])
    np.testing.assert_array_equal(RandomVerticalFlip(1.0, seed=0)(images), images[..., ::-1, :])
    np.testing.assert_array_equal(RandomHorizontalFlip(0.0, seed=0)(images), images)
    out = RandomHorizontalFlip(0.5, seed=0)(images)
    flipped = [np.array_equal(o, i[..., ::-1]) for o, i in zip(out, images)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept)) and 8 < sum(flipped) < 32


def test_gaussian_noise_statistics_and_uint8_clipping():
    images = np.full((50, 20, 20), 0.5, np.float32)
    out = GaussianNoise(0.1, seed=0)(images)
    assert out.dtype == np.float32
    noise = (out - images).astype(np.float64)
    assert abs(noise.mean()) < 0.002 and abs(noise.std() - 0.1) < 0.002  # 20,000 draws
    clipped = GaussianNoise(0.5, clip=(0.0, 1.0), seed=0)(images)
    assert clipped.min() >= 0 and clipped.max() <= 1
    dark = GaussianNoise(30.0, seed=0)(np.full((4, 8, 8), 250, np.uint8))
    assert dark.dtype == np.uint8 and dark.max() == 255 and dark.min() < 250


# ---- composition, seeding, kinds, errors ------------------------------------------------------------

def test_compose_applies_in_order_and_seeds_repeat():
    images = _images(5, c=1)

    def pipeline(seed):
        return Compose([RandomRotation(20, seed=seed), RandomShift(1, seed=seed + 1),
                        GaussianNoise(0.1, seed=seed + 2)])

    np.testing.assert_array_equal(pipeline(0)(images), pipeline(0)(images))
    assert not np.array_equal(pipeline(0)(images), pipeline(5)(images))
    by_hand = GaussianNoise(0.1, seed=2)(RandomShift(1, seed=1)(RandomRotation(20, seed=0)(images)))
    np.testing.assert_array_equal(pipeline(0)(images), by_hand)


def test_transforms_seed_from_the_engine_rng():
    images = _images(4)
    engine.manual_seed(7)
    a = RandomRotation(30)(images)
    engine.manual_seed(7)
    np.testing.assert_array_equal(RandomRotation(30)(images), a)


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_batches_stay_tensors_on_their_device(device):
    images = _images(4, c=1)
    for transform in (RandomShift(2, seed=0), RandomRotation(10, seed=0), RandomHorizontalFlip(seed=0),
                      GaussianNoise(0.1, seed=0), RandomCrop(5, padding=1, seed=0), RandomScale(seed=0)):
        out = transform(engine.tensor(images, device=device))
        assert isinstance(out, engine.Tensor) and out.device == engine.device(device) and out.dtype == np.float32
        # same seed on the host array: same result (parameters are drawn on the host)
        fresh = type(transform)(**{k: v for k, v in vars(transform).items() if k != "generator"}, seed=0)
        np.testing.assert_allclose(out.numpy(), fresh(images), rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(ShapeError, match=r"\(N, H, W\) or \(N, C, H, W\).*x\[None\]"):
        RandomShift(1, seed=0)(np.zeros((5, 5)))
    with pytest.raises(DTypeError, match="integers or floats"):
        RandomShift(1, seed=0)(np.zeros((1, 5, 5), bool))
    with pytest.raises(EngineError, match="interpolation"):
        RandomRotation(10, interpolation="cubic")
    with pytest.raises(EngineError, match="probability"):
        RandomHorizontalFlip(1.5)
    with pytest.raises(EngineError, match="0 < lo <= hi"):
        RandomScale((0.0, 1.0))
    with pytest.raises(EngineError, match="seed or generator, not both"):
        GaussianNoise(0.1, seed=1, generator=np.random.default_rng(1))


def test_empty_batch_passes_through():
    assert RandomRotation(10, seed=0)(np.zeros((0, 4, 4), np.float32)).shape == (0, 4, 4)
