"""The HTTP service: a FastAPI app over a :class:`~aladin_fast.serving.engine.Gallery`.

Endpoints (JSON unless noted; request bodies in :mod:`aladin_fast.serving.schema`):

- ``POST /search``  -> ``{"ids", "scores", ["explanations"], "direction", "generation"}``
- ``POST /rerank``  -> ``{"scores", "direction", "generation"}``, scores in candidate order
- ``GET /health``   -> ``{"status": "ok" | "draining", "generation"}``: 200 ``ok`` while serving, 503
  ``draining`` once shutdown has begun (see below)
- ``GET /info``     -> versions, backends (``aladin_fast.info()``), device, gallery, config
- ``GET /metrics``  -> Prometheus text (:mod:`aladin_fast.serving.metrics`)
- ``POST /admin/reload`` ``{"path": DIR}`` or ``{"paths": [DIR, ...]}`` (default: the current
  paths) -> the new gallery; loads and warms the new retrievers off the event loop, then swaps
  one reference. Requests already validated finish on the old snapshot, later ones use the new
  one; a failed reload leaves the old snapshot serving and answers 422 naming ``path``.

Shutdown (:class:`~aladin_fast.serving.server.DrainingServer`: the CLI and ``ServerThread``) first
drains: ``/health`` answers 503 ``{"status": "draining"}``, new ``/search`` / ``/rerank`` /
``/admin/reload`` requests get 503 ``shutting_down``, requests already accepted go on. A reload
still loading (or waiting for another one) is abandoned at once: it answers 503 ``shutting_down``,
its load runs in a daemon thread that stops at its next step and releases what it loaded, the
serving generation is untouched, and nothing waits for it (a slow load does not hold up the exit).
The server keeps answering like this for ``drain_period_s`` (default 0), then stops accepting
connections and gives in-flight requests ``graceful_timeout_s`` to finish. A request still waiting
for its batch (queued or in a running call) when that expires is answered 503 ``shutting_down``
then; one cancelled by the server for any other reason (a forced exit, an upload still arriving)
gets the same answer, never a bare 500. Every ``shutting_down`` answer carries ``Retry-After: 1``
and ``Connection: close`` (a keep-alive client or proxy reconnects, to another replica) and is
counted in ``aladin_shutdown_refusals_total``.

Errors are ``{"error": {"type", "field", "message"}}``: 400 (body is not a JSON object), 401
(admin token), 404 (unknown route or candidate id), 405, 408 (body not received within
``body_timeout_s``, or head within ``header_timeout_s``), 413 (body larger than
``max_body_bytes``), 422 (a field is invalid; ``field`` names it), 431 (head larger than
``max_header_bytes``), 503 (queue full, more than ``max_connections`` connections open, or
shutting down), 500 (internal error; logged, the server keeps serving). The limits on a request's
head (408 / 431 before the app sees it) are in :mod:`aladin_fast.serving.connections`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from .config import ServingConfig
from .engine import (Gallery, load_gallery, release_retrievers, rerank_batch_key, run_rerank_batch, run_search_batch,
                     search_batch_key)
from .metrics import CONTENT_TYPE, MetricsRegistry
from .schema import RequestError, parse_json_body, parse_rerank, parse_search

__all__ = ["create_app", "ServingState", "ShuttingDownError"]

logger = logging.getLogger("aladin_fast.serving")
ENDPOINTS = ("/search", "/rerank", "/health", "/info", "/metrics", "/admin/reload")
UNLIMITED = ("/health", "/metrics")  # still answered beyond max_connections: monitoring sees the overload
PARSE_OFF_LOOP_BYTES = 1 << 20  # bigger bodies are decoded in a thread so the event loop keeps batching


def _error(status: int, field: Optional[str], message: str, kind: str = "invalid_request") -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "field": field, "message": message}}, status_code=status)


def _overloaded(message: str) -> JSONResponse:
    """503 ``overloaded``: retry in a second."""
    return JSONResponse({"error": {"type": "overloaded", "field": None, "message": message}}, status_code=503,
                        headers={"Retry-After": "1"})


class ShuttingDownError(RuntimeError):
    """The server is shutting down: the request (a reload) was refused or abandoned (HTTP 503)."""


def _shutting_down(message: str) -> JSONResponse:
    """503 ``shutting_down``: retry in a second, on a new connection (this one closes, so that a keep-alive
    client or proxy is not kept on a server that is going away)."""
    response = _error(503, None, message, kind="shutting_down")
    response.headers["Retry-After"] = "1"
    response.headers["Connection"] = "close"
    return response


def _check_finite_scores(query, result: dict) -> None:
    """JSON has no inf / NaN (rendering them was a 500): finite but huge token values overflow float32
    scores, a 422 naming the request's largest-magnitude token field."""
    if all(math.isfinite(score) for score in result["scores"]):
        return
    sizes = {"query_tokens": float(query.tokens.abs().max())}
    if getattr(query, "candidate_tokens", None) is not None:
        sizes["candidate_tokens"] = float(query.candidate_tokens.abs().max())
    field = max(sizes, key=sizes.get)
    raise RequestError(field, f"scores are not finite: float32 overflow (|values| up to {sizes[field]:g} are too "
                              f"large) or the gallery holds non-finite features")


