"""Milvus backend: milvus-lite (embedded, local file) against faiss flat; a fake client for cluster URIs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pymilvus = pytest.importorskip("pymilvus")

from aladin_fast.retrieval import FeatureStore, ManifestError, Retriever, StudentIndex  # noqa: E402
from aladin_fast.retrieval.milvus import MilvusStudentIndex  # noqa: E402

REAL_CLIENT = pymilvus.MilvusClient  # schema and index-param builders need no server


def unit(generator, *shape):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _milvus_lite_available():
    try:
        import milvus_lite  # noqa: F401
    except ImportError:
        return False
    return True


lite = pytest.mark.skipif(not _milvus_lite_available(), reason="milvus-lite is not installed")


@pytest.fixture(scope="module")
def lite_uri(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "gallery.db")


@lite
def test_milvus_lite_matches_faiss_flat(lite_uri, generator):
    gallery, queries = unit(generator, 300, 24), unit(generator, 12, 24)
    ids = torch.randperm(5000, generator=generator)[:300]
    milvus = MilvusStudentIndex(24, lite_uri, "match")
    faiss_index = StudentIndex(24)
    for index in (milvus, faiss_index):
        index.add(gallery, ids)
    assert milvus.ntotal == 300 and sorted(milvus.ids().tolist()) == sorted(ids.tolist())
    milvus_scores, milvus_ids = milvus.search(queries, 10, batch_size=5)
    faiss_scores, faiss_ids = faiss_index.search(queries, 10)
    assert torch.equal(milvus_ids, faiss_ids)
    torch.testing.assert_close(milvus_scores, faiss_scores, atol=1e-5, rtol=0)


@lite
def test_milvus_lite_add_remove_and_edges(lite_uri, generator):
    index = MilvusStudentIndex(8, lite_uri, "edges", overwrite=True)
    index.add(unit(generator, 5, 8), [10, 11, 12, 13, 14])
    with pytest.raises(ValueError, match=r"already in the Milvus collection: \[12\]"):
        index.add(unit(generator, 2, 8), [12, 99])
    assert index.ntotal == 5
    assert index.remove([10, 11, 500]) == 2 and index.ntotal == 3
    scores, found = index.search(unit(generator, 2, 8), 6)
    assert (found[:, :3] >= 12).all() and (found[:, 3:] == -1).all() and (scores[:, 3:] == float("-inf")).all()
    assert index.search(torch.zeros(0, 8), 3)[1].shape == (0, 3)
    with pytest.raises(ValueError, match="vector dim 8, expected dim=9"):
        MilvusStudentIndex(9, lite_uri, "edges")
    with pytest.raises(ValueError, match="uses metric IP, expected L2"):
        MilvusStudentIndex(8, lite_uri, "edges", metric="l2")


@lite
def test_retriever_on_milvus_saves_and_reconnects(lite_uri, tmp_path, generator):
    regions = unit(generator, 40, 6, 16)
    embeddings = unit(generator, 40, 12)
    ids = torch.arange(40) + 1000
    store = FeatureStore(16)
    store.append(ids, regions)
    milvus = MilvusStudentIndex(12, lite_uri, "retriever", overwrite=True)
    milvus.add(embeddings, ids)
    flat = StudentIndex(12)
    flat.add(embeddings, ids)
    words = unit(generator, 5, 4, 16)
    query = unit(generator, 5, 12)
    on_milvus = Retriever(milvus, store).search(query, words, None, k=4, rerank_k=10)
    on_faiss = Retriever(flat, store).search(query, words, None, k=4, rerank_k=10)
    assert torch.equal(on_milvus[0], on_faiss[0]) and torch.equal(on_milvus[1], on_faiss[1])
    path = str(tmp_path / "saved")
    Retriever(milvus, store).save(path)
    loaded = Retriever.load(path)
    assert isinstance(loaded.student_index, MilvusStudentIndex) and loaded.student_index.uri == lite_uri
    again = loaded.search(query, words, None, k=4, rerank_k=10)
    assert torch.equal(again[0], on_milvus[0]) and torch.equal(again[1], on_milvus[1])
    milvus.remove([1000])  # the collection changed behind the saved directory's back
    with pytest.raises(ManifestError, match="holds 39 vectors, the saved manifest says 40"):
        Retriever.load(path)


class FakeMilvusClient:
    """In-memory stand-in for pymilvus.MilvusClient (the subset MilvusStudentIndex uses)."""

    def __init__(self, uri, **kwargs):
        self.uri, self.kwargs, self.collections, self.index_types = uri, kwargs, {}, {}
        self.read_levels = []  # the consistency level each read asked for

    def has_collection(self, name):
        return name in self.collections

    def create_schema(self, **kwargs):
        return REAL_CLIENT.create_schema(**kwargs)

    def prepare_index_params(self):
        return REAL_CLIENT.prepare_index_params()

    def create_collection(self, name, schema, index_params, **kwargs):
        (index,) = list(index_params)
        self.collections[name] = {}
        self.index_types[name] = (index.index_type, index.to_dict()["metric_type"])

    def insert(self, name, rows):
        self.collections[name].update({row["id"]: np.asarray(row["vector"], np.float32) for row in rows})

    def get(self, name, ids, output_fields, consistency_level=None):
        self.read_levels.append(consistency_level)
        return [{"id": i} for i in ids if i in self.collections[name]]

    def delete(self, name, ids):
        for i in ids:
            self.collections[name].pop(i, None)

    def query(self, name, filter, output_fields, consistency_level=None):
        self.read_levels.append(consistency_level)
        return [{"count(*)": len(self.collections[name])}]

    def search(self, name, data, limit, search_params, output_fields, consistency_level=None):
        self.read_levels.append(consistency_level)
        keys = list(self.collections[name])
        matrix = np.stack([self.collections[name][key] for key in keys]) if keys else np.zeros((0, len(data[0])))
        results = []
        for query in np.asarray(data, np.float32):
            scores = matrix @ query
            order = np.argsort(-scores, kind="stable")[:limit]
            results.append([{"id": keys[j], "distance": float(scores[j])} for j in order])
        return results


def test_cluster_uri_with_mocked_client(monkeypatch, generator):
    monkeypatch.setattr(pymilvus, "MilvusClient", type("Client", (FakeMilvusClient,), {}))
    index = MilvusStudentIndex(8, "http://milvus.example:19530", "prod", token="user:secret", db_name="ret")
    client = index.client
    assert client.uri == "http://milvus.example:19530" and client.kwargs == {"token": "user:secret", "db_name": "ret"}
    assert client.index_types["prod"] == ("AUTOINDEX", "IP")
    gallery = unit(generator, 30, 8)
    index.add(gallery, torch.arange(30))
    _, found = index.search(gallery[:4], 1)
    assert found.flatten().tolist() == [0, 1, 2, 3]
    assert "secret" not in str(index.config())
    # a cluster collection created elsewhere may default to Bounded consistency: every read asks for Strong
    # itself, so the duplicate check, remove and search see the writes made just before them
    index.remove([0])
    assert index.ntotal == 29
    assert client.read_levels and set(client.read_levels) == {"Strong"}
