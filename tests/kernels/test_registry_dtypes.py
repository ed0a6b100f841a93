"""The registry's dtype checks: what each impl declares, the error for a forced impl that does not
take a dtype, and the automatic choice of the next impl that does."""

import numpy as np
import pytest

from engine import kernels
from engine.kernels import KernelError, registry
from tests.kernels.fake_cupy import FakeCupy
from tests.kernels.helpers import BF16, F16

KERNEL = "test_dtype_kernel"


def _first(x):
    return ("first", x.dtype)


def _second(x):
    return ("second", x.dtype)


@pytest.fixture
def toy_kernel():
    """A kernel with two numpy impls: 'first' (preferred) takes float32 only, 'second' float32
    and bfloat16. Removed again after the test."""
    registry.register(KERNEL, "first", f"{__name__}:_first", array_kind="numpy", dtypes=("float32",))
    registry.register(KERNEL, "second", f"{__name__}:_second", array_kind="numpy", dtypes=("float32", "bfloat16"))
    yield
    del registry._REGISTRY[KERNEL]
    registry._DEFAULT_CHOICE.clear()
    registry._parse_env.cache_clear()


def test_every_impl_declares_its_dtypes():
    for kernel in ("linear_relu_forward", "linear_relu_backward", "softmax_cross_entropy", "layer_norm_forward",
                   "layer_norm_backward", "gelu_forward", "gelu_backward"):
        declared = kernels.impl_dtypes(kernel)
        assert list(declared) == ["numba_cpu", "numpy", "cupy", "numba_cuda"]
        for impl in ("numba_cpu", "numpy", "cupy"):
            assert declared[impl] == ("float32", "float64", "float16", "bfloat16"), (kernel, impl)
        assert declared["numba_cuda"] == ("float32", "float64", "float16"), kernel  # numba has no bfloat16
    for kernel in kernels.kernels():
        for impl, names in kernels.impl_dtypes(kernel).items():
            assert names and set(names) <= {"float32", "float64", "float16", "bfloat16"}, (kernel, impl, names)


def test_automatic_choice_skips_an_impl_that_does_not_take_the_dtype(toy_kernel):
    f32 = np.ones(3, np.float32)
    assert kernels.call(KERNEL, f32) == ("first", np.dtype(np.float32))
    assert kernels.call(KERNEL, f32.astype(BF16)) == ("second", BF16)
    assert kernels.choose(KERNEL, [f32]).name == "first"  # the cached choice is per dtype
    with pytest.raises(KernelError) as info:
        kernels.call(KERNEL, f32.astype(F16))
    text = str(info.value)
    assert f"kernel '{KERNEL}': no usable impl for numpy arrays takes float16" in text
    assert "first takes float32; second takes float32, bfloat16" in text


def test_a_forced_impl_that_does_not_take_the_dtype_names_kernel_impl_and_dtypes(toy_kernel):
    x = np.ones(3, BF16)
    with pytest.raises(KernelError) as info:
        kernels.call(KERNEL, x, impl="first")
    text = str(info.value)
    assert f"kernel '{KERNEL}': impl 'first' does not take bfloat16 arrays; it takes float32" in text
    assert "that take bfloat16: ['second']" in text
    assert kernels.call(KERNEL, x, impl="second") == ("second", BF16)
    with pytest.raises(KernelError, match=r"impl 'second' does not take float16 arrays; it takes float32, "
                                          r"bfloat16\. No impl of 'test_dtype_kernel' takes float16"):
        kernels.call(KERNEL, x.astype(F16), impl="second")


def test_the_environment_variable_forces_like_impl(toy_kernel, monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, f"{KERNEL}=first")
    with pytest.raises(KernelError, match=r"impl 'first' does not take bfloat16 arrays.*ENGINE_KERNEL_IMPL"):
        kernels.call(KERNEL, np.ones(3, BF16))
    assert kernels.call(KERNEL, np.ones(3, np.float32)) == ("first", np.dtype(np.float32))


def test_the_dtype_of_a_call_is_its_first_arrays(toy_kernel):
    """Integer targets after float logits: the logits decide."""
    z = np.ones((2, 3), BF16)
    assert kernels.choose("softmax_cross_entropy", [z, np.zeros(2, np.int64)]).name == "numba_cpu"
    assert kernels.choose(KERNEL, [z, np.zeros(2, np.float16)]).name == "second"


