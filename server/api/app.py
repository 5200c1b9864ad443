"""The FastAPI application: thin routes over `OpenAIServing`, OpenAI-shaped errors, auth, metrics.

`create_app(settings, engine)` takes an `EngineCore` (or a ready `AsyncEngine`, or nothing: then
the lifespan builds the real engine with `server.engine.factory.build_engine(settings)`, imported
only then). The lifespan starts the worker thread before the first request and, on shutdown,
stops admitting (503), aborts what is still running and joins the worker. All state lives on
`app.state`; nothing is global, so tests can build many apps in one process.

Every error body is {"error": {"message", "type", "param", "code"}}: malformed JSON and invalid
fields are 400 (never FastAPI's 422), an unknown model 404, a missing or wrong API key 401, a full
queue 429 with Retry-After, shutting down 503, and anything unexpected a generic 500 whose
traceback stays in the server log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from server import __version__
from server.api.async_engine import AsyncEngine
from server.api.limits import RequestLimits
from server.api.metrics import CONTENT_TYPE, ServerMetrics
from server.api.protocol import ApiError, ChatCompletionRequest, CompletionRequest, ModelList
from server.api.serving import OpenAIServing
from server.engine.types import EngineCore
from server.settings import Settings

log = logging.getLogger(__name__)

CLIENT_CLOSED_STATUS = 499  # nginx's convention; the client never sees it


def create_app(settings: Settings, engine: EngineCore | AsyncEngine | None = None) -> FastAPI:
    """Build the app; `engine=None` loads the real engine at start-up."""
    metrics = engine.metrics if isinstance(engine, AsyncEngine) else ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        core = engine if engine is not None else await asyncio.to_thread(_build_engine, settings)
        if isinstance(core, AsyncEngine):
            async_engine = core
        else:
            async_engine = AsyncEngine(core, metrics, settings.max_batch_size, settings.max_queue)
        async_engine.start()
        app.state.engine = async_engine
        app.state.serving = OpenAIServing(async_engine, settings.served_model_name, settings.default_max_tokens)
        log.info("serving %s (max_model_len=%d)", settings.served_model_name, async_engine.core.max_model_len)
        try:
            yield
        finally:
            await async_engine.shutdown()

    app = FastAPI(title="ctc-serve", version=__version__, lifespan=lifespan, strict_content_type=False)
    app.state.metrics = metrics
    app.state.engine = None
    _add_error_handlers(app)
    _add_routes(app)
    if settings.api_key is not None:
        app.add_middleware(BearerAuth, api_key=settings.api_key.get_secret_value())
    app.add_middleware(RequestLimits, max_body_bytes=settings.max_request_bytes,
                       body_timeout_s=settings.request_body_timeout)  # added last: outermost
    return app


def _build_engine(settings: Settings) -> EngineCore:
    from server.engine.factory import build_engine  # heavy (torch); only when serving for real

    return build_engine(settings)


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await _respond(request, _serving(request).chat(body))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _respond(request, _serving(request).completion(body))

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        return _serving(request).models()

    @app.get("/health")
    async def health(request: Request) -> dict[str, str]:
        engine: AsyncEngine | None = request.app.state.engine
        if engine is None or not engine.is_healthy:
            raise ApiError(503, "not ready: the engine is loading, shutting down or has stopped",
                           type="server_error", code="unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


def _serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing | None = getattr(request.app.state, "serving", None)
    if serving is None or not serving.engine.is_healthy:
        raise ApiError(503, "the server is not ready or is shutting down", type="server_error", code="unavailable")
    return serving


async def _respond(request: Request, work: Awaitable[object]) -> Any:
    """Await the serving call, cancelling it if the client disconnects first (frees the slot).

    Streams are handed to sse-starlette, which watches for disconnects itself from then on.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            task.add_done_callback(_discard_result)  # nobody awaits it if we are cancelled ourselves
    if task not in done:
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("client disconnected before the response started")
        return Response(status_code=CLIENT_CLOSED_STATUS)
    result = task.result()
    if isinstance(result, AsyncIterator):
        return EventSourceResponse(result, sep="\n")
    return result


def _discard_result(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()  # mark retrieved: the client is gone, there is nobody to tell


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body.model_dump(), status_code=exc.status_code, headers=exc.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation_errors(exc.errors())
        return await api_error(request, ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, ApiError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error_response(ApiError(500, "internal server error", type="server_error"))


def _describe_validation_errors(errors: Any) -> tuple[str, str | None]:
    """One readable message (and the first offending field) from pydantic's error list."""
    parts, params = [], []
    for error in errors:
        # Drop "body" and pydantic's union-member tags ("str", "list[str]", "function-after[...]").
        loc = [str(p) for p in error.get("loc", ()) if p != "body" and not _is_type_tag(str(p))]
        if error.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON: {error.get('ctx', {}).get('error', 'decode error')}")
            continue
        msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        field = ".".join(loc)
        params.append(field or None)
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(parts) or "invalid request", next((p for p in params if p), None)


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list", "dict", "none"} or "[" in part or "-" in part


class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api_key>`; /health and /metrics stay open."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                error = ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
