"""Feature store: the fine-grained token features (regions per image, words per caption) of a gallery.

Each item (addressed by an int64 id, the same id as in the student index) is a
variable-length run of ``D``-dim token vectors. Items live in *shards*: a token
matrix ``[T_s, D]`` plus an offsets table ``[n_s + 1]`` and the shard's ids
``[n_s]``. On disk every shard is three ``.npy`` files, so a loaded store is
memory-mapped (only the gathered rows are ever read) and appending adds a new
shard without copying the old ones. ``save(items_per_shard=...)`` re-shards
by id range (sorted ids, fixed items per file), e.g. to spread a large
gallery over several files or machines.

Dtypes: float32, float16 and bfloat16 (numpy has no bfloat16, so bf16 is
stored as its raw uint16 bits and viewed back as ``torch.bfloat16``).

:meth:`FeatureStore.gather` turns a list of ids into the padded
(``[n, L, D]`` + lengths) or packed (``[sum L, D]`` + ``cu_seqlens``) input of
:func:`aladin_fast.rerank_scores` with vectorised index arithmetic -- one numpy
fancy-index copy per shard, no Python loop over items.

Thread-safety: readers take an immutable snapshot of the layout, writers
(``append``/``remove``) build a new snapshot and swap it in, so ``gather``
never needs a lock; ``save`` writes the files and the manifest metadata of one
snapshot, whatever ``append``/``remove`` do meanwhile (taking that snapshot is
O(1): shard arrays are never written in place). A :class:`Retriever` built on
the store keeps its gallery lock on the store (``_gallery_lock``), so every
retriever sharing the store excludes the others' ``add``/``remove``.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .._inputs import torch_compatible
from ..data.precomp import WRITE_BLOCK_BYTES, write_npy_rows
from .index import as_id_vector
from .manifest import ManifestError, open_directory, save_directory

__all__ = ["FeatureStore", "MissingIdsError", "STORE_DTYPES"]


class MissingIdsError(KeyError):
    """Ids looked up in a :class:`FeatureStore` that does not hold them; ``ids``: the missing ones (sorted)."""

    def __init__(self, message: str, ids: np.ndarray):
        super().__init__(message)
        self.ids = ids


# name -> (torch dtype, numpy storage dtype)
STORE_DTYPES = {
    "float32": (torch.float32, np.dtype(np.float32)),
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),  # raw bf16 bits
}
_TORCH_TO_NAME = {torch_dtype: name for name, (torch_dtype, _) in STORE_DTYPES.items()}


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype) and dtype in _TORCH_TO_NAME:
        return _TORCH_TO_NAME[dtype]
    if isinstance(dtype, str) and dtype.replace("torch.", "") in STORE_DTYPES:
        return dtype.replace("torch.", "")
    raise ValueError(f"dtype must be one of {list(STORE_DTYPES)} (or the torch dtype), got {dtype!r}")


def _to_storage(tokens: torch.Tensor, name: str, copy: bool = False) -> np.ndarray:
    """CPU tensor -> numpy array in the storage dtype (bf16 as uint16 bits); ``copy``: never alias ``tokens``."""
    torch_dtype, _ = STORE_DTYPES[name]
    tensor = tokens.detach().to("cpu", torch_dtype, copy=copy).contiguous()
    if name == "bfloat16":
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def _to_torch(array: np.ndarray, name: str) -> torch.Tensor:
    """Storage numpy array (owned, writable) -> torch tensor of the store dtype, zero-copy."""
    if name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _ragged_positions(lengths: np.ndarray) -> np.ndarray:
    """Position of every token within its item: [0..l0-1, 0..l1-1, ...] (vectorised)."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


@dataclass(frozen=True)
class _Shard:
    tokens: np.ndarray  # [T_s, D] storage dtype, possibly a read-only memmap
    offsets: np.ndarray  # [n_s + 1] int64, offsets[0] == 0, offsets[-1] == T_s
    ids: np.ndarray  # [n_s] int64


