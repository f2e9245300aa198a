"""``torch.library`` registration of the fused alignment op: forward, fake, autograd.

``aladin_fast::score_tokens`` takes the kernel layout of docs/kernel_contract.md
(2-D token matrices + offsets + lengths, optional candidate ids) and runs the
C++ or Triton kernel. Its backward, ``aladin_fast::score_tokens_backward``, is
an op of its own so that ``torch.compile`` treats it as opaque.

Backward uses the argmax saved by the forward, never a ``[pairs, W, R]``
tensor: the word -> region argmax (int32 ``[pairs, W]``, MrSw / MrAVGw / symm)
and the region -> word argmax (int32 ``[pairs, R]``, MwSr / symm):

* word term: ``d t_w += c * v_{argmax(w)}``, ``d v_{argmax(w)} += c * t_w``;
* region term: the same with the region -> word argmax;
* sum / mean: closed form through per-sequence token sums.

Backend "cpu" runs all of it in C++ (``_C.score_backward``: grad_text rows
owned by the thread owning the caption, grad_images rows by the thread owning
the image, no atomics, deterministic). Backend "triton" chooses per aggregation
(``triton_backward_strategy``, default "auto", measured on an H200):

* "gather" (MrSw / MrAVGw / MwSr): the one-sided term as row gathers
  (``kernels/alignment_gather.py``), the other side by the winner-GEMM image
  kernel (``kernels/alignment_winner_gemm.py``: weight tiles built from the
  argmax in registers, times the tokens on tensor cores; all pairs) or the
  per-pair kernels. A winner-GEMM images program whose accumulator ends NaN /
  inf recomputes its rows word by word (exact for non-finite values): no
  finiteness check, no host sync in the step;
* "gemm" (symm): the weight matrix written in capped row chunks
  (``kernels/alignment_weights.py``) and multiplied with ``torch.mm``;
* otherwise the per-pair Triton backward kernels (``kernels/alignment_backward.py``):
  text rows owned by a caption's program; image rows either owned by an image's
  program walking its pairs ("segmented", deterministic) or accumulated with fp32
  atomics ("atomic", order-dependent last bits; opt-in with
  ``ALADIN_FAST_TRITON_BACKWARD=atomic``, never under
  ``torch.use_deterministic_algorithms(True)``). Both forward kernels emit the
region -> word argmax in the same pass. :func:`sparse_backward` (PyTorch
sparse matrices built from the argmax, in chunks) is the independent check of
both kernels in the tests.

A padded position that wins a max in ``padding="zero"`` mode is a zero vector:
it receives and passes no gradient. Gradients are accumulated in float32 (float64
for float64 inputs, C++ backend) and returned in the input dtype. Double backward
is not implemented (raises ``NotImplementedError``).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .. import reference
from .._inputs import TokenBatch, is_shared_padded_layout, padded_sequence_ids
from .backends import cpu_kernels, triton_kernels

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}  # float64: the C++ kernel's scalar double path (gradcheck)
MRSW, MRAVGW, MWSR, SYMM, SUM, MEAN = range(6)
KERNEL_REGION_ARGMAX = ("cpu", "triton")  # backends whose forward kernel emits the region -> word argmax


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy numpy view of a contiguous CPU tensor (bf16 as its uint16 bits)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy()
    return tensor.numpy()


def run_kernel(backend, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
               aggregation, zero_padding, text_pad, image_pad, out, argmax, region_argmax=None, validated=False,
               triton_config=None):
    """Launch one backend kernel on kernel-layout tensors (writes ``out``, ``argmax``, ``region_argmax``).

    ``region_argmax [Nt, K, image_pad]`` (region -> winning word, pre-filled with -1) or None;
    ``triton_config``: ``_triton_kernel_choice()``, read once by the caller.
    """
    if out.numel() == 0:
        return
    if backend == "cpu":
        cpu_kernels().score(
            _numpy_view(text), text_offsets.numpy(), text_lengths.numpy(),
            _numpy_view(images), image_offsets.numpy(), image_lengths.numpy(),
            None if candidates is None else candidates.numpy(),
            _DTYPE_NAMES[text.dtype], aggregation, zero_padding, text_pad, image_pad,
            out.numpy(), None if argmax is None else argmax.numpy(), "auto", torch.get_num_threads(),
            None if region_argmax is None else region_argmax.numpy(),
        )
    elif backend == "triton":
        if not validated:  # value ranges (the eager op layer has checked them already: no second device sync)
            _check_metadata(text_lengths, text_pad, image_lengths, image_pad, candidates, image_offsets.shape[0])
        triton_kernels().launch_alignment(
            text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
            aggregation, zero_padding, text_pad, image_pad, out, argmax, region_argmax, config=triton_config,
        )
    else:  # pragma: no cover - the op layer only passes kernel backends here
        raise RuntimeError(f"score_tokens runs kernel backends only, got {backend!r}")


def _check_metadata(text_lengths, text_pad, image_lengths, image_pad, candidates, image_count):
    """Value-range checks the op layer skips under ``torch.compile`` (the C++ bindings do their own)."""
    checks = [("text_lengths", text_lengths, text_pad), ("image_lengths", image_lengths, image_pad)]
    if candidates is not None:
        checks.append(("candidates", candidates, image_count - 1))
    checks = [check for check in checks if check[1].numel()]
    if not checks:
        return
    # every range in one device-to-host copy (one sync on a GPU)
    ranges = torch.stack([torch.stack(torch.aminmax(values)).long() for _, values, _ in checks]).tolist()
    for (name, _, high), (low_seen, high_seen) in zip(checks, ranges):
        if low_seen < 0 or high_seen > high:
            if name == "candidates":
                raise IndexError(f"candidates must be image ids in [0, {high}], got values in [{low_seen}, {high_seen}]")
            raise ValueError(f"{name} must lie in [0, {high}] (the padded length), got values in "
                             f"[{low_seen}, {high_seen}]")


def _score_tokens_impl(
    text: torch.Tensor, text_offsets: torch.Tensor, text_lengths: torch.Tensor,
    images: torch.Tensor, image_offsets: torch.Tensor, image_lengths: torch.Tensor,
    candidates: Optional[torch.Tensor], aggregation: int, zero_padding: bool,
    text_pad: int, image_pad: int, backend: str, want_argmax: bool, want_region_argmax: bool = False,
    validated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused scores ``[Nt, K]`` float32, word -> region argmax ``[Nt, K, text_pad]`` int32 and
    region -> word argmax ``[Nt, K, image_pad]`` int32 (each ``[0]`` when not wanted)."""
    count = text_offsets.shape[0]
    k = image_offsets.shape[0] if candidates is None else candidates.shape[1]
    device = text.device
    # the packed Triton kernel stores every entry (no fill launches); the others need zeros / -1 at padding
    triton_config = _triton_kernel_choice() if backend == "triton" else None
    written = backend == "triton" and triton_kernels().forward_writes_every_output(text_pad, image_pad, triton_config)
    out = (torch.empty if written else torch.zeros)(
        count, k, dtype=torch.float64 if text.dtype == torch.float64 else torch.float32, device=device)

    def winners(pad):
        if written:
            return torch.empty((count, k, pad), dtype=torch.int32, device=device)
        return torch.full((count, k, pad), -1, dtype=torch.int32, device=device)

    argmax = winners(text_pad) if want_argmax else torch.empty(0, dtype=torch.int32, device=device)
    emit_region = want_region_argmax and backend in KERNEL_REGION_ARGMAX
    region_argmax = winners(image_pad) if emit_region else torch.empty(0, dtype=torch.int32, device=device)
    text, images = text.contiguous(), images.contiguous()
    run_kernel(backend, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
               aggregation, zero_padding, text_pad, image_pad, out, argmax if want_argmax else None,
               region_argmax if emit_region else None, validated, triton_config)
    if want_region_argmax and not emit_region:
        region_argmax = _region_argmax(text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                                       candidates, zero_padding, text_pad, image_pad, backend)
    return out, argmax, region_argmax


