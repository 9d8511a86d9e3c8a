"""The `mitoscope` command line: train, evaluate, predict, demo."""

from __future__ import annotations

import json
import logging
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

# Only light modules here: options are checked before PyTorch, OpenVINO or scikit-learn load
# (seconds on a small CPU), so that a typo fails at once. Each command imports its heavy
# modules after its checks.
from .array_features import EXTRACTION_MODES
from .artifacts import check_out_dir, read_model_card, read_model_config
from .defaults import DEFAULT_BACKBONE, DEFAULT_FINETUNE_BACKBONE, OFFLINE_ALTERNATIVE
from .engines import ENGINES
from .errors import MitoscopeError
from .heads.registry import FIXED_GRID_HEADS, WINDOW_SCORING_HEADS
from .io import DEFAULT_MAX_PIXELS, find_images, locate_labels, parse_channels
from .options import (ACCELERATORS, BALANCES, BATCHNORMS, HEAD_NAMES, MONITORS, POOLS, PRECISIONS, SCHEDULES, TrainConfig,
                      check_choice, check_file)
from .progress import Progress, lightning_display, lightning_progress, progress_display

app = typer.Typer(
    help="Tell whether large microscopy images contain mitotic cells, and show where.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

# Options that train, extract and finetune share, declared once.
WEIGHTS_OPTION = typer.Option(None, "--weights", help="Backbone weights file (.safetensors or .pth).")
WINDOW_OPTION = typer.Option(224, "--window", help="Window size in pixels.")
OVERLAP_OPTION = typer.Option(0.5, "--overlap", help="Window overlap, 0 to <1.")
CHANNELS_OPTION = typer.Option(None, "--channels", help="Source channels for R,G,B, e.g. 1,0,2.")
ENGINE_OPTION = typer.Option("auto", "--engine", help="What runs the backbone: auto (on a CPU OpenVINO, else ONNX Runtime, else PyTorch, each engine used once it matched PyTorch on a probe; on a GPU PyTorch), openvino, onnxruntime, openvino-bf16 (OpenVINO in bfloat16: faster on CPUs with bf16, less exact) or torch.")
CACHE_HELP = "Feature cache folder (default: ~/.cache/mitoscope/features)."
MAX_PIXELS_HELP = "Refuse images of more than this many pixels (height x width), a guard against decompression bombs."
# The heads as the registry lists them: the --head choices, the fixed-grid ones, the models that score windows.
# "cells" is no window-feature head: cells found in the image, scored by a network fine-tuned from
# the image labels (mitoscope.cells).
CELLS = "cells"
HEAD_HELP = " | ".join([CELLS, *HEAD_NAMES]) + " (cells, the default: the cells found in each image, scored by a model learnt from the image labels)"
FIXED_GRID_NAMES = [name for name in HEAD_NAMES if name in FIXED_GRID_HEADS]
SCORING_MODELS = f"{', '.join([CELLS, *WINDOW_SCORING_HEADS])}; finetune --pool attention"


def progress_bars() -> AbstractContextManager[Progress]:
    """The (stage, done, total) callback the library expects: bars on a terminal, plain lines otherwise."""
    return progress_display(console)


def fail(exc: MitoscopeError) -> None:
    console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)


def cache_from(cache_dir: Optional[Path], no_cache: bool):
    from .cache import open_cache

    return open_cache(cache_dir, use_cache=not no_cache)


def parse_head_params(pairs: list[str]) -> dict[str, Any]:
    from .errors import InputError

    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"--head-param expects KEY=VALUE, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def metrics_table(title: str, metrics: dict[str, Any]) -> Table:
    table = Table(title=title)
    for key in ("f1", "auc", "accuracy", "precision", "recall", "balanced_accuracy", "threshold"):
        table.add_column(key)
    # The threshold in significant digits: a max-F1 cut of 0.00027 must not read 0.000.
    table.add_row(*[("-" if metrics.get(k) is None else f"{metrics[k]:{'.3g' if k == 'threshold' else '.3f'}}") for k in
                    ("f1", "auc", "accuracy", "precision", "recall", "balanced_accuracy", "threshold")])
    return table


