"""Graceful shutdown: every request gets its real answer or a well-formed 503 ``shutting_down``.

A real server in a thread (the CLI in a child process for the signal tests). The fused calls are held
mid-flight by events (:class:`Held`), so each interleaving -- a request in a running call, one queued
behind it, one from a client that has gone, an upload still arriving, a forced exit -- is forced, not
timed; every wait is bounded (``JOIN``), so a regression fails instead of hanging the run.

What a demanding client relies on: at shutdown a request gets its real answer or 503 ``shutting_down``
in the server's error schema, with ``Retry-After`` (as the other 503s) and ``Connection: close`` --
never uvicorn's plain-text 500; the metrics count it as a shutdown refusal, not as a server error; the
server exits promptly (it does not wait for a fused call whose answers it will not send); the log says
what happened.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from aladin_fast.serving import DynamicBatcher, ServerThread, ServingConfig  # noqa: E402
from aladin_fast.serving.batcher import BatcherClosedError  # noqa: E402
from aladin_fast.serving.metrics import parse_exposition  # noqa: E402
from test_serving_properties import DIM, EMBED, call, make_retriever  # noqa: E402  (one gallery maker)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "single_threaded_faiss")

JOIN = 30  # seconds: a hang fails the test instead of blocking the run
GRACEFUL = 0.3
EXIT_WITHIN = GRACEFUL + 2.0  # from stop() to the server thread's end, with calls still held in their threads
SEARCH = {"query_embedding": [0.1] * EMBED, "query_tokens": [[0.1] * DIM] * 2, "k": 3, "rerank_k": 8}
RERANK = {"query_tokens": [[0.1] * DIM] * 2, "candidate_ids": [1, 6, 11]}  # ids of make_retriever's gallery


@pytest.fixture(scope="module")
def gallery_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serving-shutdown") / "a")
    make_retriever(1, "text_to_image").save(path)
    return path


class Held:
    """Wraps a batcher's ``run_batch``: each call sets ``entered`` and waits for ``release``."""

    def __init__(self, batcher):
        self.original, self.calls = batcher.run_batch, 0
        self.entered, self.release = threading.Event(), threading.Event()
        batcher.run_batch = self

    def __call__(self, queries):
        self.calls += 1
        self.entered.set()
        self.release.wait(JOIN)
        return self.original(queries)


