"""Property-based tests of the retrieval layer against plain Python / numpy models.

* FeatureStore: a rule-based state machine (append padded / packed in any float dtype, torch or numpy, remove,
  compact, save + load with and without re-sharding, memory-mapped or not, into a new or the same directory,
  rejected appends) checked after every step against a dict ``id -> tokens``: ids, count, lengths, contains,
  gather (padded, packed, pad_to, dtype), rows + packed_view, shard layout.
* StudentIndex (exact "flat"): a state machine (add, remove, save + load) checked against a numpy brute force on
  grid-valued vectors (exact fp32 products, so score multisets compare exactly and ties are frequent).
* Retriever (both directions, every aggregation, both paddings, gathered and in-place rerank, galleries built
  in batches with removals / compact / save + load): hits are the student shortlist stably sorted by the
  exhaustive teacher scores of :func:`aladin_fast.alignment_scores` (so, with a shortlist covering the whole
  gallery, the exhaustive teacher ranking, ties in the student order as documented), explanations are its
  argmax; search_exhaustive returns the same top-k scores for any chunk size; a rejected add changes nothing.
* FeatureStore.from_tokens equals a new store plus one append, for every input kind.

Default run: derandomized, small (reproducible in CI). ``pytest -m slow`` runs many more examples; failing
examples are kept in tests/.hypothesis-db like tests/test_fuzz.py. Bugs found here have deterministic regression
tests at the end of the file.
"""
from __future__ import annotations

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

import aladin_fast  # noqa: E402
from aladin_fast.retrieval import FeatureStore, Retriever, StudentIndex, TeacherScorer  # noqa: E402

DATABASE = DirectoryBasedExampleDatabase(os.path.join(os.path.dirname(__file__), ".hypothesis-db"))
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DEFAULT_MACHINE = settings(max_examples=50, stateful_step_count=25, derandomize=True, database=None, **COMMON)
THOROUGH_MACHINE = settings(max_examples=400, stateful_step_count=50, database=DATABASE, **COMMON)
DEFAULT = settings(max_examples=100, derandomize=True, database=None, **COMMON)
THOROUGH = settings(max_examples=600, database=DATABASE, **COMMON)

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INPUT_KINDS = ["torch-float32", "torch-float16", "torch-bfloat16", "torch-float64", "numpy-float32", "numpy-float64"]
# small ids collide with removed ones (an id can come back); huge ones exercise the int64 range
IDS = st.one_of(st.integers(0, 30), st.integers(2**31 - 2, 2**31 + 2), st.integers(2**62, 2**63 - 1))


def _as_input(values: np.ndarray, kind: str):
    """float64 values -> the caller's tokens in ``kind`` (torch or numpy, some float dtype)."""
    library, dtype = kind.split("-")
    if library == "numpy":
        return np.ascontiguousarray(values, dtype=dtype)
    return torch.from_numpy(values).to(getattr(torch, dtype))


def _cast(tokens, store_dtype: torch.dtype) -> torch.Tensor:
    """What the store must hold for these caller tokens: a plain torch cast to the store dtype."""
    if isinstance(tokens, np.ndarray):
        tokens = torch.from_numpy(tokens.copy())
    return tokens.detach().clone().to(store_dtype)


def _scribble(tokens) -> None:
    """The caller reuses its buffer after append: the store must not change."""
    if isinstance(tokens, np.ndarray):
        tokens[...] = np.nan
    else:
        tokens.fill_(float("nan"))


