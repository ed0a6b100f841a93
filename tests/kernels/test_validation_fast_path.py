"""The validators' one-pass fast paths never accept what the full checks reject.

kernels/cpu/optim.py, linear_relu.py and softmax_cross_entropy.py first run every check in one
pass with no error text (the hot path); only when that fails do the full checks run, one by one,
to name the problem. Each case below is handed to both: whenever the fast path accepts, the full checks must
accept too and agree on the dtype; whenever the full checks reject, the fast path must too.
"""

import numpy as np
import pytest

from engine.kernels import KernelError, registry
from engine.kernels.cpu import linear_relu, optim, softmax_cross_entropy


def _outcome(check):
    try:
        return check()
    except KernelError:
        return "rejected"


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _optim_cases():
    f32 = np.ones(8, np.float32)
    buffer = np.zeros(32, np.float32)
    written = ("param", "exp_avg", "exp_avg_sq")
    base = {"param": f32.copy(), "grad": f32.copy(), "exp_avg": f32.copy(), "exp_avg_sq": f32.copy()}
    cases = {"valid": (base, written)}
    cases["float64 everywhere"] = ({k: v.astype(np.float64) for k, v in base.items()}, written)
    cases["one float64"] = ({**base, "grad": f32.astype(np.float64)}, written)
    cases["int32 everywhere"] = ({k: v.astype(np.int32) for k, v in base.items()}, written)
    cases["other shape"] = ({**base, "exp_avg": np.ones(9, np.float32)}, written)
    cases["2-D vs 1-D"] = ({**base, "exp_avg": np.ones((2, 4), np.float32)}, written)
    cases["strided"] = ({**base, "exp_avg": np.ones(16, np.float32)[::2]}, written)
    cases["read-only written"] = ({**base, "exp_avg": _read_only(f32)}, written)
    cases["read-only grad"] = ({**base, "grad": _read_only(f32)}, written)
    cases["disjoint views of one buffer"] = ({k: buffer[i * 8:(i + 1) * 8] for i, k in enumerate(base)}, written)
    cases["overlapping written views"] = ({**base, "exp_avg": buffer[0:8], "exp_avg_sq": buffer[4:12]}, written)
    cases["same array twice"] = ({**base, "exp_avg_sq": base["exp_avg"]}, written)
    cases["overlapping read-only pair"] = ({"param": f32.copy(), "grad": buffer[0:8], "other": buffer[4:12]},
                                           ("param",))
    cases["empty"] = ({k: np.ones(0, np.float32) for k in base}, written)
    cases["subclass"] = ({**base, "grad": f32.copy().view(np.memmap)}, written)
    cases["list"] = ({**base, "grad": [1.0] * 8}, written)
    return cases


OPTIM_CASES = _optim_cases()


@pytest.mark.parametrize("case", list(OPTIM_CASES))
def test_optim_fast_path_agrees_with_the_full_checks(case):
    arrays, written = OPTIM_CASES[case]
    fast = optim._arrays_pass(arrays, written)
    full = _outcome(lambda: optim._check_arrays_fully("adam_step", arrays, written))
    if fast is not None:
        assert full == fast, (case, fast, full)
    if full == "rejected":
        assert fast is None, case
    assert _outcome(lambda: optim._check_arrays("adam_step", arrays, written)) == full


def test_optim_fast_path_takes_the_common_cases():
    """Not a timing: the valid cases must not all fall through to the slow checks."""
    for case in ("valid", "float64 everywhere", "read-only grad", "disjoint views of one buffer", "empty"):
        arrays, written = OPTIM_CASES[case]
        assert optim._arrays_pass(arrays, written) is not None, case


def _linear_cases():
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (5, 3), (5,)))
    return {
        "valid": (x, w, b),
        "no bias": (x, w, None),
        "float64": (x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)),
        "mixed dtypes": (x, w.astype(np.float64), b),
        "int": (x.astype(np.int64), w.astype(np.int64), None),
        "K mismatch": (x, np.ones((5, 4), np.float32), b),
        "bias length": (x, w, np.ones(6, np.float32)),
        "bias 2-D": (x, w, np.ones((1, 5), np.float32)),
        "x 1-D": (np.ones(3, np.float32), w, b),
        "x transposed": (np.ones((3, 4), np.float32).T, w, b),
        "subclass": (x.view(np.memmap), w, b),
        "list": ([[1.0] * 3] * 4, w, b),
    }


