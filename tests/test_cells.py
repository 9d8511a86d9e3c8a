"""The cell model (mitoscope.cells): proposals, multiple-instance learning from image labels,
counts and positions, save/load and the served (exported) network."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from bags import BACKGROUND, DECOY, TARGET, disc_image, grid_centres, train_cell_model, write_bags
from mitoscope.cells.proposals import Proposals, cut_crops, distance_inside, fill_holes, find_cells, foreground


def test_find_cells_finds_every_disc_once():
    centres = grid_centres(12, seed=3)
    image = disc_image(centres, [DECOY] * 12)
    found = find_cells(image, min_diameter=6)
    assert len(found) == 12
    for x, y in centres:
        assert np.min(np.hypot(found.centres[:, 0] - x, found.centres[:, 1] - y)) < 2
    assert 14 * 0.9 <= np.median(found.diameters) <= 14 * 1.4  # the disc, and the blur of the smoothing


def test_find_cells_splits_touching_cells_and_ignores_an_empty_field():
    touching = disc_image([(60, 80), (74, 80)], [DECOY, DECOY])
    assert len(find_cells(touching, min_diameter=6)) == 2
    assert len(find_cells(np.full((64, 64, 3), 120, np.uint8))) == 0
    with pytest.raises(ValueError, match="expects an"):
        find_cells(np.zeros((8, 8), np.uint8))


def _foreground_per_pixel(image, valid=None):
    """The definition, pixel by pixel in float32: |value - median| / (1.4826 MAD), max over channels."""
    pixels = image.astype(np.float32)
    flat = pixels.reshape(-1, pixels.shape[-1]) if valid is None else pixels[valid]
    sample = flat[:: max(1, len(flat) // 200_000)]
    median = np.median(sample, axis=0)
    spread = np.maximum(np.median(np.abs(sample - median), axis=0) * 1.4826, 1.0)
    return np.max(np.abs(pixels - median) / spread, axis=-1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_foreground_by_table_is_exactly_the_per_pixel_definition(dtype):
    rng = np.random.default_rng(1)
    top = 255 if dtype == np.uint8 else 65535
    image = rng.normal(top * 0.3, top * 0.05, (150, 110, 3)).clip(0, top).astype(dtype)
    image[40:60, 30:50] = top  # a bright cell
    valid = rng.random(image.shape[:2]) > 0.3
    np.testing.assert_array_equal(foreground(image), _foreground_per_pixel(image))
    np.testing.assert_array_equal(foreground(image, valid), _foreground_per_pixel(image, valid))


def test_fill_holes_fills_what_scipy_fills():
    from scipy import ndimage as ndi

    ring = np.zeros((20, 20), bool)
    ring[5:15, 5:15] = True
    ring[8:12, 8:12] = False  # a hole
    assert fill_holes(ring)[8:12, 8:12].all() and not fill_holes(ring)[0, 0]
    ring[5:8, 9:11] = False  # a channel to the outside: no longer a hole
    np.testing.assert_array_equal(fill_holes(ring), ring)
    for seed in range(4):
        mask = np.random.default_rng(seed).random((90, 70)) > 0.45
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
    for constant in (np.zeros((6, 6), bool), np.ones((6, 6), bool)):
        np.testing.assert_array_equal(fill_holes(constant), constant)


def test_distance_inside_each_region_is_the_distance_transform_of_the_whole_mask():
    from scipy import ndimage as ndi

    for seed in range(4):  # random blobs: many touching the image's edges, some diagonal neighbours
        mask = ndi.gaussian_filter(np.random.default_rng(seed).random((120, 90)), 2) > 0.52
        labels, _ = ndi.label(mask)
        np.testing.assert_array_equal(distance_inside(labels), ndi.distance_transform_edt(mask))
    whole = np.ones((7, 5), np.int32)  # one region, no background anywhere
    np.testing.assert_array_equal(distance_inside(whole), ndi.distance_transform_edt(whole > 0))
    np.testing.assert_array_equal(distance_inside(np.zeros((4, 4), np.int32)), np.zeros((4, 4)))


def test_crops_are_centred_on_the_cell_and_padded_with_background_at_edges():
    image = disc_image([(5, 80)], [TARGET])
    proposals = Proposals(np.array([[5.0, 80.0]]), np.array([14.0]), 28)
    crop = cut_crops(image, proposals, 28)[0].astype(int)
    assert crop.shape == (28, 28, 3)
    assert tuple(crop[14, 14]) == pytest.approx(TARGET, abs=12)  # the cell at the centre
    assert tuple(crop[14, 0]) == pytest.approx(BACKGROUND, abs=12)  # outside the image: background


@pytest.fixture(scope="module", params=["linear", "finetuned"])
def trained_cells(tmp_path_factory, request):
    if request.param == "linear":  # the one the other modules' tests use too
        return request.getfixturevalue("cell_model")
    folder, targets = write_bags(tmp_path_factory.mktemp("bags"))
    out = tmp_path_factory.mktemp("models") / f"cells-{request.param}"
    return folder, targets, train_cell_model(folder, out, request.param)


def test_learns_the_distinctive_instance_from_bag_labels_alone(trained_cells, tmp_path):
    from mitoscope.cells.model import CellModel

    folder, targets, result = trained_cells
    test_folder, test_targets = write_bags(tmp_path / "test", n_images=16, seed=7)
    model = CellModel.load(result.model_dir)
    pred = model.predict_paths(sorted((test_folder / "images").glob("*.png")))
    y = np.array([test_targets[p.name] is not None for p in pred.paths])
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y, pred.proba) == 1.0
    # the best cell of every Mitosis image is its red disc; the count is 1 there and 0 elsewhere
    for path, scores, boxes, count in zip(pred.paths, pred.window_scores, pred.boxes, pred.counts):
        target = test_targets[path.name]
        if target is None:
            assert count == 0
            continue
        best = boxes[int(np.argmax(scores))]
        assert best[0] <= target[0] <= best[2] and best[1] <= target[1] <= best[3]
        assert count == 1


def test_saved_model_and_served_network_predict_the_same(trained_cells):
    pytest.importorskip("onnx")
    from mitoscope.cells.model import CellModel
    from mitoscope.models import load_model

    folder, _, result = trained_cells
    paths = sorted((folder / "images").glob("*.png"))[:6]
    torch_model = CellModel.load(result.model_dir)
    served = load_model(result.model_dir, engine="auto")
    assert served.engine in ("openvino", "onnxruntime")
    assert served.network is None  # no PyTorch network behind it
    a, b = torch_model.predict_paths(paths), served.predict_paths(paths)
    assert a.counts == b.counts
    np.testing.assert_allclose(a.proba, b.proba, atol=1e-4)
    for sa, sb in zip(a.window_scores, b.window_scores):
        np.testing.assert_allclose(sa, sb, atol=1e-4)


def test_predict_writes_a_count_column_and_the_cells_as_heatmap_instances(trained_cells, tmp_path):
    from mitoscope.predictions import predict

    folder, targets, result = trained_cells
    paths = sorted((folder / "images").glob("*.png"))[:4]
    rows = predict(result.model_dir, paths, tmp_path / "p.csv", heatmaps_dir=tmp_path / "maps")
    assert [row["Count"] for row in rows] == [0 if targets[p.name] is None else 1 for p in paths]
    assert all((row["Count"] >= 1) == (row["Label"] == "Mitosis") for row in rows)
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert "Count" in header
    assert len(list((tmp_path / "maps").glob("*.png"))) >= 4


def test_cli_train_cells_and_refuses_an_unknown_setting(tmp_path):
    folder, _ = write_bags(tmp_path / "bags", n_images=8, cells=4)
    run = subprocess.run([sys.executable, "-m", "mitoscope", "train", str(folder), "--labels", str(folder / "labels.csv"),
                          "--out", str(tmp_path / "m"), "--head", "cells", "--head-param", "epochz=3"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "epochz" in run.stderr and "epochs" in run.stderr


def test_localize_scores_the_found_cells_against_known_boxes(trained_cells, tmp_path):
    from mitoscope.pipeline import localize

    folder, targets, result = trained_cells
    with open(tmp_path / "boxes.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image", "x", "y", "w", "h"])
        for name, target in targets.items():
            if target is not None:
                writer.writerow([name, target[0] - 7, target[1] - 7, 14, 14])
    report = localize(result.model_dir, folder, tmp_path / "boxes.csv", tmp_path / "where",
                      labels_csv=folder / "labels.csv")
    assert report["pointing_game"] == 1.0
    assert report["window_auc"] > 0.95


def test_served_predict_imports_no_pytorch(trained_cells, tmp_path):
    pytest.importorskip("onnx")
    folder, _, result = trained_cells
    image = sorted((folder / "images").glob("*.png"))[1]
    code = ("import sys; from mitoscope.predictions import predict; "
            f"rows = predict({str(result.model_dir)!r}, [{str(image)!r}], {str(tmp_path / 'p.csv')!r}); "
            "print(rows[0]['Count'], 'torch' in sys.modules, 'sklearn' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, torch_loaded, sklearn_loaded = run.stdout.split()
    assert count == "1" and torch_loaded == "False" and sklearn_loaded == "False", run.stdout + run.stderr


def test_cli_says_which_window_options_the_cell_model_does_not_use(tmp_path):
    folder, _ = write_bags(tmp_path / "bags", n_images=8, cells=5)
    run = subprocess.run([sys.executable, "-m", "mitoscope", "train", str(folder), "--labels", str(folder / "labels.csv"),
                          "--out", str(tmp_path / "m"), "--cv", "3", "--window", "128", "--backbone", "test_efficientnet",
                          "--random-init", "--head-param", "input_size=32", "--head-param", "epochs=1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "warning: --window, --cv set the window heads" in " ".join(run.stderr.split())
    assert (tmp_path / "m" / "model.json").is_file()


def test_crop_views_are_the_eight_symmetries_that_training_applies_to_tensors():
    import torch

    from mitoscope.augment import dihedral
    from mitoscope.cells.views import VIEWS, crop_views

    crops = np.random.default_rng(0).integers(0, 256, (3, 7, 7, 3), dtype=np.uint8)
    seen = set()
    for view, (turns, flip) in enumerate(VIEWS):
        expected = dihedral(torch.from_numpy(crops).permute(0, 3, 1, 2), turns, flip).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(crop_views(crops, view), expected)
        seen.add(crop_views(crops, view).tobytes())
    assert len(seen) == 8  # eight different poses, none repeated


def test_features_averaged_over_all_eight_views_do_not_depend_on_the_pose_of_the_cell():
    import torch

    from mitoscope.cells.network import build_cell_network
    from mitoscope.cells.training import crop_features

    torch.manual_seed(0)
    network, backbone = build_cell_network("test_efficientnet", pretrained=False)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    crops = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    turned = np.ascontiguousarray(np.rot90(crops, 1, axes=(1, 2))[:, :, ::-1])
    one = crop_features(network, crops, mean, std)
    np.testing.assert_allclose(crop_features(network, crops, mean, std, views=8),
                               crop_features(network, turned, mean, std, views=8), rtol=1e-4, atol=1e-5)
    assert np.abs(one - crop_features(network, turned, mean, std)).max() > 1e-3  # one view is not invariant


def test_a_model_with_feature_views_serves_and_saves_them(tmp_path):
    pytest.importorskip("onnx")
    import json

    from mitoscope.cells.model import CellModel
    from mitoscope.models import load_model

    folder, targets = write_bags(tmp_path / "bags")
    result = train_cell_model(folder, tmp_path / "model", feature_views=4)
    assert json.loads((result.model_dir / "model.json").read_text())["cells"]["views"] == 4
    torch_model, served = CellModel.load(result.model_dir), load_model(result.model_dir, engine="auto")
    assert torch_model.views == served.views == 4 and served.network is None
    paths = sorted((folder / "images").glob("*.png"))[:6]
    a, b = torch_model.predict_paths(paths), served.predict_paths(paths)
    np.testing.assert_allclose(a.proba, b.proba, atol=1e-4)
    assert a.counts == b.counts == [0 if targets[p.name] is None else 1 for p in a.paths]
    # a model saved before views existed has none in its description: one view, as it was trained
    config = dict(torch_model.config, cells={k: v for k, v in torch_model.config["cells"].items() if k != "views"})
    assert CellModel(config).views == 1


def test_crops_stored_on_disk_come_back_memory_mapped_and_equal_to_those_in_memory(tmp_path):
    from mitoscope.cells.workflow import CropStore, collect_bags
    from mitoscope.io import ReadOptions

    folder, _ = write_bags(tmp_path / "bags", n_images=4)
    paths = sorted((folder / "images").glob("*.png"))
    in_memory = collect_bags(paths, np.array([0, 1, 0, 1]), ReadOptions(), 32)
    (tmp_path / "store").mkdir()
    on_disk = collect_bags(paths, np.array([0, 1, 0, 1]), ReadOptions(), 32, store_dir=tmp_path / "store")
    assert isinstance(on_disk.crops, np.memmap) and not isinstance(in_memory.crops, np.memmap)
    np.testing.assert_array_equal(on_disk.crops, in_memory.crops)
    np.testing.assert_array_equal(on_disk.offsets, in_memory.offsets)
    assert on_disk.offsets[-1] == 4 * 9  # every disc of every image
    with pytest.raises(ValueError, match=r"expected uint8 crops of shape \(n, 32, 32, 3\), got float32"):
        CropStore(32).append(np.zeros((1, 32, 32, 3), np.float32))


def test_training_leaves_no_temporary_crops_behind(tmp_path, monkeypatch):
    import tempfile

    from mitoscope.cells import workflow

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    stored = []
    original = workflow.CropStore.__init__

    def spy(self, size, folder=None):
        original(self, size, folder)
        stored.append(self.path)

    monkeypatch.setattr(workflow.CropStore, "__init__", spy)
    folder, _ = write_bags(tmp_path / "bags", n_images=8)
    train_cell_model(folder, tmp_path / "model", cv_folds=0)
    assert stored and stored[0] is not None and stored[0].parent.parent == tmp_path / "tmp"  # on disk, in the temp folder
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("mitoscope-")] == []


def test_features_through_the_exported_engine_are_pytorchs(tmp_path):
    from mitoscope.cells.export import FEATURE_TOLERANCE, exported_features
    from mitoscope.cells.network import build_cell_network
    from mitoscope.cells.training import crop_features

    network, backbone = build_cell_network("test_efficientnet", pretrained=False)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    crops = np.random.default_rng(2).integers(0, 256, (37, 32, 32, 3), dtype=np.uint8)
    reported = []
    features, engine = exported_features(network, crops, mean, std, 4, tmp_path, lambda *a: reported.append(a),
                                         batch=16)
    expected = crop_features(network, crops, mean, std, views=4)
    assert engine == "openvino" and features.shape == expected.shape == (37, network.head.in_features)
    assert np.abs(features - expected).max() <= FEATURE_TOLERANCE * np.abs(expected).max()
    assert not np.allclose(features, crop_features(network, crops, mean, std, views=1))  # the views count
    assert reported[-1] == ("cells: features", 37, 37)


def test_training_falls_back_to_pytorch_features_without_an_engine(tmp_path, monkeypatch):
    import json

    from mitoscope import engines
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.errors import InputError

    folder, _ = write_bags(tmp_path / "bags", n_images=8)
    train_cell_model(folder, tmp_path / "exported", cv_folds=0)
    monkeypatch.setattr(engines, "auto_candidates", lambda: [])
    train_cell_model(folder, tmp_path / "torch", cv_folds=0)
    used = {name: json.loads((tmp_path / name / "model.json").read_text())["training"]["feature_engine"]
            for name in ("exported", "torch")}
    assert used == {"exported": "openvino", "torch": "torch"}
    with pytest.raises(InputError, match="feature_engine must be auto or torch, got 'gpu'"):
        CellTrainConfig(feature_engine="gpu")


def test_the_fine_tuned_scorer_trains_what_trained_stages_says_and_never_batchnorm():
    from torch import nn

    from mitoscope.cells.network import build_cell_network, trained_parameters
    from mitoscope.errors import InputError

    network, _ = build_cell_network("test_efficientnet", pretrained=False)
    norms = {id(p) for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    every = [p for p in network.parameters() if id(p) not in norms]
    trained = trained_parameters(network, 0)
    assert {id(p) for p in trained} == {id(p) for p in every}
    assert all(p.requires_grad == (id(p) not in norms) for p in network.parameters())
    last = trained_parameters(network, 1)
    names = {name for name, p in network.named_parameters() if p.requires_grad}
    stage = f"backbone.blocks.{len(network.backbone.blocks) - 1}."
    assert names and all(n.startswith((stage, "backbone.conv_head", "head.")) for n in names)
    assert any(n.startswith(stage) for n in names) and {id(p) for p in last} < {id(p) for p in trained}
    with pytest.raises(InputError, match="between 0"):
        trained_parameters(network, 99)


def test_cell_logits_come_back_in_the_order_asked_and_average_the_views():
    import torch

    from mitoscope.cells.network import build_cell_network
    from mitoscope.cells.training import cell_logits, normalise
    from mitoscope.cells.views import crop_views

    torch.manual_seed(0)
    network, backbone = build_cell_network("test_efficientnet", pretrained=False)
    network.eval()
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    crops = np.random.default_rng(2).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    index = np.array([7, 2, 5, 0])
    with torch.no_grad():
        expected = np.mean([network(normalise(crop_views(crops[index], v), mean, std)).numpy() for v in range(3)], axis=0)
    np.testing.assert_allclose(cell_logits(network, crops, index, 3, mean, std, batch=3), expected, rtol=1e-4, atol=1e-5)


def test_cross_validation_folds_default_by_scorer_and_an_explicit_value_wins():
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.errors import InputError

    assert CellTrainConfig(scorer="linear").cv_folds == 5
    assert CellTrainConfig().cv_folds == 3  # the fine-tuned scorer, the default
    assert CellTrainConfig(scorer="finetuned").cv_folds == 3
    assert CellTrainConfig(scorer="finetuned", cv_folds=5).cv_folds == 5
    assert CellTrainConfig(scorer="finetuned", cv_folds=0).cv_folds == 0
    with pytest.raises(InputError, match="cv_folds must be 0 or at least 2, got 1"):
        CellTrainConfig(cv_folds=1)


def test_channels_last_weights_go_back_to_the_usual_layout_even_after_an_error():
    import torch

    from mitoscope.cells.network import build_cell_network, channels_last

    network, _ = build_cell_network("test_efficientnet", pretrained=False)
    convs = [p for p in network.parameters() if p.ndim == 4]
    with channels_last(network):
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        assert not all(p.is_contiguous() for p in convs)
        with channels_last(network):  # nested (scoring inside training): the outer block's layout stays
            pass
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert all(p.is_contiguous() for p in network.parameters())
    with pytest.raises(RuntimeError, match="stop"), channels_last(network):
        raise RuntimeError("stop")
    assert all(p.is_contiguous() for p in network.parameters())


def test_pseudo_positives_are_the_teachers_best_cells_of_each_mitosis_image_as_many_as_asked():
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.training import Bags, pseudo_labels
    from mitoscope.errors import InputError

    # 24 images of 6 cells; each Mitosis image holds two marked cells (a bright fourth statistic).
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 2
    offsets = np.arange(25) * 6
    frozen = rng.normal(size=(144, 16))
    stats = rng.normal(size=(144, 6))
    marked = np.array([6 * i + j for i in np.flatnonzero(labels) for j in rng.choice(6, 2, replace=False)])
    stats[marked, 3] += 12.0
    bags = Bags(np.zeros((144, 1, 1, 3), dtype=np.uint8), offsets, labels)
    images = np.arange(24)
    normal_cells = np.concatenate([np.arange(6 * i, 6 * i + 6) for i in np.flatnonzero(labels == 0)])

    one, negatives = pseudo_labels(frozen, stats, bags, images, seed=0)
    two, negatives_two = pseudo_labels(frozen, stats, bags, images, seed=0, per_image=2)
    every, _ = pseudo_labels(frozen, stats, bags, images, seed=0, per_image=50)
    np.testing.assert_array_equal(np.sort(negatives), normal_cells)
    np.testing.assert_array_equal(negatives_two, negatives)
    assert len(one) == 12 and set(one) <= set(marked)
    assert sorted(two) == sorted(marked) and set(one) <= set(two)
    assert sorted(every) == sorted(np.concatenate([np.arange(6 * i, 6 * i + 6) for i in np.flatnonzero(labels)]))
    # a subset of the images: only their cells
    some, some_negatives = pseudo_labels(frozen, stats, bags, np.arange(8), seed=0, per_image=2)
    assert set(some) <= set(range(48)) and set(some_negatives) <= set(range(48)) and len(some) == 8
    assert CellTrainConfig(scorer="finetuned").positives_per_image == 1
    with pytest.raises(InputError, match="positives_per_image must be at least 1, got 0"):
        CellTrainConfig(positives_per_image=0)


@pytest.fixture
def recorded_training(monkeypatch):
    """(fit, batches): ``fit(n_crops, positives, negatives, config)`` trains a tiny untrained cell
    network with ``fit_cell_classifier``; ``batches`` gets the crop indices of every step."""
    import torch

    from mitoscope.cells import training
    from mitoscope.cells.network import build_cell_network, trained_parameters

    torch.manual_seed(0)
    network, backbone = build_cell_network("test_efficientnet", pretrained=False)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    batches: list[np.ndarray] = []
    take = training._take
    monkeypatch.setattr(training, "_take", lambda c, index: batches.append(np.array(index)) or take(c, index))

    def fit(n_crops, positives, negatives, config):
        crops = np.random.default_rng(0).integers(0, 256, (n_crops, 32, 32, 3), dtype=np.uint8)
        return training.fit_cell_classifier(network, trained_parameters(network, 0), crops, positives, negatives,
                                            config, 0, mean, std)
    return fit, batches


def test_an_epoch_runs_at_least_min_steps_per_epoch_steps_in_fresh_passes_over_the_negatives(recorded_training):
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.errors import InputError

    fit, batches = recorded_training
    positives, negatives = np.arange(24, 30), np.arange(24)

    def epoch_batches(**settings):
        batches.clear()
        config = CellTrainConfig(scorer="finetuned", epochs=1, positives_per_step=2, negatives_per_step=8, **settings)
        history = fit(30, positives, negatives, config)
        assert len(history) == 1
        return [b[2:] for b in batches]

    assert len(epoch_batches(min_steps_per_epoch=0)) == 3  # one pass over 24 negatives, 8 a step
    assert len(epoch_batches(min_steps_per_epoch=2)) == 3  # a floor under one pass changes nothing
    assert CellTrainConfig().min_steps_per_epoch == 50  # the default (README)
    drawn = epoch_batches(min_steps_per_epoch=7)
    assert len(drawn) == 7
    # 7 steps of 8 = 56 draws: two whole passes (each negative once per pass), then a third begun
    first, second = np.concatenate(drawn[:3]), np.concatenate(drawn[3:6])
    assert sorted(first) == sorted(second) == list(range(24))
    assert len(set(drawn[6])) == 8 and set(drawn[6]) <= set(range(24))
    with pytest.raises(InputError, match="min_steps_per_epoch must be an integer >= 0, got -1"):
        CellTrainConfig(min_steps_per_epoch=-1)


def test_hard_negatives_fill_their_share_of_each_batch_from_the_hardest_tenth_after_the_first_epoch(
        monkeypatch, recorded_training):
    from mitoscope.cells import training
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.errors import InputError

    fit, batches = recorded_training
    positives, negatives = np.arange(100, 120), np.arange(100)
    # made-up hardness, one view as training asks for it: negative i scores i, so the hardest tenth is 90-99
    asked = []
    monkeypatch.setattr(training, "cell_logits",
                        lambda net, c, index, views, m, s: asked.append(views) or index.astype(np.float64))
    config = CellTrainConfig(scorer="finetuned", epochs=2, positives_per_step=2, negatives_per_step=8,
                             hard_negatives=0.5, min_steps_per_epoch=0)
    fit(120, positives, negatives, config)
    assert len(batches) == 2 * (100 // 8) and asked == [1]  # rescored once, before epoch 2
    first = np.concatenate([b[2:] for b in batches[:12]])
    assert len(set(first)) == len(first) == 96  # epoch 1: every negative drawn alike, once
    hard = np.array([b[6:] for b in batches[12:]])
    assert hard.size == 48 and hard.min() >= 90  # epoch 2: 4 of 8 from the hardest tenth
    assert len(set(np.array([b[2:6] for b in batches[12:]]).ravel())) == 48  # the rest without repeats
    with pytest.raises(InputError, match="hard_negatives must be in"):
        CellTrainConfig(hard_negatives=1.5)


def test_carried_out_of_fold_scores_put_each_fold_networks_logits_on_the_final_networks_scale():
    from mitoscope.cells.training import EMPTY_BAG_LOGIT, carried_proba

    scales = {0: (2.0, 4.0), 1: (-1.0, 0.5), None: (0.5, 2.0)}
    # one z-score of 1 and one of -2 under each fold's scale, and a bag without cells
    best = np.array([6.0, -6.0, -0.5, -2.0, EMPTY_BAG_LOGIT])
    fold_of = np.array([0, 0, 1, 1, 1])
    carried = np.log(carried_proba(best, fold_of, scales) / (1 - carried_proba(best, fold_of, scales)))
    np.testing.assert_allclose(carried[:4], [2.5, -3.5, 2.5, -3.5], atol=1e-9)
    assert carried_proba(best, fold_of, scales)[4] == pytest.approx(0.0, abs=1e-25)
    # the ranking within a fold is kept; across folds it follows the z-scores, not the raw logits
    assert best[0] > best[2] and carried[0] == pytest.approx(carried[2])


def test_logit_scale_is_the_median_and_interquartile_range_of_the_cells_of_the_images_given():
    import torch

    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.network import build_cell_network
    from mitoscope.cells.training import Bags, cell_logits, logit_scale

    torch.manual_seed(0)
    network, backbone = build_cell_network("test_efficientnet", pretrained=False)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    crops = np.random.default_rng(3).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    bags = Bags(crops, np.array([0, 10, 20, 30]), np.array([1, 0, 1]))
    config = CellTrainConfig(scorer="finetuned", views=2)
    cells = np.r_[np.arange(0, 10), np.arange(20, 30)]
    logits = cell_logits(network, crops, cells, 2, mean, std)
    low, median, high = np.percentile(logits, [25, 50, 75])
    assert logit_scale(network, bags, np.array([0, 2]), config, mean, std, seed=0) == pytest.approx(
        (median, high - low), rel=1e-6)
    # at most `most` cells, drawn from those images only
    sub_median, _ = logit_scale(network, bags, np.array([0, 2]), config, mean, std, seed=0, most=5)
    assert np.min(logits) <= sub_median <= np.max(logits)


def test_standardized_transfer_keeps_the_raw_out_of_fold_scores_and_records_every_networks_scale(tmp_path):
    import json

    folder, _ = write_bags(tmp_path / "bags", n_images=12)
    result = train_cell_model(folder, tmp_path / "model", "finetuned", oof_transfer="standardized", epochs=3)
    config = json.loads((result.model_dir / "model.json").read_text())
    scales = config["training"]["logit_scales"]
    assert sorted(scales) == ["final", "fold 1", "fold 2", "fold 3"]
    assert all(spread > 0 for _, spread in scales.values())
    assert "standardized onto the final network's scale" in config["threshold_rule"]
    plain = train_cell_model(folder, tmp_path / "plain", "finetuned", epochs=3)
    assert json.loads((plain.model_dir / "model.json").read_text())["training"]["logit_scales"] is None


def test_oof_transfer_is_checked():
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.errors import InputError

    assert CellTrainConfig().oof_transfer == "none"
    with pytest.raises(InputError, match="oof_transfer must be none or standardized, got 'zscore'"):
        CellTrainConfig(oof_transfer="zscore")


def test_mean_state_averages_floating_weights_and_keeps_the_last_networks_counters():
    import torch

    from mitoscope.cells.training import mean_state

    states = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)},
              {"w": torch.tensor([3.0, -2.0]), "n": torch.tensor(4)},
              {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(9)}]
    soup = mean_state(states)
    torch.testing.assert_close(soup["w"], torch.tensor([3.0, 2.0]))
    assert soup["n"].item() == 9 and soup["n"].dtype == torch.int64


def test_fold_soup_makes_the_final_network_the_mean_of_the_fold_networks_and_its_own(monkeypatch):
    import torch

    from mitoscope.cells import training
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.network import build_cell_network

    # each training sets every trained weight to its own call number: fold networks 1-3, the final one 4
    calls = []

    def fake_fit(network, trained, *args, **kwargs):
        calls.append(len(calls) + 1)
        with torch.no_grad():
            for p in trained:
                p.fill_(float(calls[-1]))
        return [{"epoch": 1, "train_loss": 0.0}]

    monkeypatch.setattr(training, "fit_cell_classifier", fake_fit)
    crops = np.random.default_rng(0).integers(0, 256, (36, 32, 32, 3), dtype=np.uint8)
    bags = training.Bags(crops, np.arange(0, 37, 3), np.array([0, 1] * 6))
    for soup, expected in ((True, 2.5), (False, 4.0)):
        calls.clear()
        torch.manual_seed(0)
        network, backbone = build_cell_network("test_efficientnet", pretrained=False)
        untouched = {k: v.clone() for k, v in network.state_dict().items() if "running" in k}
        config = CellTrainConfig(scorer="finetuned", fold_soup=soup, feature_engine="torch", views=1)
        out = training.train_instances(network, bags, config, backbone.data_config["mean"], backbone.data_config["std"])
        assert calls == [1, 2, 3, 4]
        trained = [p for p in network.parameters() if p.requires_grad]
        assert trained and all(torch.all(p == expected) for p in trained)
        assert all(torch.equal(network.state_dict()[k], v) for k, v in untouched.items())  # frozen BatchNorm
        if soup:
            assert out["soup"]["networks"] == 4
            assert all(torch.all(out["soup"]["final_alone"][k] == 4.0)
                       for k, v in network.named_parameters() if v.requires_grad)
        else:
            assert "soup" not in out


def test_fold_soup_is_recorded_and_checked(tmp_path):
    import json

    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.errors import InputError

    folder, _ = write_bags(tmp_path / "bags", n_images=12)
    result = train_cell_model(folder, tmp_path / "model", "finetuned", fold_soup=True, epochs=2)
    assert json.loads((result.model_dir / "model.json").read_text())["training"]["soup_networks"] == 4
    # unset, it is on exactly where it can be: the fine-tuned scorer under cross-validation
    assert CellTrainConfig(scorer="linear").fold_soup is False
    assert CellTrainConfig().fold_soup is True
    assert CellTrainConfig(scorer="finetuned").fold_soup is True
    assert CellTrainConfig(scorer="finetuned", cv_folds=0).fold_soup is False
    assert CellTrainConfig(scorer="finetuned", fold_soup=False).fold_soup is False
    with pytest.raises(InputError, match="needs scorer finetuned and cv_folds of at least 2, got scorer 'linear'"):
        CellTrainConfig(scorer="linear", fold_soup=True)
    with pytest.raises(InputError, match="got scorer 'finetuned' and cv_folds 0"):
        CellTrainConfig(scorer="finetuned", fold_soup=True, cv_folds=0)
    with pytest.raises(InputError, match="fold_soup must be true or false"):
        CellTrainConfig(scorer="finetuned", fold_soup="yes")


def test_cotrained_final_picks_follow_the_out_of_fold_logits_where_the_frozen_features_say_nothing(monkeypatch):
    import torch

    from mitoscope.cells import training
    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.cells.network import build_cell_network

    # 24 images of 8 cells; one designated cell per Mitosis image. The crops are noise (the teacher
    # on frozen features has nothing to go by); every fold network "scores" a cell by whether it is
    # the designated one, each on its own scale, so only the out-of-fold logits can name it.
    rng = np.random.default_rng(1)
    n_images, size = 24, 8
    labels = np.array([0, 1] * (n_images // 2))
    offsets = np.arange(0, n_images * size + 1, size)
    designated = np.array([offsets[i] + rng.integers(size) for i in range(n_images) if labels[i] == 1])
    oracle = np.zeros(n_images * size)
    oracle[designated] = 1.0
    crops = rng.integers(0, 256, (n_images * size, 32, 32, 3), dtype=np.uint8)
    bags = training.Bags(crops, offsets, labels)
    calls = []
    monkeypatch.setattr(training, "fit_cell_classifier",
                        lambda *args, **kwargs: calls.append(1) or [{"epoch": 1, "train_loss": 0.0}])
    monkeypatch.setattr(training, "cell_logits", lambda network, crops, index, *args, **kwargs:
                        (5.0 * len(calls)) * (oracle[index] + 0.1 * rng.standard_normal(len(index))) - len(calls))
    found = {}
    for picks in ("teacher", "cotrained"):
        calls.clear()
        torch.manual_seed(0)
        network, backbone = build_cell_network("test_efficientnet", pretrained=False)
        config = CellTrainConfig(scorer="finetuned", final_picks=picks, feature_engine="torch", views=1)
        out = training.train_instances(network, bags, config, backbone.data_config["mean"], backbone.data_config["std"])
        assert len(calls) == 4
        found[picks] = np.sort(out["final_positives"])
    np.testing.assert_array_equal(found["cotrained"], np.sort(designated))
    assert np.mean(np.isin(found["teacher"], designated)) < 0.5


def test_final_picks_is_recorded_and_checked(tmp_path):
    import json

    from mitoscope.cells.config import CellTrainConfig
    from mitoscope.errors import InputError

    folder, _ = write_bags(tmp_path / "bags", n_images=12)
    result = train_cell_model(folder, tmp_path / "model", "finetuned", final_picks="cotrained", epochs=2)
    assert json.loads((result.model_dir / "model.json").read_text())["head"]["params"]["final_picks"] == "cotrained"
    assert CellTrainConfig().final_picks == "teacher"
    with pytest.raises(InputError, match="final_picks must be teacher or cotrained, got 'network'"):
        CellTrainConfig(scorer="finetuned", final_picks="network")
    with pytest.raises(InputError, match="final_picks=cotrained .* got scorer 'linear'"):
        CellTrainConfig(scorer="linear", final_picks="cotrained")
    with pytest.raises(InputError, match="got scorer 'finetuned' and cv_folds 0"):
        CellTrainConfig(scorer="finetuned", final_picks="cotrained", cv_folds=0)
