"""The files of a saved head, without pickle: torch tensors and plain arrays as safetensors,
scikit-learn models as skops files whose types are checked before loading.

Nothing here imports PyTorch or scikit-learn at import time (serving reads arrays with numpy
alone); the writers and the skops reader import what they need when called.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mitoscope.errors import InputError, ModelError

if TYPE_CHECKING:
    from torch import nn

# Module prefixes of the types a skops file may contain before we agree to load it.
_TRUSTED_SKOPS_PREFIXES = ("sklearn.", "numpy.")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temp)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def check_file_name(name: str) -> None:
    if not name or Path(name).name != name or name.startswith("."):
        raise InputError(f"expected a plain file name for the head files, got {name!r}")


def spec_state(spec: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The spec's ``state`` with ``keys`` present (``n_*`` keys positive integers)."""
    state = spec.get("state")
    class_name = spec.get("class")
    if not isinstance(state, Mapping):
        raise ModelError(f"head spec for {class_name}: expected a 'state' object, got {state!r}")
    missing = [key for key in keys if key not in state]
    if missing:
        raise ModelError(f"head spec for {class_name}: missing state {', '.join(missing)}")
    for key in keys:
        if key.startswith("n_") and not (isinstance(state[key], int) and state[key] > 0):
            raise ModelError(
                f"head spec for {class_name}: expected a positive integer {key}, got {state[key]!r}"
            )
    return dict(state)


# --------------------------------------------------------------------------------------------
# safetensors: torch networks (training) and plain arrays (both)
# --------------------------------------------------------------------------------------------


def save_tensors(network: nn.Module, path: Path, class_name: str) -> None:
    from safetensors.torch import save_file

    tensors = {
        key: value.detach().cpu().contiguous().clone()
        for key, value in network.state_dict().items()
    }
    atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata={"class": class_name}))


def load_tensors(network: nn.Module, path: Path) -> nn.Module:
    """Load ``path`` into ``network`` (built with the expected shapes), which then holds the file's tensors."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise ModelError(f"{path}: head weights file is missing")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own and OS errors for broken files
        raise ModelError(f"{path}: not a readable safetensors file ({one_line(error)})") from error
    expected = network.state_dict()
    if set(tensors) != set(expected):
        raise ModelError(
            f"{path}: expected tensors {sorted(expected)}, got {sorted(tensors)}"
        )
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"{path}: expected tensor {key} of shape {tuple(expected[key].shape)}, "
                f"got {tuple(tensor.shape)}"
            )
    network.load_state_dict(tensors, assign=True)  # the file's tensors become the weights
    network.eval()
    return network


def save_arrays(arrays: Mapping[str, np.ndarray], path: Path, class_name: str) -> None:
    from safetensors.numpy import save_file

    tensors = {key: np.ascontiguousarray(value) for key, value in arrays.items()}
    atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata={"class": class_name}))


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only memory maps: nothing is copied, so a
    dense head's 430 MB layer costs neither a read into memory nor the memory itself."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if not 0 < header_len <= size - 8:
            raise ValueError(f"header of {header_len} bytes does not fit in a file of {size} bytes")
        header = json.loads(handle.read(header_len))
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        shape = tuple(int(v) for v in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= size - 8 - header_len:
            raise ValueError(f"tensor {key} does not fit its place in the file")
        out[key] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + begin, shape=shape)
                    if count else np.zeros(shape, dtype))
    return out


def read_arrays(path: Path, expected: Mapping[str, tuple[int, ...] | None]) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file (memory-mapped), each checked against its expected shape (None: any)."""
    if not path.is_file():
        raise ModelError(f"{path}: head file is missing")
    try:
        tensors = map_safetensors(path)
    except (OSError, ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise ModelError(f"{path}: not a readable safetensors file ({' '.join(str(error).split())[:200]})") from None
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ModelError(f"{path}: expected arrays {sorted(expected)}, missing {missing}")
    for key, shape in expected.items():
        if shape is not None and tuple(tensors[key].shape) != tuple(shape):
            raise ModelError(f"{path}: expected array {key} of shape {tuple(shape)}, got {tuple(tensors[key].shape)}")
    return tensors


# --------------------------------------------------------------------------------------------
# skops: scikit-learn models (training)
# --------------------------------------------------------------------------------------------


def save_sklearn(model: Any, path: Path) -> list[str]:
    """Write ``model`` with skops; return the types a load must trust (kept in the spec)."""
    import skops.io

    atomic_write(path, lambda temp: skops.io.dump(model, temp))
    return sorted(skops.io.get_untrusted_types(file=path))


def load_sklearn(path: Path, expected_type: type, n_features: int, types: Sequence[str] | None = None) -> Any:
    """Load a skops file trusting only scikit-learn/numpy types: ``types`` (recorded at save) when
    given, so the file is parsed once; skops refuses a file holding any other type."""
    import skops.io

    if not path.is_file():
        raise ModelError(f"{path}: head model file is missing")
    if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
        raise ModelError(f"{path}: expected the head spec's skops_types to be a list of type names, got {types!r}")
    try:
        untrusted = list(types) if types is not None else skops.io.get_untrusted_types(file=path)
    except Exception as error:  # a broken zip or JSON schema surfaces as many error types
        raise ModelError(f"{path}: not a readable skops file ({one_line(error)})") from error
    foreign = [name for name in untrusted if not name.startswith(_TRUSTED_SKOPS_PREFIXES)]
    if foreign:
        raise ModelError(
            f"{path}: expected only scikit-learn/numpy types, got {', '.join(sorted(foreign))}"
        )
    try:
        model = skops.io.load(path, trusted=untrusted)
    except Exception as error:
        raise ModelError(f"{path}: not a readable skops file ({one_line(error)})") from error
    if not isinstance(model, expected_type):
        raise ModelError(
            f"{path}: expected a {expected_type.__name__}, got {type(model).__name__}"
        )
    if getattr(model, "n_features_in_", None) != n_features:
        raise ModelError(
            f"{path}: expected a model of {n_features} input features, "
            f"got {getattr(model, 'n_features_in_', None)}"
        )
    return model
