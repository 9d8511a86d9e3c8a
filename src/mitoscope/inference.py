"""Prediction without PyTorch or scikit-learn: a saved window-feature model served with numpy.

Importing torch takes about 4 s on this project's 2-core CPU and scikit-learn with skops
another 3 s, more than a whole 4K prediction should. A saved model whose backbone has an
ONNX export (made when it was trained or first run here) is therefore served by:

- the export in OpenVINO or ONNX Runtime (:mod:`mitoscope.engines`), in the engine that the
  verdicts remembered beside the export allow (:func:`mitoscope.engines.served_engine`),
  with numpy pre- and post-processing (:mod:`mitoscope.array_features`);
- the head evaluated from arrays: the dense and attention networks from their safetensors
  weights, the forest and the pooled head's logistic regression from the plain arrays
  :func:`mitoscope.heads.save_head` writes beside their skops files. These are the fitted
  models' own numbers (the forest's float32 inputs against its float64 thresholds, as
  scikit-learn compares them), and the tests hold each against its PyTorch or
  scikit-learn head.

:meth:`ServedModel.load` raises :class:`NotServable` for anything it does not cover (a
fine-tuned network, a model saved before the arrays were written, no export yet or no engine
checked against PyTorch on it, windows that need resizing); :func:`mitoscope.predictions.predict`
then uses the full pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .array_features import ArrayExtractor
from .artifacts import ModelDescription, read_model_config, verify_model_files
from .cache import FeatureCache, ImageFeatures, extract_dataset
from .engines import EXPORTED_ENGINES, NeedsPyTorch, onnx_path, open_exported, resolve_engine, served_engine
from .errors import InputError, ModelError
from .io import ReadOptions, read_image

__all__ = ["FOREST_ARRAYS", "POOLED_ARRAYS", "NotServable", "ServedModel", "combine_ensemble", "load_array_head"]

# The arrays files save_head writes beside a forest's and a pooled head's skops file.
FOREST_ARRAYS = ".trees.safetensors"
POOLED_ARRAYS = ".arrays.safetensors"


class NotServable(Exception):
    """This model (or this input) needs the full PyTorch/scikit-learn pipeline; says why."""


def combine_ensemble(p_dense: np.ndarray, p_forest: np.ndarray, dense_weight: float = 1.1) -> np.ndarray:
    """The write-up's vote between the dense and the forest model, image by image.

    If both models give the same label (at 0.5), that label stands; otherwise the more
    confident model wins, confidence being ``|p - 0.5| * 2``, the dense model's multiplied by
    ``dense_weight`` (ties go to the dense model). The ensemble's probability is the winning
    model's probability. When the models agree, the winner (the more confident one) gives the
    same label, so "take the probability of the model with the larger weighted confidence"
    is the whole rule.
    """
    p_dense = np.asarray(p_dense, dtype=np.float64)
    p_forest = np.asarray(p_forest, dtype=np.float64)
    if p_dense.shape != p_forest.shape:
        raise InputError(
            f"expected member probabilities of the same shape, got {p_dense.shape} "
            f"and {p_forest.shape}"
        )
    dense_confidence = np.abs(p_dense - 0.5) * 2.0 * dense_weight
    forest_confidence = np.abs(p_forest - 0.5) * 2.0
    return np.where(dense_confidence >= forest_confidence, p_dense, p_forest)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


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


def _tensors(path: Path, expected: Mapping[str, tuple[int, ...] | None]) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file, each checked against its expected shape (None: any)."""
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


def _concat(bags: Sequence[np.ndarray], n_windows: int, n_features: int, head: str) -> np.ndarray:
    for bag in bags:
        if bag.shape != (n_windows, n_features):
            raise InputError(f"{head} head: expected {n_windows} windows of {n_features} features per image "
                             f"(the training grid), got {bag.shape[0]} of {bag.shape[1]}")
    return np.stack([np.asarray(bag, dtype=np.float32).reshape(-1) for bag in bags])


