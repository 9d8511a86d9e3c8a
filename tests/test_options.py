"""Option choices and the checks the command line runs before any heavy library loads."""

from __future__ import annotations

import pytest

from mitoscope.errors import InputError
from mitoscope.options import HEAD_NAMES, TrainConfig, check_choice, check_file


def test_head_names_are_the_heads_registry():
    from mitoscope.heads import HEADS

    assert sorted(HEAD_NAMES) == sorted(HEADS)


def test_check_choice_names_the_option_the_value_and_the_choices():
    check_choice("--pool", "avg", ("avg", "attention"))
    with pytest.raises(InputError) as caught:
        check_choice("--pool", "max", ("avg", "attention"))
    assert str(caught.value) == "unknown --pool 'max': expected one of avg, attention"


def test_check_file_names_the_path_and_what_it_should_be(tmp_path):
    check_file(None, "weights file")
    (tmp_path / "w.pth").write_bytes(b"x")
    check_file(tmp_path / "w.pth", "weights file")
    with pytest.raises(InputError, match=r"nothere\.pth: weights file not found"):
        check_file(tmp_path / "nothere.pth", "weights file")
    with pytest.raises(InputError, match="weights file not found"):
        check_file(tmp_path, "weights file")  # a folder is not a file


@pytest.mark.parametrize("changes, message", [
    ({"head": "attn"}, "unknown --head 'attn': expected one of ensemble, dense, forest, pooled, attention"),
    ({"extraction": "tiles"}, "unknown --extraction 'tiles'"),
    ({"engine": "onnx"}, "unknown --engine 'onnx'"),
    ({"engine": "openvino", "device": "cuda:0"}, "runs on the CPU only"),
    ({"cv": 1}, "--cv must be 0"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"window": 7}, "window"),
    ({"channels": (0, 1, -1)}, "channels"),
])
def test_train_config_refuses_bad_options(changes, message):
    assert TrainConfig().validate() == TrainConfig()
    with pytest.raises(InputError, match=message):
        TrainConfig(**changes).validate()
