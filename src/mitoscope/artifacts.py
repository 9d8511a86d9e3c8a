"""Saved models: a folder with ``model.json`` and the files it lists, each with its sha256.

``model.json`` holds everything needed to reproduce preprocessing and prediction: package
versions, the backbone and its weights hash, tiling, reading options, classes, positive
class, decision threshold, training image size and the head's spec. A model is written into
a temporary sibling folder and renamed into place, so a crash never leaves half a model;
loading checks every hash, so a tampered or truncated file is a clear error.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import __version__
from .atomic import atomic_write_json, sha256_file
from .errors import InputError, ModelError
from .io import ReadOptions, SourceProfile

FORMAT_VERSION = 1
MODEL_FILE = "model.json"


def environment_versions() -> dict[str, str]:
    import numpy
    import sklearn
    import timm
    import torch

    return {
        "mitoscope": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
    }


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output that a model may not be written to.

    A non-empty folder is replaced only with ``overwrite``, and only when it holds a model
    (its ``model.json``): ``--overwrite`` must never wipe a folder of other files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: output exists and is a file, expected a folder for the model")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(
                f"{out_dir}: output folder exists and is not empty (choose another --out or pass --overwrite)"
            )
        if not (out_dir / MODEL_FILE).is_file():
            raise InputError(
                f"{out_dir}: output folder is not empty and holds no {MODEL_FILE}; --overwrite only replaces "
                f"a model folder"
            )
    return out_dir


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a filesystem that cannot open folders: the rename stands as it is
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_model_dir(
    out_dir: str | Path,
    config: dict[str, Any],
    write_files: Callable[[Path], list[str]],
    overwrite: bool = False,
) -> Path:
    """Write a model folder atomically.

    ``write_files(tmp_dir)`` writes the model's payload files and returns their names;
    ``config`` becomes ``model.json`` with the hashes of those files added.
    """
    out_dir = check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        names = write_files(tmp_dir)
        config = {
            **config,
            "format_version": FORMAT_VERSION,
            "versions": environment_versions(),
            "files": {name: sha256_file(tmp_dir / name) for name in sorted(set(names))},
        }
        atomic_write_json(tmp_dir / MODEL_FILE, config)
        if out_dir.exists():
            backup = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            out_dir.rename(backup)
            tmp_dir.rename(out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp_dir.rename(out_dir)
        _fsync_dir(out_dir.parent)  # the rename itself survives a power cut
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def read_model_config(model_dir: str | Path, verify_files: bool = True) -> dict[str, Any]:
    """Read and verify ``model.json`` and (unless ``verify_files`` is False: then call
    :func:`verify_model_files` before using them) the hashes of every file it lists."""
    model_dir = Path(model_dir)
    path = model_dir / MODEL_FILE
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a model folder (it does not exist or is not a folder)")
    if not path.is_file():
        raise ModelError(f"{model_dir}: not a mitoscope model: {MODEL_FILE} is missing")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); the file is damaged") from None
    if not isinstance(config, dict) or "format_version" not in config:
        raise ModelError(f"{path}: not a mitoscope model description (no format_version)")
    if config["format_version"] != FORMAT_VERSION:
        raise ModelError(
            f"{path}: model format {config['format_version']} is not supported by mitoscope {__version__} "
            f"(expected {FORMAT_VERSION})"
        )
    for key in ("kind", "classes", "positive", "threshold", "head", "files"):
        if key not in config:
            raise ModelError(f"{path}: incomplete model description: key {key!r} is missing")
    files = config["files"]
    if not isinstance(files, dict) or not all(
        isinstance(name, str) and Path(name).name == name and isinstance(digest, str) for name, digest in files.items()
    ):
        raise ModelError(f"{path}: 'files' must map plain file names to sha256 digests")
    if verify_files:
        verify_model_files(model_dir, config)
    return config


def verify_model_files(model_dir: str | Path, config: dict[str, Any]) -> None:
    """Every file ``model.json`` lists is there and has the sha256 it was saved with."""
    model_dir = Path(model_dir)
    for name, expected in config["files"].items():
        file = model_dir / name
        if not file.is_file():
            raise ModelError(f"{file}: file of the model is missing")
        if sha256_file(file) != expected:
            raise ModelError(f"{file}: file was changed or truncated after the model was saved (sha256 mismatch)")


@dataclass(frozen=True)
class ModelCard:
    """What ``model.json`` says, read and checked once: the model's kind, classes, threshold, head,
    backbone, tiling, reading options, training image size and the sha256 of each of its files."""

    path: Path  # the folder as given
    kind: str
    classes: tuple[str, str]
    positive: str
    threshold: float
    head_name: str
    head_spec: Mapping[str, Any] | None  # None when model.json lacks it (the head cannot be loaded)
    backbone: Mapping[str, Any]
    tiling: Mapping[str, Any]  # empty for a fine-tuned network
    read: Mapping[str, Any]
    train_image_size: tuple[int, int] | None
    files: Mapping[str, str]
    config: Mapping[str, Any]  # all of model.json, for what has no field here
    _verified: list[bool] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def of(cls, config: Mapping[str, Any], path: str | Path) -> "ModelCard":
        """The card of an already checked ``model.json`` (``config``) of the folder ``path``."""
        size = config.get("train_image_size")
        head = config["head"]
        return cls(
            path=Path(path), kind=config["kind"], classes=tuple(config["classes"]), positive=config["positive"],
            threshold=float(config["threshold"]), head_name=head.get("name", ""), head_spec=head.get("spec"),
            backbone=config.get("backbone") or {}, tiling=config.get("tiling") or {}, read=config.get("read") or {},
            train_image_size=(int(size[0]), int(size[1])) if size else None, files=dict(config["files"]),
            config={k: v for k, v in config.items() if not k.startswith("_")})

    @property
    def resolved(self) -> Path:
        return self.path.resolve()

    @property
    def window(self) -> int | None:
        """The window side in pixels of a window-feature model (None for a fine-tuned network)."""
        return int(self.tiling["window"]) if "window" in self.tiling else None

    @property
    def input_size(self) -> int | None:
        """The backbone's own input side in pixels (windows of another size are resized in PyTorch)."""
        size = self.backbone.get("input_size")
        return int(size) if size is not None else None

    def head_files_spec(self) -> Mapping[str, Any]:
        """The head's spec; KeyError('spec'), as model.json's own lookup raised, when it has none."""
        if self.head_spec is None:
            raise KeyError("spec")
        return self.head_spec

    def settings(self) -> dict[str, Any]:
        """A fresh, mutable copy of ``model.json`` for one model object, with ``_model_dir`` added."""
        return {**copy.deepcopy(dict(self.config)), "_model_dir": str(self.resolved)}

    def verify_files(self, where: str | Path | None = None) -> None:
        """Check every listed file's sha256 (:func:`verify_model_files`), once per
        card: a later call does nothing. ``where`` is the folder the errors name (default: as given)."""
        if not self._verified:
            verify_model_files(self.path if where is None else where, dict(self.config))
            self._verified.append(True)


