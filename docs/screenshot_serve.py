"""The README's picture of `mitoscope serve`: a real model, a real image, the page in Chromium.

    python docs/screenshot_serve.py MODEL_DIR IMAGE [--out docs/assets/serve_page.jpg]

Starts `mitoscope serve MODEL_DIR` on a free local port, opens the page in Debian's chromium
(through Playwright), uploads IMAGE, waits for the answer and saves a screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("image", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "serve_page.jpg")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mitoscope", "serve", str(args.model), "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        chromium = "/usr/lib/chromium/chromium" if Path("/usr/lib/chromium/chromium").is_file() else shutil.which("chromium")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 860})
            page.goto(url + "/")
            page.set_input_files("#file", str(args.image))
            page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=120_000)
            page.wait_for_function("document.getElementById('heatmap').complete")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), type="jpeg", quality=80, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
