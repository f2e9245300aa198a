"""``POST /admin/reload`` under concurrent load, failed and concurrent reloads, and what the metrics say.

A real server in a thread, with forced interleavings where they make a race deterministic: the
batchers' ``run_batch`` and the app's ``load_gallery`` are wrapped so that a test can hold a batch
(or a reload) mid-flight, queue more requests behind it, reload, and then let everything go.

Every answer must equal, bit for bit, what the same request gets alone against the generation the
answer reports; no batch may mix generations; an old generation stays alive exactly while requests
validated against it are queued or running, and is freed once they are done.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import aladin_fast.serving.app as serving_app  # noqa: E402
from aladin_fast.serving import DynamicBatcher, MetricsRegistry, RequestError, ServerThread, ServingConfig  # noqa: E402
from aladin_fast.serving.batcher import BatcherClosedError  # noqa: E402
from aladin_fast.serving.engine import run_rerank_batch, run_search_batch  # noqa: E402
from aladin_fast.serving.metrics import parse_exposition  # noqa: E402
from aladin_fast.serving.schema import parse_rerank, parse_search  # noqa: E402
from test_serving_properties import DIM, ITEMS, embed, make_retriever, normalize  # noqa: E402  (one gallery maker)
from test_serving_properties import call as http_call  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread", "single_threaded_faiss")

JOIN = 30  # seconds: a hang fails the test instead of blocking the run


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    """``a`` / ``b``: two different text->image galleries (disjoint ids); ``captions``: image->text;
    ``corrupt``: a copy of ``a`` with a truncated payload file."""
    root = tmp_path_factory.mktemp("serving-reload")
    out = {}
    for name, seed, direction, offset in [("a", 1, "text_to_image", 0), ("b", 2, "text_to_image", 1000),
                                          ("captions", 3, "image_to_text", 0)]:
        out[name] = str(root / name)
        make_retriever(seed, direction, ids_offset=offset).save(out[name])
    out["corrupt"] = str(root / "corrupt")
    shutil.copytree(out["a"], out["corrupt"])
    victim = max((os.path.join(folder, name) for folder, _, names in os.walk(out["corrupt"]) for name in names
                  if name.endswith(".npy")), key=os.path.getsize)
    with open(victim, "r+b") as handle:
        handle.truncate(os.path.getsize(victim) // 2)
    out["file"] = str(root / "a-file.json")
    with open(out["file"], "w") as handle:
        handle.write("{}")
    return out


@pytest.fixture(scope="module")
def server(directories):
    config = ServingConfig(retriever_paths=[directories["a"], directories["captions"]], device="cpu",
                           max_batch_size=8, max_wait_ms=5, workers=1, max_k=20, max_rerank_k=40,
                           max_candidates=20)
    with ServerThread(config) as running:
        yield running
    assert not running._thread.is_alive()


@pytest.fixture
def state(server, directories):
    """The module server's ServingState, reset to gallery ``[a, captions]`` after the test."""
    serving = server.app.state.serving
    yield serving
    serving.search.run_batch, serving.rerank.run_batch = run_search_batch, run_rerank_batch  # undo any Gate
    if sorted(serving.gallery.paths.values()) != sorted([directories["a"], directories["captions"]]):
        assert call(server.url, "/admin/reload", {"paths": [directories["a"], directories["captions"]]})[0] == 200


# ------------------------------------------------------------------------------------------------ helpers
def call(url, path, body=None, timeout=JOIN):
    """``(status, json)``; never raises on HTTP errors (a hang fails on ``timeout``)."""
    return http_call(url, path, body, timeout=timeout)[:2]


def metrics(url):
    return parse_exposition(call(url, "/metrics")[1])


def search(seed, k=5, rerank_k=20, direction="text_to_image", explain=False):
    g = torch.Generator().manual_seed(seed)
    tokens = normalize(torch.randn(2 + seed % 5, DIM, generator=g))
    return "/search", {"direction": direction, "query_tokens": tokens.tolist(), "k": k, "rerank_k": rerank_k,
                       "explain": explain, "query_embedding": embed(tokens.mean(0, keepdim=True))[0].tolist()}


