"""End-to-end fine-tuning (Round 2): phases, checkpoints, persistence, tiling, attention, CLI.

Everything runs on timm's tiny ``test_efficientnet`` (random weights, asked for explicitly)
at 64 px on a dozen synthetic images, one epoch per phase, so the file stays fast.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

L = pytest.importorskip("lightning")

from mitoscope.augment import AugmentConfig, augment_batch, dihedral, hed_to_rgb, rgb_to_hed  # noqa: E402
from mitoscope.errors import InputError, ModelError, WeightsUnavailableError  # noqa: E402
from mitoscope.finetune import (  # noqa: E402
    TTA_TRANSFORMS,
    FineTuneConfig,
    FineTunedModel,
    FineTuner,
    ImageStore,
    Phase,
    TrunkView,
    build_network,
    build_trunk_cache,
    check_input_size,
    finetune,
    fit_phase,
    forward_images,
    plan_trunk_views,
    predict_arrays,
    resolve_precision,
    resolve_trunk_split,
    set_trainable,
    tile_boxes,
    trunk_split,
    validation_split,
)
from mitoscope.io import ReadOptions, load_labelled_images  # noqa: E402
from mitoscope.synthetic import make_synthetic_dataset  # noqa: E402

SIZE = 64


def tiny_config(**changes) -> FineTuneConfig:
    settings = dict(backbone="test_efficientnet", pretrained=False, size=SIZE, epochs_head=1, epochs_full=1,
                    batch_size=4, accelerator="cpu", seed=0)
    settings.update(changes)
    return FineTuneConfig(**settings)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny convolutions on a shared machine run ~10x faster on one thread than fighting for two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ft-data") / "set"
    labels = make_synthetic_dataset(folder, n_images=12, size=(SIZE, SIZE), cells=(3, 5), mitoses=(1, 1),
                                    cell_radius=(5, 7), seed=3)
    return folder, labels


@pytest.fixture(scope="module")
def arrays(dataset):
    folder, labels = dataset
    data = load_labelled_images(folder, labels)
    images, owner, _ = ImageStore(SIZE, ReadOptions()).load(data.paths)
    assert np.array_equal(owner, np.arange(len(data.paths)))
    return images, data.y


@pytest.fixture(scope="module")
def attention_model(dataset, tmp_path_factory):
    folder, labels = dataset
    out = tmp_path_factory.mktemp("ft-model") / "attention"
    result = finetune(folder, labels, out, tiny_config(pool="attention"))
    return result, out


def backbone_state(network) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in network.backbone.state_dict().items()}


# ----------------------------------------------------------------------------- tiling, store


def test_tiles_of_a_3000x2000_image_cover_it_with_the_asked_overlap():
    boxes = tile_boxes(2000, 3000, 1600, 0.25)
    covered = np.zeros((2000, 3000), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        assert (x1 - x0, y1 - y0) == (1600, 1600)
        assert 0 <= x0 and 0 <= y0 and x1 <= 3000 and y1 <= 2000
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    for axis in (0, 1):  # neighbouring tiles overlap by at least a quarter of a tile
        starts = np.unique(boxes[:, axis])
        assert len(starts) >= 2
        assert np.all(np.diff(starts) <= 1600 * (1 - 0.25))


def test_image_store_resizes_each_tile_of_the_image_as_read(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    store = ImageStore(32, ReadOptions(), cache_dir=tmp_path / "cache")
    arrays, owner, boxes = store.load([tmp_path / "big.png"], tile=160, overlap=0.25)
    assert arrays.shape == (len(boxes), 32, 32, 3) and arrays.dtype == np.uint8
    assert np.array_equal(boxes, tile_boxes(200, 300, 160, 0.25)) and set(owner) == {0}
    from mitoscope.features import resize_image

    x0, y0, x1, y1 = boxes[-1]
    assert np.array_equal(arrays[-1], resize_image(pixels[y0:y1, x0:x1], (32, 32)))
    again, _, _ = store.load([tmp_path / "big.png"], tile=160, overlap=0.25)  # from the disk cache now
    assert np.array_equal(again, arrays) and any((tmp_path / "cache").rglob("*.safetensors"))


def test_validation_split_is_stratified_and_keeps_groups_together():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1])
    groups = np.array(["a", "a", "b", "b", "c", "c", "d", "d", "e", "f"])
    train, val = validation_split(y, groups, 0.3, seed=0)
    assert set(y[val]) == {0, 1} and set(y[train]) == {0, 1}
    assert not set(groups[train]) & set(groups[val])
    with pytest.raises(InputError, match="at least 2 images of each class"):
        validation_split(np.array([0, 0, 0, 1]), None, 0.2, seed=0)


def test_pretraining_tiles_negatives_and_keeps_positives_whole(dataset, tmp_path):
    from mitoscope.finetune import _load_pretrain_set

    folder, labels = dataset
    big = tmp_path / "big"
    big_labels = make_synthetic_dataset(big, n_images=4, size=(128, 128), cells=(3, 5), mitoses=(1, 1),
                                        cell_radius=(5, 7), seed=5)
    pre = load_labelled_images(big, big_labels)
    main = load_labelled_images(folder, labels)
    config = tiny_config(pretrain_data=str(big), pretrain_labels=str(big_labels), tile=64, tile_overlap=0.0,
                         negatives_only_tiles=True).validate()
    images, y, groups, summary = _load_pretrain_set(config, ImageStore(SIZE, ReadOptions()), main, None)
    n_negative, n_positive = int((pre.y == 0).sum()), int(pre.y.sum())
    assert len(y) == 4 * n_negative + n_positive  # four 64 px tiles per Normal image, Mitosis images whole
    assert int(y.sum()) == n_positive and images.shape == (len(y), SIZE, SIZE, 3)
    assert len(set(groups)) == len(pre.paths)  # a tile's group is its image
    noisy = _load_pretrain_set(replace(config, negatives_only_tiles=False), ImageStore(SIZE, ReadOptions()), main, None)
    assert len(noisy[1]) == 16 and int(noisy[1].sum()) == 4 * n_positive  # every tile takes its image's label

    result = finetune(folder, labels, tmp_path / "model", replace(config, epochs_full=0, unfreeze=1))
    assert [(r["stage"], r["phase"]) for r in result.history] == [("pretrain", "head"), ("main", "head")]
    training = result.model.config["training"]
    assert training["pretrain"]["n_samples"] == len(y)
    assert training["pretrain"]["trunk_cache"]["n_images"] == len(y) and training["trunk_cache"]["n_images"] == 12
    with pytest.raises(InputError, match="also training images"):
        finetune(folder, labels, tmp_path / "again", replace(config, pretrain_data=str(folder),
                                                            pretrain_labels=str(labels)))


# ----------------------------------------------------------------------------- phases


class OptimizerProbe(L.Callback):
    """Records, at the start of training, each optimizer group's lr and its parameters."""

    def on_train_start(self, trainer, module):
        self.lrs = [group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups]
        self.params = {id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]}


