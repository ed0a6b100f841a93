"""Bytes and FLOPs per kernel call, and the device ceilings measured in the same run.

The floor on a call's time is the larger of ``bytes / copy bandwidth`` and ``FLOPs / GEMM
rate``; a row's *roofline fraction* is that floor over the measured time (1.0 = at the ceiling).
Byte counts are the compulsory traffic of a fused implementation: every input read once and
every output written once, in float32 (4 bytes), int64 targets (8 bytes). FLOP counts count a
multiply-add as two and ``exp``/``sqrt``/division as one; they matter only for the GEMMs, the
other kernels being memory-bound by orders of magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

F32 = 4
I64 = 8


@dataclass(frozen=True)
class Work:
    """What one call moves and computes."""

    bytes: int
    flops: int


# ---- per-kernel formulas ----------------------------------------------------------------------

def adam_work(n: int, itemsize: int = F32) -> Work:
    """Adam: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq (7 arrays)."""
    return Work(bytes=7 * n * itemsize, flops=13 * n)


def sgd_work(n: int, itemsize: int = F32) -> Work:
    """SGD with momentum: read param, grad, momentum_buf; write param, momentum_buf (5 arrays)."""
    return Work(bytes=5 * n * itemsize, flops=5 * n)


def adagrad_work(n: int, itemsize: int = F32) -> Work:
    """Adagrad: read param, grad, state_sum; write param, state_sum (5 arrays)."""
    return Work(bytes=5 * n * itemsize, flops=6 * n)


def rmsprop_work(n: int, itemsize: int = F32) -> Work:
    """RMSprop (no momentum, not centered): read param, grad, square_avg; write param, square_avg."""
    return Work(bytes=5 * n * itemsize, flops=8 * n)


def cross_entropy_work(n: int, classes: int, itemsize: int = F32) -> Work:
    """Softmax-CE forward + backward in one pass: read logits and targets, write grad and loss.

    ``2 * N * C * 4`` bytes dominate: a fused kernel that keeps each row on chip reads the
    logits once and writes the gradient once.
    """
    return Work(bytes=2 * n * classes * itemsize + n * I64 + n * itemsize, flops=5 * n * classes)


def layer_norm_work(n: int, d: int, itemsize: int = F32) -> Work:
    """Layer norm forward then backward (two calls, as in training): 5 N D values move.

    Forward reads x and writes y; backward reads dy and x again (the forward is long gone by then)
    and writes dx. Plus weight and bias read, mean and rstd written then read (4 N), and dweight,
    dbias written. The backward's partial column sums (2 P D each way, P ~ a few per SM) are the
    kernel's own choice, not compulsory, and not counted.
    """
    bytes_ = (5 * n * d + 4 * n + 2 * d + d + 2 * d) * itemsize
    return Work(bytes=bytes_, flops=16 * n * d)


def gelu_work(n: int, itemsize: int = F32) -> Work:
    """GELU forward then backward (two calls, as in training) over n values: 5 n values move.

    Forward reads x and writes y; backward reads dy and x (only x is saved) and writes dx.
    FLOPs: ~25 per value for the tanh form's polynomial, exp and division, both directions together.
    """
    return Work(bytes=5 * n * itemsize, flops=25 * n)


def attention_pairs(l: int, s: int, causal: bool) -> int:  # noqa: E741 - L, as in PyTorch
    """(query, key) pairs a query row may attend to: L S, or top-left causal sum_i min(i + 1, S)."""
    if not causal:
        return l * s
    if l <= s:
        return l * (l + 1) // 2
    return s * (s + 1) // 2 + (l - s) * s


def attention_work(b: int, l: int, s: int, e: int, ev: int, causal: bool = False,  # noqa: E741
                   itemsize: int = F32) -> Work:
    """Attention forward then backward (flash style, as training calls them), B = batch * heads.

    FLOPs count the matrix products only, over the visible (query, key) pairs P (L S, about half
    with causal): forward Q K^T and P V, 2 P (E + Ev) per batch row (4 B L S E at E = Ev);
    backward recomputes Q K^T and does dO V^T, P^T dO, dS K and dS^T Q, 2 P (3 E + 2 Ev) (2.5x
    the forward). Bytes: forward reads q, k, v and writes out and lse; backward reads q, k, v,
    out, dO and lse and writes dq, dk, dv. The L x S scores are never counted: the fused impls
    keep them on chip (an unfused path moves several L x S matrices and is held to these bytes).
    """
    pairs = b * attention_pairs(l, s, causal)
    q, kv, o, rows = b * l * e, b * s * (e + ev), b * l * ev, b * l
    bytes_ = (q + kv + o + rows) + (q + kv + 2 * o + rows + q + kv)
    return Work(bytes=bytes_ * itemsize, flops=2 * pairs * (e + ev) + 2 * pairs * (3 * e + 2 * ev))


def linear_relu_forward_work(n: int, k: int, m: int, itemsize: int = F32) -> Work:
    """relu(x @ W.T + b): read x (N, K), W (M, K), b (M); write y (N, M); 2NKM + 2NM FLOPs."""
    return Work(bytes=(n * k + m * k + m + n * m) * itemsize, flops=2 * n * k * m + 2 * n * m)


def linear_relu_backward_work(n: int, k: int, m: int, itemsize: int = F32) -> Work:
    """Read dy, y (N, M), x (N, K), W (M, K); write dx (N, K), dW (M, K), db (M); two GEMMs."""
    bytes_ = (2 * n * m + 2 * n * k + 2 * m * k + m) * itemsize
    return Work(bytes=bytes_, flops=4 * n * k * m + 2 * n * m)


def gemm_work(n: int, k: int, m: int, itemsize: int = F32) -> Work:
    """Plain x (N, K) @ W.T (K, M) -> (N, M)."""
    return Work(bytes=(n * k + m * k + n * m) * itemsize, flops=2 * n * k * m)


def copy_work(n: int, itemsize: int = F32) -> Work:
    """A copy of n elements: bytes read plus bytes written."""
    return Work(bytes=2 * n * itemsize, flops=0)


OPTIMIZER_WORK = {"adam_step": adam_work, "sgd_step": sgd_work, "adagrad_step": adagrad_work,
                  "rmsprop_step": rmsprop_work}


# ---- ceilings ---------------------------------------------------------------------------------

@dataclass
class Ceilings:
    """The device's measured copy bandwidth (bytes/s) and GEMM rate (FLOP/s), with how."""

    copy_bandwidth: float
    gemm_flops: float
    details: dict

    def floor_s(self, work: Work) -> float:
        """The roofline floor: the larger of the memory time and the compute time."""
        return max(work.bytes / self.copy_bandwidth, work.flops / self.gemm_flops)

    def to_dict(self) -> dict:
        return {"copy_bandwidth_GBps": self.copy_bandwidth / 1e9, "gemm_TFLOPs": self.gemm_flops / 1e12,
                **self.details}


