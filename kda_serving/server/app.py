"""The FastAPI app: routes, bearer auth, OpenAI-format errors, and the engine's lifetime.

    app = create_app(AsyncLLMEngine(EngineConfig()), ServerConfig(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

The app starts the engine when it starts (ASGI lifespan) and shuts it down when it stops. Nothing is written to
disk: a killed server loses only its in-flight requests and restarts clean.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from kda_serving.server.admission import Admission
from kda_serving.server.chat import create_chat_completion
from kda_serving.server.completions import create_completion
from kda_serving.server.config import ServerConfig
from kda_serving.server.errors import APIError, error_response
from kda_serving.server.metrics import ServerMetrics
from kda_serving.server.response_store import ResponseStore
from kda_serving.server.responses import (cancel_response, create_response, delete_response, list_input_items,
                                          retrieve_response)
from kda_serving.server.tokenize import detokenize, tokenize

logger = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ServerState:
    """What every handler needs, kept on `app.state.server`."""

    engine: object  # kda_serving.engine.AsyncLLMEngine or anything with its interface
    config: ServerConfig
    metrics: ServerMetrics
    responses: ResponseStore = None  # the stored /v1/responses answers
    admission: Admission = field(default_factory=Admission)  # generation requests in flight, and their limit
    background: dict = field(default_factory=dict)  # response id -> the asyncio task generating it
    started_at: int = 0
    ready: bool = False
    _tool_parser: object = None
    _tool_parser_made: bool = False

    @property
    def tool_parser(self):
        """The tool-call parser for `tool_choice: "auto"` (config.tool_call_parser over the engine's tokenizer),
        or None; made on first use, once the engine has loaded its tokenizer."""
        if not self._tool_parser_made:
            from .tool_parsers import tool_parser_for

            self._tool_parser = tool_parser_for(self.engine.tokenizer, self.config.tool_call_parser)
            self._tool_parser_made = True
        return self._tool_parser


# What an API key guards: the OpenAI API and the tokenizer endpoints (/health and /metrics stay open)
PROTECTED_PATHS = ("/v1", "/tokenize", "/detokenize")


class BearerAuth:
    """Refuses requests to PROTECTED_PATHS without `Authorization: Bearer <api_key>` (401 in OpenAI's format).

    A plain ASGI middleware rather than Starlette's BaseHTTPMiddleware, which would buffer streamed answers and
    hide client disconnects from the stream.
    """

    def __init__(self, app: ASGIApp, api_key: str, metrics: ServerMetrics):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PATHS):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.metrics.http_errors.labels(status="401").inc()
                message = "Invalid API key." if given else "Missing API key: send 'Authorization: Bearer <key>'."
                response = error_response(401, message, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """An app serving `engine` (not yet started: the app's lifespan starts and stops it)."""
    config = config or ServerConfig()
    server = ServerState(engine=engine, config=config, metrics=ServerMetrics(engine),
                         responses=ResponseStore(config.max_stored_response_bytes),
                         admission=Admission(config.max_concurrent_requests))
    server.metrics.watch_response_store(server.responses)
    server.metrics.watch_admission(server.admission)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        await engine.start()
        try:
            _ = server.tool_parser  # a named format the tokenizer lacks fails the start, not a request
        except ValueError as exc:
            await engine.shutdown()
            raise RuntimeError(f"--tool-call-parser: {exc}") from None
        server.started_at = int(time.time())
        server.ready = True
        logger.info("serving model %r (max_model_len %d)", engine.model_name, engine.max_model_len)
        try:
            yield
        finally:
            server.ready = False
            for task in list(server.background.values()):  # background responses end cancelled, not cut off
                task.cancel()
            await asyncio.gather(*server.background.values(), return_exceptions=True)
            await engine.shutdown()

    app = FastAPI(title="kda-serving", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if config.api_key is not None:
        app.add_middleware(BearerAuth, api_key=config.api_key, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def on_api_error(_request: Request, exc: APIError) -> JSONResponse:
        server.metrics.http_errors.labels(status=str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        server.metrics.http_errors.labels(status=str(exc.status_code)).inc()
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        server.metrics.http_errors.labels(status="500").inc()
        return error_response(500, f"Internal server error: {type(exc).__name__}")

    @app.get("/health")
    async def health() -> Response:
        if not server.ready or not getattr(engine, "is_running", True):
            return error_response(503, "The engine is not running.")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card(server)]})

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> JSONResponse:
        if model != engine.model_name:
            raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return JSONResponse(_model_card(server))

    def served(handler):
        async def route(request: Request) -> Response:
            return await handler(request, server)

        return route

    for path, handler in (("/v1/completions", create_completion), ("/v1/chat/completions", create_chat_completion),
                          ("/v1/responses", create_response), ("/tokenize", tokenize), ("/detokenize", detokenize)):
        app.add_api_route(path, served(handler), methods=["POST"])
    app.add_api_route("/v1/responses/{response_id}", served(retrieve_response), methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}", served(delete_response), methods=["DELETE"])
    app.add_api_route("/v1/responses/{response_id}/input_items", served(list_input_items), methods=["GET"])
    app.add_api_route("/v1/responses/{response_id}/cancel", served(cancel_response), methods=["POST"])
    return app


def _model_card(server: ServerState) -> dict:
    return {"id": server.engine.model_name, "object": "model", "created": server.started_at,
            "owned_by": "kda-serving", "max_model_len": int(server.engine.max_model_len)}
