"""Retrieval engine: student kNN index, fine-grained feature store, two-stage search with fused rerank.

::

    from aladin_fast.retrieval import StudentIndex, FeatureStore, Retriever

    index = StudentIndex(dim=E)                        # exact IndexFlatIP; "ivf", "hnsw", "ivfpq", factory strings
    index.add(image_embeddings, ids)                   # [Ni, E] float, int64 ids
    store = FeatureStore(dim=D, dtype="bfloat16")
    store.append(ids, image_regions, region_lengths)   # [Ni, R, D] + [Ni]
    retriever = Retriever(index, store)                # text -> image
    ids, scores = retriever.search(caption_embeddings, caption_words, word_lengths, k=10, rerank_k=100)
    retriever.save("gallery/")                         # atomic, checksummed; Retriever.load("gallery/")

``MilvusStudentIndex`` (pymilvus; milvus-lite for a local file URI) is a drop-in
replacement for ``StudentIndex``. faiss and pymilvus are imported only when used.
"""
from .feature_store import STORE_DTYPES, FeatureStore
from .index import StudentIndex, faiss_gpu_available
from .manifest import FORMAT_VERSION, ManifestError
from .retriever import DIRECTIONS, Retriever, TeacherScorer

__all__ = [
    "StudentIndex",
    "FeatureStore",
    "Retriever",
    "TeacherScorer",
    "MilvusStudentIndex",
    "MilvusIndex",
    "ManifestError",
    "FORMAT_VERSION",
    "STORE_DTYPES",
    "DIRECTIONS",
    "faiss_gpu_available",
]


def __getattr__(name):
    if name in ("MilvusStudentIndex", "MilvusIndex"):  # lazy: pymilvus is an optional dependency
        from .milvus import MilvusStudentIndex

        return MilvusStudentIndex  # MilvusIndex: the name used in issue 9
    raise AttributeError(f"module 'aladin_fast.retrieval' has no attribute {name!r}")
