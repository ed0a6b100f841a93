"""PyTorch idioms that must behave as in PyTorch: in-place operators, the missing functions,
dim=/keepdim=, dtype aliases and device queries, max(dim) named tuples, 0-d tensor conversions."""

import math

import numpy as np
import pytest

import engine as torch
import engine.nn.functional  # noqa: F401
from engine import GradError, functional as F, nn
from engine.errors import DTypeError, ShapeError
from tests.conftest import DEVICES


# ---- 1. in-place arithmetic operators ---------------------------------------------------------------

def test_manual_sgd_with_isub_under_no_grad_trains_the_same_parameter():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
    w = torch.randn(3, 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    w_id, b_id = id(w), id(b)
    losses = []
    for _ in range(50):
        loss = ((x @ w + b - y) ** 2).mean()
        losses.append(loss.item())
        loss.backward()
        with torch.no_grad():
            w -= 0.1 * w.grad
            b -= 0.1 * b.grad
            w.grad.zero_()
            b.grad.zero_()
    assert id(w) == w_id and id(b) == b_id
    assert w.requires_grad and w.is_leaf
    assert losses[-1] < 0.01 * losses[0]


def test_model_parameters_update_in_place_with_isub():
    model = nn.Linear(3, 2)
    before = model.weight.numpy().copy()
    model(torch.randn(4, 3)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    assert list(model.parameters())[0] is model.weight
    np.testing.assert_allclose(model.weight.numpy(), before - 0.5 * model.weight.grad.numpy(), rtol=1e-6)


@pytest.mark.parametrize("op", ["iadd", "isub", "imul", "idiv"])
def test_inplace_operator_on_leaf_requiring_grad_raises(op):
    w = torch.ones(3, requires_grad=True)
    with pytest.raises(GradError):
        if op == "iadd":
            w += 1
        elif op == "isub":
            w -= 1
        elif op == "imul":
            w *= 2
        else:
            w /= 2


@pytest.mark.parametrize("device", DEVICES)
def test_iadd_on_a_graph_tensor_is_recorded(device):
    x = torch.tensor([1.0, 2.0, 3.0], device=device, requires_grad=True)
    y = x * 2
    y_id = id(y)
    y += 1
    y *= 3
    y -= x
    y /= 2
    assert id(y) == y_id
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [2.5, 2.5, 2.5])
    np.testing.assert_allclose(y.detach().numpy(), ((np.array([1, 2, 3]) * 2 + 1) * 3 - [1, 2, 3]) / 2)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_operators_bump_the_version_and_share_memory(device):
    t = torch.zeros(4, device=device)
    view = t[1:3]
    v0 = t._version_value
    t += 1
    t -= torch.ones(4, device=device)
    t *= 5
    t /= 2
    view += 7
    assert t._version_value == v0 + 5
    np.testing.assert_allclose(t.numpy(), [0, 7, 7, 0])


def test_inplace_change_of_a_saved_tensor_is_detected():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = x * 1
    z = y * y
    y += 1
    with pytest.raises(GradError):
        z.sum().backward()


def test_div_clamp_methods():
    t = torch.tensor([-4.0, 1.0, 6.0])
    assert t.div_(2) is t
    np.testing.assert_allclose(t.numpy(), [-2.0, 0.5, 3.0])
    t.clamp_(min=-1.0, max=2.0)
    np.testing.assert_allclose(t.numpy(), [-1.0, 0.5, 2.0])
    t.clamp_(max=0.0)
    np.testing.assert_allclose(t.numpy(), [-1.0, 0.0, 0.0])
    with pytest.raises(DTypeError):
        torch.tensor([1, 2]).div_(2)


def test_clamp_on_graph_tensor_records_the_gradient():
    x = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    y = x * 1
    y.clamp_(min=-1.0, max=1.0)
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [0.0, 1.0, 0.0])


@pytest.mark.parametrize("device", DEVICES)
def test_normal_and_uniform_fill_in_place_from_the_seeded_generator(device):
    torch.manual_seed(3)
    a = torch.empty(2000, device=device).normal_(mean=2.0, std=0.5)
    torch.manual_seed(3)
    b = torch.empty(2000, device=device).normal_(2.0, 0.5)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert a.dtype == np.float32
    assert abs(a.numpy().mean() - 2.0) < 0.05 and abs(a.numpy().std() - 0.5) < 0.05
    u = torch.zeros(2000, dtype=torch.float64, device=device)
    v0 = u._version_value
    assert u.uniform_(-1.0, 3.0) is u
    assert u.dtype == np.float64 and u._version_value == v0 + 1
    assert u.numpy().min() >= -1.0 and u.numpy().max() < 3.0 and abs(u.numpy().mean() - 1.0) < 0.1


