"""``lmgen serve --replicas N``: N engine replicas on Ray Serve behind one OpenAI endpoint.

Two deployments. ``EngineReplica`` (N of them) each runs one engine inside lmgen's own
server app (:func:`lmgen.server.app.build_app`, called in process, over ASGI), so every
route answers exactly as ``lmgen serve`` answers it. ``Ingress`` (one, no CPU of its own) is
the HTTP endpoint: it reads each request's body, hashes its prompt's prefix, and hands the
request to the replica :class:`~lmgen.server.ray_router.PrefixAffinityRouter` picks,
relaying the answer as it streams; it also answers ``/metrics`` with every replica's metrics,
each sample labelled ``replica``. Responses carry the replica's id in ``x-lmgen-replica``.

A replica that dies mid-request leaves its requests answered with an OpenAI-shaped 503 (a
stream already under way ends with an error event, then ``[DONE]``); Ray Serve starts a new
replica in its place while the others go on serving.

For an existing Ray cluster, as a Ray Serve application (arguments are ``lmgen serve``'s
flags without their dashes)::

    serve run lmgen.server.ray_app:build_app model=PATH replicas=2 dtype=bfloat16
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from lmgen.engine.config import EngineConfig
from lmgen.engine.engine import Engine
from lmgen.errors import InvalidArgumentError, LmgenError
from lmgen.server.app import build_app as build_server_app
from lmgen.server.errors import APIError, install_handlers, sse_error
from lmgen.server.limits import install_size_limit
from lmgen.server.metrics import CONTENT_TYPE, merge_metrics
from lmgen.server.ray_router import ForwardedRequest, PrefixAffinityRouter, prefix_hashes, prompt_text
from lmgen.server.serving import SSE_DONE, ServerSettings

APP_NAME = "lmgen"
REPLICA_HEADER = "x-lmgen-replica"
_METRICS_TIMEOUT_S = 10.0
_HTTP_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


@dataclass(frozen=True)
class ReplicaOptions:
    """How many engine replicas, and what Ray reserves for each."""

    replicas: int
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidArgumentError(f"--replicas must be at least 1, got {self.replicas}")
        if self.cpus < 0 or self.gpus < 0:
            raise InvalidArgumentError(f"--replica-cpus and --replica-gpus must be >= 0, got {self.cpus}, "
                                       f"{self.gpus}")


class EngineReplica:
    """One engine inside lmgen's server app; runs the requests the ingress forwards to it."""

    async def __init__(self, engine_config: EngineConfig, settings: ServerSettings) -> None:
        loaded = asyncio.get_running_loop().create_future()
        self.app = build_server_app(settings, lambda: Engine(engine_config),
                                    on_ready=lambda: loaded.set_result(None), on_load_failure=loaded.set_exception)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        await loaded  # Ray Serve sends requests once the model is loaded; a load error fails the replica
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def __del__(self) -> None:
        await self._lifespan.__aexit__(None, None, None)  # stops the engine

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose engine thread has stopped."""
        if not self.app.state.lmgen.engine.running:
            raise RuntimeError("the engine thread stopped")

    def metrics(self) -> tuple[str, str]:
        """This replica's id and its Prometheus text."""
        return self.replica_id, self.app.state.lmgen.metrics.render().decode()

    async def handle(self, request: ForwardedRequest) -> AsyncIterator[dict]:
        """Runs the request through the app; yields its ASGI response messages: the start (status and
        headers, with this replica's id added), then the body's chunks as the app sends them."""
        messages: asyncio.Queue[dict | None] = asyncio.Queue()
        left = asyncio.Event()
        unread = [{"type": "http.request", "body": request.body, "more_body": False}]

        async def receive() -> dict:
            if unread:
                return unread.pop()
            await left.wait()  # the app's disconnect watchers wait here until the ingress lets go
            return {"type": "http.disconnect"}

        def finished(task: asyncio.Task) -> None:
            if not task.cancelled():
                task.exception()  # an app error was already answered (500) and logged by its handler
            messages.put_nowait(None)

        task = asyncio.ensure_future(self.app(_scope(request), receive, messages.put))
        task.add_done_callback(finished)
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (REPLICA_HEADER.encode(), self.replica_id.encode())]}
                yield message
        finally:
            left.set()  # the response ended or the ingress cancelled it: an unfinished request is aborted


def _scope(request: ForwardedRequest) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
            "root_path": "", "query_string": request.query_string, "headers": request.headers,
            "client": None, "server": None}


@serve.ingress()
class Ingress:
    """The HTTP endpoint in front of the engine replicas."""

    def __init__(self, engines: DeploymentHandle, max_request_bytes: int) -> None:
        self.engines = engines
        self.max_request_bytes = max_request_bytes

    def __serve_build_asgi_app__(self) -> FastAPI:
        return ingress_app(self.engines, self.max_request_bytes)


