"""Property tests of the evaluation harness: aladin_fast.evaluate, .acceptance, .report and .info.

Oracles, written from the documented behaviour, one query at a time in float64 / Python numbers:

* two-stage ranks (:meth:`RetrievalEvaluator.two_stage`): per query, the student shortlist is the top
  ``min(rerank_k, gallery)`` by student cosine; a gallery item's key is ``(1, teacher score)`` inside the
  shortlist and ``(0, student score)`` outside (every reranked item above every other one, ranks past the
  shortlist are the student's); the protocol of aladin_fast/eval.py on those keys (pessimistic ties, i2t = best
  own caption). Teacher scores are brute-force loops over the tokens (MrSw, MwSr, symm, sum; neg_inf padding).
  Tokens are multiples of 1/8 and student embeddings multiples of 1/1024 (|e| ~ 1): every fp32 product and sum
  is exact, so the kernel, faiss and the oracle agree bit for bit and teacher ties are frequent;
* the teacher / student scorers: ranks of their score matrices by the same loops, both orientations;
* with ``rerank_k`` >= the gallery, two-stage metrics equal the exhaustive teacher's (real tiny models, every
  aggregation and padding);
* :func:`recall_curve`, :func:`parse_rerank_ks`, :func:`headline_rerank_k`, :func:`group_accuracy` against loops;
* the ``evaluate`` command end to end (strict JSON, 1-image gallery, rerank_k 1), the acceptance run and
  :func:`write_report`: result files are replaced atomically (a failing write keeps the previous file).

Bugs found (each has a ``test_regression_*`` test that fails on the code before the fix):

1. two-stage reranked with the default MrSw / neg_inf scorer whatever the teacher's ``aggregation`` /
   ``padding``: with the whole gallery reranked it did not reproduce the teacher's ranking (e.g. MrAVGw);
2. the merged two-stage matrix was float32: student cosines a float32 step apart, shifted next to teacher scores
   (~16), became ties and ranked pessimistically, so ranks past the shortlist were worse than the student's;
3. ``latency_queries`` < 1 was accepted: 0 crashed later in ``statistics.median`` (StatisticsError), -2 timed
   all but 2 captions; ``two_stage(rerank_k=0)`` failed inside the retriever naming ``k``; ``encode_split`` with
   ``block=0`` raised "range() arg 3 must not be zero", and with a source without images a torch.cat error;
4. the ``evaluate`` command checked ``--max-images`` / ``--latency-queries`` nowhere (0 failed deep inside the
   data loader, -1 with "captions has 25 entries for -1 images"), and only after loading the checkpoint;
   ``--out`` in a folder that does not exist raised FileNotFoundError after the whole evaluation, before the
   JSON was printed (the results were lost);
5. ``results.json`` / ``report.md`` (evaluate ``--out``, acceptance, write_report) were written in place: a
   write failing half way (disk full, interrupt; acceptance's ``json.dump`` streamed into the open file) left a
   truncated file where the previous results were;
6. :func:`write_report` of a run without a rerank_k sweep raised ValueError in matplotlib (log scale, no data);
7. :func:`recall_curve` of no ranks returned NaN recalls (non-standard JSON when written) instead of raising.

Seen, not changed here: with ``padding="zero"`` and every image shorter than the region pad R, two-stage t2i
differs from the teacher (the FeatureStore pads gathered images to its longest item, Teacher.full_scores to R);
``single_p90_ms`` takes sample ``floor(0.9 n)`` (the maximum of 10 samples); :func:`group_accuracy` is a float32
mean (exact to ~1e-7 relative).

Default run: derandomized samples (~15 s on 2 idle cores). ``pytest -m slow`` runs bigger random samples.
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("faiss")

from aladin_fast.acceptance import group_accuracy  # noqa: E402
from aladin_fast.eval import METRIC_NAMES  # noqa: E402
from aladin_fast.evaluate import (  # noqa: E402
    RECALL_CURVE_LEVELS,
    EncodedSplit,
    RetrievalEvaluator,
    encode_split,
    evaluate_main,
    headline_rerank_k,
    parse_rerank_ks,
    recall_curve,
)
from test_eval_properties import oracle_metrics  # noqa: E402
from test_eval_properties import oracle_ranks as protocol_ranks  # noqa: E402  (keys: anything comparable)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "single_threaded_faiss")

NO_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
CPU = torch.device("cpu")


def default(examples):
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    suppress_health_check=NO_HEALTH)


def thorough(examples):
    return settings(max_examples=examples, database=None, deadline=None, suppress_health_check=NO_HEALTH)


# --------------------------------------------------------------------------- oracles


def oracle_teacher(caption_tokens, caption_lengths, image_tokens, image_lengths, aggregation):
    """``[N_images][N_captions]`` float64 teacher scores by loops over valid tokens (neg_inf padding)."""
    def dot(a, b):
        return sum(float(x) * float(y) for x, y in zip(a, b))

    out = []
    for i in range(len(image_tokens)):
        regions = [image_tokens[i][r] for r in range(int(image_lengths[i]))]
        row = []
        for c in range(len(caption_tokens)):
            words = [caption_tokens[c][w] for w in range(int(caption_lengths[c]))]
            sim = [[dot(w, r) for r in regions] for w in words]
            mrsw = sum(max(line) for line in sim)
            mwsr = sum(max(sim[w][r] for w in range(len(words))) for r in range(len(regions)))
            row.append({"MrSw": mrsw, "MwSr": mwsr, "symm": mrsw + mwsr,
                        "sum": sum(sum(line) for line in sim)}[aggregation])
        out.append(row)
    return out


def shortlist(values, size):
    """Positions of the ``size`` largest ``values`` (the caller makes the boundary unambiguous)."""
    return set(sorted(range(len(values)), key=lambda p: -values[p])[:size])


def boundary_is_clear(values, size):
    ordered = sorted(values, reverse=True)
    return size >= len(ordered) or ordered[size - 1] > ordered[size]


def oracle_two_stage_ranks(student, teacher, rerank_k, k):
    """Two-stage (i2t, t2i) ranks from float64 ``student`` / ``teacher`` ``[N_images][N_captions]``."""
    n_images, n_captions = len(student), len(student[0])
    # t2i: caption j queries the images
    t2i_keys = [[None] * n_captions for _ in range(n_images)]
    for j in range(n_captions):
        column = [student[i][j] for i in range(n_images)]
        chosen = shortlist(column, min(rerank_k, n_images))
        for i in range(n_images):
            t2i_keys[i][j] = (1, teacher[i][j]) if i in chosen else (0, student[i][j])
    # i2t: image i queries the captions
    i2t_keys = []
    for i in range(n_images):
        chosen = shortlist(student[i], min(rerank_k, n_captions))
        i2t_keys.append([(1, teacher[i][j]) if j in chosen else (0, student[i][j]) for j in range(n_captions)])
    return protocol_ranks(i2t_keys, k)[0], protocol_ranks(t2i_keys, k)[1]


def oracle_curve(ranks, levels=RECALL_CURVE_LEVELS):
    return {str(level): 100.0 * sum(1 for r in ranks if r <= level) / len(ranks) for level in levels}


def assert_result_matches(result, i2t, t2i):
    expected = oracle_metrics(i2t, t2i)
    assert list(result["metrics"]) == list(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert result["metrics"][name] == pytest.approx(expected[name], abs=1e-9), (name, result["metrics"], expected)
    for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
        assert result["recall_curve"][direction] == pytest.approx(oracle_curve(ranks), abs=1e-9), direction


# --------------------------------------------------------------------------- synthetic splits


class FakeModel:
    """Stands in for a teacher / student where only ``eval()`` and the teacher's scoring options are used."""

    def __init__(self, aggregation="MrSw", padding="neg_inf"):
        self.aggregation, self.padding, self.backend = aggregation, padding, "auto"

    def eval(self):
        return self