def test_a_dtype_that_is_no_float_is_left_to_the_impls_validator(toy_kernel):
    """No impl computes integers; the validator's error names the argument, the registry's could not."""
    ints = np.zeros(3, np.int32)
    assert kernels.choose(KERNEL, [ints]).name == "first"
    assert kernels.choose(KERNEL, [ints], impl="second").name == "second"
    with pytest.raises(KernelError, match=r"linear_relu_forward\(x=numpy.ndarray\(2, 3\) int32.*dtype int32 is not "
                                          r"supported; use float32, float64, float16 or bfloat16"):
        kernels.linear_relu_forward(np.ones((2, 3), np.int32), np.ones((4, 3), np.int32), impl="numpy")


def test_register_refuses_unknown_dtype_names():
    with pytest.raises(ValueError, match="dtypes must be"):
        registry.register("never_registered", "numpy", "x:y", array_kind="numpy", dtypes=("bf16",))
    assert "never_registered" not in registry._REGISTRY


@pytest.fixture
def gpu_arrays(monkeypatch):
    """Fake cupy arrays, with every GPU impl reported usable (no device is touched: only choose)."""
    monkeypatch.setattr(registry, "_device_ready", lambda impl: True)
    registry._DEFAULT_CHOICE.clear()
    yield FakeCupy()
    registry._DEFAULT_CHOICE.clear()


def test_bfloat16_cupy_arrays_go_to_cupy_and_numba_cuda_refuses_them(gpu_arrays):
    x = gpu_arrays.on(0, np.ones((2, 3), BF16))
    for kernel in ("linear_relu_forward", "softmax_cross_entropy"):
        assert kernels.choose(kernel, [x]).name == "cupy"
        with pytest.raises(KernelError) as info:
            kernels.choose(kernel, [x], impl="numba_cuda")
        assert (f"kernel '{kernel}': impl 'numba_cuda' does not take bfloat16 arrays; it takes float32, "
                "float64, float16. Impls of") in str(info.value)
        assert "['numba_cpu', 'numpy', 'cupy']" in str(info.value)
        assert kernels.choose(kernel, [gpu_arrays.on(0, np.ones((2, 3), F16))], impl="numba_cuda").name == "numba_cuda"


def test_without_cupy_bfloat16_gpu_arrays_have_no_impl_and_the_error_says_why(gpu_arrays, monkeypatch):
    monkeypatch.setattr(registry, "_device_ready", lambda impl: impl.name != "cupy")
    x = gpu_arrays.on(0, np.ones((2, 3), BF16))
    with pytest.raises(KernelError, match=r"no usable impl for cupy arrays takes bfloat16: numba_cuda takes "
                                          r"float32, float64, float16"):
        kernels.choose("linear_relu_forward", [x])


def test_an_impl_called_directly_refuses_a_dtype_with_the_registrys_words():
    with pytest.raises(KernelError, match=r"impl 'numba_cuda' does not take bfloat16 arrays"):
        registry.check_dtype("linear_relu_forward", "numba_cuda", BF16)
    registry.check_dtype("linear_relu_forward", "numba_cuda", F16)  # takes it: no error


def test_the_numpy_fast_path_answers_as_choose_or_leaves_the_call_to_it(monkeypatch):
    """kernels.call's path for numpy-only calls (registry._numpy_default) picks choose's impl, and
    steps aside (None) for a forced impl, another array kind, or a call without arrays."""
    z, t = np.ones((4, 3), np.float32), np.arange(4) % 3
    kernels.softmax_cross_entropy(z, t)  # the default choice is made (and cached) by a first call
    args = (z, t, None)
    assert registry._numpy_default("softmax_cross_entropy", args) is registry.choose("softmax_cross_entropy", [z, t])
    gpu_array = FakeCupy().on(0, z)
    assert registry._numpy_default("softmax_cross_entropy", (gpu_array, t, None)) is None
    assert registry._numpy_default("softmax_cross_entropy", (None, 1.0)) is None
    monkeypatch.setenv(registry.ENV_VAR, "softmax_cross_entropy=numpy")
    assert registry._numpy_default("softmax_cross_entropy", args) is None
    seen = []
    numpy_impl = registry._table("softmax_cross_entropy")["numpy"]
    numpy_impl.fn  # noqa: B018 - the cached_property's slot is filled, so that the test can swap it
    monkeypatch.setitem(numpy_impl.__dict__, "fn", lambda *a, **k: seen.append(a))
    kernels.softmax_cross_entropy(z, t)
    assert len(seen) == 1, "ENGINE_KERNEL_IMPL is honoured by every call"
