"""The HTTP service end to end: a real uvicorn server on 127.0.0.1 in a background thread.

Concurrent clients must get exactly what direct library calls give, batching
must merge requests (seen in /metrics), bad requests get 4xx naming the field,
internal errors get 500 while the server keeps serving, reload under load never
errors, and shutdown lets in-flight requests finish.
"""
from __future__ import annotations

import json
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

import aladin_fast  # noqa: E402
from aladin_fast.retrieval import FeatureStore, Retriever, StudentIndex  # noqa: E402
from aladin_fast.serving import ServerThread, ServingConfig, encode_tensor  # noqa: E402
from aladin_fast.serving.metrics import parse_exposition  # noqa: E402

IMAGES, REGIONS, WORDS, DIM, EMBED = 64, 7, 9, 16, 12


def normalize(x):
    return torch.nn.functional.normalize(x, dim=-1)


def make_gallery(seed, direction, ids_offset=0):
    """Random tokens + student embeddings (a fixed random projection of the mean token)."""
    g = torch.Generator().manual_seed(seed)
    width = REGIONS if direction == "text_to_image" else WORDS
    tokens = normalize(torch.randn(IMAGES, width, DIM, generator=g))
    lengths = torch.randint(2, width + 1, (IMAGES,), generator=g)
    ids = torch.arange(IMAGES) * 5 + 1 + ids_offset
    student = StudentIndex(EMBED)
    student.add(embed(tokens.mean(1)), ids)
    store = FeatureStore(DIM)
    store.append(ids, tokens, lengths)
    return Retriever(student, store, direction=direction)


PROJECTION = torch.randn(DIM, EMBED, generator=torch.Generator().manual_seed(99))


def embed(pooled):
    return normalize(pooled @ PROJECTION)


def make_queries(seed, count, max_width):
    """``count`` queries of random widths: list of (embedding [E], tokens [L, D], length)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        width = int(torch.randint(2, max_width + 1, (1,), generator=g))
        tokens = normalize(torch.randn(width, DIM, generator=g))
        length = int(torch.randint(1, width + 1, (1,), generator=g))
        out.append((embed(tokens[:length].mean(0, keepdim=True))[0], tokens, length))
    return out


@pytest.fixture(scope="module")
def galleries(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    paths = {}
    for name, seed, direction, offset in [("a", 1, "text_to_image", 0), ("b", 2, "text_to_image", 1000),
                                          ("captions", 3, "image_to_text", 0)]:
        make_gallery(seed, direction, offset).save(str(root / name))
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="module")
def server(galleries):
    config = ServingConfig(retriever_paths=[galleries["a"], galleries["captions"]], max_batch_size=16,
                           max_wait_ms=25, max_body_bytes=256 * 1024, max_k=50, max_rerank_k=64,
                           max_query_tokens=32, max_candidates=40, max_candidate_tokens=16)
    with ServerThread(config) as running:
        yield running


def call(url, path, body=None, raw=None, method=None, timeout=60):
    """``(status, json)`` of one request; never raises on HTTP errors."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
            status = response.status
    except urllib.error.HTTPError as err:
        payload, status = err.read(), err.code
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode()


def search_body(query, k=5, rerank_k=20, explain=False, direction=None, wire="list"):
    embedding, tokens, length = query
    body = {"query_embedding": embedding.tolist(), "query_length": length, "k": k, "rerank_k": rerank_k,
            "explain": explain}
    body["query_tokens"] = tokens.tolist() if wire == "list" else encode_tensor(tokens, "float32")
    if direction:
        body["direction"] = direction
    return body


def direct_search(retriever, query, k=5, rerank_k=20):
    embedding, tokens, length = query
    ids, scores, alignments = retriever.search(embedding[None], tokens[None], torch.tensor([length]), k=k,
                                               rerank_k=rerank_k, return_explanations=True)
    keep = ids[0] >= 0
    return ids[0][keep].tolist(), scores[0][keep], alignments[0][keep]


def batch_sizes(url, queue):
    samples = parse_exposition(call(url, "/metrics")[1])
    return (samples.get(f'aladin_batch_size_count{{queue="{queue}"}}', 0.0),
            samples.get(f'aladin_batch_size_sum{{queue="{queue}"}}', 0.0))


