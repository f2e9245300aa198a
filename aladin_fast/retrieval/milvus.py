"""Milvus backend for the student index: the same interface as :class:`StudentIndex`, data in Milvus.

``MilvusStudentIndex`` keeps the global embeddings in a Milvus collection
(``id`` INT64 primary key + ``vector`` FLOAT_VECTOR) through pymilvus's
``MilvusClient``:

* tests and single machines: milvus-lite, embedded, with a local file URI
  (``uri="/path/gallery.db"``; ``pip install pymilvus milvus-lite``);
* production: a Milvus cluster URI (``uri="http://milvus:19530"``, ``token=``),
  sharded and replicated by Milvus itself.

Unlike the faiss index, the vectors are not part of a saved directory: Milvus
persists them. ``save`` writes the connection settings and the count, and
``load`` reconnects and checks the collection still has that dim, metric and
count (the access token is never written; pass ``token=`` or set
``MILVUS_TOKEN``).

Scores follow :meth:`StudentIndex.search`: higher is better (inner product or
cosine similarity; negative squared L2 distance for ``metric="l2"``). Milvus
returns at most 16,384 hits per query; a larger ``k`` (a big ``rerank_k``) is
served by an exact scan that streams the stored vectors out of the collection.

Every read asks for ``Strong`` consistency, whatever the collection's default:
the duplicate check in ``add``, ``remove`` and its rollback must see the
writes made just before them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from typing import Optional, Tuple

import numpy as np
import torch

from ..ops.streaming import merge_best
from .index import METRICS, ReadWriteLock, as_float_matrix, as_id_vector
from .manifest import ManifestError, open_directory, save_directory

__all__ = ["MilvusStudentIndex"]

_MILVUS_METRICS = {"ip": "IP", "cosine": "COSINE", "l2": "L2"}
MAX_TOPK = 16384  # Milvus's limit on `limit` (top-k) per search; a larger k is served by an exact scan
SCAN_BATCH = 4096  # vectors per query_iterator batch of that scan
# ids per query_iterator batch of ids(): Milvus's largest. Each batch is one server query, and a query costs
# time in the collection size (milvus-lite: ~1 s per query at 50,000 rows), so listing N ids costs
# O(N^2 / batch); ids are 8 bytes, not a vector of Python floats, so the big batch costs no memory
ID_SCAN_BATCH = 16384
# every read asks for Strong consistency itself: a collection created elsewhere may default to Bounded,
# where a read can miss writes made just before it (the duplicate check, remove and rollback rely on them)
STRONG = {"consistency_level": "Strong"}
INSERT_BATCH = 2048
CONFIG_FILE = "config.json"


def _is_local_uri(uri: str) -> bool:
    return "://" not in uri


def _make_client(uri: str, token: Optional[str], db_name: Optional[str]):
    try:
        from pymilvus import MilvusClient
    except ImportError as err:  # pragma: no cover - pymilvus is installed in the test environment
        raise ImportError("MilvusStudentIndex needs pymilvus (and milvus-lite for local file URIs): "
                          "pip install pymilvus milvus-lite") from err
    kwargs = {}
    if token:
        kwargs["token"] = token
    if db_name:
        kwargs["db_name"] = db_name
    return MilvusClient(uri, **kwargs)


class MilvusStudentIndex:
    """Student kNN index stored in a Milvus collection.

    Args:
        dim: embedding size E.
        uri: a local ``.db`` file (milvus-lite, embedded) or a Milvus server URI.
        collection: collection name (created if missing; an existing one must
            match ``dim`` and ``metric``).
        metric: ``"ip"``, ``"cosine"`` or ``"l2"``.
        token / db_name: server credentials and database (cluster URIs).
        index_type: Milvus index (default ``"FLAT"``, exact, for a local file;
            ``"AUTOINDEX"`` for a server).
        index_params / search_params: extra Milvus parameters (e.g.
            ``{"nlist": 1024}`` / ``{"nprobe": 16}``).
        client: an existing ``MilvusClient`` (or a stand-in with its methods).
        overwrite: drop an existing collection of that name first.
    """

    def __init__(self, dim: int, uri: str = "./aladin_student.db", collection: str = "aladin_student",
                 metric: str = "ip", *, token: Optional[str] = None, db_name: Optional[str] = None,
                 index_type: Optional[str] = None, index_params: Optional[dict] = None,
                 search_params: Optional[dict] = None, client=None, overwrite: bool = False):
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"uri must be a local .db path or a Milvus server URI, got {uri!r}")
        self.dim, self.metric, self.collection = int(dim), metric, collection
        self.uri = os.path.abspath(uri) if _is_local_uri(uri) else uri
        self.db_name = db_name
        self.index_type = index_type or ("FLAT" if _is_local_uri(uri) else "AUTOINDEX")
        self.index_params = dict(index_params or {})
        self.search_params = dict(search_params or {})
        self.client = client if client is not None else _make_client(self.uri, token or os.environ.get("MILVUS_TOKEN"), db_name)
        self._lock = ReadWriteLock()
        # milvus-lite's embedded server: one request at a time; a cluster client takes concurrent calls
        self._client_lock = threading.Lock() if _is_local_uri(uri) else contextlib.nullcontext()
        if overwrite and self.client.has_collection(collection):
            self.client.drop_collection(collection)
        if self.client.has_collection(collection):
            self._check_existing()
        else:
            self._create()

    @property
    def index_kind(self) -> str:
        return f"milvus:{self.index_type}"

    def _create(self) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        index_params = self.client.prepare_index_params()
        index_params.add_index(field_name="vector", index_type=self.index_type,
                               metric_type=_MILVUS_METRICS[self.metric], params=self.index_params)
        self.client.create_collection(self.collection, schema=schema, index_params=index_params,
                                      consistency_level="Strong")

    def _check_existing(self) -> None:
        description = self.client.describe_collection(self.collection)
        vector = [field for field in description.get("fields", []) if field.get("name") == "vector"]
        dim = int(vector[0].get("params", {}).get("dim", -1)) if vector else -1
        if dim != self.dim:
            raise ValueError(f"Milvus collection {self.collection!r} has vector dim {dim}, expected dim={self.dim} "
                             "(use another collection name or overwrite=True)")
        try:
            metric = self.client.describe_index(self.collection, "vector").get("metric_type")
        except Exception:  # pragma: no cover - an unindexed collection
            metric = None
        if metric is not None and metric != _MILVUS_METRICS[self.metric]:
            raise ValueError(f"Milvus collection {self.collection!r} uses metric {metric}, expected "
                             f"{_MILVUS_METRICS[self.metric]} (metric={self.metric!r})")
        self.client.load_collection(self.collection)

    # ----------------------------------------------------------- properties
    @property
    def ntotal(self) -> int:
        with self._lock.read(), self._client_lock:  # not half-way through an add() of several batches
            rows = self.client.query(self.collection, filter="", output_fields=["count(*)"], **STRONG)
        return int(rows[0]["count(*)"])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        return True

    @property
    def supports_remove(self) -> bool:
        return True

    def ids(self) -> np.ndarray:
        """All ids in the collection, int64 ``[ntotal]`` (unordered)."""
        found = []
        with self._lock.read(), self._client_lock:
            for batch in self._scan(["id"], ID_SCAN_BATCH):
                found.extend(int(row["id"]) for row in batch)
        return np.asarray(found, dtype=np.int64)

    def _scan(self, fields, batch_size: Optional[int] = None):
        """Every row of the collection, ``fields`` only, in batches of ``batch_size`` (default SCAN_BATCH) rows
        (caller holds the client lock)."""
        batch_size = SCAN_BATCH if batch_size is None else batch_size
        iterator = self.client.query_iterator(self.collection, batch_size=batch_size, filter="", output_fields=fields,
                                              **STRONG)
        try:
            while True:
                batch = iterator.next()
                if not batch:
                    return
                yield batch
        finally:
            iterator.close()

    def contains(self, ids) -> np.ndarray:
        """bool ``[N]``: which of ``ids`` are in the collection."""
        id_array = as_id_vector("ids", ids)
        with self._lock.read():
            return np.isin(id_array, self._existing(np.unique(id_array)))

    def _existing(self, ids: np.ndarray) -> np.ndarray:
        present = []
        for start in range(0, ids.size, INSERT_BATCH):
            with self._client_lock:
                rows = self.client.get(self.collection, ids=ids[start:start + INSERT_BATCH].tolist(), output_fields=["id"],
                                       **STRONG)
            present.extend(int(row["id"]) for row in rows)
        return np.asarray(present, dtype=np.int64)

    # ------------------------------------------------------------- mutation
    def train(self, embeddings) -> None:
        """No-op: Milvus builds and trains its index itself."""
        as_float_matrix("embeddings", embeddings, self.dim)

    def add(self, embeddings, ids) -> None:
        """Insert ``embeddings [N, dim]`` under new unique int64 ``ids [N]`` (Milvus itself would accept duplicates)."""
        matrix = as_float_matrix("embeddings", embeddings, self.dim)
        id_array = as_id_vector("ids", ids, matrix.shape[0])
        if np.unique(id_array).size != id_array.size:
            raise ValueError("ids must be unique within one add() call")
        with self._lock.write():
            clash = self._existing(id_array)
            if clash.size:
                raise ValueError(f"ids already in the Milvus collection: {np.sort(clash)[:8].tolist()}")
            try:
                for start in range(0, id_array.size, INSERT_BATCH):
                    rows = [{"id": int(i), "vector": vector.tolist()}
                            for i, vector in zip(id_array[start:start + INSERT_BATCH], matrix[start:start + INSERT_BATCH])]
                    with self._client_lock:
                        self.client.insert(self.collection, rows)
            except BaseException:
                # all or nothing, like StudentIndex.add: drop the chunks already inserted (and the failing one,
                # which Milvus may have applied before the error); none of these ids was there before
                if id_array.size:
                    with contextlib.suppress(Exception), self._client_lock:
                        self.client.delete(self.collection, ids=id_array.tolist())
                raise

    def remove(self, ids) -> int:
        """Delete ``ids`` (unknown ids are ignored); returns how many were present."""
        id_array = np.unique(as_id_vector("ids", ids))
        if not id_array.size:
            return 0
        with self._lock.write():
            present = self._existing(id_array)
            if present.size:
                try:
                    with self._client_lock:
                        self.client.delete(self.collection, ids=present.tolist())
                except BaseException:
                    # a cluster can apply a delete and still report a failure (a timeout, a dropped
                    # connection): if every id is gone, the removal happened and is reported as done
                    try:
                        left = self._existing(present)
                    except Exception:
                        left = present
                    if left.size:
                        raise
        return int(present.size)

    # --------------------------------------------------------------- search
    def search(self, queries, k: int, *, batch_size: int = 1024, progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` neighbours: ``(scores [Nq, k] float32, ids [Nq, k] int64)``, missing slots -inf / -1."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        matrix = as_float_matrix("queries", queries, self.dim)
        count = matrix.shape[0]
        scores = np.full((count, k), -np.inf, dtype=np.float32)
        ids = np.full((count, k), -1, dtype=np.int64)
        if count == 0:
            return torch.from_numpy(scores), torch.from_numpy(ids)
        if k > MAX_TOPK:  # beyond what Milvus returns per query: an exact scan of the collection
            with self._lock.read():
                return self._scan_search(matrix, k)
        params = {"metric_type": _MILVUS_METRICS[self.metric], "params": dict(self.search_params)}
        starts = range(0, count, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, total=math.ceil(count / batch_size), desc="milvus search", unit="batch")
        with self._lock.read():
            for start in starts:
                block = matrix[start:start + batch_size]
                with self._client_lock:
                    results = self.client.search(self.collection, data=block.tolist(), limit=int(k),
                                                 search_params=params, output_fields=[], **STRONG)
                for row, hits in enumerate(results):
                    found = len(hits)
                    ids[start + row, :found] = [hit["id"] for hit in hits]
                    scores[start + row, :found] = [hit["distance"] for hit in hits]
        if self.metric == "l2":
            scores = np.where(ids >= 0, -scores, -np.inf).astype(np.float32)
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def _scan_search(self, matrix: np.ndarray, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` by streaming every stored vector out of Milvus (for ``k`` above Milvus's limit).
        Scores as Milvus gives them (inner product, cosine, negated squared L2); ties: the lower id first."""
        queries = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        if self.metric == "cosine":
            queries = torch.nn.functional.normalize(queries, dim=1)
        best = torch.full((queries.shape[0], 0), -math.inf)
        best_ids = torch.zeros((queries.shape[0], 0), dtype=torch.int64)
        with self._client_lock:
            for batch in self._scan(["id", "vector"]):
                ids = torch.tensor([int(row["id"]) for row in batch], dtype=torch.int64)
                vectors = torch.from_numpy(np.asarray([row["vector"] for row in batch], dtype=np.float32))
                if self.metric == "cosine":
                    vectors = torch.nn.functional.normalize(vectors, dim=1)
                if self.metric == "l2":
                    block = -torch.cdist(queries.double(), vectors.double()).square().float()
                else:
                    block = queries @ vectors.T
                # the iterator's batches come in no id order: a tie still keeps the lower id
                best, best_ids = merge_best(best, best_ids, block, ids, k, blocks_in_id_order=False)
        found = best.shape[1]
        scores = torch.full((queries.shape[0], k), -math.inf)
        ids = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
        scores[:, :found], ids[:, :found] = best, best_ids
        return scores, ids

    # ---------------------------------------------------------- persistence
    def config(self) -> dict:
        return {"backend": "milvus", "dim": self.dim, "metric": self.metric, "uri": self.uri,
                "collection": self.collection, "db_name": self.db_name, "index_type": self.index_type,
                "index_params": self.index_params, "search_params": self.search_params, "count": self.ntotal}

    def write_payload(self, folder: str) -> dict:
        """Write the connection settings (never the token) to ``folder/config.json``."""
        config = self.config()
        with open(os.path.join(folder, CONFIG_FILE), "w") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
        return config

    @classmethod
    def read_payload(cls, folder: str, meta: dict, *, client=None, token: Optional[str] = None) -> "MilvusStudentIndex":
        """Reconnect from settings written by :meth:`write_payload`; checks dim, metric and count."""
        with open(os.path.join(folder, CONFIG_FILE)) as handle:
            config = json.load(handle)
        index = cls(config["dim"], config["uri"], config["collection"], config["metric"], token=token,
                    db_name=config.get("db_name"), index_type=config.get("index_type"),
                    index_params=config.get("index_params"), search_params=config.get("search_params"), client=client)
        if meta.get("count") is not None and index.ntotal != meta["count"]:
            raise ManifestError(f"Milvus collection {index.collection!r} at {index.uri!r} holds {index.ntotal} vectors, "
                                f"the saved manifest says {meta['count']}")
        return index

    def save(self, path: str) -> None:
        """Save the connection settings atomically to directory ``path`` (the vectors stay in Milvus)."""
        save_directory(path, "milvus_index", {}, self.write_payload)

    @classmethod
    def load(cls, path: str, *, client=None, token: Optional[str] = None, verify: bool = True) -> "MilvusStudentIndex":
        """Reconnect to the collection saved by :meth:`save`."""
        folder, meta = open_directory(path, "milvus_index", verify=verify)
        return cls.read_payload(folder, meta, client=client, token=token)

    def close(self) -> None:
        """Close the client connection."""
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        return f"MilvusStudentIndex(dim={self.dim}, uri={self.uri!r}, collection={self.collection!r}, metric={self.metric!r})"