class ServingState:
    """What the app holds: config, metrics, the current gallery snapshot, the batchers."""

    def __init__(self, config: ServingConfig, gallery: Optional[Gallery], metrics: MetricsRegistry):
        self.config = config
        self.metrics = metrics
        self.gallery = gallery
        self.executor: Optional[ThreadPoolExecutor] = None
        self.search: Optional[DynamicBatcher] = None
        self.rerank: Optional[DynamicBatcher] = None
        self.reload_lock = asyncio.Lock()
        self.draining = False
        self._shutdown = asyncio.Event()  # set with draining: wakes reloads waiting for a load
        self.deadline: Optional[float] = None  # time.monotonic() when in-flight requests stop being waited for
        self.deadline_passed = False
        self.started_at = time.time()
        self.library_info: dict = {}
        self.open_connections = 0  # counted by the protocol (connections.py), on the event loop
        metrics.open_connections.set(0)

    def connection_opened(self) -> None:
        self.open_connections += 1
        self.metrics.open_connections.set(self.open_connections)

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self.metrics.open_connections.set(self.open_connections)

    def over_connection_limit(self) -> bool:
        """More connections are open than ``max_connections`` allows (known under the
        :mod:`.connections` protocol, which counts them)."""
        limit = self.config.max_connections
        return limit is not None and self.open_connections > limit

    def publish_gallery(self, gallery: Gallery) -> None:
        """Swap in ``gallery`` (one reference assignment: atomic for every reader) and report it."""
        previous, self.gallery = self.gallery, gallery
        self.metrics.generation.set(gallery.generation)
        for direction, retriever in gallery.retrievers.items():
            self.metrics.gallery_items.set(retriever.count, direction=direction)
        for direction in set(previous.retrievers if previous else ()) - set(gallery.retrievers):
            self.metrics.gallery_items.remove(direction=direction)  # no longer served: no stale count

    async def start(self) -> None:
        config = self.config
        if self.gallery is None:
            self.publish_gallery(await asyncio.to_thread(
                load_gallery, config.retriever_paths, generation=1, device=config.resolved_device(),
                verify=config.verify, warmup=config.warmup))
        else:
            self.publish_gallery(self.gallery)
        from ..info import info

        import fastapi
        import uvicorn

        with contextlib.redirect_stdout(io.StringIO()):
            self.library_info = info(file=io.StringIO())
        self.library_info.update(fastapi=fastapi.__version__, uvicorn=uvicorn.__version__)
        self.executor = ThreadPoolExecutor(max_workers=2 * config.workers, thread_name_prefix="aladin-serve")
        common = dict(max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms, workers=config.workers,
                      max_queue=config.max_queue, executor=self.executor, metrics=self.metrics)
        self.search = DynamicBatcher("search", run_search_batch, key=search_batch_key, **common)
        self.rerank = DynamicBatcher("rerank", run_rerank_batch, key=rerank_batch_key, **common)
        self.search.start()
        self.rerank.start()

    def begin_draining(self) -> None:
        """Shutdown has begun: ``/health`` says draining, new requests get 503, reloads are abandoned."""
        self.draining = True
        self._shutdown.set()

    async def drain(self, period: float, stop_early=lambda: False) -> None:
        """:meth:`begin_draining`, then keep serving (health checks see ``draining``) for ``period``
        seconds or until ``stop_early()`` (a forced exit)."""
        self.begin_draining()
        deadline = time.monotonic() + period
        while not stop_early():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(remaining, 0.05))

    def refuse_unanswered(self, why: str) -> int:
        """The wait for in-flight requests is over (``why``): every request still waiting for its batch --
        queued or in a running call -- is answered 503 ``shutting_down`` now, and later ones too. Returns
        how many were waiting."""
        self.begin_draining()
        self.deadline, self.deadline_passed = time.monotonic(), True  # the lifespan's close waits no longer
        batchers = [batcher for batcher in (self.search, self.rerank) if batcher is not None]
        refused = sum(batcher.refuse_unanswered(f"{batcher.name} not answered before shutdown: {why}")
                      for batcher in batchers)
        if refused:
            logger.warning("shutdown: %s; %d request(s) still waiting for a batch answered 503 shutting_down",
                           why, refused)
        return refused

    def shutdown_refusal(self, endpoint: str, message: str, stage: Optional[str] = None) -> JSONResponse:
        """The 503 ``shutting_down`` answer, counted in ``aladin_shutdown_refusals_total`` (``stage``:
        ``"deadline"`` once :meth:`refuse_unanswered` ran, else ``"draining"``)."""
        stage = stage or ("deadline" if self.deadline_passed else "draining")
        self.metrics.shutdown_refusals.inc(endpoint=endpoint, stage=stage)
        return _shutting_down(message)

    async def load_unless_shutting_down(self, paths, **options) -> Gallery:
        """:func:`load_gallery` in a daemon thread; :class:`ShuttingDownError` as soon as shutdown begins.

        An abandoned load is told to stop at its next step (``cancelled``), whatever it has loaded is
        released and its result, should it still finish, is discarded: nothing is published and
        nothing waits for the thread (a slow load never delays the exit). The same happens when the
        awaiting request is cancelled.
        """
        if self.draining:
            raise ShuttingDownError("the server is shutting down")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        abandoned = threading.Event()

        def discard(gallery: Optional[Gallery]) -> None:
            if gallery is not None:
                release_retrievers(gallery.retrievers.values())

        def deliver(gallery: Optional[Gallery], error: Optional[BaseException]) -> None:  # on the loop
            if done.done():  # abandoned meanwhile
                discard(gallery)
            elif error is not None:
                done.set_exception(error)
            else:
                done.set_result(gallery)

        def work() -> None:
            gallery, error = None, None
            try:
                gallery = load_gallery(paths, cancelled=abandoned.is_set, **options)
            except BaseException as err:  # noqa: BLE001 - handed to the request (or dropped when abandoned)
                error = err
            if abandoned.is_set():
                return discard(gallery)
            try:
                loop.call_soon_threadsafe(deliver, gallery, error)
            except RuntimeError:  # the event loop is closed: the server is gone
                discard(gallery)

        threading.Thread(target=work, name="aladin-reload", daemon=True).start()
        shutdown = asyncio.ensure_future(self._shutdown.wait())
        try:
            await asyncio.wait([done, shutdown], return_when=asyncio.FIRST_COMPLETED)
        finally:
            shutdown.cancel()
            if not done.done():  # shutdown began (or this request was cancelled): abandon the load
                abandoned.set()
                done.cancel()
        if done.cancelled():
            raise ShuttingDownError("the server is shutting down; the reload was abandoned and the serving "
                                    "generation is unchanged")
        return done.result()

    async def stop(self) -> None:
        """Finish queued and running batches until the shutdown's ``deadline`` (``graceful_timeout_s``
        from now when none was set), then release the worker threads. Nothing waits for a call still
        running after that: its requests were answered already, its results are dropped."""
        self.begin_draining()
        if self.deadline is None:
            timeout = self.config.graceful_timeout_s
        else:  # the time left of graceful_timeout_s, not a second one
            timeout = max(0.0, self.deadline - time.monotonic())
        await asyncio.gather(self.search.close(timeout), self.rerank.close(timeout))
        self.executor.shutdown(wait=False, cancel_futures=True)  # wait=True blocked the event loop on such a call


