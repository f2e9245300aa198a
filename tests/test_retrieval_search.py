"""Retriever: two-stage search vs exhaustive teacher ranking, both directions, explanations, threads."""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("faiss")

import aladin_fast  # noqa: E402
from aladin_fast.retrieval import FeatureStore, Retriever, StudentIndex, TeacherScorer  # noqa: E402

NO_IDS = torch.zeros(0, dtype=torch.int64)

IMAGES, REGIONS, CAPTIONS_PER_IMAGE, WORDS, DIM = 40, 10, 2, 8, 32


def normalize(x):
    return torch.nn.functional.normalize(x, dim=-1)


def pooled(tokens, lengths):
    """Student stand-in: the normalised mean of the valid tokens (informative on this data)."""
    mask = (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]).float()
    return normalize((tokens * mask[..., None]).sum(1) / lengths.clamp(min=1)[:, None])


def make_data(seed=0):
    """Images (regions) and captions whose words are noisy copies of their image's regions."""
    g = torch.Generator().manual_seed(seed)
    regions = normalize(torch.randn(IMAGES, REGIONS, DIM, generator=g))
    region_lengths = torch.randint(3, REGIONS + 1, (IMAGES,), generator=g)
    owner = torch.arange(IMAGES).repeat_interleave(CAPTIONS_PER_IMAGE)
    pick = (torch.rand(owner.numel(), WORDS, generator=g) * region_lengths[owner, None]).long()
    words = regions[owner[:, None], pick] + 1.0 / DIM**0.5 * torch.randn(owner.numel(), WORDS, DIM, generator=g)
    word_lengths = torch.randint(2, WORDS + 1, (owner.numel(),), generator=g)
    valid = torch.arange(WORDS)[None, :] < word_lengths[:, None]
    words = torch.where(valid[..., None], normalize(words), torch.zeros(()))
    return dict(regions=regions, region_lengths=region_lengths, words=words, word_lengths=word_lengths, owner=owner)


@pytest.fixture(scope="module")
def data():
    return make_data()


def build(data, direction, index="flat", dtype="float32", **index_options):
    if direction == "text_to_image":
        tokens, lengths = data["regions"], data["region_lengths"]
    else:
        tokens, lengths = data["words"], data["word_lengths"]
    ids = torch.arange(tokens.shape[0]) * 7 + 3  # ids are not row numbers
    student = StudentIndex(DIM, index, **index_options)
    student.add(pooled(tokens, lengths), ids)
    store = FeatureStore(DIM, dtype)
    store.append(ids, tokens, lengths)
    return Retriever(student, store, direction=direction), ids


def queries(data, direction):
    if direction == "text_to_image":
        return data["words"], data["word_lengths"]
    return data["regions"], data["region_lengths"]


def exhaustive(data, direction):
    """Teacher scores of every (query, gallery row) pair, [Nq, Ng], via the all-pairs op."""
    all_pairs = aladin_fast.alignment_scores(data["words"], data["regions"], data["word_lengths"], data["region_lengths"])
    return all_pairs if direction == "text_to_image" else all_pairs.T


@pytest.mark.parametrize("direction", ["text_to_image", "image_to_text"])
def test_full_shortlist_equals_exhaustive_teacher_ranking(data, direction):
    retriever, ids = build(data, direction)
    tokens, lengths = queries(data, direction)
    gallery = ids.numel()
    found, scores = retriever.search(pooled(tokens, lengths), tokens, lengths, k=gallery, rerank_k=gallery)
    # oracle 1: the same fused kernel over every candidate, ranked with a stable sort
    if direction == "text_to_image":
        every = torch.arange(gallery).expand(tokens.shape[0], -1)
        oracle = aladin_fast.rerank_scores(tokens, data["regions"], every, lengths, data["region_lengths"])
    else:
        oracle = exhaustive(data, direction)
    order = torch.sort(oracle, dim=1, descending=True, stable=True).indices
    assert torch.equal(found, ids[order])
    assert torch.equal(scores, torch.gather(oracle, 1, order))
    # oracle 2: the all-pairs op (its own tiling) and the float64 reference agree to rounding
    reference = aladin_fast.reference.alignment_scores(
        data["words"].double(), data["regions"].double(), data["word_lengths"], data["region_lengths"])
    reference = reference if direction == "text_to_image" else reference.T
    torch.testing.assert_close(scores.double(), torch.gather(reference, 1, order), atol=1e-5, rtol=0)
    ex_ids, ex_scores = retriever.search_exhaustive(tokens, lengths, k=5, chunk=16)
    assert torch.equal(ex_ids, found[:, :5]) and torch.equal(ex_scores, scores[:, :5])


