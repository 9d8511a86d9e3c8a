"""``mitoscope train`` with cell instances (the default): find the cells of every image, fine-tune
the instance network from the image labels, choose the threshold on held-out images, save."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..artifacts import check_out_dir
from ..errors import InputError
from ..io import ReadOptions, SourceProfile, load_labelled_images, read_header, read_image
from ..io.slides import Slide, SlideTiling, is_slide, slide_header
from ..results import Progress
from .model import HEAD_NAME, KIND, CellModel
from .proposals import CROP_DIAMETERS, Proposals, cut_crops, find_cells
from .config import CellTrainConfig
from .training import Bags, train_instances, train_linear

logger = logging.getLogger(__name__)
HISTORY_FILE = "history.csv"


@dataclass
class CellTrainResult:
    model: CellModel
    cv_metrics: dict[str, Any] | None
    model_dir: Path
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def slide_cell_crop_tiles(path: str | Path, input_size: int, min_diameter: float = 8.0, mpp: float | None = None,
                          tile: int = 2048, overlap: int = 128) -> Iterator[np.ndarray]:
    """The crops of the cells on a slide's tissue, tile by tile (each cell once): one tile's crops
    in memory at a time, however large the slide."""
    with Slide.open(path) as slide:
        tiling = SlideTiling(slide, mpp, tile, overlap)
        for read in tiling.tiles():
            proposals = find_cells(read.pixels, min_diameter, valid=read.tissue)
            if not len(proposals):
                continue
            keep = tiling.keeps(read, tiling.to_level0(read, proposals.boxes()))
            kept = Proposals(proposals.centres[keep], proposals.diameters[keep], proposals.crop_side)
            yield cut_crops(read.pixels, kept, input_size, read.tissue)


class CropStore:
    """Crops appended as they are cut, then read back as one (N, s, s, 3) uint8 array. With a
    ``folder`` they go to a file there and come back memory-mapped, so that training on many
    cells (a slide holds hundreds of thousands) keeps a tile's crops in memory, not all of them;
    without one they stay in memory."""

    FILE = "crops.uint8"

    def __init__(self, size: int, folder: str | Path | None = None) -> None:
        self.size = int(size)
        self.count = 0
        self._parts: list[np.ndarray] = []
        self.path = Path(folder) / self.FILE if folder is not None else None
        self._file = open(self.path, "wb") if self.path is not None else None

    def append(self, crops: np.ndarray) -> None:
        if crops.shape[1:] != (self.size, self.size, 3) or crops.dtype != np.uint8:
            raise ValueError(f"expected uint8 crops of shape (n, {self.size}, {self.size}, 3), got {crops.dtype} "
                             f"{crops.shape}")
        if self._file is not None:
            self._file.write(np.ascontiguousarray(crops).tobytes())
        else:
            self._parts.append(crops)
        self.count += len(crops)

    def array(self) -> np.ndarray:
        """Every crop appended so far, in order (read-only when memory-mapped)."""
        shape = (self.count, self.size, self.size, 3)
        if self._file is None or self.count == 0:
            return np.concatenate([np.zeros((0, *shape[1:]), dtype=np.uint8), *self._parts])
        self._file.flush()
        return np.memmap(self.path, dtype=np.uint8, mode="r", shape=shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def collect_bags(paths: list[Path], y: np.ndarray, read_options: ReadOptions, input_size: int,
                 min_diameter: float = 8.0, progress: Progress | None = None,
                 store_dir: str | Path | None = None) -> Bags:
    """Every image's cells as crops, one bag per image (a whole slide's: the cells on its tissue).
    With ``store_dir`` the crops are written there as they are cut and come back memory-mapped
    (see :class:`CropStore`); the caller removes the folder when done with the bags."""
    store = CropStore(input_size, store_dir)
    offsets = [0]
    try:
        for index, path in enumerate(paths):
            if is_slide(path):
                for crops in slide_cell_crop_tiles(path, input_size, min_diameter):
                    store.append(crops)
            else:
                image = read_image(path, read_options)
                store.append(cut_crops(image, find_cells(image, min_diameter), input_size))
            offsets.append(store.count)
            if progress:
                progress("cells: finding cells", index + 1, len(paths))
        crops = store.array()
    finally:
        store.close()
    return Bags(crops, np.asarray(offsets), np.asarray(y, dtype=np.int64))


def train_cells(data_dir: str | Path, labels_csv: str | Path | None, out_dir: str | Path,
                config: CellTrainConfig = CellTrainConfig(), read_options: ReadOptions | None = None,
                positive: str | None = None, pretrained: bool = True, weights: str | None = None,
                progress: Progress | None = None, overwrite: bool = False) -> CellTrainResult:
    """Train and save a cell model; ``metrics.json`` holds the held-out images' metrics."""
    import time

    import torch

    from ..evaluation import best_f1_threshold, compute_metrics, fit_warnings, write_report
    from .network import build_cell_network

    read_options = read_options or ReadOptions()
    check_out_dir(out_dir, overwrite)
    data = load_labelled_images(data_dir, labels_csv, positive)
    counts = np.bincount(data.y, minlength=2)
    needed = 2 if config.validation_fraction > 0 else 1
    if counts.min() < needed:
        raise InputError(f"{labels_csv or data_dir}: training a cell model needs at least {needed} images of each class, "
                         f"got {counts.tolist()} ({', '.join(data.classes)})")
    sources = SourceProfile.of(slide_header(path) if is_slide(path) else read_header(path, read_options)
                               for path in data.paths)
    seconds: dict[str, float] = {}
    # The crops go to a temporary file (memory-mapped back), removed when training ends.
    with tempfile.TemporaryDirectory(prefix="mitoscope-cells-") as crops_dir:
        start = time.perf_counter()
        bags = collect_bags(data.paths, data.y, read_options, config.input_size, progress=progress,
                            store_dir=crops_dir)
        seconds["find_cells"] = round(time.perf_counter() - start, 1)
        if len(bags.crops) == 0:
            raise InputError(f"{data_dir}: no cells were found in any of the {len(data.paths)} images "
                             "(are they fields of cells on a background?)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            network, backbone = build_cell_network(config.backbone, pretrained=pretrained, weights=weights,
                                                   dropout=config.dropout)
            start = time.perf_counter()
            fit = (train_linear if config.scorer == "linear" else train_instances)(
                network, bags, config, backbone.data_config["mean"], backbone.data_config["std"], progress)
            seconds["training"] = round(time.perf_counter() - start, 1)
        cells_per_image = bags.sizes()
        del bags  # the memory map, before its file goes
    y_val, p_val = fit["val_labels"], fit["val_proba"]
    held_out = len(y_val) > 0 and len(np.unique(y_val)) == 2
    threshold = float(best_f1_threshold(y_val, p_val)) if held_out else 0.5
    source = (f"{fit['evaluation']} over the {len(y_val)} training images" if "evaluation" in fit
              else f"held-out validation images ({len(y_val)})")
    warnings = fit_warnings(y_val if held_out else None, p_val if held_out else None, threshold if held_out else None,
                            data.classes, source,
                            epochs=[("cell network", fit["best_epoch"], config.epochs)] if fit["history"] else [])
    metrics = compute_metrics(y_val, p_val, threshold, data.classes) if held_out else None
    model_config = {
        "kind": KIND,
        "backbone": backbone.describe(),
        "cells": {"input_size": config.input_size, "crop_diameters": CROP_DIAMETERS, "min_diameter": 8.0,
                  "dropout": config.dropout, "pooling": "max", "scorer": config.scorer,
                  "views": config.feature_views if config.scorer == "linear" else config.views},
        "read": read_options.to_dict(),
        "source_images": sources.to_dict(),
        "classes": list(data.classes),
        "positive": data.classes[1],
        "threshold": threshold,
        "threshold_rule": f"max F1 on {source}" if held_out else "0.5 (no validation images)",
        "train_image_size": None,
        "head": {"name": HEAD_NAME, "params": config.to_dict(), "instances": "cells"},
        "training": {
            "n_images": len(data.paths),
            "n_per_class": dict(zip(data.classes, counts.tolist())),
            "cells_per_image": {"median": float(np.median(cells_per_image)), "min": int(cells_per_image.min()),
                                "max": int(cells_per_image.max())},
            "best_epoch": fit["best_epoch"],
            # (median, interquartile range) of each network's cell logits: oof_transfer's scales.
            "logit_scales": fit.get("scales"),
            # How many networks' weights the final one averages (fold_soup; None: it is one network).
            "soup_networks": fit["soup"]["networks"] if "soup" in fit else None,
            "seed": config.seed,
            "feature_engine": fit.get("feature_engine"),
            "labels": str(labels_csv) if labels_csv else None,
            "warnings": warnings,
            "seconds": seconds,
        },
    }
    model = CellModel(model_config, network, fit.get("head"))

    def extra(tmp: Path) -> list[str]:
        names = []
        if fit["history"]:
            columns = sorted({k for row in fit["history"] for k in row}, key=lambda k: (k != "epoch", k))
            lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in fit["history"]]
            (tmp / HISTORY_FILE).write_text("\n".join(lines) + "\n")
            names.append(HISTORY_FILE)
        if metrics is not None:
            write_report(tmp, metrics, y_val, p_val, data.classes,
                         extra={"evaluation": source, "warnings": warnings, "best_epoch": fit["best_epoch"]})
            names += ["metrics.json", "roc.png", "confusion_matrix.png"]
        return names

    model_dir = model.save(out_dir, extra, overwrite=overwrite)
    for warning in warnings:
        logger.info("warning: %s", warning)
    return CellTrainResult(model, metrics, Path(model_dir), warnings, seconds)