def rerank(seed, ids, direction="text_to_image"):
    g = torch.Generator().manual_seed(seed)
    tokens = normalize(torch.randn(2 + seed % 5, DIM, generator=g))
    return "/rerank", {"direction": direction, "query_tokens": tokens.tolist(), "candidate_ids": list(ids)}


def alone(path, body, gallery, config):
    """The oracle: the HTTP answer ``body`` gets served alone by ``gallery`` (or ``(status, field)``)."""
    parse, run = (parse_search, run_search_batch) if path == "/search" else (parse_rerank, run_rerank_batch)
    try:
        query = parse(json.loads(json.dumps(body)), gallery, config)
    except RequestError as err:
        return err.status, err.field
    return {**run([query])[0], "direction": query.direction, "generation": gallery.generation}


def check_answer(path, body, status, answer, galleries, config):
    """``answer`` is exactly what ``body`` gets alone against the generation the answer reports."""
    if status == 200:
        gallery = galleries[answer["generation"]]
        assert answer == alone(path, body, gallery, config), (path, answer["generation"])
    else:
        wanted = [alone(path, body, gallery, config) for gallery in galleries.values()]
        assert (status, answer["error"]["field"]) in wanted, (path, status, answer)


def wait_until(predicate, what, timeout=JOIN):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


class Gate:
    """Wraps a batcher's ``run_batch``: records which gallery (``id``, so as not to keep it alive) each
    query of each batch was parsed against, and holds the first batch until :meth:`open`."""

    def __init__(self, batcher):
        self.batcher, self.original = batcher, batcher.run_batch
        self.batches, self.held, self.opened = [], threading.Event(), threading.Event()
        batcher.run_batch = self

    def __call__(self, queries):
        self.batches.append([id(query.gallery) for query in queries])
        if len(self.batches) == 1:
            self.held.set()
            assert self.opened.wait(JOIN)
        return self.original(queries)

    def open(self):
        self.opened.set()

    def waiting(self):
        """Requests of this queue queued or held in the first batch."""
        return self.batcher.depth + len(self.batcher._forming) + (len(self.batches[0]) if self.batches else 0)


def idle_metrics_are_zero(url, state):
    wait_until(lambda: state.metrics.inflight.value() == 0 and not state.search._running
               and not state.rerank._running, "the server is idle")
    after = metrics(url)
    assert after["aladin_inflight_requests"] == 1  # this scrape
    assert after['aladin_queue_depth{queue="search"}'] == 0 and after['aladin_queue_depth{queue="rerank"}'] == 0
    return after


