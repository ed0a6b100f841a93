"""Hostile-user inputs to state dicts, the kernel registry's environment variable and cross-entropy
targets: each is refused with an error that says what was expected, and changes nothing.

(Bad checkpoint and IDX files are in tests/test_io.py and tests/data/test_idx_hostile.py; bad
samplers in tests/data/test_loader.py.)
"""

import math
import pathlib

import numpy as np
import pytest

import engine
import engine.functional as F
from engine import kernels
from engine import nn
from engine.errors import DTypeError, EngineError
from engine.nn.module import StateDictError
from engine.optim import SGD, Adagrad, Adam, AdamW, RMSprop

# ---- optimizer state dicts -------------------------------------------------------------------------

OPTIMIZERS = {"Adam": lambda p: Adam(p, lr=0.01), "AdamW": lambda p: AdamW(p, lr=0.01, amsgrad=True),
              "Adagrad": lambda p: Adagrad(p, lr=0.01), "RMSprop": lambda p: RMSprop(p, lr=0.01, momentum=0.9),
              "SGD": lambda p: SGD(p, lr=0.01, momentum=0.9, nesterov=True)}


def trained(make, steps=3):
    w = engine.tensor(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), requires_grad=True)
    opt = make([w])
    for _ in range(steps):
        w.grad = engine.tensor(np.full((2, 3), 0.5, np.float32))
        opt.step()
    return opt, w


def assert_unchanged(opt, before):
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        for key, value in entry.items():
            got = after["state"][index][key]
            assert (np.array_equal(got.numpy(), value.numpy()) if hasattr(value, "numpy") else got == value), key


BAD_STEPS = [math.nan, math.inf, -math.inf, -1, -2**70, 2**63, 2**80, 2.0, 2.5, np.float32(2), np.float64(2),
             "2", b"2", None, True, False, np.bool_(True), [2], (2,), {"n": 2}, 2 + 0j, np.array([2.0]),
             np.array(2.5), np.array([1, 2]), np.array(2**63, dtype=np.uint64), engine.tensor(2.0),
             engine.tensor([1, 2])]


@pytest.mark.parametrize("bad", BAD_STEPS, ids=repr)
@pytest.mark.parametrize("name", ["Adam", "AdamW", "Adagrad", "RMSprop"])
def test_a_step_that_is_not_a_non_negative_int_is_refused(name, bad):
    opt, _ = trained(OPTIMIZERS[name])
    before = opt.state_dict()
    sd = opt.state_dict()
    sd["state"][0]["step"] = bad
    with pytest.raises(EngineError, match=rf"{name}\.load_state_dict: 'step' of parameter 0 must be a non-negative "
                                          r"int"):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("good", [0, 7, np.int32(7), np.uint8(7), np.array(7), np.array([7], dtype=np.int32),
                                  engine.tensor(7), 2**63 - 2], ids=repr)
def test_integer_steps_of_any_integer_type_load(good):
    opt, _ = trained(OPTIMIZERS["Adam"])
    sd = opt.state_dict()
    sd["state"][0]["step"] = good
    opt.load_state_dict(sd)
    want = np.asarray(good.numpy() if hasattr(good, "numpy") else good).item()
    assert opt.state_dict()["state"][0]["step"] == want


