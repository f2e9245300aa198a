"""The compute side of serving: gallery snapshots and fused batch execution (no HTTP, no asyncio).

A :class:`Gallery` is an immutable snapshot of the loaded retrievers (one per
direction). Each request is validated against, and bound to, the snapshot that
was current when it arrived; a reload builds a new snapshot and swaps one
reference, so in-flight and queued requests finish on the snapshot they were
validated against (old or new answers, never a mix, never an error).

:func:`run_search_batch` and :func:`run_rerank_batch` take a list of
*compatible* queries (equal :func:`search_batch_key` / :func:`rerank_batch_key`)
and run ONE fused call for all of them:

- search: the queries' tokens are zero-padded to the longest query and given,
  with their lengths, to one :meth:`Retriever.search` (one student-index call,
  one unique-candidate gather, one :func:`aladin_fast.rerank_scores`) with the
  largest ``k`` of the batch; each request gets the first ``k`` of its own
  row (the ranking is a stable sort, so a prefix of top-``k_max`` is top-``k``);
- rerank: every request's candidates (gallery ids, gathered once per unique
  id, or the request's own candidate tokens) are packed into one candidate
  set, each query row indexes its own candidates (short rows repeat their
  first candidate; the extra columns are dropped), one ``rerank_scores`` call.

With ``padding="neg_inf"`` padded tokens never take part, so padding queries
to a common width changes no score. Other padding modes (and custom scorers)
depend on the pad width, so their batch keys include the widths and only
same-shaped requests are merged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..retrieval import Retriever, TeacherScorer
from ..retrieval.feature_store import MissingIdsError

__all__ = ["Gallery", "SearchQuery", "RerankQuery", "load_gallery", "LoadCancelled", "release_retrievers",
           "search_batch_key", "rerank_batch_key", "run_search_batch", "run_rerank_batch"]


@dataclass(frozen=True)
class Gallery:
    """Immutable snapshot of the serving retrievers.

    Attributes:
        generation: increases by one on every successful reload.
        retrievers: ``{direction: Retriever}``.
        paths: ``{direction: directory}`` they were loaded from.
        default_direction: used when a request names none.
        device: where queries are scored (``"cpu"`` or ``"cuda"``).
    """

    generation: int
    retrievers: Mapping[str, Retriever]
    paths: Mapping[str, str]
    default_direction: str
    device: str = "cpu"
    loaded_at: float = field(default_factory=time.time)

    def describe(self) -> dict:
        """JSON-able summary for ``GET /info`` and ``POST /admin/reload``."""
        return {
            "generation": self.generation,
            "default_direction": self.default_direction,
            "device": self.device,
            "loaded_at": self.loaded_at,
            "retrievers": {
                direction: {
                    "path": self.paths.get(direction),
                    "count": retriever.count,
                    "embedding_dim": retriever.student_index.dim,
                    "token_dim": retriever.feature_store.dim,
                    "store_dtype": retriever.feature_store.dtype_name,
                    "max_tokens_per_item": retriever.feature_store.max_length,
                    "scorer": retriever.scorer.config() if hasattr(retriever.scorer, "config") else repr(retriever.scorer),
                    "student_index": repr(retriever.student_index),
                }
                for direction, retriever in self.retrievers.items()
            },
        }


class LoadCancelled(RuntimeError):
    """:func:`load_gallery` was told to stop (``cancelled()`` became true between two steps)."""


def release_retrievers(retrievers) -> None:
    """Release what loaded retrievers hold beyond memory (a Milvus index's client connection); their
    memory (indexes, memory-mapped features) goes with the last reference. For retrievers that never
    served: an abandoned or failed load."""
    for retriever in list(retrievers):
        close = getattr(retriever.student_index, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - best effort: the load's own outcome is what gets reported
                pass


def load_gallery(paths: Sequence[str], *, generation: int, device: str = "cpu", verify: bool = True,
                 warmup: bool = True, cancelled: Optional[Callable[[], bool]] = None) -> Gallery:
    """Load retriever directories (at most one per direction) into a new :class:`Gallery`.

    ``cancelled`` (optional) is polled between steps (before and after each directory's load, before
    its warm-up query); once it returns true the load stops, releases the retrievers it loaded
    (:func:`release_retrievers`) and raises :class:`LoadCancelled`. A reload abandoned at shutdown
    uses it so that a slow load does not run on for nothing.

    Raises:
        ValueError: no path, or two paths with the same direction.
        ManifestError / OSError: a directory is missing or corrupt (from :meth:`Retriever.load`).
        LoadCancelled: ``cancelled()`` became true.
    """
    if not paths:
        raise ValueError("retriever_paths must name at least one saved Retriever directory")
    retrievers: Dict[str, Retriever] = {}
    where: Dict[str, str] = {}

    def check(step: str) -> None:
        if cancelled is not None and cancelled():
            raise LoadCancelled(f"load of {list(map(str, paths))} cancelled {step}")

    try:
        for path in paths:
            check(f"before loading {str(path)!r}")
            retriever = Retriever.load(str(path), device="cuda" if device == "cuda" else "cpu", verify=verify)
            if retriever.direction in retrievers:
                release_retrievers([retriever])
                raise ValueError(f"retriever_paths: {path!r} and {where[retriever.direction]!r} are both "
                                 f"{retriever.direction}; give at most one directory per direction")
            retrievers[retriever.direction] = retriever
            where[retriever.direction] = str(path)
            if warmup and retriever.count:  # first call pays lazy kernel / page-in costs, not the first user
                check(f"before warming {str(path)!r} up")
                dim, width = retriever.student_index.dim, retriever.feature_store.dim
                retriever.search(np.ones((1, dim), np.float32), torch.ones(1, 2, width, device=device), k=1,
                                 rerank_k=2)
        check("after loading")
    except BaseException:
        release_retrievers(retrievers.values())
        raise
    default = next(iter(retrievers))
    return Gallery(generation, retrievers, where, default, device)


@dataclass
class SearchQuery:
    """One validated ``/search`` request: ``embedding [1, E]`` float32 numpy, ``tokens [L, D]``."""

    gallery: Gallery
    direction: str
    embedding: np.ndarray
    tokens: torch.Tensor
    length: int
    k: int
    rerank_k: int
    explain: bool


@dataclass
class RerankQuery:
    """One validated ``/rerank`` request: ``tokens [L, D]`` and either gallery ``candidate_ids [K]``
    (int64 numpy) or ``candidate_tokens [K, R, D]`` with ``candidate_lengths [K]``."""

    gallery: Gallery
    direction: str
    tokens: torch.Tensor
    length: int
    candidate_ids: Optional[np.ndarray] = None
    candidate_tokens: Optional[torch.Tensor] = None
    candidate_lengths: Optional[torch.Tensor] = None

    @property
    def count(self) -> int:
        return int(self.candidate_ids.shape[0] if self.candidate_ids is not None else self.candidate_tokens.shape[0])


def _merges_any_width(retriever: Retriever) -> bool:
    """True when padding widths cannot change scores (neg_inf padding of the built-in scorer)."""
    return isinstance(retriever.scorer, TeacherScorer) and retriever.scorer.padding == "neg_inf"


def search_batch_key(query: SearchQuery) -> tuple:
    """Queries with equal keys can share one :meth:`Retriever.search` call."""
    retriever = query.gallery.retrievers[query.direction]
    width = None if _merges_any_width(retriever) else query.tokens.shape[0]
    return ("search", query.gallery.generation, query.direction, query.rerank_k, query.explain, width)


def rerank_batch_key(query: RerankQuery) -> tuple:
    """Queries with equal keys can share one ``rerank_scores`` call."""
    retriever = query.gallery.retrievers[query.direction]
    shape = None
    if not _merges_any_width(retriever):
        kind = "ids" if query.candidate_ids is not None else ("tokens", query.candidate_tokens.shape[1])
        shape = (query.tokens.shape[0], kind)
    return ("rerank", query.gallery.generation, query.direction, shape)


def _pad_queries(queries, dtype, device):
    """Zero-padded ``[n, L_max, D]`` tokens in ``dtype`` and int64 ``[n]`` lengths."""
    width = max(query.tokens.shape[0] for query in queries)
    tokens = torch.zeros(len(queries), width, queries[0].tokens.shape[1], dtype=dtype)
    for row, query in enumerate(queries):
        tokens[row, :query.tokens.shape[0]] = query.tokens.to(dtype)
    lengths = torch.tensor([query.length for query in queries], dtype=torch.int64)
    return tokens.to(device), lengths.to(device)


def run_search_batch(queries: Sequence[SearchQuery]) -> List[dict]:
    """One fused :meth:`Retriever.search` for compatible queries; one result dict per query.

    Each result: ``{"ids": [int], "scores": [float], "explanations": [[int]] (explain only)}``, best
    first; slots the gallery cannot fill (id -1) are left out, and each explanation lists, for every
    word of the hit's caption, the index of the best-matching region.
    """
    first = queries[0]
    retriever = first.gallery.retrievers[first.direction]
    tokens, lengths = _pad_queries(queries, torch.float32, first.gallery.device)
    embeddings = np.concatenate([query.embedding for query in queries], axis=0)
    k = max(query.k for query in queries)
    out = retriever.search(embeddings, tokens, lengths, k=k, rerank_k=first.rerank_k,
                           return_explanations=first.explain)
    ids, scores = out[0], out[1]
    results = []
    for row, query in enumerate(queries):
        row_ids = ids[row, :query.k]
        keep = row_ids >= 0
        result = {"ids": row_ids[keep].tolist(), "scores": scores[row, :query.k][keep].tolist()}
        if query.explain:
            alignments = out[2][row, :query.k][keep]
            if query.direction == "text_to_image":  # columns are this query's words
                words = [query.length] * alignments.shape[0]
            else:  # columns are each hit caption's words, padded ones -1: counted in this search's own output
                # (a store lookup after the search could miss a hit removed meanwhile: KeyError, a 500)
                words = (alignments >= 0).sum(1).tolist()
            result["explanations"] = [alignments[hit, :count].tolist() for hit, count in enumerate(words)]
        results.append(result)
    return results


def _candidate_items(store, queries: Sequence[RerankQuery], packed: bool, pad_to: Optional[int], device):
    """Every query's candidates as one set of items.

    Returns ``(tokens, second, index_of)``: packed ``tokens [T, D]`` with ``second = cu_seqlens [M + 1]``,
    or padded ``tokens [M, W, D]`` with ``second = lengths [M]``; ``index_of[q]`` is int64 ``[K_q]``,
    query q's candidates as item positions. Gallery ids are gathered once per unique id.
    """
    token_parts, length_parts = [], []
    index_of: List[Optional[torch.Tensor]] = [None] * len(queries)
    offset = 0
    with_ids = [query.candidate_ids for query in queries if query.candidate_ids is not None]
    if with_ids:
        unique = np.unique(np.concatenate(with_ids))
        gathered, second = store.gather(unique, packed=packed, pad_to=None if packed else pad_to)
        token_parts.append(gathered)
        length_parts.append(torch.diff(second) if packed else second)
        for position, query in enumerate(queries):
            if query.candidate_ids is not None:
                index_of[position] = torch.from_numpy(np.searchsorted(unique, query.candidate_ids))
        offset = unique.shape[0]
    for position, query in enumerate(queries):
        if query.candidate_tokens is None:
            continue
        candidates, lengths = query.candidate_tokens.to(store.dtype), query.candidate_lengths
        if packed:
            valid = torch.arange(candidates.shape[1])[None, :] < lengths[:, None]
            token_parts.append(candidates[valid])
        else:
            token_parts.append(candidates)
        length_parts.append(lengths)
        index_of[position] = offset + torch.arange(candidates.shape[0])
        offset += candidates.shape[0]
    lengths = torch.cat(length_parts)
    if packed:
        tokens = torch.cat(token_parts)
        second = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    else:
        width = pad_to if pad_to is not None else max(part.shape[1] for part in token_parts)
        tokens = torch.cat([torch.nn.functional.pad(part, (0, 0, 0, width - part.shape[1])) for part in token_parts])
        second = lengths
    return tokens.to(device), second.to(device), index_of


def _candidate_matrix(index_of: Sequence[torch.Tensor], device) -> torch.Tensor:
    """``[n, K_max]`` int64: row q holds query q's items, short rows padded with their first item."""
    width = max(index.shape[0] for index in index_of)
    matrix = torch.empty(len(index_of), width, dtype=torch.int64)
    for row, index in enumerate(index_of):
        matrix[row, :index.shape[0]] = index
        matrix[row, index.shape[0]:] = index[0]
    return matrix.to(device)


def run_rerank_batch(queries: Sequence[RerankQuery]) -> List[dict]:
    """One fused ``rerank_scores`` call for compatible queries; one ``{"scores": [float]}`` per query,
    in the order of its candidates.

    Text->image: the queries are captions (``text``), candidates are images.
    Image->text: the candidates are captions, one ``text`` row per (query, candidate) pair, scored
    against the query image, as :meth:`Retriever.search` does, so scores equal the search's.

    Candidate ids were checked when the request was parsed; one removed from the gallery since (an
    in-process ``remove``) is the caller's 404, as it would have been a moment earlier, not a 500.
    """
    try:
        return _rerank_batch(queries)
    except MissingIdsError as err:
        from .schema import RequestError  # schema imports this module

        missing = err.ids
        raise RequestError("candidate_ids", f"not in the {queries[0].direction} gallery (removed after the request "
                                            f"was accepted): {missing[:8].tolist()}{' ...' if missing.size > 8 else ''}",
                           status=404) from err


def _rerank_batch(queries: Sequence[RerankQuery]) -> List[dict]:
    first = queries[0]
    retriever = first.gallery.retrievers[first.direction]
    store, scorer, device = retriever.feature_store, retriever.scorer, first.gallery.device
    query_tokens, query_lengths = _pad_queries(queries, store.dtype, device)
    packs_any_width = _merges_any_width(retriever)
    pad_to = None
    if not packs_any_width:  # width-sensitive padding: pad as Retriever.search / the request did
        pad_to = store.pad_width if first.candidate_ids is not None else int(first.candidate_tokens.shape[1])
    if first.direction == "text_to_image":
        view = None
        if (packs_any_width and retriever.zero_copy and scorer.reads_in_place(torch.device(device))
                and all(query.candidate_ids is not None for query in queries)):
            # the view and the rows from one snapshot of the store (an append / compact may run meanwhile)
            view = store.packed_rows(np.concatenate([query.candidate_ids for query in queries]))
        if view is not None:  # the kernel reads the candidates' regions in place from the store
            items, cu_seqlens, rows = view
            index_of = list(torch.split(rows, [query.count for query in queries]))
            scores = scorer(query_tokens, items, _candidate_matrix(index_of, device), query_lengths, None,
                            image_cu_seqlens=cu_seqlens)
        elif packs_any_width:
            items, cu_seqlens, index_of = _candidate_items(store, queries, True, None, device)
            scores = scorer(query_tokens, items, _candidate_matrix(index_of, device), query_lengths, None,
                            image_cu_seqlens=cu_seqlens)
        else:
            items, item_lengths, index_of = _candidate_items(store, queries, False, pad_to, device)
            scores = scorer(query_tokens, items, _candidate_matrix(index_of, device), query_lengths, item_lengths)
        scores = scores.float().cpu()
        return [{"scores": scores[row, :query.count].tolist()} for row, query in enumerate(queries)]
    items, item_lengths, index_of = _candidate_items(store, queries, False, pad_to, device)
    rows = torch.cat(index_of).to(device)
    counts = torch.tensor([query.count for query in queries])
    owners = torch.arange(len(queries)).repeat_interleave(counts)[:, None].to(device)
    scores = scorer(items[rows], query_tokens, owners, item_lengths[rows], query_lengths).float().cpu()[:, 0]
    return [{"scores": part.tolist()} for part in torch.split(scores, counts.tolist())]