@torch.library.custom_op("aladin_fast::score_tokens", mutates_args=())
def score_tokens(
    text: torch.Tensor, text_offsets: torch.Tensor, text_lengths: torch.Tensor,
    images: torch.Tensor, image_offsets: torch.Tensor, image_lengths: torch.Tensor,
    candidates: Optional[torch.Tensor], aggregation: int, zero_padding: bool,
    text_pad: int, image_pad: int, backend: str, want_argmax: bool, want_region_argmax: bool = False,
    layout_checked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused scores ``[Nt, K]``, word -> region argmax ``[Nt, K, text_pad]`` int32 and region -> word argmax
    ``[Nt, K, image_pad]`` int32 (each ``[0]`` when not wanted): the op ``torch.compile`` sees.

    ``layout_checked``: the caller built the lengths / candidates itself and knows them in range (full-length
    padded batches, all pairs or paired), so the Triton backend skips its value-range check -- a
    device-to-host copy, i.e. a sync per call in a compiled graph and a failure under CUDA-graph capture.
    Otherwise every call checks (the C++ bindings check on their own)."""
    return _score_tokens_impl(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                              aggregation, zero_padding, text_pad, image_pad, backend, want_argmax,
                              want_region_argmax, validated=layout_checked)


@score_tokens.register_fake
def _(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, aggregation,
      zero_padding, text_pad, image_pad, backend, want_argmax, want_region_argmax=False, layout_checked=False):
    count = text_offsets.shape[0]
    k = image_offsets.shape[0] if candidates is None else candidates.shape[1]
    out = text.new_empty((count, k), dtype=torch.float64 if text.dtype == torch.float64 else torch.float32)
    argmax = text.new_empty((count, k, text_pad) if want_argmax else (0,), dtype=torch.int32)
    region_argmax = text.new_empty((count, k, image_pad) if want_region_argmax else (0,), dtype=torch.int32)
    return out, argmax, region_argmax


def _pair_images(candidates: Optional[torch.Tensor], text_count: int, image_count: int, device) -> torch.Tensor:
    """Image id of every pair ``[Nt, K]`` (all pairs: ``arange(Ni)`` on every row)."""
    if candidates is None:
        return torch.arange(image_count, device=device).expand(text_count, image_count)
    return candidates


ARGMAX_CHUNK_ENTRIES = 1 << 19  # sparse entries per backward chunk: bounds the index/value buffers


def _argmax_term(coefficient, argmax, from_offsets, from_lengths, to_offsets, to_lengths, from_tokens, to_tokens,
                 grad_from, grad_to):
    """Gradient of ``sum_{pairs, p} coefficient * <from_p, to_{argmax(p)}>``.

    All per-pair arguments are ``[Nt, K]`` (``argmax [Nt, K, P]``): position p
    of the pair's "from" sequence won the max at position argmax of its "to"
    sequence. Returns ``(d from_tokens, d to_tokens)`` in float32, built as a
    sparse matrix with one entry per (pair, valid position), in chunks of pairs
    so the index buffers stay small; never a [pairs, P, D] tensor.
    """
    device = argmax.device
    count, k, pad = argmax.shape
    if count * k * pad == 0:
        return
    positions = torch.arange(pad, device=device)
    rows_per_chunk = max(1, ARGMAX_CHUNK_ENTRIES // max(1, k * pad))
    shape = (from_tokens.shape[0], to_tokens.shape[0])
    for start in range(0, count, rows_per_chunk):
        chunk = slice(start, min(count, start + rows_per_chunk))
        winner = argmax[chunk].long()
        valid = (positions < from_lengths[chunk].long()[..., None]) & (winner >= 0)
        valid &= winner < to_lengths[chunk].long()[..., None]  # a winning zero pad carries no gradient
        rows = (from_offsets[chunk][..., None] + positions)[valid]
        cols = (to_offsets[chunk][..., None] + winner)[valid]
        values = coefficient[chunk][..., None].expand(winner.shape)[valid]
        matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, device=device,
                                         check_invariants=False).coalesce()
        grad_from.addmm_(matrix, to_tokens)
        grad_to.addmm_(matrix.t(), from_tokens)
        del matrix, rows, cols, values, valid, winner


def _region_argmax(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                   zero_padding, text_pad, image_pad, backend):
    """Region -> word argmax ``[Nt, K, image_pad]`` (first index wins) for backends whose kernel does not
    emit it: the kernel with text and images swapped (all pairs, paired) or the chunked reference (rerank)."""
    count, image_count = text_offsets.shape[0], image_offsets.shape[0]
    if backend == "cpu":
        _, _, region_argmax = score_tokens(text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                                           candidates, MRSW, zero_padding, text_pad, image_pad, backend, False, True)
        return region_argmax
    if candidates is None or (candidates.shape[1] == 1 and count == image_count and torch.equal(
            candidates[:, 0], torch.arange(count, device=candidates.device))):
        swapped = None if candidates is None else candidates
        _, transposed, _ = score_tokens(images, image_offsets, image_lengths, text, text_offsets, text_lengths,
                                        swapped, MRSW, zero_padding, image_pad, text_pad, backend, True)
        return (transposed.transpose(0, 1) if candidates is None else transposed).contiguous()
    # rerank: the chunked reference on the swapped problem, one query at a time
    out = torch.empty(count, candidates.shape[1], image_pad, dtype=torch.int32, device=text.device)
    text_batch = TokenBatch(text.float(), text_offsets, text_lengths, text_pad)
    image_batch = TokenBatch(images.float(), image_offsets, image_lengths, image_pad)
    text_padded, _ = text_batch.padded()
    image_padded, _ = image_batch.padded()
    for i in range(count):
        ids = candidates[i]
        sim = torch.einsum("krd,wd->krw", image_padded[ids], text_padded[i])[None]  # [1, K, R, W]
        _, argmax = reference.aggregate(sim, image_lengths[ids].long()[None], text_lengths[i].long().view(1, 1),
                                        "MrSw", zero_padding, want_argmax=True)
        out[i] = argmax[0]
    return out


def _segment_sums(tokens, offsets, lengths):
    """Sum of each sequence's valid tokens ``[N, D]`` in float32."""
    prefix = torch.nn.functional.pad(tokens.float().cumsum(0), (0, 0, 1, 0))
    return prefix[offsets + lengths.long()] - prefix[offsets]


def sparse_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                    argmax, region_argmax, aggregation, zero_padding, text_pad, image_pad, backend):
    """PyTorch backward from the argmax (any device): ``(d text, d images)`` float32.

    The path for the Triton backend and the independent check of the C++
    backward. ``region_argmax`` may be empty (recomputed here for MwSr / symm).
    """
    device = text.device
    count, image_count = text_offsets.shape[0], image_offsets.shape[0]
    grad = grad.float()
    text_f, images_f = text.float(), images.float()
    grad_text = torch.zeros(text.shape, dtype=torch.float32, device=device)
    grad_images = torch.zeros(images.shape, dtype=torch.float32, device=device)
    if grad.numel() == 0:
        return grad_text, grad_images
    pair_images = _pair_images(candidates, count, image_count, device)
    image_offsets_pair = image_offsets[pair_images]
    image_lengths_pair = image_lengths[pair_images]
    text_offsets_pair = text_offsets[:, None].expand_as(pair_images)
    text_lengths_pair = text_lengths[:, None].expand_as(pair_images)
    if aggregation in (MRSW, MRAVGW, SYMM):  # word -> region term
        coefficient = grad
        if aggregation == MRAVGW:
            coefficient = grad / text_lengths.clamp(min=1).float()[:, None]
        _argmax_term(coefficient, argmax, text_offsets_pair, text_lengths_pair, image_offsets_pair,
                     image_lengths_pair, text_f, images_f, grad_text, grad_images)
    if aggregation in (MWSR, SYMM):  # region -> word term
        if region_argmax.numel() != count * pair_images.shape[1] * image_pad:
            region_argmax = _region_argmax(text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                                           candidates, zero_padding, text_pad, image_pad, backend)
        _argmax_term(grad, region_argmax, image_offsets_pair, image_lengths_pair, text_offsets_pair,
                     text_lengths_pair, images_f, text_f, grad_images, grad_text)
    if aggregation in (SUM, MEAN):
        coefficient = grad
        if aggregation == MEAN:
            if zero_padding:
                coefficient = grad / float(max(text_pad * image_pad, 1)) if text_pad * image_pad else grad * 0
            else:
                pairs_count = (text_lengths.float()[:, None] * image_lengths_pair.float())
                coefficient = torch.where(pairs_count > 0, grad / pairs_count.clamp(min=1), torch.zeros_like(grad))
        image_sums = _segment_sums(images, image_offsets, image_lengths)  # [Ni, D]
        text_sums = _segment_sums(text, text_offsets, text_lengths)  # [Nt, D]
        if candidates is None:
            per_text = coefficient @ image_sums  # [Nt, D]
            per_image = coefficient.t() @ text_sums  # [Ni, D]
        else:
            per_text = torch.einsum("ik,ikd->id", coefficient, image_sums[candidates])
            per_image = torch.zeros(image_count, text.shape[1], device=device).index_add_(
                0, candidates.reshape(-1), (coefficient[..., None] * text_sums[:, None, :]).reshape(-1, text.shape[1]))
        _add_to_tokens(grad_text, per_text, text_offsets, text_lengths)
        _add_to_tokens(grad_images, per_image, image_offsets, image_lengths)
    return grad_text, grad_images


