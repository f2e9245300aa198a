"""Property-based tests of MilvusStudentIndex (embedded milvus-lite) against the local StudentIndex and numpy.

* A rule-based state machine (add in any input kind, rejected adds, remove with absent / repeated ids, save +
  load, reattach to the existing collection, loading a stale save, reattaching with the wrong dim / metric)
  checked after every step against a dict ``id -> vector`` and a local flat :class:`StudentIndex` mirror: count,
  ids (int64 extremes included, removed ids coming back), and search (k below and above the count, batches of
  queries, empty index, empty batch) against a float64 brute force and the mirror. Vectors are on a grid
  (multiples of 1/4): inner products and squared distances are exact in fp32, so scores compare exactly for
  "ip"; milvus-lite computes L2 as the square of a float32 square root and cosine in float32, so those compare
  within a few ulps (exact ties stay exact ties). ``INSERT_BATCH`` is shrunk so every batching path runs.
* Retriever on Milvus vs Retriever on the local index, same gallery (built in batches, removals, maybe saved
  and reloaded): identical ids and scores for every query whose student scores have no near-ties (with ties the
  two backends may break them differently, as the Retriever docstring allows).
* Failures: add() and remove() through a client that fails at any call (before Milvus sees it, or after Milvus applied it, as
  a timeout does) changes nothing, like the local index, and can be retried; through a Retriever too.
* Input validation: every documented refusal (constructor, add, remove, search) raises the same exception type
  as the local index and changes nothing. NaN embeddings are refused by neither (nothing documents it): a NaN
  gallery vector never displaces a finite one in either backend.

Milvus consistency: the module creates its collections with ``consistency_level="Strong"`` and every read asks
for Strong itself (a collection made elsewhere may default to Bounded), so a read right after a write must see
it; nothing here waits or retries. The exact scan that serves k above Milvus's top-k limit runs in the state
machine (the limit lowered to 0, tiny scan batches) against the float64 brute force.

Default run: derandomized, small (milvus-lite round trips are milliseconds each; one server per module, one
collection per (dim, metric) reused and emptied, since creating a collection costs milvus-lite 0.5 s).
``pytest -m slow`` runs many more examples, failing examples kept in tests/.hypothesis-db like
tests/test_fuzz.py. Bugs found here have deterministic regression tests at the end of the file.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

pytest.importorskip("faiss")
pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from aladin_fast.retrieval import FeatureStore, ManifestError, Retriever, StudentIndex, TeacherScorer  # noqa: E402
from aladin_fast.retrieval import milvus as milvus_module  # noqa: E402
from aladin_fast.retrieval.milvus import MAX_TOPK, MilvusStudentIndex  # noqa: E402
from test_retrieval_properties import _grid, fill_retriever, grid_queries  # noqa: E402

DATABASE = DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(__file__), ".hypothesis-db"))
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.function_scoped_fixture])
DEFAULT_MACHINE = settings(max_examples=30, stateful_step_count=12, derandomize=True, database=None, **COMMON)
THOROUGH_MACHINE = settings(max_examples=300, stateful_step_count=40, database=DATABASE, **COMMON)
DEFAULT = settings(max_examples=30, derandomize=True, database=None, **COMMON)
THOROUGH = settings(max_examples=400, database=DATABASE, **COMMON)

METRICS = ("ip", "l2", "cosine")
DIMS = (1, 4)  # every test shares these (dim, metric) collections: creating one costs milvus-lite 0.5 s
INPUT_KINDS = ["torch-float32", "torch-float64", "torch-float16", "numpy-float32", "numpy-float64"]
# small ids collide with removed ones (an id can come back); huge ones exercise the int64 range
IDS = st.one_of(st.integers(0, 30), st.integers(2**31 - 2, 2**31 + 2), st.integers(2**62, 2**63 - 1))


# ================================================================================================ helpers
class Pool:
    """One milvus-lite file (one embedded server) per module; one collection per (dim, metric), reused."""

    def __init__(self, root: str):
        self.root = root
        self.uri = os.path.join(root, "properties.db")
        self.created = set()
        self.open = []

    @staticmethod
    def name(dim: int, metric: str) -> str:
        return f"prop_d{dim}_{metric}"

    def fresh(self, dim: int, metric: str) -> MilvusStudentIndex:
        """A new client on the (dim, metric) collection, emptied through the index's own remove()."""
        name = self.name(dim, metric)
        index = MilvusStudentIndex(dim, self.uri, name, metric, overwrite=name not in self.created)
        self.created.add(name)
        self.open.append(index)
        left = index.ids()
        if left.size:
            assert index.remove(left) == left.size
        assert index.ntotal == 0 and index.ids().size == 0
        return index

    def track(self, index: MilvusStudentIndex) -> MilvusStudentIndex:
        self.open.append(index)
        return index

    def close(self) -> None:
        for index in self.open:
            try:
                index.close()
            except Exception:  # pragma: no cover - an already closed client
                pass
        self.open.clear()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    # pymilvus warns on every ids() call that milvus-lite's query iterator falls back to a client-side timestamp
    iterator_log = logging.getLogger("pymilvus.client.iterator.query_iterator")
    level = iterator_log.level
    iterator_log.setLevel(logging.ERROR)
    pool = Pool(str(tmp_path_factory.mktemp("milvus-props")))
    yield pool
    pool.close()
    iterator_log.setLevel(level)