@dataclass(frozen=True)
class _Layout:
    """Immutable snapshot: shards plus per-row tables over the concatenated rows."""

    shards: Tuple[_Shard, ...]
    row_start: np.ndarray  # [S + 1] first global row of each shard
    starts: np.ndarray  # [N] token offset of each row inside its shard
    lengths: np.ndarray  # [N] int64
    ids: np.ndarray  # [N] int64 (dead rows keep their old id)
    live: np.ndarray  # [N] bool
    sorted_ids: np.ndarray  # live ids, sorted
    sorted_rows: np.ndarray  # their rows
    max_length: int  # longest live item
    pad_width: int  # the width zero padding pads to (FeatureStore.pad_width), >= max_length


def _make_layout(shards: Sequence[_Shard], live: Optional[np.ndarray] = None, pad_width: int = 0) -> _Layout:
    counts = np.array([shard.ids.shape[0] for shard in shards], dtype=np.int64)
    row_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    empty = np.zeros(0, dtype=np.int64)
    starts = np.concatenate([shard.offsets[:-1] for shard in shards] or [empty]).astype(np.int64)
    lengths = np.concatenate([np.diff(shard.offsets) for shard in shards] or [empty]).astype(np.int64)
    ids = np.concatenate([shard.ids for shard in shards] or [empty]).astype(np.int64)
    live = np.ones(ids.shape[0], dtype=bool) if live is None else live
    live_rows = np.nonzero(live)[0]
    order = np.argsort(ids[live_rows], kind="stable")
    sorted_ids, sorted_rows = ids[live_rows][order], live_rows[order]
    if sorted_ids.size > 1 and bool((sorted_ids[1:] == sorted_ids[:-1]).any()):
        duplicate = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]]
        raise ValueError(f"feature store ids must be unique, duplicates: {duplicate[:8].tolist()}")
    max_length = int(lengths[live_rows].max()) if live_rows.size else 0
    return _Layout(tuple(shards), row_start, starts, lengths, ids, live, sorted_ids, sorted_rows, max_length,
                   max(pad_width, max_length))


def _append_layout(layout: _Layout, shard: _Shard, pad_width: int) -> _Layout:
    """``layout`` plus one new (all-live) shard, the same snapshot :func:`_make_layout` would build.

    Built from the old tables instead of from every shard: appending one item to a store of S shards
    and N rows costs O(N) vectorised copies, not a Python pass over the S shards plus a sort of all N ids
    (which made N appends of one item each O(N^2 log N))."""
    count = shard.ids.shape[0]
    order = np.argsort(shard.ids, kind="stable")
    new_ids = shard.ids[order]
    if count > 1 and bool((new_ids[1:] == new_ids[:-1]).any()):
        duplicate = new_ids[1:][new_ids[1:] == new_ids[:-1]]
        raise ValueError(f"feature store ids must be unique, duplicates: {duplicate[:8].tolist()}")
    first_row = layout.ids.shape[0]
    lengths = np.diff(shard.offsets).astype(np.int64)
    at = np.searchsorted(layout.sorted_ids, new_ids)  # the caller refused ids already present
    max_length = max(layout.max_length, int(lengths.max(initial=0)))
    return _Layout(
        layout.shards + (shard,),
        np.append(layout.row_start, layout.row_start[-1] + count).astype(np.int64),
        np.concatenate([layout.starts, shard.offsets[:-1].astype(np.int64)]),
        np.concatenate([layout.lengths, lengths]),
        np.concatenate([layout.ids, shard.ids.astype(np.int64)]),
        np.concatenate([layout.live, np.ones(count, dtype=bool)]),
        np.insert(layout.sorted_ids, at, new_ids),
        np.insert(layout.sorted_rows, at, first_row + order.astype(np.int64)),
        max_length, max(pad_width, max_length))


