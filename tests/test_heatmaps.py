import csv

import matplotlib
import numpy as np
import pytest
from PIL import Image

from mitoscope.errors import InputError
from mitoscope.heatmaps import (
    render_overlay,
    save_top_crops,
    score_map,
    write_heatmaps,
    write_window_csv,
)
from mitoscope.pipeline import Predictions
from mitoscope.tiling import make_grid


def naive_score_map(boxes, scores, height, width, scale=1.0):
    """Reference: loop over cells, mean of the windows that cover each cell's centre."""
    out_h, out_w = max(1, round(height * scale)), max(1, round(width * scale))
    centre_y = (np.arange(out_h) + 0.5) * height / out_h
    centre_x = (np.arange(out_w) + 0.5) * width / out_w
    total, count = np.zeros((out_h, out_w)), np.zeros((out_h, out_w))
    for (x0, y0, x1, y1), score in zip(boxes, scores):
        inside = ((centre_y >= y0) & (centre_y < y1))[:, None] & ((centre_x >= x0) & (centre_x < x1))[None, :]
        total[inside] += score
        count[inside] += 1
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def test_pixel_under_two_windows_gets_their_mean_and_uncovered_pixels_are_nan():
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]])
    result = score_map(boxes, [1.0, 3.0], (12, 20))
    assert result.shape == (12, 20)
    assert result[2, 7] == pytest.approx(2.0)  # under both windows
    assert result[2, 2] == pytest.approx(1.0) and result[2, 12] == pytest.approx(3.0)
    assert result[9, 14] == pytest.approx(3.0) and np.isnan(result[10, 0])  # x1, y1 are exclusive
    assert np.isnan(result[2, 17]) and np.isnan(result[11, 5])
    assert np.isfinite(result[:10, :15]).all() and np.isnan(result[10:]).all() and np.isnan(result[:, 15:]).all()


@pytest.mark.parametrize("scale", [1.0, 0.37, 0.05])
def test_score_map_equals_a_per_window_loop(scale):
    rng = np.random.default_rng(1)
    x0, y0 = rng.integers(-20, 180, 300), rng.integers(-20, 110, 300)
    boxes = np.stack([x0, y0, x0 + rng.integers(1, 80, 300), y0 + rng.integers(1, 80, 300)], axis=1)
    scores = rng.normal(size=300)
    result = score_map(boxes, scores, (120, 200), scale=scale)
    expected = naive_score_map(boxes, scores, 120, 200, scale)
    np.testing.assert_array_equal(np.isnan(result), np.isnan(expected))
    np.testing.assert_allclose(result[np.isfinite(result)], expected[np.isfinite(expected)], atol=1e-9)


def test_score_map_refuses_one_score_short():
    with pytest.raises(InputError, match="one score per window"):
        score_map(np.zeros((3, 4)), [1.0, 2.0], (10, 10))


def expected_overlay(image, boxes, scores, alpha, cmap="magma"):
    values = score_map(boxes, scores, image.shape[:2])
    norm = (values - scores.min()) / (scores.max() - scores.min())
    colours = matplotlib.colormaps[cmap](np.nan_to_num(norm), bytes=True)[..., :3].astype(float)
    covered = np.isfinite(values)[..., None]
    return np.where(covered, (1 - alpha) * image + alpha * colours, image)


