"""engine.io: pickle-free checkpoints, bitwise round trips, atomic writes, corrupt-file errors."""

import json
import math
import os
import stat
import zipfile

import numpy as np
import pytest

import engine
import engine.io as io
from engine.io import CheckpointError, load, save
from engine.optim import SGD
from tests.conftest import DEVICES, cuda_available

NUMPY_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                np.uint32, np.uint64, np.bool_, np.complex64, np.complex128]


def sample_array(dtype, shape=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) * 100
    if np.dtype(dtype).kind == "c":
        values = values + 1j * rng.standard_normal(shape)
    elif np.dtype(dtype).kind == "b":
        values = values > 0
    elif np.dtype(dtype).kind == "u":
        values = np.abs(values)
    return np.asarray(values).astype(dtype)  # a 0-d array, not a numpy scalar, for shape ()


def assert_bitwise_equal(got, want):
    assert type(got) is type(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


# ---- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_arrays_round_trip_bitwise_with_their_dtype(dtype, tmp_path):
    arrays = {"plain": sample_array(dtype), "scalar": sample_array(dtype, ()), "empty": sample_array(dtype, (0, 3)),
              "strided": sample_array(dtype, (6, 5))[::2, 1::2], "fortran": np.asfortranarray(sample_array(dtype))}
    save(arrays, tmp_path / "a.npz")
    loaded = load(tmp_path / "a.npz")
    assert list(loaded) == list(arrays)
    for name, want in arrays.items():
        assert_bitwise_equal(loaded[name], want)
        assert loaded[name].flags.writeable


def test_nan_payloads_and_negative_zero_survive(tmp_path):
    bits = np.array([0x7FC00001, 0xFFC12345, 0x80000000, 0x7F800000], dtype=np.uint32)
    special = bits.view(np.float32)
    save({"x": special, "neg_zero": -0.0, "nan": math.nan, "inf": -math.inf}, tmp_path / "s.npz")
    loaded = load(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded["x"].view(np.uint32), bits)
    assert math.copysign(1.0, loaded["neg_zero"]) == -1.0
    assert math.isnan(loaded["nan"]) and loaded["inf"] == -math.inf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_],
                         ids=lambda d: np.dtype(d).name)
