"""The end-to-end demo: train, distil, index, search, evaluate, report -- a real run on SyntheticScenes.

``python -m aladin_fast demo [--quick]`` (or :func:`run_demo`):

1. builds train / test :class:`~aladin_fast.data.SyntheticScenes` (one shared world);
2. trains the TERAN-style teacher on the fused MrSw op, then distils the
   ALADIN-style student (ListNet distillation of the frozen teacher, the acceptance run's recipe) with :class:`~aladin_fast.training.Trainer`;
3. encodes the test split, builds the faiss student index and the feature
   store of teacher tokens, and evaluates three scorers with the standard
   protocol (:mod:`aladin_fast.evaluate`): the teacher exhaustively, the
   student's cosine, and two-stage search (student kNN -> fused teacher rerank
   of the top ``rerank_k``), sweeping ``rerank_k`` for latency vs recall;
4. writes ``results.json``, PNG plots and ``report.md`` (:mod:`aladin_fast.report`)
   and prints a summary table.

Sizes: the default run takes about 6 minutes on the 2-core development CPU
(352 s recorded, README.md; longer when the machine is loaded), ``quick``
about 1 minute; ``sizes_override`` replaces any entry of the size table (tests
use tiny sizes). With CUDA available everything runs on the GPU.
"""
from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any, Dict, Optional

import torch

from ._io import write_text_atomic
from .eval import chance_recalls
from .training.config import TUNED_STUDENT

__all__ = ["DEFAULT_SIZES", "QUICK_SIZES", "check_dependencies", "run_demo"]

# One place for every size knob. Calibrated on the loaded 2-core CPU (one torch thread):
# the teacher clearly beats chance and the student shortlists most of its hits.
DEFAULT_SIZES: Dict[str, Any] = dict(
    train_images=2500, test_images=2000, feature_dim=256, regions=36,
    teacher_dim=128, teacher_layers=1, teacher_heads=4, teacher_ff_dim=256, student_heads=4,
    **TUNED_STUDENT,  # the training acceptance run's student (aladin_fast/training/config.py)
    batch_size=64, teacher_epochs=10, student_epochs=16, lr=1e-3, warmup_steps=20,
    eval_every=2, eval_max_images=200,  # cheap periodic evaluation for the training curves
    rerank_ks=(5, 10, 20, 50, 100), rerank_k=50, latency_queries=200,
)
QUICK_SIZES: Dict[str, Any] = dict(
    DEFAULT_SIZES, train_images=600, test_images=200, teacher_epochs=6, student_epochs=6, warmup_steps=10,
    eval_every=2, eval_max_images=100, rerank_ks=(5, 10, 20, 50), rerank_k=20, latency_queries=100,
)


