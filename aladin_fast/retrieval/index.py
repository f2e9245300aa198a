"""Student index: k-nearest-neighbour search over global (pooled) embeddings with faiss.

:class:`StudentIndex` wraps a faiss ``IndexIDMap2`` so items are addressed by
their own int64 ids (the same ids as the :class:`~aladin_fast.retrieval.FeatureStore`).
Exact inner product (``IndexFlatIP``) is the default; ``"ivf"``, ``"hnsw"``,
``"ivfpq"`` or any faiss factory string trade exactness for speed at scale and
are trained on the gallery itself the first time vectors are added.

faiss is imported lazily (``pip install aladin-fast[cpu]`` for faiss-cpu) so the
rest of aladin-fast works without it. With a CUDA build of faiss and a visible
GPU, searches run on a ``GpuIndex*`` copy of the index; the CPU index stays the
master copy for add/remove/save (``device="cuda"`` forces the GPU and raises if
it cannot be used, ``device="cpu"`` never uses it).

Threads: faiss runs its own OpenMP runtime (a separate thread pool from torch's), which by default uses
every core whatever ``torch.set_num_threads`` says. Each faiss call here (search, add, train) runs with
``StudentIndex.threads`` OpenMP threads, by default ``min(torch.get_num_threads(), faiss.omp_get_max_threads())``,
the CPU-thread budget the fused kernel already follows: on a loaded machine with fewer free cores than OpenMP
threads, faiss's spin-waiting barriers otherwise cost a scheduler time slice per call (a single-query search
over 16 vectors took ~8 ms instead of ~15 us). The setting is applied to the calling thread only (OpenMP's
thread count is per thread) and restored after the call, so concurrent searches and the caller's own faiss
setting are not disturbed.

Thread-safety: concurrent ``search`` calls are allowed (faiss CPU indexes are
safe for concurrent reads); ``add``/``remove``/``train`` take an exclusive lock
(a :class:`ReadWriteLock`: reentrant reads, writer preference). ``save`` holds
the read lock only while it copies the index in memory (faiss.clone_index); the file writes,
fsyncs and hashes run without it.
"""
from __future__ import annotations

import json
import math
import os
import threading
import warnings
from contextlib import contextmanager
from typing import Optional, Tuple

import numpy as np
import torch

from .._inputs import check_positive_int
from ..info import MissingDependencyError
from .manifest import ManifestError, open_directory, save_directory

__all__ = ["StudentIndex", "ReadWriteLock", "import_faiss", "faiss_gpu_available", "as_float_matrix", "as_id_vector"]

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
METRICS = ("ip", "cosine", "l2")
INDEX_FILE = "index.faiss"
GPU_MAX_K = 2048  # faiss GPU k-selection limit
CONFIG_FILE = "config.json"


def import_faiss():
    """Import faiss or raise an ImportError that says how to install it."""
    try:
        import faiss  # noqa: F401
    except ImportError as err:  # pragma: no cover - faiss is installed in the test environment
        raise MissingDependencyError(
            "aladin_fast.retrieval.StudentIndex needs faiss: pip install 'aladin-fast[cpu]' (faiss-cpu) "
            "or a CUDA build of faiss for GPU search"
        ) from err
    return faiss


def faiss_gpu_available() -> Tuple[bool, str]:
    """``(available, reason)``: can searches run on a faiss GpuIndex here?"""
    faiss = import_faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return False, "the installed faiss has no GPU support (faiss-cpu build)"
    if not torch.cuda.is_available():
        return False, "CUDA is not available (torch.cuda.is_available() is False)"
    if faiss.get_num_gpus() < 1:
        return False, "faiss sees no GPU (faiss.get_num_gpus() == 0)"
    return True, "faiss GPU build and a CUDA device are present"