def test_random_fill_of_a_leaf_requiring_grad_needs_no_grad():
    w = torch.empty(3, 2, requires_grad=True)
    with pytest.raises(GradError):
        w.normal_()
    with torch.no_grad():
        w.uniform_(-0.1, 0.1)
    assert np.abs(w.numpy()).max() <= 0.1


# ---- 2. missing functions -----------------------------------------------------------------------

def test_linspace_randperm_normal():
    np.testing.assert_allclose(torch.linspace(0, 1, 5).numpy(), [0, 0.25, 0.5, 0.75, 1])
    assert torch.linspace(-1, 1, 3).dtype == np.float32
    perm = torch.randperm(10)
    assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(10))
    n = torch.normal(1.0, 2.0, size=(3, 4))
    assert n.shape == (3, 4) and n.dtype == np.float32
    m = torch.normal(torch.zeros(5), torch.ones(5) * 1e-6)
    assert m.shape == (5,) and np.abs(m.numpy()).max() < 1e-4


def test_arithmetic_functions_methods_alpha_and_out():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])
    np.testing.assert_array_equal(torch.add(a, b, alpha=2).numpy(), [21, 42])
    np.testing.assert_array_equal(a.sub(b, alpha=0.5).numpy(), [-4, -8])
    np.testing.assert_array_equal(a.mul(b).numpy(), torch.mul(a, b).numpy())
    np.testing.assert_array_equal(torch.div(b, a).numpy(), b.div(a).numpy())
    out = torch.zeros(2)
    assert torch.mul(a, b, out=out) is out and out.tolist() == [10.0, 40.0]
    m = torch.zeros(2, 2)
    torch.matmul(torch.ones(2, 3), torch.ones(3, 2), out=m)
    assert m.tolist() == [[3.0, 3.0], [3.0, 3.0]]
    with pytest.raises(torch.ShapeError, match="matmul: out="):
        torch.matmul(torch.ones(2, 3), torch.ones(3, 2), out=torch.zeros(3))
    with pytest.raises(DTypeError, match="cannot be cast"):
        torch.add(a, b, out=torch.zeros(2, dtype=torch.long))
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(GradError, match="out= does not support autograd"):
        torch.mul(w, a, out=torch.zeros(2))
    with torch.no_grad():
        torch.mul(w, a, out=out)
    assert out.tolist() == [1.0, 2.0]
    a.add(b).sum()  # methods are out-of-place
    assert a.tolist() == [1.0, 2.0]


def test_rand_like_and_randn_like():
    x = torch.tensor([[1, 2], [3, 4]])
    r = torch.rand_like(x, dtype=torch.float)
    assert r.shape == (2, 2) and r.dtype == torch.float and ((r.numpy() >= 0) & (r.numpy() < 1)).all()
    assert torch.randn_like(r).dtype == torch.float and torch.randn_like(r).shape == (2, 2)
    with pytest.raises(DTypeError, match="rand_like: random samples need a floating dtype"):
        torch.rand_like(x)


def test_from_numpy_shares_memory():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = torch.from_numpy(a)
    a[0, 0] = 42
    assert t[0, 0].item() == 42
    with torch.no_grad():
        t += 1
    assert a[0, 0] == 43 and t.dtype == np.float32
    assert torch.from_numpy(np.arange(3)).dtype == np.int64


def test_norm_defaults_and_zero_gradient():
    m = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert math.isclose(torch.norm(m).item(), 5.0)
    np.testing.assert_allclose(m.norm(dim=1).numpy(), [5.0, 0.0])
    assert m.norm(dim=1, keepdim=True).shape == (2, 1)
    z = torch.zeros(3, requires_grad=True)
    z.norm().backward()
    np.testing.assert_array_equal(z.grad.numpy(), [0, 0, 0])  # PyTorch's subgradient, not NaN
    assert math.isclose(m.norm(p=float("inf")).item(), 4.0)


def test_prod_gradient_with_zeros_is_exact():
    x = torch.tensor([[1.0, 0.0, 3.0], [2.0, 5.0, 0.0], [0.0, 0.0, 4.0]], dtype=torch.float64, requires_grad=True)
    assert torch.gradcheck(lambda t: t.prod(dim=1), [x])
    assert torch.gradcheck(lambda t: t.prod(), [x])
    x.prod(dim=1).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 3, 0], [0, 0, 10], [0, 0, 0]])


def test_mm_refuses_non_matrices():
    with pytest.raises(ShapeError, match="mm: both operands must be 2-D"):
        torch.mm(torch.ones(3), torch.ones(3, 2))


