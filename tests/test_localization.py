import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mitoscope.errors import InputError
from mitoscope.io import read_image
from mitoscope.localization import (
    load_boxes,
    localization_report,
    pointing_game,
    window_auc,
    write_localization,
)
from mitoscope.pipeline import Predictions
from mitoscope.tiling import make_grid


def write_csv(path, header, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --------------------------------------------------------------------------- boxes.csv


def test_load_boxes_turns_x_y_w_h_into_corners_per_image(tmp_path):
    path = write_csv(tmp_path / "boxes.csv", ["Image", "x", "y", "w", "h", "phase"],
                     [["a.png", 10, 20, 30, 40, "Prophase"], ["b.png", 0, 0, 5, 5, "Anaphase"],
                      ["a.png", 100, 50, 8, 9, "Metaphase"]])
    boxes = load_boxes(path)
    assert sorted(boxes) == ["a.png", "b.png"]
    np.testing.assert_array_equal(boxes["a.png"], [[10, 20, 40, 60], [100, 50, 108, 59]])
    np.testing.assert_array_equal(boxes["b.png"], [[0, 0, 5, 5]])


def test_load_boxes_also_reads_corner_columns(tmp_path):
    path = write_csv(tmp_path / "boxes.csv", ["image", "x0", "y0", "x1", "y1"], [["a.png", 1, 2, 3, 4]])
    np.testing.assert_array_equal(load_boxes(path)["a.png"], [[1, 2, 3, 4]])


def test_boxes_file_without_size_columns_names_the_file_and_the_columns(tmp_path):
    path = write_csv(tmp_path / "boxes.csv", ["Image", "x", "y"], [["a.png", 1, 2]])
    with pytest.raises(InputError, match=r"boxes\.csv.*'w', 'h'"):
        load_boxes(path)


@pytest.mark.parametrize("row,match", [(["a.png", "ten", 2, 3, 4], "line 2.*non-numeric"),
                                       (["a.png", 1, 2, 0, 4], "line 2.*empty or invalid"),
                                       (["", 1, 2, 3, 4], "line 2.*empty 'Image'")])
def test_bad_box_rows_are_input_errors_with_the_line(tmp_path, row, match):
    path = write_csv(tmp_path / "boxes.csv", ["Image", "x", "y", "w", "h"], [row])
    with pytest.raises(InputError, match=match):
        load_boxes(path)


def test_missing_or_empty_boxes_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_boxes(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty.csv.*empty"):
        load_boxes(tmp_path / "empty.csv")


# --------------------------------------------------------------------------- pointing game

GRID = make_grid(400, 400, 100, 0.5)  # 7 x 7 windows, stride 50
CELL = np.array([[160.0, 160.0, 190.0, 190.0]])  # inside windows starting at x, y in {100, 150}


def scores_peaking_at(x0, y0, grid=GRID):
    boxes = grid.boxes()
    scores = np.zeros(len(boxes))
    scores[np.flatnonzero((boxes[:, 0] == x0) & (boxes[:, 1] == y0))[0]] = 1.0
    return boxes, scores


def test_pointing_game_is_one_on_the_cell_and_zero_elsewhere():
    truth = {"m1.png": CELL, "m2.png": CELL + 100}
    on = {"m1.png": scores_peaking_at(150, 150), "m2.png": scores_peaking_at(250, 250),
          "normal.png": scores_peaking_at(0, 0)}
    result = pointing_game(truth, on)
    assert result["pointing_game"] == 1.0 and result["pointing_game_centre"] == 1.0
    assert result["n_images"] == 2 and result["hits"] == 2  # the Normal image is not scored
    assert [row["top_window"] for row in result["per_image"]] == [[150, 150, 250, 250], [250, 250, 350, 350]]

    off = {"m1.png": scores_peaking_at(300, 0), "m2.png": scores_peaking_at(0, 300)}
    result = pointing_game(truth, off)
    assert result["pointing_game"] == 0.0 and result["hits"] == 0 and result["n_images"] == 2


def test_a_window_that_only_grazes_the_cell_hits_but_not_strictly():
    cell = np.array([[145.0, 145.0, 175.0, 175.0]])
    # window 50..150 holds 5 x 5 of the 30 x 30 cell; its centre (100, 100) is outside the cell
    corner = pointing_game({"m.png": cell}, {"m.png": scores_peaking_at(50, 50)})
    assert corner["pointing_game"] == 1.0 and corner["pointing_game_centre"] == 0.0
    # window 100..200 holds all of it, centre (150, 150) inside
    centred = pointing_game({"m.png": cell}, {"m.png": scores_peaking_at(100, 100)})
    assert centred["pointing_game"] == 1.0 and centred["pointing_game_centre"] == 1.0
    # window 0..100 does not touch it
    away = pointing_game({"m.png": cell}, {"m.png": scores_peaking_at(0, 0)})
    assert away["pointing_game"] == 0.0 and away["pointing_game_centre"] == 0.0


def test_tied_top_windows_count_the_share_that_hits():
    boxes = GRID.boxes()
    result = pointing_game({"m.png": CELL}, {"m.png": (boxes, np.ones(len(boxes)))})
    touching = np.sum((boxes[:, 0] < 190) & (boxes[:, 2] > 160) & (boxes[:, 1] < 190) & (boxes[:, 3] > 160))
    assert touching == 4
    assert result["pointing_game"] == pytest.approx(4 / len(boxes))
    assert result["per_image"][0]["n_tied_top"] == len(boxes)


# --------------------------------------------------------------------------- window AUC


def containing_fraction(boxes, cells):
    return np.array([max(max(0, min(b[2], c[2]) - max(b[0], c[0])) * max(0, min(b[3], c[3]) - max(b[1], c[1]))
                         / ((c[2] - c[0]) * (c[3] - c[1])) for c in cells) for b in boxes])


def test_window_auc_is_one_when_containing_windows_rank_first_and_zero_reversed():
    boxes = GRID.boxes()
    fraction = containing_fraction(boxes, CELL)
    scores = fraction + 0.01 * np.random.default_rng(0).random(len(boxes))
    good = window_auc({"m.png": CELL}, {"m.png": (boxes, scores)})
    assert good["window_auc"] == 1.0 and good["mean_image_window_auc"] == 1.0
    assert good["n_positive"] == np.sum(fraction >= 0.5) == 4
    assert good["n_negative"] == np.sum(fraction == 0)
    assert good["n_ambiguous"] == len(boxes) - good["n_positive"] - good["n_negative"]
    bad = window_auc({"m.png": CELL}, {"m.png": (boxes, -scores)})
    assert bad["window_auc"] == 0.0


def test_windows_clipping_a_small_part_of_the_cell_are_left_out():
    cell = np.array([[140.0, 140.0, 170.0, 170.0]])  # windows from 50 hold a third of it: ambiguous
    boxes = GRID.boxes()
    scores = np.zeros(len(boxes))
    ambiguous = (containing_fraction(boxes, cell) > 0) & (containing_fraction(boxes, cell) < 0.5)
    assert ambiguous.sum() > 0
    scores[ambiguous] = 10.0  # would make the AUC < 1 if these counted as negatives
    scores[containing_fraction(boxes, cell) >= 0.5] = 5.0
    assert window_auc({"m.png": cell}, {"m.png": (boxes, scores)})["window_auc"] == 1.0


def test_positions_smaller_than_the_cell_count_when_they_lie_mostly_on_it():
    # 16 px positions of a 64 px grid against one 40 px cell: none holds half the cell, yet the
    # positions inside it (and those mostly on it) are the cell's positives.
    xs = np.arange(0, 64, 16, dtype=float)
    positions = np.array([[x, y, x + 16, y + 16] for y in xs for x in xs])
    cell = np.array([[8.0, 8.0, 48.0, 48.0]])
    on_cell = np.array([min(16, min(b[2], 48) - max(b[0], 8)) * min(16, min(b[3], 48) - max(b[1], 8)) / 256
                        if b[0] < 48 and b[1] < 48 else 0.0 for b in positions])
    scores = on_cell + 0.01 * np.random.default_rng(0).random(len(positions))
    result = window_auc({"m.png": cell}, {"m.png": (positions, scores)})
    assert result["n_positive"] == np.sum(on_cell >= 0.5) == 8  # 4 inside, 4 half on it; the corner quarter is out
    assert result["n_ambiguous"] == 1
    assert result["n_negative"] == np.sum(on_cell == 0) and result["window_auc"] == 1.0
    assert window_auc({"m.png": cell}, {"m.png": (positions, -scores)})["window_auc"] == 0.0


def test_random_scores_give_a_window_auc_near_one_half():
    rng = np.random.default_rng(7)
    truth, windows = {}, {}
    for i in range(40):
        xy = rng.uniform(0, 360, 2)
        truth[f"m{i}.png"] = np.array([[xy[0], xy[1], xy[0] + 30, xy[1] + 30]])
        windows[f"m{i}.png"] = (GRID.boxes(), rng.random(GRID.n_windows))
    result = window_auc(truth, windows)
    assert abs(result["window_auc"] - 0.5) < 0.1
    assert abs(result["mean_image_window_auc"] - 0.5) < 0.15


# --------------------------------------------------------------------------- report


def predictions_for(names, scores_list, size=(400, 400)):
    return Predictions(
        paths=[Path("/data") / name for name in names], proba=np.linspace(0.1, 0.9, len(names)), members={},
        notes=[""] * len(names), window_scores=[np.asarray(s) for s in scores_list],
        boxes=[GRID.boxes() for _ in names], image_sizes=[size] * len(names),
    )


def test_localization_report_scores_mitosis_images_and_writes_json(tmp_path):
    boxes_csv = write_csv(tmp_path / "boxes.csv", ["Image", "x", "y", "w", "h", "phase"],
                          [["m1.png", 160, 160, 30, 30, "Prophase"], ["m2.png", 260, 260, 30, 30, "Telophase"]])
    fraction_1 = containing_fraction(GRID.boxes(), CELL)
    fraction_2 = containing_fraction(GRID.boxes(), CELL + 100)
    pred = predictions_for(["m1.png", "n.png", "m2.png"],
                           [fraction_1, np.ones(GRID.n_windows), -fraction_2])  # m2: pointing away
    report = localization_report(pred, boxes_csv, labels=[1, 0, 1])
    assert report["n_mitosis_images"] == 2 and report["n_images"] == 3
    assert report["pointing_game"] == 0.5 and report["pointing_game_centre"] == 0.5
    assert [row["Image"] for row in report["per_image"]] == ["m1.png", "m2.png"]
    first, second = report["per_image"]
    assert first["hit"] == 1.0 and first["auc"] == 1.0 and first["n_true"] == 1
    assert second["hit"] == 0.0 and second["auc"] == 0.0
    assert report["mean_image_window_auc"] == 0.5
    assert first["top_window"] in ([100, 100, 200, 200], [150, 150, 250, 250])

    path = write_localization(tmp_path / "out", report)
    assert path == tmp_path / "out" / "localization.json"
    saved = json.loads(path.read_text())
    assert saved["pointing_game"] == 0.5 and saved["per_image"][1]["Image"] == "m2.png"
    assert sorted(p.name for p in path.parent.iterdir()) == ["localization.json"]


def test_report_refuses_boxes_on_a_normal_image_and_boxes_for_other_images(tmp_path):
    boxes_csv = write_csv(tmp_path / "boxes.csv", ["Image", "x", "y", "w", "h"], [["m1.png", 160, 160, 30, 30]])
    pred = predictions_for(["m1.png"], [np.zeros(GRID.n_windows)])
    with pytest.raises(InputError, match="m1.png.*labelled Normal"):
        localization_report(pred, boxes_csv, labels=[0])
    other = predictions_for(["x.png"], [np.zeros(GRID.n_windows)])
    with pytest.raises(InputError, match=r"boxes\.csv.*none of the 1 predicted images"):
        localization_report(other, boxes_csv)


def test_report_needs_window_scores(tmp_path):
    boxes_csv = write_csv(tmp_path / "boxes.csv", ["Image", "x", "y", "w", "h"], [["m1.png", 160, 160, 30, 30]])
    pred = predictions_for(["m1.png"], [np.zeros(GRID.n_windows)])
    pred.window_scores = None
    with pytest.raises(InputError, match="attention, pooled"):
        localization_report(pred, boxes_csv)


# --------------------------------------------------------------------------- real scenes


@pytest.fixture(scope="module")
def composed_scenes(compose_scenes_tool, tmp_path_factory):
    """Six small scenes of real Jurkat cells, rescaled by 0.6-0.8 after composition."""
    out = tmp_path_factory.mktemp("scenes")
    data = Path(compose_scenes_tool).resolve().parents[1] / "data" / "jurkat-cells"
    subprocess.run(
        [sys.executable, str(compose_scenes_tool), str(data), str(out), "--n", "6", "--size", "320x256",
         "--cell-scale", "1.5,2", "--cells", "6,10", "--mitoses", "1,3", "--out-scale", "0.6,0.8", "--seed", "3"],
        check=True, capture_output=True, timeout=120,
    )
    return out


@pytest.mark.realdata
def test_compose_scenes_boxes_lie_on_bright_dna_inside_the_images(composed_scenes):
    boxes = load_boxes(composed_scenes / "boxes.csv")
    with open(composed_scenes / "labels.csv", newline="") as handle:
        labels = {row["Image"]: row["Label"] for row in csv.DictReader(handle)}
    assert set(boxes) == {name for name, label in labels.items() if label == "Mitosis"}
    for name, cells in boxes.items():
        image = read_image(composed_scenes / "images" / name)
        height, width = image.shape[:2]
        assert (height, width) != (256, 320)  # out-scale resized the scene: boxes must follow
        assert (cells[:, :2] >= 0).all() and (cells[:, 2] <= width).all() and (cells[:, 3] <= height).all()
        dna = image[..., 0].astype(float)  # R = DNA stain: the background is dark, cells bright
        for x0, y0, x1, y1 in cells.astype(int):
            inside = dna[y0:y1, x0:x1]
            assert (inside > 64).mean() > 0.1
            # the stained pixels' centre of mass is the box's centre (the cell is pasted centred)
            ys, xs = np.nonzero(inside > 64)
            assert abs(xs.mean() - (x1 - x0) / 2) < 0.1 * (x1 - x0) and abs(ys.mean() - (y1 - y0) / 2) < 0.1 * (y1 - y0)


@pytest.mark.realdata
def test_localization_report_on_composed_scenes(composed_scenes):
    names = sorted(p.name for p in (composed_scenes / "images").iterdir())
    truth = load_boxes(composed_scenes / "boxes.csv")
    with open(composed_scenes / "labels.csv", newline="") as handle:
        label_of = {row["Image"]: row["Label"] for row in csv.DictReader(handle)}
    sizes = [read_image(composed_scenes / "images" / name).shape[:2] for name in names]
    grids = [make_grid(h, w, 64, 0.5) for h, w in sizes]
    # An oracle that scores a window by how much mitotic cell it holds must win both games.
    oracle = [containing_fraction(g.boxes(), truth[name]) if name in truth else np.zeros(g.n_windows)
              for g, name in zip(grids, names)]
    oracle = [np.asarray(s) + 1e-3 * np.random.default_rng(0).random(len(s)) for s in oracle]
    pred = Predictions(paths=[composed_scenes / "images" / n for n in names], proba=np.full(len(names), 0.5),
                       members={}, notes=[""] * len(names), window_scores=oracle,
                       boxes=[g.boxes() for g in grids], image_sizes=[tuple(s) for s in sizes])
    labels = [int(label_of[name] == "Mitosis") for name in names]
    report = localization_report(pred, composed_scenes / "boxes.csv", labels=labels)
    assert report["n_mitosis_images"] == sum(labels) == 3
    assert report["pointing_game"] == 1.0 and report["pointing_game_centre"] == 1.0
    assert report["window_auc"] > 0.99 and report["n_positive_windows"] > 0
