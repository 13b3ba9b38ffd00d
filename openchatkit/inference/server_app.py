"""The FastAPI application around `ChatService` (openchatkit/inference/server.py): routes, API
key, body limit, error shapes, disconnects, and starting and stopping the backend.

Run with uvicorn (`inference/serve.py`); SIGTERM lets the requests in flight finish (up to
`graceful_s` seconds) before the backend stops and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openchatkit.inference.server import STATIC, ChatService, answer_stream, answer_whole
from openchatkit.inference.server_api import APIError, bad, parse_chat_request

log = logging.getLogger("openchatkit.server")


def create_app(service: ChatService):
    """The ASGI app; the backend starts with the app's lifespan and stops with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not getattr(service.backend, "healthy", False):
            await asyncio.to_thread(service.backend.start)
        try:
            yield
        finally:
            await asyncio.to_thread(service.backend.stop)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    config = service.config

    def error(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError):
        return error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return error(
            APIError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None)
        )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return error(bad("malformed request"))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(APIError(500, f"internal error: {type(exc).__name__}"))

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    async def read_json(request: Request) -> object:
        """The body as JSON, at most config.max_body_bytes (413 beyond)."""
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes")
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad(f"the request body is not valid JSON ({exc})") from None

    @app.get("/health")
    async def health():
        return {
            "status": "ok" if getattr(service.backend, "healthy", True) else "starting",
            "model": service.model_name,
            "backend": service.backend.name,
            "in_flight": service.in_flight,
            "max_in_flight": config.max_in_flight,
            "auth": config.api_key is not None,
            "moderation": service.moderator is not None,
            "retrieval": service.retriever is not None,
            "feedback": service.feedback is not None,
            "context_window": service.loaded.context_window,
            "max_tokens": service.config.defaults.max_tokens,
        }

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        entry = {"id": service.model_name, "object": "model", "created": 0}
        entry["owned_by"] = "openchatkit"
        return {"object": "list", "data": [entry]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_key(request)
        service.check_model(name)
        return {
            "id": service.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "openchatkit",
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_key(request)
        req = parse_chat_request(await read_json(request), config.max_tokens_cap)
        service.check_model(req.model)
        admission = service.admitted()
        admission.__enter__()  # 503 before anything is computed when the queue is full
        try:
            session, plan = await service.plan(req)
        except BaseException:
            admission.__exit__(None, None, None)
            raise
        if req.stream:

            async def events():
                with contextlib.ExitStack() as stack:
                    stack.callback(admission.__exit__, None, None, None)
                    try:
                        async for event in answer_stream(service, req, session, plan):
                            yield event
                    except Exception as exc:  # headers are sent: the error becomes an event
                        log.exception("generation failed")
                        body = APIError(500, f"generation failed: {type(exc).__name__}").body()
                        yield f"data: {json.dumps(body)}\n\n"
                        yield "data: [DONE]\n\n"

            return StreamingResponse(
                events(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            work = asyncio.ensure_future(answer_whole(service, req, session, plan))
            watch = asyncio.ensure_future(_wait_disconnect(request))
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:  # the client left: stop its generation
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                return JSONResponse({}, status_code=499)
            watch.cancel()
            return work.result()
        finally:
            admission.__exit__(None, None, None)

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        check_key(request)
        if service.feedback is None:
            raise APIError(
                404,
                "feedback is off; start the server with --feedback FILE.jsonl",
                code="feedback_disabled",
            )
        record = service.feedback.record_for(await read_json(request))
        if record is not None:
            await asyncio.to_thread(service.feedback.append, record)
        return {"saved": record is not None, "time": int(time.time())}

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


async def _wait_disconnect(request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


def run_server(service: ChatService, host: str, port: int, graceful_s: float = 10.0) -> None:
    """Serve until SIGINT/SIGTERM; requests in flight get `graceful_s` seconds to finish."""
    import uvicorn

    app = create_app(service)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=graceful_s,
    )