def test_set_grad_enabled_as_function_context_and_decorator():
    x = torch.ones(2, requires_grad=True)
    with torch.set_grad_enabled(False):
        assert not (x * 2).requires_grad
    assert torch.is_grad_enabled()
    for mode in (True, False):
        with torch.set_grad_enabled(mode):
            assert (x * 2).requires_grad is mode
    torch.set_grad_enabled(False)
    try:
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    assert torch.is_grad_enabled()

    @torch.set_grad_enabled(False)
    def infer():
        return x * 2
    assert not infer().requires_grad and torch.is_grad_enabled()


@pytest.mark.parametrize("device", DEVICES)
def test_one_hot(device):
    t = torch.tensor([0, 2, 1, 2], device=device)
    out = F.one_hot(t, 4)
    assert out.dtype == np.int64 and out.shape == (4, 4) and out.device == torch.device(device)
    np.testing.assert_array_equal(out.numpy(), np.eye(4, dtype=np.int64)[[0, 2, 1, 2]])
    assert F.one_hot(t).shape == (4, 3)
    assert F.one_hot(torch.tensor([[1], [0]]), 2).shape == (2, 1, 2)
    with pytest.raises(ValueError, match=r"one_hot: class values must be in \[0, 2\)"):
        F.one_hot(t, 2)
    with pytest.raises(DTypeError):
        F.one_hot(torch.tensor([0.0, 1.0]), 2)


def test_leaky_relu_module():
    act = nn.LeakyReLU(0.1)
    np.testing.assert_allclose(act(torch.tensor([-2.0, 0.0, 3.0])).numpy(), [-0.2, 0.0, 3.0], rtol=1e-6)
    assert nn.LeakyReLU().negative_slope == 0.01
    assert "negative_slope=0.1" in repr(act)


def test_relu_inplace_gives_the_same_values_and_gradients():
    x1 = torch.tensor([-1.0, 2.0, -3.0, 4.0], requires_grad=True)
    x2 = torch.tensor([-1.0, 2.0, -3.0, 4.0], requires_grad=True)
    a = nn.ReLU(inplace=True)(x1 * 2)
    b = nn.ReLU()(x2 * 2)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    (a * torch.arange(4.0)).sum().backward()
    (b * torch.arange(4.0)).sum().backward()
    np.testing.assert_array_equal(x1.grad.numpy(), x2.grad.numpy())
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 1))
    assert model(torch.randn(2, 3)).shape == (2, 1)