# ------------------------------------------------------------------- reload while batches queue and run
def test_reload_while_batches_are_queued_and_running_answers_from_one_generation(server, state, directories):
    """Requests validated against generation g are held in a running batch and queued behind it; a reload
    to another gallery (other data, other ids) lands; the same requests are sent again. Every answer equals
    its lone answer against the generation it reports (g for the first wave, g + 1 for the second: gallery
    a's ids are 404 in b), and no batch mixes generations."""
    old = state.gallery
    galleries = {old.generation: old}
    a_ids = [int(i) for i in old.retrievers["text_to_image"].feature_store.ids()]
    requests = [search(seed) for seed in range(5)] + [search(5, k=3, explain=True)]
    requests += [rerank(seed, a_ids[seed:seed + 4 + seed]) for seed in range(4)]
    searches, reranks = Gate(state.search), Gate(state.rerank)
    counts = {"/search": sum(path == "/search" for path, _ in requests)}
    counts["/rerank"] = len(requests) - counts["/search"]
    with ThreadPoolExecutor(2 * len(requests)) as pool:
        first = [pool.submit(call, server.url, path, body) for path, body in requests]
        wait_until(lambda: searches.waiting() == counts["/search"] and reranks.waiting() == counts["/rerank"],
                   "the first wave is held and queued")
        status, answer = call(server.url, "/admin/reload", {"path": directories["b"]})
        assert status == 200 and answer["generation"] == old.generation + 1, answer
        new = state.gallery
        galleries[new.generation] = new
        assert call(server.url, "/health")[1] == {"status": "ok", "generation": new.generation}
        assert metrics(server.url)["aladin_gallery_generation"] == new.generation
        second = [pool.submit(call, server.url, path, body) for path, body in requests]
        wait_until(lambda: searches.waiting() == 2 * counts["/search"]
                   and reranks.waiting() == counts["/rerank"], "the second wave is queued")
        searches.open()
        reranks.open()
        first = [future.result(JOIN) for future in first]
        second = [future.result(JOIN) for future in second]
    for (path, body), (status, answer) in zip(requests, first):
        assert status == 200 and answer["generation"] == old.generation, (path, answer)
        check_answer(path, body, status, answer, galleries, server.config)
    for (path, body), (status, answer) in zip(requests, second):
        if path == "/rerank":  # a's ids are not in b: a 404 from validation against the new generation
            assert (status, answer["error"]["field"]) == (404, "candidate_ids"), answer
        else:
            assert status == 200 and answer["generation"] == new.generation, (path, answer)
        check_answer(path, body, status, answer, galleries, server.config)
    for batch in searches.batches + reranks.batches:
        assert len(set(batch)) == 1, "a batch mixed generations"
    assert {batch[0] for batch in searches.batches} == {id(old), id(new)}
    assert {batch[0] for batch in reranks.batches} == {id(old)}
    idle_metrics_are_zero(server.url, state)


def test_old_generation_is_freed_after_its_last_batch_even_when_its_queue_goes_idle(server, state, directories):
    """Regression: the batcher's collector kept its last batch in a local variable while it waited for the
    next one, so the payloads of a queue's last batch -- and through them their whole gallery generation
    (faiss index, memory-mapped features, files deleted on disk) -- stayed alive until that queue formed
    another batch. After a reload followed by searches only, generation g was pinned by the idle rerank
    queue forever. Now g lives exactly while a request validated against it is queued or running."""
    old = state.gallery
    ids = [int(i) for i in old.retrievers["text_to_image"].feature_store.ids()[:3]]
    reranks = Gate(state.rerank)
    path, body = rerank(1, ids)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(call, server.url, path, body)
        assert reranks.held.wait(JOIN)
        assert call(server.url, *search(0))[0] == 200
        assert call(server.url, "/admin/reload", {"paths": [directories["b"], directories["captions"]]})[0] == 200
        ref = weakref.ref(old)
        expected = alone(path, body, old, server.config)
        del old
        assert call(server.url, *search(1))[1]["generation"] == ref().generation + 1  # the search queue moves on
        gc.collect()
        assert ref() is not None, "generation g was released while its batch was still running"
        reranks.open()
        status, answer = pending.result(JOIN)
    assert status == 200 and answer == expected
    wait_until(lambda: not state.rerank._running, "the rerank batch is done")
    gc.collect()
    assert ref() is None, "the previous generation is still alive although none of its requests is left"


def test_collector_keeps_no_finished_batch_alive():
    """The batcher unit of the regression above: once an item's result is delivered the batcher holds no
    reference to it (nor to anything it references) while it waits for more work."""
    class Payload:
        pass

    async def scenario():
        batcher = DynamicBatcher("search", lambda items: [1] * len(items), max_batch_size=4, max_wait_ms=1)
        batcher.start()
        payload = Payload()
        ref = weakref.ref(payload)
        assert await batcher.submit(payload) == 1
        del payload
        await asyncio.sleep(0.02)
        gc.collect()
        alive = ref() is not None
        await batcher.close(1.0)
        return alive

    assert asyncio.run(scenario()) is False


