"""``Trainer(cuda_graph=True)``: the whole training step captured in one CUDA graph, replayed per batch.

The step captured is the Trainer's own (engine/train/trainer.py, ``Trainer._train_step``): zero
the gradients (to None, so the graph makes them afresh at every replay), forward and loss under
the precision's autocast, backward (scaled by the GradScaler with "16-mixed"), clipping, the NaN
guard's device flag, the optimizer step and the scaler's update. Everything it decides is on the
device: the optimizer reads its learning rate and step counts there (``capturable=True``), the
GradScaler skips a step with inf/NaN gradients there, the guard's flag is read at the Trainer's
next sync.

The first ``warmup`` batches (counted over the run) go through the eager step on a side stream,
as PyTorch's recipe does: they create the optimizer's states and device scalars, the scaler's
scale and cupy's kernel caches, none of which may be created inside a capture. The next batch is
copied into static input tensors, the step is captured, and every later batch of the same shapes
and dtypes is copied into the static inputs and replayed. The last batch of an epoch, when it is
shorter, runs eagerly (no graph is captured for it); a shape change anywhere else raises a
CaptureError naming both shapes.
"""

from __future__ import annotations

from engine import backend
from engine.autograd import no_grad
from engine.backend import CaptureError
from engine.errors import DeviceError


def check_setup(trainer) -> None:
    """Raise unless ``trainer`` can capture its step: a CUDA model, capturable optimizer, no
    gradient accumulation and no data parallelism."""
    where = "Trainer(cuda_graph=True)"
    if trainer.device.type != "cuda":
        raise DeviceError(f"{where}: a CUDA graph captures GPU work, but the model is on {trainer.device}; "
                          "move the model to 'cuda' (before building the optimizer), or leave cuda_graph=False on "
                          "the CPU, where there is no graph to capture")
    groups = getattr(trainer.optimizer, "param_groups", [])
    if not getattr(trainer.optimizer, "_supports_capturable", False) or not all(
            g.get("capturable", False) for g in groups):
        raise ValueError(f"{where}: the optimizer must be an engine optimizer built with capturable=True (Adam, "
                         f"AdamW or SGD), so that the captured step reads its learning rate and step counts from "
                         f"device memory; got {type(trainer.optimizer).__name__} without it")
    if trainer.accumulate_steps != 1:
        raise ValueError(f"{where}: gradient accumulation (accumulate_steps={trainer.accumulate_steps}) is not "
                         "captured; use accumulate_steps=1 or cuda_graph=False")
    if trainer.distributed:
        raise ValueError(f"{where}: data-parallel training is not captured (its all-reduce runs between "
                         "backward and step on the host's schedule); use cuda_graph=False")


class GraphedStep:
    """The captured training step of one Trainer (see the module docstring)."""

    def __init__(self, trainer, warmup: int):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"Trainer: cuda_graph_warmup must be a positive int, got {warmup!r}")
        self.trainer, self.warmup = trainer, warmup
        self.reset()

    def reset(self) -> None:
        """Drop the graph (the optimizer's buffers were replaced, a checkpoint was loaded): the next
        batches warm up and capture again."""
        self.eager_steps = 0
        self.graph = self.static_x = self.static_y = None
        self.static_loss = self.static_output = self.static_flag = None
        self._side_stream = None

    def warming_up(self) -> bool:
        return self.graph is None and self.eager_steps < self.warmup

    def warmup_stream(self):
        """The side stream the warm-up batches run on (``engine.cuda.stream`` context)."""
        from engine import cuda

        if self._side_stream is None:
            self._side_stream = cuda.Stream()
            self._side_stream.wait_stream(cuda.current_stream())
        return cuda.stream(self._side_stream)

    def end_warmup_batch(self) -> None:
        from engine import cuda

        self.eager_steps += 1
        cuda.current_stream().wait_stream(self._side_stream)

    def runs(self, x, y, batch_index: int, batches: int) -> bool:
        """Whether the graph runs this batch (False: the eager step does). Raises CaptureError on a
        shape change that is not the epoch's last, shorter batch."""
        if self.warming_up():
            return False
        if self.graph is None:
            return True
        if self._fits(x, y):
            return True
        if batch_index == batches - 1 and len(x) < len(self.static_x):
            return False  # the epoch's short last batch: eagerly
        raise CaptureError(
            f"Trainer(cuda_graph=True): batch {batch_index + 1} has inputs {_shape(x)} and targets {_shape(y)}, but "
            f"the step was captured for inputs {_shape(self.static_x)} and targets {_shape(self.static_y)}. A replay "
            "reads the captured shapes only; give every batch the same shape (only an epoch's last batch may be "
            "shorter: it runs eagerly; or drop it with DataLoader(drop_last=True)), or use cuda_graph=False")

    def _fits(self, x, y) -> bool:
        return all(a.shape == s.shape and a.dtype == s.dtype for a, s in ((x, self.static_x), (y, self.static_y)))

    def step(self, x, y):
        """Run the batch through the graph (capturing it first if needed): returns the batch's loss,
        output and NaN-guard flag, copied out of the graph's static outputs (the next replay
        overwrites those)."""
        from engine import cuda

        if self.graph is None:
            with no_grad():
                self.static_x, self.static_y = x.clone(), y.clone()
            graph = cuda.CUDAGraph()
            with cuda.graph(graph):
                self.static_loss, self.static_output, self.static_flag = self.trainer._train_step(
                    self.static_x, self.static_y)
            self.graph = graph
        else:
            with no_grad():
                self.static_x.copy_(x)
                self.static_y.copy_(y)
        self.graph.replay()
        with no_grad():
            loss, output = self.static_loss.detach().clone(), self.static_output.detach().clone()
        flag = None if self.static_flag is None else backend.array_module(self.static_flag).copy(self.static_flag)
        return loss, output, flag


def _shape(t) -> str:
    return f"{tuple(t.shape)} {t.dtype}"
