"""Whole-slide images (mitoscope.io.slides, mitoscope.wsi): a real Aperio slide, a synthetic pyramid
with known cells, tissue tiles only, level-0 coordinates, counts and the hotspot."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("openslide", reason="the [wsi] extra is not installed")

from bags import BACKGROUND, DECOY, TARGET  # noqa: E402
from mitoscope.errors import InputError  # noqa: E402
from mitoscope.io.slides import Slide, is_slide, plan_tiles, tissue_mask  # noqa: E402
from mitoscope.wsi import hotspot, predict_slide  # noqa: E402

SIZE = 4096
TISSUE = (1024, 1024, 2048, 1536)  # x0, y0, x1, y1 of the "tissue" rectangle
RED = (1500, 1300)  # the one distinctive cell, level-0 (x, y)


def write_svs(path, decoys, red=RED, mpp=0.5, size=SIZE, tile=256, tissue=TISSUE):
    """An Aperio-style pyramid (levels 1, 4, 16) written tile by tile: white glass, a rectangle of
    the training images' background with green discs, and one red disc (none if ``red`` is None)."""
    tifffile = pytest.importorskip("tifffile")
    discs = [*((d, DECOY) for d in decoys), *([(red, TARGET)] if red is not None else [])]
    noise = np.random.default_rng(len(decoys))

    def tiles(level_ds):
        n = size // level_ds
        yy, xx = np.mgrid[:tile, :tile]
        for y in range(0, n, tile):
            for x in range(0, n, tile):
                block = np.full((tile, tile, 3), 242, np.uint8)
                gx, gy = (xx + x) * level_ds, (yy + y) * level_ds
                inside = (gx >= tissue[0]) & (gx < tissue[2]) & (gy >= tissue[1]) & (gy < tissue[3])
                block[inside] = BACKGROUND
                for (cx, cy), colour in discs:
                    block[(gx - cx) ** 2 + (gy - cy) ** 2 <= 49] = colour
                if level_ds == 1 and inside.any():  # a camera's noise on the specimen, as in tests/bags.py
                    noisy = block.astype(np.float32) + noise.normal(0, 3, block.shape)
                    block = np.where(inside[..., None], np.clip(noisy, 0, 255), block).astype(np.uint8)
                yield block

    description = f"Aperio Image Library v11.2.1\n{size}x{size} [0,0 {size}x{size}] ({tile}x{tile}) RGB|AppMag = 20|MPP = {mpp}"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, level_ds in enumerate((1, 4, 16)):
            n = size // level_ds
            tif.write(tiles(level_ds), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
                      description=description if index == 0 else "", photometric="rgb", metadata=None)
    return path


@pytest.fixture(scope="module")
def decoys():
    rng = np.random.default_rng(0)
    points = [(x, y) for y in range(1060, 1500, 30) for x in range(1060, 2010, 30)]
    chosen = rng.choice(len(points), 60, replace=False)
    return [points[i] for i in chosen if abs(points[i][0] - RED[0]) > 20 or abs(points[i][1] - RED[1]) > 20]


@pytest.fixture(scope="module")
def svs(tmp_path_factory, decoys):
    return write_svs(tmp_path_factory.mktemp("slides") / "synthetic.svs", decoys)


def test_the_real_aperio_slide_opens_with_its_pixel_size_and_its_tissue_is_found(shared_data):
    path = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    assert is_slide(path)
    with Slide.open(path) as slide:
        assert (slide.width, slide.height) == (2220, 2967) and slide.mpp == pytest.approx(0.499)
        thumbnail, scale = slide.thumbnail(512)
        region = slide.read(1000, 1000, 200, 100, (100, 50))
    assert thumbnail.shape == (512, round(2220 * 512 / 2967), 3) and scale == pytest.approx(512 / 2967)
    assert region.shape == (50, 100, 3) and region.dtype == np.uint8
    mask = tissue_mask(thumbnail)
    assert 0.2 < mask.mean() < 0.8  # the tissue strip, not the glass around it


