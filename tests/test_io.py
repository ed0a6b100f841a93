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
from tests.malformed_files import refused_in_bounded_memory

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


@pytest.mark.parametrize("relative", [False, True], ids=["absolute-link", "relative-link"])
def test_save_through_a_symlink_writes_the_target_and_keeps_the_link(relative, tmp_path):
    """As torch.save, which opens the link: the file pointed to gets the new checkpoint (atomically,
    in its own directory) and the link stays a link to it."""
    (tmp_path / "store").mkdir()
    real = tmp_path / "store" / "ckpt-7.npz"
    save({"epoch": 1}, real)
    link = tmp_path / "latest.npz"
    link.symlink_to(os.path.join("store", "ckpt-7.npz") if relative else real)
    save({"epoch": 2}, link)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert load(real)["epoch"] == 2 and load(link)["epoch"] == 2
    assert sorted(os.listdir(tmp_path)) == ["latest.npz", "store"] and os.listdir(tmp_path / "store") == ["ckpt-7.npz"]
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to(tmp_path / "store" / "new.npz")  # a link to a file not yet there: created, as torch
    save({"epoch": 3}, dangling)
    assert dangling.is_symlink() and load(tmp_path / "store" / "new.npz")["epoch"] == 3


def test_a_crash_mid_save_through_a_symlink_leaves_the_target_intact(tmp_path, monkeypatch):
    real = tmp_path / "real.npz"
    save({"epoch": 1, "w": np.ones(3)}, real)
    before = real.read_bytes()
    (tmp_path / "link.npz").symlink_to(real)
    fail_on_second_array(monkeypatch, OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        save({"w": np.zeros(10), "v": np.zeros(10)}, tmp_path / "link.npz")
    assert real.read_bytes() == before and (tmp_path / "link.npz").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["link.npz", "real.npz"]


def test_save_into_a_missing_directory_or_onto_a_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"engine\.save: cannot write .*no-such-dir.*does not exist; create it"):
        save({"x": 1}, tmp_path / "no-such-dir" / "ckpt.npz")
    assert os.listdir(tmp_path) == []
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.npz").write_bytes(b"old")
    with pytest.raises(IsADirectoryError, match=r"engine\.save: .*folder' is a directory; give the path of a file"):
        save({"x": 1}, folder)
    assert os.listdir(folder) == ["keep.npz"] and (folder / "keep.npz").read_bytes() == b"old"


