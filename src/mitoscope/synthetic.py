"""Synthetic, procedurally drawn fields of cells for the offline demo.

THE IMAGES MADE HERE ARE SYNTHETIC. No microscope took them and no real cell is in them:
every nucleus, chromosome and cell outline is drawn from random numbers. They exist so
that ``mitoscope demo`` can run on a fresh clone that has no data. They say nothing about
how well a model does on real microscopy; never use them to benchmark or to draw
biological conclusions.

The layout matches ``shared/tools/compose_scenes.py`` (which composes *real* cells):

- ``OUT/images/scene_SSS_IIII.png``: 8-bit RGB, R = DNA stain, G = brightfield,
  B = darkfield, on a dark background with camera noise;
- ``OUT/labels.csv``: ``Image,Label`` with ``Mitosis`` / ``Normal`` (Image is the file name);
- ``OUT/boxes.csv``: ``Image,x,y,w,h,phase``, one row per mitotic cell (for scoring
  heatmaps only; never give it to a model);
- ``OUT/README.txt``: says that the data are synthetic and how they were made.

Interphase cells are round or oval nuclei with a smooth, mottled DNA texture of moderate
brightness inside a faint cytoplasm halo. Mitotic cells are rounded up and hold condensed
chromosomes: a bright, compact, irregular metaphase plate (a bar of small bright blobs) or
two separated anaphase clusters, brighter and smaller than an interphase nucleus. A
Mitosis image holds one or a few of them among many interphase cells, so the cue is
small in the field.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from mitoscope.atomic import atomic_path, atomic_write_text
from mitoscope.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["make_synthetic_dataset", "render_scene", "SYNTHETIC_MARKER"]

# First line of README.txt: how a folder is recognised as one of ours (safe to overwrite).
SYNTHETIC_MARKER = "SYNTHETIC DATA: procedurally drawn by mitoscope.synthetic, not real microscopy."

Box = tuple[int, int, int, int, str]

# Background levels and camera noise, in display units (0..1 maps to 0..255).
_BACKGROUND = np.array([0.02, 0.20, 0.07], dtype=np.float32)  # R=DNA, G=brightfield, B=darkfield
_READ_NOISE = 0.012
_SHOT_GAIN = 0.0004
_NAME_PATTERN = re.compile(r"scene_\d{3,}_\d{4,}\.png")


# --------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, height: int, width: int, sigmas: tuple[float, ...]) -> list[np.ndarray]:
    """Gaussian-filtered white noise (one field per sigma, unit std), via one FFT."""
    spectrum = np.fft.rfft2(rng.standard_normal((height, width)))
    fy, fx = np.fft.fftfreq(height), np.fft.rfftfreq(width)
    fields = []
    for sigma in sigmas:
        # The Gaussian's transfer function is separable: an outer product, not a 2-D exp.
        scale = -2.0 * (np.pi * sigma) ** 2
        field = np.fft.irfft2(spectrum * np.outer(np.exp(scale * fy**2), np.exp(scale * fx**2)), s=(height, width))
        fields.append((field / (field.std() + 1e-12)).astype(np.float32))
    return fields


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _ellipse_radius(
    dx: np.ndarray, dy: np.ndarray, semi_a: float, semi_b: float, angle: float, wobble: np.ndarray
) -> np.ndarray:
    """Normalised radius (1 on the outline) of a rotated ellipse with a wavy edge."""
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    phi = np.arctan2(v, u)
    # A few low harmonics make outlines irregular without looking like stars.
    edge = 1.0 + sum(amp * np.cos(k * phi + ph) for k, (amp, ph) in enumerate(wobble, start=2))
    return np.sqrt((u / semi_a) ** 2 + (v / semi_b) ** 2) / edge


def _wobble(rng: np.random.Generator, amplitude: float) -> np.ndarray:
    return np.stack([rng.uniform(0, amplitude, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1)


def _blobs(dx: np.ndarray, dy: np.ndarray, bx: np.ndarray, by: np.ndarray, sigma: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Sum of isotropic Gaussian blobs (centres bx, by relative to the cell), vectorised over blobs."""
    d2 = (dx[..., None] - bx) ** 2 + (dy[..., None] - by) ** 2
    return (amp * np.exp(-d2 / (2.0 * sigma**2))).sum(axis=-1)