# -------------------------------------------------------------------------------- failed / racing reloads
@pytest.mark.parametrize("paths, field", [
    ({"path": "/does/not/exist"}, "path"),
    ({"path": "corrupt"}, "path"),  # a truncated payload file (size check)
    ({"path": "file"}, "path"),  # a file, not a directory
    ({"paths": ["b", "corrupt"]}, "paths"),  # fails halfway: b loaded, then the second one fails
    ({"paths": ["a", "b"]}, "paths"),  # two text->image directories
])
def test_failed_reload_keeps_the_old_generation_serving(server, state, directories, paths, field):
    body = {key: (directories.get(value, value) if isinstance(value, str) else [directories[v] for v in value])
            for key, value in paths.items()}
    old = state.gallery
    before = metrics(server.url)
    expected = alone(*search(3), old, server.config)
    status, answer = call(server.url, "/admin/reload", body)
    assert status == 422 and answer["error"]["field"] == field, answer
    assert state.gallery is old
    assert call(server.url, "/health")[1]["generation"] == old.generation
    info = call(server.url, "/info")[1]["gallery"]
    assert info["generation"] == old.generation
    assert {direction: item["path"] for direction, item in info["retrievers"].items()} == dict(old.paths)
    assert call(server.url, *search(3)) == (200, expected)
    after = metrics(server.url)
    assert after['aladin_reloads_total{status="error"}'] == before.get('aladin_reloads_total{status="error"}', 0) + 1
    assert after.get('aladin_reloads_total{status="ok"}', 0) == before.get('aladin_reloads_total{status="ok"}', 0)
    assert after["aladin_gallery_generation"] == old.generation


def test_reload_with_default_paths_waiting_behind_a_switch_reloads_the_new_paths(server, state, directories,
                                                                                 monkeypatch):
    """Regression: ``POST /admin/reload`` without paths ("reload what is served") resolved the current paths
    before waiting for the reload lock. Racing a reload that switches to another directory, it ran second
    and loaded the paths that had been current before the switch: the switch was silently undone. Now the
    default paths are read under the lock, so a refresh after a switch refreshes the new paths."""
    start = state.gallery.generation
    loads, release = [], threading.Event()
    original = serving_app.load_gallery

    def held_load(paths, **options):
        loads.append(list(paths))
        if len(loads) == 1:
            assert release.wait(JOIN)
        return original(paths, **options)

    monkeypatch.setattr(serving_app, "load_gallery", held_load)
    with ThreadPoolExecutor(2) as pool:
        switch = pool.submit(call, server.url, "/admin/reload", {"path": directories["b"]})
        wait_until(lambda: len(loads) == 1, "the switch is loading")
        refresh = pool.submit(call, server.url, "/admin/reload", {})
        wait_until(lambda: state.metrics.inflight.value() == 2, "the refresh is in flight")
        time.sleep(0.2)  # its (tiny) body is read and it waits for the reload lock
        assert len(loads) == 1 and state.reload_lock.locked()
        release.set()
        switched, refreshed = switch.result(JOIN), refresh.result(JOIN)
    assert switched[0] == 200 and refreshed[0] == 200, (switched, refreshed)
    assert (switched[1]["previous_generation"], switched[1]["generation"]) == (start, start + 1)
    assert (refreshed[1]["previous_generation"], refreshed[1]["generation"]) == (start + 1, start + 2)
    assert loads == [[directories["b"]], [directories["b"]]]
    assert dict(state.gallery.paths) == {"text_to_image": directories["b"]}
    assert call(server.url, "/health")[1] == {"status": "ok", "generation": start + 2}
    status, answer = call(server.url, *search(2))
    assert status == 200 and answer == alone(*search(2), state.gallery, server.config)