def test_tensors_round_trip_as_tensors_without_grad(dtype, device, tmp_path):
    tensor = engine.tensor(sample_array(dtype), device=device)
    if np.issubdtype(dtype, np.floating):
        tensor.requires_grad_(True)
    save({"t": tensor}, tmp_path / "t.npz")
    loaded = load(tmp_path / "t.npz")["t"]
    assert isinstance(loaded, engine.Tensor) and not loaded.requires_grad
    assert str(loaded.device) == str(tensor.device)
    assert_bitwise_equal(loaded.numpy(), tensor.numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_map_location_moves_tensors(device, tmp_path):
    tensor = engine.randn(4, 3, device=device)
    save([tensor], tmp_path / "m.npz")
    on_cpu = load(tmp_path / "m.npz", map_location="cpu")[0]
    assert str(on_cpu.device) == "cpu" and on_cpu.dtype == np.float32
    assert_bitwise_equal(on_cpu.numpy(), tensor.numpy())
    back = load(tmp_path / "m.npz", map_location=engine.device(device))[0]
    assert str(back.device) == str(tensor.device)
    assert_bitwise_equal(back.numpy(), tensor.numpy())


def test_python_values_and_containers_round_trip(tmp_path):
    obj = {
        "epoch": 7, "big": 2 ** 100, "neg": -3, "lr": 0.1, "tiny": 5e-324, "name": "résumé ✓", "flag": True,
        "nothing": None, "empty_list": [], "empty_dict": {}, "empty_tuple": (),
        "nested": [1, [2, (3, "four", [None, False])], {"deep": {"deeper": (1.5,)}}],
        0: "int key", 2.5: "float key", (1, "a"): "tuple key", None: "none key", True: "bool key",
        "np_scalars": [np.float32(1.25), np.int64(-9), np.bool_(True), np.float64(0.1), np.uint8(200)],
    }
    save(obj, tmp_path / "o.npz")
    loaded = load(tmp_path / "o.npz")
    assert loaded == obj
    assert list(loaded) == list(obj)  # key order kept
    assert [type(k) for k in loaded] == [type(k) for k in obj]
    assert type(loaded["nested"][1][1]) is tuple and type(loaded["empty_tuple"]) is tuple
    assert [type(v) for v in loaded["np_scalars"]] == [type(v) for v in obj["np_scalars"]]


def test_the_same_object_is_stored_once_and_loads_as_one_object(tmp_path):
    weight = engine.randn(3, 3)
    table = np.arange(5)
    save({"a": weight, "b": [weight, table], "c": table}, tmp_path / "shared.npz")
    loaded = load(tmp_path / "shared.npz")
    assert loaded["a"] is loaded["b"][0] and loaded["c"] is loaded["b"][1]
    with np.load(tmp_path / "shared.npz", allow_pickle=False) as npz:
        assert sorted(f for f in npz.files if f.startswith("arr_")) == ["arr_0", "arr_1"]


def test_training_state_round_trips(tmp_path):
    w = engine.randn(4, 2, requires_grad=True)
    opt = SGD([w], lr=0.1, momentum=0.9)
    w.grad = engine.ones(4, 2)
    opt.step()
    engine.manual_seed(5)
    engine.randn(3)  # advance the generator so its state is not the seed's
    state = {"model": {"w": w}, "optim": opt.state_dict(), "epoch": 3, "rng": engine.get_rng_state()}
    save(state, tmp_path / "train.npz")
    expected_draw = engine.randn(6).numpy()
    loaded = load(tmp_path / "train.npz")
    engine.set_rng_state(loaded["rng"])
    np.testing.assert_array_equal(engine.randn(6).numpy(), expected_draw)
    assert loaded["epoch"] == 3
    assert_bitwise_equal(loaded["model"]["w"].numpy(), w.numpy())
    assert_bitwise_equal(loaded["optim"]["state"][0]["momentum_buffer"].numpy(),
                         opt.state_dict()["state"][0]["momentum_buffer"].numpy())


# ---- the file format: an npz that numpy opens without pickle ------------------------------------

def test_numpy_opens_the_checkpoint_without_pickle(tmp_path):
    arrays = [sample_array(np.float32), sample_array(np.int64, (5,))]
    save({"weights": arrays, "step": 10}, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as npz:
        assert_bitwise_equal(npz["arr_0"], arrays[0])
        assert_bitwise_equal(npz["arr_1"], arrays[1])
        structure = json.loads(npz["structure.json"])
    assert structure["format"] == "engine-checkpoint" and structure["version"] == 1


def test_a_pickle_bearing_checkpoint_is_rejected_without_unpickling(tmp_path):
    path = tmp_path / "evil.npz"
    unpickled = []
    structure = {"format": "engine-checkpoint", "version": 1,
                 "root": {"ndarray": {"index": 0, "dtype": "|O", "shape": [1]}}}
    payload = np.array([Boobytrap(unpickled)], dtype=object)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("structure.json", json.dumps(structure))
        with archive.open("arr_0.npy", "w") as member:
            np.lib.format.write_array(member, payload, allow_pickle=True)
    with pytest.raises(CheckpointError, match=r"evil\.npz.*pickled object array"):
        load(path)
    assert unpickled == []


class Boobytrap:
    """Unpickling this records it: the test checks that loading never got that far."""

    def __init__(self, log):
        self.log = log

    def __reduce__(self):
        return (list.append, (self.log, "unpickled!"))


def test_saving_object_arrays_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match=r"obj\['bad'\].*object"):
        save({"bad": np.array([{}, []], dtype=object)}, tmp_path / "x.npz")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad, match", [
    ({"f": print}, r"obj\['f'\].*builtin_function_or_method"),
    ({"s": {1, 2}}, r"obj\['s'\].*set"),
    ([1, [2, b"bytes"]], r"obj\[1\]\[1\].*bytes"),
    ({frozenset(): 1}, "key"),
    ({"m": np.ma.masked_array([1, 2], mask=[0, 1])}, "masked"),
])
def test_unsupported_values_raise_naming_their_place(bad, match, tmp_path):
    with pytest.raises(TypeError, match=match):
        save(bad, tmp_path / "x.npz")
    assert os.listdir(tmp_path) == []


def test_cycles_are_refused(tmp_path):
    loop = {"a": []}
    loop["a"].append(loop)
    with pytest.raises(TypeError, match="contains itself"):
        save(loop, tmp_path / "x.npz")


# ---- atomic writes -------------------------------------------------------------------------------

def fail_on_second_array(monkeypatch, exception):
    original, calls = io._write_array, []

    def failing(member, array):
        calls.append(1)
        if len(calls) == 2:
            raise exception
        original(member, array)

    monkeypatch.setattr(io, "_write_array", failing)


