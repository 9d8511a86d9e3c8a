"""How a cell model is trained: :class:`CellTrainConfig`, checked when made (imports no PyTorch,
so that the command line refuses a bad setting at once)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError


@dataclass(frozen=True)
class CellTrainConfig:
    """How the instance network is trained (saved in ``model.json``)."""

    backbone: str = "tf_efficientnet_lite0"
    # "linear": a linear multiple-instance model on few features of the frozen network
    # (mitoscope.cells.bootstrap); "finetuned": the network's top stages fine-tuned (see README).
    scorer: str = "linear"
    input_size: int = 96
    trained_stages: int = 2
    views: int = 4
    epochs: int = 12
    bags_per_step: int = 8
    learning_rate: float = 1e-3
    top_learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    negative_weight: float = 1.0
    # The pseudo-positive cell of each Mitosis image (mitoscope.cells.bootstrap) pulled towards 1,
    # and re-chosen by the network itself every refresh_every epochs (0: kept from the start).
    positive_weight: float = 1.0
    refresh_every: int = 4
    dropout: float = 0.2
    validation_fraction: float = 0.2
    # The linear scorer: its threshold and reported metrics from the out-of-fold best-cell scores of
    # a k-fold cross-validation over every training image, then one fit on all of them (0: a held-out
    # share of validation_fraction instead, as the fine-tuned scorer does).
    cv_folds: int = 5
    # "last": the network after the last epoch (a held-out share of a hundred images is too few to
    # pick an epoch by); "val_loss": the epoch of least held-out loss.
    keep: str = "last"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [("input_size", self.input_size >= 32, "at least 32"), ("views", 1 <= self.views <= 8, "1 to 8"),
                  ("epochs", self.epochs >= 1, "at least 1"), ("bags_per_step", self.bags_per_step >= 1, "at least 1"),
                  ("learning_rate", self.learning_rate > 0, "positive"),
                  ("top_learning_rate", self.top_learning_rate >= 0, "zero or positive"),
                  ("validation_fraction", 0 <= self.validation_fraction < 0.5, "in [0, 0.5)"),
                  ("cv_folds", self.cv_folds == 0 or self.cv_folds >= 2, "0 or at least 2"),
                  ("trained_stages", self.trained_stages >= 1, "at least 1"),
                  ("keep", self.keep in ("last", "val_loss"), "last or val_loss"),
                  ("scorer", self.scorer in ("linear", "finetuned"), "linear or finetuned")]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"cells setting {name} must be {expected}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
