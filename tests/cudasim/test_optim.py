"""numba_cuda optimizer steps under the Numba CUDA simulator, against the numpy impl.

The simulator grid is capped at 2 blocks of 256 threads (kernels/numba_cuda/optim.py), so sizes
above 512 run the grid-stride loop more than once per thread; the sizes are not multiples of the
block size. Every optimizer runs a few consecutive steps with fresh gradients from random nonzero
states, every flag at least once, in float32 and float64. Small sizes: the simulator runs one
Python thread per CUDA thread.
"""

import numpy as np
import pytest

from engine import kernels
from engine.kernels import KernelError

STEPS = 3


def signed(rng, n):
    return rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)


def start_states(rng, names, n, dtype):
    states = {"param": signed(rng, n)}
    for name in names:
        if name in ("exp_avg_sq", "max_exp_avg_sq", "state_sum", "square_avg"):
            states[name] = 0.1 * rng.uniform(0.5, 1.5, n)
        elif name == "grad_avg":
            states[name] = 0.5 * signed(rng, n)
        else:
            states[name] = 0.1 * signed(rng, n)
    if "grad_avg" in states:
        states["square_avg"] = states["grad_avg"] ** 2 + rng.uniform(0.5, 1.5, n)
    return {k: v.astype(dtype) for k, v in states.items()}


# (kernel, state arrays in positional order, keyword arguments, step keyword)
CASES = [
    ("adam_step", ["exp_avg", "exp_avg_sq", None], dict(lr=0.01, weight_decay=0.1), "step"),
    ("adam_step", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
     dict(lr=0.02, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.05, decoupled_weight_decay=True, amsgrad=True,
          maximize=True), "step"),
    ("sgd_step", [None], dict(lr=0.1, weight_decay=0.01, maximize=True), "first_step"),
    ("sgd_step", ["momentum_buf"], dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01), "first_step"),
    ("sgd_step", ["momentum_buf"], dict(lr=0.05, momentum=0.8, nesterov=True), "first_step"),
    ("adagrad_step", ["state_sum"], dict(lr=0.1, lr_decay=0.05, weight_decay=0.1, eps=1e-4, maximize=True), "step"),
    ("rmsprop_step", ["square_avg", None, None], dict(lr=0.01, weight_decay=0.1), None),
    ("rmsprop_step", ["square_avg", "momentum_buf", "grad_avg"],
     dict(lr=0.01, alpha=0.95, eps=1e-5, weight_decay=0.05, momentum=0.5, centered=True, maximize=True), None),
]
IDS = ["adam-l2", "adamw-amsgrad-maximize", "sgd-plain", "sgd-momentum", "sgd-nesterov", "adagrad", "rmsprop",
       "rmsprop-centered-momentum"]


def run(kernel, slots, cfg, step_kw, impl, states, grads, first=1):
    fn = getattr(kernels, kernel)
    for t, grad in enumerate(grads, start=first):
        kw = dict(cfg)
        if step_kw == "step":
            kw["step"] = t
        elif step_kw == "first_step":
            kw["first_step"] = t == 1
        fn(states["param"], grad, *[states.get(s) if s else None for s in slots], impl=impl, **kw)


@pytest.mark.parametrize("n,dtype", [(1, np.float32), (7, np.float64), (600, np.float32), (1029, np.float64)])
@pytest.mark.parametrize("kernel,slots,cfg,step_kw", CASES, ids=IDS)
def test_numba_cuda_matches_numpy_impl(kernel, slots, cfg, step_kw, n, dtype):
    rng = np.random.default_rng(n)
    start = start_states(rng, [s for s in slots if s], n, dtype)
    grads = [signed(rng, n).astype(dtype) for _ in range(STEPS)]
    grad_copies = [g.copy() for g in grads]
    ours = {k: v.copy() for k, v in start.items()}
    reference = {k: v.copy() for k, v in start.items()}
    run(kernel, slots, cfg, step_kw, "numba_cuda", ours, grads)
    run(kernel, slots, cfg, step_kw, "numpy", reference, grads)
    for g, copy in zip(grads, grad_copies):
        np.testing.assert_array_equal(g, copy)
    rtol = 4e-6 if dtype == np.float32 else 1e-13
    for name, expected in reference.items():
        got = ours[name]
        assert got.dtype == dtype
        scale = np.max(np.abs(expected))
        assert np.all(np.abs(got - expected) <= rtol * (np.abs(expected) + scale)), name
        assert not np.array_equal(got, start[name]), f"{name} did not change"


def test_numba_cuda_empty_and_errors():
    empty = np.zeros(0, np.float32)
    kernels.adam_step(empty, empty.copy(), empty.copy(), empty.copy(), lr=0.1, step=1, impl="numba_cuda")
    p = np.ones(4, np.float32)
    with pytest.raises(KernelError, match=r"adam_step\(.*must share one dtype.*no silent promotion"):
        kernels.adam_step(p, p.copy(), p.copy(), np.zeros(4), lr=0.1, step=1, impl="numba_cuda")
    with pytest.raises(KernelError, match=r"sgd_step: momentum=0.9 needs momentum_buf"):
        kernels.sgd_step(p, p.copy(), None, lr=0.1, momentum=0.9, impl="numba_cuda")


# ---- loss scaling and master weights ------------------------------------------------------------