LINEAR_CASES = _linear_cases()


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_relu_fast_path_agrees_with_the_full_checks(case):
    x, w, b = LINEAR_CASES[case]
    arrays = {"x": x, "weight": w, "bias": b}
    ndims = {"x": 2, "weight": 2, "bias": 1}
    fast = _outcome(lambda: linear_relu._arrays_pass(arrays, ndims))
    full = _outcome(lambda: linear_relu.validate_forward(x, w, b))
    if fast not in (None, "rejected") and full != "rejected":
        assert full == fast
    if full == "rejected":
        # The fast path may pass the per-array checks, but then the shapes must fail.
        assert fast is None or not (x.shape[1] == w.shape[1] and (b is None or b.shape[0] == w.shape[0])), case
    if case in ("valid", "no bias", "float64"):
        assert fast is not None and full == fast


def test_linear_relu_backward_fast_path_rejects_what_the_full_checks_reject():
    rng = np.random.default_rng(1)
    dy, x, w, y = (rng.standard_normal(s).astype(np.float32) for s in ((4, 5), (4, 3), (5, 3), (4, 5)))
    assert linear_relu.validate_backward(dy, x, w, y) == np.float32
    for bad in ((dy[:, :4], x, w, y), (dy, x, w, y[:3]), (dy, x, w, y.astype(np.float64)),
                (dy, x, w, np.asfortranarray(y))):
        with pytest.raises(KernelError):
            linear_relu.validate_backward(*bad)


def test_optim_fast_path_on_gpu_arrays_finds_overlaps_by_address():
    """cupy arrays (here fake ones: host memory tagged with a device) are compared by data.ptr."""
    from tests.kernels.fake_cupy import FakeCupy

    fake, buffer = FakeCupy(), np.zeros(64, np.float32)
    names = ("param", "grad", "exp_avg", "exp_avg_sq")
    written = ("param", "exp_avg", "exp_avg_sq")
    touching = {k: fake.on(0, buffer[i * 8:(i + 1) * 8]) for i, k in enumerate(names)}
    assert optim._arrays_pass(touching, written) == np.float32
    spaced = {k: fake.on(0, buffer[i * 16:i * 16 + 8]) for i, k in enumerate(reversed(names))}
    assert optim._arrays_pass(spaced, written) == np.float32
    for start in (1, 7):  # exp_avg_sq starts inside exp_avg (which is buffer[16:24])
        overlapping = {**touching, "exp_avg_sq": fake.on(0, buffer[16 + start:24 + start])}
        assert optim._arrays_pass(overlapping, written) is None
        with pytest.raises(KernelError, match="exp_avg and exp_avg_sq overlap in memory"):
            optim._check_arrays("adam_step", overlapping, written)
    two_gpus = {**touching, "grad": fake.on(1, buffer[8:16])}
    assert optim._arrays_pass(two_gpus, written) is None
    with pytest.raises(KernelError, match=r"different GPUs \(cuda:0, cuda:1\)"):
        optim._check_arrays("adam_step", two_gpus, written)


