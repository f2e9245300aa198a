"""Streamed gallery scoring: same numbers as one all-pairs call, bounded chunks, top-k mode."""
import pytest
import torch

import aladin_fast
from cases import make_tokens


@pytest.fixture
def gallery(generator):
    text, text_lengths = make_tokens(generator, 23, 9, 32, min_length=1)
    images, image_lengths = make_tokens(generator, 17, 11, 32, min_length=1)
    return text.float(), text_lengths, images.float(), image_lengths


@pytest.mark.parametrize("chunk,image_chunk", [(1, None), (5, 4), (100, 3), (23, 17)])
def test_chunked_equals_single_call(gallery, chunk, image_chunk):
    text, text_lengths, images, image_lengths = gallery
    whole = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths, aggregation="symm")
    streamed = aladin_fast.full_scores(text, images, text_lengths, image_lengths, chunk=chunk,
                                       image_chunk=image_chunk, aggregation="symm")
    assert torch.equal(streamed, whole)  # each pair is computed identically whatever the chunking


def test_topk_matches_full_matrix_with_stable_ties(gallery):
    text, text_lengths, images, image_lengths = gallery
    images = torch.cat([images, images[:3]])  # exact duplicates: ties resolved towards the lower image id
    image_lengths = torch.cat([image_lengths, image_lengths[:3]])
    whole = aladin_fast.alignment_scores(text, images, text_lengths, image_lengths)
    values, indices = aladin_fast.full_scores(text, images, text_lengths, image_lengths, chunk=4, image_chunk=6,
                                              topk=5, progress=True)
    expected = torch.sort(whole, dim=1, descending=True, stable=True)
    assert torch.equal(indices, expected.indices[:, :5])
    assert torch.equal(values, expected.values[:, :5])


def test_out_buffer_and_errors(gallery):
    text, text_lengths, images, image_lengths = gallery
    out = torch.empty(23, 17)
    result = aladin_fast.full_scores(text, images, text_lengths, image_lengths, out=out, chunk=7)
    assert result is out
    with pytest.raises(ValueError, match=r"topk must be in \[1, 17\]"):
        aladin_fast.full_scores(text, images, topk=18)
    with pytest.raises(ValueError, match=r"chunk must be >= 1"):
        aladin_fast.full_scores(text, images, chunk=0)
    with pytest.raises(ValueError, match=r"padded inputs"):
        aladin_fast.full_scores(text[0], images)
    with pytest.raises(ValueError, match=r"out must be float32 \[23, 17\]"):
        aladin_fast.full_scores(text, images, out=torch.empty(2, 2))