def cpu_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                 argmax, region_argmax, aggregation, zero_padding, text_pad, image_pad):
    """The C++ backward (``_C.score_backward``): ``(d text, d images)`` float32 (float64 for float64 inputs)."""
    accumulate = torch.float64 if text.dtype == torch.float64 else torch.float32
    grad_text = torch.empty(text.shape, dtype=accumulate)
    grad_images = torch.empty(images.shape, dtype=accumulate)
    word_term, region_term = aggregation in (MRSW, MRAVGW, SYMM), aggregation in (MWSR, SYMM)
    cpu_kernels().score_backward(
        grad.to(accumulate).contiguous().numpy(), _numpy_view(text), text_offsets.numpy(), text_lengths.numpy(),
        _numpy_view(images), image_offsets.numpy(), image_lengths.numpy(),
        None if candidates is None else candidates.numpy(), _DTYPE_NAMES[text.dtype], aggregation, zero_padding,
        text_pad, image_pad, argmax.numpy() if word_term else None, region_argmax.numpy() if region_term else None,
        grad_text.numpy(), grad_images.numpy(), "auto", torch.get_num_threads(),
    )
    return grad_text, grad_images


def _triton_kernel_choice():
    """``ALADIN_FAST_TRITON_KERNEL=pair|packed`` forces one Triton kernel family (benchmarks, tuning); unset:
    the launchers choose (packed tiles whenever a whole caption and image fit one tile)."""
    kernel = os.environ.get("ALADIN_FAST_TRITON_KERNEL")
    if kernel is None:
        return None
    if kernel not in ("pair", "packed"):
        raise ValueError(f"ALADIN_FAST_TRITON_KERNEL must be 'pair' or 'packed', got {kernel!r}")
    return {"kernel": kernel}


