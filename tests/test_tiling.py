import numpy as np
import pytest

from mitoscope.errors import InputError
from mitoscope.tiling import crop_windows, make_grid


def test_4k_grid_snaps_the_last_window_to_the_edge():
    grid = make_grid(2160, 3840, window=224, overlap=0.5)
    assert grid.shape == (19, 34)
    # 3840: starts 0,112,...,3584 (33) + snapped 3616 -> 34; 2160: 0..1904 (18) + 1936 -> 19
    assert grid.xs[-1] == 3840 - 224 and grid.ys[-1] == 2160 - 224


@pytest.mark.parametrize("height,width,window,overlap", [(1024, 1024, 224, 0.5), (500, 333, 100, 0.25), (224, 224, 224, 0.5), (3000, 2000, 1600, 0.25)])
def test_windows_cover_every_pixel_and_stay_inside(height, width, window, overlap):
    grid = make_grid(height, width, window, overlap)
    covered = np.zeros((height, width), dtype=int)
    for x0, y0, x1, y1 in grid.boxes():
        assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    stride = round(window * (1 - overlap))
    assert all(b - a <= stride for a, b in zip(grid.xs, grid.xs[1:]))


def test_boxes_are_row_major_and_crops_match_boxes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)
    grid = make_grid(300, 500, 128, 0.5)
    boxes = grid.boxes()
    assert np.all(np.diff(boxes[: grid.shape[1], 0]) > 0)  # first row goes left to right
    crops = crop_windows(image, grid)
    assert crops.shape == (grid.n_windows, 128, 128, 3)
    for crop, (x0, y0, x1, y1) in zip(crops, boxes):
        np.testing.assert_array_equal(crop, image[y0:y1, x0:x1])


def test_small_image_is_padded_to_one_window():
    image = np.full((50, 80, 3), 7, dtype=np.uint8)
    grid = make_grid(50, 80, 224, 0.5)
    assert grid.n_windows == 1
    crop = crop_windows(image, grid)[0]
    assert crop.shape == (224, 224, 3)
    assert (crop[:50, :80] == 7).all() and (crop[50:] == 0).all() and (crop[:, 80:] == 0).all()


@pytest.mark.parametrize("window,overlap", [(4, 0.5), (224, 1.0), (224, -0.1)])
def test_bad_tiling_is_a_clear_error(window, overlap):
    with pytest.raises(InputError, match="window|overlap"):
        make_grid(100, 100, window, overlap)
