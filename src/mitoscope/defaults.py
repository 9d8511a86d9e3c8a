"""Default names shared by the library and the command line (no heavy imports here, so that
the CLI can build its options without loading torch)."""

import os
from pathlib import Path

DEFAULT_BACKBONE = "tf_efficientnet_lite0"  # window features; its ImageNet weights ship with mitoscope
DEFAULT_FINETUNE_BACKBONE = "efficientnet_b4"  # the write-up's Round 2 (weights online or --weights)
OFFLINE_ALTERNATIVE = "tf_efficientnet_lite0"  # what to fine-tune offline instead


def cache_home() -> Path:
    """mitoscope's cache root: ``$XDG_CACHE_HOME/mitoscope`` (default ``~/.cache/mitoscope``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mitoscope"
