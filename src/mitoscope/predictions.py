"""Predictions of any model as rows and a CSV, and ``predict``: model folder + images -> CSV.

Nothing here imports PyTorch or scikit-learn: :func:`predict` serves a window-feature model
through :mod:`mitoscope.inference` when it can (a 4K image in seconds on a 2-core CPU) and
loads the full pipeline only when it must (a fine-tuned network, resized windows, a model
saved before its head arrays existed).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .atomic import atomic_write_text
from .cache import FeatureCache
from .errors import InputError, NotServable
from .heads.registry import window_score_label
from .io import find_images, read_header
# The rows and the CSV live below every model kind (mitoscope.results); here for `from mitoscope.predictions import X`.
if TYPE_CHECKING:
    from .artifacts import ModelCard
from .results import (DIGITS, Predictions, Progress, Warn, prediction_rows, rows_to_csv, skipped_row,  # noqa: F401
                      written_probability)

logger = logging.getLogger(__name__)


def finds_cells(model: Any) -> bool:
    """Whether the model's instances are found cells (their scores are probabilities) rather than windows."""
    from .cells.model import HEAD_NAME

    return model.head_name == HEAD_NAME


def score_label(model: Any) -> str:
    """What the model's window scores mean (its head's, from the registry; a cell model's are its
    cells' probabilities), for heatmap legends."""
    from .cells.model import SCORE_LABEL

    return SCORE_LABEL if finds_cells(model) else window_score_label(model.head_name)


def write_geojson_files(out_dir: str | Path, pred: Predictions, rows: Sequence[dict[str, Any]], model: Any) -> list[Path]:
    """One QuPath-readable ``{stem}.geojson`` per predicted image (see :mod:`mitoscope.geojson`)."""
    from .geojson import feature_collection, write_geojson

    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{folder}: cannot create the GeoJSON folder ({error.strerror})") from error
    by_image = {row["Image"]: row for row in rows}
    cells = finds_cells(model)
    written = []
    for index, path in enumerate(pred.paths):
        row = by_image[str(path)]
        collection = feature_collection(
            pred.boxes[index], pred.window_scores[index], pred.image_sizes[index], cells=cells,
            threshold=float(model.threshold), label=row["Label"], probability=float(pred.proba[index]),
            count=row.get("Count"), image=str(path))
        written.append(write_geojson(folder / f"{Path(path).stem}.geojson", collection))
    return written


def screen_images(model: Any, paths: Sequence[Path], skip_bad: bool = False,
                  ) -> tuple[list[Path], dict[Path, str], dict[Path, str]]:
    """Check every image's header against the model before any work: ``(paths to predict,
    warnings by path, skipped images by path -> error)``.

    An image that cannot be read, or that :meth:`mitoscope.io.SourceProfile.check` refuses
    (channels unlike the training images'), raises InputError, or with ``skip_bad`` is
    skipped; an image that differs in bit depth gets a warning. A model saved without the
    profile of its training images is not checked.
    """
    good, warnings, skipped, _ = _screen(model, paths, skip_bad)
    return good, warnings, skipped


def _screen(model: Any, paths: Sequence[Path], skip_bad: bool = False,
            ) -> tuple[list[Path], dict[Path, str], dict[Path, str], dict[Path, tuple[int, int]]]:
    """:func:`screen_images`, and the (H, W) of each image to predict, from its header."""
    profile, options = model.source_profile, model.read_options
    sizes: dict[Path, tuple[int, int]] = {}
    good: list[Path] = []
    warnings: dict[Path, str] = {}
    skipped: dict[Path, str] = {}
    for path in paths:
        try:
            header = read_header(path, options)
            warning = profile.check(header, model.channels_chosen) if profile is not None else ""
        except InputError as error:
            if not skip_bad:
                raise
            skipped[path] = str(error)
            continue
        good.append(path)
        sizes[path] = (header.height, header.width)
        if warning:
            warnings[path] = warning
    return good, warnings, skipped, sizes


def _screen_slides(model: Any, paths: Sequence[Path], skip_bad: bool
                   ) -> tuple[list[Path], dict[Path, str], dict[Path, str]]:
    """The whole slides among ``paths``, each opened once to check it (a damaged file is said now,
    before the model loads), those that failed (with ``skip_bad``; else InputError), and warnings:
    a slide's tiles are 8-bit RGB, which the model's training images may not have been."""
    from .io.slides import is_slide, slide_header

    slides, errors, warnings = [], {}, {}
    for path in paths:
        if not is_slide(path):
            continue
        try:
            header = slide_header(path)
            profile = model.source_profile
            warning = profile.check(header, model.channels_chosen) if profile is not None else ""
        except InputError as error:
            if not skip_bad:
                raise
            errors[path] = str(error)
            continue
        slides.append(path)
        if warning:
            warnings[path] = warning
    return slides, errors, warnings


