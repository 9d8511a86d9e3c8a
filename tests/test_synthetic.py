"""Tests for the synthetic demo data: layout, determinism, labels, boxes and the look of the cue."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label, regionprops

from mitoscope.errors import InputError
from mitoscope.synthetic import SYNTHETIC_MARKER, make_synthetic_dataset, render_scene

# Small fields keep the suite fast; the drawing code is the same at any size.
SMALL = dict(n_images=8, size=(200, 160), cells=(5, 8), mitoses=(1, 2), cell_radius=(12, 16))


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path / "a", seed=3, **SMALL)
    make_synthetic_dataset(tmp_path / "b", seed=3, **SMALL)
    make_synthetic_dataset(tmp_path / "c", seed=4, **SMALL)
    first, second = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    assert len(first) == SMALL["n_images"] + 3  # images, labels.csv, boxes.csv, README.txt
    assert first == second

    pixels_a = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "a" / "images").iterdir())]
    pixels_c = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "c" / "images").iterdir())]
    assert all(not np.array_equal(a, c) for a, c in zip(pixels_a, pixels_c, strict=True))


def test_labels_csv_format_names_and_balance(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    labels_csv = make_synthetic_dataset(out, seed=7, **SMALL)
    assert labels_csv == out / "labels.csv"
    lines = labels_csv.read_text().splitlines()
    assert lines[0] == "Image,Label"
    rows = [line.split(",") for line in lines[1:]]
    assert all(len(row) == 2 and row[1] in {"Mitosis", "Normal"} for row in rows)
    assert sum(row[1] == "Mitosis" for row in rows) == SMALL["n_images"] // 2
    # Names as compose_scenes writes them: the file name, seed and index zero-padded.
    assert [row[0] for row in rows] == [f"scene_007_{i:04d}.png" for i in range(SMALL["n_images"])]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(row[0] for row in rows)
    for row in rows:
        with Image.open(out / "images" / row[0]) as image:
            assert image.mode == "RGB" and image.size == SMALL["size"]  # size is (width, height)


def test_positive_fraction_sets_the_mitosis_count(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, positive_fraction=0.25, **SMALL)
    labels = [row[1] for row in read_rows(tmp_path / "labels.csv")[1:]]
    assert labels.count("Mitosis") == 2 and labels.count("Normal") == 6


def test_boxes_lie_inside_the_image_and_only_on_mitosis_images(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, seed=1, **SMALL)
    labels = dict(read_rows(tmp_path / "labels.csv")[1:])
    rows = read_rows(tmp_path / "boxes.csv")
    assert rows[0] == ["Image", "x", "y", "w", "h", "phase"]
    width, height = SMALL["size"]
    per_image: dict[str, int] = {}
    for name, x, y, w, h, phase in rows[1:]:
        x, y, w, h = int(x), int(y), int(w), int(h)
        assert labels[name] == "Mitosis"
        assert phase in {"Metaphase", "Anaphase"}
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
        per_image[name] = per_image.get(name, 0) + 1
    mitosis_images = {name for name, value in labels.items() if value == "Mitosis"}
    assert set(per_image) == mitosis_images
    assert all(SMALL["mitoses"][0] <= count <= SMALL["mitoses"][1] for count in per_image.values())


def test_mitotic_figures_are_brighter_and_smaller_than_interphase_nuclei() -> None:
    threshold = 60  # DNA level (8-bit) well above background and cytoplasm halo
    mitotic_peak, mitotic_area, interphase_peak, interphase_area = [], [], [], []
    for seed in range(6):
        image, boxes = render_scene(np.random.default_rng(seed), (256, 256), 10, 2, (14, 20))
        assert image.dtype == np.uint8 and image.shape == (256, 256, 3)
        dna = image[..., 0].astype(float)
        in_boxes = np.zeros(dna.shape, dtype=bool)
        for x, y, w, h, _ in boxes:
            in_boxes[y : y + h, x : x + w] = True
            crop = dna[y : y + h, x : x + w]
            mitotic_peak.append(np.percentile(crop, 99.5))  # a high percentile ignores single noisy pixels
            mitotic_area.append(int((crop > threshold).sum()))
        for region in regionprops(label((dna > threshold) & ~in_boxes), intensity_image=dna):
            if region.area >= 20:  # noise specks are not nuclei
                interphase_area.append(region.area)
                interphase_peak.append(np.percentile(region.image_intensity[region.image], 99.5))
    assert len(mitotic_peak) == 12 and len(interphase_area) >= 30
    assert np.median(mitotic_peak) > np.percentile(interphase_peak, 75)
    assert max(mitotic_area) < np.median(interphase_area)
    assert np.median(mitotic_area) < 0.5 * np.median(interphase_area)


def test_cells_do_not_overlap() -> None:
    # Normal fields have one nucleus per cell: cells drawn over each other merge their nuclei
    # into fewer blobs. 20 cells fit easily in 300x300, so every one of them must be drawn.
    for seed in range(4):
        image, boxes = render_scene(np.random.default_rng(seed), (300, 300), 20, 0, (14, 20))
        assert boxes == []
        nuclei = [r for r in regionprops(label(image[..., 0] > 40)) if r.area >= 20]
        assert len(nuclei) == 20


def test_refuses_a_non_empty_folder_that_is_not_synthetic(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("my data")
    with pytest.raises(InputError, match="notes|other files"):
        make_synthetic_dataset(tmp_path, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "my data"

    a_file = tmp_path / "notes.txt"
    with pytest.raises(InputError, match="got a file"):
        make_synthetic_dataset(a_file, **SMALL)


def test_overwrites_a_previous_synthetic_dataset(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, **SMALL)
    make_synthetic_dataset(tmp_path, **{**SMALL, "n_images": 3})
    assert len(read_rows(tmp_path / "labels.csv")) == 1 + 3
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"scene_000_{i:04d}.png" for i in range(3)]


def test_the_readme_marks_the_data_as_synthetic_and_only_that_mark_allows_overwriting(tmp_path: Path) -> None:
    make_synthetic_dataset(tmp_path, **SMALL)
    readme = (tmp_path / "README.txt").read_text()
    assert readme.splitlines()[0] == SYNTHETIC_MARKER
    assert "not real microscopy" in readme
    # A folder whose README lost the mark is someone's data: refused, left as it was.
    (tmp_path / "README.txt").write_text("my notes\n" + readme)
    before = sorted(p.name for p in (tmp_path / "images").iterdir())
    with pytest.raises(InputError):
        make_synthetic_dataset(tmp_path, **{**SMALL, "n_images": 3})
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == before
    assert (tmp_path / "README.txt").read_text().startswith("my notes")


def test_a_failed_write_leaves_no_partial_or_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half an image")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        make_synthetic_dataset(tmp_path, **SMALL)
    assert list((tmp_path / "images").iterdir()) == []
    assert not (tmp_path / "labels.csv").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.txt", "images"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"n_images": 0}, "n_images"),
        ({"cells": (8, 5)}, "cells"),
        ({"mitoses": (0, 1)}, "mitoses"),
        ({"mitoses": (1, 9)}, "mitoses"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"size": (40, 40)}, "size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_raise_input_error(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        make_synthetic_dataset(tmp_path, **{**SMALL, **options})
    assert list(tmp_path.iterdir()) == []  # nothing written before the options are checked


def test_render_scene_refuses_impossible_scenes() -> None:
    with pytest.raises(InputError, match="n_mitoses"):
        render_scene(np.random.default_rng(0), (100, 100), 1, 2, (10, 12))
    with pytest.raises(InputError, match="cell_radius"):
        render_scene(np.random.default_rng(0), (100, 30), 3, 1, (10, 12))
