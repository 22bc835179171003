"""Errors in OpenAI's JSON format: ``{"error": {"message", "type", "param", "code"}}``.

``APIError`` carries an HTTP status; the app turns it (and request validation errors) into
that JSON, so the official ``openai`` client raises its matching exception class
(``BadRequestError``, ``AuthenticationError``, ``RateLimitError``, ...) with our message.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "error_body", "swarm_error"]


class APIError(Exception):
    """An error answered to the HTTP client with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def swarm_error(exc: BaseException, after_tokens: int = 0) -> APIError:
    """What a user should read when the swarm could not answer (503: retrying later may help).

    ``after_tokens``: tokens already sent when it failed (the answer stopped midway)."""
    error = _swarm_error(exc)
    if after_tokens:
        error.message = f"the answer stopped after {after_tokens} tokens: {error.message}"
    return error


def _swarm_error(exc: BaseException) -> APIError:
    from biopetals.client.errors import MissingBlocksError, RequestError, SwarmError

    if isinstance(exc, RequestError):  # the request itself (a limit, a shape): no node failed, retrying won't help
        return APIError(400, f"the request cannot be served: {exc}", "invalid_request_error", "invalid_value")
    if isinstance(exc, MissingBlocksError):
        if not exc.found:
            return APIError(503, "the swarm is unreachable: no node serving this model was found (are the nodes "
                                 f"up, and are --initial-peers and --swarm-key right?). {exc}", "swarm_error",
                            "swarm_unreachable")
        ranges = ", ".join(f"{s}:{e}" for s, e in exc.missing)
        return APIError(503, f"the swarm cannot serve this model now: blocks {ranges} have no online node. {exc}",
                        "swarm_error", "blocks_missing")
    if isinstance(exc, SwarmError):
        # the same failure repeats once per re-route: say each once
        what = str(exc).split(" Failures: ", 1)[0]
        failures = list(dict.fromkeys(str(f) for f in exc.failures))[-4:]
        if failures:
            what += " Failures: " + "; ".join(failures)
        return APIError(503, f"the swarm failed to answer (nodes failed and no other node could take over their "
                             f"blocks): {what}", "swarm_error", "swarm_failed")
    if isinstance(exc, (OSError, TimeoutError)):
        return APIError(503, f"the swarm is unreachable: {exc}", "swarm_error", "swarm_unreachable")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error", "internal_error")