def _cross_entropy_cases():
    logits, targets = np.ones((4, 3), np.float32), np.arange(4) % 3
    call = dict(ignore_index=-100, label_smoothing=0.0, grad_scale=1.0, compute_grad=True)
    cases = {"valid": ((logits, targets, None), call)}
    cases["float64, int32 targets"] = ((logits.astype(np.float64), targets.astype(np.int32), None), call)
    cases["smoothing, scale, no grad"] = ((logits, targets, None),
                                          {**call, "label_smoothing": 0.25, "grad_scale": 0.5, "compute_grad": False})
    cases["no rows"] = ((np.ones((0, 3), np.float32), np.ones(0, np.int64), None), call)
    cases["no classes"] = ((np.ones((4, 0), np.float32), targets, None), call)
    cases["float16"] = ((logits.astype(np.float16), targets, None), call)
    cases["int logits"] = ((logits.astype(np.int32), targets, None), call)
    cases["uint8 targets"] = ((logits, targets.astype(np.uint8), None), call)
    cases["float targets"] = ((logits, targets.astype(np.float32), None), call)
    cases["soft targets"] = ((logits, np.full((4, 3), 1 / 3, np.float32), None), call)
    cases["1-D logits"] = ((logits[0], targets[:1], None), call)
    cases["targets too short"] = ((logits, targets[:3], None), call)
    cases["2-D targets"] = ((logits, targets[:, None], None), call)
    cases["strided logits"] = ((np.ones((4, 6), np.float32)[:, ::2], targets, None), call)
    cases["strided targets"] = ((logits, np.arange(8)[::2] % 3, None), call)
    cases["weight"] = ((logits, targets, np.ones(3, np.float32)), call)
    cases["subclass"] = ((logits.view(np.memmap), targets, None), call)
    cases["list targets"] = ((logits, [0, 1, 2, 0], None), call)
    for name, value in {"bool ignore_index": True, "float ignore_index": -100.0, "huge ignore_index": 2**63,
                        "numpy ignore_index": np.int64(-1)}.items():
        cases[name] = ((logits, targets, None), {**call, "ignore_index": value})
    for name, value in {"smoothing above 1": 1.5, "negative smoothing": -0.1, "NaN smoothing": float("nan"),
                        "int smoothing": 0, "smoothing 1": 1.0}.items():
        cases[name] = ((logits, targets, None), {**call, "label_smoothing": value})
    for name, value in {"inf scale": float("inf"), "NaN scale": float("nan"), "int scale": 2, "string scale": "1",
                        "array scale": np.ones(1, np.float32)}.items():
        cases[name] = ((logits, targets, None), {**call, "grad_scale": value})
    cases["int compute_grad"] = ((logits, targets, None), {**call, "compute_grad": 1})
    return cases


CROSS_ENTROPY_CASES = _cross_entropy_cases()


@pytest.mark.parametrize("case", list(CROSS_ENTROPY_CASES))
def test_cross_entropy_fast_path_agrees_with_the_full_checks(case, monkeypatch):
    args, kwargs = CROSS_ENTROPY_CASES[case]
    fast = softmax_cross_entropy._common_call_spec(*args, **kwargs)
    monkeypatch.setattr(softmax_cross_entropy, "_common_call_spec", lambda *a, **k: None)
    full = _outcome(lambda: softmax_cross_entropy.validate_softmax_cross_entropy(*args, **kwargs))
    if fast is not None:
        assert full == fast, (case, fast, full)
    if full == "rejected":
        assert fast is None, case


def test_cross_entropy_fast_path_takes_the_common_cases():
    """Not a timing: the valid common calls must not all fall through to the slow checks."""
    for case in ("valid", "float64, int32 targets", "smoothing, scale, no grad", "no rows", "smoothing 1"):
        args, kwargs = CROSS_ENTROPY_CASES[case]
        assert softmax_cross_entropy._common_call_spec(*args, **kwargs) is not None, case


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"])
@pytest.mark.parametrize("count", [1, 3, 127, 128, 200, 255, 256, 300, 2**40])
def test_indices_in_range_agrees_with_the_plain_test(dtype, count):
    info = np.iinfo(dtype)
    candidates = {0, 1, 2, 126, 127, 128, 254, 255, 256, 299, 300, -1, -128, int(info.min), int(info.max)}
    for value in sorted(v for v in candidates if info.min <= v <= info.max):
        indices = np.array([0, value, 0], dtype=dtype)
        expected = bool(((indices.astype(object) >= 0) & (indices.astype(object) < count)).all())
        assert registry.indices_in_range(indices, count) == expected, (dtype, count, value)
        assert registry.indices_in_range(indices[::2], count)  # a strided view of zeros
    assert registry.indices_in_range(np.ones(0, dtype), count)
