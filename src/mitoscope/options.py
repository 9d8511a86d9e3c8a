"""What the commands can be told, and the checks of it that need no heavy library.

Importing PyTorch, OpenVINO or scikit-learn takes seconds on a small CPU. The command line
checks its options here first (choices, files and folders, :class:`TrainConfig`), so that a
typo or a missing folder fails at once with a one-line error; the library's configurations
(``TrainConfig``, ``mitoscope.distributed.ExtractConfig``,
``mitoscope.finetune.FineTuneConfig``) use the same checks and choices, so the messages are
the same from Python. Nothing here imports more than numpy.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .array_features import EXTRACTION_MODES
from .defaults import DEFAULT_BACKBONE
from .engines import ENGINES, EXPORTED_ENGINES
from .errors import InputError
# The --head choices, the default first: the heads registry's names (it imports no PyTorch or scikit-learn).
from .heads.registry import HEAD_NAMES
from .io import DEFAULT_MAX_PIXELS, ReadOptions
from .tiling import validate_tiling

__all__ = ["ACCELERATORS", "BALANCES", "BATCHNORMS", "HEAD_NAMES", "MONITORS", "POOLS", "PRECISIONS", "SCHEDULES", "TrainConfig",
           "check_choice", "check_file"]


# Fine-tuning (mitoscope.finetune) and Lightning runs (finetune, extract).
POOLS = ("avg", "attention")
MONITORS = {"loss": "min", "auc": "max"}  # validation metric -> the direction that is better
BALANCES = ("pos_weight", "sampler", "none")
# onecycle: each phase warms up over its first steps, then anneals (cosine) to ~0; fresh Adam
# updates at full rate on pretrained layers can wreck them in a few steps.
SCHEDULES = ("onecycle", "constant")
BATCHNORMS = ("frozen", "train")  # of the unfrozen layers: frozen keeps their ImageNet statistics
PRECISIONS = ("auto", "32", "32-true", "16-mixed", "bf16-mixed")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


def check_choice(option: str, value: Any, choices: Collection[Any]) -> None:
    """Refuse ``value`` of ``option`` (e.g. ``--head``) unless it is one of ``choices``."""
    if value not in choices:
        raise InputError(f"unknown {option} {value!r}: expected one of {', '.join(str(c) for c in choices)}")


def check_file(path: str | Path | None, what: str) -> None:
    """Refuse a ``path`` (when one is given) that is not an existing file; ``what`` names it."""
    if path is not None and not Path(path).is_file():
        raise InputError(f"{path}: {what} not found")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `mitoscope train` can be told; validated before any work starts."""

    head: str = "ensemble"
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    pretrained: bool = True
    window: int = 224
    overlap: float = 0.5
    extraction: str = "windows"
    engine: str = "auto"
    channels: tuple[int, int, int] | None = None
    cv: int = 5
    seed: int = 0
    positive: str | None = None
    batch_size: int = 32
    device: str | None = None
    head_params: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> "TrainConfig":
        """Every check but the head's parameters (they need the head classes: see
        :func:`mitoscope.pipeline.build_head`, which ``train`` calls before any work)."""
        check_choice("--head", self.head, HEAD_NAMES)
        validate_tiling(self.window, self.overlap)
        check_choice("--extraction", self.extraction, EXTRACTION_MODES)
        check_choice("--engine", self.engine, ENGINES)
        if self.engine in EXPORTED_ENGINES and self.device and not self.device.startswith("cpu"):
            raise InputError(f"--engine {self.engine} runs on the CPU only, but --device is {self.device}; "
                             "use --engine torch (or auto)")
        if self.cv != 0 and self.cv < 2:
            raise InputError(f"--cv must be 0 (no cross-validation) or at least 2, got {self.cv}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        check_file(self.weights, "weights file")
        _ = self.read_options  # validates channels and max_pixels
        return self

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions(channels=self.channels, max_pixels=self.max_pixels)
