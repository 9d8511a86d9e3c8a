"""Finding images (:func:`find_images`, for prediction) and image-level labels
(:func:`load_labelled_images`): from a CSV (the competition's ``Image,Label`` or a generic
``path,label``, read by :func:`mitoscope.io.tables.read_csv_table`) or from one sub-folder per
class.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .slides import SLIDE_SUFFIXES
from .tables import read_csv_table

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
# What a folder given to `predict` contributes: images, and whole slides (mitoscope.io.slides).
PREDICT_SUFFIXES = IMAGE_SUFFIXES + SLIDE_SUFFIXES
_POSITIVE_WORD = "mitosis"


def find_images(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and folders into a list of image paths (for prediction).

    A file is taken as given; a folder contributes its images and slides (suffixes in
    ``PREDICT_SUFFIXES``, any case; hidden files skipped; not recursive), sorted by name.
    The order of ``inputs`` is kept and a path given twice is listed once.

    Raises
    ------
    InputError
        A path does not exist, a folder holds no images, or nothing was given.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError(f"{path}: no such file or folder")
        if path.is_dir():
            images = _images_in(path, PREDICT_SUFFIXES)
            if not images:
                raise InputError(
                    f"{path}: folder contains no images (expected files ending in "
                    f"{', '.join(PREDICT_SUFFIXES)})"
                )
        else:
            images = [path]
        for image in images:
            key = image.resolve()
            if key not in seen:
                seen.add(key)
                found.append(image)
    if not found:
        raise InputError("no images given: expected image files or folders of images")
    return found


def present_images(paths: Iterable[str | os.PathLike[str]], skip_bad: bool = False
                   ) -> tuple[list[Path], dict[Path, str]]:
    """The image files among ``paths`` that exist, in order, and those that do not (path -> error).
    Without ``skip_bad`` a missing one raises InputError (``PATH: image file not found``)."""
    present: list[Path] = []
    missing: dict[Path, str] = {}
    for item in paths:
        path = Path(item)
        if path.is_file():
            present.append(path)
            continue
        error = f"{path}: image file not found"
        if not skip_bad:
            raise InputError(error)
        missing[path] = error
    return present, missing


def _images_in(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file()
    )


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelledImages:
    """Images with one label each.

    Attributes
    ----------
    paths : list of Path
        The image files, in the order of the CSV (or sorted by class folder, then name).
    labels : list of str
        Each image's label, in the CSV's (or folder's) own words.
    classes : (negative, positive)
        The two labels.
    y : np.ndarray
        0/1 ints, 1 where the label is ``classes[1]``.
    groups : list of str or None
        Each image's group (from a ``group`` or ``slide`` column) for grouped
        cross-validation; None when the CSV has no such column.
    """

    paths: list[Path]
    labels: list[str]
    classes: tuple[str, str]
    y: np.ndarray = field(repr=False)
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def refuse_slides(self, who: str) -> None:
        """InputError if any image is a whole slide: only the cell model trains on slides."""
        from .slides import is_slide

        for path in self.paths:
            if is_slide(path):
                raise InputError(f"{path}: a whole slide; {who} trains on images. Train the default cell model "
                                 f"(no --head), which reads slides tile by tile, or cut the slide into images")


def locate_labels(data_dir: str | os.PathLike[str], labels_csv: str | os.PathLike[str] | None = None) -> Path | None:
    """The labels CSV that :func:`load_labelled_images` reads (a relative ``labels_csv`` that
    does not exist is also looked for inside ``data_dir``), or None for class sub-folders.

    Raises InputError when ``data_dir`` is not a folder or the CSV does not exist; cheap (no
    file is read), so the command line calls it before loading anything heavy.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data folder does not exist")
    if labels_csv is None:
        return None
    csv_path = Path(labels_csv)
    if not csv_path.exists() and not csv_path.is_absolute() and (data_dir / csv_path).exists():
        csv_path = data_dir / csv_path
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: labels file does not exist")
    return csv_path


def load_labelled_images(
    data_dir: str | os.PathLike[str],
    labels_csv: str | os.PathLike[str] | None = None,
    positive: str | None = None,
) -> LabelledImages:
    """Load image paths and their labels.

    Three layouts are understood:

    * the competition's CSV with columns ``Image,Label`` (e.g. ``Mitosis``/``Normal``);
    * a generic CSV with columns ``path,label`` (extra columns are ignored);
    * ``labels_csv=None``: one sub-folder of ``data_dir`` per class, holding its images.

    Column names are matched case-insensitively. Paths in a CSV are relative to
    ``data_dir``, or to ``data_dir/images`` (where the competition and
    ``compose_scenes.py`` keep them); absolute paths are used as they are. A relative
    ``labels_csv`` that does not exist is also looked for inside ``data_dir``. A ``group``
    or ``slide`` column fills ``groups``.

    Parameters
    ----------
    data_dir : path-like
        The folder the images live in.
    labels_csv : path-like, optional
        The labels file; None for the folder-per-class layout.
    positive : str, optional
        The positive class. By default the label that reads ``mitosis`` in any case.

    Raises
    ------
    InputError
        Missing folder or CSV, missing columns, empty CSV, not exactly two classes,
        duplicate or missing images, or no positive class; the message names the file
        and the line.
    """
    data_dir = Path(data_dir)
    csv_path = locate_labels(data_dir, labels_csv)
    if csv_path is None:
        paths, labels, groups, source = _from_class_folders(data_dir)
    else:
        paths, labels, groups, source = _from_csv(data_dir, csv_path)

    classes = _choose_classes(labels, positive, source)
    y = np.array([int(label == classes[1]) for label in labels], dtype=np.int64)
    logger.info(
        "%s: %d images, %d %s, %d %s",
        source, len(paths), int((y == 0).sum()), classes[0], int(y.sum()), classes[1],
    )
    return LabelledImages(paths=paths, labels=labels, classes=classes, y=y, groups=groups)


def _from_class_folders(data_dir: Path) -> tuple[list[Path], list[str], None, str]:
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_images = {folder.name: _images_in(folder, PREDICT_SUFFIXES) for folder in folders}
    class_images = {name: images for name, images in class_images.items() if images}
    if len(class_images) != 2:
        hint = ""
        csv_files = sorted(p.name for p in data_dir.glob("*.csv"))
        if csv_files:
            hint = f"; to use a labels file pass it (CLI: --labels {data_dir / csv_files[0]})"
        found = ", ".join(repr(name) for name in class_images) or "none"
        raise InputError(
            f"{data_dir}: expected exactly two class sub-folders holding images; found "
            f"{len(class_images)} ({found}){hint}"
        )
    loose = _images_in(data_dir)
    if loose:
        logger.warning(
            "%s: %d images directly in the data folder are not in a class folder and are not used",
            data_dir, len(loose),
        )
    paths = [image for images in class_images.values() for image in images]
    labels = [name for name, images in class_images.items() for _ in images]
    return paths, labels, None, str(data_dir)


def _from_csv(data_dir: Path, csv_path: Path) -> tuple[list[Path], list[str], list[str] | None, str]:
    table = read_csv_table(csv_path, "labels", "'path,label' or 'Image,Label'")
    header = table.header
    path_column = table.column("path", "image")
    label_column = table.column("label")
    if path_column is None or label_column is None:
        found = ", ".join(repr(name.strip()) for name in header)
        raise InputError(
            f"{csv_path}: expected columns 'path,label' or 'Image,Label'; found {found}"
        )
    group_column = table.column("group", "slide")

    rows = table.rows
    if not rows:
        raise InputError(f"{csv_path}: labels file has a header but no rows")

    paths: list[Path] = []
    labels: list[str] = []
    groups: list[str] | None = [] if group_column is not None else None
    first_line_of: dict[Path, int] = {}
    missing: list[tuple[int, str]] = []
    needed = max(path_column, label_column, -1 if group_column is None else group_column)
    for line, row in rows:
        table.check_width(line, row, needed)
        name, label = table.cell(line, row, path_column), table.cell(line, row, label_column)
        image = _resolve_image(data_dir, name)
        if image is None:
            missing.append((line, name))
            continue
        key = image.resolve()
        if key in first_line_of:
            raise InputError(
                f"{csv_path}: line {line} lists {name!r} again (already on line {first_line_of[key]}); "
                f"each image must appear once"
            )
        first_line_of[key] = line
        paths.append(image)
        labels.append(label)
        if groups is not None:
            groups.append(table.cell(line, row, group_column))
    if missing:
        shown = ", ".join(f"line {line}: {name!r}" for line, name in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise InputError(
            f"{csv_path}: {len(missing)} listed image(s) not found under {data_dir} "
            f"(or {data_dir / 'images'}): {shown}{more}"
        )
    return paths, labels, groups, str(csv_path)


def _resolve_image(data_dir: Path, name: str) -> Path | None:
    relative = Path(name)
    if relative.is_absolute():
        return relative if relative.is_file() else None
    for candidate in (data_dir / relative, data_dir / "images" / relative):
        if candidate.is_file():
            return candidate
    return None


def _choose_classes(labels: Sequence[str], positive: str | None, source: str) -> tuple[str, str]:
    """(negative, positive) from the labels found and the ``positive`` asked for."""
    found = sorted(set(labels))
    listing = ", ".join(repr(label) for label in found)
    if len(found) != 2:
        raise InputError(
            f"{source}: expected exactly two classes; found {len(found)} ({listing})"
        )
    if positive is None:
        matches = [label for label in found if label.strip().lower() == _POSITIVE_WORD]
        if len(matches) != 1:
            raise InputError(
                f"{source}: cannot tell which class is positive (neither label reads "
                f"'{_POSITIVE_WORD}'); pass --positive with one of {listing}"
            )
        chosen = matches[0]
    elif positive in found:
        chosen = positive
    else:
        matches = [label for label in found if label.lower() == positive.strip().lower()]
        if len(matches) != 1:
            raise InputError(
                f"{source}: positive class {positive!r} is not one of the labels found ({listing})"
            )
        chosen = matches[0]
    negative = found[0] if found[1] == chosen else found[1]
    return negative, chosen
