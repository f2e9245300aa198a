"""Property-based and concurrency tests of the serving layer (aladin_fast.serving).

What a demanding user relies on, checked against in-process oracles:

- batching transparency: a request's answer (ids, scores bit for bit, explanations) is the one it gets
  served alone, whatever it was merged with (search / rerank by ids / rerank by inline tokens, both
  directions, mixed widths, k, rerank_k, wire dtypes), for width-free (neg_inf) and width-keyed (zero
  padding, fp16 / bf16, multi-shard) galleries; and a rerank of a search's hits repeats its scores;
- isolation: a malformed request gets its own 4xx naming the field (never a 500, never a hang) and
  leaves the requests it was sent with untouched;
- liveness: many client threads against a small queue all get an answer (200 or 503 + Retry-After),
  shutdown completes even while a batch is still being formed;
- metrics: counters match what was sent and the exposition round-trips through ``parse_exposition``;
- mutation: searches and reranks while the served retrievers are appended to / removed from /
  compacted in process never fail and always score from one snapshot.

Default run: derandomized hypothesis samples (reproducible); ``-m slow`` runs larger ones.
"""
from __future__ import annotations

import asyncio
import base64
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from aladin_fast.retrieval import FeatureStore, Retriever, StudentIndex, TeacherScorer  # noqa: E402
from aladin_fast.serving import (DynamicBatcher, MetricsRegistry, RequestError, ServerThread,  # noqa: E402
                                 ServingConfig, encode_tensor)
from aladin_fast.serving.batcher import BatcherClosedError, QueueFullError  # noqa: E402
from aladin_fast.serving.engine import (Gallery, load_gallery, rerank_batch_key, run_rerank_batch,  # noqa: E402
                                        run_search_batch, search_batch_key)
from aladin_fast.serving.metrics import parse_exposition  # noqa: E402
from aladin_fast.serving.schema import decode_tensor, parse_json_body, parse_rerank, parse_search  # noqa: E402

ITEMS, REGIONS, WORDS, DIM, EMBED = 48, 7, 9, 16, 12
DIRECTIONS = ("text_to_image", "image_to_text")
WIRES = ("list", "float32", "float16", "bfloat16")
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
FAST = settings(derandomize=True, deadline=None, suppress_health_check=HEALTH, database=None)
LIMITS = dict(max_k=50, max_rerank_k=64, max_query_tokens=32, max_candidates=40, max_candidate_tokens=16,
              max_body_bytes=256 * 1024)
PROJECTION = torch.randn(DIM, EMBED, generator=torch.Generator().manual_seed(99))


def normalize(x):
    return torch.nn.functional.normalize(x, dim=-1)


def embed(pooled):
    return normalize(pooled @ PROJECTION)


def make_retriever(seed, direction, scorer=None, dtype="float32", shards=1, ids_offset=0):
    g = torch.Generator().manual_seed(seed)
    width = REGIONS if direction == "text_to_image" else WORDS
    tokens = normalize(torch.randn(ITEMS, width, DIM, generator=g))
    lengths = torch.randint(1, width + 1, (ITEMS,), generator=g)
    ids = torch.arange(ITEMS) * 5 + 1 + ids_offset
    student = StudentIndex(EMBED, device="cpu")
    student.add(embed(tokens.mean(1)), ids)
    store = FeatureStore(DIM, dtype)
    step = -(-ITEMS // shards)
    for start in range(0, ITEMS, step):
        store.append(ids[start:start + step], tokens[start:start + step], lengths[start:start + step])
    return Retriever(student, store, scorer=scorer, direction=direction)


# flavour -> how each direction's retriever is built: width-free merging (neg_inf: the zero-copy in-place
# path, one shard) and width-keyed merging (zero padding; fp16 / bf16 stores; several shards: the gather path)
FLAVOURS = {
    "neg_inf": {"text_to_image": dict(seed=1), "image_to_text": dict(seed=3)},
    "zero": {"text_to_image": dict(seed=5, scorer=TeacherScorer(padding="zero"), dtype="float16", shards=3),
             "image_to_text": dict(seed=7, scorer=TeacherScorer(padding="zero", aggregation="MrAVGw"),
                                   dtype="bfloat16", shards=2)},
}


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-properties")
    out = {}
    for flavour, per_direction in FLAVOURS.items():
        for direction, options in per_direction.items():
            path = str(root / f"{flavour}-{direction}")
            make_retriever(direction=direction, **options).save(path)
            out[flavour, direction] = path
    return out


@pytest.fixture(scope="module")
def galleries(directories):
    return {flavour: load_gallery([directories[flavour, d] for d in DIRECTIONS], generation=1, device="cpu")
            for flavour in FLAVOURS}


@pytest.fixture(scope="module")
def server(directories):
    config = ServingConfig(retriever_paths=[directories["neg_inf", d] for d in DIRECTIONS], device="cpu",
                           max_batch_size=16, max_wait_ms=25, **LIMITS)
    with ServerThread(config) as running:
        yield running


# ------------------------------------------------------------------------------------------------ helpers
def wire_tensor(tensor, wire):
    return tensor.tolist() if wire == "list" else encode_tensor(tensor, wire)


@st.composite
def request_bodies(draw, gallery_ids):
    """``(kind, body)``: a valid /search or /rerank body (kind "search", "ids" or "tokens")."""
    kind = draw(st.sampled_from(["search", "ids", "tokens"]))
    direction = draw(st.sampled_from(DIRECTIONS))
    width = draw(st.sampled_from([2, 5, 9]))  # few widths, so width-keyed (zero padding) requests can merge too
    length = draw(st.integers(1, width))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 20)))
    tokens = normalize(torch.randn(width, DIM, generator=g))
    wire = draw(st.sampled_from(WIRES))
    body = {"direction": direction, "query_tokens": wire_tensor(tokens, wire)}
    if length != width or draw(st.booleans()):
        body["query_length"] = length
    if kind == "search":
        body["query_embedding"] = embed(tokens[:length].mean(0, keepdim=True))[0].tolist()
        k = draw(st.integers(1, 12))
        body["k"] = k
        body["rerank_k"] = draw(st.sampled_from([k, 16, 64]))
        body["explain"] = draw(st.booleans())
    elif kind == "ids":
        body["candidate_ids"] = draw(st.lists(st.sampled_from(gallery_ids[direction]), min_size=1, max_size=12))
    else:
        count, candidate_width = draw(st.integers(1, 6)), draw(st.sampled_from([1, 4, 7]))
        body["candidate_tokens"] = wire_tensor(normalize(torch.randn(count, candidate_width, DIM, generator=g)), wire)
        body["candidate_lengths"] = draw(st.lists(st.integers(1, candidate_width), min_size=count, max_size=count))
    return kind, body


