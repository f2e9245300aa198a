"""Token offsets beyond 2^31 elements, and the op layer's int32 limits (aladin_fast/ops/limits.py).

The big token matrices are ``torch.empty`` allocations of ~4.6 GB that are never
touched except for the few valid rows written here: Linux maps pages lazily, so
the test costs a few MB of memory and milliseconds of compute. Where the
allocation itself is refused (strict overcommit), the test skips.

Oracle: the same problem with the valid rows copied into small compact tensors,
scored by the same kernel (must be bitwise identical: only the offsets differ)
and by the float64 reference.
"""
import pytest
import torch

import aladin_fast
from aladin_fast import reference
from aladin_fast._inputs import TokenBatch
from aladin_fast.ops.limits import INT32_MAX, TRITON_MAX_PAD, check_index_limits
from cases import AGGREGATIONS, PADDINGS

D = 64
COUNT = 16
# row offset of the last sequence x D lands beyond 2^31 elements (and beyond 2^32 bytes in bf16)
LENGTH = (1 << 31) // ((COUNT - 1) * D) + 8
SHIFT_ROWS = 40  # text is a view of the same allocation starting 40 rows in (distinct data, one allocation)
TEXT_LENGTHS = [3] + [0] * (COUNT - 3) + [5, 7]
IMAGE_LENGTHS = [6] + [0] * (COUNT - 4) + [2, 0, 9]


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def huge_problem():
    """text, images [COUNT, LENGTH, D] bf16 views of one lazily mapped buffer, with valid rows filled."""
    elements = (COUNT * LENGTH + SHIFT_ROWS) * D
    assert (COUNT - 1) * LENGTH * D > 1 << 31
    try:
        buffer = torch.empty(elements, dtype=torch.bfloat16)
    except RuntimeError as err:  # strict overcommit (vm.overcommit_memory=2) or a small address space
        pytest.skip(f"cannot map a {elements * 2 / 2**30:.1f} GiB buffer here: {err}")
    rss_before = _rss_bytes()
    images = buffer[: COUNT * LENGTH * D].view(COUNT, LENGTH, D)
    text = buffer[SHIFT_ROWS * D:].view(COUNT, LENGTH, D)
    generator = torch.Generator().manual_seed(3)
    compact_text = torch.nn.functional.normalize(torch.randn(COUNT, 8, D, generator=generator), dim=-1)
    compact_images = torch.nn.functional.normalize(torch.randn(COUNT, 10, D, generator=generator), dim=-1)
    compact_text, compact_images = compact_text.bfloat16(), compact_images.bfloat16()
    text_lengths, image_lengths = torch.tensor(TEXT_LENGTHS), torch.tensor(IMAGE_LENGTHS)
    for i, n in enumerate(TEXT_LENGTHS):
        text[i, :n] = compact_text[i, :n]
    for j, n in enumerate(IMAGE_LENGTHS):
        images[j, :n] = compact_images[j, :n]
    yield dict(text=text, images=images, compact_text=compact_text, compact_images=compact_images,
               text_lengths=text_lengths, image_lengths=image_lengths, rss_before=rss_before)
    del text, images, buffer


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_cpu_kernel_reads_rows_beyond_int32_offsets(huge_problem, aggregation):
    p = huge_problem
    got = aladin_fast.alignment_scores(p["text"], p["images"], p["text_lengths"], p["image_lengths"], aggregation,
                                       backend="cpu")
    compact = aladin_fast.alignment_scores(p["compact_text"], p["compact_images"], p["text_lengths"],
                                           p["image_lengths"], aggregation, backend="cpu")
    assert torch.equal(got, compact)  # same valid values, same order: same bits
    expected = reference.alignment_scores(p["compact_text"].double(), p["compact_images"].double(),
                                          p["text_lengths"], p["image_lengths"], aggregation)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=0)
    # the pair of the last caption and the last image: both start past 2^31 elements
    assert got[-1, -1] != 0
    # rerank / paired through the same offsets
    candidates = torch.tensor([[COUNT - 1, 0, COUNT - 3]] * COUNT)
    rerank = aladin_fast.rerank_scores(p["text"], p["images"], candidates, p["text_lengths"], p["image_lengths"],
                                       aggregation, backend="cpu")
    assert torch.equal(rerank, compact[:, [COUNT - 1, 0, COUNT - 3]])
    paired = aladin_fast.paired_scores(p["text"], p["images"], p["text_lengths"], p["image_lengths"], aggregation,
                                       backend="cpu")
    assert torch.equal(paired, compact.diagonal())
    assert _rss_bytes() - p["rss_before"] < 256 << 20  # the buffer was never touched beyond its valid rows


