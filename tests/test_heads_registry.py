"""The heads package: its registry and traits, what imports what, and adding a head.

The registry (``mitoscope.heads.registry``) is the one list of heads: the command line's
choices, the fixed-grid heads, what window scores mean, and making, saving, loading and serving
a head all come from it. Importing it (or a head module, for serving) must not import PyTorch or
scikit-learn; training must not import serving; a new head is one file and one registry line,
as ``docs/architecture.md`` shows, and that example is run here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mitoscope.heads
from mitoscope import options
from mitoscope.errors import InputError
from mitoscope.heads import registry

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
HEAVY = ("torch", "sklearn", "skops", "scipy", "timm", "lightning")
MAX_LINES = 600


def run_python(script: str) -> dict:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_registry_is_the_heads_and_their_traits():
    names = [t.name for t in registry.REGISTRY]
    assert names == ["dense", "forest", "ensemble", "pooled", "attention"]
    assert options.HEAD_NAMES == registry.HEAD_NAMES == (registry.DEFAULT_HEAD, *(n for n in names if n != "ensemble"))
    assert sorted(options.HEAD_NAMES) == sorted(mitoscope.heads.HEADS)
    assert registry.FIXED_GRID_HEADS == {"dense", "forest", "ensemble"}
    assert registry.WINDOW_SCORING_HEADS == ("attention", "pooled")
    assert registry.window_score_label("pooled") == "window score (logistic-regression logit)"
    assert registry.window_score_label("attention") == "attention weight (higher = more mitotic)"
    assert registry.window_score_label("finetuned") == "attention weight (higher = more mitotic)"  # --pool attention
    for traits in registry.REGISTRY:
        cls = mitoscope.heads.HEADS[traits.name]
        assert cls.__name__ == traits.class_name and cls is getattr(mitoscope.heads, traits.class_name)
        assert hasattr(cls, "window_scores") == (traits.window_scores is not None)


def test_the_command_line_lists_the_registrys_heads():
    from mitoscope import cli, heatmaps

    assert cli.HEAD_HELP.startswith("cells | ensemble | dense | forest | pooled | attention (cells, the default")
    assert cli.FIXED_GRID_NAMES == ["ensemble", "dense", "forest"]
    assert cli.SCORING_MODELS == "cells, attention, pooled; finetune --pool attention"
    assert heatmaps.WINDOW_SCORE_HEADS == ("cells (scores each cell), attention, pooled, or a fine-tuned model trained "
                                           "with --pool attention")


def test_every_name_of_the_old_heads_module_is_still_there():
    from mitoscope.heads import DenseHead, _GatedAttentionNetwork, _Head, _TorchHead
    from mitoscope.heads.attention import GatedAttentionNetwork

    old_names = ["HEADS", "AttentionHead", "DenseHead", "EnsembleHead", "ForestHead", "PooledHead", "_check_bags",
                 "_check_labels", "_concat_bags", "_DenseNetwork", "_GatedAttentionNetwork", "_Head", "_inner_split",
                 "_class_weights", "_mean_std", "_pad", "_TorchHead", "combine_ensemble", "forest_arrays", "load_head",
                 "make_head", "pooled_arrays", "save_head"]
    assert [name for name in old_names if getattr(mitoscope.heads, name, None) is None] == []

    assert _GatedAttentionNetwork is GatedAttentionNetwork and issubclass(DenseHead, _TorchHead)
    assert issubclass(_TorchHead, _Head) and GatedAttentionNetwork.__module__ == "mitoscope.heads.attention"
    assert GatedAttentionNetwork.__qualname__ == "GatedAttentionNetwork"
    with pytest.raises(AttributeError):
        mitoscope.heads.NoSuchHead  # noqa: B018


def test_the_registry_and_serving_forms_import_neither_torch_nor_scikit_learn():
    loaded = run_python(
        "import json, sys\n"
        "import mitoscope.heads, mitoscope.options, mitoscope.inference\n"
        "from mitoscope.heads import registry\n"
        "for traits in registry.REGISTRY:\n"
        "    assert callable(registry.head_module(traits).serve)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in " + repr(HEAVY) + ")))\n"
    )
    assert loaded == []


def test_training_imports_nothing_of_serving():
    loaded = run_python(
        "import json, sys\n"
        "import numpy as np\n"
        "from mitoscope.heads import HEADS, make_head, save_head, load_head\n"
        "import tempfile\n"
        "bags, y = [np.eye(3, dtype=np.float32) * i for i in range(4)], [0, 1, 0, 1]\n"
        "head = make_head('pooled').fit(bags, y)\n"
        "folder = tempfile.mkdtemp()\n"
        "load_head(folder, save_head(head, folder, 'head'))\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mitoscope.') and 'heads' not in m)))\n"
    )
    assert "mitoscope.inference" not in loaded and "mitoscope.engines" not in loaded
    assert set(loaded) <= {"mitoscope.errors"}


def test_no_module_of_the_heads_package_is_over_600_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in (SRC / "mitoscope" / "heads").glob("*.py")}
    assert {"__init__.py", "registry.py", "maths.py", "dense.py", "forest.py", "ensemble.py", "pooled.py",
            "attention.py"} <= set(sizes)
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_make_head_names_the_registered_heads():
    with pytest.raises(InputError, match=r"a head among dense, forest, ensemble, pooled, attention, got 'mlp'"):
        registry.make_head("mlp")


# ------------------------------------------------------------------------------------------
# Adding a head: the worked example of docs/architecture.md
# ------------------------------------------------------------------------------------------


def documented_example() -> tuple[str, str]:
    """(the module's source, its registry line) from the architecture document."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text[text.index("### Adding a head"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return blocks[0], blocks[1].strip().rstrip(",")


@pytest.fixture
def maxpooled(tmp_path, monkeypatch):
    """The documented head, installed as mitoscope.heads.maxpooled with its registry line."""
    source, line = documented_example()
    (tmp_path / "maxpooled.py").write_text(source)
    monkeypatch.setattr(mitoscope.heads, "__path__", [*mitoscope.heads.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "mitoscope.heads.maxpooled", raising=False)
    traits = eval(line, {"HeadTraits": registry.HeadTraits})  # noqa: S307 - the document's own line
    monkeypatch.setattr(registry, "REGISTRY", (*registry.REGISTRY, traits))
    yield traits
    sys.modules.pop("mitoscope.heads.maxpooled", None)


def test_the_documented_head_is_one_file_and_one_registry_line(maxpooled, tmp_path):
    assert len(documented_example()[0].splitlines()) <= 70
    assert maxpooled.name == "maxpooled" and not maxpooled.fixed_grid
    rng = np.random.default_rng(0)
    y = np.arange(16) % 2
    bags = [(rng.normal(size=(int(rng.integers(2, 6)), 5)) + label).astype(np.float32) for label in y]
    head = registry.make_head("maxpooled", C=0.5).fit(bags, y)
    assert type(head).__name__ == "MaxPooledHead" and head.C == 0.5
    spec = registry.save_head(head, tmp_path / "model", "head")
    assert spec["files"] == ["head.max.safetensors"] and spec["class"] == "MaxPooledHead"
    loaded = registry.load_head(tmp_path / "model", json.loads(json.dumps(spec)))
    served = registry.load_served(tmp_path / "model", spec)
    expected = head.predict_proba(bags)
    assert expected[:, 1][y == 1].mean() > expected[:, 1][y == 0].mean()
    np.testing.assert_array_equal(loaded.predict_proba(bags), expected)
    np.testing.assert_array_equal(served.predict_proba(bags), expected[:, 1])
