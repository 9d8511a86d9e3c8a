"""Shared fixtures: real data location, a tiny random-weight backbone for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_TOOLS = Path(__file__).resolve().parents[2] / "shared" / "tools"


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
    """Caches (features, ONNX exports) of the tests go to a temporary folder, never ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "jurkat-cells" / "labels.csv").is_file():
        pytest.skip("real data ../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def compose_scenes_tool() -> Path:
    tool = SHARED_TOOLS / "compose_scenes.py"
    if not tool.is_file() or not (SHARED_DATA / "jurkat-cells").is_dir():
        pytest.skip("../shared/tools/compose_scenes.py or the Jurkat cells are absent")
    return tool


@pytest.fixture(scope="session")
def tiny_backbone():
    """A tiny timm model with random weights (asked for explicitly): fast features for pipeline tests."""
    from mitoscope.backbones import create_backbone

    return create_backbone("test_efficientnet", pretrained=False)


@pytest.fixture(scope="session")
def lite0_backbone():
    """The default backbone with its real, embedded ImageNet weights."""
    from mitoscope.backbones import create_backbone

    return create_backbone()


@pytest.fixture(scope="session")
def cell_model(tmp_path_factory):
    """(bag folder, red-disc centre per image, TrainResult) of a cell model (linear scorer, tiny backbone)
    trained on bags of discs where a Mitosis image holds one red disc (tests/bags.py)."""
    from bags import train_cell_model, write_bags

    folder, targets = write_bags(tmp_path_factory.mktemp("bags"))
    return folder, targets, train_cell_model(folder, tmp_path_factory.mktemp("models") / "cells-linear")