@pytest.fixture
def small_batches(monkeypatch):
    """add() / remove() look ids up and insert in INSERT_BATCH chunks, the exact scan reads SCAN_BATCH vectors at
    a time (ids() ID_SCAN_BATCH ids): make the chunks tiny so boundaries run."""
    monkeypatch.setattr(milvus_module, "INSERT_BATCH", 3)
    monkeypatch.setattr(milvus_module, "SCAN_BATCH", 3)
    monkeypatch.setattr(milvus_module, "ID_SCAN_BATCH", 3)


def _as_input(values: np.ndarray, kind: str):
    library, dtype = kind.split("-")
    if library == "numpy":
        return np.ascontiguousarray(values, dtype=dtype)
    return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(getattr(torch, dtype))


def _truth(queries: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    """"Higher is better" scores [Nq, Ng] in float64 (cosine: zero vectors score 0, as both backends do)."""
    q, g = queries.astype(np.float64), gallery.astype(np.float64)
    if metric == "l2":
        return -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if metric == "cosine":
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-300)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300)
    return q @ g.T


def _tolerance(metric: str, truth: np.ndarray) -> np.ndarray:
    """ip on the grid is exact; milvus-lite's L2 is sqrt (fp32) then squared, cosine is fp32: a few ulps."""
    if metric == "ip":
        return np.zeros_like(truth)
    return 1e-6 * np.maximum(1.0, np.abs(truth))


def _scanned_search(index: MilvusStudentIndex, queries: np.ndarray, k: int):
    """``index.search`` through the exact scan that serves k above Milvus's top-k limit (the limit lowered to 0)."""
    limit = milvus_module.MAX_TOPK
    milvus_module.MAX_TOPK = 0
    try:
        return index.search(queries, k)
    finally:
        milvus_module.MAX_TOPK = limit


def _pairs(scores: torch.Tensor, ids: torch.Tensor, row: int):
    """A result row as a sorted list of (score, id): equal for two answers that differ only in tie order."""
    return sorted(zip(scores[row].tolist(), ids[row].tolist()))