def _remove_layout(layout: _Layout, positions: np.ndarray) -> _Layout:
    """``layout`` without the live ids at ``positions`` (unique indices into ``sorted_ids``), the same snapshot
    :func:`_make_layout` would build: the shard tables are shared, only the live mask and the sorted id
    tables are copied -- O(N), no sort and no pass over the shards per removal."""
    live = layout.live.copy()
    removed_rows = layout.sorted_rows[positions]
    live[removed_rows] = False
    sorted_ids = np.delete(layout.sorted_ids, positions)
    sorted_rows = np.delete(layout.sorted_rows, positions)
    if not sorted_rows.size:
        max_length = 0
    elif int(layout.lengths[removed_rows].max()) < layout.max_length:  # the longest item stays: no pass over N
        max_length = layout.max_length
    else:
        max_length = int(layout.lengths[sorted_rows].max())
    return dataclasses.replace(layout, live=live, sorted_ids=sorted_ids, sorted_rows=sorted_rows,
                               max_length=max_length, pad_width=max(layout.pad_width, max_length))


def _read_only_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a tensor the store only reads (it copies into its own storage): a read-only array
    (np.load with mmap, a frozen buffer) is fine, so torch's "not writable" warning is not raised for it;
    byte-swapped or flipped arrays are made acceptable to torch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(torch_compatible(array))