TRITON_BACKWARD_STRATEGIES = ("auto", "gather", "dense", "gemm", "segmented", "atomic")
# cuBLAS is deterministic under torch.use_deterministic_algorithms(True) only with one of these workspace configs
_DETERMINISTIC_CUBLAS_CONFIGS = (":4096:8", ":16:8")


def triton_backward_strategy(aggregation: Optional[int] = None) -> str:
    """Backward of the Triton backend: "auto", "gather", "dense", "gemm", "segmented" or "atomic".

    * "auto" (the default): per aggregation, the strategy measured fastest (``AUTO_BACKWARD``).
    * "gather": the one-sided argmax terms as row gathers (``kernels/alignment_gather.py``), in every mode:
      MrSw / MrAVGw text side (the image side by the winner-GEMM images kernel, whose programs recompute their
      rows word by word where the GEMM met a NaN / inf: no finiteness check, no sync), MwSr image side (the
      text side as "segmented"); symm as "gemm". The gathers never meet a weight of 0.
    * "dense": all pairs with MrSw / MrAVGw, padded lengths <= 128 and
      finite tokens run the winner-GEMM kernels (``kernels/alignment_winner_gemm.py``: the
      word x region-row weight matrix built tile by tile from the argmax, times the tokens,
      on tensor cores); everything else runs the "segmented" kernels.
    * "gemm": all pairs with any argmax aggregation (MrSw / MrAVGw / MwSr / symm), any padded length and
      finite tokens materialise the weight matrix in row chunks (``kernels/alignment_weights.py``, at most
      ``ALADIN_FAST_BACKWARD_WORKSPACE_MB`` MiB, default 8) and multiply with ``torch.mm``
      (cuBLAS on a GPU); everything else runs the "segmented" kernels.
    * "segmented": the argmax kernels, image rows owned by an image's program (deterministic).
    * "atomic": the argmax kernels, image rows accumulated with fp32 atomics (order-dependent bits).

    ``ALADIN_FAST_TRITON_BACKWARD`` chooses; with ``aggregation`` given, "auto" is resolved. Under
    ``torch.use_deterministic_algorithms(True)`` "atomic" becomes "segmented", and so does "gemm" unless
    ``CUBLAS_WORKSPACE_CONFIG`` is one of torch's deterministic settings (torch.mm raises otherwise).
    "dense", "gemm" and "segmented" write each output row in a fixed order: bitwise deterministic.
    """
    strategy = os.environ.get("ALADIN_FAST_TRITON_BACKWARD", "auto")
    if strategy not in TRITON_BACKWARD_STRATEGIES:
        raise ValueError(f"ALADIN_FAST_TRITON_BACKWARD must be one of {TRITON_BACKWARD_STRATEGIES}, got {strategy!r}")
    if strategy == "auto" and aggregation is not None:
        strategy = AUTO_BACKWARD.get(aggregation, "segmented")
    if strategy == "gather" and aggregation == SYMM:  # two-sided: the chunked weight matrix
        strategy = "gemm"
    if torch.are_deterministic_algorithms_enabled() and (strategy == "atomic" or (
            strategy == "gemm" and os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in _DETERMINISTIC_CUBLAS_CONFIGS)):
        return "segmented"
    return strategy


BACKWARD_WORKSPACE_MB = 8.0  # default cap of the "gemm" backward's weight-matrix chunk


def backward_workspace_bytes() -> int:
    """Cap of the "gemm" backward's workspace in bytes: ``ALADIN_FAST_BACKWARD_WORKSPACE_MB`` (MiB, a positive
    number; fractions allowed) or 8 MiB."""
    value = os.environ.get("ALADIN_FAST_BACKWARD_WORKSPACE_MB")
    if value is None:
        return int(BACKWARD_WORKSPACE_MB * 2**20)
    try:
        mib = float(value)
    except ValueError:
        mib = float("nan")
    if not 0 < mib < float("inf"):
        raise ValueError(f"ALADIN_FAST_BACKWARD_WORKSPACE_MB must be a positive number of MiB, got {value!r}")
    return max(1, int(mib * 2**20))


