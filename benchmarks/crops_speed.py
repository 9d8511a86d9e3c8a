"""Feature extraction of many small images (single-cell crops): one forward per image vs batched.

    python benchmarks/crops_speed.py [--limit N] [--engine auto] [--out benchmarks/results/crops_speed.json]

The H&E mitotic-figure crops of ``../shared/data/he-mitotic-figures`` (1,721 PNGs of 128x128,
sorted by path; ``--limit N`` takes the first N) with ``--window 128``: every crop is one
window. Each variant runs ``mitoscope.features.extract_dataset`` (what ``train`` and
``evaluate`` run: hashing, decoding one image ahead on a thread, the backbone, one cache entry
written atomically per image) with a cold feature cache of its own:

- ``unbatched``: an extractor with ``batch_size=1``, i.e. one image per group and one forward
  per image, as mitoscope extracted crops before it batched them;
- ``batched``: the default ``batch_size=32``: 32 crops per forward pass;
- ``before`` (with ``--before-engine``): one forward per image in that engine, i.e. what
  mitoscope ran before crops were batched *and* OpenVINO compiled in f32: on a CPU with bf16
  (AVX-512) its export failed the check against PyTorch and ``auto`` fell back to PyTorch, so
  ``--before-engine torch`` there. The issue's target (5x) is ``batched`` against ``before``.

The crops are taken in chunks (``--chunk``), each chunk timed in both variants back to back,
so that both see the same load on a shared machine; the times are summed. Afterwards the two
caches are compared: the same entry names (keys), the same provenance, and the largest
difference between the features. The default engine on a CPU is OpenVINO; when its export
check fails here, ``auto`` falls back to PyTorch (logged, and recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import DATA, REPO, save_results

from mitoscope import __version__
from mitoscope.backbones import DEFAULT_BACKBONE, create_backbone
from mitoscope.cache import FeatureCache, read_metadata
from mitoscope.features import FeatureExtractor, extract_dataset
from mitoscope.io import ReadOptions, load_labelled_images

CROPS = DATA / "he-mitotic-figures"
TARGET_SPEEDUP = 5.0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def entries(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in root.rglob("*.safetensors") if not p.name.startswith(".")}


def compare_caches(first: Path, second: Path) -> dict[str, Any]:
    """Same keys, same provenance, and how far apart the features are."""
    from safetensors.numpy import load_file

    a, b = entries(first), entries(second)
    same_provenance = all(read_metadata(a[name]) == read_metadata(b[name]) for name in a.keys() & b.keys())
    worst_abs, worst_rel = 0.0, 0.0
    for name in sorted(a.keys() & b.keys()):
        fa, fb = load_file(str(a[name]))["features"], load_file(str(b[name]))["features"]
        gap = float(np.abs(fa - fb).max())
        worst_abs = max(worst_abs, gap)
        worst_rel = max(worst_rel, gap / max(float(np.abs(fa).max()), 1e-12))
    return {"entries": [len(a), len(b)], "same_keys": a.keys() == b.keys(), "same_provenance": same_provenance,
            "max_abs_difference": worst_abs, "max_relative_difference": worst_rel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N crops by path")
    parser.add_argument("--engine", default="auto", help="auto (default) | openvino | onnxruntime | torch")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="windows per forward pass of the batched variant")
    parser.add_argument("--chunk", type=int, default=160, help="crops timed in both variants back to back")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "crops_speed.json")
    parser.add_argument("--before-engine", default=None,
                        help="also time one forward per image in this engine (what ran before; see above)")
    parser.add_argument("--note", default=None, help="recorded with the results (e.g. which code ran)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mitoscope-crops-speed")
    args = parser.parse_args()
    if not (CROPS / "labels.csv").is_file():
        raise SystemExit(f"{CROPS}: the H&E crops are not there (benchmarks need ../shared)")

    paths = sorted(load_labelled_images(CROPS, CROPS / "labels.csv", positive="atypical").paths)[: args.limit]
    backbone = create_backbone(DEFAULT_BACKBONE)
    variants = {"unbatched": 1, "batched": args.batch_size}
    engines = dict.fromkeys(variants, args.engine)
    if args.before_engine:
        variants["before"], engines["before"] = 1, args.before_engine
    extractors = {name: FeatureExtractor(backbone, args.window, 0.5, size, "cpu", engine=engines[name])
                  for name, size in variants.items()}
    for extractor in extractors.values():
        extractor.runner  # noqa: B018 - made (and, for an exported engine, compiled) before the clock starts
    roots = {name: args.work / f"cache-{name}-{time.strftime('%Y%m%d-%H%M%S')}" for name in variants}
    seconds = dict.fromkeys(variants, 0.0)
    chunks = []
    load_before = os.getloadavg()
    for start in range(0, len(paths), args.chunk):
        chunk = paths[start : start + args.chunk]
        times = {}
        for name, extractor in extractors.items():
            began = time.perf_counter()
            extract_dataset(chunk, extractor, ReadOptions(), FeatureCache(roots[name]))
            times[name] = time.perf_counter() - began
            seconds[name] += times[name]
        chunks.append({"first": start, "n": len(chunk), **{f"{k}_s": round(v, 2) for k, v in times.items()}})
        print(f"crops {start + len(chunk)}/{len(paths)}: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()),
              flush=True)
    flags = cpu_flags()
    results = {
        "note": args.note,
        "data": f"{CROPS.relative_to(REPO.parent)}: {len(paths)} crops of 128x128 px, sorted by path"
                + (f" (the first {args.limit})" if args.limit else " (all)"),
        "machine": {"cpu_model": cpu_model(), "avx512_bf16": "avx512_bf16" in flags, "avx2": "avx2" in flags,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "mitoscope": __version__, "python": platform.python_version(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "backbone": DEFAULT_BACKBONE, "window": args.window, "engine_asked": args.engine,
        "engine_used": {name: e.engine for name, e in extractors.items()},
        "how": "mitoscope.features.extract_dataset, cold feature cache per variant (hashing, decoding, backbone, "
               "atomic cache writes); chunks timed in both variants back to back, times summed",
        "variants": {name: {"batch_size": size, "seconds": round(seconds[name], 1),
                            "images_per_s": round(len(paths) / seconds[name], 2)} for name, size in variants.items()},
        "speedup": round(seconds["unbatched"] / seconds["batched"], 2),
        "speedup_vs_before": round(seconds["before"] / seconds["batched"], 2) if "before" in seconds else None,
        "target_speedup": TARGET_SPEEDUP,
        "caches": compare_caches(roots["unbatched"], roots["batched"]),
        "chunks": chunks,
    }
    save_results(args.out, results)
    print(json.dumps({k: results[k] for k in ("engine_used", "variants", "speedup", "caches")}, indent=2))
    against = "before" if "before" in seconds else "unbatched"
    ratio = seconds[against] / seconds["batched"]
    print(f"{'PASS' if ratio >= TARGET_SPEEDUP else 'FAIL'}  batched >= {TARGET_SPEEDUP:g}x {against}: "
          f"{ratio:.2f}x  ({cpu_model()}, avx512_bf16: {results['machine']['avx512_bf16']})")


if __name__ == "__main__":
    main()
