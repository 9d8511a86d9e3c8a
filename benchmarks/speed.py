"""Speed and memory of mitoscope against the plain way, on this machine (run by hand).

    python benchmarks/speed.py [--threads N] [--repeats 3] [--out benchmarks/results/speed.json]

Everything is measured in one run, on the same machine and the same image, and written to
``benchmarks/results/speed.json`` with a table on stdout:

1. feature extraction (windows/s) of the default backbone: the plain way a user would write it
   (a Python loop over windows: crop -> PIL -> timm's own eval transform -> forward with a batch
   of one under ``torch.no_grad``; timed on a spread subset of ``--plain-windows`` windows)
   against mitoscope's ``windows`` mode (batched) and ``fullconv`` mode (one pass over the
   image, windows pooled from the feature map), each with the default engine on the CPU
   (OpenVINO), ONNX Runtime and PyTorch (channels_last, inference_mode);
2. ``mitoscope predict MODEL IMAGE --out x.csv --no-cache`` for one 3840x2160 image, run as a
   subprocess from the PNG on disk to the CSV row, in both extraction modes: wall time (process
   start included; the start alone is reported too) and peak resident memory of the process;
   the model is a Round-1 ensemble whose head is fitted on random features of the right shape
   (its quality is irrelevant for timing; its size is the real one). ``predict`` serves it
   without PyTorch or scikit-learn (mitoscope.inference); the same prediction through the full
   pipeline (``predict(..., serve=False)``) is timed beside it for comparison;
3. the FLOP-bound limit: measured GFLOP/s of a float32 2048x2048 ``torch.mm`` times the
   backbone's FLOPs per window (``torch.utils.flop_counter.FlopCounterMode``), and how close
   each mode gets;
4. how much ``fullconv`` features differ from per-window ones: cosine similarity per window on
   a few composed scenes (the accuracy difference is measured by ``accuracy.py``);
5. on a CUDA GPU, windows/s with bf16 autocast (skipped, and said so, without one).

The image is a real composed scene (``../shared/tools/compose_scenes.py --size 3840x2160
--n 1 --seed 3``) when ``../shared`` is present, else a synthetic one. Targets (PASS/FAIL in
the table): extraction >= 3x the plain loop, predict < 6 s end to end, < 3 GB peak memory.
A smoke run on a tiny image: ``--size 448x448 --repeats 1 --backbone test_efficientnet
--random-init --plain-windows 5 --trees 10 --sim-scenes 1 --sim-size 448x448``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from common import COMPOSE, DATA, REPO, save_results

from mitoscope import __version__
from mitoscope.backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from mitoscope.features import FeatureExtractor
from mitoscope.io import ReadOptions, read_image
from mitoscope.tiling import make_grid

TARGET_SPEEDUP = 3.0
TARGET_PREDICT_S = 6.0
TARGET_PEAK_GB = 3.0
# (result key, extraction mode, engine): the default engine first.
EXTRACTION_VARIANTS = [(mode if engine == "auto" else f"{mode}_{engine}", mode, engine)
                       for engine in ("auto", "onnxruntime", "torch") for mode in ("windows", "fullconv")]
HEAD_NOTE = ("the ensemble head is fitted on random features of the right shape: its predictions are meaningless, "
             "its size (dense layer on n_windows x D inputs, --trees trees) and so its load and predict times are real")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'3840x2160' -> (width, height)."""
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def median_time(run: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def shared_present() -> bool:
    return COMPOSE.is_file() and (DATA / "jurkat-cells").is_dir()


def compose_scenes(out: Path, size: tuple[int, int], n: int, seed: int) -> list[Path]:
    """Real composed scenes (compose_scenes.py), written once into ``out``."""
    if not (out / "labels.csv").is_file():
        subprocess.run([sys.executable, str(COMPOSE), str(DATA / "jurkat-cells"), str(out), "--size",
                        f"{size[0]}x{size[1]}", "--n", str(n), "--seed", str(seed)], check=True, capture_output=True)
    return sorted((out / "images").glob("*.png"))


def synthetic_scenes(out: Path, size: tuple[int, int], n: int, seed: int) -> list[Path]:
    from PIL import Image

    from mitoscope.synthetic import render_scene

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_cells = max(4, size[0] * size[1] // (160 * 160))
    paths = []
    for i in range(n):
        image, _ = render_scene(rng, size, n_cells, 2 if i % 2 == 0 else 0, (14, 20))
        path = out / f"synthetic_{seed}_{i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def scenes(work: Path, name: str, size: tuple[int, int], n: int, seed: int, use_shared: bool) -> tuple[list[Path], str]:
    folder = work / f"{name}-{size[0]}x{size[1]}-n{n}-seed{seed}"
    if use_shared:
        return compose_scenes(folder, size, n, seed), (f"composed: compose_scenes.py --size {size[0]}x{size[1]} "
                                                       f"--n {n} --seed {seed} (real Jurkat cells)")
    return synthetic_scenes(folder, size, n, seed), "synthetic (mitoscope.synthetic.render_scene): ../shared absent"


def make_backbone(args: argparse.Namespace) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_backbone(args.backbone, pretrained=not args.random_init)


# ------------------------------------------------------------------------------------------
# 1. extraction throughput
# ------------------------------------------------------------------------------------------


def plain_loop(image: np.ndarray, boxes: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """What a user writes without mitoscope: one window at a time through timm's own transform."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = make_backbone(args).model.eval()  # a fresh model: mitoscope's extractor makes its own channels_last
    transform = create_transform(**resolve_data_config(model=model))

    def run(subset: np.ndarray) -> None:
        with torch.no_grad():
            for x0, y0, x1, y1 in subset:
                crop = Image.fromarray(image[y0:y1, x0:x1])
                model(transform(crop).unsqueeze(0))

    picks = np.unique(np.linspace(0, len(boxes) - 1, min(args.plain_windows, len(boxes))).round().astype(int))
    subset = boxes[picks]
    run(subset[: min(5, len(subset))])  # warm-up
    seconds, times = median_time(lambda: run(subset), args.repeats, warmup=0)
    return {"windows_timed": int(len(subset)), "seconds_median": seconds, "seconds": times,
            "windows_per_s": len(subset) / seconds, "transform": " ".join(str(transform).split()),
            "how": "per window: numpy crop -> PIL.Image -> timm create_transform(**resolve_data_config(model=...)) "
                   "-> model(x[None]) under torch.no_grad; windows spread evenly over the grid"}


def mitoscope_extraction(image: np.ndarray, mode: str, args: argparse.Namespace, device: str = "cpu",
                         engine: str = "auto") -> dict[str, Any]:
    extractor = FeatureExtractor(make_backbone(args), args.window, args.overlap, args.batch_size, device, mode=mode,
                                 engine=engine)
    n_windows = make_grid(image.shape[0], image.shape[1], args.window, args.overlap).n_windows
    # The warm-up run also makes the engine (an ONNX export on a first run; then it is cached).
    seconds, times = median_time(lambda: extractor.extract(image), args.repeats, warmup=1)
    return {"windows": n_windows, "seconds_median": seconds, "seconds": times, "windows_per_s": n_windows / seconds,
            "batch_size": args.batch_size, "device": device, "engine": extractor.engine}


# ------------------------------------------------------------------------------------------
# 2. predict end to end
# ------------------------------------------------------------------------------------------


def build_model(out: Path, backbone: Backbone, image_size: tuple[int, int], mode: str, args: argparse.Namespace) -> Path:
    """A valid Round-1 ensemble model folder, saved by mitoscope's own code, head fitted on random features."""
    from mitoscope.pipeline import MitoscopeModel, build_head

    if (out / "model.json").is_file() and (out / "head.forest.trees.safetensors").is_file():
        return out  # (a model saved before the served head arrays existed is made again)
    height, width = image_size
    n_windows = make_grid(height, width, args.window, args.overlap).n_windows
    rng = np.random.default_rng(0)
    bags = [rng.standard_normal((n_windows, backbone.num_features)).astype(np.float32) for _ in range(8)]
    y = np.array([0, 1] * 4)
    params = {"max_epochs": 1, "n_estimators": args.trees}
    head = build_head("ensemble", params).fit(bags, y)
    config = {
        "kind": "window-features",
        "backbone": backbone.describe(),
        "tiling": {"window": args.window, "overlap": args.overlap, "extraction": mode},
        "read": ReadOptions().to_dict(),
        "classes": ["Normal", "Mitosis"],
        "positive": "Mitosis",
        "threshold": 0.5,
        "threshold_rule": "0.5 (benchmark model: " + HEAD_NOTE + ")",
        "train_image_size": [height, width],
        "head": {"name": "ensemble", "params": params},
        "training": {"n_images": len(bags), "note": "random features, for timing only"},
    }
    return MitoscopeModel(config, head, backbone).save(out, overwrite=True)


# A small process starts the measured command and reports its child's wall time and peak RSS.
# Measuring from here instead would count this (large) process: a forked child's RSS starts as
# its parent's, and Linux keeps that high-water mark in ru_maxrss across exec.
SPAWNER = (
    "import json, os, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.call(sys.argv[2:], stdout=open(sys.argv[1], 'wb'), stderr=subprocess.STDOUT)\n"
    "wall = time.perf_counter() - start\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'wall': wall, 'peak_kib': peak, 'code': code}))\n"
)


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit code) of one run of ``command``, measured by a small spawner."""
    import json

    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        result = subprocess.run([sys.executable, "-S", "-c", SPAWNER, log.name, *command], env=env,
                                capture_output=True, text=True, check=True)
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        if measured["code"] != 0:
            sys.exit(f"command failed ({measured['code']}): {' '.join(command)}\n{Path(log.name).read_text()[-3000:]}")
    return measured["wall"], measured["peak_kib"] / 1024.0, measured["code"]  # ru_maxrss is in KiB on Linux


def mitoscope_command() -> list[str]:
    script = Path(sys.executable).parent / "mitoscope"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from mitoscope.cli import main; main()"]


def process_start(modules: str, env: dict[str, str], repeats: int) -> dict[str, Any]:
    """Median time of a new process importing ``modules``: the fixed cost before any work."""
    command = [sys.executable, "-c", f"import {modules}"]
    run_measured(command, env)  # warm the file cache
    times = [run_measured(command, env)[0] for _ in range(repeats)]
    return {"seconds": statistics.median(times), "runs": times, "means": f"python -c 'import {modules}'"}


def predict_end_to_end(image_path: Path, image_size: tuple[int, int], work: Path, args: argparse.Namespace,
                       env: dict[str, str]) -> dict[str, Any]:
    backbone = make_backbone(args)
    served_start = process_start("mitoscope.cli, mitoscope.predictions, mitoscope.inference, openvino", env,
                                 args.repeats)
    full_start = process_start("mitoscope.cli, mitoscope.pipeline, mitoscope.heads, mitoscope.features", env,
                               args.repeats)
    results: dict[str, Any] = {"process_start_s": served_start["seconds"], "process_start": served_start,
                               "process_start_full_pipeline": full_start, "head_note": HEAD_NOTE, "trees": args.trees}
    for mode in ("windows", "fullconv"):
        name = (f"model-{mode}-{image_size[1]}x{image_size[0]}-w{args.window}-o{args.overlap}-{args.backbone}"
                f"{'-random' if args.random_init else ''}-t{args.trees}")
        model_dir = build_model(work / name, backbone, image_size, mode, args)
        for variant, start in ((mode, served_start), (f"{mode}_full_pipeline", full_start)):
            out_csv = work / f"predict-{variant}.csv"
            if variant == mode:
                command = [*mitoscope_command(), "predict", str(model_dir), str(image_path), "--out", str(out_csv),
                           "--no-cache"]
                shown = " ".join(["mitoscope", *command[len(mitoscope_command()):]])
            else:
                shown = (f"from mitoscope.predictions import predict; predict({str(model_dir)!r}, "
                         f"[{str(image_path)!r}], {str(out_csv)!r}, cache=None, serve=False)")
                command = [sys.executable, "-c", shown]
            run_measured(command, env)  # warm-up: file cache, nothing else carries over between processes
            runs = [run_measured(command, env) for _ in range(args.repeats)]
            walls = [wall for wall, _, _ in runs]
            peaks = [peak for _, peak, _ in runs]
            wall = statistics.median(walls)
            results[variant] = {
                "wall_s": wall, "wall_runs": walls, "work_s": wall - start["seconds"], "peak_rss_mb": max(peaks),
                "peak_rss_runs_mb": peaks, "command": shown,
                "csv_row": out_csv.read_text().splitlines()[1] if out_csv.is_file() else None,
            }
            print(f"predict {variant}: {wall:.2f} s, peak {max(peaks) / 1024:.2f} GB", flush=True)
    return results


# ------------------------------------------------------------------------------------------
# 3. FLOP bound
# ------------------------------------------------------------------------------------------


def matmul_gflops(repeats: int, n: int = 2048) -> dict[str, Any]:
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds, times = median_time(lambda: torch.mm(a, b), max(5, repeats * 3), warmup=2)
    return {"n": n, "dtype": "float32", "seconds_median": seconds, "gflops": 2 * n**3 / seconds / 1e9}


def count_flops(model: torch.nn.Module, shape: tuple[int, ...], features_only: bool = False) -> int:
    """FLOPs of one forward, counted on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        x = torch.empty(shape, device="meta")
        meta.forward_features(x) if features_only else meta(x)
    return int(counter.get_total_flops())


def flop_bound(backbone: Backbone, image_shape: tuple[int, int], extraction: dict[str, Any],
               args: argparse.Namespace) -> dict[str, Any]:
    size = backbone.input_size
    per_window = count_flops(backbone.model, (1, 3, size, size))
    mm = matmul_gflops(args.repeats)
    bound = mm["gflops"] * 1e9 / per_window
    scale = size / args.window
    height, width = (max(s, args.window) for s in image_shape)
    full = count_flops(backbone.model, (1, 3, round(height * scale), round(width * scale)), features_only=True)
    n_windows = extraction["windows"]["windows"]
    out = {
        "matmul": mm,
        "flops_per_window": per_window,
        "gflops_per_window": per_window / 1e9,
        "upper_bound_windows_per_s": bound,
        "windows_mode_percent_of_bound": 100 * extraction["windows"]["windows_per_s"] / bound,
        "fullconv_flops_per_image": full,
        "fullconv_flops_per_window": full / n_windows,
        # fullconv does less work per window (neighbours share it): its bound is higher.
        "fullconv_upper_bound_windows_per_s": mm["gflops"] * 1e9 / (full / n_windows),
        "fullconv_percent_of_its_bound": 100 * (full / extraction["fullconv"]["seconds_median"]) / (mm["gflops"] * 1e9),
        "plain_percent_of_bound": 100 * extraction["plain"]["windows_per_s"] / bound,
        "note": "FLOPs counted by torch.utils.flop_counter (convolutions and matmuls; 2 per multiply-add); "
                "the bound assumes the network runs at the speed of a large float32 matmul",
    }
    return out


# ------------------------------------------------------------------------------------------
# 4. fullconv vs windows features
# ------------------------------------------------------------------------------------------


def feature_agreement(paths: list[Path], source: str, args: argparse.Namespace) -> dict[str, Any]:
    backbone = make_backbone(args)
    exact = FeatureExtractor(backbone, args.window, args.overlap, args.batch_size, "cpu", mode="windows")
    fast = FeatureExtractor(backbone, args.window, args.overlap, args.batch_size, "cpu", mode="fullconv")
    reference = FeatureExtractor(backbone, args.window, args.overlap, args.batch_size, "cpu", mode="windows",
                                 engine="torch")
    per_scene, all_cos, engine_gap = [], [], 0.0
    for path in paths:
        image = read_image(path)
        a, b = exact.extract(image).features, fast.extract(image).features
        torch_features = reference.extract(image).features  # the same windows through PyTorch
        engine_gap = max(engine_gap, float(np.abs(a - torch_features).max() / np.abs(torch_features).max()))
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-12)
        per_scene.append({"image": path.name, "windows": int(len(cos)), "mean_cosine": float(cos.mean()),
                          "min_cosine": float(cos.min()), "mean_relative_l2": float(rel.mean())})
        all_cos.append(cos)
    cos = np.concatenate(all_cos)
    return {"scenes": source, "n_scenes": len(paths), "n_windows": int(len(cos)), "engine": exact.engine,
            "engine_vs_torch_max_relative_difference": engine_gap, "mean_cosine": float(cos.mean()),
            "p05_cosine": float(np.percentile(cos, 5)), "min_cosine": float(cos.min()), "per_scene": per_scene}


# ------------------------------------------------------------------------------------------
# 5. GPU
# ------------------------------------------------------------------------------------------


def gpu_throughput(image: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU visible (torch.cuda.is_available() is False)"}
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "autocast": "bfloat16 (FeatureExtractor on cuda)"}
    for mode in ("windows", "fullconv"):
        out[mode] = mitoscope_extraction(image, mode, argparse.Namespace(**{**vars(args), "batch_size": args.gpu_batch_size}),
                                         device="cuda", engine="torch")
    return out


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    ext, pred = results["extraction"], results.get("predict")
    rows = [
        {"target": f"extraction windows mode >= {TARGET_SPEEDUP:g}x plain loop", "value": ext["speedup_windows"],
         "unit": "x", "pass": ext["speedup_windows"] >= TARGET_SPEEDUP},
        {"target": f"extraction fullconv mode >= {TARGET_SPEEDUP:g}x plain loop", "value": ext["speedup_fullconv"],
         "unit": "x", "pass": ext["speedup_fullconv"] >= TARGET_SPEEDUP},
    ]
    if pred:
        for mode in ("windows", "fullconv"):
            rows.append({"target": f"predict ({mode}) < {TARGET_PREDICT_S:g} s end to end", "value": pred[mode]["wall_s"],
                         "unit": "s", "pass": pred[mode]["wall_s"] < TARGET_PREDICT_S})
            rows.append({"target": f"predict ({mode}) peak memory < {TARGET_PEAK_GB:g} GB",
                         "value": pred[mode]["peak_rss_mb"] / 1024, "unit": "GB",
                         "pass": pred[mode]["peak_rss_mb"] / 1024 < TARGET_PEAK_GB})
    return rows


def print_table(results: dict[str, Any]) -> None:
    m, img, ext = results["machine"], results["image"], results["extraction"]
    print(f"\nmachine: {m['cpu_model']}, torch {m['torch']} with {m['torch_threads']} threads"
          f"{', smoke run' if results['smoke'] else ''}")
    print(f"image: {img['size'][1]}x{img['size'][0]}, {img['windows']} windows of {img['window']} px "
          f"({img['overlap']:.0%} overlap), {img['source']}")
    print(f"\n{'feature extraction (' + results['backbone'] + ')':<46}{'windows/s':>12}{'vs plain':>10}")
    rows = [("plain loop (PIL + timm transform, batch 1)", "plain")]
    rows += [(f"mitoscope {mode} ({ext[key]['engine']})", key) for key, mode, _ in EXTRACTION_VARIANTS]
    for name, key in rows:
        wps = ext[key]["windows_per_s"]
        print(f"{name:<46}{wps:>12.1f}{wps / ext['plain']['windows_per_s']:>9.1f}x")
    flops = results["flop_bound"]
    print(f"\nFLOP bound: {flops['gflops_per_window']:.3f} GFLOP/window, matmul {flops['matmul']['gflops']:.0f} GFLOP/s "
          f"-> <= {flops['upper_bound_windows_per_s']:.1f} windows/s; windows mode at "
          f"{flops['windows_mode_percent_of_bound']:.0f}%, fullconv at {flops['fullconv_percent_of_its_bound']:.0f}% "
          f"of its own bound ({flops['fullconv_upper_bound_windows_per_s']:.0f} windows/s)")
    pred = results.get("predict")
    if pred:
        print(f"\npredict end to end (process start alone {pred['process_start_s']:.2f} s served, "
              f"{pred['process_start_full_pipeline']['seconds']:.2f} s full pipeline):")
        for variant in ("windows", "fullconv", "windows_full_pipeline", "fullconv_full_pipeline"):
            r = pred[variant]
            print(f"  {variant:<23} {r['wall_s']:.2f} s wall ({r['work_s']:.2f} s after start), "
                  f"peak {r['peak_rss_mb'] / 1024:.2f} GB")
    agree = results.get("fullconv_vs_windows")
    if agree:
        print(f"\nfullconv vs windows features: mean cosine {agree['mean_cosine']:.4f} (5th pct "
              f"{agree['p05_cosine']:.4f}, min {agree['min_cosine']:.4f}) over {agree['n_windows']} windows of "
              f"{agree['n_scenes']} scenes")
    gpu = results["gpu"]
    if "skipped" in gpu:
        print(f"\nGPU: skipped ({gpu['skipped']})")
    else:
        print(f"\nGPU {gpu['device']} (bf16 autocast): windows {gpu['windows']['windows_per_s']:.0f}/s, "
              f"fullconv {gpu['fullconv']['windows_per_s']:.0f}/s")
    print("\ntargets:")
    for row in results["targets"]:
        print(f"  {verdict(row['pass'])}  {row['target']}: {row['value']:.2f} {row['unit']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads here and in predict (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "speed.json")
    parser.add_argument("--size", default="3840x2160", help="WxH of the benchmark image")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--random-init", action="store_true", help="random backbone weights (smoke runs of other backbones)")
    parser.add_argument("--window", type=int, default=224)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32, help="mitoscope's windows per forward pass on CPU")
    parser.add_argument("--gpu-batch-size", type=int, default=128)
    parser.add_argument("--plain-windows", type=int, default=60, help="windows timed in the plain loop")
    parser.add_argument("--trees", type=int, default=900, help="trees of the benchmark model's forest (the write-up: 900)")
    parser.add_argument("--sim-scenes", type=int, default=3, help="composed scenes for the fullconv/windows comparison")
    parser.add_argument("--sim-size", default="2048x2048", help="WxH of those scenes")
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--no-shared", action="store_true", help="use a synthetic image even when ../shared is present")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mitoscope-speed")
    args = parser.parse_args()

    env = dict(os.environ)
    if args.threads:
        torch.set_num_threads(args.threads)
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    args.work.mkdir(parents=True, exist_ok=True)
    use_shared = shared_present() and not args.no_shared
    size = parse_size(args.size)
    smoke = size != (3840, 2160) or args.backbone != DEFAULT_BACKBONE or args.random_init

    (image_path,), source = scenes(args.work, "speed", size, 1, 3, use_shared)
    image = read_image(image_path)
    grid = make_grid(image.shape[0], image.shape[1], args.window, args.overlap)
    results: dict[str, Any] = {
        "smoke": smoke,
        "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "mitoscope": __version__, "python": platform.python_version(),
                    "openvino": package_version("openvino"), "onnxruntime": package_version("onnxruntime"),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "backbone": args.backbone + (" (random init)" if args.random_init else ""),
        "image": {"source": source, "path": str(image_path), "size": [int(image.shape[0]), int(image.shape[1])],
                  "window": args.window, "overlap": args.overlap, "windows": grid.n_windows},
        "repeats": args.repeats,
    }
    print(f"image {image.shape[1]}x{image.shape[0]} ({grid.n_windows} windows): {source}", flush=True)

    boxes = grid.boxes()
    extraction = {"plain": plain_loop(image, boxes, args)}
    print(f"plain loop: {extraction['plain']['windows_per_s']:.1f} windows/s", flush=True)
    # The default engine ("auto": OpenVINO on the CPU when installed), then the others for comparison.
    for key, mode, engine in EXTRACTION_VARIANTS:
        extraction[key] = mitoscope_extraction(image, mode, args, engine=engine)
        extraction[f"speedup_{key}"] = extraction[key]["windows_per_s"] / extraction["plain"]["windows_per_s"]
        print(f"mitoscope {mode} ({extraction[key]['engine']}): {extraction[key]['windows_per_s']:.1f} windows/s "
              f"({extraction[f'speedup_{key}']:.1f}x)", flush=True)
    results["extraction"] = extraction

    results["flop_bound"] = flop_bound(make_backbone(args), image.shape[:2], extraction, args)
    if not args.skip_predict:
        results["predict"] = predict_end_to_end(image_path, image.shape[:2], args.work, args, env)
        print(f"predict: {results['predict']['windows']['wall_s']:.2f} s (windows), "
              f"{results['predict']['fullconv']['wall_s']:.2f} s (fullconv)", flush=True)
    if args.sim_scenes > 0:
        sim_paths, sim_source = scenes(args.work, "similarity", parse_size(args.sim_size), args.sim_scenes, 2, use_shared)
        results["fullconv_vs_windows"] = feature_agreement(sim_paths, sim_source, args)
    results["gpu"] = gpu_throughput(image, args)
    results["targets"] = targets(results)
    results["commands"] = [" ".join(["python", "benchmarks/speed.py", *sys.argv[1:]])]
    save_results(args.out, results)
    print_table(results)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
