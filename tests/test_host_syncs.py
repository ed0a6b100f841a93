"""A training step reads nothing from the device: no host syncs in forward, backward or the step.

Every read of an array's values into Python that the engine makes goes through
``engine.backend.to_host``, which ``count_host_reads`` counts on any device, so the CPU runs of
these tests check the same code path a GPU takes. A read that bypasses it (``float()`` of a raw
array) is invisible on the CPU; on a GPU the same steps also run behind a kernel that keeps the
stream busy for a second, and the stream must still be busy when the step returns: any wait for
the device, from whatever source, fails it.
"""

import contextlib

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import backend, nn, optim
from engine.train import Trainer, TrainingDiverged
from tests.conftest import DEVICES


SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    const long long start = clock64();
    while (clock64() - start < cycles) {}
}
"""


@contextlib.contextmanager
def _no_device_waits(device: str):
    """On a GPU: queue a kernel that keeps the stream busy for about a second, run the body,
    then require the stream to be still busy: had the body waited for the device even once (a
    read, a synchronize, numba's per-argument sync), the spinner would have finished by then."""
    if device == "cpu":
        yield
        return
    import cupy

    stream = cupy.cuda.get_current_stream()
    cupy.RawKernel(SPIN, "spin")((1,), (1,), (np.int64(2_000_000_000),))  # ~1 s at 2 GHz
    yield
    still_busy = not stream.done
    stream.synchronize()
    assert still_busy, "the body waited for the device (a host sync)"


def _batch(device, rng, n=64, features=20, classes=7, ignore=True):
    x = engine.tensor(rng.standard_normal((n, features)).astype(np.float32), device=device)
    labels = rng.integers(0, classes, n)
    if ignore:
        labels[5] = -100
    return x, engine.tensor(labels, device=device)


def _mlp(device):
    return nn.Sequential(nn.Linear(20, 32, device=device), nn.ReLU(), nn.Linear(32, 7, device=device))


STEPS = {
    "nn+adam+cross_entropy": lambda m: (optim.Adam(m.parameters(), lr=1e-2), nn.CrossEntropyLoss()),
    "nn+adamw+smoothing": lambda m: (optim.AdamW(m.parameters(), lr=1e-2),
                                     nn.CrossEntropyLoss(label_smoothing=0.1)),
    "nn+sgd+weighted": lambda m: (optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                  nn.CrossEntropyLoss(weight=engine.ones(7, device=m[0].weight.device))),
}


@pytest.mark.parametrize("impls", [None, pytest.param("numba_cuda", marks=pytest.mark.gpu)],
                         ids=["default-impls", "numba_cuda-impls"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setup", list(STEPS), ids=list(STEPS))
def test_a_training_step_reads_nothing_from_the_device(device, setup, impls, monkeypatch):
    if impls is not None:
        if device == "cpu":
            pytest.skip("the numba_cuda impls take cupy arrays (the simulator is a separate suite)")
        # numba would synchronize once per cupy argument without kernels/numba_cuda/launch.py
        monkeypatch.setenv("ENGINE_KERNEL_IMPL", impls)
    engine.manual_seed(0)
    rng = np.random.default_rng(0)
    model = _mlp(device)
    opt, loss_fn = STEPS[setup](model)
    batches = [_batch(device, rng) for _ in range(3)]
    for x, y in batches[:1]:  # warm-up: first calls compile and cache kernels
        loss_fn(model(x), y).backward()
    backend.synchronize(backend.device(device))
    with backend.count_host_reads() as reads, _no_device_waits(device):
        for x, y in batches:
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert reads.count == 0, reads
    assert np.isfinite(loss.item())  # and the counter does see a read


SCALED = {  # (optimizer, parameter dtype, unscale_ + clip_grad_norm_ before the step?)
    "adamw+unscale+clip": (lambda ps: optim.AdamW(ps, lr=1e-2), None, True),
    "sgd-momentum": (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1), None, False),
    "adam-bf16-master": (lambda ps: optim.Adam(ps, lr=1e-2), engine.bfloat16, True),
    "adam-fp16-master": (lambda ps: optim.Adam(ps, lr=1e-2), engine.float16, False),
    "adamw-unfused": (lambda ps: optim.AdamW(ps, lr=1e-2, fused=False), None, True),
}


@pytest.mark.parametrize("impls", [None, pytest.param("numba_cuda", marks=pytest.mark.gpu)],
                         ids=["default-impls", "numba_cuda-impls"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setup", list(SCALED), ids=list(SCALED))
def test_a_training_step_with_a_grad_scaler_reads_nothing_from_the_device(device, setup, impls, monkeypatch):
    """scale, backward, (unscale_ + clip), step, update: the inf/NaN check, the skip, the step
    counts and the scale update all stay on the device, also across a step with an inf."""
    from engine.nn.utils import clip_grad_norm_

    make_opt, dtype, clip = SCALED[setup]
    if impls is not None:
        if device == "cpu":
            pytest.skip("the numba_cuda impls take cupy arrays (the simulator is a separate suite)")
        if dtype == engine.bfloat16:
            pytest.skip("numba cannot type bfloat16 arrays (the impl refuses them by name)")
        monkeypatch.setenv("ENGINE_KERNEL_IMPL", impls)
    engine.manual_seed(0)
    rng = np.random.default_rng(6)
    model = _mlp(device)
    if dtype is not None:
        model = model.to(dtype=dtype)
    opt, loss_fn = make_opt(model.parameters()), nn.CrossEntropyLoss()
    scaler = engine.amp.GradScaler(backend.device(device).type, init_scale=2.0 ** 8, growth_interval=2)
    batches = [_batch(device, rng) for _ in range(4)]

    def train_step(x, y, inject=False):
        if dtype is not None:
            x = x.to(dtype=dtype)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        scaler.scale(loss * (float("inf") if inject else 1.0)).backward()
        if clip:
            scaler.unscale_(opt)
            clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        return loss

    with np.errstate(all="ignore"):
        train_step(*batches[0], inject=True)  # warm-up (compiles), and the step counts go to the device
        backend.synchronize(backend.device(device))
        with backend.count_host_reads() as reads, _no_device_waits(device):
            for t, (x, y) in enumerate(batches):
                loss = train_step(x, y, inject=t == 1)
    assert reads.count == 0, reads
    assert np.isfinite(loss.item()) and scaler.get_scale() == 2.0 ** 7  # halved twice, then grown once
    assert opt.state_dict()["state"][0].get("step", 3) == 3  # 5 steps, 2 skipped


@pytest.mark.parametrize("device", DEVICES)
def test_a_functional_step_with_fused_kernels_reads_nothing(device):
    rng = np.random.default_rng(1)
    w1 = engine.tensor(rng.standard_normal((32, 20)).astype(np.float32) * 0.2, device=device, requires_grad=True)
    b1 = engine.zeros(32, device=device, requires_grad=True)
    w2 = engine.tensor(rng.standard_normal((7, 32)).astype(np.float32) * 0.2, device=device, requires_grad=True)
    x, y = _batch(device, rng)
    F.cross_entropy(F.linear(F.linear_relu(x, w1, b1), w2), y).backward()  # warm-up (compiles)
    backend.synchronize(backend.device(device))
    with backend.count_host_reads() as reads, _no_device_waits(device):
        loss = F.cross_entropy(F.linear(F.linear_relu(x, w1, b1), w2), y)
        loss.backward()
        with engine.no_grad():
            for p in (w1, b1, w2):
                p.sub_(p.grad * 0.1)
    assert reads.count == 0, reads


@pytest.mark.parametrize("autocast", [None, "bfloat16", "float16"], ids=["fp32", "autocast-bf16", "autocast-fp16"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_a_gpt_training_step_reads_nothing_from_the_device(device, autocast):
    # The Transformer path: embeddings (their index check), fused layer norm, causal attention,
    # GELU, the tied head, cross-entropy, clip_grad_norm_ and AdamW; also with the forward and
    # the loss under autocast (the Trainer's "bf16-mixed" / "16-mixed").
    from engine.examples.gpt import GPT, lm_loss, param_groups
    from engine.nn.utils import clip_grad_norm_

    engine.manual_seed(0)
    model = GPT(64, 16, 32, 2, 4).to(device)
    opt = optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    rng = np.random.default_rng(0)
    batches = [engine.tensor(rng.integers(0, 64, (4, 17)), device=device) for _ in range(3)]
    lm_loss(model(batches[0][:, :-1]), batches[0][:, 1:]).backward()  # warm-up (compiles)
    opt.zero_grad()
    backend.synchronize(backend.device(device))
    region = contextlib.nullcontext if autocast is None else \
        (lambda: engine.autocast(device, dtype=getattr(engine, autocast)))
    with backend.count_host_reads() as reads, _no_device_waits(device):
        for ids in batches:
            with region():
                loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    assert reads.count == 0, reads
    assert np.isfinite(loss.item())


@pytest.mark.gpu
def test_an_embedding_index_out_of_range_on_a_gpu_raises_at_the_next_sync():
    emb = nn.Embedding(10, 4, device="cuda")
    ids = engine.tensor([1, 12, 3], device="cuda")
    with backend.count_host_reads() as reads:
        out = emb(ids)  # no read here: the check is queued
    assert reads.count == 0
    with pytest.raises(engine.EngineError, match=r"embedding: indices must be in \[0, 10\).*\[1, 12\]"):
        out.sum().item()


def test_the_counter_counts_reads():
    t = engine.tensor([1.0, 2.0])
    with backend.count_host_reads() as reads:
        t.sum().item()
        float(t[0])
        t.numpy()
    assert reads.count == 3


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_trainer_reads_once_per_window(device, precision):
    engine.manual_seed(0)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8 * 16, 20)).astype(np.float32)
    y = rng.integers(0, 7, 8 * 16)
    model = _mlp(device)
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), metrics=(), verbose=0, sync_every=4,
                      precision=precision)
    with backend.count_host_reads() as reads:
        history = trainer.fit((x, y), epochs=1, batch_size=16, shuffle=False)
    assert reads.count == 2, reads  # after batches 4 and 8; the epoch-end read finds nothing left
    # The deferred reads give the same epoch loss as reading every batch.
    engine.manual_seed(0)
    model = _mlp(device)
    every = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), metrics=(), verbose=0, sync_every=1,
                    precision=precision)
    np.testing.assert_allclose(history["loss"], every.fit((x, y), epochs=1, batch_size=16, shuffle=False)["loss"],
                               rtol=1e-6)