# Aggregations the winner-GEMM backward runs by default. Measured on an H200 (bf16, 128 x 128, W=32, R=36,
# D=1024, session 3 run 2): MrSw fwd+bwd 1.60 ms vs 2.71 ms with the segmented kernels; with the region term
# the gathered [words x regions] winner tiles are slower than the segmented kernels (MwSr 6.6 vs 1.7 ms,
# symm 7.0 vs 3.1 ms), so those keep the segmented kernels.
DENSE_AGGREGATIONS = (MRSW, MRAVGW)
GEMM_AGGREGATIONS = (MRSW, MRAVGW, MWSR, SYMM)
# "auto": measured on an H200 (bf16, 128 x 128, W=32, R=36, D=1024 / 768, fwd + bwd, session 5 runs 4-5,
# benchmarks/results/gpu-nvidia-h200/session5). GPU-busy time per step (torch.profiler; wall times of these
# steps are host-bound and vary 1.2-1.7 ms between processes): MrSw "gather" 0.90 / 0.68 ms vs "dense" 1.42 /
# 1.27 and late-interaction-kernels 1.76 / 1.50; MwSr "gather" 1.41 / 1.07 vs segmented 1.66 / 1.29; symm
# "gemm" 0.53 / 0.49 vs segmented 3.05 / 2.35.
AUTO_BACKWARD = {MRSW: "gather", MRAVGW: "gather", MWSR: "gather", SYMM: "gemm"}


def _finite_total(text, images) -> torch.Tensor:
    """0-d bool on the tokens' device: every token finite. A float32 sum of each token matrix (NaN / inf
    propagate; an overflow of finite values only costs the fallback), with no input-sized temporaries."""
    return torch.isfinite(text.sum(dtype=torch.float32) + images.sum(dtype=torch.float32))