@pytest.mark.parametrize("n", [7, 600])
@pytest.mark.parametrize("kernel,slots,cfg,step_kw", CASES, ids=IDS)
def test_numba_cuda_loss_scaling_and_float16_master_match_numpy_impl(kernel, slots, cfg, step_kw, n):
    """A float32 master with float16 gradients and param_out, gradients scaled by 512 and unscaled in
    the step (written back), and a skipped step (found_inf = 1) that must change nothing."""
    rng = np.random.default_rng(n)
    start = start_states(rng, [s for s in slots if s], n, np.float32)
    ours = {k: v.copy() for k, v in start.items()}
    reference = {k: v.copy() for k, v in start.items()}
    outs = {impl: start["param"].astype(np.float16) for impl in ("numba_cuda", "numpy")}
    for t, skip in enumerate([False, True, False], start=1):
        grad = (signed(rng, n) * 512).astype(np.float16)
        grads = {impl: grad.copy() for impl in outs}
        for impl, states in (("numba_cuda", ours), ("numpy", reference)):
            extra = dict(found_inf=np.array([1.0 if skip else 0.0], np.float32),
                         inv_scale=np.array([1 / 512], np.float32), param_out=outs[impl])
            run(kernel, slots, dict(cfg, **extra), step_kw, impl, states, [grads[impl]], first=t)
        np.testing.assert_array_equal(grads["numba_cuda"], grads["numpy"])
        np.testing.assert_array_equal(grads["numba_cuda"], grad if skip else (grad.astype(np.float32) / 512)
                                      .astype(np.float16))
    for name, expected in reference.items():
        scale = np.max(np.abs(expected))
        assert np.all(np.abs(ours[name] - expected) <= 4e-6 * (np.abs(expected) + scale)), name
    np.testing.assert_array_equal(outs["numba_cuda"], ours["param"].astype(np.float16))


def test_numba_cuda_refuses_bfloat16_parameters_by_name():
    import ml_dtypes

    p = np.ones(4, np.float32)
    low = np.ones(4, ml_dtypes.bfloat16)
    with pytest.raises(KernelError, match=r"adam_step \(numba_cuda\): a bfloat16 parameter is not supported: numba "
                                          r"cannot type bfloat16 arrays; use the cupy impl"):
        kernels.adam_step(p, low.copy(), p.copy(), p.copy(), lr=0.1, step=1, param_out=low, impl="numba_cuda")


def test_numba_cuda_master_restarts_where_the_float16_parameter_was_written():
    rng = np.random.default_rng(3)
    n = 600
    master = (signed(rng, n) + 1e-3).astype(np.float32)
    written = master.astype(np.float16)
    written[::3] = (-2 * master[::3]).astype(np.float16)
    grad = signed(rng, n).astype(np.float16)
    results = {}
    for impl in ("numba_cuda", "numpy"):
        p, m, v, out = master.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32), written.copy()
        kernels.adam_step(p, grad.copy(), m, v, lr=0.01, step=1, param_out=out, impl=impl)
        results[impl] = (p, out)
    np.testing.assert_allclose(results["numba_cuda"][0], results["numpy"][0], rtol=4e-6, atol=1e-7)
    np.testing.assert_array_equal(results["numba_cuda"][1], results["numpy"][1])
    # the rewritten third started from the written value: it moved by about lr, not from the master
    assert np.all(np.abs(results["numpy"][0][::3] - written[::3].astype(np.float32)) < 0.011)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_numba_cuda_adam_reads_step_size_bias_correction_and_decay_from_device_scalars(decoupled):
    """The kernel's device_scalars slots (what a capturable optimizer's device lr and step count
    become, kernels/cpu/optim.py): [step_size, sqrt(1 - beta2^t), 1 - lr * weight_decay] give the
    update the same scalars give as arguments."""
    from engine.kernels.cpu.optim import adam_bias_corrections
    from engine.kernels.numba_cuda import optim as nc

    rng = np.random.default_rng(3)
    lr, beta1, beta2, wd, t = 0.02, 0.9, 0.99, 0.1, 3
    step_size, bc2 = adam_bias_corrections(lr, beta1, beta2, t)
    scalars = (beta1, beta2, 1 - beta1, 1 - beta2, step_size, bc2, 1e-8, wd, 1 - lr * wd)
    flags = (True, decoupled, False, False)
    results = []
    for device_scalars in (None, np.array([step_size, bc2, 1 - lr * wd], np.float32)):
        st = start_states(np.random.default_rng(0), ["exp_avg", "exp_avg_sq"], 300, np.float32)
        grad = signed(rng if device_scalars is None else np.random.default_rng(3), 300).astype(np.float32)
        host = scalars if device_scalars is None else scalars[:4] + (0.0, 0.0) + scalars[6:8] + (0.0,)
        nc._launch(nc.adam_kernel, [st["param"], grad, st["exp_avg"], st["exp_avg_sq"], nc._placeholder(st["param"])],
                   host, flags, device_scalars=device_scalars, name="adam_step")
        results.append(st)
    for name in results[0]:
        np.testing.assert_array_equal(results[1][name], results[0][name], err_msg=name)


def test_numba_cuda_sgd_reads_first_step_and_lr_from_device_scalars():
    from engine.kernels.numba_cuda import optim as nc

    results = []
    for device_scalars in (None, np.array([0.0, 0.05], np.float32)):
        st = start_states(np.random.default_rng(0), ["momentum_buf"], 300, np.float32)
        grad = signed(np.random.default_rng(4), 300).astype(np.float32)
        lr = 0.05 if device_scalars is None else 0.0  # the argument is ignored when the device holds it
        nc._launch(nc.sgd_kernel, [st["param"], grad, st["momentum_buf"]], (lr, 0.9, 1.0, 0.01),
                   (True, True, False, False, False), device_scalars=device_scalars, name="sgd_step")
        results.append(st)
    for name in results[0]:
        np.testing.assert_array_equal(results[1][name], results[0][name], err_msg=name)
