"""What keeps uploads from hurting the server: a body-size limit enforced while the bytes arrive,
and a gate that runs one prediction at a time with a bounded number waiting."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Awaitable, Callable, TypeVar

from starlette.exceptions import HTTPException

T = TypeVar("T")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """The request body passed the limit while it was being received: an HTTP 413 that the
    application's handlers answer (a response may not have started yet, so that is where it must be said)."""

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


async def send_json_error(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: a request whose Content-Length, or whose bytes as they arrive (chunked
    uploads), pass ``max_bytes`` gets 413 before more of it is read or written anywhere."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = int(max_bytes)

    def _message(self) -> str:
        return f"the upload is larger than this server takes ({self.max_bytes / 2 ** 20:.0f} MiB)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                await send_json_error(send, 400, "the Content-Length header is not a number")
                return
            if too_large:
                await send_json_error(send, 413, self._message())
                return
        received = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self._message())
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:  # raised outside the application's handlers (e.g. while a middleware read)
            if not started:
                await send_json_error(send, 413, self._message())


class Busy(Exception):
    """More predictions are waiting than the server queues."""


class PredictionGate:
    """One prediction runs at a time (the model uses every core for one image); at most
    ``max_waiting`` more wait for it, the rest are refused at once (:class:`Busy`). A
    prediction that takes longer than ``timeout_s`` is answered with :class:`TimeoutError`;
    its thread finishes in the background and holds its place in the queue until then, so
    slow requests cannot pile up without bound."""

    def __init__(self, max_waiting: int, timeout_s: float) -> None:
        self.max_waiting = int(max_waiting)
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()  # the model: one at a time
        self._count = threading.Lock()
        self._in_flight = 0  # running + waiting (including timed-out threads still running)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def run(self, work: Callable[[], T]) -> T:
        with self._count:
            if self._in_flight > self.max_waiting:
                raise Busy
            self._in_flight += 1

        def guarded() -> T:
            try:
                with self._lock:
                    return work()
            finally:
                with self._count:
                    self._in_flight -= 1

        future = asyncio.get_running_loop().run_in_executor(None, guarded)
        # A timed-out prediction's outcome is read when it ends, so that it is not reported as lost.
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
