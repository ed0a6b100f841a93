"""The graph itself: accumulation, deep chains, no_grad, retain_graph, broadcasting, errors."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
from engine.autograd import Function
from engine.backend import Device
from tests.conftest import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulates_when_a_tensor_is_used_twice(device):
    x = engine.tensor([1.0, -2.0, 3.0], requires_grad=True, device=device)
    y = x * x + x * 3.0  # x reaches the output along three paths
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy() + 3)


def test_backward_twice_accumulates_into_grad():
    x = engine.tensor([2.0], requires_grad=True)
    (x * x).sum().backward()
    (x * 4.0).sum().backward()
    assert x.grad.item() == pytest.approx(8.0)


def test_leaf_grads_do_not_alias_each_other():
    a = engine.tensor([1.0, 2.0], requires_grad=True)
    b = engine.tensor([3.0, 4.0], requires_grad=True)
    (a + b).sum().backward()  # add passes one gradient array to both inputs
    a.grad.add_(10.0)
    np.testing.assert_array_equal(b.grad.numpy(), [1.0, 1.0])


@pytest.mark.slow
def test_chain_of_10000_ops_backward_without_recursion_error():
    x = engine.tensor([0.5], requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    assert x.grad.item() == pytest.approx(1.0001 ** 10_000, rel=1e-3)


def _chain(depth, x=None):
    x = engine.tensor([0.5, 1.5], requires_grad=True) if x is None else x
    y = x
    for _ in range(depth):
        y = y * 1.0
    return x, y


def test_deepcopy_of_a_non_leaf_is_refused_without_walking_the_graph():
    """PyTorch's rule and words; the default deepcopy followed grad_fn and raised RecursionError."""
    import copy

    _, y = _chain(5_000)
    with pytest.raises(engine.errors.GradError, match=r"only Tensors created explicitly by the user \(graph leaves\) "
                                                       r"support the deepcopy protocol.*<MulBackward>.*detach\(\)\.clone"):
        copy.deepcopy(y)
    with pytest.raises(RuntimeError):  # a GradError is PyTorch's RuntimeError
        copy.deepcopy({"activations": [y]})


def test_deepcopy_of_a_leaf_copies_values_grad_and_requires_grad_only():
    import copy

    class Tagged(engine.Tensor):
        pass

    w = Tagged([1.0, 2.0], requires_grad=True)
    w.tag = "embedding"
    _, y = _chain(5_000, w)
    y.sum().backward(retain_graph=True)  # the leaf feeds a deep graph that is still alive
    w.register_post_accumulate_grad_hook(lambda t: None)
    twin = copy.deepcopy(w)
    assert type(twin) is Tagged and twin.tag == "embedding" and twin.is_leaf and twin.requires_grad
    assert twin.grad.numpy().tolist() == [1.0, 1.0] and twin.grad is not w.grad
    assert getattr(twin, "_post_grad_hooks", None) is None  # hooks are not copied (PyTorch neither)
    with engine.no_grad():
        twin.add_(1.0)
    assert w.numpy().tolist() == [1.0, 2.0]  # independent memory
    shared = {"a": w, "b": w}
    copied = copy.deepcopy(shared)
    assert copied["a"] is copied["b"]  # the memo keeps one tensor one tensor


def test_pickle_and_copy_of_a_deep_non_leaf_give_a_leaf_as_in_pytorch(tmp_path):
    import copy
    import pickle

    x, y = _chain(5_000)
    for back in (pickle.loads(pickle.dumps(y)), copy.copy(y)):
        assert back.is_leaf and back.requires_grad and back.grad is None
        assert back.numpy().tolist() == [0.5, 1.5]
    engine.save({"y": y}, tmp_path / "y.npz")
    assert engine.load(tmp_path / "y.npz")["y"].numpy().tolist() == [0.5, 1.5]
    assert repr(y).endswith("grad_fn=<MulBackward>)")  # printing reads one node only