def check_dependencies() -> None:
    """Raise :class:`~aladin_fast.info.MissingDependencyError` naming the install command when faiss (the student
    index) or matplotlib (the report's plots) is missing: both are optional extras of the package, and the demo
    failed on them with a traceback only after its minutes of training."""
    from .info import MissingDependencyError

    missing = []
    for module, package in (("faiss", "faiss-cpu, or a CUDA build of faiss"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError as error:
            missing.append(f"{module} ({package}; {error})")
    if missing:
        raise MissingDependencyError(f"the demo needs {' and '.join(missing)}: pip install 'aladin-fast[demo]'")


def _default_out() -> str:
    return os.path.join("reports", time.strftime("demo-%Y%m%d-%H%M%S"))


def _train_config(sizes: Dict[str, Any], seed: int, device: str, output_dir: str, progress: bool):
    from .training import TrainConfig

    return TrainConfig(
        teacher_dim=sizes["teacher_dim"], teacher_layers=sizes["teacher_layers"], teacher_heads=sizes["teacher_heads"],
        teacher_ff_dim=sizes["teacher_ff_dim"], student_heads=sizes["student_heads"],
        **{name: sizes[name] for name in TUNED_STUDENT},
        batch_size=sizes["batch_size"], teacher_epochs=sizes["teacher_epochs"], student_epochs=sizes["student_epochs"],
        lr=sizes["lr"], warmup_steps=sizes["warmup_steps"], eval_every=sizes["eval_every"],
        eval_max_images=sizes["eval_max_images"],
        # small synthetic data: one caption per image per epoch, all-negative hinge (hardest-only collapses
        # from scratch at this scale), no dropout
        one_caption_per_image=True, hardest_negative=False, dropout=0.0,
        seed=seed, device=device, output_dir=output_dir, progress=progress, checkpoint_every=10_000,
    )


def run_settings(defaults: Dict[str, Any], sizes_override: Optional[Dict[str, Any]], device: str,
                 threads: Optional[int]):
    """Shared set-up of the demo and the acceptance run: ``(sizes, torch device, previous thread count)``.

    ``sizes`` are ``defaults`` updated by ``sizes_override`` (unknown keys refused); torch's CPU
    threads are set to ``threads``, by default 1 on a CPU device of a machine with <= 4 cores
    (the caller restores the returned previous count).
    """
    from .evaluate import resolve_device

    sizes = dict(defaults)
    unknown = sorted(set(sizes_override or {}) - set(sizes))
    if unknown:
        raise ValueError(f"sizes_override has unknown keys {unknown}; known: {sorted(sizes)}")
    sizes.update(sizes_override or {})
    torch_device = resolve_device(device)
    previous_threads = torch.get_num_threads()
    if threads is None and torch_device.type == "cpu" and (os.cpu_count() or 1) <= 4:
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    return sizes, torch_device, previous_threads


def run_demo(quick: bool = False, seed: int = 0, *, out: Optional[str] = None, device: str = "auto",
             threads: Optional[int] = None, sizes_override: Optional[Dict[str, Any]] = None,
             progress: bool = True) -> Dict[str, Any]:
    """Run the demo and write its report directory; returns the results dict (also in ``results.json``).

    Args:
        quick: smaller sizes (about a minute on a 2-core CPU).
        seed: data and training seed.
        out: report directory (default ``reports/demo-<timestamp>``; ``reports/latest`` points to it).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:N]"``.
        threads: torch CPU threads (default: 1 on machines with <= 4 cores, where more threads
            oversubscribe and stall; otherwise torch's default).
        sizes_override: entries replacing :data:`DEFAULT_SIZES` / :data:`QUICK_SIZES`.
        progress: tqdm progress bars.

    Raises :class:`~aladin_fast.info.MissingDependencyError` before any work when faiss or matplotlib is missing.
    """
    check_dependencies()
    from .data import SyntheticScenes
    from .evaluate import encode_split, evaluate_models, metrics_table
    from .info import info
    from .report import write_report
    from .training import Trainer
    from .training.data import as_source

    sizes, torch_device, previous_threads = run_settings(QUICK_SIZES if quick else DEFAULT_SIZES, sizes_override,
                                                         device, threads)
    out = out or _default_out()
    os.makedirs(out, exist_ok=True)
    _remove_previous_outputs(out)
    started = time.perf_counter()
    try:
        machine = info(file=io.StringIO())  # captured once, printed once below
        print(f"aladin-fast demo ({'quick' if quick else 'default'}): device {torch_device}, "
              f"{torch.get_num_threads()} torch thread(s), torch {machine['torch']}, faiss {machine['faiss']}")
        print(f"report -> {out}")
        common = dict(regions=sizes["regions"], feature_dim=sizes["feature_dim"], world_seed=seed)
        train = SyntheticScenes(sizes["train_images"], seed=2 * seed, **common)
        test = SyntheticScenes(sizes["test_images"], seed=2 * seed + 1, **common)
        config = _train_config(sizes, seed, device, os.path.join(out, "training"), progress)

        print(f"[1/3] training: {sizes['train_images']} scenes, teacher {sizes['teacher_epochs']} epochs "
              f"(fused MrSw), student {sizes['student_epochs']} epochs (ListNet distillation)")
        trainer = Trainer(config, train, test)
        stage_seconds = {}
        stage_start = time.perf_counter()
        trainer.fit(max_epochs=sizes["teacher_epochs"])  # the teacher stage (time it on its own)
        stage_seconds["teacher"] = time.perf_counter() - stage_start
        stage_start = time.perf_counter()
        trainer.fit()  # the student stage
        stage_seconds["student"] = time.perf_counter() - stage_start
        checkpoint = os.path.join(out, "training", "checkpoint.pt")
        trainer.save_checkpoint(checkpoint)

        print(f"[2/3] indexing {sizes['test_images']} test images / {5 * sizes['test_images']} captions "
              f"(faiss + teacher-token feature store)")
        teacher, student = trainer.teacher, trainer.student
        split = encode_split(teacher, student, as_source(test), trainer.tokenizer, torch_device)

        kernel_check = _kernel_check(split, torch_device)
        print(f"fused op on the trained tokens, max |{kernel_check['backend']} - float64 reference|: "
              f"{kernel_check['max_abs_error']:.2e}")
        print(f"two-stage search with a full shortlist ranks as the exhaustive teacher; results agree: "
              f"{kernel_check['agree']}")

        print(f"[3/3] evaluating teacher (exhaustive), student (cosine), two-stage (rerank_k {list(sizes['rerank_ks'])})")
        evaluation = evaluate_models(teacher, student, split, torch_device, sizes["rerank_ks"], sizes["rerank_k"],
                                     latency_queries=sizes["latency_queries"], progress=progress)
        total = time.perf_counter() - started
        chance = chance_recalls(sizes["test_images"], split.captions_per_image)
        results = {
            "kind": "aladin_fast.demo",
            "mode": "quick" if quick else "default",
            "command": "python -m aladin_fast demo" + (" --quick" if quick else "") + f" --seed {seed}",
            **evaluation,
            "chance": chance,
            "kernel_check": kernel_check,
            "timings": {**evaluation["timings"], **{f"train_{k}_seconds": v for k, v in stage_seconds.items()},
                        "total_seconds": total},
            "config": {"sizes": {k: (list(v) if isinstance(v, tuple) else v) for k, v in sizes.items()},
                       "seed": seed, "device": str(torch_device), "torch_threads": torch.get_num_threads(),
                       "train": config.to_dict()},
            "machine": machine,
            "history": trainer.history,
            "checkpoint": checkpoint,
        }
        write_text_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=2, default=float) + "\n")
        write_report(results, out)
        _link_latest(out)
        _print_summary(results, metrics_table, out)
        return results
    finally:
        torch.set_num_threads(previous_threads)