def test_phase_one_leaves_the_base_exactly_unchanged_and_phase_two_trains_it(arrays, tmp_path):
    images, y = arrays
    config = tiny_config(schedule="constant").validate()
    network, backbone = build_network(config)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    train, val = validation_split(y, None, 0.25, seed=0)
    before = backbone_state(network)
    head_before = {k: v.clone() for k, v in network.head.state_dict().items()}

    probe = OptimizerProbe()
    head = fit_phase(network, images, y, train, val, Phase("head", 1, 0.01, None), config, tmp_path / "head",
                     mean, std, callbacks=[probe])
    after_head = backbone_state(network)
    assert all(torch.equal(before[k], after_head[k]) for k in before)  # weights and BN running stats
    assert any(not torch.equal(head_before[k], v) for k, v in network.head.state_dict().items())
    assert probe.lrs == [0.01] and [row["lr"] for row in head.history] == [0.01]
    assert probe.params == {id(p) for p in network.head.parameters()}

    probe = OptimizerProbe()
    full = fit_phase(network, images, y, train, val, Phase("full", 1, 0.002, 1, head_lr=0.01), config,
                     tmp_path / "full", mean, std, callbacks=[probe])
    after_full = backbone_state(network)
    last_stage = [k for k in before if k.startswith(("blocks.4.", "conv_head", "bn2"))]
    earlier = [k for k in before if k.startswith(("conv_stem", "bn1", "blocks.0."))]
    assert any(not torch.equal(before[k], after_full[k]) for k in last_stage)
    assert all(torch.equal(before[k], after_full[k]) for k in earlier)  # frozen blocks: BN stats included
    assert probe.lrs == [0.002, 0.01] and full.history[0]["lr"] == 0.002  # the base at its rate, the head at its own
    batchnorm = {id(p) for m in network.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters()}
    assert probe.params == {id(p) for p in network.head.parameters()} | {
        id(p) for n, p in network.backbone.named_parameters() if n.startswith(("blocks.4.", "conv_head", "bn2"))} - batchnorm
    statistics = [k for k in last_stage if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(before[k], after_full[k]) for k in statistics)  # frozen BatchNorm
    history_keys = {"train_loss", "train_accuracy", "train_auc", "val_loss", "val_accuracy", "val_auc"}
    assert history_keys <= set(full.history[0])