@pytest.mark.parametrize("key, bad, name", [
    ("lr", math.nan, "Adam"), ("lr", math.inf, "Adam"), ("lr", -1.0, "Adam"), ("lr", "0.1", "Adam"),
    ("lr", None, "Adam"), ("lr", True, "Adam"), ("lr", [0.1], "Adam"), ("eps", np.nan, "Adam"),
    ("betas", "ab", "Adam"), ("betas", (math.nan, 0.9), "Adam"), ("betas", (0.9,), "Adam"),
    ("betas", (0.9, 0.99, 0.1), "Adam"), ("betas", (True, 0.9), "Adam"), ("betas", ("0.9", 0.99), "Adam"),
    ("betas", 0.9, "Adam"), ("amsgrad", "yes", "AdamW"), ("amsgrad", 1, "AdamW"), ("amsgrad", None, "AdamW"),
    ("maximize", 2, "Adam"), ("maximize", "False", "Adam"), ("momentum", math.inf, "SGD"),
    ("momentum", "0.9", "SGD"), ("nesterov", "True", "SGD"), ("weight_decay", -math.inf, "RMSprop"),
    ("alpha", [0.99], "RMSprop"), ("centered", 0, "RMSprop"), ("lr_decay", math.nan, "Adagrad"),
    ("initial_accumulator_value", "0", "Adagrad"),
])
def test_hyperparameters_of_the_wrong_kind_or_range_are_refused(key, bad, name):
    opt, _ = trained(OPTIMIZERS[name])
    assert key in opt.param_groups[0]
    before = opt.state_dict()
    sd = opt.state_dict()
    sd["param_groups"][0][key] = bad
    with pytest.raises(EngineError, match=name):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)


@pytest.mark.parametrize("bad", ["ckpt.npz", pathlib.Path("ckpt.npz"), None, 3, [1, 2], (), {"state": {}},
                                 {"state": [], "param_groups": []}, {"state": {}, "param_groups": "x"},
                                 {"state": {"a": {}}, "param_groups": [{"params": [0]}]},
                                 {"state": {0: "x"}, "param_groups": [{"params": [0]}]},
                                 {"state": {}, "param_groups": [{"params": [0.5]}]},
                                 {"state": {}, "param_groups": [{"params": [True]}]},
                                 {"state": {}, "param_groups": [{"params": "0"}]}], ids=repr)
def test_an_optimizer_state_dict_of_the_wrong_shape_is_refused(bad):
    opt, _ = trained(OPTIMIZERS["Adam"])
    before = opt.state_dict()
    with pytest.raises(EngineError, match="Adam.load_state_dict"):
        opt.load_state_dict(bad)
    assert_unchanged(opt, before)


# ---- module state dicts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["model.npz", pathlib.Path("model.npz"), b"weights", [("weight", 1)], [1, 2], (),
                                 None, 3, 2.5, {1, 2}, np.ones(3), engine.ones(3), iter([("weight", 1)])],
                         ids=lambda b: type(b).__name__)
def test_module_load_state_dict_wants_a_mapping(bad):
    model = nn.Linear(3, 2)
    weight = model.weight.numpy().copy()
    with pytest.raises(StateDictError, match=r"expected a mapping .* got " + type(bad).__name__):
        model.load_state_dict(bad)
    np.testing.assert_array_equal(model.weight.numpy(), weight)


def test_a_path_given_to_load_state_dict_says_to_read_the_file_first():
    with pytest.raises(StateDictError, match=r"file path: read the file first.*engine\.load"):
        nn.Linear(3, 2).load_state_dict("checkpoint.npz")


@pytest.mark.parametrize("bad", [None, "1 2", b"\x00\x01", {"a": 1}, object(), [None, 1.0], [1.0, "2"],
                                 [[1.0], [2.0, 3.0]], [1 + 2j, 0]], ids=repr)
def test_state_dict_values_that_are_not_numbers_are_refused(bad):
    model = nn.Linear(3, 2)
    bias = model.bias.numpy().copy()
    sd = dict(model.state_dict(), bias=bad)
    with pytest.raises(DTypeError, match=r"cannot use a .* as a value for Tensor\(shape=\(2,\)"):
        model.load_state_dict(sd)
    np.testing.assert_array_equal(model.bias.numpy(), bias)


def test_a_mapping_that_is_not_a_dict_loads():
    from types import MappingProxyType

    source, target = nn.Linear(3, 2), nn.Linear(3, 2)
    target.load_state_dict(MappingProxyType(source.state_dict()))
    np.testing.assert_array_equal(target.weight.numpy(), source.weight.numpy())