def achieved(work: Work, seconds: float, ceilings: Ceilings) -> dict:
    """Achieved GB/s and TFLOP/s, their fractions of the ceilings, and the roofline fraction."""
    if seconds <= 0:
        raise ValueError(f"achieved: time must be positive, got {seconds}")
    gbps = work.bytes / seconds / 1e9
    tflops = work.flops / seconds / 1e12
    return {
        "GBps": gbps,
        "TFLOPs": tflops,
        "fraction_of_copy_bw": gbps * 1e9 / ceilings.copy_bandwidth,
        "fraction_of_gemm": tflops * 1e12 / ceilings.gemm_flops,
        "roofline_fraction": ceilings.floor_s(work) / seconds,
        "bound": "memory" if work.bytes / ceilings.copy_bandwidth >= work.flops / ceilings.gemm_flops else "compute",
    }


def measure_ceilings(bench_device, clock, *, copy_elements: int, gemm_size: int) -> Ceilings:
    """Measure copy bandwidth and GEMM rate on ``bench_device`` (a :class:`bench.device.BenchDevice`).

    Copy: every available way of copying a large buffer (a device-to-device memcpy and an
    elementwise copy kernel on the GPU; numpy's copy and, with numba, a multithreaded copy loop
    on the CPU, since the numba_cpu kernels are multithreaded), counting bytes read + written;
    the fastest is the ceiling. GEMM: an fp32 (gemm_size)^3 matmul with the run's TF32 setting.
    Each ceiling is the best time of its repeats, as STREAM reports: the rate the device can
    reach, which a busy machine lowers less than the median.

    Also measured, for the record only: an in-place add ``a += b`` (read a and b, write a).
    A CPU copy's destination lines are read before they are written (write-allocate), traffic
    the copy's byte count does not see, so in-place kernels such as the optimizer steps can
    exceed 100 % of the copy ceiling on a CPU; this figure shows by how much.
    """
    xp = bench_device.xp
    details: dict = {"copy_elements": copy_elements, "gemm_size": gemm_size, "statistic": "best of repeats"}
    src = bench_device.random_normal((copy_elements,))
    dst = bench_device.random_normal((copy_elements,))
    copies = {"array_copy": lambda: xp.copyto(dst, src)}
    copies.update(bench_device.extra_copies(dst, src))
    rates = {}
    for name, fn in copies.items():
        m = clock.measure(fn, flush=bench_device.flushes_cache)
        rates[name] = copy_work(copy_elements).bytes / m.min_s
        details[f"copy_{name}_GBps"] = rates[name] / 1e9
        details[f"copy_{name}_median_GBps"] = copy_work(copy_elements).bytes / m.median_s / 1e9
    best = max(rates, key=rates.get)
    details["copy_method"] = best
    for name, fn in bench_device.inplace_adds(dst, src).items():
        m = clock.measure(fn, flush=bench_device.flushes_cache)
        details[f"inplace_add_{name}_GBps"] = 3 * copy_elements * F32 / m.min_s / 1e9
    src = dst = copies = None  # free the copy buffers before the GEMM's (the lambdas hold them as cells)
    a = bench_device.random_normal((gemm_size, gemm_size))
    b = bench_device.random_normal((gemm_size, gemm_size))
    out = xp.empty_like(a)
    m = clock.measure(lambda: xp.matmul(a, b, out=out))
    gemm = gemm_work(gemm_size, gemm_size, gemm_size).flops / m.min_s
    details["gemm_median_TFLOPs"] = gemm_work(gemm_size, gemm_size, gemm_size).flops / m.median_s / 1e12
    a = b = out = None  # the buffers go before release()
    bench_device.release()
    return Ceilings(copy_bandwidth=rates[best], gemm_flops=gemm, details=details)