def test_save_to_a_read_only_place_is_refused_and_the_old_file_kept(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save({"epoch": 1}, path)
    before = path.read_bytes()
    # This suite may run as root, which writes anywhere: the refusals are simulated where the OS gives them.
    real_access = os.access
    monkeypatch.setattr(io.os, "access", lambda p, mode: False if str(p) == str(path) else real_access(p, mode))
    with pytest.raises(PermissionError, match=r"engine\.save: .*ckpt\.npz' is not writable"):
        save({"epoch": 2}, path)
    monkeypatch.setattr(io.os, "access", real_access)

    def read_only_directory(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only_directory)
    with pytest.raises(PermissionError, match=r"engine\.save: cannot write .*cannot create a file in .*Permission"):
        save({"epoch": 2}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.npz"]


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


# ---- what save accepts loads back ------------------------------------------------------------------

STRUCTURED_DTYPES = {
    "plain": np.dtype([("x", "<i4"), ("y", "<f8")]),
    "aligned": np.dtype([("x", "i1"), ("y", "<f8")], align=True),
    "offsets": np.dtype({"names": ["x"], "formats": ["<i4"], "offsets": [4], "itemsize": 12}),
    "nested": np.dtype([("x", "<f4", (2, 3)), ("y", [("a", "u1"), ("b", ">i8")])]),
    "latin1_name": np.dtype([("é", "<f4")]),
    "non_latin1_name": np.dtype([("€", "<f4"), ("名前", "<i2")]),  # numpy writes .npy format 3.0
    "titles": np.dtype({"names": ["x"], "formats": ["<f4"], "titles": ["the x"]}),
    "many_fields": np.dtype([(f"field_{i}", "<f4") for i in range(1500)]),  # header > numpy's 10,000 chars
    "no_fields": np.dtype([]),
    "void": np.dtype("V7"),
}


@pytest.mark.parametrize("name", list(STRUCTURED_DTYPES))
def test_structured_arrays_and_their_scalars_round_trip(name, tmp_path):
    dtype = STRUCTURED_DTYPES[name]
    array = np.frombuffer(np.random.default_rng(0).bytes(3 * dtype.itemsize), dtype=dtype) if dtype.itemsize \
        else np.zeros(3, dtype)
    obj = {"array": array, "fortran": np.asfortranarray(np.stack([array, array])), "scalar": array[1],
           "rec": array.view(np.recarray)}
    save(obj, tmp_path / "s.npz")
    loaded = load(tmp_path / "s.npz")
    for key in ("array", "fortran", "rec"):
        assert loaded[key].dtype == obj[key].dtype and loaded[key].shape == obj[key].shape
        assert_same_fields(loaded[key], obj[key])
    assert type(loaded["scalar"]) is np.void and loaded["scalar"].dtype == dtype
    assert_same_fields(np.asarray(loaded["scalar"]), np.asarray(array[1]))


def assert_same_fields(got, want):
    """Bitwise equal field by field (padding bytes between fields are not data: numpy may not copy them)."""
    if want.dtype.names:
        for name in want.dtype.names:
            assert_same_fields(got[name], want[name])
    else:
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes()


@pytest.mark.parametrize("value", [0, -1, 2**53 + 1, 2**63 - 1, -2**63, 2**63, -2**63 - 1, 2**64, 2**100,
                                   -(10**5000), 10**5000 + 7, 7**20000],
                         ids=lambda v: f"{v.bit_length()}bits{'-neg' if v < 0 else ''}")
def test_python_ints_of_any_size_round_trip_as_values_and_keys(value, tmp_path):
    obj = {"v": value, value: "key", "t": (value, [value]), "bool": True}
    save(obj, tmp_path / "i.npz")
    loaded = load(tmp_path / "i.npz")
    assert loaded == obj and type(loaded["v"]) is int and type(loaded["bool"]) is bool


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\x00nul", "\U0001f600 emoji", "\\u0000 escaped", '"quote'])
def test_any_python_string_round_trips(text, tmp_path):
    save({text: [text]}, tmp_path / "t.npz")
    assert load(tmp_path / "t.npz") == {text: [text]}


@pytest.mark.parametrize("length", [200, 240, 250, 255])
def test_a_long_file_name_does_not_break_the_atomic_write(length, tmp_path):
    for stem in ("x" * length, "é" * (length // 2)):  # NAME_MAX counts bytes: é is two
        path = tmp_path / stem
        save({"w": np.arange(3)}, path)
        save({"w": np.arange(4)}, path)  # overwriting too
        np.testing.assert_array_equal(load(path)["w"], np.arange(4))
        assert sorted(os.listdir(tmp_path)) == [stem]
        path.unlink()


# ---- hostile files: refused quickly, with bounded memory, always as CheckpointError ---------------

def npy_bytes(header: str, data: bytes = b"", version=(1, 0)) -> bytes:
    """A .npy entry with a verbatim header literal (whatever it claims) followed by ``data``."""
    length_format = "<H" if version == (1, 0) else "<I"
    text = header.encode("utf8" if version == (3, 0) else "latin1") + b"\n"
    return (b"\x93NUMPY" + bytes(version) + np.array(len(text), dtype=length_format).tobytes() + text + data)


def write_checkpoint(path, root, members=(), compression=zipfile.ZIP_STORED):
    """An archive with ``structure.json`` for ``root`` and the given ``(name, bytes)`` members."""
    structure = {"format": "engine-checkpoint", "version": 1, "root": root}
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("structure.json", json.dumps(structure))
        for name, content in members:
            archive.writestr(name, content)
    return path


def ndarray_node(dtype, shape):
    return {"ndarray": {"index": 0, "dtype": dtype, "shape": shape}}


def load_in_bounded_memory(path, limit=4 << 20, **kwargs):
    """load(path) must raise CheckpointError without ever holding more than ``limit`` bytes."""
    return refused_in_bounded_memory(load, path, CheckpointError, limit, **kwargs)


def load_in_time(path, seconds=10.0, **kwargs):
    """Run load(path) in a thread: it must finish (raise) within ``seconds``."""
    import threading

    outcome = []

    def run():
        try:
            load(path, **kwargs)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"engine.load({path!r}) did not return within {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null", "/dev/urandom", "/dev/full", "/dev/tty"])
def test_character_devices_are_refused_without_reading(special):
    if not os.path.exists(special):
        pytest.skip(f"{special} does not exist here")
    error = load_in_time(special)
    assert isinstance(error, (CheckpointError, PermissionError)), error
    if isinstance(error, CheckpointError):
        assert special in str(error) or os.path.realpath(special) in str(error)
        assert "not a regular file" in str(error)


def test_directories_fifos_sockets_and_links_to_them_are_refused(tmp_path):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    link = tmp_path / "link.npz"
    link.symlink_to("/dev/zero")
    cases = {fifo: "FIFO", folder: "directory", link: "character device"}
    import socket

    sock_path = tmp_path / "s.sock"
    if len(str(sock_path)) < 100:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(sock_path))
        cases[sock_path] = "socket"
    for path, kind in cases.items():
        error = load_in_time(path)
        assert isinstance(error, CheckpointError) and kind in str(error) and str(path) in str(error), error


def test_a_symlink_to_a_checkpoint_loads(tmp_path):
    save({"x": 1}, tmp_path / "real.npz")
    (tmp_path / "link.npz").symlink_to(tmp_path / "real.npz")
    assert load(tmp_path / "link.npz") == {"x": 1}


def test_saving_through_a_symlink_writes_its_target(tmp_path):
    # as torch.save (open(path, "wb")): the link stays a link and its target gets the checkpoint
    save({"x": 1}, tmp_path / "real.npz")
    (tmp_path / "link.npz").symlink_to("real.npz")
    save({"x": 2}, tmp_path / "link.npz")
    assert (tmp_path / "link.npz").is_symlink() and load(tmp_path / "real.npz") == {"x": 2}
    (tmp_path / "dangling.npz").symlink_to("new.npz")  # a dangling link: its target is created
    save({"x": 3}, tmp_path / "dangling.npz")
    assert (tmp_path / "dangling.npz").is_symlink() and load(tmp_path / "new.npz") == {"x": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.npz", "link.npz", "new.npz", "real.npz"]


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA],
                         ids=["deflate", "bzip2", "lzma"])