def _remove_previous_outputs(out: str) -> None:
    """Delete what an earlier demo run wrote into ``out`` (only the demo's own files).

    The trainer appends to ``training/metrics.jsonl``, so a re-run into the same folder mixed the previous run's
    records into this one's; and a run failing part way left the previous run's ``results.json`` / ``report.md`` /
    plots beside this run's files, looking like a complete report of this run.
    """
    from .report import PLOTS

    names = ["results.json", "report.md", *PLOTS.values(), os.path.join("training", "metrics.jsonl"),
             os.path.join("training", "checkpoint.pt")]
    for name in names:
        path = os.path.join(out, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            os.unlink(path)


def _kernel_check(split, device: torch.device, captions: int = 16, images: int = 64) -> Dict[str, Any]:
    """The fused op on real trained tokens vs the float64 reference, and the retriever's full shortlist
    vs the exhaustive op (same ranking), on a small slice of the test split."""
    from . import alignment_scores
    from .ops.backends import resolve_backend
    from .retrieval import FeatureStore, Retriever, StudentIndex

    words, word_lengths = split.caption_tokens[:captions], split.caption_lengths[:captions]
    regions, region_lengths = split.image_tokens[:images], split.image_lengths[:images]
    backend = resolve_backend("auto", device, torch.float32)
    fused = alignment_scores(words.to(device), regions.to(device), word_lengths.to(device),
                             region_lengths.to(device)).float().cpu()
    reference = alignment_scores(words.double(), regions.double(), word_lengths, region_lengths, backend="reference")
    error = float((fused.double() - reference).abs().max())
    count = regions.shape[0]
    ids = torch.arange(count)
    index = StudentIndex(split.image_embeddings.shape[1], "flat", device="cpu")
    index.add(split.image_embeddings[:count], ids)
    retriever = Retriever(index, FeatureStore.from_tokens(ids, regions, region_lengths, dtype="float32"))
    found, _ = retriever.search(split.caption_embeddings[:captions], words.to(device), word_lengths.to(device),
                                k=count, rerank_k=count)
    exhaustive = torch.sort(fused, dim=1, descending=True, stable=True).indices
    same_top1 = bool(torch.equal(found[:, 0], exhaustive[:, 0]))
    return {"backend": str(backend), "max_abs_error": error, "captions": int(words.shape[0]), "images": count,
            "same_top1_as_exhaustive": same_top1, "agree": bool(error < 1e-3 and same_top1)}


def _link_latest(out: str) -> None:
    """``reports/latest`` -> the newest report (a symlink; skipped where links are not possible)."""
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.basename(parent) != "reports":
        return
    latest = os.path.join(parent, "latest")
    try:
        if os.path.islink(latest):
            os.unlink(latest)
        if not os.path.exists(latest):
            os.symlink(os.path.basename(os.path.abspath(out)), latest)
    except OSError:
        pass


def _print_summary(results: Dict[str, Any], metrics_table, out: str) -> None:
    from .report import share_text, speedup_text

    scorers = results["scorers"]
    two = scorers["two_stage"]
    rows = {"teacher (exhaustive)": scorers["teacher"], "student (cosine)": scorers["student"],
            f"two-stage (k={two['rerank_k']})": two}
    print("\n" + metrics_table(rows))
    print("\nrerank_k sweep (text->image single-query latency, rsum):")
    for entry in results["rerank_sweep"]:
        print(f"  k={entry['rerank_k']:>4}  {entry['latency']['single_ms']:8.3f} ms  rsum {entry['metrics']['rsum']:6.1f}"
              f"  ({share_text(entry['rsum_fraction_of_teacher'])} of teacher)")
    print(f"\nchance rsum {results['chance']['rsum']:.1f}; two-stage vs the exhaustive teacher: "
          f"{speedup_text(results['speedup_two_stage_vs_teacher'])} per query (gallery {results['gallery']['images']} images)")
    print(f"total {results['timings']['total_seconds']:.0f} s; report: {os.path.join(out, 'report.md')}")
    sys.stdout.flush()