class ReadWriteLock:
    """Many concurrent readers or one writer; writers are not starved (new readers wait for a waiting writer).

    Nesting, per thread:

    * ``read()`` inside ``read()`` is reentrant: a thread that already holds the read lock gets it again at once,
      even while a writer waits (writer preference would otherwise deadlock it: the writer waits for this
      thread's outer read, this thread waits for the writer) -- e.g. a custom scorer that calls back into
      ``Retriever.search`` from inside a search.
    * ``read()`` or ``write()`` inside ``write()`` is granted at once (the thread already excludes everyone);
      the lock stays exclusive until the outermost ``write()`` ends.
    * ``write()`` inside ``read()`` (an upgrade) raises :class:`RuntimeError` instead of deadlocking: the
      thread would wait for all readers to leave, itself included. Two threads upgrading at once would
      deadlock each other whatever the lock did; release the read lock first.

    A ``write()`` interrupted while waiting (KeyboardInterrupt) stops holding new readers back.
    """

    def __init__(self):
        self._condition = threading.Condition(threading.Lock())
        self._readers = {}  # thread ident -> how many read() of that thread are open
        self._writer = None  # ident of the thread holding the write lock
        self._write_depth = 0
        self._waiting_writers = 0

    @contextmanager
    def read(self):
        me = threading.get_ident()
        with self._condition:
            if self._writer != me and me not in self._readers:  # nested reads never wait
                while self._writer is not None or self._waiting_writers:
                    self._condition.wait()
            self._readers[me] = self._readers.get(me, 0) + 1
        try:
            yield
        finally:
            with self._condition:
                depth = self._readers.pop(me) - 1
                if depth:
                    self._readers[me] = depth
                elif not self._readers:
                    self._condition.notify_all()

    @contextmanager
    def write(self):
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:
                self._write_depth += 1
            else:
                if me in self._readers:
                    raise RuntimeError(
                        "ReadWriteLock: this thread holds the read lock and asked for the write lock; upgrading "
                        "a read lock deadlocks (the writer would wait for its own read to end), so it is refused "
                        "-- e.g. Retriever.add/remove called from inside a search (a custom scorer): release the "
                        "read lock (finish the search) first")
                self._waiting_writers += 1
                try:
                    while self._writer is not None or self._readers:
                        self._condition.wait()
                except BaseException:  # interrupted while waiting (KeyboardInterrupt): stop holding new readers back
                    self._waiting_writers -= 1
                    self._condition.notify_all()
                    raise
                self._waiting_writers -= 1
                self._writer, self._write_depth = me, 1
        try:
            yield
        finally:
            with self._condition:
                self._write_depth -= 1
                if not self._write_depth:
                    self._writer = None
                    self._condition.notify_all()