@app.command()
def train(
    data_dir: Path = typer.Argument(..., help="Folder of images (paths in the CSV are relative to it)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV: `Image,Label` (competition) or `path,label`. Omit for one sub-folder per class."),
    out: Path = typer.Option(..., "--out", help="Model folder to write."),
    head: str = typer.Option(CELLS, "--head", help=HEAD_HELP),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", help="Any timm model name."),
    weights: Optional[Path] = WEIGHTS_OPTION,
    pretrained: bool = typer.Option(True, "--pretrained/--random-init", help="--random-init: random backbone weights (tests only; never for real use)."),
    window: int = WINDOW_OPTION,
    overlap: float = OVERLAP_OPTION,
    extraction: str = typer.Option("windows", "--extraction", help="windows: embed each window on its own (the write-up, exact); fullconv: one pass over the whole image, windows pooled from the feature map (faster)."),
    engine: str = ENGINE_OPTION,
    channels: Optional[str] = CHANNELS_OPTION,
    cv: int = typer.Option(5, "--cv", help="Cross-validation folds (0 = none)."),
    seed: int = typer.Option(0, "--seed"),
    positive: Optional[str] = typer.Option(None, "--positive", help="Label of the positive class (default: the one reading 'mitosis')."),
    head_param: list[str] = typer.Option([], "--head-param", help="Head hyper-parameter KEY=VALUE (repeatable), e.g. max_epochs=50."),
    batch_size: int = typer.Option(32, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda when available)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write cached features."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help=MAX_PIXELS_HELP),
) -> None:
    """Train a classifier, cross-validate it, and save the model with its metrics.json.

    The default (--head cells) finds the cells of every image and fine-tunes a network that scores
    them from the image labels; --head ensemble|dense|forest are the write-up's Round-1 heads.

    Example: mitoscope train scenes/ --labels scenes/labels.csv --out model/
    """
    if head == CELLS:
        try:  # the options every train shares, checked as for a window head (those of windows unused here)
            TrainConfig(head=HEAD_NAMES[0], backbone=backbone, weights=str(weights) if weights else None,
                        window=window, overlap=overlap, extraction=extraction, engine=engine,
                        channels=parse_channels(channels) if channels else None, cv=cv, seed=seed,
                        max_pixels=max_pixels).validate()
        except MitoscopeError as exc:
            fail(exc)
        unused = [flag for flag, value, default in (
            ("--window", window, 224), ("--overlap", overlap, 0.5), ("--extraction", extraction, "windows"),
            ("--engine", engine, "auto"), ("--cv", cv, 5), ("--batch-size", batch_size, 32),
            ("--cache-dir", cache_dir, None), ("--no-cache", no_cache, False)) if value != default]
        if unused:  # said, never silently ignored
            warn(f"{', '.join(unused)} set the window heads; the cell model (--head cells) does not use "
                 f"{'it' if len(unused) == 1 else 'them'} (it holds out a fifth of the images for its threshold)")
        _train_cells(data_dir, labels, out, backbone, weights, pretrained, channels, seed, positive, head_param,
                     overwrite, max_pixels)
        return
    try:
        check_choice("--head", head, [CELLS, *HEAD_NAMES])
        config = TrainConfig(
            head=head, backbone=backbone, weights=str(weights) if weights else None, pretrained=pretrained,
            window=window, overlap=overlap, extraction=extraction, engine=engine,
            channels=parse_channels(channels) if channels else None, cv=cv, seed=seed, positive=positive,
            batch_size=batch_size, device=device, head_params=parse_head_params(head_param), max_pixels=max_pixels,
        ).validate()
        locate_labels(data_dir, labels)
        check_out_dir(out, overwrite)
        from .pipeline import train as run_train

        started = time.perf_counter()
        with progress_bars() as progress:
            result = run_train(data_dir, labels, out, config, cache_from(cache_dir, no_cache), progress, overwrite)
    except MitoscopeError as exc:
        fail(exc)
    if result.cv_metrics:
        console.print(metrics_table(f"{cv}-fold cross-validation ({head})", result.cv_metrics))
    for message in result.warnings:
        warn(message)
    console.print(f"model written to [bold]{result.model_dir}[/bold] in {time.perf_counter() - started:.0f} s")


