"""Input validation and layout normalisation shared by every backend.

Every public op accepts token features either padded (``[N, L, D]`` plus
optional ``lengths``) or packed (``[sum L, D]`` plus ``cu_seqlens [N+1]``).
This module checks them and turns both into one :class:`TokenBatch`
(a 2-D token matrix plus per-row offsets and lengths), the form every kernel
consumes (see docs/kernel_contract.md). Errors name the argument, what was
seen and what was expected.

A packed batch's padded length is its longest sequence: read from
``cu_seqlens`` (a device-to-host read, which ``torch.compile`` cannot trace
without a graph break) unless the caller passes it as a Python int
(``max_text_len`` / ``max_image_len``, like flash-attn's ``max_seqlen``).
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import numpy as np
import torch

AGGREGATIONS = ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean")
AGGREGATION_CODES = {name: code for code, name in enumerate(AGGREGATIONS)}
PADDINGS = ("neg_inf", "zero")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


@dataclass
class TokenBatch:
    """A batch of variable-length token sequences in kernel form.

    tokens:  [T, D] contiguous floating tensor (all tokens, row-major)
    offsets: [N] int64, row of ``tokens`` where sequence i starts
    lengths: [N] int32, valid tokens of sequence i
    pad:     padded length (L of a padded input, max length of a packed one);
             the width of argmax outputs and the padded size for padding="zero"
    """

    tokens: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    pad: int

    @property
    def count(self) -> int:
        # the shape as it is (no ``int()``): under torch.export / compile a dynamic batch size stays symbolic
        # instead of being specialised to its example value
        return self.offsets.shape[0]

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[1])

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``([N, pad, D] tensor, [N] int64 lengths)`` (zero-filled padding)."""
        n, dim = self.count, self.dim
        if self.tokens.shape[0] == n * self.pad and bool(
            torch.equal(self.offsets, torch.arange(n, device=self.offsets.device) * self.pad)
        ):
            return self.tokens.view(n, self.pad, dim), self.lengths.long()
        out = self.tokens.new_zeros(n, self.pad, dim)
        positions = torch.arange(self.pad, device=self.tokens.device)
        valid = positions[None, :] < self.lengths.long()[:, None]
        rows = (self.offsets[:, None] + positions[None, :])[valid]
        out[valid] = self.tokens[rows]
        return out, self.lengths.long()


def tracing() -> bool:
    """True while ``torch.compile`` traces the op layer.

    Value-range checks need the tensors' values (``int(x.max())``), which would
    break the graph; while tracing they are skipped here and re-checked on the
    real values by the op's implementation (the C++ bindings check lengths and
    candidate ids; the Triton path checks them before launching, except for
    layouts the op layer built itself -- full-length padded batches, all pairs
    or paired: ``score_tokens(layout_checked=True)``, so such a compiled step has
    no device sync). A length mask is checked in-graph with ``torch._assert_async``.

    Only the calling thread's tracing counts: Dynamo folds ``is_dynamo_compiling()`` to True in the frames it
    traces (it is False in eager code). ``is_compiling()`` reads a process-wide flag, which torch.export (a
    non-Dynamo tracer) sets and torch >= 2.13 also holds True for a whole torch.compile session: an eager call
    on another thread would skip its checks meanwhile. So that flag counts only with a tracing dispatch mode
    (fake / proxy tensors, thread-local) active on this thread.
    """
    return torch.compiler.is_dynamo_compiling() or (
        torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() > 0)


def _padded_layout_tensors(count, pad, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.arange(count, dtype=torch.int64, device=device) * pad,
            torch.full((count,), pad, dtype=torch.int32, device=device))


# The caches below hold their tensors for the life of the process (64 entries each): only small ones are
# cached, so that they stay a few MiB whatever the shapes seen (a 10^6-image batch would otherwise pin 12 MB of
# layout per distinct size, 64 of them 0.75 GB, after the caller has dropped every tensor). Above these sizes a
# call builds its own (two fills, negligible next to the kernel on such a batch).
CACHED_LAYOUT_MAX_COUNT = 1 << 15  # sequences per cached padded layout: 384 KiB (int64 offsets + int32 lengths)
CACHED_SEQUENCE_IDS_MAX_ROWS = 1 << 17  # token rows per cached sequence map: 512 KiB (int32)


