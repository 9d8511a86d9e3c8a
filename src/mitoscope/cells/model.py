"""The saved cell model: proposals, the fine-tuned instance network, the threshold.

An image's probability is its best cell's; its mitotic count is the number of cells whose
probability reaches the threshold (so Label is Mitosis exactly when Count >= 1); every found
cell is an instance with a box and a score, which is what heatmaps, ``localize`` and the
instance CSVs show.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..artifacts import ModelDescription
from ..atomic import atomic_path
from ..errors import InputError, ModelError, one_line
from ..io import present_images, read_image
from ..readahead import ReadAhead
from ..results import Predictions, Progress, prediction_rows
from .bootstrap import intensity_features
from .export import engine_outputs, export_network, probe_crops
from .proposals import Proposals, cut_crops, find_cells
from .views import crop_views

NETWORK_FILE = "network.safetensors"
EXPORT_FILE = "network.onnx"
HEAD_FILE = "head.safetensors"
# The served network must give PyTorch's logits on the probe crops within this (logits, absolute).
SERVED_TOLERANCE = 0.05
HEAD_NAME = "cells"
SCORE_LABEL = "cell probability (higher = more mitotic)"
KIND = "cells"


def network_outputs(network: Any, crops: np.ndarray, mean: Sequence[float], std: Sequence[float], scorer: str,
                    batch: int = 256, views: int = 1) -> np.ndarray:
    """What the network gives for (n, s, s, 3) uint8 crops in PyTorch, averaged over ``views``:
    pooled features for the linear scorer, one logit per crop for a fine-tuned network."""
    import torch

    from .training import crop_features, normalise

    if scorer == "linear":
        return crop_features(network, crops, mean, std, batch=batch, views=views)
    network.eval()
    total = np.zeros(len(crops), dtype=np.float64)
    with torch.no_grad():
        for view in range(views):
            for start in range(0, len(crops), batch):
                x = normalise(crop_views(crops[start:start + batch], view), mean, std)
                total[start:start + len(x)] += network(x).double().numpy()
    return total / views


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


class CellModel(ModelDescription):
    """Cells found by image analysis, each scored by a network fine-tuned from image labels."""

    def __init__(self, config: dict[str, Any], network: Any = None, head: Any = None,
                 runner: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        self.config = config
        self.network = network
        self.head = head  # the linear scorer (mitoscope.cells.bootstrap.LinearInstanceHead), or None
        # normalised crops -> the network's output, by an exported engine (set by the served model)
        self._runner = runner
        self.engine = "torch"

    @property
    def input_size(self) -> int:
        return int(self.config["cells"]["input_size"])

    @property
    def scorer(self) -> str:
        return str(self.config["cells"].get("scorer", "finetuned"))

    @property
    def views(self) -> int:
        """How many flipped/turned views of a cell its score averages over (features for the
        linear scorer, logits for a fine-tuned network); models saved before views: 1."""
        return int(self.config["cells"].get("views", 1))

    @property
    def gives_window_scores(self) -> bool:
        return True  # one score per found cell

    def score_crops(self, crops: np.ndarray) -> np.ndarray:
        """One logit per (n, s, s, 3) uint8 crop."""
        if not len(crops):
            return np.zeros(0, dtype=np.float64)
        backbone = self.config["backbone"]
        if self._runner is not None:
            output = engine_outputs(self._runner, crops, backbone["mean"], backbone["std"], self.views)
        else:
            output = network_outputs(self.network, crops, backbone["mean"], backbone["std"], self.scorer,
                                     views=self.views)
        if self.scorer == "linear":
            return self.head.decision_function(output, intensity_features(crops))
        return output.reshape(-1).astype(np.float64)

    def cells_of(self, image: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, Proposals]:
        """The crops and proposals of an (H, W, 3) uint8 image's cells (only within ``valid``, if given)."""
        proposals = find_cells(image, float(self.config["cells"].get("min_diameter", 8.0)), valid=valid)
        return cut_crops(image, proposals, self.input_size, valid), proposals

    def score_image(self, image: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probability per cell, (n, 4) boxes) of an in-memory image, e.g. a slide's tile."""
        crops, proposals = self.cells_of(image, valid)
        return (sigmoid(self.score_crops(crops)) if len(crops) else np.zeros(0)), proposals.boxes()

    def _read(self, path: Path) -> tuple[np.ndarray, Proposals, tuple[int, int]]:
        image = read_image(path, self.read_options)
        crops, proposals = self.cells_of(image)
        return crops, proposals, image.shape[:2]

    def predict_paths(self, paths: Sequence[str | Path], cache: Any = None, progress: Progress | None = None,
                      with_window_scores: bool = False, engine: str = "auto", skip_bad: bool = False,
                      **_: Any) -> Predictions:
        """Predict image files of any size. ``cache`` is unused (no window features here); every
        found cell's box and probability come back as the window scores."""
        paths, skipped = present_images(paths, skip_bad)
        kept: list[Path] = []
        proba, counts, scores, boxes, sizes, notes = [], [], [], [], [], []
        threshold = self.threshold
        if progress:
            progress("predicting", 0, len(paths))
        with ThreadPoolExecutor(max_workers=1) as pool:
            reads = ReadAhead(pool, paths, self._read)
            for index, path in enumerate(paths):
                try:
                    crops, proposals, size = reads.next()
                except InputError as error:
                    if not skip_bad:
                        raise
                    skipped[path] = str(error)
                    reads.top_up()
                    if progress:
                        progress("predicting", index + 1, len(paths))
                    continue
                cell_proba = sigmoid(self.score_crops(crops)) if len(crops) else np.zeros(0)
                kept.append(path)
                proba.append(float(cell_proba.max()) if len(cell_proba) else 0.0)
                counts.append(int(np.sum(cell_proba >= threshold)))
                scores.append(cell_proba.astype(np.float64))
                boxes.append(proposals.boxes())
                sizes.append((int(size[0]), int(size[1])))
                notes.append("" if len(cell_proba) else "no cells found")
                if progress:
                    progress("predicting", index + 1, len(paths))
        return Predictions(paths=kept, proba=np.asarray(proba, dtype=np.float64), members={}, notes=notes,
                           window_scores=scores, boxes=boxes, image_sizes=sizes, skipped=skipped, counts=counts)

    def predict(self, paths: Sequence[str | Path], **kwargs: Any) -> list[dict[str, Any]]:
        """One row per image: Image, Label, Probability, Threshold, cells, Count, Note."""
        return prediction_rows(self.predict_paths(paths, **kwargs), self.classes, self.threshold, self.head_name)

    def save(self, out_dir: str | Path, extra_files: Callable[[Path], list[str]] | None = None,
             overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        state = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        self.network.eval()
        config["served"] = {"file": EXPORT_FILE, "probe_logits": [float(v) for v in self.score_crops(
            probe_crops(self.input_size))], "tolerance": SERVED_TOLERANCE}

        def write(tmp: Path) -> list[str]:
            with atomic_path(tmp / NETWORK_FILE) as target:
                save_file(state, str(target))
            with atomic_path(tmp / EXPORT_FILE) as target:
                export_network(self.network, self.input_size, target, self.scorer)
            names = [NETWORK_FILE, EXPORT_FILE]
            if self.head is not None:
                from safetensors.numpy import save_file as save_arrays

                with atomic_path(tmp / HEAD_FILE) as target:
                    save_arrays(self.head.arrays(), str(target))
                names.append(HEAD_FILE)
            return names + (extra_files(tmp) if extra_files else [])

        return self._save(out_dir, config, write, overwrite)

    @classmethod
    def served_from_card(cls, card: Any, engine: str = "auto") -> "CellModel":
        """The model run by an exported engine (OpenVINO, else ONNX Runtime), no PyTorch: checked
        on the probe crops against the logits PyTorch gave when the model was saved.
        Raises NotServable when no engine is installed, asked for or close enough."""
        from ..engines import EXPORTED_ENGINES, auto_candidates, open_exported
        from ..errors import NotServable

        config = card.settings()
        served = config.get("served")
        if not served:
            raise NotServable("the model was saved without an exported network")
        if engine == "torch":
            raise NotServable("engine torch asked for")
        candidates = auto_candidates() if engine == "auto" else [engine]
        if engine not in ("auto", *EXPORTED_ENGINES):
            raise InputError(f"unknown engine {engine!r}: expected auto, torch or one of {', '.join(EXPORTED_ENGINES)}")
        card.verify_files()
        size = int(config["cells"]["input_size"])
        expected = np.asarray(served["probe_logits"], dtype=np.float64)
        reasons = []
        head = _load_head(card, config)
        for candidate in candidates:
            try:
                runner = open_exported(card.path / served["file"], candidate, throughput=True)
                model = cls(config, None, head, runner.pooled)
                got = model.score_crops(probe_crops(size))
            except Exception as exc:  # the runtime cannot read or run the export: try the next one
                reasons.append(f"{candidate}: {one_line(exc, 200, typed=True)}")
                continue
            error = float(np.abs(got - expected).max())
            if error <= float(served.get("tolerance", SERVED_TOLERANCE)):
                model.card = card
                model.engine = candidate
                return model
            reasons.append(f"{candidate}: logits differ from PyTorch's by {error:.3g}")
            if engine != "auto":
                raise InputError(f"engine {candidate} cannot run {card.path / served['file']}: {reasons[-1]}")
        raise NotServable("; ".join(reasons) or "neither OpenVINO nor ONNX Runtime is installed")

    @classmethod
    def from_card(cls, card: Any) -> "CellModel":
        """The model of a saved folder (``model.json`` already read as ``card``), in PyTorch."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .network import build_cell_network

        card.verify_files()
        config = card.settings()
        path = card.path / "model.json"
        if card.kind != KIND:
            raise ModelError(f"{path}: model kind {card.kind!r} is not a cell model")
        for key in ("backbone", "cells", "read", "threshold", "classes"):
            if key not in config:
                raise ModelError(f"{path}: incomplete cell model description: key {key!r} is missing")
        name = config["backbone"]["name"]
        try:
            network, _ = build_cell_network(name, pretrained=False, dropout=float(config["cells"].get("dropout", 0.0)))
        except (InputError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: cannot rebuild the network {name!r} ({type(exc).__name__}: {exc})") from None
        file = card.path / NETWORK_FILE
        try:
            network.load_state_dict(load_file(str(file)), strict=True)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{file}: cannot read the network weights ({exc})") from None
        except RuntimeError as exc:
            raise ModelError(f"{file}: weights do not fit {name} (a different architecture?): {one_line(exc, 240)}"
                             ) from None
        model = cls(config, network.eval(), _load_head(card, config))
        model.card = card
        return model


def _load_head(card: Any, config: dict[str, Any]) -> Any:
    """The linear scorer's arrays (safetensors, no code), or None for a fine-tuned network."""
    if config["cells"].get("scorer", "finetuned") != "linear":
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file as load_arrays

    from .bootstrap import LinearInstanceHead

    file = card.path / HEAD_FILE
    try:
        return LinearInstanceHead.from_arrays(load_arrays(str(file)))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{file}: cannot read the cell scorer ({one_line(exc, 200)})") from None