@contextlib.contextmanager
def server_log():
    """The records of our logger and uvicorn's error logger (uvicorn's does not propagate to the root)."""
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    loggers = [logging.getLogger("aladin_fast.serving"), logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield records
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


def start(gallery_path, **options) -> ServerThread:
    config = ServingConfig(**{"retriever_paths": [gallery_path], "device": "cpu", "max_batch_size": 1, "workers": 1,
                              "graceful_timeout_s": GRACEFUL, **options})
    return ServerThread(config).start()  # uvicorn configures its loggers here: attach server_log() after


def wait_until(predicate, what, timeout=JOIN):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def stop_within(server, seconds):
    """``stop()`` bounded by ``seconds``; returns how long the thread took (inf when it is still alive)."""
    begun = time.monotonic()
    server.stop(timeout=seconds)
    return float("inf") if server._thread.is_alive() else time.monotonic() - begun


def raw_request(port, method, path, body=b"", headers=b"", sent=None):
    """A socket that sent ``method path`` (``sent``: how much of ``body`` goes out; all by default)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=JOIN)
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n".encode() + headers + b"\r\n" + body[:sent])
    return sock


def read_response(sock):
    """``(status, headers, json or text)`` of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a whole response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-body"
        body += chunk
    try:
        return int(lines[0].split()[1]), headers, json.loads(body)
    except ValueError:
        return int(lines[0].split()[1]), headers, body.decode(errors="replace")


def assert_shutting_down(status, answer, headers):
    """The well-formed refusal: the server's error schema, type shutting_down, Retry-After, Connection: close."""
    assert status == 503, (status, answer)
    assert isinstance(answer, dict) and set(answer) == {"error"}, answer
    assert answer["error"]["type"] == "shutting_down" and answer["error"]["field"] is None, answer
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"], answer
    assert headers.get("retry-after") == "1" and headers.get("connection") == "close", headers


def server_errors(state):
    """``aladin_requests_total`` samples with a 5xx status other than 503."""
    samples = parse_exposition(state.metrics.render())
    return {key: value for key, value in samples.items()
            if key.startswith("aladin_requests_total") and 'status="5' in key and 'status="503"' not in key}


# -------------------------------------------------------------------------- the graceful timeout expires
def test_requests_unanswered_at_the_graceful_timeout_get_503_and_the_exit_waits_for_no_call(gallery_path):
    """Regression: a request still waiting for its batch when the graceful timeout expired was cancelled by
    uvicorn and got its plain-text 500 (``Internal Server Error``, counted as a 500, an ERROR traceback in
    the log); the lifespan then waited a second graceful timeout and blocked the event loop on the running
    call (``executor.shutdown(wait=True)``), so the server did not stop until that call returned -- also
    for a client that had gone. Now, at the deadline, every request waiting for a batch (in a running call,
    queued behind one) is answered 503 ``shutting_down`` and counted as a shutdown refusal, and the server
    stops at once: the calls still held in their threads are not waited for."""
    server = start(gallery_path)
    state = server.app.state.serving
    searches, reranks = Held(state.search), Held(state.rerank)
    try:
        with server_log() as records, ThreadPoolExecutor(2) as pool:
            running = pool.submit(call, server.url, "/search", SEARCH, timeout=JOIN)
            assert searches.entered.wait(JOIN)
            queued = pool.submit(call, server.url, "/search", SEARCH, timeout=JOIN)
            wait_until(lambda: state.search.depth == 1, "the second search is queued behind the held call")
            gone = raw_request(server.port, "POST", "/rerank", json.dumps(RERANK).encode())
            assert reranks.entered.wait(JOIN)
            gone.close()  # this client hangs up while its rerank is being scored
            stopped_in = stop_within(server, EXIT_WITHIN)
            answers = [running.result(JOIN), queued.result(JOIN)]
    finally:
        searches.release.set()
        reranks.release.set()
        server.stop(timeout=JOIN)
    for answer in answers:
        assert_shutting_down(*answer)
    assert stopped_in < EXIT_WITHIN, "the server waited for the held calls"
    assert server_errors(state) == {}
    assert state.metrics.requests.value(endpoint="/search", status="503") == 2
    assert state.metrics.shutdown_refusals.value(endpoint="/search", stage="deadline") == 2
    assert state.metrics.shutdown_refusals.value(endpoint="/rerank", stage="deadline") == 1  # refused, unseen
    assert state.metrics.inflight.value() == 0
    assert state.metrics.queue_depth.value(queue="search") == 0 == state.metrics.queue_depth.value(queue="rerank")
    assert searches.calls == 1, "the refused queued search was still scored"
    messages = [record.getMessage() for record in records]
    assert any("graceful timeout of 0.3 s expired; 3 request(s) still waiting" in m for m in messages), messages
    assert not any("Exception in ASGI application" in m or "Cancel " in m for m in messages), messages


@pytest.mark.parametrize("how", ["stalled upload", "forced exit"])
def test_requests_the_server_cancels_get_503_not_uvicorns_500(gallery_path, how):
    """Regression: what uvicorn cancels at shutdown -- at its own graceful timeout (here an upload that never
    completes: the request is not in a batch yet) or at a forced exit (a second SIGINT, during the drain) --
    got uvicorn's plain-text 500 and was counted as a 500; at the forced exit the server thread also hung on
    the running call. Now such a request is answered 503 ``shutting_down`` like any refusal at shutdown."""
    server = start(gallery_path, drain_period_s=JOIN if how == "forced exit" else 0)
    state = server.app.state.serving
    held = Held(state.search)
    try:
        with server_log() as records:
            if how == "stalled upload":
                sock = raw_request(server.port, "POST", "/search", json.dumps(SEARCH).encode(), sent=20)
                wait_until(lambda: state.metrics.inflight.value() == 1, "the upload is being read")
                stopped_in = stop_within(server, EXIT_WITHIN)
            else:
                sock = raw_request(server.port, "POST", "/search", json.dumps(SEARCH).encode())
                assert held.entered.wait(JOIN)
                server.server.should_exit = True  # the first SIGINT: drain for drain_period_s (JOIN)
                wait_until(lambda: state.draining, "the drain has begun")
                server.server.force_exit = True  # the second SIGINT
                stopped_in = stop_within(server, EXIT_WITHIN)
            with sock:
                answer = read_response(sock)
    finally:
        held.release.set()
        server.stop(timeout=JOIN)
    status, headers, body = answer
    assert_shutting_down(status, body, headers)
    assert stopped_in < EXIT_WITHIN, "the server did not stop promptly"
    assert server_errors(state) == {}
    assert state.metrics.shutdown_refusals.value(endpoint="/search", stage="deadline") == 1
    assert state.metrics.inflight.value() == 0
    messages = [record.getMessage() for record in records]
    assert not any("Exception in ASGI application" in m for m in messages), messages
    wanted = "cancelled by the server before it was answered" if how == "stalled upload" else "forced exit"
    assert any(wanted in m for m in messages), messages


# ---------------------------------------------------------------------------------- the drain period
def test_refusals_while_draining_say_retry_after_and_close_the_connection(gallery_path):
    """Regression: 503 ``shutting_down`` carried no ``Retry-After`` (the server's other 503, ``overloaded``,
    does) and kept the connection open, so a keep-alive client or proxy stayed on the draining server and
    got 503 after 503 for the whole drain period instead of reconnecting to another replica. Now every
    shutdown refusal says ``Retry-After: 1`` and ``Connection: close`` (and the server closes it), and is
    counted as a shutdown refusal (stage ``draining``)."""
    server = start(gallery_path, drain_period_s=JOIN)
    state = server.app.state.serving
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # a keep-alive connection, made before
            assert read_response(sock)[0] == 200
            server.server.should_exit = True
            wait_until(lambda: state.draining, "the drain has begun")
            body = json.dumps(SEARCH).encode()
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            status, headers, answer = read_response(sock)
            assert_shutting_down(status, answer, headers)
            sock.settimeout(5)
            assert sock.recv(1) == b"", "the server kept the connection open"
        for path, body in [("/rerank", RERANK), ("/admin/reload", {})]:
            assert_shutting_down(*call(server.url, path, body, timeout=JOIN))
        assert call(server.url, "/health", timeout=JOIN)[:2] == (503, {"status": "draining", "generation": 1})
        for endpoint in ("/search", "/rerank", "/admin/reload"):
            assert state.metrics.shutdown_refusals.value(endpoint=endpoint, stage="draining") == 1, endpoint
    finally:
        server.server.force_exit = True  # a second SIGINT: no need to wait out the drain period
        server.stop(timeout=JOIN)
    assert not server._thread.is_alive()


# ------------------------------------------------------------------------------------ the batcher unit
def test_refuse_unanswered_answers_queued_forming_and_running_items_and_close_does_not_wait():
    """``DynamicBatcher.refuse_unanswered``: every item not answered yet (queued, in the batch being formed,
    in the running call) gets BatcherClosedError at once, so do later submits; a formed batch whose items
    were all refused is not run; ``close()`` then returns without waiting for the running call."""
    async def scenario():
        release, calls = threading.Event(), []

        def slow(items):
            calls.append(list(items))
            release.wait(JOIN)
            return items

        batcher = DynamicBatcher("search", slow, key=lambda item: item % 2, max_batch_size=2, max_wait_ms=60_000,
                                 workers=2)
        batcher.start()
        try:
            pending = [asyncio.ensure_future(batcher.submit(item)) for item in (0, 2)]  # a full batch: runs
            for _ in range(1000):
                await asyncio.sleep(0.002)
                if calls:
                    break
            pending += [asyncio.ensure_future(batcher.submit(item)) for item in (1, 4)]  # 1 forms a batch; 4 waits
            for _ in range(1000):
                await asyncio.sleep(0.002)
                if batcher._forming and batcher.depth == 1:
                    break
            assert [item.payload for item in batcher._forming] == [1] and batcher.depth == 1
            refused = batcher.refuse_unanswered("deadline")
            results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), JOIN)
            with pytest.raises(BatcherClosedError):
                await batcher.submit(7)
            started = time.monotonic()
            await asyncio.wait_for(batcher.close(timeout=5), JOIN)
            closed_in = time.monotonic() - started
        finally:
            release.set()  # asyncio.run waits for the call's thread
        return refused, results, calls, closed_in, batcher.depth

    refused, results, calls, closed_in, depth = asyncio.run(scenario())
    assert refused == 4 and all(isinstance(result, BatcherClosedError) for result in results), results
    assert str(results[0]) == "deadline"
    assert calls == [[0, 2]], "a batch of refused items was run"
    assert closed_in < 1.0 and depth == 0