@pytest.mark.parametrize("direction", ["text_to_image", "image_to_text"])
def test_concurrent_searches_match_direct_calls_and_are_merged(server, galleries, direction):
    retriever = Retriever.load(galleries["a" if direction == "text_to_image" else "captions"])
    queries = make_queries(7, 24, REGIONS if direction == "image_to_text" else WORDS)
    before = batch_sizes(server.url, "search")
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda q: call(server.url, "/search", search_body(
            q, explain=True, direction=direction, wire="b64" if q[2] % 2 else "list")), queries))
    after = batch_sizes(server.url, "search")
    for query, (status, answer) in zip(queries, answers):
        assert status == 200, answer
        ids, scores, alignments = direct_search(retriever, query)
        assert answer["ids"] == ids and answer["direction"] == direction
        torch.testing.assert_close(torch.tensor(answer["scores"]), scores, atol=1e-6, rtol=1e-6)
        for hit, explanation in enumerate(answer["explanations"]):
            assert explanation == [r for r in alignments[hit].tolist()][:len(explanation)]
            assert all(r >= 0 for r in explanation)
    calls, requests = after[0] - before[0], after[1] - before[1]
    assert requests == 24
    assert calls < 24, "concurrent requests were never merged into one fused call"


def test_rerank_by_ids_and_by_tokens_match_the_fused_op(server, galleries):
    retriever = Retriever.load(galleries["a"])
    queries = make_queries(11, 10, WORDS)
    gallery_ids = retriever.feature_store.ids()
    g = torch.Generator().manual_seed(5)
    jobs = []
    for position, (_, tokens, length) in enumerate(queries):
        count = int(torch.randint(1, 30, (1,), generator=g))
        picked = torch.from_numpy(gallery_ids)[torch.randint(0, IMAGES, (count,), generator=g)]
        if position % 2:
            jobs.append(({"query_tokens": tokens.tolist(), "query_length": length, "candidate_ids": picked.tolist()},
                         retriever.feature_store.gather(picked)))
        else:
            candidates = normalize(torch.randn(count, 6, DIM, generator=g))
            lengths = torch.randint(1, 7, (count,), generator=g)
            jobs.append(({"query_tokens": encode_tensor(tokens), "query_length": length,
                          "candidate_tokens": candidates.tolist(), "candidate_lengths": lengths.tolist()},
                         (candidates, lengths)))
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda job: call(server.url, "/rerank", job[0]), jobs))
    for (_, tokens, length), (body, (images, image_lengths)), (status, answer) in zip(queries, jobs, answers):
        assert status == 200, answer
        expected = aladin_fast.rerank_scores(tokens[None], images, torch.arange(images.shape[0])[None],
                                             torch.tensor([length]), image_lengths)[0]
        torch.testing.assert_close(torch.tensor(answer["scores"]), expected, atol=1e-5, rtol=1e-5)


def test_image_to_text_rerank_matches_search_scores(server, galleries):
    retriever = Retriever.load(galleries["captions"])
    query = make_queries(3, 1, REGIONS)[0]
    ids, scores, _ = direct_search(retriever, query, k=8, rerank_k=20)
    status, answer = call(server.url, "/rerank", {"direction": "image_to_text", "query_tokens": query[1].tolist(),
                                                  "query_length": query[2], "candidate_ids": ids[::-1]})
    assert status == 200, answer
    torch.testing.assert_close(torch.tensor(answer["scores"]), scores.flip(0), atol=1e-6, rtol=1e-6)


def good_search():
    return search_body(make_queries(1, 1, WORDS)[0])


@pytest.mark.parametrize("change, status, field", [
    ({"k": 0}, 422, "k"),
    ({"k": 51}, 422, "k"),
    ({"k": "5"}, 422, "k"),
    ({"rerank_k": 65}, 422, "rerank_k"),
    ({"k": 10, "rerank_k": 5}, 422, "rerank_k"),
    ({"direction": "sideways"}, 422, "direction"),
    ({"explain": "yes"}, 422, "explain"),
    ({"query_embedding": [0.0] * (EMBED + 1)}, 422, "query_embedding"),
    ({"query_embedding": None}, 422, "query_embedding"),
    ({"query_tokens": [[0.0] * (DIM - 1)]}, 422, "query_tokens"),
    ({"query_tokens": [[0.0] * DIM] * 33}, 422, "query_tokens"),
    ({"query_tokens": [[0.0] * DIM, [0.0]]}, 422, "query_tokens"),
    ({"query_length": 99}, 422, "query_length"),
    ({"colour": "blue"}, 422, "colour"),
])
def test_bad_search_requests_get_4xx_naming_the_field(server, change, status, field):
    body = {**good_search(), **change}
    got, answer = call(server.url, "/search", body)
    assert got == status, answer
    assert answer["error"]["field"] == field, answer


