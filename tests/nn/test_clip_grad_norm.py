"""clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ (every norm type, error_if_nonfinite,
foreach), and its launch count: one reduction and one scale pass, not several launches per
gradient (counted as the operations a CUDA graph capture records, on the fake capture layer)."""

import math

import numpy as np
import pytest

import engine
from engine import nn, optim
from engine.errors import GradError
from tests.cuda.fake_capture import fake_gpu  # noqa: F401  (fixture)

torch = pytest.importorskip("torch")

SHAPES = [(3, 4), (5,), (2, 2, 2), (7, 3), (1,)]
NORM_TYPES = [2.0, 1.0, 3.0, 0.5, math.inf, 0.0, -1.0, -math.inf]


def _pair(rng, shapes=SHAPES, dtype=np.float32, zeros=False):
    ours, theirs = [], []
    for shape in shapes:
        g = rng.standard_normal(shape).astype(dtype) * 3
        if zeros:
            g.flat[::3] = 0  # exact zeros: norm 0 counts them, negative p and -inf see them
        p = nn.Parameter(engine.tensor(np.zeros(shape, dtype), dtype=dtype))
        p.grad = engine.tensor(g.copy(), dtype=dtype)
        t = torch.nn.Parameter(torch.zeros(shape, dtype=torch.from_numpy(g).dtype))
        t.grad = torch.from_numpy(g.copy())
        ours.append(p)
        theirs.append(t)
    return ours, theirs


def _assert_same(ours, theirs, total, ttotal, rtol=1e-6):
    assert total.dtype == (engine.float32 if ttotal.dtype == torch.float32 else engine.float64)
    np.testing.assert_allclose(total.item(), ttotal.item(), rtol=rtol)
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.grad.numpy(), t.grad.numpy(), rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("zeros", [False, True], ids=["dense", "with-zeros"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_every_norm_type_matches_torch(rng, norm_type, zeros):
    ours, theirs = _pair(rng, zeros=zeros)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type=norm_type)
    norm = nn.utils.clip_grad_norm_(ours, 0.5, norm_type=norm_type)
    _assert_same(ours, theirs, norm, tnorm, rtol=2e-6)


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_foreach_and_dtypes_match_torch(rng, foreach, dtype):
    ours, theirs = _pair(rng, dtype=dtype)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=foreach)
    norm = nn.utils.clip_grad_norm_(ours, 1.0, foreach=foreach)
    _assert_same(ours, theirs, norm, tnorm, rtol=1e-6 if dtype == np.float32 else 1e-13)
    with pytest.raises(TypeError, match="foreach must be None, True or False"):
        nn.utils.clip_grad_norm_(ours, 1.0, foreach="yes")


def test_nonfinite_norm_raises_only_when_asked_as_torch_does(rng):
    ours, theirs = _pair(rng)
    ours[1].grad._data[2] = np.inf
    theirs[1].grad[2] = math.inf
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    before = [p.grad.numpy().copy() for p in ours]
    with pytest.raises(GradError, match=r"total 2.0-norm of the gradients is inf"):
        nn.utils.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    for p, g in zip(ours, before):  # refused before anything was scaled
        np.testing.assert_array_equal(p.grad.numpy(), g)
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    norm = nn.utils.clip_grad_norm_(ours, 1.0)
    assert math.isinf(norm.item()) and math.isinf(tnorm.item())
    for p, t in zip(ours, theirs):  # scaled by 1 / inf = 0 (and inf * 0 = NaN), as torch
        np.testing.assert_array_equal(np.isnan(p.grad.numpy()), np.isnan(t.grad.numpy()))


