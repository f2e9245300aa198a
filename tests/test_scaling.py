"""Scaling tests: how the cost of retrieval, evaluation and data operations grows with the gallery size N.

Measured on N = 1e3 .. 1e5 gallery items (D = 32, 4 tokens each; eval on up to 5,000 x 25,000 scores). Defects
found and fixed, each with a regression test below that fails on the old code:

1. ``FeatureStore.append`` rebuilt the whole layout from every shard (a Python pass over the S shards calling
   ``np.diff`` on each, then an argsort of all N ids): S appends of one item cost O(S^2) Python steps plus
   O(S N log N) -- 1,000 single appends took 4 s, 3,000 took 46 s. ``remove`` did the same per call. Both now
   derive the new snapshot from the old tables (vectorised O(N) copies, no sort, no pass over the shards):
   3,000 single appends 0.9 s, 1,000 single removals from 1e5 items 2.1 s -> 0.6 s.
2. ``FeatureStore._gather_numpy`` (``gather``, ``compact``, re-sharding ``save``) grouped the tokens of a
   multi-shard request with one full-length comparison per shard: O(shards x tokens). One sort now
   (``compact`` of 10,000 shards: 2.6 s -> 0.29 s).
3. ``FeatureStore.save`` of a store with removed rows (and ``save(items_per_shard=...)``) gathered each shard's
   live rows into one in-memory copy before writing it: a save needed RAM for the whole live gallery, even
   memory-mapped. The rows are gathered and written in blocks of ``WRITE_BLOCK_BYTES`` now, byte for byte the
   file ``np.save`` wrote (3e5 items, 146 MB of tokens: peak 114 MB -> 22 MB).
4. ``StudentIndex.add`` copied the faiss id map and ran ``np.intersect1d`` (hash + sort of all N ids) on every
   call, and ``contains`` an ``np.isin`` against a fresh copy: 1,000 single adds to a flat index of 1e5 items
   took 34 s. A sorted id table is kept now (updated by add/remove, rebuilt when stale): 0.17 s; 1,000 single
   ``Retriever.add`` calls on 1e5 items (store and index) 86 s -> 1.8 s.
5. ``StudentIndex.remove`` on IVF indexes renumbered every inverted list through copies of its ids and codes
   written back with ``update_entries``: ~8x faiss's own ``remove_ids`` (49 ms per single removal at 1e5 items).
   In-memory lists are now shifted in place (21 ms).
6. ``StudentIndex`` snapshots for ``save`` used ``faiss.serialize_index``: a growing byte vector and a numpy copy of
   it, 2x the index in RSS (documented as "about its size"). ``faiss.clone_index`` (1x, same file bytes) now, and
   the clone is streamed to the file.
7. ``retrieval_ranks`` / ``retrieval_metrics`` / ``coco_1k`` counted NaN with ``torch.isnan(scores).sum()``, which
   built a bool and an int64 copy of the whole matrix (2.25x a float32 matrix: 1.08 GB extra for the 477 MB
   COCO 5K matrix), and ``nan="worst"`` made a full ``nan_to_num`` copy. NaN is now counted and replaced chunk by
   chunk (85 MB extra).
8. ``MilvusStudentIndex.ids`` listed the collection in query-iterator batches of 4,096; every batch is one server
   query whose cost grows with the collection (milvus-lite: ~1 s per query at 50,000 rows), so listing cost
   O(N^2 / 4096): 15 s for 50,000 ids. Id-only scans use Milvus's largest batch (16,384) now: 7 s.
9. ``save_precomp(layout="tokens")`` built the packed copy of all valid regions (and words) before writing, and
   the caption writer joined every caption into one string: both are streamed now (same bytes).

Measured fine (no change): ``FeatureStore.load`` memory-maps the token files and reads only offsets and ids
(7.7 MB for 1e5 items, none of the 51 MB of tokens); ``packed_view`` is O(1) after the first call; bulk
append / remove / compact are single vectorised passes; ``PrecompDataset`` memory-maps every ``.npy``;
``full_scores(topk=...)`` holds one ``[chunk, image_chunk]`` block (14 MB -> 19 MB from 5,000 to 50,000 captions);
Milvus bulk add / remove are linear; ``Retriever.search`` / ``search`` of every index kind grow as the index
itself does.
"""
from __future__ import annotations