def test_reference_gathers_rows_beyond_int32_offsets(huge_problem):
    """The reference's gather path (arbitrary offsets, as the kernel contract allows) at offsets > 2^31 elements."""
    p = huge_problem
    flat_text = p["text"].view(-1, D)
    flat_images = p["images"].view(-1, D)
    offsets_t = torch.arange(COUNT, dtype=torch.int64) * LENGTH
    offsets_v = torch.arange(COUNT, dtype=torch.int64) * LENGTH
    text = TokenBatch(flat_text, offsets_t, torch.tensor(TEXT_LENGTHS, dtype=torch.int32), 8)
    images = TokenBatch(flat_images, offsets_v, torch.tensor(IMAGE_LENGTHS, dtype=torch.int32), 10)
    for padding in PADDINGS:
        for aggregation in ("MrSw", "symm", "mean"):
            got, _ = reference.score_token_batches(text, images, None, aggregation, padding == "zero", False)
            expected = reference.alignment_scores(p["compact_text"], p["compact_images"], p["text_lengths"],
                                                  p["image_lengths"], aggregation, padding)
            assert torch.equal(got, expected)


# --------------------------------------------------------------------------- limits (no big memory)


class _Batch:
    """Just the sizes ``check_index_limits`` reads (a TokenBatch with a fake token matrix)."""

    def __init__(self, count, pad):
        self.count, self.pad = count, pad


def test_limits_accept_ordinary_sizes():
    for backend in ("cpu", "triton", "reference"):
        check_index_limits(_Batch(25_000, 64), _Batch(5_000, 36), 5_000, backend)
    check_index_limits(_Batch(1, TRITON_MAX_PAD), _Batch(1, 1), 1, "triton")
    check_index_limits(_Batch(1, INT32_MAX), _Batch(1, INT32_MAX), 1, "cpu")


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_limits_padded_length_int32(backend):
    with pytest.raises(ValueError, match=r"images: padded length 2147483648 exceeds 2147483647"):
        check_index_limits(_Batch(1, 3), _Batch(1, INT32_MAX + 1), 1, backend)
    with pytest.raises(ValueError, match=r"text: padded length"):
        check_index_limits(_Batch(1, INT32_MAX + 1), _Batch(1, 3), 1, backend)


def test_limits_triton():
    with pytest.raises(ValueError, match=r"images: padded length 1073741825 exceeds the Triton kernel's limit"):
        check_index_limits(_Batch(1, 3), _Batch(1, TRITON_MAX_PAD + 1), 1, "triton")
    with pytest.raises(ValueError, match=r"similarities per pair"):
        check_index_limits(_Batch(1, 50_000), _Batch(1, 50_000), 1, "triton")
    with pytest.raises(ValueError, match=r"candidates: K = 2147483647"):
        check_index_limits(_Batch(1, 32), _Batch(1, 36), INT32_MAX, "triton")
    # 2^26 captions x 2^12 images = 2^38 pairs: at least 2^32 programs of <= 64 pairs
    with pytest.raises(ValueError, match=r"need at least 4294967296 Triton programs, above the grid limit"):
        check_index_limits(_Batch(1 << 26, 32), _Batch(1 << 12, 36), 1 << 12, "triton")
    check_index_limits(_Batch(1 << 26, 32), _Batch(1 << 12, 36), 1 << 12, "cpu")  # the CPU path has no grid
    # 2^36 pairs may fit (64 pairs per program): left to the launcher, never refused here
    check_index_limits(_Batch(1 << 24, 32), _Batch(1 << 12, 36), 1 << 12, "triton")


def test_packed_sequence_longer_than_int32_is_refused():
    """A packed sequence of 2^31 tokens (lazily mapped, never read) is refused with the limit, not wrapped."""
    rows = 1 << 31
    try:
        tokens = torch.empty(rows, 1, dtype=torch.bfloat16)
    except RuntimeError as err:
        pytest.skip(f"cannot map a 4 GiB buffer here: {err}")
    cu = torch.tensor([0, rows])
    small = torch.zeros(2, 1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"images: padded length 2147483648 exceeds 2147483647"):
        aladin_fast.alignment_scores(small, tokens, image_cu_seqlens=cu, text_cu_seqlens=torch.tensor([0, 2]),
                                     backend="cpu")
