"""The HTTP service as a long-running process: request limits, slow clients, metrics cardinality, soak.

A real server in a thread, spoken to over raw sockets where the client's misbehaviour is the point
(an endless header, a connection that sends nothing, a body a byte at a time). Every wait is bounded,
so a regression fails instead of hanging the run.

Regressions (each fails on the code before tests/test_serving_limits.py existed):

- an endless request head was kept in full (one client grew the server by 2.4 GB in 8 s, uvicorn's
  httptools protocol has no head limit): now 431 beyond ``max_header_bytes`` and the connection closes;
- a connection that sent nothing, or part of a head, stayed open for ever (a few hundred of them used
  up the file descriptors and every new client was reset): now closed after ``header_timeout_s``;
- a body that never finished arriving held its request for ever: now 408 after ``body_timeout_s``;
- no connection limit and no configurable keep-alive: ``max_connections`` (503 ``overloaded``, the
  ``aladin_open_connections`` gauge) and ``keep_alive_timeout_s``;
- ``query_tokens`` / ``candidate_tokens`` lists took strings (``"1.5"``) and booleans as numbers;
  ``candidate_ids`` were type-checked one by one before their count was (seconds for a body of
  millions of ids, all to answer "too many");
- a failed reload logged its exception object: a handler that keeps records (pytest's here) kept its
  traceback, and through it the generation serving then, alive (in the soak: 9 more memory-mapped
  feature files open after 6 reloads).

Checks that found nothing wrong, kept so it stays that way: metrics labels never take a client's
value (thousands of unknown paths and bad bodies add no series) and the page is valid exposition format;
bad bodies of every kind (deep nesting, NaN, huge k, gzip, wrong content type) get a 4xx in the error
schema; requests of every kind and reloads leave no threads, descriptors or objects behind.
``-m slow`` runs the soak and the cardinality check longer (10,000 requests each), and the
descriptor-exhaustion scenario in a child process.
"""
from __future__ import annotations

import contextlib
import gc
import gzip
import json
import math
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from aladin_fast.serving import ServerThread, ServingConfig  # noqa: E402
from aladin_fast.serving.cli import build_parser  # noqa: E402
from aladin_fast.serving.config import config_from_arguments  # noqa: E402
from aladin_fast.serving.engine import load_gallery  # noqa: E402
from test_serving_properties import DIM, call, embed, make_retriever, normalize  # noqa: E402  (one gallery maker)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "single_threaded_faiss")

JOIN = 30  # seconds: a hang fails the test instead of blocking the run
HEAD_TIMEOUT = 0.6
BODY_TIMEOUT = 0.6
HEAD_LIMIT = 8192
LIMITED = dict(device="cpu", max_batch_size=8, max_wait_ms=1, max_body_bytes=256 * 1024, max_candidates=40,
               max_header_bytes=HEAD_LIMIT, header_timeout_s=HEAD_TIMEOUT, body_timeout_s=BODY_TIMEOUT)


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-limits")
    out = {}
    for name, seed, direction, offset in [("a", 1, "text_to_image", 0), ("b", 2, "text_to_image", 1000),
                                          ("captions", 3, "image_to_text", 0)]:
        out[name] = str(root / name)
        make_retriever(seed, direction, ids_offset=offset).save(out[name])
    return out


@pytest.fixture(scope="module")
def server(directories):
    config = ServingConfig(retriever_paths=[directories["a"], directories["captions"]], **LIMITED)
    with ServerThread(config) as running:
        yield running


# ------------------------------------------------------------------------------------------------ helpers
def search_body(seed=0, k=5):
    g = torch.Generator().manual_seed(seed)
    tokens = normalize(torch.randn(3, DIM, generator=g))
    return {"query_embedding": embed(tokens.mean(0, keepdim=True))[0].tolist(), "query_tokens": tokens.tolist(),
            "k": k, "rerank_k": 20}


def metrics(url):
    """``{'name{labels}': value}`` of the exposition page (checked strictly by :func:`check_exposition`)."""
    return check_exposition(call(url, "/metrics")[1])


