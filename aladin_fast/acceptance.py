"""Training acceptance (issue 4): the teacher against a global-embedding baseline at equal wall-clock time.

``python -m aladin_fast acceptance [--seconds 270] [--student-seconds 240] [--out DIR]`` (or :func:`run_acceptance`):

1. builds train / test :class:`~aladin_fast.data.SyntheticScenes` at the
   demo's default size (one shared world);
2. measures how hard the test split is with oracle features (no training):
   word-region MrSw on the true concepts, per word (a bag of words) and per
   noun phrase (words that know their phrase: binding), against global
   mean- and max-pooled cosines, and how often a caption ranks its image
   above the 3 hard negatives of its group;
3. trains, with one :class:`~aladin_fast.training.Trainer`, (a) the TERAN-style
   teacher for ``seconds`` of training steps, (b) the global-embedding
   baseline (own encoders as wide and deep as the teacher's, max-pooled,
   InfoNCE, no teacher: the best of a sweep at equal steps) for the same
   ``seconds``, (c) the ALADIN student (pooling heads on the frozen teacher's
   tokens, cached once; ListNet distillation) for ``student_seconds``;
4. evaluates all three on the test split with the standard protocol (R@1/5/10
   both directions, medr, meanr, rsum) and checks the issue's criteria;
5. writes ``results.json`` and ``report.md`` into ``out`` (machine, torch,
   threads, load average sampled during every stage, times, steps).

The time budgets count training steps only (data loading included;
evaluation not). The machine may be shared: every stage records its CPU
time, its steps and the load average while it ran, so an unequal share of
the CPU between teacher and baseline is visible in the results.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from ._io import write_text_atomic
from .eval import chance_recalls
from .training.config import TUNED_STUDENT

__all__ = ["ACCEPTANCE_SIZES", "CRITERIA", "run_acceptance", "oracle_checks", "main"]

# Data at the demo's default size; models and optimiser as the demo's (calibrated on this 2-core CPU).
ACCEPTANCE_SIZES: Dict[str, Any] = dict(
    train_images=2500, test_images=2000, feature_dim=256, regions=36,
    teacher_dim=128, teacher_layers=1, teacher_heads=4, teacher_ff_dim=256, student_heads=4,
    batch_size=64, lr=1e-3, warmup_steps=20,
    # the baseline as tuned at equal steps (docs/training.md): max-pooled encoder tokens, InfoNCE at 0.1; every
    # token projected to 512-d before the max, as the student (a little better than pooling 128-d tokens)
    baseline_dim=512, baseline_pooling="max", baseline_head_layers=0, baseline_project_tokens=True,
    baseline_loss="infonce", baseline_temperature=0.1, baseline_lr=None,
    **TUNED_STUDENT,  # the student as tuned on a saved teacher (aladin_fast/training/config.py, docs/training.md)
    seconds=270.0, student_seconds=240.0,
)
# "clearly higher": both R@1 at least this many points above the baseline's; "most": at least this share
CRITERIA = {"teacher_over_baseline_r1_points": 5.0, "student_share_of_teacher_r1": 0.5}
MODELS = ("teacher", "baseline", "student")
DEFAULT_OUT = os.path.join("benchmarks", "results", "training-acceptance")


class _LoadSampler:
    """Samples ``os.getloadavg()`` every ``interval`` seconds in a daemon thread: ``[(time, 1-min, 5-min)]``."""

    def __init__(self, interval: float = 5.0):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.time(), *os.getloadavg()[:2]))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "_LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, stop: float) -> Dict[str, Optional[float]]:
        """Mean / max of the 1-minute load average sampled in ``[start, stop]``."""
        values = [one for when, one, _ in self.samples if start <= when <= stop]
        if not values:
            return {"mean_1min": None, "max_1min": None, "samples": 0}
        return {"mean_1min": sum(values) / len(values), "max_1min": max(values), "samples": len(values)}


def _pooled(tokens: torch.Tensor, lengths: torch.Tensor, how: str) -> torch.Tensor:
    """Unit mean- or max-pooled rows of ``tokens [N, L, K]`` over their valid positions (max clamped at 0)."""
    valid = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    if how == "mean":
        pooled = (tokens * valid[..., None]).sum(1) / lengths.clamp(min=1)[:, None]
    else:
        pooled = tokens.masked_fill(~valid[..., None], float("-inf")).max(1).values.clamp(min=0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def group_accuracy(scores: torch.Tensor, groups: Sequence[int], captions_per_image: int = 5) -> float:
    """Percent of captions whose image outscores every other image of its hard-negative group.

    ``scores [N_images, N_captions]`` (eval orientation); ``groups [N_images]``. Ties count as failures.
    """
    groups = torch.as_tensor(groups)
    captions = torch.arange(scores.shape[1])
    images = captions // captions_per_image
    positive = scores[images, captions]
    mates = (groups[:, None] == groups[images][None, :])
    mates[images, captions] = False
    rival = scores.masked_fill(~mates, float("-inf")).max(dim=0).values
    return 100.0 * float((positive > rival).double().mean())


def oracle_checks(scenes) -> Dict[str, Dict[str, float]]:
    """How much word-region alignment can gain over a global embedding on ``scenes``, with oracle features.

    Regions are projected onto the true concept prototypes (``[N, R, K]``);
    captions become either one-hot content words (a bag of words) or one
    token per noun phrase (:meth:`~aladin_fast.data.SyntheticScenes.oracle_phrase_features`).
    Returns, per scorer, the retrieval metrics plus ``group_accuracy`` (see
    :func:`group_accuracy`).
    """
    from . import alignment_scores
    from .eval import retrieval_metrics

    regions = torch.from_numpy(scenes.image_features) @ torch.from_numpy(scenes.concept_prototypes).T
    image_lengths = torch.from_numpy(scenes.image_lengths)
    words, word_lengths = scenes.oracle_word_features()
    phrases, phrase_lengths = scenes.oracle_phrase_features()
    scorers = {
        "oracle words MrSw (bag of words)":
            alignment_scores(words, regions, word_lengths, image_lengths).T,
        "oracle phrases MrSw (binding)":
            alignment_scores(phrases, regions, phrase_lengths, image_lengths).T,
        "oracle global mean-pooled cosine":
            _pooled(regions, image_lengths, "mean") @ _pooled(words, word_lengths, "mean").T,
        "oracle global max-pooled cosine":
            _pooled(regions, image_lengths, "max") @ _pooled(words, word_lengths, "mean").T,
    }
    out = {}
    for name, scores in scorers.items():
        scores = scores.float().contiguous()
        out[name] = {**retrieval_metrics(scores), "group_accuracy": group_accuracy(scores, scenes.groups)}
    return out


def _train_config(sizes: Dict[str, Any], seed: int, device: str, output_dir: Optional[str], progress: bool):
    from .training import TrainConfig

    return TrainConfig(
        stages=("teacher", "baseline", "student"),
        teacher_dim=sizes["teacher_dim"], teacher_layers=sizes["teacher_layers"], teacher_heads=sizes["teacher_heads"],
        teacher_ff_dim=sizes["teacher_ff_dim"], student_heads=sizes["student_heads"],
        **{name: sizes[name] for name in TUNED_STUDENT},
        batch_size=sizes["batch_size"], lr=sizes["lr"], warmup_steps=sizes["warmup_steps"],
        baseline_dim=sizes["baseline_dim"], baseline_loss=sizes["baseline_loss"], baseline_lr=sizes["baseline_lr"],
        baseline_temperature=sizes["baseline_temperature"], baseline_pooling=sizes["baseline_pooling"],
        baseline_head_layers=sizes["baseline_head_layers"], baseline_project_tokens=sizes["baseline_project_tokens"],
        teacher_seconds=sizes["seconds"], baseline_seconds=sizes["seconds"], student_seconds=sizes["student_seconds"],
        # as the demo: one caption per image per epoch, all-negative hinge (hardest-only collapses from scratch
        # at this scale), no dropout; no periodic evaluation (the test split is evaluated once at the end)
        one_caption_per_image=True, hardest_negative=False, dropout=0.0, eval_every=1_000_000,
        seed=seed, device=device, output_dir=output_dir, progress=progress, checkpoint_every=1_000_000,
    )


def _stage_records(history: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {record["stage"]: record for record in history if record.get("kind") == "stage"}


def run_acceptance(seed: int = 0, *, out: Optional[str] = DEFAULT_OUT, device: str = "cpu",
                   threads: Optional[int] = None, sizes_override: Optional[Dict[str, Any]] = None,
                   progress: bool = False, checks: bool = True) -> Dict[str, Any]:
    """Run the acceptance measurement; returns the results dict (also written to ``out`` unless None).

    Args:
        seed: data and training seed.
        out: folder for ``results.json`` and ``report.md`` (None: write nothing).
        device: ``"cpu"`` (the acceptance is about this CPU), ``"auto"`` or ``"cuda[:N]"``.
        threads: torch CPU threads (default: 1 on machines with <= 4 cores, as the demo).
        sizes_override: entries replacing :data:`ACCEPTANCE_SIZES` (tests use tiny sizes).
        progress: tqdm progress bars.
        checks: also measure the oracle data checks (:func:`oracle_checks`) on the test split.
    """
    from .data import SyntheticScenes
    from .demo import run_settings
    from .info import info
    from .training import Trainer

    sizes, torch_device, previous_threads = run_settings(ACCEPTANCE_SIZES, sizes_override, device, threads)
    started = time.perf_counter()
    try:
        machine = info(file=io.StringIO())
        machine["cpu_model"] = _cpu_model()
        machine["cpu_count"] = os.cpu_count()
        print(f"aladin-fast training acceptance: device {torch_device}, {torch.get_num_threads()} torch thread(s), "
              f"torch {machine['torch']}, load average {_load_text()}")
        with _LoadSampler() as load:
            common = dict(regions=sizes["regions"], feature_dim=sizes["feature_dim"], world_seed=seed)
            train = SyntheticScenes(sizes["train_images"], seed=2 * seed, **common)
            test = SyntheticScenes(sizes["test_images"], seed=2 * seed + 1, **common)
            oracles, oracle_seconds = None, None
            if checks:
                print(f"[1/3] data check: oracle features on the {sizes['test_images']} test images")
                check_start = time.perf_counter()
                oracles = oracle_checks(test)
                oracle_seconds = time.perf_counter() - check_start
                _print_oracles(oracles)
            print(f"[2/3] training on {sizes['train_images']} scenes: teacher {sizes['seconds']:.0f} s, baseline "
                  f"{sizes['seconds']:.0f} s, student {sizes['student_seconds']:.0f} s (seconds of training steps)")
            config = _train_config(sizes, seed, device, None, progress)
            trainer = Trainer(config, train)
            trainer.fit()
            stages = _stage_records(trainer.history)
            for stage in ("teacher", "baseline", "student"):
                record = stages[stage]
                record["load"] = load.between(record["wall_start"], record["wall_end"])
            print(f"[3/3] evaluating on {sizes['test_images']} test images / "
                  f"{test.captions_per_image * sizes['test_images']} captions")
            metrics, evaluation_seconds = {}, {}
            for model in MODELS:
                eval_start = time.perf_counter()
                metrics[model] = trainer.evaluate(test, model=model)
                evaluation_seconds[model] = time.perf_counter() - eval_start
            total = time.perf_counter() - started
        verdict = _verdict(metrics)
        results = {
            "kind": "aladin_fast.acceptance",
            "command": f"python -m aladin_fast acceptance --seed {seed}",
            "metrics": metrics,
            "oracles": oracles,
            "criteria": CRITERIA,
            "verdict": verdict,
            "stages": {stage: {k: v for k, v in stages[stage].items() if k != "kind"} for stage in MODELS},
            "timings": {"evaluation_seconds": evaluation_seconds, "oracle_seconds": oracle_seconds,
                        "total_seconds": total},
            "load_average": {"samples": [list(s) for s in load.samples],
                             "whole_run": load.between(load.samples[0][0], time.time()) if load.samples else None},
            "chance_rsum": chance_recalls(sizes["test_images"], test.captions_per_image)["rsum"],
            "config": {"sizes": sizes, "seed": seed, "device": str(torch_device),
                       "torch_threads": torch.get_num_threads(), "train": config.to_dict()},
            "machine": machine,
            "history": trainer.history,
        }
        if out:
            # serialised whole, then written atomically: a failure leaves the previous results.json, not a
            # truncated one (json.dump streamed into the open file)
            write_text_atomic(os.path.join(out, "results.json"), json.dumps(results, indent=2, default=float) + "\n")
            try:
                write_text_atomic(os.path.join(out, "report.md"), report_markdown(results))
            except BaseException:
                # results.json is this run's now: a previous run's report.md beside it would read as this run's
                report = os.path.join(out, "report.md")
                if os.path.lexists(report) and not os.path.isdir(report):
                    os.unlink(report)
                raise
        print("\n" + metrics_markdown(results))
        print(f"\nverdict: {verdict['summary']}")
        if out:
            print(f"written: {os.path.join(out, 'results.json')}, {os.path.join(out, 'report.md')}")
        return results
    finally:
        torch.set_num_threads(previous_threads)


def _verdict(metrics: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    teacher, baseline, student = (metrics[m] for m in MODELS)
    margins = {d: teacher[f"{d}_r1"] - baseline[f"{d}_r1"] for d in ("i2t", "t2i")}
    shares = {d: (student[f"{d}_r1"] / teacher[f"{d}_r1"] if teacher[f"{d}_r1"] > 0 else None) for d in ("i2t", "t2i")}
    clearly = all(v >= CRITERIA["teacher_over_baseline_r1_points"] for v in margins.values())
    most = all(v is not None and v >= CRITERIA["student_share_of_teacher_r1"] for v in shares.values())
    summary = (f"teacher R@1 over baseline: i2t {margins['i2t']:+.1f}, t2i {margins['t2i']:+.1f} points "
               f"({'clearly higher' if clearly else 'NOT clearly higher'}: >= {CRITERIA['teacher_over_baseline_r1_points']:g} "
               f"in both directions); student keeps "
               + ", ".join(f"{d} {100 * v:.0f}%" if v is not None else f"{d} n/a" for d, v in shares.items())
               + f" of the teacher's R@1 ({'most' if most else 'NOT most'}: >= "
                 f"{100 * CRITERIA['student_share_of_teacher_r1']:.0f}% in both directions)")
    return {"teacher_minus_baseline_r1": margins, "student_share_of_teacher_r1": shares,
            "teacher_clearly_beats_baseline": clearly, "student_recovers_most": most, "summary": summary}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _load_text() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def _print_oracles(oracles: Dict[str, Dict[str, float]]) -> None:
    for name, m in oracles.items():
        print(f"  {name:34s} i2t R@1 {m['i2t_r1']:5.1f}  t2i R@1 {m['t2i_r1']:5.1f}  rsum {m['rsum']:6.1f}  "
              f"beats its group {m['group_accuracy']:5.1f}%")
    sys.stdout.flush()


def metrics_markdown(results: Dict[str, Any]) -> str:
    """The results table: one row per model (recalls in percent), with its training time, steps and load."""
    lines = ["| model | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | train s | CPU s | steps | load (1-min, mean) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    names = {"teacher": "teacher (word-region MrSw)", "baseline": "global-embedding baseline",
             "student": "student (distilled, global)"}
    for model in MODELS:
        m, stage = results["metrics"][model], results["stages"][model]
        load = stage.get("load", {}).get("mean_1min")
        lines.append(
            f"| {names[model]} | {m['i2t_r1']:.1f} | {m['i2t_r5']:.1f} | {m['i2t_r10']:.1f} | {m['t2i_r1']:.1f} | "
            f"{m['t2i_r5']:.1f} | {m['t2i_r10']:.1f} | {m['rsum']:.1f} | {stage['seconds']:.0f} | "
            f"{stage['cpu_seconds']:.0f} | {stage['steps']} | {'' if load is None else f'{load:.2f}'} |")
    return "\n".join(lines)


def report_markdown(results: Dict[str, Any]) -> str:
    """``report.md``: the table, the verdict, the oracle data checks and the run's conditions."""
    sizes, machine = results["config"]["sizes"], results["machine"]
    parts = [
        "# Training acceptance (issue 4)\n",
        f"Reproduce: `{results['command']}`. SyntheticScenes: {sizes['train_images']} training scenes, evaluated on "
        f"{sizes['test_images']} unseen test images / {5 * sizes['test_images']} captions (R = {sizes['regions']}, "
        f"F = {sizes['feature_dim']}) with the standard protocol (R@K in percent, rsum = sum of the six recalls; "
        f"chance rsum {results['chance_rsum']:.1f}). Teacher and baseline had the same wall-clock budget of training "
        f"steps ({sizes['seconds']:.0f} s each), the student {sizes['student_seconds']:.0f} s.\n",
        metrics_markdown(results) + "\n",
        f"**Verdict**: {results['verdict']['summary']}.\n",
        f"Models: teacher D = {sizes['teacher_dim']}, {sizes['teacher_layers']} encoder layer(s) per modality, "
        f"VSE++ hinge (all negatives) on MrSw; baseline: encoders of the same size, "
        f"{_head_text(sizes, 'baseline')} into {sizes['baseline_dim'] or sizes['student_dim']}-d embeddings, "
        f"{sizes['baseline_loss']}"
        + (f" (temperature {sizes['baseline_temperature']:g})" if sizes["baseline_loss"] == "infonce" else "")
        + f", lr {sizes['baseline_lr'] or sizes['lr']:g}; student: {_head_text(sizes, 'student')} into "
        f"{sizes['student_dim']}-d embeddings, on the frozen teacher's tokens"
        + (" (cached once at the start of its stage, counted in its time)" if sizes["cache_teacher_tokens"] else "")
        + ", " + ("ListNet distillation only" if not sizes["student_hinge_weight"] else "hinge + ListNet")
        + f" (softmax of the teacher's scores / {sizes['distill_teacher_temperature']:g} against softmax of the "
        f"student's cosines x {sizes['distill_temperature']:g})"
        + f", lr {sizes['student_lr'] or sizes['lr']:g}. Batch {sizes['batch_size']}, AdamW (teacher lr "
        f"{sizes['lr']:g}), warm-up then cosine schedule over each time budget.\n",
    ]
    if results.get("oracles"):
        parts.append("## Data check: oracle features (no training), test split\n")
        parts.append("| scorer | i2t R@1 | t2i R@1 | rsum | caption ranks its image above its 3 hard negatives |")
        parts.append("|---|---:|---:|---:|---:|")
        for name, m in results["oracles"].items():
            parts.append(f"| {name} | {m['i2t_r1']:.1f} | {m['t2i_r1']:.1f} | {m['rsum']:.1f} | "
                         f"{m['group_accuracy']:.1f}% |")
        parts.append("")
    whole = (results["load_average"] or {}).get("whole_run") or {}
    timings = results["timings"]
    parts += [
        "## Run\n",
        f"- machine: {machine.get('cpu_model')} ({machine.get('cpu_count')} CPUs), {machine.get('platform')}; "
        f"CPU kernel: {machine.get('backend.cpu', '').split(';')[0]}",
        f"- versions: aladin_fast {machine.get('aladin_fast')}, torch {machine.get('torch')}, "
        f"python {machine.get('python')}; device {results['config']['device']}, "
        f"torch threads {results['config']['torch_threads']}",
        f"- load average (1-min) over the run: mean {whole.get('mean_1min') or 0:.2f}, "
        f"max {whole.get('max_1min') or 0:.2f} (this run itself adds about one)",
        f"- time: {timings['total_seconds']:.0f} s total; evaluation "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings["evaluation_seconds"].items())
        + (f"; oracle checks {timings['oracle_seconds']:.0f} s" if timings.get("oracle_seconds") else ""),
        "",
        "Everything above is in `results.json` (metrics, per-stage steps / epochs / CPU time / load, "
        "load samples, config, machine, training history).\n",
    ]
    return "\n".join(parts)


