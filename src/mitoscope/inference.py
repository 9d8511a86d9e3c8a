"""Prediction without PyTorch or scikit-learn: a saved window-feature model served with numpy.

Importing torch takes about 4 s on this project's 2-core CPU and scikit-learn with skops
another 3 s, more than a whole 4K prediction should. A saved model whose backbone has an
ONNX export (made when it was trained or first run here) is therefore served by:

- the export in OpenVINO or ONNX Runtime (:mod:`mitoscope.engines`), in the engine that the
  verdicts remembered beside the export allow (:func:`mitoscope.engines.served_engine`),
  with numpy pre- and post-processing (:mod:`mitoscope.array_features`);
- the head in its numpy serving form, which the head's own module in :mod:`mitoscope.heads`
  provides (:func:`mitoscope.heads.registry.load_served`): the dense and attention networks
  from their safetensors weights, the forest and the pooled head's logistic regression from
  the plain arrays :func:`mitoscope.heads.save_head` writes beside their skops files. These
  are the fitted models' own numbers (the forest's float32 inputs against its float64
  thresholds, as scikit-learn compares them), and the tests hold each against its PyTorch or
  scikit-learn head. This module implements no head.

:meth:`ServedModel.load` raises :class:`NotServable` for anything it does not cover (a
fine-tuned network, a model saved before the arrays were written, no export yet or no engine
checked against PyTorch on it, windows that need resizing); :func:`mitoscope.predictions.predict`
then uses the full pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .array_features import ArrayExtractor
from .artifacts import ModelDescription, read_model_config, verify_model_files
from .cache import FeatureCache, ImageFeatures, extract_dataset
from .engines import EXPORTED_ENGINES, NeedsPyTorch, onnx_path, open_exported, resolve_engine, served_engine
from .errors import NotServable
from .heads.registry import load_served
from .io import ReadOptions, read_image

__all__ = ["NotServable", "ServedModel", "load_array_head"]

# A saved head in its numpy form (each head's module says how: mitoscope.heads.registry.load_served).
load_array_head = load_served


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
        head = load_served(Path(model_dir), config["head"]["spec"])
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