def test_compressed_entries_are_refused_before_inflating(compression, tmp_path):
    path = tmp_path / "packed.npz"
    save({"w": np.ones(3)}, path)
    with zipfile.ZipFile(path) as archive:
        members = [(name, archive.read(name)) for name in archive.namelist()]
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, content in members:
            archive.writestr(name, content)
    assert "compressed entry" in str(load_in_bounded_memory(path))
    # the same archive with its compressed data damaged (zlib.error / LZMAError / OSError before)
    data = bytearray(path.read_bytes())
    at = data.index(b"arr_0.npy") + len("arr_0.npy") + 10
    data[at:at + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    load_in_bounded_memory(path)


@pytest.mark.slow
def test_a_zip_bomb_fails_fast_in_bounded_memory(tmp_path):
    # 256 MiB of zeros claimed honestly: deflate shrinks them about a thousandfold
    import time

    shape = [64 << 20]
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("structure.json", json.dumps({"format": "engine-checkpoint", "version": 1,
                                                       "root": ndarray_node("<f4", shape)}))
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            member.write(npy_bytes(f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape[0]},), }}"))
            zeros = bytes(1 << 20)
            for _ in range(256):
                member.write(zeros)
    assert bomb.stat().st_size < 1 << 20
    start = time.perf_counter()
    load_in_bounded_memory(bomb)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("shape", [[2**30, 3], [3 << 30], [2**40, 2**40], [0, 2**70], [2**62, 2**62, 4]],
                         ids=lambda s: "x".join(map(str, s)))
def test_claimed_shapes_larger_than_the_entry_allocate_nothing(shape, tmp_path):
    literal = "(" + ", ".join(map(str, shape)) + ",)"
    path = write_checkpoint(tmp_path / "liar.npz", ndarray_node("<f4", shape),
                            [("arr_0.npy", npy_bytes(f"{{'descr': '<f4', 'fortran_order': False, 'shape': {literal}}}",
                                                     bytes(200)))])
    assert path.stat().st_size < 1000
    message = str(load_in_bounded_memory(path, limit=1 << 20))
    assert "arr_0.npy" in message


BAD_HEADERS = {
    "negative": ("(-1,)", "'<f4'", "negative"),
    "negative_cancelling": ("(-2, -2)", "'<f4'", "negative"),
    "too_many_dims": ("(" + "1, " * 65 + ")", "'<f4'", "dimensions"),
    "bool_dim": ("(True,)", "'<f4'", "tuple of ints"),
    "float_dim": ("(2.0,)", "'<f4'", "tuple of ints"),
    "str_shape": ("'2'", "'<f4'", "tuple of ints"),
    "list_shape": ("[2]", "'<f4'", "tuple of ints"),
    "unknown_descr": ("(2,)", "'<q9'", "dtype"),
    "nested_descr": ("(2,)", "[('a', " * 100 + "'<f4'" + ")]" * 100, ""),
    "descr_number": ("(2,)", "5", "dtype"),
    "object_descr": ("(2,)", "'|O'", "pickled"),
    "object_field": ("(2,)", "[('a', '|O')]", "pickled"),
    "huge_itemsize": ("(2,)", "'V4294967296'", ""),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_npy_headers_are_refused(case, tmp_path):
    shape, descr, match = BAD_HEADERS[case]
    header = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}}}"
    # the structure agrees with the header where it can, so that the header's own check speaks
    try:
        dtype_str = np.lib.format.descr_to_dtype(eval(descr)).str
    except Exception:  # noqa: BLE001
        dtype_str = "<f4"
    structure_shape = list(eval(shape)) if isinstance(eval(shape), (tuple, list)) else shape
    path = write_checkpoint(tmp_path / "h.npz", ndarray_node(dtype_str, structure_shape),
                            [("arr_0.npy", npy_bytes(header, bytes(16)))])
    assert match in str(load_in_bounded_memory(path))


