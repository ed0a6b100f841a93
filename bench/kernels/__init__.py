"""The kernel sweep: every impl of every fused kernel, against its unfused and torch peers.

For each kernel and size (a *case*) the sweep

1. makes random inputs (never zeros) on the device;
2. computes a reference with the ``numpy`` impl on the host, on sampled rows / columns /
   elements (every kernel here is separable along them, so a sample checks exactly what it
   covers while keeping 4 GB inputs cheap to check);
3. runs each *candidate* -- each registered impl usable on this device, then the peers: the
   unfused engine path, the engine's own fused path where it adds a wrapper (optimizers,
   ``F.cross_entropy``), a plain GEMM for linear_relu, torch eager -- and checks its output
   against the reference (max error relative to the reference's largest magnitude);
   then times the candidates: on the CPU side by side, in rounds (the shared machine drifts),
   on the GPU one after the other (see ``BenchDevice.rounds``);
4. adds the ratios (vs torch, vs unfused) and the targets (on the GPU only for the impl and size
   each target names: :data:`CUDA_TARGETS`).

A candidate that cannot run (its module is not written yet, numba or torch is missing, an impl
takes no bf16 inputs yet) becomes a row whose status says why; nothing in one row can stop the others.

``--dtype bf16``: every case's inputs are bf16 (float32 samples rounded once); the reference is the
numpy impl in float32 on those inputs upcast; the engine and torch peers run inside their
autocast(bfloat16) region, as a mixed-precision training step calls them (the optimizers outside
it); byte counts use 2-byte elements; the GPU targets are issue 21's bf16 ones
(:data:`CUDA_TARGETS_LOW_PRECISION`).

The package, one module per kernel family and the machinery they share:

- common: Case, Candidate, Prepared; sampling, the error measure, impl lookup, dtype helpers.
- optim, softmax_cross_entropy, linear_relu, layer_norm, gelu, attention: each family's cases
  (inputs, numpy reference, candidates).
- run: checking and timing one case's candidates.
- targets: the vs-torch / vs-unfused ratios and the target verdicts.
- sweep: the sizes swept (:data:`SWEEPS`), kernel selection and the loop (:func:`run_sweep`).
"""

from bench.kernels.common import (
    IMPL_DEVICE, SAMPLE_ELEMENTS, SAMPLE_ROWS, Candidate, Case, Prepared, max_relative_error, sample_indices,
)
from bench.kernels.run import base_row, check_candidate, run_case, time_candidates
from bench.kernels.sweep import COMBINED, FAMILIES, SWEEPS, cases_for, run_sweep, select_kernels
from bench.kernels.targets import (
    CPU_ADAM_TARGET_SIZE, CUDA_TARGETS, CUDA_TARGETS_LOW_PRECISION, LOW_PRECISION_EXTRA_CASES, NO_TARGET_AT_SIZE,
    NO_TARGET_FOR_IMPL, GpuTarget, add_ratios, add_targets, target_status,
)
