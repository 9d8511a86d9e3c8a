"""GeoJSON for QuPath and napari (mitoscope.geojson, predict --geojson)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mitoscope.geojson import MITOSIS_CLASS, feature_collection


def check_qupath_schema(collection):
    """What QuPath's GeoJSON import reads: a FeatureCollection of Features with closed Polygon rings,
    an objectType it knows, and measurements as a name -> number map."""
    assert collection["type"] == "FeatureCollection"
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        assert isinstance(feature["id"], str)
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        ring = geometry["coordinates"][0]
        assert len(ring) == 5 and ring[0] == ring[-1]
        assert all(len(point) == 2 and all(isinstance(v, float) for v in point) for point in ring)
        properties = feature["properties"]
        assert properties["objectType"] in ("detection", "tile", "annotation")
        assert all(isinstance(v, float) for v in properties["measurements"].values())
        if "classification" in properties:
            assert properties["classification"]["name"] == "Mitosis"
            assert len(properties["classification"]["color"]) == 3


def test_cells_at_or_over_the_threshold_are_classified_mitosis_in_pixel_coordinates():
    boxes = np.array([[10, 20, 40, 50], [-5, 90, 25, 130], [60, 60, 90, 90]], dtype=float)
    scores = np.array([0.2, 0.9, 0.5])
    collection = feature_collection(boxes, scores, (120, 100), cells=True, threshold=0.5, label="Mitosis",
                                    probability=0.9, count=2, image="a.png", offset=(1000, 2000))
    check_qupath_schema(collection)
    features = collection["features"]
    assert [f["properties"]["measurements"]["mitosis score"] for f in features] == [0.9, 0.5, 0.2]  # best first
    assert [f["properties"].get("classification") for f in features] == [MITOSIS_CLASS, MITOSIS_CLASS, None]
    assert {f["properties"]["objectType"] for f in features} == {"detection"}
    # clipped to the 100x120 image, then moved by the offset
    assert features[0]["geometry"]["coordinates"][0][0] == [1000.0, 2090.0]
    assert features[0]["geometry"]["coordinates"][0][2] == [1025.0, 2120.0]
    assert collection["mitoscope"] == {"image": "a.png", "label": "Mitosis", "probability": 0.9, "threshold": 0.5,
                                       "instances": "cells", "count": 2, "width": 100, "height": 120}


def test_windows_are_tiles_and_the_top_window_of_a_mitosis_image_an_annotation():
    boxes = np.array([[0, 0, 64, 64], [32, 0, 96, 64]], dtype=float)
    mitosis = feature_collection(boxes, [0.1, 0.3], (64, 96), cells=False, threshold=0.5, label="Mitosis",
                                 probability=0.7)
    check_qupath_schema(mitosis)
    kinds = [f["properties"]["objectType"] for f in mitosis["features"]]
    assert kinds == ["tile", "tile", "annotation"]
    assert mitosis["features"][-1]["geometry"]["coordinates"][0][0] == [32.0, 0.0]
    normal = feature_collection(boxes, [0.1, 0.3], (64, 96), cells=False, threshold=0.5, label="Normal",
                                probability=0.2)
    assert [f["properties"]["objectType"] for f in normal["features"]] == ["tile", "tile"]
    assert not any("classification" in f["properties"] for f in normal["features"])


def test_predict_geojson_marks_the_red_disc_of_each_mitosis_image(cell_model, tmp_path):
    folder, targets, result = cell_model
    paths = sorted((folder / "images").glob("*.png"))[:4]
    run = subprocess.run([sys.executable, "-m", "mitoscope", "predict", str(result.model_dir), *map(str, paths),
                          "--out", str(tmp_path / "p.csv"), "--geojson", str(tmp_path / "geo")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for path in paths:
        collection = json.loads((tmp_path / "geo" / f"{path.stem}.geojson").read_text())
        check_qupath_schema(collection)
        found = [f for f in collection["features"] if "classification" in f["properties"]]
        assert collection["mitoscope"]["count"] == len(found)
        target = targets[path.name]
        if target is None:
            assert found == [] and collection["mitoscope"]["label"] == "Normal"
            continue
        assert len(found) == 1
        (x0, y0), (x1, y1) = found[0]["geometry"]["coordinates"][0][0], found[0]["geometry"]["coordinates"][0][2]
        assert x0 <= target[0] <= x1 and y0 <= target[1] <= y1


def test_geojson_needs_a_model_that_scores_instances(tmp_path):
    from mitoscope.errors import InputError
    from mitoscope.predictions import write_geojson_files
    from mitoscope.results import Predictions

    class Model:
        head_name, threshold = "cells", 0.5

    pred = Predictions(paths=[tmp_path / "a.png"], proba=np.array([0.2]), members={}, notes=[""],
                       window_scores=[np.array([0.2, 0.1])], boxes=[np.zeros((3, 4))], image_sizes=[(10, 10)])
    with pytest.raises(InputError, match="2 scores"):
        write_geojson_files(tmp_path / "g", pred, [{"Image": str(tmp_path / "a.png"), "Label": "Normal"}], Model())
    assert list((tmp_path / "g").glob("*")) == []  # nothing half-written
