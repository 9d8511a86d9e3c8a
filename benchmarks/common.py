"""Helpers shared by the benchmark scripts: where the real data is, composing scenes, timing."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
COMPOSE = SHARED / "tools" / "compose_scenes.py"

# The scene sets of the issues: name -> compose_scenes.py arguments (train seed 1, test seed 2).
SCENE_SETS: dict[str, list[str]] = {
    "large-cells-1024": ["--size", "1024x1024", "--cell-scale", "4,5", "--cells", "6,12"],
    "small-cells-1024": ["--size", "1024x1024", "--cell-scale", "1.5,2"],
    "small-cells-2048": ["--size", "2048x2048"],
    "variable-scale": ["--size", "1024x1024", "--cell-scale", "4,5", "--cells", "6,12", "--out-scale", "0.5,3"],
}
# Large images to pre-train on before the variable-scale scenes (the write-up's Round-1 images):
# the large cells of the sets above on a 4x larger canvas (seed 5), cut into 1024 tiles.
PRETRAIN_SET = ("large-cells-2048", ["--size", "2048x2048", "--cell-scale", "4,5", "--cells", "24,48"], 60, 5)
N_TRAIN, N_TEST = 120, 60


def require_shared() -> None:
    if not COMPOSE.is_file() or not (DATA / "jurkat-cells").is_dir():
        sys.exit(f"real data not found at {SHARED}: benchmarks need ../shared (see README)")


def compose(out: Path, args: list[str], n: int, seed: int) -> Path:
    """Compose scenes once; the same arguments always give the same files."""
    if not (out / "labels.csv").is_file():
        subprocess.run([sys.executable, str(COMPOSE), str(DATA / "jurkat-cells"), str(out), "--n", str(n),
                        "--seed", str(seed), *args], check=True, capture_output=True)
    return out


def scene_pair(work: Path, name: str) -> tuple[Path, Path]:
    """Training scenes from one part of the cells, test scenes from the other (cell-disjoint):
    a test score on shared cells would also reward remembering individual cells."""
    args = SCENE_SETS[name]
    return (compose(work / f"{name}-train-disjoint", [*args, "--part", "train"], N_TRAIN, 1),
            compose(work / f"{name}-test-disjoint", [*args, "--part", "test"], N_TEST, 2))


def inner_pair(work: Path, name: str) -> tuple[Path, Path]:
    """For choosing a recipe without the test scenes: the *training* part of the cells split in two
    halves by file name (the tool's own hash, another salt), fitting scenes (120, seed 11) from one,
    validation scenes (60, seed 12) from the other, rendered like every other set (``--norm-cells``).
    The training scenes of :func:`scene_pair` reuse each cell several times, so a validation share of
    them also rewards remembering cells; these halves do not (no test cell is read)."""
    import csv
    import hashlib

    def in_part(path: str, salt: str, fraction: float) -> bool:
        return hashlib.sha256(f"{salt}:{path}".encode()).digest()[0] < round(fraction * 256)

    source = DATA / "jurkat-cells"
    with open(source / "labels.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if not in_part(r["path"], "compose-part", 0.3)]
    folders = []
    for half, wanted, n, seed in (("fit", False, N_TRAIN, 11), ("val", True, N_TEST, 12)):
        cells = work / "inner-cells" / half
        if not (cells / "labels.csv").is_file():
            cells.mkdir(parents=True, exist_ok=True)
            if not (cells / "cells").exists():
                (cells / "cells").symlink_to(source / "cells")
            chosen = [r for r in rows if in_part(r["path"], "inner-half", 0.5) == wanted]
            with open(cells / "labels.tmp", "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=list(chosen[0]))
                writer.writeheader()
                writer.writerows(chosen)
            (cells / "labels.tmp").replace(cells / "labels.csv")
        out = work / f"{name}-inner-{half}"
        if not (out / "labels.csv").is_file():
            subprocess.run([sys.executable, str(COMPOSE), str(cells), str(out), "--n", str(n), "--seed", str(seed),
                            "--norm-cells", str(source), *SCENE_SETS[name]], check=True, capture_output=True)
        folders.append(out)
    return folders[0], folders[1]


def pretrain_scenes(work: Path) -> Path:
    name, args, n, seed = PRETRAIN_SET
    return compose(work / f"{name}-disjoint", [*args, "--part", "train"], n, seed)


def machine() -> dict[str, Any]:
    """Which CPU gave the numbers: libraries pick other kernels (and OpenVINO other precisions) per CPU."""
    import os
    import platform

    info: dict[str, Any] = {"machine": platform.machine(), "cpus": len(os.sched_getaffinity(0))}
    # The code that gave the numbers (a benchmark may run from a worktree of an older commit).
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    info["commit"] = commit.stdout.strip() or None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["avx512_bf16"] = "avx512_bf16" in flags
            info["avx512f"] = "avx512f" in flags
            info["avx2"] = "avx2" in flags
            break
    return info


@contextmanager
def timed(record: dict[str, Any], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    record[key] = round(time.perf_counter() - start, 1)


def save_results(path: Path, results: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def best_cell_cv_auc(features: Any, crops: Any, offsets: Any, y: Any, shuffles: tuple[int, ...]) -> list[float]:
    """Stratified 5-fold CV of the product's linear cell scorer (`LinearInstanceHead`) over images,
    each image scored by its best cell: the AUC of each shuffle. Image labels only."""
    import numpy as np
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    from mitoscope.cells.bootstrap import LinearInstanceHead, intensity_features

    stats = intensity_features(crops)

    def rows(images):
        index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in images])
        return index, np.concatenate([[0], np.cumsum([offsets[i + 1] - offsets[i] for i in images])])

    aucs = []
    for shuffle in shuffles:
        oof = np.zeros(len(y))
        for train, test in StratifiedKFold(5, shuffle=True, random_state=shuffle).split(y, y):
            i, o = rows(train)
            j, p = rows(test)
            head = LinearInstanceHead(seed=shuffle).fit(features[i], stats[i], o, y[train])
            scores = head.decision_function(features[j], stats[j])
            oof[test] = [scores[p[k]:p[k + 1]].max() if p[k + 1] > p[k] else -1e9 for k in range(len(test))]
        aucs.append(round(float(roc_auc_score(y, oof)), 4))
    return aucs


def training_bags(work: Path, set_name: str) -> tuple[Any, Any]:
    """The cells of a set's training scenes as the product finds and cuts them (96 px), and the
    image labels: (Bags, labels)."""
    import numpy as np

    from mitoscope.cells.workflow import collect_bags
    from mitoscope.io import ReadOptions, load_labelled_images

    train_dir, _ = scene_pair(work, set_name)
    data = load_labelled_images(train_dir, train_dir / "labels.csv")
    return collect_bags(data.paths, data.y, ReadOptions(), 96), np.asarray(data.y)


def found_cells(folder: Path, input_size: int = 96) -> tuple[Any, list[Any], Any, list[str], Any]:
    """The cells of every scene of ``folder`` as the product finds and cuts them: (crops, centres
    per scene, offsets, image names, image labels), scenes in ``labels.csv``'s order."""
    import numpy as np

    from mitoscope.cells.proposals import cut_crops, find_cells
    from mitoscope.io import ReadOptions, load_labelled_images, read_image

    data = load_labelled_images(folder, folder / "labels.csv")
    crops, centres, offsets = [], [], [0]
    for path in data.paths:
        image = read_image(path, ReadOptions())
        proposals = find_cells(image)
        crops.append(cut_crops(image, proposals, input_size))
        centres.append(proposals.centres)
        offsets.append(offsets[-1] + len(proposals))
    return (np.concatenate(crops), centres, np.asarray(offsets), [p.name for p in data.paths], np.asarray(data.y))


def mitotic_flags(folder: Path, names: list[str], offsets: Any, centres: list[Any]) -> Any:
    """Whether each found cell is mitotic: its centre lies in one of its scene's ``boxes.csv`` boxes
    (a benchmark's truth only; the product never reads boxes to learn)."""
    import numpy as np

    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    with open(folder / "boxes.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            x, y, w, h = (float(row[k]) for k in ("x", "y", "w", "h"))
            boxes.setdefault(row["Image"], []).append((x, y, x + w, y + h))
    flags = np.zeros(offsets[-1], dtype=bool)
    for index, name in enumerate(names):
        for row, (cx, cy) in enumerate(centres[index]):
            flags[offsets[index] + row] = any(x0 <= cx <= x1 and y0 <= cy <= y1 for x0, y0, x1, y1 in boxes.get(name, []))
    return flags