def ids_by_direction(gallery):
    return {d: [int(i) for i in gallery.retrievers[d].feature_store.ids()] for d in DIRECTIONS}


def parse(kind, body, gallery, config):
    """The validated query of ``body`` exactly as the server parses it (through a JSON round trip)."""
    return (parse_search if kind == "search" else parse_rerank)(json.loads(json.dumps(body)), gallery, config)


def run(kind, queries):
    return (run_search_batch if kind == "search" else run_rerank_batch)(queries)


def alone(kind, body, gallery, config):
    """The oracle: what ``body`` gets when it is served alone (the HTTP answer, or ``(status, field)``)."""
    try:
        query = parse(kind, body, gallery, config)
    except RequestError as err:
        return err.status, err.field
    return {**run(kind, [query])[0], "direction": query.direction, "generation": gallery.generation}


def call(url, path, body=None, raw=None, method=None, timeout=30):
    """``(status, json or text, headers)``; never raises on HTTP errors (a hang fails on ``timeout``)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload, status, headers = response.read(), response.status, response.headers
    except urllib.error.HTTPError as err:
        payload, status, headers = err.read(), err.code, err.headers
    headers = {name.lower(): value for name, value in headers.items()}
    try:
        return status, json.loads(payload), headers
    except ValueError:
        return status, payload.decode(), headers


def endpoint_of(kind):
    return "/search" if kind == "search" else "/rerank"


def metrics(url):
    return parse_exposition(call(url, "/metrics")[1])


# --------------------------------------------------------------------------- batching transparency (engine)
def check_transparent(requests, gallery, config):
    queries = [(kind, parse(kind, body, gallery, config)) for kind, body in requests]
    groups = {}
    for position, (kind, query) in enumerate(queries):
        key = search_batch_key(query) if kind == "search" else rerank_batch_key(query)
        groups.setdefault((kind, key), []).append(position)
    merged = 0
    for (kind, _), members in groups.items():
        together = run(kind, [queries[i][1] for i in members])
        assert len(together) == len(members)
        merged += len(members) > 1
        for position, got in zip(members, together):
            expected = run(kind, [queries[position][1]])[0]
            assert got == expected, (kind, requests[position][1], got, expected)  # bit for bit
            if kind == "search" and got["ids"]:  # rerank of the hits repeats the search's scores exactly
                query = queries[position][1]
                again = run_rerank_batch([parse("ids", {
                    "direction": query.direction, "query_tokens": query.tokens.float().tolist(),
                    "query_length": query.length, "candidate_ids": got["ids"]}, gallery, config)])[0]
                if query.tokens.dtype == torch.float32:
                    assert again["scores"] == got["scores"]
    return merged


def _engine_transparency(galleries, flavour, data):
    gallery = galleries[flavour]
    config = ServingConfig(**LIMITS)
    requests = data.draw(st.lists(request_bodies(ids_by_direction(gallery)), min_size=2, max_size=8))
    check_transparent(requests, gallery, config)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@settings(FAST, max_examples=30)
@given(data=st.data())
def test_engine_batch_answers_equal_lone_answers(galleries, flavour, data):
    _engine_transparency(galleries, flavour, data)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
@settings(FAST, max_examples=400, derandomize=False)
@given(data=st.data())
def test_engine_batch_answers_equal_lone_answers_thorough(galleries, flavour, data):
    _engine_transparency(galleries, flavour, data)


# ------------------------------------------------------------------ transparency + isolation over HTTP
BAD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.lists(st.floats(-2, 2), max_size=3), max_size=3),
    st.fixed_dictionaries({"dtype": st.sampled_from(["float32", "float16", "int8"]),
                           "shape": st.lists(st.sampled_from([0, 1, 3, DIM, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63]),
                                             min_size=1, max_size=3),
                           "data": st.sampled_from(["", "AAAA", "!!", base64.b64encode(bytes(64)).decode()])}),
)
FIELDS = ["query_embedding", "query_tokens", "query_length", "k", "rerank_k", "direction", "explain",
          "candidate_ids", "candidate_tokens", "candidate_lengths", "colour"]


@st.composite
def broken(draw, valid):
    """A valid ``(kind, body)`` with one field replaced by a random JSON value, or removed."""
    kind, body = draw(valid)
    body = dict(body)
    field = draw(st.sampled_from(FIELDS))
    if draw(st.integers(0, 4)) == 0:
        body.pop(field, None)
    else:
        body[field] = draw(BAD_VALUES)
    return kind, body


def test_validation_never_fails_with_anything_but_a_request_error(galleries):
    """In process: any one-field corruption gives a RequestError (4xx, naming a field) or a valid query."""
    gallery, config = galleries["neg_inf"], ServingConfig(**LIMITS)

    @settings(FAST, max_examples=250)
    @given(broken(request_bodies(ids_by_direction(gallery))))
    def check(case):
        kind, body = case
        try:
            parse(kind, body, gallery, config)
        except RequestError as err:
            assert 400 <= err.status < 500 and isinstance(err.field, str) and err.field, err
            assert err.field in FIELDS or err.field == "body", err

    check()


def test_concurrent_mixed_requests_over_http_equal_lone_answers(server):
    """Concurrent mixes of good and broken requests: each answer is what the request gets alone."""
    gallery, config = server.app.state.serving.gallery, server.config
    ids = ids_by_direction(gallery)
    good = request_bodies(ids)
    sent = {"requests": 0}
    before = metrics(server.url)

    @settings(FAST, max_examples=10)
    @given(st.lists(st.one_of(good, good, good, broken(good)), min_size=6, max_size=24))
    def check(requests):
        expected = [alone(kind, body, gallery, config) for kind, body in requests]
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: call(server.url, endpoint_of(r[0]), r[1]), requests))
        for (kind, body), want, (status, answer, _) in zip(requests, expected, answers):
            if isinstance(want, tuple):  # broken: its own 4xx naming the field
                assert (status, answer["error"]["field"]) == want, (body, answer)
            else:
                assert status == 200 and answer == want, (kind, body, answer, want)
                sent["requests"] += kind == "search"

    check()
    after = metrics(server.url)
    key = 'aladin_batch_size_{}{{queue="search"}}'
    calls = after.get(key.format("count"), 0) - before.get(key.format("count"), 0)
    assert after.get(key.format("sum"), 0) - before.get(key.format("sum"), 0) == sent["requests"]
    assert 0 < calls < sent["requests"], "concurrent searches were never merged"


@pytest.mark.parametrize("raw, status", [
    (b"", 400), (b"{", 400), (b"[1]", 400), (b'"x"', 400), (b"\xff\xfe", 400), (b"NaN", 400),
    (b"[" * 100_000, 400),  # was a 500 (RecursionError is no ValueError)
    (b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400),
])
def test_malformed_bodies_get_400_naming_body(server, raw, status):
    for path in ("/search", "/rerank", "/admin/reload")[:3 if raw else 2]:  # empty reload body: reload as is
        got, answer, _ = call(server.url, path, raw=raw)
        assert got == status and answer["error"]["field"] == "body", (path, raw[:20], answer)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("change, field", [
    ({"direction": ["text_to_image"]}, "direction"),  # was a 500: unhashable list
    ({"direction": {"a": 1}}, "direction"),
    ({"query_tokens": {"dtype": "float32", "shape": [2 ** 32, 2 ** 32], "data": ""}}, "query_tokens"),  # was 500
    ({"query_tokens": {"dtype": "float32", "shape": [0, 2 ** 63], "data": ""}}, "query_tokens"),  # was 500
    ({"query_tokens": {"dtype": "float16", "shape": [2 ** 62, 4], "data": ""}}, "query_tokens"),  # was 500
    ({"query_embedding": [float("nan")] * EMBED}, "query_embedding"),
    ({"query_tokens": [[1e39] * DIM]}, "query_tokens"),
    ({"query_tokens": [[3e38] * DIM] * 3, "query_length": 3}, "query_tokens"),  # finite, scores overflow: was 500
])
def test_regressions_give_4xx_naming_the_field(server, change, field):
    body = {"query_embedding": [0.1] * EMBED, "query_tokens": [[0.1] * DIM] * 2, "k": 3, "rerank_k": 8, **change}
    status, answer, _ = call(server.url, "/search", body)
    assert 400 <= status < 500 and answer["error"]["field"] == field, answer
    if field == "query_embedding":  # not a /rerank field
        return
    rerank = {key: value for key, value in body.items() if key in ("direction", "query_tokens", "query_length")}
    status, answer, _ = call(server.url, "/rerank", {**rerank, "candidate_tokens": [[[0.1] * DIM]]})
    assert 400 <= status < 500 and answer["error"]["field"] == field, answer


def test_overflowing_inline_candidates_name_candidate_tokens(server):
    status, answer, _ = call(server.url, "/rerank", {"query_tokens": [[0.5] * DIM],
                                                     "candidate_tokens": [[[1e38] * DIM] * 4] * 2})
    assert status == 422 and answer["error"]["field"] == "candidate_tokens", answer


def test_body_limit_is_exact_for_declared_and_chunked_bodies(server):
    limit = server.config.max_body_bytes
    body = b'{"x": 1}'
    at_limit = body + b" " * (limit - len(body))
    status, answer, _ = call(server.url, "/search", raw=at_limit)
    assert status == 422 and answer["error"]["field"] == "x", answer  # read and validated, not refused
    status, answer, _ = call(server.url, "/search", raw=at_limit + b" ")
    assert status == 413 and answer["error"]["field"] == "body"
    chunks = iter([at_limit[:1000], at_limit[1000:] + b" "])  # no Content-Length: chunked transfer
    status, answer, _ = call(server.url, "/search", raw=chunks)
    assert status == 413 and answer["error"]["field"] == "body"


# -------------------------------------------------------------------------------------- liveness, metrics
def test_client_hanging_up_mid_upload_is_not_counted_as_a_500(server):
    """Regression: a client that sent half its body and closed the connection was counted as an internal
    error (aladin_requests_total{status="500"}) although no response was sent; now 499 (client closed)."""
    before = metrics(server.url)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"query_tokens\": [")
        time.sleep(0.05)
    key = 'aladin_requests_total{{endpoint="/rerank",status="{}"}}'
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = metrics(server.url)
        if after.get(key.format(499), 0) + after.get(key.format(500), 0) > before.get(key.format(499), 0) + \
                before.get(key.format(500), 0):
            break
        time.sleep(0.02)
    assert after.get(key.format(500), 0) == before.get(key.format(500), 0)
    assert after.get(key.format(499), 0) == before.get(key.format(499), 0) + 1


def test_many_clients_all_complete_and_metrics_count_them(directories):
    """36 threads against a 4-deep queue: every request completes (200 equal to its lone answer, or 503
    with Retry-After), nothing hangs, and the counters match what the clients saw."""
    config = ServingConfig(retriever_paths=[directories["neg_inf", d] for d in DIRECTIONS], device="cpu",
                           max_batch_size=8, max_wait_ms=3, workers=2, max_queue=4, **LIMITS)
    with ServerThread(config) as running:
        gallery = running.app.state.serving.gallery
        rng = random.Random(5)
        pool_of = []
        g = torch.Generator().manual_seed(3)
        for position in range(12):
            direction = DIRECTIONS[position % 2]
            width = 3 + position % 5
            tokens = normalize(torch.randn(width, DIM, generator=g))
            if position % 3 == 0:
                kind, body = "search", {"direction": direction, "query_tokens": tokens.tolist(), "k": 1 + position,
                                        "rerank_k": 20, "query_embedding": embed(tokens.mean(0, keepdim=True))[0].tolist()}
            elif position % 3 == 1:
                kind, body = "ids", {"direction": direction, "query_tokens": tokens.tolist(),
                                     "candidate_ids": rng.sample(ids_by_direction(gallery)[direction], 5)}
            else:
                kind, body = "tokens", {"direction": direction, "query_tokens": tokens.tolist(),
                                        "candidate_tokens": normalize(torch.randn(3, 4, DIM, generator=g)).tolist()}
            pool_of.append((kind, body, alone(kind, body, gallery, config)))
        bad = ("search", {"query_tokens": [[0.0] * DIM], "k": 2})  # query_embedding missing: 422
        before = metrics(running.url)

        def client(seed):
            local, seen = random.Random(seed), []
            for _ in range(6):
                kind, body, expected = pool_of[local.randrange(len(pool_of))] if local.random() > 0.1 else (*bad, None)
                status, answer, headers = call(running.url, endpoint_of(kind), body, timeout=30)
                seen.append((endpoint_of(kind), status))
                if status == 200:
                    assert answer == expected
                elif status == 503:
                    assert answer["error"]["type"] == "overloaded" and headers.get("retry-after") == "1"
                else:
                    assert status == 422 and expected is None and answer["error"]["field"] == "query_embedding"
            return seen

        with ThreadPoolExecutor(36) as threads:
            seen = [item for part in threads.map(client, range(36)) for item in part]
        assert len(seen) == 36 * 6
        statuses = {status for _, status in seen}
        assert 200 in statuses and statuses <= {200, 422, 503}

        expected_counts = {}
        for endpoint, status in seen:
            key = f'aladin_requests_total{{endpoint="{endpoint}",status="{status}"}}'
            expected_counts[key] = expected_counts.get(key, 0) + 1
        deadline = time.monotonic() + 5
        while True:  # the middleware counts after the response went out: let the last ones land
            after = metrics(running.url)
            deltas = {key: after.get(key, 0) - before.get(key, 0) for key in expected_counts}
            if deltas == expected_counts or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert deltas == expected_counts
        served = {e: sum(1 for endpoint, s in seen if endpoint == e and s == 200) for e in ("/search", "/rerank")}
        for queue, endpoint in (("search", "/search"), ("rerank", "/rerank")):
            key = f'aladin_batch_size_sum{{queue="{queue}"}}'
            assert after.get(key, 0) - before.get(key, 0) == served[endpoint]
            assert after[f'aladin_queue_depth{{queue="{queue}"}}'] == 0
        for endpoint in ("/search", "/rerank"):
            total = sum(v for k, v in after.items() if k.startswith(f'aladin_requests_total{{endpoint="{endpoint}"'))
            assert after[f'aladin_request_latency_seconds_count{{endpoint="{endpoint}"}}'] == total
        assert after["aladin_inflight_requests"] == 1  # this scrape
        check_histograms(after)
        assert call(running.url, "/health")[:2] == (200, {"status": "ok", "generation": 1})
    assert not running._thread.is_alive()


def check_histograms(samples):
    """Every histogram series: cumulative buckets non-decreasing, +Inf bucket == count."""
    series = {}
    for key, value in samples.items():
        if "_bucket{" not in key:
            continue
        name, labels = key.split("_bucket{", 1)
        le = labels.rsplit('le="', 1)[1].rstrip('"}')
        rest = labels.rsplit('le="', 1)[0].rstrip(",")
        series.setdefault((name, rest), []).append((float(le), value))
    assert series
    for (name, rest), buckets in series.items():
        counts = [value for _, value in sorted(buckets)]
        assert counts == sorted(counts), (name, rest)
        count_key = f"{name}_count{{{rest}}}" if rest else f"{name}_count"
        assert counts[-1] == samples[count_key], (name, rest)


LABEL_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)


@settings(FAST, max_examples=150)
@given(ops=st.lists(st.tuples(st.sampled_from(["inc", "set", "observe"]), LABEL_TEXT, LABEL_TEXT,
                              st.floats(0, 1e6, allow_nan=False)), max_size=20))
def test_metrics_exposition_round_trips(ops):
    """render() then parse_exposition() gives back every sample, whatever the label values hold."""
    registry, counters, gauges, histograms = MetricsRegistry(), {}, {}, {}

    def escape(value):
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    for op, endpoint, status, value in ops:
        if op == "inc":
            registry.requests.inc(value, endpoint=endpoint, status=status)
            key = f'aladin_requests_total{{endpoint="{escape(endpoint)}",status="{escape(status)}"}}'
            counters[key] = counters.get(key, 0.0) + value
        elif op == "set":
            registry.gallery_items.set(value, direction=endpoint)
            gauges[f'aladin_gallery_items{{direction="{escape(endpoint)}"}}'] = value
        else:
            registry.batch_latency.observe(value, queue=endpoint)
            key = f'aladin_batch_latency_seconds_count{{queue="{escape(endpoint)}"}}'
            histograms[key] = histograms.get(key, 0) + 1
    samples = parse_exposition(registry.render())
    for key, value in {**counters, **gauges, **histograms}.items():
        assert samples.get(key) == value, (key, samples)
    if histograms:
        check_histograms(samples)


# ------------------------------------------------------------------------------------- the batcher itself
class Doubler:
    """run_batch stand-in: payload value * 2; raises when a poisoned payload is in the call."""

    def __init__(self):
        self.calls, self.lock = [], threading.Lock()

    def __call__(self, payloads):
        time.sleep(0.001)
        with self.lock:
            self.calls.append([p["index"] for p in payloads])
        if any(p["poison"] for p in payloads):
            raise ValueError(f"poisoned {[p['index'] for p in payloads if p['poison']]}")
        return [p["index"] * 2 for p in payloads]


@settings(FAST, max_examples=60)
@given(plan=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(0, 9)), min_size=1, max_size=14),
       max_batch_size=st.integers(1, 5), max_wait_ms=st.sampled_from([0, 1, 4, 40]), workers=st.integers(1, 3),
       close_after=st.one_of(st.none(), st.integers(0, 12)))
@example(plan=[(0, 0, 1), (0, 1, 2)], max_batch_size=4, max_wait_ms=40, workers=1, close_after=5)  # close mid-forming
def test_batcher_every_item_gets_its_own_answer_and_close_finishes(plan, max_batch_size, max_wait_ms, workers,
                                                                   close_after):
    """Arbitrary arrivals / keys / poisoned items / a close() at any moment: each item submitted before the
    close gets exactly its own result (or its own error), batches hold one key and at most max_batch_size
    items in arrival order, close() returns, nothing hangs."""
    async def scenario():
        doubler = Doubler()
        batcher = DynamicBatcher("search", doubler, key=lambda p: p["key"], max_batch_size=max_batch_size,
                                 max_wait_ms=max_wait_ms, workers=workers)
        batcher.start()
        submitted, late = [], set()

        async def one(index, key, delay_ms, poison):
            await asyncio.sleep(delay_ms / 1000)
            if batcher._closing:
                late.add(index)
            submitted.append(index)  # submit() queues synchronously: this is the arrival order
            try:
                return await batcher.submit({"index": index, "key": key, "poison": poison})
            except (BatcherClosedError, ValueError) as err:
                return err

        async def closer():
            if close_after is not None:
                await asyncio.sleep(close_after / 1000)
                await batcher.close()

        tasks = [asyncio.ensure_future(one(i, key, delay, roll == 0)) for i, (key, delay, roll) in enumerate(plan)]
        await asyncio.wait_for(asyncio.gather(closer(), *tasks), 5)
        await asyncio.wait_for(batcher.close(), 5)
        return doubler.calls, [t.result() for t in tasks], submitted, late

    calls, results, submitted, late = asyncio.run(scenario())
    keys = {i: key for i, (key, _, _) in enumerate(plan)}
    for index, ((_, _, roll), result) in enumerate(zip(plan, results)):
        if index in late:
            assert isinstance(result, BatcherClosedError)
        elif roll == 0:
            assert isinstance(result, ValueError) and f"[{index}]" in str(result)
        else:
            assert result == 2 * index
    arrival = {index: position for position, index in enumerate(submitted)}
    for batch in calls:
        assert len(batch) <= max_batch_size and len({keys[i] for i in batch}) == 1
        assert [arrival[i] for i in batch] == sorted(arrival[i] for i in batch)


def test_close_while_a_batch_is_being_formed_finishes_it():
    """Regression: close() saw an empty queue and no running batch while the collector held a half-formed
    batch, cancelled the collector (asyncio.wait_for on Python < 3.12 swallowed that cancel) and then waited
    for it forever; where the cancel lands, the popped requests were lost instead."""
    async def scenario():
        batcher = DynamicBatcher("search", lambda items: [item * 2 for item in items], max_batch_size=8,
                                 max_wait_ms=10_000)
        batcher.start()
        pending = asyncio.ensure_future(batcher.submit(21))
        for _ in range(100):  # until the collector has taken the item off the queue
            await asyncio.sleep(0.002)
            if not batcher.depth:
                break
        await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.wait_for(batcher.close(timeout=1.0), 3)
        return await asyncio.wait_for(pending, 3), time.monotonic() - started

    result, elapsed = asyncio.run(scenario())
    assert result == 42 and elapsed < 1.0


@pytest.mark.parametrize("timeout", [0.0, 0.05])
def test_close_with_an_expired_timeout_refuses_leftovers_and_returns(timeout):
    """With the drain timeout spent, queued and half-formed items get BatcherClosedError, none is lost."""
    async def scenario():
        release = threading.Event()

        def slow(items):
            release.wait(5)
            return [item * 2 for item in items]

        batcher = DynamicBatcher("search", slow, key=lambda item: item % 2, max_batch_size=2, max_wait_ms=10_000,
                                 workers=1)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in (0, 2, 1, 4, 3)]
        await asyncio.sleep(0.05)  # [0, 2] runs (blocked); 1, 4, 3 wait
        closing = asyncio.ensure_future(batcher.close(timeout=timeout))
        await asyncio.sleep(timeout + 0.1)
        release.set()
        await asyncio.wait_for(closing, 5)
        return await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)

    results = asyncio.run(scenario())
    assert results[:2] == [0, 4]
    assert all(r == 2 * i or isinstance(r, BatcherClosedError) for i, r in zip((1, 4, 3), results[2:]))


def test_server_shutdown_completes_while_a_request_waits_in_a_forming_batch(directories):
    """Regression: the graceful timeout expired while a request sat in a half-formed batch (max_wait_ms
    longer than graceful_timeout_s); the lifespan's close() then hung and the server thread never exited."""
    config = ServingConfig(retriever_paths=[directories["neg_inf", "text_to_image"]], device="cpu",
                           max_batch_size=64, max_wait_ms=5000, graceful_timeout_s=0.2, **LIMITS)
    server = ServerThread(config).start()
    body = {"query_embedding": [0.1] * EMBED, "query_tokens": [[0.1] * DIM] * 2, "k": 3, "rerank_k": 8}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, server.url, "/search", body)
        deadline = time.monotonic() + 5
        while server.app.state.serving.metrics.inflight.value() < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.15)  # parsed, queued and taken by the collector: the batch is forming (~4.8 s left to wait)
        started = time.monotonic()
        server.stop(timeout=4)
        stopped_in = time.monotonic() - started
        assert pending.result(timeout=10)[0] in (200, 503)  # never uvicorn's 500 (test_serving_shutdown.py)
    assert not server._thread.is_alive(), "shutdown hung"
    assert stopped_in < 3


