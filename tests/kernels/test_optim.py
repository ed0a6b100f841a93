"""adam_step, sgd_step, adagrad_step, rmsprop_step: every impl against float64 textbook formulas.

Each case runs a trajectory of consecutive steps with fresh random gradients (never zeros) from
random nonzero starting states, and checks the parameters and every state array against a
float64 NumPy formula written here from the algorithm's definition (not from the impls), and
against the ``numpy`` impl run on the same inputs. The gradient must never be modified.

CPU impls run here; the cupy and numba_cuda cases carry the gpu mark (the numba_cuda kernels also
run under the simulator in tests/cudasim/test_optim.py).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import kernels
from engine.kernels import KernelError
from tests.kernels.helpers import to_device, to_host

ROOT = Path(__file__).resolve().parents[2]
IMPLS = ["numpy", "numba_cpu",
         pytest.param("cupy", marks=pytest.mark.gpu), pytest.param("numba_cuda", marks=pytest.mark.gpu)]
STEPS = 20


def signed(rng, shape):
    """Random values in +-[0.5, 1.5]: nonzero, both signs."""
    return rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)


def positive(rng, shape):
    return rng.uniform(0.5, 1.5, shape)


def cast(a, dtype):
    """A new C-contiguous array of ``dtype`` (an array even for shape ())."""
    return np.array(a, dtype=dtype)


# --------------------------------------------------------------------------------------------
# float64 references, written from the algorithms' definitions (PyTorch's documented semantics).
# Each takes the float64 state dict, the step number t (1-based) and the hyperparameters.
# --------------------------------------------------------------------------------------------


def adam_reference(st, g, t, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                   amsgrad=False, maximize=False):
    p = st["param"]
    if maximize:
        g = -g
    if weight_decay and not decoupled_weight_decay:
        g = g + weight_decay * p  # L2 penalty folded into the gradient (Adam)
    m = beta1 * st["exp_avg"] + (1 - beta1) * g
    v = beta2 * st["exp_avg_sq"] + (1 - beta2) * g ** 2
    m_hat = m / (1 - beta1 ** t)
    second = v
    if amsgrad:
        second = np.maximum(st["max_exp_avg_sq"], v)
        st["max_exp_avg_sq"] = second
    v_hat = second / (1 - beta2 ** t)
    update = m_hat / (np.sqrt(v_hat) + eps)
    if weight_decay and decoupled_weight_decay:
        update = update + weight_decay * p  # AdamW: decay applied to the parameter directly
    st["param"] = p - lr * update
    st["exp_avg"], st["exp_avg_sq"] = m, v


def sgd_reference(st, g, t, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False):
    p = st["param"]
    if maximize:
        g = -g
    g = g + weight_decay * p
    if momentum:
        # First step: the buffer starts as the gradient itself (no dampening).
        b = g if t == 1 else momentum * st["momentum_buf"] + (1 - dampening) * g
        st["momentum_buf"] = b
        g = g + momentum * b if nesterov else b
    st["param"] = p - lr * g


def adagrad_reference(st, g, t, lr, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False):
    p = st["param"]
    if maximize:
        g = -g
    g = g + weight_decay * p
    s = st["state_sum"] + g ** 2
    st["state_sum"] = s
    st["param"] = p - lr / (1 + (t - 1) * lr_decay) * g / (np.sqrt(s) + eps)


def rmsprop_reference(st, g, t, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                      maximize=False):
    p = st["param"]
    if maximize:
        g = -g
    g = g + weight_decay * p
    sq = alpha * st["square_avg"] + (1 - alpha) * g ** 2
    st["square_avg"] = sq
    variance = sq
    if centered:
        mean = alpha * st["grad_avg"] + (1 - alpha) * g
        st["grad_avg"] = mean
        variance = sq - mean ** 2
    step = g / (np.sqrt(variance) + eps)
    if momentum:
        step = momentum * st["momentum_buf"] + step
        st["momentum_buf"] = step
    st["param"] = p - lr * step


# --------------------------------------------------------------------------------------------
# One table: per optimizer, its state arrays (in the kernel's positional order), which of them a
# configuration uses, how to start them, the reference, and the configurations to test.
# --------------------------------------------------------------------------------------------


def _adam_states(cfg):
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if cfg.get("amsgrad") else [])


def _sgd_states(cfg):
    return ["momentum_buf"] if cfg.get("momentum") else []


def _rmsprop_states(cfg):
    return (["square_avg"] + (["momentum_buf"] if cfg.get("momentum") else [])
            + (["grad_avg"] if cfg.get("centered") else []))


OPTIMIZERS = {
    "adam": dict(
        kernel=kernels.adam_step, reference=adam_reference, slots=["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
        states=_adam_states, step_kw="step",
        configs={
            "default": dict(lr=0.01),
            "l2": dict(lr=0.01, weight_decay=0.1),
            "adamw": dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
            "amsgrad": dict(lr=0.01, amsgrad=True),
            "maximize": dict(lr=0.01, maximize=True, beta1=0.8, beta2=0.95),
            "everything": dict(lr=0.02, beta1=0.0, beta2=0.9, eps=1e-6, weight_decay=0.05,
                               decoupled_weight_decay=True, amsgrad=True, maximize=True),
            "l2_amsgrad": dict(lr=0.005, weight_decay=0.02, amsgrad=True, eps=1e-3),
        }),
    "sgd": dict(
        kernel=kernels.sgd_step, reference=sgd_reference, slots=["momentum_buf"], states=_sgd_states,
        step_kw="first_step",
        configs={
            "plain": dict(lr=0.1),
            "weight_decay": dict(lr=0.1, weight_decay=0.01),
            "momentum": dict(lr=0.05, momentum=0.9),
            "dampening": dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
            "nesterov": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02),
            "maximize": dict(lr=0.05, momentum=0.5, maximize=True),
            "negative_dampening": dict(lr=0.05, momentum=0.7, dampening=-0.5),
        }),
    "adagrad": dict(
        kernel=kernels.adagrad_step, reference=adagrad_reference, slots=["state_sum"],
        states=lambda cfg: ["state_sum"], step_kw="step",
        configs={
            "default": dict(lr=0.1),
            "lr_decay": dict(lr=0.1, lr_decay=0.05),
            "weight_decay": dict(lr=0.1, weight_decay=0.1, eps=1e-4),
            "maximize": dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, maximize=True),
        }),
    "rmsprop": dict(
        kernel=kernels.rmsprop_step, reference=rmsprop_reference, slots=["square_avg", "momentum_buf", "grad_avg"],
        states=_rmsprop_states, step_kw=None,
        configs={
            "default": dict(lr=0.01),
            "centered": dict(lr=0.01, centered=True, alpha=0.9),
            "momentum": dict(lr=0.01, momentum=0.9),
            "everything": dict(lr=0.01, alpha=0.95, eps=1e-5, weight_decay=0.05, momentum=0.5, centered=True,
                               maximize=True),
            "weight_decay": dict(lr=0.01, weight_decay=0.1),
        }),
}

CASES = [(opt, name) for opt, spec in OPTIMIZERS.items() for name in spec["configs"]]


def initial_state(rng, opt, cfg, shape):
    """float64 starting values: the parameters and random nonzero states (plausible for each)."""
    st = {"param": signed(rng, shape)}
    for name in OPTIMIZERS[opt]["states"](cfg):
        if name in ("exp_avg_sq", "max_exp_avg_sq", "state_sum"):
            st[name] = 0.1 * positive(rng, shape)
        elif name == "square_avg":
            st[name] = positive(rng, shape)
        elif name == "grad_avg":
            st[name] = 0.5 * signed(rng, shape)
        else:
            st[name] = 0.1 * signed(rng, shape)
    if "grad_avg" in st:
        st["square_avg"] = st["grad_avg"] ** 2 + positive(rng, shape)  # a positive variance to start
    if opt == "sgd" and "momentum_buf" in st:
        st["momentum_buf"] = np.full(shape, np.nan)  # ignored on the first step: set to the gradient
    return st


def call_step(opt, impl, arrays, grad, cfg, t, **extra):
    """One step of ``opt`` through the public wrapper; ``arrays`` maps state name -> array;
    ``extra``: found_inf, inv_scale, param_out."""
    spec = OPTIMIZERS[opt]
    kw = dict(cfg, **extra)
    if spec["step_kw"] == "step":
        kw["step"] = t
    elif spec["step_kw"] == "first_step":
        kw["first_step"] = t == 1
    slots = [arrays.get(name) for name in spec["slots"]]
    return spec["kernel"](arrays["param"], grad, *slots, impl=impl, **kw)


def tolerance(dtype):
    # Measured worst case over the CPU trajectories: 4e-7 (float32), 1e-15 (float64) relative to
    # |value| + max|array|; the margin leaves room for the GPUs' fused multiply-adds.
    return 4e-6 if dtype == np.float32 else 1e-13


def assert_close(actual, expected, dtype, what):
    actual = to_host(actual)
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {np.dtype(dtype)}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    if expected.size == 0:
        return
    scale = np.max(np.abs(expected))
    err = np.abs(actual.astype(np.float64) - expected)
    bound = tolerance(dtype) * (np.abs(expected) + scale)
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (f"{what}: |error| {err.flat[worst]:.3g} at {worst} exceeds {bound.flat[worst]:.3g} "
                                  f"(value {expected.flat[worst]:.6g}, {np.dtype(dtype).name})")


def run_trajectory(opt, cfg, impl, dtype, shape, steps, rng):
    """Run ``steps`` steps with ``impl``, the numpy impl and the float64 reference side by side."""
    spec = OPTIMIZERS[opt]
    start = initial_state(rng, opt, cfg, shape)
    ours = {k: to_device(cast(v, dtype), impl) for k, v in start.items()}
    numpy_impl = {k: cast(v, dtype) for k, v in start.items()}
    exact = {k: cast(v, dtype).astype(np.float64) for k, v in start.items()}
    for t in range(1, steps + 1):
        grad = cast(signed(rng, shape), dtype)
        grad_before = grad.copy()
        grad_dev = to_device(grad, impl)
        assert call_step(opt, impl, ours, grad_dev, cfg, t) is None
        np.testing.assert_array_equal(to_host(grad_dev), grad_before, err_msg="the gradient was modified")
        call_step(opt, "numpy", numpy_impl, grad, cfg, t)
        np.testing.assert_array_equal(grad, grad_before, err_msg="the numpy impl modified the gradient")
        spec["reference"](exact, grad.astype(np.float64), t, **cfg)
    for name in exact:
        assert_close(ours[name], exact[name], dtype, f"{opt}/{impl} {name} vs float64 formula")
        assert_close(ours[name], numpy_impl[name].astype(np.float64), dtype, f"{opt}/{impl} {name} vs numpy impl")
    return ours, exact


# --------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt,config", CASES, ids=[f"{o}-{c}" for o, c in CASES])
@pytest.mark.slow
def test_twenty_steps_match_float64_formula_and_numpy_impl(opt, config, dtype, impl, rng):
    cfg = OPTIMIZERS[opt]["configs"][config]
    ours, exact = run_trajectory(opt, cfg, impl, dtype, (1031,), STEPS, rng)
    # The trajectory really moved the parameters (the test is not comparing near-no-ops).
    start = initial_state(np.random.default_rng(1234), opt, cfg, (1031,))["param"]
    assert np.abs(exact["param"] - start).mean() > 1e-3


# Sizes: empty, size-1, not multiples of 2 / 4 (the float4 and double2 packs), of 256 (the block
# size), a few multiples, and multi-dimensional buffers.
SIZES = [(0,), (1,), (2,), (3,), (5,), (7,), (8,), (255,), (257,), (1029,), (4096,), (3, 5, 7), (2, 0, 3), ()]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("opt,config", [("adam", "everything"), ("sgd", "nesterov"), ("adagrad", "maximize"),
                                        ("rmsprop", "everything")], ids=["adam", "sgd", "adagrad", "rmsprop"])
def test_sizes_and_shapes(opt, config, shape, dtype, impl, rng):
    run_trajectory(opt, OPTIMIZERS[opt]["configs"][config], impl, dtype, shape, 3, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt,config", [("adam", "everything"), ("sgd", "dampening"), ("adagrad", "maximize"),
                                        ("rmsprop", "everything")], ids=["adam", "sgd", "adagrad", "rmsprop"])
@pytest.mark.slow
def test_numba_cpu_parallel_loop_on_large_buffers(opt, config, dtype, rng, monkeypatch):
    """numba_cpu runs a serial loop below PARALLEL_MIN elements and a prange loop from there
    (whatever the machine's load, here)."""
    from engine.kernels import threads
    from engine.kernels.cpu.optim import PARALLEL_MIN

    monkeypatch.setattr(threads, "REGION_ALWAYS_MIN", PARALLEL_MIN)

    run_trajectory(opt, OPTIMIZERS[opt]["configs"][config], "numba_cpu", dtype, (PARALLEL_MIN + 5,), 2, rng)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_on_slices_of_one_flat_buffer_at_unaligned_offsets(impl, dtype, rng):
    """The engine keeps params and states in flat buffers: views at any element offset work
    (offset 1 makes the cupy kernel take its scalar path: the pointers are not 16-byte aligned)."""
    n = 1001
    cfg = OPTIMIZERS["adam"]["configs"]["amsgrad"]
    store = to_device(np.zeros(4 * n + 1, dtype), impl)
    views = {name: store[1 + i * n: 1 + (i + 1) * n] for i, name in
             enumerate(["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])}
    start = initial_state(rng, "adam", cfg, (n,))
    for name, view in views.items():
        view[...] = to_device(start[name].astype(dtype), impl)
    exact = {k: v.astype(dtype).astype(np.float64) for k, v in start.items()}
    for t in range(1, 6):
        grad = signed(rng, (n,)).astype(dtype)
        call_step("adam", impl, views, to_device(grad, impl), cfg, t)
        adam_reference(exact, grad.astype(np.float64), t, **cfg)
    for name in exact:
        assert_close(views[name], exact[name], dtype, f"adam/{impl} {name}")
    assert to_host(store)[0] == 0  # nothing outside the views was written


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_bias_correction_uses_the_step_argument(impl, rng):
    """A single step at step=t equals the formula at t: resuming from a checkpoint works."""
    cfg = dict(lr=0.01, beta1=0.9, beta2=0.999)
    for t in (1, 7, 5000):
        st = initial_state(rng, "adam", cfg, (33,))
        arrays = {k: v.astype(np.float32) for k, v in st.items()}
        exact = {k: v.astype(np.float32).astype(np.float64) for k, v in st.items()}
        grad = signed(rng, (33,)).astype(np.float32)
        call_step("adam", impl, arrays, grad, cfg, t)
        adam_reference(exact, grad.astype(np.float64), t, **cfg)
        assert_close(arrays["param"], exact["param"], np.float32, f"adam step={t}")


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_adagrad_lr_decay_uses_the_step_argument(impl, rng):
    p = np.ones(4, np.float32)
    s = np.zeros(4, np.float32)
    g = np.full(4, 2.0, np.float32)
    kernels.adagrad_step(p, g, s, lr=1.0, lr_decay=0.5, eps=0.0, step=3, impl=impl)
    # clr = 1 / (1 + 2 * 0.5) = 0.5; state_sum = 4; update = 0.5 * 2 / 2
    np.testing.assert_allclose(p, 0.5, rtol=1e-7)
    np.testing.assert_array_equal(s, 4.0)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_sgd_first_step_sets_buffer_to_gradient_without_dampening(impl):
    p = np.full(3, 1.0, np.float32)
    g = np.array([1.0, -2.0, 4.0], np.float32)
    buf = np.full(3, np.nan, np.float32)  # whatever it holds is ignored on the first step
    kernels.sgd_step(p, g, buf, lr=0.5, momentum=0.9, dampening=0.5, first_step=True, impl=impl)
    np.testing.assert_array_equal(buf, g)
    np.testing.assert_array_equal(p, 1.0 - 0.5 * g)
    kernels.sgd_step(p, g, buf, lr=0.5, momentum=0.9, dampening=0.5, impl=impl)
    np.testing.assert_allclose(buf, 0.9 * g + 0.5 * g, rtol=1e-6)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_plain_sgd_needs_no_buffer(impl, rng):
    p = signed(rng, 9).astype(np.float32)
    g = signed(rng, 9).astype(np.float32)
    expected = p - np.float32(0.1) * g
    kernels.sgd_step(p, g, None, lr=0.1, impl=impl)
    np.testing.assert_array_equal(p, expected)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_nan_in_gradient_or_amsgrad_max_propagates_only_where_it_is(impl, rng):
    n = 8
    st = {k: v.astype(np.float32) for k, v in initial_state(rng, "adam", {"amsgrad": True}, (n,)).items()}
    grad = signed(rng, n).astype(np.float32)
    grad[2] = np.nan
    st["max_exp_avg_sq"][5] = np.nan
    call_step("adam", impl, st, grad, dict(lr=0.01, amsgrad=True), 1)
    bad = np.isnan(st["param"])
    np.testing.assert_array_equal(np.flatnonzero(bad), [2, 5])
    assert np.isnan(st["max_exp_avg_sq"][[2, 5]]).all()
    assert np.isfinite(np.delete(st["max_exp_avg_sq"], [2, 5])).all()


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_division_by_zero_gives_nan_like_numpy_and_torch(impl):
    """Adagrad with eps=0 on a zero gradient and zero sum divides 0 by 0: NaN, not an exception."""
    p = np.ones(3, np.float32)
    s = np.array([0.0, 1.0, 1.0], np.float32)
    g = np.array([0.0, 1.0, -1.0], np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        kernels.adagrad_step(p, g, s, lr=0.5, eps=0.0, step=1, impl=impl)
    assert np.isnan(p[0]) and np.isfinite(p[1:]).all()


def test_zero_learning_rate_leaves_params_but_updates_states(rng):
    for impl in ("numpy", "numba_cpu"):
        st = {k: v.astype(np.float32) for k, v in initial_state(rng, "adam", {}, (10,)).items()}
        before = {k: v.copy() for k, v in st.items()}
        call_step("adam", impl, st, signed(rng, 10).astype(np.float32), dict(lr=0.0), 1)
        np.testing.assert_array_equal(st["param"], before["param"])
        assert not np.array_equal(st["exp_avg"], before["exp_avg"])


# --------------------------------------------------------------------------------------------
# Registry, import hygiene
# --------------------------------------------------------------------------------------------


def test_registry_lists_every_impl_and_prefers_numba_on_cpu():
    for name in ("adam_step", "sgd_step", "adagrad_step", "rmsprop_step"):
        assert kernels.impls(name, available_only=False) == ["numba_cpu", "numpy", "cupy", "numba_cuda"]
        assert {"numpy", "numba_cpu"} <= set(kernels.impls(name))
        p = np.ones(3, np.float32)
        assert kernels.choose(name, [p, p.copy()]).name == "numba_cpu"


def test_default_dispatch_runs(rng):
    p = signed(rng, 6).astype(np.float32)
    g, m, v = (signed(rng, 6).astype(np.float32) for _ in range(3))
    v = np.abs(v)
    expected = p.copy()
    kernels.adam_step(expected, g, m.copy(), v.copy(), lr=0.1, step=1, impl="numpy")
    kernels.adam_step(p, g, m, v, lr=0.1, step=1)
    np.testing.assert_allclose(p, expected, rtol=1e-6)


def test_listing_the_kernels_on_a_fresh_import_names_them_all_and_loads_no_impl():
    # kernels.kernels() is the first call a user makes to see what exists: it must not answer
    # [] because no kernel has been called yet, and listing must not import numba or cupy.
    code = ("import sys, engine.kernels as kernels; names = kernels.kernels(); "
            "bad = [m for m in ('numba', 'cupy') if m in sys.modules]; assert not bad, bad; print(' '.join(names))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    names = run.stdout.split()
    assert {"linear_relu_forward", "softmax_cross_entropy", "adam_step", "layer_norm_forward", "attention_backward",
            "gelu_forward"} <= set(names) and len(names) == len(set(names)) == 13, names


@pytest.mark.slow
def test_importing_the_cpu_and_cupy_modules_imports_neither_numba_nor_cupy():
    code = ("import sys, engine.kernels.cpu.optim, engine.kernels.cuda.optim; "
            "bad = [m for m in ('numba', 'cupy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# Bad inputs: every impl runs the shared validator first
# --------------------------------------------------------------------------------------------


def _adam_args(n=4, dtype=np.float32):
    return [np.ones(n, dtype), np.ones(n, dtype), np.zeros(n, dtype), np.zeros(n, dtype)]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_arrays_are_rejected_with_a_clear_message(impl):
    dev = lambda arrays: [to_device(a, impl) for a in arrays]  # noqa: E731
    p, g, m, v = dev(_adam_args())
    with pytest.raises(KernelError, match=r"adam_step\(.*exp_avg_sq=\w+\.ndarray\(4,\) float64.*"
                                          r"must share one dtype.*exp_avg_sq.*no silent promotion"):
        kernels.adam_step(p, g, m, to_device(np.zeros(4), impl), lr=0.1, step=1, impl=impl)
    with pytest.raises(KernelError, match=r"grad has dtype int32; only float32 and float64"):
        kernels.adam_step(p, to_device(np.ones(4, np.int32), impl), m, v, lr=0.1, step=1, impl=impl)
    with pytest.raises(KernelError, match=r"exp_avg has shape \(5,\) but param has shape \(4,\)"):
        kernels.adam_step(p, g, to_device(np.zeros(5, np.float32), impl), v, lr=0.1, step=1, impl=impl)
    strided = to_device(np.zeros(8, np.float32), impl)[::2]
    with pytest.raises(KernelError, match=r"exp_avg is not C-contiguous"):
        kernels.adam_step(p, g, strided, v, lr=0.1, step=1, impl=impl)
    with pytest.raises(KernelError, match=r"amsgrad=True needs max_exp_avg_sq .*param=\w+\.ndarray\(4,\) float32"):
        kernels.adam_step(p, g, m, v, None, lr=0.1, step=1, amsgrad=True, impl=impl)
    with pytest.raises(KernelError, match=r"exp_avg and exp_avg_sq overlap in memory"):
        kernels.adam_step(p, g, m, m, lr=0.1, step=1, impl=impl)
    with pytest.raises(KernelError, match=r"momentum=0.9 needs momentum_buf"):
        kernels.sgd_step(p, g, None, lr=0.1, momentum=0.9, impl=impl)
    with pytest.raises(KernelError, match=r"centered=True needs grad_avg"):
        kernels.rmsprop_step(p, g, v, None, None, lr=0.1, centered=True, impl=impl)
    with pytest.raises(KernelError, match=r"momentum=0.5 needs momentum_buf"):
        kernels.rmsprop_step(p, g, v, None, None, lr=0.1, momentum=0.5, impl=impl)
    with pytest.raises(KernelError, match=r"adagrad_step\(.*state_sum has shape \(2, 2\)"):
        kernels.adagrad_step(p, g, to_device(np.zeros((2, 2), np.float32), impl), lr=0.1, step=1, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_scalars_are_rejected_with_a_clear_message(impl):
    p, g, m, v = [to_device(a, impl) for a in _adam_args()]
    bad = [
        (dict(lr=-0.1, step=1), r"adam_step: invalid lr=-0.1; it must be >= 0"),
        (dict(lr=0.1, beta1=1.0, step=1), r"invalid beta1=1.0; it must be < 1"),
        (dict(lr=0.1, beta2=-0.5, step=1), r"invalid beta2=-0.5"),
        (dict(lr=float("nan"), step=1), r"lr must be finite"),
        (dict(lr="fast", step=1), r"lr must be a real number"),
        (dict(lr=0.1, eps=-1e-8, step=1), r"invalid eps"),
        (dict(lr=0.1, weight_decay=-1.0, step=1), r"invalid weight_decay"),
        (dict(lr=0.1, step=0), r"step must be the 1-based step count .* got 0"),
        (dict(lr=0.1, step=True), r"step must be the 1-based"),
        (dict(lr=0.1, step=1.5), r"step must be the 1-based"),
    ]
    for kw, message in bad:
        with pytest.raises(KernelError, match=message):
            kernels.adam_step(p, g, m, v, impl=impl, **kw)
    with pytest.raises(KernelError, match=r"sgd_step: nesterov=True requires momentum > 0 and dampening == 0"):
        kernels.sgd_step(p, g, m, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True, impl=impl)
    with pytest.raises(KernelError, match=r"sgd_step: invalid momentum=-0.9"):
        kernels.sgd_step(p, g, m, lr=0.1, momentum=-0.9, impl=impl)
    with pytest.raises(KernelError, match=r"adagrad_step: invalid lr_decay=-1"):
        kernels.adagrad_step(p, g, v, lr=0.1, lr_decay=-1, step=1, impl=impl)
    with pytest.raises(KernelError, match=r"rmsprop_step: invalid alpha=-0.5"):
        kernels.rmsprop_step(p, g, v, lr=0.1, alpha=-0.5, impl=impl)


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_read_only_state_and_non_arrays_are_rejected(impl):
    p, g, m, v = _adam_args()
    m.flags.writeable = False
    with pytest.raises(KernelError, match=r"exp_avg is read-only but is updated in place"):
        kernels.adam_step(p, g, m, v, lr=0.1, step=1, impl=impl)
    g.flags.writeable = False  # a read-only gradient is fine: it is only read
    kernels.adam_step(p, g, v.copy(), v, lr=0.1, step=1, impl=impl)
    with pytest.raises(KernelError, match=r"sgd_step\(param=builtins\.list.*param must be a numpy or cupy array \(CPU or GPU\), "
                                          r"got builtins\.list"):
        kernels.sgd_step([1.0, 2.0], np.ones(2, np.float32), impl=impl, lr=0.1)


@pytest.mark.gpu
def test_mixing_cpu_and_gpu_arrays_is_an_error():
    import cupy

    p, g, m, v = _adam_args()
    with pytest.raises(KernelError, match=r"different devices"):
        kernels.adam_step(cupy.asarray(p), g, m, v, lr=0.1, step=1, impl="cupy")


# --------------------------------------------------------------------------------------------
# The cupy impl's host-side launch plan (pure Python: runs without a GPU)
# --------------------------------------------------------------------------------------------


def _covered(n, head, n_vec, width, blocks, threads):
    """Which elements the two loops of run_elementwise in optim.cu visit (a transcription)."""
    seen = np.zeros(n, np.int64)
    stride = blocks * threads
    for first in range(stride):
        for i in range(first, n_vec, stride):
            seen[head + i * width: head + (i + 1) * width] += 1
        vec_end = head + n_vec * width
        for j in range(first, head + (n - vec_end), stride):
            seen[j if j < head else vec_end + (j - head)] += 1
    return seen


@pytest.mark.parametrize("itemsize", [4, 8])
def test_cupy_launch_plan_covers_every_element_once(itemsize):
    from engine.kernels.cuda.optim import VECTOR_BYTES, launch_shape, vector_split

    width = VECTOR_BYTES // itemsize
    for n in (1, 2, 3, 5, 8, 13, 100, 257):
        for offset in range(0, VECTOR_BYTES, itemsize):
            base = 4096 + offset
            head, n_vec = vector_split([base, base + 1024 * 16, base + 64], n, itemsize)
            assert n_vec == 0 or (base + head * itemsize) % VECTOR_BYTES == 0
            assert 0 <= head < width and n - head - n_vec * width < width
            blocks, threads = launch_shape(n, n_vec, width, resident_blocks=2)
            assert blocks <= 2 and threads == 256
            # 8 threads per block instead of 256 keeps the transcription quick; the stride logic is
            # the same.
            np.testing.assert_array_equal(_covered(n, head, n_vec, width, blocks, 8), 1)


def test_cupy_vector_split_refuses_mixed_alignment_and_sizes_the_grid():
    from engine.kernels.cuda.optim import launch_shape, vector_split

    assert vector_split([0, 16, 32], 10, 4) == (0, 2)
    assert vector_split([4, 20, 36], 10, 4) == (3, 1)  # peel 3 floats, then one float4 ...
    assert vector_split([4, 8], 10, 4) == (0, 0)        # ... but different misalignments: all scalar
    assert vector_split([8, 24], 5, 8) == (1, 2)        # doubles: peel one, then two double2
    assert vector_split([12], 1, 4) == (1, 0)
    # 2^27 float32 parameters on 132 SMs x 4 resident blocks: one wave of 528 blocks.
    assert launch_shape(2 ** 27, 2 ** 25, 4, 132 * 4) == (528, 256)
    assert launch_shape(10, 2, 4, 528) == (1, 256)


class FakeCupyArray:
    """Just enough of a cupy array for the cupy wrapper's host code (validation, launch plan)."""

    __module__ = "cupy"

    class _Device:
        id = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def __init__(self, host):
        self.host = host
        self.shape, self.dtype, self.size, self.nbytes = host.shape, host.dtype, host.size, host.nbytes
        self.flags = type("Flags", (), {"c_contiguous": host.flags.c_contiguous})()
        self.data = type("Pointer", (), {"ptr": host.__array_interface__["data"][0]})()
        self.device = self._Device()


def _cu_signatures():
    """extern "C" kernel name -> list of (C type, parameter name), parsed from optim.cu."""
    import re

    from engine.kernels.cuda.module import source

    found = {}
    for name, params in re.findall(r'OPT_ENTRY (\w+)\(([^)]*)\)', source("optim")):
        found[name] = [(" ".join(p.split()[:-1]).replace("const ", ""), p.split()[-1]) for p in params.split(",")]
    return found


C_TYPE_OF = {np.float32: "float", np.float64: "double", np.int32: "int", np.int64: "long long"}
POINTEE = {"float32": "float", "float64": "double", "float16": "__half", "bfloat16": "__nv_bfloat16"}
AMP_POINTERS = {"found_inf": 256, "inv_scale": 512, "device_scalars": 1024}  # the flag bit that says it is used


def _launch_through_fake_function(opt, cfg, dtype, monkeypatch, param_out=None, **extra):
    """Run the cupy wrapper of ``opt`` on FakeCupyArrays; return (kernel name, grid, block, args)."""
    import engine.kernels.cuda.optim as cupy_impl

    launches = []

    def fake_function(module, name):
        assert module == "optim"
        return lambda grid, block, args: launches.append((name, grid, block, args))

    monkeypatch.setattr(cupy_impl, "function", fake_function)
    monkeypatch.setattr(cupy_impl, "_resident_blocks", lambda name, device_id: 528)
    start = initial_state(np.random.default_rng(0), opt, cfg, (1001,))
    arrays = {k: FakeCupyArray(cast(v, dtype)) for k, v in start.items()}
    grad = FakeCupyArray(cast(start["param"], dtype if param_out is None else param_out))
    spec = OPTIMIZERS[opt]
    kw = dict(cfg, **{k: FakeCupyArray(np.ones(1, np.float32)) for k in extra})
    if param_out is not None:
        kw["param_out"] = FakeCupyArray(cast(start["param"], param_out))
    if spec["step_kw"] == "step":
        kw["step"] = 3
    elif spec["step_kw"] == "first_step":
        kw["first_step"] = False
    getattr(cupy_impl, spec["kernel"].__name__)(arrays["param"], grad, *[arrays.get(s) for s in spec["slots"]],
                                                **kw)
    (launch,) = launches
    return launch


SUFFIX_CASES = [(np.float32, None, "f32"), (np.float64, None, "f64"), (np.float32, np.float16, "f32_f16"),
                (np.float32, "bfloat16", "f32_bf16")]


@pytest.mark.parametrize("with_amp", [False, True], ids=["plain", "found_inf+inv_scale"])
@pytest.mark.parametrize("dtype,param_out,suffix", SUFFIX_CASES, ids=[c[2] for c in SUFFIX_CASES])
@pytest.mark.parametrize("opt,config", CASES, ids=[f"{o}-{c}" for o, c in CASES])
def test_cupy_wrapper_passes_arguments_matching_the_cu_signature(opt, config, dtype, param_out, suffix, with_amp,
                                                                  monkeypatch):
    """Without a GPU: the cupy wrapper's argument tuple matches its kernel's C parameter list, the
    16-bit arrays go to the 16-bit entry points, and each loss-scaling pointer's flag bit is set
    exactly when the caller passed that array."""
    import ml_dtypes

    param_out = ml_dtypes.bfloat16 if param_out == "bfloat16" else param_out
    extra = ("found_inf", "inv_scale") if with_amp else ()
    name, grid, block, args = _launch_through_fake_function(opt, OPTIMIZERS[opt]["configs"][config], dtype,
                                                            monkeypatch, param_out, **dict.fromkeys(extra))
    assert name == f"{OPTIMIZERS[opt]['kernel'].__name__}_{suffix}"
    assert block == (256,) and 1 <= grid[0] <= 528
    params = _cu_signatures()[name]
    assert len(args) == len(params), (name, len(args), params)
    flags = int(args[-1])
    for arg, (c_type, pname) in zip(args, params):
        if not c_type.endswith("*"):
            assert C_TYPE_OF[type(arg)] == c_type, (name, type(arg), c_type)
            continue
        assert isinstance(arg, FakeCupyArray), (name, pname)
        used = pname not in AMP_POINTERS or flags & AMP_POINTERS[pname]
        if pname in ("found_inf", "inv_scale"):
            assert bool(used) == (pname in extra), (name, pname, flags)
        if used:
            assert c_type == POINTEE[np.dtype(arg.dtype).name] + "*", (name, pname, arg.dtype, c_type)
    pointers = sum(c.endswith("*") for c, _ in params)
    n, head, n_vec = (int(a) for a in args[pointers:pointers + 3])
    width = 16 // np.dtype(dtype).itemsize
    assert n == 1001 and 0 <= head < width and n - head - n_vec * width < width


def test_cupy_launch_reads_step_scalars_from_the_device_when_given(monkeypatch):
    """A device step count: the wrapper sets DEVICE_SCALARS and passes the array where the .cu reads it."""
    import engine.kernels.cuda.optim as cupy_impl

    launches = []
    arrays = [FakeCupyArray(np.ones(33, np.float32)) for _ in range(5)]
    device_scalars = FakeCupyArray(np.ones(2, np.float32))
    monkeypatch.setattr(cupy_impl, "function",
                        lambda module, name: lambda grid, block, args: launches.append((name, args)))
    monkeypatch.setattr(cupy_impl, "_resident_blocks", lambda name, device_id: 528)
    cupy_impl._launch("adam_step", arrays, (0.9,) * 9, 0, device_scalars=device_scalars)
    (name, args), = launches
    signature = [p for _, p in _cu_signatures()[name]]
    assert args[signature.index("device_scalars")] is device_scalars
    assert int(args[-1]) & AMP_POINTERS["device_scalars"] and not int(args[-1]) & AMP_POINTERS["found_inf"]


def test_cupy_vector_split_with_16_bit_arrays_aligns_every_vector():
    from engine.kernels.cuda.optim import vector_split

    # float32 master at 4096 + 4 (element 1 mod 4) and a bfloat16 grad at 2048 + 2 (element 1 mod 4): peel 3.
    assert vector_split([4100, 2050], 11, 4, [4, 2]) == (3, 2)
    assert (4100 + 3 * 4) % 16 == 0 and (2050 + 3 * 2) % 8 == 0
    assert vector_split([4100, 2052], 11, 4, [4, 2]) == (0, 0)  # element offsets 1 and 2: all scalar
    assert vector_split([4100, 2051], 11, 4, [4, 2]) == (0, 0)  # a 16-bit array at an odd address


# --------------------------------------------------------------------------------------------
# Loss scaling (found_inf, inv_scale, device step counts) and master weights (param_out)
# --------------------------------------------------------------------------------------------

AMP_CASES = [("adam", "everything"), ("adam", "adamw"), ("sgd", "dampening"), ("sgd", "nesterov"),
             ("adagrad", "maximize"), ("rmsprop", "everything")]
AMP_IDS = [f"{o}-{c}" for o, c in AMP_CASES]


def _flag(value, impl):
    return to_device(np.array([value], np.float32), impl)


def _state(opt, cfg, dtype, impl, n=257, seed=0):
    start = initial_state(np.random.default_rng(seed), opt, cfg, (n,))
    if opt == "sgd" and "momentum_buf" in start:
        start["momentum_buf"] = 0.1 * signed(np.random.default_rng(seed + 1), n)  # not the first step below
    return {k: to_device(cast(v, dtype), impl) for k, v in start.items()}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opt,config", AMP_CASES, ids=AMP_IDS)
def test_found_inf_set_leaves_every_array_untouched(opt, config, impl, rng):
    cfg = OPTIMIZERS[opt]["configs"][config]
    arrays = _state(opt, cfg, np.float32, impl)
    grad = to_device(cast(signed(rng, 257), np.float32), impl)
    before = {k: to_host(v).copy() for k, v in arrays.items()}
    grad_before = to_host(grad).copy()
    call_step(opt, impl, arrays, grad, cfg, 2, found_inf=_flag(1.0, impl), inv_scale=_flag(0.25, impl))
    for name, value in before.items():
        np.testing.assert_array_equal(to_host(arrays[name]), value, err_msg=name)
    np.testing.assert_array_equal(to_host(grad), grad_before)
    call_step(opt, impl, arrays, grad, cfg, 2, found_inf=_flag(float("inf"), impl))  # any nonzero value skips
    np.testing.assert_array_equal(to_host(arrays["param"]), before["param"])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt,config", AMP_CASES, ids=AMP_IDS)
@pytest.mark.slow
def test_unscaling_in_the_step_equals_the_unscaled_gradient_and_writes_it_back(opt, config, dtype, impl, rng):
    """found_inf = 0 and inv_scale = 1/1024 on a gradient scaled by 1024: the same step as on the
    plain gradient (exactly: a power of two), and grad holds the unscaled gradient afterwards."""
    cfg = OPTIMIZERS[opt]["configs"][config]
    ours, plain = _state(opt, cfg, dtype, impl), _state(opt, cfg, dtype, impl)
    g = cast(signed(rng, 257), dtype)
    scaled = to_device(g * 1024, impl)
    call_step(opt, impl, ours, scaled, cfg, 3, found_inf=_flag(0.0, impl), inv_scale=_flag(1 / 1024, impl))
    call_step(opt, impl, plain, to_device(g, impl), cfg, 3)
    for name in plain:
        np.testing.assert_array_equal(to_host(ours[name]), to_host(plain[name]), err_msg=name)
    np.testing.assert_array_equal(to_host(scaled), g)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opt", ["adam", "adagrad", "sgd"])
def test_a_step_count_given_as_a_device_array_equals_the_number(opt, impl, rng):
    config = {"adam": "everything", "adagrad": "maximize", "sgd": "dampening"}[opt]
    cfg = OPTIMIZERS[opt]["configs"][config]
    for t in (1, 2, 7):
        by_array, by_number = _state(opt, cfg, np.float32, impl), _state(opt, cfg, np.float32, impl)
        g = to_device(cast(signed(rng, 257), np.float32), impl)
        spec = OPTIMIZERS[opt]
        value = (t == 1) if spec["step_kw"] == "first_step" else t
        kw = {spec["step_kw"]: to_device(np.array([value], np.int64), impl)}
        spec["kernel"](by_array["param"], g, *[by_array.get(s) for s in spec["slots"]], impl=impl, **cfg, **kw)
        call_step(opt, impl, by_number, g, cfg, t)
        for name in by_number:
            assert_close(by_array[name], to_host(by_number[name]).astype(np.float64), np.float32, f"{opt} t={t}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lr_dtype", [np.float64, np.float32], ids=["lr_f64", "lr_f32"])
@pytest.mark.parametrize("opt,config", [("adam", "everything"), ("adam", "adamw"), ("sgd", "dampening"),
                                        ("adagrad", "maximize")])
def test_a_learning_rate_given_as_a_device_array_equals_the_number(opt, config, lr_dtype, impl, rng):
    """lr (with the step count, as a capturable optimizer passes them) in a one-element array on the
    arrays' device: the same update as the number it holds (on the GPU impls read by the kernel)."""
    cfg = OPTIMIZERS[opt]["configs"][config]
    spec = OPTIMIZERS[opt]
    for t in (1, 3):
        lr = float(np.asarray(cfg["lr"], lr_dtype))  # the value the array holds
        by_array, by_number = _state(opt, cfg, np.float32, impl), _state(opt, cfg, np.float32, impl)
        g = to_device(cast(signed(rng, 257), np.float32), impl)
        value = (t == 1) if spec["step_kw"] == "first_step" else t
        kw = dict(cfg, lr=to_device(np.array([lr], lr_dtype), impl),
                  **{spec["step_kw"]: to_device(np.array([value], np.int64), impl)})
        spec["kernel"](by_array["param"], g, *[by_array.get(s) for s in spec["slots"]], impl=impl, **kw)
        call_step(opt, impl, by_number, g, dict(cfg, lr=lr), t)
        for name in by_number:
            assert_close(by_array[name], to_host(by_number[name]).astype(np.float64), np.float32, f"{opt} t={t}")


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
def test_a_learning_rate_array_must_be_one_float_on_the_arrays_device(impl):
    p, g, m, v = (np.ones(4, np.float32) for _ in range(4))
    for bad in (np.array([1, 2], np.float32), np.array([1], np.int64)):
        with pytest.raises(KernelError, match=r"adam_step: lr must be a one-element float32 or float64 array"):
            kernels.adam_step(p, g, m, v, lr=bad, step=1, impl=impl)
    with pytest.raises(KernelError, match=r"invalid lr=-0.5"):  # host memory: read and range-checked
        kernels.sgd_step(p, g, lr=np.array([-0.5]), impl=impl)
    with pytest.raises(KernelError, match=r"rmsprop_step: lr must be a one-element float32 or float64"):
        kernels.rmsprop_step(p, g, m, lr=np.array([1], np.int64), impl=impl)


def _low_dtypes():
    import ml_dtypes

    return [np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]


LOW_IDS = ["f16", "bf16"]
MASTER_IMPLS = ["numpy", "numba_cpu", pytest.param("cupy", marks=pytest.mark.gpu),
                pytest.param("numba_cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("impl", MASTER_IMPLS)
@pytest.mark.parametrize("low", _low_dtypes(), ids=LOW_IDS)
@pytest.mark.parametrize("opt,config", CASES, ids=[f"{o}-{c}" for o, c in CASES])
@pytest.mark.slow
def test_master_weights_follow_the_float64_formula_and_round_into_param_out(opt, config, low, impl, rng):
    """A float32 master, float32 states, 16-bit gradients: the master follows the float64 formula on
    the gradients' values at float32 tolerance, and param_out is the master rounded to nearest-even
    after every step."""
    if impl == "numba_cuda" and low.name == "bfloat16":
        pytest.skip("numba cannot type bfloat16 arrays (refused: see test_numba_cuda_refuses_bfloat16)")
    cfg = OPTIMIZERS[opt]["configs"][config]
    spec = OPTIMIZERS[opt]
    start = initial_state(rng, opt, cfg, (1031,))
    ours = {k: to_device(cast(v, np.float32), impl) for k, v in start.items()}
    out = to_device(cast(start["param"], low), impl)
    exact = {k: cast(v, np.float32).astype(np.float64) for k, v in start.items()}
    for t in range(1, 11):
        grad = cast(signed(rng, (1031,)), low)
        call_step(opt, impl, ours, to_device(grad, impl), cfg, t, param_out=out)
        spec["reference"](exact, grad.astype(np.float64), t, **cfg)
        np.testing.assert_array_equal(to_host(out).view(np.uint16), to_host(ours["param"]).astype(low).view(np.uint16))
    for name in exact:
        assert_close(ours[name], exact[name], np.float32, f"{opt}/{impl} master {name}")


@pytest.mark.parametrize("impl", ["numpy", "numba_cpu"])
@pytest.mark.parametrize("low", _low_dtypes(), ids=LOW_IDS)
@pytest.mark.slow
def test_master_weights_with_scaled_16_bit_gradients_and_a_skip(low, impl, rng, monkeypatch):
    """The whole GradScaler path in one call sequence: scaled 16-bit grads unscaled in float32,
    written back rounded, a skipped step, and the parallel numba loop (a buffer past PARALLEL_MIN)."""
    from engine.kernels import threads
    from engine.kernels.cpu.optim import PARALLEL_MIN

    monkeypatch.setattr(threads, "REGION_ALWAYS_MIN", PARALLEL_MIN)

    n = PARALLEL_MIN + 3 if impl == "numba_cpu" else 1001
    cfg = dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    master = cast(signed(rng, n), np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    out = master.astype(low)
    ref = {"param": master.copy(), "exp_avg": m.copy(), "exp_avg_sq": v.copy()}
    g = cast(signed(rng, n), low)
    scaled = (g.astype(np.float32) * 256).astype(low)
    kernels.adam_step(master, scaled, m, v, step=1, found_inf=np.ones(1, np.float32), impl=impl, param_out=out, **cfg)
    np.testing.assert_array_equal(out.view(np.uint16), ref["param"].astype(low).view(np.uint16))  # skipped
    kernels.adam_step(master, scaled, m, v, step=1, found_inf=np.zeros(1, np.float32),
                      inv_scale=np.full(1, 1 / 256, np.float32), param_out=out, impl=impl, **cfg)
    np.testing.assert_array_equal(scaled.view(np.uint16), g.view(np.uint16))  # unscaled in place
    kernels.adam_step(ref["param"], g.astype(np.float32), ref["exp_avg"], ref["exp_avg_sq"], step=1, impl="numpy",
                      **cfg)
    np.testing.assert_array_equal(master, ref["param"])
    np.testing.assert_array_equal(out.view(np.uint16), master.astype(low).view(np.uint16))


def test_master_weight_and_loss_scaling_arguments_are_checked():
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    p, m, v = np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
    low_p = np.ones(4, bf16)
    for impl in ("numpy", "numba_cpu"):
        # the registry refuses first (the call's dtype is param's): a 16-bit param goes in param_out
        with pytest.raises(KernelError, match=r"impl '\w+' does not take bfloat16 arrays; it takes float32, float64"):
            kernels.adam_step(low_p, low_p.copy(), m, v, lr=0.1, step=1, impl=impl)
        with pytest.raises(KernelError, match=r"grad has dtype float32; with a bfloat16 param_out it must be bfloat16"):
            kernels.adam_step(p, p.copy(), m, v, lr=0.1, step=1, param_out=low_p, impl=impl)
        with pytest.raises(KernelError, match=r"exp_avg has dtype bfloat16; with a bfloat16 param_out it must be "
                                              r"float32"):
            kernels.adam_step(p, low_p.copy(), np.zeros(4, bf16), v, lr=0.1, step=1, param_out=low_p, impl=impl)
        with pytest.raises(KernelError, match=r"param has dtype float64; with a float16 param_out it must be float32"):
            kernels.sgd_step(np.ones(4), np.ones(4, np.float16), lr=0.1, param_out=np.ones(4, np.float16), impl=impl)
        with pytest.raises(KernelError, match=r"param_out has dtype int16; it must be float16 or bfloat16"):
            kernels.sgd_step(p, np.ones(4, np.int16), lr=0.1, param_out=np.ones(4, np.int16), impl=impl)
        with pytest.raises(KernelError, match=r"found_inf must be a one-element float32 array on the arrays' device"):
            kernels.sgd_step(p, p.copy(), lr=0.1, found_inf=np.zeros(2, np.float32), impl=impl)
        with pytest.raises(KernelError, match=r"inv_scale must be a one-element float32 array .* float64"):
            kernels.sgd_step(p, p.copy(), lr=0.1, inv_scale=np.ones(1), impl=impl)
        with pytest.raises(KernelError, match=r"step must be a one-element integer array"):
            kernels.adam_step(p, p.copy(), m, v, lr=0.1, step=np.ones(1, np.float32), impl=impl)
        with pytest.raises(KernelError, match=r"step must be the 1-based step count .* got np.int64\(0\)"):
            kernels.adam_step(p, p.copy(), m, v, lr=0.1, step=np.zeros(1, np.int64), impl=impl)
        read_only = p.copy()
        read_only.flags.writeable = False
        with pytest.raises(KernelError, match=r"grad is read-only but is updated in place"):
            kernels.sgd_step(p, read_only, lr=0.1, inv_scale=np.ones(1, np.float32), impl=impl)
        kernels.sgd_step(p, read_only, lr=0.1, found_inf=np.zeros(1, np.float32), impl=impl)  # only read: fine


@pytest.mark.parametrize("impl", MASTER_IMPLS)
@pytest.mark.parametrize("low", _low_dtypes(), ids=LOW_IDS)
@pytest.mark.parametrize("opt,config", [("adam", "adamw"), ("sgd", "momentum"), ("adagrad", "default"),
                                        ("rmsprop", "centered")], ids=["adam", "sgd", "adagrad", "rmsprop"])
def test_a_parameter_written_since_the_last_step_restarts_its_master(opt, config, low, impl, rng):
    """Where param_out no longer holds the master rounded, the step starts from param_out's value;
    elsewhere the master keeps its low bits."""
    if impl == "numba_cuda" and low.name == "bfloat16":
        pytest.skip("numba cannot type bfloat16 arrays")
    cfg = OPTIMIZERS[opt]["configs"][config]
    start = initial_state(rng, opt, cfg, (515,))
    master = cast(start["param"], np.float32) + np.float32(1e-4)  # low bits a 16-bit param cannot hold
    written = master.astype(low)
    written[::3] = (-2 * master[::3]).astype(low)  # a third of the parameter rewritten (to other values)
    fresh = np.where(np.arange(515) % 3 == 0, written.astype(np.float32), master)  # what the step must start from
    grad = cast(signed(rng, (515,)), low)
    ours = {k: to_device(cast(v, np.float32), impl) for k, v in start.items()}
    ours["param"] = to_device(master, impl)
    reference = {k: cast(v, np.float32) for k, v in start.items()}
    reference["param"] = fresh.copy()
    out = to_device(written.copy(), impl)
    call_step(opt, impl, ours, to_device(grad.copy(), impl), cfg, 1, param_out=out)
    call_step(opt, "numpy", reference, grad.astype(np.float32), cfg, 1)
    for name in reference:
        assert_close(ours[name], reference[name].astype(np.float64), np.float32, f"{opt}/{impl} {name}")
    np.testing.assert_array_equal(to_host(out).view(np.uint16), reference["param"].astype(low).view(np.uint16))