def make_split(image_tokens, image_lengths, caption_tokens, caption_lengths, image_embeddings, caption_embeddings,
               captions_per_image):
    """An :class:`EncodedSplit` from tokens and embeddings (model inputs are placeholders of the right length)."""
    as_float = lambda values: torch.as_tensor(np.asarray(values, dtype=np.float32))  # noqa: E731
    image_tokens, caption_tokens = as_float(image_tokens), as_float(caption_tokens)
    image_lengths = torch.as_tensor(np.asarray(image_lengths), dtype=torch.int64)
    caption_lengths = torch.as_tensor(np.asarray(caption_lengths), dtype=torch.int64)
    return EncodedSplit(torch.zeros(image_tokens.shape[0], 1, 1), image_lengths,
                        torch.zeros(caption_tokens.shape[0], 1, dtype=torch.int64), caption_lengths,
                        image_tokens, caption_tokens, as_float(image_embeddings), as_float(caption_embeddings),
                        captions_per_image, 0.0)


def grid_tokens(rng, count, width, dim, lengths, levels):
    tokens = rng.integers(-levels, levels + 1, size=(count, width, dim)) / 8.0
    tokens[np.arange(width)[None, :] >= np.asarray(lengths)[:, None]] = 0.0  # zero padding, as encode_split
    return tokens


