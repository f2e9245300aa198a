"""Bad input gives a clear error naming the argument (or the documented result)."""
import numpy as np
import pytest
import torch

import aladin_fast

BACKENDS = ["cpu", "reference"]


def _ok(nt=2, ni=3, w=4, r=5, d=8):
    return torch.randn(nt, w, d), torch.randn(ni, r, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_feature_dim(backend):
    text, _ = _ok()
    images = torch.randn(3, 5, 9)
    with pytest.raises(ValueError, match=r"same feature dim D, got 8 and 9"):
        aladin_fast.alignment_scores(text, images, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_ndim(backend):
    text, images = _ok()
    with pytest.raises(ValueError, match=r"text must be padded \[N, L, D\]"):
        aladin_fast.alignment_scores(text[0], images, backend=backend)
    with pytest.raises(ValueError, match=r"images must be padded"):
        aladin_fast.alignment_scores(text, images[None], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_out_of_range(backend):
    text, images = _ok()
    with pytest.raises(ValueError, match=r"text_lengths must lie in \[0, 4\].*\[-1, 2\]"):
        aladin_fast.alignment_scores(text, images, text_lengths=torch.tensor([2, -1]), backend=backend)
    with pytest.raises(ValueError, match=r"image_lengths must lie in \[0, 5\]"):
        aladin_fast.alignment_scores(text, images, image_lengths=torch.tensor([1, 6, 2]), backend=backend)
    with pytest.raises(ValueError, match=r"image_lengths must have shape \[3\]"):
        aladin_fast.alignment_scores(text, images, image_lengths=torch.tensor([1, 2]), backend=backend)
    with pytest.raises(TypeError, match=r"text_lengths must have an integer dtype"):
        aladin_fast.alignment_scores(text, images, text_lengths=torch.tensor([1.0, 2.0]), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_mask_accepted_other_masks_rejected(backend):
    text, images = _ok()
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    by_mask = aladin_fast.alignment_scores(text, images, text_lengths=mask, backend=backend)
    by_lengths = aladin_fast.alignment_scores(text, images, text_lengths=torch.tensor([2, 4]), backend=backend)
    assert torch.equal(by_mask, by_lengths)
    with pytest.raises(ValueError, match=r"text_lengths mask must be a prefix mask"):
        aladin_fast.alignment_scores(text, images, text_lengths=mask.flip(1), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_candidates_out_of_range(backend):
    text, images = _ok()
    with pytest.raises(IndexError, match=r"candidates must be image ids in \[0, 2\].*\[0, 3\]"):
        aladin_fast.rerank_scores(text, images, torch.tensor([[0, 3], [1, 2]]), backend=backend)
    with pytest.raises(IndexError, match=r"candidates"):
        aladin_fast.rerank_scores(text, images, torch.tensor([[0, -1], [1, 2]]), backend=backend)
    with pytest.raises(ValueError, match=r"candidates must have shape \[2, K\]"):
        aladin_fast.rerank_scores(text, images, torch.tensor([0, 1]), backend=backend)
    with pytest.raises(TypeError, match=r"candidates must have an integer dtype"):
        aladin_fast.rerank_scores(text, images, torch.zeros(2, 2), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_and_mixed_dtypes(backend):
    text, images = _ok()
    with pytest.raises(TypeError, match=r"text must have dtype in"):
        aladin_fast.alignment_scores(text.long(), images, backend=backend)
    with pytest.raises(TypeError, match=r"same dtype, got torch.float32 and torch.float16"):
        aladin_fast.alignment_scores(text, images.half(), backend=backend)


def test_float64_runs_on_reference_and_cpu_not_triton():
    text, images = _ok()
    with pytest.raises(TypeError, match=r"backend='triton' takes float32, float16 or bfloat16 inputs, got float64"):
        aladin_fast.alignment_scores(text.double(), images.double(), backend="triton")
    scores = aladin_fast.alignment_scores(text.double(), images.double())  # auto -> reference
    assert scores.dtype == torch.float64
    scores = aladin_fast.alignment_scores(text.double(), images.double(), backend="cpu")  # the C++ float64 path
    assert scores.dtype == torch.float64


def test_mixed_devices_rejected():
    text, images = _ok()
    meta = images.to("meta")
    with pytest.raises(ValueError, match=r"same device, got cpu and meta"):
        aladin_fast.alignment_scores(text, meta, backend="reference")


def test_unknown_options():
    text, images = _ok()
    with pytest.raises(ValueError, match=r"aggregation must be one of"):
        aladin_fast.alignment_scores(text, images, aggregation="max")
    with pytest.raises(ValueError, match=r"padding must be one of"):
        aladin_fast.alignment_scores(text, images, padding="ninf")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        aladin_fast.alignment_scores(text, images, backend="cuda")


@pytest.mark.parametrize("flag", ["normalize", "return_argmax"])
@pytest.mark.parametrize("value", ["false", 0, 1, None, torch.tensor(True)])
def test_flags_must_be_bools(flag, value):
    """A truthy non-bool (the string "false", 1, a tensor) was read as True: normalised or argmax-returning
    results where the caller asked for neither."""
    text, images = _ok()
    for op, args in ((aladin_fast.alignment_scores, (text, images)), (aladin_fast.paired_scores, (text, images[:2])),
                     (aladin_fast.rerank_scores, (text, images, torch.zeros(2, 1, dtype=torch.int64)))):
        with pytest.raises(TypeError, match=rf"{flag} must be True or False"):
            op(*args, backend="reference", **{flag: value})


def test_flags_accept_numpy_bools():
    text, images = _ok()
    plain = aladin_fast.alignment_scores(text, images, backend="reference", normalize=True)
    numpy_flag = aladin_fast.alignment_scores(text, images, backend="reference", normalize=np.bool_(True))
    torch.testing.assert_close(numpy_flag, plain, rtol=0, atol=0)
    scores = aladin_fast.alignment_scores(text, images, backend="reference", return_argmax=np.bool_(False))
    assert isinstance(scores, torch.Tensor)


def test_explicit_backend_never_falls_back():
    text, images = _ok()
    from aladin_fast.ops.backends import triton_interpreter_enabled

    if not triton_interpreter_enabled():
        with pytest.raises(RuntimeError, match=r"backend='triton' cannot run"):
            aladin_fast.alignment_scores(text, images, backend="triton")


def test_packed_input_errors():
    text, images = _ok()
    packed = torch.randn(7, 8)
    with pytest.raises(ValueError, match=r"text_cu_seqlens must start at 0 and end at text.shape\[0\] = 7"):
        aladin_fast.alignment_scores(packed, images, text_cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match=r"non-decreasing"):
        aladin_fast.alignment_scores(packed, images, text_cu_seqlens=torch.tensor([0, 5, 2, 7]))
    with pytest.raises(ValueError, match=r"either text_lengths or text_cu_seqlens"):
        aladin_fast.alignment_scores(packed, images, torch.tensor([3, 4]), text_cu_seqlens=torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match=r"packed \[total_tokens, D\]"):
        aladin_fast.alignment_scores(text, images, text_cu_seqlens=torch.tensor([0, 3, 7]))


def test_paired_needs_equal_counts():
    text, images = _ok()
    with pytest.raises(ValueError, match=r"as many texts as images, got 2 texts and 3 images"):
        aladin_fast.paired_scores(text, images)


def test_non_tensor_input():
    _, images = _ok()
    with pytest.raises(TypeError, match=r"text must be a torch.Tensor, got list"):
        aladin_fast.alignment_scores([[[1.0]]], images)


@pytest.mark.parametrize("value, enabled", [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
                                            ("0", False), ("false", False), ("", False), ("2", False)])
def test_triton_interpret_read_as_triton_reads_it(monkeypatch, value, enabled):
    """TRITON_INTERPRET=true turns triton's interpreter on; the backend check accepted only "1"."""
    from aladin_fast.ops.backends import triton_interpreter_enabled, triton_unavailable_reason

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreter_enabled() is enabled
    reason = triton_unavailable_reason(torch.device("cpu"))
    if enabled:
        assert reason is None or "not importable" in reason
    else:
        assert "TRITON_INTERPRET=1" in reason
