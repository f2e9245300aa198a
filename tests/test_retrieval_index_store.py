"""StudentIndex (faiss) and FeatureStore: exactness vs brute force, ids, dtypes, errors, round trips."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from aladin_fast.retrieval import FeatureStore, StudentIndex, faiss_gpu_available  # noqa: E402


def unit(generator, *shape):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


def brute_force_topk(gallery, gallery_ids, queries, k):
    scores = queries.double() @ gallery.double().T
    top = torch.topk(scores, k, dim=1)
    return top.values.float(), torch.as_tensor(gallery_ids)[top.indices]


# ---------------------------------------------------------------------------- StudentIndex
def test_flat_index_is_exact_and_uses_ids(generator):
    gallery, queries = unit(generator, 300, 24), unit(generator, 17, 24)
    ids = torch.randperm(10_000, generator=generator)[:300]
    index = StudentIndex(24)
    index.add(gallery, ids)
    assert index.ntotal == 300 and index.factory_string == "Flat" and index.device == "cpu"
    scores, found = index.search(queries, 10)
    expected_scores, expected_ids = brute_force_topk(gallery, ids, queries, 10)
    assert found.dtype == torch.int64 and scores.dtype == torch.float32 and found.shape == (17, 10)
    torch.testing.assert_close(scores, expected_scores, atol=1e-5, rtol=0)
    assert torch.equal(found, expected_ids)
    assert sorted(index.ids().tolist()) == sorted(ids.tolist())


def test_batched_search_with_progress_matches_one_call(generator):
    gallery, queries = unit(generator, 200, 16), unit(generator, 45, 16)
    index = StudentIndex(16)
    index.add(gallery.numpy(), np.arange(200))
    one = index.search(queries, 7)
    batched = index.search(queries.numpy(), 7, batch_size=8, progress=True)
    assert torch.equal(one[0], batched[0]) and torch.equal(one[1], batched[1])


def test_k_beyond_gallery_and_empty_queries(generator):
    index = StudentIndex(8)
    scores, ids = index.search(unit(generator, 3, 8), 4)  # empty index
    assert (ids == -1).all() and torch.isinf(scores).all()
    index.add(unit(generator, 3, 8), [5, 6, 7])
    scores, ids = index.search(unit(generator, 2, 8), 5)
    assert (ids[:, :3] >= 5).all() and (ids[:, 3:] == -1).all()
    assert torch.isfinite(scores[:, :3]).all() and (scores[:, 3:] == float("-inf")).all()
    scores, ids = index.search(torch.zeros(0, 8), 5)
    assert ids.shape == (0, 5) and scores.shape == (0, 5)


def test_add_remove_by_id(generator):
    gallery = unit(generator, 50, 8)
    index = StudentIndex(8)
    index.add(gallery[:30], torch.arange(30) + 100)
    index.add(gallery[30:], torch.arange(20) + 500)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(gallery[:2], [100, 999])
    with pytest.raises(ValueError, match="unique"):
        index.add(gallery[:2], [1000, 1000])
    assert index.remove([100, 501, 123456]) == 2
    assert index.ntotal == 48
    _, found = index.search(gallery[[0, 31]], 1)
    assert found[0, 0] != 100 and found[1, 0] != 501
    _, found = index.search(gallery[[1, 32]], 1)
    assert found.flatten().tolist() == [101, 502]


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq", "IVF8,SQ8"])
def test_approximate_indexes_train_on_gallery_and_find_neighbours(generator, kind):
    gallery = unit(generator, 800, 32)
    queries = torch.nn.functional.normalize(gallery[:40] + 0.05 * torch.randn(40, 32, generator=generator), dim=-1)
    # PQ with 4-bit codes: k-means training stays fast on a small, shared CPU
    index = StudentIndex(32, kind, nprobe=8, pq_bits=4)
    assert not index.is_trained or kind == "hnsw"
    index.add(gallery, torch.arange(800))
    assert index.is_trained and index.ntotal == 800
    _, found = index.search(queries, 10)
    recall = (found == torch.arange(40)[:, None]).any(dim=1).float().mean().item()
    assert recall >= 0.9, (kind, recall)
    if kind == "hnsw":
        assert not index.supports_remove
        with pytest.raises(NotImplementedError, match="HNSW"):
            index.remove([0])
    else:
        assert index.remove([0, 1]) == 2 and index.ntotal == 798


def test_ivf_with_too_few_training_vectors_names_the_fix(generator):
    index = StudentIndex(8, "ivf", nlist=64)
    with pytest.raises(ValueError, match="at least 64 training vectors"):
        index.add(unit(generator, 10, 8), torch.arange(10))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_cosine_and_l2_metrics(generator, metric):
    gallery, queries = torch.randn(100, 12, generator=generator) * 3, torch.randn(5, 12, generator=generator)
    index = StudentIndex(12, metric=metric)
    index.add(gallery, torch.arange(100))
    scores, found = index.search(queries, 5)
    if metric == "cosine":
        reference = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
    else:
        reference = -torch.cdist(queries.double(), gallery.double()).pow(2).float()
    expected = torch.topk(reference, 5, dim=1)
    assert torch.equal(found, expected.indices)
    torch.testing.assert_close(scores, expected.values, atol=1e-4, rtol=1e-5)


def test_index_argument_errors(generator):
    with pytest.raises(ValueError, match="dim"):
        StudentIndex(0)
    with pytest.raises(ValueError, match="metric"):
        StudentIndex(8, metric="dot")
    with pytest.raises(ValueError, match="faiss cannot build"):
        StudentIndex(8, "NotAnIndex")
    with pytest.raises(ValueError, match="device"):
        StudentIndex(8, device="tpu")
    index = StudentIndex(8)
    with pytest.raises(ValueError, match=r"embeddings must have shape \[N, 8\]"):
        index.add(torch.zeros(3, 9), [0, 1, 2])
    with pytest.raises(ValueError, match=r"ids must have shape \[3\]"):
        index.add(torch.zeros(3, 8), [0, 1])
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search(torch.zeros(1, 8), 0)
    with pytest.raises(ValueError, match=r"queries must have shape \[N, 8\]"):
        index.search(torch.zeros(8), 1)


def test_gpu_device_forced_without_gpu_raises_clearly():
    available, reason = faiss_gpu_available()
    if available:
        pytest.skip("a faiss GPU is available here")
    assert reason
    with pytest.raises(RuntimeError, match="device='cuda' was requested"):
        StudentIndex(8, device="cuda")
    assert StudentIndex(8, device="auto").device == "cpu"


@pytest.mark.skipif(not faiss_gpu_available()[0], reason="needs faiss with GPU support and CUDA")
def test_gpu_index_matches_cpu(generator):  # pragma: no cover - runs on GPU machines only
    gallery, queries = unit(generator, 500, 32), unit(generator, 20, 32)
    cpu, gpu = StudentIndex(32, device="cpu"), StudentIndex(32, device="cuda")
    for index in (cpu, gpu):
        index.add(gallery, torch.arange(500))
        index.remove([3])
    assert torch.equal(cpu.search(queries, 10)[1], gpu.search(queries, 10)[1])


def test_index_save_load_is_bit_exact(tmp_path, generator):
    import faiss

    gallery, queries = unit(generator, 400, 16), unit(generator, 9, 16)
    index = StudentIndex(16, "ivf", nlist=8, nprobe=3)
    index.add(gallery, torch.arange(400) * 3)
    index.remove([0, 3])
    index.save(str(tmp_path / "index"))
    loaded = StudentIndex.load(str(tmp_path / "index"))
    assert (loaded.ntotal, loaded.dim, loaded.metric, loaded.factory_string) == (398, 16, "ip", index.factory_string)
    assert np.array_equal(faiss.serialize_index(loaded._cpu_index), faiss.serialize_index(index._cpu_index))
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- FeatureStore
def padded_tokens(generator, count, length, dim):
    tokens = torch.randn(count, length, dim, generator=generator)
    lengths = torch.randint(0, length + 1, (count,), generator=generator)
    lengths[0] = length
    return tokens, lengths


def expected_gather(tokens, lengths, rows, width):
    out = torch.zeros(len(rows), width, tokens.shape[2], dtype=tokens.dtype)
    for i, row in enumerate(rows):
        out[i, : lengths[row]] = tokens[row, : lengths[row]]
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_gather_padded_and_packed(generator, dtype):
    tokens, lengths = padded_tokens(generator, 30, 7, 5)
    store = FeatureStore(5, dtype)
    ids = torch.arange(30) * 10
    store.append(ids[:12], tokens[:12], lengths[:12])
    store.append(ids[12:], tokens[12:], lengths[12:])  # a second shard
    assert store.num_shards == 2 and store.count == 30 and store.dtype == getattr(torch, dtype)
    rows = [29, 0, 13, 5, 5, 11, 12]  # across shards, with a repeat
    gathered, gathered_lengths = store.gather(ids[rows])
    reference = tokens.to(store.dtype)
    width = int(lengths[rows].max())
    assert gathered.dtype == store.dtype and gathered.shape == (7, width, 5)
    assert torch.equal(gathered, expected_gather(reference, lengths, rows, width))
    assert torch.equal(gathered_lengths, lengths[rows])
    packed, cu_seqlens = store.gather(ids[rows], packed=True)
    assert torch.equal(cu_seqlens, torch.cat([torch.zeros(1, dtype=torch.int64), lengths[rows].cumsum(0)]))
    assert torch.equal(packed, torch.cat([reference[r, : lengths[r]] for r in rows]))
    wide, _ = store.gather(ids[rows], pad_to=9, dtype=torch.float32)
    assert wide.shape == (7, 9, 5) and wide.dtype == torch.float32 and (wide[:, width:] == 0).all()


def test_bfloat16_is_stored_as_raw_bits(tmp_path, generator):
    tokens = torch.randn(4, 3, 8, generator=generator)
    store = FeatureStore.from_tokens([1, 2, 3, 4], tokens, dtype=torch.bfloat16)
    store.save(str(tmp_path / "bf16"))
    array = np.load(next((tmp_path / "bf16").glob("payload-*/tokens-00000.npy")))
    assert array.dtype == np.uint16
    assert torch.equal(torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).view(4, 3, 8), tokens.bfloat16())
    loaded = FeatureStore.load(str(tmp_path / "bf16"))
    assert torch.equal(loaded.gather([1, 2, 3, 4])[0], tokens.bfloat16())


def test_packed_append_and_remove(generator):
    store = FeatureStore(4)
    packed = torch.randn(9, 4, generator=generator)
    store.append([7, 3, 5], packed, cu_seqlens=torch.tensor([0, 2, 2, 9]))
    assert store.lengths([3, 5, 7]).tolist() == [0, 7, 2]
    assert torch.equal(store.gather([5], packed=True)[0], packed[2:])
    assert store.remove([3, 99]) == 1 and store.count == 2
    assert store.ids().tolist() == [5, 7] and store.contains([3, 5]).tolist() == [False, True]
    with pytest.raises(KeyError, match=r"\[3\]"):
        store.gather([5, 3])
    store.append([3], torch.ones(1, 2, 4))  # an id can come back after removal
    assert torch.equal(store.gather([3])[0], torch.ones(1, 2, 4))


def test_store_errors_name_the_argument(generator):
    store = FeatureStore(4)
    with pytest.raises(ValueError, match=r"tokens must be padded \[N, L, 4\]"):
        store.append([0], torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="lengths must lie in"):
        store.append([0], torch.zeros(1, 2, 4), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"ids must have shape \[1\]"):
        store.append([0, 1], torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="cu_seqlens"):
        store.append([0], torch.zeros(3, 4), cu_seqlens=[0, 2])
    with pytest.raises(ValueError, match="dtype must be one of"):
        FeatureStore(4, "int8")
    store.append([0], torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="already in the feature store"):
        store.append([0], torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="pad_to=1 is shorter"):
        store.gather([0], pad_to=1)
    with pytest.raises(ValueError, match="non-negative"):
        store.gather([-1])


def test_store_save_load_memmap_and_reshard(tmp_path, generator):
    tokens, lengths = padded_tokens(generator, 25, 6, 3)
    ids = torch.randperm(1000, generator=generator)[:25]
    store = FeatureStore(3, "float16")
    store.append(ids[:10], tokens[:10], lengths[:10])
    store.append(ids[10:], tokens[10:], lengths[10:])
    store.remove(ids[3:5])
    live = torch.cat([ids[:3], ids[5:]])
    store.save(str(tmp_path / "plain"))
    loaded = FeatureStore.load(str(tmp_path / "plain"))
    assert isinstance(loaded._layout.shards[0].tokens, np.memmap)
    assert loaded.count == 23 and loaded.dtype == torch.float16 and loaded.num_shards == 2
    for a, b in zip(store.gather(live), loaded.gather(live)):
        assert torch.equal(a, b)
    store.save(str(tmp_path / "sharded"), items_per_shard=6)
    resharded = FeatureStore.load(str(tmp_path / "sharded"), mmap=False)
    assert resharded.num_shards == 4
    shard_ids = [shard.ids for shard in resharded._layout.shards]
    assert all(a.max() < b.min() for a, b in zip(shard_ids, shard_ids[1:]))  # contiguous id ranges
    for a, b in zip(store.gather(live, packed=True), resharded.gather(live, packed=True)):
        assert torch.equal(a, b)


def test_feature_store_works_without_faiss_and_index_says_how_to_install():
    code = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "faiss" or name.startswith("faiss."):
            raise ImportError("faiss blocked by the test")
sys.meta_path.insert(0, _Block())
import torch
from aladin_fast.retrieval import FeatureStore, StudentIndex
store = FeatureStore.from_tokens([1, 2], torch.ones(2, 3, 4))
assert store.gather([2])[0].shape == (1, 3, 4)
try:
    StudentIndex(4)
except ImportError as err:
    assert "pip install 'aladin-fast[cpu]'" in str(err), err
else:
    raise AssertionError("StudentIndex must raise without faiss")
print("OK")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "OK", result.stderr
