"""How fast the command line refuses bad arguments (run by hand).

    python benchmarks/startup.py [--repeats 5] [--out benchmarks/results/startup.json]

Each case runs the command line (``python -m mitoscope ...``; with ``--no-main``, through
``mitoscope.cli.main``, for code that predates ``__main__.py``) as a new process with a typo or
a missing path, with the ``mitoscope`` found on ``PYTHONPATH``, and records its wall time (median of ``--repeats`` runs after one warm-up), its exit code and its
``error:`` line. Beside them, the time a new process takes to import PyTorch, and PyTorch with
scikit-learn: what a typo cost before the options were checked first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, save_results

TARGET_S = 1.0


def timed_run(command: list[str]) -> tuple[float, int, str]:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return wall, done.returncode, errors[0] if errors else done.stderr.strip()[-200:]


def median_run(command: list[str], repeats: int) -> dict[str, Any]:
    timed_run(command)  # warm the file cache
    runs = [timed_run(command) for _ in range(repeats)]
    return {"seconds": round(statistics.median(wall for wall, _, _ in runs), 3),
            "runs": [round(wall, 3) for wall, _, _ in runs], "exit_code": runs[-1][1], "message": runs[-1][2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "startup.json")
    parser.add_argument("--no-main", action="store_true", help="run mitoscope.cli.main instead of python -m mitoscope")
    parser.add_argument("--note", default=None, help="recorded with the results (e.g. which code ran)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mitoscope-startup-"))
    data = work / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels.csv").write_text("Image,Label\n")
    labels = str(data / "labels.csv")
    cli = ([sys.executable, "-c", "import sys; sys.argv[0] = 'mitoscope'; from mitoscope.cli import main; main()"]
           if args.no_main else [sys.executable, "-m", "mitoscope"])
    cases = {
        "train --head attn": ["train", str(data), "--labels", labels, "--out", str(work / "m"), "--head", "attn"],
        "train --engine tensorrt": ["train", str(data), "--labels", labels, "--out", str(work / "m"), "--engine",
                                    "tensorrt"],
        "train, data folder missing": ["train", str(work / "nowhere"), "--out", str(work / "m")],
        "train, labels CSV missing": ["train", str(data), "--labels", str(work / "no.csv"), "--out", str(work / "m")],
        "predict, model folder missing": ["predict", str(work / "nomodel"), str(data / "images")],
        "evaluate, model folder missing": ["evaluate", str(work / "nomodel"), str(data), "--labels", labels, "--out",
                                           str(work / "r")],
        "finetune --pool max": ["finetune", str(data), "--labels", labels, "--out", str(work / "f"), "--pool", "max"],
        "extract --extraction tiles": ["extract", str(data), "--labels", labels, "--extraction", "tiles"],
    }
    results: dict[str, Any] = {"note": args.note, "command": " ".join(cli[1:]), "python": sys.executable, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
                               "target_s": TARGET_S, "cases": {}}
    for name, arguments in cases.items():
        results["cases"][name] = measured = median_run([*cli, *arguments], args.repeats)
        print(f"{measured['seconds']:6.2f} s  exit {measured['exit_code']}  {name}: {measured['message']}", flush=True)
    for modules in ("torch", "torch, sklearn"):
        results[f"import {modules}"] = measured = median_run([sys.executable, "-c", f"import {modules}"],
                                                             args.repeats)
        print(f"{measured['seconds']:6.2f} s  import {modules} (what a typo waited for before)", flush=True)
    worst = max(case["seconds"] for case in results["cases"].values())
    results["worst_s"] = worst
    results["pass"] = worst < TARGET_S and all(case["exit_code"] == 2 for case in results["cases"].values())
    save_results(args.out, results)
    print(f"{'PASS' if results['pass'] else 'FAIL'}  every case refused (exit 2) in < {TARGET_S:g} s: worst {worst:.2f} s")


if __name__ == "__main__":
    main()
