"""safetensors files and torch.save files: read (and, for safetensors, written) without torch.

torch 2.13 (CPU) writes the torch files and is the oracle for their values; the reference
``safetensors`` library, where installed, reads what the engine writes and writes what it reads.
"""

import collections
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

import engine
from engine import safetensors as st
from engine.errors import DTypeError
from engine.io import CheckpointError

torch = pytest.importorskip("torch")

ST_DTYPES = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]


def _sample(name: str, shape=(3, 5), seed=0):
    values = np.random.default_rng(seed).normal(size=shape) * 7
    return engine.tensor(values).to(getattr(engine, "bool_" if name == "bool" else name))


def _torch_dtype(name):
    return getattr(torch, name)


# ---- safetensors ----------------------------------------------------------------------------------

def test_safetensors_round_trip_every_dtype(tmp_path):
    tensors = {f"t.{name}": _sample(name, seed=i) for i, name in enumerate(ST_DTYPES)}
    tensors["scalar"] = engine.tensor(2.5)
    tensors["empty"] = engine.zeros(0, 4)
    tensors["strided"] = engine.arange(12.0).reshape(3, 4)[:, ::2]
    path = tmp_path / "m.safetensors"
    st.save_file(tensors, path, metadata={"format": "pt"})
    for loaded in (st.load_file(path), engine.load(path), st.load(path.read_bytes()), engine.io.load_safetensors(path)):
        assert list(loaded) == sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))  # the file's order
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
            np.testing.assert_array_equal(loaded[name].float().numpy(), tensor.float().numpy())
    with st.safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and f.keys() == sorted(tensors)
        assert f.get_tensor("t.bfloat16").dtype == engine.bfloat16
        with pytest.raises(KeyError, match="nope"):
            f.get_tensor("nope")


def test_safetensors_layout_is_the_formats(tmp_path):
    data = st.save({"b": engine.ones(2, dtype=engine.float16), "a": engine.arange(3)}, metadata={"k": "v"})
    (length,) = struct.unpack("<Q", data[:8])
    assert (8 + length) % 8 == 0  # data starts 8-byte aligned
    header = json.loads(data[8:8 + length])
    assert header == {"__metadata__": {"k": "v"}, "a": {"dtype": "I64", "shape": [3], "data_offsets": [0, 24]},
                      "b": {"dtype": "F16", "shape": [2], "data_offsets": [24, 28]}}
    assert np.frombuffer(data[8 + length:8 + length + 24], "<i8").tolist() == [0, 1, 2]
    assert len(data) == 8 + length + 28