# -------------------------------------------------------------------------------- mutation while serving
def test_explanations_survive_a_hit_removed_right_after_the_search(directories):
    """Regression: image->text explanations looked the hits' caption lengths up in the store after the
    search had released the retriever, so a hit removed meanwhile raised KeyError (a 500)."""
    gallery = load_gallery([directories["neg_inf", "image_to_text"]], generation=1, device="cpu")
    retriever = gallery.retrievers["image_to_text"]
    config = ServingConfig(**LIMITS)
    tokens = normalize(torch.randn(4, DIM, generator=torch.Generator().manual_seed(0)))
    body = {"direction": "image_to_text", "query_tokens": tokens.tolist(), "k": 5, "rerank_k": 20, "explain": True,
            "query_embedding": embed(tokens.mean(0, keepdim=True))[0].tolist()}
    query = parse("search", body, gallery, config)
    expected = run_search_batch([query])[0]
    lengths = retriever.feature_store.lengths(expected["ids"]).tolist()
    assert [len(e) for e in expected["explanations"]] == lengths
    removed = {}
    original = retriever.search

    def search_then_remove(*args, **options):
        out = original(*args, **options)
        hits = out[0][0][out[0][0] >= 0].numpy()
        removed["ids"] = hits[:2].tolist()
        embeddings = retriever.student_index.reconstruct(hits[:2])
        items = retriever.feature_store.gather(hits[:2])
        retriever.remove(hits[:2])  # a concurrent writer, between the search and the explanation lookup
        removed["restore"] = (hits[:2], embeddings, items)
        return out

    retriever.search = search_then_remove
    try:
        got = run_search_batch([query])[0]
    finally:
        del retriever.search
        ids, embeddings, (items, item_lengths) = removed["restore"]
        retriever.add(ids, embeddings, items, item_lengths)
    assert got == expected


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_rerank_ids_removed_after_validation_are_a_404(directories, direction):
    """Regression: candidate ids are checked when the request is parsed; one removed in process before its
    batch ran made the store lookup raise KeyError, a 500. Now the request gets the 404 it would have got a
    moment earlier, and a batch mate whose ids are all still there gets its scores."""
    gallery = load_gallery([directories["neg_inf", direction]], generation=1, device="cpu")
    retriever = gallery.retrievers[direction]
    config = ServingConfig(**LIMITS)
    ids = [int(i) for i in retriever.feature_store.ids()[:4]]
    width = WORDS if direction == "text_to_image" else REGIONS
    tokens = normalize(torch.randn(width, DIM, generator=torch.Generator().manual_seed(3)))
    doomed = parse("rerank", {"direction": direction, "query_tokens": tokens.tolist(), "candidate_ids": ids[:2]},
                   gallery, config)
    fine = parse("rerank", {"direction": direction, "query_tokens": tokens.tolist(), "candidate_ids": ids[2:]},
                 gallery, config)
    expected = run_rerank_batch([fine])[0]
    embeddings = retriever.student_index.reconstruct(ids[:1])
    items, item_lengths = retriever.feature_store.gather(ids[:1])
    retriever.remove(ids[:1])
    try:
        for batch in ([doomed], [doomed, fine]):  # alone, and failing a batch (the batcher then runs each alone)
            with pytest.raises(RequestError) as caught:
                run_rerank_batch(batch)
            assert caught.value.status == 404 and caught.value.field == "candidate_ids"
            assert f"[{ids[0]}]" in caught.value.message
        assert run_rerank_batch([fine])[0] == expected
    finally:
        retriever.add(ids[:1], embeddings, items, item_lengths)