@pytest.mark.parametrize("height,width", [(300, 900), (900, 300)])
def test_overlay_keeps_the_aspect_ratio_blends_scores_and_has_a_colour_bar(tmp_path, height, width):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    boxes = make_grid(height, width, 128, 0.5).boxes()
    scores = rng.random(len(boxes))
    layout = render_overlay(image, boxes, scores, tmp_path / "map.png", alpha=0.45, title="a title",
                            score_label="attention weight")

    png = np.asarray(Image.open(tmp_path / "map.png").convert("RGB"))
    assert (png.shape[1], png.shape[0]) == layout.canvas_size
    x0, y0, x1, y1 = layout.image_box
    assert (x1 - x0, y1 - y0) == (width, height)  # no downsampling below max_side: exactly 1:3 / 3:1
    assert y0 > 0  # the title sits above the image
    assert layout.score_range == (scores.min(), scores.max())

    # Map panel: (1 - alpha) * pixel + alpha * colour, except where the top window is outlined;
    # image panel beside it: the image untouched but for the same outline.
    mx0, my0, mx1, my1 = layout.map_box
    assert (mx1 - mx0, my1 - my0) == (width, height) and my0 == y0 and mx0 >= x1
    assert not layout.flat
    area = png[my0:my1, mx0:mx1].astype(float)
    expected = expected_overlay(image, boxes, scores, 0.45)
    top = boxes[np.argmax(scores)]
    outline = np.zeros((height, width), bool)
    outline[max(0, top[1] - 2) : top[3] + 2, max(0, top[0] - 2) : top[2] + 2] = True
    outline[top[1] + 3 : top[3] - 3, top[0] + 3 : top[2] - 3] = False
    assert np.abs(area - expected)[~outline].max() <= 1
    assert (png[my0:my1, mx0:mx1][outline] == (0, 255, 255)).all(axis=-1).any()
    untouched = png[y0:y1, x0:x1]
    assert (untouched[~outline] == image[~outline]).all()
    assert (untouched[outline] == (0, 255, 255)).all(axis=-1).any()

    # Legend: a colour strip below the image running through the colour map, low to high.
    bx0, by0, bx1, by1 = layout.colorbar_box
    assert by0 >= y1 and by1 <= png.shape[0] and bx1 - bx0 >= 100
    strip = png[(by0 + by1) // 2, bx0:bx1].astype(int)
    ramp = matplotlib.colormaps["magma"](np.linspace(0, 1, bx1 - bx0), bytes=True)[:, :3].astype(int)
    assert np.abs(strip - ramp).max() <= 1
    # ... and text (dark pixels) above and below it, on the white legend background.
    assert (png[y1:by0] < 80).all(axis=-1).sum() > 50
    assert (png[by1 + 1 :] < 80).all(axis=-1).sum() > 20


def test_large_image_is_downsampled_to_max_side(tmp_path):
    image = np.zeros((4000, 6000, 3), dtype=np.uint8)
    grid = make_grid(4000, 6000, 224, 0.5)
    left = grid.boxes()[grid.boxes()[:, 2] <= 3000]  # windows over the left half only
    layout = render_overlay(image, left, np.linspace(0, 1, len(left)), tmp_path / "big.png", mark_top=False)
    x0, y0, x1, y1 = layout.image_box
    assert (x1 - x0, y1 - y0) == (2048, 1365)  # 4000 * 2048 / 6000 = 1365.3
    png = np.asarray(Image.open(tmp_path / "big.png").convert("RGB"))
    assert png.shape[1] > 2 * 2048 and png.shape[0] == layout.canvas_size[1] > 1365
    assert (png[y0:y1, x0:x1] == 0).all()  # the image panel: the (black) image itself
    x0, y0, x1, y1 = layout.map_box
    area = png[y0:y1, x0:x1]
    assert (area[:, 1030:] == 0).all()  # no window: the (black) image itself
    assert (area[:, :1020].max(axis=-1) > 0).mean() > 0.9  # scores coloured over the left half


def test_small_image_gets_a_readable_legend_and_equal_scores_do_not_fail(tmp_path):
    image = np.full((60, 40, 3), 200, dtype=np.uint8)
    boxes = make_grid(60, 40, 224).boxes()  # one padded window past both edges
    layout = render_overlay(image, boxes, [0.7], tmp_path / "small.png")
    x0, y0, x1, y1 = layout.image_box
    assert (x1 - x0, y1 - y0) == (40, 60)
    assert layout.canvas_size[0] >= 300 and layout.colorbar_box[2] - layout.colorbar_box[0] >= 200


def test_probabilities_keep_an_absolute_scale_and_found_cells_are_outlined(tmp_path):
    image = np.full((100, 200, 3), 128, dtype=np.uint8)
    boxes = np.array([[10, 10, 40, 40], [60, 10, 90, 40], [110, 10, 140, 40], [160, 10, 190, 40]])
    low = render_overlay(image, boxes, [0.001, 0.002, 0.003, 0.002], tmp_path / "low.png", threshold=0.5,
                         mark_top=False)
    assert low.score_range == (0.0, 1.0) and not low.flat
    png = np.asarray(Image.open(tmp_path / "low.png").convert("RGB")).astype(int)
    mx0, my0, _, _ = low.map_box
    # all four cells far under the threshold: dark (the colour map's low end), never the bright high end
    cell = png[my0 + 20, mx0 + 120]
    dark = np.array(matplotlib.colormaps["magma"](0.003, bytes=True)[:3]) * 0.45 + 128 * 0.55
    assert np.abs(cell - dark).max() <= 2
    assert not ((png == (255, 40, 40)).all(axis=-1)).any()  # nothing found, nothing in red

    render_overlay(image, boxes, [0.1, 0.9, 0.7, 0.2], tmp_path / "found.png", threshold=0.5, mark_top=False)
    png = np.asarray(Image.open(tmp_path / "found.png").convert("RGB"))
    red = (png == (255, 40, 40)).all(axis=-1)
    assert red.any()
    ys, xs = np.nonzero(red)
    # red outlines exactly around the two cells at or over 0.5 (in both panels): x within 58-92 or 108-142
    layout = render_overlay(image, boxes, [0.1, 0.9, 0.7, 0.2], tmp_path / "found.png", threshold=0.5, mark_top=False)
    for panel in (layout.image_box, layout.map_box):
        inside = xs[(xs >= panel[0]) & (xs < panel[2])] - panel[0]
        assert set(np.unique(inside // 50)) == {1, 2}


def test_a_nearly_flat_map_is_said_to_be_flat(tmp_path):
    image = np.full((90, 90, 3), 100, dtype=np.uint8)
    boxes = make_grid(90, 90, 10, 0.0).boxes()
    weights = np.random.default_rng(0).uniform(0.0104, 0.0153, len(boxes))  # near 1/81, like uniform attention
    assert render_overlay(image, boxes, weights, tmp_path / "flat.png").flat
    weights[0] = 0.5
    assert not render_overlay(image, boxes, weights, tmp_path / "peak.png").flat


def test_unknown_colour_map_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="colour map"):
        render_overlay(np.zeros((10, 10, 3), np.uint8), [[0, 0, 10, 10]], [1.0], tmp_path / "x.png", cmap="nope")
    assert list(tmp_path.iterdir()) == []


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("height,width,window", [(300, 500, 128), (50, 80, 224)])
def test_window_csv_holds_the_tiling_boxes_clipped_best_first(tmp_path, height, width, window):
    boxes = make_grid(height, width, window, 0.5).boxes()
    scores = np.random.default_rng(3).random(len(boxes))
    write_window_csv(tmp_path / "w.csv", boxes, scores, "img.png", (height, width))
    rows = read_rows(tmp_path / "w.csv")
    assert list(rows[0]) == ["Image", "x0", "y0", "x1", "y1", "score", "rank"]
    assert [int(r["rank"]) for r in rows] == list(range(1, len(boxes) + 1))
    order = np.argsort(-scores)
    clipped = np.minimum(boxes, [width, height, width, height])
    got = np.array([[int(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in rows])
    np.testing.assert_array_equal(got, clipped[order])
    np.testing.assert_array_equal([float(r["score"]) for r in rows], scores[order])
    assert {r["Image"] for r in rows} == {"img.png"}
    assert got[:, 2].max() == width and got[:, 3].max() == height


def test_top_crops_are_the_image_at_the_best_windows(tmp_path):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 256, (200, 260, 3), dtype=np.uint8)
    boxes = make_grid(200, 260, 96, 0.5).boxes()
    scores = rng.random(len(boxes))
    paths = save_top_crops(image, boxes, scores, tmp_path, "img", k=3)
    best = np.argsort(-scores)[:3]
    assert len(paths) == 3
    for rank, (path, index) in enumerate(zip(paths, best), start=1):
        x0, y0, x1, y1 = boxes[index]
        assert path.name == f"img_top{rank}_x{x0}_y{y0}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image[y0:y1, x0:x1])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def make_predictions(paths, sizes, window=96, scores=True):
    boxes = [make_grid(h, w, window, 0.5).boxes() for h, w in sizes]
    window_scores = [np.random.default_rng(i).random(len(b)) for i, b in enumerate(boxes)] if scores else None
    return Predictions(paths=list(paths), proba=np.linspace(0.2, 0.9, len(paths)), members={},
                       notes=[""] * len(paths), window_scores=window_scores, boxes=boxes,
                       image_sizes=list(sizes))


def test_write_heatmaps_writes_a_map_a_list_and_crops_per_image(tmp_path):
    rng = np.random.default_rng(5)
    sizes = [(150, 210), (120, 100)]
    paths = []
    for name, (h, w) in zip(["a.png", "b.png"], sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    pred = make_predictions(paths, sizes)
    out = tmp_path / "maps"
    files = write_heatmaps(out, pred, None, top_k=2, score_label="attention weight")
    for stem, (h, w), boxes, scores in zip(["a", "b"], sizes, pred.boxes, pred.window_scores):
        assert out / f"{stem}_heatmap.png" in files and out / f"{stem}_windows.csv" in files
        rows = read_rows(out / f"{stem}_windows.csv")
        assert len(rows) == len(boxes) and rows[0]["Image"] == f"{stem}.png"
        x0, y0 = boxes[np.argmax(scores)][:2]
        assert out / f"{stem}_top1_x{x0}_y{y0}.png" in files
        heatmap = Image.open(out / f"{stem}_heatmap.png")
        assert heatmap.width >= w and heatmap.height > h
    assert sorted(files) == sorted(out.iterdir())  # 2 x (map + list + 2 crops), no temp files
    assert len(files) == 8


def test_heatmaps_need_a_head_that_scores_windows(tmp_path):
    pred = make_predictions([tmp_path / "a.png"], [(100, 100)], scores=False)
    with pytest.raises(InputError, match="attention, pooled.*--pool attention"):
        write_heatmaps(tmp_path / "maps", pred, None)
    assert not (tmp_path / "maps").exists()


def test_heatmaps_refuse_an_image_that_changed_since_prediction(tmp_path):
    Image.fromarray(np.zeros((80, 90, 3), np.uint8)).save(tmp_path / "a.png")
    pred = make_predictions([tmp_path / "a.png"], [(100, 100)])
    with pytest.raises(InputError, match="a.png.*90x80.*100x100"):
        write_heatmaps(tmp_path / "maps", pred, None)


def test_heatmaps_refuse_two_images_with_one_stem(tmp_path):
    pred = make_predictions([tmp_path / "x" / "a.png", tmp_path / "y" / "a.tif"], [(100, 100)] * 2)
    with pytest.raises(InputError, match="same name stem"):
        write_heatmaps(tmp_path / "maps", pred, None)
