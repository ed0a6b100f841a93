"""``python -m bench.comm``: all-reduce bandwidth and DDP step time for the backend at hand.

    python -m bench.comm -n 2                      # CPU: MPI backend, 2 ranks
    python -m bench.comm -n 1 --backend nccl       # one GPU: NCCL with world size 1
    python -m bench --comm 2 ...                   # the same, as part of the full bench

Two measurements, each in its own ``mpiexec`` launch (this command launches them):

- all-reduce over message sizes: median time of an in-place sum, reported as nccl-tests do:
  ``algbw = bytes / time`` and ``busbw = algbw * 2 (W - 1) / W`` (the bytes a ring all-reduce moves
  per rank, so figures compare across world sizes; with W = 1 busbw is 0 by definition).
- DDP step: forward + backward + SGD step of an MLP (about 3.2 M parameters, 12.6 MB of float32
  gradients) with batch B per rank, at W ranks under DistributedDataParallel and in one process
  without it, plus the time of one blocking all-reduce of all the gradients. ``hidden`` = the part
  of that communication time that did not add to the step: 1 - (t_ddp - t_single) / t_comm.
  DDP runs with bucket_cap_mb=4 here (4 buckets), so that there is something to overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {"quick": [2 ** k for k in range(12, 25, 2)], "full": [2 ** k for k in range(10, 27)]}  # bytes


def _timeit(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def worker(mode: str, part: str, batch: int) -> None:
    """Runs on every rank (inside mpiexec); rank 0 prints one JSON line."""
    import numpy as np

    import engine
    import engine.distributed as dist
    from engine import nn
    from engine.nn.parallel import DistributedDataParallel

    backend = os.environ.get("BENCH_COMM_BACKEND") or None
    if backend == "nccl":
        engine.set_default_device("cuda")
    dist.init_process_group(backend)
    group = dist.core.group()
    w, rank = group.size, group.rank
    device = engine.default_device()
    xp = engine.backend.xp_for(device)

    def sync():
        engine.synchronize(device)
        group.barrier()

    out = {"world_size": w, "backend": group.name, "device": str(device)}
    if part in ("allreduce", "all"):
        rows = []
        for nbytes in SIZES[mode]:
            buf = xp.ones(nbytes // 4, dtype=np.float32)
            repeats = 20 if nbytes <= 2 ** 20 else 5
            group.all_reduce(buf, "sum")  # warm-up
            t = _timeit(lambda: group.all_reduce(buf, "sum"), repeats, sync)
            algbw = nbytes / t
            rows.append({"bytes": nbytes, "time_us": t * 1e6, "algbw_GBps": algbw / 1e9,
                         "busbw_GBps": algbw * 2 * (w - 1) / w / 1e9})
        out["allreduce"] = rows
    if part in ("ddp", "all"):
        engine.manual_seed(0)
        model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                              nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).to(device)
        params = sum(p.numel() for p in model.parameters())
        x = engine.randn(batch, 1024, device=device)
        y = engine.randint(0, 10, (batch,), device=device)
        loss_fn = nn.CrossEntropyLoss()
        wrapped = DistributedDataParallel(model, bucket_cap_mb=4) if w > 1 else model
        opt = engine.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            loss_fn(wrapped(x), y).backward()
            opt.step()

        for _ in range(3):
            step()
        out["ddp"] = {"params": params, "batch_per_rank": batch, "step_ms": _timeit(step, 10, sync) * 1e3}
        if w > 1:
            out["ddp"]["buckets"] = wrapped.stats["buckets"]
            flat = xp.ones(params, dtype=np.float32)
            out["ddp"]["allreduce_all_grads_ms"] = _timeit(lambda: group.all_reduce(flat, "avg"), 10, sync) * 1e3
    if rank == 0:
        print("BENCH_COMM " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def _launch(n: int, mode: str, part: str, batch: int, backend: str | None) -> dict:
    from engine.distributed.run import find_mpiexec, launch_env

    mpiexec = find_mpiexec()
    if mpiexec is None and n > 1:
        from engine.errors import install_hint

        raise SystemExit(f"bench.comm: mpiexec not found; {install_hint('distributed', 'mpi4py mpich')}")
    env = launch_env(dict(os.environ))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                      env.get("PYTHONPATH", "")]))
    if backend:
        env["BENCH_COMM_BACKEND"] = backend
    launcher = [mpiexec, "-n", str(n)] if mpiexec is not None else []  # one rank: mpi4py's singleton
    cmd = [*launcher, sys.executable, "-m", "bench.comm", "--worker", "--mode", mode, "--part", part,
           "--batch", str(batch)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_COMM "):
            return json.loads(line[len("BENCH_COMM "):])
    raise SystemExit(f"bench.comm: {' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def run(n: int, mode: str = "quick", batch: int = 64, backend: str | None = None) -> dict:
    """All-reduce sweep and DDP step at ``n`` ranks, and the one-process DDP baseline."""
    result = _launch(n, mode, "all", batch, backend)
    single = _launch(1, mode, "ddp", batch, backend)
    ddp = result["ddp"]
    ddp["single_process_step_ms"] = single["ddp"]["step_ms"]
    comm = ddp.get("allreduce_all_grads_ms")
    if comm:
        ddp["hidden"] = 1 - (ddp["step_ms"] - ddp["single_process_step_ms"]) / comm
    return result


def table(result: dict) -> str:
    lines = [f"all-reduce, {result['backend']} backend, {result['world_size']} ranks on {result['device']}",
             f"{'bytes':>10} {'time us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}"]
    for row in result["allreduce"]:
        lines.append(f"{row['bytes']:>10} {row['time_us']:>10.1f} {row['algbw_GBps']:>11.3f} {row['busbw_GBps']:>11.3f}")
    d = result["ddp"]
    lines.append(f"DDP step, {d['params']:,} params, batch {d['batch_per_rank']} per rank: "
                 f"{d['step_ms']:.1f} ms at {result['world_size']} ranks vs {d['single_process_step_ms']:.1f} ms "
                 "in one process")
    if "allreduce_all_grads_ms" in d:
        lines.append(f"  all-reduce of all gradients alone: {d['allreduce_all_grads_ms']:.1f} ms "
                     f"({d['buckets']} buckets); hidden by backward: {d['hidden']:.0%}")
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m bench.comm", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--backend", choices=("mpi", "nccl"), help="default: nccl on a GPU, else mpi")
    p.add_argument("--full", action="store_true", help="sizes 1 KiB .. 64 MiB (default: 4 KiB .. 16 MiB)")
    p.add_argument("--batch", type=int, default=64, help="DDP batch per rank")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="quick", help=argparse.SUPPRESS)
    p.add_argument("--part", default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.mode, args.part, args.batch)
        return None
    result = run(args.n, "full" if args.full else "quick", args.batch, args.backend)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
