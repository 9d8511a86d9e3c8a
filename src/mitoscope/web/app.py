"""The FastAPI application of ``mitoscope serve``.

``GET /`` the page, ``GET /api/model`` what the model is, ``POST /api/predict`` (multipart field
``image``) the answer for one image, ``GET /healthz``. Every error is one line of JSON,
``{"error": "..."}``, with no traceback and no server path.

No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations (``Request``) at run time.
"""

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from ..errors import InputError, MitoscopeError
from ..predictions import finds_cells
from ..io.slides import is_slide
from .analysis import SUPPORTED, UploadTooLarge, analyse, check_slide, check_upload, display_name, upload_suffix
from .limits import BodyLimit, Busy, PredictionGate

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ServeSettings:
    """Limits of one server; the defaults suit a 4K field on a small machine."""

    max_upload_mb: float = 200.0
    max_pixels: int = 60_000_000
    timeout_s: float = 120.0
    max_waiting: int = 8
    engine: str = "auto"

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "max_pixels", "timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"serve: {name} must be positive; got {getattr(self, name)!r}")
        if self.max_waiting < 0:
            raise InputError(f"serve: max_waiting must be 0 or more; got {self.max_waiting!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2 ** 20)


def _page() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def create_app(model_dir: str | Path, settings: ServeSettings | None = None, model: Any = None) -> Any:
    """The ASGI application serving the model in ``model_dir`` (loaded here, once; or ``model``
    already loaded)."""
    settings = settings or ServeSettings()
    if model is None:
        from ..models import load_model

        model = load_model(model_dir, engine=settings.engine)
    gate = PredictionGate(settings.max_waiting, settings.timeout_s)
    page = _page()
    info = {"model": model.head_name, "classes": list(model.classes), "threshold": float(model.threshold),
            "instances": "cells" if finds_cells(model) else "windows",
            "gives_heatmaps": bool(model.gives_window_scores),
            "max_upload_mb": settings.max_upload_mb, "max_pixels": settings.max_pixels, "formats": SUPPORTED}

    app = FastAPI(title="mitoscope", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "send the image as the multipart form field 'image'")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error while answering a request")
        return error(500, "internal error: the server could not predict this image (see the server's log)")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/model")
    async def model_info() -> dict[str, Any]:
        return info

    @app.get("/healthz")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": gate.in_flight}

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            return error(422, "send the image as the multipart form field 'image'")
        name = display_name(upload.filename)
        with tempfile.TemporaryDirectory(prefix="mitoscope-upload-") as folder:
            head = await upload.read(16)
            if not head:
                return error(422, f"{name}: the file is empty")
            suffix = upload_suffix(head, name)
            if suffix is None:
                return error(415, f"{name}: not an image this server reads (expected {SUPPORTED})")
            path = Path(folder) / f"upload{suffix}"
            with open(path, "wb") as handle:
                handle.write(head)
                while chunk := await upload.read(_CHUNK):
                    handle.write(chunk)
            await upload.close()
            try:
                # a slide is read tile by tile over its tissue: its pixel count is no danger
                size = check_slide(path, name) if is_slide(path) else check_upload(path, name, model.read_options,
                                                                                    settings.max_pixels)
            except UploadTooLarge as exc:
                return error(413, str(exc))
            except InputError as exc:
                return error(422, str(exc))
            try:
                answer = await gate.run(lambda: analyse(model, path, name, size))
            except Busy:
                return error(503, "the server is busy with other images; try again shortly")
            except asyncio.TimeoutError:
                return error(504, f"{name}: prediction took longer than {settings.timeout_s:.0f} s")
            except MitoscopeError as exc:
                return error(422, str(exc))
        return JSONResponse(answer)

    return BodyLimit(app, settings.max_upload_bytes)