def as_float_matrix(name: str, value, dim: Optional[int]) -> np.ndarray:
    """Embeddings (torch or numpy) -> C-contiguous float32 numpy ``[N, dim]``; errors name ``name``."""
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor [N, {dim or 'dim'}], got dtype {value.dtype}")
        value = value.detach().to("cpu", torch.float32).numpy()
    array = np.asarray(value)
    if array.dtype.kind != "f":
        raise TypeError(f"{name} must be floating [N, {dim or 'dim'}], got dtype {array.dtype}")
    if array.ndim != 2 or (dim is not None and array.shape[1] != dim):
        raise ValueError(f"{name} must have shape [N, {dim or 'dim'}], got {list(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.float32)


def as_id_vector(name: str, value, count: Optional[int] = None) -> np.ndarray:
    """Ids (torch, numpy or a sequence of ints) -> int64 numpy ``[N]``, non-negative."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.size == 0:
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer ids, got dtype {array.dtype}")
    if array.ndim != 1 or (count is not None and array.shape[0] != count):
        raise ValueError(f"{name} must have shape [{count if count is not None else 'N'}], got {list(array.shape)}")
    array = array.astype(np.int64)
    if array.size and int(array.min()) < 0:
        raise ValueError(f"{name} must be non-negative (-1 marks 'no result'), got min {int(array.min())}")
    return array


@contextmanager
def _omp_threads(faiss, threads: int):
    """Run the body with ``threads`` faiss OpenMP threads in this thread, then restore the previous count."""
    previous = faiss.omp_get_max_threads()
    if previous == threads:
        yield
        return
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def _sorted_member(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """bool per entry of ``values``: is it in ``sorted_values`` (ascending)? A binary search per value."""
    if not sorted_values.size:
        return np.zeros(values.shape[0], dtype=bool)
    position = np.minimum(np.searchsorted(sorted_values, values), sorted_values.size - 1)
    return sorted_values[position] == values


def _default_nlist(count: int) -> int:
    # ~4 sqrt(N) lists, but at least 39 training points per centroid (faiss's own warning threshold)
    return max(1, min(int(4 * math.sqrt(max(count, 1))), count // 39))


def _pq_subquantizers(dim: int) -> int:
    for m in (dim // 4, dim // 8, 16, 8, 4, 2, 1):  # ~4 dims per byte-sized code
        if m >= 1 and dim % m == 0 and m <= 64:
            return m
    return 1


class StudentIndex:
    """kNN index over student embeddings with int64 ids (faiss ``IndexIDMap2``).

    Args:
        dim: embedding size E.
        index: ``"flat"`` (exact, default), ``"ivf"`` (IVF-Flat), ``"hnsw"``
            (HNSW-Flat, no removal), ``"ivfpq"`` (IVF + product quantisation) or
            a faiss factory string such as ``"IVF256,SQ8"``.
        metric: ``"ip"`` (inner product; embeddings expected L2-normalised),
            ``"cosine"`` (normalises on add and search) or ``"l2"``.
        device: ``"auto"`` (GpuIndex when faiss has GPU support and CUDA is
            available), ``"cpu"`` or ``"cuda"`` / ``"cuda:N"`` (raises if impossible).
        nlist: IVF lists (default ~4 sqrt(N) of the N training vectors, at most N // 39: faiss
            wants 39 training points per centroid).
        nprobe: IVF lists visited per query (default max(1, nlist // 8)).
        hnsw_m / ef_search / ef_construction: HNSW graph degree and beam widths.
        pq_m / pq_bits: PQ sub-quantisers (default ~dim/4) and bits per code
            (default 8, fewer for small training sets).

    Attribute ``threads`` (default None, not saved): faiss OpenMP threads per
    call; None follows ``torch.get_num_threads()`` (see :meth:`faiss_threads`).
    """

    def __init__(
        self,
        dim: int,
        index: str = "flat",
        metric: str = "ip",
        device: str = "auto",
        *,
        nlist: Optional[int] = None,
        nprobe: Optional[int] = None,
        hnsw_m: int = 32,
        ef_search: int = 128,
        ef_construction: int = 200,
        pq_m: Optional[int] = None,
        pq_bits: Optional[int] = None,
    ):
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        if not isinstance(index, str) or not index:
            raise ValueError(f"index must be one of {list(INDEX_TYPES)} or a faiss factory string, got {index!r}")
        self._faiss = import_faiss()
        self.dim, self.index_type, self.metric = int(dim), index, metric
        self.options = dict(nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search,
                            ef_construction=ef_construction, pq_m=pq_m, pq_bits=pq_bits)
        self._device_auto = device == "auto"
        self.device = self._resolve_device(device)
        self._lock = ReadWriteLock()
        self._gallery_lock = None  # set by the first Retriever built on this index, shared by all of them
        self._gpu_lock = threading.Lock()  # GpuIndex objects are not safe for concurrent use
        self._cpu_index = None  # faiss IndexIDMap2, built when the training set size is known
        self._gpu_index = None
        self._gpu_stale = True
        self._description = None
        # (faiss index, ntotal, its ids sorted): the duplicate check of add() and contains() search it instead of
        # copying and sorting every id on each call; kept up to date by add/remove, rebuilt when stale
        self._id_table = None
        self.threads: Optional[int] = None  # faiss OpenMP threads per call; None: see faiss_threads()
        if self.index_type in ("flat", "hnsw") or self.index_type not in INDEX_TYPES:
            self._cpu_index = self._build(0)

    # ----------------------------------------------------------------- setup
    def _resolve_device(self, device: str) -> str:
        if device == "cpu":
            return "cpu"
        available, reason = faiss_gpu_available()
        if device == "auto":
            return "cuda:0" if available else "cpu"
        if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
            if not available:
                raise RuntimeError(f"device={device!r} was requested for StudentIndex but {reason}")
            gpu = int(device.split(":")[1]) if ":" in device else 0
            if gpu >= self._faiss.get_num_gpus():
                raise RuntimeError(f"device={device!r}: faiss sees only {self._faiss.get_num_gpus()} GPU(s)")
            return f"cuda:{gpu}"
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")

    def _factory_string(self, train_count: int) -> str:
        o = self.options
        if self.index_type == "flat":
            return "Flat"
        if self.index_type == "hnsw":
            return f"HNSW{o['hnsw_m']},Flat"
        nlist = o["nlist"] or _default_nlist(train_count)
        if self.index_type == "ivf":
            return f"IVF{nlist},Flat"
        if self.index_type == "ivfpq":
            m = o["pq_m"] or _pq_subquantizers(self.dim)
            if self.dim % m:
                raise ValueError(f"pq_m must divide dim={self.dim}, got {m}")
            bits = o["pq_bits"] or max(1, min(8, int(math.log2(max(train_count, 2) / 4))))
            return f"IVF{nlist},PQ{m}x{bits}"
        if self.index_type.upper().startswith("IDMAP"):  # we add the IDMap2 wrapper ourselves
            return self.index_type.split(",", 1)[1] if "," in self.index_type else "Flat"
        return self.index_type  # a user factory string

    def _build(self, train_count: int):
        faiss = self._faiss
        metric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        description = self._factory_string(train_count)
        try:
            inner = faiss.index_factory(self.dim, description, metric)
        except RuntimeError as err:
            raise ValueError(f"index={self.index_type!r}: faiss cannot build {description!r}: {err}") from err
        concrete = faiss.downcast_index(inner)
        hnsw = getattr(concrete, "hnsw", None)
        if hnsw is not None:
            hnsw.efConstruction = self.options["ef_construction"]
        if getattr(concrete, "do_polysemous_training", False):
            # polysemous codes only help Hamming-filtered search, which we do not use; training them is slow
            concrete.do_polysemous_training = False
        self._description = description
        return faiss.IndexIDMap2(inner)

    def _apply_search_params(self, index) -> None:
        faiss = self._faiss
        inner = faiss.downcast_index(index.index)
        try:
            ivf = faiss.extract_index_ivf(inner)
        except RuntimeError:
            ivf = None
        if ivf is not None:
            ivf.nprobe = self.options["nprobe"] or max(1, ivf.nlist // 8)
        hnsw = getattr(inner, "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = self.options["ef_search"]

    def faiss_threads(self) -> int:
        """OpenMP threads faiss uses for this index's calls from the calling thread: :attr:`threads` when set,
        else ``min(torch.get_num_threads(), faiss.omp_get_max_threads())`` (torch's CPU-thread budget, which the
        fused kernel follows too, capped by faiss's own setting)."""
        if self.threads is not None:
            return max(1, int(self.threads))
        return max(1, min(torch.get_num_threads(), self._faiss.omp_get_max_threads()))

    # ----------------------------------------------------------- properties
    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return 0 if self._cpu_index is None else int(self._cpu_index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def is_trained(self) -> bool:
        return self._cpu_index is not None and bool(self._cpu_index.is_trained)

    @property
    def supports_remove(self) -> bool:
        """HNSW graphs cannot delete vectors in faiss."""
        return "HNSW" not in self.factory_string

    @property
    def factory_string(self) -> str:
        """The faiss factory string of the (built or future) index, without the IDMap2 wrapper."""
        return self._description or self._factory_string(max(self.ntotal, 1))

    def ids(self) -> np.ndarray:
        """All ids in the index, int64 ``[ntotal]`` (storage order)."""
        with self._lock.read():
            if self._cpu_index is None:
                return np.zeros(0, dtype=np.int64)
            return self._faiss.vector_to_array(self._cpu_index.id_map).astype(np.int64)

    def contains(self, ids) -> np.ndarray:
        """bool ``[N]``: which of ``ids`` are in the index."""
        id_array = as_id_vector("ids", ids)
        with self._lock.read():
            return _sorted_member(self._sorted_ids(), id_array)

    def _sorted_ids(self) -> np.ndarray:
        """The ids of the index, sorted (caller holds a lock): the cached table when it still describes the
        index (same faiss object, same count), else rebuilt once -- O(N log N) -- and cached."""
        index = self._cpu_index
        if index is None:
            return np.zeros(0, dtype=np.int64)
        table = self._id_table
        if table is not None and table[0] is index and table[1] == index.ntotal:
            return table[2]
        ids = np.sort(self._faiss.vector_to_array(index.id_map).astype(np.int64))
        self._id_table = (index, int(index.ntotal), ids)
        return ids

    # ------------------------------------------------------------- mutation
    def _prepare(self, name: str, embeddings) -> np.ndarray:
        matrix = as_float_matrix(name, embeddings, self.dim)
        if self.metric == "cosine" and matrix.size:
            norms = np.linalg.norm(matrix, axis=1, keepdims=True)
            matrix = matrix / np.maximum(norms, 1e-12)
        return np.ascontiguousarray(matrix, dtype=np.float32)

    def train(self, embeddings) -> None:
        """Train IVF/PQ quantisers on ``embeddings [N, dim]`` (a no-op for flat and HNSW)."""
        matrix = self._prepare("embeddings", embeddings)
        with self._lock.write(), _omp_threads(self._faiss, self.faiss_threads()):
            self._train_locked(matrix)

    def _train_locked(self, matrix: np.ndarray) -> None:
        if self._cpu_index is not None and self._cpu_index.is_trained:
            return
        index = self._build(matrix.shape[0]) if self._cpu_index is None else self._cpu_index
        needed = getattr(self._faiss.downcast_index(index.index), "nlist", 1)
        if matrix.shape[0] < needed:
            raise ValueError(
                f"index={self.index_type!r} needs at least {needed} training vectors (one per IVF list), "
                f"got {matrix.shape[0]}; pass a smaller nlist= or use index='flat'"
            )
        index.train(matrix)
        self._apply_search_params(index)
        self._cpu_index, self._gpu_stale = index, True

    def add(self, embeddings, ids) -> None:
        """Add ``embeddings [N, dim]`` (float, torch or numpy) under int64 ``ids [N]`` (new, unique).

        An untrained IVF/PQ index is first trained on these embeddings.
        """
        matrix = self._prepare("embeddings", embeddings)
        id_array = as_id_vector("ids", ids, matrix.shape[0])
        if np.unique(id_array).size != id_array.size:
            raise ValueError("ids must be unique within one add() call")
        if not id_array.size:
            return
        with self._lock.write(), _omp_threads(self._faiss, self.faiss_threads()):
            if self._cpu_index is None or not self._cpu_index.is_trained:
                self._train_locked(matrix)
            existing = self._sorted_ids()  # O(log N) per id, not a copy and sort of every id per call
            new_ids = np.sort(id_array)
            clash = new_ids[_sorted_member(existing, new_ids)]
            if clash.size:
                raise ValueError(f"ids already in the index: {clash[:8].tolist()}{' ...' if clash.size > 8 else ''}")
            self._cpu_index.add_with_ids(matrix, id_array)
            self._gpu_stale = True
            if self._cpu_index.ntotal == existing.size + new_ids.size:
                self._id_table = (self._cpu_index, int(self._cpu_index.ntotal),
                                  np.insert(existing, np.searchsorted(existing, new_ids), new_ids))

    def remove(self, ids) -> int:
        """Remove ``ids`` (unknown ids are ignored); returns how many were removed."""
        id_array = as_id_vector("ids", ids)
        if not self.supports_remove:
            raise NotImplementedError(
                f"index={self.index_type!r} (HNSW) does not support removal in faiss; rebuild the index without those ids"
            )
        if not id_array.size or self._cpu_index is None:
            return 0
        with self._lock.write():
            lists = self._ivf_lists()
            if lists is not None:  # positions of the removed ids, before the removal closes their gaps
                gone = np.nonzero(np.isin(self._faiss.vector_to_array(self._cpu_index.id_map), id_array))[0]
            existing = self._sorted_ids()
            removed = int(self._cpu_index.remove_ids(id_array))
            if lists is not None and gone.size:
                self._renumber(lists, gone)
            self._gpu_stale = True
            if removed:  # drop them from the sorted table: O(N) copy, no re-sort
                wanted = np.unique(id_array)
                positions = np.searchsorted(existing, wanted)[_sorted_member(existing, wanted)]
                if existing.size - positions.size == self._cpu_index.ntotal:  # else rebuilt when next needed
                    self._id_table = (self._cpu_index, int(self._cpu_index.ntotal), np.delete(existing, positions))
        return removed

    def _ivf_lists(self):
        """The inverted lists of an IVF index (inside any pre-transform), else None."""
        try:
            return self._faiss.extract_index_ivf(self._faiss.downcast_index(self._cpu_index.index)).invlists
        except RuntimeError:
            return None

    def _renumber(self, lists, gone: np.ndarray) -> None:
        """IndexIDMap2 names the inner index's entries by position 0..ntotal-1 and, on removal, closes the gaps
        in its id table; flat indexes shift their entries alike, but IVF lists keep each entry's old number, which
        then names another id (or none, and the next removal aborts on a faiss assertion). Shift each remaining
        number down by the count of removed positions (``gone``, sorted) before it."""
        faiss = self._faiss
        # in-memory lists (ArrayInvertedLists): their id vectors are shifted in place; other kinds get copies of
        # ids and codes written back (update_entries), which cost ~8x faiss's own remove_ids per call
        in_place = isinstance(faiss.downcast_InvertedLists(lists), faiss.ArrayInvertedLists)
        for number in range(lists.nlist):
            size = lists.list_size(number)
            if not size:
                continue
            if in_place:
                labels = faiss.rev_swig_ptr(lists.get_ids(number), size)  # a view of the list's own ids
                labels -= np.searchsorted(gone, labels)
                continue
            labels = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
            shifted = labels - np.searchsorted(gone, labels)
            if not np.array_equal(shifted, labels):
                codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size).copy()
                lists.update_entries(number, 0, size, faiss.swig_ptr(shifted), faiss.swig_ptr(codes))

    def reconstruct(self, ids) -> np.ndarray:
        """Stored vectors of ``ids`` as float32 ``[N, dim]`` (after cosine normalisation)."""
        id_array = as_id_vector("ids", ids)
        with self._lock.read():
            if not id_array.size or self._cpu_index is None:
                return np.zeros((0, self.dim), np.float32)
            return self._cpu_index.reconstruct_batch(id_array)

    # --------------------------------------------------------------- search
    def _searcher(self, k: int):
        """(index to search, lock to hold while searching it or None)."""
        if self.device == "cpu" or (k > GPU_MAX_K and self._device_auto):
            return self._cpu_index, None
        if k > GPU_MAX_K:
            raise ValueError(f"k={k} exceeds faiss's GPU limit of {GPU_MAX_K}; use device='cpu' or 'auto'")
        with self._gpu_lock:
            if self._gpu_stale or self._gpu_index is None:
                faiss = self._faiss
                if not hasattr(self, "_gpu_resources"):
                    self._gpu_resources = faiss.StandardGpuResources()
                try:
                    self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, int(self.device[5:]), self._cpu_index)
                except RuntimeError as err:
                    if not self._device_auto:
                        raise RuntimeError(f"StudentIndex(index={self.index_type!r}) cannot run on {self.device}: "
                                           f"{err}; use device='cpu'") from err
                    warnings.warn(f"faiss has no GPU version of {self.factory_string!r}; searching on the CPU")
                    self.device = "cpu"  # e.g. HNSW: stay on the CPU for good
                    return self._cpu_index, None
                self._gpu_stale = False
        return self._gpu_index, self._gpu_lock

    def search(self, queries, k: int, *, batch_size: int = 4096, progress: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` neighbours of each query.

        Args:
            queries: float ``[Nq, dim]`` (torch or numpy; Nq may be 0).
            k: neighbours per query (>= 1). Slots beyond what the index holds
                (or what IVF probing found) get id -1 and score -inf.
            batch_size: queries per faiss call (bounds the [batch, k] buffers).
            progress: show a tqdm progress bar over the batches.

        Returns:
            ``(scores [Nq, k] float32, ids [Nq, k] int64)`` as CPU torch tensors,
            best first. Scores are "higher is better": inner products for
            ``"ip"``/``"cosine"``, negative squared distances for ``"l2"``.
        """
        k = check_positive_int("k", k)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        matrix = self._prepare("queries", queries)
        count = matrix.shape[0]
        with self._lock.read(), _omp_threads(self._faiss, self.faiss_threads()):
            if count == 0 or self.ntotal == 0:
                return (torch.from_numpy(np.full((count, k), -np.inf, dtype=np.float32)),
                        torch.from_numpy(np.full((count, k), -1, dtype=np.int64)))
            index, serial = self._searcher(k)

            def run(rows):  # a GPU index is not safe for concurrent use: its searches are serialised
                if serial is None:
                    return index.search(rows, k)
                with serial:
                    return index.search(rows, k)

            if count <= batch_size and not progress:  # one faiss call: its own output arrays, no staging copy
                scores, ids = run(matrix)
                scores, ids = np.asarray(scores, np.float32), np.asarray(ids, np.int64)
            else:
                scores = np.full((count, k), -np.inf, dtype=np.float32)
                ids = np.full((count, k), -1, dtype=np.int64)
                starts = range(0, count, batch_size)
                if progress:
                    from tqdm.auto import tqdm

                    starts = tqdm(starts, total=math.ceil(count / batch_size), desc="student search", unit="batch")
                for start in starts:
                    stop = min(count, start + batch_size)
                    scores[start:stop], ids[start:stop] = run(matrix[start:stop])
        missing = ids < 0
        if self.metric == "l2":
            scores = -scores
        scores[missing] = -np.inf
        return torch.from_numpy(scores), torch.from_numpy(ids)

    # ---------------------------------------------------------- persistence
    def config(self) -> dict:
        """JSON-serialisable description (type, dims, metric, options, count)."""
        return {"backend": "faiss", "dim": self.dim, "index": self.index_type, "metric": self.metric,
                "options": dict(self.options), "count": self.ntotal, "trained": self.is_trained,
                "factory_string": self.factory_string}

    def write_payload(self, folder: str) -> dict:
        """Write ``index.faiss`` + ``config.json`` into ``folder`` (used by the savers)."""
        return self._snapshot_payload()(folder)

    def _snapshot_payload(self):
        """Copy the index as it is now (a faiss clone, under the read lock, so one state) and return
        ``write(folder) -> config``, which writes that copy later without any lock: a save's slow file writes,
        fsyncs and hashes then never hold back ``add`` / ``remove`` (nor, behind a waiting writer, searches).

        The copy is a ``faiss.clone_index`` (the index's size, briefly), streamed to the file by ``write``:
        ``serialize_index`` -- kept for index types faiss cannot clone -- peaked at twice the index's size
        (its growing byte vector, then a numpy copy of it)."""
        faiss = self._faiss
        with self._lock.read():
            config = self.config()
            clone = data = None
            if self._cpu_index is not None:
                try:
                    clone = faiss.clone_index(self._cpu_index)
                except RuntimeError:  # a type faiss cannot clone: its serialisation
                    data = faiss.serialize_index(self._cpu_index)

        def write(folder: str) -> dict:
            with open(os.path.join(folder, CONFIG_FILE), "w") as handle:
                json.dump(config, handle, indent=2, sort_keys=True)
            if clone is not None or data is not None:  # the bytes faiss.write_index writes
                with open(os.path.join(folder, INDEX_FILE), "wb") as handle:
                    if clone is not None:
                        faiss.write_index(clone, faiss.PyCallbackIOWriter(handle.write))
                    else:
                        handle.write(memoryview(data))
            return dict(config)

        return write

    @classmethod
    def read_payload(cls, folder: str, meta: dict, device: str = "auto") -> "StudentIndex":
        """Rebuild from a folder written by :meth:`write_payload`, checking it against ``meta``."""
        with open(os.path.join(folder, CONFIG_FILE)) as handle:
            config = json.load(handle)
        index = cls(config["dim"], config["index"], config["metric"], device=device, **config["options"])
        path = os.path.join(folder, INDEX_FILE)
        if os.path.exists(path):
            try:
                loaded = index._faiss.read_index(path)
            except RuntimeError as err:
                raise ManifestError(f"{path!r} is not a readable faiss index: {err}") from err
            if not isinstance(loaded, index._faiss.IndexIDMap2) or loaded.d != index.dim:
                raise ManifestError(f"{path!r} holds a {type(loaded).__name__} of dim {loaded.d}, expected IndexIDMap2 of dim {index.dim}")
            index._cpu_index = loaded
            index._description = config.get("factory_string")
            index._apply_search_params(loaded)
        for key in ("dim", "count", "metric"):
            if key in meta and meta[key] != getattr(index, "ntotal" if key == "count" else key):
                raise ManifestError(f"saved student index: manifest says {key}={meta[key]!r} but the files hold "
                                    f"{getattr(index, 'ntotal' if key == 'count' else key)!r}")
        return index

    def save(self, path: str) -> None:
        """Save to directory ``path`` atomically (manifest with checksums; see :mod:`.manifest`)."""
        save_directory(path, "student_index", {}, self.write_payload)

    @classmethod
    def load(cls, path: str, *, device: str = "auto", verify: bool = True) -> "StudentIndex":
        """Load a directory written by :meth:`save`; raises ManifestError on corruption or mismatch."""
        folder, meta = open_directory(path, "student_index", verify=verify)
        return cls.read_payload(folder, meta, device=device)

    def __repr__(self) -> str:
        return (f"StudentIndex(dim={self.dim}, index={self.index_type!r}, metric={self.metric!r}, "
                f"device={self.device!r}, ntotal={self.ntotal})")