def test_views_of_an_optimizers_flat_gradient_buffer_match_torch(rng):
    # 64 float32 = 256 bytes, the flat buffers' alignment: such gradients lie end to end; (3, 5) and
    # (5,) leave padding after them, which is neither read into the norm nor scaled
    ours, theirs = _pair(rng, shapes=[(8, 8), (64,), (16, 8), (3, 5), (64, 2), (5,)])
    opt = optim.SGD(ours, lr=0.1)
    opt.zero_grad(set_to_none=False)  # the grads become views of the flat buffer
    for p, t in zip(ours, theirs):
        p.grad._data[...] = t.grad.numpy()
    assert [s.size for s in nn.utils._spans([p.grad._data for p in ours])] == [64 + 64 + 128 + 15, 128 + 5]
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 0.7)
    norm = nn.utils.clip_grad_norm_(ours, 0.7)
    _assert_same(ours, theirs, norm, tnorm)
    flat = opt._buckets[0][0].grad_flat
    used = np.zeros(flat.shape, bool)
    bucket = opt._buckets[0][0]
    for start, stop in zip(bucket.starts, bucket.stops):
        used[start:stop] = True
    assert not flat[~used].any(), "the padding between gradients stays zero"


def test_a_non_contiguous_gradient_is_scaled_in_place(rng):
    ours, theirs = _pair(rng, shapes=[(4, 6)])
    ours[0].grad._data = np.ascontiguousarray(ours[0].grad._data.T).T  # same values, Fortran order
    tnorm = torch.nn.utils.clip_grad_norm_(theirs, 0.3)
    norm = nn.utils.clip_grad_norm_(ours, 0.3)
    _assert_same(ours, theirs, norm, tnorm)


def _recorded_ops(fake, parameters, **kw):
    g = engine.cuda.CUDAGraph()
    with engine.cuda.graph(g):
        nn.utils.clip_grad_norm_(parameters, 1.0, **kw)
    return len(g._graph.steps)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_one_reduction_and_one_scale_pass_on_the_device(fake_gpu, norm_type):
    rng = np.random.default_rng(0)
    shapes = [(8, 8), (64,)] * 10  # 20 gradients of 256 bytes: end to end in an optimizer's flat buffer
    params = [nn.Parameter(engine.tensor(rng.standard_normal(s).astype(np.float32), device="cuda")) for s in shapes]
    for p in params:
        p.grad = engine.tensor(rng.standard_normal(p.shape).astype(np.float32), device="cuda")
    separate = _recorded_ops(fake_gpu, params, norm_type=norm_type)
    assert separate <= len(params) + 8, f"{separate} device ops for {len(params)} separate gradients"
    opt = optim.SGD(params, lr=0.1)
    opt.zero_grad(set_to_none=False)  # views of one flat buffer: one reduction, one scale pass
    merged = _recorded_ops(fake_gpu, params, norm_type=norm_type)
    assert merged <= 8, f"{merged} device ops for gradients in one flat buffer"
    assert fake_gpu.host_reads == 0


def test_repeated_clips_of_the_same_views_reuse_the_plan_and_stay_right(rng):
    """The spans found for one call's gradient arrays serve the next call with the same arrays, and
    a call with other arrays (a buffer the optimizer replaced, a fresh gradient) finds them anew;
    the cache keeps no array alive."""
    import gc
    import weakref

    from engine.nn import utils

    shapes = [(8, 8), (64,), (3, 5), (5,)]
    ours, _ = _pair(rng, shapes=shapes)
    opt = optim.SGD(ours, lr=0.1)
    opt.zero_grad(set_to_none=False)  # views of the flat buffer
    for step in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        theirs = []
        for p, g in zip(ours, grads):
            p.grad._data[...] = g
            t = torch.nn.Parameter(torch.zeros(g.shape))
            t.grad = torch.from_numpy(g.copy())
            theirs.append(t)
        if step == 2:  # one gradient replaced by an array of its own: not part of the buffer's span
            ours[1].grad = engine.tensor(grads[1].copy())
        before = utils._last_plans
        _assert_same(ours, theirs, nn.utils.clip_grad_norm_(ours, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5))
        assert (utils._last_plans is before) == (step == 1)  # reused only for the same arrays
    fresh = [engine.tensor(rng.standard_normal(5).astype(np.float32)) for _ in range(2)]
    params = [nn.Parameter(engine.tensor(np.zeros(5, np.float32))) for _ in range(2)]
    for p, g in zip(params, fresh):
        p.grad = g
    nn.utils.clip_grad_norm_(params, 1.0)
    watched = weakref.ref(fresh[0]._data)
    del fresh, params, p, g
    gc.collect()
    assert watched() is None  # the cached plan holds weak references only