# ---- ENGINE_KERNEL_IMPL ------------------------------------------------------------------------------

@pytest.mark.parametrize("value, named, known", [
    ("nump", "'nump'", "numba_cpu"), ("NUMPY", "'NUMPY'", "numba_cpu"), ("cuda", "'cuda'", "cupy"),
    ("numba", "'numba'", "numpy"), ("adam_step=nump", "'adam_step=nump'", "numba_cpu"),
    ("adamstep=numpy", "'adamstep=numpy'", "softmax_cross_entropy"),
    ("adam_step=numpy,sgd_stp=numpy", "'sgd_stp=numpy'", "sgd_step"),
    ("adam_step", None, None),  # one name that is a kernel, not an impl
    ("adam_step=", "'adam_step='", "kernel=impl"), ("=numpy", "'=numpy'", "kernel=impl"),
    ("numpy,adam_step=numpy", "'numpy'", "kernel=impl"), ("numpy,numba_cpu", "'numpy'", "kernel=impl"),
    ("adam_step==numpy", "'adam_step==numpy'", "numba_cpu"), ("adam_step=numpy=numba_cpu", None, None),
    ("adam_step=numpy,adam_step=numba_cpu", "two impls", "'numpy' and 'numba_cpu'"),
    ("linear_relu_forward=sgd", "'linear_relu_forward=sgd'", "numpy"),
])
def test_an_unknown_impl_or_kernel_in_engine_kernel_impl_is_an_error(value, named, known, monkeypatch):
    from engine import kernels

    monkeypatch.setenv("ENGINE_KERNEL_IMPL", value)
    p = np.ones(3, np.float32)
    for kernel in ("adam_step", "sgd_step", "softmax_cross_entropy"):  # whichever kernel runs first
        with pytest.raises(kernels.KernelError, match="ENGINE_KERNEL_IMPL") as info:
            kernels.choose(kernel, [p])
        message = str(info.value)
        assert repr(value) in message
        for expected in (named, known):
            assert expected is None or expected in message, message
    with pytest.raises(kernels.KernelError, match="ENGINE_KERNEL_IMPL"):  # through the engine too
        w = engine.ones(3, requires_grad=True)
        w.grad = engine.ones(3)
        SGD([w], lr=0.1).step()


@pytest.mark.parametrize("value, kernel, impl", [
    ("numpy", "adam_step", "numpy"), ("  numpy  ", "sgd_step", "numpy"), ("adam_step=numpy,", "adam_step", "numpy"),
    (" adam_step = numpy , sgd_step=numpy", "sgd_step", "numpy"), ("adam_step=numpy,adam_step=numpy", "adam_step",
                                                                    "numpy"),
    ("adam_step=numpy", "sgd_step", None), ("", "adam_step", None), ("   ", "adam_step", None),
])
def test_valid_engine_kernel_impl_values_choose_as_documented(value, kernel, impl, monkeypatch):
    from engine import kernels

    monkeypatch.setenv("ENGINE_KERNEL_IMPL", value)
    p = np.ones(3, np.float32)
    chosen = kernels.choose(kernel, [p]).name
    assert chosen == (impl or kernels.impls(kernel)[0])


# ---- cross-entropy targets: the fused kernel and the unfused reference refuse the same -------------------


def logits_for(shape=(5, 4), seed=0):
    return engine.tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), requires_grad=True)


def outcome(fn):
    """``(exception type, message)`` of what fn() raised, or ``(None, result)``."""
    try:
        return None, fn()
    except Exception as exc:  # noqa: BLE001 - compared between the two paths
        return type(exc), str(exc)


def both_paths(logits, target, **kwargs):
    fused = outcome(lambda: F.cross_entropy(logits, target, fused=True, **kwargs))
    with F.fused_kernels(False):
        unfused = outcome(lambda: F.cross_entropy(logits, target, **kwargs))
    return fused, unfused