def test_a_broken_slide_is_one_line_naming_the_file(shared_data, tmp_path):
    broken = shared_data / "wsi" / "broken.svs"
    with pytest.raises(InputError, match="broken.svs: not a whole-slide image"):
        Slide.open(broken)
    model = tmp_path / "m"  # refused before any model is needed: no model.json is read for this check
    run = subprocess.run([sys.executable, "-m", "mitoscope", "predict", str(model), str(broken)],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr


def test_plan_tiles_reads_only_tiles_that_touch_tissue():
    mask = np.zeros((100, 100), bool)
    mask[40:50, 40:50] = True  # at scale 0.1: level-0 400..500
    planned = plan_tiles(1000, 1000, mask, 0.1, tile0=200, step0=150)
    assert planned == [(2, 2), (3, 2), (2, 3), (3, 3)]  # tiles at 300 and 450 cover 400..500


def test_hotspot_is_the_square_with_most_mitoses():
    side = np.sqrt(2.0) * 1000 / 0.5  # 2 mm² at 0.5 µm/px: 2828 px
    points = np.array([[0, 0], [100, 100], [2900, 2900], [10000, 10000], [10100, 10050], [10200, 10000],
                       [10000 + side + 1, 10000]])
    spot = hotspot(points, mpp=0.5)
    assert spot.count == 3 and spot.box[:2] == (10000.0, 10000.0)
    assert spot.per_mm2 == 1.5
    assert hotspot(np.zeros((0, 2)), mpp=0.5) is None


def test_a_slide_is_predicted_from_its_tissue_tiles_in_level_0_coordinates(cell_model, svs, decoys):
    _, _, result = cell_model
    from mitoscope.models import load_model

    model = load_model(result.model_dir)
    prediction = predict_slide(model, svs, tile=512, overlap=64, cells=True)
    # 4 x 3 tiles of 448-px steps touch the 1024x512 rectangle (and the thumbnail's blur around it): not the 81 of the slide
    assert 6 <= len(prediction.tile_scores) <= 20
    assert prediction.count == 1
    found = prediction.boxes[prediction.scores >= model.threshold][0]
    assert found[0] <= RED[0] <= found[2] and found[1] <= RED[1] <= found[3]
    # every decoy seen once, even where tiles overlap
    centres = (prediction.boxes[:, :2] + prediction.boxes[:, 2:]) / 2
    for x, y in decoys:
        assert np.sum(np.hypot(centres[:, 0] - x, centres[:, 1] - y) < 6) == 1
    assert len(prediction.scores) == len(decoys) + 1
    assert prediction.hotspot.count == 1 and prediction.hotspot.per_mm2 == 0.5


def test_predict_cli_on_a_slide_writes_counts_heatmap_and_level_0_geojson(cell_model, svs, tmp_path):
    _, _, result = cell_model
    run = subprocess.run([sys.executable, "-m", "mitoscope", "predict", str(result.model_dir), str(svs),
                          "--out", str(tmp_path / "p.csv"), "--heatmaps", str(tmp_path / "h"),
                          "--geojson", str(tmp_path / "g")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    import csv

    (row,) = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert row["Label"] == "Mitosis" and row["Count"] == "1" and row["Hotspot count"] == "1"
    assert float(row["Mitoses per mm2 (hotspot)"]) == 0.5
    collection = json.loads((tmp_path / "g" / "synthetic.geojson").read_text())
    mitoses = [f for f in collection["features"] if f["properties"].get("classification", {}).get("name") == "Mitosis"]
    (x0, y0), (x1, y1) = mitoses[0]["geometry"]["coordinates"][0][0], mitoses[0]["geometry"]["coordinates"][0][2]
    assert x0 <= RED[0] <= x1 and y0 <= RED[1] <= y1
    assert collection["mitoscope"]["hotspot"]["count"] == 1
    assert (tmp_path / "h" / "synthetic_heatmap.png").is_file()


def test_mpp_must_be_known_and_not_finer_than_the_slide(cell_model, svs):
    _, _, result = cell_model
    from mitoscope.models import load_model

    model = load_model(result.model_dir)
    with pytest.raises(InputError, match="finer than the slide"):
        predict_slide(model, svs, mpp=0.25)
    prediction = predict_slide(model, svs, mpp=1.0, tile=256, overlap=32, cells=True)
    assert prediction.read_mpp == 1.0 and prediction.size == (SIZE, SIZE)


def test_the_cell_model_trains_on_slides_from_their_labels_alone(tmp_path):
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.workflow import train_cells
    from mitoscope.models import load_model

    def slide(name, seed, mitosis):
        rng = np.random.default_rng(seed)
        slots = [(x, y) for y in range(280, 740, 40) for x in range(280, 740, 40)]
        # 13 cells either way (as tests/bags.py: the one red cell must not change its image's cell count)
        chosen = [slots[i] for i in rng.choice(len(slots), 13, replace=False)]
        red = chosen.pop() if mitosis else None
        return write_svs(tmp_path / "slides" / name, chosen, red=red, size=1024, tissue=(256, 256, 768, 768))

    (tmp_path / "slides").mkdir()
    rows = ["Image,Label"]
    for i in range(24):
        slide(f"s{i:02d}.svs", i, i % 2 == 1)
        rows.append(f"s{i:02d}.svs,{'Mitosis' if i % 2 else 'Normal'}")
    (tmp_path / "slides" / "labels.csv").write_text("\n".join(rows) + "\n")
    config = CellTrainConfig(backbone="test_efficientnet", input_size=32, validation_fraction=0.25, scorer="linear")
    result = train_cells(tmp_path / "slides", tmp_path / "slides" / "labels.csv", tmp_path / "model", config,
                         pretrained=False)
    assert result.model.config["training"]["cells_per_image"]["median"] == 13
    assert result.cv_metrics["auc"] == 1.0, result.cv_metrics
    model = load_model(result.model_dir)
    for seed, mitosis in ((100, True), (101, False)):
        path = slide(f"test{seed}.svs", seed, mitosis)
        prediction = predict_slide(model, path, cells=True)
        assert prediction.count == int(mitosis)


def test_window_heads_refuse_slides_and_say_what_does_take_them(svs, tmp_path):
    from mitoscope.io import load_labelled_images

    import shutil

    other = shutil.copy(svs, tmp_path / "other.svs")
    (tmp_path / "labels.csv").write_text(f"Image,Label\n{svs},Mitosis\n{other},Normal\n")
    data = load_labelled_images(tmp_path, tmp_path / "labels.csv")
    with pytest.raises(InputError, match="synthetic.svs: a whole slide; the pooled head trains on images"):
        data.refuse_slides("the pooled head")


def test_an_ome_tiff_pyramid_is_a_slide_with_its_pixel_size(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    level0 = np.random.default_rng(0).integers(0, 255, (1024, 1536, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(level0, subifds=2, tile=(256, 256), photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        for step in (2, 4):
            tif.write(level0[::step, ::step], subfiletype=1, tile=(256, 256), photometric="rgb")
    assert is_slide(path) and not is_slide(tmp_path / "missing.tif")
    with Slide.open(path) as slide:
        assert (slide.width, slide.height, slide.mpp) == (1536, 1024, 0.5)
        np.testing.assert_array_equal(slide.read(100, 200, 64, 32), level0[200:232, 100:164])
