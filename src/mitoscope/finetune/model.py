"""The saved model: a fine-tuned network with its classes, threshold and preprocessing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..artifacts import ModelDescription
from ..atomic import atomic_path
from ..backbones import create_backbone
from ..errors import InputError, ModelError, one_line
from ..features import pick_device, resize_image
from ..io import present_images, read_image
from ..readahead import ReadAhead
from ..results import Predictions, prediction_rows
from ..progress import Progress
from .inference import forward_images, position_boxes
from .network import FineTuneNetwork, _trainable_state

NETWORK_FILE = "network.safetensors"
HEAD_NAME = "finetuned"


class FineTunedModel(ModelDescription):
    """A fine-tuned network with its classes, threshold and preprocessing; what ``load_model`` returns
    for ``"kind": "finetuned"``."""

    def __init__(self, config: dict[str, Any], network: FineTuneNetwork) -> None:
        self.config = config
        self.network = network.eval()

    @property
    def size(self) -> int:
        return int(self.config["image_size"])

    @property
    def tta(self) -> bool:
        return bool(self.config.get("tta", False))

    @property
    def map_shape(self) -> tuple[int, int]:
        return tuple(self.config["network"]["feature_map"])

    @property
    def gives_window_scores(self) -> bool:
        return True  # attention weights, or the class-activation map of avg pooling

    def _read(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        image = read_image(path, self.read_options)
        return resize_image(image, (self.size, self.size)), image.shape[:2]

    def predict_paths(
        self,
        paths: Sequence[str | Path],
        cache: Any = None,
        progress: Progress | None = None,
        batch_size: int = 16,
        device: str | None = None,
        with_window_scores: bool = False,
        tta: bool | None = None,
        engine: str = "auto",
        skip_bad: bool = False,
    ) -> Any:
        """Predict image files (any size: each is resized to the training size).

        A fine-tuned network runs in PyTorch: ``engine`` may be "auto" or "torch".

        ``cache`` is accepted for the pipeline's sake and unused (no window features here).
        ``tta`` overrides the model's stored test-time-augmentation setting. With
        ``with_window_scores`` every image gets one score per feature-map position
        (attention weights, or the class-activation map for ``avg`` pooling) and ``boxes``
        the cells they stand for. With ``skip_bad`` an image that cannot be read is left out and
        listed in the result's ``skipped`` instead of raising InputError.
        """
        if engine not in ("auto", "torch"):
            raise InputError(f"engine {engine} runs window-feature models; a fine-tuned network runs in PyTorch "
                             "(engine auto or torch)")
        skipped: dict[Path, str] = {}

        def skip(path: Path, error: InputError) -> None:
            if not skip_bad:
                raise error
            skipped[path] = str(error)

        paths, missing = present_images(paths, skip_bad)
        skipped.update(missing)
        use_tta = self.tta if tta is None else bool(tta)
        torch_device = pick_device(device)
        self.network.to(torch_device)
        mean, std = self.config["backbone"]["mean"], self.config["backbone"]["std"]
        proba: list[np.ndarray] = []
        maps: list[np.ndarray] = []
        sizes: list[tuple[int, int]] = []
        batch: list[np.ndarray] = []

        def flush() -> None:
            if batch:
                p, m = forward_images(self.network, np.stack(batch), mean, std, torch_device, use_tta, with_window_scores)
                proba.append(p)
                if m is not None:
                    maps.extend(m)
                batch.clear()

        if progress:
            progress("predicting", 0, len(paths))
        with ThreadPoolExecutor(max_workers=1) as pool:
            reads = ReadAhead(pool, paths, self._read)
            for index in range(len(paths)):
                try:
                    array, image_size = reads.next()
                except InputError as error:
                    skip(paths[index], error)
                    array = None
                    reads.top_up()  # the next image decodes meanwhile, as after a good one
                if array is not None:
                    batch.append(array)
                    sizes.append((int(image_size[0]), int(image_size[1])))
                    if len(batch) >= batch_size:
                        flush()
                if progress:
                    progress("predicting", index + 1, len(paths))
        flush()
        paths = [path for path in paths if path not in skipped]
        self.network.cpu()
        size = self.size
        notes = ["" if s == (size, size) else f"resized {s[1]}x{s[0]} to {size}x{size}" for s in sizes]
        scores = [m.ravel().astype(np.float64) for m in maps] if with_window_scores else None
        return Predictions(
            paths=paths,
            proba=np.concatenate(proba) if proba else np.zeros(0),
            members={},
            notes=notes,
            window_scores=scores,
            boxes=[position_boxes(s, self.map_shape) for s in sizes],
            image_sizes=sizes,
            skipped=skipped,
        )

    def predict(self, paths: Sequence[str | Path], **kwargs: Any) -> list[dict[str, Any]]:
        """One row per image: Image, Label, Probability, finetuned, Note (as the window-feature models)."""
        return prediction_rows(self.predict_paths(paths, **kwargs), self.classes, self.threshold, self.head_name)

    def save(self, out_dir: str | Path, extra_files: Callable[[Path], list[str]] | None = None,
             overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        config = {k: v for k, v in self.config.items() if not k.startswith("_")}

        def write(tmp: Path) -> list[str]:
            with atomic_path(tmp / NETWORK_FILE) as target:
                save_file(_trainable_state(self.network), str(target))
            names = [NETWORK_FILE]
            if extra_files:
                names += extra_files(tmp)
            return names

        return self._save(out_dir, config, write, overwrite)

    @classmethod
    def from_card(cls, card: Any) -> "FineTunedModel":
        """:meth:`load` from a model's :class:`mitoscope.artifacts.ModelCard` (``model.json`` already read;
        its files are hashed here, once per card)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        model_dir = card.path
        card.verify_files()
        config = card.settings()
        path = model_dir / "model.json"
        if card.kind != "finetuned":
            raise ModelError(f"{path}: model kind {card.kind!r} is not a fine-tuned network")
        for key in ("backbone", "network", "image_size", "read"):
            if key not in config:
                raise ModelError(f"{path}: incomplete fine-tuned model description: key {key!r} is missing")
        net = config["network"]
        file = model_dir / net.get("file", NETWORK_FILE)
        name = config["backbone"]["name"]
        try:
            backbone = create_backbone(name, pretrained=False)
            network = FineTuneNetwork(backbone.model, net["pool"], float(net.get("dropout", 0.0)),
                                      int(net.get("attention_hidden", 256)), int(net.get("attention_dim", 128)))
        except (InputError, KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: cannot rebuild the network {name!r} ({type(exc).__name__}: {exc})") from None
        try:
            state = load_file(str(file))
            network.load_state_dict(state, strict=True)
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{file}: cannot read the network weights ({exc})") from None
        except RuntimeError as exc:
            first = one_line(exc, 240)
            raise ModelError(
                f"{file}: weights do not fit {name} with {net['pool']} pooling (a different architecture?): {first}"
            ) from None
        model = cls(config, network.eval())
        model.card = card
        return model