@pytest.mark.parametrize("change, status, field", [
    ({"candidate_ids": [1, 999999]}, 404, "candidate_ids"),
    ({"candidate_ids": []}, 422, "candidate_ids"),
    ({"candidate_ids": [1.5]}, 422, "candidate_ids"),
    ({"candidate_ids": [1] * 41}, 422, "candidate_ids"),
    ({"candidate_tokens": [[[0.0] * DIM]]}, 422, "candidate_ids"),  # both given
    ({"candidate_ids": None, "candidate_lengths": [1]}, 422, "candidate_lengths"),
])
def test_bad_rerank_requests_get_4xx_naming_the_field(server, change, status, field):
    body = {"query_tokens": [[0.1] * DIM], "candidate_ids": [1, 6]}
    body.update(change)
    if change.get("candidate_ids", 0) is None:
        body.pop("candidate_ids")
        body["candidate_tokens"] = [[[0.0] * DIM]]
        body["candidate_lengths"] = [2]
    got, answer = call(server.url, "/rerank", body)
    assert got == status, answer
    assert answer["error"]["field"] == field, answer


def test_malformed_oversized_and_unknown_requests(server):
    status, answer = call(server.url, "/search", raw=b"{not json")
    assert status == 400 and answer["error"]["field"] == "body"
    status, answer = call(server.url, "/search", raw=b"[1, 2]")
    assert status == 400 and answer["error"]["field"] == "body"
    status, answer = call(server.url, "/search", raw=b" " * (300 * 1024))
    assert status == 413 and answer["error"]["field"] == "body"
    status, answer = call(server.url, "/nowhere")
    assert status == 404 and "error" in answer
    status, answer = call(server.url, "/search")  # GET on a POST route
    assert status == 405


def test_internal_error_is_500_for_that_request_only_and_server_keeps_serving(server):
    retriever = server.app.state.serving.gallery.retrievers["text_to_image"]
    original = retriever.search

    def poisoned(embeddings, tokens, lengths, **options):
        if bool((lengths == 3).any()):
            raise RuntimeError("poisoned query")
        return original(embeddings, tokens, lengths, **options)

    queries = make_queries(21, 12, WORDS)
    retriever.search = poisoned
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda q: call(server.url, "/search", search_body(q)), queries))
    finally:
        del retriever.search
    assert any(q[2] == 3 for q in queries) and any(q[2] != 3 for q in queries)
    for query, (status, answer) in zip(queries, answers):
        if query[2] == 3:
            assert status == 500 and answer["error"]["type"] == "internal_error"
        else:
            assert status == 200, answer
    poisoned_query = next(q for q in queries if q[2] == 3)
    assert call(server.url, "/search", search_body(poisoned_query))[0] == 200  # healthy again once unpoisoned
    assert call(server.url, "/health") == (200, {"status": "ok", "generation": 1})


def test_health_info_metrics(server):
    status, info = call(server.url, "/info")
    assert status == 200
    assert info["index_size"] == {"text_to_image": IMAGES, "image_to_text": IMAGES}
    assert info["device"] == "cpu" and info["versions"]["aladin_fast"] == aladin_fast.__version__
    assert "backend.cpu" in info["backends"] and info["batching"]["max_batch_size"] == 16
    text = call(server.url, "/metrics")[1]
    for family in ("aladin_requests_total", "aladin_request_latency_seconds_bucket", "aladin_queue_depth",
                   "aladin_inflight_requests", "aladin_gallery_items"):
        assert family in text


def test_reload_under_concurrent_load_never_errors(galleries):
    config = ServingConfig(retriever_paths=[galleries["a"]], max_batch_size=8, max_wait_ms=2, warmup=True)
    expected = {path: Retriever.load(galleries[path]) for path in ("a", "b")}
    queries = make_queries(31, 6, WORDS)
    answers = {name: [direct_search(expected[name], q)[0] for q in queries] for name in expected}
    stop = threading.Event()
    failures, seen = [], set()

    def client(position):
        while not stop.is_set():
            query_index = position % len(queries)
            status, answer = call(server.url, "/search", search_body(queries[query_index]))
            if status != 200 or answer["ids"] not in (answers["a"][query_index], answers["b"][query_index]):
                failures.append((status, answer))
            else:
                seen.add("a" if answer["ids"] == answers["a"][query_index] else "b")

    with ServerThread(config) as server:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for cycle in range(6):
            status, answer = call(server.url, "/admin/reload", {"path": galleries["b" if cycle % 2 == 0 else "a"]})
            assert status == 200 and answer["generation"] == cycle + 2, answer
            time.sleep(0.05)
        status, answer = call(server.url, "/admin/reload", {"path": "/does/not/exist"})
        assert status == 422 and answer["error"]["field"] == "path"
        time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join()
        assert call(server.url, "/health")[1]["generation"] == 7  # the failed reload changed nothing
    assert not failures, failures[:3]
    assert seen == {"a", "b"}