def test_both_directions_give_identical_scores_and_alignments(data):
    t2i, image_ids = build(data, "text_to_image")
    i2t, caption_ids = build(data, "image_to_text")
    words, word_lengths = queries(data, "text_to_image")
    regions, region_lengths = queries(data, "image_to_text")
    n_caps, n_imgs = caption_ids.numel(), image_ids.numel()
    found_t, scores_t, align_t = t2i.search(pooled(words, word_lengths), words, word_lengths, n_imgs, n_imgs, True)
    found_i, scores_i, align_i = i2t.search(pooled(regions, region_lengths), regions, region_lengths, n_caps, n_caps, True)
    # scatter both into [caption, image] matrices
    row_of_image, row_of_caption = {int(v): i for i, v in enumerate(image_ids)}, {int(v): i for i, v in enumerate(caption_ids)}
    cols_t = torch.tensor([[row_of_image[int(v)] for v in row] for row in found_t])
    cols_i = torch.tensor([[row_of_caption[int(v)] for v in row] for row in found_i])
    matrix_t = torch.zeros(n_caps, n_imgs).scatter_(1, cols_t, scores_t)
    matrix_i = torch.zeros(n_imgs, n_caps).scatter_(1, cols_i, scores_i)
    assert torch.equal(matrix_t, matrix_i.T)  # bit-identical: same kernel, same operands per pair
    # word -> region alignments agree too, and match the op's own argmax
    width = min(align_t.shape[2], align_i.shape[2])
    align_t_m = torch.zeros(n_caps, n_imgs, align_t.shape[2], dtype=torch.int32)
    align_t_m[torch.arange(n_caps)[:, None], cols_t] = align_t
    align_i_m = torch.zeros(n_imgs, n_caps, align_i.shape[2], dtype=torch.int32)
    align_i_m[torch.arange(n_imgs)[:, None], cols_i] = align_i
    assert torch.equal(align_t_m[..., :width], align_i_m.transpose(0, 1)[..., :width])
    _, argmax = aladin_fast.alignment_scores(words, data["regions"], word_lengths, data["region_lengths"], return_argmax=True)
    assert torch.equal(align_t_m, argmax)


def test_recall_when_the_student_is_informative(data):
    retriever, ids = build(data, "text_to_image")
    words, lengths = queries(data, "text_to_image")
    truth = ids[data["owner"]]
    found, _ = retriever.search(pooled(words, lengths), words, lengths, k=5, rerank_k=10)
    _, student_only = retriever.student_index.search(pooled(words, lengths), 1)
    exhaustive_top1 = ids[exhaustive(data, "text_to_image").argmax(dim=1)]
    two_stage_r1 = (found[:, 0] == truth).float().mean().item()
    exhaustive_r1 = (exhaustive_top1 == truth).float().mean().item()
    student_r1 = (student_only[:, 0] == truth).float().mean().item()
    assert exhaustive_r1 >= 0.9, exhaustive_r1
    assert two_stage_r1 >= exhaustive_r1 - 0.05, (two_stage_r1, exhaustive_r1)
    assert two_stage_r1 >= student_r1, (two_stage_r1, student_r1)
    assert (found == truth[:, None]).any(dim=1).float().mean().item() >= 0.95


def test_k_beyond_gallery_rerank_k_errors_and_empty_queries(data):
    retriever, ids = build(data, "text_to_image")
    words, lengths = data["words"][:3], data["word_lengths"][:3]
    found, scores = retriever.search(pooled(words, lengths), words, lengths, k=IMAGES + 5, rerank_k=IMAGES + 10)
    assert found.shape == (3, IMAGES + 5)
    assert (found[:, IMAGES:] == -1).all() and (scores[:, IMAGES:] == float("-inf")).all()
    assert sorted(found[0, :IMAGES].tolist()) == sorted(ids.tolist())
    with pytest.raises(ValueError, match=r"rerank_k \(= 4\) must be >= k \(= 5\)"):
        retriever.search(pooled(words, lengths), words, lengths, k=5, rerank_k=4)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        retriever.search(pooled(words, lengths), words, lengths, k=0)
    found, scores, align = retriever.search(torch.zeros(0, DIM), torch.zeros(0, 4, DIM), None, k=3,
                                            return_explanations=True)
    assert found.shape == (0, 3) and scores.shape == (0, 3) and align.shape == (0, 3, 4)
    with pytest.raises(ValueError, match=r"query_tokens must have shape \[Nq, L, 32\]"):
        retriever.search(pooled(words, lengths), words[..., :5], lengths)
    with pytest.raises(ValueError, match="query_embeddings has 2 rows but query_tokens has 3"):
        retriever.search(pooled(words, lengths)[:2], words, lengths)