def test_safetensors_interoperates_with_the_reference_library(tmp_path):
    reference = pytest.importorskip("safetensors.torch")
    theirs = {name: (torch.randn(4, 3, dtype=torch.float64) * 5).to(_torch_dtype(name)) for name in ST_DTYPES}
    reference.save_file(theirs, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    loaded = engine.load(tmp_path / "theirs.safetensors")
    for name, value in theirs.items():
        assert str(loaded[name].dtype) == name
        np.testing.assert_array_equal(loaded[name].float().numpy(), value.float().numpy())
    ours = {name: _sample(name, seed=3) for name in ST_DTYPES}
    engine.save(ours, tmp_path / "ours.safetensors", format="safetensors")
    back = reference.load_file(tmp_path / "ours.safetensors")
    for name, value in ours.items():
        assert back[name].dtype == _torch_dtype(name)
        np.testing.assert_array_equal(back[name].float().numpy(), value.float().numpy())


def test_safetensors_state_dict_into_a_model(tmp_path):
    model = engine.nn.Sequential(engine.nn.Linear(4, 6), engine.nn.ReLU(), engine.nn.Linear(6, 2))
    engine.save(model.state_dict(), tmp_path / "m.safetensors", format="safetensors")
    other = engine.nn.Sequential(engine.nn.Linear(4, 6), engine.nn.ReLU(), engine.nn.Linear(6, 2))
    other.load_state_dict(engine.load(tmp_path / "m.safetensors", map_location="cpu"))
    x = engine.randn(3, 4)
    np.testing.assert_array_equal(other(x).detach().numpy(), model(x).detach().numpy())
    buffer = io.BytesIO()
    engine.save(model.state_dict(), buffer, format="safetensors")
    buffer.seek(0)
    assert set(engine.load(buffer)) == set(model.state_dict())


def test_safetensors_save_refuses_bad_input(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="dict of names"):
        st.save_file([engine.ones(2)], path)
    with pytest.raises(TypeError, match="__metadata__"):
        st.save_file({"__metadata__": engine.ones(2)}, path)
    with pytest.raises(TypeError, match="'w'.*list"):
        st.save_file({"w": [1.0, 2.0]}, path)
    with pytest.raises(TypeError, match="metadata"):
        st.save_file({"w": engine.ones(2)}, path, metadata={"epoch": 3})
    with pytest.raises(DTypeError, match="'z'.*complex128"):
        st.save_file({"z": np.ones(2, np.complex128)}, path)
    with pytest.raises(ValueError, match="format='npz'"):
        engine.save({"w": engine.ones(2)}, path, format="npz")
    assert not path.exists()


def test_safetensors_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    st.save_file({"w": engine.ones(2)}, path)
    before = path.read_bytes()

    def failing(f, header, arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(st, "_write", failing)
    with pytest.raises(OSError, match="disk full"):
        st.save_file({"w": engine.zeros(5)}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["x.safetensors"]


def _file(tmp_path, header, data: bytes, raw_header: bytes | None = None, length: int | None = None):
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


BAD_FILES = [
    ("header longer than the file", dict(header={}, data=b"", length=10_000), "header claims 10000 bytes"),
    ("unknown dtype code", dict(header={"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, data=bytes(4)),
     "'w' has dtype code 'F33'"),
    ("shape that does not fit", dict(header={"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}},
                                     data=bytes(20)), r"'w' \(F32 \(2, 3\)\) needs 24 bytes"),
    ("offsets beyond the data", dict(header={"w": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}},
                                     data=bytes(4)), "outside the 4-byte data area"),
    ("a gap", dict(header={"w": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, data=bytes(4)),
     "starts at byte 2 of the data, expected 0"),
    ("overlap", dict(header={"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                             "b": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, data=bytes(4)),
     "starts at byte 2"),
    ("trailing bytes", dict(header={"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, data=bytes(5)),
     "end at byte 2 of the data but the file holds 5"),
    ("not JSON", dict(header=None, data=b"", raw_header=b"{not json"), "not UTF-8 JSON"),
    ("duplicate names", dict(header=None, data=bytes(2), raw_header=b'{"w": {"dtype": "U8", "shape": [1], '
                             b'"data_offsets": [0, 1]}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}'),
     "names 'w' twice"),
    ("negative dimension", dict(header={"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}, data=b""),
     "not a list of ints >= 0"),
    ("metadata not str", dict(header={"__metadata__": {"epoch": 3}}, data=b""), "__metadata__ must map str"),
    ("extra field", dict(header={"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}},
                         data=bytes(1)), "is not {dtype, shape, data_offsets}"),
]


@pytest.mark.parametrize("kind,spec,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_safetensors_malformed_files_are_checkpoint_errors(tmp_path, kind, spec, message):
    path = _file(tmp_path, **spec)
    for read in (st.load_file, lambda p: st.safe_open(p)):
        with pytest.raises(CheckpointError, match=message) as info:
            read(path)
        assert "bad.safetensors" in str(info.value)


def test_truncated_safetensors_file(tmp_path):
    data = st.save({"w": engine.ones(100)})
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-10])
    message = r"cut.safetensors.*'w' has data_offsets \[0, 400\] outside the 390-byte data area \(truncated"
    with pytest.raises(CheckpointError, match=message):
        st.load_file(path)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="shorter than the 8-byte header length"):
        st.load_file(path)


# ---- torch.save files -----------------------------------------------------------------------------

def _torch_file(tmp_path, obj, name="t.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _same(engine_tensor, torch_tensor):
    assert engine_tensor.shape == tuple(torch_tensor.shape)
    assert str(engine_tensor.dtype) == str(torch_tensor.dtype).removeprefix("torch.")
    ours, theirs = engine_tensor.numpy(), torch_tensor.detach()
    if theirs.dtype == torch.bfloat16:
        ours, theirs = ours.astype(np.float32), theirs.float()
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_torch_state_dict_loads_into_an_engine_model(tmp_path):
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 4))
    path = _torch_file(tmp_path, reference.state_dict())
    state = engine.load(path)
    assert isinstance(state, collections.OrderedDict) and list(state) == list(reference.state_dict())
    assert state._metadata == reference.state_dict()._metadata
    model = engine.nn.Sequential(engine.nn.Linear(6, 8), engine.nn.LayerNorm(8), engine.nn.Tanh(),
                                 engine.nn.Linear(8, 4))
    model.load_state_dict(state)
    x = torch.randn(5, 6)
    np.testing.assert_allclose(model(engine.tensor(x)).detach().numpy(), reference(x).detach().numpy(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("name", ST_DTYPES + ["uint16", "complex64"])
def test_torch_dtypes(tmp_path, name):
    value = (torch.randn(3, 4, dtype=torch.float64) * 9).to(_torch_dtype(name))
    _same(engine.load(_torch_file(tmp_path, {"x": value}))["x"], value)


def test_torch_views_strides_and_shared_storage(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    obj = {"base": base, "t": base.t(), "cols": base[:, 1::2], "tail": base[2:],
           "expanded": torch.ones(3, 1).expand(3, 5),
           "scalar": torch.tensor(7.5), "empty": torch.zeros(0, 3), "other": torch.arange(3)}
    loaded = engine.load(_torch_file(tmp_path, obj))
    for key, value in obj.items():
        _same(loaded[key], value)
    loaded["base"][3, 1] = -1.0  # they share memory, as torch's loaded tensors do
    assert loaded["t"][1, 3].item() == -1.0 and loaded["cols"][3, 0].item() == -1.0
    assert loaded["tail"][1, 1].item() == -1.0


def test_torch_containers_parameters_and_scalars(tmp_path):
    obj = {"p": torch.nn.Parameter(torch.ones(2)), "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
           "g": torch.ones(2, requires_grad=True), "list": [torch.zeros(1), 3, 2.5, "s", None, True],
           "tuple": (1, torch.ones(1)), "set": {1, 2}, "bytes": b"\x00\xff", "size": torch.Size([2, 3]),
           "dtype": torch.bfloat16, "device": torch.device("cpu"), "cuda_device": torch.device("cuda", 1),
           "nested": {"a": {"b": [torch.arange(2)]}}, 7: "int key", "complex": 1 + 2j, "slice": slice(1, 5, 2)}
    loaded = engine.load(_torch_file(tmp_path, obj))
    assert isinstance(loaded["p"], engine.nn.Parameter) and loaded["p"].requires_grad
    assert isinstance(loaded["frozen"], engine.nn.Parameter) and not loaded["frozen"].requires_grad
    assert loaded["g"].requires_grad and not isinstance(loaded["g"], engine.nn.Parameter)
    assert loaded["list"][1:] == [3, 2.5, "s", None, True] and loaded["tuple"][0] == 1
    assert loaded["set"] == {1, 2} and loaded["bytes"] == b"\x00\xff" and loaded["size"] == (2, 3)
    assert loaded["dtype"] == engine.bfloat16 and loaded["device"] == engine.device("cpu")
    assert loaded["cuda_device"] == engine.device("cuda:1")
    assert loaded["nested"]["a"]["b"][0].tolist() == [0, 1] and loaded[7] == "int key"
    assert loaded["complex"] == 1 + 2j and loaded["slice"] == slice(1, 5, 2)


def test_torch_optimizer_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    checkpoint = {"model": model.state_dict(), "optim": opt.state_dict(), "epoch": 4}
    loaded = engine.load(_torch_file(tmp_path, checkpoint), map_location="cpu")
    assert loaded["epoch"] == 4 and loaded["optim"]["param_groups"][0]["lr"] == 1e-3
    _same(loaded["optim"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    _same(loaded["optim"]["state"][0]["step"], opt.state_dict()["state"][0]["step"])


def test_torch_file_object_and_map_location_callable(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buffer)
    buffer.seek(0)
    seen = []
    loaded = engine.load(buffer, map_location=lambda storage, location: seen.append(location))
    assert seen == ["cpu"] and loaded["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


# ---- hand-made torch files: other devices, hostile and broken ones ----------------------------------

class _Storage:
    def __init__(self, key, numel, location="cpu", kind=None):
        self.key, self.numel, self.location, self.kind = key, numel, location, kind or torch.FloatStorage


class _Tensor:
    """Pickles as ``_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, obj.location, obj.numel)
        return None


def _handmade(tmp_path, obj, storages: dict, raw_pickle: bytes | None = None, compress=False):
    """A torch.save-shaped zip: archive/data.pkl (``obj`` pickled, or ``raw_pickle``), archive/data/<key>."""
    if raw_pickle is None:
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(obj)
        raw_pickle = buffer.getvalue()
    path = tmp_path / "made.pt"
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=method) as archive:
        archive.writestr("archive/data.pkl", raw_pickle)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, data in storages.items():
            archive.writestr(f"archive/data/{key}", data)
    return path


def test_handmade_file_matches_torch(tmp_path):
    storage = _Storage("0", 6)
    path = _handmade(tmp_path, {"w": _Tensor(storage, 0, (2, 3), (3, 1))}, {"0": np.arange(6, dtype="<f4").tobytes()})
    assert engine.load(path)["w"].tolist() == torch.load(path)["w"].tolist()


def test_cuda_location_needs_map_location(tmp_path):
    storage = _Storage("0", 2, location="cuda:0")
    path = _handmade(tmp_path, {"w": _Tensor(storage, 0, (2,), (1,))}, {"0": np.ones(2, "<f4").tobytes()})
    if not engine.cuda_available():
        with pytest.raises(CheckpointError, match="saved on cuda:0.*map_location='cpu'"):
            engine.load(path)
    assert engine.load(path, map_location="cpu")["w"].device == engine.device("cpu")
    assert engine.load(path, map_location={"cuda:0": "cpu"})["w"].tolist() == [1.0, 1.0]


class _Evil:
    def __reduce__(self):
        return os.system, ("touch pwned",)


HOSTILE = [
    ("os.system", lambda: {"x": _Evil()}, {}, r"refers to posix\.system|refers to nt\.system"),
    ("eval", lambda: {"x": _Call(eval, "1+1")}, {}, r"(__builtin__|builtins)\.eval"),
    ("getattr", lambda: {"x": _Call(getattr, 1, "real")}, {}, r"(__builtin__|builtins)\.getattr"),
    ("view past the storage", lambda: {"w": _Tensor(_Storage("0", 4), 2, (2, 2), (2, 1))}, {"0": bytes(16)},
     r"reaches element 5 of storage '0', which holds 4"),
    ("storage size lies", lambda: {"w": _Tensor(_Storage("0", 400), 0, (2,), (1,))}, {"0": bytes(16)},
     "holds 16 bytes, its record says 400 elements"),
    ("missing storage", lambda: {"w": _Tensor(_Storage("7", 4), 0, (4,), (1,))}, {}, "has no entry archive/data/7"),
    ("negative stride", lambda: {"w": _Tensor(_Storage("0", 4), 0, (2,), (-1,))}, {"0": bytes(16)}, "stride"),
]


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("kind,make,storages,message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_torch_files_are_refused(tmp_path, monkeypatch, kind, make, storages, message):
    monkeypatch.chdir(tmp_path)
    path = _handmade(tmp_path, make(), storages)
    with pytest.raises(CheckpointError, match=message) as info:
        engine.load(path)
    assert "made.pt" in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_build_on_a_tensor_is_refused(tmp_path):
    # {"w": tensor} then BUILD with a state: sets attributes on the rebuilt tensor (weights_only refuses it too)
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(_Tensor(_Storage("0", 1), 0, (1,), (1,)))
    raw = buffer.getvalue()[:-1] + pickle.EMPTY_DICT + pickle.BUILD + pickle.STOP
    path = _handmade(tmp_path, None, {"0": bytes(4)}, raw_pickle=raw)
    with pytest.raises(CheckpointError, match="sets attributes on a _Built"):
        engine.load(path)


def test_broken_torch_files(tmp_path):
    path = _handmade(tmp_path, {"w": _Tensor(_Storage("0", 1), 0, (1,), (1,))}, {"0": bytes(4)}, compress=True)
    with pytest.raises(CheckpointError, match="compressed entry"):
        engine.load(path)
    good = _torch_file(tmp_path, {"w": torch.ones(100)})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="cut.pt"):
        engine.load(cut)
    path = _handmade(tmp_path, None, {}, raw_pickle=b"\x80\x02}q\x00(X\x01\x00\x00\x00a")  # truncated pickle
    with pytest.raises(CheckpointError, match="data.pkl cannot be read"):
        engine.load(path)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        engine.load(legacy)


@pytest.mark.gpu
def test_foreign_files_load_onto_and_save_from_the_gpu(tmp_path):
    st.save_file({"w": engine.arange(4.0)}, tmp_path / "w.safetensors")
    assert st.load_file(tmp_path / "w.safetensors", device="cuda")["w"].device.type == "cuda"
    torch.save({"w": torch.arange(4.0)}, tmp_path / "w.pt")
    on_gpu = engine.load(tmp_path / "w.pt", map_location="cuda")["w"]
    assert on_gpu.device.type == "cuda" and on_gpu.tolist() == [0.0, 1.0, 2.0, 3.0]
    st.save_file({"g": engine.arange(4.0, device="cuda").bfloat16()}, tmp_path / "g.safetensors")
    assert st.load_file(tmp_path / "g.safetensors")["g"].float().tolist() == [0.0, 1.0, 2.0, 3.0]