class _ObserveAndLimit:
    """ASGI middleware: request count / latency / in-flight metrics, and the limits on a request that has
    reached the app: 503 ``overloaded`` beyond ``max_connections`` (before the body is read), the body
    size (413) and its arrival time (408, ``body_timeout_s``), both enforced while the body is read."""

    def __init__(self, app, state: ServingState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        metrics, limit = self.state.metrics, self.state.config.max_body_bytes
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = {"code": 500, "started": False}
        started = time.perf_counter()
        metrics.inflight.inc()

        async def send_and_observe(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            if self.state.over_connection_limit() and scope["path"] not in UNLIMITED:
                return await _overloaded(f"more than max_connections={self.state.config.max_connections} "
                                         f"connections are open")(scope, receive, send_and_observe)
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                return await _error(413, "body", f"request body of {int(declared)} bytes exceeds "
                                                 f"max_body_bytes={limit}")(scope, receive, send_and_observe)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                chunks, size = [], 0
                timeout = self.state.config.body_timeout_s
                deadline = time.monotonic() + timeout
                while True:
                    try:  # a client sending its body slowly, or not at all, holds the request this long at most
                        message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        response = _error(408, "body", f"request body not received within body_timeout_s="
                                                       f"{timeout:g} s ({size} bytes arrived)", kind="request_timeout")
                        response.headers["Connection"] = "close"
                        return await response(scope, receive, send_and_observe)
                    if message["type"] == "http.disconnect":  # no response was sent: not a 500 in the metrics
                        status["code"] = 499  # nginx's "client closed request"
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        return await _error(413, "body", f"request body exceeds max_body_bytes={limit}")(
                            scope, receive, send_and_observe)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
                body = b"".join(chunks)
                replayed = {"done": False}

                async def receive_body():
                    if replayed["done"]:
                        return await receive()
                    replayed["done"] = True
                    return {"type": "http.request", "body": body, "more_body": False}

                return await self.app(scope, receive_body, send_and_observe)
            return await self.app(scope, receive, send_and_observe)
        except asyncio.CancelledError:
            # the server cancels what still runs when its graceful-shutdown timeout expires (uvicorn's
            # timeout_graceful_shutdown; DrainingServer answers the batch waits just before) or at a forced exit,
            # and uvicorn then answers a plain-text 500: refuse it like any request at shutdown instead (as
            # uvicorn answers a cancelled request itself, the cancellation ends here)
            if status["started"]:
                raise
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python >= 3.11: the cancellation is handled here
                task.uncancel()
            logger.warning("shutdown: %s %s cancelled by the server before it was answered; answered 503 "
                           "shutting_down", scope["method"], scope["path"])
            refusal = self.state.shutdown_refusal(endpoint, "the server shut down before this request was answered",
                                                  stage="deadline")
            await refusal(scope, receive, send_and_observe)
            return None
        finally:
            metrics.inflight.dec()
            metrics.requests.inc(endpoint=endpoint, status=str(status["code"]))
            metrics.request_latency.observe(time.perf_counter() - started, endpoint=endpoint)


def create_app(config: ServingConfig, *, gallery: Optional[Gallery] = None,
               metrics: Optional[MetricsRegistry] = None) -> FastAPI:
    """The service over ``gallery`` (or, when None, the retrievers in ``config.retriever_paths``,
    loaded at start-up). The state is ``app.state.serving`` (:class:`ServingState`)."""
    state = ServingState(config, gallery, metrics or MetricsRegistry())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="aladin-fast serving", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = state
    app.add_middleware(_ObserveAndLimit, state=state)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, None, str(exc.detail), kind="http_error")

    async def handle(request: Request, parse, batcher_name: str):
        endpoint = f"/{batcher_name}"
        if state.draining:  # a load balancer still routing here: retry on another replica
            return state.shutdown_refusal(endpoint, f"{batcher_name} refused: the server is shutting down")
        try:
            raw = await request.body()
            gallery = state.gallery  # the snapshot this request is validated against and served by
            if len(raw) > PARSE_OFF_LOOP_BYTES:
                query = await asyncio.to_thread(lambda: parse(parse_json_body(raw), gallery, config))
            else:
                query = parse(parse_json_body(raw), gallery, config)
            result = await getattr(state, batcher_name).submit(query)
            _check_finite_scores(query, result)
            return JSONResponse({**result, "direction": query.direction, "generation": gallery.generation})
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        except QueueFullError as err:
            return _overloaded(str(err))
        except BatcherClosedError as err:  # shutdown: the queue closed, or the graceful timeout expired
            return state.shutdown_refusal(endpoint, str(err))
        except Exception as err:  # noqa: BLE001 - a 500 for this request, the server keeps serving
            logger.exception("internal error on %s", request.url.path)
            return _error(500, None, f"{type(err).__name__}: {err}", kind="internal_error")

    @app.post("/search")
    async def search(request: Request):
        """Two-stage search of one query; see :mod:`aladin_fast.serving.schema` for the body."""
        return await handle(request, parse_search, "search")

    @app.post("/rerank")
    async def rerank(request: Request):
        """Fused teacher scores of one query against its candidates (gallery ids or given tokens)."""
        return await handle(request, parse_rerank, "rerank")

    @app.get("/health")
    async def health():
        """200 ``ok`` while serving; 503 ``draining`` from the moment shutdown begins."""
        gallery = state.gallery
        return JSONResponse({"status": "draining" if state.draining else "ok",
                             "generation": gallery.generation if gallery else None},
                            status_code=503 if state.draining else 200)

    @app.get("/info")
    async def info():
        gallery = state.gallery
        return {
            "versions": {key: state.library_info.get(key) for key in
                         ("aladin_fast", "python", "torch", "numpy", "triton_version", "fastapi", "uvicorn",
                          "platform")},
            "backends": {key: value for key, value in state.library_info.items()
                         if key.startswith("backend.") or key in ("faiss", "cuda", "torch_threads")},
            "device": gallery.device,
            "gallery": gallery.describe(),
            "index_size": {direction: retriever.count for direction, retriever in gallery.retrievers.items()},
            "batching": {"enabled": config.batching, "max_batch_size": config.max_batch_size,
                         "max_wait_ms": config.max_wait_ms, "workers": config.workers,
                         "queue_depth": {"search": state.search.depth, "rerank": state.rerank.depth}},
            "config": config.public(),
            "uptime_s": time.time() - state.started_at,
        }

    @app.get("/metrics")
    async def metrics_page():
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/admin/reload")
    async def reload(request: Request):
        """Load the given retriever directories (default: the current ones) and swap atomically."""
        if config.admin_token and not hmac.compare_digest(  # constant time: no timing oracle on the token
                request.headers.get("authorization", "").encode(), f"Bearer {config.admin_token}".encode()):
            return _error(401, "authorization", "admin endpoints need 'Authorization: Bearer <admin token>'",
                          kind="unauthorized")
        if state.draining:
            return state.shutdown_refusal("/admin/reload", "reload refused: the server is shutting down")
        try:
            raw = await request.body()
            body = parse_json_body(raw) if raw.strip() else {}
            unknown = sorted(set(body) - {"path", "paths"})
            if unknown:
                raise RequestError(unknown[0], "unknown field (allowed: ['path', 'paths'])")
            if "path" in body and "paths" in body:
                raise RequestError("paths", "give path or paths, not both")
            paths = body.get("paths", [body["path"]] if "path" in body else None)
            if paths is not None and (not isinstance(paths, list) or not paths
                                      or not all(isinstance(p, str) and p for p in paths)):
                raise RequestError("path" if "path" in body else "paths", "must name saved Retriever directories")
        except RequestError as err:
            return JSONResponse(err.body(), status_code=err.status)
        async with state.reload_lock:  # a reload ahead is abandoned when shutdown begins: no long wait here
            old = state.gallery
            if paths is None:  # the paths served now, read under the lock: not those before a reload queued ahead
                paths = list(old.paths.values())
            try:
                new = await state.load_unless_shutting_down(paths, generation=old.generation + 1, device=old.device,
                                                            verify=config.verify, warmup=config.warmup)
            except ShuttingDownError as err:
                state.metrics.reloads.inc(status="abandoned")
                return state.shutdown_refusal("/admin/reload", f"reload of {paths} refused: {err}")
            except Exception as err:  # noqa: BLE001 - a bad directory must not take the service down
                state.metrics.reloads.inc(status="error")
                # the message, not the exception: a handler that keeps records (pytest's, a MemoryHandler) would
                # keep its traceback's frames, and with them the serving generation (`old`), alive
                logger.warning("reload of %s failed: %s", paths, f"{type(err).__name__}: {err}")
                return _error(422, "path" if "path" in body else "paths", f"cannot load {paths}: "
                                                                          f"{type(err).__name__}: {err}")
            state.publish_gallery(new)
            state.metrics.reloads.inc(status="ok")
        return {"reloaded": True, "previous_generation": old.generation, **new.describe()}

    return app