BAD_TARGETS = {
    "negative": (np.array([0, -1, 2, 1, 3]), "target[1] = -1"),
    "negative_c_minus_1_alias": (np.array([0, 1, 2, 3, -4]), "target[4] = -4"),
    "equals_c": (np.array([0, 1, 2, 4, 3]), "target[3] = 4"),
    "huge": (np.array([0, 1, 2, 2**62, 3]), f"target[3] = {2**62}"),
    "int64_min": (np.array([0, 1, -2**63, 2, 3]), f"target[2] = {-2**63}"),
    "uint64_wraps_onto_ignore_index": (np.array([0, 1, 2**64 - 100, 2, 3], np.uint64), f"= {2**64 - 100}"),
    "uint64_wraps_negative": (np.array([0, 2**63, 1, 2, 3], np.uint64), f"target[1] = {2**63}"),
    "uint64_max": (np.array([0, 1, 2, 3, 2**64 - 1], np.uint64), f"target[4] = {2**64 - 1}"),
    "uint8": (np.array([0, 255, 1, 2, 3], np.uint8), "target[1] = 255"),
    "int8": (np.array([0, 1, -128, 2, 3], np.int8), "target[2] = -128"),
    "int32": (np.array([0, 1, 2, 3, -100 - 65536], np.int32), "target[4] = -65636"),
    "uint32": (np.array([0, 1, 2**32 - 100, 2, 3], np.uint32), f"target[2] = {2**32 - 100}"),
}


@pytest.mark.parametrize("name", list(BAD_TARGETS))
@pytest.mark.parametrize("options", [{}, {"weight": "ones"}, {"label_smoothing": 0.1}, {"reduction": "sum"},
                                     {"reduction": "none"}, {"ignore_index": 0}], ids=repr)
def test_both_paths_refuse_a_bad_class_index_with_the_same_error(name, options):
    target, expected = BAD_TARGETS[name]
    options = dict(options)
    if options.get("weight") == "ones":
        options["weight"] = engine.ones(4)
    fused, unfused = both_paths(logits_for(), target, **options)
    assert fused == unfused
    error, message = fused
    assert error is kernels.KernelError, message
    assert expected in message and "outside the classes [0, C) = [0, 4)" in message
    assert f"ignore_index={options.get('ignore_index', -100)}" in message


def test_a_bad_index_in_a_multi_dimensional_target_is_named_where_it_is():
    logits = logits_for((2, 4, 3, 2))  # (N, C, d1, d2): targets (N, d1, d2)
    target = np.zeros((2, 3, 2), np.int64)
    target[1, 2, 0] = -7
    fused, unfused = both_paths(logits, target)
    assert fused == unfused and fused[0] is kernels.KernelError and "target[1, 2, 0] = -7" in fused[1]
    fused, unfused = both_paths(logits_for((4,)), np.array(9))  # one sample: (C,) logits, a 0-d target
    assert fused == unfused and "target = 9 is outside" in fused[1]


@pytest.mark.parametrize("target", [np.array([1, 0, 1, 1, 0], bool), np.array([0, 1, 2, 3, 0], np.complex64),
                                    np.array(["0", "1", "2", "3", "0"]), np.array([0, 1, 2, 3, 0], object),
                                    np.array([0, 1, 2, 3, 0], "m8[s]"), [0, 1, 2, "3", 0]], ids=lambda t: str(
                                        np.asarray(t).dtype))
def test_both_paths_refuse_class_indices_that_are_not_integers(target):
    fused, unfused = both_paths(logits_for(), target)
    assert fused == unfused and fused[0] is DTypeError and "integer dtype" in fused[1]