class FiniteCheck:
    """The finiteness of a backward's tokens, started by the eager forward *before* its kernel.

    The GEMM backwards need every token finite (a zero weight times an inf token would be NaN). Checked in
    the backward, the answer waits for the whole stream (the forward kernel included: measured 0.15-0.27 ms
    of a 1.4-2.1 ms training step on an H200, benchmarks/results/gpu-nvidia-h200/session5). Started ahead of
    the forward kernel, its result is copied to pinned host memory behind an event; the backward waits
    only for that event, long past by then. The backward's tokens are the forward's (autograd's version
    counter rejects an in-place change in between)."""

    __slots__ = ("flag", "event")

    def __init__(self, text, images):
        self.flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        self.flag.copy_(_finite_total(text, images), non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def __bool__(self) -> bool:
        self.event.synchronize()
        return bool(self.flag)


def start_finite_check(text, images, candidates, aggregation, backend):
    """A :class:`FiniteCheck` where an eager Triton backward may run a GEMM strategy (all pairs, an argmax
    aggregation, CUDA tokens), else None (the backward then checks with a sync if it needs to)."""
    if backend != "triton" or candidates is not None or not text.is_cuda or text.numel() == 0 or images.numel() == 0:
        return None
    strategy = triton_backward_strategy(aggregation)
    # ("gather" needs no check: its image kernel recomputes non-finite programs exactly)
    if not ((strategy == "dense" and aggregation in DENSE_AGGREGATIONS)
            or (strategy == "gemm" and aggregation in GEMM_AGGREGATIONS)) or torch.cuda.is_current_stream_capturing():
        return None
    return FiniteCheck(text, images)


def _tokens_finite(text, images, finite=None) -> bool:
    """Whether every token is finite: ``finite`` (a :class:`FiniteCheck` the forward started) or one
    device sync. Inside a CUDA-graph capture (no sync allowed) the answer is False: the caller then runs
    the argmax kernels, which need no finiteness."""
    if finite is not None:
        return bool(finite)
    if text.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(_finite_total(text, images).item())


def _dense_applies(text, images, candidates, aggregation, text_pad, image_pad, finite=None) -> bool:
    """The winner-GEMM backward: all pairs, MrSw / MrAVGw, padded lengths <= 128 and finite tokens.
    (A padded-layout variant that computed row offsets instead of loading them measured no faster on the
    H200 -- benchmarks/results/gpu-nvidia-h200/session3/run{4,5}-sweep.json -- and was removed.)"""
    return _winner_gemm_fits(candidates, aggregation, text_pad, image_pad) and _tokens_finite(text, images, finite)


def _winner_gemm_fits(candidates, aggregation, text_pad, image_pad) -> bool:
    """The winner-GEMM kernels' layout: all pairs, MrSw / MrAVGw, padded lengths <= 128 (finiteness aside)."""
    return (candidates is None and aggregation in DENSE_AGGREGATIONS
            and triton_kernels().winner_gemm_fits(text_pad, image_pad))


def _gemm_rows_per_chunk(text, images, candidates, aggregation, finite=None) -> int:
    """Text-token rows per chunk of the "gemm" backward, or 0 where it does not apply (not all pairs, not an
    argmax aggregation, one row of the weight matrix over the workspace cap, non-finite tokens)."""
    if candidates is not None or aggregation not in GEMM_AGGREGATIONS or images.shape[0] == 0 or text.shape[1] == 0:
        return 0  # also without image tokens or features: nothing to multiply, the kernels path writes the zeros
    row_bytes = images.shape[0] * triton_kernels().weights_dtype(text.dtype).itemsize
    rows = backward_workspace_bytes() // max(1, row_bytes)
    if rows == 0 or text.shape[0] == 0 or not _tokens_finite(text, images, finite):
        return 0
    chunks = -(-text.shape[0] // rows)
    return -(-text.shape[0] // chunks)  # the fewest chunks the cap allows, of equal size (one GEMM shape)


# Whether CUDA addmm(out_dtype=float32) accepts an fp32 ``self`` (newer torch): bf16 chunks then accumulate in
# place; older versions raise, and the chunk product goes through an fp32 temporary instead.
_ADDMM_INTO_FP32 = [True]


def _product_into(out, weights, tokens, accumulate=False):
    """``out (fp32) = weights @ tokens`` (``+=`` with ``accumulate``), fp32 accumulation; ``weights`` and
    ``tokens`` both fp32 or both bf16."""
    if weights.dtype == torch.bfloat16 and not weights.is_cuda:  # no bf16 -> fp32 mm on the CPU (interpreter)
        weights, tokens = weights.float(), tokens.float()
    if weights.dtype == torch.float32:
        if accumulate:
            out.addmm_(weights, tokens)
        else:
            torch.mm(weights, tokens, out=out)
    elif not accumulate:
        torch.mm(weights, tokens, out_dtype=torch.float32, out=out)
    else:
        if _ADDMM_INTO_FP32[0]:
            try:
                torch.addmm(out, weights, tokens, out_dtype=torch.float32, out=out)
                return
            except RuntimeError:
                _ADDMM_INTO_FP32[0] = False
        out.add_(torch.mm(weights, tokens, out_dtype=torch.float32))


def _token_sequence(offsets, lengths, num_tokens, pad):
    """``token_sequence_ids`` of one side; a shared full-length padded batch (``is_shared_padded_layout``)
    reuses one cached map per (N, pad, device) instead of a fill and a kernel launch per backward."""
    if is_shared_padded_layout(offsets, lengths, num_tokens, pad):
        return padded_sequence_ids(offsets.shape[0], pad, offsets.device)
    return triton_kernels().token_sequence_ids(offsets, lengths, num_tokens, pad)


def _new_gradient(tokens, every_row_written: bool, dtype=None) -> torch.Tensor:
    """A gradient buffer shaped like ``tokens``, in ``dtype`` (default theirs: kernels that store each row once
    cast from their fp32 accumulators): uninitialised when the kernels write every row, else zero-filled."""
    return (torch.empty if every_row_written else torch.zeros)(tokens.shape, dtype=dtype or tokens.dtype,
                                                               device=tokens.device)


def _gemm_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, argmax,
                   region_argmax, aggregation, text_pad, image_pad, grad_text, grad_images, rows_per_chunk):
    """The "gemm" strategy: per chunk of ``rows_per_chunk`` text-token rows, the weight-matrix rows ``G_c``
    (``kernels/alignment_weights.py``), then ``d text[rows] = G_c @ images`` and ``d images += G_c^T @ text[rows]``
    (fp32 accumulation, chunks in order: deterministic). Writes every row of ``grad_text`` and ``grad_images``
    (which may start uninitialised); needs text, image tokens and features (``_gemm_rows_per_chunk`` > 0)."""
    kernels = triton_kernels()
    num_text_tokens, num_image_tokens = text.shape[0], images.shape[0]
    dtype = kernels.weights_dtype(text.dtype)
    text_mm, images_mm = text.to(dtype), images.to(dtype)  # fp16 tokens meet an fp32 workspace
    text_sequence = _token_sequence(text_offsets, text_lengths, num_text_tokens, text_pad)
    image_sequence = _token_sequence(image_offsets, image_lengths, num_image_tokens, image_pad)
    workspace = torch.empty(rows_per_chunk * num_image_tokens, dtype=dtype, device=text.device)
    for start in range(0, num_text_tokens, rows_per_chunk):
        stop = min(num_text_tokens, start + rows_per_chunk)
        weights = workspace[:(stop - start) * num_image_tokens].view(stop - start, num_image_tokens)
        kernels.launch_alignment_weights(grad, argmax, region_argmax, text_sequence, text_offsets, text_lengths,
                                         image_sequence, image_offsets, aggregation, text_pad, image_pad, start,
                                         weights)
        _product_into(grad_text[start:stop], weights, images_mm)
        _product_into(grad_images, weights.t(), text_mm[start:stop], accumulate=start > 0)


def _gather_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                     argmax, region_argmax, aggregation, zero_padding, text_pad, image_pad):
    """The "gather" strategy (``grad`` float32 contiguous): the gathered side by ``kernels/alignment_gather.py``,
    the other by the winner-GEMM images kernel (MrSw / MrAVGw, all pairs, padded lengths <= 128; exact for
    non-finite values: an affected program recomputes its rows word by word) or the segmented kernels. Every
    kernel here stores each row once, so the gradients are returned in the tokens' dtype directly (no float32
    buffers and casts), uninitialised where every row is written."""
    kernels = triton_kernels()
    num_candidates = image_offsets.shape[0] if candidates is None else candidates.shape[1]
    writes = text_offsets.shape[0] > 0 and num_candidates > 0 and text.shape[1] > 0  # else no kernel runs
    grad_text = _new_gradient(text, writes and is_shared_padded_layout(text_offsets, text_lengths, text.shape[0],
                                                                       text_pad))
    grad_images = _new_gradient(images, writes and is_shared_padded_layout(image_offsets, image_lengths,
                                                                           images.shape[0], image_pad))
    text_side = aggregation in kernels.GATHER_TEXT_AGGREGATIONS
    kernels.launch_gather_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                                   candidates, argmax, region_argmax, aggregation, zero_padding, text_pad, image_pad,
                                   grad_text if text_side else grad_images, text_side=text_side)
    if text_side and _winner_gemm_fits(candidates, aggregation, text_pad, image_pad):
        # d images = G^T @ text: a program whose tile GEMM met a NaN / inf recomputes its rows word by word
        # (exact_images), so no finiteness check runs before the launch and nothing syncs
        kernels.launch_winner_gemm_backward(grad, text, text_offsets, text_lengths, images, image_offsets,
                                            image_lengths, argmax, None, aggregation, text_pad, image_pad,
                                            grad_text, grad_images, sides=("images",), exact_images=True)
    else:
        kernels.launch_alignment_backward(
            grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
            argmax if text_side else None, None if text_side else region_argmax, aggregation, zero_padding,
            text_pad, image_pad, grad_text, grad_images, strategy="segmented", config=_triton_kernel_choice(),
            sides=("images",) if text_side else ("text",))
    return grad_text, grad_images


