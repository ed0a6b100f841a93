"""torch.save / torch.load compatibility: weights_only, map_location's forms, file objects."""

import io

import numpy as np
import pytest

import engine as torch
from engine import nn
from engine.io import CheckpointError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        np.testing.assert_array_equal(np.asarray(sa[k].numpy() if hasattr(sa[k], "numpy") else sa[k]),
                                      np.asarray(sb[k].numpy() if hasattr(sb[k], "numpy") else sb[k]))


@pytest.mark.parametrize("weights_only", [True, False, None])
def test_state_dict_round_trip_with_weights_only(tmp_path, weights_only):
    model, other = _model(), nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    other.load_state_dict(torch.load(path, weights_only=weights_only))
    _same_state(model, other)


def test_weights_only_must_be_a_bool(tmp_path):
    torch.save({"a": 1}, tmp_path / "c.pt")
    with pytest.raises(TypeError, match="weights_only"):
        torch.load(tmp_path / "c.pt", weights_only="yes")
    with pytest.raises(CheckpointError, match="mmap=True"):
        torch.load(tmp_path / "c.pt", mmap=True)
    assert torch.load(tmp_path / "c.pt", mmap=False, pickle_module=None, encoding="latin1") == {"a": 1}


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu"), {"cuda:0": "cpu"}, {"cpu": "cpu"},
                                          lambda storage, loc: storage, lambda storage, loc: None])
def test_map_location_forms(tmp_path, map_location):
    state = {"w": torch.randn(3, 2), "n": np.arange(3)}
    torch.save(state, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", map_location=map_location, weights_only=True)
    assert loaded["w"].device == torch.device("cpu")
    np.testing.assert_array_equal(loaded["w"].numpy(), state["w"].numpy())
    np.testing.assert_array_equal(loaded["n"], state["n"])


def test_map_location_callable_sees_the_saved_location(tmp_path):
    torch.save([torch.ones(2), torch.zeros(3)], tmp_path / "c.pt")
    seen = []

    def where(storage, loc):
        seen.append((tuple(storage.shape), loc))
        return storage

    torch.load(tmp_path / "c.pt", map_location=where)
    assert seen == [((2,), "cpu"), ((3,), "cpu")]
    with pytest.raises(CheckpointError, match="map_location returned a str"):
        torch.load(tmp_path / "c.pt", map_location=lambda s, loc: "cpu")
    with pytest.raises(CheckpointError, match="raised ZeroDivisionError"):
        torch.load(tmp_path / "c.pt", map_location=lambda s, loc: 1 / 0)


def test_map_location_cuda_string_is_parsed_and_refused_without_a_gpu(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "c.pt")
    if torch.cuda_available():
        pytest.skip("this machine has a GPU")
    for location in ("cuda", "cuda:0"):
        with pytest.raises(CheckpointError, match="map_location='cpu'"):
            torch.load(tmp_path / "c.pt", map_location=location)
    with pytest.raises(CheckpointError, match="not a device"):
        torch.load(tmp_path / "c.pt", map_location="tpu")


def test_bytesio_round_trip():
    model, other = _model(), nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    _same_state(model, other)


def test_open_file_objects_and_an_offset(tmp_path):
    path = tmp_path / "c.pt"
    with open(path, "wb") as f:
        f.write(b"prefix")  # a checkpoint need not start at byte 0 of the stream
        torch.save({"x": torch.arange(5), "tag": "hi"}, f)
    with open(path, "rb") as f:
        f.seek(6)
        loaded = torch.load(f, map_location="cpu")
    assert loaded["tag"] == "hi" and loaded["x"].tolist() == [0, 1, 2, 3, 4]


def test_unseekable_stream():
    buffer = io.BytesIO()
    torch.save({"y": np.ones(3)}, buffer)

    class Stream(io.RawIOBase):
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self.data.read(len(b))
            b[:len(chunk)] = chunk
            return len(chunk)

    assert torch.load(Stream(buffer.getvalue()))["y"].tolist() == [1.0, 1.0, 1.0]


def test_bad_file_objects_are_named():
    with pytest.raises(CheckpointError, match=r"<BytesIO> is not an engine checkpoint"):
        torch.load(io.BytesIO(b"not a zip at all"))
    with pytest.raises(CheckpointError, match="text mode"):
        torch.load(io.StringIO("x"))
    with pytest.raises(TypeError, match="text mode"):
        torch.save({}, io.StringIO())
    closed = io.BytesIO()
    closed.close()
    with pytest.raises(CheckpointError, match="<BytesIO>"):
        torch.load(closed)
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    data = bytearray(buffer.getvalue())
    data[len(data) // 3] ^= 0xFF
    with pytest.raises(CheckpointError, match="<BytesIO>"):
        torch.load(io.BytesIO(bytes(data)))