# ================================================================================================ state machine
class MilvusIndexMachine(RuleBasedStateMachine):
    pool: Pool = None  # set by the test

    def __init__(self):
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="aladin-milvus-props-")
        self.saves = 0
        self.saved = None  # (path, count at save time)
        self.index = None
        self.model = {}  # id -> float32 vector [dim] as given to add()

    def teardown(self):
        shutil.rmtree(self.root, ignore_errors=True)
        if self.index is not None:
            self.index.close()

    @initialize(dim=st.sampled_from(DIMS), metric=st.sampled_from(METRICS), first=st.lists(IDS, max_size=8),
                seed=st.integers(0, 2**32 - 1))
    def create(self, dim, metric, first, seed):
        self.dim, self.metric = dim, metric
        self.index = self.pool.fresh(dim, metric)
        self.local = StudentIndex(dim, "flat", metric, device="cpu")
        assert self.index.supports_remove and self.index.is_trained
        # the first examples of a derandomized run rarely pick add(): start from a gallery
        self.add(first, seed, copies=False, kind="numpy-float32", id_kind="numpy")

    def _snapshot(self):
        return self.index.ntotal, sorted(self.index.ids().tolist())

    def _replace(self, index):
        old, self.index = self.index, self.pool.track(index)
        old.close()
        assert (index.dim, index.metric, index.collection, index.uri) == (old.dim, old.metric, old.collection, old.uri)

    # ------------------------------------------------------------------ mutation
    @rule(drawn=st.lists(IDS, max_size=7), seed=st.integers(0, 2**32 - 1), copies=st.booleans(),
          kind=st.sampled_from(INPUT_KINDS), id_kind=st.sampled_from(["numpy", "torch", "list"]))
    def add(self, drawn, seed, copies, kind, id_kind):
        ids = [i for i in dict.fromkeys(drawn) if i not in self.model]
        rng = np.random.default_rng(seed)
        vectors = _grid(rng, (len(ids), self.dim))
        if copies and len(ids) > 1:  # duplicate vectors under different ids: tied scores
            vectors[1:] = vectors[0]
        ids_arg = {"numpy": np.array(ids, dtype=np.int64), "torch": torch.tensor(ids, dtype=torch.int64),
                   "list": ids}[id_kind]
        self.index.add(_as_input(vectors, kind), ids_arg)
        self.local.add(vectors, np.array(ids, dtype=np.int64))
        self.model.update(zip(ids, vectors))  # the grid is exact in every input kind (float16 too)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def add_rejected(self, data):
        present = data.draw(st.sampled_from(sorted(self.model)))
        fresh = next(i for i in range(10**6, 10**6 + 100) if i not in self.model)
        zeros = np.zeros((2, self.dim), np.float32)
        cases = {
            "present id": ([fresh, present], zeros, ValueError, r"already in the Milvus collection: \[%d\]" % present),
            "repeat in batch": ([fresh, fresh], zeros, ValueError, "unique"),
            "wrong dim": ([fresh], np.zeros((1, self.dim + 1), np.float32), ValueError, "embeddings must have shape"),
            "1-D embeddings": ([fresh], np.zeros(self.dim, np.float32), ValueError, "embeddings must have shape"),
            "ids count": ([fresh], zeros, ValueError, r"ids must have shape \[2\]"),
            "negative id": ([fresh, -1], zeros, ValueError, "non-negative"),
            "id past int64": (np.array([fresh, 2**63], np.uint64), zeros, ValueError, "non-negative"),
            "2-D ids": ([[fresh, fresh + 1]], zeros, ValueError, "ids must have shape"),
            "float ids": ([0.5, 1.0], zeros, TypeError, "integer ids"),
            "int embeddings": ([fresh, fresh + 1], zeros.astype(np.int64), TypeError, "floating"),
            "complex embeddings": ([fresh, fresh + 1], torch.zeros(2, self.dim, dtype=torch.complex64), TypeError,
                                   "floating"),
        }
        name = data.draw(st.sampled_from(sorted(cases)))
        ids, vectors, error, message = cases[name]
        before = self._snapshot()
        with pytest.raises(error, match=message):
            self.index.add(vectors, ids)
        with pytest.raises(error):  # the local index refuses the same input with the same exception type
            self.local.add(vectors, ids)
        assert self._snapshot() == before

    @rule(data=st.data(), absent=st.lists(IDS, max_size=3), as_tensor=st.booleans())
    def remove(self, data, absent, as_tensor):
        present = data.draw(st.lists(st.sampled_from(sorted(self.model)), max_size=4)) if self.model else []
        absent = [i for i in absent if i not in self.model]
        request = data.draw(st.permutations(present + absent + present[:1]))
        arg = torch.tensor(request, dtype=torch.int64) if as_tensor else request
        assert self.index.remove(arg) == len(set(present))
        assert self.local.remove(np.array(request, dtype=np.int64)) == len(set(present))
        for item in set(present):
            del self.model[item]

    @rule(bad=st.sampled_from(["negative", "float", "2-D"]))
    def remove_rejected(self, bad):
        arg = {"negative": [-3], "float": [1.5], "2-D": [[1, 2]]}[bad]
        error = TypeError if bad == "float" else ValueError
        before = self._snapshot()
        with pytest.raises(error):
            self.index.remove(arg)
        with pytest.raises(error):
            self.local.remove(arg)
        assert self._snapshot() == before

    # ------------------------------------------------------------------ reconnect
    @rule(same_path=st.booleans(), verify=st.booleans())
    def save_and_load(self, same_path, verify):
        if not (same_path and self.saved):
            self.saves += 1
            path = os.path.join(self.root, f"index-{self.saves}")
        else:
            path = self.saved[0]
        self.index.save(path)
        self.saved = (path, len(self.model))
        self._replace(MilvusStudentIndex.load(path, verify=verify))
        assert self.index.config()["count"] == len(self.model)

    @rule()
    def reattach(self):
        """A second process / client opening the existing collection sees the same data."""
        self._replace(MilvusStudentIndex(self.dim, self.index.uri, self.index.collection, self.metric))

    @precondition(lambda self: self.saved is not None and self.saved[1] != len(self.model))
    @rule()
    def load_stale(self):
        path, count = self.saved
        with pytest.raises(ManifestError, match=f"holds {len(self.model)} vectors, the saved manifest says {count}"):
            MilvusStudentIndex.load(path)

    @rule(wrong=st.sampled_from(["dim", "metric"]))
    def reattach_mismatch(self, wrong):
        before = self._snapshot()
        if wrong == "dim":
            with pytest.raises(ValueError, match=f"vector dim {self.dim}, expected dim={self.dim + 1}"):
                MilvusStudentIndex(self.dim + 1, self.index.uri, self.index.collection, self.metric)
        else:
            other = METRICS[(METRICS.index(self.metric) + 1) % 3]
            with pytest.raises(ValueError, match="uses metric"):
                MilvusStudentIndex(self.dim, self.index.uri, self.index.collection, other)
        assert self._snapshot() == before

    # ------------------------------------------------------------------ checks
    @invariant()
    def matches_model(self):
        if self.index is None:
            return
        ids = sorted(self.model)
        assert self.index.ntotal == len(self.index) == self.local.ntotal == len(ids)
        found = self.index.ids()
        assert found.dtype == np.int64 and sorted(found.tolist()) == ids

    @rule(seed=st.integers(0, 2**32 - 1), nq=st.integers(0, 12), extra_k=st.integers(-3, 3),
          batch_size=st.integers(1, 15), kind=st.sampled_from(INPUT_KINDS))
    def search(self, seed, nq, extra_k, batch_size, kind):
        ids = sorted(self.model)
        queries = grid_queries(self.model, self.dim, seed, nq)
        k = max(1, len(ids) + extra_k)
        scores, found = self.index.search(_as_input(queries, kind), k)
        assert scores.dtype == torch.float32 and found.dtype == torch.int64
        assert scores.shape == found.shape == (nq, k)
        batched = self.index.search(queries, k, batch_size=batch_size)
        local_scores, local_found = self.local.search(queries, k)
        hits = min(k, len(ids))
        for result in ((scores, found), batched, (local_scores, local_found)):
            assert (result[1][:, hits:] == -1).all() and (result[0][:, hits:] == float("-inf")).all()
        for q in range(nq):  # batching changes nothing (but the order of exact ties; fp32 cosine / L2 noise)
            if self.metric == "ip":
                assert _pairs(*batched, q) == _pairs(scores, found, q)
            else:
                assert torch.equal(batched[1][q] == -1, found[q] == -1)
                torch.testing.assert_close(batched[0][q], scores[q], rtol=1e-6, atol=1e-6)
        if not hits or not nq:
            return
        gallery = np.stack([self.model[i] for i in ids])
        truth = _truth(queries, gallery, self.metric)
        column = {item: j for j, item in enumerate(ids)}
        scanned = _scanned_search(self.index, queries, k)
        assert (scanned[1][:, hits:] == -1).all() and (scanned[0][:, hits:] == float("-inf")).all()
        for q in range(nq):
            row = found[q, :hits].tolist()
            assert len(set(row)) == hits and all(item in column for item in row), row
            got = scores[q, :hits].double().numpy()
            own = truth[q, [column[item] for item in row]]  # each hit's true score
            np.testing.assert_array_less(np.abs(got - own), _tolerance(self.metric, own) + 1e-300)
            assert (np.diff(own) <= 1e-12).all(), (got, own)  # best first (in exact scores)
            best = np.sort(truth[q])[::-1][:hits]  # the multiset of the true top-k (ties: any of them)
            np.testing.assert_array_less(np.abs(got - best), _tolerance(self.metric, best) + 1e-300)
            # the exact scan (k above Milvus's limit): the true top-k, the lower id first on ties
            scan_row, scan_got = scanned[1][q, :hits].tolist(), scanned[0][q, :hits].double().numpy()
            scan_own = truth[q, [column[item] for item in scan_row]]
            np.testing.assert_array_less(np.abs(scan_got - scan_own), _tolerance(self.metric, scan_own) + 1e-300)
            np.testing.assert_array_less(np.abs(scan_got - best), _tolerance(self.metric, best) + 1e-300)
            if self.metric == "ip":  # exact scores on the grid: the order is fully determined
                assert scan_row == sorted(ids, key=lambda item: (-truth[q, column[item]], item))[:hits]
            # the same answer as the local index: scores within tolerance, and ids equal up to tied scores
            local = local_scores[q, :hits].double().numpy()
            np.testing.assert_allclose(got, local, rtol=0, atol=1e-5)
            kth = best[-1]
            sure = {item for item in ids if truth[q, column[item]] > kth}  # strictly above the k-th: in every answer
            assert sure <= set(row) and sure <= set(local_found[q, :hits].tolist())