def test_a_non_finite_loss_between_reads_is_reported_truthfully():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8 * 16, 20)).astype(np.float32)
    x[20] = np.nan  # batch 2
    y = rng.integers(0, 7, 8 * 16)
    model = _mlp("cpu")
    trainer = Trainer(model, optim.SGD(model.parameters(), lr=0.1), metrics=(), verbose=0, sync_every=4)
    with pytest.raises(TrainingDiverged, match=r"epoch 1, batch 2 \(read after batch 4.*stepped on batches 2\.\.4"):
        trainer.fit((x, y), epochs=1, batch_size=16, shuffle=False)
    with pytest.raises(ValueError, match="sync_every"):
        Trainer(model, optim.SGD(model.parameters(), lr=0.1), sync_every=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_gradient_finite_check_reads_nothing(device, set_to_none):
    """The NaN guard's per-step check over the gradients stays on the device: a flag read later."""
    engine.manual_seed(0)
    rng = np.random.default_rng(4)
    model = _mlp(device)
    opt = optim.Adam(model.parameters(), lr=1e-2)
    batches = [_batch(device, rng) for _ in range(3)]
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()  # warm-up
    opt.step()
    backend.synchronize(backend.device(device))
    flags = []
    with backend.count_host_reads() as reads, _no_device_waits(device):
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=set_to_none)
            loss.backward()
            flags.append(opt.grads_finite())
            opt.step()
    assert reads.count == 0, reads
    assert all(bool(backend.to_host(flag)[0]) for flag in flags)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.slow
