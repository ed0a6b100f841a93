"""numba_cpu kernels called from several Python threads at once: no crash, the single-threaded results.

numba's workqueue threading layer (kernels.registry.configure_numba_threads) aborts the whole process
with SIGABRT when two threads run parallel regions at once, so each scenario runs in a child process
(this file, run as a script): a crash there fails one test instead of killing pytest. The sizes put
every kernel on its parallel path: 2^18-element optimizer buffers (PARALLEL_MIN = 2^17), 256 x 256
logits (2^16 >= 2^15), and models whose flat Adam buffer and logits are past those bounds.

Results must equal a sequential run of the same work: bit for bit for the optimizer and cross-entropy
kernels (deterministic: the work split depends on the sizes and numba's thread count only), within a
tight tolerance wherever a BLAS GEMM is involved (a BLAS may cut its work differently when two
threads call it at once); a race between threads would show as differences far larger.
"""

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
F32 = np.float32
THREADS = 3
ROUNDS = 12
GEMM_RTOL, GEMM_ATOL = 1e-5, 1e-6


def _run_child(scenario: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_THREADING_LAYER", "ENGINE_KERNEL_IMPL")}
    # Two numba threads even on a one-core runner: the parallel regions (and the race) stay real.
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
               NUMBA_NUM_THREADS="2")
    return subprocess.run([sys.executable, __file__, scenario], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _assert_child_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"child exited with {proc.returncode} (-6 / 134: SIGABRT from numba's threading "
                                  f"layer)\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    assert "threads: OK" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_kernels_called_from_threads_at_once():
    _assert_child_ok(_run_child("kernels"))


@pytest.mark.slow
def test_two_models_training_in_two_threads():
    _assert_child_ok(_run_child("training"))


# ------------------------------------------------------------------------------------------------
# The child process
# ------------------------------------------------------------------------------------------------


def _kernel_work(seed: int) -> dict:
    """ROUNDS rounds of every numba_cpu kernel with a parallel path, on this seed's data."""
    from engine import kernels

    rng = np.random.default_rng(seed)
    n = 1 << 18
    normal = lambda *shape: rng.standard_normal(shape, dtype=F32)  # noqa: E731
    state = {"adam_p": normal(n), "adam_m": np.zeros(n, F32), "adam_v": np.zeros(n, F32),
             "sgd_p": normal(n), "sgd_buf": np.zeros(n, F32), "adagrad_p": normal(n), "adagrad_sum": np.zeros(n, F32),
             "rms_p": normal(n), "rms_sq": np.zeros(n, F32), "rms_buf": np.zeros(n, F32), "rms_avg": np.zeros(n, F32)}
    logits, soft = normal(256, 256), rng.dirichlet(np.ones(256), 256).astype(F32)
    targets = rng.integers(0, 256, 256)
    x, w, b, dy = normal(256, 384), normal(320, 384) * F32(0.05), normal(320), normal(256, 320)
    losses = []
    for step in range(1, ROUNDS + 1):
        g = normal(n)
        kernels.adam_step(state["adam_p"], g, state["adam_m"], state["adam_v"], lr=1e-3, weight_decay=0.01,
                          step=step, impl="numba_cpu")
        kernels.sgd_step(state["sgd_p"], g, state["sgd_buf"], lr=1e-2, momentum=0.9, first_step=step == 1,
                         impl="numba_cpu")
        kernels.adagrad_step(state["adagrad_p"], g, state["adagrad_sum"], lr=1e-2, step=step, impl="numba_cpu")
        kernels.rmsprop_step(state["rms_p"], g, state["rms_sq"], state["rms_buf"], state["rms_avg"], lr=1e-3,
                             momentum=0.5, centered=True, impl="numba_cpu")
        shifted = logits + F32(0.01 * step)
        loss, grad = kernels.softmax_cross_entropy(shifted, targets, label_smoothing=0.1, impl="numba_cpu")
        soft_loss, soft_grad = kernels.softmax_cross_entropy(shifted, soft, impl="numba_cpu")
        losses += [loss, soft_loss]
        y = kernels.linear_relu_forward(x, w, b, impl="numba_cpu")
        dx, dw, db = kernels.linear_relu_backward(dy, x, w, y, impl="numba_cpu")
    exact = dict(state, loss=np.stack(losses), grad=grad, soft_grad=soft_grad)
    return {"exact": exact, "gemm": {"y": y, "dx": dx, "dw": dw, "db": db}}


def _make_model(seed: int):
    """An MLP (engine.nn) and its fused Adam, initialised from ``seed``.

    Built on the main thread: the engine's generator is process-wide, as torch's is, so models
    initialised in two threads at once would draw from one stream in an order that varies.
    """
    import engine
    from engine import nn, optim

    engine.manual_seed(seed)
    # 128*600 + 600 + 600*128 + 128 = 154,328 parameters in Adam's flat buffer (>= 2^17); the
    # logits are 256 x 128 = 2^15 (cross-entropy's parallel bound).
    model = nn.Sequential(nn.Linear(128, 600), nn.ReLU(), nn.Linear(600, 128))
    return seed, model, optim.Adam(model.parameters(), lr=1e-3)


def _train(job, steps: int = 12) -> dict:
    """Train one model of :func:`_make_model` for ``steps`` steps; its final parameters."""
    import engine
    import engine.functional as F

    seed, model, opt = job
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        x = engine.tensor(rng.standard_normal((256, 128), dtype=F32))
        y = engine.tensor(rng.integers(0, 128, 256))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _in_threads(work, jobs) -> list:
    """``work(job)`` for each job, one thread each, started together; the results in job order."""
    results: list = [None] * len(jobs)
    errors: list = []
    barrier = threading.Barrier(len(jobs))

    def run(i: int, job) -> None:
        try:
            barrier.wait()
            results[i] = work(job)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _child(scenario: str) -> None:
    from engine.kernels import threads

    threads.REGION_ALWAYS_MIN = 0  # the parallel paths whatever the machine's load (threads.parallel_region)
    if scenario == "kernels":
        seeds, prepare, work = list(range(THREADS)), (lambda seed: seed), _kernel_work
    else:
        seeds, prepare, work = [10, 11], _make_model, _train
    work(prepare(99))  # compile (or load from numba's cache) before the threads start
    sequential = [work(prepare(s)) for s in seeds]
    threaded = _in_threads(work, [prepare(s) for s in seeds])
    for seed, expected, got in zip(seeds, sequential, threaded):
        if scenario == "kernels":
            for name, value in expected["exact"].items():
                np.testing.assert_array_equal(got["exact"][name], value, err_msg=f"seed {seed}: {name}")
            expected, got = expected["gemm"], got["gemm"]
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=GEMM_RTOL, atol=GEMM_ATOL, err_msg=f"seed {seed}: {name}")
    print(f"threads: OK ({scenario}, {len(seeds)} threads)")


if __name__ == "__main__":
    _child(sys.argv[1])
