"""Running the app: in the foreground (the CLI) or in a background thread (tests, benchmarks, notebooks).

::

    with ServerThread(ServingConfig(retriever_paths=["gallery/"])) as server:
        requests.post(server.url + "/search", json=...)
    # leaving the block shuts down gracefully: in-flight requests finish first

Both run a :class:`DrainingServer` (uvicorn whose own ``timeout_graceful_shutdown`` is
``config.graceful_timeout_s + CANCEL_AFTER_S``, a backstop). On SIGINT/SIGTERM (foreground) or
:meth:`ServerThread.stop`:

1. draining begins: ``GET /health`` answers 503 ``{"status": "draining"}``, new
   ``/search``, ``/rerank`` and ``/admin/reload`` requests get 503
   ``shutting_down``, a reload still loading is abandoned (503, old generation
   kept, its load not waited for); requests already accepted go on;
2. the server keeps answering like this for ``config.drain_period_s`` (default 0;
   a second SIGINT cuts it short), so load balancers see the draining health;
3. uvicorn stops accepting connections and gives in-flight requests
   ``graceful_timeout_s``. When that expires, every request still waiting for its
   batch (queued or in a running fused call) is answered 503 ``shutting_down``;
   ``CANCEL_AFTER_S`` later uvicorn cancels anything left (a slow upload), which
   the app answers 503 ``shutting_down`` as well -- never uvicorn's bare 500;
4. the app's lifespan stops the batchers and the worker threads without waiting
   again: a fused call still running goes on in its thread, its results dropped
   (it cannot be interrupted: a process ending normally, as after SIGINT, waits
   for it at exit; after SIGTERM uvicorn re-raises the signal, which ends the
   process at once).

The log says what happened: the signal, the drain, how many requests the
deadline cut off. A forced exit (a second SIGINT) skips the waits; requests
still in flight are answered 503 ``shutting_down``.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from typing import Optional

import uvicorn

from .app import create_app
from .config import ServingConfig
from .connections import protocol_class
from .engine import Gallery

__all__ = ["ServerThread", "DrainingServer", "run_server", "uvicorn_config", "CANCEL_AFTER_S"]

logger = logging.getLogger("aladin_fast.serving")
# uvicorn cancels what still runs this long after graceful_timeout_s: by then DrainingServer has answered
# every request waiting for a batch and those answers are written; only a request stuck elsewhere is left
CANCEL_AFTER_S = 0.5


def uvicorn_config(app, config: ServingConfig, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn settings used everywhere (no access log: per-request logging costs throughput).

    The HTTP protocol is uvicorn's with the request-head limits of :mod:`.connections`
    (``max_header_bytes``, ``header_timeout_s``, the open-connection count); idle keep-alive
    connections close after ``keep_alive_timeout_s``. WebSocket upgrades are off: the service has no
    WebSocket route, and an upgraded connection would leave those limits.
    """
    state = getattr(getattr(app, "state", None), "serving", None)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=config.graceful_timeout_s + CANCEL_AFTER_S, server_header=False,
                          http=protocol_class(config, state), ws="none", timeout_keep_alive=config.keep_alive_timeout_s,
                          h11_max_incomplete_event_size=config.max_header_bytes)


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose shutdown first drains the app (``app.state.serving``, a
    :class:`~aladin_fast.serving.app.ServingState`) for ``drain_period_s`` while it still answers,
    then shuts down as uvicorn does, answering 503 the requests still waiting for a batch when
    ``graceful_timeout_s`` expires (before uvicorn would cancel them: a bare 500)."""

    def __init__(self, config: uvicorn.Config, serving_config: ServingConfig):
        super().__init__(config)
        self.serving_config = serving_config
        self.exit_signal: Optional[str] = None  # the first SIGINT / SIGTERM received, for the log

    def handle_exit(self, sig: int, frame) -> None:
        if self.exit_signal is None:
            self.exit_signal = signal.Signals(sig).name
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "serving", None)
        if state is None:
            return await super().shutdown(sockets=sockets)
        config = self.serving_config
        logger.info("shutting down%s: draining for %g s, then in-flight requests get %g s",
                    f" ({self.exit_signal})" if self.exit_signal else "", config.drain_period_s,
                    config.graceful_timeout_s)
        await state.drain(config.drain_period_s, stop_early=lambda: self.force_exit)
        state.deadline = time.monotonic() + config.graceful_timeout_s
        deadline = asyncio.ensure_future(self._refuse_at_deadline(state))
        try:
            await super().shutdown(sockets=sockets)
        finally:
            deadline.cancel()
            if self.force_exit:  # uvicorn skips its waits and the lifespan: answer what is still waiting
                logger.warning("forced exit: the drain and the graceful wait were cut short")
                state.refuse_unanswered("forced exit")

    async def _refuse_at_deadline(self, state) -> None:
        while not self.force_exit and time.monotonic() < state.deadline:
            await asyncio.sleep(min(state.deadline - time.monotonic(), 0.05))
        if not self.force_exit:
            state.refuse_unanswered(f"the graceful timeout of {self.serving_config.graceful_timeout_s:g} s expired")


def run_server(config: ServingConfig, host: str = "127.0.0.1", port: int = 8000, *, gallery: Optional[Gallery] = None,
               log_level: str = "info") -> None:
    """Serve in the foreground until SIGINT/SIGTERM (graceful: in-flight requests finish)."""
    app = create_app(config, gallery=gallery)
    DrainingServer(uvicorn_config(app, config, host, port, log_level), config).run()


class ServerThread:
    """The service on ``host`` and a free port (or ``port``) in a daemon thread.

    Attributes after :meth:`start`: ``url`` (``http://host:port``), ``port``,
    ``app`` (its ``app.state.serving`` is the :class:`~aladin_fast.serving.app.ServingState`).
    """

    def __init__(self, config: ServingConfig, *, host: str = "127.0.0.1", port: int = 0,
                 gallery: Optional[Gallery] = None, log_level: str = "warning"):
        self.config = config
        self.host = host
        self.app = create_app(config, gallery=gallery)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))  # bound here, so the port is known before the thread starts
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = DrainingServer(uvicorn_config(self.app, config, host, self.port, log_level), config)
        self._thread = threading.Thread(target=self._serve, name=f"aladin-serve-{self.port}", daemon=True)
        self.error: Optional[BaseException] = None

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self._socket])
        except BaseException as err:  # noqa: BLE001 - reported by start()
            self.error = err

    def start(self, timeout: float = 60.0) -> "ServerThread":
        """Start and wait until the server accepts requests (RuntimeError if it fails to start)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self.error is not None or not self._thread.is_alive():
                raise RuntimeError(f"server failed to start: {self.error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Graceful shutdown (see the module docstring): drain for ``drain_period_s``, stop accepting,
        let in-flight requests finish, drain the queues. Waits for the thread at most ``timeout`` s."""
        self.server.should_exit = True
        self._thread.join(timeout if timeout is not None
                          else self.config.drain_period_s + self.config.graceful_timeout_s + 10)
        self._socket.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
