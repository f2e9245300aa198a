"""The reference (the spec) against an independent brute-force loop over pairs, words and regions."""
import itertools

import pytest
import torch

from aladin_fast import reference
from cases import AGGREGATIONS, PADDINGS, make_tokens


def brute_force(text, text_lengths, images, image_lengths, aggregation, padding):
    """Score every pair with Python loops, straight from the documented definition."""
    nt, w_pad, _ = text.shape
    ni, r_pad, _ = images.shape
    out = torch.zeros(nt, ni, dtype=torch.float64)
    argmax = torch.full((nt, ni, w_pad), -1, dtype=torch.int32)
    zero = padding == "zero"
    for i, j in itertools.product(range(nt), range(ni)):
        n_w, n_r = int(text_lengths[i]), int(image_lengths[j])
        s = [[float(text[i, w] @ images[j, r]) for r in range(n_r)] for w in range(n_w)]
        row_terms = []
        for w in range(n_w):
            candidates = list(s[w]) + ([0.0] if zero and n_r < r_pad else [])
            if candidates:
                best = max(candidates)
                row_terms.append(best)
                argmax[i, j, w] = candidates.index(best)
            else:
                row_terms.append(0.0)
        col_terms = []
        for r in range(n_r):
            column = [s[w][r] for w in range(n_w)] + ([0.0] if zero and n_w < w_pad else [])
            col_terms.append(max(column) if column else 0.0)
        total = sum(sum(row) for row in s)
        if aggregation == "MrSw":
            value = sum(row_terms)
        elif aggregation == "MrAVGw":
            value = sum(row_terms) / n_w if n_w else 0.0
        elif aggregation == "MwSr":
            value = sum(col_terms)
        elif aggregation == "symm":
            value = sum(row_terms) + sum(col_terms)
        elif aggregation == "sum":
            value = total
        elif zero:
            value = total / (w_pad * r_pad) if w_pad * r_pad else 0.0
        else:
            value = total / (n_w * n_r) if n_w * n_r else 0.0
        out[i, j] = value
    return out, argmax


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("shape", [(3, 4, 5, 7, 6), (2, 3, 1, 1, 3), (4, 2, 7, 4, 1), (1, 1, 3, 3, 2)])
def test_reference_matches_brute_force(generator, aggregation, padding, shape):
    nt, ni, w, r, d = shape
    text, text_lengths = make_tokens(generator, nt, w, d, unit=False)
    images, image_lengths = make_tokens(generator, ni, r, d, unit=False)
    expected, expected_argmax = brute_force(text, text_lengths, images, image_lengths, aggregation, padding)
    got, got_argmax = reference.alignment_scores(
        text, images, text_lengths, image_lengths, aggregation, padding, return_argmax=True
    )
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
    assert torch.equal(got_argmax, expected_argmax)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_reference_zero_padding_lets_padding_win(aggregation):
    # every valid similarity is negative: in zero mode the padded region (score 0) wins the max
    text = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    images = torch.tensor([[[-1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    lengths = torch.tensor([1])
    neg_inf = reference.alignment_scores(text, images, None, lengths, "MrSw", "neg_inf")
    zero, argmax = reference.alignment_scores(text, images, None, lengths, "MrSw", "zero", return_argmax=True)
    assert neg_inf.item() == -1.0
    assert zero.item() == 0.0
    assert argmax.tolist() == [[[1]]]


def test_reference_paired_and_rerank_agree_with_all_pairs(generator):
    text, text_lengths = make_tokens(generator, 5, 6, 8)
    images, image_lengths = make_tokens(generator, 7, 9, 8)
    full = reference.alignment_scores(text, images, text_lengths, image_lengths)
    candidates = torch.randint(0, 7, (5, 11), generator=generator)
    rerank = reference.rerank_scores(text, images, candidates, text_lengths, image_lengths)
    torch.testing.assert_close(rerank, full.gather(1, candidates))
    paired = reference.paired_scores(text, images[:5], text_lengths, image_lengths[:5])
    torch.testing.assert_close(paired, full.diagonal())


def test_reference_chunking_gives_same_result(generator, monkeypatch):
    text, text_lengths = make_tokens(generator, 9, 5, 4)
    images, image_lengths = make_tokens(generator, 13, 6, 4)
    whole = reference.alignment_scores(text, images, text_lengths, image_lengths, "symm")
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 64)
    chunked = reference.alignment_scores(text, images, text_lengths, image_lengths, "symm")
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-12)


def brute_force_gradients(text, text_lengths, images, image_lengths, aggregation, padding, upstream):
    """d(sum(upstream * scores)) / d(text, images) from the contract, with loops: each max sends its whole
    gradient to its first winner (ties: the lowest index); a padded position winning in "zero" mode is a
    constant zero vector and takes none."""
    nt, w_pad, _ = text.shape
    ni, r_pad, _ = images.shape
    d_text, d_images = torch.zeros_like(text), torch.zeros_like(images)
    zero = padding == "zero"
    for i, j in itertools.product(range(nt), range(ni)):
        n_w, n_r, up = int(text_lengths[i]), int(image_lengths[j]), float(upstream[i, j])
        s = [[float(text[i, w] @ images[j, r]) for r in range(n_r)] for w in range(n_w)]
        if aggregation in ("MrSw", "MrAVGw", "symm"):
            scale = up / max(n_w, 1) if aggregation == "MrAVGw" else up
            for w in range(n_w):
                candidates = s[w] + ([0.0] if zero and n_r < r_pad else [])
                if candidates and (winner := candidates.index(max(candidates))) < n_r:
                    d_text[i, w] += scale * images[j, winner]
                    d_images[j, winner] += scale * text[i, w]
        if aggregation in ("MwSr", "symm"):
            for r in range(n_r):
                column = [s[w][r] for w in range(n_w)] + ([0.0] if zero and n_w < w_pad else [])
                if column and (winner := column.index(max(column))) < n_w:
                    d_text[i, winner] += up * images[j, r]
                    d_images[j, r] += up * text[i, winner]
        if aggregation in ("sum", "mean"):
            count = (w_pad * r_pad if zero else n_w * n_r) if aggregation == "mean" else 1
            if count:
                d_text[i, :n_w] += up / count * images[j, :n_r].sum(0)
                d_images[j, :n_r] += up / count * text[i, :n_w].sum(0)
    return d_text, d_images


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("padding", PADDINGS)
def test_reference_gradients_go_to_the_first_winner(generator, aggregation, padding):
    """Ties are everywhere here (tokens in {-1, 0, 1}, D=2): autograd through the reference must send each
    max's gradient to its first winner only, as the argmax-based kernel backwards do (amax splits it)."""
    text = torch.randint(-1, 2, (3, 5, 2), generator=generator).double().requires_grad_()
    images = torch.randint(-1, 2, (4, 6, 2), generator=generator).double().requires_grad_()
    text_lengths, image_lengths = torch.tensor([5, 3, 0]), torch.tensor([6, 1, 4, 0])
    upstream = torch.randint(1, 5, (3, 4), generator=generator).double()
    scores = reference.alignment_scores(text, images, text_lengths, image_lengths, aggregation, padding)
    got = torch.autograd.grad((scores * upstream).sum(), (text, images))
    expected = brute_force_gradients(text.detach(), text_lengths, images.detach(), image_lengths, aggregation,
                                     padding, upstream)
    for name, g, e in zip(("text", "images"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shapes", [((0, 3, 4), (2, 5, 4)), ((2, 3, 4), (0, 5, 4)), ((2, 0, 4), (3, 5, 4)),
                                    ((2, 3, 4), (3, 0, 4))])
def test_scores_without_similarities_backpropagate_zero_gradients(backend, shapes):
    """No pairs, or no words / regions at all: the scores are still in the graph of the tokens, so a loss
    over them backpropagates (zero gradients) instead of raising "does not require grad"; NaN tokens
    (never read) do not leak in."""
    import aladin_fast

    text = torch.full(shapes[0], float("nan"), requires_grad=True)
    images = torch.full(shapes[1], float("nan"), requires_grad=True)
    for aggregation in AGGREGATIONS:
        scores = aladin_fast.alignment_scores(text, images, aggregation=aggregation, backend=backend)
        assert scores.shape == (shapes[0][0], shapes[1][0]) and not scores.isnan().any()
        d_text, d_images = torch.autograd.grad(scores.sum(), (text, images))
        assert d_text.shape == text.shape and d_images.shape == images.shape
        assert not d_text.any() and not d_images.any(), aggregation