class StepRates(L.Callback):
    """Records every optimizer group's name and lr before each training step."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        groups = trainer.optimizers[0].param_groups
        self.steps = getattr(self, "steps", []) + [{g["name"]: g["lr"] for g in groups}]


def test_onecycle_warms_up_and_anneals_each_group_to_its_own_peak(arrays, tmp_path):
    images, y = arrays
    config = tiny_config(batch_size=2).validate()  # onecycle is the default schedule
    network, backbone = build_network(config)
    train, val = validation_split(y, None, 0.25, seed=0)
    rates = StepRates()
    fit_phase(network, images, y, train, val, Phase("full", 4, 0.002, 1, head_lr=0.01), config, tmp_path,
              backbone.data_config["mean"], backbone.data_config["std"], callbacks=[rates])
    assert set(rates.steps[0]) == {"backbone", "head"} and len(rates.steps) == 4 * (len(train) // 2)
    for name, peak in (("backbone", 0.002), ("head", 0.01)):
        series = [step[name] for step in rates.steps]
        assert series[0] == pytest.approx(peak / 25)  # OneCycle's default start: peak / 25
        assert max(series) == pytest.approx(peak, rel=0.05)
        assert series[-1] < peak / 10 and int(np.argmax(series)) < len(series) // 2


def test_unfreeze_counts_timm_groups_from_the_end():
    network, _ = build_network(tiny_config().validate())
    assert set_trainable(network, None) == []
    assert all(p.requires_grad for p in network.head.parameters())
    last = set_trainable(network, 1)
    assert last and all(n.startswith(("blocks.4.", "conv_head", "bn2")) for n in last)
    assert any(n.startswith("conv_head") for n in last)
    two = set_trainable(network, 2)
    assert set(last) < set(two) and any(n.startswith("blocks.3.") for n in two)
    assert len(set_trainable(network, "all", batchnorm="train")) == len(list(network.backbone.parameters()))
    batchnorm = {f"{m}.{n}" for m, module in network.backbone.named_modules()
                 if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for n, _ in module.named_parameters()}
    assert batchnorm and set(set_trainable(network, "all")) == \
        {n for n, _ in network.backbone.named_parameters()} - batchnorm  # frozen BatchNorm by default


class SpoilLaterEpochs(L.Callback):
    """Keeps epoch 1's weights, then makes every later epoch's weights bad before validation."""

    def on_validation_epoch_start(self, trainer, module):
        if trainer.current_epoch == 0:
            self.first = {k: v.detach().clone() for k, v in module.network.state_dict().items()}
        else:
            with torch.no_grad():
                module.network.head.classifier.weight.zero_()
                module.network.head.classifier.bias.fill_(40.0)  # everything "positive", surely


def test_the_best_checkpoint_is_the_one_reloaded(arrays, tmp_path):
    images, y = arrays
    config = tiny_config(monitor="loss").validate()
    network, backbone = build_network(config)
    train, val = validation_split(y, None, 0.25, seed=0)
    spoil = SpoilLaterEpochs()
    result = fit_phase(network, images, y, train, val, Phase("head", 3, 0.01, None), config, tmp_path,
                       backbone.data_config["mean"], backbone.data_config["std"], callbacks=[spoil])
    assert result.epochs_run == 3 and result.best_epoch == 1
    losses = [row["val_loss"] for row in result.history]
    assert losses[0] < min(losses[1:])
    kept = network.state_dict()
    assert all(torch.equal(spoil.first[k], kept[k]) for k in kept)
    saved = torch.load(result.best_path, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[f"network.{k}"], kept[k]) for k in kept)


# ----------------------------------------------------------------------------- saved model


def test_predictions_after_save_and_load_match_exactly(attention_model, dataset, tmp_path):
    result, out = attention_model
    folder, _ = dataset
    paths = sorted((folder / "images").glob("*.png"))[:5]
    odd = tmp_path / "odd.png"
    Image.open(paths[0]).resize((90, 70)).save(odd)
    paths.append(odd)
    before = result.model.predict_paths(paths, with_window_scores=True)
    loaded = FineTunedModel.load(out)
    after = loaded.predict_paths(paths, with_window_scores=True)
    assert np.array_equal(before.proba, after.proba)
    with pytest.raises(InputError, match="a fine-tuned network runs in PyTorch"):
        loaded.predict_paths(paths, engine="openvino")
    assert all(np.array_equal(a, b) for a, b in zip(before.window_scores, after.window_scores))
    assert after.members == {} and after.notes[-1] == f"resized 90x70 to {SIZE}x{SIZE}" and after.notes[0] == ""
    config = json.loads((out / "model.json").read_text())
    assert config["kind"] == "finetuned" and config["head"]["name"] == "finetuned"
    assert config["head"]["instances"] == "feature_map_positions"
    assert config["backbone"]["name"] == "test_efficientnet" and config["image_size"] == SIZE
    assert config["network"]["pool"] == "attention" and config["augment"]["stain_jitter"] is True
    assert 0.0 < config["threshold"] < 1.0 and config["classes"] == ["Normal", "Mitosis"]
    assert {"history.csv", "history.json", "training_curves.png", "network.safetensors"} <= set(config["files"])


def test_a_fine_tuned_model_skips_unreadable_images_only_when_asked(attention_model, dataset, tmp_path):
    result, out = attention_model
    folder, _ = dataset
    paths = sorted((folder / "images").glob("*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(paths[0].read_bytes()[:300])
    missing = tmp_path / "missing.png"
    model = FineTunedModel.load(out)
    with pytest.raises(InputError, match=r"broken\.png: cannot decode image"):
        model.predict_paths([paths[0], broken])
    pred = model.predict_paths([paths[0], broken, paths[1], missing, paths[2]], with_window_scores=True,
                               batch_size=2, skip_bad=True)
    assert pred.paths == paths and list(pred.skipped) == [missing, broken]
    assert "not found" in pred.skipped[missing] and "cannot decode image" in pred.skipped[broken]
    assert len(pred.window_scores) == len(pred.boxes) == len(pred.notes) == 3
    np.testing.assert_allclose(pred.proba, model.predict_paths(paths).proba, rtol=0, atol=1e-6)
    assert model.gives_window_scores  # heatmaps from any fine-tuned network (attention or its CAM)


def test_attention_weights_sum_to_one_and_their_cells_tile_the_image(attention_model, tmp_path):
    result, out = attention_model
    model = FineTunedModel.load(out)
    image = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 130, 3), dtype=np.uint8)).save(image)
    for tta in (False, True):
        pred = model.predict_paths([image], with_window_scores=True, tta=tta)
        weights, boxes = pred.window_scores[0], pred.boxes[0]
        assert weights.shape == (len(boxes),) == (int(np.prod(model.map_shape)),)
        assert np.all(weights >= 0) and weights.sum() == pytest.approx(1.0, abs=1e-6)
        covered = np.zeros((70, 130), dtype=np.int64)
        for x0, y0, x1, y1 in boxes:
            covered[y0:y1, x0:x1] += 1
        assert np.all(covered == 1)  # every pixel in exactly one cell
        assert pred.image_sizes == [(70, 130)]


def test_a_network_file_that_does_not_fit_the_architecture_is_a_model_error(attention_model, tmp_path):
    import shutil

    _, out = attention_model
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = json.loads((copy / "model.json").read_text())
    config["network"]["pool"] = "avg"  # the weights hold an attention head
    (copy / "model.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="network.safetensors"):
        FineTunedModel.load(copy)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("size", [16, 48])
def test_a_size_the_backbone_cannot_take_is_an_input_error(dataset, tmp_path, size):
    folder, labels = dataset
    with pytest.raises(InputError, match=f"--size {size}.*test_efficientnet"):
        finetune(folder, labels, tmp_path / "model", tiny_config(size=size))
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())


def test_a_backbone_without_a_feature_map_is_an_input_error():
    network, _ = build_network(tiny_config(backbone="test_vit").validate())
    with pytest.raises(InputError, match="test_vit"):
        check_input_size(network, "test_vit", SIZE)
    with pytest.raises(InputError, match="cannot be cut"):
        trunk_split(network, 1)


def test_a_labels_file_with_one_class_is_an_input_error(dataset, tmp_path):
    folder, labels = dataset
    one_class = tmp_path / "one.csv"
    rows = list(csv.reader(labels.open()))
    one_class.write_text("\n".join([",".join(rows[0])] + [f"{r[0]},Mitosis" for r in rows[1:]]) + "\n")
    with pytest.raises(InputError, match="two classes"):
        finetune(folder, one_class, tmp_path / "model", tiny_config())
    assert not (tmp_path / "model").exists()


def test_overwrite_into_a_folder_without_a_model_is_refused_before_any_work(dataset, attention_model, tmp_path,
                                                                             monkeypatch):
    """``--overwrite`` replaces a model folder only (``artifacts.check_out_dir``): a folder of other
    files is refused before the images are read, not at save time after training."""
    import shutil

    import mitoscope.finetune.workflow as workflow

    folder, labels = dataset
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("results")

    def no_work(*args, **kwargs):
        raise AssertionError("finetune read the images before refusing the output folder")

    with monkeypatch.context() as patch:
        patch.setattr(workflow, "load_labelled_images", no_work)
        with pytest.raises(InputError, match=r"thesis: .*holds no model.json; --overwrite only replaces a model folder"):
            finetune(folder, labels, precious, tiny_config(), overwrite=True)
    assert [p.name for p in precious.iterdir()] == ["chapter1.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]  # no work folder either
    model = tmp_path / "model"
    shutil.copytree(attention_model[1], model)
    result = finetune(folder, labels, model, tiny_config(epochs_full=0), overwrite=True)  # a model folder: replaced
    assert result.model_dir == model and json.loads((model / "model.json").read_text())["network"]["pool"] == "avg"


def test_mixed_precision_on_cpu_is_refused():
    assert resolve_precision(tiny_config(precision="auto")) == "32-true"
    with pytest.raises(InputError, match="needs a GPU"):
        resolve_precision(tiny_config(precision="16-mixed"))


def test_unavailable_weights_name_the_offline_alternative(monkeypatch):
    import mitoscope.finetune as ft

    def offline(*args, **kwargs):
        raise WeightsUnavailableError("cannot get pretrained weights for 'efficientnet_b4' (LocalEntryNotFoundError)")

    monkeypatch.setattr(ft.network, "create_backbone", offline)
    with pytest.raises(WeightsUnavailableError, match="tf_efficientnet_lite0"):
        build_network(FineTuneConfig().validate())


# ----------------------------------------------------------------------------- augmentation


def test_torch_colour_deconvolution_matches_scikit_image():
    from skimage.color import hed2rgb, rgb2hed

    rgb = np.random.default_rng(2).random((5, 7, 3))
    hed = rgb_to_hed(torch.from_numpy(rgb).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.allclose(hed, rgb2hed(rgb), atol=1e-10)
    back = hed_to_rgb(torch.from_numpy(hed).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.allclose(back, hed2rgb(hed), atol=1e-10)


def test_geometric_augmentation_only_turns_and_flips_each_image():
    images = torch.rand(6, 3, 16, 16)
    config = AugmentConfig(scale=0.0, brightness=0.0, contrast=0.0, stain_jitter=False)
    out = augment_batch(images, config, torch.Generator().manual_seed(0))
    again = augment_batch(images, config, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    for image, result in zip(images, out):
        variants = [dihedral(image[None], k, flip)[0] for k in range(4) for flip in (False, True)]
        assert any(torch.equal(result, v) for v in variants)
    assert not torch.equal(out, images)
    coloured = augment_batch(images, AugmentConfig(), torch.Generator().manual_seed(1))
    assert coloured.shape == images.shape and 0.0 <= coloured.min() and coloured.max() <= 1.0


# ----------------------------------------------------------------------------- CLI end to end


def test_cli_finetune_then_predict_and_evaluate_like_round_one(dataset, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mitoscope import pipeline

    folder, labels = dataset
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    from mitoscope.cli import app
    out = tmp_path / "model"
    args = ["finetune", str(folder), "--labels", str(labels), "--out", str(out), "--backbone", "test_efficientnet",
            "--no-pretrained", "--size", str(SIZE), "--epochs-head", "1", "--epochs-full", "1", "--batch-size", "4",
            "--cv", "2", "--accelerator", "cpu", "--tta"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()  # not a terminal: plain progress lines, Lightning's epochs too
    for done in ("cross-validation folds: 2/2 (100%)", "fold 2 full epochs: 1/1 (100%)", "main head epochs: 1/1 (100%)"):
        assert any(line.startswith(done) for line in lines), result.stderr
    assert "\r" not in result.stderr
    assert list(cwd.iterdir()) == []  # nothing written into the working directory
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # work folder removed
    report = json.loads((out / "metrics.json").read_text())
    keys = {"f1", "auc", "accuracy", "precision", "recall", "balanced_accuracy", "confusion_matrix"}
    assert keys <= set(report) and "2-fold" in report["evaluation"]
    history = list(csv.DictReader((out / "history.csv").open()))
    assert [(r["stage"], r["phase"]) for r in history] == [("main", "head"), ("main", "full")]
    described = json.loads((out / "model.json").read_text())
    assert described["tta"] is True
    assert described["source_images"] == {"bit_depths": [8], "channel_counts": [3], "n_images": 12}
    # 12 images, 1 + 1 epochs from random weights: chance, said in the report, the model and the CLI.
    assert report["warnings"] == described["training"]["warnings"] and report["warnings"]
    assert any("does not rule out chance" in warning for warning in report["warnings"])
    assert [line.removeprefix("warning: ") for line in result.output.splitlines()
            if line.startswith("warning:")] == report["warnings"]

    rows = pipeline.predict(out, [folder / "images"], tmp_path / "pred.csv")
    round_one = pipeline.train(folder, labels, tmp_path / "round1", pipeline.TrainConfig(
        head="pooled", backbone="test_efficientnet", pretrained=False, window=SIZE, cv=0))
    assert rows[0]["Image"] == str(sorted((folder / "images").glob("*.png"))[0])  # the path as given
    round_one_rows = round_one.model.predict([rows[0]["Image"]])
    expected = ["finetuned" if c == "pooled" else c for c in round_one_rows[0]]
    with open(tmp_path / "pred.csv", newline="") as handle:
        assert next(csv.reader(handle)) == expected == ["Image", "Label", "Probability", "Threshold", "finetuned",
                                                        "Note"]
    metrics = pipeline.evaluate(out, folder, labels, tmp_path / "eval")
    assert keys <= set(metrics) and metrics["n_images"] == 12
    assert {"metrics.json", "predictions.csv", "roc.png"} <= {p.name for p in (tmp_path / "eval").iterdir()}

    failed = CliRunner().invoke(app, args)  # the model folder now exists
    assert failed.exit_code == 2 and "not empty" in failed.output


# ----------------------------------------------------------------------------- frozen-trunk cache

GEOMETRY_ONLY = AugmentConfig(scale=0.0, brightness=0.0, contrast=0.0, stain_jitter=False)
TRUNK = ("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3")  # test_efficientnet, --unfreeze 1


@pytest.fixture(scope="module")
def trunk_setup(arrays):
    images, y = arrays
    config = tiny_config(unfreeze=1, tta=True, augment=GEOMETRY_ONLY).validate()
    network, backbone = build_network(config)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    cache = build_trunk_cache(network, trunk_split(network, 1), images, config, mean, std)
    return network, cache, config, mean, std


def normalised(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_the_trunk_is_cut_before_the_first_module_phase_two_trains():
    network, _ = build_network(tiny_config().validate())
    split = trunk_split(network, 1)
    assert split.chain[:split.cut] == TRUNK and split.first_trained == "blocks.4"
    assert trunk_split(network, 2).first_trained == "blocks.3"
    with pytest.raises(InputError, match="first layer"):
        trunk_split(network, 6)  # the 6th group from the end is the stem
    assert resolve_trunk_split(network, tiny_config(unfreeze=1).validate()) == split  # on by default
    assert resolve_trunk_split(network, tiny_config(unfreeze=1, trunk_cache=False).validate()) is None
    assert resolve_trunk_split(network, tiny_config().validate()) is None  # --unfreeze all
    assert resolve_trunk_split(network, tiny_config(unfreeze=6).validate()) is None
    with pytest.raises(InputError, match="--trunk-cache"):
        resolve_trunk_split(network, tiny_config(unfreeze=6, trunk_cache=True).validate())
    with pytest.raises(InputError, match="--unfreeze N"):
        tiny_config(trunk_cache=True).validate()


@pytest.mark.parametrize("flips,rot90,expected", [(True, True, 8), (True, False, 4), (False, True, 4), (False, False, 1)])
def test_cached_views_are_exactly_the_symmetries_the_augmentation_draws(flips, rot90, expected):
    augment = replace(GEOMETRY_ONLY, flips=flips, rot90=rot90)
    views, train, evaluation = plan_trunk_views(augment, expected, tta=False)
    image = torch.rand(1, 3, 8, 8)
    drawn = augment_batch(image.expand(64, -1, -1, -1), augment, torch.Generator().manual_seed(0))
    drawn_set = {tuple(d.flatten().tolist()) for d in drawn}
    cached_set = {tuple(dihedral(image, views[r].turns, views[r].flip).flatten().tolist()) for r in train}
    assert cached_set == drawn_set and len(cached_set) == expected
    assert views[evaluation[0]] == TrunkView(0, False) and evaluation[0] in train  # shared, cached once
    with pytest.raises(InputError, match=f"--trunk-views {expected}"):
        plan_trunk_views(augment, expected + 1, tta=False)


def test_jittered_views_get_one_draw_each_and_validation_the_plain_image():
    views, train, evaluation = plan_trunk_views(AugmentConfig(), 8, tta=False)
    assert len(views) == 9 and len(set(train)) == 8 and views[evaluation[0]] == TrunkView(0, False)
    assert {(views[r].turns, views[r].flip) for r in train} == set(TTA_TRANSFORMS)
    assert all(views[r].draw is not None for r in train)
    views, train, evaluation = plan_trunk_views(AugmentConfig(), 3, tta=True)  # TTA: 8 plain views for validation
    assert len(views) == 11 and sorted(evaluation) == sorted(set(range(11)) - set(train))


def test_cached_trunk_forward_equals_the_whole_network_forward(trunk_setup, arrays):
    network, cache, config, mean, std = trunk_setup
    images, _ = arrays
    assert cache.maps.shape[:2] == (8, len(images)) and cache.nbytes == cache.maps.numel() * 4
    network.eval()
    x = normalised(images, mean, std)
    with torch.no_grad():
        for row, view in enumerate(cache.views):
            cached = network.forward_from_trunk(cache.maps[row], cache.split)
            whole = network(dihedral(x, view.turns, view.flip))
            assert torch.allclose(cached, whole, rtol=1e-5, atol=1e-5), view
    from mitoscope.finetune import predict_trunk_cache

    cached_proba = predict_trunk_cache(network, cache, np.arange(len(images)), torch.device("cpu"))
    whole_proba, _ = forward_images(network, images, mean, std, torch.device("cpu"), tta=True)
    assert np.allclose(cached_proba, whole_proba, atol=1e-6)


def test_jittered_cache_is_reproducible_and_over_budget_is_refused(arrays):
    images, _ = arrays
    config = tiny_config(unfreeze=1, trunk_views=2).validate()  # default augmentation: stain, colour, zoom
    network, backbone = build_network(config)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    split = trunk_split(network, 1)
    cache = build_trunk_cache(network, split, images, config, mean, std)
    again = build_trunk_cache(network, split, images, config, mean, std)
    assert torch.equal(cache.maps, again.maps)
    plain = cache.eval_rows[0]
    jittered = [r for r in cache.train_rows if cache.views[r].turns == 0 and not cache.views[r].flip]
    assert jittered and not torch.allclose(cache.maps[jittered[0]], cache.maps[plain], atol=1e-3)
    with pytest.raises(InputError, match="--trunk-views.*--size"):
        build_trunk_cache(network, split, images, replace(config, trunk_cache_gb=1e-6), mean, std)


def test_training_draws_a_random_cached_view_per_image(trunk_setup):
    from mitoscope.finetune import _TrunkDataset

    _, cache, _, _, _ = trunk_setup
    dataset = _TrunkDataset(cache, cache.train_rows, np.zeros(cache.maps.shape[1]), np.array([3]), True)
    torch.manual_seed(0)
    rows = set()
    for _ in range(60):
        maps, _ = dataset[0]
        rows |= {r for r in cache.train_rows if torch.equal(maps, cache.maps[r, 3])}
    assert rows == set(cache.train_rows)


def test_cached_training_changes_only_the_top_and_the_head(trunk_setup, arrays, tmp_path):
    network, cache, config, mean, std = trunk_setup
    images, y = arrays
    before = {k: v.clone() for k, v in network.state_dict().items()}
    tuner = FineTuner(network, replace(config, tta=False), images, y, None, mean, std, tmp_path).fit(np.arange(len(y)), y)
    assert tuner.trunk_cache_ is not None and tuner.trunk_cache_.split.first_trained == "blocks.4"
    after = tuner.network_.state_dict()
    trunk = [k for k in before if k.startswith(tuple(f"backbone.{name}." for name in TRUNK))]
    top = [k for k in before if k.startswith(("backbone.blocks.4.", "backbone.conv_head", "backbone.bn2"))]
    assert trunk and all(torch.equal(before[k], after[k]) for k in trunk)  # weights and BN statistics
    assert any(not torch.equal(before[k], after[k]) for k in top)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))
    whole = predict_arrays(tuner.network_, images, tuner.val_indices_, mean, std, torch.device("cpu"), tta=False)
    assert np.allclose(tuner.val_proba_, whole, atol=1e-6)  # validated on what the network computes end to end


def test_the_best_checkpoint_is_the_one_reloaded_with_a_trunk_cache(arrays, tmp_path):
    images, y = arrays
    config = tiny_config(unfreeze=1, monitor="loss", augment=GEOMETRY_ONLY).validate()
    network, backbone = build_network(config)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    cache = build_trunk_cache(network, trunk_split(network, 1), images, config, mean, std)
    train, val = validation_split(y, None, 0.25, seed=0)
    spoil = SpoilLaterEpochs()
    result = fit_phase(network, None, y, train, val, Phase("head", 3, 0.01, None), config, tmp_path, mean, std,
                       callbacks=[spoil], trunk=cache)
    assert result.epochs_run == 3 and result.best_epoch == 1
    kept = network.state_dict()
    assert all(torch.equal(spoil.first[k], kept[k]) for k in kept)
    saved = torch.load(result.best_path, map_location="cpu", weights_only=True)["state_dict"]
    assert set(saved) == {f"network.{k}" for k in kept}  # a checkpoint is the whole network


def test_finetune_with_a_trunk_cache_saves_a_whole_network(dataset, tmp_path):
    folder, labels = dataset
    out = tmp_path / "model"
    with pytest.raises(InputError, match="trunk cache would take"):
        finetune(folder, labels, out, tiny_config(unfreeze=1, trunk_cache_gb=1e-6))
    assert not out.exists() and not list(tmp_path.iterdir())  # refused before any work
    result = finetune(folder, labels, out, tiny_config(pool="attention", unfreeze=1, trunk_views=3))
    described = result.model.config["training"]["trunk_cache"]
    assert described["trunk"] == list(TRUNK) and described["n_images"] == 12 and len(described["views"]) == 4
    paths = sorted((folder / "images").glob("*.png"))[:4]
    before = result.model.predict_paths(paths, with_window_scores=True)
    after = FineTunedModel.load(out).predict_paths(paths, with_window_scores=True)
    assert np.array_equal(before.proba, after.proba)
    assert all(np.array_equal(a, b) for a, b in zip(before.window_scores, after.window_scores))


class _Records(list):
    """A logging handler that keeps every record it sees."""

    def __init__(self):
        import logging

        super().__init__()
        self.handler = logging.Handler(logging.DEBUG)
        self.handler.emit = self.append


def test_cli_trunk_flags_and_no_lightning_chatter(dataset, tmp_path, monkeypatch):
    import logging

    from typer.testing import CliRunner

    import mitoscope.lightning_setup as setup

    real_import, imported = setup.import_lightning, []

    def first_import(*args):
        if not imported:  # what the first `import lightning` of a CLI run does: its loggers to INFO
            imported.append(True)
            logging.getLogger("lightning.pytorch").setLevel(logging.INFO)
        return real_import()

    monkeypatch.setattr(setup, "import_lightning", first_import)
    folder, labels = dataset
    from mitoscope.cli import app
    common = ["finetune", str(folder), "--labels", str(labels), "--backbone", "test_efficientnet", "--no-pretrained",
              "--size", str(SIZE), "--epochs-head", "1", "--batch-size", "4", "--accelerator", "cpu", "--unfreeze", "1"]
    records = _Records()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(records.handler)
    try:
        result = CliRunner().invoke(app, common + ["--out", str(tmp_path / "cached"), "--epochs-full", "1",
                                                   "--trunk-views", "2", "--no-stain-jitter"])
    finally:
        lightning_logger.removeHandler(records.handler)
    assert result.exit_code == 0, result.output
    assert [r.getMessage() for r in records if r.levelno < logging.WARNING] == []  # no "GPU available", no tips
    config = json.loads((tmp_path / "cached" / "model.json").read_text())
    assert len(config["training"]["trunk_cache"]["train_rows"]) == 2
    assert config["training"]["settings"]["trunk_views"] == 2
    plain = CliRunner().invoke(app, common + ["--out", str(tmp_path / "plain"), "--epochs-full", "0", "--no-trunk-cache"])
    assert plain.exit_code == 0, plain.output
    assert json.loads((tmp_path / "plain" / "model.json").read_text())["training"]["trunk_cache"] is None
    refused = CliRunner().invoke(app, common + ["--out", str(tmp_path / "no"), "--trunk-cache-gb", "0.000001"])
    assert refused.exit_code == 2 and "--trunk-views" in refused.output


# ----------------------------------------------------------------------------- stability


def _decoy_problem(folder):
    """32 images of 96 px: four grey decoy cells each, and in the Mitosis images one magenta cell."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    (folder / "data").mkdir()
    rows = []
    for i in range(32):
        image = rng.normal(60, 12, (96, 96, 3))
        centres = rng.integers(12, 84, (5, 2))
        for k, (cy, cx) in enumerate(centres):
            colour = [230, 40, 200] if (i % 2 and k == 0) else [170, 170, 170]
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = colour
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / "data" / f"i{i:02d}.png")
        rows.append(f"i{i:02d}.png,{'Mitosis' if i % 2 else 'Normal'}")
    (folder / "labels.csv").write_text("Image,Label\n" + "\n".join(rows) + "\n")
    return folder / "data", folder / "labels.csv", np.arange(32) % 2