def _batchnorm_reference(x, eps=1e-5):
    axes = (0,) if x.ndim == 2 else (0, 2)
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5)])
def test_batchnorm1d_train_and_eval(shape):
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.1)
    x = torch.randn(*shape) * 3 + 1
    xn = x.numpy().astype(np.float64)
    out = bn(x)
    np.testing.assert_allclose(out.numpy(), _batchnorm_reference(xn), atol=1e-5)
    axes = (0,) if len(shape) == 2 else (0, 2)
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.1 * xn.mean(axis=axes), rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.9 + 0.1 * xn.var(axis=axes, ddof=1), rtol=1e-5)
    assert bn.num_batches_tracked.item() == 1
    bn.eval()
    rm, rv = bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()
    b = (1, 3) + (1,) * (len(shape) - 2)
    expected = (xn - rm.reshape(b)) / np.sqrt(rv.reshape(b) + 1e-5)
    np.testing.assert_allclose(bn(x).numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(bn.running_mean.numpy(), rm)  # eval does not update
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def test_batchnorm1d_cumulative_average_no_affine_no_tracking():
    bn = nn.BatchNorm1d(2, momentum=None, affine=False)
    a, b = torch.randn(6, 2), torch.randn(6, 2)
    bn(a)
    bn(b)
    expected = (a.numpy().mean(0) + b.numpy().mean(0)) / 2
    np.testing.assert_allclose(bn.running_mean.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert bn.weight is None and list(bn.parameters()) == []
    free = nn.BatchNorm1d(2, track_running_stats=False).eval()
    np.testing.assert_allclose(free(a).numpy(), _batchnorm_reference(a.numpy().astype(np.float64)), atol=1e-5)
    assert free.running_mean is None
    with pytest.raises(ValueError):
        nn.BatchNorm1d(2)(torch.randn(1, 2))
    with pytest.raises(ValueError):
        nn.BatchNorm1d(2)(torch.randn(4, 3))


@pytest.mark.parametrize("shape", [(5, 3), (3, 3, 4)])
def test_batchnorm1d_gradients_match_finite_differences(shape):
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(3, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
    w = torch.randn(*shape, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64)
    assert torch.gradcheck(lambda inp: (bn(inp) * w).sum(), [x], atol=1e-5, rtol=1e-4)
    bn.zero_grad()
    (bn(x) * w).sum().backward()
    axes = (0,) if len(shape) == 2 else (0, 2)
    xhat = _batchnorm_reference(x.numpy())
    np.testing.assert_allclose(bn.weight.grad.numpy(), (xhat * w.numpy()).sum(axes), rtol=1e-6)
    np.testing.assert_allclose(bn.bias.grad.numpy(), w.numpy().sum(axes), rtol=1e-6)


def test_bool_tensor_logic_operators():
    a = torch.tensor([True, True, False, False])
    b = torch.tensor([True, False, True, False])
    assert (a & b).tolist() == [True, False, False, False]
    assert (a | b).tolist() == [True, True, True, False]
    assert (a ^ b).tolist() == [False, True, True, False]
    assert (~a).tolist() == [False, False, True, True]
    assert (~a).dtype == np.bool_
    x = torch.tensor([1.0, -2.0, 3.0])
    assert ((x > 0) & (x < 2)).tolist() == [True, False, False]
    assert (torch.tensor([6, 3]) & torch.tensor([3, 1])).tolist() == [2, 1]
    with pytest.raises(DTypeError):
        _ = ~x


def test_legacy_tensor_constructor():
    t = torch.Tensor(2, 3)
    assert t.shape == (2, 3) and t.dtype == np.float32 and not t.requires_grad
    assert torch.Tensor(4).shape == (4,)
    assert torch.Tensor((2, 3)).tolist() == [2.0, 3.0]  # a tuple is data, as in PyTorch
    p = nn.Parameter(torch.Tensor(5, 4))
    nn.init.uniform_(p, -0.1, 0.1)
    assert p.shape == (5, 4) and p.requires_grad
    np.testing.assert_array_equal(torch.Tensor(np.arange(3)).numpy(), [0, 1, 2])
    assert torch.Tensor([[1.0, 2.0]], requires_grad=True).requires_grad
    assert torch.Tensor().shape == (0,)
    assert torch.Tensor(np.int64(3)).shape == ()  # a numpy scalar is data
    with pytest.raises(TypeError):
        torch.Tensor(2, -1)


# ---- 3. dim= / keepdim= -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_dim_and_keepdim_on_reductions(device):
    xn = np.arange(24, dtype=np.float32).reshape(2, 3, 4) % 7
    x = torch.tensor(xn, device=device)
    np.testing.assert_allclose(x.sum(dim=1).numpy(), xn.sum(1))
    np.testing.assert_allclose(torch.sum(x, dim=(0, 2), keepdim=True).numpy(), xn.sum((0, 2), keepdims=True))
    np.testing.assert_allclose(x.mean(1, True).numpy(), xn.mean(1, keepdims=True))
    np.testing.assert_allclose(x.std(dim=2).numpy(), xn.std(2, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(x.var(dim=0, keepdim=True).numpy(), xn.var(0, ddof=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(x.var(2, False).numpy(), xn.var(2), rtol=1e-5)  # legacy unbiased=False
    np.testing.assert_allclose(x.var(dim=2, correction=0).numpy(), xn.var(2), rtol=1e-5)
    np.testing.assert_allclose(x.prod(dim=2).numpy(), xn.prod(2), rtol=1e-5)
    np.testing.assert_array_equal(x.argmax(dim=2).numpy(), xn.argmax(2))
    np.testing.assert_array_equal(torch.argmin(x, dim=1, keepdim=True).numpy(), xn.argmin(1)[:, None])
    assert torch.argmax(x, keepdim=True).shape == (1, 1, 1)
    np.testing.assert_allclose(x.softmax(dim=0).numpy().sum(0), np.ones((3, 4)), rtol=1e-6)
    np.testing.assert_allclose(F.log_softmax(x, dim=1).exp().numpy().sum(1), np.ones((2, 4)), rtol=1e-6)
    assert torch.cat([x, x], dim=2).shape == (2, 3, 8)
    assert torch.stack([x, x], dim=1).shape == (2, 2, 3, 4)
    # numpy spellings stay as aliases
    np.testing.assert_allclose(x.sum(axis=1, keepdims=True).numpy(), xn.sum(1, keepdims=True))
    assert torch.cat([x, x], axis=0).shape == (4, 3, 4)
    np.testing.assert_allclose(F.softmax(x, axis=0).numpy(), x.softmax(0).numpy())
    with pytest.raises(TypeError):
        x.sum(dim=0, axis=1)


# ---- 4. dtype aliases, device queries ---------------------------------------------------------------

def test_dtype_aliases_and_conversions():
    assert torch.float is torch.float32 and torch.double is torch.float64 and torch.long is torch.int64
    assert torch.int is torch.int32 and torch.bool is torch.bool_ and torch.half is torch.float16
    t = torch.tensor([1.7, -0.2])
    assert t.dtype == torch.float
    assert torch.zeros(2, dtype=torch.long).dtype == np.int64
    assert torch.tensor([1, 0], dtype=torch.bool).dtype == np.bool_
    assert t.long().tolist() == [1, 0] and t.long().dtype == torch.long
    assert t.int().dtype == np.int32 and t.double().dtype == np.float64 and t.bool().tolist() == [True, True]
    assert torch.tensor([1, 2]).float().dtype == torch.float32
    assert t.type() == "torch.FloatTensor" and t.long().type() == "torch.LongTensor"
    assert t.type(torch.float64).dtype == np.float64 and t.type("torch.LongTensor").dtype == np.int64
    assert t.to(torch.double).dtype == np.float64
    x = torch.ones(2, requires_grad=True)
    x.double().sum().backward()
    assert x.grad.dtype == np.float32


def test_cuda_queries_and_device_idiom():
    import engine.cuda as engine_cuda

    assert engine_cuda is torch.cuda
    assert torch.cuda.is_available() == torch.cuda_available()
    assert torch.cuda.device_count() == torch.cuda_device_count()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = torch.ones(2).to(dev)
    assert t.device == dev and t.cpu().device == torch.device("cpu")
    assert t.is_cuda == (dev.type == "cuda")


@pytest.mark.gpu
def test_cuda_method_moves_to_the_gpu():
    t = torch.ones(2).cuda()
    assert t.device.type == "cuda" and t.is_cuda and t.type() == "torch.cuda.FloatTensor"
    assert t.cpu().device.type == "cpu"


# ---- 5. max(dim) / min(dim) --------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_max_min_with_dim_return_values_and_indices(device):
    xn = np.array([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]], dtype=np.float32)
    x = torch.tensor(xn, device=device)
    _, preds = x.max(1)
    assert preds.tolist() == [1, 0] and preds.dtype == np.int64
    values, indices = torch.max(x, dim=1)
    assert values.tolist() == [5.0, 7.0] and indices.tolist() == [1, 0]
    result = torch.min(x, 0, keepdim=True)
    assert type(result).__name__ == "min" and result.values.shape == (1, 3)
    assert result.indices.tolist() == [[0, 1, 0]]
    assert torch.max(x).shape == () and torch.max(x).item() == 7.0 and x.min().item() == 0.0
    np.testing.assert_array_equal(torch.max(x, torch.full_like(x, 4.0)).numpy(), np.maximum(xn, 4))
    np.testing.assert_array_equal(torch.min(x, torch.full_like(x, 4.0)).numpy(), np.minimum(xn, 4))
    assert isinstance(x.max(dim=0), tuple) and len(x.max(dim=0)) == 2


def test_max_dim_gradient_goes_to_the_selected_element():
    x = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 1.0]], requires_grad=True)
    x.max(dim=1).values.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 1, 0], [1, 0, 0]])  # first of the ties, as PyTorch