# ================================================================================================ FeatureStore
class FeatureStoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="aladin-store-props-")
        self.saves = 0
        self.last_path = None
        self.store = None
        self.model = {}  # id -> tokens [L, D] in the store dtype
        self.shards = []  # live ids of every shard, in shard order (a shard whose items are all removed stays)

    def teardown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    @initialize(dim=st.sampled_from([1, 3, 8]), dtype=st.sampled_from(sorted(STORE_DTYPES)),
                as_torch_dtype=st.booleans())
    def create(self, dim, dtype, as_torch_dtype):
        self.dim, self.dtype = dim, STORE_DTYPES[dtype]
        self.store = FeatureStore(dim, self.dtype if as_torch_dtype else dtype)
        assert self.store.dtype == self.dtype and self.store.dtype_name == dtype

    # ------------------------------------------------------------------ helpers
    def _new_ids(self, drawn):
        return [i for i in dict.fromkeys(drawn) if i not in self.model]

    def _record(self, ids, expected):
        for item, tokens in zip(ids, expected):
            self.model[item] = tokens
        if ids:
            self.shards.append(list(ids))

    def _snapshot(self):
        store = self.store
        return store.ids(), store.count, store.num_shards, store.total_tokens, store.max_length

    def _assert_unchanged(self, before):
        after = self._snapshot()
        assert np.array_equal(before[0], after[0]) and before[1:] == after[1:], (before, after)

    # -------------------------------------------------------------------- rules
    @rule(drawn=st.lists(IDS, max_size=5), lengths=st.data(), extra_pad=st.integers(0, 2),
          kind=st.sampled_from(INPUT_KINDS), seed=st.integers(0, 2**32 - 1), omit_lengths=st.booleans(),
          scribble=st.booleans())
    def append_padded(self, drawn, lengths, extra_pad, kind, seed, omit_lengths, scribble):
        ids = self._new_ids(drawn)
        lengths = lengths.draw(st.lists(st.integers(0, 5), min_size=len(ids), max_size=len(ids)))
        pad = max(lengths, default=0) + extra_pad
        rng = np.random.default_rng(seed)
        values = rng.standard_normal((len(ids), pad, self.dim))
        for row, length in enumerate(lengths):
            values[row, length:] = np.nan  # padding is never read
        tokens = _as_input(values, kind)
        expected = [_cast(tokens[row, :length], self.dtype) for row, length in enumerate(lengths)]
        if omit_lengths and all(length == pad for length in lengths):
            self.store.append(np.array(ids, dtype=np.int64), tokens)  # lengths=None: all L valid
        else:
            self.store.append(torch.tensor(ids, dtype=torch.int64), tokens, torch.tensor(lengths, dtype=torch.int64))
        if scribble:
            _scribble(tokens)
        self._record(ids, expected)

    @rule(drawn=st.lists(IDS, max_size=5), lengths=st.data(), kind=st.sampled_from(INPUT_KINDS),
          seed=st.integers(0, 2**32 - 1), scribble=st.booleans(), cu_as=st.sampled_from(["list", "torch", "numpy"]))
    def append_packed(self, drawn, lengths, kind, seed, scribble, cu_as):
        ids = self._new_ids(drawn)
        lengths = lengths.draw(st.lists(st.integers(0, 5), min_size=len(ids), max_size=len(ids)))
        cu = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        values = np.random.default_rng(seed).standard_normal((int(cu[-1]), self.dim))
        tokens = _as_input(values, kind)
        expected = [_cast(tokens[cu[row]:cu[row + 1]], self.dtype) for row in range(len(ids))]
        cu_seqlens = {"list": cu.tolist(), "torch": torch.from_numpy(cu), "numpy": cu}[cu_as]
        self.store.append(ids, tokens, cu_seqlens=cu_seqlens)
        if scribble:
            _scribble(tokens)
        self._record(ids, expected)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def append_rejected(self, data):
        """Documented errors (ValueError) leave the store unchanged (Retriever.add relies on it)."""
        present = data.draw(st.sampled_from(sorted(self.model)))
        fresh = max(self.model) + 1 if max(self.model) < 2**63 - 2 else 31
        while fresh in self.model:
            fresh += 1
        ok = torch.zeros(1, 2, self.dim)
        cases = {
            "present id": ([present], ok, None, None, "already in the feature store"),
            "present id among new": ([fresh, present], torch.zeros(2, 2, self.dim), None, None, "already in the feature store"),
            "repeat in batch": ([fresh, fresh], torch.zeros(2, 2, self.dim), None, None, "unique"),
            "wrong dim": ([fresh], torch.zeros(1, 2, self.dim + 1), None, None, "tokens must be padded"),
            "wrong dim packed": ([fresh], torch.zeros(2, self.dim + 1), None, [0, 2], "packed"),
            "length > pad": ([fresh], ok, torch.tensor([3]), None, "lengths must lie in"),
            "negative length": ([fresh], ok, torch.tensor([-1]), None, "lengths must lie in"),
            "ids count": ([fresh, fresh + 1], ok, None, None, r"ids must have shape \[1\]"),
            "cu_seqlens end": ([fresh], torch.zeros(3, self.dim), None, [0, 2], "cu_seqlens"),
            "cu_seqlens decreasing": ([fresh, fresh + 1], torch.zeros(2, self.dim), None, [0, 3, 2], "cu_seqlens"),
            "negative id": ([-1], ok, None, None, "non-negative"),
        }
        name = data.draw(st.sampled_from(sorted(cases)))
        ids, tokens, lengths, cu_seqlens, message = cases[name]
        before = self._snapshot()
        with pytest.raises(ValueError, match=message):
            if cu_seqlens is None:
                self.store.append(ids, tokens, lengths)
            else:
                self.store.append(ids, tokens, cu_seqlens=cu_seqlens)
        self._assert_unchanged(before)

    @rule(data=st.data(), absent=st.lists(IDS, max_size=3))
    def remove(self, data, absent):
        present = data.draw(st.lists(st.sampled_from(sorted(self.model)), max_size=4)) if self.model else []
        absent = [i for i in absent if i not in self.model]
        request = data.draw(st.permutations(present + absent + present[:1]))  # with a repeat
        removed = self.store.remove(np.array(request, dtype=np.int64))
        assert removed == len(set(present)), (request, removed)
        for item in set(present):
            del self.model[item]
        self.shards = [[i for i in shard if i in self.model] for shard in self.shards]

    @rule()
    def compact(self):
        order = [i for shard in self.shards for i in shard]
        self.store.compact()
        self.shards = [order] if order else []
        assert self.store.num_shards == len(self.shards)

    @rule(items_per_shard=st.one_of(st.none(), st.integers(1, 4)), mmap=st.booleans(), verify=st.booleans(),
          same_path=st.booleans())
    def save_and_load(self, items_per_shard, mmap, verify, same_path):
        if same_path and self.last_path is not None:
            path = self.last_path  # overwrite: possibly the directory this (memory-mapped) store was loaded from
        else:
            self.saves += 1
            path = self.last_path = os.path.join(self.root, f"store-{self.saves}")
        self.store.save(path, items_per_shard=items_per_shard)
        self.store = FeatureStore.load(path, mmap=mmap, verify=verify)
        assert self.store.dim == self.dim and self.store.dtype == self.dtype
        if items_per_shard is None:  # the current shards, without removed rows (empty shards dropped)
            self.shards = [shard for shard in self.shards if shard]
        else:  # by id range: sorted ids, items_per_shard per file
            ids = sorted(self.model)
            self.shards = [ids[start:start + items_per_shard] for start in range(0, len(ids), items_per_shard)]

    # --------------------------------------------------------------- invariants
    @invariant()
    def observables_match_the_model(self):
        store, model = self.store, self.model
        if store is None:
            return
        ids = sorted(model)
        assert store.count == len(store) == len(ids)
        got_ids = store.ids()
        assert got_ids.dtype == np.int64 and got_ids.tolist() == ids
        lengths = {item: tokens.shape[0] for item, tokens in model.items()}
        assert store.total_tokens == sum(lengths.values())
        assert store.max_length == max(lengths.values(), default=0)
        assert store.num_shards == len(self.shards)
        assert [sorted(shard.ids[shard_live].tolist()) for shard, shard_live in self._live_shards()] == [
            sorted(shard) for shard in self.shards]
        probe = ids + [i for i in (0, 1, 7, 29, 2**31, 2**63 - 1) if i not in model]
        contains = store.contains(probe)
        assert contains.dtype == np.bool_ and contains.tolist() == [i in model for i in probe]
        assert store.lengths(ids).tolist() == [lengths[i] for i in ids]
        self._check_gather(ids)
        if len(ids) > 2:  # an arbitrary order with repeats
            self._check_gather([ids[-1], ids[0], ids[-1], ids[len(ids) // 2]])
        self._check_gather([])
        self._check_packed_view(ids)
        absent = next(i for i in range(2**40, 2**40 + 100) if i not in model)
        with pytest.raises(KeyError, match=str(absent)):
            store.gather(ids[:1] + [absent])
        with pytest.raises(KeyError, match=str(absent)):
            store.lengths([absent])

    def _live_shards(self):
        layout = self.store._layout  # shard membership: the layout the docs describe (append adds a shard)
        for number, shard in enumerate(layout.shards):
            yield shard, layout.live[layout.row_start[number]:layout.row_start[number + 1]]

    def _check_gather(self, ids):
        store, model = self.store, self.model
        lengths = [model[i].shape[0] for i in ids]
        width = max(lengths, default=0)
        tokens, got_lengths = store.gather(ids)
        assert tokens.dtype == self.dtype and tokens.shape == (len(ids), width, self.dim)
        assert got_lengths.dtype == torch.int64 and got_lengths.tolist() == lengths
        for row, item in enumerate(ids):
            assert torch.equal(tokens[row, :lengths[row]], model[item]), (item, tokens[row], model[item])
            assert not tokens[row, lengths[row]:].any(), "padding must be zeros"
        wide, wide_lengths = store.gather(ids, pad_to=width + 2, dtype=torch.float32)
        assert wide.dtype == torch.float32 and wide.shape == (len(ids), width + 2, self.dim)
        assert torch.equal(wide[:, :width], tokens.float()) and not wide[:, width:].any()
        assert wide_lengths.tolist() == lengths
        packed, cu_seqlens = store.gather(torch.tensor(ids, dtype=torch.int64), packed=True)
        assert packed.dtype == self.dtype and cu_seqlens.dtype == torch.int64
        assert cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).tolist()
        expected = torch.cat([model[i] for i in ids]) if ids else torch.zeros(0, self.dim, dtype=self.dtype)
        assert packed.shape == expected.shape and torch.equal(packed, expected)
        for result in (tokens, wide, packed, got_lengths, cu_seqlens):  # gathered copies are the caller's to reuse
            result.fill_(-1)
        if width:
            with pytest.raises(ValueError, match="shorter than the longest"):
                store.gather(ids, pad_to=width - 1)
        with pytest.raises(ValueError, match="pad_to"):
            store.gather(ids, packed=True, pad_to=width)

    def _check_packed_view(self, ids):
        store, model = self.store, self.model
        view = store.packed_view()
        if store.num_shards != 1:
            assert view is None
            return
        tokens, cu_seqlens = view
        assert tokens.dtype == self.dtype and cu_seqlens.dtype == torch.int64 and int(cu_seqlens[0]) == 0
        assert int(cu_seqlens[-1]) == tokens.shape[0]
        rows = store.rows(ids)
        assert rows.dtype == torch.int64 and len(set(rows.tolist())) == len(ids)
        for item, row in zip(ids, rows.tolist()):
            assert torch.equal(tokens[cu_seqlens[row]:cu_seqlens[row + 1]], model[item])


def test_feature_store_machine():
    run_state_machine_as_test(FeatureStoreMachine, settings=DEFAULT_MACHINE)


@pytest.mark.slow
def test_feature_store_machine_thorough():
    run_state_machine_as_test(FeatureStoreMachine, settings=THOROUGH_MACHINE)


# ================================================================================================ StudentIndex
def _grid(rng, shape, scale=4, limit=4):
    """Multiples of 1/scale in [-limit/scale, limit/scale]: fp32 products and sums of them are exact, ties frequent."""
    return (rng.integers(-limit, limit + 1, shape) / scale).astype(np.float32)


def grid_queries(model, dim, seed, nq):
    """``nq`` grid queries of a kNN state machine; every other one a gallery vector of ``model`` (id -> vector):
    exact ties and perfect matches."""
    ids = sorted(model)
    rng = np.random.default_rng(seed)
    queries = _grid(rng, (nq, dim))
    if ids and nq:
        queries[::2] = np.stack([model[ids[j]] for j in rng.integers(0, len(ids), len(queries[::2]))])
    return queries


def _prepared(vectors: np.ndarray, metric: str) -> np.ndarray:
    """What the index stores / searches with: cosine normalises (as documented), ip and l2 keep the vectors."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if metric == "cosine":
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def _brute_force_scores(queries: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    """"Higher is better" scores [Nq, Ng] in float64: inner products, or negative squared L2 distances."""
    q, g = _prepared(queries, metric).astype(np.float64), _prepared(gallery, metric).astype(np.float64)
    if metric == "l2":
        return -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    return q @ g.T


class StudentIndexMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = tempfile.mkdtemp(prefix="aladin-index-props-")
        self.saves = 0
        self.last_path = None
        self.index = None
        self.model = {}  # id -> float32 vector [dim] as given to add()

    def teardown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    @initialize(dim=st.sampled_from([1, 4, 8]), metric=st.sampled_from(["ip", "l2", "cosine"]))
    def create(self, dim, metric):
        self.dim, self.metric = dim, metric
        self.index = StudentIndex(dim, "flat", metric, device="cpu")
        assert self.index.factory_string == "Flat" and self.index.supports_remove

    def _snapshot(self):
        return self.index.ntotal, sorted(self.index.ids().tolist())

    @rule(drawn=st.lists(IDS, max_size=6), seed=st.integers(0, 2**32 - 1), copies=st.booleans(),
          kind=st.sampled_from(["torch-float32", "torch-float64", "numpy-float32", "numpy-float64"]))
    def add(self, drawn, seed, copies, kind):
        ids = [i for i in dict.fromkeys(drawn) if i not in self.model]
        rng = np.random.default_rng(seed)
        vectors = _grid(rng, (len(ids), self.dim))
        if copies and len(ids) > 1:  # duplicate vectors under different ids: tied scores
            vectors[1:] = vectors[0]
        self.index.add(_as_input(vectors.astype(np.float64), kind), np.array(ids, dtype=np.int64))
        self.model.update(zip(ids, vectors))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def add_rejected(self, data):
        present = data.draw(st.sampled_from(sorted(self.model)))
        fresh = next(i for i in range(10**6, 10**6 + 100) if i not in self.model)
        cases = {
            "present id": ([fresh, present], np.zeros((2, self.dim), np.float32), "already in the index"),
            "repeat in batch": ([fresh, fresh], np.zeros((2, self.dim), np.float32), "unique"),
            "wrong dim": ([fresh], np.zeros((1, self.dim + 1), np.float32), "embeddings must have shape"),
            "ids count": ([fresh], np.zeros((2, self.dim), np.float32), r"ids must have shape \[2\]"),
            "negative id": ([-1], np.zeros((1, self.dim), np.float32), "non-negative"),
        }
        name = data.draw(st.sampled_from(sorted(cases)))
        ids, vectors, message = cases[name]
        before = self._snapshot()
        with pytest.raises(ValueError, match=message):
            self.index.add(vectors, ids)
        assert self._snapshot() == before

    @rule(data=st.data(), absent=st.lists(IDS, max_size=3))
    def remove(self, data, absent):
        present = data.draw(st.lists(st.sampled_from(sorted(self.model)), max_size=4)) if self.model else []
        absent = [i for i in absent if i not in self.model]
        request = data.draw(st.permutations(present + absent + present[:1]))
        assert self.index.remove(torch.tensor(request, dtype=torch.int64)) == len(set(present))
        for item in set(present):
            del self.model[item]

    @rule(same_path=st.booleans(), verify=st.booleans())
    def save_and_load(self, same_path, verify):
        if not (same_path and self.last_path):
            self.saves += 1
            self.last_path = os.path.join(self.root, f"index-{self.saves}")
        self.index.save(self.last_path)
        self.index = StudentIndex.load(self.last_path, device="cpu", verify=verify)
        assert (self.index.dim, self.index.metric, self.index.index_type) == (self.dim, self.metric, "flat")

    @invariant()
    def matches_brute_force(self):
        index, model = self.index, self.model
        if index is None:
            return
        ids = sorted(model)
        assert index.ntotal == len(index) == len(ids)
        assert sorted(index.ids().tolist()) == ids
        if ids:
            stored = index.reconstruct(ids)
            expected = _prepared(np.stack([model[i] for i in ids]), self.metric)
            np.testing.assert_allclose(stored, expected, rtol=0, atol=1e-6)

    @rule(seed=st.integers(0, 2**32 - 1), nq=st.integers(0, 25), extra_k=st.integers(-3, 3),
          batch_size=st.integers(1, 30))
    def search(self, seed, nq, extra_k, batch_size):
        ids = sorted(self.model)
        queries = grid_queries(self.model, self.dim, seed, nq)
        k = max(1, len(ids) + extra_k)
        scores, found = self.index.search(torch.from_numpy(queries), k)
        assert scores.dtype == torch.float32 and found.dtype == torch.int64
        assert scores.shape == found.shape == (nq, k)
        batched = self.index.search(queries, k, batch_size=batch_size)
        assert torch.equal(batched[0], scores) and torch.equal(batched[1], found)
        hits = min(k, len(ids))
        assert (found[:, hits:] == -1).all() and (scores[:, hits:] == float("-inf")).all()
        if not hits or not nq:
            return
        gallery = np.stack([self.model[i] for i in ids])
        truth = _brute_force_scores(queries, gallery, self.metric)
        column = {item: j for j, item in enumerate(ids)}
        atol = 1e-5 if self.metric == "cosine" else 0.0  # ip / l2 on grid values are exact in fp32
        for q in range(nq):
            row = found[q, :hits].tolist()
            assert len(set(row)) == hits and all(item in column for item in row), row
            got = scores[q, :hits].double().numpy()
            assert (np.diff(got) <= atol).all(), got  # best first
            own = truth[q, [column[item] for item in row]]  # each hit's true score
            np.testing.assert_allclose(got, own, rtol=0, atol=atol)
            best = np.sort(truth[q])[::-1][:hits]  # the multiset of the true top-k (ties: any of them)
            np.testing.assert_allclose(got, best, rtol=0, atol=atol)


def test_student_index_machine(single_threaded_faiss):
    run_state_machine_as_test(StudentIndexMachine, settings=DEFAULT_MACHINE)


@pytest.mark.slow
def test_student_index_machine_thorough(single_threaded_faiss):
    run_state_machine_as_test(StudentIndexMachine, settings=THOROUGH_MACHINE)


# ================================================================================================ Retriever
AGGREGATIONS = ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean")


@st.composite
def retrieval_problems(draw):
    """A gallery built through Retriever.add in batches, some removals, maybe compact / save + load; queries."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dim, embed = draw(st.sampled_from([1, 4, 8])), draw(st.sampled_from([1, 3]))
    count = draw(st.integers(1, 10))
    pad = draw(st.integers(1, 4))
    return dict(
        direction=draw(st.sampled_from(["text_to_image", "image_to_text"])),
        dtype=draw(st.sampled_from(sorted(STORE_DTYPES))),
        aggregation=draw(st.sampled_from(AGGREGATIONS)),
        padding=draw(st.sampled_from(["neg_inf", "zero"])),
        zero_copy=draw(st.booleans()),
        dim=dim, embed=embed, count=count,
        # tokens and embeddings on a grid (multiples of 1/8): every kernel's fp32 sums are exact, ties are frequent
        tokens=_grid(rng, (count, pad, dim), scale=8, limit=16),
        lengths=np.array(draw(st.lists(st.integers(0, pad), min_size=count, max_size=count)), dtype=np.int64),
        embeddings=_grid(rng, (count, embed), scale=2, limit=2),
        ids=draw(st.lists(st.integers(0, 10**6), min_size=count, max_size=count, unique=True)),
        batches=draw(st.integers(1, 3)),
        removed=draw(st.lists(st.integers(0, count - 1), max_size=count, unique=True)),  # maybe all of them
        compact=draw(st.booleans()),
        reload=draw(st.booleans()),
        nq=(nq := draw(st.integers(0, 4))),
        query_tokens=_grid(rng, (nq, draw(st.integers(0, 4)), dim), scale=8, limit=16),
        query_lengths=rng.integers(0, 5, nq),
        query_embeddings=_grid(rng, (nq, embed), scale=2, limit=2),
        k=draw(st.integers(1, count + 2)),
        rerank_extra=draw(st.integers(0, 3)),
        full_shortlist=draw(st.booleans()),
        chunk=draw(st.integers(1, 4)),
    )


def fill_retriever(retriever, problem) -> torch.Tensor:
    """Add the problem's items in its batches, then remove its removed ones; returns the ids [count]."""
    ids = torch.tensor(problem["ids"], dtype=torch.int64)
    for part in np.array_split(np.arange(problem["count"]), problem["batches"]):
        if part.size:
            retriever.add(ids[part], torch.from_numpy(problem["embeddings"][part]),
                          torch.from_numpy(problem["tokens"][part]), torch.from_numpy(problem["lengths"][part]))
    if problem["removed"]:
        assert retriever.remove(ids[problem["removed"]]) == len(problem["removed"])
    return ids


def _build_retriever(problem, tmp):
    scorer = TeacherScorer(aggregation=problem["aggregation"], padding=problem["padding"])
    index = StudentIndex(problem["embed"], device="cpu")
    store = FeatureStore(problem["dim"], problem["dtype"])
    retriever = Retriever(index, store, scorer, direction=problem["direction"], zero_copy=problem["zero_copy"])
    fill_retriever(retriever, problem)
    # an add the store rejects (tokens of the wrong size) changes neither the index nor the store
    before = sorted(index.ids().tolist()), store.ids().tolist()
    fresh = torch.tensor([10**6 + 1])
    with pytest.raises(ValueError, match="tokens must be padded"):
        retriever.add(fresh, torch.zeros(1, problem["embed"]), torch.zeros(1, 1, problem["dim"] + 1))
    assert (sorted(index.ids().tolist()), store.ids().tolist()) == before
    if problem["compact"]:
        store.compact()
    if problem["reload"]:
        path = os.path.join(tmp, "retriever")
        retriever.save(path)
        retriever = Retriever.load(path, device="cpu")
        retriever.zero_copy = problem["zero_copy"]
    return retriever


def _teacher_oracle(retriever, problem, gallery_ids):
    """Exhaustive teacher scores and word -> region argmax [Nq, Ng] of every query with every live gallery item,
    from :func:`aladin_fast.alignment_scores` (gallery padded to the store's pad width, as the search pads it:
    the widest batch appended, which removals do not shrink). The argmax keeps ``max_length`` word columns
    (the explanations' width; further columns are padding, -1)."""
    store, scorer = retriever.feature_store, retriever.scorer
    gallery, gallery_lengths = store.gather(gallery_ids, pad_to=store.pad_width)
    queries = torch.from_numpy(problem["query_tokens"]).to(store.dtype)
    query_lengths = torch.from_numpy(problem["query_lengths"]).clamp(max=queries.shape[1])
    options = dict(aggregation=scorer.aggregation, padding=scorer.padding, return_argmax=True)
    if problem["direction"] == "text_to_image":
        scores, argmax = aladin_fast.alignment_scores(queries, gallery, query_lengths, gallery_lengths, **options)
        return scores, argmax
    scores, argmax = aladin_fast.alignment_scores(gallery, queries, gallery_lengths, query_lengths, **options)
    assert (argmax[:, :, store.max_length:] == -1).all()
    return scores.T, argmax.transpose(0, 1)[:, :, :store.max_length]


def _check_two_stage_search(problem, tmp):
    retriever = _build_retriever(problem, tmp)
    store = retriever.feature_store
    gallery_ids = torch.from_numpy(store.ids())
    count, nq = gallery_ids.numel(), problem["nq"]
    event(f"{problem['direction']}, {'in-place' if retriever._in_place_view(torch.device('cpu'), torch.zeros(0, dtype=torch.int64)) else 'gathered'}")
    k = problem["k"]
    rerank_k = max(k, count if problem["full_shortlist"] else 1) + problem["rerank_extra"]
    query_tokens = torch.from_numpy(problem["query_tokens"])
    query_lengths = torch.from_numpy(problem["query_lengths"]).clamp(max=query_tokens.shape[1])
    query_embeddings = torch.from_numpy(problem["query_embeddings"])
    found, scores, alignments = retriever.search(query_embeddings, query_tokens, query_lengths, k=k,
                                                 rerank_k=rerank_k, return_explanations=True)
    width = query_tokens.shape[1] if problem["direction"] == "text_to_image" else store.max_length
    assert found.shape == scores.shape == (nq, k) and alignments.shape == (nq, k, width)
    assert found.dtype == torch.int64 and scores.dtype == torch.float32 and alignments.dtype == torch.int32
    if not nq:
        return
    shortlist = min(rerank_k, count)
    hits = min(k, shortlist)
    assert (found[:, hits:] == -1).all() and (scores[:, hits:] == float("-inf")).all()
    assert (alignments[:, hits:] == -1).all()
    if not shortlist:  # the whole gallery was removed
        ex_ids, ex_scores = retriever.search_exhaustive(query_tokens, query_lengths, k=k, chunk=problem["chunk"])
        assert (ex_ids == -1).all() and (ex_scores == float("-inf")).all()
        return
    teacher, argmax = _teacher_oracle(retriever, problem, gallery_ids)
    column = {int(item): j for j, item in enumerate(gallery_ids)}
    # the documented ranking: the student's shortlist (in its order), stably sorted by teacher score
    _, student = retriever.student_index.search(query_embeddings, shortlist)
    for q in range(nq):
        candidates = student[q].tolist()
        assert -1 not in candidates  # an exact index finds the whole shortlist
        columns = [column[item] for item in candidates]
        order = torch.sort(teacher[q, columns], descending=True, stable=True).indices[:hits]
        expected_ids = [candidates[j] for j in order.tolist()]
        assert found[q, :hits].tolist() == expected_ids, (q, found[q], expected_ids, teacher[q, columns])
        assert torch.equal(scores[q, :hits], teacher[q, columns][order])
        for j, item in enumerate(expected_ids):
            winners = argmax[q, column[item]]
            assert torch.equal(alignments[q, j, :winners.shape[0]], winners)
            assert (alignments[q, j, winners.shape[0]:] == -1).all()
        if shortlist == count:  # the whole gallery: the exhaustive teacher ranking, ties in the student order
            assert torch.equal(torch.sort(scores[q, :hits], descending=True).values,
                               torch.sort(teacher[q], descending=True).values[:hits])
    # the baseline that scores every item in chunks: the same top-k scores, whatever the chunk size
    ex_ids, ex_scores = retriever.search_exhaustive(query_tokens, query_lengths, k=k, chunk=problem["chunk"])
    hits = min(k, count)
    best = torch.sort(teacher, dim=1, descending=True).values[:, :hits]
    assert torch.equal(ex_scores[:, :hits], best), (ex_scores, best)
    assert (ex_ids[:, hits:] == -1).all() and (ex_scores[:, hits:] == float("-inf")).all()
    for q in range(nq):
        assert torch.equal(teacher[q, [column[int(item)] for item in ex_ids[q, :hits]]], ex_scores[q, :hits])


@DEFAULT
@given(problem=retrieval_problems())
def test_two_stage_search_equals_the_teacher_ranking(problem, tmp_path_factory, single_threaded_faiss):
    _check_two_stage_search(problem, str(tmp_path_factory.mktemp("retriever")))


@pytest.mark.slow
@THOROUGH
@given(problem=retrieval_problems())
def test_two_stage_search_equals_the_teacher_ranking_thorough(problem, tmp_path_factory, single_threaded_faiss):
    _check_two_stage_search(problem, str(tmp_path_factory.mktemp("retriever")))


# ================================================================================================ from_tokens
@DEFAULT
@given(lengths=st.lists(st.integers(0, 4), max_size=5), extra_pad=st.integers(0, 2), packed=st.booleans(),
       kind=st.sampled_from(INPUT_KINDS), dtype=st.sampled_from([None, *sorted(STORE_DTYPES)]),
       seed=st.integers(0, 2**32 - 1))
def test_from_tokens_is_a_store_with_one_append(lengths, extra_pad, packed, kind, dtype, seed):
    """``from_tokens``: "arguments as in append; dtype defaults to the tokens' dtype" (float64 -> float32)."""
    rng = np.random.default_rng(seed)
    ids = list(range(100, 100 + len(lengths)))
    if packed:
        cu = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        tokens, lengths_arg, cu_arg = _as_input(rng.standard_normal((int(cu[-1]), 3)), kind), None, cu
    else:
        pad = max(lengths, default=0) + extra_pad
        tokens, lengths_arg, cu_arg = _as_input(rng.standard_normal((len(ids), pad, 3)), kind), lengths, None
    store = FeatureStore.from_tokens(ids, tokens, lengths_arg, cu_seqlens=cu_arg, dtype=dtype)
    default = str(tokens.dtype).replace("torch.", "")
    name = dtype or (default if default in STORE_DTYPES else "float32")
    reference = FeatureStore(3, name)
    reference.append(ids, tokens, lengths_arg, cu_seqlens=cu_arg)
    assert store.dim == 3 and store.dtype_name == name and store.ids().tolist() == ids
    for a, b in zip(store.gather(ids, packed=True), reference.gather(ids, packed=True)):
        assert torch.equal(a, b)


# ================================================================================================ regressions
def test_regression_packed_append_copies_the_callers_tokens():
    """Found by FeatureStoreMachine: append(..., cu_seqlens=...) of tokens already in the store dtype kept a
    view of the caller's tensor / array, so refilling the caller's buffer rewrote the stored items (the padded
    path always copied)."""
    store = FeatureStore(2, "float16")
    tokens = torch.full((3, 2), 0.5, dtype=torch.float16)
    store.append([0], tokens, cu_seqlens=[0, 3])
    tokens.fill_(float("nan"))
    assert torch.equal(store.gather([0], packed=True)[0], torch.full((3, 2), 0.5, dtype=torch.float16))
    array = np.ones((2, 2), np.float32)
    store32 = FeatureStore(2)
    store32.append([1], array, cu_seqlens=[0, 2])
    array[:] = 7
    assert torch.equal(store32.gather([1], packed=True)[0], torch.ones(2, 2))


def test_regression_search_exhaustive_with_zero_padding_does_not_depend_on_chunk():
    """Found by test_two_stage_search_equals_the_teacher_ranking: with padding="zero" search_exhaustive padded
    each chunk to its own longest item, so an item's score depended on which items shared its chunk (zero mode
    lets the padding value 0 win a max when an item is shorter than the pad) and disagreed with search()."""
    regions = torch.tensor([[[1.5], [0.625]], [[1.0], [0.0]]])  # item 7: 2 regions, item 9: 1 region
    store = FeatureStore(1)
    store.append([7, 9], regions, torch.tensor([2, 1]))
    index = StudentIndex(1, device="cpu")
    index.add(torch.tensor([[1.0], [0.5]]), [7, 9])
    retriever = Retriever(index, store, TeacherScorer(padding="zero"))
    words = torch.tensor([[[-0.375]]])
    found, scores = retriever.search(torch.ones(1, 1), words, k=2, rerank_k=2)
    # item 9 is padded to the store's longest item (2 regions): max(-0.375, 0) = 0 beats item 7's -0.234375
    assert found.tolist() == [[9, 7]] and scores.tolist() == [[0.0, -0.234375]]
    for chunk in (1, 2):
        ex_ids, ex_scores = retriever.search_exhaustive(words, k=2, chunk=chunk)
        assert ex_ids.tolist() == [[9, 7]] and ex_scores.tolist() == [[0.0, -0.234375]], chunk


def test_regression_from_tokens_accepts_numpy_like_append():
    """Found by test_from_tokens_is_a_store_with_one_append: from_tokens raised TypeError for numpy tokens
    although its arguments are "as in append", which takes torch or numpy."""
    tokens = np.arange(12, dtype=np.float16).reshape(2, 3, 2)
    store = FeatureStore.from_tokens([4, 5], tokens, [3, 1])
    assert store.dtype == torch.float16 and store.lengths([4, 5]).tolist() == [3, 1]
    assert torch.equal(store.gather([5])[0], torch.from_numpy(tokens[1:, :1]))


def test_regression_a_remove_the_index_half_applies_keeps_the_store_in_step():
    """An index whose remove() drops some ids and then fails (a cluster delete that times out midway): the
    Retriever removes from its store exactly what the index no longer holds, re-raises, and a retry finishes."""

    class HalfFailingIndex(StudentIndex):
        fail = True

        def remove(self, ids):
            if self.fail:
                self.fail = False
                super().remove(np.asarray(ids)[: len(ids) // 2])
                raise TimeoutError("delete timed out")
            return super().remove(ids)

    index, store = HalfFailingIndex(2, device="cpu"), FeatureStore(1)
    retriever = Retriever(index, store)
    retriever.add(np.arange(6), np.eye(6, 2, dtype=np.float32) + 0.5, torch.ones(6, 1, 1))
    with pytest.raises(TimeoutError, match="delete timed out"):
        retriever.remove([1, 3, 4, 5])
    assert sorted(index.ids().tolist()) == store.ids().tolist() == [0, 2, 4, 5]
    assert retriever.remove([1, 3, 4, 5]) == 2
    assert sorted(index.ids().tolist()) == store.ids().tolist() == [0, 2]


def test_regression_append_takes_read_only_byte_swapped_and_flipped_numpy(recwarn):
    """np.load(mmap_mode="r") gives read-only arrays: append warned (torch "not writable"); byte-swapped or
    flipped arrays were refused by torch.from_numpy. All store the same tokens as a plain array, silently."""
    tokens = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 7
    lengths = np.array([3, 2])
    expected = FeatureStore(4)
    expected.append([5, 9], torch.from_numpy(tokens.copy()), torch.from_numpy(lengths))
    read_only = tokens.copy()
    read_only.setflags(write=False)
    swapped = tokens.astype(tokens.dtype.newbyteorder(">"))
    flipped = np.ascontiguousarray(tokens[::-1])[::-1]
    for variant in (read_only, swapped, flipped):
        store = FeatureStore(4)
        store.append([5, 9], variant, lengths)
        for got, want in zip(store.gather([5, 9]), expected.gather([5, 9])):
            assert torch.equal(got, want)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_regression_zero_padding_scores_do_not_change_when_another_item_is_removed(tmp_path):
    """padding="zero" scores depend on the pad width (a padded region scores 0 and can win a max). The retriever
    padded to the longest *live* item, so removing the longest image changed every other image's score, and a
    store of [N, R, D] features scored unlike the teacher on them (padded to R) when no image had R regions.
    It now pads to FeatureStore.pad_width: the widest batch appended, which removals do not shrink; saved too."""
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=generator).abs(), dim=-1)
    image_lengths = torch.tensor([5, 3, 2, 4])  # none uses all 6 padded regions
    # every similarity negative: wherever a padded region exists its 0 wins the max, so the pad width shows
    query = -torch.nn.functional.normalize(torch.randn(1, 3, 8, generator=generator).abs(), dim=-1)
    expected = aladin_fast.alignment_scores(query, images, None, image_lengths, padding="zero")[0]  # padded to 6
    assert (expected == 0).all()
    index = StudentIndex(2, device="cpu")
    store = FeatureStore(8)
    retriever = Retriever(index, store, TeacherScorer(padding="zero"))
    retriever.add(np.arange(4), np.eye(4, 2, dtype=np.float32) + 0.5, images, image_lengths)
    assert store.pad_width == 6 and store.max_length == 5

    def scores_of(ids):
        found, scores = retriever.search(np.ones((1, 2), np.float32), query, k=len(ids), rerank_k=len(ids))
        return dict(zip(found[0].tolist(), scores[0].tolist()))

    before = scores_of([0, 1, 2, 3])
    assert before == pytest.approx({i: float(expected[i]) for i in range(4)}, abs=1e-6)
    exhaustive = retriever.search_exhaustive(query, k=4)
    assert dict(zip(exhaustive[0][0].tolist(), exhaustive[1][0].tolist())) == pytest.approx(before, abs=1e-6)
    retriever.remove([0])  # the longest image
    assert store.max_length == 4 and store.pad_width == 6
    assert scores_of([1, 2, 3]) == pytest.approx({i: before[i] for i in (1, 2, 3)}, abs=1e-6)
    path = str(tmp_path / "retriever")
    retriever.save(path)
    loaded = Retriever.load(path, device="cpu")
    assert loaded.feature_store.pad_width == 6
    found, scores = loaded.search(np.ones((1, 2), np.float32), query, k=3, rerank_k=3)
    assert dict(zip(found[0].tolist(), scores[0].tolist())) == pytest.approx({i: before[i] for i in (1, 2, 3)}, abs=1e-6)


def test_pad_width_of_packed_appends_and_old_saves(tmp_path):
    store = FeatureStore(2)
    store.append([1, 2], torch.ones(5, 2), cu_seqlens=torch.tensor([0, 2, 5]))
    assert store.pad_width == store.max_length == 3
    store.append([3], torch.ones(1, 7, 2), torch.tensor([1]))
    assert (store.pad_width, store.max_length) == (7, 3)
    store.compact()
    assert store.pad_width == 7
    path = str(tmp_path / "store")
    store.save(path)
    assert FeatureStore.load(path).pad_width == 7
    # a store saved before pad_width existed: its longest item, as it padded then
    import json

    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as handle:
        document = json.load(handle)
    del document["meta"]["pad_width"]
    from aladin_fast.retrieval.manifest import _manifest_digest

    document["manifest_sha256"] = _manifest_digest(document)
    with open(manifest_path, "w") as handle:
        json.dump(document, handle)
    assert FeatureStore.load(path).pad_width == 3
