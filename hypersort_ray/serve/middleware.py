"""ASGI middleware: bearer token and body-size cap, before any parser buffers the body (no Ray imports).

FastAPI parses a multipart body completely (spooling the file) before the endpoint runs, so a size check
inside the endpoint comes too late. :class:`BodySizeLimitMiddleware` sits in front of the parser:

* a ``Content-Length`` above the limit is answered 413 at once, without reading the body;
* a body without a length (chunked) is counted while it streams; at the first byte over the limit the
  parser is stopped and the client gets 413 instead of whatever the parser made of the cut-off body.

The limit is looked up per request through a callable, so a Ray Serve replica can supply the value it
was deployed with (the FastAPI app itself is pickled once at import time).

Example:
    >>> from starlette.applications import Starlette
    >>> app = BodySizeLimitMiddleware(Starlette(), limit_bytes=lambda: 1024)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hypersort_ray.serve.validation import bearer_token_ok

__all__ = ["BodySizeLimitMiddleware", "GuardSettings", "RequestGuardMiddleware"]


class _BodyTooLarge(Exception):
    pass


def _too_large_detail(limit: int) -> str:
    return f"request body exceeds the limit of {limit / 2**20:.4g} MiB (max_body_mb)"


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps({"detail": _too_large_detail(limit)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodySizeLimitMiddleware:
    """Answer 413 (JSON ``detail``) when a request body exceeds ``limit_bytes()``.

    Args:
        app: the wrapped ASGI app.
        limit_bytes: returns the current limit in bytes, or None for no limit.
    """

    def __init__(self, app: ASGIApp, limit_bytes: Callable[[], int | None]):
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_bytes()
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(send, limit)
            return

        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                # The parser turned our signal into its own error response: replace it by the 413.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _send_413(send, limit)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not started:
                await _send_413(send, limit)
        except BaseExceptionGroup as group:  # anyio task groups wrap it
            match, rest = group.split(_BodyTooLarge)
            if match is None or rest is not None:
                raise
            if not started:
                await _send_413(send, limit)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class GuardSettings:
    """What :class:`RequestGuardMiddleware` enforces: body cap in bytes (None: none), token (None: no auth)."""

    max_body_bytes: int | None
    token: str | None


class RequestGuardMiddleware:
    """Bearer-token check, then the body-size cap, both before any body byte is parsed.

    Args:
        app: the wrapped ASGI app.
        settings: returns the current :class:`GuardSettings` (looked up per request); None disables both.
        open_paths: paths (relative to the app's root path) that need no token, e.g. ``/healthz``.
    """

    def __init__(self, app: ASGIApp, settings: Callable[[], GuardSettings | None], open_paths: Collection[str] = ()):
        self.app = app
        self.settings = settings
        self.open_paths = frozenset(open_paths)
        self.limited = BodySizeLimitMiddleware(app, limit_bytes=self._limit)

    def _limit(self) -> int | None:
        current = self.settings()
        return current.max_body_bytes if current else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        current = self.settings()
        if current and current.token and relative_path(scope) not in self.open_paths:
            authorization = None
            for key, value in scope.get("headers", []):
                if key == b"authorization":
                    authorization = value.decode("latin-1")
                    break
            if not bearer_token_ok(authorization, current.token):
                response = JSONResponse(
                    {"detail": "missing or invalid bearer token (Authorization: Bearer <token>)"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.limited(scope, receive, send)


def relative_path(scope: Scope) -> str:
    """The request path below the app's mount point (Serve sets ``root_path`` to the route prefix)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return "/" + path.lstrip("/")
