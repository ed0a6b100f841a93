"""What the end-to-end training-step rows share: the MLP rows of bench/end_to_end.py and the GPT
rows of bench/gpt_step.py build their rows and their CUDA-graph variants here, so neither module
imports the other's internals (end_to_end imports gpt_step, nothing imports back)."""

from __future__ import annotations

from bench.device import BenchDevice, Unavailable


def captured(build):
    """The variant of ``build`` (an engine step builder taking ``capturable``) whose step is captured
    in one CUDA graph (engine.cuda): the first call runs the step eagerly on a side stream (the
    warm-up: kernels compiled, the optimizer's state and device scalars made), the second captures
    it and replays it, every later call replays it. The three loss checks of ``end_to_end._run_config`` then
    compare steps 1 to 3 with the eager variants' steps 1 to 3. On the CPU there is no graph: the
    row is reported unavailable."""
    def build_captured(bd: BenchDevice, weights, x, y):
        if bd.kind != "cuda":
            raise Unavailable("a CUDA graph captures GPU work; this run is on the CPU")
        step, loss_value = build(bd, weights, x, y, capturable=True)
        return graph_replays(step), loss_value

    build_captured.__name__ = f"captured_{build.__name__}"
    return build_captured


def graph_replays(step):
    """``step`` as a closure that warms up, then captures once and replays (see :func:`captured`)."""
    import engine

    held = {}

    def replay():
        if "graph" not in held:
            if "warm" not in held:
                side = engine.cuda.Stream()
                side.wait_stream(engine.cuda.current_stream())
                with engine.cuda.stream(side):
                    loss = step()
                engine.cuda.current_stream().wait_stream(side)
                held["warm"] = True
                return loss
            graph = engine.cuda.CUDAGraph()
            with engine.cuda.graph(graph):
                held["loss"] = step()
            held["graph"] = graph
        held["graph"].replay()
        return held["loss"]  # the graph's static output, overwritten by the next replay

    return replay


def step_row(model_name, layers, batch, name, bd, *, params: int, flops: int) -> dict:
    """A training-step row with every column, before it is measured."""
    return {
        "model": model_name, "layers": list(layers), "batch": batch, "impl": name, "device": bd.kind,
        "dtype": bd.dtype.name,
        "status": "pending", "params": params, "flops": flops,
        "median_s": None, "spread": None, "host_median_s": None, "host_over_device": None, "repeats": 0,
        "samples_per_s": None, "TFLOPs": None, "fraction_of_gemm": None, "loss_step1": None,
        "loss_step3": None, "loss_rel_err": None, "loss_step3_rel_err": None, "vs_torch": None, "vs_torch_peer": None,
        "target": "", "load": 0, "slowdown": None,
    }
