"""The napari plugin (mitoscope.napari_plugin, napari.yaml): predictions open as heatmap and shapes layers."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mitoscope.errors import InputError
from mitoscope.geojson import feature_collection, write_geojson
from mitoscope.heatmaps import write_window_csv
from mitoscope.napari_plugin import get_reader, read_geojson, read_windows_csv

BOXES = np.array([[10, 20, 40, 50], [60, 60, 90, 90], [100, 10, 130, 40]], dtype=float)
SCORES = np.array([0.9, 0.2, 0.6])


@pytest.fixture()
def geojson(tmp_path):
    collection = feature_collection(BOXES, SCORES, (120, 200), cells=True, threshold=0.5, label="Mitosis",
                                    probability=0.9, count=2, image="scene.png")
    return write_geojson(tmp_path / "scene.geojson", collection)


def test_the_reader_is_offered_for_predictions_only(geojson, tmp_path):
    assert get_reader(str(geojson)) is read_geojson
    assert get_reader(str(tmp_path / "scene_windows.csv")) is read_windows_csv
    assert get_reader(str(tmp_path / "scene.png")) is None
    assert get_reader([str(geojson), str(geojson)]) is None


def test_geojson_opens_as_a_heatmap_and_rectangles_marked_by_the_threshold(geojson):
    (heatmap, heat_kwargs, heat_type), (shapes, shape_kwargs, shape_type) = read_geojson(str(geojson))
    assert heat_type == "image" and shape_type == "shapes"
    assert heatmap.shape == (120, 200) and heat_kwargs["scale"] == (1.0, 1.0)
    assert heat_kwargs["contrast_limits"] == (0.0, 1.0)  # cell probabilities keep their absolute scale
    assert heatmap[30, 20] == pytest.approx(0.9) and heatmap[70, 70] == pytest.approx(0.2)
    # best first, as in the file; corners in napari's (row, column) order
    np.testing.assert_array_equal(shapes[0], [[20, 10], [20, 40], [50, 40], [50, 10]])
    assert list(shape_kwargs["features"]["score"]) == [0.9, 0.6, 0.2]
    assert list(shape_kwargs["features"]["mitotic"]) == [True, True, False]
    assert tuple(shape_kwargs["edge_color"][0]) != tuple(shape_kwargs["edge_color"][2])


def test_windows_csv_opens_too_and_bad_files_say_what_is_wrong(tmp_path):
    path = write_window_csv(tmp_path / "scene_windows.csv", BOXES, SCORES, "scene.png", (120, 200))
    layers = read_windows_csv(str(path))
    assert [kind for _, _, kind in layers] == ["image", "shapes"] and len(layers[1][0]) == 3
    (tmp_path / "bad.geojson").write_text('{"type": "Feature"}')
    with pytest.raises(InputError, match="bad.geojson: expected a GeoJSON FeatureCollection"):
        read_geojson(str(tmp_path / "bad.geojson"))
    (tmp_path / "bad_windows.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="bad_windows.csv: not a windows CSV"):
        read_windows_csv(str(tmp_path / "bad_windows.csv"))


def test_napari_opens_a_prediction_with_the_plugin_under_xvfb(geojson):
    if importlib.util.find_spec("napari") is None:
        pytest.skip("napari is not installed (pip install -e '.[napari]'); .ci/run installs it")
    xvfb = shutil.which("xvfb-run")
    if xvfb is None and not os.environ.get("DISPLAY"):
        pytest.skip("no display and no xvfb-run (Debian: apt-get install xvfb); .ci/run installs it")
    script = textwrap.dedent(f"""
        import json, napari
        viewer = napari.Viewer(show=False)
        layers = viewer.open({str(geojson)!r}, plugin="mitoscope")
        print(json.dumps([[layer.name, type(layer).__name__, len(layer.data) if type(layer).__name__ == "Shapes" else list(layer.data.shape)] for layer in layers]))
        viewer.close()
    """)
    command = [sys.executable, "-c", script]
    if xvfb is not None:
        command = [xvfb, "-a", *command]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "QT_QPA_PLATFORM": "xcb"})
    assert run.returncode == 0, run.stderr[-3000:]
    layers = json.loads(run.stdout.strip().splitlines()[-1])
    assert layers == [["scene heatmap", "Image", [120, 200]], ["scene instances", "Shapes", 3]]
