"""Per-request deadlines and cancellation that reach the inference thread (no Ray; torch imported lazily).

A request's work runs in a worker thread. When the request's deadline passes, or its client leaves (Serve
cancels the request's task), the event loop cannot stop that thread; it can only ask it to stop. This
module carries the question into the thread:

* :class:`CancelToken` -- a deadline plus a flag the event loop sets when the client is gone.
* :func:`run_with_token` -- runs a function in the current (worker) thread with the token attached; the
  work is skipped outright when the token already expired while the request waited for a thread.
* :func:`checkpoint` -- raises :class:`Cancelled` once the token of the current thread expired. Long
  loops call it (the bounded gunzip, between styles).
* :func:`install_forward_hook` -- a process-wide torch forward pre-hook that calls :func:`checkpoint`
  before every module forward, so a sliding-window pass stops at its next window instead of running to
  the end. Threads without a token (warm-up, other code) pay one attribute lookup per module call.

Example:
    >>> import time
    >>> token = CancelToken(deadline=time.monotonic() + 60)
    >>> run_with_token(token, lambda: 41 + 1)
    42
    >>> token.cancel()
    >>> run_with_token(token, lambda: 42)
    Traceback (most recent call last):
    ...
    hypersort_ray.serve.deadline.Cancelled: the client left or the request was cancelled
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["CancelToken", "Cancelled", "checkpoint", "current_token", "install_forward_hook", "run_with_token"]

_local = threading.local()
_hook_lock = threading.Lock()
_hook_handle: Any = None


class Cancelled(Exception):
    """The request's deadline passed or its client left: stop the work, nobody waits for it."""

    def __init__(self, reason: str, *, timed_out: bool):
        super().__init__(reason)
        self.timed_out = timed_out


class CancelToken:
    """A deadline (``time.monotonic()`` seconds, None for none) and a cancel flag, shared across threads."""

    def __init__(self, deadline: float | None = None):
        self.deadline = deadline
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the work to stop (thread-safe; called from the event loop)."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None without one; may be negative)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise :class:`Cancelled` once cancelled or past the deadline."""
        if self._event.is_set():
            raise Cancelled("the client left or the request was cancelled", timed_out=False)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Cancelled("the request's deadline passed", timed_out=True)


def current_token() -> CancelToken | None:
    """The token attached to the calling thread (None outside :func:`run_with_token`)."""
    return getattr(_local, "token", None)


def checkpoint() -> None:
    """Raise :class:`Cancelled` when the calling thread's request should stop; no-op without a token."""
    token = getattr(_local, "token", None)
    if token is not None:
        token.check()


def run_with_token(token: CancelToken, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` with ``token`` attached to this thread; skipped when the token already expired."""
    token.check()  # waited in the pool's queue past its deadline, or its client already left
    previous = getattr(_local, "token", None)
    _local.token = token
    try:
        return fn(*args)
    finally:
        _local.token = previous


def _forward_pre_hook(module: Any, args: Any) -> None:
    token = getattr(_local, "token", None)
    if token is not None:
        token.check()


def install_forward_hook() -> None:
    """Register the process-wide torch forward pre-hook once (idempotent, thread-safe)."""
    global _hook_handle
    with _hook_lock:
        if _hook_handle is not None:
            return
        from torch.nn.modules.module import register_module_forward_pre_hook

        _hook_handle = register_module_forward_pre_hook(_forward_pre_hook)
