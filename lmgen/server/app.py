"""The FastAPI application: routes, API-key check, model loading in the background.

The model loads on a thread after the server starts listening, so ``/health`` can
answer 503 while it loads; every API route answers 503 too until it is ready.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from lmgen.engine.async_engine import AsyncEngine, EngineStats
from lmgen.engine.engine import Engine
from lmgen.errors import InvalidArgumentError
from lmgen.server.errors import APIError, bad_request, install_handlers
from lmgen.server.limits import install_size_limit
from lmgen.server.metrics import CONTENT_TYPE, Metrics
from lmgen.server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ModelCard, ModelList, TokenizeRequest,
)
from lmgen.server.responses import ResponsesRequest, create_response
from lmgen.server.serving import OpenAIServing, ServerSettings, template_message

logger = logging.getLogger(__name__)


class ServerState:
    """What the routes share: the engine once loaded, or why it is not there."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.engine: AsyncEngine | None = None
        self.serving: OpenAIServing | None = None
        self.load_error: BaseException | None = None
        self.draining = False
        self.started = int(time.time())
        self.metrics = Metrics(lambda: self.engine.stats if self.engine else EngineStats())
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.serving is not None and self.engine.running and not self.draining

    def ready_serving(self) -> OpenAIServing:
        if self.ready:
            return self.serving
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error",
                           code="model_load_failed")
        if self.engine is not None or self.draining:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        raise APIError(503, "the model is still loading: retry when GET /health answers 200", type="server_error",
                       code="model_loading", headers={"Retry-After": "5"})

    def begin_shutdown(self) -> None:
        """Refuse new requests; abort those still running after the grace period. Thread- and signal-safe."""
        if self.loop is not None and self._drain_task is None:
            self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain_task is None:  # the loop keeps only a weak reference to tasks
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        self.draining = True
        if self.engine is None:
            return
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self.engine.num_unfinished_sequences and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # Aborted streams still end properly (finish_reason "abort", then [DONE]), so
        # the connections close on their own before the server's hard timeout.
        self.engine.abort_all()


def _chat_page() -> str:
    return resources.files("lmgen.server").joinpath("static/index.html").read_text(encoding="utf-8")


def build_app(settings: ServerSettings, load_engine: Callable[[], Engine], *,
              on_ready: Callable[[], None] | None = None,
              on_load_failure: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The server application; `load_engine` runs on a background thread at startup."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        _start_loading(state, load_engine, on_ready, on_load_failure)
        yield
        if state.engine is not None:
            await state.engine.shutdown()

    app = FastAPI(title="lmgen", summary="OpenAI-compatible text generation", lifespan=lifespan)
    app.state.lmgen = state
    install_handlers(app)
    install_size_limit(app, settings.max_request_bytes)
    page = _chat_page()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.ready:
            return JSONResponse({"status": "ok"})
        if state.load_error is not None:
            return JSONResponse({"status": "error", "message": str(state.load_error)}, status_code=503)
        status = "stopping" if state.draining or state.engine is not None else "loading"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(_api_router(state))
    return app


def _start_loading(state: ServerState, load_engine: Callable[[], Engine], on_ready: Callable[[], None] | None,
                   on_load_failure: Callable[[BaseException], None] | None) -> None:
    loop = asyncio.get_running_loop()

    def ready(engine: Engine) -> None:
        async_engine = AsyncEngine(engine, observer=state.metrics, max_backlog=state.settings.stream_backlog)
        try:
            serving = OpenAIServing(async_engine, state.settings, state.metrics)
        except InvalidArgumentError as exc:  # settings the model's chat format refuses (a parser's name)
            failed(exc)
            return
        state.engine, state.serving = async_engine, serving
        state.engine.start()
        if on_ready is not None:
            on_ready()

    def failed(exc: BaseException) -> None:
        state.load_error = exc
        logger.error("the model failed to load: %s", exc)
        if on_load_failure is not None:
            on_load_failure(exc)

    def load() -> None:
        try:
            engine = load_engine()
        except Exception as exc:
            result, outcome = failed, exc
        else:
            result, outcome = ready, engine
        try:
            loop.call_soon_threadsafe(result, outcome)
        except RuntimeError:
            pass  # the server stopped while the model was loading

    threading.Thread(target=load, name="lmgen-load", daemon=True).start()


def _api_router(state: ServerState) -> APIRouter:
    """/v1/* and /tokenize, /detokenize: behind the API key when one is set."""

    async def check_api_key(request: Request) -> None:
        key = state.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    router = APIRouter(dependencies=[Depends(check_api_key)])

    @router.get("/v1/models")
    async def list_models() -> ModelList:
        state.ready_serving()
        return ModelList(data=[_model_card(state, name) for name in state.settings.served_model_names])

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        return _model_card(state, state.ready_serving().check_model(model))

    @router.post("/v1/completions")
    async def completions(request: CompletionRequest, raw_request: Request) -> Response:
        return await state.ready_serving().completions(request, raw_request)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await state.ready_serving().chat_completions(request, raw_request)

    @router.post("/v1/responses")
    async def responses(request: ResponsesRequest, raw_request: Request) -> Response:
        return await create_response(state.ready_serving(), request, raw_request)

    @router.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict:
        serving = state.ready_serving()
        serving.check_model(request.model)
        tokenizer = serving.tokenizer
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if request.prompt is not None:
            ids = tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        else:
            messages = [template_message(i, m) for i, m in enumerate(request.messages)]
            try:
                ids = tokenizer.encode_chat(messages, add_generation_prompt=request.add_generation_prompt,
                                            chat_template=request.chat_template)
            except Exception as exc:  # the template rejected the client's conversation
                raise bad_request(f"the chat template could not render these messages: {exc}", "messages") from None
        return {"count": len(ids), "max_model_len": serving.max_model_len, "tokens": ids}

    @router.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict:
        serving = state.ready_serving()
        serving.check_model(request.model)
        vocab = serving.tokenizer.vocab_size
        bad = [t for t in request.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"tokens must be ids in [0, {vocab}); got {bad[:5]}", "tokens")
        return {"prompt": serving.tokenizer.decode(request.tokens)}

    return router


def _model_card(state: ServerState, name: str) -> ModelCard:
    engine = state.engine.engine
    return ModelCard(id=name, created=state.started, root=str(engine.model_path), max_model_len=engine.max_model_len)
