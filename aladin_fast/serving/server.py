"""Running the app: in the foreground (the CLI) or in a background thread (tests, benchmarks, notebooks).

::

    with ServerThread(ServingConfig(retriever_paths=["gallery/"])) as server:
        requests.post(server.url + "/search", json=...)
    # leaving the block shuts down gracefully: in-flight requests finish first

Both run a :class:`DrainingServer` (uvicorn with ``timeout_graceful_shutdown =
config.graceful_timeout_s``). On SIGINT/SIGTERM (foreground) or
:meth:`ServerThread.stop`:

1. draining begins: ``GET /health`` answers 503 ``{"status": "draining"}``, new
   ``/search``, ``/rerank`` and ``/admin/reload`` requests get 503
   ``shutting_down``, a reload still loading is abandoned (503, old generation
   kept, its load not waited for); requests already accepted go on;
2. the server keeps answering like this for ``config.drain_period_s`` (default 0;
   a second SIGINT cuts it short), so load balancers see the draining health;
3. uvicorn stops accepting connections and gives in-flight requests
   ``graceful_timeout_s``, then the app's lifespan drains the batch queues and
   stops the worker threads.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Optional

import uvicorn

from .app import create_app
from .config import ServingConfig
from .engine import Gallery

__all__ = ["ServerThread", "DrainingServer", "run_server", "uvicorn_config"]


def uvicorn_config(app, config: ServingConfig, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn settings used everywhere (no access log: per-request logging costs throughput)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=config.graceful_timeout_s, server_header=False)


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose shutdown first drains the app (``app.state.serving``, a
    :class:`~aladin_fast.serving.app.ServingState`) for ``drain_period_s`` while it still answers,
    then shuts down as uvicorn does."""

    def __init__(self, config: uvicorn.Config, serving_config: ServingConfig):
        super().__init__(config)
        self.serving_config = serving_config

    async def shutdown(self, sockets=None) -> None:
        state = getattr(getattr(self.config.app, "state", None), "serving", None)
        if state is not None:
            await state.drain(self.serving_config.drain_period_s, stop_early=lambda: self.force_exit)
        await super().shutdown(sockets=sockets)


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
