"""Window features and their on-disk cache, on precisely constructed images.

The backbone is timm's tiny ``test_efficientnet`` with random weights: the tests check the
bookkeeping (grids, boxes, translation, caching, atomicity), not what the features mean.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

import mitoscope
from mitoscope.backbones import state_dict_sha256
from mitoscope.features import (
    FeatureCache,
    FeatureExtractor,
    ImageFeatures,
    extract_dataset,
    resize_image,
)
from mitoscope.io import ReadOptions
from mitoscope.tiling import make_grid

WINDOW = 64


def noise_image(seed: int, height: int = 96, width: int = 96) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def cache_entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.safetensors") if not p.name.startswith("."))


def litter(root: Path) -> list[Path]:
    """Anything a half-finished write could leave: hidden or temporary files."""
    return [p for p in root.rglob("*") if p.is_file() and (p.name.startswith(".") or ".tmp" in p.name)]


def safetensors_metadata(path: Path) -> dict[str, str]:
    # The safetensors layout: 8-byte little-endian header length, then a JSON header.
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + header_len])["__metadata__"]


class CountingRunner:
    """Wraps the extractor's backbone runner (whichever engine) to count forward passes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0

    def pooled(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner.pooled(batch)

    def feature_map(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner.feature_map(batch)


@pytest.fixture(scope="module")
def small_backbone(tiny_backbone):
    """The tiny backbone fed windows at their own 64 px instead of upsampled to 160: same
    bookkeeping, a sixth of the work."""
    return dataclasses.replace(tiny_backbone, data_config={**tiny_backbone.data_config, "input_size": (3, 64, 64)})


@pytest.fixture(scope="module")
def extractor(small_backbone) -> FeatureExtractor:
    return FeatureExtractor(small_backbone, window=WINDOW, overlap=0.5, batch_size=8, device="cpu")


@pytest.fixture()
def counted(small_backbone) -> FeatureExtractor:
    """A fresh extractor whose network counts its calls."""
    extractor = FeatureExtractor(small_backbone, window=WINDOW, overlap=0.5, batch_size=8, device="cpu")
    extractor._runner = CountingRunner(extractor.runner)
    return extractor


@pytest.fixture(scope="module")
def four_images(tmp_path_factory) -> list[Path]:
    """Four 64x96 PNGs (a 1x2 window grid each)."""
    folder = tmp_path_factory.mktemp("features-images")
    return [write_png(folder / f"img{i}.png", noise_image(100 + i, 64, 96)) for i in range(4)]


@pytest.fixture(scope="module")
def reference(four_images, extractor) -> list[ImageFeatures]:
    """Features of ``four_images`` computed directly, without any cache."""
    return [extractor.extract(np.asarray(Image.open(path).convert("RGB"))) for path in four_images]


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("height, width", [(100, 150), (96, 96), (40, 50)])
def test_extract_follows_the_tiling(extractor, small_backbone, height, width):
    image = noise_image(1, height, width)
    feats = extractor.extract(image)
    grid = make_grid(height, width, WINDOW, 0.5)
    assert feats.features.shape == (grid.n_windows, small_backbone.num_features)
    assert feats.features.dtype == np.float32
    assert np.isfinite(feats.features).all()
    assert feats.boxes.dtype == np.int64
    np.testing.assert_array_equal(feats.boxes, grid.boxes())
    assert feats.grid_shape == grid.shape
    assert feats.image_size == (height, width)
    # The snapped last windows reach the right and bottom edges (or the padded window).
    assert feats.boxes[:, 2].max() == max(width, WINDOW)
    assert feats.boxes[:, 3].max() == max(height, WINDOW)


def test_a_window_gets_the_same_feature_wherever_it_is(extractor):
    patch = noise_image(7, WINDOW, WINDOW)
    first = noise_image(8, 128, 128)
    second = noise_image(9, 128, 128)
    first[0:64, 0:64] = patch  # window (row 0, col 0)
    second[32:96, 64:128] = patch  # window (row 1, col 2) of the 3x3 grid with stride 32
    feats_first = extractor.extract(first)
    feats_second = extractor.extract(second)
    assert feats_first.grid_shape == feats_second.grid_shape == (3, 3)
    index = 1 * 3 + 2
    np.testing.assert_array_equal(feats_second.boxes[index], [64, 32, 128, 96])
    np.testing.assert_allclose(feats_first.features[0], feats_second.features[index], rtol=1e-4, atol=1e-5)
    alone = extractor.embed_windows(patch[None])[0]
    np.testing.assert_allclose(alone, feats_first.features[0], rtol=1e-4, atol=1e-5)
    # ...and windows of other content do not match (the check above can fail).
    assert not np.allclose(feats_first.features[0], feats_second.features[0], rtol=1e-4, atol=1e-5)


def test_resize_to_reports_boxes_in_original_coordinates(extractor):
    image = noise_image(3, 120, 200)
    feats = extractor.extract(image, resize_to=(60, 100))
    small = make_grid(60, 100, WINDOW, 0.5)
    assert feats.image_size == (120, 200)
    assert feats.grid_shape == small.shape
    np.testing.assert_array_equal(feats.boxes, small.boxes() * 2)
    assert feats.boxes[:, 2].max() == 200  # the last window ends at the original right edge
    direct = extractor.extract(resize_image(image, (60, 100)))
    np.testing.assert_allclose(feats.features, direct.features, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- cache


def test_cache_hit_returns_identical_arrays_without_running_the_model(tmp_path, four_images, counted):
    cache = FeatureCache(tmp_path / "cache")
    first = extract_dataset(four_images, counted, ReadOptions(), cache)
    calls_first = counted.runner.calls
    assert calls_first >= 1
    assert len(cache_entries(cache.root)) == len(four_images)
    again = extract_dataset(four_images, counted, ReadOptions(), cache)
    assert counted.runner.calls == calls_first
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.features.dtype == b.features.dtype == np.float32
        assert a.boxes.dtype == b.boxes.dtype == np.int64
        assert tuple(a.grid_shape) == tuple(b.grid_shape)
        assert tuple(a.image_size) == tuple(b.image_size)


def test_a_cache_entry_damaged_on_disk_is_detected_reported_and_extracted_again(tmp_path, four_images, counted,
                                                                                  caplog):
    cache = FeatureCache(tmp_path / "cache")
    first = extract_dataset(four_images[:1], counted, ReadOptions(), cache)
    calls = counted.runner.calls
    [entry] = cache_entries(cache.root)
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0x40  # one flipped bit in the last feature: still a valid safetensors file
    entry.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="mitoscope.cache"):
        again = extract_dataset(four_images[:1], counted, ReadOptions(), cache)
    assert "damaged on disk" in caplog.text and entry.name in caplog.text
    assert counted.runner.calls == 2 * calls  # extracted again, not read from the damaged entry
    np.testing.assert_array_equal(first[0].features, again[0].features)
    third = extract_dataset(four_images[:1], counted, ReadOptions(), cache)  # the rewritten entry is good
    assert counted.runner.calls == 2 * calls
    np.testing.assert_array_equal(first[0].features, third[0].features)


def test_no_cache_always_runs_the_model(four_images, counted):
    extract_dataset(four_images[:1], counted, ReadOptions(), None)
    calls = counted.runner.calls
    extract_dataset(four_images[:1], counted, ReadOptions(), None)
    assert counted.runner.calls == 2 * calls > 0


def test_cache_key_follows_everything_that_changes_the_features(tmp_path, small_backbone):
    image = noise_image(11, 64, 64)
    path = write_png(tmp_path / "a.png", image)
    cache = FeatureCache(tmp_path / "cache")

    def n_after(extractor: FeatureExtractor, options: ReadOptions = ReadOptions(), target: Path = path) -> int:
        extract_dataset([target], extractor, options, cache)
        return len(cache_entries(cache.root))

    base = FeatureExtractor(small_backbone, window=WINDOW, overlap=0.5, device="cpu")
    assert n_after(base) == 1
    assert n_after(base) == 1  # same settings: a hit
    assert n_after(FeatureExtractor(small_backbone, window=48, overlap=0.5, device="cpu")) == 2
    assert n_after(FeatureExtractor(small_backbone, window=WINDOW, overlap=0.25, device="cpu")) == 3

    model = copy.deepcopy(small_backbone.model)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    other_weights = dataclasses.replace(small_backbone, model=model, weights_id=state_dict_sha256(model))
    assert other_weights.weights_id != small_backbone.weights_id
    assert n_after(FeatureExtractor(other_weights, window=WINDOW, overlap=0.5, device="cpu")) == 4

    assert n_after(base, ReadOptions(channels=(1, 0, 2))) == 5
    assert n_after(base, ReadOptions(percentiles=(1.0, 99.0))) == 6
    # The pixel limit only guards decoding: same pixels, same entry.
    assert n_after(base, ReadOptions(max_pixels=10**6)) == 6

    # Keyed by content, not by name: a copy hits, a changed pixel misses.
    copy_path = tmp_path / "copy.png"
    copy_path.write_bytes(path.read_bytes())
    assert n_after(base, target=copy_path) == 6
    changed = image.copy()
    changed[0, 0] ^= 0xFF
    write_png(path, changed)
    assert n_after(base) == 7


def test_interrupted_run_resumes_from_the_entries_already_written(tmp_path, four_images, small_backbone, reference):
    cache = FeatureCache(tmp_path / "cache")
    # Batches of 4 windows: the 2-window images are extracted two at a time.
    extractor = FeatureExtractor(small_backbone, window=WINDOW, overlap=0.5, batch_size=4, device="cpu")
    real_extract = extractor.extract_many
    calls = {"n": 0}

    def failing_extract(images, resize_to=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("interrupted on the second pair")
        return real_extract(images, resize_to=resize_to)

    extractor.extract_many = failing_extract
    with pytest.raises(RuntimeError, match="second pair"):
        extract_dataset(four_images, extractor, ReadOptions(), cache)
    assert len(cache_entries(cache.root)) == 2
    assert litter(cache.root) == []

    extracted = []

    def recording_extract(images, resize_to=None):
        extracted.extend(image.copy() for image in images)
        return real_extract(images, resize_to=resize_to)

    extractor.extract_many = recording_extract
    resumed = extract_dataset(four_images, extractor, ReadOptions(), cache)
    assert len(extracted) == 2
    assert len(cache_entries(cache.root)) == 4
    for a, b in zip(resumed, reference):
        np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)


def test_a_write_cut_short_leaves_no_entry_and_no_temp_file(tmp_path, four_images, extractor, monkeypatch):
    cache = FeatureCache(tmp_path / "cache")

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr("mitoscope.cache.save_file", half_write)
    with pytest.raises(KeyboardInterrupt):
        extract_dataset(four_images[:1], extractor, ReadOptions(), cache)
    assert cache_entries(cache.root) == []
    assert litter(cache.root) == []


def test_a_cache_that_cannot_be_written_costs_time_not_results(tmp_path, four_images, extractor, monkeypatch, caplog):
    def refuse(self, key, feats, provenance):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureCache, "save", refuse)
    with caplog.at_level(logging.WARNING, logger="mitoscope.features"):
        feats = extract_dataset(four_images[:1], extractor, ReadOptions(), FeatureCache(tmp_path / "cache"))
    assert feats[0].features.shape[0] == 2
    assert "No space left" in caplog.text


def corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a safetensors file at all" * 10)


def corrupt_wrong_shapes(path: Path) -> None:
    # A readable safetensors file whose arrays do not fit its own 1x2 grid.
    save_file(
        {"features": np.zeros((3, 256), np.float32), "boxes": np.zeros((3, 4), np.int64)},
        str(path),
        metadata={"grid_shape": "[1, 2]", "image_size": "[64, 96]", "provenance": "{}"},
    )


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_garbage, corrupt_wrong_shapes])
def test_a_corrupt_entry_is_recomputed_never_read(tmp_path, four_images, counted, caplog, corrupt):
    cache = FeatureCache(tmp_path / "cache")
    good = extract_dataset(four_images[:1], counted, ReadOptions(), cache)[0]
    (entry,) = cache_entries(cache.root)
    corrupt(entry)
    calls = counted.runner.calls
    with caplog.at_level(logging.WARNING, logger="mitoscope.features"):
        again = extract_dataset(four_images[:1], counted, ReadOptions(), cache)[0]
    assert counted.runner.calls > calls
    assert entry.name in caplog.text
    np.testing.assert_array_equal(again.features, good.features)
    np.testing.assert_array_equal(again.boxes, good.boxes)
    # The entry was rewritten whole: the next run is a hit.
    calls = counted.runner.calls
    extract_dataset(four_images[:1], counted, ReadOptions(), cache)
    assert counted.runner.calls == calls