import io
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch

from aladin_fast import eval as evaluation
from aladin_fast.data import precomp
from aladin_fast.retrieval import feature_store as feature_store_module
from aladin_fast.retrieval.feature_store import FeatureStore

DIM = 32


def _profile_events(function) -> int:
    """Python and C function calls made by ``function()`` (this thread): a deterministic measure of its work in
    Python, independent of the machine's speed."""
    count = 0

    def profiler(frame, event, arg):
        nonlocal count
        if event in ("call", "c_call"):
            count += 1

    sys.setprofile(profiler)
    try:
        function()
    finally:
        sys.setprofile(None)
    return count


def _store_of_shards(shards: int, items_per_shard: int = 1, tokens: int = 4, dim: int = DIM) -> FeatureStore:
    """A store of ``shards`` in-memory shards, built in one layout (as a load of that many shard files is)."""
    rng = np.random.default_rng(0)
    store = FeatureStore(dim)
    parts = []
    for number in range(shards):
        ids = np.arange(number * items_per_shard, (number + 1) * items_per_shard, dtype=np.int64)
        parts.append(feature_store_module._Shard(
            rng.standard_normal((ids.size * tokens, dim), dtype=np.float32),
            np.arange(ids.size + 1, dtype=np.int64) * tokens, ids))
    store._layout = feature_store_module._make_layout(parts)
    return store


@pytest.fixture
def rss_peak():
    """``measure(function) -> bytes``: the process's peak resident memory above its size before the call (Linux
    only: torch allocations are invisible to tracemalloc)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")

    def status(field: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/self/status")

    def measure(function) -> int:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM := VmRSS
        before = status("VmRSS")
        function()
        return status("VmHWM") - before

    return measure


def _traced_peak(function) -> int:
    """Peak bytes allocated through Python / numpy while ``function()`` runs (tracemalloc)."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ===================================================================================================== store