@pytest.mark.parametrize("entry", [
    b"", b"\x93NUMP", b"\x93NUMPY\x01", b"\x93NUMPY\x01\x00\x10", b"\x93NUMPY\x09\x09" + bytes(100),
    b"\x93NUMPY\x01\x00\xff\xff{}", b"\x93NUMPY\x02\x00\xff\xff\xff\xff{}", b"NOTNUMPY" + bytes(100),
    npy_bytes("{'descr': '<f4', 'fortran_order': 'yes', 'shape': (1,)}", bytes(4)),
    npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'extra': 1}", bytes(4)),
    npy_bytes("{'descr': '<f4', 'shape': (1,)}", bytes(4)),
    npy_bytes("[1, 2, 3]", bytes(4)),
    npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)" + ")" * 5000, bytes(4)),
    npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 5000 + ")" * 5000 + "}", bytes(4)),
    npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", bytes(3)),
    npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", bytes(5)),
    npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", bytes(4), version=(3, 0))[:-2],
    npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}".encode().decode("latin1") + "\udcff"
              .encode("utf8", "surrogatepass").decode("latin1"), bytes(4), version=(3, 0)),
], ids=lambda e: f"{len(e)}bytes")
def test_broken_npy_entries_are_refused(entry, tmp_path):
    path = write_checkpoint(tmp_path / "n.npz", ndarray_node("<f4", [1]), [("arr_0.npy", entry)])
    load_in_bounded_memory(path)


@pytest.mark.parametrize("root", [
    {"ndarray": {"index": "0", "dtype": "<f4", "shape": [1]}},
    {"ndarray": {"index": True, "dtype": "<f4", "shape": [1]}},
    {"ndarray": {"index": -1, "dtype": "<f4", "shape": [1]}},
    {"ndarray": {"index": 10**30, "dtype": "<f4", "shape": [1]}},
    {"ndarray": {"index": 0, "dtype": 4, "shape": [1]}},
    {"ndarray": {"index": 0, "dtype": "<f4", "shape": "1"}},
    {"ndarray": [0]},
    {"tensor": {"index": 0, "dtype": "<f4", "shape": [1], "device": "tpu:0"}},
    {"tensor": {"index": 0, "dtype": "<f4", "shape": [1], "device": 3}},
    {"tensor": {"index": 0, "dtype": "<f4", "shape": [1], "device": "cuda:²"}},
    {"tensor": {"index": 0, "dtype": "<f4", "shape": [1], "device": ["cpu"]}},
    {"int": "12"}, {"int": "0xZZ"}, {"int": 12}, {"float": "1.5"}, {"dict": [[[1], 2]]}, {"dict": [[1]]},
    {"dict": {"a": 1}}, {"tuple": 3}, {"ref": 0}, {"ref": "0"}, {}, {"a": 1, "b": 2},
    [[[[[[{"mystery": 1}]]]]]],
], ids=lambda r: json.dumps(r)[:40])
def test_wrong_types_in_the_structure_are_refused(root, tmp_path):
    entry = npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)}", bytes(4))
    path = write_checkpoint(tmp_path / "w.npz", root, [("arr_0.npy", entry)])
    load_in_bounded_memory(path)


@pytest.mark.parametrize("text", [b"[" * 100_000 + b"]" * 100_000, b"1" * 5000, b"\xff\xfe", b"{", b"null",
                                  b'{"format": "engine-checkpoint", "version": 1}',
                                  b'{"format": "engine-checkpoint", "version": true, "root": 1}'],
                         ids=["deep", "long-int", "not-utf8", "cut", "null", "no-root", "bool-version"])
def test_a_malformed_structure_json_is_refused(text, tmp_path):
    path = tmp_path / "j.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("structure.json", text)
    load_in_bounded_memory(path, limit=64 << 20)