def test_concurrent_reloads_and_load_each_get_a_distinct_generation(server, state, directories):
    """Six reloads racing with clients: generations are 1..6 above the start with no gaps or repeats, each
    reports its predecessor, every answer is exactly its lone answer against the generation it reports."""
    start = state.gallery
    galleries, lock = {start.generation: start}, threading.Lock()
    original_publish = state.publish_gallery

    def publish(gallery):
        with lock:
            galleries[gallery.generation] = gallery
        original_publish(gallery)

    state.publish_gallery = publish
    targets = [[directories[name] for name in names] for names in (
        ["b"], ["a", "captions"], ["b"], ["captions", "b"], ["a"], ["a", "captions"])]
    requests = [search(seed) for seed in range(4)] + [search(4, direction="image_to_text", k=3)]
    ids = [int(i) for i in start.retrievers["text_to_image"].feature_store.ids()[:5]]
    requests.append(rerank(7, ids))
    stop, seen = threading.Event(), []

    def client(position):
        while not stop.is_set():
            path, body = requests[position % len(requests)]
            seen.append((path, body, *call(server.url, path, body)))

    try:
        with ThreadPoolExecutor(10) as pool:
            clients = [pool.submit(client, i) for i in range(len(requests))]
            reloads = list(pool.map(lambda paths: call(server.url, "/admin/reload", {"paths": paths}), targets))
            stop.set()
            for future in clients:
                future.result(JOIN)
        seen.append((*search(0), *call(server.url, *search(0))))  # one answer from the last generation at least
    finally:
        del state.publish_gallery
    assert all(status == 200 for status, _ in reloads), reloads
    generations = sorted((answer["previous_generation"], answer["generation"]) for _, answer in reloads)
    assert generations == [(start.generation + i, start.generation + i + 1) for i in range(len(targets))]
    assert state.gallery.generation == start.generation + len(targets)
    for path, body, status, answer in seen:
        check_answer(path, body, status, answer, galleries, server.config)
    assert {answer["generation"] for _, _, status, answer in seen if status == 200} - {start.generation}
    idle_metrics_are_zero(server.url, state)


# ------------------------------------------------------------------------------------ reloads at shutdown
def test_reload_in_flight_at_shutdown_is_abandoned_with_503_and_the_exit_does_not_wait_for_it(directories,
                                                                                            monkeypatch):
    """Regression: a reload still loading when shutdown began ran on; at the graceful timeout uvicorn cancelled
    the request (a plain-text 500) and the server thread then waited for the load thread (asyncio.run joins
    the default executor), so a slow load held up the exit for as long as it took. Now shutdown abandons it
    at once: the reload -- and one queued behind it -- answer 503 ``shutting_down``, the load is told to stop,
    its result is discarded and freed, the serving generation is untouched, and the thread exits promptly."""
    config = ServingConfig(retriever_paths=[directories["a"]], device="cpu", graceful_timeout_s=1.0)
    started, release, built, told_to_stop = threading.Event(), threading.Event(), [], []
    original = serving_app.load_gallery

    def slow_load(paths, **options):  # far slower than the graceful timeout, and deaf to cancellation
        cancelled = options.pop("cancelled", lambda: False)
        started.set()
        release.wait(JOIN)
        told_to_stop.append(cancelled())
        gallery = original(paths, **options)
        built.append(weakref.ref(gallery))
        return gallery

    server = ServerThread(config).start()
    monkeypatch.setattr(serving_app, "load_gallery", slow_load)  # after the start-up load
    state = server.app.state.serving
    old = state.gallery
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(call, server.url, "/admin/reload", {"path": directories["b"]}, 10)
            assert started.wait(JOIN)
            queued = pool.submit(call, server.url, "/admin/reload", {}, 10)
            wait_until(lambda: state.metrics.inflight.value() == 2, "the second reload is in flight", timeout=10)
            time.sleep(0.2)  # its body is read and it waits for the reload lock
            begun = time.monotonic()
            server.stop(timeout=config.graceful_timeout_s + 4)
            stopped_in = time.monotonic() - begun
            exited = not server._thread.is_alive()
            answers = [first.result(10), queued.result(10)]
        assert exited, "the server thread waited for the abandoned load"
        assert stopped_in < config.graceful_timeout_s + 1.0, stopped_in
        for status, answer in answers:
            assert status == 503 and answer["error"]["type"] == "shutting_down", (status, answer)
        assert state.gallery is old and state.metrics.generation.value() == old.generation
        assert state.metrics.reloads.value(status="abandoned") == 2
        assert state.metrics.reloads.value(status="ok") == 0
    finally:
        release.set()
        server.stop(timeout=JOIN)
    wait_until(lambda: not any(t.name == "aladin-reload" for t in threading.enumerate()), "the load thread ends")
    assert told_to_stop == [True] and len(built) == 1
    assert state.gallery is old
    del old
    gc.collect()
    assert built[0]() is None, "the abandoned load's gallery is still alive"


