"""Predict whole slides with flat memory: a real Aperio slide and a 40,000 x 40,000 synthetic one.

    python benchmarks/wsi_memory.py --model MODEL_DIR [--work /tmp/mitoscope-wsi]

The synthetic slide is an Aperio-style pyramid (levels 1, 4, 16, 64; 0.5 µm/px) written tile by
tile, so that it never exists whole in memory: white glass, and four "tissue" fields made of
real crowded Jurkat scenes (``compose_scenes.py --size 2048x2048 --part test``, seed 4) placed
at known places. Its level 0 would need 40,000 x 40,000 x 3 bytes = 4.8 GB decoded.

Measured for each slide: ``mitoscope predict MODEL SLIDE --out --heatmaps --geojson`` as a
subprocess: wall time (process start included), peak resident memory, the tiles read and
the count. Target: peak memory under 2 GB for the 40,000 x 40,000 slide.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from common import COMPOSE, DATA, REPO, machine, save_results
from speed import mitoscope_command, run_measured

SIDE = 40_000
FIELDS = [(6000, 8000), (20000, 9000), (9000, 24000), (26000, 30000)]  # level-0 (x, y) of each 2048 field


def scenes(work: Path) -> list[np.ndarray]:
    from PIL import Image

    out = work / "fields"
    if not (out / "labels.csv").is_file():
        subprocess.run([sys.executable, str(COMPOSE), str(DATA / "jurkat-cells"), str(out), "--n", str(len(FIELDS)),
                        "--seed", "4", "--size", "2048x2048", "--part", "test"], check=True, capture_output=True)
    return [np.asarray(Image.open(path).convert("RGB")) for path in sorted((out / "images").glob("*.png"))]


def write_slide(path: Path, fields: list[np.ndarray], tile: int = 512) -> Path:
    import tifffile

    def tiles(level_ds: int):
        n = SIDE // level_ds
        for y in range(0, n, tile):
            for x in range(0, n, tile):
                block = np.full((tile, tile, 3), 242, np.uint8)
                for (fx, fy), field in zip(FIELDS, fields):
                    small = field[::level_ds, ::level_ds]
                    ox, oy = fx // level_ds - x, fy // level_ds - y
                    h, w = small.shape[:2]
                    x0, y0, x1, y1 = max(0, ox), max(0, oy), min(tile, ox + w), min(tile, oy + h)
                    if x1 > x0 and y1 > y0:
                        block[y0:y1, x0:x1] = small[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
                yield block

    description = (f"Aperio Image Library v11.2.1\n{SIDE}x{SIDE} [0,0 {SIDE}x{SIDE}] ({tile}x{tile}) RGB"
                   f"|AppMag = 20|MPP = 0.5")
    if not path.is_file():
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            for index, level_ds in enumerate((1, 4, 16, 64)):
                n = SIDE // level_ds
                tif.write(tiles(level_ds), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                          description=description if index == 0 else "", photometric="rgb", metadata=None)
    return path


def measure(model: Path, slide: Path, out: Path) -> dict:
    import os

    command = [*mitoscope_command(), "predict", str(model), str(slide), "--out", str(out / "p.csv"),
               "--heatmaps", str(out / "heatmaps"), "--geojson", str(out / "geojson")]
    wall, peak_mb, _ = run_measured(command, dict(os.environ))
    (row,) = list(csv.DictReader(open(out / "p.csv")))
    return {"slide": slide.name, "wall_s": round(wall, 2), "peak_rss_mb": round(peak_mb), "row": row,
            "command": " ".join(["mitoscope", *command[len(mitoscope_command()):]])}


def true_mitoses(work: Path) -> np.ndarray:
    """Level-0 boxes (x0, y0, x1, y1) of the real mitotic cells placed in the synthetic slide."""
    names = sorted(path.name for path in (work / "fields" / "images").glob("*.png"))
    boxes = []
    with open(work / "fields" / "boxes.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            fx, fy = FIELDS[names.index(row["Image"])]
            x, y, w, h = (int(row[key]) for key in ("x", "y", "w", "h"))
            boxes.append((fx + x, fy + y, fx + x + w, fy + y + h))
    return np.asarray(boxes, dtype=float).reshape(-1, 4)


def found_mitoses(geojson: Path) -> np.ndarray:
    import json

    features = json.loads(geojson.read_text())["features"]
    centres = []
    for feature in features:
        if feature["properties"].get("classification", {}).get("name") == "Mitosis":
            ring = np.asarray(feature["geometry"]["coordinates"][0], dtype=float)
            centres.append(ring[:4].mean(axis=0))
    return np.asarray(centres, dtype=float).reshape(-1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a trained model folder (e.g. a cell model)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mitoscope-wsi")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "wsi_memory.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    synthetic = write_slide(args.work / "synthetic-40000.svs", scenes(args.work))
    results = {"machine": machine(), "model": str(args.model), "runs": []}
    for slide in (DATA / "wsi" / "CMU-1-Small-Region.svs", synthetic):
        out = args.work / f"out-{slide.stem}"
        results["runs"].append(measure(args.model, slide, out))
        print(results["runs"][-1])
    results["synthetic_level0_bytes"] = SIDE * SIDE * 3
    truth = true_mitoses(args.work)
    found = found_mitoses(args.work / f"out-{synthetic.stem}" / "geojson" / f"{synthetic.stem}.geojson")
    hit = [bool(np.any((found[:, 0] >= x0) & (found[:, 0] <= x1) & (found[:, 1] >= y0) & (found[:, 1] <= y1)))
           for x0, y0, x1, y1 in truth]
    results["synthetic_mitoses"] = {"true": len(truth), "found": len(found), "true_found": int(sum(hit)),
                                    "false_positives": int(len(found) - sum(
                                        np.any([(f[0] >= b[0]) & (f[0] <= b[2]) & (f[1] >= b[1]) & (f[1] <= b[3])
                                                for b in truth]) for f in found))}
    print(results["synthetic_mitoses"])
    save_results(args.out, results)


if __name__ == "__main__":
    main()