def test_milvus_index_machine(pool, small_batches, single_threaded_faiss):
    MilvusIndexMachine.pool = pool
    run_state_machine_as_test(MilvusIndexMachine, settings=DEFAULT_MACHINE)


@pytest.mark.slow
def test_milvus_index_machine_thorough(pool, small_batches, single_threaded_faiss):
    MilvusIndexMachine.pool = pool
    run_state_machine_as_test(MilvusIndexMachine, settings=THOROUGH_MACHINE)


# ================================================================================================ Retriever
@st.composite
def retriever_problems(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dim, embed = draw(st.sampled_from([1, 4])), draw(st.sampled_from(DIMS))
    count = draw(st.integers(1, 10))
    pad = draw(st.integers(1, 3))
    nq = draw(st.integers(1, 4))  # the state machine covers empty query batches
    return dict(
        metric=draw(st.sampled_from(METRICS)),
        direction=draw(st.sampled_from(["text_to_image", "image_to_text"])),
        aggregation=draw(st.sampled_from(["MrSw", "MwSr", "symm", "mean"])),
        dim=dim, embed=embed, count=count,
        tokens=_grid(rng, (count, pad, dim), scale=8, limit=16),
        lengths=np.array(draw(st.lists(st.integers(0, pad), min_size=count, max_size=count)), dtype=np.int64),
        # a fine grid: student ties (which the two backends may break differently) are rarer
        embeddings=_grid(rng, (count, embed), scale=64, limit=64),
        ids=draw(st.lists(st.one_of(st.integers(0, 10**6), st.integers(2**62, 2**63 - 1)),
                          min_size=count, max_size=count, unique=True)),
        batches=draw(st.integers(1, 3)),
        removed=draw(st.lists(st.integers(0, count - 1), max_size=max(1, count - 1), unique=True)),
        reload=draw(st.booleans()),
        nq=nq,
        query_tokens=_grid(rng, (nq, draw(st.integers(1, 3)), dim), scale=8, limit=16),
        query_embeddings=_grid(rng, (nq, embed), scale=64, limit=64),
        k=draw(st.integers(1, count + 2)),
        rerank_k=draw(st.integers(1, count + 3)),
        student_batch_size=draw(st.integers(1, 5)),
    )


def _retriever(problem, index):
    scorer = TeacherScorer(aggregation=problem["aggregation"])
    store = FeatureStore(problem["dim"])
    retriever = Retriever(index, store, scorer, direction=problem["direction"])
    fill_retriever(retriever, problem)
    return retriever


def _check_retriever(problem, pool, tmp):
    k = problem["k"]
    rerank_k = max(k, problem["rerank_k"])
    milvus = _retriever(problem, pool.fresh(problem["embed"], problem["metric"]))
    local = _retriever(problem, StudentIndex(problem["embed"], metric=problem["metric"], device="cpu"))
    # a rejected add (tokens of the wrong size) is rolled back in Milvus too
    before = sorted(milvus.student_index.ids().tolist())
    with pytest.raises(ValueError, match="tokens must be padded"):
        milvus.add([10**6 + 1], torch.zeros(1, problem["embed"]), torch.zeros(1, 1, problem["dim"] + 1))
    assert sorted(milvus.student_index.ids().tolist()) == before == sorted(local.student_index.ids().tolist())
    if problem["reload"]:
        path = os.path.join(tmp, "retriever")
        milvus.save(path)
        milvus = Retriever.load(path)
        pool.track(milvus.student_index)
        assert isinstance(milvus.student_index, MilvusStudentIndex)
    query_tokens = torch.from_numpy(problem["query_tokens"])
    query_embeddings = torch.from_numpy(problem["query_embeddings"])
    options = dict(k=k, rerank_k=rerank_k, student_batch_size=problem["student_batch_size"])
    got_ids, got_scores = milvus.search(query_embeddings, query_tokens, **options)
    want_ids, want_scores = local.search(query_embeddings, query_tokens, **options)
    assert got_ids.shape == want_ids.shape == got_scores.shape == (problem["nq"], k)
    assert torch.equal(got_ids == -1, want_ids == -1)
    gallery_ids = local.feature_store.ids()
    if not gallery_ids.size or not problem["nq"]:
        return
    gallery = np.stack([problem["embeddings"][problem["ids"].index(int(i))] for i in gallery_ids])
    student = _truth(problem["query_embeddings"], gallery, problem["metric"])
    for q in range(problem["nq"]):
        values = np.sort(student[q])
        if values.size > 1 and np.min(np.diff(values)) <= 1e-5:
            # tied student scores: the backends may shortlist / order them differently. With the whole gallery
            # shortlisted and returned, both return every item with its teacher score
            event("student tie")
            if rerank_k >= values.size and k >= values.size:
                assert _pairs(got_scores, got_ids, q) == _pairs(want_scores, want_ids, q)
            continue
        event("compared exactly")
        assert torch.equal(got_ids[q], want_ids[q]) and torch.equal(got_scores[q], want_scores[q]), q


@DEFAULT
@given(problem=retriever_problems())
def test_retriever_on_milvus_equals_retriever_on_local_index(problem, pool, single_threaded_faiss, tmp_path_factory):
    _check_retriever(problem, pool, str(tmp_path_factory.mktemp("retriever")))


@pytest.mark.slow
@THOROUGH
@given(problem=retriever_problems())
def test_retriever_on_milvus_equals_retriever_on_local_index_thorough(problem, pool, single_threaded_faiss,
                                                                     tmp_path_factory):
    _check_retriever(problem, pool, str(tmp_path_factory.mktemp("retriever")))


# ================================================================================================ failures
class InjectedFault(RuntimeError):
    pass


class FlakyClient:
    """Forwards every call to a real MilvusClient; once armed, call number ``fail_at`` (0-based, counted from
    arming) raises InjectedFault, before reaching Milvus or (``applied=True``) after Milvus applied it, as a
    timeout or a dropped connection does on a cluster (or a "memory quota exhausted" refusal mid-stream)."""

    def __init__(self, real):
        self.real, self.fail_at, self.applied, self.calls = real, None, False, []

    def arm(self, fail_at, applied=False):
        self.fail_at, self.applied, self.calls = fail_at, applied, []

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls.append(name)
            fail = self.fail_at is not None and len(self.calls) - 1 == self.fail_at
            if fail and not self.applied:
                raise InjectedFault(name)
            result = attr(*args, **kwargs)
            if fail:
                raise InjectedFault(name)
            return result

        return call


def _flaky_index(pool, dim, metric):
    base = pool.fresh(dim, metric)
    client = FlakyClient(base.client)
    return MilvusStudentIndex(dim, pool.uri, base.collection, metric, client=client), client


def _check_failed_add(pool, start, new, fail_at, applied, through_retriever):
    """add() that fails at any client call changes nothing (like the local index) and can simply be retried."""
    index, client = _flaky_index(pool, 4, "ip")
    every = start + new
    vectors = {item: np.array([item % 5, 1, 0, 0], np.float32) / 4 for item in every}
    store = FeatureStore(1)
    retriever = None
    if start:
        index.add(np.stack([vectors[i] for i in start]), start)
        store.append(start, torch.ones(len(start), 1, 1))
    if through_retriever:
        retriever = Retriever(index, store)
    embeddings = np.stack([vectors[i] for i in new])
    client.arm(fail_at, applied)
    try:
        if retriever is not None:
            retriever.add(new, embeddings, torch.ones(len(new), 1, 1))
        else:
            index.add(embeddings, new)
    except InjectedFault:
        event(f"failed at {client.calls[fail_at]}{' (applied)' if applied else ''}")
        client.arm(None)
        assert sorted(index.ids().tolist()) == sorted(start) and index.ntotal == len(start)
        assert store.ids().tolist() == sorted(start)
        _, found = index.search(np.array([[0.0, 1.0, 0.0, 0.0]], np.float32), len(every) + 1)
        assert sorted(found[0, :len(start)].tolist()) == sorted(start) and (found[0, len(start):] == -1).all()
        if retriever is not None:  # "on failure neither is changed": the retriever is still usable
            retriever.add(new, embeddings, torch.ones(len(new), 1, 1))
        else:
            index.add(embeddings, new)  # the retry is not refused with "ids already in the Milvus collection"
    else:
        event("no failure")
        client.arm(None)
    assert sorted(index.ids().tolist()) == sorted(every) and index.ntotal == len(every)
    scores, found = index.search(np.stack([vectors[i] for i in every]), len(every))
    truth = {item: float(vectors[item] @ vectors[item]) for item in every}
    assert all(truth[item] in scores[row].tolist() for row, item in enumerate(every))


@settings(max_examples=25, derandomize=True, database=None, **COMMON)
@given(start=st.lists(st.integers(0, 40), max_size=4, unique=True), size=st.integers(1, 8),
       fail_at=st.integers(0, 7), applied=st.booleans(), through_retriever=st.booleans())
def test_failed_add_changes_nothing(start, size, fail_at, applied, through_retriever, pool, small_batches):
    new = [100 + 7 * j for j in range(size)]
    _check_failed_add(pool, start, new, fail_at, applied, through_retriever)


@pytest.mark.slow
@settings(max_examples=200, database=DATABASE, **COMMON)
@given(start=st.lists(st.integers(0, 40), max_size=6, unique=True), size=st.integers(1, 12),
       fail_at=st.integers(0, 10), applied=st.booleans(), through_retriever=st.booleans())
def test_failed_add_changes_nothing_thorough(start, size, fail_at, applied, through_retriever, pool, small_batches):
    new = [100 + 7 * j for j in range(size)]
    _check_failed_add(pool, start, new, fail_at, applied, through_retriever)


def _check_failed_remove(pool, start, removed, fail_at, applied, through_retriever):
    """remove() that fails at any client call leaves the index and the store holding the same ids, and a retry
    finishes it. A delete that Milvus applied and then reported as failed (a timeout) is a removal that happened:
    it is reported as done, not raised (before, a Retriever kept those ids in its store)."""
    index, client = _flaky_index(pool, 4, "ip")
    vectors = np.stack([np.array([item % 5, 1, 0, 0], np.float32) / 4 for item in start])
    index.add(vectors, start)
    store = FeatureStore(1)
    store.append(start, torch.ones(len(start), 1, 1))
    retriever = Retriever(index, store) if through_retriever else None
    client.arm(fail_at, applied)
    try:
        count = retriever.remove(removed) if retriever is not None else index.remove(removed)
    except InjectedFault:
        event(f"failed at {client.calls[fail_at]}{' (applied)' if applied else ''}")
        assert not (applied and client.calls[fail_at] == "delete"), "an applied delete was reported as failed"
        client.arm(None)
        if retriever is not None:
            assert sorted(index.ids().tolist()) == store.ids().tolist()
        assert set(start) - set(removed) <= set(index.ids().tolist())
        count = None
    client.arm(None)
    expected = sorted(set(start) - set(removed))
    if count is not None:
        assert count == len(set(start) & set(removed))
    else:  # the retry finishes it
        retriever.remove(removed) if retriever is not None else index.remove(removed)
    assert sorted(index.ids().tolist()) == expected and index.ntotal == len(expected)
    if retriever is not None:
        assert store.ids().tolist() == expected


@settings(max_examples=25, derandomize=True, database=None, **COMMON)
@given(start=st.lists(st.integers(0, 40), min_size=1, max_size=8, unique=True), data=st.data(),
       fail_at=st.integers(0, 6), applied=st.booleans(), through_retriever=st.booleans())
def test_failed_remove_keeps_index_and_store_in_step(start, data, fail_at, applied, through_retriever, pool,
                                                     small_batches):
    removed = data.draw(st.lists(st.sampled_from(start + [99]), min_size=1, max_size=6, unique=True))
    _check_failed_remove(pool, start, removed, fail_at, applied, through_retriever)


def test_regression_applied_delete_reported_as_failed_is_a_removal(pool):
    for through_retriever in (False, True):
        index, client = _flaky_index(pool, 4, "ip")
        index.add(np.eye(4, dtype=np.float32)[:3], [1, 2, 3])
        store = FeatureStore(1)
        store.append([1, 2, 3], torch.ones(3, 1, 1))
        target = Retriever(index, store) if through_retriever else index
        client.arm(1, applied=True)  # call 0: the lookup of which ids exist; call 1: the delete
        assert target.remove([2, 3]) == 2
        client.arm(None)
        assert sorted(index.ids().tolist()) == [1] and store.ids().tolist() == ([1] if through_retriever else [1, 2, 3])


class _ReversedScan:
    """A query_iterator whose batches come in descending id order (a cluster's segments give no order)."""

    def __init__(self, rows, size):
        rows = sorted(rows, key=lambda row: -row["id"])
        self.batches = [rows[start:start + size] for start in range(0, len(rows), size)]

    def next(self):
        return self.batches.pop(0) if self.batches else []

    def close(self):
        pass


def test_regression_exact_scan_keeps_the_lower_id_on_ties_in_any_scan_order(pool, small_batches):
    index = pool.fresh(4, "ip")
    real = index.client

    class Client:
        def __getattr__(self, name):
            return getattr(real, name)

        def query_iterator(self, collection, batch_size, filter, output_fields, **kwargs):
            rows = real.query(collection, filter="id >= 0", output_fields=output_fields, **kwargs)
            return _ReversedScan(rows, batch_size)

    index.add(np.tile(np.array([[0.5, 0, 0, 0]], np.float32), (7, 1)), [40, 3, 17, 8, 25, 1, 12])
    index.client = Client()
    scores, found = _scanned_search(index, np.array([[1.0, 0, 0, 0]], np.float32), 4)
    assert found[0].tolist() == [1, 3, 8, 12] and scores[0].tolist() == [0.5] * 4


# ================================================================================================ validation
def test_constructor_and_search_validation_matches_the_local_index(pool):
    index = pool.fresh(4, "ip")
    index.add(np.eye(4, dtype=np.float32), [1, 2, 3, 4])
    local = StudentIndex(4, device="cpu")
    local.add(np.eye(4, dtype=np.float32), [1, 2, 3, 4])
    for bad in (0, -1, True, 2.0, "4", None):
        with pytest.raises(ValueError, match="dim must be a positive int"):
            MilvusStudentIndex(bad, pool.uri, "never_created")
        with pytest.raises(ValueError, match="dim must be a positive int"):
            StudentIndex(bad, device="cpu")
    with pytest.raises(ValueError, match="metric must be one of"):
        MilvusStudentIndex(4, pool.uri, "never_created", metric="dot")
    for uri in ("", None):
        with pytest.raises(ValueError, match="uri must be"):
            MilvusStudentIndex(4, uri, "never_created")
    assert not index.client.has_collection("never_created")
    queries = np.eye(4, dtype=np.float32)[:2]
    for bad_k in (0, -1, True, 1.5, "2", None):
        for backend in (index, local):
            with pytest.raises(ValueError, match="k must be a positive int"):
                backend.search(queries, bad_k)
    # above Milvus's top-k limit: an exact scan of the collection, the same hits as below it
    beyond, below = index.search(queries, MAX_TOPK + 1), index.search(queries, 4)
    assert beyond[0].shape == beyond[1].shape == (2, MAX_TOPK + 1)
    assert (beyond[1][:, 4:] == -1).all() and (beyond[0][:, 4:] == float("-inf")).all()
    assert all(_pairs(beyond[0][:, :4], beyond[1][:, :4], q) == _pairs(*below, q) for q in range(2))
    for backend in (index, local):
        with pytest.raises(ValueError, match="batch_size must be >= 1"):
            backend.search(queries, 2, batch_size=0)
        with pytest.raises(ValueError, match="queries must have shape"):
            backend.search(np.zeros((2, 5), np.float32), 2)
        with pytest.raises(ValueError, match="queries must have shape"):
            backend.search(np.zeros(4, np.float32), 2)
        with pytest.raises(TypeError, match="queries must be floating"):
            backend.search(np.zeros((2, 4), np.int32), 2)
        with pytest.raises(ValueError, match="embeddings must have shape"):
            backend.train(np.zeros((2, 3), np.float32))
        # the edges: an empty batch of queries, k = MAX_TOPK (far above the count), numpy ints for k
        scores, found = backend.search(np.zeros((0, 4), np.float32), 3)
        assert scores.shape == found.shape == (0, 3)
        scores, found = backend.search(queries, np.int64(MAX_TOPK))
        assert (found[:, 4:] == -1).all() and (scores[:, 4:] == float("-inf")).all()
        assert sorted(found[0, :4].tolist()) == [1, 2, 3, 4] and scores[0, 0] == 1.0
    assert index.ntotal == 4


@pytest.mark.parametrize("metric", METRICS)
def test_nan_gallery_vectors_never_displace_finite_ones(pool, metric):
    """Neither backend refuses NaN embeddings (nothing documents it). faiss leaves NaN items out of the results
    (id -1), milvus-lite returns them with a NaN score after every finite hit: both rank the finite items alike."""
    index = pool.fresh(4, metric)
    local = StudentIndex(4, metric=metric, device="cpu")
    vectors = np.array([[1, 0, 0, 0], [np.nan, 0, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0, np.nan], [0, 0.25, 0, 0]],
                       np.float32)
    for backend in (index, local):
        backend.add(vectors, [5, 6, 7, 8, 9])
    queries = np.array([[1, 0.25, 0, 0], [0, 1, 0, 0]], np.float32)
    for k in (2, 3, 5, 6):
        scores, found = index.search(queries, k)
        local_scores, local_found = local.search(queries, k)
        finite = min(k, 3)
        assert torch.equal(found[:, :finite], local_found[:, :finite])
        torch.testing.assert_close(scores[:, :finite], local_scores[:, :finite], rtol=1e-6, atol=1e-6)
        rest = found[:, finite:]
        assert ((rest == -1) | (rest == 6) | (rest == 8)).all()


def test_ids_round_trip_past_one_iterator_page(pool):
    """ids() reads the collection with a query iterator in pages of 4096: every id exactly once, int64 extremes."""
    index = pool.fresh(1, "l2")
    count = 4100
    ids = np.concatenate([np.arange(count - 4) * 2**40, [2**63 - 1, 2**63 - 2, 2**31, 2**32 + 1]]).astype(np.int64)
    vectors = (np.arange(count, dtype=np.float32) / 8)[:, None]
    index.add(vectors, ids)
    found = index.ids()
    assert found.dtype == np.int64 and np.array_equal(np.sort(found), np.sort(ids)) and index.ntotal == count
    scores, hits = index.search(vectors[-4:], 2)
    assert hits[:, 0].tolist() == ids[-4:].tolist() and (scores[:, 0] == 0).all()
    assert index.remove(ids[::2]) == count // 2 and index.ntotal == count // 2
    assert np.array_equal(np.sort(index.ids()), np.sort(ids[1::2]))
    assert index.remove(ids) == count // 2 and index.ntotal == 0 and index.ids().size == 0


# ================================================================================================ regressions
def test_regression_add_failing_after_the_first_insert_batch_is_rolled_back(pool, monkeypatch):
    """Found by test_failed_add_changes_nothing: add() inserts in INSERT_BATCH chunks; when a later chunk
    failed (a timeout, a dropped connection, Milvus refusing writes under memory pressure) the earlier chunks
    stayed in the collection. add() raised, yet the index held part of the ids: the feature store did not (so
    Retriever.add's "on failure neither is changed" was broken and the retriever's counts disagreed), and
    retrying the same add was refused forever with "ids already in the Milvus collection"."""
    monkeypatch.setattr(milvus_module, "INSERT_BATCH", 2)
    index, client = _flaky_index(pool, 4, "ip")
    store = FeatureStore(1)
    retriever = Retriever(index, store)
    vectors = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [2, 0, 0, 0], [0, 2, 0, 0]], np.float32)
    ids = [10, 11, 12, 13, 14]
    client.arm(4)  # calls: get, get, get (existing-id checks), insert [10, 11], insert [12, 13] <- fails
    with pytest.raises(InjectedFault):
        retriever.add(ids, vectors, torch.ones(5, 1, 1))
    assert client.calls[3:5] == ["insert", "insert"]
    client.arm(None)
    assert index.ntotal == 0 and index.ids().size == 0 and store.count == 0
    retriever.add(ids, vectors, torch.ones(5, 1, 1))
    assert sorted(index.ids().tolist()) == ids and retriever.count == 5
    found, _ = retriever.search(np.array([[2.0, 0.0, 0.0, 0.0]], np.float32), torch.ones(1, 1, 1), k=1, rerank_k=1)
    assert found.tolist() == [[13]]