def test_the_trainer_reads_gradient_flags_with_the_losses(device):
    """A finite loss with NaN gradients (batch 2) is found at the first read, in the same one transfer."""
    engine.manual_seed(0)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8 * 16, 20)).astype(np.float32)
    y = rng.integers(0, 7, 8 * 16)
    calls = []

    def loss_fn(output, target):  # sqrt at 0: adds 0 to the loss, NaN to every gradient on batch 2
        calls.append(None)
        loss = F.cross_entropy(output, target)
        return loss + ((output - output.detach()) ** 2).sum().sqrt() if len(calls) == 2 else loss

    model = _mlp(device)
    trainer = Trainer(model, optim.Adam(model.parameters(), lr=1e-2), loss_fn=loss_fn, metrics=(), verbose=0,
                      sync_every=4)
    with backend.count_host_reads() as reads, pytest.raises(TrainingDiverged, match=r"gradients became non-finite "
                                                                                    r"at epoch 1, batch 2"):
        with np.errstate(all="ignore"):
            trainer.fit((x, y), epochs=1, batch_size=16, shuffle=False)
    assert reads.count == 1, reads  # the read after batch 4: losses and flags together
    assert len(calls) == 4


# ---- no device read outside backend.to_host -----------------------------------------------------
#
# ``bool()``/``float()``/``int()`` of an array, ``.item()``, ``.tolist()``, ``.get()`` and
# ``np.asarray`` of a cupy array each wait for the device. Done outside ``backend.to_host`` they
# are invisible to ``count_host_reads`` (so the tests above cannot see them on the CPU) and skip
# the deferred checks' errors. This scan of engine/ flags every such call on a value that may be a
# device array: one built from ``._data``, ``xp``, or an array reduction (``.any()``, ``.sum()``,
# ``.max()`` ...), unless it comes from ``to_host`` or a numpy function (host values). What it
# flags must go through ``backend.to_host``, or be listed below with why the value is on the host.