def _head_text(sizes: Dict[str, Any], model: str) -> str:
    """How ``model``'s ("student" / "baseline") pooling heads turn tokens into an embedding, in words."""
    layers = sizes[f"{model}_head_layers" if model == "baseline" else "student_layers"]
    layers = 1 if layers is None else layers
    pooling = sizes[f"{model}_pooling"]
    if sizes[f"{model}_project_tokens"]:
        return f"every token projected, then {pooling}-pooled ({layers} head transformer layers)"
    return f"{pooling}-pooled, then projected ({layers} head transformer layers)"


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``acceptance`` flags, each checked when parsed: a bad value is a usage error (exit code 2) naming the
    flag, not a traceback after minutes of oracle checks (``--train-images 0``) or from deep in the run."""
    from .cli import _device, _int_at_least, _seed, program

    _positive_int = _int_at_least(1)

    parser = argparse.ArgumentParser(
        prog=program("acceptance"),
        description="train teacher and global baseline for equal wall-clock time, distil the student, evaluate")
    parser.add_argument("--seconds", type=_positive_number, default=ACCEPTANCE_SIZES["seconds"],
                        help="training seconds of the teacher and of the baseline, each (default: %(default)s)")
    parser.add_argument("--student-seconds", type=_positive_number, default=ACCEPTANCE_SIZES["student_seconds"],
                        help="training seconds of the distilled student (default: %(default)s)")
    parser.add_argument("--train-images", type=_positive_int, default=ACCEPTANCE_SIZES["train_images"])
    parser.add_argument("--test-images", type=_positive_int, default=ACCEPTANCE_SIZES["test_images"])
    parser.add_argument("--baseline-loss", choices=("hinge", "infonce"), default=ACCEPTANCE_SIZES["baseline_loss"])
    parser.add_argument("--baseline-pooling", choices=("first", "mean", "max"),
                        default=ACCEPTANCE_SIZES["baseline_pooling"])
    parser.add_argument("--baseline-lr", type=_positive_number, default=None, help="default: the teacher's lr")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: 1 on <= 4 cores)")
    parser.add_argument("--device", type=_device, default="cpu")
    parser.add_argument("--out", default=DEFAULT_OUT, help="results folder (default: %(default)s)")
    parser.add_argument("--no-checks", action="store_true", help="skip the oracle data checks")
    parser.add_argument("--progress", action="store_true", help="tqdm progress bars")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = dict(seconds=args.seconds, student_seconds=args.student_seconds, train_images=args.train_images,
                     test_images=args.test_images, baseline_loss=args.baseline_loss, baseline_lr=args.baseline_lr,
                     baseline_pooling=args.baseline_pooling)
    results = run_acceptance(args.seed, out=args.out, device=args.device, threads=args.threads,
                             sizes_override=overrides, progress=args.progress, checks=not args.no_checks)
    verdict = results["verdict"]
    return 0 if verdict["teacher_clearly_beats_baseline"] and verdict["student_recovers_most"] else 1


if __name__ == "__main__":
    sys.exit(main())
