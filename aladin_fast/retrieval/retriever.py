"""Two-stage retrieval: student kNN shortlist, then the fused teacher rerank.

``Retriever.search`` runs, for a batch of queries,

1. the student index: top-``rerank_k`` gallery ids per query from the pooled
   global embeddings (cheap: one inner product per gallery item);
2. one gather of the *unique* shortlisted ids from the feature store (each
   gallery item read once per batch even when many queries share it), with the
   shortlist remapped into positions of that gathered batch -- or, for
   text->image on CPU with a single-shard store, no copy at all: the whole
   (memory-mapped) store is passed to the kernel in packed layout and the
   shortlist as store rows, so the kernel reads only the candidates' regions;
3. ONE batched :func:`aladin_fast.rerank_scores` call (the fused C++ / Triton
   kernel) on all (query, candidate) pairs;
4. top-``k`` of the teacher scores (stable sort: ties keep the student order; NaN scores last).

Directions. The teacher score is asymmetric in the roles of words and regions
(MrSw = sum over a caption's words of the max over an image's regions), and
``rerank_scores`` takes the caption side first. Text->image passes the query
words as ``text`` and the gathered regions as ``images``. Image->text must
score the same function of (caption, image), so it passes the gathered caption
words as ``text`` (one row per (query, candidate) pair, expanded in memory from
the unique gather) and the query images' regions as ``images``, with each row's
single candidate being its query. Both directions therefore run the very same
kernel on the very same operands for a given pair and return bit-identical
scores, for every aggregation and padding mode, and explanations are always
word -> region.

A :class:`Retriever` is safe to share between threads: searches run
concurrently (read lock), ``add``/``remove`` are exclusive (write lock). The
lock belongs to the gallery, not to the Retriever object: it is kept on the
feature store and the student index (``_gallery_lock``), so several Retrievers
built on the same components exclude each other's ``add``/``remove`` too (see
:class:`Retriever`). Reads are reentrant per thread (a scorer may call back into
``search``); ``add``/``remove`` from inside a search raise RuntimeError instead
of deadlocking. ``save`` holds the read lock only while it snapshots index and
store; it writes, fsyncs and hashes the files after releasing it.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .. import alignment_scores, rerank_scores
from ..ops.streaming import best_first, merge_best
from .feature_store import FeatureStore
from .index import ReadWriteLock, StudentIndex, as_float_matrix, as_id_vector
from .manifest import ManifestError, open_directory, save_directory

__all__ = ["Retriever", "TeacherScorer", "DIRECTIONS"]

DIRECTIONS = ("text_to_image", "image_to_text")
RETRIEVER_FILE = "retriever.json"


@dataclass(frozen=True)
class TeacherScorer:
    """The fine-grained teacher: :func:`aladin_fast.rerank_scores` with fixed options.

    Called as ``scorer(text, images, candidates, text_lengths, image_lengths,
    return_argmax=bool)`` -> ``scores [Nt, K]`` float32 (and ``argmax [Nt, K, W]``
    int32 when ``return_argmax``): the signature of :func:`aladin_fast.rerank_scores`,
    so ``functools.partial(aladin_fast.rerank_scores, ...)`` or any callable with
    that signature can replace it (``search_exhaustive`` then reranks against
    every gallery chunk instead of calling ``all_pairs``).
    """

    aggregation: str = "MrSw"
    padding: str = "neg_inf"
    normalize: bool = False
    backend: str = "auto"

    def __call__(self, text, images, candidates, text_lengths=None, image_lengths=None, return_argmax=False, *,
                 image_cu_seqlens=None):
        return rerank_scores(
            text, images, candidates, text_lengths, image_lengths, aggregation=self.aggregation,
            padding=self.padding, normalize=self.normalize, backend=self.backend, return_argmax=return_argmax,
            image_cu_seqlens=image_cu_seqlens,
        )

    def reads_in_place(self, device: torch.device) -> bool:
        """Can the kernel read candidates straight from a whole packed store (no gather copy)?

        Only the C++ kernel on CPU without ``normalize`` (which would copy the
        whole store) and with neg_inf padding (zero padding depends on the pad width).
        """
        return device.type == "cpu" and self.backend in ("auto", "cpu") and not self.normalize and self.padding == "neg_inf"

    def all_pairs(self, text, images, text_lengths, image_lengths):
        """Exhaustive scores ``[Nt, Ni]`` with the same options (:func:`aladin_fast.alignment_scores`)."""
        return alignment_scores(
            text, images, text_lengths, image_lengths, aggregation=self.aggregation,
            padding=self.padding, normalize=self.normalize, backend=self.backend,
        )

    def config(self) -> dict:
        return {"type": "TeacherScorer", **asdict(self)}


_LOCK_ADOPTION = threading.Lock()  # two Retrievers built at once on the same components agree on one lock


def _gallery_lock(student_index, feature_store: FeatureStore) -> ReadWriteLock:
    """The one lock of the gallery made of ``student_index`` + ``feature_store``, shared by every Retriever on them.

    It is kept on the components (``_gallery_lock``): the first Retriever creates it and attaches it to both; a
    later one adopts the lock of whichever component already has one (the store's when both do and agree)
    and attaches it to the other. Components that already carry two different locks (each was part of
    another gallery) cannot be made to exclude each other's retrievers with one lock: that raises."""
    with _LOCK_ADOPTION:
        store_lock = getattr(feature_store, "_gallery_lock", None)
        index_lock = getattr(student_index, "_gallery_lock", None)
        if store_lock is not None and index_lock is not None and store_lock is not index_lock:
            raise ValueError(
                "student_index and feature_store already belong to Retrievers over other galleries (each carries "
                "another gallery lock), so no single lock would keep all those Retrievers consistent; build this "
                "Retriever on the components of one existing Retriever, or on fresh ones")
        lock = store_lock if store_lock is not None else index_lock if index_lock is not None else ReadWriteLock()
        feature_store._gallery_lock = lock
        if index_lock is None:
            try:
                student_index._gallery_lock = lock
            except AttributeError:  # a stand-in index without attribute storage: the store's lock still serves
                pass
        return lock


def _check_count(name: str, value, minimum: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class Retriever:
    """Student kNN + fused teacher rerank over one gallery, in one direction.

    Args:
        student_index: :class:`StudentIndex` (or :class:`MilvusStudentIndex`)
            over the gallery's global embeddings.
        feature_store: :class:`FeatureStore` with the gallery's tokens under the
            same ids (regions per image for text->image, words per caption for
            image->text).
        scorer: :class:`TeacherScorer` (default: MrSw, neg_inf padding, auto
            backend) or a callable with its signature.
        direction: ``"text_to_image"`` (queries are captions) or
            ``"image_to_text"`` (queries are images).
        check_ids: verify that index and store hold exactly the same ids.
        zero_copy: text->image on CPU with a single-shard store: let the kernel
            read the candidates' regions in place from the whole store (packed
            layout, candidates as store rows) instead of gathering a copy;
            scores are identical, the copy (and its memory) is saved.

    Thread-safety: one reader-writer lock per gallery, kept on the components:
    every Retriever built on the same ``feature_store`` (or the same
    ``student_index``) uses the same lock, so ``add``/``remove`` through one of
    them never interleave with ``search``/``save`` through another. Building a
    Retriever on an index and a store that already belong to two different
    galleries raises ValueError. Changing the index or the store directly (not
    through a Retriever) bypasses that lock.
    """

    def __init__(self, student_index, feature_store: FeatureStore, scorer: Optional[Callable] = None, *,
                 direction: str = "text_to_image", check_ids: bool = True, zero_copy: bool = True):
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
        if not isinstance(feature_store, FeatureStore):
            raise TypeError(f"feature_store must be a FeatureStore, got {type(feature_store).__name__}")
        if scorer is not None and not callable(scorer):
            raise TypeError(f"scorer must be callable (e.g. TeacherScorer(...)), got {type(scorer).__name__}")
        if student_index.ntotal != feature_store.count:
            raise ValueError(f"student_index holds {student_index.ntotal} items but feature_store holds "
                             f"{feature_store.count}; they must index the same gallery")
        if check_ids and not np.array_equal(np.sort(student_index.ids()), feature_store.ids()):
            raise ValueError("student_index and feature_store hold different ids; they must index the same gallery")
        self.student_index = student_index
        self.feature_store = feature_store
        self.scorer = scorer if scorer is not None else TeacherScorer()
        self.direction = direction
        self.zero_copy = bool(zero_copy)
        self._lock = _gallery_lock(student_index, feature_store)

    @property
    def count(self) -> int:
        return self.feature_store.count

    # ------------------------------------------------------------- mutation
    def add(self, ids, embeddings, tokens, lengths=None, *, cu_seqlens=None) -> None:
        """Add gallery items to both the index (``embeddings [N, E]``) and the store (tokens as in
        :meth:`FeatureStore.append`); on failure neither is changed."""
        id_array = as_id_vector("ids", ids)
        # the store checks and converts the tokens before the index changes: an index that cannot remove
        # (HNSW) could not take back its add if the store refused them afterwards
        batch = self.feature_store._prepare_append(id_array, tokens, lengths, cu_seqlens)
        with self._lock.write():
            self.student_index.add(embeddings, id_array)
            try:
                self.feature_store._commit_append(*batch)
            except BaseException:
                self.student_index.remove(id_array)
                raise

    def remove(self, ids) -> int:
        """Remove ids from index and store; returns how many were removed from the store."""
        id_array = as_id_vector("ids", ids)
        with self._lock.write():
            try:
                self.student_index.remove(id_array)
            except BaseException:
                # the index may have removed some or all of them before it failed (a Milvus delete that
                # landed, then timed out): drop from the store what the index no longer holds, so the two
                # still index the same gallery, and report the failure
                with contextlib.suppress(Exception):
                    self.feature_store.remove(id_array[~self.student_index.contains(id_array)])
                raise
            return self.feature_store.remove(id_array)

    # --------------------------------------------------------------- search
    def _check_queries(self, query_embeddings, query_tokens, query_lengths):
        if not isinstance(query_tokens, torch.Tensor):
            raise TypeError(f"query_tokens must be a torch.Tensor [Nq, L, D], got {type(query_tokens).__name__}")
        if query_tokens.ndim != 3 or query_tokens.shape[2] != self.feature_store.dim:
            raise ValueError(f"query_tokens must have shape [Nq, L, {self.feature_store.dim}], got {list(query_tokens.shape)}")
        embeddings = as_float_matrix("query_embeddings", query_embeddings, None)
        count = query_tokens.shape[0]
        if embeddings.shape[0] != count:
            raise ValueError(f"query_embeddings has {embeddings.shape[0]} rows but query_tokens has {count}")
        if query_lengths is None:
            query_lengths = torch.full((count,), query_tokens.shape[1], dtype=torch.int64)
        query_lengths = torch.as_tensor(query_lengths)
        if query_lengths.shape != (count,) or query_lengths.is_floating_point() or query_lengths.dtype == torch.bool:
            raise ValueError(f"query_lengths must be int [{count}], got {query_lengths.dtype} {list(query_lengths.shape)}")
        return embeddings, query_tokens, query_lengths.to(query_tokens.device)

    def _in_place_view(self, device: torch.device, candidate_ids: torch.Tensor):
        """The store's zero-copy packed view and the candidates' rows in it (one snapshot) when text->image
        scoring can read it in place, else None."""
        if not (self.zero_copy and self.direction == "text_to_image" and isinstance(self.scorer, TeacherScorer)
                and self.scorer.reads_in_place(device)):
            return None
        return self.feature_store.packed_rows(candidate_ids)

    def _rerank(self, query_tokens, query_lengths, gathered, gathered_lengths, local, want_argmax):
        """Teacher scores ``[Nq, K]`` (and argmax ``[Nq, K, W]``) of each query against its candidates."""
        if self.direction == "text_to_image":
            out = self.scorer(query_tokens, gathered, local, query_lengths, gathered_lengths, return_argmax=want_argmax)
            return out if want_argmax else (out, None)
        count, width = local.shape
        rows = local.reshape(-1)  # one caption row per (query, candidate) pair, captions-first for the kernel
        owners = torch.arange(count, device=local.device).repeat_interleave(width)[:, None]
        out = self.scorer(gathered[rows], query_tokens, owners, gathered_lengths[rows], query_lengths,
                          return_argmax=want_argmax)
        scores, argmax = out if want_argmax else (out, None)
        return scores.view(count, width), (None if argmax is None else argmax.view(count, width, -1))

    def search(self, query_embeddings, query_tokens: torch.Tensor, query_lengths=None, k: int = 10,
               rerank_k: int = 100, return_explanations: bool = False, *, student_batch_size: int = 4096):
        """Two-stage search for a batch of queries.

        Args:
            query_embeddings: student embeddings ``[Nq, E]`` (torch or numpy).
            query_tokens: fine-grained tokens ``[Nq, L, D]`` padded (caption
                words for text->image, image regions for image->text), any
                float dtype (cast to the store dtype). Scoring runs on their
                device (CUDA -> Triton kernel).
            query_lengths: valid tokens per query, int ``[Nq]`` (None: all L).
            k: hits returned per query.
            rerank_k: student shortlist size reranked by the teacher (>= k;
                capped at the gallery size).
            return_explanations: also return, for every hit, the winning
                region per caption word.
            student_batch_size: queries per student-index call.

        Returns:
            ``ids [Nq, k]`` int64 and ``scores [Nq, k]`` float32 (teacher
            scores, best first), CPU tensors; slots beyond the gallery size (or
            the shortlist the student found) hold id -1 and score -inf. With
            ``return_explanations`` also ``alignments [Nq, k, W]`` int32: for hit
            j of query q, the region index (within the image) best matching each
            word of the caption; W is the query pad for text->image and the
            longest gallery caption for image->text; -1 for padded words.
        """
        k = _check_count("k", k, 1)
        rerank_k = _check_count("rerank_k", rerank_k, 1)
        if rerank_k < k:
            raise ValueError(f"rerank_k (= {rerank_k}) must be >= k (= {k}): the teacher can only return reranked hits")
        embeddings, query_tokens, query_lengths = self._check_queries(query_embeddings, query_tokens, query_lengths)
        count = embeddings.shape[0]
        store = self.feature_store
        with self._lock.read():
            ids = torch.full((count, k), -1, dtype=torch.int64)
            scores = torch.full((count, k), float("-inf"), dtype=torch.float32)
            if self.direction == "text_to_image":
                width = query_tokens.shape[1]
            else:
                width = store.max_length
            alignments = torch.full((count, k, width), -1, dtype=torch.int32) if return_explanations else None
            shortlist = min(rerank_k, store.count)
            if count == 0 or shortlist == 0:
                return (ids, scores, alignments) if return_explanations else (ids, scores)
            _, candidate_ids = self.student_index.search(embeddings, shortlist, batch_size=student_batch_size)
            valid = candidate_ids >= 0  # IVF/HNSW may find fewer than asked
            found = int(valid.sum())
            if not found:
                return (ids, scores, alignments) if return_explanations else (ids, scores)
            # a full shortlist (the usual case, always with a flat index): no boolean-mask copies
            all_valid = found == valid.numel()
            device = query_tokens.device
            local = torch.zeros_like(candidate_ids)
            wanted = candidate_ids.reshape(-1) if all_valid else candidate_ids[valid]
            view = self._in_place_view(device, wanted)
            if view is not None:  # the kernel reads candidates straight from the (memory-mapped) store
                tokens, cu_seqlens, rows = view
                if all_valid:
                    local = rows.view(candidate_ids.shape)
                else:
                    local[valid] = rows
                out = self.scorer(query_tokens.to(store.dtype), tokens, local, query_lengths, None,
                                  return_argmax=return_explanations, image_cu_seqlens=cu_seqlens)
                teacher, argmax = out if return_explanations else (out, None)
            else:  # gather each unique candidate once, remap the shortlist into that batch
                unique_ids, inverse = torch.unique(wanted, return_inverse=True)
                if all_valid:
                    local = inverse.view(candidate_ids.shape)
                else:
                    local[valid] = inverse
                pad_to = store.pad_width if getattr(self.scorer, "padding", "neg_inf") == "zero" else None
                gathered, gathered_lengths = store.gather(unique_ids, pad_to=pad_to, device=device)
                teacher, argmax = self._rerank(query_tokens.to(store.dtype), query_lengths, gathered, gathered_lengths,
                                               local.to(device), return_explanations)
            teacher = teacher.float().cpu().masked_fill(~valid, float("-inf"))
            # NaN teacher scores after every number; empty slots (NaN here, -inf below) after those
            order = best_first(teacher.masked_fill(~valid, float("nan")), k)
            hits = order.shape[1]
            top_ids = torch.gather(candidate_ids, 1, order)
            top_valid = torch.gather(valid, 1, order)
            ids[:, :hits] = top_ids.masked_fill(~top_valid, -1)
            scores[:, :hits] = torch.gather(teacher, 1, order).masked_fill(~top_valid, float("-inf"))
            if return_explanations:
                argmax = argmax.cpu()
                picked = torch.gather(argmax, 1, order[:, :, None].expand(-1, -1, argmax.shape[2]))
                # image->text with zero padding gathers captions padded to the store's pad_width, which removals do
                # not shrink: the words past the longest live caption (the explanations' width) are padding (-1)
                picked = picked[:, :, :width]
                alignments[:, :hits, :picked.shape[2]] = picked.masked_fill(~top_valid[:, :, None], -1)
                return ids, scores, alignments
            return ids, scores

    def search_exhaustive(self, query_tokens: torch.Tensor, query_lengths=None, k: int = 10, *, chunk: int = 1024):
        """Baseline: teacher-score every gallery item (chunks of ``chunk`` items), return top-``k``.

        Returns ``ids [Nq, k]`` int64 and ``scores [Nq, k]`` float32, as :meth:`search`.
        """
        k = _check_count("k", k, 1)
        chunk = _check_count("chunk", chunk, 1)
        dummy = np.zeros((query_tokens.shape[0] if isinstance(query_tokens, torch.Tensor) else 0, 1), np.float32)
        _, query_tokens, query_lengths = self._check_queries(dummy, query_tokens, query_lengths)
        count = query_tokens.shape[0]
        best_scores = torch.full((count, 0), float("-inf"))
        best_ids = torch.full((count, 0), -1, dtype=torch.int64)
        all_pairs = getattr(self.scorer, "all_pairs", None)
        with self._lock.read():
            # zero padding depends on the pad width: pad every chunk to the store's pad_width, as search() does,
            # so scores do not depend on which items share a chunk
            pad_to = self.feature_store.pad_width if getattr(self.scorer, "padding", "neg_inf") == "zero" else None
            gallery_ids = torch.from_numpy(self.feature_store.ids())
            queries = query_tokens.to(self.feature_store.dtype)
            for start in range(0, gallery_ids.numel() if count else 0, chunk):
                chunk_ids = gallery_ids[start:start + chunk]
                tokens, lengths = self.feature_store.gather(chunk_ids, pad_to=pad_to, device=queries.device)
                if all_pairs is None:  # custom scorer: rerank against every chunk item
                    every = torch.arange(chunk_ids.numel(), device=queries.device).expand(count, -1)
                    block = (self.scorer(queries, tokens, every, query_lengths, lengths, return_argmax=False)
                             if self.direction == "text_to_image" else self._rerank(
                                 queries, query_lengths, tokens, lengths, every, False)[0])
                elif self.direction == "text_to_image":
                    block = all_pairs(queries, tokens, query_lengths, lengths)
                else:
                    block = all_pairs(tokens, queries, lengths, query_lengths).T
                best_scores, best_ids = merge_best(best_scores, best_ids, block.float().cpu(), chunk_ids, k)
        ids = torch.full((count, k), -1, dtype=torch.int64)
        scores = torch.full((count, k), float("-inf"))
        ids[:, :best_ids.shape[1]], scores[:, :best_scores.shape[1]] = best_ids, best_scores
        return ids, scores

    # ---------------------------------------------------------- persistence
    def save(self, path: str) -> None:
        """Save index, store and settings to directory ``path`` atomically, with checksums.

        Layout: ``manifest.json`` + ``payload-*/{retriever.json, student/, features/}``
        (see :mod:`aladin_fast.retrieval.manifest`).

        The saved directory holds one state of the gallery (index and store with the same ids). The read lock
        is held only while that state is snapshotted -- the store's current layout (O(1): its arrays are never
        written in place) and an in-memory copy (clone) of a faiss index -- not while the files are written,
        fsynced and hashed, so an ``add``/``remove`` waiting for the save (and the searches queued behind such
        a writer) are not held up for the whole save. The snapshot is taken under the directory's save lock:
        of two saves to one path, the later snapshot is the one committed last.
        """
        scorer_config = self.scorer.config() if hasattr(self.scorer, "config") else {"type": "custom", "repr": repr(self.scorer)}

        def write(folder):
            student, features = os.path.join(folder, "student"), os.path.join(folder, "features")
            os.makedirs(student)
            os.makedirs(features)
            snapshot_index = getattr(self.student_index, "_snapshot_payload", None)
            index_meta = None
            with self._lock.read():  # one state of index + store; the slow part runs after the lock is released
                if snapshot_index is not None:
                    write_index = snapshot_index()
                else:  # an index without snapshots (e.g. Milvus: a small settings file) writes under the lock
                    index_meta = self.student_index.write_payload(student)
                write_store = self.feature_store._snapshot_payload()
            if index_meta is None:
                index_meta = write_index(student)
            store_meta = write_store(features)
            with open(os.path.join(folder, RETRIEVER_FILE), "w") as handle:
                json.dump({"direction": self.direction, "scorer": scorer_config}, handle, indent=2, sort_keys=True)
            return {"count": store_meta["count"], "student_index": index_meta, "feature_store": store_meta}

        meta = {"direction": self.direction, "scorer": scorer_config, "embedding_dim": self.student_index.dim,
                "token_dim": self.feature_store.dim, "metric": self.student_index.metric,
                "dtype": self.feature_store.dtype_name}
        save_directory(path, "retriever", meta, write)

    @classmethod
    def load(cls, path: str, *, device: str = "auto", mmap: bool = True, verify: bool = True,
             scorer: Optional[Callable] = None, milvus_client=None) -> "Retriever":
        """Load a directory written by :meth:`save`.

        Args:
            device: student index device (``"auto"``, ``"cpu"``, ``"cuda"``).
            mmap: memory-map the feature files instead of reading them.
            verify: check every file's SHA-256 (sizes and shapes are always checked).
            scorer: required when the saved retriever used a custom scorer.
            milvus_client: an existing MilvusClient for a Milvus-backed index.

        Raises:
            ManifestError: corruption, truncation, mismatched shapes/counts, newer format.
        """
        folder, meta = open_directory(path, "retriever", verify=verify)
        try:
            index_meta, store_meta = meta["student_index"], meta["feature_store"]
            scorer_config = dict(meta["scorer"])
        except (KeyError, TypeError) as err:
            raise ManifestError(f"{path!r}: retriever manifest lacks {err}") from err
        if index_meta.get("backend") == "milvus":
            from .milvus import MilvusStudentIndex

            index = MilvusStudentIndex.read_payload(os.path.join(folder, "student"), index_meta, client=milvus_client)
        else:
            index = StudentIndex.read_payload(os.path.join(folder, "student"), index_meta, device=device)
        store = FeatureStore.read_payload(os.path.join(folder, "features"), store_meta, mmap=mmap)
        if scorer is None:
            if scorer_config.pop("type", None) != "TeacherScorer":
                raise ValueError(f"{path!r} was saved with a custom scorer ({scorer_config.get('repr')}); pass scorer= to load it")
            scorer = TeacherScorer(**scorer_config)
        if index.ntotal != meta.get("count") or store.count != meta.get("count"):
            raise ManifestError(f"{path!r}: manifest count {meta.get('count')} but index holds {index.ntotal} "
                                f"and store holds {store.count}")
        return cls(index, store, scorer, direction=meta["direction"])

    def __repr__(self) -> str:
        return (f"Retriever(direction={self.direction!r}, count={self.count}, index={self.student_index!r}, "
                f"store={self.feature_store!r})")