@pytest.mark.slow
def test_backward_through_50000_ops_and_dropping_a_100000_deep_graph():
    """Iterative backward; and CPython's deallocation of 100k nested nodes must not overflow the
    C stack (run in a subprocess: a crash there fails the test instead of killing pytest)."""
    x, y = _chain(50_000)
    y.sum().backward()
    assert x.grad.numpy().tolist() == [1.0, 1.0]
    script = ("import engine\n"
              "y = x = engine.tensor([1.0], requires_grad=True)\n"
              "for _ in range(100_000):\n"
              "    y = (y * 1.0).exp()\n"
              "del y\n"
              "print('dropped')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert done.returncode == 0 and done.stdout.strip() == "dropped", done.stderr[-2000:]


def test_diamond_graph_visits_each_node_once():
    x = engine.tensor([1.5], requires_grad=True)
    h = x.exp()
    out = h * h + h  # h has two consumers
    out.sum().backward()
    e = np.exp(1.5)
    assert x.grad.item() == pytest.approx(2 * e * e + e, rel=1e-6)


def test_no_grad_records_nothing_and_restores_mode():
    x = engine.tensor([1.0], requires_grad=True)
    with engine.no_grad():
        y = x * 2
        assert not engine.is_grad_enabled()
    assert engine.is_grad_enabled()
    assert not y.requires_grad and y.grad_fn is None

    @engine.no_grad()
    def evaluate(t):
        return t * 3

    assert evaluate(x).grad_fn is None
    with engine.no_grad(), engine.enable_grad():
        assert (x * 2).requires_grad


def test_retain_graph_allows_second_backward_and_default_frees_it():
    x = engine.tensor([3.0], requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    assert x.grad.item() == pytest.approx(12.0)
    with pytest.raises(engine.GradError, match="second time"):
        y.backward()


def test_detach_cuts_the_graph():
    x = engine.tensor([2.0], requires_grad=True)
    y = x * x.detach()
    y.sum().backward()
    assert x.grad.item() == pytest.approx(2.0)


def test_retain_grad_keeps_intermediate_gradient():
    x = engine.tensor([1.0, 2.0], requires_grad=True)
    h = x * 3
    h.retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad.numpy(), 2 * h.numpy())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_broadcasting_gradients_sum_back_to_operand_shapes(shape, data):
    # b's shape: a suffix of `shape` with some dims set to 1
    suffix = shape[data.draw(st.integers(0, len(shape) - 1)):]
    b_shape = [1 if data.draw(st.booleans()) else n for n in suffix]
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal(shape), rng.standard_normal(b_shape)
    a = engine.tensor(a_np, requires_grad=True, dtype=engine.float64)
    b = engine.tensor(b_np, requires_grad=True, dtype=engine.float64)
    (a * b).sum().backward()
    assert a.grad.shape == tuple(shape) and b.grad.shape == tuple(b_shape)
    expected_b = np.broadcast_to(a_np, np.broadcast_shapes(a_np.shape, b_np.shape))
    axes = tuple(range(len(shape) - len(b_shape)))
    expected_b = expected_b.sum(axis=axes)
    expected_b = expected_b.sum(axis=tuple(i for i, n in enumerate(b_shape) if n == 1), keepdims=True)
    np.testing.assert_allclose(b.grad.numpy(), expected_b)
    np.testing.assert_allclose(a.grad.numpy(), np.broadcast_to(b_np, shape))


def test_gradcheck_catches_a_wrong_backward():
    class WrongSquare(Function):
        def forward(self, a):
            self.save(a)
            return a * a

        def backward(self, g):
            return g * self.saved[0]  # should be 2 * a

    with pytest.raises(engine.GradcheckError, match="analytic"):
        engine.gradcheck(lambda t: WrongSquare.apply(t), [engine.randn(3)])


# ---- dtypes ------------------------------------------------------------------------------------

def test_float32_is_the_default_and_python_scalars_do_not_promote():
    x = engine.tensor([1.0, 2.0])
    assert x.dtype == np.float32
    assert (x * 0.1).dtype == np.float32
    assert (x * np.float64(0.1)).dtype == np.float32  # a numpy float64 scalar joins the tensor's dtype
    assert (np.float64(2.0) * x).dtype == np.float32
    assert engine.randn(2, 2).dtype == np.float32 and engine.arange(3).dtype == np.int64
    assert (engine.arange(3) * 0.5).dtype == np.float32


def test_integer_and_float_tensors_combine_to_the_float_dtype():
    x = engine.tensor([1.0, 2.0], dtype=engine.float64)
    assert (x * engine.tensor([1, 2])).dtype == np.float64


def test_float_dtypes_promote_as_pytorch_and_matmul_refuses_a_mismatch():
    # PyTorch's type promotion (tests/test_low_precision.py checks the whole table): elementwise
    # ops promote, each gradient comes back in its operand's dtype; matmul refuses, as torch.
    a = engine.tensor([1.0], dtype=engine.float32, requires_grad=True)
    b = engine.tensor([2.0], dtype=engine.float64, requires_grad=True)
    out = a * b
    assert out.dtype == np.float64
    out.sum().backward()
    assert a.grad.dtype == np.float32 and b.grad.dtype == np.float64
    with pytest.raises(engine.DTypeError) as err:
        a[None] @ b[None]
    message = str(err.value)
    assert "matmul" in message and "float32" in message and "float64" in message and ".to(" in message


# ---- errors ------------------------------------------------------------------------------------

def test_matmul_shape_error_names_op_shapes_and_fix():
    with pytest.raises(engine.ShapeError) as err:
        engine.zeros(2, 3) @ engine.zeros(4, 5)
    message = str(err.value)
    assert "matmul" in message and "(2, 3)" in message and "(4, 5)" in message and "3 != 4" in message


def test_broadcast_error_names_op_and_operands():
    with pytest.raises(ValueError) as err:
        engine.zeros(2, 3) + engine.zeros(4)
    message = str(err.value)
    assert "add" in message and "(2, 3)" in message and "(4,)" in message and "float32" in message


def test_reshape_error_names_shapes():
    with pytest.raises(engine.ShapeError, match=r"reshape.*\(2, 3\).*\(4,\)"):
        engine.zeros(2, 3).reshape(4)


def test_backward_of_non_scalar_needs_a_gradient():
    x = engine.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(engine.GradError, match="not a scalar"):
        (x * 2).backward()
    (x * 2).backward(engine.tensor([1.0, 10.0]))
    np.testing.assert_allclose(x.grad.numpy(), [2.0, 20.0])


def test_backward_on_tensor_without_grad_says_so():
    with pytest.raises(engine.GradError, match="does not require grad"):
        engine.tensor([1.0]).sum().backward()


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(engine.DTypeError, match="floating"):
        engine.tensor([1, 2], requires_grad=True)


def test_inplace_on_leaf_requiring_grad_needs_no_grad():
    w = engine.tensor([1.0], requires_grad=True)
    with pytest.raises(engine.GradError, match="no_grad"):
        w.add_(1.0)
    with engine.no_grad():
        w.add_(1.0)
    assert w.item() == 2.0


class _FakeCudaTensor(engine.Tensor):
    """A CPU tensor that reports a CUDA device: lets CI check the device-mismatch message."""

    __slots__ = ()
    device = property(lambda self: Device("cuda", 0))


def test_device_mismatch_error_names_both_devices():
    a = engine.tensor([1.0, 2.0])
    b = _FakeCudaTensor(np.ones(2, np.float32))
    with pytest.raises(engine.DeviceError) as err:
        a * b
    message = str(err.value)
    assert "mul" in message and "cpu" in message and "cuda:0" in message and ".to(" in message


def test_cuda_request_without_cuda_is_a_clear_error():
    if engine.cuda_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(engine.DeviceError, match="CUDA is not available"):
        engine.zeros(2, device="cuda")
    with pytest.raises(engine.DeviceError, match="CUDA is not available"):
        engine.tensor([1.0]).to("cuda")


# ---- devices, factories, transfers ---------------------------------------------------------------

def test_device_parsing():
    assert engine.device("cpu") == engine.CPU
    assert engine.device("cuda") == Device("cuda", 0)
    assert str(engine.device("cuda:1")) == "cuda:1"
    with pytest.raises(engine.DeviceError, match="cannot parse"):
        engine.device("tpu")


def test_best_device_is_cpu_without_cuda():
    expected = "cuda:0" if engine.cuda_available() else "cpu"
    assert str(engine.best_device()) == expected


def test_factories_shapes_and_values():
    assert engine.zeros(2, 3).shape == (2, 3) and engine.ones((4,)).numpy().sum() == 4
    assert engine.full((2, 2), 7.0).numpy().tolist() == [[7.0, 7.0], [7.0, 7.0]]
    np.testing.assert_array_equal(engine.eye(3).numpy(), np.eye(3))
    assert engine.arange(1, 7, 2).tolist() == [1, 3, 5]
    assert engine.arange(0.0, 1.0, 0.5).dtype == np.float32
    x = engine.randn(3, 2, dtype=engine.float64)
    assert engine.zeros_like(x).dtype == np.float64 and engine.ones_like(x).shape == (3, 2)
    r = engine.rand(1000)
    assert 0 <= r.numpy().min() and r.numpy().max() < 1


def test_manual_seed_makes_draws_repeatable():
    engine.manual_seed(7)
    a = engine.randn(5).numpy()
    engine.manual_seed(7)
    np.testing.assert_array_equal(a, engine.randn(5).numpy())
    assert not np.array_equal(a, engine.randn(5).numpy())


def test_rng_state_round_trip():
    engine.manual_seed(3)
    engine.randn(4)
    state = engine.get_rng_state()
    expected = engine.randn(4).numpy()
    engine.manual_seed(99)
    engine.set_rng_state(state)
    np.testing.assert_array_equal(engine.randn(4).numpy(), expected)


@pytest.mark.gpu
def test_transfer_round_trip_keeps_values_and_gradient_flows_back():
    x = engine.randn(3, 4, requires_grad=True)
    y = x.to("cuda")
    assert y.device == Device("cuda", 0)
    (y * y).sum().backward()
    assert x.grad.device == engine.CPU
    np.testing.assert_allclose(x.grad.numpy(), 2 * x.numpy(), rtol=1e-6)


def test_to_dtype_is_differentiable():
    x = engine.tensor([1.0, 2.0], requires_grad=True)
    y = x.to(engine.float64)
    assert y.dtype == np.float64
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad.numpy(), [2.0, 4.0])


def test_item_numpy_repr():
    x = engine.tensor([[1.5]], requires_grad=True)
    assert x.item() == 1.5 and isinstance(x.numpy(), np.ndarray)
    assert "requires_grad=True" in repr(x)
    assert "grad_fn" in repr(x * 2)


@pytest.mark.slow
def test_importing_engine_is_silent_and_does_not_load_numba_or_cupy():
    code = "import sys, engine; print(sorted(m for m in ('numba', 'cupy') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]" and proc.stderr == ""