def test_entries_carry_their_provenance(tmp_path, four_images, extractor, small_backbone):
    cache = FeatureCache(tmp_path / "cache")
    options = ReadOptions(channels=(2, 1, 0))
    feats = extract_dataset(four_images[:1], extractor, options, cache)[0]
    (entry,) = cache_entries(cache.root)
    meta = safetensors_metadata(entry)
    assert json.loads(meta["grid_shape"]) == list(feats.grid_shape)
    assert json.loads(meta["image_size"]) == [64, 96]
    provenance = json.loads(meta["provenance"])
    assert provenance["image"] == str(four_images[0])
    assert provenance["mitoscope"] == mitoscope.__version__
    assert provenance["extractor"]["backbone"] == "test_efficientnet"
    assert provenance["extractor"]["weights_sha256"] == small_backbone.weights_id
    assert provenance["extractor"]["window"] == WINDOW
    assert provenance["extractor"]["overlap"] == 0.5
    assert provenance["read"]["channels"] == [2, 1, 0]


def test_extract_dataset_keeps_order_and_reports_progress(tmp_path, four_images, extractor, reference):
    cache = FeatureCache(tmp_path / "cache")
    extract_dataset(four_images[1:2], extractor, ReadOptions(), cache)  # one of four already cached
    seen: list[tuple[int, int]] = []
    feats = extract_dataset(four_images, extractor, ReadOptions(), cache, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (1, 4) and seen[-1] == (4, 4)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    for got, expected in zip(feats, reference):
        assert isinstance(got, ImageFeatures)
        np.testing.assert_allclose(got.features, expected.features, rtol=1e-5, atol=1e-6)


def test_extract_dataset_names_a_missing_image(tmp_path, four_images, extractor):
    missing = tmp_path / "nope.png"
    with pytest.raises(mitoscope.errors.InputError, match="nope.png"):
        extract_dataset([four_images[0], missing], extractor, ReadOptions(), FeatureCache(tmp_path / "cache"))


def test_a_cached_image_over_the_pixel_limit_is_refused_too(tmp_path, four_images, counted):
    cache = FeatureCache(tmp_path / "cache")
    extract_dataset(four_images[:1], counted, ReadOptions(), cache)
    calls = counted.runner.calls
    with pytest.raises(mitoscope.errors.InputError, match=rf"{four_images[0].name}.*6,143"):
        extract_dataset(four_images[:1], counted, ReadOptions(max_pixels=64 * 96 - 1), cache)
    assert counted.runner.calls == calls


# --------------------------------------------------------------------------- many small images


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> list[Path]:
    """Eleven 36x40 PNG crops: one window each, for windows of 40 px and of 64 px (padded)."""
    folder = tmp_path_factory.mktemp("crops")
    return [write_png(folder / f"crop{i:02d}.png", noise_image(200 + i, 36, 40)) for i in range(11)]


def entry_names(root: Path) -> list[Path]:
    return [p.relative_to(root) for p in cache_entries(root)]


@pytest.mark.parametrize("mode", ["windows", "fullconv"])
@pytest.mark.parametrize("window", [WINDOW, 40])  # 40: each window resized to the backbone's 64 px
def test_single_window_images_share_backbone_batches_and_get_the_same_entries(tmp_path, crops, small_backbone,
                                                                             mode, window):
    one_by_one = FeatureExtractor(small_backbone, window=window, overlap=0.5, batch_size=1, device="cpu", mode=mode)
    batched = FeatureExtractor(small_backbone, window=window, overlap=0.5, batch_size=4, device="cpu", mode=mode)
    batched._runner = CountingRunner(batched.runner)
    alone, shared = FeatureCache(tmp_path / "alone"), FeatureCache(tmp_path / "shared")
    expected = extract_dataset(crops, one_by_one, ReadOptions(), alone)
    seen: list[tuple[int, int]] = []
    got = extract_dataset(crops, batched, ReadOptions(), shared, progress=lambda d, t: seen.append((d, t)))
    assert batched.runner.calls == 3  # 11 crops in batches of 4, not 11 forward passes
    assert seen == [(0, 11), (4, 11), (8, 11), (11, 11)]
    for a, b in zip(got, expected):
        assert a.features.shape == b.features.shape == (1, small_backbone.num_features)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert (a.grid_shape, a.image_size) == (b.grid_shape, b.image_size) == ((1, 1), (36, 40))
    # The same entries: the same keys, the same provenance.
    assert entry_names(shared.root) == entry_names(alone.root) and len(entry_names(alone.root)) == len(crops)
    for name in entry_names(alone.root):
        assert safetensors_metadata(shared.root / name) == safetensors_metadata(alone.root / name)
    # ...read back as they were computed.
    for a, b in zip(extract_dataset(crops, batched, ReadOptions(), shared), got):
        np.testing.assert_array_equal(a.features, b.features)
    assert batched.runner.calls == 3


def test_groups_hold_a_batch_of_windows_and_keep_the_order(tmp_path, crops, four_images, small_backbone):
    big = write_png(tmp_path / "big.png", noise_image(5, 128, 128))  # 9 windows: a group of its own
    paths = [*crops[:3], big, *four_images[:3], crops[3]]
    extractor = FeatureExtractor(small_backbone, window=WINDOW, overlap=0.5, batch_size=4, device="cpu")
    groups = []
    real_extract = extractor.extract_many

    def recording_extract(images, resize_to=None):
        groups.append([image.shape[:2] for image in images])
        return real_extract(images, resize_to=resize_to)

    extractor.extract_many = recording_extract
    got = extract_dataset(paths, extractor, ReadOptions(), None)
    assert groups == [[(36, 40)] * 3, [(128, 128)], [(64, 96)] * 2, [(64, 96), (36, 40)]]
    for path, features in zip(paths, got):
        alone = real_extract([np.asarray(Image.open(path).convert("RGB"))])[0]
        np.testing.assert_allclose(features.features, alone.features, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(features.boxes, alone.boxes)


def test_resized_images_are_batched_with_their_boxes_in_the_image_as_read(tmp_path, crops, small_backbone):
    extractor = FeatureExtractor(small_backbone, window=40, overlap=0.5, batch_size=8, device="cpu")
    images = [np.asarray(Image.open(path).convert("RGB")) for path in crops[:3]]
    together = extractor.extract_many(images, resize_to=(20, 20))
    for image, features in zip(images, together):
        alone = extractor.extract(image, resize_to=(20, 20))
        np.testing.assert_allclose(features.features, alone.features, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(features.boxes, [[0, 0, 80, 72]])  # the 40 px window, 2x (x) and 1.8x (y)
        assert features.image_size == (36, 40)


def test_an_unreadable_crop_stops_the_run_after_the_crops_before_it_are_cached(tmp_path, crops, counted):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    cache = FeatureCache(tmp_path / "cache")
    with pytest.raises(mitoscope.errors.InputError, match="bad.png"):
        extract_dataset([*crops[:5], bad, *crops[5:]], counted, ReadOptions(), cache)
    assert len(cache_entries(cache.root)) == 5
    assert litter(cache.root) == []


def test_box_average_equals_torchvision_roi_align():
    from torchvision.ops import roi_align

    from mitoscope.features import box_average

    generator = torch.Generator().manual_seed(0)
    fmap = torch.randn(1, 5, 7, 11, generator=generator)
    # boxes inside, on the edges and past them (clamped), of several sizes, at stride 32
    boxes = torch.tensor([[0, 0, 224, 224], [112, 0, 336, 224], [128, 96, 352, 224], [0, 0, 352, 224],
                          [300, 150, 352, 224], [10, 20, 30, 40]], dtype=torch.float32)
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
    expected = roi_align(fmap, rois, output_size=1, spatial_scale=1 / 32, sampling_ratio=4, aligned=True).flatten(1)
    torch.testing.assert_close(box_average(fmap, boxes, 1 / 32), expected, rtol=1e-5, atol=1e-6)

