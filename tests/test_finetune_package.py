"""The layout of ``mitoscope.finetune``: one job per module, none over 600 lines, Lightning loaded
only when training runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mitoscope.finetune

PACKAGE = Path(mitoscope.finetune.__file__).parent
MAX_LINES = 600


def test_no_finetune_module_exceeds_600_lines():
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) > 5  # a package of modules, not one file
    lengths = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in modules}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}, lengths


def test_importing_finetune_does_not_import_lightning():
    code = ("import sys, mitoscope.finetune as ft; ft.FineTuneConfig().validate(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))")
    src = str(PACKAGE.parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