def test_accuracy_idiom_with_batch_of_two():
    out = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    labels = torch.tensor([1, 0])
    _, predicted = torch.max(out.data, 1)  # the tutorials' spelling
    correct = (predicted == labels).sum().item()
    assert correct == 2


# ---- .data: the same memory as a Tensor outside the graph ------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_data_is_a_graph_free_tensor_sharing_storage(device):
    lin = nn.Linear(3, 2).to(device)
    w = lin.weight
    d = w.data
    assert isinstance(d, torch.Tensor) and not isinstance(d, nn.Parameter)
    assert not d.requires_grad and d.grad_fn is None and d.is_leaf
    assert (d.shape, d.dtype, d.device) == (w.shape, w.dtype, w.device)
    d.normal_(0, 0.01)  # d2l's initialisation: grad mode is on and w requires grad, yet it is allowed
    np.testing.assert_array_equal(w.numpy(), d.numpy())
    assert 0 < float(w.abs().max()) < 0.1
    lin.bias.data.fill_(0)
    assert float(lin.bias.abs().sum()) == 0.0
    y = (lin(torch.ones(4, 3, device=device)) ** 2).sum()
    assert y.grad_fn is not None and y.data.grad_fn is None and not y.data.requires_grad


def test_manual_sgd_through_data_updates_the_parameter():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    (w * w).sum().backward()
    before = w._version_value
    w.data -= 0.1 * w.grad  # the pre-0.4 tutorials' update, without no_grad
    np.testing.assert_allclose(w.numpy(), [0.8, 1.6])
    assert w.requires_grad and w.is_leaf and w.grad_fn is None
    # As PyTorch: a change through .data is invisible to autograd (its own version counter).
    assert w._version_value == before