def test_store_append_and_remove_work_does_not_grow_with_the_shard_count():
    """Defect 1: each append / remove rebuilt the layout with a Python pass over every shard."""
    rng = np.random.default_rng(1)
    work = {}
    for shards in (40, 400):
        store = _store_of_shards(shards)
        next_id = shards
        tokens = rng.standard_normal((1, 4, DIM), dtype=np.float32)
        work[shards] = (_profile_events(lambda: store.append([next_id], tokens)),
                        _profile_events(lambda: store.remove([shards // 2])))
        assert store.count == shards and store.num_shards == shards + 1
    for name, small, large in zip(("append", "remove"), work[40], work[400]):
        assert large <= 1.2 * small + 20, (
            f"one {name} costs {small} Python calls with 40 shards but {large} with 400: it walks every shard")


def test_store_single_appends_and_removals_match_one_bulk_build():
    """The incremental layouts of defect 1 are the snapshot a bulk build makes: same ids, rows, tokens, widths."""
    rng = np.random.default_rng(2)
    ids = rng.permutation(60) * 3 + 1
    lengths = rng.integers(0, 6, ids.size)
    tokens = torch.from_numpy(rng.standard_normal((ids.size, 5, DIM), dtype=np.float32))
    one_by_one = FeatureStore(DIM)
    for index in range(ids.size):
        one_by_one.append(ids[index:index + 1], tokens[index:index + 1], lengths[index:index + 1])
    gone = ids[::4]
    for identifier in gone:
        assert one_by_one.remove([identifier, 10 ** 9]) == 1
    bulk = FeatureStore(DIM)
    bulk.append(ids, tokens, lengths)
    bulk.remove(gone)
    rebuilt = feature_store_module._make_layout(one_by_one._layout.shards, one_by_one._layout.live,
                                                pad_width=one_by_one.pad_width)
    for field in ("row_start", "starts", "lengths", "ids", "live", "sorted_ids", "sorted_rows"):
        assert np.array_equal(getattr(one_by_one._layout, field), getattr(rebuilt, field)), field
    assert (one_by_one.max_length, one_by_one.pad_width) == (rebuilt.max_length, rebuilt.pad_width)
    assert np.array_equal(one_by_one.ids(), bulk.ids())
    assert (one_by_one.max_length, one_by_one.pad_width, one_by_one.total_tokens) == (
        bulk.max_length, bulk.pad_width, bulk.total_tokens)
    for packed in (False, True):
        left, right = one_by_one.gather(bulk.ids()[::-1], packed=packed), bulk.gather(bulk.ids()[::-1], packed=packed)
        assert torch.equal(left[0], right[0]) and torch.equal(left[1], right[1])
    with pytest.raises(ValueError, match=r"duplicates: \[2\]"):  # 2 is no id of the store
        one_by_one.append([2, 2], tokens[:2])
    assert np.array_equal(one_by_one.ids(), bulk.ids())


@pytest.mark.slow
def test_store_multi_shard_gather_is_not_shards_times_tokens():
    """Defect 2: gathering from S shards compared every token's shard number with each shard, O(S x tokens).
    A growth-ratio timing test (the work is in numpy, invisible to call counting): 10x the shards (and tokens)
    cost ~10x, not ~100x."""
    seconds = {}
    for shards in (2000, 20000):  # 64 tokens per item: the element work, not the per-shard Python, dominates
        store = _store_of_shards(shards, tokens=64, dim=8)
        store.compact()  # warm-up allocations, then time a fresh store
        store = _store_of_shards(shards, tokens=64, dim=8)
        start = time.perf_counter()
        store.compact()
        seconds[shards] = time.perf_counter() - start
        assert store.num_shards == 1 and store.count == shards
    assert seconds[20000] < 40 * max(seconds[2000], 1e-3), seconds


def test_store_save_writes_removed_rows_in_blocks(tmp_path, monkeypatch):
    """Defect 3: saving a store with removed rows gathered the whole live gallery into memory first."""
    monkeypatch.setattr(feature_store_module, "WRITE_BLOCK_BYTES", 1 << 20, raising=False)
    rng = np.random.default_rng(3)
    count = 40_000  # 40,000 x 4 x 32 float32 = 20 MB of tokens
    store = FeatureStore.from_tokens(np.arange(count), rng.standard_normal((count, 4, DIM), dtype=np.float32))
    store.remove(np.arange(0, count, 10))
    live_bytes = store.total_tokens * DIM * 4
    folders = [tmp_path / name for name in ("kept", "resharded")]
    for folder in folders:
        folder.mkdir()
    peak = _traced_peak(lambda: store.write_payload(str(folders[0])))
    assert peak < 0.25 * live_bytes, f"save held {peak / 2**20:.1f} MB for {live_bytes / 2**20:.1f} MB of live tokens"
    peak = _traced_peak(lambda: store.write_payload(str(folders[1]), items_per_shard=count))
    assert peak < 0.25 * live_bytes, f"re-sharding save held {peak / 2**20:.1f} MB"
    expected = store.gather(store.ids(), packed=True)[0].numpy()
    for folder in folders:  # the bytes np.save writes for the gathered rows
        buffer = io.BytesIO()
        np.save(buffer, expected, allow_pickle=False)
        assert (folder / "tokens-00000.npy").read_bytes() == buffer.getvalue()


# ===================================================================================================== index
def test_student_index_add_does_not_copy_the_id_map_per_call(monkeypatch):
    """Defect 4: every add() copied the faiss id map and intersected it with the new ids (a sort of all N)."""
    faiss = pytest.importorskip("faiss")
    from aladin_fast.retrieval import StudentIndex

    rng = np.random.default_rng(4)
    index = StudentIndex(16, "flat", device="cpu")
    index.add(rng.standard_normal((2000, 16)).astype(np.float32), np.arange(2000))
    copies = []
    original = faiss.vector_to_array
    monkeypatch.setattr(faiss, "vector_to_array", lambda vector: copies.append(1) or original(vector))
    for step in range(30):
        index.add(rng.standard_normal((1, 16)).astype(np.float32), [5000 + step])
        assert index.contains([5000 + step, 10 ** 9]).tolist() == [True, False]
        if step % 10 == 0:
            assert index.remove([step]) == 1
    assert len(copies) <= 1, f"30 single adds copied the whole id map {len(copies)} times"
    with pytest.raises(ValueError, match=r"ids already in the index: \[5000, 5001\]"):
        index.add(rng.standard_normal((3, 16)).astype(np.float32), [5001, 9999, 5000])
    monkeypatch.undo()
    expected = np.setdiff1d(np.concatenate([np.arange(2000), 5000 + np.arange(30)]), [0, 10, 20])
    assert np.array_equal(np.sort(index.ids()), expected) and index.ntotal == expected.size
    assert np.array_equal(index.contains(expected), np.ones(expected.size, bool))


def test_ivf_remove_shifts_in_memory_lists_in_place(monkeypatch):
    """Defect 5: every IVF removal copied each inverted list's ids and codes and wrote them back."""
    faiss = pytest.importorskip("faiss")
    from aladin_fast.retrieval import StudentIndex

    rng = np.random.default_rng(5)
    gallery = rng.standard_normal((3000, 16)).astype(np.float32)
    index = StudentIndex(16, "ivf", metric="l2", device="cpu", nlist=32, nprobe=32)
    index.add(gallery, np.arange(3000))
    writes = []
    original = faiss.InvertedLists.update_entries
    monkeypatch.setattr(faiss.InvertedLists, "update_entries",
                        lambda self, *args: writes.append(1) or original(self, *args))
    gone = rng.permutation(3000)[:40]
    for identifier in gone[:20]:
        assert index.remove([int(identifier)]) == 1
    assert index.remove(gone[20:]) == 20
    assert not writes, f"removals rewrote {len(writes)} inverted lists through update_entries"
    keep = np.setdiff1d(np.arange(3000), gone)
    scores, ids = index.search(gallery[keep], 1)  # nprobe = nlist, l2: exact; each id still names its own vector
    assert np.array_equal(ids[:, 0].numpy(), keep) and bool((scores == 0).all())
    assert not bool(np.isin(index.search(gallery[gone], 1)[1].numpy(), gone).any())


def test_student_index_save_snapshot_is_one_copy_of_the_index(tmp_path, rss_peak):
    """Defect 6: the save snapshot (faiss.serialize_index) peaked at twice the index's size in RSS."""
    faiss = pytest.importorskip("faiss")
    from aladin_fast.retrieval import StudentIndex

    count, dim = 150_000, 64
    index = StudentIndex(dim, "flat", device="cpu")
    index.add(np.random.default_rng(6).standard_normal((count, dim)).astype(np.float32), np.arange(count))
    index_bytes = count * (dim * 4 + 8)
    peak = rss_peak(lambda: index.save(str(tmp_path / "index")))
    assert peak < 1.5 * index_bytes, f"save peaked at {peak / index_bytes:.2f}x the index ({index_bytes / 2**20:.0f} MB)"
    payload = next((tmp_path / "index").glob("payload-*"))
    assert (payload / "index.faiss").read_bytes() == faiss.serialize_index(index._cpu_index).tobytes()


# ====================================================================================================== eval
def test_retrieval_metrics_hold_no_copy_of_the_score_matrix(rss_peak):
    """Defect 7: the NaN count built a bool and an int64 copy of the whole matrix (2.25x a float32 matrix) and
    nan="worst" a full float copy; memory beyond the matrix is now bounded by the ranking chunks."""
    images = 4000
    scores = torch.randn(images, 5 * images)
    matrix_bytes = scores.numel() * scores.element_size()  # 320 MB; the ranking chunks use up to ~150 MB
    reference = evaluation.retrieval_metrics(scores[:1000, :5000])
    with_nan = scores.clone()
    with_nan[0, 0] = float("nan")
    with_nan[3999, 7] = float("nan")
    for name, run in (("retrieval_metrics", lambda: evaluation.retrieval_metrics(scores.numpy())),
                      ("coco_1k", lambda: evaluation.coco_1k(scores)),
                      ("nan='worst'", lambda: evaluation.retrieval_metrics(with_nan, nan="worst")),
                      ("coco_1k nan='worst'", lambda: evaluation.coco_1k(with_nan, nan="worst"))):
        peak = rss_peak(run)
        assert peak < 0.6 * matrix_bytes, f"{name}: {peak / 2**20:.0f} MB beyond a {matrix_bytes / 2**20:.0f} MB matrix"
    assert evaluation.coco_1k(scores[:1000, :5000]) == reference
    # NaN -> -inf, chunk by chunk, is the old whole-matrix replacement
    replaced = torch.nan_to_num(with_nan, nan=float("-inf"))
    assert evaluation.coco_1k(with_nan, nan="worst") == evaluation.coco_1k(replaced)
    for left, right in zip(evaluation.retrieval_ranks(with_nan[:1000, :5000], nan="worst"),
                           evaluation.retrieval_ranks(replaced[:1000, :5000])):
        assert torch.equal(left, right)
    with pytest.raises(ValueError, match="scores contains 2 NaN value"):
        evaluation.retrieval_metrics(with_nan)


# ==================================================================================================== milvus
class _ScanOnlyClient:
    """A stand-in MilvusClient holding ``rows`` ids: enough for MilvusStudentIndex to attach and list them;
    counts the server queries (iterator batches) a listing takes."""

    def __init__(self, rows: int, dim: int):
        self.rows, self.dim, self.queries = rows, dim, 0

    def has_collection(self, name):
        return True

    def describe_collection(self, name):
        return {"fields": [{"name": "id"}, {"name": "vector", "params": {"dim": self.dim}}]}

    def describe_index(self, name, field):
        return {"metric_type": "IP"}

    def load_collection(self, name):
        pass

    def query_iterator(self, name, batch_size, filter, output_fields, **kwargs):
        client, start = self, [0]

        class Iterator:
            def next(self):
                client.queries += 1
                batch = [{"id": value} for value in range(start[0], min(client.rows, start[0] + batch_size))]
                start[0] += len(batch)
                return batch

            def close(self):
                pass

        return Iterator()


def test_milvus_ids_lists_the_collection_in_few_queries():
    """Defect 8: ids() paged through the collection 4,096 ids per server query (each query costs time in the
    collection size on milvus-lite, so listing was quadratic)."""
    pytest.importorskip("pymilvus")
    from aladin_fast.retrieval.milvus import MilvusStudentIndex

    client = _ScanOnlyClient(50_000, 8)
    index = MilvusStudentIndex(8, "http://stand-in:19530", client=client)
    ids = index.ids()
    assert np.array_equal(np.sort(ids), np.arange(50_000))
    assert client.queries <= 5, f"listing 50,000 ids took {client.queries} server queries"


# ====================================================================================================== data
def test_save_precomp_streams_packed_features_and_captions(tmp_path, monkeypatch):
    """Defect 9: the tokens layout built the packed copy of every valid region (and word) before writing, and
    the captions were joined into one string."""
    monkeypatch.setattr(precomp, "WRITE_BLOCK_BYTES", 1 << 20, raising=False)
    rng = np.random.default_rng(9)
    count = 20_000
    features = rng.standard_normal((count, 8, DIM), dtype=np.float32)  # 20 MB
    lengths = rng.integers(1, 9, count)
    words = rng.standard_normal((count, 6, 16), dtype=np.float32)
    word_lengths = rng.integers(0, 7, count)
    peak = _traced_peak(lambda: precomp.save_precomp(tmp_path, "test", features, image_lengths=lengths,
                                                     word_features=(words, word_lengths), layout="tokens"))
    assert peak < 0.25 * features.nbytes, f"save_precomp held {peak / 2**20:.1f} MB for {features.nbytes / 2**20:.0f} MB"
    for name, array, valid in (("regions.npy", features, lengths), ("words.npy", words, word_lengths)):
        buffer = io.BytesIO()
        np.save(buffer, array[np.arange(array.shape[1])[None, :] < valid[:, None]])
        assert (tmp_path / "test" / name).read_bytes() == buffer.getvalue(), name
    dataset = precomp.PrecompDataset(tmp_path, "test", captions_per_image=1)
    assert np.array_equal(dataset.image(123), features[123, :lengths[123]])

    captions = [f"caption number {index} of the split, with some words" for index in range(100_000)]
    text_bytes = sum(len(caption) + 1 for caption in captions)
    small = np.zeros((len(captions) // 5, 1, 2), np.float32)
    peak = _traced_peak(lambda: precomp.save_precomp(tmp_path, "scan", small, captions))
    assert peak < 0.5 * text_bytes, f"writing {text_bytes / 2**20:.1f} MB of captions held {peak / 2**20:.1f} MB"
    assert (tmp_path / "scan_caps.txt").read_text(encoding="utf-8") == "".join(f"{c}\n" for c in captions)

