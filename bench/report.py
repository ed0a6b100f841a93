"""What a run reports: progress lines, the terminal table, JSON, Markdown and an optional plot.

The JSON holds every figure of every row plus the environment (device, driver, CUDA, library
versions, thread counts, clocks where readable) and the settings; the Markdown and the terminal
table are views of it.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.device import BenchDevice, cpu_model
from engine import backend

# ---- environment ------------------------------------------------------------------------------


def environment(bd: BenchDevice) -> dict:
    """Where and with what the figures were taken."""
    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": bd.kind,
        "device_name": bd.name(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_mhz": _cpu_mhz(),
        "load_average_1_5_15min": _load_average(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "versions": library_versions(),
        "threads": thread_counts(bd),
        "tf32": {"enabled": bd.tf32, "engine_float32_matmul_precision": backend.get_float32_matmul_precision(),
                 "torch_allow_tf32": None if bd.torch is None or bd.kind != "cuda"
                 else bool(bd.torch.backends.cuda.matmul.allow_tf32)},
        "torch": "available" if bd.torch is not None else bd.torch_reason,
    }
    if bd.kind == "cuda":
        env["gpu"] = gpu_info(bd)
    return env


def library_versions() -> dict:
    versions = {}
    for module in ("numpy", "numba", "cupy", "torch", "threadpoolctl", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            versions[module] = "not installed"
            continue
        try:
            versions[module] = getattr(importlib.import_module(module), "__version__", "unknown")
        except Exception as e:  # noqa: BLE001 - a broken optional library is reported, not fatal
            versions[module] = f"import failed: {type(e).__name__}"
    for dist in ("numba-cuda",):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def thread_counts(bd: BenchDevice) -> dict:
    """BLAS threads (threadpoolctl when installed), numba's and torch's thread counts."""
    threads: dict = {"env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                          "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER",
                                                          "OMP_WAIT_POLICY", "KMP_BLOCKTIME",
                                                          "OPENBLAS_THREAD_TIMEOUT") if k in os.environ}}
    try:
        from threadpoolctl import threadpool_info

        blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        threads["blas"] = [{"library": p.get("internal_api"), "num_threads": p.get("num_threads"),
                            "file": os.path.basename(p.get("filepath", ""))} for p in blas]
    except ImportError:
        threads["blas"] = "unknown (threadpoolctl not installed)"
    try:
        import numba

        threads["numba"] = numba.get_num_threads()
        try:
            threads["numba_threading_layer"] = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            threads["numba_threading_layer"] = "not initialized"
    except ImportError:
        threads["numba"] = "numba not installed"
    threads["torch"] = bd.torch.get_num_threads() if bd.torch is not None else bd.torch_reason
    return threads


def gpu_info(bd: BenchDevice) -> dict:
    runtime = bd.xp.cuda.runtime
    props = runtime.getDeviceProperties(bd.device.index)
    info = {
        "driver_version": runtime.driverGetVersion(),
        "cuda_runtime_version": runtime.runtimeGetVersion(),
        "compute_capability": f"{props.get('major')}.{props.get('minor')}",
        "sm_count": props.get("multiProcessorCount"),
        "memory_bytes": props.get("totalGlobalMem"),
        "l2_bytes": props.get("l2CacheSize"),
        "memory_bus_width_bits": props.get("memoryBusWidth"),
    }
    for key in ("clockRate", "memoryClockRate"):  # kHz; absent from CUDA 13's device properties
        if props.get(key):
            info[f"{key}_kHz"] = props[key]
    info["nvidia_smi"] = _nvidia_smi(bd.device.index)
    return info


def _nvidia_smi(index: int) -> dict | str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found"
    fields = "name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run([exe, f"--id={index}", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {type(e).__name__}"
    return dict(zip(fields.split(","), (v.strip() for v in out.split(","))))


def _cpu_mhz() -> float | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return None


def _load_average() -> list[float] | None:
    """The machine's load (other processes compete for the cores the CPU figures use)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _git_commit() -> str | None:
    git = shutil.which("git")
    if git is None:
        return None
    try:
        out = subprocess.run([git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# ---- formatting -------------------------------------------------------------------------------

def fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def fmt_num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def fmt_ratio(value, note) -> str:
    if value is None:
        return "n/a" if note else "-"
    return f"{value:.2f}x"


def fmt_err(value) -> str:
    return "-" if value is None else f"{value:.1e}"


def _status(row: dict) -> str:
    if row.get("status") == "ok":
        return row.get("target") or ""
    return row.get("status", "")


KERNEL_COLUMNS = ("case", "impl", "time", "spread", "GB/s", "%BW", "TFLOP/s", "%GEMM", "roofline", "max rel err",
                  "vs torch", "vs unfused", "target / status")


def kernel_cells(row: dict) -> list[str]:
    return [row.get("case", ""), row.get("impl", ""), fmt_time(row.get("median_s")),
            "-" if row.get("spread") is None else f"±{row['spread'] / 2:.1%}",
            fmt_num(row.get("GBps")), fmt_pct(row.get("fraction_of_copy_bw")), fmt_num(row.get("TFLOPs")),
            fmt_pct(row.get("fraction_of_gemm")), fmt_pct(row.get("roofline_fraction")), fmt_err(row.get("max_rel_err")),
            fmt_ratio(row.get("vs_torch"), row.get("vs_torch_peer")), fmt_ratio(row.get("vs_unfused"), None),
            _status(row)]


E2E_COLUMNS = ("model", "batch", "impl", "load", "step time", "spread", "host/device", "samples/s", "TFLOP/s",
               "%GEMM", "loss err step 1 / 3", "vs torch", "slowdown", "target / status")


def e2e_cells(row: dict) -> list[str]:
    return [row["model"], str(row["batch"]), row["impl"], str(row.get("load", 0)), fmt_time(row.get("median_s")),
            "-" if row.get("spread") is None else f"±{row['spread'] / 2:.1%}",
            fmt_pct(row.get("host_over_device")), fmt_num(row.get("samples_per_s")), fmt_num(row.get("TFLOPs")),
            fmt_pct(row.get("fraction_of_gemm")),
            f"{fmt_err(row.get('loss_rel_err'))} / {fmt_err(row.get('loss_step3_rel_err'))}",
            fmt_ratio(row.get("vs_torch"), row.get("vs_torch_peer")),
            "-" if row.get("slowdown") is None else f"{row['slowdown']:.2f}x", _status(row)]


# ---- progress and the terminal table ----------------------------------------------------------

class Progress:
    """Prints one line per finished row (and, on a terminal, what is running now)."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.count = 0
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()

    def working(self, what: str) -> None:
        if self.live and not self.quiet:
            self.stream.write(f"\r\033[K  ... {what}")
            self.stream.flush()

    def note(self, text: str) -> None:
        if not self.quiet:
            self._clear()
            print(f"  {text}", file=self.stream, flush=True)

    def row_done(self, row: dict) -> None:
        self.count += 1
        if self.quiet:
            return
        self._clear()
        if "model" in row:
            cells = [row["model"], f"batch={row['batch']}", row["impl"], fmt_time(row.get("median_s")),
                     f"vs torch {fmt_ratio(row.get('vs_torch'), row.get('vs_torch_peer'))}",
                     _status(row) or "ok"]
        else:
            cells = [row.get("kernel", ""), row.get("case", ""), row.get("impl", ""), fmt_time(row.get("median_s")),
                     f"{fmt_num(row.get('GBps'))} GB/s", f"{fmt_num(row.get('TFLOPs'))} TFLOP/s",
                     f"err {fmt_err(row.get('max_rel_err'))}", _status(row)]
        print(f"[{self.count:3d}] " + "  ".join(c for c in cells if c), file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")


def text_table(columns, rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(columns, *rows)] if rows else [len(c) for c in columns]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in rows)])


class OtherProcesses:
    """How much CPU other processes used while the benchmark ran (Linux /proc/stat).

    The machine-wide busy time minus this process's own CPU time, over the wall time: 0.8 means
    other processes kept 0.8 cores busy on average. On a 2-core machine that is enough to make
    multithreaded rows (numba parallel loops, BLAS, torch's OpenMP) wait at every barrier.
    """

    def __init__(self):
        self._start = self._snapshot()

    @staticmethod
    def _snapshot():
        import resource

        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # all but idle and iowait
        own = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.ru_utime + own.ru_stime

    def cores_used(self) -> float | None:
        end = self._snapshot()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        wall = end[0] - self._start[0]
        others = (end[1] - self._start[1]) - (end[2] - self._start[2])
        return max(0.0, others / wall)


def load_warning(result: dict) -> str | None:
    """A warning when other processes kept the CPU busy during a CPU run (figures unreliable)."""
    env, settings = result["environment"], result["settings"]
    others = settings.get("other_processes_cores")
    if env["device"] != "cpu" or others is None or others < 0.25:
        return None
    return (f"the machine was busy: other processes kept {others:.1f} of its {env.get('cpu_count')} cores busy on "
            "average during this run, so the CPU figures are pessimistic and noisy, multithreaded rows most of all")


def terminal_report(result: dict) -> str:
    env, ceil = result["environment"], result["ceilings"]
    parts = [f"device: {env['device_name']} ({env['device']}), {result['settings']['mode']} mode, "
             f"{_dtype_note(result)}TF32 {'on' if env['tf32']['enabled'] else 'off'}",
             f"ceilings: copy {ceil['copy_bandwidth_GBps']:.1f} GB/s ({ceil['copy_method']}), "
             f"GEMM {ceil['gemm_TFLOPs']:.3f} TFLOP/s (fp32 {ceil['gemm_size']}^3)"]
    warning = load_warning(result)
    if warning:
        parts.insert(0, f"WARNING: {warning}")
    for kernel, rows in group_by_kernel(result["kernels"]).items():
        parts.append(f"\n{kernel}")
        parts.append(text_table(KERNEL_COLUMNS, [kernel_cells(r) for r in rows]))
    if result["end_to_end"]:
        parts.append("\nend to end (training step: forward + backward + Adam; gpt-decode: one generated token)")
        parts.append(text_table(E2E_COLUMNS, [e2e_cells(r) for r in result["end_to_end"]]))
    return "\n".join(parts)


def _dtype_note(result: dict) -> str:
    """'' in a float32 run; in a bf16 run, what ran in bf16 and what the GEMM ceiling is."""
    dtype = result["settings"].get("dtype", "float32")
    if dtype == "float32":
        return ""
    return (f"dtype {dtype} (kernel inputs in {dtype}; the engine and torch peers and the training steps under "
            f"autocast({dtype}); errors against a float32 reference; %GEMM against the fp32 GEMM ceiling); ")


def group_by_kernel(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row.get("kernel", "?"), []).append(row)
    return groups


# ---- files ------------------------------------------------------------------------------------

def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def markdown_table(columns, rows: list[list[str]]) -> str:
    escape = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    env, ceil, settings = result["environment"], result["ceilings"], result["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v != "not installed")
    lines = [
        f"# Benchmark: {env['device_name']} ({env['device']}), {settings['mode']} mode",
        "",
        f"- date (UTC): {env['date_utc']}; commit {env['git_commit']}; command: `{settings['command']}`",
        f"- {env['cpu_count']} CPU cores ({env['cpu_model']}); python {env['python']}; {versions}",
        f"- threads: {json.dumps(env['threads'], default=str)}",
        f"- {_dtype_note(result)}TF32: {'on' if env['tf32']['enabled'] else 'off'}; torch: {env['torch']}",
        f"- ceilings measured in this run: copy bandwidth **{ceil['copy_bandwidth_GBps']:.1f} GB/s** "
        f"({ceil['copy_method']}, bytes read + written), fp32 GEMM **{ceil['gemm_TFLOPs']:.3f} TFLOP/s** "
        f"({ceil['gemm_size']}^3)",
        f"- timing: {settings['timing']}",
        "",
        "Columns: time = median per call (spread = half the interquartile range); %BW = achieved GB/s over the "
        "copy ceiling; %GEMM = achieved TFLOP/s over the GEMM ceiling; roofline = floor time "
        "(max(bytes/BW, FLOPs/GEMM)) over measured time; max rel err = max |x - ref| / max |ref| against the "
        "numpy impl; vs torch / vs unfused = peer time / this time (> 1: this row is faster); target / status = "
        "met or missed where a target applies (on the GPU: only at the impl and size it names), '- (why)' where "
        "none does, the error where the row did not run.",
    ]
    if env.get("gpu"):
        lines.insert(3, f"- GPU: {json.dumps(env['gpu'], default=str)}")
    warning = load_warning(result)
    if warning:
        lines.insert(2, f"> **{warning}**")
        lines.insert(3, "")
    for kernel, rows in group_by_kernel(result["kernels"]).items():
        lines += ["", f"## {kernel}", "", markdown_table(KERNEL_COLUMNS, [kernel_cells(r) for r in rows])]
    if result["end_to_end"]:
        lines += ["", "## End to end: training step (forward + backward + Adam; gpt-decode: one generated token)", "",
                  f"torch's Adam: {result['settings'].get('torch_adam', '-')}; host/device = host time to issue a "
                  "step over its device time (GPU only; >= 100% means the step waits on Python).", "",
                  markdown_table(E2E_COLUMNS, [e2e_cells(r) for r in result["end_to_end"]])]
    return "\n".join(lines) + "\n"


def write_markdown(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_report(result))


def write_plot(result: dict, path: str | Path) -> str:
    """GB/s (memory-bound kernels) or TFLOP/s (GEMMs) vs size per impl, with the ceiling line.

    Returns what was done (matplotlib is optional: without it nothing is written).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib not installed"
    groups = {k: [r for r in rows if r.get("status") == "ok"] for k, rows in group_by_kernel(result["kernels"]).items()}
    groups = {k: rows for k, rows in groups.items() if rows}
    if not groups:
        return "plot skipped: no measured rows"
    ceil = result["ceilings"]
    cols = min(3, len(groups))
    fig, axes = plt.subplots((len(groups) + cols - 1) // cols, cols, figsize=(5.5 * cols, 4 * ((len(groups) + cols - 1) // cols)),
                             squeeze=False)
    for ax, (kernel, rows) in zip(axes.flat, groups.items()):
        compute = kernel.startswith("linear_relu")
        key, ceiling, unit = ("TFLOPs", ceil["gemm_TFLOPs"], "TFLOP/s") if compute else \
            ("GBps", ceil["copy_bandwidth_GBps"], "GB/s")
        for impl in dict.fromkeys(r["impl"] for r in rows):
            points = sorted((r["size"], r[key]) for r in rows if r["impl"] == impl)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
        ax.axhline(ceiling, color="black", linestyle="--", label=f"measured ceiling {ceiling:.3g}")
        ax.set_xscale("log")
        ax.set_title(kernel)
        ax.set_xlabel("N*K*M" if compute else ("N*C" if kernel == "softmax_cross_entropy" else "parameters"))
        ax.set_ylabel(unit)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.suptitle(f"{result['environment']['device_name']} ({result['settings']['mode']})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"