def _chromosome_bar(
    rng: np.random.Generator, centre: tuple[float, float], length: float, angle: float, n_blobs: int, bend: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blob centres, sizes and amplitudes for a bar of condensed chromosomes."""
    t = rng.uniform(-length / 2, length / 2, n_blobs)
    # Perpendicular scatter keeps the bar compact but ragged; bend curves anaphase sets.
    s = rng.normal(0.0, 1.1, n_blobs) + bend * (t / max(length / 2, 1e-6)) ** 2
    bx = centre[0] + t * np.cos(angle) - s * np.sin(angle)
    by = centre[1] + t * np.sin(angle) + s * np.cos(angle)
    return bx, by, rng.uniform(0.9, 1.4, n_blobs), rng.uniform(0.5, 1.0, n_blobs)


def _place_cells(
    rng: np.random.Generator, width: int, height: int, extents: np.ndarray, n_required: int
) -> list[tuple[float, float] | None]:
    """Rejection-sample centres so that cells keep inside the image and barely touch."""
    centres: list[tuple[float, float] | None] = []
    placed_xy = np.empty((0, 2))
    placed_r = np.empty(0)
    for index, extent in enumerate(extents):
        low, high = np.array([extent, extent]), np.array([width - extent, height - extent])
        candidates = rng.uniform(low, high, size=(200, 2))
        if len(placed_r):
            dist = np.sqrt(((candidates[:, None, :] - placed_xy[None]) ** 2).sum(axis=-1))
            fits = (dist >= 0.95 * (extent + placed_r[None])).all(axis=1)
        else:
            fits = np.ones(len(candidates), dtype=bool)
        if not fits.any():
            if index < n_required:
                raise InputError(f"synthetic scene of {width}x{height}: no room for a mitotic cell of radius {extent:.0f}")
            centres.append(None)  # field is full: draw fewer cells rather than stack them
            continue
        chosen = candidates[int(np.argmax(fits))]
        centres.append((float(chosen[0]), float(chosen[1])))
        placed_xy = np.vstack([placed_xy, chosen])
        placed_r = np.append(placed_r, extent)
    return centres


def render_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    n_cells: int,
    n_mitoses: int,
    cell_radius: tuple[float, float],
) -> tuple[np.ndarray, list[Box]]:
    """Draw one synthetic field of cells.

    Args:
        rng: the random generator (the only source of randomness: same state, same image).
        size: (width, height) in pixels, as in compose_scenes' ``--size WxH``.
        n_cells: cells in the field, mitotic ones included (fewer if the field is full).
        n_mitoses: how many of them are in mitosis (metaphase or anaphase).
        cell_radius: (min, max) cell radius in pixels.

    Returns:
        ``(image, boxes)``: image is (height, width, 3) uint8 with R = DNA stain,
        G = brightfield, B = darkfield; boxes is a list of ``(x, y, w, h, phase)`` (ints,
        inside the image) around each mitotic cell.
    """
    width, height = int(size[0]), int(size[1])
    if not 0 <= n_mitoses <= n_cells:
        raise InputError(f"render_scene: expected 0 <= n_mitoses <= n_cells, got n_mitoses={n_mitoses}, n_cells={n_cells}")
    if not 0 < cell_radius[0] <= cell_radius[1] or min(width, height) < 4 * cell_radius[1]:
        raise InputError(
            f"render_scene: expected 0 < cell_radius[0] <= cell_radius[1] <= min(size) / 4, "
            f"got cell_radius={tuple(cell_radius)}, size={width}x{height}"
        )
    fine, medium = _smooth_noise(rng, height, width, (1.0, 2.5))
    canvas = np.zeros((height, width, 3), dtype=np.float32)

    radii = rng.uniform(cell_radius[0], cell_radius[1], n_cells)
    is_mitotic = np.arange(n_cells) < n_mitoses  # mitoses placed first so they always fit
    phases = np.where(rng.random(n_cells) < 0.6, "Metaphase", "Anaphase")
    # Mitotic cells round up; anaphase ones stretch along the spindle.
    elongation = np.select(
        [is_mitotic & (phases == "Anaphase"), is_mitotic],
        [rng.uniform(1.15, 1.3, n_cells), rng.uniform(1.0, 1.05, n_cells)],
        rng.uniform(1.0, 1.15, n_cells),
    )
    extents = radii * elongation * 1.15  # outline, rim and halo
    centres = _place_cells(rng, width, height, extents, n_mitoses)

    boxes: list[Box] = []
    for index, centre in enumerate(centres):
        if centre is None:
            continue
        cx, cy = centre
        radius, extent = float(radii[index]), float(extents[index])
        x0, x1 = max(0, int(np.floor(cx - extent))), min(width, int(np.ceil(cx + extent)) + 1)
        y0, y1 = max(0, int(np.floor(cy - extent))), min(height, int(np.ceil(cy + extent)) + 1)
        dx = (np.arange(x0, x1, dtype=np.float32) - cx)[None, :]
        dy = (np.arange(y0, y1, dtype=np.float32) - cy)[:, None]
        tex_fine, tex_medium = fine[y0:y1, x0:x1], medium[y0:y1, x0:x1]
        mitotic = bool(is_mitotic[index])
        spindle = rng.uniform(0, np.pi)

        # Cell body: mitotic cells round up; the outline carries the brightfield/darkfield rim.
        if mitotic:
            rho = _ellipse_radius(dx, dy, radius * elongation[index], radius, spindle, _wobble(rng, 0.015))
        else:
            rho = _ellipse_radius(dx, dy, radius * elongation[index], radius, rng.uniform(0, np.pi), _wobble(rng, 0.04))
        body = _sigmoid((1.0 - rho) * radius / 0.8)
        rim = np.exp(-(((rho - 1.02) * radius) ** 2) / (2 * 1.2**2))
        halo = np.exp(-(((rho - 1.12) * radius) ** 2) / (2 * 1.5**2))
        refractile = 1.4 if mitotic else 1.0

        if mitotic:
            peak = rng.uniform(0.75, 0.9)
            if phases[index] == "Metaphase":
                length = radius * rng.uniform(0.8, 1.05)
                bars = [_chromosome_bar(rng, (0.0, 0.0), length, spindle + np.pi / 2, int(rng.integers(16, 24)), 0.0)]
            else:
                gap = radius * elongation[index] * rng.uniform(0.35, 0.5)
                length = radius * rng.uniform(0.5, 0.7)
                bars = [
                    _chromosome_bar(
                        rng, (side * gap * np.cos(spindle), side * gap * np.sin(spindle)),
                        length, spindle + np.pi / 2, int(rng.integers(9, 14)), side * rng.uniform(0.5, 2.0),
                    )
                    for side in (-1.0, 1.0)
                ]
            bx, by, sizes, amp = (np.concatenate(parts) for parts in zip(*bars))
            chromatin = _blobs(dx, dy, bx, by, sizes, amp)
            dna = peak * (1.0 - np.exp(-1.3 * chromatin)) * (1.0 + 0.08 * tex_fine)
            dna += 0.035 * body
            nucleus = np.clip(chromatin, 0, 1)
        else:
            offset = rng.normal(0.0, 0.08 * radius, 2)
            nuc_r = radius * rng.uniform(0.55, 0.7)
            rho_n = _ellipse_radius(
                dx - offset[0], dy - offset[1], nuc_r, nuc_r * rng.uniform(0.78, 1.0), rng.uniform(0, np.pi), _wobble(rng, 0.04)
            )
            nucleus = _sigmoid((1.0 - rho_n) * nuc_r / 0.9)
            n_nucleoli = int(rng.integers(1, 4))
            nucleoli = _blobs(
                dx - offset[0], dy - offset[1], rng.uniform(-0.45, 0.45, n_nucleoli) * nuc_r,
                rng.uniform(-0.45, 0.45, n_nucleoli) * nuc_r, rng.uniform(1.3, 2.2, n_nucleoli), np.full(n_nucleoli, 0.3),
            )
            periphery = np.exp(-(((rho_n - 0.9) * nuc_r) ** 2) / (2 * 1.2**2))
            level = rng.uniform(0.28, 0.45)  # G1 dimmer, G2 brighter
            texture = 1.0 + 0.2 * tex_medium + 0.12 * tex_fine + 0.12 * periphery
            dna = level * nucleus * np.clip(texture - nucleoli, 0.2, None) + 0.045 * body

        canvas[y0:y1, x0:x1, 0] += dna
        canvas[y0:y1, x0:x1, 1] += (
            0.07 * body * (1.0 + 0.3 * tex_medium) - 0.025 * nucleus - 0.11 * refractile * rim + 0.05 * refractile * halo
        )
        # Side scatter is speckled, not an even ring.
        canvas[y0:y1, x0:x1, 2] += (0.03 * body + 0.08 * refractile * rim) * np.clip(1.0 + 0.6 * tex_medium, 0.2, None)

        if mitotic:
            bx0, by0 = max(0, int(np.floor(cx - extent))), max(0, int(np.floor(cy - extent)))
            bx1, by1 = min(width, int(np.ceil(cx + extent))), min(height, int(np.ceil(cy + extent)))
            boxes.append((bx0, by0, bx1 - bx0, by1 - by0, str(phases[index])))

    # Uneven illumination (brighter centre), then shot and read noise of a camera.
    yy = (np.arange(height, dtype=np.float32)[:, None] - height * rng.uniform(0.4, 0.6)) / max(height, width)
    xx = (np.arange(width, dtype=np.float32)[None, :] - width * rng.uniform(0.4, 0.6)) / max(height, width)
    illumination = (1.0 - 0.25 * (xx**2 + yy**2))[..., None]
    signal = canvas  # in place from here on: these full-size passes dominate the run time
    signal += _BACKGROUND
    signal *= illumination
    np.maximum(signal, 0.0, out=signal)
    spread = _SHOT_GAIN * signal
    spread += _READ_NOISE**2
    np.sqrt(spread, out=spread)
    spread *= rng.standard_normal((height, width, 3), dtype=np.float32)
    signal += spread
    np.clip(signal, 0.0, 1.0, out=signal)
    signal *= 255.0
    signal += 0.5
    return signal.astype(np.uint8), boxes


# --------------------------------------------------------------------------- files


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def _is_synthetic_dataset(folder: Path) -> bool:
    readme = folder / "README.txt"
    if not readme.is_file():
        return False
    with open(readme, encoding="utf-8", errors="replace") as handle:
        return handle.readline().rstrip("\n") == SYNTHETIC_MARKER


def _pair(name: str, value: tuple, kind: type, minimum: float) -> tuple:
    try:
        low, high = (kind(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"make_synthetic_dataset: expected {name} as a (min, max) pair, got {value!r}") from None
    if not minimum <= low <= high:
        raise InputError(f"make_synthetic_dataset: expected {minimum} <= {name}[0] <= {name}[1], got {value!r}")
    return low, high


def _readme_text(n_images: int, size: tuple[int, int], cells, mitoses, cell_radius, positive_fraction, seed) -> str:
    return "\n".join(
        [
            SYNTHETIC_MARKER,
            "",
            "Every image in this folder is SYNTHETIC: drawn procedurally from random numbers by",
            "mitoscope.synthetic for the offline demo (`mitoscope demo`). No microscope took them and",
            "no real cell is in them. Results on these images say nothing about real microscopy:",
            "do not use them to benchmark a model or to draw biological conclusions.",
            "",
            "What is drawn: 8-bit RGB fields (R = DNA stain, G = brightfield, B = darkfield) on a dark",
            "background with camera noise. Interphase cells have round or oval nuclei with a mottled",
            "DNA texture; mitotic cells are rounded with a bright metaphase plate or two anaphase sets.",
            "",
            "Layout (as shared/tools/compose_scenes.py writes for real cells):",
            "  images/*.png  the fields of cells",
            "  labels.csv    Image,Label  (Mitosis = holds at least one mitotic cell, Normal = none)",
            "  boxes.csv     Image,x,y,w,h,phase  where the mitotic cells are (to score heatmaps;",
            "                never give it to a model)",
            "",
            f"Made with: n_images={n_images}, size={size[0]}x{size[1]}, cells={cells}, mitoses={mitoses},",
            f"cell_radius={cell_radius}, positive_fraction={positive_fraction}, seed={seed}.",
            "The same arguments always give the same files.",
            "",
        ]
    )


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_images: int = 40,
    size: tuple[int, int] = (512, 512),
    cells: tuple[int, int] = (15, 30),
    mitoses: tuple[int, int] = (1, 2),
    cell_radius: tuple[float, float] = (14, 20),
    positive_fraction: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write a synthetic, labelled dataset of fields of cells (see the module docstring).

    Args:
        out_dir: folder to write; it must be absent, empty, or a previous synthetic dataset
            (recognised by its README.txt), which is overwritten.
        n_images: number of images.
        size: (width, height) of each image in pixels.
        cells: (min, max) cells per image, mitotic ones included.
        mitoses: (min, max) mitotic cells in a Mitosis image (Normal images have none).
        cell_radius: (min, max) cell radius in pixels.
        positive_fraction: fraction of images labelled Mitosis (rounded to a whole count).
        seed: the seed; the same arguments give the same bytes.

    Returns:
        The path of ``labels.csv``.
    """
    out = Path(out_dir)
    if not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise InputError(f"make_synthetic_dataset: expected n_images >= 1, got {n_images!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"make_synthetic_dataset: expected a seed >= 0, got {seed!r}")
    if not 0.0 <= float(positive_fraction) <= 1.0:
        raise InputError(f"make_synthetic_dataset: expected 0 <= positive_fraction <= 1, got {positive_fraction!r}")
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"make_synthetic_dataset: expected size as (width, height), got {size!r}") from None
    cells = _pair("cells", cells, int, 1)
    mitoses = _pair("mitoses", mitoses, int, 1)
    cell_radius = _pair("cell_radius", cell_radius, float, 2.0)
    if mitoses[1] > cells[0]:
        raise InputError(f"make_synthetic_dataset: expected mitoses[1] <= cells[0], got mitoses={mitoses}, cells={cells}")
    if min(width, height) < 4 * cell_radius[1]:
        raise InputError(
            f"make_synthetic_dataset: expected an image side of at least 4 x max cell radius "
            f"({4 * cell_radius[1]:.0f} px), got size={width}x{height}"
        )

    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: expected a folder for the synthetic dataset, got a file")
    if out.is_dir() and any(out.iterdir()) and not _is_synthetic_dataset(out):
        raise InputError(f"{out}: expected an empty folder or a previous synthetic dataset, got a folder with other files")
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    # README first: a run cut short still leaves a folder marked as ours, so a rerun may overwrite it.
    readme = _readme_text(n_images, (width, height), cells, mitoses, cell_radius, positive_fraction, seed)
    atomic_write_text(out / "README.txt", readme)

    label_seed, images_seed = np.random.SeedSequence(seed).spawn(2)
    label_rng = np.random.default_rng(label_seed)
    n_positive = int(round(n_images * float(positive_fraction)))
    positive = np.zeros(n_images, dtype=bool)
    positive[label_rng.permutation(n_images)[:n_positive]] = True

    labels: list[tuple[str, str]] = []
    all_boxes: list[tuple] = []
    # One child seed per image: image i does not depend on how the others were drawn.
    for index, image_seed in enumerate(images_seed.spawn(n_images)):
        rng = np.random.default_rng(image_seed)
        n_cells = int(rng.integers(cells[0], cells[1] + 1))
        n_mitoses = int(rng.integers(mitoses[0], mitoses[1] + 1)) if positive[index] else 0
        image, boxes = render_scene(rng, (width, height), n_cells, n_mitoses, cell_radius)
        name = f"scene_{seed:03d}_{index:04d}.png"
        with atomic_path(images_dir / name) as temp:
            # Level 1: camera noise barely compresses, and level 6 doubles the writing time.
            Image.fromarray(image).save(temp, format="PNG", compress_level=1)
        labels.append((name, "Mitosis" if positive[index] else "Normal"))
        all_boxes += [(name, x, y, w, h, phase) for x, y, w, h, phase in boxes]

    # Images of a bigger earlier run would otherwise sit unlisted next to the new ones.
    written = {name for name, _ in labels}
    for stale in images_dir.iterdir():
        if _NAME_PATTERN.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    _write_csv(out / "boxes.csv", ["Image", "x", "y", "w", "h", "phase"], all_boxes)
    labels_csv = out / "labels.csv"
    _write_csv(labels_csv, ["Image", "Label"], labels)  # last: its presence means the set is complete
    logger.info("wrote %d synthetic images (%d Mitosis) to %s", n_images, n_positive, out)
    return labels_csv