def _train_cells(data_dir: Path, labels: Optional[Path], out: Path, backbone: str, weights: Optional[Path],
                 pretrained: bool, channels: Optional[str], seed: int, positive: Optional[str], head_param: list[str],
                 overwrite: bool, max_pixels: int) -> None:
    from dataclasses import fields

    from .cells.config import CellTrainConfig
    from .errors import InputError
    from .io import ReadOptions

    try:
        params = parse_head_params(head_param)
        known = {f.name for f in fields(CellTrainConfig)} - {"seed", "backbone"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InputError(f"--head-param {unknown[0]!r}: not a setting of the cells model; expected one of "
                             f"{', '.join(sorted(known))}")
        config = CellTrainConfig(backbone=backbone, seed=seed, **params)
        read_options = ReadOptions(channels=parse_channels(channels) if channels else None, max_pixels=max_pixels)
        locate_labels(data_dir, labels)
        check_out_dir(out, overwrite)
        from .cells.workflow import train_cells

        started = time.perf_counter()
        with progress_bars() as progress:
            result = train_cells(data_dir, labels, out, config, read_options, positive, pretrained,
                                 str(weights) if weights else None, progress, overwrite)
    except MitoscopeError as exc:
        fail(exc)
    if result.cv_metrics:
        console.print(metrics_table("training images, held out (cells: see metrics.json)", result.cv_metrics))
    for message in result.warnings:
        warn(message)
    console.print(f"model written to [bold]{result.model_dir}[/bold] in {time.perf_counter() - started:.0f} s")


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A model folder written by `mitoscope train`."),
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV to write."),
    heatmaps: Optional[Path] = typer.Option(None, "--heatmaps", help=f"Folder for per-image heatmap PNGs, window-score CSVs and top-k crops (heads: {SCORING_MODELS})."),
    top_k: int = typer.Option(3, "--top-k", help="Top-scoring windows saved as crops with --heatmaps."),
    geojson: Optional[Path] = typer.Option(None, "--geojson", help="Folder for one QuPath-readable GeoJSON per image: the scored cells/windows and the found mitoses, in full-resolution pixels."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP + " Default: the model's."),
    engine: str = ENGINE_OPTION,
    channels: Optional[str] = typer.Option(None, "--channels", help="Source channels for R,G,B, e.g. 1,0,2, instead of the model's; also accepts images whose channel count the model was not trained on."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Go on past images that cannot be read (or are refused): each gets a row with an empty Label and the error in Note."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Whole slides (.svs, .ndpi, .mrxs, pyramidal TIFF): read tiles at this many microns per pixel (default: the slide's full resolution). Needs: pip install -e '.[wsi]'."),
) -> None:
    """Predict new images: CSV with Image, Label, Probability, Threshold, one column per head and Note.

    Example: mitoscope predict model/ new_images/ --out predictions.csv --heatmaps heatmaps/
    """
    try:
        check_choice("--engine", engine, ENGINES)
        if mpp is not None and not mpp > 0:
            raise MitoscopeError(f"--mpp must be a positive number of microns per pixel; got {mpp}")
        card = read_model_card(model_dir)  # checked now, before heavy imports; predict reads it no more
        find_images(images)
        from .predictions import predict as run_predict

        with progress_bars() as progress:
            rows = run_predict(card, images, out, cache_from(cache_dir, no_cache), progress,
                               heatmaps_dir=heatmaps, top_k=top_k, geojson_dir=geojson, max_pixels=max_pixels, engine=engine,
                               channels=parse_channels(channels) if channels else None, skip_bad=skip_bad, warn=warn,
                               mpp=mpp)
    except MitoscopeError as exc:
        fail(exc)
    n_skipped = sum(1 for row in rows if not row["Label"])
    skipped = f" ({n_skipped} image(s) skipped: see the warnings above)" if n_skipped else ""
    console.print(f"{len(rows) - n_skipped} predictions written to [bold]{out}[/bold]{skipped}")
    if heatmaps is not None:
        console.print(f"heatmaps written to [bold]{heatmaps}[/bold]")
    if geojson is not None:
        console.print(f"GeoJSON written to [bold]{geojson}[/bold]")