def triton_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                    argmax, region_argmax, aggregation, zero_padding, text_pad, image_pad, finite=None):
    """The Triton backward (``triton_backward_strategy``: the winner-GEMM kernels, the chunked weight matrix
    times torch.mm, or the argmax kernels of ``kernels/alignment_backward.py``): ``(d text, d images)`` float32
    ("gather": in the tokens' dtype)."""
    strategy = triton_backward_strategy(aggregation)
    grad = grad.float().contiguous()
    word_term, region_term = aggregation in (MRSW, MRAVGW, SYMM), aggregation in (MWSR, SYMM)
    argmax, region_argmax = (argmax if word_term else None), (region_argmax if region_term else None)
    if strategy == "gather":
        if aggregation in triton_kernels().GATHER_TEXT_AGGREGATIONS + triton_kernels().GATHER_IMAGE_AGGREGATIONS:
            return _gather_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                                    candidates, argmax, region_argmax, aggregation, zero_padding, text_pad,
                                    image_pad)
        strategy = "segmented"  # sum / mean
    if strategy == "dense" and not _dense_applies(text, images, candidates, aggregation, text_pad, image_pad,
                                                  finite):
        strategy = "segmented"
    rows_per_chunk = _gemm_rows_per_chunk(text, images, candidates, aggregation, finite) if strategy == "gemm" else 0
    if strategy == "gemm" and not rows_per_chunk:
        strategy = "segmented"
    # "gemm" writes every row of both gradients (G is zero outside the sequences); the kernels only the
    # sequences' rows, so theirs start from zeros
    grad_text = _new_gradient(text, strategy == "gemm", torch.float32)
    grad_images = _new_gradient(images, strategy == "gemm", torch.float32)
    if strategy == "dense":
        triton_kernels().launch_winner_gemm_backward(
            grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, argmax, region_argmax,
            aggregation, text_pad, image_pad, grad_text, grad_images)
        return grad_text, grad_images
    if strategy == "gemm":
        _gemm_backward(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, argmax,
                       region_argmax, aggregation, text_pad, image_pad, grad_text, grad_images, rows_per_chunk)
        return grad_text, grad_images
    triton_kernels().launch_alignment_backward(
        grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths,
        candidates, argmax, region_argmax, aggregation,
        zero_padding, text_pad, image_pad, grad_text, grad_images, strategy=strategy,
        config=_triton_kernel_choice())
    return grad_text, grad_images


def _score_tokens_backward_impl(
    grad: torch.Tensor, text: torch.Tensor, text_offsets: torch.Tensor, text_lengths: torch.Tensor,
    images: torch.Tensor, image_offsets: torch.Tensor, image_lengths: torch.Tensor,
    candidates: Optional[torch.Tensor], argmax: torch.Tensor, region_argmax: torch.Tensor, aggregation: int,
    zero_padding: bool, text_pad: int, image_pad: int, backend: str, finite: Optional[FiniteCheck] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d text [T_text, D], d images [T_img, D])`` in the inputs' dtype.

    ``argmax [Nt, K, text_pad]`` is needed for MrSw / MrAVGw / symm and
    ``region_argmax [Nt, K, image_pad]`` for MwSr / symm (empty tensors
    otherwise; an empty one that is needed is recomputed by the forward kernel).
    """
    text, images = text.contiguous(), images.contiguous()
    count = text_offsets.shape[0]
    k = image_offsets.shape[0] if candidates is None else candidates.shape[1]
    word_term, region_term = aggregation in (MRSW, MRAVGW, SYMM), aggregation in (MWSR, SYMM)
    missing_word = word_term and argmax.numel() != count * k * text_pad
    missing_region = region_term and region_argmax.numel() != count * k * image_pad
    rerun_region = missing_region and backend in KERNEL_REGION_ARGMAX
    if missing_word or rerun_region:
        _, new_argmax, new_region_argmax = _score_tokens_impl(
            text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, aggregation,
            zero_padding, text_pad, image_pad, backend, missing_word, rerun_region)
        argmax = new_argmax if missing_word else argmax
        region_argmax = new_region_argmax if rerun_region else region_argmax
    if backend == "cpu":
        grad_text, grad_images = cpu_backward(grad, text, text_offsets, text_lengths, images, image_offsets,
                                              image_lengths, candidates, argmax, region_argmax, aggregation,
                                              zero_padding, text_pad, image_pad)
    elif backend == "triton":
        grad_text, grad_images = triton_backward(grad, text, text_offsets, text_lengths, images, image_offsets,
                                                 image_lengths, candidates, argmax, region_argmax, aggregation,
                                                 zero_padding, text_pad, image_pad, finite)
    else:
        grad_text, grad_images = sparse_backward(grad, text, text_offsets, text_lengths, images, image_offsets,
                                                 image_lengths, candidates, argmax, region_argmax, aggregation,
                                                 zero_padding, text_pad, image_pad, backend)
    # ("gather" writes the tokens' dtype already: no cast dispatch then)
    return (grad_text if grad_text.dtype == text.dtype else grad_text.to(text.dtype),
            grad_images if grad_images.dtype == images.dtype else grad_images.to(images.dtype))


@torch.library.custom_op("aladin_fast::score_tokens_backward", mutates_args=())
def score_tokens_backward(
    grad: torch.Tensor, text: torch.Tensor, text_offsets: torch.Tensor, text_lengths: torch.Tensor,
    images: torch.Tensor, image_offsets: torch.Tensor, image_lengths: torch.Tensor,
    candidates: Optional[torch.Tensor], argmax: torch.Tensor, region_argmax: torch.Tensor, aggregation: int,
    zero_padding: bool, text_pad: int, image_pad: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(d text, d images)`` in the inputs' dtype (see ``_score_tokens_backward_impl``)."""
    return _score_tokens_backward_impl(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths,
                                       candidates, argmax, region_argmax, aggregation, zero_padding, text_pad,
                                       image_pad, backend)


def _add_to_tokens(out, per_sequence, offsets, lengths):
    """Add ``per_sequence[i]`` to every valid token row of sequence i of ``out`` (index_add: rows may repeat)."""
    lengths = lengths.long()
    sequence = torch.repeat_interleave(torch.arange(offsets.shape[0], device=offsets.device), lengths)
    starts = torch.repeat_interleave(offsets, lengths)
    within = torch.arange(sequence.shape[0], device=offsets.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths)
    rows = starts + within
    out.index_add_(0, rows, per_sequence[sequence])