@functools.lru_cache(maxsize=64)
def _cached_padded_layout(count: int, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, whatever mode the first call ran in
        return _padded_layout_tensors(count, pad, device)


def padded_layout(count: int, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``arange(count) * pad`` [N] int64 and full lengths [N] int32 of a padded batch.

    The same few shapes recur call after call (a training batch, a serving batch), and on a GPU
    each of these tensors is a kernel launch: eager calls share one read-only copy per
    (count, pad, device). Traced, captured (CUDA graphs) and symbolic-shape calls build their own.
    """
    if not _cacheable(count, pad, device):
        return _padded_layout_tensors(count, pad, device)
    return _cached_padded_layout(count, pad, device)


def _cacheable(count, pad, device: torch.device) -> bool:
    """Eager calls with int shapes (at most ``CACHED_LAYOUT_MAX_COUNT`` sequences) outside a CUDA-graph capture
    share the cached layout tensors."""
    return (not tracing() and isinstance(count, int) and isinstance(pad, int) and count <= CACHED_LAYOUT_MAX_COUNT
            and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()))


def is_shared_padded_layout(offsets: torch.Tensor, lengths: torch.Tensor, num_tokens, pad) -> bool:
    """Whether ``(offsets, lengths)`` are the shared full-length layout :func:`padded_layout` handed out for a
    padded batch of ``num_tokens`` rows (the training case): every token row belongs to a sequence."""
    count = offsets.shape[0]
    if not _cacheable(count, pad, offsets.device) or not count or num_tokens != count * pad:
        return False
    shared_offsets, shared_lengths = _cached_padded_layout(count, pad, offsets.device)
    return offsets is shared_offsets and lengths is shared_lengths


def padded_sequence_ids(count: int, pad: int, device: torch.device) -> torch.Tensor:
    """int32 ``[count * pad]``: the sequence owning each row of a shared full-length padded batch
    (``row // pad``), one read-only copy per (count, pad, device) up to ``CACHED_SEQUENCE_IDS_MAX_ROWS`` rows
    (a larger map is built per call)."""
    if count * pad > CACHED_SEQUENCE_IDS_MAX_ROWS:
        return _padded_sequence_ids(count, pad, device)
    return _cached_padded_sequence_ids(count, pad, device)


def _padded_sequence_ids(count: int, pad: int, device: torch.device) -> torch.Tensor:
    return torch.arange(count * pad, dtype=torch.int32, device=device) // pad


@functools.lru_cache(maxsize=64)
def _cached_padded_sequence_ids(count: int, pad: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return _padded_sequence_ids(count, pad, device)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_flag(name: str, value) -> bool:
    """``value`` as a Python bool. Only True / False (and numpy's bool) are flags: a string such as
    "false", a number or a tensor is truthy by accident, so it is refused rather than read as True."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1 (Python or numpy int; a bool is not a count)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# unsigned dtypes most torch ops (aminmax, comparisons) do not implement: widened to int64 first. A uint64
# value >= 2^63 becomes negative, which every index check refuses like the out-of-range value it is
_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def torch_compatible(array: np.ndarray) -> np.ndarray:
    """``array`` as ``torch.from_numpy`` / ``torch.as_tensor`` take it: torch refuses byte-swapped arrays and
    negative strides (``np.flip``), so those (only) are copied into native byte order and positive strides."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if any(stride < 0 for stride in array.strides):  # (np.ascontiguousarray keeps a 1-element one as it is)
        array = array.copy()
    return array


def _as_tensor(name: str, value) -> torch.Tensor:
    """``value`` as a tensor (lists and numpy arrays of any strides / byte order accepted; an empty list is an
    empty int64 tensor)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        value = torch_compatible(value)
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be an integer tensor, got {type(value).__name__}") from err
    if tensor.numel() == 0 and tensor.is_floating_point():  # torch.as_tensor([]) is float32
        tensor = tensor.long()
    return tensor


def _to_device(name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    if value.device != device and value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device (it holds no values); pass it on {device} like the tokens")
    return value.to(device=device)


def _as_index_tensor(name: str, value, device: torch.device) -> torch.Tensor:
    value = _as_tensor(name, value)
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise TypeError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dtype in _WIDE_UNSIGNED:
        value = value.to(torch.int64)
    return _to_device(name, value, device)


def _lengths_from(name: str, lengths, count: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Validate ``lengths`` ([N] ints in [0, max_len], or a prefix bool mask [N, max_len])."""
    if lengths is None:
        return torch.full((count,), max_len, dtype=torch.int32, device=device)
    lengths = _as_tensor(name, lengths)
    if lengths.dtype == torch.bool:
        if tuple(lengths.shape) != (count, max_len):
            raise ValueError(f"{name} given as a mask must have shape [{count}, {max_len}], got {list(lengths.shape)}")
        mask = _to_device(name, lengths, device)
        counts = mask.sum(dim=1)
        prefix = torch.arange(max_len, device=device)[None, :] < counts[:, None]
        message = (f"{name} mask must be a prefix mask (valid tokens first, then padding); "
                   "reorder the tokens so padding comes last")
        if tracing():
            torch._assert_async((prefix == mask).all(), message)
        elif not torch.equal(prefix, mask):
            raise ValueError(message)
        return counts.to(torch.int32)
    lengths = _as_index_tensor(name, lengths, device)
    if lengths.ndim != 1 or lengths.shape[0] != count:
        raise ValueError(f"{name} must have shape [{count}], got {list(lengths.shape)}")
    if count and not tracing():  # re-checked by the op implementation when compiled
        low, high = value_range(lengths)
        if low < 0 or high > max_len:
            raise ValueError(f"{name} must lie in [0, {max_len}] (the padded length), got values in [{low}, {high}]")
    elif count and lengths.dtype == torch.int64:
        # compiled: the op implementation re-checks the int32 values, but the cast below would wrap 2^32 + 3
        # to a valid 3; so values beyond int32 are refused in the graph (no host read)
        torch._assert_async(((lengths >= -2**31) & (lengths < 2**31)).all(),
                            f"{name} must lie in [0, the padded length], got a value beyond int32")
    # contiguous: the C++ kernel takes the lengths as a C-contiguous array (a strided int32 view is no copy)
    return lengths.to(torch.int32).contiguous()


def _max_len_from(name: str, value):
    """A packed batch's padded length given by the caller: a Python int >= 0 (never a tensor)."""
    if isinstance(value, torch.SymInt):  # torch.compile with dynamic shapes, e.g. a shape of another tensor
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a Python int (the longest sequence, like flash-attn's max_seqlen), "
            f"got {type(value).__name__}"
        )
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _packed(name, cu_name, max_name, tokens, cu_seqlens, max_len) -> TokenBatch:
    cu = _as_index_tensor(cu_name, cu_seqlens, tokens.device).long()
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{cu_name} must be 1-D [N + 1], got shape {list(cu.shape)}")
    seq_lengths = cu[1:] - cu[:-1]
    if max_len is not None:
        max_len = _max_len_from(max_name, max_len)
    if tracing() and max_len is not None:
        # no host read: checked in the graph; the kernels re-check every length against max_len
        valid = (cu[0] == 0) & (cu[-1] == tokens.shape[0])
        if seq_lengths.numel():
            valid &= ((seq_lengths >= 0) & (seq_lengths <= max_len)).all()
        torch._assert_async(valid, f"{cu_name} must start at 0, end at {name}.shape[0], be non-decreasing "
                                   f"and hold no sequence longer than {max_name}")
        pad = max_len
    else:  # eager (or compiled without max_len: these host reads break the graph)
        if int(cu[0]) != 0 or int(cu[-1]) != tokens.shape[0]:
            raise ValueError(
                f"{cu_name} must start at 0 and end at {name}.shape[0] = {tokens.shape[0]}, "
                f"got first {int(cu[0])} and last {int(cu[-1])}"
            )
        if seq_lengths.numel() and int(seq_lengths.min()) < 0:
            raise ValueError(f"{cu_name} must be non-decreasing")
        longest = int(seq_lengths.max()) if seq_lengths.numel() else 0
        if max_len is not None and longest > max_len:
            raise ValueError(f"{max_name} = {max_len} is shorter than the longest sequence of {cu_name} ({longest})")
        pad = longest if max_len is None else max_len
    return TokenBatch(tokens.contiguous(), cu[:-1].contiguous(), seq_lengths.to(torch.int32), pad)


def token_batch(
    name: str, tokens, lengths=None, cu_seqlens=None, *, allowed_dtypes=KERNEL_DTYPES, max_len=None
) -> TokenBatch:
    """Validate one side's tokens (padded or packed) and return its :class:`TokenBatch`.

    ``name`` is the argument name ("text" or "images"); the companion arguments
    are ``text_lengths`` / ``image_lengths``, ``*_cu_seqlens`` and ``max_text_len`` /
    ``max_image_len`` (``max_len``: packed input only, the padded length as a Python
    int, default the longest sequence; it sets the argmax width and, with
    ``padding="zero"``, the padded size).
    """
    prefix = "image" if name == "images" else name
    lengths_name = f"{prefix}_lengths"
    cu_name = f"{prefix}_cu_seqlens"
    max_name = f"max_{prefix}_len"
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in allowed_dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
        hint = " (float64 runs with backend='reference' or 'cpu')" if tokens.dtype == torch.float64 else ""
        raise TypeError(f"{name} must have dtype in ({names}), got {tokens.dtype}{hint}")
    device = tokens.device
    if cu_seqlens is not None:
        if lengths is not None:
            raise ValueError(f"give either {lengths_name} or {cu_name}, not both")
        if tokens.ndim != 2:
            raise ValueError(
                f"{name} with {cu_name} must be packed [total_tokens, D], got shape {list(tokens.shape)}"
            )
        return _packed(name, cu_name, max_name, tokens, cu_seqlens, max_len)
    if max_len is not None:
        raise ValueError(f"{max_name} applies to packed {name} (with {cu_name}); padded {name} "
                         f"[N, L, D] has the padded length L")
    if tokens.ndim != 3:
        raise ValueError(
            f"{name} must be padded [N, L, D] (or packed [total_tokens, D] with {cu_name}), "
            f"got shape {list(tokens.shape)}"
        )
    count, pad, dim = tokens.shape
    offsets, full_lengths = padded_layout(count, pad, device)
    lengths32 = full_lengths if lengths is None else _lengths_from(lengths_name, lengths, count, pad, device)
    flat = tokens.contiguous().view(count * pad, dim)
    return TokenBatch(flat, offsets, lengths32, pad)


def check_pair(text: TokenBatch, images: TokenBatch) -> None:
    """Both sides must agree on D, dtype and device."""
    if text.dim != images.dim:
        raise ValueError(f"text and images must have the same feature dim D, got {text.dim} and {images.dim}")
    if text.dim < 1:
        raise ValueError("feature dim D must be at least 1, got 0")
    if text.tokens.device != images.tokens.device:
        raise ValueError(
            f"text and images must be on the same device, got {text.tokens.device} and {images.tokens.device}"
        )
    if text.tokens.dtype != images.tokens.dtype:
        raise TypeError(
            f"text and images must have the same dtype, got {text.tokens.dtype} and {images.tokens.dtype}; "
            "cast one of them (e.g. images.to(text.dtype))"
        )


def value_range(values: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor with one device-to-host copy (one sync on a GPU)."""
    low, high = torch.stack(torch.aminmax(values)).tolist()
    return int(low), int(high)


def check_candidates(candidates, text_count: int, image_count: int, device: torch.device) -> torch.Tensor:
    """Candidates: int [Nt, K] ids into the image batch."""
    candidates = _as_index_tensor("candidates", candidates, device)
    if candidates.ndim != 2 or candidates.shape[0] != text_count:
        raise ValueError(f"candidates must have shape [{text_count}, K] (one row per text), got {list(candidates.shape)}")
    candidates = candidates.long().contiguous()
    if candidates.numel() and not tracing():  # re-checked by the op implementation when compiled
        low, high = value_range(candidates)
        if low < 0 or high >= image_count:
            raise IndexError(
                f"candidates must be image ids in [0, {image_count - 1}] (images has {image_count} rows), "
                f"got values in [{low}, {high}]"
            )
    return candidates


def normalized(batch: TokenBatch) -> TokenBatch:
    """L2-normalise every token (in fp32 at least, then back to the input dtype).

    Every token with a nonzero finite component becomes a unit vector, whatever its scale: each row is first
    multiplied by a power of two (exact) that brings its largest |component| into [0.5, 1), so the sum of
    squares neither overflows (fp32 rows with |x| above ~1e19 gave inf norms, hence all-zero "unit" vectors)
    nor underflows, and ``F.normalize``'s eps (1e-12, which left rows of smaller norm short of unit length)
    never applies. Rows in the ordinary range get the same bits as without the scaling; zero rows stay zero;
    rows with a NaN or an infinity are left to ``F.normalize`` as before (NaN / inf components). The scale is a
    constant of the backward (normalisation is scale-invariant)."""
    tokens = batch.tokens
    work = tokens if tokens.dtype == torch.float64 else tokens.float()
    largest = work.detach().abs().amax(dim=-1, keepdim=True) if work.shape[-1] else None
    if largest is not None and largest.numel():
        exponent = torch.frexp(largest).exponent  # largest = m * 2**exponent, m in [0.5, 1)
        exponent = torch.where(torch.isfinite(largest) & (largest > 0), exponent, torch.zeros_like(exponent))
        # 2**-exponent in two factors: one alone can leave the dtype's range (fp32: exponent in [-148, 128])
        first = torch.div(-exponent, 2, rounding_mode="floor")
        work = work * torch.exp2(first.to(work.dtype)) * torch.exp2((-exponent - first).to(work.dtype))
    work = torch.nn.functional.normalize(work, p=2.0, dim=-1)
    return TokenBatch(work.to(tokens.dtype).contiguous(), batch.offsets, batch.lengths, batch.pad)
