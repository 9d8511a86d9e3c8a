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
    # "finetuned" (the default, by a rule fixed before its test runs; README): the network
    # self-trained on a linear teacher's pseudo-labels, on augmented crops (mitoscope.cells.training);
    # "linear": that linear multiple-instance model on few features of the frozen network alone
    # (mitoscope.cells.bootstrap), the default before: faster to train.
    scorer: str = "finetuned"
    input_size: int = 96
    # The fine-tuned scorer trains the last this many stages of the backbone (0: all of it).
    trained_stages: int = 0
    # The fine-tuned scorer scores a cell as the mean of its logits over this many flipped/turned
    # views (mitoscope.cells.views.VIEWS).
    views: int = 8
    epochs: int = 6
    # The fine-tuned scorer learns this many of the teacher's best cells of each Mitosis image as
    # mitotic (a Mitosis image may hold several mitoses; the others of its cells get no label).
    positives_per_image: int = 1
    # The fine-tuned scorer: this share of each batch's negatives comes from the hardest tenth of
    # the known negatives, as the network being trained scores them at the start of each epoch
    # after the first (0: every negative drawn alike).
    hard_negatives: float = 0.0
    # The fine-tuned scorer: an epoch is one pass over the known negatives, but at least this many
    # steps (0: no floor); with a few cells per image a pass is only a handful of steps. Adopted by
    # a rule fixed before its run (benchmarks/cells_inner_settings.py; README).
    min_steps_per_epoch: int = 50
    positives_per_step: int = 16
    negatives_per_step: int = 48
    learning_rate: float = 1e-3
    # The learning rate of the network's trained layers (learning_rate: its head's).
    top_learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    # H&E stain jitter in the fine-tuned scorer's augmentation (histology; off for fluorescence).
    stain_jitter: bool = False
    dropout: float = 0.2
    validation_fraction: float = 0.2
    # The threshold and reported metrics from the out-of-fold best-cell scores of a k-fold
    # cross-validation of the whole training over every training image, then one training on all
    # of them (0: a held-out share of validation_fraction instead). Unset: 5 for the linear scorer,
    # 3 for the fine-tuned one, which trains the whole network once per fold (training time, README).
    cv_folds: int | None = None
    # The fine-tuned scorer under cv_folds: how the out-of-fold scores (and so the threshold) are
    # carried to the final network, whose logits need not sit on the fold networks' scale. "none":
    # as they are; "standardized": each network's best-cell logits are z-scored by the median and
    # interquartile range of its logits on the cells of the Mitosis images it trained on (cells it
    # never learned a label for, alike for every network) and put on the final network's scale.
    oof_transfer: str = "none"
    # The fine-tuned scorer under cv_folds: the final network becomes the mean of its own weights
    # and the fold networks' (all trained from the same start; BatchNorm frozen alike), a weight
    # average that costs nothing at prediction (False: the network trained on all images alone).
    # Unset: on for the fine-tuned scorer under cv_folds (adopted by a rule fixed before its runs:
    # benchmarks/cells_fold_soup.py, README), off otherwise.
    fold_soup: bool | None = None
    # The fine-tuned scorer under cv_folds: who names the final network's pseudo-positives.
    # "teacher": the linear teacher on frozen features (above). "cotrained": that teacher refitted
    # on all images with one more feature per cell, its out-of-fold logit under the fold network
    # that did not train on its image (z-scored by that network's median and interquartile range
    # over its held-out cells): the bag constraint of the teacher and what the networks learnt.
    final_picks: str = "teacher"
    # The linear scorer: each cell's frozen features averaged over this many views, in training
    # and in prediction alike (chosen by cross-validation on training scenes: README, Results).
    feature_views: int = 4
    # The linear scorer's frozen features: "auto" computes them through an exported engine
    # (OpenVINO f32, else ONNX Runtime; 2-3x faster on a CPU) when one matches PyTorch, else
    # in PyTorch; "torch" always in PyTorch.
    feature_engine: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.cv_folds is None:
            object.__setattr__(self, "cv_folds", 3 if self.scorer == "finetuned" else 5)
        if self.fold_soup is None:
            object.__setattr__(self, "fold_soup", self.scorer == "finetuned" and isinstance(self.cv_folds, int)
                               and self.cv_folds >= 2)
        checks = [("input_size", self.input_size >= 32, "at least 32"), ("views", 1 <= self.views <= 8, "1 to 8"),
                  ("feature_views", 1 <= self.feature_views <= 8, "1 to 8"), ("epochs", self.epochs >= 1, "at least 1"),
                  ("positives_per_image", self.positives_per_image >= 1, "at least 1"),
                  ("hard_negatives", isinstance(self.hard_negatives, (int, float))
                   and not isinstance(self.hard_negatives, bool) and 0 <= self.hard_negatives <= 1, "in [0, 1]"),
                  ("min_steps_per_epoch", isinstance(self.min_steps_per_epoch, int)
                   and not isinstance(self.min_steps_per_epoch, bool) and self.min_steps_per_epoch >= 0,
                   "an integer >= 0"),
                  ("positives_per_step", self.positives_per_step >= 1, "at least 1"),
                  ("negatives_per_step", self.negatives_per_step >= 1, "at least 1"),
                  ("learning_rate", self.learning_rate > 0, "positive"),
                  ("top_learning_rate", self.top_learning_rate >= 0, "zero or positive"),
                  ("weight_decay", self.weight_decay >= 0, "zero or positive"),
                  ("validation_fraction", 0 <= self.validation_fraction < 0.5, "in [0, 0.5)"),
                  ("cv_folds", isinstance(self.cv_folds, int) and (self.cv_folds == 0 or self.cv_folds >= 2),
                   "0 or at least 2"),
                  ("trained_stages", self.trained_stages >= 0, "0 (all) or more"),
                  ("scorer", self.scorer in ("linear", "finetuned"), "linear or finetuned"),
                  ("feature_engine", self.feature_engine in ("auto", "torch"), "auto or torch"),
                  ("oof_transfer", self.oof_transfer in ("none", "standardized"), "none or standardized"),
                  ("stain_jitter", isinstance(self.stain_jitter, bool), "true or false"),
                  ("fold_soup", isinstance(self.fold_soup, bool), "true or false"),
                  ("final_picks", self.final_picks in ("teacher", "cotrained"), "teacher or cotrained")]
        for name, ok, expected in checks:
            if not ok:
                raise InputError(f"cells setting {name} must be {expected}, got {getattr(self, name)!r}")
        if self.fold_soup and (self.scorer != "finetuned" or self.cv_folds < 2):
            raise InputError(f"cells setting fold_soup averages the fine-tuned scorer's cross-validation networks: it "
                             f"needs scorer finetuned and cv_folds of at least 2, got scorer {self.scorer!r} and "
                             f"cv_folds {self.cv_folds}")
        if self.final_picks == "cotrained" and (self.scorer != "finetuned" or self.cv_folds < 2):
            raise InputError(f"cells setting final_picks=cotrained uses the out-of-fold scores of the fine-tuned "
                             f"scorer's cross-validation networks: it needs scorer finetuned and cv_folds of at least "
                             f"2, got scorer {self.scorer!r} and cv_folds {self.cv_folds}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