def _collapse_signs(folder, batchnorm, gradient_clip):
    """Fine-tunes real ImageNet lite0 with the scene recipe's settings (attention over positions,
    top two stages unfrozen at its peak learning rate) on the decoy problem; returns what looks
    like a collapse: an output that is or stays near constant, or a loss that stops short."""
    from sklearn.metrics import roc_auc_score

    data, labels, y = _decoy_problem(folder)
    config = FineTuneConfig(backbone="tf_efficientnet_lite0", size=96, pool="attention", dropout=0.25, unfreeze=2,
                            epochs_head=2, epochs_full=4, lr_head=1e-3, lr_full=3e-4, batch_size=4, trunk_views=2,
                            accelerator="cpu", seed=0, patience=30, augment=AugmentConfig(stain_jitter=False),
                            batchnorm=batchnorm, gradient_clip=gradient_clip)
    result = finetune(data, labels, folder / "model", config)
    proba = np.asarray(result.model.predict_paths(sorted(data.glob("*.png"))).proba)
    last = [row for row in result.history if row["phase"] == "full"][-1]
    signs = []
    if proba.std() < 0.4:  # a problem this easy ends with answers near 0 and 1 (spread 0.5)
        signs.append(f"output spread {proba.std():.3f}")
    if roc_auc_score(y, proba) < 0.95:
        signs.append(f"AUC {roc_auc_score(y, proba):.3f}")
    if last["train_loss"] > 0.1:
        signs.append(f"final training loss {last['train_loss']:.3f}")
    return signs