# ------------------------------------------------------------------------ signals, in the foreground
DRIVER = """
import sys
import aladin_fast.serving.app as app
real = app.run_search_batch
def held(queries):  # tells the test the call is running, then waits until the test closes stdin
    open(sys.argv[1], "w").close()
    sys.stdin.readline()
    return real(queries)
app.run_search_batch = held
from aladin_fast.cli import main
sys.exit(main(["serve", "--retriever", sys.argv[2], "--port", sys.argv[3], "--device", "cpu",
               "--graceful-timeout", "0.3", "--max-batch-size", "1"]))
"""


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signals_in_the_foreground_answer_503_and_exit_cleanly(gallery_path, tmp_path, signum):
    """``python -m aladin_fast serve`` stopped by SIGTERM or SIGINT with a search still being scored.

    Regression: the search got uvicorn's plain-text 500, and after SIGINT the process ended with a
    KeyboardInterrupt traceback (uvicorn re-raises the signal once it has shut down). Now the search gets
    503 ``shutting_down``, the log names the signal and what the deadline cut off, SIGINT exits with 130
    without a traceback, SIGTERM ends the process by that signal (uvicorn's re-raise), as before."""
    marker, port = tmp_path / "scoring", free_port()
    child = subprocess.Popen([sys.executable, "-c", DRIVER, str(marker), gallery_path, str(port)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 2 * JOIN
        while True:
            assert child.poll() is None, child.stdout.read()
            try:
                if call(url, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(call, url, "/search", SEARCH, timeout=JOIN)
            wait_until(marker.exists, "the search is being scored")
            child.send_signal(signum)
            answer = pending.result(JOIN)
        child.stdin.close()  # the held call returns; its result is dropped
        output = child.stdout.read()
        returncode = child.wait(JOIN)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(JOIN)
    assert_shutting_down(*answer)
    name = signal.Signals(signum).name
    assert "Traceback" not in output and "Internal Server Error" not in output, output[-3000:]
    assert f"shutting down ({name})" in output, output[-3000:]
    assert "1 request(s) still waiting for a batch answered 503 shutting_down" in output, output[-3000:]
    if signum == signal.SIGINT:
        assert returncode == 130 and "stopped by SIGINT" in output, (returncode, output[-3000:])
    else:
        assert returncode == -signal.SIGTERM, (returncode, output[-3000:])


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("field", ["graceful_timeout_s", "max_wait_ms"])  # drain_period_s: test_serving_http.py
def test_shutdown_and_wait_times_reject_nan(field):
    """Regression: ``graceful_timeout_s=nan`` (``--graceful-timeout nan``) and ``max_wait_ms=nan`` passed the
    ``>= 0`` check (every comparison with NaN is false); a NaN graceful timeout made shutdown cancel every
    in-flight request at once. Now they are refused, naming the field, as ``drain_period_s=nan`` was."""
    with pytest.raises(ValueError, match=field):
        ServingConfig(**{field: float("nan")})
    if field == "max_wait_ms":
        with pytest.raises(ValueError, match="max_wait_ms"):
            DynamicBatcher("search", lambda items: items, max_wait_ms=float("nan"))