def predict(
    model_dir: "str | Path | ModelCard",
    inputs: Sequence[str | Path],
    out_csv: str | Path,
    cache: FeatureCache | None = None,
    progress: Progress | None = None,
    heatmaps_dir: str | Path | None = None,
    top_k: int = 3,
    geojson_dir: str | Path | None = None,
    max_pixels: int | None = None,
    serve: bool = True,
    engine: str = "auto",
    channels: tuple[int, int, int] | None = None,
    skip_bad: bool = False,
    warn: Warn | None = None,
    mpp: float | None = None,
) -> list[dict[str, Any]]:
    """Predict images into a CSV; with ``heatmaps_dir`` also write each image's heatmap,
    window-score CSV and top-k window crops, with ``geojson_dir`` a QuPath-readable
    ``{stem}.geojson`` of its scored instances. ``max_pixels`` replaces the model's pixel limit,
    ``channels`` the source channels it reads as R, G, B. ``engine`` runs the backbone (see
    :mod:`mitoscope.engines`); ``serve=False`` (or engine torch) always uses the full
    PyTorch/scikit-learn pipeline.

    Whole slides (.svs, .ndpi, .mrxs, pyramidal TIFF) are predicted tile by tile over their
    tissue (:mod:`mitoscope.wsi`), read at ``mpp`` microns per pixel (default: level 0).

    Every image is first checked against the kinds of image the model was trained on
    (:func:`screen_images`): a refusal or an unreadable image stops the run before anything is
    written, or with ``skip_bad`` becomes a row with an empty Label and the error in its Note.
    Warnings (a bit depth unlike the training images', a skipped image) go to ``warn`` (by
    default the log) and, for predicted images, into their Note."""
    from .artifacts import ModelDescription
    from .engines import ENGINES
    from .models import ModelCard, full_model, load_model, read_model_card

    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    warn = warn or logger.warning

    def fall_back(reason: str) -> None:
        logger.info("predicting with the full pipeline: %s", reason)

    # model.json, read once for whichever model runs (the CLI reads it first, to fail fast, and passes it on)
    card = model_dir if isinstance(model_dir, ModelCard) else read_model_card(model_dir)
    model_dir = card.path
    # The images are checked from their headers against what model.json says before the model
    # loads (PyTorch, OpenVINO's compile: seconds), so that a bad image is said at once.
    described = ModelDescription()
    described.config = card.settings()
    described.limit_pixels(max_pixels)
    described.choose_channels(channels)
    paths = find_images(inputs)
    with_scores = heatmaps_dir is not None or geojson_dir is not None
    if with_scores:
        from .heatmaps import check_heatmap_names

        check_heatmap_names(paths)
    slides, slide_errors, slide_warnings = _screen_slides(described, paths, skip_bad)
    images = [path for path in paths if path not in slides and path not in slide_errors]
    good, warnings, skipped, sizes = _screen(described, images, skip_bad)
    skipped.update(slide_errors)
    loaded = load_model(card, engine, max_pixels, channels, serve, on_fallback=fall_back)
    if with_scores:
        from .heatmaps import WINDOW_SCORE_HEADS, require_window_scores, write_heatmaps

        if not loaded.gives_window_scores:  # said now, not after the features were extracted
            raise InputError(f"{model_dir}: the model ({loaded.head_name} head) gives no window scores, "
                             f"so no heatmaps or GeoJSON; --heatmaps and --geojson need a head that scores "
                             f"windows: {WINDOW_SCORE_HEADS}")
    # From the headers, before any image is decoded: can this model run these images (a served
    # fixed-grid head and an image of another size: the full pipeline resizes it, as at training)?
    model = loaded.for_images(sizes, on_fallback=fall_back)
    pred = Predictions(paths=[], proba=np.zeros(0), members={}, notes=[])
    if good:
        kwargs = dict(cache=cache, progress=progress, with_window_scores=with_scores, engine=engine, skip_bad=skip_bad)
        try:
            pred = model.predict_paths(good, **kwargs)
        except NotServable as reason:
            # A guard only: for_images decided from the headers, and an image decodes to the size its
            # header tells. The full model comes from the same card (no second read nor hashing).
            fall_back(str(reason))
            model = full_model(card)
            model.limit_pixels(max_pixels)
            model.choose_channels(channels)
            pred = model.predict_paths(good, **kwargs)
    skipped.update(pred.skipped)
    slide_predictions = []
    if slides:
        from .wsi import predict_slide
    for slide in slides:
        try:
            slide_predictions.append(predict_slide(loaded, slide, mpp=mpp, progress=progress, cells=finds_cells(loaded)))
        except InputError as error:
            if not skip_bad:
                raise
            skipped[slide] = str(error)
    if not pred.paths and not slide_predictions:
        raise InputError(f"none of the {len(paths)} images could be predicted; the first: "
                         f"{next(iter(skipped.values()))}")
    if with_scores and pred.paths:
        require_window_scores(pred)
    rows = prediction_rows(pred, model.classes, model.threshold, model.head_name, warnings) if pred.paths else []
    if slide_predictions:
        from .wsi import slide_row

        rows += [slide_row(one, loaded.classes, float(loaded.threshold), loaded.head_name, slide_warnings.get(one.path))
                 for one in slide_predictions]
        warnings.update(slide_warnings)
    columns = list(dict.fromkeys(column for row in rows for column in row))
    rows += [skipped_row(path, error, columns) for path, error in skipped.items()]
    order = {str(path): index for index, path in enumerate(paths)}
    rows.sort(key=lambda row: order[row["Image"]])
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_csv, rows_to_csv(rows))
    if heatmaps_dir is not None and pred.paths:
        write_heatmaps(heatmaps_dir, pred, model.read_options, top_k=top_k, score_label=score_label(model),
                       threshold=float(model.threshold) if finds_cells(model) else None)
    if geojson_dir is not None and pred.paths:
        write_geojson_files(geojson_dir, pred, rows, model)
    if slide_predictions and with_scores:
        from .wsi import write_slide_outputs

        labels = {row["Image"]: row["Label"] for row in rows}
        for one in slide_predictions:
            write_slide_outputs(one, float(loaded.threshold), finds_cells(loaded), labels[str(one.path)],
                                Path(heatmaps_dir) if heatmaps_dir is not None else None,
                                Path(geojson_dir) if geojson_dir is not None else None, score_label(loaded), top_k)
    for path, warning in warnings.items():
        warn(f"{path}: {warning}")
    for error in skipped.values():
        warn(f"skipped {error}")
    return rows