def test_the_scene_recipe_learns_one_distinctive_cell_among_decoys_without_collapsing(tmp_path):
    assert _collapse_signs(tmp_path, "frozen", 1.0) == []


def test_the_collapse_check_catches_the_settings_that_collapsed(tmp_path):
    """BatchNorm training on small batches with no clipping (the settings under which the
    large-cell scenes collapsed to a constant output): on the same problem the output stays soft
    and the loss stops short, and the check above says so. Without this the check could pass
    whatever the settings."""
    signs = _collapse_signs(tmp_path, "train", 0.0)
    assert any(s.startswith("output spread") for s in signs) and any(s.startswith("final training") for s in signs)


def _poisoned_run(folder, guard):
    """The scene recipe on the decoy problem, with the death of the final feature map made to
    happen: before the first batch of phase-2 epoch 2 the last BatchNorm's shift is set to -1000, so
    that every unit after its ReLU6 is 0 (what the peak learning rate did to the large-cell
    scenes' seed 2 more slowly, README "Why phase 2 collapsed"). Returns the result, the shift
    at the end, and the spread of the predictions."""
    from lightning.pytorch.callbacks import Callback

    class Poison(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if module.tag.get("phase") == "full" and trainer.current_epoch == 1 and batch_idx == 0:
                module.network.backbone.bn2.bias.data.fill_(-1000.0)

    data, labels, y = _decoy_problem(folder)
    config = FineTuneConfig(backbone="tf_efficientnet_lite0", size=96, pool="attention", dropout=0.25, unfreeze=2,
                            epochs_head=2, epochs_full=4, lr_head=1e-3, lr_full=3e-4, batch_size=4, trunk_views=2,
                            accelerator="cpu", seed=0, patience=30, augment=AugmentConfig(stain_jitter=False),
                            guard=guard)
    result = finetune(data, labels, folder / "model", config, callbacks=[Poison()])
    proba = np.asarray(result.model.predict_paths(sorted(data.glob("*.png"))).proba)
    shift = float(result.model.network.backbone.bn2.bias.min())
    return result, shift, float(proba.std())


def test_the_dead_map_guard_undoes_the_epoch_that_killed_the_final_feature_map(tmp_path):
    result, shift, spread = _poisoned_run(tmp_path, guard=True)
    full = [row for row in result.history if row["phase"] == "full"]
    assert [bool(row["guard"]) for row in full] == [False, True, False, False]
    assert "back to the end of epoch 1" in full[1]["guard"] and full[1]["train_live_share"] < 0.01
    assert full[3]["train_live_share"] > 0.1 * full[0]["train_live_share"]  # alive again after the undo
    assert shift > -100  # the healthy weights came back
    assert spread > 0.3  # and the model learnt the decoy problem
    # The rest of the phase ran at a third of the backbone's rate (the history's lr is the backbone's).
    (tmp_path / "plain").mkdir()
    unguarded, _, _ = _poisoned_run(tmp_path / "plain", guard=False)
    plain = [row for row in unguarded.history if row["phase"] == "full"]
    assert full[2]["lr"] == pytest.approx(plain[2]["lr"] / 3, rel=1e-6)
    warnings = json.loads((tmp_path / "model" / "model.json").read_text())["training"]["warnings"]
    assert any("final feature map was dying" in w for w in warnings)
    with open(tmp_path / "model" / "history.csv", newline="") as handle:
        assert "back to the end of epoch 1" in [row["guard"] for row in csv.DictReader(handle)][3]
    # Without the guard the same poison leaves the map dead and the output constant to the end of
    # the phase (the checkpoint of epoch 1 is what saves that model).
    assert not any(row["guard"] for row in plain)
    assert all(row["train_live_share"] < 0.01 and row["val_logit_sd"] < 1e-3 for row in plain[1:])


def test_restarts_run_the_last_phase_again_from_the_same_start_and_keep_the_best_validation_loss(dataset, tmp_path):
    folder, labels = dataset
    config = tiny_config(epochs_full=2, restarts=3, unfreeze=1)
    result = finetune(folder, labels, tmp_path / "model", config)
    phases = json.loads((tmp_path / "model" / "model.json").read_text())["training"]["phases"]
    assert "restarts" not in phases[0]  # the head phase runs once
    attempts = phases[1]["restarts"]
    assert [a["seed"] for a in attempts] == [0, 1000, 2000]
    scores = [a["best_score"] for a in attempts]
    assert len(set(scores)) == 3  # other seeds, other runs
    kept = int(np.argmin(scores))
    assert [a["kept"] for a in attempts] == [k == kept for k in range(3)]
    assert phases[1]["best_score"] == scores[kept]
    # The history is the kept attempt's: its best validation loss is the kept score.
    full = [row for row in result.history if row["phase"] == "full"]
    assert min(row["val_loss"] for row in full) == pytest.approx(scores[kept])
    once = finetune(folder, labels, tmp_path / "once", tiny_config(epochs_full=2, unfreeze=1))
    first = json.loads((tmp_path / "once" / "model.json").read_text())["training"]["phases"][1]
    assert first["best_score"] == pytest.approx(scores[0])  # attempt 1 is the run without restarts


def test_a_killed_finetune_resumes_where_it_stopped_and_ends_as_an_uninterrupted_run(dataset, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    folder, labels = dataset
    command = [sys.executable, "-m", "mitoscope", "finetune", str(folder), "--labels", str(labels),
               "--backbone", "test_efficientnet", "--no-pretrained", "--size", str(SIZE), "--epochs-head", "2",
               "--epochs-full", "12", "--patience", "100", "--batch-size", "4", "--accelerator", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(command + ["--out", str(tmp_path / "whole")], capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stderr

    out, work = tmp_path / "killed", tmp_path / ".killed.finetune-work"
    process = subprocess.Popen(command + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=env)
    last = work / "final" / "full" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # mid-way through phase 2: the head phase is done, the full one is not
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-phase"
    assert not out.exists() and (work / "final" / "head" / "done.pt").is_file()

    resumed = subprocess.run(command + ["--out", str(out)], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming the interrupted run" in resumed.stderr
    assert "main phase head: done by an earlier run" in resumed.stderr
    assert "main phase full: resuming after epoch" in resumed.stderr
    assert not work.exists()  # removed once the model is saved
    # the same epochs, the same numbers: as if it had never stopped
    assert (out / "history.csv").read_text() == (tmp_path / "whole" / "history.csv").read_text()
    assert json.loads((out / "model.json").read_text())["threshold"] == \
        json.loads((tmp_path / "whole" / "model.json").read_text())["threshold"]

    fresh = subprocess.run(command + ["--out", str(tmp_path / "again"), "--fresh"], capture_output=True, text=True,
                           env=env)
    assert fresh.returncode == 0 and "resuming" not in fresh.stderr


def test_a_phase_resumed_from_its_last_epoch_goes_on_exactly_as_if_it_had_not_stopped(arrays, tmp_path):
    import lightning as L

    images, y = arrays
    config = tiny_config(epochs_full=4, patience=100).validate()
    train, val = validation_split(y, None, config.val_fraction, 0, "test")
    phase = Phase("full", 4, 1e-3, "all", head_lr=1e-3)

    class Stop(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 2:
                raise RuntimeError("stopped")

    def run(work, callbacks=()):
        torch.manual_seed(0)
        network, backbone = build_network(config)
        L.seed_everything(1, verbose=False)
        return fit_phase(network, images, y, train, val, phase, config, work, backbone.data_config["mean"],
                         backbone.data_config["std"], callbacks=callbacks)

    whole = run(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="stopped"):
        run(tmp_path / "stopped", [Stop()])
    assert (tmp_path / "stopped" / "last.ckpt").is_file()
    resumed = run(tmp_path / "stopped")  # the same call: goes on from the end of epoch 2
    assert resumed.history == whole.history  # losses, AUCs, learning rates: identical
    assert resumed.best_epoch == whole.best_epoch
