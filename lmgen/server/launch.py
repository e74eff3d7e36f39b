"""Run the server with uvicorn: load in the background, drain on SIGTERM, exit 0."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn

from lmgen.engine.config import EngineConfig
from lmgen.engine.engine import Engine
from lmgen.server.app import ServerState, build_app
from lmgen.server.serving import ServerSettings

# uvicorn's own hard limit comes this long after ours, as a backstop only.
_HARD_TIMEOUT_MARGIN_S = 10.0
# Each connection's kernel send buffer (Linux doubles it). Token streams need little, and a
# fixed size bounds what a client that stops reading pins in the kernel (autotuned: up to
# 4 MiB) before the server sees its backlog (ServerSettings.stream_backlog).
SEND_BUFFER_BYTES = 128 * 1024


class _Server(uvicorn.Server):
    """uvicorn.Server that also starts lmgen's drain when a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.lmgen_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self.lmgen_state.begin_shutdown()


def serve(engine_config: EngineConfig, settings: ServerSettings, *, host: str = "127.0.0.1",
          port: int = 8000) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. Raises the error that stopped the model loading.

    On SIGTERM the server stops accepting connections, lets in-flight requests run for
    ``settings.shutdown_timeout`` seconds, aborts the rest (their streams end with
    finish_reason "abort"), and returns 0.
    """
    failures: list[BaseException] = []

    def on_ready() -> None:
        names = ", ".join(settings.served_model_names)
        print(f"lmgen: serving {names} on http://{host}:{port} (chat page at /, OpenAI API under /v1)",
              file=sys.stderr, flush=True)

    def on_load_failure(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    app = build_app(settings, lambda: Engine(engine_config), on_ready=on_ready, on_load_failure=on_load_failure)
    verbose = logging.getLogger("lmgen").getEffectiveLevel() <= logging.INFO
    config = uvicorn.Config(app, host=host, port=port, log_level="info" if verbose else "warning",
                            access_log=verbose,
                            timeout_graceful_shutdown=settings.shutdown_timeout + _HARD_TIMEOUT_MARGIN_S)
    server = _Server(config, app.state.lmgen)
    listener = config.bind_socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)  # accepted sockets inherit it
    # After its graceful shutdown uvicorn re-raises the signal it caught; with a handler
    # in place that re-raise is harmless, so a SIGTERM'd server exits 0 as services expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run(sockets=[listener])
    if failures:
        raise failures[0]
    return 0
