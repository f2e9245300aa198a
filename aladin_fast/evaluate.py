"""Evaluate a trained teacher + student as three retrievers: teacher exhaustive, student kNN, two-stage.

Shared by the demo (:mod:`aladin_fast.demo`) and the ``evaluate`` command::

    python -m aladin_fast evaluate --checkpoint run/checkpoint.pt --data data/coco_precomp --split test

Scorers, all ranked with the standard protocol (:mod:`aladin_fast.eval`):

* ``teacher``: every caption against every image with the fused MrSw op
  (:meth:`Teacher.full_scores`) -- the accuracy ceiling and the cost ceiling;
* ``student``: cosine of the pooled embeddings (:meth:`Student.full_scores`);
* ``two_stage``: the :class:`~aladin_fast.retrieval.Retriever` -- student kNN
  in a faiss index, then the fused teacher rerank of the top ``rerank_k`` read
  from a :class:`~aladin_fast.retrieval.FeatureStore` of teacher tokens. Items
  outside the shortlist keep their student order below every reranked item, so
  ranks past ``rerank_k`` (medr, meanr) are the student's; with ``rerank_k`` >=
  the gallery the ranking is the teacher's.

Every scorer's ``metrics`` rank the whole split (COCO 5K on SCAN's ``testall``, Flickr30K's 1,000-image
``test``); for a split of k * 1,000 images (k > 1) the teacher and the student also get ``metrics_1k``, the
COCO 1K protocol (mean over the folds of 1,000 images; ``--max-images 1000`` would give the first fold only).

Latency is per query on pre-encoded queries (the gallery is indexed offline):
``single_ms`` is the median of one-query calls (text -> image, the serving
case), ``batched_ms`` the amortised text -> image cost of one batched call
(two-stage and student kNN: every test caption; teacher: the sampled latency
queries). Query encoding is timed separately
(``encode_query_ms``) because every scorer pays it. The exhaustive teacher is
timed against gallery tokens already in memory (no store reads), which
favours it: the reported speed-up is conservative.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ._inputs import check_positive_int
from ._io import write_text_atomic
from .eval import folds_metrics, metrics_from_ranks, retrieval_ranks

__all__ = ["EncodedSplit", "encode_split", "RetrievalEvaluator", "recall_curve", "evaluate_main"]

RECALL_CURVE_LEVELS = (1, 2, 5, 10, 20, 50, 100)
COCO_FOLD = 1000  # COCO 1K: folds of 1,000 images (5 folds of the 5K "testall" split)
STUDENT_GAP = 3.0  # student cosines lie in [-1, 1]: shift them below the lowest reranked teacher score


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recall_curve(ranks: torch.Tensor, levels: Iterable[int] = RECALL_CURVE_LEVELS) -> Dict[str, float]:
    """``{"K": percent of queries with rank <= K}`` for each level K."""
    ranks = torch.as_tensor(ranks).double()
    if ranks.numel() == 0:  # the mean of nothing: NaN recalls (written to JSON as NaN)
        raise ValueError(f"ranks must be non-empty, got shape {tuple(ranks.shape)}")
    return {str(level): 100.0 * float((ranks <= level).double().mean()) for level in levels}


@dataclass
class EncodedSplit:
    """A test split seen by both models (CPU tensors, float32).

    ``regions [N, R, F]`` / ``image_lengths [N]`` and ``caption_ids [Nc, L]`` /
    ``caption_lengths [Nc]`` are the model inputs; ``image_tokens [N, R, D]`` and
    ``caption_tokens [Nc, L, D]`` the teacher's unit tokens (zero padding);
    ``image_embeddings [N, E]`` / ``caption_embeddings [Nc, E]`` the student's.
    """

    regions: torch.Tensor
    image_lengths: torch.Tensor
    caption_ids: torch.Tensor
    caption_lengths: torch.Tensor
    image_tokens: torch.Tensor
    caption_tokens: torch.Tensor
    image_embeddings: torch.Tensor
    caption_embeddings: torch.Tensor
    captions_per_image: int
    seconds: float

    @property
    def num_images(self) -> int:
        return int(self.regions.shape[0])

    @property
    def num_captions(self) -> int:
        return int(self.caption_ids.shape[0])


@torch.no_grad()
def encode_split(teacher, student, source, tokenizer, device: torch.device, block: int = 256) -> EncodedSplit:
    """Encode every image and caption of ``source`` (a :class:`~aladin_fast.training.data.PairSource`)."""
    from .training.data import encode_captions

    check_positive_int("block", block)
    if source.num_images < 1:
        raise ValueError(f"source has no images ({source!r}): nothing to evaluate")
    started = time.perf_counter()
    teacher.eval(), student.eval()
    regions, image_lengths = source.image_batch(range(source.num_images))
    caption_ids, caption_lengths = encode_captions(tokenizer, source.captions)
    image_tokens, image_embeddings, caption_tokens, caption_embeddings = [], [], [], []
    for start in range(0, source.num_images, block):
        part = regions[start:start + block].to(device), image_lengths[start:start + block].to(device)
        image_tokens.append(teacher.encode_images(*part)[0].float().cpu())
        image_embeddings.append(student.encode_images(*part, teacher=teacher).float().cpu())
    for start in range(0, caption_ids.shape[0], 4 * block):
        part = caption_ids[start:start + 4 * block].to(device), caption_lengths[start:start + 4 * block].to(device)
        tokens = teacher.encode_captions(*part)[0].float().cpu()
        # one pad width for all blocks (the blocks may be padded to different lengths)
        padded = torch.zeros(tokens.shape[0], caption_ids.shape[1], tokens.shape[2])
        padded[:, :tokens.shape[1]] = tokens
        caption_tokens.append(padded)
        caption_embeddings.append(student.encode_captions(*part, teacher=teacher).float().cpu())
    return EncodedSplit(regions, image_lengths, caption_ids, caption_lengths, torch.cat(image_tokens),
                        torch.cat(caption_tokens), torch.cat(image_embeddings), torch.cat(caption_embeddings),
                        source.captions_per_image, time.perf_counter() - started)


def _latency_summary(seconds: Sequence[float]) -> Dict[str, float]:
    values = sorted(1e3 * s for s in seconds)
    # nearest-rank p90: the ceil(0.9 n)-th smallest (int(0.9 n) as an index read the maximum of 10 samples)
    return {"single_ms": statistics.median(values), "single_p90_ms": values[max(0, math.ceil(0.9 * len(values)) - 1)]}


class RetrievalEvaluator:
    """Metrics and latencies of the three scorers on one encoded split.

    Args:
        teacher, student: trained models (eval mode is set here).
        split: :class:`EncodedSplit` of the test data.
        device: where queries are scored (CUDA -> Triton kernels, faiss GPU when available).
        latency_queries: how many single text->image queries to time per scorer.
        store_dtype: feature store dtype (float32 keeps two-stage scores identical to the teacher's).
    """

    def __init__(self, teacher, student, split: EncodedSplit, device: torch.device, *, latency_queries: int = 100,
                 store_dtype: str = "float32", seed: int = 0):
        from .retrieval import FeatureStore, Retriever, StudentIndex, TeacherScorer

        check_positive_int("latency_queries", latency_queries)
        self.teacher, self.student, self.split, self.device = teacher.eval(), student.eval(), split, device
        started = time.perf_counter()
        index_device = "auto" if device.type == "cuda" else "cpu"
        image_ids, caption_ids = torch.arange(split.num_images), torch.arange(split.num_captions)
        image_index = StudentIndex(split.image_embeddings.shape[1], "flat", device=index_device)
        image_index.add(split.image_embeddings, image_ids)
        caption_index = StudentIndex(split.caption_embeddings.shape[1], "flat", device=index_device)
        caption_index.add(split.caption_embeddings, caption_ids)
        image_store = FeatureStore(split.image_tokens.shape[2], store_dtype)
        image_store.append(image_ids, split.image_tokens, split.image_lengths)
        caption_store = FeatureStore(split.caption_tokens.shape[2], store_dtype)
        caption_store.append(caption_ids, split.caption_tokens, split.caption_lengths)
        # rerank with the teacher's own scoring function, as teacher_exhaustive (Teacher.full_scores) does: the
        # default TeacherScorer is MrSw / neg_inf whatever the teacher was trained with
        scorer = TeacherScorer(aggregation=teacher.aggregation, padding=teacher.padding,
                               backend=teacher.backend)
        self.text_to_image = Retriever(image_index, image_store, scorer, direction="text_to_image")
        self.image_to_text = Retriever(caption_index, caption_store, scorer, direction="image_to_text")
        self.build_seconds = time.perf_counter() - started
        generator = torch.Generator().manual_seed(seed)
        count = min(latency_queries, split.num_captions)
        self.latency_rows = torch.randperm(split.num_captions, generator=generator)[:count]
        self._student_scores: Optional[torch.Tensor] = None  # [N, Nc] cosine

    # -------------------------------------------------------------- scorers
    def _move(self, *tensors):
        return [t.to(self.device) for t in tensors]

    def query_encoding_latency(self) -> Dict[str, float]:
        """Single-caption encoding (teacher words + student embedding), every scorer pays it."""
        seconds = []
        with torch.no_grad():
            for row in self.latency_rows.tolist():
                length = int(self.split.caption_lengths[row])
                ids, lengths = self._move(self.split.caption_ids[row:row + 1, :length], self.split.caption_lengths[row:row + 1])
                start = time.perf_counter()
                self.teacher.encode_captions(ids, lengths)
                self.student.encode_captions(ids, lengths, teacher=self.teacher)
                _synchronize(self.device)
                seconds.append(time.perf_counter() - start)
        return _latency_summary(seconds)

    def teacher_exhaustive(self) -> Dict[str, object]:
        """Teacher ranks from :meth:`Teacher.full_scores`, plus single-query exhaustive latency."""
        from . import alignment_scores

        split = self.split
        start = time.perf_counter()
        scores = self.teacher.full_scores(split.regions, split.image_lengths, split.caption_ids, split.caption_lengths)
        full_seconds = time.perf_counter() - start
        gallery, gallery_lengths = self._move(split.image_tokens, split.image_lengths)
        seconds = []
        with torch.no_grad():
            for row in self.latency_rows.tolist():
                query, query_lengths = self._move(split.caption_tokens[row:row + 1], split.caption_lengths[row:row + 1])
                start = time.perf_counter()
                block = alignment_scores(query, gallery, query_lengths, gallery_lengths,
                                         aggregation=self.teacher.aggregation, padding=self.teacher.padding)
                torch.topk(block, min(10, block.shape[1]), dim=1)
                _synchronize(self.device)
                seconds.append(time.perf_counter() - start)
        # batched: the sampled queries in one call against the pre-encoded gallery (as the two-stage batch)
        with torch.no_grad():
            rows = self.latency_rows
            query, query_lengths = self._move(split.caption_tokens[rows], split.caption_lengths[rows])
            start = time.perf_counter()
            block = alignment_scores(query, gallery, query_lengths, gallery_lengths,
                                     aggregation=self.teacher.aggregation, padding=self.teacher.padding)
            torch.topk(block, min(10, block.shape[1]), dim=1)
            _synchronize(self.device)
            batched_seconds = time.perf_counter() - start
        latency = {**_latency_summary(seconds), "full_scores_seconds": full_seconds,
                   "batched_ms": 1e3 * batched_seconds / rows.numel()}
        return self._result(scores, scores, latency)

    def student_cosine(self) -> Dict[str, object]:
        """Student ranks from :meth:`Student.full_scores`, plus single-query faiss kNN latency."""
        split = self.split
        start = time.perf_counter()
        scores = self.student.full_scores(split.regions, split.image_lengths, split.caption_ids, split.caption_lengths,
                                          teacher=self.teacher)
        full_seconds = time.perf_counter() - start
        self._student_scores = scores
        index = self.text_to_image.student_index
        seconds = []
        for row in self.latency_rows.tolist():
            query = split.caption_embeddings[row:row + 1]
            start = time.perf_counter()
            index.search(query, min(10, split.num_images))
            seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        index.search(split.caption_embeddings, min(10, split.num_images))
        batched_seconds = time.perf_counter() - start
        latency = {**_latency_summary(seconds), "full_scores_seconds": full_seconds,
                   "batched_ms": 1e3 * batched_seconds / split.num_captions}
        return self._result(scores, scores, latency)

    def two_stage(self, rerank_k: int, single_latency: bool = True) -> Dict[str, object]:
        """Student shortlist of ``rerank_k`` (capped at each gallery) reranked by the fused teacher, both directions."""
        check_positive_int("rerank_k", rerank_k)
        split = self.split
        student = self._student_scores
        if student is None:
            student = self._student_scores = (split.image_embeddings @ split.caption_embeddings.T).float()
        # text -> image: captions query the image gallery
        shortlist = min(rerank_k, split.num_images)
        queries = self._move(split.caption_tokens, split.caption_lengths)
        start = time.perf_counter()
        ids, teacher = self.text_to_image.search(split.caption_embeddings, *queries, k=shortlist, rerank_k=shortlist)
        t2i_seconds = time.perf_counter() - start
        # ranked at once: one float64 merged matrix alive at a time
        t2i_ranks = retrieval_ranks(self._merge(student.T, ids, teacher).T, self.split.captions_per_image)[1]
        # image -> text: images query the caption gallery
        shortlist_i2t = min(rerank_k, split.num_captions)
        queries = self._move(split.image_tokens, split.image_lengths)
        start = time.perf_counter()
        ids, teacher = self.image_to_text.search(split.image_embeddings, *queries, k=shortlist_i2t, rerank_k=shortlist_i2t)
        i2t_seconds = time.perf_counter() - start
        i2t_ranks = retrieval_ranks(self._merge(student, ids, teacher), self.split.captions_per_image)[0]
        latency = {"batched_ms": 1e3 * t2i_seconds / split.num_captions,
                   "batched_i2t_ms": 1e3 * i2t_seconds / split.num_images}
        if single_latency:
            seconds = []
            for row in self.latency_rows.tolist():
                query, query_lengths = self._move(split.caption_tokens[row:row + 1], split.caption_lengths[row:row + 1])
                start = time.perf_counter()
                self.text_to_image.search(split.caption_embeddings[row:row + 1], query, query_lengths,
                                          k=min(10, shortlist), rerank_k=shortlist)
                _synchronize(self.device)
                seconds.append(time.perf_counter() - start)
            latency.update(_latency_summary(seconds))
        result = self._ranks_result(i2t_ranks, t2i_ranks, latency)
        result.update(rerank_k=rerank_k, shortlist_t2i=shortlist, shortlist_i2t=shortlist_i2t)
        return result

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _merge(student: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Query-by-gallery scores: reranked items get their teacher score, the rest their student
        order strictly below the lowest reranked score of that query.

        In float64: shifted next to teacher scores in float32, student scores a few float32 steps apart
        became ties (ranked pessimistically), so ranks past the shortlist were worse than the student's.
        """
        valid = ids >= 0
        teacher = teacher.double()
        lowest = torch.where(valid, teacher, torch.full_like(teacher, float("inf"))).amin(dim=1, keepdim=True)
        lowest = torch.where(torch.isfinite(lowest), lowest, torch.zeros_like(lowest))
        # a copy (never the cached student matrix itself), then in place: one [Q, G] float64 temporary
        merged = student.to(torch.float64, copy=True).sub_(1.0).add_(lowest).sub_(STUDENT_GAP)
        rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
        merged[rows[valid], ids[valid]] = teacher[valid]
        return merged

    def _result(self, i2t_scores: torch.Tensor, t2i_scores: torch.Tensor, latency: Dict[str, float]) -> Dict[str, object]:
        """Metrics from an image->text matrix ``[N, Nc]`` and a text->image one (also ``[N, Nc]``).

        ``metrics`` rank every image against every caption (COCO 5K on ``testall``); when ``N`` is a multiple
        of 1,000 above 1,000, ``metrics_1k`` adds the COCO 1K protocol (the mean over folds of 1,000 images,
        SCAN's ``fold5``) of the same scores.
        """
        cpi = self.split.captions_per_image
        result = self._ranks_result(retrieval_ranks(i2t_scores, cpi)[0], retrieval_ranks(t2i_scores, cpi)[1], latency)
        count = self.split.num_images
        if i2t_scores is t2i_scores and count > COCO_FOLD and count % COCO_FOLD == 0:
            result["metrics_1k"] = folds_metrics(i2t_scores, COCO_FOLD, cpi)
        return result

    @staticmethod
    def _ranks_result(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor, latency: Dict[str, float]) -> Dict[str, object]:
        return {"metrics": metrics_from_ranks(i2t_ranks, t2i_ranks), "latency": latency,
                "recall_curve": {"i2t": recall_curve(i2t_ranks), "t2i": recall_curve(t2i_ranks)}}


def evaluate_models(teacher, student, split: EncodedSplit, device: torch.device, rerank_ks: Sequence[int],
                    main_rerank_k: int, *, latency_queries: int = 100, progress: bool = True) -> Dict[str, object]:
    """The three scorers plus a ``rerank_k`` sweep of the two-stage retriever (see the module docstring)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    evaluator = RetrievalEvaluator(teacher, student, split, device, latency_queries=latency_queries)
    steps = [("teacher exhaustive", None), ("student cosine", None)] + [(f"two-stage k={k}", k) for k in rerank_ks]
    bar = tqdm(total=len(steps), desc="evaluate", unit="scorer") if (tqdm and progress) else None
    results: Dict[str, object] = {}
    sweep: List[Dict[str, object]] = []
    for name, k in steps:
        if bar is not None:
            bar.set_postfix_str(name)
        if name.startswith("teacher"):
            results["teacher"] = evaluator.teacher_exhaustive()
        elif name.startswith("student"):
            results["student"] = evaluator.student_cosine()
        else:
            sweep.append(evaluator.two_stage(k))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    main = next((entry for entry in sweep if entry["rerank_k"] == main_rerank_k), None)
    if main is None:
        main = evaluator.two_stage(main_rerank_k)
    results["two_stage"] = main
    teacher_rsum = results["teacher"]["metrics"]["rsum"]
    for entry in sweep:
        entry["rsum_fraction_of_teacher"] = entry["metrics"]["rsum"] / teacher_rsum if teacher_rsum else None
    encode = evaluator.query_encoding_latency()
    return {
        "scorers": results,
        "rerank_sweep": sweep,
        "speedup_two_stage_vs_teacher": results["teacher"]["latency"]["single_ms"] / main["latency"]["single_ms"],
        "speedup_two_stage_vs_teacher_batched": results["teacher"]["latency"]["batched_ms"] / main["latency"]["batched_ms"],
        "encode_query_ms": encode,
        "gallery": {"images": split.num_images, "captions": split.num_captions},
        "timings": {"encode_test_seconds": split.seconds, "index_build_seconds": evaluator.build_seconds},
    }


def metrics_table(scorers: Dict[str, Dict[str, object]]) -> str:
    """A fixed-width table: one row per scorer, recalls, rsum, medr and single-query latency."""
    columns = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "t2i_medr")
    header = f"{'scorer':<22}" + "".join(f"{c:>9}" for c in columns) + f"{'ms/query':>10}"
    lines = [header, "-" * len(header)]
    for name, result in scorers.items():
        metrics, latency = result["metrics"], result["latency"]
        ms = latency.get("single_ms", latency.get("batched_ms"))
        lines.append(f"{name:<22}" + "".join(f"{metrics[c]:>9.1f}" for c in columns) + f"{ms:>10.3f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    from .cli import program

    parser = argparse.ArgumentParser(prog=program("evaluate"),
                                     description="evaluate a checkpoint's teacher, student and two-stage retriever")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate`` flags (also used by ``aladin_fast.cli`` for the subcommand)."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by the trainer")
    parser.add_argument("--data", required=True, help="precomputed-features folder (PrecompDataset)")
    parser.add_argument("--split", default="test", help="split name (default: test)")
    parser.add_argument("--layout", default="auto", choices=("auto", "scan", "tokens"))
    parser.add_argument("--rerank-k", default="10,20,50,100",
                        help="comma-separated shortlist sizes of the two-stage sweep; the first >= 20 (or the largest) "
                             "is the headline (default: 10,20,50,100)")
    parser.add_argument("--max-images", type=int, default=None, help="evaluate on the first N images only")
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda[:N]")
    parser.add_argument("--out", default=None, help="also write the results JSON here")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # a malformed name was torch's RuntimeError (a traceback from the evaluate command)
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # "meta" / "mps" / ...: nothing here runs there
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def parse_rerank_ks(text: str) -> List[int]:
    try:
        values = sorted({int(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"--rerank-k must be comma-separated positive ints, got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"--rerank-k must be comma-separated positive ints, got {text!r}")
    return values


def headline_rerank_k(values: Sequence[int]) -> int:
    return next((value for value in values if value >= 20), values[-1])


def evaluate_main(argv=None) -> int:
    """``python -m aladin_fast evaluate --checkpoint CKPT --data DIR [--split test]``; prints JSON, returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["evaluate"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    return run_evaluate(args)


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the ``evaluate`` command from parsed flags (see :func:`add_arguments`)."""
    from .data import PrecompDataset
    from .info import info
    from .retrieval.index import import_faiss
    from .training import load_models
    from .training.data import PairSource, as_source

    device = resolve_device(args.device)
    rerank_ks = parse_rerank_ks(args.rerank_k)
    # checked before the models load and the split encodes (0 / negative values failed deep inside, or not at all)
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be a positive int, got {args.max_images}")
    if args.latency_queries < 1:
        raise ValueError(f"--latency-queries must be a positive int, got {args.latency_queries}")
    if args.out and os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a directory; give the results JSON file to write")
    import_faiss()  # the two-stage scorer's index: a missing faiss failed only after the split was encoded
    teacher, student, vocabulary = load_models(args.checkpoint, map_location=device)
    if student is None:
        raise ValueError(f"checkpoint {args.checkpoint} holds no student: train the student stage first")
    if vocabulary is None:
        raise ValueError(f"checkpoint {args.checkpoint} holds no vocabulary (custom tokenizer); cannot encode captions")
    teacher, student = teacher.to(device), student.to(device)
    dataset = PrecompDataset(args.data, args.split, layout=args.layout)
    if dataset.feature_dim != teacher.feature_dim:
        raise ValueError(f"--data {args.data}: region features have dimension {dataset.feature_dim} but the "
                         f"checkpoint's teacher expects feature_dim={teacher.feature_dim}")
    source = as_source(dataset)
    if args.max_images is not None:
        count = min(args.max_images, source.num_images)
        source = PairSource(count, source.captions[:count * source.captions_per_image], source.image_batch,
                            source.feature_dim, source.captions_per_image)
    split = encode_split(teacher, student, source, vocabulary, device)
    results = evaluate_models(teacher, student, split, device, rerank_ks, headline_rerank_k(rerank_ks),
                              latency_queries=args.latency_queries, progress=sys.stderr.isatty())
    import io

    results["machine"] = info(file=io.StringIO())
    results["checkpoint"], results["data"], results["split"] = args.checkpoint, args.data, args.split
    print(metrics_table({"teacher (exhaustive)": results["scorers"]["teacher"],
                         "student (cosine)": results["scorers"]["student"],
                         f"two-stage (k={results['scorers']['two_stage']['rerank_k']})": results["scorers"]["two_stage"]}),
          file=sys.stderr)
    text = json.dumps(results, indent=2, default=float)
    print(text)  # first: a failing write below must not lose the results
    if args.out:
        write_text_atomic(args.out, text + "\n")
    return 0