@pytest.mark.parametrize("ignore_index", [1.5, -100.0, "x", None, True, 2**63, -2**63 - 1, np.float64(-100)], ids=repr)
def test_both_paths_refuse_an_ignore_index_that_is_not_an_int64(ignore_index):
    fused, unfused = both_paths(logits_for(), np.array([0, 1, 2, 3, 0]), ignore_index=ignore_index)
    assert fused == unfused and fused[0] is kernels.KernelError and "ignore_index must be an int" in fused[1]


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
@pytest.mark.parametrize("ignore_index", [-100, 2, np.int64(3), np.int32(-100)], ids=repr)
def test_valid_targets_of_every_integer_dtype_give_the_same_loss_on_both_paths(dtype, ignore_index):
    target = np.array([0, 3, 2, 1, 3, 2], dtype=dtype)
    if int(ignore_index) >= 0:
        target[1] = int(ignore_index)  # an ignored row in range of every dtype
    logits = logits_for((6, 4))
    (fused_error, fused), (unfused_error, unfused) = both_paths(logits, target, ignore_index=ignore_index)
    assert fused_error is None and unfused_error is None, (fused, unfused)
    np.testing.assert_allclose(fused.item(), unfused.item(), rtol=1e-5)
    want = F.cross_entropy(logits, target.astype(np.int64), ignore_index=int(ignore_index), fused=False).item()
    np.testing.assert_allclose(fused.item(), want, rtol=1e-6)


def test_empty_batches_and_all_ignored_rows_are_not_errors():
    for fused in (True, False):
        assert F.cross_entropy(logits_for((0, 4)), np.zeros(0, np.int64), reduction="sum", fused=fused).item() == 0
        loss = F.cross_entropy(logits_for((3, 4)), np.full(3, -100), fused=fused)
        assert math.isnan(loss.item())  # 0 / 0, as PyTorch


def test_the_loss_module_and_the_context_switch_refuse_the_same():
    target = np.array([0, 1, -1, 2, 3])
    want = outcome(lambda: F.cross_entropy(logits_for(), target))
    assert want[0] is kernels.KernelError
    assert outcome(lambda: nn.CrossEntropyLoss()(logits_for(), engine.tensor(target))) == want
    with F.fused_kernels(False):
        assert outcome(lambda: nn.CrossEntropyLoss()(logits_for(), engine.tensor(target))) == want


# The GPU paths, checked here through the same xp-generic code on numpy: the fused kernel checks on the
# device; the unfused reference queues the same min/max check (kernels.deferred.defer, read at the next sync).

def test_uint64_targets_never_wrap_into_range_or_onto_ignore_index():
    from engine.functional.losses import _int64_class_indices

    targets = np.array([0, 2**64 - 100, 2**63, 2**64 - 1, 5], np.uint64)
    converted = _int64_class_indices(targets, -100)
    assert converted.dtype == np.int64
    assert converted.tolist() == [0, 2**63 - 1, 2**63 - 1, 2**63 - 1, 5]  # out of range, not -100
    assert _int64_class_indices(targets, 2**63 - 1).tolist()[1] == 2**63 - 2  # never equal to ignore_index


@pytest.mark.parametrize("targets, bad", [([0, 1, 2], None), ([0, -100, 2], None), ([-100, -100], None),
                                          ([0, -1, 2], -1), ([0, 4, -3], -3), ([0, 2**63 - 1], 2**63 - 1),
                                          ([3, 4], 4)])
def test_the_unfused_device_check_queues_the_same_verdict(targets, bad, monkeypatch):
    from engine.functional.losses import _defer_class_index_check
    from engine.kernels import deferred

    queued = []
    monkeypatch.setattr(deferred, "defer", lambda values, check: queued.append((values, check)))
    array = np.array(targets, np.int64)
    _defer_class_index_check(np, array, 4, -100)  # queues, raises nothing at the call
    (values, check), = queued
    assert values.dtype == np.int64 and values.shape == (2,)
    if bad is None:
        check(values.copy())
    else:
        with pytest.raises(kernels.KernelError, match=rf"a target = {bad} is outside the classes \[0, C\) = \[0, 4\) "
                                                      r"and is not ignore_index=-100.*next sync point"):
            check(values.copy())
