"""Single-query latency behaviours of the student index and the retriever (behaviours, not timings).

faiss runs its own OpenMP thread pool, which by default uses every core whatever ``torch.set_num_threads``
says. On a loaded 2-core machine (torch at 1 thread, as the demo sets) a search over a 16-vector gallery
then took ~8-13 ms instead of ~0.1 ms: each faiss call's spin-waiting OpenMP barrier waited out a scheduler
time slice. StudentIndex now runs every faiss call with torch's thread count (in the calling thread only,
restoring the caller's faiss setting afterwards); these tests pin that down, and that results do not change.
"""
from __future__ import annotations

import threading

import pytest
import torch

faiss = pytest.importorskip("faiss")

from aladin_fast.retrieval import FeatureStore, Retriever, StudentIndex  # noqa: E402


@pytest.fixture
def torch_threads():
    """Set torch's CPU threads for one test, restoring them afterwards."""
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@pytest.fixture
def faiss_threads_seen(monkeypatch):
    """Record ``faiss.omp_get_max_threads()`` inside every IndexIDMap2 search / add / train call."""
    seen = []
    for name in ("search", "add_with_ids", "train"):
        original = getattr(faiss.IndexIDMap2, name)

        def recording(self, *args, _original=original, _name=name, **kwargs):
            seen.append((_name, faiss.omp_get_max_threads()))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(faiss.IndexIDMap2, name, recording)
    return seen


def gallery(count=16, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=g), dim=1)


def in_fresh_thread(fn):
    """Run ``fn`` in a new thread (whose faiss OpenMP setting is the process default, e.g. a serving worker's)."""
    out, errors = [], []

    def work():
        try:
            out.append(fn())
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller
            errors.append(err)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return out[0]


def test_search_runs_faiss_with_torch_threads(torch_threads, faiss_threads_seen):
    """torch at 1 thread: faiss searches with 1 OpenMP thread, in the main thread and in a fresh worker thread
    (OpenMP's thread count is per thread; a fresh thread starts at faiss's default, every core)."""
    embeddings = gallery()
    index = StudentIndex(embeddings.shape[1], "flat", device="cpu")
    index.add(embeddings, torch.arange(16))
    torch_threads(1)
    faiss_threads_seen.clear()
    index.search(embeddings[:1], 5)
    in_fresh_thread(lambda: index.search(embeddings[:2], 4))
    assert faiss_threads_seen == [("search", 1), ("search", 1)]


def test_threads_attribute_overrides_and_the_callers_setting_is_restored(faiss_threads_seen):
    embeddings = gallery()
    index = StudentIndex(embeddings.shape[1], "flat", device="cpu")
    index.add(embeddings, torch.arange(16))
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    try:
        for threads in (1, 2):
            index.threads = threads
            assert index.faiss_threads() == threads
            faiss_threads_seen.clear()
            index.search(embeddings[:3], 5)
            assert faiss_threads_seen == [("search", threads)]
            assert faiss.omp_get_max_threads() == 3  # the caller's own setting is back
    finally:
        faiss.omp_set_num_threads(previous)


def test_add_and_train_run_faiss_with_torch_threads(torch_threads, faiss_threads_seen):
    embeddings = gallery(count=200)
    index = StudentIndex(embeddings.shape[1], "ivf", device="cpu", nlist=4)
    torch_threads(1)
    faiss_threads_seen.clear()
    in_fresh_thread(lambda: index.add(embeddings, torch.arange(200)))  # trains the IVF quantiser first
    assert [name for name, _ in faiss_threads_seen] == ["train", "add_with_ids"]
    assert all(threads == 1 for _, threads in faiss_threads_seen)


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_search_results_do_not_depend_on_faiss_threads_or_batching(torch_threads, metric):
    embeddings = gallery(count=100, dim=24, seed=1)
    queries = gallery(count=9, dim=24, seed=2)
    index = StudentIndex(24, "flat", metric, device="cpu")
    index.add(embeddings, torch.arange(100) * 3 + 1)
    results = []
    for threads in (1, 2):
        torch_threads(threads)
        for batch_size in (4096, 2):  # one faiss call (its own output arrays) and several (staging buffers)
            for k in (5, 150):  # 150 > gallery: empty slots are id -1 / score -inf
                scores, ids = index.search(queries, k, batch_size=batch_size)
                results.append((k, scores, ids))
    for k, scores, ids in results:
        reference = next((s, i) for kk, s, i in results if kk == k)
        assert torch.equal(ids, reference[1]) and torch.equal(scores, reference[0])
        assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (9, k)
    _, ids = next((s, i) for kk, s, i in results if kk == 150)
    assert bool((ids[:, 100:] == -1).all())


def _retriever(count, dim=16, seed=0, zero_copy=True):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(count, 6, dim, generator=g)
    lengths = torch.randint(2, 7, (count,), generator=g)
    ids = torch.arange(count) * 5 + 2
    index = StudentIndex(dim, "flat", device="cpu")
    index.add(torch.nn.functional.normalize(tokens.mean(1), dim=1), ids)
    return Retriever(index, FeatureStore.from_tokens(ids, tokens, lengths, dtype="float32"), zero_copy=zero_copy)


@pytest.mark.parametrize("zero_copy", [True, False])
def test_retriever_results_fixed_on_a_fixed_gallery(zero_copy):
    """Full shortlists (every candidate valid) and shortlists longer than the gallery (empty slots) give the
    scores of the exhaustive teacher on the same pairs, in both the in-place and the gather path."""
    retriever = _retriever(12, zero_copy=zero_copy)
    g = torch.Generator().manual_seed(5)
    queries = torch.randn(3, 4, 16, generator=g)
    lengths = torch.tensor([4, 2, 3])
    embeddings = torch.nn.functional.normalize(queries.mean(1), dim=1)
    exhaustive_ids, exhaustive_scores = retriever.search_exhaustive(queries, lengths, k=12)
    for rerank_k in (12, 40):  # 40 > gallery: capped, every candidate valid
        ids, scores, alignments = retriever.search(embeddings, queries, lengths, k=12, rerank_k=rerank_k,
                                                   return_explanations=True)
        assert torch.equal(ids, exhaustive_ids) and torch.equal(scores, exhaustive_scores)
        assert alignments.shape == (3, 12, 4) and bool((alignments[1, :, 2:] == -1).all())
    ids, scores = retriever.search(embeddings, queries, lengths, k=3, rerank_k=5)
    assert ids.shape == (3, 3) and bool((ids >= 0).all())
    # the shortlist is the student's top 5; its teacher order is the exhaustive order restricted to it
    _, shortlist = retriever.student_index.search(embeddings, 5)
    for row in range(3):
        order = [int(i) for i in exhaustive_ids[row] if int(i) in set(shortlist[row].tolist())][:3]
        assert ids[row].tolist() == order