def test_approximate_index_with_short_shortlists(data):
    # IVF probing 1 of 8 lists often finds fewer than rerank_k items: -1 slots must be skipped, never scored
    retriever, ids = build(data, "text_to_image", index="ivf", nlist=8, nprobe=1)
    words, lengths = queries(data, "text_to_image")
    found, scores = retriever.search(pooled(words, lengths), words, lengths, k=30, rerank_k=30)
    assert (found == -1).any()
    for row, row_scores in zip(found, scores):
        valid = row >= 0
        assert bool(valid[: int(valid.sum())].all())  # hits first, then padding
        assert len(set(row[valid].tolist())) == int(valid.sum()) and torch.isfinite(row_scores[valid]).all()
        assert (row_scores[~valid] == float("-inf")).all()


def test_in_place_and_gathered_rerank_agree(data, tmp_path):
    retriever, ids = build(data, "text_to_image")
    words, lengths = queries(data, "text_to_image")
    embeddings = pooled(words, lengths)
    retriever.remove(ids[[2, 5]])  # dead rows stay in the shard; no live id maps to them
    gathered = Retriever(retriever.student_index, retriever.feature_store, zero_copy=False)
    assert retriever._in_place_view(torch.device("cpu"), NO_IDS) is not None and gathered._in_place_view(torch.device("cpu"), NO_IDS) is None
    in_place = retriever.search(embeddings, words, lengths, k=8, rerank_k=20, return_explanations=True)
    copied = gathered.search(embeddings, words, lengths, k=8, rerank_k=20, return_explanations=True)
    assert all(torch.equal(a, b) for a, b in zip(in_place, copied))
    retriever.save(str(tmp_path / "saved"))  # memory-mapped, read-only store: still read in place
    loaded = Retriever.load(str(tmp_path / "saved"))
    assert loaded.feature_store.packed_view() is not None
    assert all(torch.equal(a, b) for a, b in zip(loaded.search(embeddings, words, lengths, 8, 20, True), in_place))
    # a second shard disables the in-place path until compact()
    extra = data["regions"][:1]
    retriever.add([99_999], pooled(extra, data["region_lengths"][:1]), extra, data["region_lengths"][:1])
    assert retriever.feature_store.packed_view() is None
    before = retriever.search(embeddings, words, lengths, k=8, rerank_k=20)
    retriever.feature_store.compact()
    assert retriever.feature_store.num_shards == 1 and retriever.feature_store.packed_view() is not None
    assert all(torch.equal(a, b) for a, b in zip(retriever.search(embeddings, words, lengths, k=8, rerank_k=20), before))


@pytest.mark.parametrize("direction", ["text_to_image", "image_to_text"])
def test_concurrent_searches_match_sequential(data, direction):
    retriever, _ = build(data, direction)
    regions, lengths = queries(data, direction)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randperm(regions.shape[0], generator=g)[: 1 + i % 7] for i in range(24)]

    def run(rows):
        return retriever.search(pooled(regions[rows], lengths[rows]), regions[rows], lengths[rows], k=4, rerank_k=12,
                                return_explanations=True)

    sequential = [run(rows) for rows in batches]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, batches))
    for expected, got in zip(sequential, concurrent):
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_add_and_remove_through_the_retriever(data):
    retriever, ids = build(data, "text_to_image")
    words, lengths = queries(data, "text_to_image")
    found, _ = retriever.search(pooled(words, lengths), words, lengths, k=3, rerank_k=10)
    gone = found[:, 0].unique()[:5]
    assert retriever.remove(gone) == gone.numel() and retriever.count == IMAGES - gone.numel()
    after, _ = retriever.search(pooled(words, lengths), words, lengths, k=3, rerank_k=10)
    assert not torch.isin(after, gone).any()
    # a new image that copies caption 0's words exactly is its best match
    new_tokens = data["words"][:1].clone()
    retriever.add([10_000], pooled(new_tokens, data["word_lengths"][:1]), new_tokens, data["word_lengths"][:1])
    top, _ = retriever.search(pooled(words[:1], lengths[:1]), words[:1], lengths[:1], k=1, rerank_k=5)
    assert top.item() == 10_000
    with pytest.raises(ValueError, match="already in the index"):
        retriever.add([10_000], torch.zeros(1, DIM), new_tokens)
    assert retriever.count == IMAGES - gone.numel() + 1  # the failed add changed nothing