import ast  # noqa: E402
import pathlib  # noqa: E402

_REDUCTIONS = {"any", "all", "sum", "min", "max", "mean", "item", "prod", "argmax", "argmin", "std", "var",
               "count_nonzero", "nonzero", "isfinite"}
_METADATA = {"size", "shape", "ndim", "dtype", "itemsize", "nbytes"}

# (file, function) -> why every flagged read in it is of a host value.
HOST_ONLY = {
    ("engine/backend.py", "to_host"): "the door itself",
    ("engine/tensor.py", "__bool__"): "Tensor.item() reads through to_host",
    ("engine/tensor.py", "__float__"): "Tensor.item() reads through to_host",
    ("engine/tensor.py", "__int__"): "Tensor.item() reads through to_host",
    ("engine/tensor.py", "__index__"): "Tensor.item() reads through to_host",
    ("engine/data/splits.py", "_allocate"): "counts is a numpy array of class counts",
    ("engine/examples/gpt.py", "_pick"): "row comes from backend.to_host",
    ("engine/examples/regression.py", "main"): "y_test is a numpy array",
    ("engine/gradcheck.py", "gradcheck"): "bad comes from np.isclose of host arrays",
    ("engine/text/batching.py", "pad_batch"): "lengths is a numpy array",
    ("engine/text/datasets.py", "unigram_baseline"): "token arrays and counts are numpy arrays",
    ("engine/functional/losses.py", "_check_class_indices"): "called with numpy targets only (the CPU path)",
    ("engine/functional/losses.py", "nll_loss"): "the eager target check runs in its `xp is np` branch",
    ("engine/data/workers.py", "_work"): "tasks.get() is a queue's, not an array's",
    ("engine/distributed/mpi.py", "allgather_object"): "sizes is a numpy array MPI gathered into",
}


def _is_host_value(node) -> bool:
    """A call that returns a host value: ``np.*``/``math.*`` functions, ``to_host`` (and metrics'
    ``_host_float64``, which calls it), ``len``."""
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    if isinstance(f, ast.Name):
        return f.id in ("len", "_host_float64")
    return isinstance(f, ast.Attribute) and (f.attr == "to_host" or isinstance(f.value, ast.Name)
                                             and f.value.id in ("np", "math", "builtins"))


