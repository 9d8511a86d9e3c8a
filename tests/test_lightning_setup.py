"""The Lightning setup shared by `extract` and `finetune`: the same options mean the same machine."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

from mitoscope.distributed import ExtractConfig
from mitoscope.errors import InputError
from mitoscope.finetune import FineTuneConfig
from mitoscope.lightning_setup import (check_accelerator, loader_workers, make_trainer, on_gpu, parse_devices,
                                       quiet_lightning, resolve_precision, strategy)

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
CONFIGS = [ExtractConfig, FineTuneConfig]


@pytest.mark.parametrize("make", CONFIGS)
@pytest.mark.parametrize("devices, num_nodes, expected", [
    (1, 1, "auto"), (2, 1, "ddp"), (-1, 1, "ddp"), ("auto", 1, "auto"), ("0,", 1, "auto"), ("0,1", 1, "ddp"),
    (1, 2, "ddp"),
])
def test_ddp_for_more_than_one_device_or_node_in_both_commands(make, devices, num_nodes, expected):
    config = make(devices=devices, num_nodes=num_nodes)
    assert strategy(config) == expected
    if make is ExtractConfig:
        assert config.strategy == expected


@pytest.mark.parametrize("make", CONFIGS)
def test_cpu_runs_load_in_the_main_process_unless_told(make):
    assert on_gpu(make(accelerator="cpu")) is False
    assert loader_workers(make(accelerator="cpu")) == 0
    assert loader_workers(make(accelerator="cpu", workers=3)) == 3
    auto = make(accelerator="auto")
    assert on_gpu(auto) is torch.cuda.is_available()
    expected = min(4, max(0, (os.cpu_count() or 1) - 1)) if torch.cuda.is_available() else 0
    assert loader_workers(auto) == expected


def test_devices_take_lightnings_forms_and_refuse_the_rest():
    assert parse_devices(2) == 2
    assert parse_devices("3") == 3
    assert parse_devices("-1") == -1
    assert parse_devices("auto") == "auto"
    assert parse_devices("0, 1") == "0,1"
    assert parse_devices("1") == 1
    for bad in (0, -2, "two", "0,x", ""):
        with pytest.raises(InputError, match="--devices expects"):
            parse_devices(bad)
    assert ExtractConfig(devices="2").validate().devices == FineTuneConfig(devices="2").validate().devices == 2


def test_precision_is_32_bit_on_the_cpu_and_a_mixed_one_needs_a_gpu():
    assert resolve_precision(FineTuneConfig(accelerator="cpu", precision="auto")) == "32-true"
    assert resolve_precision(FineTuneConfig(accelerator="cpu", precision="32")) == "32-true"
    with pytest.raises(InputError, match="--precision bf16-mixed needs a GPU"):
        resolve_precision(FineTuneConfig(accelerator="cpu", precision="bf16-mixed"))


@NO_GPU
@pytest.mark.parametrize("make", CONFIGS)
def test_a_gpu_asked_for_where_there_is_none_is_refused_alike(make):
    with pytest.raises(InputError, match=r"^unknown --accelerator 'tpu'"):
        check_accelerator("tpu")
    with pytest.raises(InputError) as refused:
        make(accelerator="gpu").validate()
    assert str(refused.value) == "--accelerator gpu: no CUDA GPU is visible here; use --accelerator cpu"


@NO_GPU
def test_a_setting_lightning_refuses_is_a_one_line_input_error(tmp_path):
    config = ExtractConfig(accelerator="cuda", devices=2)  # not validated: Lightning itself refuses it
    with pytest.raises(InputError) as refused:
        make_trainer(config, "extract", "32-true", False, [], tmp_path)
    message = str(refused.value)
    assert message.startswith("cannot extract with --accelerator cuda --devices 2 --num-nodes 1 here: ")
    assert "\n" not in message and len(message) < 400


def test_a_trainer_has_the_settings_asked_for_and_no_logger(tmp_path):
    with quiet_lightning(True):
        trainer = make_trainer(FineTuneConfig(accelerator="cpu"), "train", "32-true", False, [], tmp_path,
                               max_epochs=3, enable_checkpointing=False)
    assert trainer.max_epochs == 3
    assert trainer.logger is None
    assert trainer.num_devices == 1 and trainer.num_nodes == 1
    assert trainer.checkpoint_callback is None
    assert trainer.default_root_dir == str(tmp_path)


def test_quiet_lightning_lowers_its_loggers_and_hides_the_hints_then_restores_them():
    names = ("lightning.pytorch", "lightning.fabric")
    before = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_lightning(True, ignore=(r".*my own hint.*",)):
            assert all(logging.getLogger(name).level == logging.WARNING for name in names)
            warnings.warn("The dataloader does not have many workers which may be a bottleneck.")
            warnings.warn("this is my own hint")
            warnings.warn("something else")
    assert [str(w.message) for w in caught] == ["something else"]
    assert {name: logging.getLogger(name).level for name in names} == before
