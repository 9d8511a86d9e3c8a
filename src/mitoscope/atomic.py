"""Atomic file writes: a reader sees the old file or the whole new one, never a partial file.

Every writer goes to a hidden temporary file in the destination's own folder (so the final
``os.replace`` stays on one filesystem and is atomic), then replaces the destination. On any
failure the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "sha256_file",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "to_jsonable",
]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _new_temp_file(path: Path) -> Path:
    # The original suffix is kept last so that writers which infer the format from the
    # extension (matplotlib, PIL) still do the right thing.
    token = secrets.token_hex(8)
    temp = path.with_name(f".{path.stem}.{token}.tmp{path.suffix}")
    # O_EXCL: never reuse someone else's file; mode 0o666 lets the umask decide the final
    # permissions, as for any ordinary file (mkstemp would make it 0o600).
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    return temp


def _fsync_file(path: Path) -> None:
    # Without fsync a crash just after os.replace can leave an empty file on some filesystems.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``.

    The temporary file already exists (empty) when yielded; the caller overwrites it by
    any means (``torch.save``, ``safetensors.save_file``, ``Figure.savefig``...). If the
    ``with`` block raises, the temporary file is removed and ``path`` is untouched.
    The destination folder must exist.
    """
    destination = Path(path)
    temp = _new_temp_file(destination)
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, destination)
    except BaseException:
        # BaseException too: an interrupted write (Ctrl-C) must not leave litter behind.
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path`` as a ``Path``."""
    destination = Path(path)
    with atomic_path(destination) as temp:
        with open(temp, "wb") as handle:
            handle.write(data)
    return destination


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; return ``path`` as a ``Path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
    """Return a copy of ``obj`` that the standard ``json`` module can write as strict JSON.

    NumPy scalars and arrays become Python numbers and lists, tuples become lists, paths
    become strings, and NaN or infinite floats become ``None`` (JSON has no NaN: ``null``
    is the only portable "no value"). Anything else that JSON cannot hold raises
    ``TypeError`` naming its type.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return [to_jsonable(item) for item in obj.tolist()]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(item) for item in obj]
    raise TypeError(f"cannot write an object of type {type(obj).__name__} as JSON")


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (see ``to_jsonable``) to ``path`` atomically."""
    # Serialise before touching the disk: an unserialisable object leaves no file at all.
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")