def _standardise(x: np.ndarray, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    return (x - arrays["mean"]) / arrays["std"]


class DenseArrays:
    """:class:`mitoscope.heads.DenseHead` at inference: standardise -> Linear + ReLU -> Linear -> sigmoid."""

    def __init__(self, path: Path, state: Mapping[str, Any], hidden: int) -> None:
        self.n_windows, self.n_features = int(state["n_windows_"]), int(state["n_features_in_"])
        n = self.n_windows * self.n_features
        self.arrays = _tensors(path, {"mean": (n,), "std": (n,), "hidden.weight": (hidden, n), "hidden.bias": (hidden,),
                                      "output.weight": (1, hidden), "output.bias": (1,)})

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        a = self.arrays
        x = _standardise(_concat(bags, self.n_windows, self.n_features, "dense"), a)
        hidden = np.maximum(x @ a["hidden.weight"].T + a["hidden.bias"], 0)
        return _sigmoid((hidden @ a["output.weight"].T + a["output.bias"])[:, 0].astype(np.float64))


class ForestArrays:
    """:class:`mitoscope.heads.ForestHead` at inference: every tree walked at once, as flat arrays."""

    def __init__(self, path: Path, state: Mapping[str, Any]) -> None:
        self.n_windows, self.n_features = int(state["n_windows_"]), int(state["n_features_in_"])
        a = _tensors(path, {"roots": None, "feature": None, "threshold": None, "left": None, "right": None,
                            "positive": None})
        nodes = len(a["feature"])
        if any(len(a[key]) != nodes for key in ("threshold", "left", "right", "positive")) or not len(a["roots"]):
            raise ModelError(f"{path}: expected node arrays of one length and at least one tree")
        inner = a["left"] >= 0
        if (a["roots"].min() < 0 or a["roots"].max() >= nodes
                or (inner & ((a["right"] < 0) | (a["left"] >= nodes) | (a["right"] >= nodes))).any()
                or (inner & ((a["feature"] < 0) | (a["feature"] >= self.n_windows * self.n_features))).any()):
            raise ModelError(f"{path}: tree arrays point outside the trees or the features; the file is damaged")
        self.arrays = a

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        a = self.arrays
        x = _concat(bags, self.n_windows, self.n_features, "forest")
        rows = np.arange(len(x))[:, None]
        nodes = np.broadcast_to(a["roots"], (len(x), len(a["roots"]))).copy()
        for _ in range(len(a["feature"])):  # at most one step per node; trees end far sooner
            inner = a["left"][nodes] >= 0
            if not inner.any():
                break
            # scikit-learn compares the float32 input with the float64 threshold: x <= t goes left.
            values = x[rows, np.where(inner, a["feature"][nodes], 0)].astype(np.float64)
            step = np.where(values <= a["threshold"][nodes], a["left"][nodes], a["right"][nodes])
            nodes = np.where(inner, step, nodes)
        return a["positive"][nodes].sum(axis=1) / nodes.shape[1]


class EnsembleArrays:
    def __init__(self, dense: DenseArrays, forest: ForestArrays, dense_weight: float) -> None:
        self.dense, self.forest, self.dense_weight = dense, forest, float(dense_weight)

    def members(self, bags: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return {"dense": self.dense.predict_proba(bags), "forest": self.forest.predict_proba(bags)}

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        members = self.members(bags)
        return combine_ensemble(members["dense"], members["forest"], self.dense_weight)


def mean_max_pool(bags: Sequence[np.ndarray]) -> np.ndarray:
    """Mean and max of the windows of each image: ``(n_images, 2 * D)`` (the pooled head's input)."""
    return np.stack([np.concatenate([bag.mean(axis=0), bag.max(axis=0)]) for bag in bags])


class PooledArrays:
    """:class:`mitoscope.heads.PooledHead` at inference: mean+max pooling -> StandardScaler -> logistic."""

    def __init__(self, path: Path, state: Mapping[str, Any]) -> None:
        self.n_features = int(state["n_features_in_"])
        n = 2 * self.n_features
        self.arrays = _tensors(path, {"scaler_mean": (n,), "scaler_scale": (n,), "coef": (1, n), "intercept": (1,)})

    def _decision(self, pooled: np.ndarray) -> np.ndarray:
        # scikit-learn keeps float32 input in float32 (scaled in place); the rest agrees to that rounding.
        x = np.array(pooled, dtype=np.float32)
        x -= self.arrays["scaler_mean"]
        x /= self.arrays["scaler_scale"]
        return (x @ self.arrays["coef"].T + self.arrays["intercept"])[:, 0]

    def _check(self, bags: Sequence[np.ndarray]) -> None:
        for bag in bags:
            if bag.ndim != 2 or bag.shape[1] != self.n_features or not len(bag):
                raise InputError(f"pooled head: expected windows of {self.n_features} features, got {bag.shape}")

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        self._check(bags)
        return _sigmoid(self._decision(mean_max_pool(bags)))

    def window_scores(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
        self._check(bags)
        return [self._decision(np.hstack([bag, bag])) for bag in bags]


class AttentionArrays:
    """:class:`mitoscope.heads.AttentionHead` at inference (gated attention, one image at a time)."""

    def __init__(self, path: Path, state: Mapping[str, Any], hidden: int, attention_dim: int) -> None:
        self.n_features = int(state["n_features_in_"])
        d, width = self.n_features, (hidden or self.n_features)
        expected: dict[str, tuple[int, ...]] = {
            "mean": (d,), "std": (d,), "attention_v.weight": (attention_dim, width), "attention_v.bias": (attention_dim,),
            "attention_u.weight": (attention_dim, width), "attention_u.bias": (attention_dim,),
            "attention_w.weight": (1, attention_dim), "attention_w.bias": (1,), "classifier.weight": (1, width),
            "classifier.bias": (1,)}
        if hidden:
            expected.update({"encoder.0.weight": (hidden, d), "encoder.0.bias": (hidden,)})
        self.hidden = hidden
        self.arrays = _tensors(path, expected)

    def _run(self, bag: np.ndarray) -> tuple[float, np.ndarray]:
        a = self.arrays
        if bag.ndim != 2 or bag.shape[1] != self.n_features or not len(bag):
            raise InputError(f"attention head: expected windows of {self.n_features} features, got {bag.shape}")
        h = _standardise(np.asarray(bag, dtype=np.float32), a)
        if self.hidden:
            h = np.maximum(h @ a["encoder.0.weight"].T + a["encoder.0.bias"], 0)
        gate = np.tanh(h @ a["attention_v.weight"].T + a["attention_v.bias"]) * _sigmoid(
            h @ a["attention_u.weight"].T + a["attention_u.bias"])
        logits = (gate @ a["attention_w.weight"].T + a["attention_w.bias"])[:, 0]
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        bag_logit = float((weights @ h) @ a["classifier.weight"][0] + a["classifier.bias"][0])
        return float(_sigmoid(np.float64(bag_logit))), weights

    def predict_proba(self, bags: Sequence[np.ndarray]) -> np.ndarray:
        return np.array([self._run(bag)[0] for bag in bags])

    def window_scores(self, bags: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self._run(bag)[1] for bag in bags]


def load_array_head(directory: str | Path, spec: Mapping[str, Any]) -> Any:
    """The head of ``spec`` (as :func:`mitoscope.heads.save_head` wrote it) as arrays.

    Raises :class:`NotServable` for a head saved without its arrays, :class:`ModelError` for
    a damaged one.
    """
    directory = Path(directory)
    if not isinstance(spec, Mapping):
        raise ModelError(f"head spec: expected an object, got {type(spec).__name__}")
    cls, params, state, files = spec.get("class"), spec.get("params") or {}, spec.get("state") or {}, spec.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) and Path(f).name == f for f in files):
        raise ModelError(f"head spec for {cls}: expected a list of plain file names, got {files!r}")

    def only_file(suffix: str) -> Path:
        matching = [f for f in files if f.endswith(suffix)]
        if len(matching) != 1:
            raise NotServable(f"{cls} saved without its {suffix} file (saved by an older mitoscope)")
        return directory / matching[0]

    try:
        if cls == "DenseHead":
            return DenseArrays(only_file(".safetensors"), state, int(params.get("hidden", 128)))
        if cls == "ForestHead":
            return ForestArrays(only_file(FOREST_ARRAYS), state)
        if cls == "PooledHead":
            return PooledArrays(only_file(POOLED_ARRAYS), state)
        if cls == "AttentionHead":
            return AttentionArrays(only_file(".safetensors"), state, int(params.get("hidden", 128)),
                                   int(params.get("attention_dim", 128)))
        if cls == "EnsembleHead":
            members = spec.get("members")
            if not isinstance(members, Mapping) or set(members) != {"dense", "forest"}:
                raise ModelError("head spec for EnsembleHead: expected members 'dense' and 'forest'")
            return EnsembleArrays(load_array_head(directory, members["dense"]),
                                  load_array_head(directory, members["forest"]), float(params.get("dense_weight", 1.1)))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelError(f"{directory}: head spec for {cls} is incomplete ({type(error).__name__}: {error})") from None
    raise NotServable(f"head class {cls!r} has no array form")


class ServedModel(ModelDescription):
    """A saved window-feature model run from its backbone's export and its head's arrays.

    Offers :meth:`predict_paths` as :class:`mitoscope.pipeline.MitoscopeModel` does, with the
    same feature cache entries.
    """

    def __init__(self, config: dict[str, Any], head: Any, export: Path, engine: str) -> None:
        self.config = config
        self.head = head
        self.export = export
        self.engine = engine
        self._extractor: ArrayExtractor | None = None
        self._files_verified = False

    @classmethod
    def load(cls, model_dir: str | Path, max_pixels: int | None = None, engine: str = "auto") -> "ServedModel":
        """``engine``: auto (OpenVINO, else ONNX Runtime, whichever passed its check), or an exported
        engine (raises InputError if it was rejected); torch is NotServable."""
        # The files' hashes are checked by predict_paths, while OpenVINO starts (see there).
        config = read_model_config(model_dir, verify_files=False)
        if config.get("kind") != "window-features":
            raise NotServable(f"model kind {config.get('kind')!r} runs in PyTorch")
        backbone, tiling = config["backbone"], config["tiling"]
        if int(tiling["window"]) != int(backbone["input_size"]):
            raise NotServable(f"windows of {tiling['window']} px are resized to {backbone['input_size']} px in PyTorch")
        chosen = resolve_engine(engine, "cpu")
        if chosen not in EXPORTED_ENGINES:
            raise NotServable("engine torch asked for" if engine == "torch"
                              else "neither OpenVINO nor ONNX Runtime is installed")
        export = onnx_path(backbone["name"], backbone["weights_sha256"])
        if not export.is_file():
            raise NotServable(f"no ONNX export of {backbone['name']} yet (made on the first PyTorch run)")
        try:
            chosen = served_engine(export, engine)
        except NeedsPyTorch as reason:  # a check to make, or PyTorch to run: the full pipeline does both
            raise NotServable(str(reason)) from None
        head = load_array_head(Path(model_dir), config["head"]["spec"])
        config["_model_dir"] = str(Path(model_dir).resolve())
        model = cls(config, head, export, chosen)
        model.limit_pixels(max_pixels)
        return model

    def extractor(self, batch_size: int = 32) -> ArrayExtractor:
        if self._extractor is None:
            backbone, tiling = self.config["backbone"], self.config["tiling"]
            self._extractor = ArrayExtractor(
                open_exported(self.export, self.engine), tiling["window"], tiling["overlap"], backbone["input_size"],
                backbone["mean"], backbone["std"], batch_size, tiling.get("extraction", "windows"),
                backbone_name=backbone["name"], weights_id=backbone["weights_sha256"])
        return self._extractor

    def predict_paths(self, paths: Sequence[str | Path], cache: FeatureCache | None = None,
                      progress: Callable[[str, int, int], None] | None = None, batch_size: int = 32,
                      device: str | None = None, with_window_scores: bool = False, engine: str = "auto",
                      skip_bad: bool = False) -> Any:
        """Predict image files; with ``skip_bad`` an image that cannot be read is left out and listed
        in the result's ``skipped`` instead of raising InputError."""
        from .predictions import Predictions

        if device not in (None, "cpu"):
            raise NotServable(f"device {device}: served on the CPU only")
        if engine not in ("auto", self.engine):
            raise NotServable(f"engine {engine} asked for, this model is served by {self.engine}")
        paths = [Path(p) for p in paths]
        options = self.read_options
        with ThreadPoolExecutor(max_workers=2) as pool:
            # While OpenVINO starts and compiles: decode the first image, and hash the model's
            # files (0.4 s for a dense head's 430 MB; both free the GIL). A damaged model file
            # stops here, before any features are computed.
            first = pool.submit(read_image, paths[0], options) if paths else None
            verified = (None if self._files_verified
                        else pool.submit(verify_model_files, self.config["_model_dir"], self.config))
            self.extractor(batch_size).warm_up(self.fixed_size)
            if verified is not None:
                verified.result()
                self._files_verified = True

            def read(path: Path, read_options: ReadOptions) -> np.ndarray:
                if first is not None and path == paths[0] and read_options is options:
                    return first.result()
                return read_image(path, read_options)

            on_progress = (lambda done, total: progress("features", done, total)) if progress else None
            skipped: dict[Path, str] | None = {} if skip_bad else None
            feats: list[ImageFeatures] = extract_dataset(paths, self.extractor(batch_size), options, cache,
                                                         progress=on_progress, read=read, skipped=skipped)
        skipped = skipped or {}
        paths = [path for path in paths if path not in skipped]
        if not paths:
            return Predictions(paths=[], proba=np.zeros(0), members={}, notes=[], skipped=skipped)
        fixed = self.fixed_size
        if fixed is not None:
            for path, f in zip(paths, feats):
                if tuple(f.image_size) != fixed:  # resized in PyTorch, as at training
                    raise NotServable(f"{path} is {f.image_size[1]}x{f.image_size[0]}, the model's grid "
                                      f"{fixed[1]}x{fixed[0]}: resized in PyTorch")
        bags = [f.features for f in feats]
        proba = np.asarray(self.head.predict_proba(bags), dtype=np.float64)
        members = self.head.members(bags) if hasattr(self.head, "members") else {}
        scores = None
        if with_window_scores and hasattr(self.head, "window_scores"):
            scores = [np.asarray(s, dtype=np.float64) for s in self.head.window_scores(bags)]
        return Predictions(paths=paths, proba=proba, members=members, notes=[""] * len(paths), window_scores=scores,
                           boxes=[f.boxes for f in feats], image_sizes=[tuple(f.image_size) for f in feats],
                           skipped=skipped)