def test_data_assignment_rebinds_the_memory():
    p = nn.Parameter(torch.zeros(2, 2))
    p.data = torch.ones(3)  # PyTorch allows any shape here, and so does the engine
    assert p.shape == (3,) and isinstance(p, nn.Parameter) and p.requires_grad
    src = np.full(3, 5.0, np.float32)
    p.data = src
    src[0] = 7.0
    assert p[0].item() == 7.0  # the array is taken as it is, not copied
    with pytest.raises(TypeError, match="data: assign a Tensor or an array"):
        p.data = [1.0, 2.0]
    assert p.shape == (3,)  # a refused assignment leaves the parameter alone


def test_optimizer_follows_a_parameter_whose_data_was_assigned():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.5)
    p.data = torch.full((3,), 2.0)
    p.grad = torch.ones(3)
    opt.step()
    np.testing.assert_allclose(p.numpy(), [1.5, 1.5, 1.5])


# ---- 6. 0-d tensors as Python numbers ---------------------------------------------------------------

def test_zero_d_tensor_format_index_and_conversions():
    loss = torch.tensor(0.123456)
    assert "{:.4f}".format(loss) == "0.1235" and f"{loss:.2f}" == "0.12" and f"{loss}" == str(loss.item())
    i = torch.tensor(2)
    assert [10, 20, 30][i] == 30 and list(range(5))[torch.tensor([1])] == 1
    assert int(torch.tensor(3.7)) == 3 and float(torch.tensor(2)) == 2.0 and bool(torch.tensor(0.0)) is False
    assert int(torch.argmax(torch.tensor([0.1, 0.7, 0.2]))) == 1
    with pytest.raises(TypeError):
        [1, 2][torch.tensor(1.0)]
    with pytest.raises(TypeError):
        "{:.2f}".format(torch.ones(2))


# ---- no host syncs in the tutorial training step ----------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_batchnorm_model_with_manual_sgd_step_reads_nothing_from_the_device(device):
    from engine import backend

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.1), nn.Linear(8, 3)).to(device)
    bn_momentum_none = nn.BatchNorm1d(3, momentum=None).to(device)
    x, y = torch.randn(16, 6, device=device), torch.randint(0, 3, (16,), device=device)
    with backend.count_host_reads() as reads:
        for _ in range(2):
            loss = F.cross_entropy(bn_momentum_none(model(x)), y)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad.zero_()
    assert reads.count == 0, reads
    assert model[1].num_batches_tracked.item() == 2


def test_nn_functional_has_one_hot_and_leaky_relu_as_in_pytorch():
    import engine.nn.functional as NF

    labels = torch.tensor(np.array([2, 0, 1]))
    np.testing.assert_array_equal(NF.one_hot(labels, 3).numpy(), np.eye(3, dtype=np.int64)[[2, 0, 1]])
    x = torch.tensor(np.array([-2.0, 3.0], np.float32))
    np.testing.assert_allclose(NF.leaky_relu(x, 0.1).numpy(), [-0.2, 3.0], rtol=1e-6)


