"""The FastAPI app: OpenAI's /v1 routes, the swarm view's data, the web page; errors as OpenAI's JSON.

``create_app(engine, api_keys=None)``. Routes:

- ``GET /v1/models``; ``POST /v1/chat/completions`` and ``POST /v1/completions``, streaming
  (server-sent events, OpenAI's chunk format, ``data: [DONE]`` last) or not. The answer's
  last chunk (or the response) also carries ``biopetals``: the route taken, tokens/s and what
  speculative decoding did (``prompt_lookup``, ``rollbacks``).
- ``GET /api/swarm``: the swarm view (``swarm_view``); ``GET /``: the page (``static/``).

A streaming request waits for its first token (or its error) before it answers, so an
error before any text (swarm unreachable, blocks missing) is a plain HTTP error (503); an
error after it ends the stream with an error chunk (``data: {"error": {...}}``), which
OpenAI's client raises. When the HTTP client goes away, the generation is cancelled and its
session on the nodes closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import check_key, needs_key
from .engine import Engine, Event, Generation, GenerationParams
from .errors import APIError
from .schemas import ChatRequest, CompletionRequest, SamplingFields
from .swarm_view import SwarmView

__all__ = ["create_app"]

log = logging.getLogger("biopetals.api")

STATIC = resources.files("biopetals.api") / "static"


def create_app(engine: Engine, api_keys: tuple[str, ...] | None = None) -> FastAPI:
    app = FastAPI(title="BioPetals API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    view = SwarmView(engine)

    if api_keys:
        app.add_middleware(_RequireKey, keys=api_keys)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        return _error_response(APIError(400, f"invalid request: {where + ': ' if where else ''}{message}",
                                        code="invalid_value", param=where or None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error",
                                        "internal_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(exc.status_code, str(exc.detail), code="not_found"
                                        if exc.status_code == 404 else None))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        _check_model(engine, name)
        return _model_card(engine)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        _check(engine, body)
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        return await _serve(engine, request, body, engine.chat_inputs(messages), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check(engine, body)
        return await _serve(engine, request, body, engine.completion_inputs(body.prompt), chat=False)

    @app.get("/api/swarm")
    async def swarm() -> dict[str, Any]:
        return await view.snapshot()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


class _RequireKey:
    """Pure ASGI middleware (not ``BaseHTTPMiddleware``, which would hide the client's disconnect from
    ``request.is_disconnected()``): 401 for any request without a valid key, except the page's files."""

    def __init__(self, app: Any, keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and needs_key(scope["path"]):
            authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            try:
                check_key(authorization, self.keys)
            except APIError as exc:
                await _error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _model_card(engine: Engine) -> dict[str, Any]:
    return {"id": engine.served_name, "object": "model", "created": engine.created, "owned_by": "biopetals",
            "context_length": engine.context_length}


def _check_model(engine: Engine, name: str) -> None:
    if name != engine.served_name:
        raise APIError(404, f"the model '{name}' does not exist here; this server serves '{engine.served_name}'",
                       code="model_not_found", param="model")


def _check(engine: Engine, body: SamplingFields) -> None:
    _check_model(engine, body.model)
    try:
        body.check_unsupported()
    except ValueError as exc:
        raise APIError(400, str(exc), code="unsupported_parameter") from None


async def _serve(engine: Engine, request: Request, body: SamplingFields, inputs: dict, chat: bool) -> Response:
    prompt_tokens = int(inputs["input_ids"].shape[1])
    params = GenerationParams(max_new_tokens=engine.new_tokens(prompt_tokens, body.new_tokens),
                              min_new_tokens=body.min_tokens,
                              temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                              stops=tuple(body.stop or ()),
                              prompt_lookup=engine.prompt_lookup_for(body.prompt_lookup, body.temperature))
    generation = engine.start(inputs, params)
    shape = _Shape(engine.served_name, chat)
    events = generation.events()
    try:
        first = await _next_or_disconnect(events, request, generation)
    except BaseException:
        generation.cancel()
        raise
    if first.kind == "error":
        assert first.error is not None
        raise first.error
    if body.stream:
        return StreamingResponse(_stream(shape, first, events, generation, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    text, last = [], first
    try:
        while last.kind == "text":
            text.append(last.text)
            last = await _next_or_disconnect(events, request, generation)
    finally:
        generation.cancel()  # no-op when done; stops it if we were cancelled or the client left
    if last.kind == "error":
        assert last.error is not None
        raise last.error
    return JSONResponse(shape.whole("".join(text), last))


async def _next_or_disconnect(events: AsyncIterator[Event], request: Request, generation: Generation) -> Event:
    """The next event; cancels the generation if the HTTP client disconnects meanwhile."""
    nxt = asyncio.ensure_future(anext(events))
    while True:
        done, _ = await asyncio.wait({nxt}, timeout=0.5)
        if done:
            return nxt.result()
        if await request.is_disconnected():
            generation.cancel()
            nxt.cancel()
            raise APIError(499, "the client closed the request", code="client_closed_request")


async def _stream(shape: "_Shape", first: Event, events: AsyncIterator[Event], generation: Generation,
                  include_usage: bool) -> AsyncIterator[str]:
    try:
        yield _sse(shape.chunk(role=True))
        event = first
        while True:
            if event.kind == "text":
                yield _sse(shape.chunk(text=event.text))
            elif event.kind == "error":
                assert event.error is not None
                yield _sse(event.error.body())
                break
            else:
                yield _sse(shape.chunk(finish=event))
                if include_usage:
                    yield _sse(shape.usage_chunk(event))
                break
            event = await anext(events)
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnected and Starlette cancelled us
        generation.cancel()


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Shape:
    """OpenAI's response and chunk objects for one request (chat or text completion)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model = model
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def chunk(self, text: str = "", role: bool = False, finish: Event | None = None) -> dict[str, Any]:
        reason = None if finish is None else _reason(finish)
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if finish is None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            out = self._head("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            out = self._head("text_completion")
        out["choices"] = [choice]
        if finish is not None:
            out["biopetals"] = _extra(finish)
        return out

    def usage_chunk(self, done: Event) -> dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = _usage(done)
        return out

    def whole(self, text: str, done: Event) -> dict[str, Any]:
        if self.chat:
            out = self._head("chat.completion")
            out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                               "finish_reason": _reason(done)}]
        else:
            out = self._head("text_completion")
            out["choices"] = [{"index": 0, "text": text, "logprobs": None, "finish_reason": _reason(done)}]
        out["usage"] = _usage(done)
        out["biopetals"] = _extra(done)
        return out


def _reason(done: Event) -> str:
    return "stop" if done.finish_reason in ("stop", "cancelled") else (done.finish_reason or "stop")


def _usage(done: Event) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _extra(done: Event) -> dict[str, Any]:
    return {"route": done.route, "time_to_first_token": done.time_to_first_token,
            "tokens_per_second": done.tokens_per_second,
            # speculative decoding (README "Speculative decoding"): candidates per step, and how many
            # steps had candidates rejected (rolled back on the nodes)
            "prompt_lookup": done.prompt_lookup, "rollbacks": done.rollbacks}