class FeatureStore:
    """Variable-length token features addressed by int64 ids, memory-mapped from disk.

    Args:
        dim: token feature size D.
        dtype: storage dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"``
            (or the torch dtype). Appended features are cast to it.
    """

    def __init__(self, dim: int, dtype="float32"):
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = int(dim)
        self.dtype_name = _dtype_name(dtype)
        self._write_lock = threading.Lock()
        self._gallery_lock = None  # set by the first Retriever built on this store, shared by all of them
        self._layout = _make_layout([])
        self._view_cache = None

    @classmethod
    def from_tokens(cls, ids, tokens, lengths=None, *, cu_seqlens=None, dtype=None) -> "FeatureStore":
        """A store holding one batch: arguments as in :meth:`append`; dtype defaults to the tokens' dtype."""
        if isinstance(tokens, np.ndarray):  # torch or numpy, as append() accepts
            tokens = torch.from_numpy(tokens)
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor or numpy array, got {type(tokens).__name__}")
        name = _dtype_name(dtype if dtype is not None else (tokens.dtype if tokens.dtype in _TORCH_TO_NAME else torch.float32))
        store = cls(tokens.shape[-1], name)
        store.append(ids, tokens, lengths, cu_seqlens=cu_seqlens)
        return store

    # ----------------------------------------------------------- properties
    @property
    def dtype(self) -> torch.dtype:
        """Torch dtype of gathered tensors."""
        return STORE_DTYPES[self.dtype_name][0]

    @property
    def count(self) -> int:
        """Number of live items."""
        return int(self._layout.sorted_ids.shape[0])

    def __len__(self) -> int:
        return self.count

    @property
    def max_length(self) -> int:
        """Longest live item (tokens); 0 when empty."""
        return self._layout.max_length

    @property
    def pad_width(self) -> int:
        """The width zero padding pads items to: the widest batch appended (padded ``L``, or the longest packed
        item), never smaller than :attr:`max_length`. Unlike ``max_length`` it does not shrink when items are
        removed, so with ``padding="zero"`` (whose scores depend on the pad width) removing one item does not
        change the scores of the others, and a store of ``[N, R, D]`` features scores as the teacher does on
        them (padded to R)."""
        return self._layout.pad_width

    @property
    def total_tokens(self) -> int:
        layout = self._layout
        return int(layout.lengths[layout.live].sum())

    @property
    def num_shards(self) -> int:
        return len(self._layout.shards)

    def ids(self) -> np.ndarray:
        """Live ids, int64 ``[count]``, sorted ascending."""
        return self._layout.sorted_ids.copy()

    def contains(self, ids) -> np.ndarray:
        """Bool ``[N]``: which of ``ids`` are in the store."""
        ids = as_id_vector("ids", ids)
        sorted_ids = self._layout.sorted_ids
        if not sorted_ids.size:
            return np.zeros(ids.shape[0], dtype=bool)
        pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
        return sorted_ids[pos] == ids

    def _rows(self, layout: _Layout, ids: np.ndarray) -> np.ndarray:
        sorted_ids = layout.sorted_ids
        if not ids.size:
            return np.zeros(0, dtype=np.int64)
        if not sorted_ids.size:
            raise MissingIdsError(f"ids not in the feature store (it is empty): {ids[:8].tolist()}", np.unique(ids))
        pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
        found = sorted_ids[pos] == ids
        if not found.all():
            missing = np.unique(ids[~found])
            raise MissingIdsError(
                f"ids not in the feature store: {missing[:8].tolist()}{' ...' if missing.size > 8 else ''}", missing)
        return layout.sorted_rows[pos]

    def rows(self, ids) -> torch.Tensor:
        """Row of each id in :meth:`packed_view` (single-shard stores): int64 ``[N]``."""
        layout = self._layout
        return torch.from_numpy(self._rows(layout, as_id_vector("ids", ids)))

    def packed_view(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Zero-copy ``(tokens [T, D], cu_seqlens [rows + 1] int64)`` of a single-shard store, else None.

        ``tokens`` aliases the (possibly memory-mapped, read-only: never write
        to it) shard; rows are addressed with :meth:`rows`. Removed items
        remain as rows until the next save, but no live id maps to them.
        ``rerank_scores(text, tokens, rows_per_query, image_cu_seqlens=cu_seqlens)``
        then reads only the candidates' tokens straight from the store.
        """
        return self._packed_view(self._layout)

    def packed_rows(self, ids) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(tokens, cu_seqlens, rows)``: :meth:`packed_view` and :meth:`rows` of ``ids`` from one snapshot of
        the store, so an ``append`` / ``compact`` running meanwhile cannot pair row numbers of one layout with
        the tokens of another; None for a multi-shard store."""
        layout = self._layout
        view = self._packed_view(layout)
        if view is None:
            return None
        return view + (torch.from_numpy(self._rows(layout, as_id_vector("ids", ids))),)

    def _packed_view(self, layout: _Layout) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if len(layout.shards) != 1:
            return None
        cached = self._view_cache
        if cached is not None and cached[0] is layout:
            return cached[1]
        shard = layout.shards[0]
        with warnings.catch_warnings():  # a read-only memmap: the kernels only read it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            storage = shard.tokens.view(np.int16) if self.dtype_name == "bfloat16" else shard.tokens
            tokens = torch.from_numpy(storage)
        if self.dtype_name == "bfloat16":
            tokens = tokens.view(torch.bfloat16)
        view = (tokens, torch.from_numpy(shard.offsets.copy()))
        if layout is self._layout:  # a snapshot replaced meanwhile is not cached: its shard would stay pinned
            self._view_cache = (layout, view)
        return view

    def compact(self) -> None:
        """Merge all shards into one in-memory shard without removed rows (re-enables :meth:`packed_view`)."""
        with self._write_lock:
            layout = self._layout
            rows = np.nonzero(layout.live)[0]
            packed, lengths = self._gather_numpy(layout, rows, None)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            self._layout = _make_layout([_Shard(packed, offsets, layout.ids[rows])] if rows.size else [],
                                        pad_width=layout.pad_width)
            self._view_cache = None  # the view of the old shard would keep it (its memory or mapping) alive

    def lengths(self, ids) -> torch.Tensor:
        """Token counts of ``ids``: int64 ``[N]``."""
        layout = self._layout
        return torch.from_numpy(layout.lengths[self._rows(layout, as_id_vector("ids", ids))].copy())

    # ------------------------------------------------------------- mutation
    def _normalise_batch(self, tokens, lengths, cu_seqlens) -> Tuple[np.ndarray, np.ndarray, int]:
        """Padded or packed tokens -> (packed storage array [T, D], offsets [n + 1], the batch's pad width)."""
        if isinstance(tokens, np.ndarray):
            tokens = _read_only_tensor(tokens)
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor or numpy array, got {type(tokens).__name__}")
        if not tokens.is_floating_point():
            raise TypeError(f"tokens must be floating, got {tokens.dtype}")
        if cu_seqlens is not None:
            if lengths is not None:
                raise ValueError("give either lengths or cu_seqlens, not both")
            if tokens.ndim != 2 or tokens.shape[1] != self.dim:
                raise ValueError(f"tokens with cu_seqlens must be packed [total_tokens, {self.dim}], got {list(tokens.shape)}")
            offsets = torch.as_tensor(cu_seqlens).detach().cpu().numpy().astype(np.int64)
            if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != tokens.shape[0]:
                raise ValueError(f"cu_seqlens must be [N + 1] from 0 to tokens.shape[0] = {tokens.shape[0]}, got {offsets.tolist()[:8]}")
            if (np.diff(offsets) < 0).any():
                raise ValueError("cu_seqlens must be non-decreasing")
            # a copy: the store must not alias (and change with) the caller's buffer, like the padded path
            return _to_storage(tokens, self.dtype_name, copy=True), offsets, int(np.diff(offsets).max(initial=0))
        if tokens.ndim != 3 or tokens.shape[2] != self.dim:
            raise ValueError(f"tokens must be padded [N, L, {self.dim}] (or packed with cu_seqlens), got {list(tokens.shape)}")
        count, pad = tokens.shape[0], tokens.shape[1]
        if lengths is None:
            lengths_np = np.full(count, pad, dtype=np.int64)
        else:
            lengths_np = torch.as_tensor(lengths).detach().cpu().numpy()
            if lengths_np.dtype == np.bool_:
                raise TypeError("lengths must be integer token counts [N], not a mask")
            lengths_np = lengths_np.astype(np.int64)
            if lengths_np.shape != (count,):
                raise ValueError(f"lengths must have shape [{count}], got {list(lengths_np.shape)}")
            if count and (lengths_np.min() < 0 or lengths_np.max() > pad):
                raise ValueError(f"lengths must lie in [0, {pad}], got [{lengths_np.min()}, {lengths_np.max()}]")
        storage = _to_storage(tokens.reshape(count * pad, self.dim), self.dtype_name)
        rows = np.repeat(np.arange(count, dtype=np.int64) * pad, lengths_np) + _ragged_positions(lengths_np)
        offsets = np.concatenate([[0], np.cumsum(lengths_np)]).astype(np.int64)
        return np.ascontiguousarray(storage[rows]), offsets, int(pad)

    def append(self, ids, tokens, lengths=None, *, cu_seqlens=None) -> None:
        """Add items.

        Args:
            ids: int64 ``[N]`` new, unique ids.
            tokens: padded ``[N, L, D]`` with ``lengths [N]`` (None: all L valid),
                or packed ``[sum L, D]`` with ``cu_seqlens [N + 1]``; any float
                dtype (cast to the store dtype), torch or numpy.
        """
        self._commit_append(*self._prepare_append(ids, tokens, lengths, cu_seqlens))

    def _prepare_append(self, ids, tokens, lengths, cu_seqlens) -> Tuple[np.ndarray, _Shard, int]:
        """The checks and conversion of :meth:`append`, changing nothing: ``(ids, new shard, pad width)``."""
        packed, offsets, width = self._normalise_batch(tokens, lengths, cu_seqlens)
        id_array = as_id_vector("ids", ids, offsets.shape[0] - 1)
        return id_array, _Shard(packed, offsets, id_array), width

    def _commit_append(self, id_array: np.ndarray, shard: _Shard, width: int) -> None:
        """Swap in a layout with the shard from :meth:`_prepare_append` (refuses ids already present)."""
        if not id_array.size:
            return
        with self._write_lock:
            layout = self._layout
            clash = id_array[self.contains(id_array)]
            if clash.size:
                raise ValueError(f"ids already in the feature store: {clash[:8].tolist()}")
            self._layout = _append_layout(layout, shard, max(layout.pad_width, width))

    def remove(self, ids) -> int:
        """Remove ``ids`` (unknown ids are ignored); returns how many were removed.

        The rows stay in their shard files until the next :meth:`save`.
        """
        id_array = as_id_vector("ids", ids)
        with self._write_lock:
            layout = self._layout
            sorted_ids = layout.sorted_ids
            if not sorted_ids.size or not id_array.size:
                return 0
            wanted = np.unique(id_array)
            positions = np.minimum(np.searchsorted(sorted_ids, wanted), sorted_ids.size - 1)
            positions = positions[sorted_ids[positions] == wanted]  # unknown ids are ignored
            if not positions.size:
                return 0
            self._layout = _remove_layout(layout, positions)
            return int(positions.size)

    # --------------------------------------------------------------- gather
    def _gather_numpy(self, layout: _Layout, rows: np.ndarray, pad_to: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
        """Rows -> (storage array, lengths): packed ``[sum L, D]`` if pad_to is None, else ``[n, pad_to, D]``."""
        lengths = layout.lengths[rows]
        storage_dtype = STORE_DTYPES[self.dtype_name][1]
        within = _ragged_positions(lengths)
        source = np.repeat(layout.starts[rows], lengths) + within  # token row inside its shard
        row_shard = np.searchsorted(layout.row_start, rows, side="right") - 1
        if row_shard.size and row_shard.min() == row_shard.max():  # the common case: one np.take, no scatter
            packed = np.take(layout.shards[int(row_shard[0])].tokens, source, axis=0)
        else:
            packed = np.empty((source.size, self.dim), dtype=storage_dtype)
            token_shard = np.repeat(row_shard, lengths)
            # group the tokens by shard with one sort (a mask over all tokens per shard was O(shards x tokens))
            by_shard = np.argsort(token_shard, kind="stable")
            present, bounds = np.unique(token_shard[by_shard], return_index=True)
            bounds = np.append(bounds, by_shard.size)
            for number, shard_index in enumerate(present.tolist()):  # one fancy-index copy per shard, not per item
                select = by_shard[bounds[number]:bounds[number + 1]]
                packed[select] = np.take(layout.shards[shard_index].tokens, source[select], axis=0)
        if pad_to is None:
            return packed, lengths
        if bool((lengths == pad_to).all()):  # every item fills the pad (e.g. 36 regions): already padded
            return packed.reshape(rows.shape[0] * pad_to, self.dim), lengths
        out = np.zeros((rows.shape[0] * pad_to, self.dim), dtype=storage_dtype)
        out[np.repeat(np.arange(rows.shape[0], dtype=np.int64) * pad_to, lengths) + within] = packed
        return out, lengths

    def gather(self, ids, *, packed: bool = False, pad_to: Optional[int] = None, dtype=None, device=None):
        """Features of ``ids`` (repeats allowed) as rerank input.

        Args:
            ids: int ``[n]`` ids in the store (KeyError names the missing ones).
            packed: return ``(tokens [sum L, D], cu_seqlens [n + 1] int64)``
                instead of ``(tokens [n, L, D] zero-padded, lengths [n] int64)``.
            pad_to: padded length L (default: the longest gathered item; must
                be at least that).
            dtype: cast to this torch dtype (default: the store dtype).
            device: move the result there (default CPU).
        """
        layout = self._layout
        rows = self._rows(layout, as_id_vector("ids", ids))
        lengths_np = layout.lengths[rows]
        longest = int(lengths_np.max()) if lengths_np.size else 0
        if packed:
            if pad_to is not None:
                raise ValueError("pad_to applies to the padded layout only (packed=False)")
            array, lengths_np = self._gather_numpy(layout, rows, None)
            tokens = _to_torch(array, self.dtype_name)
            second = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths_np)]).astype(np.int64))
        else:
            width = longest if pad_to is None else int(pad_to)
            if width < longest:
                raise ValueError(f"pad_to={pad_to} is shorter than the longest gathered item ({longest} tokens)")
            array, lengths_np = self._gather_numpy(layout, rows, width)
            tokens = _to_torch(array, self.dtype_name).view(rows.shape[0], width, self.dim)
            second = torch.from_numpy(lengths_np.copy())
        if dtype is not None and dtype != tokens.dtype:
            tokens = tokens.to(dtype)
        if device is not None:
            tokens, second = tokens.to(device), second.to(device)
        return tokens, second

    # ---------------------------------------------------------- persistence
    def config(self) -> dict:
        return self._config(self._layout)

    def _config(self, layout: _Layout) -> dict:
        return {"dim": self.dim, "dtype": self.dtype_name, "count": int(layout.sorted_ids.shape[0]),
                "total_tokens": int(layout.lengths[layout.live].sum()), "max_length": layout.max_length,
                "pad_width": layout.pad_width}

    def write_payload(self, folder: str, items_per_shard: Optional[int] = None) -> dict:
        """Write live items as ``tokens/offsets/ids-NNNNN.npy`` shards into ``folder``."""
        return self._snapshot_payload(items_per_shard)(folder)

    def _snapshot_payload(self, items_per_shard: Optional[int] = None):
        """``write(folder) -> metadata`` that writes the store as it is now, whenever it is called: layouts are
        immutable snapshots and shard arrays are never written in place (append adds a shard, remove swaps in
        a new live mask, compact builds a new shard), so holding the current layout is the whole snapshot --
        O(1), no copy, however large the (memory-mapped) gallery. ``Retriever.save`` takes it under its lock
        together with the index's and writes both after releasing the lock."""
        if items_per_shard is not None and items_per_shard < 1:
            raise ValueError(f"items_per_shard must be >= 1, got {items_per_shard}")
        layout = self._layout  # files and metadata of this one snapshot, whatever append/remove do meanwhile
        return lambda folder: self._write_layout(folder, layout, items_per_shard)

    def _write_layout(self, folder: str, layout: _Layout, items_per_shard: Optional[int]) -> dict:
        if items_per_shard is None:  # keep the current shards, dropping removed rows
            groups = [np.arange(layout.row_start[s], layout.row_start[s + 1])[layout.live[layout.row_start[s]:layout.row_start[s + 1]]]
                      for s in range(len(layout.shards))]
        else:  # re-shard by id range
            groups = [layout.sorted_rows[start:start + items_per_shard] for start in range(0, layout.sorted_rows.size, items_per_shard)]
        shards_meta = []
        for number, rows in enumerate(group for group in groups if group.size):
            shard_index = int(np.searchsorted(layout.row_start, rows[0], side="right") - 1)
            shard = layout.shards[shard_index]
            whole = rows.size == shard.ids.size and rows[0] == layout.row_start[shard_index] and bool(
                (np.diff(rows) == 1).all())
            lengths = np.diff(shard.offsets) if whole else layout.lengths[rows]
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            with open(os.path.join(folder, f"tokens-{number:05d}.npy"), "wb") as handle:
                if whole:
                    np.save(handle, np.asarray(shard.tokens), allow_pickle=False)
                else:  # gathered block by block: a save never holds a copy of the whole (memory-mapped) gallery
                    step = max(1, WRITE_BLOCK_BYTES // max(1, int(lengths.max(initial=1)) * self.dim *
                                                           STORE_DTYPES[self.dtype_name][1].itemsize))
                    blocks = (self._gather_numpy(layout, rows[start:start + step], None)[0]
                              for start in range(0, rows.size, step))
                    if not write_npy_rows(handle, STORE_DTYPES[self.dtype_name][1], (int(offsets[-1]), self.dim), blocks):
                        np.save(handle, self._gather_numpy(layout, rows, None)[0], allow_pickle=False)
            for stem, array in (("offsets", offsets), ("ids", layout.ids[rows])):
                with open(os.path.join(folder, f"{stem}-{number:05d}.npy"), "wb") as handle:
                    np.save(handle, np.asarray(array), allow_pickle=False)
            shards_meta.append({"items": int(rows.size), "tokens": int(offsets[-1]),
                                "min_id": int(layout.ids[rows].min()), "max_id": int(layout.ids[rows].max())})
        return {**self._config(layout), "shards": shards_meta}

    @classmethod
    def read_payload(cls, folder: str, meta: dict, mmap: bool = True) -> "FeatureStore":
        """Open shards written by :meth:`write_payload`, checking shapes against ``meta``."""
        try:
            store = cls(meta["dim"], meta["dtype"])
            shard_metas = meta["shards"]
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"feature store metadata in the manifest is incomplete or invalid: {err}") from err
        storage_dtype = STORE_DTYPES[store.dtype_name][1]
        shards = []
        for number, expected in enumerate(shard_metas):
            def load(stem, mode=None):
                path = os.path.join(folder, f"{stem}-{number:05d}.npy")
                try:
                    return np.load(path, mmap_mode=mode, allow_pickle=False)
                except (OSError, ValueError, EOFError) as err:
                    raise ManifestError(f"{path!r} is not a readable .npy file: {err}") from err

            tokens = load("tokens", "r" if mmap else None)
            offsets, ids = load("offsets").astype(np.int64), load("ids").astype(np.int64)
            problems = []
            if tokens.dtype != storage_dtype or tokens.ndim != 2 or tokens.shape != (expected["tokens"], store.dim):
                problems.append(f"tokens {tokens.dtype} {list(tokens.shape)}, expected {storage_dtype} "
                                f"[{expected['tokens']}, {store.dim}]")
            if offsets.shape != (expected["items"] + 1,) or offsets[0] != 0 or offsets[-1] != tokens.shape[0] or (
                    np.diff(offsets) < 0).any():
                problems.append(f"offsets {list(offsets.shape)} not a valid table for {expected['items']} items")
            if ids.shape != (expected["items"],):
                problems.append(f"ids {list(ids.shape)}, expected [{expected['items']}]")
            if problems:
                raise ManifestError(f"feature store shard {number} in {folder!r} does not match the manifest: " + "; ".join(problems))
            shards.append(_Shard(tokens, offsets, ids))
        try:
            store._layout = _make_layout(shards)
        except ValueError as err:
            raise ManifestError(f"feature store in {folder!r}: {err}") from err
        for key in ("count", "total_tokens", "max_length"):
            if meta.get(key) != getattr(store, key):
                raise ManifestError(f"feature store in {folder!r}: manifest says {key}={meta.get(key)} "
                                    f"but the files hold {getattr(store, key)}")
        pad_width = meta.get("pad_width", store.max_length)  # saved before session 8: the longest item
        if isinstance(pad_width, bool) or not isinstance(pad_width, int) or pad_width < store.max_length:
            raise ManifestError(f"feature store in {folder!r}: manifest pad_width={pad_width!r} is not an int >= the "
                                f"longest item ({store.max_length})")
        store._layout = dataclasses.replace(store._layout, pad_width=pad_width)
        return store

    def save(self, path: str, *, items_per_shard: Optional[int] = None) -> None:
        """Save atomically to directory ``path`` (manifest with checksums; see :mod:`.manifest`).

        ``items_per_shard`` re-shards by id range (sorted ids, that many items per file).
        """
        save_directory(path, "feature_store", {}, lambda folder: self.write_payload(folder, items_per_shard))

    @classmethod
    def load(cls, path: str, *, mmap: bool = True, verify: bool = True) -> "FeatureStore":
        """Load a directory written by :meth:`save`, memory-mapping the token files when ``mmap``."""
        folder, meta = open_directory(path, "feature_store", verify=verify)
        return cls.read_payload(folder, meta, mmap=mmap)

    def __repr__(self) -> str:
        return (f"FeatureStore(dim={self.dim}, dtype={self.dtype_name!r}, count={self.count}, "
                f"max_length={self.max_length}, shards={self.num_shards})")
