"""engine.testing.assert_close against torch.testing.assert_close: same verdicts, same messages."""

import numpy as np
import pytest

import engine
from engine.testing import assert_close, default_tolerances

torch = pytest.importorskip("torch")


def _to_engine(value):
    """The engine's counterpart of a torch input (tensors converted, containers walked)."""
    if isinstance(value, torch.Tensor):
        return engine.tensor(value.numpy())
    if isinstance(value, (list, tuple)):
        return type(value)(_to_engine(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_engine(v) for k, v in value.items()}
    return value


def _outcome(fn, actual, expected, **kwargs):
    try:
        fn(actual, expected, **kwargs)
    except Exception as e:  # noqa: BLE001  (the verdict is what is compared)
        return type(e), str(e)
    return None, ""


def _torch_spelling(message: str) -> str:
    """torch's message with its own type names written as the engine writes them."""
    message = message.replace("torch.Size([", "(").replace("])", ",)")
    return message.replace("torch.", "")


T = torch.tensor
CASES = [
    (T([1.0, 2.0, 3.0]), T([1.0, 2.1, 3.0]), {}),
    (T([1.0, 2.0, 3.0]), T([1.0, 2.0 + 5e-6, 3.0]), {}),  # within float32's atol
    (T([1.0, 2.0]), T([1.0 + 2e-5, 2.0]), {}),
    (T([[1.0, 2.0], [3.0, 4.0]]), T([[1.0, 2.0], [3.0, 4.5]]), {}),
    (T([1, 2, 3]), T([1, 3, 3]), {}),
    (T([[1, 2], [3, 4]], dtype=torch.uint8), T([[1, 2], [3, 0]], dtype=torch.uint8), {}),
    (T([True, False]), T([True, True]), {}),
    (T(1.0), T(2.0), {}),
    (T([0.0, 1.0]), T([0.0, 0.0]), {}),
    (T([1.0, float("inf")]), T([1.0, float("-inf")]), {}),
    (T([1.0, float("inf")]), T([1.0, float("inf")]), {}),
    (T([float("nan")]), T([float("nan")]), {}),
    (T([float("nan")]), T([float("nan")]), {"equal_nan": True}),
    (T([1.0], dtype=torch.float16), T([1.001], dtype=torch.float16), {}),
    (T([1.0], dtype=torch.float16), T([1.01], dtype=torch.float16), {}),
    (T([1.0, 2.0], dtype=torch.float64), T([1.0, 2.0 + 1e-6], dtype=torch.float64), {}),
    (T([1.0, 2.0]), T([1.0, 2.0, 3.0]), {}),
    (T([1.0, 2.0]), T([1.0, 2.0], dtype=torch.float64), {}),
    (T([1.0, 2.0]), T([1.0, 2.1], dtype=torch.float64), {"check_dtype": False}),
    (T([1.0]), T([1.5]), {"rtol": 0.1, "atol": 0.5}),
    (T([1.0]), T([1.5]), {"rtol": 0.0, "atol": 0.0}),
    (T([1.0]), T([2.0]), {"rtol": 1e-3}),
    (T([1.0]), T([2.0]), {"msg": "custom"}),
    (T([1.0]), T([2.0]), {"msg": lambda generated: "prefix " + generated}),
    (torch.zeros(0), torch.zeros(0), {}),
    (1.0, 1.1, {}),
    (1.0, 1.0 + 1e-8, {}),
    (1, 2, {}),
    (1, 1.0, {}),
    (1, 1.0, {"check_dtype": False}),
    (np.float32(1.0), np.float32(1.1), {}),
    (True, False, {}),
    (None, 1.0, {}),
    (None, None, {}),
    ("a", "a", {}),
    (1.0, T(1.0), {}),
    ([1.0, 2.0], [1.0, 2.5], {}),
    ([1.0, 2.0], [1.0, 2.0, 3.0], {}),
    ((torch.ones(2), torch.ones(2)), [torch.ones(2), torch.zeros(2)], {}),
    ({"a": torch.ones(2)}, {"a": torch.zeros(2)}, {}),
    ({"a": torch.ones(2)}, {"b": torch.zeros(2)}, {}),
    ([[1.0, [2.0]]], [[1.0, [3.0]]], {"msg": lambda generated: generated.upper()}),
]


@pytest.mark.parametrize("actual, expected, kwargs", CASES)
def test_same_verdict_and_message_as_torch(actual, expected, kwargs):
    torch_kind, torch_message = _outcome(torch.testing.assert_close, actual, expected, **kwargs)
    kind, message = _outcome(assert_close, _to_engine(actual), _to_engine(expected), **kwargs)
    assert kind is torch_kind, (message, torch_message)
    if torch_kind is TypeError:  # torch names its own Tensor class there
        assert message.replace("engine.tensor.Tensor", "torch.Tensor") == torch_message
    else:
        assert message == _torch_spelling(torch_message)


def test_numpy_arrays_compare_like_tensors():
    a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    assert_close(a, a + np.float32(1e-6))
    with pytest.raises(AssertionError, match=r"Mismatched elements: 1 / 4 \(25.0%\)\nGreatest absolute difference: "
                                             r"0.5 at index \(1, 0\)"):
        assert_close(a, a + np.array([[0, 0], [0.5, 0]], np.float32))
    with pytest.raises(TypeError, match="No comparison pair"):
        assert_close(engine.tensor(a), a)  # like torch: a tensor is not compared with an array


def test_default_tolerances_follow_torch_table():
    from torch.testing._comparison import default_tolerances as torch_default

    pairs = [(np.float16, torch.float16), (engine.bfloat16, torch.bfloat16), (np.float32, torch.float32),
             (np.float64, torch.float64), (np.int64, torch.int64), (np.bool_, torch.bool)]
    for ours, theirs in pairs:
        assert default_tolerances(ours) == torch_default(theirs)
    assert default_tolerances(np.float16, np.float64) == torch_default(torch.float16, torch.float64)


def test_bfloat16_uses_its_own_tolerance():
    one = engine.ones(3, dtype=engine.bfloat16)
    assert_close(one, engine.tensor([1.0, 1.0, 1.0078125], dtype=engine.bfloat16))  # one bfloat16 ulp at 1
    with pytest.raises(AssertionError, match=r"up to 0.016 allowed"):
        assert_close(one, engine.tensor([1.0, 1.0, 1.03125], dtype=engine.bfloat16))


class _FakeCudaTensor(engine.Tensor):
    """A CPU tensor that reports a CUDA device: checks the device rule without a GPU."""

    __slots__ = ()
    device = property(lambda self: engine.device("cuda:0"))


def test_device_is_checked_and_can_be_waived():
    cpu = engine.tensor([1.0, 2.0])
    elsewhere = _FakeCudaTensor(np.array([1.0, 2.0], np.float32))
    with pytest.raises(AssertionError, match="attribute 'device' do not match: cpu != cuda:0"):
        assert_close(cpu, elsewhere)
    assert_close(cpu, elsewhere, check_device=False)
    with pytest.raises(AssertionError, match="Mismatched elements: 1 / 2"):
        assert_close(cpu, _FakeCudaTensor(np.array([1.0, 3.0], np.float32)), check_device=False)
