"""load_idx on hostile files: every failure is an IDXFormatError, fast and in bounded memory."""

import gzip
import os
import struct
import threading

import numpy as np
import pytest

from engine.data import IDXFormatError, load_idx
from tests.malformed_files import refused_in_bounded_memory


def idx_bytes(type_code=0x08, dims=(3,), data=b"\x01\x02\x03", ndim=None):
    """An IDX header claiming ``dims`` (whatever the data holds) followed by ``data``."""
    ndim = len(dims) if ndim is None else ndim
    return bytes([0, 0, type_code, ndim]) + struct.pack(f">{len(dims)}I", *dims) + data


def refused(path, limit=4 << 20, match=None):
    """load_idx(path) raises IDXFormatError naming the file, holding less than ``limit`` bytes at its peak."""
    return refused_in_bounded_memory(load_idx, path, IDXFormatError, limit, match=match)


@pytest.mark.parametrize("dims", [(1 << 16,) * 4, (2**32 - 1,) * 3, (2**32 - 1,) * 8,
                                  (0, 2**32 - 1, 2**32 - 1, 2**32 - 1), (2**31, 2**31, 2)],
                         ids=lambda d: "x".join(map(str, d)))
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_a_dimension_product_that_overflows_int64_is_refused(dims, compress, tmp_path):
    # (2**16,) * 4 is exactly 2**64 bytes: an int64 product wraps to 0 and matched an empty file
    payload = idx_bytes(dims=dims, data=b"")
    path = tmp_path / "overflow.idx"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    refused(path, match="overflows")


@pytest.mark.parametrize("ndim", [65, 100, 255])
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_too_many_dimensions_are_refused(ndim, compress, tmp_path):
    payload = idx_bytes(dims=(1,) * ndim, data=b"\x07")
    path = tmp_path / "dims.idx"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    refused(path, match="dimensions")


@pytest.mark.parametrize("ndim", [0, 1, 64])
def test_edge_dimension_counts_load(ndim, tmp_path):
    path = tmp_path / "edge.idx"
    path.write_bytes(idx_bytes(dims=(1,) * ndim, data=b"\x07"))
    array = load_idx(path)
    assert array.shape == (1,) * ndim and array.dtype == np.uint8 and array.reshape(-1)[0] == 7


@pytest.mark.parametrize("dims, type_code", [((3 << 30,), 0x08), ((1 << 30, 3), 0x0E), ((60000, 28, 28), 0x08),
                                             ((2**32 - 1,), 0x0D)], ids=str)
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_a_small_file_claiming_a_huge_array_allocates_nothing(dims, type_code, compress, tmp_path):
    payload = idx_bytes(type_code=type_code, dims=dims, data=bytes(200))
    path = tmp_path / "claim.idx"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    refused(path, limit=1 << 20, match="truncated")


def test_a_gzip_bomb_inflates_no_more_than_the_header_claims(tmp_path):
    path = tmp_path / "bomb.idx.gz"
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(idx_bytes(dims=(10,), data=bytes(10)))
        zeros = bytes(1 << 20)
        for _ in range(128):  # 128 MiB more than claimed, in a file of about 128 KiB
            out.write(zeros)
    assert path.stat().st_size < 1 << 20
    refused(path, limit=1 << 20, match="longer than its header says")


def test_a_gzip_bomb_claiming_its_size_honestly_is_read_as_it_comes(tmp_path):
    # 16 MiB of zeros fits in a 16 KiB gzip file: a valid file, read as the data comes
    path = tmp_path / "honest.idx.gz"
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(idx_bytes(dims=(16 << 20,), data=bytes(16 << 20)))
    assert load_idx(path).shape == (16 << 20,)


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_devices_fifos_and_directories_are_refused_without_reading(special, tmp_path):
    fifo = tmp_path / "fifo.idx"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.idx"
    folder.mkdir()
    link = tmp_path / "link.idx"
    link.symlink_to(special)
    for path in (special, fifo, folder, link):
        if not os.path.exists(path):
            continue
        outcome = []
        thread = threading.Thread(target=lambda p=path: outcome.append(_raises(p)), daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), f"load_idx({path}) did not return"
        assert isinstance(outcome[0], IDXFormatError) and "not a regular file" in str(outcome[0]), outcome


def _raises(path):
    try:
        load_idx(path)
    except Exception as exc:  # noqa: BLE001 - handed to the test
        return exc
    return None


@pytest.mark.parametrize("content", [b"", b"\x00", b"\x00\x00\x08", b"\x01\x00\x08\x01", b"\x1f\x8b", b"\x1f\x8b\x08",
                                     b"\x1f\x8bgarbage-after-the-gzip-magic", gzip.compress(b"")[:-1],
                                     gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01x") + b"trailing",
                                     idx_bytes(type_code=0x0A), idx_bytes(type_code=0xFF), idx_bytes(ndim=3)],
                         ids=lambda c: c[:12].hex() or "empty")
def test_wrong_magic_bad_types_and_broken_gzip_are_refused(content, tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(content)
    refused(path)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.slow
def test_every_cut_and_flipped_byte_gives_idx_format_error_or_an_array(compress, tmp_path):
    array = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    payload = idx_bytes(type_code=0x0B, dims=array.shape, data=array.tobytes())
    original = gzip.compress(payload) if compress else payload
    path = tmp_path / "fuzz.idx"
    refusals = 0
    variants = [original[:cut] for cut in range(len(original))]
    for at in range(len(original)):
        for mask in (0x01, 0x80, 0xFF):
            flipped = bytearray(original)
            flipped[at] ^= mask
            variants.append(bytes(flipped))
    for content in variants:
        path.write_bytes(content)
        try:
            load_idx(path)
        except IDXFormatError as exc:
            assert str(path) in str(exc)
            refusals += 1
    assert refusals >= len(original)  # every cut at least
