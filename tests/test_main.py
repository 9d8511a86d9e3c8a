"""`python -m mitoscope`, and a typo or a missing path refused before any heavy library loads.

Importing PyTorch, OpenVINO or scikit-learn takes seconds on a small CPU: the command line
checks its options first. Each case runs the command in a new process and asserts that it
failed with one `error:` line and exit code 2 while none of those libraries was imported
(the time it takes is measured by ``benchmarks/startup.py``, not here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blobs import write_blobs

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "torchvision", "timm", "lightning", "sklearn", "skops", "openvino", "onnxruntime", "onnx",
         "matplotlib", "scipy")

# Runs the command line as `mitoscope ARGS...` would, then reports its exit code and which heavy
# libraries had been imported.
WRAPPER = f"""
import json, sys
sys.argv = ["mitoscope", *sys.argv[1:]]
code = None
try:
    from mitoscope.cli import main
    main()
except SystemExit as exit:
    code = exit.code
print(json.dumps({{"code": code, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""


def environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def run_cli(*args: object) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", WRAPPER, *(str(a) for a in args)], capture_output=True, text=True,
                          env=environment(), timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("main-data")
    write_blobs(folder, 2)
    return folder


def cases(data: Path, tmp: Path) -> dict[str, tuple[list[object], list[str]]]:
    """name -> (arguments, what the error line must name)."""
    labels = data / "labels.csv"
    train = ["train", data, "--labels", labels, "--out", tmp / "model"]
    model = tmp / "model-that-is-not-there"
    return {
        "train --head": (train + ["--head", "attn"], ["unknown --head 'attn'", "attention"]),
        "train --engine": (train + ["--engine", "tensorrt"], ["unknown --engine 'tensorrt'", "openvino"]),
        "train --extraction": (train + ["--extraction", "tiles"], ["unknown --extraction 'tiles'", "fullconv"]),
        "train --cv": (train + ["--cv", 1], ["--cv"]),
        "train --window": (train + ["--window", 4], ["window"]),
        "train --channels": (train + ["--channels", "1,0"], ["channels"]),
        "train missing folder": (["train", tmp / "nowhere", "--out", tmp / "model"], ["nowhere", "data folder"]),
        "train missing labels": (["train", data, "--labels", tmp / "nolabels.csv", "--out", tmp / "model"],
                                 ["nolabels.csv", "labels file"]),
        "train missing weights": (train + ["--weights", tmp / "w.safetensors"], ["w.safetensors", "weights file"]),
        "predict missing model": (["predict", model, data / "images"], [model.name, "not a model folder"]),
        "predict --engine": (["predict", model, data / "images", "--engine", "cuda"], ["unknown --engine 'cuda'"]),
        "predict missing image": ([*["predict", tmp / "m"], tmp / "ghost.png"], ["ghost.png"]),
        "evaluate missing model": (["evaluate", model, data, "--labels", labels, "--out", tmp / "r"], [model.name]),
        "evaluate missing labels": (["evaluate", tmp / "m", data, "--labels", tmp / "no.csv", "--out", tmp / "r"],
                                    ["no.csv"]),
        "localize missing boxes": (["localize", tmp / "m", data, "--boxes", tmp / "boxes.csv", "--out", tmp / "r"],
                                   ["boxes.csv", "boxes file"]),
        "extract --head": (["extract", data, "--labels", labels, "--head", "svm"], ["unknown --head 'svm'"]),
        "extract missing folder": (["extract", tmp / "nowhere"], ["nowhere"]),
        "finetune --pool": (["finetune", data, "--labels", labels, "--out", tmp / "ft", "--pool", "max"],
                            ["unknown --pool 'max'", "attention"]),
        "finetune --precision": (["finetune", data, "--labels", labels, "--out", tmp / "ft", "--precision", "8"],
                                 ["unknown --precision '8'"]),
        "finetune missing pretrain labels": (["finetune", data, "--labels", labels, "--out", tmp / "ft",
                                              "--pretrain-data", data, "--pretrain-labels", tmp / "pre.csv"],
                                             ["pre.csv"]),
        "demo --head": (["demo", "--out", tmp / "demo", "--head", "attn"], ["unknown --head 'attn'"]),
    }


CASES = list(cases(Path("d"), Path("t")))


@pytest.mark.parametrize("case", CASES)
def test_bad_arguments_fail_before_any_heavy_library_loads(case, data, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text(json.dumps(  # enough of a model to pass the early check
        {"format_version": 1, "kind": "window-features", "classes": ["Normal", "Mitosis"], "positive": "Mitosis",
         "threshold": 0.5, "head": {"name": "pooled"}, "files": {}}))
    args, names = cases(data, tmp_path)[case]
    report, stderr = run_cli(*args)
    assert report == {"code": 2, "heavy": []}, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for name in names:
        assert name in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "model").exists() and not (tmp_path / "demo").exists()


def test_python_dash_m_mitoscope_runs_the_command_line(data, tmp_path):
    shown = subprocess.run([sys.executable, "-m", "mitoscope", "--help"], capture_output=True, text=True,
                           env=environment(), timeout=120)
    assert shown.returncode == 0, shown.stderr
    for command in ("train", "predict", "evaluate", "localize", "finetune", "extract", "demo"):
        assert command in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "mitoscope", "train", data, "--out", tmp_path / "m", "--head",
                              "attn"], capture_output=True, text=True, env=environment(), timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: unknown --head 'attn'"), refused.stderr