def test_load_gallery_stops_between_steps_once_cancelled(directories, monkeypatch):
    """``load_gallery(cancelled=...)`` polls between steps: once it says stop, no further directory is
    loaded or warmed up and LoadCancelled is raised (nothing is returned)."""
    from aladin_fast.serving import engine

    loaded, real = [], engine.Retriever.load
    monkeypatch.setattr(engine.Retriever, "load", lambda path, **options: (loaded.append(path), real(path, **options))[1])
    polls = []

    def cancelled():  # polls: before a, before a's warm-up, before captions (stop here), ...
        polls.append(len(loaded))
        return len(polls) >= 3

    with pytest.raises(engine.LoadCancelled):
        engine.load_gallery([directories["a"], directories["captions"]], generation=2, cancelled=cancelled)
    assert loaded == [directories["a"]] and polls == [0, 1, 1]
    gallery = engine.load_gallery([directories["a"], directories["captions"]], generation=2, cancelled=lambda: False)
    assert sorted(gallery.retrievers) == ["image_to_text", "text_to_image"]


# ----------------------------------------------------------------------------------------------- metrics
def test_gallery_items_gauge_follows_the_directions_served(server, state, directories):
    """Regression: after a reload that drops a direction, ``aladin_gallery_items`` kept reporting the old
    count for it (the gauge was only ever set, never cleared); it must list exactly the served directions."""
    def items():
        return {key: value for key, value in metrics(server.url).items() if key.startswith("aladin_gallery_items")}

    assert items() == {'aladin_gallery_items{direction="text_to_image"}': ITEMS,
                       'aladin_gallery_items{direction="image_to_text"}': ITEMS}
    assert call(server.url, "/admin/reload", {"path": directories["b"]})[0] == 200
    assert items() == {'aladin_gallery_items{direction="text_to_image"}': ITEMS}
    assert call(server.url, "/info")[1]["index_size"] == {"text_to_image": ITEMS}
    status, answer = call(server.url, *search(1, direction="image_to_text"))
    assert status == 422 and answer["error"]["field"] == "direction"
    assert call(server.url, "/admin/reload", {"paths": [directories["captions"]]})[0] == 200
    assert items() == {'aladin_gallery_items{direction="image_to_text"}': ITEMS}


def test_queue_depth_gauge_is_zero_after_close_refuses_leftovers():
    """Regression: when the drain timeout expired, close() refused the waiting items (503) but left
    ``aladin_queue_depth`` at their count, a queue that no longer existed."""
    async def scenario():
        release, registry = threading.Event(), MetricsRegistry()

        def slow(items):
            release.wait(5)
            return items

        batcher = DynamicBatcher("rerank", slow, max_batch_size=1, max_wait_ms=0, metrics=registry)
        batcher.start()
        pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(4)]
        await asyncio.sleep(0.05)  # 0 runs (blocked), 1..3 wait
        depth_before = registry.queue_depth.value(queue="rerank")
        closing = asyncio.ensure_future(batcher.close(timeout=0.0))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait_for(closing, 5)
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)
        return depth_before, registry.queue_depth.value(queue="rerank"), results

    depth_before, depth_after, results = asyncio.run(scenario())
    assert depth_before == 3 and results[0] == 0
    assert all(isinstance(result, BatcherClosedError) for result in results[1:])
    assert depth_after == 0