def test_avg_pool1d_on_unbatched_features_and_batched_sequences():
    # The knowledge-distillation tutorial pools an (N, 2048) batch of flattened features to (N, 1024):
    # a 2-D input is one unbatched (C, L) sample, so the last dim is pooled.
    torch.manual_seed(0)
    x = torch.randn(4, 10, requires_grad=True)
    out = F.avg_pool1d(x, 2)
    assert out.shape == (4, 5)
    np.testing.assert_allclose(out.detach().numpy(), x.detach().numpy().reshape(4, 5, 2).mean(-1), rtol=1e-6)
    out.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.full((4, 10), 0.5))
    # (N, C, L) with stride, padding (counted in the mean by default) and ceil_mode, as PyTorch:
    # L=7, k=3, s=2, p=1 -> windows [-1,1], [1,3], [3,5], [5,7]: 4 outputs, each divided by 3.
    seq = np.arange(14, dtype=np.float32).reshape(1, 2, 7)
    padded = np.pad(seq, ((0, 0), (0, 0), (1, 1)))
    expected = np.stack([padded[..., i:i + 3].sum(-1) / 3 for i in (0, 2, 4, 6)], -1)
    got = nn.functional.avg_pool1d(torch.tensor(seq), 3, stride=2, padding=1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    # ceil_mode adds a last window that starts inside the input: L=5, k=2 -> 3 outputs, the last of one element.
    got = F.avg_pool1d(torch.tensor(np.arange(5, dtype=np.float32)[None, None]), 2, ceil_mode=True)
    np.testing.assert_allclose(got.numpy(), [[[0.5, 2.5, 4.0]]])
    with pytest.raises(ShapeError, match="avg_pool1d: expected"):
        F.avg_pool1d(torch.randn(3), 2)                    # 1-D input: PyTorch raises too


def _cosine_embedding_reference(x1, x2, y, margin):
    cos = (x1 * x2).sum(-1) / np.sqrt(((x1 * x1).sum(-1) + 1e-12) * ((x2 * x2).sum(-1) + 1e-12))
    return np.where(y == 1, 1 - cos, 0.0) + np.where(y == -1, np.maximum(cos - margin, 0.0), 0.0)


def test_cosine_embedding_loss_values_gradients_and_module():
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    y = np.array([1, -1, 1, -1, -1, 1])
    reference = _cosine_embedding_reference(x1, x2, y, 0.1)
    a = torch.tensor(x1, requires_grad=True)
    b = torch.tensor(x2, requires_grad=True)
    per_pair = F.cosine_embedding_loss(a, b, torch.tensor(y), margin=0.1, reduction="none")
    np.testing.assert_allclose(per_pair.detach().numpy(), reference, rtol=1e-10)
    assert F.cosine_embedding_loss(a, b, torch.tensor(y), 0.1, "sum").item() == pytest.approx(reference.sum())
    loss = nn.CosineEmbeddingLoss(margin=0.1)(a, b, torch.tensor(y))
    assert loss.item() == pytest.approx(reference.mean())
    loss.backward()
    # finite differences of the reference in float64
    step, numeric = 1e-6, np.zeros_like(x1)
    for index in np.ndindex(x1.shape):
        plus, minus = x1.copy(), x1.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (_cosine_embedding_reference(plus, x2, y, 0.1).mean()
                          - _cosine_embedding_reference(minus, x2, y, 0.1).mean()) / (2 * step)
    np.testing.assert_allclose(a.grad.numpy(), numeric, rtol=1e-5, atol=1e-8)
    # the tutorial's call: float32 features, target=torch.ones(n); identical directions give 0
    s = torch.randn(3, 8)
    assert nn.CosineEmbeddingLoss()(s, 2 * s, target=torch.ones(3)).item() == pytest.approx(0.0, abs=1e-6)
    # a zero vector gives cos = 0 (PyTorch's eps), so loss 1 and a finite gradient
    z = torch.zeros(1, 4, requires_grad=True)
    zero_loss = F.cosine_embedding_loss(z, torch.ones(1, 4), torch.ones(1))
    zero_loss.backward()
    assert zero_loss.item() == pytest.approx(1.0) and np.isfinite(z.grad.numpy()).all()
    # unbatched (D,) inputs with a 0-d target
    assert F.cosine_embedding_loss(torch.tensor(x1[0]), torch.tensor(x2[0]), torch.tensor(1)).item() == \
        pytest.approx(reference[0])
    with pytest.raises(ShapeError, match="cosine_embedding_loss: expected"):
        F.cosine_embedding_loss(torch.randn(3, 4), torch.randn(3, 5), torch.ones(3))


# ---- numpy conversion: NumPy 2's copy= and what shares memory -----------------------------------------

def test_np_array_copies_and_np_asarray_shares_as_pytorch():
    t = torch.ones(3)
    copied = np.array(t)  # numpy passes copy=True
    copied[0] = 5.0
    assert t.tolist() == [1.0, 1.0, 1.0] and not np.shares_memory(copied, t.numpy())
    shared = np.asarray(t)  # copy=None: shares, as torch does for a CPU tensor
    shared[1] = 7.0
    assert t.tolist() == [1.0, 7.0, 1.0]
    assert np.shares_memory(np.array(t, copy=False), t.numpy())
    widened = np.asarray(t, dtype=np.float64)  # a dtype change copies, with copy=None
    assert widened.dtype == np.float64 and not np.shares_memory(widened, t.numpy())
    with pytest.raises(ValueError, match=r"copy=False.*float64 needs a copy"):
        np.array(t, dtype=np.float64, copy=False)


def test_np_conversion_of_a_tensor_that_requires_grad_is_refused_as_in_pytorch():
    w = torch.ones(3, requires_grad=True)
    for convert in (np.asarray, np.array, lambda t: np.array(t, copy=False)):
        with pytest.raises(GradError, match=r"requires grad; use t\.detach\(\)"):
            convert(w)
        with pytest.raises(GradError, match="requires grad"):
            convert(w * 2)  # a non-leaf too
    np.testing.assert_array_equal(np.asarray(w.detach()), [1.0, 1.0, 1.0])


@pytest.mark.gpu
def test_np_conversion_of_a_gpu_tensor_copies_and_never_shares():
    t = torch.ones(3, device="cuda")
    for host in (np.asarray(t), np.array(t), t.numpy()):
        np.testing.assert_array_equal(host, [1.0, 1.0, 1.0])
        host[0] = 5.0  # the caller's own copy
    assert t.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="its memory is on the GPU"):
        np.array(t, copy=False)