def test_graceful_shutdown_lets_in_flight_requests_finish(galleries):
    config = ServingConfig(retriever_paths=[galleries["a"]], max_batch_size=64, max_wait_ms=400)
    queries = make_queries(41, 4, WORDS)
    server = ServerThread(config).start()
    with ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(call, server.url, "/search", search_body(q)) for q in queries]
        time.sleep(0.15)  # the requests now wait in the batch queue
        server.stop()
        results = [future.result() for future in pending]
    assert [status for status, _ in results] == [200] * 4
    assert not server._thread.is_alive()


def test_shutdown_drains_first_health_says_draining_and_new_requests_get_503(galleries):
    """Regression: the app set ``draining`` only in its lifespan shutdown, after uvicorn had stopped
    answering, so the documented ``{"status": "draining"}`` could never be seen over HTTP. Now shutdown
    begins with a drain period (``drain_period_s``) in which the server still answers: /health is 503
    draining, new search / rerank / reload requests get 503 shutting_down, a request accepted before
    goes on to a 200; then the server stops within the drain period plus the graceful timeout."""
    config = ServingConfig(retriever_paths=[galleries["a"]], max_batch_size=64, max_wait_ms=600,
                           drain_period_s=1.5, graceful_timeout_s=2)
    server = ServerThread(config).start()
    state = server.app.state.serving
    try:
        assert call(server.url, "/health", timeout=5) == (200, {"status": "ok", "generation": 1})
        with ThreadPoolExecutor(1) as pool:
            accepted = pool.submit(call, server.url, "/search", search_body(make_queries(51, 1, WORDS)[0]),
                                   timeout=10)
            deadline = time.monotonic() + 5
            while state.search.depth + len(state.search._forming) < 1:  # queued, its batch still forming
                assert time.monotonic() < deadline, "the search never reached the batch queue"
                time.sleep(0.005)
            begun = time.monotonic()
            server.server.should_exit = True  # what stop() does, without waiting for the thread
            health = None
            while time.monotonic() < begun + 1.0:
                try:
                    health = call(server.url, "/health", timeout=2)
                except OSError as err:  # connection refused: the server stopped answering at once
                    raise AssertionError(f"the server stopped answering before draining: {err!r}") from None
                if health[0] != 200:
                    break
                time.sleep(0.01)
            assert health == (503, {"status": "draining", "generation": 1}), health
            refused = [call(server.url, "/search", good_search(), timeout=5),
                       call(server.url, "/rerank", {"query_tokens": [[0.1] * DIM], "candidate_ids": [1]}, timeout=5),
                       call(server.url, "/admin/reload", {"path": galleries["b"]}, timeout=5)]
            assert time.monotonic() < begun + config.drain_period_s, "the checks outlasted the drain period"
            for status, answer in refused:
                assert status == 503 and answer["error"]["type"] == "shutting_down", (status, answer)
            assert call(server.url, "/health", timeout=5)[0] == 503  # still answering, still draining
            status, answer = accepted.result(10)
        assert status == 200 and answer["generation"] == 1, answer
        server.stop(timeout=config.drain_period_s + config.graceful_timeout_s + 3)
        stopped_in = time.monotonic() - begun
        assert not server._thread.is_alive(), "shutdown hung"
        assert config.drain_period_s <= stopped_in < config.drain_period_s + config.graceful_timeout_s + 1, stopped_in
        assert state.gallery.generation == 1  # the refused reload changed nothing
    finally:
        server.stop(timeout=10)


def test_drain_period_option_and_its_validation():
    from aladin_fast.serving.cli import build_parser
    from aladin_fast.serving.config import config_from_arguments

    args = build_parser().parse_args(["--retriever", "g", "--drain-period", "0.25", "--graceful-timeout", "3"])
    config = config_from_arguments(args)
    assert (config.drain_period_s, config.graceful_timeout_s) == (0.25, 3.0)
    assert ServingConfig().drain_period_s == 0.0  # no window unless asked: stopping stays fast
    for bad in (-1, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="drain_period_s"):
            ServingConfig(drain_period_s=bad)
