"""Running one case: build it, check each candidate against the reference, time the checked ones."""

from __future__ import annotations

import contextlib
import traceback
from typing import Callable

from engine import kernels as kernel_registry
from bench import roofline
from bench.device import BenchDevice, Unavailable
from bench.timing import measure_interleaved
from bench.kernels.common import Candidate, Case, Prepared, first_line, max_relative_error


def check_candidate(case: Case, candidate: Candidate, bd: BenchDevice) -> tuple[dict, Prepared | None]:
    """Prepare one candidate and check it against the reference: (row, prepared or None). Never raises."""
    row = base_row(case, candidate, bd)
    region = _autocast_region(case, candidate, bd)
    try:
        with region():
            prepared = candidate.prepare()
            got = prepared.sample()
        if region is not contextlib.nullcontext:
            prepared.run = _inside(region, prepared.run)
        row.update(prepared.extra)
        if case.reference is not None:
            row["max_rel_err"] = max_relative_error(got, case.reference)
    except Unavailable as e:
        row["status"] = f"unavailable: {e}"
        return row, None
    except Exception as e:  # noqa: BLE001 - one broken candidate must not stop the sweep; the row says what broke
        if bd.low_precision and candidate.role == "impl" and isinstance(e, kernel_registry.KernelError):
            # An impl that does not take this dtype yet says so (its validator names the dtypes it takes).
            row["status"] = f"unavailable: takes no {bd.dtype.name} inputs yet: {first_line(e)}"
            return row, None
        row["status"] = f"error: {type(e).__name__}: {first_line(e)}"
        row["traceback"] = traceback.format_exc(limit=6)
        return row, None
    return row, prepared


def _autocast_region(case: Case, candidate: Candidate, bd: BenchDevice) -> Callable:
    """The region a candidate runs in: the engine's or torch's autocast for the peers of a case
    that asks for it in a bf16 run; no region for the kernel impls and plain GEMMs."""
    if bd.low_precision and case.autocast and candidate.role in ("engine", "unfused"):
        return bd.engine_autocast
    if bd.low_precision and case.autocast and candidate.role == "torch":
        return bd.torch_autocast
    return contextlib.nullcontext


def _inside(region: Callable, run: Callable) -> Callable:
    def run_inside():
        with region():
            return run()

    return run_inside


def time_candidates(case: Case, checked: list[tuple[dict, Prepared]], bd: BenchDevice,
                    ceilings: roofline.Ceilings) -> None:
    """Time the checked candidates side by side (``bd.rounds`` rounds) and fill their rows."""
    measurements = measure_interleaved([(prepared.clock, prepared.run) for _, prepared in checked],
                                       rounds=bd.rounds, flush=case.flush, before=bd.settle)
    for (row, _), m in zip(checked, measurements):
        if isinstance(m, Exception):
            row["status"] = f"error: {type(m).__name__}: {first_line(m)}"
        else:
            row.update(status="ok", **m.to_dict(), **roofline.achieved(case.work, m.median_s, ceilings))


def base_row(case: Case, candidate: Candidate, bd: BenchDevice) -> dict:
    return {
        "kernel": case.kernel, "case": case.label, "params": case.params, "size": case.size,
        "impl": candidate.name, "role": candidate.role, "device": bd.kind,
        "dtype": case.params.get("dtype", bd.dtype.name), "status": "pending",
        "bytes": case.work.bytes, "flops": case.work.flops, "flushed_cache": case.flush,
        "reference": case.reference_note, "max_rel_err": None,
        "median_s": None, "spread": None, "min_s": None, "max_s": None, "q25_s": None, "q75_s": None,
        "repeats": 0, "host_median_s": None, "GBps": None, "TFLOPs": None, "fraction_of_copy_bw": None,
        "fraction_of_gemm": None, "roofline_fraction": None, "bound": None,
        "vs_torch": None, "vs_torch_peer": None, "vs_unfused": None, "vs_unfused_peer": None, "target": "",
    }


def run_case(build, kernel, bd, ceilings, progress) -> list[dict]:
    try:
        case = build()
    except Exception as e:  # noqa: BLE001 - input construction failed (e.g. out of memory): one error row
        progress.note(f"{kernel}: case setup failed: {type(e).__name__}: {first_line(e)}")
        return [{"kernel": kernel, "case": "setup", "impl": "-", "role": "impl", "status":
                 f"error: {type(e).__name__}: {first_line(e)}", "target": ""}]
    rows = []
    # Candidates are timed in groups side by side: all of them together on the CPU, one at a
    # time on the GPU (see BenchDevice.rounds); a group is dropped before the next is built.
    size = len(case.candidates) if bd.rounds > 1 else 1
    for start in range(0, len(case.candidates), size):
        checked = []
        for candidate in case.candidates[start:start + size]:
            progress.working(f"{case.kernel} {case.label} {candidate.name}")
            row, prepared = check_candidate(case, candidate, bd)
            rows.append(row)
            if prepared is not None:
                checked.append((row, prepared))
        progress.working(f"{case.kernel} {case.label}: timing {len(checked)} candidates")
        time_candidates(case, checked, bd, ceilings)
        del checked
        bd.synchronize()
    if "gemm_work" in case.extra:
        for row in rows:
            row["gemm_flops_same_shape"] = case.extra["gemm_work"].flops
    return rows
