"""``python -m bench``: kernel microbenchmarks, roofline ceilings and training steps vs torch.

Examples:
    python -m bench --quick                      # about a minute on a 2-core CPU
    python3 -m bench --device cuda --json bench/results/gpu.json --markdown bench/results/gpu.md
    python -m bench --kernel adam_step --skip-e2e --device cpu
    python -m bench --dtype bf16 --quick           # bf16 inputs; the peers and training steps under autocast
    python -m bench --device cpu --skip-kernels --model gpt mlp --load 1   # steps, alone and beside 1 busy process
    python -m bench --device cpu --skip-kernels --model gpt-decode       # one token with the KV cache, vs torch
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Per mode: the clock's settings and the ceiling sizes. GPU budgets are per measurement and
# keep the full sweep inside 8 minutes; CPU budgets keep --quick near a minute on 2 cores, and
# so does its shorter pause between samples (0.3 s by default, three samples per candidate).
SETTINGS = {
    ("cuda", "full"): dict(clock=dict(budget_s=0.15, warmup=3, min_repeats=10, max_repeats=300),
                           copy_elements=2**28, gemm_size=8192),
    ("cuda", "quick"): dict(clock=dict(budget_s=0.05, warmup=3, min_repeats=5, max_repeats=100),
                            copy_elements=2**26, gemm_size=4096),
    ("cpu", "full"): dict(clock=dict(budget_s=0.4, warmup=2, min_repeats=3, max_repeats=100),
                          copy_elements=2**26, gemm_size=2048),
    ("cpu", "quick"): dict(clock=dict(budget_s=0.08, warmup=2, min_repeats=3, max_repeats=50),
                           copy_elements=2**25, gemm_size=1024, settle_s=0.1),
    ("cpu", "tiny"): dict(clock=dict(budget_s=0.005, warmup=1, min_repeats=2, max_repeats=5),
                          copy_elements=2**20, gemm_size=128, settle_s=0.0),
}
SETTINGS[("cuda", "tiny")] = SETTINGS[("cpu", "tiny")]

DTYPES = {"float32": "float32", "bf16": "bfloat16"}  # --dtype -> numpy's name (ml_dtypes' bfloat16)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweep (about a minute on a 2-core CPU)")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; the figures mean nothing)")
    p.add_argument("--kernel", nargs="+", metavar="NAME", action="extend",
                   help="only these kernels (a prefix such as linear_relu selects forward and backward)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="PATH", help="write every figure and the environment as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    p.add_argument("--plot", metavar="PATH", help="write GB/s (TFLOP/s) vs size per impl (needs matplotlib)")
    p.add_argument("--skip-e2e", action="store_true", help="skip the training-step benchmarks")
    p.add_argument("--skip-kernels", action="store_true", help="skip the kernel rows (ceilings and training steps only)")
    p.add_argument("--model", nargs="+", choices=("mlp", "wide", "gpt", "gpt-decode"), action="extend",
                   help="only these end-to-end models (default: every one of the mode); gpt-decode: one "
                        "generated token with the KV cache, batch 1")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="also time every training step beside N busy neighbour processes (pure-Python spin "
                        "loops, bench/load.py), next to the same step without them (default 0: no neighbours)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 GEMMs (torch and cupy); default off")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="the kernels' input dtype; bf16 also runs the engine and torch peers and the training "
                        "steps inside autocast(bfloat16) (default float32)")
    p.add_argument("--no-torch", action="store_true", help="leave torch out even if installed")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for every pool (BLAS, numba, torch); default: each library's own")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no final table")
    p.add_argument("--comm", type=int, metavar="W",
                   help="also run bench.comm on W ranks (all-reduce busbw, DDP step vs one process)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Run the benchmark described by ``argv``; return the result (also written where asked)."""
    args = parse_args(argv)
    if args.load < 0:
        raise SystemExit(f"bench: --load must be >= 0 busy neighbours, got {args.load}")
    if args.threads is not None:
        limit_threads(args.threads)
    from bench import end_to_end, kernels as kernel_bench, report, roofline
    from bench.device import BenchDevice
    from engine import backend

    kind = args.device or ("cuda" if backend.cuda_available() else "cpu")
    if kind == "cuda" and not backend.cuda_available():
        raise SystemExit("bench: --device cuda asked for, but no CUDA device answers here (cupy missing or "
                         "no GPU/driver); use --device cpu")
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    settings = SETTINGS[(kind, mode)]
    names = kernel_bench.select_kernels(args.kernel)
    backend.manual_seed(0)
    started = time.perf_counter()
    load_at_start = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    others = report.OtherProcesses()
    progress = report.Progress(quiet=args.quiet)
    bd = BenchDevice(kind, settings["clock"], tf32=args.tf32, use_torch=not args.no_torch,
                     settle_s=settings.get("settle_s", 0.3), dtype=DTYPES[args.dtype])
    progress.note(f"bench: {bd.name()} ({kind}), {mode} mode, {bd.dtype.name}, kernels: {', '.join(names)}")
    ceilings = roofline.measure_ceilings(bd, bd.clock, copy_elements=settings["copy_elements"],
                                         gemm_size=settings["gemm_size"])
    progress.note(f"ceilings: copy {ceilings.copy_bandwidth / 1e9:.1f} GB/s, GEMM {ceilings.gemm_flops / 1e12:.3f} TFLOP/s")
    kernel_rows = [] if args.skip_kernels else kernel_bench.run_sweep(bd, ceilings, names, mode, progress)
    e2e_rows = [] if args.skip_e2e else end_to_end.run_end_to_end(bd, ceilings, mode, progress, load=args.load,
                                                                  models=args.model)
    result = {
        "schema": 1,
        "environment": report.environment(bd),
        "settings": {
            "mode": mode, "device": kind, "kernels": names, "threads": args.threads, "skip_e2e": args.skip_e2e, "tf32": args.tf32,
            "dtype": bd.dtype.name,
            "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "clock": settings["clock"],
            "timing": ("CUDA events per call, read after one final sync; L2 flushed (2x L2 written, then read) "
                       "before each call of memory-bound kernels" if kind == "cuda" else
                       "perf_counter per call; warm caches (only the 10M-parameter and larger cases exceed L3)")
            + f"; warm-up {settings['clock']['warmup']}, {settings['clock']['min_repeats']}-"
              f"{settings['clock']['max_repeats']} repeats within {settings['clock']['budget_s']} s per row"
            + ("" if kind == "cuda" else f"; {settings.get('settle_s', 0.3)} s pause before each timed sample "
               "(idle OpenMP / OpenBLAS workers spin for a while after a call)"),
            "torch_adam": end_to_end.describe_torch_optimizer(bd),
            "cpu_adam_target_size": kernel_bench.CPU_ADAM_TARGET_SIZE[mode],
            "load_average_at_start": load_at_start,
            "load": {"neighbours": args.load, "neighbour": load_description(),
                     "applies_to": "training-step rows with load > 0 (each also timed without)"},
            "other_processes_cores": others.cores_used(),
        },
        "ceilings": ceilings.to_dict(),
        "kernels": kernel_rows,
        "end_to_end": e2e_rows,
        "wall_s": time.perf_counter() - started,
    }
    if args.comm:
        from bench import comm

        result["comm"] = comm.run(args.comm, "full" if mode == "full" else "quick")
        if not args.quiet:
            print(comm.table(result["comm"]))
        result["wall_s"] = time.perf_counter() - started
    _write_outputs(result, args, report)
    return result


def load_description() -> str:
    from bench.load import DESCRIPTION

    return DESCRIPTION


def limit_threads(n: int) -> None:
    """Give every CPU thread pool ``n`` threads: BLAS, OpenMP, numba and torch.

    The environment variables work when set before numpy, numba and torch load (the CLI); the
    runtime calls cover libraries already loaded.
    """
    if n < 1:
        raise SystemExit(f"bench: --threads must be >= 1, got {n}")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(n)
    import engine

    engine.set_num_threads(n)  # the engine's one owner of the BLAS and numba counts (kernels/threads.py)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def _write_outputs(result: dict, args, report) -> None:
    if not args.quiet:
        print(report.terminal_report(result))
        print(f"\n{len(result['kernels'])} kernel rows, {len(result['end_to_end'])} end-to-end rows "
              f"in {result['wall_s']:.0f} s")
    if args.json:
        report.write_json(result, args.json)
    if args.markdown:
        report.write_markdown(result, args.markdown)
    if args.plot:
        print(report.write_plot(result, args.plot), file=sys.stderr)


if __name__ == "__main__":
    main()