@score_tokens_backward.register_fake
def _(grad, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, argmax,
      region_argmax, aggregation, zero_padding, text_pad, image_pad, backend):
    return torch.empty_like(text, memory_format=torch.contiguous_format), \
        torch.empty_like(images, memory_format=torch.contiguous_format)


def _double_backward(ctx, grad_grad_text, grad_grad_images):
    raise NotImplementedError(_DOUBLE_BACKWARD_MESSAGE)


torch.library.register_autograd("aladin_fast::score_tokens_backward", _double_backward)


def _setup_context(ctx, inputs, output):
    (text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, aggregation,
     zero_padding, text_pad, image_pad, backend, want_argmax, *rest) = inputs
    ctx.save_for_backward(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                          output[1], output[2])
    ctx.options = (aggregation, zero_padding, text_pad, image_pad, backend)


def _backward(ctx, grad_scores, grad_argmax, grad_region_argmax):
    (text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, argmax,
     region_argmax) = ctx.saved_tensors
    aggregation, zero_padding, text_pad, image_pad, backend = ctx.options
    grad_text, grad_images = score_tokens_backward(
        grad_scores, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, argmax,
        region_argmax, aggregation, zero_padding, text_pad, image_pad, backend,
    )
    return (grad_text, None, None, grad_images) + (None,) * 11  # one per input of score_tokens


torch.library.register_autograd("aladin_fast::score_tokens", _backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- eager fast path


_DOUBLE_BACKWARD_MESSAGE = (
    "double backward (differentiating the gradients of aladin_fast alignment scores, e.g. "
    "autograd.grad(..., create_graph=True) then backward again) is not implemented; "
    "use backend='reference' for higher-order gradients"
)


class _EagerScore(torch.autograd.Function):
    """The same forward / backward as the registered ops, without torch.library dispatch (eager calls only)."""

    @staticmethod
    def forward(ctx, text, images, call):
        # the non-differentiable arguments travel as one tuple: autograd inspects every argument of apply
        # (measured 46 -> 29 us per call on the CPU for 14 -> 3 arguments)
        (text_offsets, text_lengths, image_offsets, image_lengths, candidates, aggregation, zero_padding, text_pad,
         image_pad, backend, want_argmax, want_region_argmax) = call
        # issued before the forward kernel, so that the backward's read of it does not wait for that kernel
        ctx.finite = start_finite_check(text, images, candidates, aggregation, backend)
        ctx.set_materialize_grads(False)  # the argmax outputs get no gradient: no zero-filled [pairs, W] buffers
        scores, argmax, region_argmax = _score_tokens_impl(
            text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, aggregation,
            zero_padding, text_pad, image_pad, backend, want_argmax, want_region_argmax, validated=True)
        ctx.save_for_backward(text, images, argmax, region_argmax)
        # the index inputs are not arguments autograd sees (they travel in `call`): kept as they are, so index
        # tensors made under torch.inference_mode work too (save_for_backward refuses inference tensors)
        ctx.index_inputs = (text_offsets, text_lengths, image_offsets, image_lengths, candidates)
        ctx.options = (aggregation, zero_padding, text_pad, image_pad, backend)
        ctx.mark_non_differentiable(argmax, region_argmax)
        return scores, argmax, region_argmax

    @staticmethod
    def backward(ctx, grad_scores, grad_argmax, grad_region_argmax):
        if grad_scores is None:  # (not materialised: no gradient reached the scores)
            return None, None, None
        text, images, argmax, region_argmax = ctx.saved_tensors
        text_offsets, text_lengths, image_offsets, image_lengths, candidates = ctx.index_inputs
        saved = (text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates, argmax,
                 region_argmax)
        if torch.is_grad_enabled():
            # create_graph=True records the backward as a node whose own backward raises (like the registered op)
            grad_text, grad_images = _EagerScoreBackward.apply(grad_scores, *saved, *ctx.options, ctx.finite)
        else:  # the usual case: no second autograd.Function around the kernels (its apply is host time per step)
            grad_text, grad_images = _score_tokens_backward_impl(grad_scores, *saved, *ctx.options, ctx.finite)
        return grad_text if ctx.needs_input_grad[0] else None, grad_images if ctx.needs_input_grad[1] else None, None


class _EagerScoreBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_scores, text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                argmax, region_argmax, aggregation, zero_padding, text_pad, image_pad, backend, finite):
        return _score_tokens_backward_impl(grad_scores, text, text_offsets, text_lengths, images, image_offsets,
                                           image_lengths, candidates, argmax, region_argmax, aggregation,
                                           zero_padding, text_pad, image_pad, backend, finite)

    @staticmethod
    def backward(ctx, grad_grad_text, grad_grad_images):
        raise NotImplementedError(_DOUBLE_BACKWARD_MESSAGE)


def score_tokens_eager(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                       aggregation, zero_padding, text_pad, image_pad, backend, want_argmax, want_region_argmax=False):
    """``score_tokens`` for eager calls whose inputs the op layer has validated: same results and gradients,
    without the torch.library dispatch and the second value-range check (each a host cost per call, large
    next to a small rerank on a GPU). ``torch.compile`` traces the registered op instead."""
    if torch.is_grad_enabled() and (text.requires_grad or images.requires_grad):
        return _EagerScore.apply(text, images, (text_offsets, text_lengths, image_offsets, image_lengths, candidates,
                                                aggregation, zero_padding, text_pad, image_pad, backend, want_argmax,
                                                want_region_argmax))
    return _score_tokens_impl(text, text_offsets, text_lengths, images, image_offsets, image_lengths, candidates,
                              aggregation, zero_padding, text_pad, image_pad, backend, want_argmax,
                              want_region_argmax, validated=True)