def test_a_deeply_nested_structure_is_refused(tmp_path):
    depth = 50_000  # valid JSON, nested past the recursion limit (RecursionError before)
    text = ('{"format": "engine-checkpoint", "version": 1, "root": ' + '{"tuple": [' * depth + "1" + "]}" * depth
            + "}")
    path = tmp_path / "deep.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("structure.json", text)
    assert isinstance(load_in_bounded_memory(path, limit=64 << 20).__cause__, RecursionError)


def zip_with_flags(path, flag_bits=0, method=None):
    """A valid checkpoint whose arr_0.npy entry is re-labelled in both zip headers."""
    save({"w": np.arange(4.0)}, path)
    data = bytearray(path.read_bytes())
    name = b"arr_0.npy"
    for signature, flags_at, method_at, name_at in ((b"PK\x03\x04", 6, 8, 30), (b"PK\x01\x02", 8, 10, 46)):
        start = 0
        while True:
            start = data.index(signature, start)
            if data[start + name_at:start + name_at + len(name)] == name:
                break
            start += 1
        data[start + flags_at] |= flag_bits
        if method is not None:
            data[start + method_at:start + method_at + 2] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("flags, method, match", [
    (0x01, None, "encrypted"),  # RuntimeError("password required") before
    (0x20, None, ""),  # compressed patched data: NotImplementedError before
    (0x40, None, ""),  # strong encryption: NotImplementedError before
    (0, 99, "compressed"),  # an unknown method: NotImplementedError before
    (0, 8, "compressed"),  # claims deflate over stored bytes: zlib.error before
    (0, 14, "compressed"),  # claims lzma: LZMAError before
    (0, 12, "compressed"),  # claims bzip2: OSError before
])
def test_zip_flags_and_methods_it_cannot_read_are_refused(flags, method, match, tmp_path):
    path = zip_with_flags(tmp_path / "f.npz", flags, method)
    assert match in str(load_in_bounded_memory(path))


def test_entry_sizes_that_do_not_fit_the_file_are_refused(tmp_path):
    path = tmp_path / "sizes.npz"
    save({"w": np.arange(4.0)}, path)
    original = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("arr_0.npy")
    for new_size in (0xFFFFFFFE, info.file_size + 1, info.file_size - 1, 0):
        data = bytearray(original)
        start = data.index(b"PK\x01\x02" )
        while data[start + 46:start + 46 + 9] != b"arr_0.npy":
            start = data.index(b"PK\x01\x02", start + 1)
        # the zip64 extra field holds the sizes of entries written with force_zip64: edit both places
        extra = data.index(b"\x01\x00", start + 46 + 9)
        for at, width in ((start + 20, 4), (start + 24, 4), (extra + 4, 8), (extra + 12, 8)):
            if width == 4 and data[at:at + 4] == b"\xff\xff\xff\xff":
                continue
            data[at:at + width] = new_size.to_bytes(width, "little")
        path.write_bytes(bytes(data))
        load_in_bounded_memory(path)


@pytest.mark.slow
def test_every_flipped_byte_and_every_truncation_gives_checkpoint_error_or_the_data(tmp_path):
    """Hostile-user fuzzing of a small checkpoint: no other exception type may escape."""
    path = tmp_path / "fuzz.npz"
    obj = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "t": engine.ones(2), "n": [1, 2.5, None, "s"],
           "big": 2**70}
    save(obj, path)
    original = path.read_bytes()
    outcomes = {"loaded": 0, "refused": 0}

    def attempt(data):
        path.write_bytes(data)
        try:
            load(path)
            outcomes["loaded"] += 1
        except CheckpointError as exc:
            assert str(path) in str(exc)
            outcomes["refused"] += 1

    for cut in range(len(original)):
        attempt(original[:cut])
    for at in range(len(original)):
        for mask in (0x01, 0x80, 0xFF):
            data = bytearray(original)
            data[at] ^= mask
            attempt(bytes(data))
    assert outcomes["refused"] > len(original) * 3  # most damage is seen (CRCs), some hits unused bytes


@pytest.mark.parametrize("location", ["bogus", "cuda:x", "cuda:-1", "cuda:²", 3, 1.5, ["cpu"], b"cpu",
                                      {"cpu": "gpu"}, {"nowhere": "cpu"}, {("cpu",): "cpu"}],
                         ids=repr)
def test_a_bad_map_location_is_a_checkpoint_error_naming_the_file(location, tmp_path):
    path = tmp_path / "m.npz"
    save({"t": engine.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"m\.npz.*map_location") as info:
        load(path, map_location=location)
    assert info.value.__cause__ is not None