def test_low_precision_store_and_custom_scorer(data):
    exact, _ = build(data, "text_to_image")
    bf16, _ = build(data, "text_to_image", dtype="bfloat16")
    words, lengths = queries(data, "text_to_image")
    embeddings = pooled(words, lengths)
    _, scores32 = exact.search(embeddings, words, lengths, k=IMAGES, rerank_k=IMAGES)
    _, scores16 = bf16.search(embeddings, words, lengths, k=IMAGES, rerank_k=IMAGES)
    torch.testing.assert_close(scores16, scores32, atol=0.05, rtol=0.02)  # sorted score profiles agree
    reference_scorer = functools.partial(aladin_fast.rerank_scores, backend="reference")
    custom = Retriever(exact.student_index, exact.feature_store, reference_scorer)
    found_ref, scores_ref = custom.search(embeddings, words, lengths, k=5, rerank_k=20)
    found, scores = exact.search(embeddings, words, lengths, k=5, rerank_k=20)
    torch.testing.assert_close(scores_ref, scores, atol=1e-5, rtol=0)
    mean = Retriever(exact.student_index, exact.feature_store, TeacherScorer(aggregation="MrAVGw"))
    _, mean_scores = mean.search(embeddings, words, lengths, k=1, rerank_k=IMAGES)
    oracle = exhaustive(data, "text_to_image") / lengths[:, None]
    torch.testing.assert_close(mean_scores[:, 0], oracle.max(dim=1).values, atol=1e-5, rtol=0)


def test_mismatched_index_and_store_are_refused(data):
    retriever, ids = build(data, "text_to_image")
    store = FeatureStore(DIM)
    store.append(ids + 1, data["regions"], data["region_lengths"])
    with pytest.raises(ValueError, match="different ids"):
        Retriever(retriever.student_index, store)
    with pytest.raises(ValueError, match="holds 40 items but feature_store holds 0"):
        Retriever(retriever.student_index, FeatureStore(DIM))
    with pytest.raises(ValueError, match="direction"):
        Retriever(retriever.student_index, retriever.feature_store, direction="sideways")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_queries_on_cuda_rerank_on_gpu(data):  # pragma: no cover - GPU machines only
    retriever, _ = build(data, "text_to_image")
    words, lengths = queries(data, "text_to_image")
    cpu = retriever.search(pooled(words, lengths), words, lengths, k=5, rerank_k=20)
    gpu = retriever.search(pooled(words, lengths), words.cuda(), lengths.cuda(), k=5, rerank_k=20)
    assert torch.equal(cpu[0], gpu[0])
    torch.testing.assert_close(cpu[1], gpu[1], atol=1e-4, rtol=0)


def test_packed_rows_reads_one_snapshot_of_the_store():
    """The in-place rerank needs the packed tokens and the candidates' rows from the same layout: a compact()
    between two separate reads (packed_view(), then rows()) paired the new row numbers with the old tokens."""
    first, second = torch.full((1, 2, 4), 1.0), torch.full((1, 3, 4), 2.0)
    store = FeatureStore.from_tokens([5], first)
    store.append([7], second)
    store.compact()
    store.remove([5])  # item 7 is row 1 of this layout, row 0 after the next compact
    original = store._packed_view

    def view_then_compact(layout):
        view = original(layout)
        store.compact()  # another thread, right after the view was taken
        return view

    store._packed_view = view_then_compact
    tokens, cu_seqlens, rows = store.packed_rows([7])
    row = int(rows[0])
    assert torch.equal(tokens[cu_seqlens[row]:cu_seqlens[row + 1]], second[0])


def test_search_ranks_nan_teacher_scores_last():
    """A gallery item with a NaN token scores NaN against every query: it must rank last (after -inf), not
    top every result list (a descending sort puts NaN first)."""
    dim = 4
    tokens = torch.zeros(4, 2, dim)
    tokens[:, 0, 0] = torch.tensor([3.0, 2.0, 1.0, 0.5])
    tokens[1, 0, 1] = float("nan")  # item 11
    ids = [10, 11, 12, 13]
    embeddings = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    retriever = Retriever(StudentIndex(8, metric="ip"), FeatureStore(dim), TeacherScorer(backend="cpu"))
    retriever.add(ids, embeddings, tokens)
    query = torch.zeros(1, 1, dim)
    query[0, 0, 0] = 1.0
    found, scores = retriever.search(torch.ones(1, 8), query, k=4, rerank_k=4)
    assert found.tolist() == [[10, 12, 13, 11]] and scores[0, 3].isnan()
    found, scores = retriever.search_exhaustive(query, k=4, chunk=1)
    assert found.tolist() == [[10, 12, 13, 11]] and scores[0, 3].isnan()
