"""Predict a whole slide with any model: tissue tiles streamed one at a time, instances gathered
in level-0 coordinates, the mitotic count and its hotspot.

The slide's tissue is found on a thumbnail (:func:`mitoscope.io.slides.tissue_mask`); tiles of
``tile`` pixels (at ``mpp`` microns per pixel, or level 0's) overlapping by ``overlap`` cover it,
and only tiles that touch tissue are read. A cell model looks for cells on each tile's tissue only (the
glass is neither background nor cell); any other model predicts each tile as an image, so
every model kind works; an instance seen by two overlapping tiles is kept once, by the tile
whose core (the tile less half the overlap on each side) holds its centre. Memory stays that
of one tile whatever the slide's size.

The slide's probability is its best tile's (a cell model's: its best cell on the tissue); its
count is its cells on the tissue at or over the threshold, and with a known pixel size the **hotspot** is the square of ``hotspot_mm2`` (2 mm²,
as pathologists count) holding the most of them.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from .io.slides import Slide, SlideTiling

__all__ = ["Hotspot", "SlidePrediction", "hotspot", "predict_slide"]

Progress = Callable[[str, int, int], None]


@dataclass
class Hotspot:
    """The square of ``area_mm2`` holding the most mitoses: its level-0 box and count."""

    count: int
    area_mm2: float
    box: tuple[float, float, float, float]

    @property
    def per_mm2(self) -> float:
        return self.count / self.area_mm2


@dataclass
class SlidePrediction:
    path: Path
    proba: float
    size: tuple[int, int]  # level-0 (H, W)
    mpp: float | None  # level 0's microns per pixel
    read_mpp: float | None  # the tiles' (None: level 0's pixels)
    boxes: np.ndarray  # (N, 4) instances in level-0 pixels
    scores: np.ndarray  # (N,)
    tile_boxes: np.ndarray  # (T, 4) the tiles read, level-0 pixels
    tile_scores: np.ndarray  # (T,) each tile's probability
    count: int | None  # instances at or over the threshold (cell models)
    hotspot: Hotspot | None
    tissue_fraction: float
    thumbnail: np.ndarray
    thumbnail_scale: float  # thumbnail pixels per level-0 pixel
    notes: list[str] = field(default_factory=list)


def hotspot(centres: np.ndarray, mpp: float, area_mm2: float = 2.0) -> Hotspot | None:
    """The axis-aligned square of ``area_mm2`` (level-0 ``centres`` (N, 2), ``mpp`` microns per
    pixel) holding the most centres. Some best square has a centre on its left edge and one on
    its top edge, so those candidates are enough (exact)."""
    if not len(centres):
        return None
    side = math.sqrt(area_mm2) * 1000.0 / mpp
    points = np.asarray(centres, dtype=np.float64)[:5000]
    best, best_box = 0, (0.0, 0.0, side, side)
    for left in np.unique(points[:, 0]):
        column = points[(points[:, 0] >= left) & (points[:, 0] <= left + side)]
        for top in np.unique(column[:, 1]):
            count = int(np.sum((column[:, 1] >= top) & (column[:, 1] <= top + side)))
            if count > best:
                best, best_box = count, (float(left), float(top), float(left + side), float(top + side))
    return Hotspot(best, area_mm2, best_box)


def predict_slide(model: Any, path: str | Path, mpp: float | None = None, tile: int = 2048, overlap: int = 128,
                  progress: Progress | None = None, cells: bool = False, hotspot_mm2: float = 2.0,
                  thumbnail_side: int = 2048) -> SlidePrediction:
    """Predict one slide (see the module doc). ``mpp`` reads the tiles at that many microns per
    pixel (the slide must say its own); ``cells``: the model's instances are cells whose scores
    are probabilities (counted against its threshold)."""
    with Slide.open(path) as slide:
        tiling = SlideTiling(slide, mpp, tile, overlap, thumbnail_side)
        notes = [] if tiling.planned else ["no tissue found"]
        boxes, scores, tile_boxes, tile_scores = [], [], [], []
        runnable = None
        if progress:
            progress(f"tiles of {slide.path.name}", 0, len(tiling.planned))
        with tempfile.TemporaryDirectory(prefix="mitoscope-tile-") as folder:
            tile_path = Path(folder) / "tile.png"
            for done, read in enumerate(tiling.tiles(), start=1):
                if cells and hasattr(model, "score_image"):
                    # a cell model looks for cells on the tile's tissue only (the glass is no background)
                    tile_scores_i, tile_boxes_i = model.score_image(read.pixels, read.tissue)
                    tile_proba = float(tile_scores_i.max(initial=0.0))
                else:  # any other model: the tile as an image file
                    Image.fromarray(read.pixels).save(tile_path, compress_level=1)
                    if runnable is None:
                        runnable = model.for_images({tile_path: (tile, tile)})
                    pred = runnable.predict_paths([tile_path], with_window_scores=runnable.gives_window_scores)
                    tile_proba = float(pred.proba[0])
                    has_scores = pred.window_scores is not None and pred.window_scores[0] is not None
                    tile_scores_i = np.asarray(pred.window_scores[0], dtype=np.float64) if has_scores else np.zeros(0)
                    tile_boxes_i = np.asarray(pred.boxes[0]) if has_scores else np.zeros((0, 4))
                tile_boxes.append((read.x0, read.y0, read.x0 + tiling.tile0, read.y0 + tiling.tile0))
                tile_scores.append(tile_proba)
                if len(tile_scores_i):
                    found = tiling.to_level0(read, tile_boxes_i)
                    keep = tiling.keeps(read, found, on_tissue=cells)
                    boxes.append(found[keep])
                    scores.append(np.asarray(tile_scores_i, dtype=np.float64)[keep])
                if progress:
                    progress(f"tiles of {slide.path.name}", done, len(tiling.planned))
        box_array = np.concatenate(boxes) if boxes else np.zeros((0, 4))
        score_array = np.concatenate(scores) if scores else np.zeros(0)
        threshold = float(model.threshold)
        count = spot = None
        if cells:
            mitotic = score_array >= threshold
            count = int(mitotic.sum())
            if slide.mpp is not None:
                centres = (box_array[mitotic, :2] + box_array[mitotic, 2:]) / 2
                spot = hotspot(centres, slide.mpp, hotspot_mm2) or Hotspot(0, hotspot_mm2, (0.0, 0.0, 0.0, 0.0))
            else:
                notes.append("the slide does not say its pixel size: no mitoses per mm²")
        return SlidePrediction(
            path=Path(path), proba=float(score_array.max(initial=0.0)) if cells else max(tile_scores, default=0.0),
            size=(slide.height, slide.width), mpp=slide.mpp, read_mpp=mpp, boxes=box_array, scores=score_array,
            tile_boxes=np.asarray(tile_boxes, dtype=np.float64).reshape(-1, 4),
            tile_scores=np.asarray(tile_scores, dtype=np.float64), count=count, hotspot=spot,
            tissue_fraction=float(tiling.mask.mean()), thumbnail=tiling.thumbnail,
            thumbnail_scale=tiling.thumb_scale, notes=notes)


def slide_row(prediction: SlidePrediction, classes: tuple[str, str], threshold: float, head_name: str,
              warning: str | None = None) -> dict[str, Any]:
    """The slide's CSV row: an image's row (:func:`mitoscope.results.prediction_rows`), and its hotspot."""
    from .results import Predictions, prediction_rows

    details = [f"slide {prediction.size[1]}x{prediction.size[0]} px",
               f"{len(prediction.tile_scores)} tissue tiles" + (f" at {prediction.read_mpp} µm/px" if prediction.read_mpp else "")]
    as_image = Predictions(paths=[prediction.path], proba=np.array([prediction.proba]), members={},
                           notes=["; ".join(details + prediction.notes)],
                           counts=None if prediction.count is None else [prediction.count])
    row = prediction_rows(as_image, classes, threshold, head_name, {prediction.path: warning} if warning else None)[0]
    note = row.pop("Note")
    if prediction.hotspot is not None:
        row["Hotspot count"] = prediction.hotspot.count
        row["Mitoses per mm2 (hotspot)"] = round(prediction.hotspot.per_mm2, 3)
    row["Note"] = note
    return row


def block_scores(prediction: SlidePrediction, blocks: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A map of the slide for its heatmap: squares of 1/``blocks`` of its longer side, over the tiles
    read, each with the best score of the instances whose centre lies in it (0 where none)."""
    height, width = prediction.size
    side = max(1.0, max(height, width) / blocks)
    n_x, n_y = math.ceil(width / side), math.ceil(height / side)
    best = np.full((n_y, n_x), np.nan)
    for x0, y0, x1, y1 in prediction.tile_boxes:
        best[int(y0 // side):min(n_y, math.ceil(y1 / side)), int(x0 // side):min(n_x, math.ceil(x1 / side))] = 0.0
    if len(prediction.scores):
        centres = (prediction.boxes[:, :2] + prediction.boxes[:, 2:]) / 2
        columns = np.clip((centres[:, 0] // side).astype(int), 0, n_x - 1)
        rows = np.clip((centres[:, 1] // side).astype(int), 0, n_y - 1)
        np.fmax.at(best, (rows, columns), prediction.scores)
    rows, columns = np.nonzero(np.isfinite(best))
    boxes = np.stack([columns * side, rows * side, (columns + 1) * side, (rows + 1) * side], axis=1)
    return boxes.reshape(-1, 4), best[rows, columns]


def render_slide_heatmap(prediction: SlidePrediction, threshold: float, cells: bool, score_label: str,
                         target: Path, name: str | None = None) -> Path | None:
    """The slide's heatmap over its thumbnail: squares coloured by their best instance (those with a
    mitosis outlined); None when no tissue was read."""
    from .heatmaps import render_overlay

    if not len(prediction.tile_scores):
        return None
    spot = "" if prediction.hotspot is None else (f"   hotspot {prediction.hotspot.count} in "
                                                   f"{prediction.hotspot.area_mm2:g} mm²")
    title = f"{name or prediction.path.name}   probability {prediction.proba:.3f}" + \
        (f"   count {prediction.count}" if prediction.count is not None else "") + spot
    boxes, scores = block_scores(prediction)
    render_overlay(prediction.thumbnail, boxes * prediction.thumbnail_scale, scores, target, title=title,
                   score_label=f"best {score_label} per square", threshold=threshold if cells else None)
    return target


def slide_collection(prediction: SlidePrediction, threshold: float, cells: bool, label: str,
                     name: str | None = None) -> dict[str, Any]:
    """The slide's GeoJSON (level 0): its instances, and the hotspot as an annotation."""
    from .geojson import feature_collection

    collection = feature_collection(prediction.boxes, prediction.scores, prediction.size, cells=cells,
                                    threshold=threshold, label=label, probability=prediction.proba,
                                    count=prediction.count, image=name or str(prediction.path))
    if prediction.hotspot is not None and prediction.hotspot.count:
        x0, y0, x1, y1 = prediction.hotspot.box
        collection["features"].append({
            "type": "Feature", "id": "hotspot",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {"objectType": "annotation", "name": f"hotspot {prediction.hotspot.area_mm2:g} mm²",
                           "measurements": {"mitoses": float(prediction.hotspot.count),
                                            "mitoses per mm2": float(prediction.hotspot.per_mm2)}}})
        collection["mitoscope"]["hotspot"] = {"count": prediction.hotspot.count,
                                              "area_mm2": prediction.hotspot.area_mm2,
                                              "per_mm2": prediction.hotspot.per_mm2}
    return collection


def write_slide_outputs(prediction: SlidePrediction, threshold: float, cells: bool, label: str,
                        heatmaps_dir: Path | None, geojson_dir: Path | None, score_label: str, top_k: int = 3
                        ) -> list[Path]:
    """The slide's heatmap (:func:`render_slide_heatmap`), instance CSV and top crops (level 0), and
    GeoJSON (:func:`slide_collection`)."""
    from .atomic import atomic_path
    from .heatmaps import write_window_csv

    written: list[Path] = []
    stem = prediction.path.stem
    if heatmaps_dir is not None:
        heatmaps_dir.mkdir(parents=True, exist_ok=True)
        heatmap = render_slide_heatmap(prediction, threshold, cells, score_label, heatmaps_dir / f"{stem}_heatmap.png")
        if heatmap is not None:
            written.append(heatmap)
        written.append(write_window_csv(heatmaps_dir / f"{stem}_windows.csv", prediction.boxes, prediction.scores,
                                        prediction.path.name, prediction.size))
        if top_k and len(prediction.scores):
            order = np.argsort(-prediction.scores, kind="stable")[:top_k]
            with Slide.open(prediction.path) as slide:
                for rank, index in enumerate(order, start=1):
                    x0, y0, x1, y1 = (int(round(v)) for v in prediction.boxes[index])
                    crop = slide.read(x0, y0, max(1, x1 - x0), max(1, y1 - y0))
                    target = heatmaps_dir / f"{stem}_top{rank}_x{x0}_y{y0}.png"
                    with atomic_path(target) as temp:
                        Image.fromarray(crop).save(temp, format="PNG")
                    written.append(target)
    if geojson_dir is not None:
        from .geojson import write_geojson

        geojson_dir.mkdir(parents=True, exist_ok=True)
        written.append(write_geojson(geojson_dir / f"{stem}.geojson",
                                     slide_collection(prediction, threshold, cells, label)))
    return written