def test_memory_a_graph_saved_for_backward_is_handed_to_numpy_read_only():
    """A write through numpy is invisible to the version counter: while a graph keeps the memory
    for its backward, numpy gets a read-only view, so the write raises instead of silently changing
    the gradient. Once backward has run (or the graph is gone), the memory is writable again."""
    x = torch.tensor([1.0, 2.0, 3.0])
    w = torch.ones(3, requires_grad=True)
    loss = (x * w).sum()  # saves x for w's gradient
    for view in (np.asarray(x), np.array(x, copy=False), x.numpy()):
        assert np.shares_memory(view, x.detach().numpy())
        with pytest.raises(ValueError, match="read-only"):
            view[0] = 100.0
    assert np.array(x).flags.writeable  # a copy is the caller's own
    loss.backward()
    np.testing.assert_array_equal(w.grad.numpy(), [1.0, 2.0, 3.0])
    np.asarray(x)[0] = 100.0  # the graph has run its backward: nothing depends on x any more
    assert x.tolist() == [100.0, 2.0, 3.0]
    y = torch.tensor([1.0, 2.0])
    graph = (y * torch.ones(2, requires_grad=True)).sum()
    assert not np.asarray(y).flags.writeable
    del graph  # a dropped graph no longer protects the memory
    assert np.asarray(y).flags.writeable


# ---- any / all: tensors, with dim= and keepdim=, as PyTorch ---------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_any_all_return_bool_tensors_with_dim_and_keepdim(device):
    t = torch.tensor([[0, 1], [0, 0]], device=device)
    assert isinstance(t.any(), torch.Tensor) and t.any().dtype == np.bool_ and t.any().shape == ()
    assert t.any().item() is True and t.all().item() is False
    assert t.any(dim=1).tolist() == [True, False] and t.any(1).device == t.device
    assert t.all(0, keepdim=True).tolist() == [[False, False]]
    assert t.any(dim=(0, 1)).item() is True and t.any(-1).tolist() == [True, False]
    assert torch.any(t, 0).tolist() == [False, True] and torch.all(torch.ones(2, device=device)).item() is True
    empty = torch.tensor([], device=device)
    assert empty.all().item() is True and empty.any().item() is False
    assert torch.tensor([0, 3], dtype=np.uint8, device=device).any().dtype == np.uint8  # PyTorch's legacy uint8
    assert not torch.ones(2, requires_grad=True, device=device).any().requires_grad
    with pytest.raises(torch.ShapeError, match=r"any: dim 2 is out of range"):
        t.any(2)


def test_bool_of_any_reads_through_the_counted_host_door():
    t = torch.tensor([0.0, 1.0])
    with torch.backend.count_host_reads() as reads:
        flag = t.any()
        assert reads.count == 0  # the reduction stays on the device
        assert bool(flag) and not bool(t.all())
    assert reads.count == 2


def test_full_infers_its_dtype_and_refuses_values_the_dtype_cannot_hold():
    # as torch.full: the value's kind picks the dtype; a float into ints truncates toward zero
    assert engine.full((2,), 1).dtype == engine.int64 and engine.full((2,), True).dtype == engine.bool_
    assert engine.full((2,), 1.5).dtype == engine.float32
    assert engine.full((2,), -1.7, dtype=engine.int64).tolist() == [-1, -1]
    assert np.isnan(engine.full((2,), float("nan")).numpy()).all()
    # numpy would write INT64_MIN for nan and wrap -1 to 255: refused, naming the op, value and dtype
    for value, dtype in ((float("nan"), engine.int64), (float("inf"), engine.int32), (-1, engine.uint8),
                         (2 ** 40, engine.int32)):
        with pytest.raises(DTypeError, match=rf"full: fill_value={value!r} cannot be converted to "):
            engine.full((2,), value, dtype=dtype)
    with pytest.raises(DTypeError, match="overflows float16"):
        engine.full((2,), 1e6, dtype=engine.float16)
    with pytest.raises(DTypeError, match="overflows float32"):  # an int beyond even float64's range
        engine.full((2,), 10 ** 400, dtype=engine.float32)
    with pytest.raises(DTypeError, match="cannot be converted to int64"):
        engine.full((2,), 10 ** 400)
    with pytest.raises(DTypeError, match="cannot be converted to int64"):
        engine.full_like(engine.zeros(3, dtype=engine.int64), float("nan"))