def _may_be_on_device(node) -> bool:
    if _is_host_value(node) or isinstance(node, ast.Attribute) and node.attr in _METADATA:
        return False
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _REDUCTIONS:
        return not _is_host_value(node.func.value)
    if isinstance(node, ast.Attribute) and node.attr == "_data" or isinstance(node, ast.Name) and node.id == "xp":
        return True
    return any(_may_be_on_device(child) for child in ast.iter_child_nodes(node))


def _is_reduction(node) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _REDUCTIONS


def _device_reads(node):
    """What in ``node`` (one AST node, not its children) reads an array's value on the host."""
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("bool", "float", "int") and node.args:
            return _may_be_on_device(node.args[0])
        if isinstance(f, ast.Attribute) and not node.args and not node.keywords:
            if f.attr in ("item", "tolist"):
                return _may_be_on_device(f.value)
            if f.attr == "get":
                return True
        if isinstance(f, ast.Attribute) and f.attr in ("asarray", "array") and isinstance(f.value, ast.Name) \
                and f.value.id == "np" and node.args:
            return _may_be_on_device(node.args[0])
    tests = []
    if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
        tests = [node.test]
    elif isinstance(node, ast.BoolOp):
        tests = node.values
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        tests = [node.operand]
    return any(_is_reduction(t) and _may_be_on_device(t) for t in tests)  # `if bad.any():` reads too


def _unsanctioned_device_reads(root: pathlib.Path) -> list[str]:
    found = []
    for path in sorted((root / "engine").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        owner = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    owner[id(node)] = fn.name  # the innermost function wins (walked last)
        for node in ast.walk(tree):
            function = owner.get(id(node), "<module>")
            if _device_reads(node) and (rel, function) not in HOST_ONLY:
                found.append(f"{rel}:{node.lineno} in {function}: {ast.unparse(node).splitlines()[0][:100]}")
    return found


def test_engine_reads_device_values_only_through_to_host():
    root = pathlib.Path(__file__).resolve().parents[1]
    found = _unsanctioned_device_reads(root)
    assert not found, ("host reads outside backend.to_host (wrap the array in backend.to_host, or defer the "
                       "check as kernels/deferred.py does):\n" + "\n".join(found))


def test_the_device_read_scan_finds_the_reads_it_forbids(tmp_path):
    source = tmp_path / "engine" / "bad.py"
    source.parent.mkdir()
    source.write_text("def f(t, xp, a):\n"
                      "    if bool((t._data < 0).any()): pass\n"
                      "    if a.any(): pass\n"
                      "    x = float(xp.max(a)) + int(t._data.sum()) + a.max().item() + len(a.get())\n"
                      "    ok = bool(backend.to_host(a.any())) + int(np.prod(a.shape)) + int(t._data.size)\n"
                      "    return np.asarray(t._data), np.asarray(backend.to_host(t._data))\n")
    found = _unsanctioned_device_reads(tmp_path)
    lines = [int(f.split(":")[1].split(" ")[0]) for f in found]
    assert sorted(set(lines)) == [2, 3, 4, 6], found
    assert len([line for line in lines if line == 4]) == 4, found


@pytest.mark.gpu
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "nll_loss"])
def test_bce_and_nll_input_checks_on_a_gpu_are_deferred_to_the_next_sync(loss):
    if loss == "binary_cross_entropy":
        args = (engine.tensor([0.2, 1.5], device="cuda"), engine.tensor([0.0, 1.0], device="cuda"))
        message = r"binary_cross_entropy: every input element must be a probability in \[0, 1\].*\[0\.2, 1\.5\]"
    else:
        args = (engine.zeros(2, 3, device="cuda"), engine.tensor([1, 7], device="cuda"))
        message = r"nll_loss: target 7 is out of range for 3 classes"
    fn = getattr(F, loss)
    with pytest.raises(engine.EngineError, match=message):  # warm-up (compiles); raised at the read
        fn(*args).item()
    with backend.count_host_reads() as reads, _no_device_waits("cuda"):
        out = fn(*args)  # no read: the check is queued
    assert reads.count == 0
    with pytest.raises(engine.EngineError, match=message):
        out.item()