def test_search_and_rerank_while_the_gallery_changes_in_process(directories):
    """Retriever.add / remove and FeatureStore.compact in a thread while batches run: no error, every score
    equals the one its (query, item) pair gets alone; hits are live ids of some snapshot."""
    config = ServingConfig(**LIMITS)
    for direction in DIRECTIONS:
        gallery = load_gallery([directories["neg_inf", direction]], generation=1, device="cpu")
        retriever = gallery.retrievers[direction]
        base = [int(i) for i in retriever.feature_store.ids()]
        width = REGIONS if direction == "text_to_image" else WORDS
        g = torch.Generator().manual_seed(11)
        extra_tokens = normalize(torch.randn(12, width, DIM, generator=g))
        extra_lengths = torch.randint(1, width + 1, (12,), generator=g)
        extra_ids = np.arange(12) * 5 + 100_000
        query_width = WORDS if direction == "text_to_image" else REGIONS
        queries = []
        for seed in range(4):
            tokens = normalize(torch.randn(query_width, DIM, generator=torch.Generator().manual_seed(seed)))
            queries.append({"direction": direction, "query_tokens": tokens.tolist(), "k": 8, "rerank_k": 30,
                            "explain": True, "query_embedding": embed(tokens.mean(0, keepdim=True))[0].tolist()})
        reranks = [parse("ids", {"direction": direction, "query_tokens": q["query_tokens"], "candidate_ids": base[:16]},
                         gallery, config) for q in queries]
        expected = run_rerank_batch(reranks)
        # every (query, item) score the search may return, each item scored alone against a static copy
        reference, everything = {}, ServingConfig(**{**LIMITS, "max_candidates": 1000})
        static = make_retriever(direction=direction, **FLAVOURS["neg_inf"][direction])
        static.add(extra_ids, embed(extra_tokens.mean(1)), extra_tokens, extra_lengths)
        static_gallery = Gallery(1, {direction: static}, {direction: ""}, direction)
        for position, q in enumerate(queries):
            every = [int(i) for i in static.feature_store.ids()]
            scores = run_rerank_batch([parse("ids", {"direction": direction, "query_tokens": q["query_tokens"],
                                                     "candidate_ids": every}, static_gallery, everything)])[0]["scores"]
            reference[position] = dict(zip(every, scores))
        stop, failures = threading.Event(), []

        def mutate():
            flip = random.Random(0)
            while not stop.is_set():
                retriever.add(extra_ids, embed(extra_tokens.mean(1)), extra_tokens, extra_lengths)
                if flip.random() < 0.5:
                    retriever.feature_store.compact()
                time.sleep(0.001)
                retriever.remove(extra_ids)
                if flip.random() < 0.5:
                    retriever.feature_store.compact()

        def work():
            try:
                for _ in range(25):
                    assert run_rerank_batch(reranks) == expected
                    parsed = [parse("search", q, gallery, config) for q in queries]
                    for position, result in enumerate(run_search_batch(parsed)):
                        for hit, score in zip(result["ids"], result["scores"]):
                            assert reference[position][hit] == score, (direction, hit)
                        assert all(len(e) >= 1 for e in result["explanations"])
            except BaseException as err:  # noqa: BLE001 - reported below
                failures.append(err)

        writer = threading.Thread(target=mutate)
        writer.start()
        workers = [threading.Thread(target=work) for _ in range(2)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        stop.set()
        writer.join()
        assert not failures, failures[:2]


# ----------------------------------------------------------------------------------------- small units
@settings(FAST, max_examples=200)
@given(shape=st.lists(st.one_of(st.integers(0, 8), st.sampled_from([2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63, 2 ** 64]),
                                st.integers(0, 2 ** 65)), min_size=1, max_size=3), dtype=st.sampled_from(["float32", "float16"]),
       nbytes=st.sampled_from([0, 2, 4, 8, 64]))
def test_decode_tensor_rejects_any_bad_shape_with_a_request_error(shape, dtype, nbytes):
    value = {"dtype": dtype, "shape": shape, "data": base64.b64encode(bytes(nbytes)).decode()}
    try:
        tensor = decode_tensor("query_tokens", value, len(shape))
    except RequestError as err:
        assert err.field == "query_tokens" and err.status == 422
    else:
        assert list(tensor.shape) == shape and tensor.numel() * tensor.element_size() == nbytes


def test_parse_json_body_rejects_deep_nesting_as_400():
    with pytest.raises(RequestError) as caught:
        parse_json_body(b"[" * 100_000)
    assert caught.value.status == 400 and caught.value.field == "body"


def test_queue_full_is_reported_not_raised_elsewhere():
    async def scenario():
        batcher = DynamicBatcher("search", lambda items: (time.sleep(0.05), items)[1], max_batch_size=1,
                                 max_wait_ms=0, max_queue=1)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(6)), return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert all(r == i or isinstance(r, QueueFullError) for i, r in enumerate(results))
    assert results[0] == 0 and any(isinstance(r, QueueFullError) for r in results)



def test_error_messages_never_echo_a_whole_body():
    from aladin_fast.serving.schema import RequestError

    err = RequestError("query_tokens", "got " + "x" * 100000)
    assert len(err.message) <= RequestError.MAX_MESSAGE and err.message.endswith("(100004 chars)")
    assert RequestError("k", "short").message == "short"
