"""Results files: exact round trip, no pickle, damaged files give clear errors."""

from __future__ import annotations

import pytest

import lensbench as lb


@pytest.fixture()
def saved(tiny, tmp_path):
    res = lb.logit_lens(tiny("llama"), "hello world, the fox", progress=False)
    return res, res.save(tmp_path / "res.safetensors")


def test_file_has_no_pickle(saved):
    _, path = saved
    data = path.read_bytes()
    assert b"lensbench-result/1" in data[:4096]
    assert b"\x80\x04\x95" not in data and b"torch._utils" not in data  # no pickle protocol header


def test_flipped_byte_fails_checksum(saved):
    res, path = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(lb.LensbenchError, match="checksum|corrupted"):
        lb.Result.load(path)


def test_truncated_file(saved):
    _, path = saved
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(lb.LensbenchError, match="damaged or truncated"):
        lb.Result.load(path)


def test_wrong_class_and_missing(saved, tmp_path):
    _, path = saved
    with pytest.raises(lb.LensbenchError, match="not a LensSweepResult"):
        lb.LensSweepResult.load(path)
    with pytest.raises(lb.LensbenchError, match="no results file"):
        lb.Result.load(tmp_path / "nope.safetensors")
