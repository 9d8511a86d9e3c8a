"""mitoscope serve (mitoscope.web): the JSON API, hostile uploads, and the page in a real browser."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the [web] extra is not installed")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")
from fastapi.testclient import TestClient  # noqa: E402

from mitoscope.web import ServeSettings, create_app  # noqa: E402
from mitoscope.web.analysis import display_name  # noqa: E402
from mitoscope.web.limits import Busy, PredictionGate  # noqa: E402


@pytest.fixture(scope="module")
def served(cell_model):
    folder, targets, result = cell_model
    app = create_app(result.model_dir, ServeSettings(max_upload_mb=2, max_pixels=4_000_000))
    with TestClient(app) as client:
        yield client, folder, targets


def post(client, data: bytes, name="cells.png"):
    return client.post("/api/predict", files={"image": (name, data, "application/octet-stream")})


def first_mitosis(folder, targets):
    name = next(n for n, t in sorted(targets.items()) if t is not None)
    return folder / "images" / name, targets[name]


def assert_clean_error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"]
    assert "Traceback" not in body["error"] and "/tmp" not in body["error"] and "upload." not in body["error"]
    return body["error"]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height and whose pixel data is a few bytes: a bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_predict_answers_label_count_instances_heatmap_csv_and_geojson(served):
    client, folder, targets = served
    path, target = first_mitosis(folder, targets)
    response = post(client, path.read_bytes(), path.name)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["label"] == "Mitosis" and answer["count"] == 1
    assert answer["probability"] >= answer["threshold"]
    best = answer["instances"][0]
    assert best["mitotic"] and best["x0"] <= target[0] <= best["x1"] and best["y0"] <= target[1] <= best["y1"]
    assert sum(inst["mitotic"] for inst in answer["instances"]) == 1
    assert answer["heatmap"].startswith("data:image/png;base64,")
    heatmap = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"].split(",", 1)[1])))
    assert heatmap.width > 2 * 160 - 1  # the image and its map side by side
    assert answer["csv"].splitlines()[0].startswith("Image,Label,Probability,Threshold")
    assert answer["csv"].splitlines()[1].startswith(f"{path.name},Mitosis,")
    assert answer["geojson"]["type"] == "FeatureCollection" and answer["geojson"]["mitoscope"]["count"] == 1
    normal = next(n for n, t in sorted(targets.items()) if t is None)
    answer = post(client, (folder / "images" / normal).read_bytes(), normal).json()
    assert answer["label"] == "Normal" and answer["count"] == 0


def test_page_and_model_description(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "api/predict" in page.text and 'type="file"' in page.text
    info = client.get("/api/model").json()
    assert info["model"] == "cells" and info["instances"] == "cells" and info["classes"] == ["Normal", "Mitosis"]


def test_a_16_bit_multichannel_tiff_upload_is_read(served, tmp_path):
    tifffile = pytest.importorskip("tifffile")
    client, folder, targets = served
    path, _ = first_mitosis(folder, targets)
    pixels = np.asarray(Image.open(path)).astype(np.uint16) * 257
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.moveaxis(pixels, -1, 0), photometric="minisblack")
    response = post(client, buffer.getvalue(), "cells.tif")
    assert response.status_code == 200, response.text
    assert response.json()["width"] == 160


@pytest.mark.parametrize("case", ["not-an-image", "empty", "truncated", "bomb-header", "too-many-bytes",
                                  "chunked-too-many-bytes", "no-field", "wrong-field", "form-text"])
def test_hostile_uploads_get_a_one_line_error_and_the_server_keeps_answering(served, case):
    client, folder, targets = served
    path, _ = first_mitosis(folder, targets)
    good = path.read_bytes()
    if case == "not-an-image":
        assert "not an image" in assert_clean_error(post(client, b"#!/bin/sh\nrm -rf /\n", "x.png"), 415)
    elif case == "empty":
        assert "empty" in assert_clean_error(post(client, b"", "x.png"), 422)
    elif case == "truncated":
        assert "truncated" in assert_clean_error(post(client, good[: len(good) // 2], "half.png"), 422)
    elif case == "bomb-header":
        message = assert_clean_error(post(client, png_header_only(100_000, 100_000), "bomb.png"), 413)
        assert "10,000,000,000 pixels" in message
    elif case == "too-many-bytes":  # refused from Content-Length, before the body is read
        assert "larger than" in assert_clean_error(post(client, b"\x89PNG\r\n\x1a\n" + bytes(3 * 2 ** 20)), 413)
    elif case == "chunked-too-many-bytes":  # a 300 MB body with no Content-Length: counted as it arrives
        def body():
            for _ in range(300):
                yield bytes(2 ** 20)
        response = client.post("/api/predict", content=body(),
                               headers={"content-type": "multipart/form-data; boundary=x"})
        assert "larger than" in assert_clean_error(response, 413)
    elif case == "no-field":
        assert "field 'image'" in assert_clean_error(client.post("/api/predict"), 422)
    elif case == "wrong-field":
        response = client.post("/api/predict", files={"file": ("a.png", good, "image/png")})
        assert "field 'image'" in assert_clean_error(response, 422)
    elif case == "form-text":
        assert "field 'image'" in assert_clean_error(client.post("/api/predict", data={"image": "text"}), 422)
    assert post(client, good, path.name).status_code == 200


def test_an_upload_name_is_never_a_path(served, tmp_path):
    client, folder, targets = served
    path, _ = first_mitosis(folder, targets)
    before = set(Path("/tmp").iterdir())
    answer = post(client, path.read_bytes(), "../../../../tmp/evil\\..\\owned.png").json()
    assert answer["image"] == "owned.png"
    assert not Path("/tmp/evil").exists() and not Path("/tmp/owned.png").exists()
    assert {p for p in Path("/tmp").iterdir() if p.name.startswith("mitoscope-upload-")} <= before  # cleaned up
    assert display_name("a\x00b<script>.png") == "a_b_script_.png"
    assert display_name("") == display_name("..") == "upload"


def test_a_whole_slide_upload_is_predicted_over_its_tissue(served, shared_data):
    pytest.importorskip("openslide", reason="the [wsi] extra is not installed")
    client, _, _ = served
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    response = post(client, slide.read_bytes(), slide.name)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["slide"] and (answer["width"], answer["height"]) == (2220, 2967)
    assert answer["heatmap"].startswith("data:image/png;base64,") and "tissue tiles" in answer["note"]
    assert answer["hotspot"] is not None and answer["hotspot"]["area_mm2"] == 2.0
    broken = shared_data / "wsi" / "broken.svs"
    assert "broken.svs: " in assert_clean_error(post(client, broken.read_bytes(), broken.name), 415)


def test_the_gate_runs_one_at_a_time_refuses_past_its_queue_and_times_out():
    async def scenario():
        gate = PredictionGate(max_waiting=1, timeout_s=0.5)
        order = []

        def work(tag, seconds):
            def run():
                order.append(f"start {tag}")
                time.sleep(seconds)
                order.append(f"end {tag}")
                return tag
            return run

        first = asyncio.ensure_future(gate.run(work("a", 0.2)))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(gate.run(work("b", 0.1)))
        await asyncio.sleep(0.02)
        with pytest.raises(Busy):  # one running, one waiting: the third is refused at once
            await gate.run(work("c", 0.1))
        assert await first == "a" and await second == "b"
        assert order == ["start a", "end a", "start b", "end b"]  # never two at once
        with pytest.raises(asyncio.TimeoutError):
            await gate.run(work("slow", 1.0))
        await asyncio.sleep(1.1)
        assert gate.in_flight == 0  # the timed-out work finished and left the queue

    asyncio.run(scenario())


def test_settings_and_missing_model_are_refused(tmp_path):
    from mitoscope.errors import InputError

    with pytest.raises(InputError, match="max_pixels"):
        ServeSettings(max_pixels=0)
    run = subprocess.run([sys.executable, "-m", "mitoscope", "serve", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "model" in run.stderr.lower() and "Traceback" not in run.stderr


# --------------------------------------------------------------------------- a real server and browser


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(cell_model):
    import httpx

    folder, targets, result = cell_model
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mitoscope", "serve", str(result.model_dir), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        if process.poll() is not None:
            pytest.fail(f"mitoscope serve exited: {process.stdout.read()}")
    else:
        process.kill()
        pytest.fail("mitoscope serve did not answer within 60 s")
    yield url, folder, targets
    process.terminate()
    process.wait(timeout=20)


def test_serve_binds_to_localhost_and_answers_over_http(live_server):
    import httpx

    url, folder, targets = live_server
    assert url.startswith("http://127.0.0.1:")
    path, _ = first_mitosis(folder, targets)
    response = httpx.post(url + "/api/predict", files={"image": (path.name, path.read_bytes())}, timeout=60)
    assert response.status_code == 200 and response.json()["label"] == "Mitosis"


def chromium_path() -> str | None:
    for candidate in (os.environ.get("MITOSCOPE_CHROMIUM"), "/usr/lib/chromium/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def test_the_page_in_a_real_browser_shows_the_label_and_the_heatmap(live_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the [dev] extra)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium installed (Debian: apt-get install chromium); .ci/run installs it")
    url, folder, targets = live_server
    path, _ = first_mitosis(folder, targets)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('cells model')")
            page.set_input_files("#file", str(path))
            page.wait_for_function("document.getElementById('label').textContent.length > 0", timeout=60_000)
            assert page.text_content("#label") == "Mitosis"
            assert page.text_content("#count") == "1"
            page.wait_for_function("document.getElementById('heatmap').complete")
            assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 300
            assert page.get_attribute("#geojson", "href").startswith("blob:")
            # a bad file shows its error, and the page still works
            page.set_input_files("#file", files=[{"name": "bad.png", "mimeType": "image/png", "buffer": b"nope"}])
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=30_000)
            assert "not an image" in page.text_content("#status")
        finally:
            browser.close()
