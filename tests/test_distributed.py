"""`mitoscope extract`: the feature cache filled by Lightning DDP, with train's own cache keys."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mitoscope.backbones import create_backbone
from mitoscope.distributed import ExtractConfig, extract_to_cache
from mitoscope.errors import InputError
from mitoscope.features import FeatureCache, FeatureExtractor, extract_dataset, read_metadata
from mitoscope.io import ReadOptions
from mitoscope.pipeline import TrainConfig, train

WINDOW = 48
SEED = 3
# Four images of the common size and one odd one, which fixed-grid heads see resized.
SIZES = [(96, 128), (96, 128), (96, 128), (80, 112), (96, 128)]


def make_data(root: Path) -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    paths, rows = [], []
    for i, (height, width) in enumerate(SIZES):
        path = images / f"scene{i}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
        rows.append(f"{path.name},{'Mitosis' if i % 2 else 'Normal'}")
    (root / "labels.csv").write_text("Image,Label\n" + "\n".join(rows) + "\n")
    return root / "labels.csv", paths


def seeded_extractor() -> FeatureExtractor:
    """The random-init backbone as `train --random-init --seed SEED` makes it, in this process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        backbone = create_backbone("test_efficientnet", pretrained=False)
    return FeatureExtractor(backbone, window=WINDOW, overlap=0.5, batch_size=8, device="cpu")


def entries(cache_dir: Path) -> dict[Path, dict]:
    """Every cache entry with its provenance."""
    return {p: json.loads(read_metadata(p)["provenance"]) for p in sorted(cache_dir.rglob("*.safetensors"))}


def stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


class Refuse:
    """An extract that fails: proves that a caller found everything in the cache."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("features were recomputed although they should be cached")


def test_two_process_ddp_extract_matches_one_process_and_train_finds_everything(tmp_path, monkeypatch):
    labels, paths = make_data(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    cache = FeatureCache(cache_dir)
    extractor = seeded_extractor()
    read = ReadOptions()

    # One image cached beforehand, the way train caches it: the DDP run must leave it alone.
    extract_dataset(paths[:1], extractor, read, cache)
    (precached,) = entries(cache_dir)
    before = stamp(precached)

    launcher = tmp_path / "mitoscope_cli.py"  # Lightning re-runs this script for rank 1
    launcher.write_text("from mitoscope.cli import main\nmain()\n")
    run = subprocess.run(
        [sys.executable, str(launcher), "extract", str(tmp_path / "data"), "--labels", str(labels),
         "--backbone", "test_efficientnet", "--random-init", "--seed", str(SEED), "--window", str(WINDOW),
         "--batch-size", "8", "--cache-dir", str(cache_dir), "--devices", "2", "--accelerator", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = " ".join(run.stderr.split())
    assert "5 images: 1 already cached, 4 extracted, 1 also cached resized to 128x96" in report, report[-1000:]
    per_rank = {int(r): int(n) for r, n in re.findall(r"rank (\d): (\d+)", report)}
    assert set(per_rank) == {0, 1} and all(n > 0 for n in per_rank.values()), report[-1000:]

    found = entries(cache_dir)
    new = {p: prov for p, prov in found.items() if p != precached}
    # 4 images at their own size + the odd one resized; each written exactly once: the ranks'
    # write counts add up to the number of distinct new entries, and no temporary file is left.
    assert len(new) == 5
    assert sum(per_rank.values()) == len(new)
    assert not [p for p in cache_dir.rglob("*") if p.is_file() and (p.suffix != ".safetensors" or p.name.startswith("."))]
    assert {prov["rank"] for prov in new.values()} == {0, 1}
    assert all(prov["world_size"] == 2 and prov["writer"] == "mitoscope extract" for prov in new.values())
    assert sorted(Path(prov["image"]).name for prov in new.values()) == sorted(
        [p.name for p in paths[1:]] + [paths[3].name])
    assert stamp(precached) == before and "rank" not in found[precached]

    # The same features as one process computes here, found under train's own cache keys.
    fresh = extract_dataset(paths, extractor, read, cache=None)
    fresh_resized = extract_dataset(paths[3:4], extractor, read, cache=None, resize_to=SIZES[0])
    monkeypatch.setattr(FeatureExtractor, "extract", Refuse())
    cached = extract_dataset(paths, extractor, read, cache)
    cached_resized = extract_dataset(paths[3:4], extractor, read, cache, resize_to=SIZES[0])
    for got, want in zip(cached + cached_resized, fresh + fresh_resized):
        assert got.grid_shape == want.grid_shape and got.image_size == want.image_size
        np.testing.assert_array_equal(got.boxes, want.boxes)
        np.testing.assert_allclose(got.features, want.features, rtol=1e-4, atol=1e-5)

    # And `train` with the same options extracts nothing (extract still refuses to run).
    config = TrainConfig(head="ensemble", backbone="test_efficientnet", pretrained=False, seed=SEED, window=WINDOW,
                         cv=0, head_params={"max_epochs": 2, "n_estimators": 5})
    result = train(tmp_path / "data", labels, tmp_path / "model", config, cache)
    assert result.model.fixed_size == SIZES[0]


def test_already_cached_images_are_not_recomputed(tmp_path):
    labels, paths = make_data(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    config = ExtractConfig(backbone="test_efficientnet", pretrained=False, seed=SEED, window=WINDOW, batch_size=8,
                           accelerator="cpu", head="pooled")
    first = extract_to_cache(tmp_path / "data", labels, config, cache_dir)
    assert (first.n_cached, first.n_extracted, first.n_resized, first.written_per_rank) == (0, 5, 0, [5])
    assert first.train_size is None  # pooled takes any size: nothing resized

    found = entries(cache_dir)
    removed = next(p for p, prov in found.items() if Path(prov["image"]).name == paths[2].name)
    removed.unlink()
    kept = {p: stamp(p) for p in found if p != removed}

    again = extract_to_cache(tmp_path / "data", labels, config, cache_dir)
    assert (again.n_cached, again.n_extracted, again.written_per_rank) == (4, 1, [1])
    assert removed.is_file() and {p: stamp(p) for p in kept} == kept


def test_unreadable_image_is_named_and_the_others_are_still_cached(tmp_path):
    labels, paths = make_data(tmp_path / "data")
    paths[1].write_bytes(paths[1].read_bytes()[:60])  # truncated PNG
    cache_dir = tmp_path / "cache"
    config = ExtractConfig(backbone="test_efficientnet", pretrained=False, seed=SEED, window=WINDOW, batch_size=8,
                           accelerator="cpu", head="attention")
    with pytest.raises(InputError, match=r"1 of 5 images could not be extracted: .*scene1\.png"):
        extract_to_cache(tmp_path / "data", labels, config, cache_dir)
    names = sorted(Path(prov["image"]).name for prov in entries(cache_dir).values())
    assert names == sorted(p.name for i, p in enumerate(paths) if i != 1)


@pytest.mark.parametrize("change, message", [
    ({"head": "svm"}, "unknown --head 'svm'"),
    ({"devices": "two"}, "--devices expects"),
    ({"extraction": "tiles"}, "unknown --extraction 'tiles'"),
    ({"num_nodes": 0}, "--num-nodes must be at least 1"),
])
def test_bad_options_fail_before_any_work(tmp_path, change, message):
    with pytest.raises(InputError, match=re.escape(message)):
        extract_to_cache(tmp_path / "missing", None, ExtractConfig(**change), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