@app.command()
def localize(
    model_dir: Path = typer.Argument(..., help=f"A model whose head gives window scores ({SCORING_MODELS})."),
    data_dir: Path = typer.Argument(..., help="Folder of labelled images."),
    boxes: Path = typer.Option(..., "--boxes", help="boxes.csv with Image,x,y,w,h of the true mitoses (as written by compose_scenes.py)."),
    out: Path = typer.Option(..., "--out", help="Folder for localization.json."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels CSV (default: DATA_DIR/labels.csv)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache"),
    engine: str = ENGINE_OPTION,
) -> None:
    """Score how well the heatmaps point at true mitoses: pointing game and window AUC.

    Example: mitoscope localize model/ test_scenes/ --boxes test_scenes/boxes.csv --out loc/
    """
    try:
        check_choice("--engine", engine, ENGINES)
        read_model_config(model_dir, verify_files=False)
        locate_labels(data_dir, labels)
        check_file(boxes, "boxes file")
        from .pipeline import localize as run_localize

        with progress_bars() as progress:
            report = run_localize(model_dir, data_dir, boxes, out, labels, cache_from(cache_dir, no_cache), progress,
                                  engine=engine)
    except MitoscopeError as exc:
        fail(exc)
    auc = report.get("window_auc")
    console.print(f"pointing game {report['pointing_game']:.3f}  window AUC {'-' if auc is None else format(auc, '.3f')}  "
                  f"({report['n_mitosis_images']} Mitosis images)")
    console.print(f"written to [bold]{Path(out) / 'localization.json'}[/bold]")


@app.command()
def evaluate(
    model_dir: Path = typer.Argument(..., help="A model folder written by `mitoscope train`."),
    data_dir: Path = typer.Argument(..., help="Folder of labelled images."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels CSV (as for train)."),
    out: Path = typer.Option(..., "--out", help="Report folder: metrics.json, roc.png, confusion_matrix.png."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP + " Default: the model's."),
    engine: str = ENGINE_OPTION,
    channels: Optional[str] = typer.Option(None, "--channels", help="Source channels for R,G,B, e.g. 1,0,2, instead of the model's."),
) -> None:
    """Evaluate a saved model on another labelled set.

    Example: mitoscope evaluate model/ test_scenes/ --labels test_scenes/labels.csv --out report/
    """
    try:
        check_choice("--engine", engine, ENGINES)
        read_model_config(model_dir, verify_files=False)
        locate_labels(data_dir, labels)
        from .pipeline import evaluate as run_evaluate

        with progress_bars() as progress:
            metrics = run_evaluate(model_dir, data_dir, labels, out, cache_from(cache_dir, no_cache), progress,
                                   max_pixels=max_pixels, engine=engine,
                                   channels=parse_channels(channels) if channels else None, warn=warn)
    except MitoscopeError as exc:
        fail(exc)
    console.print(metrics_table("evaluation", metrics))
    console.print(f"report written to [bold]{out}[/bold]")


@app.command()
def demo(
    out: Path = typer.Option(Path("mitoscope-demo"), "--out", help="Folder for the data, model, report and predictions."),
    data: Optional[Path] = typer.Option(None, "--data", help="Run on your own images instead of the synthetic set."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels CSV for --data."),
    head: str = typer.Option(CELLS, "--head", help="cells (the default of train) | " + " | ".join(HEAD_NAMES)),
    positive: Optional[str] = typer.Option(None, "--positive", help="Positive class of --data (default: 'mitosis')."),
    cv: int = typer.Option(3, "--cv", help="Cross-validation folds on the training part."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Run the main job end to end: make data, train, evaluate, predict, and say where the report is.

    Without --data the images are SYNTHETIC (procedurally drawn cells, not real microscopy),
    so that a fresh clone runs offline in a few minutes on two CPU cores.

    Example: mitoscope demo --out demo/   |   mitoscope demo --data scenes/ --labels scenes/labels.csv
    """
    try:
        check_choice("--head", head, [CELLS, *HEAD_NAMES])
        config = TrainConfig(head=HEAD_NAMES[0] if head == CELLS else head, cv=cv, seed=seed, positive=positive).validate()
        if data is not None:
            locate_labels(data, labels)
    except MitoscopeError as exc:
        fail(exc)
    if data is None:
        console.print("[yellow]Using a SYNTHETIC dataset (procedurally drawn cells, not real microscopy).[/yellow]")
    started = time.perf_counter()
    try:
        from .demo import run_demo

        with progress_bars() as progress:
            result = run_demo(out, data, labels, None if head == CELLS else config, progress=progress, seed=seed,
                              positive=positive)
    except MitoscopeError as exc:
        fail(exc)
    if result.cv_metrics:
        what = "held-out validation images" if head == CELLS else f"{cv}-fold cross-validation"
        console.print(metrics_table(f"{what} of the training part ({head})", result.cv_metrics))
    for message in result.warnings:
        warn(message)
    console.print(metrics_table("held-out test images", result.test_metrics))
    console.print(f"model:       [bold]{result.model_dir}[/bold]")
    console.print(f"report:      [bold]{result.report_dir / 'metrics.json'}[/bold] (+ roc.png, confusion_matrix.png)")
    console.print(f"predictions: [bold]{result.predictions_csv}[/bold]")
    console.print(f"done in {time.perf_counter() - started:.0f} s")


# finetune and extract: their heavy modules (torch, Lightning) are imported when they run,
# so that `mitoscope --help` and the other commands start fast.


@app.command("finetune")
def finetune_command(
    data_dir: Path = typer.Argument(..., help="Folder of images (paths in the CSV are relative to it)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV: `Image,Label` or `path,label` (a `group`/`slide` column makes CV and validation grouped). Omit for one sub-folder per class."),
    out: Path = typer.Option(..., "--out", help="Model folder to write."),
    backbone: str = typer.Option(DEFAULT_FINETUNE_BACKBONE, "--backbone", help=f"timm CNN name (the write-up: efficientnet_b4; offline: {OFFLINE_ALTERNATIVE})."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Backbone weights file (.safetensors or .pth), e.g. efficientnet_b4 weights copied from a machine online."),
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained", help="--no-pretrained: random initial weights (tests and smoke runs only)."),
    size: int = typer.Option(512, "--size", help="Images (and tiles) are resized to SIZE x SIZE; a multiple of 32."),
    pool: str = typer.Option("avg", "--pool", help="avg (the write-up) | attention (gated attention over feature-map positions, MIL; gives a heatmap)."),
    dropout: float = typer.Option(0.3, "--dropout", help="Dropout before the classifier."),
    attention_hidden: int = typer.Option(0, "--attention-hidden", help="--pool attention: width of a Linear+ReLU encoder before the attention; 0 = attention straight on the backbone's features."),
    pretrain_data: Optional[Path] = typer.Option(None, "--pretrain-data", help="Large images to pre-train on, cut into tiles first."),
    pretrain_labels: Optional[Path] = typer.Option(None, "--pretrain-labels", help="Labels CSV of --pretrain-data."),
    tile: int = typer.Option(1600, "--tile", help="Tile size in pixels for --pretrain-data."),
    tile_overlap: float = typer.Option(0.25, "--tile-overlap", help="Tile overlap, 0 to <1."),
    negatives_only_tiles: bool = typer.Option(False, "--negatives-only-tiles", help="Tile only Normal pre-training images; Mitosis images enter whole (most tiles of a Mitosis image hold no mitosis, so labelling them Mitosis is noise)."),
    epochs_head: int = typer.Option(5, "--epochs-head", help="Epochs of phase 1 (head on the frozen base)."),
    epochs_full: int = typer.Option(20, "--epochs-full", help="Epochs of phase 2 (unfrozen base)."),
    lr_head: float = typer.Option(1e-3, "--lr-head", help="Learning rate of the new head (phase 1, and the head in phase 2)."),
    lr_full: float = typer.Option(1e-4, "--lr-full", help="Learning rate of the unfrozen base in phase 2 (lower)."),
    schedule: str = typer.Option("onecycle", "--schedule", help="onecycle (each phase warms up over 15% of its steps, then anneals) | constant."),
    weight_decay: float = typer.Option(1e-4, "--weight-decay", help="AdamW weight decay."),
    batchnorm: str = typer.Option("frozen", "--batchnorm", help="frozen (BatchNorm layers keep their ImageNet statistics and scale/shift while the layers around them train) | train."),
    gradient_clip: float = typer.Option(1.0, "--gradient-clip", help="Clip each step's gradient norm to this; 0 = off."),
    restarts: int = typer.Option(1, "--restarts", help="Run the last phase this many times from the same start (other seeds) and keep the attempt with the best validation score."),
    guard: bool = typer.Option(True, "--guard/--no-guard", help="Undo a phase-2 epoch that leaves the final feature map dead (under a tenth of its share above 0) and go on at a third of the base's learning rate."),
    unfreeze: str = typer.Option("all", "--unfreeze", help="Phase 2 trains 'all' the base or its last N blocks (timm groups)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per batch and per device."),
    accumulate: int = typer.Option(1, "--accumulate", help="Gradient accumulation: batches per optimizer step."),
    precision: str = typer.Option("auto", "--precision", help="auto | 32 | 16-mixed | bf16-mixed (mixed precision needs a GPU)."),
    accelerator: str = typer.Option("auto", "--accelerator", help="auto | cpu | gpu."),
    devices: str = typer.Option("1", "--devices", help="Devices per node: a count, 'auto', or indices like 0,1; more than one uses DDP."),
    num_nodes: int = typer.Option(1, "--num-nodes", help="Nodes for multi-node DDP (SLURM: srun)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loader workers (default: 0 on CPU, up to 4 on GPU)."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Share of the training images held out for checkpoints, early stopping and the threshold."),
    monitor: str = typer.Option("loss", "--monitor", help="Best-epoch criterion: loss (validation loss) | auc (validation AUC)."),
    patience: int = typer.Option(5, "--patience", help="Early stopping: epochs without improvement."),
    balance: str = typer.Option("pos_weight", "--balance", help="Class imbalance: pos_weight (loss) | sampler (balanced batches) | none."),
    cv: int = typer.Option(0, "--cv", help="K-fold cross-validation of the whole procedure (grouped when the CSV has groups), then a final fit; 0 = none."),
    seed: int = typer.Option(0, "--seed"),
    positive: Optional[str] = typer.Option(None, "--positive", help="Label of the positive class (default: the one reading 'mitosis')."),
    channels: Optional[str] = CHANNELS_OPTION,
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Test-time augmentation: average over the 8 flips/quarter turns (stored in the model)."),
    stain_jitter: bool = typer.Option(True, "--stain-jitter/--no-stain-jitter", help="H&E stain jitter in HED space (switch off for fluorescence)."),
    trunk_cache: Optional[bool] = typer.Option(None, "--trunk-cache/--no-trunk-cache", help="Run the frozen first part of the base once per image and view and train on its cached maps (default: on with --unfreeze N, off with all)."),
    trunk_views: int = typer.Option(8, "--trunk-views", help="Augmented views per image in the trunk cache (the 8 flips/quarter turns, each with its own colour/zoom jitter draw)."),
    trunk_cache_gb: float = typer.Option(8.0, "--trunk-cache-gb", help="Refuse a trunk cache larger than this many GB of memory."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Keep resized images (and tiles) here for reruns."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model folder."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming an interrupted run of the same command."),
) -> None:
    """Fine-tune a pretrained CNN end to end on whole images (the write-up's Round-2 model).

    Images are resized to --size; phase 1 trains a new head on the frozen base, phase 2
    unfreezes the base at a lower learning rate; each phase keeps its best validation
    epoch. With --pretrain-data the large images are first cut into --tile tiles
    labelled with their image's label, which is noisy for Mitosis images (most of their
    tiles show no mitosis): --negatives-only-tiles tiles Normal images only and uses
    Mitosis images whole. Writes the model, history.csv/json, training_curves.png and,
    with --cv, metrics.json. Killed or crashed, the same command resumes from its last
    finished epoch (--fresh starts over).

    Example: mitoscope finetune scenes/ --labels scenes/labels.csv --out model/ --size 512 --cv 5
    """
    terminal = console.is_terminal  # else Lightning's tqdm bar gives way to plain lines
    try:
        for option, value, choices in (("--pool", pool, POOLS), ("--schedule", schedule, SCHEDULES),
                                       ("--precision", precision, PRECISIONS), ("--monitor", monitor, MONITORS),
                                       ("--balance", balance, BALANCES), ("--accelerator", accelerator, ACCELERATORS),
                                       ("--batchnorm", batchnorm, BATCHNORMS)):
            check_choice(option, value, choices)
        locate_labels(data_dir, labels)
        if pretrain_data is not None:
            locate_labels(pretrain_data, pretrain_labels)
        check_file(weights, "weights file")
        check_out_dir(out, overwrite)
        from .augment import AugmentConfig
        from .finetune import FineTuneConfig, finetune

        config = FineTuneConfig(
            backbone=backbone, weights=str(weights) if weights else None, pretrained=pretrained, size=size,
            pool=pool, dropout=dropout, attention_hidden=attention_hidden, schedule=schedule,
            weight_decay=weight_decay, batchnorm=batchnorm, gradient_clip=gradient_clip, guard=guard, restarts=restarts, epochs_head=epochs_head, epochs_full=epochs_full, lr_head=lr_head,
            lr_full=lr_full, unfreeze=unfreeze, batch_size=batch_size, accumulate=accumulate,
            precision=precision, accelerator=accelerator, devices=devices, num_nodes=num_nodes,
            workers=workers, val_fraction=val_fraction, monitor=monitor, patience=patience, balance=balance,
            cv=cv, seed=seed, positive=positive, channels=parse_channels(channels) if channels else None,
            tta=tta, augment=AugmentConfig(stain_jitter=stain_jitter),
            pretrain_data=str(pretrain_data) if pretrain_data else None,
            pretrain_labels=str(pretrain_labels) if pretrain_labels else None,
            tile=tile, tile_overlap=tile_overlap, negatives_only_tiles=negatives_only_tiles,
            trunk_cache=trunk_cache, trunk_views=trunk_views, trunk_cache_gb=trunk_cache_gb, progress_bar=terminal,
        )
        started = time.perf_counter()
        with lightning_display(console) as progress:
            result = finetune(data_dir, labels, out, config, cache_dir, progress, overwrite,
                              callbacks=[] if terminal else [lightning_progress(progress)], fresh=fresh)
    except MitoscopeError as exc:
        fail(exc)
    if result.model_dir is None:  # a DDP rank other than 0
        return
    if result.cv_metrics:
        console.print(metrics_table(f"{cv}-fold cross-validation (fine-tuned {backbone})", result.cv_metrics))
    if result.validation_metrics:
        console.print(metrics_table("validation split (optimistic: it chose the checkpoints)", result.validation_metrics))
    for message in result.warnings:
        warn(message)
    console.print(f"model written to [bold]{result.model_dir}[/bold] in {time.perf_counter() - started:.0f} s")


@app.command("extract")
def extract_command(
    data_dir: Path = typer.Argument(..., help="Folder of images (paths in the CSV are relative to it)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV: `Image,Label` or `path,label` (as for train). Omit for one sub-folder per class."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, "--backbone", help="Any timm model name (as for train)."),
    weights: Optional[Path] = WEIGHTS_OPTION,
    pretrained: bool = typer.Option(True, "--pretrained/--random-init", help="--random-init: random backbone weights from --seed (tests only; never for real use)."),
    window: int = WINDOW_OPTION,
    overlap: float = OVERLAP_OPTION,
    extraction: str = typer.Option("windows", "--extraction", help="windows | fullconv (as for train)."),
    engine: str = ENGINE_OPTION,
    channels: Optional[str] = CHANNELS_OPTION,
    seed: int = typer.Option(0, "--seed", help="Seed of --random-init weights (as for train)."),
    positive: Optional[str] = typer.Option(None, "--positive", help="Label of the positive class (as for train)."),
    head: str = typer.Option("ensemble", "--head", help=f"The head you will train: {', '.join(FIXED_GRID_NAMES[:-1])} and {FIXED_GRID_NAMES[-1]} need one grid, so images of another size are also cached resized to the most common size, as train does."),
    batch_size: int = typer.Option(32, "--batch-size", help="Windows per forward pass."),
    accelerator: str = typer.Option("auto", "--accelerator", help="auto | cpu | gpu."),
    devices: str = typer.Option("1", "--devices", help="Devices per node: a count, 'auto', or indices like 0,1; more than one uses DDP."),
    num_nodes: int = typer.Option(1, "--num-nodes", help="Nodes for multi-node DDP (SLURM: srun)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Data-loader workers decoding images (default: 0 on CPU, up to 4 on GPU)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Feature cache folder (default: ~/.cache/mitoscope/features); shared by every node."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse images of more than this many pixels."),
) -> None:
    """Fill the feature cache for `mitoscope train`, on one device or many (Lightning DDP).

    Same cache keys as train: a later train with the same --backbone,
    --window, --overlap, --extraction, --channels, --seed and --cache-dir
    extracts nothing. Cached images are skipped; each entry is written
    once, by the rank that owns the image.

    Example: mitoscope extract scenes/ --labels scenes/labels.csv --devices 2 --accelerator gpu
    (two GPUs on one machine)

    SLURM, 2 nodes x 4 GPUs, in an sbatch script with
    --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 (the cache on a shared filesystem):
    srun mitoscope extract scenes/ --labels scenes/labels.csv --devices 4 --num-nodes 2 --accelerator gpu --cache-dir /shared/cache
    """
    started = time.perf_counter()
    try:
        for option, value, choices in (("--head", head, HEAD_NAMES), ("--extraction", extraction, EXTRACTION_MODES),
                                       ("--engine", engine, ENGINES), ("--accelerator", accelerator, ACCELERATORS)):
            check_choice(option, value, choices)
        locate_labels(data_dir, labels)
        check_file(weights, "weights file")
    except MitoscopeError as exc:
        fail(exc)  # before Lightning starts other ranks
    from .distributed import ExtractConfig, extract_to_cache, global_rank

    try:
        config = ExtractConfig(
            backbone=backbone, weights=str(weights) if weights else None, pretrained=pretrained, window=window,
            overlap=overlap, extraction=extraction, engine=engine,
            channels=parse_channels(channels) if channels else None, seed=seed, positive=positive, head=head, batch_size=batch_size, accelerator=accelerator,
            devices=devices, num_nodes=num_nodes, workers=workers, max_pixels=max_pixels,
        )
        terminal = console.is_terminal  # else Lightning's tqdm bar gives way to plain lines
        with lightning_display(console) as progress:
            result = extract_to_cache(data_dir, labels, config, cache_dir, progress_bar=terminal,
                                      callbacks=[] if terminal else [lightning_progress(progress)])
    except MitoscopeError as exc:
        if global_rank() == 0:
            fail(exc)
        raise typer.Exit(code=2)  # rank 0 says why; the others only fail
    if not result.is_main:
        return
    per_rank = ", ".join(f"rank {rank}: {count}" for rank, count in enumerate(result.written_per_rank))
    resized = ""
    if result.n_resized:
        height, width = result.train_size
        resized = f", {result.n_resized} also cached resized to {width}x{height} for the {head} head"
    console.print(f"{result.n_images} images: {result.n_cached} already cached, {result.n_extracted} extracted"
                  f"{resized}; {sum(result.written_per_rank)} entries written by {result.world_size} "
                  f"process(es) ({per_rank}) in {time.perf_counter() - started:.0f} s")
    console.print(f"feature cache: [bold]{result.cache_dir}[/bold]")


@app.command()
def serve(
    model_dir: Path = typer.Argument(..., help="A model folder written by `mitoscope train`."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 127.0.0.1 (this machine only) unless told, 0.0.0.0 for every interface."),
    port: int = typer.Option(8000, "--port"),
    max_upload_mb: float = typer.Option(200.0, "--max-upload-mb", help="Refuse larger uploads (413) while they arrive."),
    max_pixels: int = typer.Option(60_000_000, "--max-pixels", help="Refuse images of more pixels (413), read from the header before decoding."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds one prediction may take before the answer is 504."),
    queue: int = typer.Option(8, "--queue", help="Predictions that may wait while one runs; more get 503."),
    engine: str = ENGINE_OPTION,
) -> None:
    """Serve a web page and a JSON API (POST /api/predict) for one model. Needs: pip install -e '.[web]'.

    Then open http://127.0.0.1:8000/ in a browser.

    Example: mitoscope serve model/ --port 8000
    """
    try:
        check_choice("--engine", engine, ENGINES)
        read_model_card(model_dir)
        if not 0 < port < 65536:
            raise MitoscopeError(f"--port must be 1-65535; got {port}")
        from .web import ServeSettings, create_app

        settings = ServeSettings(max_upload_mb=max_upload_mb, max_pixels=max_pixels, timeout_s=timeout,
                                 max_waiting=queue, engine=engine)
        try:
            import uvicorn
        except ImportError:
            raise MitoscopeError("mitoscope serve needs the web extra (uvicorn is missing): pip install -e '.[web]'") from None
        application = create_app(model_dir, settings)
    except MitoscopeError as exc:
        fail(exc)
    console.print(f"serving [bold]{model_dir}[/bold] at http://{host}:{port}/  (Ctrl+C stops)")
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_keep_alive=5)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
