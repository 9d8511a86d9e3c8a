"""The `mitoscope` command line: train, evaluate, predict, demo."""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import MitoscopeError
from .io import DEFAULT_MAX_PIXELS

app = typer.Typer(
    help="Tell whether large microscopy images contain mitotic cells, and show where.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

CACHE_HELP = "Feature cache folder (default: ~/.cache/mitoscope/features)."
MAX_PIXELS_HELP = "Refuse images of more than this many pixels (height x width), a guard against decompression bombs."


@contextmanager
def progress_bars() -> Iterator[Any]:
    """A rich progress display; yields the (stage, done, total) callback the library expects."""
    with Progress(
        TextColumn("[bold]{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bars:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def fail(exc: MitoscopeError) -> None:
    console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def cache_from(cache_dir: Optional[Path], no_cache: bool):
    from .pipeline import open_cache

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
    table.add_row(*[("-" if metrics.get(k) is None else f"{metrics[k]:.3f}") for k in
                    ("f1", "auc", "accuracy", "precision", "recall", "balanced_accuracy", "threshold")])
    return table


@app.command()
def train(
    data_dir: Path = typer.Argument(..., help="Folder of images (paths in the CSV are relative to it)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV: `Image,Label` (competition) or `path,label`. Omit for one sub-folder per class."),
    out: Path = typer.Option(..., "--out", help="Model folder to write."),
    head: str = typer.Option("ensemble", "--head", help="ensemble | dense | forest | pooled | attention"),
    backbone: str = typer.Option("tf_efficientnet_lite0", "--backbone", help="Any timm model name."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Backbone weights file (.safetensors or .pth)."),
    pretrained: bool = typer.Option(True, "--pretrained/--random-init", help="--random-init: random backbone weights (tests only; never for real use)."),
    window: int = typer.Option(224, "--window", help="Window size in pixels."),
    overlap: float = typer.Option(0.5, "--overlap", help="Window overlap, 0 to <1."),
    extraction: str = typer.Option("windows", "--extraction", help="windows: embed each window on its own (the write-up, exact); fullconv: one pass over the whole image, windows pooled from the feature map (faster)."),
    channels: Optional[str] = typer.Option(None, "--channels", help="Source channels for R,G,B, e.g. 1,0,2."),
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

    Example: mitoscope train scenes/ --labels scenes/labels.csv --out model/ --head ensemble
    """
    from .io import parse_channels
    from .pipeline import TrainConfig, train as run_train

    try:
        config = TrainConfig(
            head=head, backbone=backbone, weights=str(weights) if weights else None, pretrained=pretrained,
            window=window, overlap=overlap, extraction=extraction,
            channels=parse_channels(channels) if channels else None, cv=cv, seed=seed, positive=positive,
            batch_size=batch_size, device=device, head_params=parse_head_params(head_param), max_pixels=max_pixels,
        )
        started = time.perf_counter()
        with progress_bars() as progress:
            result = run_train(data_dir, labels, out, config, cache_from(cache_dir, no_cache), progress, overwrite)
    except MitoscopeError as exc:
        fail(exc)
    if result.cv_metrics:
        console.print(metrics_table(f"{cv}-fold cross-validation ({head})", result.cv_metrics))
    console.print(f"model written to [bold]{result.model_dir}[/bold] in {time.perf_counter() - started:.0f} s")


@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="A model folder written by `mitoscope train`."),
    images: list[Path] = typer.Argument(..., help="Image files or folders."),
    out: Path = typer.Option(Path("predictions.csv"), "--out", help="CSV to write."),
    heatmaps: Optional[Path] = typer.Option(None, "--heatmaps", help="Folder for per-image heatmap PNGs, window-score CSVs and top-k crops (heads: attention, pooled; finetune --pool attention)."),
    top_k: int = typer.Option(3, "--top-k", help="Top-scoring windows saved as crops with --heatmaps."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache"),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help=MAX_PIXELS_HELP + " Default: the model's."),
) -> None:
    """Predict new images: CSV with Image, Label, Probability and one column per head.

    Example: mitoscope predict model/ new_images/ --out predictions.csv --heatmaps heatmaps/
    """
    from .pipeline import predict as run_predict

    try:
        with progress_bars() as progress:
            rows = run_predict(model_dir, images, out, cache_from(cache_dir, no_cache), progress,
                               heatmaps_dir=heatmaps, top_k=top_k, max_pixels=max_pixels)
    except MitoscopeError as exc:
        fail(exc)
    console.print(f"{len(rows)} predictions written to [bold]{out}[/bold]")
    if heatmaps is not None:
        console.print(f"heatmaps written to [bold]{heatmaps}[/bold]")


@app.command()
def localize(
    model_dir: Path = typer.Argument(..., help="A model whose head gives window scores (attention, pooled; finetune --pool attention)."),
    data_dir: Path = typer.Argument(..., help="Folder of labelled images."),
    boxes: Path = typer.Option(..., "--boxes", help="boxes.csv with Image,x,y,w,h of the true mitoses (as written by compose_scenes.py)."),
    out: Path = typer.Option(..., "--out", help="Folder for localization.json."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels CSV (default: DATA_DIR/labels.csv)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help=CACHE_HELP),
    no_cache: bool = typer.Option(False, "--no-cache"),
) -> None:
    """Score how well the heatmaps point at true mitoses: pointing game and window AUC.

    Example: mitoscope localize model/ test_scenes/ --boxes test_scenes/boxes.csv --out loc/
    """
    from .pipeline import localize as run_localize

    try:
        with progress_bars() as progress:
            report = run_localize(model_dir, data_dir, boxes, out, labels, cache_from(cache_dir, no_cache), progress)
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
) -> None:
    """Evaluate a saved model on another labelled set.

    Example: mitoscope evaluate model/ test_scenes/ --labels test_scenes/labels.csv --out report/
    """
    from .pipeline import evaluate as run_evaluate

    try:
        with progress_bars() as progress:
            metrics = run_evaluate(model_dir, data_dir, labels, out, cache_from(cache_dir, no_cache), progress,
                                   max_pixels=max_pixels)
    except MitoscopeError as exc:
        fail(exc)
    console.print(metrics_table("evaluation", metrics))
    console.print(f"report written to [bold]{out}[/bold]")


@app.command()
def demo(
    out: Path = typer.Option(Path("mitoscope-demo"), "--out", help="Folder for the data, model, report and predictions."),
    data: Optional[Path] = typer.Option(None, "--data", help="Run on your own images instead of the synthetic set."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels CSV for --data."),
    head: str = typer.Option("attention", "--head", help="attention (default here: it beat the write-up's ensemble on every held-out set we measured) | ensemble | dense | forest | pooled"),
    positive: Optional[str] = typer.Option(None, "--positive", help="Positive class of --data (default: 'mitosis')."),
    cv: int = typer.Option(3, "--cv", help="Cross-validation folds on the training part."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Run the main job end to end: make data, train, evaluate, predict, and say where the report is.

    Without --data the images are SYNTHETIC (procedurally drawn cells, not real microscopy),
    so that a fresh clone runs offline in a few minutes on two CPU cores.

    Example: mitoscope demo --out demo/   |   mitoscope demo --data scenes/ --labels scenes/labels.csv
    """
    from .demo import run_demo
    from .pipeline import TrainConfig

    if data is None:
        console.print("[yellow]Using a SYNTHETIC dataset (procedurally drawn cells, not real microscopy).[/yellow]")
    started = time.perf_counter()
    try:
        config = TrainConfig(head=head, cv=cv, seed=seed, positive=positive)
        with progress_bars() as progress:
            result = run_demo(out, data, labels, config, progress=progress)
    except MitoscopeError as exc:
        fail(exc)
    if result.cv_metrics:
        console.print(metrics_table(f"{cv}-fold cross-validation on the training images ({head})", result.cv_metrics))
    console.print(metrics_table("held-out test images", result.test_metrics))
    console.print(f"model:       [bold]{result.model_dir}[/bold]")
    console.print(f"report:      [bold]{result.report_dir / 'metrics.json'}[/bold] (+ roc.png, confusion_matrix.png)")
    console.print(f"predictions: [bold]{result.predictions_csv}[/bold]")
    console.print(f"done in {time.perf_counter() - started:.0f} s")


def register_commands() -> None:
    # finetune lives with its Lightning code; it registers itself on the same app.
    from .distributed import register_cli as register_extract
    from .finetune import register_cli

    register_cli(app)
    register_extract(app)


register_commands()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