def wait_until(predicate, what, timeout=JOIN):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def read_until_closed(sock, timeout):
    """Everything the server sends until it closes the connection: ``(bytes, closed, seconds)``;
    ``closed`` is False when ``timeout`` passed first."""
    started = time.monotonic()
    data = b""
    while True:
        remaining = timeout - (time.monotonic() - started)
        if remaining <= 0:
            return data, False, time.monotonic() - started
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, False, time.monotonic() - started
        except ConnectionResetError:
            return data, True, time.monotonic() - started
        if not chunk:
            return data, True, time.monotonic() - started
        data += chunk


def parse_response(raw):
    """``(status, {header: value}, json body)`` of one raw HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body)


def send_all(sock, data, chunk=1 << 16):
    """Send ``data`` until done or the server hangs up; returns the bytes sent."""
    sent = 0
    try:
        for start in range(0, len(data), chunk):
            sock.sendall(data[start:start + chunk])
            sent += len(data[start:start + chunk])
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def answered(sock):
    """The server has sent something (or closed): stop sending, so that its answer is not lost to a reset."""
    return bool(select.select([sock], [], [], 0)[0])


def dribble(socks_and_data, seconds, every=0.05):
    """Send each socket's bytes one at a time, ``every`` s apart, for ``seconds`` at most; a socket the server
    has answered (or closed) gets no more."""
    started = time.monotonic()
    for position in range(max(len(data) for _, data in socks_and_data)):
        if time.monotonic() - started > seconds:
            return
        for sock, data in socks_and_data:
            if position < len(data) and not answered(sock):
                with contextlib.suppress(OSError):
                    sock.sendall(data[position:position + 1])
        time.sleep(every)


def read_response(sock):
    """One response on a kept-alive connection (by its Content-Length)."""
    raw = b""
    while True:
        head, separator, body = raw.partition(b"\r\n\r\n")
        if separator:
            length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
            if len(body) >= length:
                return parse_response(raw)
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the response was complete"
        raw += chunk


# ------------------------------------------------------------------------ exposition format, strictly
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{(?:{_LABEL}(?:,{_LABEL})*)?\}})? (\S+)$")
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def check_exposition(text):
    """Parse a ``text/plain; version=0.0.4`` page strictly and return its samples as ``parse_exposition``
    does. Asserts: every line is a HELP, a TYPE or a sample; HELP and TYPE come once per family, before
    its samples, whose lines are contiguous; label values are escaped; no series twice; each histogram
    series has ascending ``le`` buckets ending at ``+Inf``, cumulative counts, ``+Inf == _count`` and a
    ``_sum``."""
    assert text.endswith("\n")
    samples, families, kinds, done = {}, {}, {}, set()
    family = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            what, name = line[2:6], line.split(" ")[2]
            assert re.fullmatch(_NAME, name), line
            assert (name, what) not in families, f"second {what} line for {name}"
            families[name, what] = line
            if what == "TYPE":
                kinds[name] = line.split(" ")[3]
                assert kinds[name] in _SUFFIXES, line
            assert name not in done, f"{what} of {name} after its samples"
            if family != name:
                if family is not None:
                    done.add(family)
                family = name
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        assert family is not None and name in {family + suffix for suffix in _SUFFIXES[kinds[family]]}, line
        assert (family, "HELP") in families and (family, "TYPE") in families, line
        key = name + labels
        assert key not in samples, f"series twice: {key}"
        samples[key] = float(value) if value not in ("+Inf", "-Inf") else float(value.replace("Inf", "inf"))
        assert not math.isnan(samples[key]), line
    for name, kind in kinds.items():
        if kind != "histogram":
            continue
        series = {}
        for key, value in samples.items():
            if key.startswith(name + "_bucket{"):
                labels = key[len(name) + 8:-1]
                rest, le = re.match(r'^(.*?),?le="([^"]*)"$', labels).groups()
                series.setdefault(rest, []).append((le, value))
        for rest, buckets in series.items():
            bounds = [float(le.replace("+Inf", "inf")) for le, _ in buckets]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf, (name, rest, bounds)
            counts = [value for _, value in buckets]
            assert counts == sorted(counts), (name, rest, counts)
            suffix = "{" + rest + "}" if rest else ""
            assert samples[f"{name}_count{suffix}"] == counts[-1], (name, rest)
            assert f"{name}_sum{suffix}" in samples, (name, rest)
    return samples


def test_exposition_checker_catches_what_it_should():
    good = ('# HELP x_total X.\n# TYPE x_total counter\nx_total{a="q\\"\\n\\\\"} 1\n'
            '# HELP h H.\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3\nh_count 2\n')
    assert check_exposition(good)['x_total{a="q\\"\\n\\\\"}'] == 1
    for bad in [good.replace('q\\"', 'q"'), good + "x_total 2\n", good.replace("h_count 2", "h_count 3"),
                good.replace('h_bucket{le="1"} 1', 'h_bucket{le="1"} 3'), good.replace("# HELP h H.\n", ""),
                good + '# HELP x_total X.\n']:
        with pytest.raises(AssertionError):
            check_exposition(bad)


# ---------------------------------------------------------------------------------- the request head
def test_endless_request_head_gets_431_and_is_not_kept(server):
    """Regression: uvicorn's httptools protocol kept a request head of any size (2.4 GB in 8 s from one
    client; one endless header line also cost quadratic copying); now the head is refused at
    ``max_header_bytes`` (give or take one read): 431 in the error schema, connection closed."""
    before = metrics(server.url)
    line = b"X-Filler: " + b"b" * 1000 + b"\r\n"
    # 16 MiB of header lines, of one header's value, of one header's name, of URL: more than socket buffers
    # hold, so that a server which stops reading shows
    floods = [(b"GET /health HTTP/1.1\r\nHost: x\r\n", line * (16 << 10)),
              (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: ", b"b" * (16 << 20)),
              (b"GET /health HTTP/1.1\r\nHost: x\r\nX-", b"b" * (16 << 20)),
              (b"GET /health?", b"q" * (16 << 20))]
    for start, flood in floods:
        with socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as sock:
            sent = send_all(sock, start + flood)
            raw, closed, _ = read_until_closed(sock, 10)
        assert closed, "the server neither answered nor closed the endless head"
        assert sent < len(start) + len(flood) - (4 << 20), f"the server took {sent} bytes of head"
        if raw:  # the answer can be lost to the reset that closing with unread data sends; usually it arrives
            status, headers, body = parse_response(raw)
            assert status == 431 and headers["connection"] == "close", raw[:200]
            assert body["error"]["field"] == "headers" and f"max_header_bytes={HEAD_LIMIT}" in body["error"]["message"]
    after = metrics(server.url)
    key = 'aladin_connections_closed_total{reason="header_too_large"}'
    assert after[key] - before.get(key, 0) == len(floods)
    # a head just under the limit is served
    headers = "".join(f"X-{n}: {'v' * 100}\r\n" for n in range(HEAD_LIMIT // 120)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n")
        raw, closed, _ = read_until_closed(sock, 10)
    assert closed and parse_response(raw)[0] == 200


def test_connections_that_send_nothing_or_a_partial_head_are_closed(server):
    """Regression: a connection that sent nothing, or part of a head, stayed open for ever (uvicorn arms no
    timer before the first request): now closed after ``header_timeout_s``, with 408 when a head had begun."""
    before = metrics(server.url)
    with socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as idle, \
            socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as partial, \
            socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as slow:
        started = time.monotonic()
        partial.sendall(b"GET /health HTTP/1.1\r\nHo")
        # a byte per 50 ms: the head would take 2.6 s, each byte keeps the connection busy
        dribble([(slow, b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n" + b"X-A: b\r\n" * 3)],
                HEAD_TIMEOUT + 2)
        for sock, refused in ((idle, False), (partial, True), (slow, True)):
            raw, closed, _ = read_until_closed(sock, HEAD_TIMEOUT + 5 - (time.monotonic() - started))
            assert closed, f"still open {time.monotonic() - started:.1f} s later (header_timeout_s={HEAD_TIMEOUT})"
            if refused:
                status, headers, body = parse_response(raw)
                assert status == 408 and body["error"]["field"] == "headers" and headers["connection"] == "close"
            else:
                assert raw == b""
    after = metrics(server.url)
    key = 'aladin_connections_closed_total{reason="header_timeout"}'
    assert after[key] - before.get(key, 0) == 3


def test_keep_alive_connection_gets_a_new_head_timeout_after_each_response(server):
    """A kept-alive connection may send the next request any time within the limits; one that then
    dribbles a head is closed ``header_timeout_s`` after its last response, like a new connection."""
    body = json.dumps(search_body(1)).encode()
    request = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(body)).encode() + b"\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as sock:
        for _ in range(4):  # 4 requests over more than header_timeout_s: each response restarts the clock
            sock.sendall(request)
            assert read_response(sock)[0] == 200
            time.sleep(HEAD_TIMEOUT / 3)
        sock.sendall(b"GET /he")  # ... and never the rest
        raw, closed, seconds = read_until_closed(sock, HEAD_TIMEOUT + 5)
    assert closed and parse_response(raw)[0] == 408 and seconds < HEAD_TIMEOUT + 2


def test_slow_request_outlasting_the_head_timeout_is_not_cut(server):
    """The head timer only guards the head: a request whose batch takes longer than ``header_timeout_s``
    (here held 3x as long) and a body arriving in pieces over more than it both get their answers."""
    batcher = server.app.state.serving.search
    original = batcher.run_batch

    def slow(queries):
        time.sleep(3 * HEAD_TIMEOUT)
        return original(queries)

    batcher.run_batch = slow
    try:
        status, answer, _ = call(server.url, "/search", search_body(2), timeout=JOIN)
    finally:
        batcher.run_batch = original
    assert status == 200 and len(answer["ids"]) == 5
    body = json.dumps(search_body(3)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n")
        for part in range(4):  # HEAD_TIMEOUT * 0.8 after the head, within BODY_TIMEOUT
            time.sleep(HEAD_TIMEOUT / 5)
            sock.sendall(body[part * len(body) // 4:(part + 1) * len(body) // 4])
        raw, closed, _ = read_until_closed(sock, JOIN)
    assert closed and parse_response(raw)[0] == 200


# ----------------------------------------------------------------------------------------- the body
def test_body_that_never_finishes_arriving_gets_408(server):
    """Regression: a body that stopped (or crawled) held its request for ever; now 408 ``request_timeout``
    naming ``body``, ``Connection: close``, after ``body_timeout_s``, counted as status 408."""
    before = metrics(server.url)
    with socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as stalled, \
            socket.create_connection(("127.0.0.1", server.port), timeout=JOIN) as crawling:
        started = time.monotonic()
        for sock in (stalled, crawling):
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"k\": ")
        dribble([(crawling, b" " * 990)], BODY_TIMEOUT + 2)  # a byte per 50 ms: the body would take 50 s
        for sock in (stalled, crawling):
            raw, closed, _ = read_until_closed(sock, BODY_TIMEOUT + 5 - (time.monotonic() - started))
            assert closed and raw, f"no answer {time.monotonic() - started:.1f} s later (body_timeout_s={BODY_TIMEOUT})"
            status, headers, body = parse_response(raw)
            assert status == 408 and headers["connection"] == "close", raw[:200]
            assert body["error"] == {"type": "request_timeout", "field": "body", "message": body["error"]["message"]}
            assert f"body_timeout_s={BODY_TIMEOUT:g}" in body["error"]["message"]
    key = 'aladin_requests_total{endpoint="/search",status="408"}'
    wait_until(lambda: metrics(server.url).get(key, 0) - before.get(key, 0) == 2, "both 408s are counted", 5)


@pytest.mark.parametrize("raw, headers, status, field", [
    (b"[" * 100_000 + b"]" * 100_000, {}, 400, "body"),
    (b'{"a":' * 40_000 + b"1" + b"}" * 40_000, {}, 400, "body"),
    (b'{"query_tokens": ' + b"[" * 900 + b"]" * 900 + b"}", {}, 422, None),
    (json.dumps({**search_body(), "query_tokens": [[float("nan")] * DIM]}).encode(), {}, 422, "query_tokens"),
    (json.dumps({**search_body(), "query_tokens": [[1e39] * DIM]}).encode().replace(b"1e+39", b"1e999"), {}, 422,
     "query_tokens"),
    (json.dumps({**search_body(), "k": float("inf")}).encode(), {}, 422, "k"),
    (json.dumps({**search_body(), "k": 10 ** 40}).encode(), {}, 422, "k"),
    (b'{"k": ' + b"9" * 5000 + b"}", {}, 400, "body"),
    (gzip.compress(json.dumps(search_body()).encode()), {"Content-Encoding": "gzip"}, 400, "body"),
    (b"k=5&rerank_k=20", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "body"),
    (json.dumps({**search_body(), "query_tokens": {"dtype": "float32", "shape": [2 ** 62, 2 ** 62], "data": ""}}
                ).encode(), {}, 422, "query_tokens"),
    (b" " * (256 * 1024 + 1), {}, 413, "body"),
])
def test_bad_bodies_get_a_bounded_4xx_in_the_error_schema(server, raw, headers, status, field):
    """Deep nesting, NaN / Infinity tokens, overflowing numbers, a huge k, a 5000-digit int, a gzip body
    (not decompressed: no bomb), a form body, an absurd base64 shape, an oversized body: each a 4xx naming
    what is wrong, within seconds."""
    started = time.monotonic()
    request = urllib.request.Request(server.url + "/search", data=raw, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=JOIN)
    got, answer = caught.value.code, json.loads(caught.value.read())
    assert time.monotonic() - started < 10
    assert got == status and set(answer) == {"error"}, answer
    assert set(answer["error"]) == {"type", "field", "message"}
    if field is not None:
        assert answer["error"]["field"] == field, answer


@pytest.mark.parametrize("tokens, odd", [([[0.5] * (DIM - 1) + ["1.5"]] * 2, "str"),
                                         ([[0.5] * (DIM - 1) + [True]] * 2, "bool"),
                                         ([[True] * DIM] * 2, "bool")])
def test_token_lists_take_numbers_only(server, tokens, odd):
    """Regression: numpy read ``"1.5"`` and ``true`` as numbers, so such lists were scored (200)."""
    body = {**search_body(), "query_tokens": tokens}
    status, answer, _ = call(server.url, "/search", body)
    assert status == 422 and answer["error"]["field"] == "query_tokens" and odd in answer["error"]["message"], answer
    rerank = {"query_tokens": search_body()["query_tokens"], "candidate_tokens": [tokens]}
    status, answer, _ = call(server.url, "/rerank", rerank)
    assert status == 422 and answer["error"]["field"] == "candidate_tokens", answer


def test_too_many_candidate_ids_are_counted_before_they_are_checked(server):
    """Regression: every id was type-checked before the count: a body of millions of ids cost seconds to
    be told "too many"; the count comes first (one bad id at the end proves the order)."""
    limit = server.config.max_candidates
    body = {"query_tokens": search_body()["query_tokens"], "candidate_ids": [1] * (limit + 1) + ["x"]}
    status, answer, _ = call(server.url, "/rerank", body)
    assert status == 422 and f"at most {limit} candidates" in answer["error"]["message"], answer


# --------------------------------------------------------------------------------- open connections
def test_max_connections_refuses_requests_with_503_and_the_gauge_follows(directories):
    """Beyond ``max_connections`` open connections requests get 503 ``overloaded`` (error schema,
    ``Retry-After``) before their body is read, while /health and /metrics are still answered; the
    ``aladin_open_connections`` gauge counts connections and returns to its level once they close."""
    gallery = load_gallery([directories["a"]], generation=1, device="cpu", warmup=False)
    config = ServingConfig(retriever_paths=[directories["a"]], max_connections=4,
                           **{**LIMITED, "header_timeout_s": JOIN})  # the idle connections stay
    with ServerThread(config, gallery=gallery) as running:
        assert metrics(running.url)["aladin_open_connections"] == 1  # this scrape
        idle = [socket.create_connection(("127.0.0.1", running.port), timeout=JOIN) for _ in range(4)]
        try:
            wait_until(lambda: running.app.state.serving.open_connections == 4, "4 idle connections are counted", 5)
            status, answer, headers = call(running.url, "/search", search_body())  # the 5th connection
            assert status == 503 and answer["error"]["type"] == "overloaded" and headers["retry-after"] == "1"
            assert "max_connections=4" in answer["error"]["message"]
            assert call(running.url, "/health")[0] == 200
            assert metrics(running.url)["aladin_open_connections"] == 5
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: running.app.state.serving.open_connections == 0, "the idle connections are closed", 5)
        assert call(running.url, "/search", search_body())[0] == 200
        with ThreadPoolExecutor(8) as pool:  # many short connections: the count returns to 0, not drifting
            list(pool.map(lambda seed: call(running.url, "/health"), range(40)))
        wait_until(lambda: running.app.state.serving.open_connections == 0, "the count returns to 0", 5)


def test_limit_options_and_their_validation():
    args = build_parser().parse_args(["--retriever", "g", "--max-header-bytes", "4096", "--header-timeout", "2.5",
                                      "--body-timeout", "30", "--keep-alive-timeout", "1", "--max-connections", "none"])
    config = config_from_arguments(args)
    assert (config.max_header_bytes, config.header_timeout_s, config.body_timeout_s, config.keep_alive_timeout_s,
            config.max_connections) == (4096, 2.5, 30.0, 1.0, None)
    defaults = ServingConfig()
    assert defaults.max_connections == 1024 and 0 < defaults.header_timeout_s < defaults.body_timeout_s
    for name, value in [("header_timeout_s", 0), ("body_timeout_s", float("inf")),
                        ("keep_alive_timeout_s", float("nan")), ("max_header_bytes", 0), ("max_connections", 0),
                        ("max_connections", True)]:
        with pytest.raises(ValueError, match=name):
            ServingConfig(**{name: value})
    from aladin_fast.serving.server import uvicorn_config

    settings = uvicorn_config(None, ServingConfig(keep_alive_timeout_s=1.5), "127.0.0.1", 0)
    assert settings.timeout_keep_alive == 1.5 and settings.ws == "none"


# ------------------------------------------------------------------------------ metrics cardinality
def test_metrics_series_do_not_grow_with_client_values(server):
    """Labels never take a client's value: 2000 requests to distinct unknown paths, with other methods, query
    strings and bad bodies add no series, the page stays valid exposition format, every counter only grows."""
    _cardinality(server, 2000)


@pytest.mark.slow
def test_metrics_series_do_not_grow_with_client_values_long(server):
    _cardinality(server, 10_000)


def _cardinality(server, requests):
    kinds = [("GET", "/nope/{i}"), ("POST", "/search?q={i}"), ("DELETE", "/admin/reload/{i}"), ("PUT", "/search"),
             ("POST", "/rerank")]
    body = b'{"direction": "d%d\\"\\n\\\\", "k": %d}'

    def client(start, count=400):
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=JOIN)
        for i in range(start, start + count):
            method, path = kinds[i % len(kinds)]
            conn.request(method, path.format(i=i), body % (i, i) if method in ("POST", "PUT") else None,
                         {"Content-Type": "application/json"})
            conn.getresponse().read()
        conn.close()

    client(-len(kinds), len(kinds))  # each kind once: the (endpoint, status) series they make exist now
    call(server.url, "/metrics")
    before = check_exposition(call(server.url, "/metrics")[1])
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(client, range(0, requests, 400)))
    after = check_exposition(call(server.url, "/metrics")[1])
    assert set(after) == set(before), sorted(set(after) ^ set(before))
    assert all("nope" not in key and "d1" not in key and "?q" not in key for key in after)
    for key, value in before.items():
        if "_total" in key or key.endswith("_count") or key.endswith("_sum") or "_bucket" in key:
            assert after[key] >= value, key
    assert after['aladin_requests_total{endpoint="other",status="404"}'] >= 2 * requests // 5


# ---------------------------------------------------------------------------------------------- soak
def _resources():
    gc.collect()
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    with open("/proc/self/status") as status:
        rss = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))
    return {"fds": len(fds), "threads": threading.active_count(), "objects": len(gc.get_objects()), "map": fds,
            "rss": rss}


def _mixed_traffic(url, port, rounds, paths):
    """Every kind of request, valid and not, plus clients hanging up, plus reloads."""
    good = json.dumps(search_body(7)).encode()
    for i in range(rounds):
        assert call(url, "/search", raw=good)[0] == 200
        assert call(url, "/search", raw=b'{"k": %d}' % i)[0] == 422
        assert call(url, "/rerank", raw=b" " * (256 * 1024 + 1))[0] == 413
        assert call(url, "/nope/%d" % i)[0] == 404
        with socket.create_connection(("127.0.0.1", port), timeout=JOIN) as sock:  # hangs up mid-body
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"q")
        with socket.create_connection(("127.0.0.1", port), timeout=JOIN) as sock:  # hangs up before the answer
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(good) + good)
        if i % 10 == 0:
            assert call(url, "/admin/reload", {"paths": paths[(i // 10) % 2]})[0] == 200
            assert call(url, "/admin/reload", {"paths": ["/nonexistent"]})[0] == 422


def _soak(server, directories, rounds, rss_growth=None):
    paths = [[directories["b"]], [directories["a"], directories["captions"]]]
    state = server.app.state.serving
    _mixed_traffic(server.url, server.port, 20, paths)  # warm: lazy imports, caches, pools at their size
    wait_until(lambda: state.open_connections == 0 and state.metrics.inflight.value() == 0, "the server is idle")
    before = _resources()
    _mixed_traffic(server.url, server.port, rounds, paths)
    wait_until(lambda: state.open_connections == 0 and state.metrics.inflight.value() == 0, "the server is idle")
    after = _resources()
    extra = {fd: target for fd, target in after["map"].items() if before["map"].get(fd) != target}
    assert after["fds"] <= before["fds"] and after["threads"] <= before["threads"], (before["fds"], after["fds"], extra)
    assert after["objects"] - before["objects"] < 2000, (before["objects"], after["objects"])  # no per-request growth
    if rss_growth is not None:
        assert after["rss"] - before["rss"] < rss_growth, (before["rss"], after["rss"])
    gallery = state.gallery
    assert sorted(gallery.paths.values()) in [sorted(p) for p in paths]
    if sorted(gallery.paths.values()) != sorted(paths[1]):
        assert call(server.url, "/admin/reload", {"paths": paths[1]})[0] == 200


def test_soak_leaves_no_descriptors_threads_or_objects_behind(server, directories):
    """~600 requests of every kind and 12 reloads (good and failed): descriptors, threads and live objects
    are back where they were (memory-mapped features of old generations released: their files' descriptors
    are counted)."""
    _soak(server, directories, rounds=60)


@pytest.mark.slow
def test_soak_long(server, directories):
    """~8000 requests and 200 reloads: as above, and the resident memory grows by less than 64 MiB."""
    _soak(server, directories, rounds=1000, rss_growth=64 << 20)


@pytest.mark.slow
def test_idle_connections_cannot_exhaust_descriptors(directories, tmp_path):
    """The symptom behind ``header_timeout_s``: ``serve`` limited to 256 descriptors and 400 connections that
    send nothing. Before, 241 of them stayed open for ever and every new client was reset; now they are
    closed after the head timeout and the server answers again."""
    port_file = tmp_path / "port"
    code = ("import resource, socket, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))\n"
            "probe = socket.socket(); probe.bind(('127.0.0.1', 0)); port = probe.getsockname()[1]; probe.close()\n"
            f"open({str(port_file)!r}, 'w').write(str(port))\n"
            "from aladin_fast.serving.cli import main\n"
            f"sys.exit(main(['--retriever', {directories['a']!r}, '--port', str(port), '--device', 'cpu',\n"
            "                '--log-level', 'error', '--header-timeout', '1', '--max-connections', 'none']))\n")
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        wait_until(lambda: port_file.exists() and port_file.read_text(), "the child wrote its port", 60)
        url = f"http://127.0.0.1:{int(port_file.read_text())}"
        wait_until(lambda: child.poll() is not None or _answers(url), "the child serves", 120)
        assert child.poll() is None, child.communicate(timeout=JOIN)[1].decode()[-2000:]
        idle = []
        for _ in range(400):
            try:
                idle.append(socket.create_connection(("127.0.0.1", int(port_file.read_text())), timeout=5))
            except OSError:
                break
        try:
            wait_until(lambda: _answers(url), "the server answers again, idle connections closed", 15)
        finally:
            for sock in idle:
                sock.close()
    finally:
        child.terminate()
        child.communicate(timeout=JOIN)


def _answers(url):
    try:
        return call(url, "/health", timeout=2)[0] == 200
    except OSError:
        return False


def test_protocol_without_the_hooks_the_limits_need_is_served_unlimited_with_a_warning(monkeypatch, caplog):
    """A uvicorn release that renamed a protocol hook must not break serving: the limits are off, and the log says so."""
    from aladin_fast.serving import connections

    class Bare:  # no on_response_complete and no httptools callbacks
        def connection_made(self, transport): ...
        def connection_lost(self, exc): ...
        def data_received(self, data): ...

    monkeypatch.setattr(connections, "_base_protocol", lambda: Bare)
    with caplog.at_level("WARNING", logger="aladin_fast.serving"):
        assert connections.protocol_class(ServingConfig()) is Bare
    assert "on_response_complete" in caplog.text and "limits are off" in caplog.text
