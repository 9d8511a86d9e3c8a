"""A bounded load test of `mitoscope serve` on localhost: latency percentiles and peak memory.

    python benchmarks/serve_load.py --model MODEL_DIR --image IMAGE [--requests 120] [--concurrency 6]

Starts `mitoscope serve MODEL_DIR` on a free local port (the defaults: one prediction at a
time, 8 waiting), sends ``--requests`` uploads of IMAGE, ``--concurrency`` at a time, and
records each answer's status and latency (upload to answer, client side). Then a burst past
the queue (``--burst`` requests at once): the excess must get 503 and the server must go on
answering. Peak memory is the server process's high-water mark (VmHWM).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from common import REPO, machine, save_results
from speed import mitoscope_command


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def send(url: str, data: bytes, name: str) -> tuple[int, float]:
    started = time.perf_counter()
    response = httpx.post(url + "/api/predict", files={"image": (name, data)}, timeout=600)
    return response.status_code, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--burst", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([*mitoscope_command(), "serve", str(args.model), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
            if server.poll() is not None:
                sys.exit(f"mitoscope serve exited: {server.stderr.read()}")
        start_s = time.perf_counter() - started
        data = args.image.read_bytes()
        send(url, data, args.image.name)  # warm: the first prediction compiles nothing more after this
        began = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            answers = list(pool.map(lambda _: send(url, data, args.image.name), range(args.requests)))
        wall = time.perf_counter() - began
        latencies = [seconds for status, seconds in answers if status == 200]
        load = {
            "requests": args.requests, "concurrency": args.concurrency,
            "statuses": {str(code): sum(1 for status, _ in answers if status == code) for code in {s for s, _ in answers}},
            "wall_s": round(wall, 1), "throughput_per_s": round(len(latencies) / wall, 2),
            "latency_s": {"p50": round(percentile(latencies, 50), 2), "p95": round(percentile(latencies, 95), 2),
                          "p99": round(percentile(latencies, 99), 2), "max": round(max(latencies), 2),
                          "mean": round(statistics.mean(latencies), 2)},
        }
        with ThreadPoolExecutor(args.burst) as pool:
            burst_answers = list(pool.map(lambda _: send(url, data, args.image.name), range(args.burst)))
        after = send(url, data, args.image.name)
        burst = {"requests": args.burst,
                 "statuses": {str(code): sum(1 for status, _ in burst_answers if status == code)
                              for code in {s for s, _ in burst_answers}},
                 "next_request_status": after[0]}
        results = {"machine": machine(), "model": str(args.model), "image": str(args.image),
                   "image_bytes": len(data), "server_start_s": round(start_s, 1), "load": load, "burst": burst,
                   "server_peak_rss_mb": round(peak_mb(server.pid))}
        print(results)
        save_results(args.out, results)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