def ingress_app(engines: DeploymentHandle, max_request_bytes: int) -> FastAPI:
    """/metrics from every replica; every other request forwarded to the replica the router picks."""
    app = FastAPI(title="lmgen on Ray Serve", docs_url=None, redoc_url=None, openapi_url=None)  # a replica's
    install_handlers(app)
    install_size_limit(app, max_request_bytes)  # a body over the limit is refused before it is held whole
    streams = engines.options(stream=True)

    @app.get("/metrics")
    async def metrics() -> Response:
        answers = await engines.broadcast("metrics").results_async(timeout_s=_METRICS_TIMEOUT_S,
                                                                 return_exceptions=True)
        texts = dict(answer for answer in answers if not isinstance(answer, BaseException))
        return Response(merge_metrics(texts, "replica"), media_type=CONTENT_TYPE)

    @app.api_route("/{path:path}", methods=_HTTP_METHODS, include_in_schema=False)
    async def forward(request: Request) -> Response:
        body = await request.body()
        path = request.url.path
        forwarded = ForwardedRequest(request.method, path, request.scope["query_string"],
                                     list(request.scope["headers"]), body, prefix_hashes(prompt_text(path, body)))
        messages = streams.handle.remote(forwarded)
        try:
            start = await messages.__anext__()
        except BackPressureError:
            raise APIError(429, "the server is busy: every replica's queue is full; retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except RayError as exc:
            raise _replica_error(exc) from None
        response = StreamingResponse(_relay(messages, _is_event_stream(start)), status_code=start["status"])
        response.raw_headers = list(start.get("headers", []))  # as the replica's app wrote them
        return response

    return app


def _is_event_stream(start: Mapping) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
               for name, value in start.get("headers", []))


async def _relay(messages: AsyncIterator[dict], event_stream: bool) -> AsyncIterator[bytes]:
    """The body chunks; a stream whose replica fails ends as lmgen's own streams end on an error."""
    try:
        async for message in messages:
            yield message.get("body", b"")
    except RayError as exc:
        if not event_stream:
            raise  # a JSON body cut short: nothing can be appended to it
        yield (sse_error(_replica_error(exc)) + SSE_DONE).encode()


def _replica_error(exc: RayError) -> APIError:
    if isinstance(exc, RayTaskError):  # lmgen's replica code raised: a bug
        return APIError(500, f"internal error in the engine replica: {exc}", type="server_error",
                        code="internal_error")
    return APIError(503, f"the engine replica serving this request failed ({type(exc).__name__}); retry",
                    type="server_error", code="replica_failed", headers={"Retry-After": "1"})


def replica_application(engine_config: EngineConfig, settings: ServerSettings,
                        options: ReplicaOptions) -> serve.Application:
    """The Ray Serve application: the ingress bound to `options.replicas` engine replicas."""
    engines = serve.deployment(EngineReplica).options(
        name="EngineReplica", num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.cpus, "num_gpus": options.gpus},
        # Each replica takes a full batch; further requests wait at the ingress for the first replica with
        # room (the prefix's holder first), or are refused with 429 past --max-queued-requests.
        max_ongoing_requests=engine_config.max_num_seqs,
        max_queued_requests=-1 if settings.max_queued_requests is None else settings.max_queued_requests,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        max_constructor_retry_count=options.replicas,  # a model that fails to load fails on every try
        request_router_config=RequestRouterConfig(
            request_router_class=f"{PrefixAffinityRouter.__module__}.{PrefixAffinityRouter.__qualname__}"))
    ingress = serve.deployment(Ingress).options(name="Ingress", num_replicas=1, max_ongoing_requests=100_000,
                                                ray_actor_options={"num_cpus": 0})
    return ingress.bind(engines.bind(engine_config, settings), settings.max_request_bytes)


def build_app(args: Mapping[str, object]) -> serve.Application:
    """The application for ``serve run lmgen.server.ray_app:build_app model=PATH replicas=2 ...`` or a Ray
    Serve config file: `args` are ``lmgen serve``'s flags without their dashes, read by its own parser."""
    from lmgen.cli import build_parser, serve_settings

    argv = ["serve"]
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    try:
        parsed = build_parser().parse_args(argv)
    except SystemExit:  # argparse printed why
        raise InvalidArgumentError(f"bad lmgen serve arguments: {' '.join(argv[1:])}") from None
    engine_config, settings, options = serve_settings(parsed)
    return replica_application(engine_config, settings, options or ReplicaOptions(1))


def serve_replicas(engine_config: EngineConfig, settings: ServerSettings, options: ReplicaOptions, *,
                   host: str, port: int) -> int:
    """Start the replicas on Ray (the cluster RAY_ADDRESS names, else a local one) and serve until SIGTERM or
    SIGINT; then remove the application (other applications on the cluster stay). Raises LmgenError when the
    replicas cannot start (their model failed to load)."""
    ray.init(log_to_driver=logging.getLogger("lmgen").getEffectiveLevel() <= logging.INFO)
    signal.signal(signal.SIGTERM, _interrupt)  # in place of Ray's handler, which aborts the process
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(replica_application(engine_config, settings, options), name=APP_NAME, route_prefix="/")
            names = ", ".join(settings.served_model_names)
            print(f"lmgen: serving {names} on http://{host}:{port} with {options.replicas} replica(s) on Ray Serve",
                  file=sys.stderr, flush=True)
            threading.Event().wait()
        except KeyboardInterrupt:  # SIGTERM or SIGINT
            pass
        except RuntimeError:  # from serve.run: the deployment failed; its status says why
            raise LmgenError(f"the replicas failed to start: {_deployment_error()}") from None
        finally:
            serve.delete(APP_NAME)  # the replicas drain for --shutdown-timeout seconds
    finally:
        ray.shutdown()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _deployment_error() -> str:
    """The last line of the engine replicas' error (the exception that stopped their constructor)."""
    deployment = serve.status().applications[APP_NAME].deployments["EngineReplica"]
    lines = [line for line in deployment.message.splitlines() if line.strip()]
    return lines[-1].strip() if lines else deployment.status
