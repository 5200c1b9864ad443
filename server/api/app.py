"""The FastAPI application: thin routes over `OpenAIServing`, OpenAI-shaped errors, auth, metrics.

`create_app(settings, engine)` takes an `EngineCore` (or a ready `AsyncEngine`, or nothing: then
the lifespan builds the real engine with `server.engine.factory.build_engine(settings)`, imported
only then). The lifespan starts the worker thread before the first request and, on shutdown,
stops admitting (503), aborts what is still running and joins the worker. All state lives on
`app.state`; nothing is global, so tests can build many apps in one process.

Every error body is {"error": {"message", "type", "param", "code"}}: malformed JSON, a body that
is not JSON and invalid fields are 400 (never FastAPI's 422), an unknown model 404, a missing or
wrong API key 401, a full queue 429 with Retry-After, shutting down 503, and anything unexpected a
generic 500 whose traceback stays in the server log. An error never costs the client its
keep-alive connection: unexpected exceptions are answered by `CatchAll`, inside Starlette's
ServerErrorMiddleware, which would re-raise them to uvicorn and so close the connection.

With an API key, everything but /health and /metrics needs it, the OpenAPI document and /docs
included: load balancers and Prometheus reach the two probes without credentials, and the server
shows nothing else to a client without the key.
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
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import __version__
from server.api.async_engine import AsyncEngine
from server.api.limits import RequestLimits
from server.api.metrics import CONTENT_TYPE, ServerMetrics
from server.api.openapi import OPEN_PATHS, install_openapi
from server.api.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from server.api.responses import ChatCompletionResponse, CompletionResponse, Health, ModelList
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
        app.state.serving = OpenAIServing(async_engine, settings.served_model_name, settings.default_max_tokens,
                                          spec_metrics=settings.per_request_spec_decode_metrics,
                                          max_batch_size=settings.max_batch_size)
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
    install_openapi(app, protected=settings.api_key is not None)
    app.add_middleware(CatchAll)
    if settings.api_key is not None:
        app.add_middleware(BearerAuth, api_key=settings.api_key.get_secret_value())
    app.add_middleware(RequestLimits, max_body_bytes=settings.max_request_bytes,
                       body_timeout_s=settings.request_body_timeout)  # added last: outermost
    return app


def _build_engine(settings: Settings) -> EngineCore:
    from server.engine.factory import build_engine  # heavy (torch); only when serving for real

    return build_engine(settings)


def _add_routes(app: FastAPI) -> None:
    @app.post("/v1/chat/completions", response_model=None, responses={200: {"model": ChatCompletionResponse}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await _respond(request, _serving(request).chat(body))

    @app.post("/v1/completions", response_model=None, responses={200: {"model": CompletionResponse}})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await _respond(request, _serving(request).completion(body))

    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> ModelList:
        return _serving(request).models()

    @app.get("/health", response_model=Health)
    async def health(request: Request) -> Health:
        engine: AsyncEngine | None = request.app.state.engine
        if engine is None or not engine.is_healthy:
            raise ApiError(503, "not ready: the engine is loading, shutting down or has stopped",
                           type="server_error", code="unavailable")
        return Health()

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format."}})
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
        content_type = request.headers.get("content-type")
        if content_type is not None and not _is_json(content_type):
            return await api_error(request, ApiError(
                400, f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                f"{content_type!r})", code="invalid_content_type"))
        message, param = _describe_validation_errors(exc.errors())
        return await api_error(request, ApiError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, ApiError(exc.status_code, str(exc.detail), headers=exc.headers))



def _is_json(content_type: str) -> bool:
    """application/json, or any +json type (a missing Content-Type is read as JSON too)."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


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
        if error.get("type") == "extra_forbidden":
            msg = "unknown field: this server does not implement it (refused rather than ignored)"
        if str(error.get("type", "")).endswith("_type") and "input" in error:  # strict types: say what came
            msg += f", got {_json_type(error['input'])}"
        field = ".".join(loc)
        params.append(field or None)
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(parts) or "invalid request", next((p for p in params if p), None)


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list", "dict", "none"} or "[" in part or "-" in part


class CatchAll:
    """ASGI middleware: an unexpected exception becomes a generic 500, and the connection lives on.

    Starlette's own last resort (ServerErrorMiddleware) answers 500 too but then re-raises, and
    uvicorn closes a connection whose app raised: the client's next request on it would fail.
    An exception after the response has started cannot be answered; it is re-raised (uvicorn then
    closes the connection, which is right: that response is cut short).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        except Exception as exc:
            if started:
                raise
            log.error("%s %s failed", scope["method"], scope["path"], exc_info=exc)
            await _error_response(ApiError(500, "internal server error", type="server_error"))(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every path but /health and /metrics needs `Authorization: Bearer <api_key>`."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = Headers(scope=scope).get("authorization", "").encode()
            if not secrets.compare_digest(given, self.expected):
                error = ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