def grid_embeddings(rng, count, dim):
    """Near-unit rows on the 1/1024 grid: products (<= 3 * 2**20 / 2**20) are exact in float32."""
    directions = rng.normal(size=(count, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return np.round(directions * 1024) / 1024


@st.composite
def two_stage_problems(draw, max_images=5):
    n_images = draw(st.integers(1, max_images))
    captions_per_image = draw(st.sampled_from([1, 2, 3, 5]))
    n_captions = n_images * captions_per_image
    regions, words, dim = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    image_lengths = rng.integers(1, regions + 1, size=n_images)
    caption_lengths = rng.integers(1, words + 1, size=n_captions)
    levels = draw(st.integers(1, 4))  # few levels: teacher ties are common
    return dict(
        captions_per_image=captions_per_image,
        image_tokens=grid_tokens(rng, n_images, regions, dim, image_lengths, levels), image_lengths=image_lengths,
        caption_tokens=grid_tokens(rng, n_captions, words, dim, caption_lengths, levels),
        caption_lengths=caption_lengths,
        image_embeddings=grid_embeddings(rng, n_images, 3), caption_embeddings=grid_embeddings(rng, n_captions, 3),
        rerank_k=draw(st.integers(1, n_captions + 2)),
        aggregation=draw(st.sampled_from(["MrSw", "MwSr", "symm", "sum"])),
    )


def _check_two_stage(problem):
    split = make_split(problem["image_tokens"], problem["image_lengths"], problem["caption_tokens"],
                       problem["caption_lengths"], problem["image_embeddings"], problem["caption_embeddings"],
                       problem["captions_per_image"])
    student = (problem["image_embeddings"] @ problem["caption_embeddings"].T).tolist()  # exact: grid values
    rerank_k, k = problem["rerank_k"], problem["captions_per_image"]
    # the shortlist must not depend on how faiss breaks student ties at its boundary
    for j in range(split.num_captions):
        assume(boundary_is_clear([row[j] for row in student], min(rerank_k, split.num_images)))
    for row in student:
        assume(boundary_is_clear(row, min(rerank_k, split.num_captions)))
    teacher = oracle_teacher(problem["caption_tokens"], problem["caption_lengths"], problem["image_tokens"],
                             problem["image_lengths"], problem["aggregation"])
    evaluator = RetrievalEvaluator(FakeModel(problem["aggregation"]), FakeModel(), split, CPU, latency_queries=2)
    result = evaluator.two_stage(rerank_k, single_latency=False)
    assert (result["rerank_k"], result["shortlist_t2i"], result["shortlist_i2t"]) == (
        rerank_k, min(rerank_k, split.num_images), min(rerank_k, split.num_captions))
    assert_result_matches(result, *oracle_two_stage_ranks(student, teacher, rerank_k, k))
    # the whole gallery reranked: the teacher's own ranking
    full = evaluator.two_stage(split.num_captions, single_latency=False)
    assert_result_matches(full, *protocol_ranks(teacher, k))


@default(100)
@given(problem=two_stage_problems())
def test_two_stage_matches_the_brute_force_oracle(problem):
    _check_two_stage(problem)


@pytest.mark.slow
@thorough(600)
@given(problem=two_stage_problems(max_images=9))
def test_two_stage_matches_the_brute_force_oracle_thorough(problem):
    _check_two_stage(problem)


def test_regression_two_stage_keeps_student_order_below_the_shortlist_in_float64():
    """Bug 2. Caption 0 (16 words) shortlists image 2 (rerank_k 1), teacher score 16; its own image 0 has student
    cosine 0.5 and image 1 one float32 step less. Shifted below 16 in float32 both became 12.5 -- a tie, so caption
    0 ranked its image 3rd instead of 2nd (the student's order)."""
    a, b = np.float32(0.5), np.nextafter(np.float32(0.5), np.float32(0))
    image_embeddings = [[float(a), 0.8660254], [float(b), 0.8660254], [0.75, math.sqrt(1 - 0.75 ** 2)]]
    caption_embeddings = [[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]]
    words = 16
    split = make_split(np.ones((3, 1, 1)), [1, 1, 1], np.ones((3, words, 1)), [words] * 3,
                       image_embeddings, caption_embeddings, captions_per_image=1)
    student = (np.asarray(image_embeddings, np.float32).astype(np.float64)
               @ np.asarray(caption_embeddings, np.float32).astype(np.float64).T).tolist()
    assert student[0][0] == float(a) and student[1][0] == float(b) and student[1][0] < student[0][0]
    teacher = [[float(words)] * 3 for _ in range(3)]
    evaluator = RetrievalEvaluator(FakeModel(), FakeModel(), split, CPU, latency_queries=1)
    result = evaluator.two_stage(1)  # with the single-query latency as the command runs it
    i2t, t2i = oracle_two_stage_ranks(student, teacher, 1, 1)
    assert t2i[0] == 2
    assert_result_matches(result, i2t, t2i)


# --------------------------------------------------------------------------- real (untrained) tiny models


@pytest.fixture(scope="module")
def tiny_world():
    from aladin_fast.data import SyntheticScenes, Vocabulary
    from aladin_fast.training.data import as_source

    scenes = SyntheticScenes(12, seed=3, regions=20, feature_dim=16)
    source = as_source(scenes)
    return source, Vocabulary.build(source.captions)


def tiny_models(vocabulary, aggregation="MrSw", padding="neg_inf", seed=0):
    from aladin_fast.models import Student, Teacher

    torch.manual_seed(seed)
    teacher = Teacher(len(vocabulary), feature_dim=16, embed_dim=8, layers=1, heads=2, ff_dim=16,
                      aggregation=aggregation, padding=padding)
    return teacher, Student.for_teacher(teacher, embed_dim=8, heads=2, ff_dim=16)


@pytest.mark.parametrize("padding", ["neg_inf", "zero"])
@pytest.mark.parametrize("aggregation", ["MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean"])
def test_regression_two_stage_reranks_with_the_teachers_scoring(tiny_world, aggregation, padding):
    """Bug 1. The whole gallery reranked = the exhaustive teacher ranking, for every teacher aggregation / padding
    (the retrievers used the default MrSw / neg_inf scorer: MrAVGw rsum 251.7 against the teacher's 218.3)."""
    source, vocabulary = tiny_world
    teacher, student = tiny_models(vocabulary, aggregation, padding)
    split = encode_split(teacher, student, source, vocabulary, CPU)
    evaluator = RetrievalEvaluator(teacher, student, split, CPU, latency_queries=2)
    exhaustive = evaluator.teacher_exhaustive()
    reranked = evaluator.two_stage(split.num_captions, single_latency=False)
    assert reranked["metrics"] == pytest.approx(exhaustive["metrics"], abs=1e-9)
    assert reranked["recall_curve"] == exhaustive["recall_curve"]


@pytest.mark.parametrize("captions_per_image", [1, 2, 5])
def test_teacher_and_student_scorers_rank_by_the_protocol(tiny_world, captions_per_image):
    """teacher_exhaustive / student_cosine: the ranks of their [N, Nc] score matrices, i2t along rows and t2i along
    columns, for several caption ratios; two-stage with the whole gallery again equals the teacher."""
    from aladin_fast.training.data import PairSource

    source, vocabulary = tiny_world
    captions = [c for i in range(source.num_images) for c in source.captions[5 * i:5 * i + captions_per_image]]
    source = PairSource(source.num_images, captions, source._image_batch, source.feature_dim, captions_per_image)
    teacher, student = tiny_models(vocabulary, seed=1)
    split = encode_split(teacher, student, source, vocabulary, CPU)
    evaluator = RetrievalEvaluator(teacher, student, split, CPU, latency_queries=3)
    teacher_scores = teacher.full_scores(split.regions, split.image_lengths, split.caption_ids, split.caption_lengths)
    student_scores = student.full_scores(split.regions, split.image_lengths, split.caption_ids, split.caption_lengths,
                                         teacher=teacher)
    for result, scores in ((evaluator.teacher_exhaustive(), teacher_scores),
                           (evaluator.student_cosine(), student_scores)):
        assert_result_matches(result, *protocol_ranks(scores.double().tolist(), captions_per_image))
        assert result["latency"]["single_ms"] > 0 and result["latency"]["batched_ms"] > 0
    full = evaluator.two_stage(10_000)
    assert (full["shortlist_t2i"], full["shortlist_i2t"]) == (split.num_images, split.num_captions)
    assert_result_matches(full, *protocol_ranks(teacher_scores.double().tolist(), captions_per_image))


def test_regression_bad_counts_name_the_argument(tiny_world):
    """Bug 3. latency_queries < 1 is refused up front (0 crashed in statistics.median at the first scorer, -2
    silently timed all captions but 2); two_stage names rerank_k (it failed inside the retriever naming ``k``)."""
    source, vocabulary = tiny_world
    teacher, student = tiny_models(vocabulary)
    split = encode_split(teacher, student, source, vocabulary, CPU)
    for bad in (0, -2, 2.5, True, None):
        with pytest.raises(ValueError, match="latency_queries must be a positive int"):
            RetrievalEvaluator(teacher, student, split, CPU, latency_queries=bad)
    evaluator = RetrievalEvaluator(teacher, student, split, CPU, latency_queries=np.int64(2))
    assert evaluator.latency_rows.numel() == 2
    for bad in (0, -1, 2.5, True, "5"):
        with pytest.raises(ValueError, match="rerank_k must be a positive int"):
            evaluator.two_stage(bad, single_latency=False)


def test_regression_encode_split_checks_its_arguments(tiny_world):
    """Bug 3 (encode_split). ``block`` < 1 raised "range() arg 3 must not be zero" (0) or a torch.cat error (-1),
    and a source without images a torch.cat / data-loader error; now ValueErrors naming them. The encoded split
    does not depend on the block size (bit-identical teacher tokens)."""
    from aladin_fast.training.data import PairSource

    source, vocabulary = tiny_world
    teacher, student = tiny_models(vocabulary)
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="block must be a positive int"):
            encode_split(teacher, student, source, vocabulary, CPU, block=bad)
    empty = PairSource(0, [], lambda indices: (np.zeros((0, 20, 16), np.float32), np.zeros(0, np.int64)), 16)
    with pytest.raises(ValueError, match="source has no images"):
        encode_split(teacher, student, empty, vocabulary, CPU)
    whole, one_by_one = (encode_split(teacher, student, source, vocabulary, CPU, block=b) for b in (256, 1))
    assert torch.equal(whole.image_tokens, one_by_one.image_tokens)
    assert torch.equal(whole.caption_tokens, one_by_one.caption_tokens)
    torch.testing.assert_close(whole.image_embeddings, one_by_one.image_embeddings, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- small pure functions


@default(60)
@given(ranks=st.lists(st.integers(1, 40), min_size=1, max_size=30),
       levels=st.lists(st.integers(1, 50), min_size=1, max_size=8, unique=True))
def test_recall_curve_matches_a_loop(ranks, levels):
    assert recall_curve(torch.tensor(ranks), levels) == pytest.approx(oracle_curve(ranks, levels), abs=1e-12)
    assert recall_curve(torch.tensor(ranks)) == pytest.approx(oracle_curve(ranks), abs=1e-12)
    curve = list(recall_curve(torch.tensor(ranks)).values())
    assert curve == sorted(curve) and curve[-1] <= 100.0


def test_regression_recall_curve_refuses_empty_ranks():
    """Bug 7. No queries gave NaN recalls (``mean`` of nothing), which json.dumps writes as the non-standard NaN;
    a ValueError as :func:`~aladin_fast.eval.metrics_from_ranks` raises."""
    for empty in (torch.zeros(0, dtype=torch.int64), [], np.zeros(0)):
        with pytest.raises(ValueError, match="ranks must be non-empty"):
            recall_curve(empty)


@default(80)
@given(values=st.lists(st.integers(-3, 300), min_size=0, max_size=6), spaces=st.booleans(),
       trailing=st.booleans())
def test_parse_rerank_ks_and_headline(values, spaces, trailing):
    text = (", " if spaces else ",").join(str(v) for v in values) + ("," if trailing else "")
    if not values or min(values) < 1:
        with pytest.raises(ValueError, match="--rerank-k"):
            parse_rerank_ks(text)
        return
    parsed = parse_rerank_ks(text)
    assert parsed == sorted(set(values))
    head = headline_rerank_k(parsed)
    assert head == (min(v for v in parsed if v >= 20) if max(parsed) >= 20 else max(parsed))


@pytest.mark.parametrize("text", ["", " , ", "a", "1.5", "5,x", "0", "-1,5"])
def test_parse_rerank_ks_rejects(text):
    with pytest.raises(ValueError, match="--rerank-k must be comma-separated positive ints"):
        parse_rerank_ks(text)


@default(60)
@given(data=st.data())
def test_group_accuracy_matches_a_loop(data):
    n = data.draw(st.integers(1, 6))
    k = data.draw(st.integers(1, 4))
    values = data.draw(st.lists(st.integers(-2, 2), min_size=n * n * k, max_size=n * n * k))
    scores = torch.tensor(values, dtype=torch.float32).reshape(n, n * k)
    groups = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    wins = 0
    for c in range(n * k):
        image = c // k
        rivals = [scores[i, c].item() for i in range(n) if i != image and groups[i] == groups[image]]
        wins += all(scores[image, c].item() > r for r in rivals)  # ties fail
    # computed as a float32 mean: exact to ~1e-7 relative, not to the last float64 digit
    assert group_accuracy(scores, groups, k) == pytest.approx(100.0 * wins / (n * k), abs=1e-4)


def test_info_returns_what_it_prints():
    from aladin_fast.info import info

    buffer = io.StringIO()
    report = info(file=buffer)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == len(report) and {"aladin_fast", "torch", "faiss", "backend.cpu"} <= set(report)
    for line, (key, value) in zip(lines, report.items()):
        assert line.split()[0] == key and line.rstrip().endswith(str(value).rstrip())
    json.loads(json.dumps(report, allow_nan=False))


# --------------------------------------------------------------------------- the command and the written files


def strict_json(text):
    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_world):
    from aladin_fast.data import SyntheticScenes, save_precomp
    from aladin_fast.training.checkpoint import model_state, save_checkpoint

    _, vocabulary = tiny_world
    root = tmp_path_factory.mktemp("evaluate")
    scenes = SyntheticScenes(6, seed=5, regions=20, feature_dim=16)
    save_precomp(root / "data", "test", scenes.image_features.astype(np.float32), scenes.captions)
    teacher, student = tiny_models(vocabulary, seed=2)
    checkpoint = str(root / "checkpoint.pt")
    save_checkpoint(checkpoint, {"teacher": model_state(teacher), "student": model_state(student),
                                 "vocabulary": vocabulary.itos[4:]})
    return root, ["--checkpoint", checkpoint, "--data", str(root / "data"), "--device", "cpu"]


def run_command(argv, capsys):
    assert evaluate_main(argv) == 0
    return strict_json(capsys.readouterr().out)


def test_evaluate_command_small_galleries(tiny_checkpoint, capsys):
    """One image (5 captions), rerank_k 1 and latency queries beyond the captions: strict JSON, consistent metrics."""
    root, base = tiny_checkpoint
    results = run_command(base + ["--max-images", "1", "--rerank-k", "1,3", "--latency-queries", "50"], capsys)
    assert results["gallery"] == {"images": 1, "captions": 5}
    for name in ("teacher", "student", "two_stage"):
        metrics = results["scorers"][name]["metrics"]
        assert metrics["t2i_r1"] == 100.0 and metrics["i2t_r1"] == 100.0 and metrics["rsum"] == 600.0
    assert [entry["rerank_k"] for entry in results["rerank_sweep"]] == [1, 3]
    assert results["scorers"]["two_stage"]["rerank_k"] == 3
    results = run_command(base + ["--rerank-k", "1,100", "--latency-queries", "3"], capsys)
    sweep = {entry["rerank_k"]: entry for entry in results["rerank_sweep"]}
    assert sweep[1]["shortlist_t2i"] == 1 and sweep[100]["shortlist_i2t"] == 30
    assert sweep[100]["metrics"] == pytest.approx(results["scorers"]["teacher"]["metrics"])
    assert sweep[1]["metrics"]["t2i_r1"] <= results["scorers"]["student"]["recall_curve"]["t2i"]["1"] + 1e-9


@pytest.mark.parametrize("extra, message", [
    (["--max-images", "0"], "--max-images must be a positive int, got 0"),
    (["--max-images", "-1"], "--max-images must be a positive int, got -1"),
    (["--latency-queries", "0"], "--latency-queries must be a positive int, got 0"),
    (["--latency-queries", "-2"], "--latency-queries must be a positive int, got -2"),
])
def test_regression_evaluate_command_checks_counts_first(tmp_path, extra, message):
    """Bug 4. Refused before the checkpoint is read (here it does not even exist), naming the flag."""
    argv = ["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path), "--device", "cpu"]
    with pytest.raises(ValueError, match=message):
        evaluate_main(argv + extra)


def test_regression_evaluate_command_out_folder(tiny_checkpoint, tmp_path, capsys):
    """Bug 4. ``--out`` in a folder that does not exist yet is created (it raised FileNotFoundError after the
    whole evaluation, and the JSON was never printed); a directory as ``--out`` is refused up front."""
    _, base = tiny_checkpoint
    target = tmp_path / "new" / "folder" / "eval.json"
    printed = run_command(base + ["--max-images", "2", "--latency-queries", "2", "--out", str(target)], capsys)
    assert strict_json(target.read_text(encoding="utf-8")) == printed
    with pytest.raises(ValueError, match="is a directory"):
        evaluate_main(base + ["--out", str(tmp_path)])


class failing_writes:
    """``open`` of files named ``name`` for writing fails half way (ENOSPC after ``budget`` characters)."""

    def __init__(self, name, budget=20):
        self.name, self.budget = name, budget

    def __enter__(self):
        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and self.name in os.path.basename(os.fspath(file)) \
                    and any(flag in mode for flag in "wxa"):
                written = [0]
                real_write = handle.write

                def write(text):
                    room = self.budget - written[0]
                    if len(text) > room:
                        real_write(text[:max(room, 0)])
                        handle.flush()
                        raise OSError(errno.ENOSPC, "No space left on device (test)")
                    written[0] += len(text)
                    return real_write(text)

                handle.write = write
            return handle

        self.patch = pytest.MonkeyPatch()
        self.patch.setattr(builtins, "open", fake_open)
        return self

    def __exit__(self, *exc):
        self.patch.undo()


def leftovers(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_regression_evaluate_out_is_replaced_atomically(tiny_checkpoint, tmp_path, capsys):
    """Bug 5. A write failing half way keeps the previous results file (and the results were printed first)."""
    _, base = tiny_checkpoint
    target = tmp_path / "eval.json"
    target.write_text('{"previous": true}\n', encoding="utf-8")
    with failing_writes("eval.json"), pytest.raises(OSError, match="No space left"):
        evaluate_main(base + ["--max-images", "2", "--latency-queries", "2", "--out", str(target)])
    assert target.read_text(encoding="utf-8") == '{"previous": true}\n'
    assert strict_json(capsys.readouterr().out)["gallery"] == {"images": 2, "captions": 10}
    assert leftovers(tmp_path) == []


def test_regression_acceptance_results_replaced_atomically(tmp_path):
    """Bug 5. A failing write of results.json keeps the previous one (json.dump streamed into the truncated file);
    a successful run then replaces both files with strict JSON and the report."""
    from aladin_fast.acceptance import run_acceptance

    sizes = dict(train_images=16, test_images=8, feature_dim=32, regions=20, teacher_dim=8, teacher_heads=2,
                 teacher_ff_dim=16, student_dim=8, student_heads=2, batch_size=8, warmup_steps=1,
                 seconds=0.05, student_seconds=0.05)
    (tmp_path / "results.json").write_text('{"previous": true}\n', encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):
        with failing_writes("results.json", budget=200), pytest.raises(OSError, match="No space left"):
            run_acceptance(out=str(tmp_path), sizes_override=sizes, checks=False)
        assert (tmp_path / "results.json").read_text(encoding="utf-8") == '{"previous": true}\n'
        assert leftovers(tmp_path) == []
        results = run_acceptance(out=str(tmp_path), sizes_override=sizes, checks=False)
    saved = strict_json((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert saved["metrics"] == results["metrics"] and saved["oracles"] is None
    assert "Verdict" in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert leftovers(tmp_path) == []


def demo_like_results(sweep_ks=(1, 4), fraction=None):
    """A minimal demo ``results.json`` dict for :func:`write_report` (no training needed)."""
    metrics = {name: 10.0 for name in METRIC_NAMES}
    curve = {"i2t": {"1": 10.0, "5": 40.0}, "t2i": {"1": 10.0, "5": 50.0}}
    scorer = {"metrics": metrics, "recall_curve": curve, "latency": {"single_ms": 1.0, "full_scores_seconds": 0.1}}
    sweep = [{"rerank_k": k, "metrics": metrics, "latency": {"single_ms": 0.5}, "rsum_fraction_of_teacher": fraction}
             for k in sweep_ks]
    return {
        "mode": "quick", "command": "python -m aladin_fast demo --quick",
        "scorers": {"teacher": scorer, "student": scorer, "two_stage": {**scorer, "rerank_k": 4}},
        "rerank_sweep": sweep, "gallery": {"images": 4, "captions": 20}, "machine": {},
        "config": {"sizes": {"train_images": 8, "teacher_dim": 8, "teacher_epochs": 1, "student_dim": 8,
                             "student_epochs": 1}, "device": "cpu", "torch_threads": 1},
        "chance": {**{f"{d}_r{k}": 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}, "rsum": 6.0},
        "speedup_two_stage_vs_teacher": 2.0, "speedup_two_stage_vs_teacher_batched": 2.0,
        "encode_query_ms": {"single_ms": 0.1}, "timings": {"total_seconds": 1.0}, "checkpoint": "c.pt",
        "history": [],
    }


def test_regression_write_report_replaces_report_atomically(tmp_path):
    """Bug 5 (report.md of write_report)."""
    pytest.importorskip("matplotlib")
    from aladin_fast.report import write_report

    (tmp_path / "report.md").write_text("previous\n", encoding="utf-8")
    with failing_writes("report.md"), pytest.raises(OSError, match="No space left"):
        write_report(demo_like_results(), str(tmp_path))
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == "previous\n"
    assert leftovers(tmp_path) == []
    paths = write_report(demo_like_results(fraction=0.5), str(tmp_path))
    assert "| 4 | 0.500 | 10.0 | 50% | 10.0 | 10.0 |" in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert all(os.path.getsize(path) > 0 for path in paths.values()) and leftovers(tmp_path) == []


def test_regression_write_report_with_an_empty_sweep(tmp_path):
    """Bug 6. A demo run with ``rerank_ks=()`` (the headline two-stage only): the latency-vs-rerank_k plot
    log-scaled an axis without data and tight_layout raised ValueError, after results.json was written."""
    pytest.importorskip("matplotlib")
    from aladin_fast.report import write_report

    paths = write_report(demo_like_results(sweep_ks=(), fraction=None), str(tmp_path))
    assert all(os.path.getsize(path) > 0 for path in paths.values())
    assert "rerank_k sweep" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_write_text_atomic_writes_through_symlinks_and_keeps_the_mode(tmp_path):
    from aladin_fast._io import write_text_atomic

    target = tmp_path / "real.json"
    target.write_text("old", encoding="utf-8")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_text_atomic(str(link), "new")
    assert link.is_symlink() and target.read_text(encoding="utf-8") == "new"
    fresh = tmp_path / "fresh.json"
    write_text_atomic(str(fresh), "x")
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask  # as open(path, "w") would create it


# ------------------------------------------------------------------------------------ session 8: small numbers
@pytest.mark.parametrize("num_images,captions_per_image", [(1, 1), (1, 5), (2, 2), (3, 2), (2, 3), (6, 1)])
def test_chance_recalls_equal_the_average_over_every_ranking(num_images, captions_per_image):
    """Regression: i2t chance was K / N, the t2i value; with c right captions among N c it is
    1 - C(Nc - c, K) / C(Nc, K). The oracle enumerates every ranking of the captions (and of the images)."""
    import itertools

    from aladin_fast.eval import chance_recalls

    total = num_images * captions_per_image
    got = chance_recalls(num_images, captions_per_image)
    for level in (1, 5, 10):
        hits = [min(order.index(j) for j in range(captions_per_image)) < level
                for order in itertools.permutations(range(total))]
        assert got[f"i2t_r{level}"] == pytest.approx(100.0 * sum(hits) / len(hits), rel=1e-12)
        image_hits = [order.index(0) < level for order in itertools.permutations(range(num_images))]
        assert got[f"t2i_r{level}"] == pytest.approx(100.0 * sum(image_hits) / len(image_hits), rel=1e-12)
    assert got["rsum"] == pytest.approx(sum(value for name, value in got.items() if name != "rsum"))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_images must be a positive int"):
            chance_recalls(bad)


def test_regression_small_test_set_chance_is_exact():
    from aladin_fast.eval import chance_recalls

    assert chance_recalls(8, 5)["i2t_r5"] == pytest.approx(100 * (1 - math.comb(35, 5) / math.comb(40, 5)))
    assert abs(chance_recalls(8, 5)["i2t_r5"] - 50.7) < 0.1  # K / N said 62.5


@pytest.mark.parametrize("count", [1, 2, 9, 10, 11, 100])
def test_regression_p90_is_the_nearest_rank(count):
    """p90 of n samples is the ceil(0.9 n)-th smallest; int(0.9 n) as an index read the maximum of 10."""
    from aladin_fast.evaluate import _latency_summary

    seconds = [(i + 1) / 1000 for i in range(count)]  # 1 .. n ms
    assert _latency_summary(seconds)["single_p90_ms"] == pytest.approx(math.ceil(0.9 * count))


def test_regression_group_accuracy_is_exact():
    """float32 averaging gave 33.33333433 for one caption in three."""
    # 3 images, one caption each, one group: only caption 0 beats its two rivals (the others tie: failures)
    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert group_accuracy(scores, [0, 0, 0], captions_per_image=1) == pytest.approx(100.0 / 3, rel=1e-12)
