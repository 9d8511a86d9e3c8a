"""The numpy extractor (exported backbones) batches many small images as the PyTorch one does.

A fake runner with simple, per-image arithmetic stands in for OpenVINO/ONNX Runtime, so the
test checks the batching itself: which arrays reach the backbone, and that every image gets
the features it gets on its own.
"""

from __future__ import annotations

import numpy as np
import pytest

from mitoscope.array_features import ArrayExtractor, box_average, box_sample_weights, box_weight_entries
from mitoscope.tiling import make_grid

WINDOW = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FakeRunner:
    """Per-image statistics as 'features'; records the shape of every batch it is given."""

    name = "fake"

    def __init__(self) -> None:
        self.batches: list[tuple[int, ...]] = []

    def pooled(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(images.shape)
        return np.concatenate([images.mean(axis=(2, 3)), images.max(axis=(2, 3))], axis=1)

    def feature_map(self, images: np.ndarray) -> np.ndarray:  # stride 8
        self.batches.append(images.shape)
        b, c, h, w = images.shape
        return images.reshape(b, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5))


def images_of(sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("mode", ["windows", "fullconv"])
def test_single_window_images_run_as_batches_with_the_features_they_get_alone(mode):
    runner = FakeRunner()
    extractor = ArrayExtractor(runner, WINDOW, 0.5, WINDOW, MEAN, STD, batch_size=4, mode=mode)
    crops = images_of([(24, 30)] * 5 + [(32, 20)])
    together = extractor.extract_many(crops)
    assert runner.batches == [(4, 3, WINDOW, WINDOW), (2, 3, WINDOW, WINDOW)]  # padded to one window each
    runner.batches.clear()
    for crop, features in zip(crops, together):
        alone = extractor.extract(crop)
        np.testing.assert_allclose(features.features, alone.features, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(features.boxes, [[0, 0, WINDOW, WINDOW]])
        assert features.grid_shape == (1, 1) and features.image_size == crop.shape[:2]
    assert runner.batches == [(1, 3, WINDOW, WINDOW)] * len(crops)


def test_fullconv_stacks_images_of_one_size_up_to_a_batch_of_windows():
    runner = FakeRunner()
    extractor = ArrayExtractor(runner, WINDOW, 0.5, WINDOW, MEAN, STD, batch_size=8, mode="fullconv")
    # 48x48: 2x2 windows of 32 px at stride 16, so two images fill a batch of 8 windows.
    images = images_of([(48, 48), (20, 20), (48, 48), (48, 48), (20, 20)])
    together = extractor.extract_many(images)
    assert runner.batches == [(2, 3, 48, 48), (1, 3, 48, 48), (2, 3, WINDOW, WINDOW)]
    for image, features in zip(images, together):
        grid = make_grid(image.shape[0], image.shape[1], WINDOW, 0.5)
        assert features.features.shape == (grid.n_windows, 3)
        np.testing.assert_allclose(features.features, extractor.extract(image).features, rtol=1e-6, atol=1e-6)


def test_box_weights_are_separable_sum_to_one_and_their_sparse_entries_are_the_outer_product():
    rng = np.random.default_rng(3)
    fmap = rng.standard_normal((4, 9, 13)).astype(np.float32)
    boxes = np.array([[0, 0, 64, 64], [300, 200, 416, 288], [-20, -10, 40, 30], [100, 50, 101, 51],
                      [0, 0, 416, 288]], dtype=np.float32)
    weight_y, weight_x = box_sample_weights(boxes, 1 / 32, 9, 13)
    assert weight_y.shape == (5, 9) and weight_x.shape == (5, 13)
    np.testing.assert_allclose(weight_y.sum(axis=1), 1.0)
    np.testing.assert_allclose(weight_x.sum(axis=1), 1.0)
    rows, columns, values = box_weight_entries(weight_y, weight_x)
    dense = np.zeros((5, 9 * 13))
    dense[rows, columns] = values
    np.testing.assert_array_equal(dense, (weight_y[:, :, None] * weight_x[:, None, :]).reshape(5, -1))
    assert np.all(np.diff(rows * 9 * 13 + columns) > 0)  # sorted and unique: a coalesced sparse matrix
    np.testing.assert_allclose(dense @ fmap.reshape(4, -1).T, box_average(fmap, boxes, 1 / 32), rtol=1e-5, atol=1e-6)