@pytest.mark.parametrize("exception", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_a_crash_mid_save_leaves_the_previous_checkpoint_and_no_temp_file(exception, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save({"epoch": 1, "w": np.ones(3)}, path)
    before = path.read_bytes()
    fail_on_second_array(monkeypatch, exception)
    with pytest.raises(type(exception)):
        save({"epoch": 2, "w": np.zeros(1000), "v": np.zeros(1000)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    assert load(path)["epoch"] == 1


def test_a_crash_on_the_first_save_creates_nothing(tmp_path, monkeypatch):
    fail_on_second_array(monkeypatch, OSError("disk full"))
    with pytest.raises(OSError):
        save([np.ones(2), np.ones(2)], tmp_path / "new.npz")
    assert os.listdir(tmp_path) == []


def test_save_fsyncs_before_replacing(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save({"x": np.ones(2)}, tmp_path / "f.npz")
    assert events[:2] == ["fsync", "replace"]  # file data is durable before it takes the name


def test_overwrite_keeps_permissions_and_new_files_follow_the_umask(tmp_path):
    path = tmp_path / "p.npz"
    save(1, path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    path.chmod(0o640)
    save(2, str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and load(str(path)) == 2


# ---- bad files -----------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "good.npz"
    marker = np.full(64, 12345.678, dtype=np.float64)
    save({"marker": marker, "epoch": 4}, path)
    return path, marker


def test_a_flipped_data_byte_is_detected(checkpoint):
    path, marker = checkpoint
    data = bytearray(path.read_bytes())
    at = data.index(marker.tobytes()) + 100
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"good\.npz.*corrupt.*arr_0"):
        load(path)


def test_a_flipped_structure_byte_is_detected(checkpoint):
    path, _ = checkpoint
    data = bytearray(path.read_bytes())
    at = data.index(b'"epoch"') + 2
    data[at] ^= 0x20
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"good\.npz.*corrupt"):
        load(path)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1], ids=["empty", "10-bytes", "half", "last-byte-missing"])
def test_a_truncated_file_raises_checkpoint_error(keep, checkpoint):
    path, _ = checkpoint
    data = path.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:size])
    with pytest.raises(CheckpointError, match=r"good\.npz"):
        load(path)


def test_other_files_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt.*not an engine checkpoint.*zip"):
        load(text)
    plain = tmp_path / "plain.npz"
    np.savez(plain, x=np.ones(3))
    with pytest.raises(CheckpointError, match=r"plain\.npz.*no structure\.json"):
        load(plain)
    with pytest.raises(FileNotFoundError, match="missing"):
        load(tmp_path / "missing.npz")


def rewrite_structure(path, edit):
    """Rewrite the checkpoint at ``path`` with ``edit(structure)`` applied to its structure.json."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    structure = json.loads(members["structure.json"])
    edit(structure)
    members["structure.json"] = json.dumps(structure).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(format="something-else"), "not an engine checkpoint"),
    (lambda s: s.update(version=99), "version 99"),
    (lambda s: s["root"]["dict"][0][1]["ndarray"].update(dtype="<f4"), "arr_0.npy holds <f8"),
    (lambda s: s["root"]["dict"][0][1]["ndarray"].update(index=7), "arr_7.npy is missing"),
    (lambda s: s["root"]["dict"].append(["x", {"mystery": 1}]), "unknown structure node"),
    (lambda s: s["root"]["dict"].append(["x", {"ref": 5}]), "reference to array 5"),
])
def test_an_inconsistent_structure_raises_checkpoint_error(edit, match, checkpoint):
    path, _ = checkpoint
    rewrite_structure(path, edit)
    with pytest.raises(CheckpointError, match=match):
        load(path)


@pytest.mark.skipif(cuda_available(), reason="checks the error on a machine without CUDA")
def test_gpu_checkpoints_load_on_a_cpu_only_machine_with_map_location(tmp_path):
    path = tmp_path / "gpu.npz"
    weight = engine.randn(2, 3)
    save({"w": weight}, path)
    rewrite_structure(path, lambda s: s["root"]["dict"][0][1]["tensor"].update(device="cuda:0"))
    with pytest.raises(CheckpointError, match=r"saved on cuda:0.*map_location='cpu'"):
        load(path)
    for location in ("cpu", engine.CPU, {"cuda:0": "cpu"}, {"cuda": "cpu"}):
        assert_bitwise_equal(load(path, map_location=location)["w"].numpy(), weight.numpy())