def read_model_card(model_dir: str | Path) -> ModelCard:
    """Read and check ``model.json`` (not yet the files' hashes: :meth:`ModelCard.verify_files`)."""
    return ModelCard.of(read_model_config(model_dir, verify_files=False), model_dir)


def off_grid(card: ModelCard, image_sizes: Mapping[Path, tuple[int, int]]) -> str | None:
    """Why images of these (H, W) sizes cannot be served: the first one off a fixed-grid head's
    training size (resized in PyTorch, as at training); None when all are on it, or any size works."""
    fixed = card.train_image_size
    if fixed is None:
        return None
    for path, size in image_sizes.items():
        if tuple(size) != fixed:
            return f"{path} is {size[1]}x{size[0]}, the model's grid {fixed[1]}x{fixed[0]}: resized in PyTorch"
    return None


class ModelDescription:
    """What every saved model tells from its ``model.json``: classes, positive class, threshold,
    how images are read, the kinds of image it was trained on, and the size a fixed-grid head
    was trained on."""

    config: dict[str, Any]
    card: Any = None  # the ModelCard it was loaded from; None for a model not yet saved

    def _save(self, out_dir: str | Path, config: dict[str, Any], write: Callable[[Path], list[str]],
              overwrite: bool) -> Path:
        """Write the model folder atomically (``write`` adds the files), then describe the saved one."""
        model_dir = Path(write_model_dir(out_dir, config, write, overwrite=overwrite))
        self.config = {**config, "_model_dir": str(model_dir.resolve())}
        self.card = None  # describe() now tells the saved model.json
        return model_dir

    @classmethod
    def load(cls, model_dir: str | Path) -> Any:
        """The saved model in ``model_dir``: its ``model.json`` read once, then :meth:`from_card`."""
        return cls.from_card(read_model_card(model_dir))

    def describe(self) -> Any:
        """The :class:`ModelCard` of this model (what its ``model.json`` says)."""
        if self.card is None:
            return ModelCard.of(self.config, self.config.get("_model_dir", "."))
        return self.card

    def for_images(self, image_sizes: Any, on_fallback: Callable[[str], None] | None = None) -> Any:
        """The model that runs images of these sizes (path -> (H, W), from their headers): this one,
        unless it cannot run them (see :meth:`mitoscope.inference.ServedModel.for_images`)."""
        return self

    @property
    def head_name(self) -> str:
        return self.config["head"]["name"]

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions.from_dict(self.config["read"])

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """(H, W) every image is resized to for a fixed-grid head; None when any size works."""
        size = self.config.get("train_image_size")
        return (int(size[0]), int(size[1])) if size else None

    def limit_pixels(self, max_pixels: int | None) -> None:
        """Replace the model's pixel limit for its reads (None keeps it); a bad limit fails now."""
        if max_pixels is not None:
            self._override_reading("max_pixels", max_pixels)

    def choose_channels(self, channels: tuple[int, int, int] | None) -> None:
        """Replace the source channels the model reads as R, G, B (None keeps the model's)."""
        if channels is not None:
            self._override_reading("channels", list(channels))
            self.config["_channels_chosen"] = True

    @property
    def channels_chosen(self) -> bool:
        """Whether :meth:`choose_channels` replaced the model's channels for these reads."""
        return bool(self.config.get("_channels_chosen"))

    def _override_reading(self, key: str, value: Any) -> None:
        read = {**self.config.get("read", {}), key: value}
        ReadOptions.from_dict(read)  # a bad option is an InputError now, not mid-prediction
        self.config["read"] = read

    @property
    def source_profile(self) -> SourceProfile | None:
        """The bit depths and channel counts of the training images; None for models saved before
        they were recorded."""
        try:
            return SourceProfile.from_dict(self.config.get("source_images"))
        except InputError as error:
            raise ModelError(f"{Path(self.config.get('_model_dir', '.')) / MODEL_FILE}: {error}") from None

    @property
    def gives_window_scores(self) -> bool:
        """Whether the model scores windows (or feature-map positions): what heatmaps need."""
        return hasattr(getattr(self, "head", None), "window_scores")

    @property
    def classes(self) -> tuple[str, str]:
        return tuple(self.config["classes"])

    @property
    def positive(self) -> str:
        return self.config["positive"]

    @property
    def threshold(self) -> float:
        return float(self.config["threshold"])
