"""Tests for mitoscope.atomic: whole files or nothing, and no temporary files left behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mitoscope.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    to_jsonable,
)


def test_write_bytes_and_text_replace_the_file(tmp_path):
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"old")
    assert atomic_write_bytes(target, b"new") == target
    assert target.read_bytes() == b"new"
    atomic_write_text(tmp_path / "note.txt", "héllo")
    assert (tmp_path / "note.txt").read_text(encoding="utf-8") == "héllo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "note.txt"]


def test_atomic_path_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"complete old file")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as temp:
            assert temp.parent == tmp_path and temp.suffix == ".safetensors"
            temp.write_bytes(b"half a fi")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"complete old file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_atomic_path_interrupt_leaves_no_temp(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "x.json"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_success_uses_normal_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    with atomic_path(tmp_path / "out.png") as temp:
        temp.write_bytes(b"png")
    mode = (tmp_path / "out.png").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask


def test_unserialisable_json_writes_nothing(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError, match="object"):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_to_jsonable_gives_strict_json():
    value = to_jsonable({
        "f": np.float32(0.5), "i": np.int64(3), "b": np.bool_(True), "nan": np.nan,
        "inf": float("inf"), "a": np.array([[1, 2]]), "t": (1, np.float64(np.nan)), 4: "key",
    })
    assert value == {"f": 0.5, "i": 3, "b": True, "nan": None, "inf": None,
                     "a": [[1, 2]], "t": [1, None], "4": "key"}
    json.dumps(value, allow_nan=False)
