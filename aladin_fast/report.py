"""Turn a demo's ``results.json`` dict into PNG plots and a short ``report.md``.

Kept apart from the run (as benchmark scripts keep the visualiser apart):
``write_report(json.load(open("results.json")), "out/")`` redraws a report
from saved results. matplotlib runs on the Agg backend (no display needed).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

from ._io import write_text_atomic

__all__ = ["PLOTS", "share_text", "speedup_text", "write_report", "plot_recall", "plot_rerank_sweep", "plot_training"]

PLOTS = {"recall": "recall_at_k.png", "sweep": "latency_vs_rerank_k.png", "training": "training_curves.png"}
SCORER_LABELS = {"teacher": "teacher (exhaustive)", "student": "student (cosine)", "two_stage": "two-stage"}
SCORER_COLORS = {"teacher": "tab:red", "student": "tab:blue", "two_stage": "tab:green"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_recall(results: Dict[str, Any], path: str) -> None:
    """Recall@K curves (K = 1 ... 100) of the three scorers, one panel per direction."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, direction, title in zip(axes, ("i2t", "t2i"), ("image -> text", "text -> image")):
        for name, result in results["scorers"].items():
            curve = result["recall_curve"][direction]
            levels = [int(k) for k in curve]
            label = SCORER_LABELS[name] + (f" (k={result['rerank_k']})" if name == "two_stage" else "")
            style = "--" if name == "two_stage" else "-"
            axis.plot(levels, list(curve.values()), style, marker="o", label=label, color=SCORER_COLORS[name])
        axis.set_xscale("log")
        axis.set_xlabel("K")
        axis.set_title(f"{title} ({results['gallery']['images' if direction == 't2i' else 'captions']} gallery items)")
        axis.grid(True, alpha=0.3)
    axes[0].set_ylabel("recall@K (%)")
    axes[0].legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_rerank_sweep(results: Dict[str, Any], path: str) -> None:
    """Two-stage single-query latency vs rerank_k (left axis) and rsum (right axis), teacher/student as lines."""
    plt = _pyplot()
    sweep = results["rerank_sweep"]
    ks = [entry["rerank_k"] for entry in sweep]
    figure, left = plt.subplots(figsize=(7.5, 5.5))
    latency = [entry["latency"]["single_ms"] for entry in sweep]
    left.plot(ks, latency, "o-", color="tab:green", label="two-stage latency")
    scorers = results["scorers"]
    left.axhline(scorers["teacher"]["latency"]["single_ms"], color="tab:red", ls=":", label="teacher exhaustive latency")
    left.axhline(scorers["student"]["latency"]["single_ms"], color="tab:blue", ls=":", label="student kNN latency")
    if ks:  # an empty sweep (rerank_ks=()) has no positive x to log-scale: tight_layout raised
        left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("rerank_k (student shortlist reranked by the teacher)")
    left.set_ylabel("ms per text->image query")
    right = left.twinx()
    right.plot(ks, [entry["metrics"]["rsum"] for entry in sweep], "s--", color="tab:purple", label="two-stage rsum")
    right.axhline(scorers["teacher"]["metrics"]["rsum"], color="tab:purple", ls="-.", alpha=0.5, label="teacher rsum")
    right.axhline(scorers["student"]["metrics"]["rsum"], color="tab:gray", ls="-.", alpha=0.5, label="student rsum")
    right.set_ylabel("rsum (sum of R@1/5/10, both directions)")
    right.set_ylim(0, 1.08 * max([scorers["teacher"]["metrics"]["rsum"], scorers["student"]["metrics"]["rsum"],
                                   *[entry["metrics"]["rsum"] for entry in sweep], 1.0]))
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    left.set_title(f"latency vs recall ({results['gallery']['images']} images)")
    left.grid(True, alpha=0.3)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_training(history: List[Dict[str, Any]], path: str) -> None:
    """Training loss per logged step and validation rsum per evaluation, per stage."""
    plt = _pyplot()
    figure, (loss_axis, eval_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for stage, color in (("teacher", "tab:red"), ("student", "tab:blue"), ("baseline", "tab:gray")):
        train = [r for r in history if r["kind"] == "train" and r["stage"] == stage]
        evals = [r for r in history if r["kind"] == "eval" and r["stage"] == stage]
        if train:
            loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], color=color, label=f"{stage} loss")
        if evals:
            eval_axis.plot([r["step"] for r in evals], [r["rsum"] for r in evals], "o-", color=color,
                           label=f"{stage} rsum (val)")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("training loss (hinge; + ListNet for the student)")
    eval_axis.set_xlabel("step")
    eval_axis.set_ylabel("validation rsum (subset)")
    for axis in (loss_axis, eval_axis):
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def speedup_text(speedup: float) -> str:
    """``"4.7x faster"`` for a speed-up (time of the baseline / time of ours) >= 1, else ``"52.0x slower"``.

    Written as ``f"{speedup:.1f}x faster"`` alone, a two-stage retriever 50 times slower than the teacher (tiny
    galleries) read "0.0x faster".
    """
    speedup = float(speedup)
    if 0 < speedup < 1:
        return f"{1 / speedup:.1f}x slower"
    return f"{speedup:.1f}x faster"


def share_text(fraction) -> str:
    """A share of the teacher's rsum in percent, ``"n/a"`` where undefined (a teacher rsum of 0: the sweep's
    ``rsum_fraction_of_teacher`` is None, which was printed as "0%")."""
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def _markdown(results: Dict[str, Any]) -> str:
    scorers, gallery, machine = results["scorers"], results["gallery"], results["machine"]
    sizes = results["config"]["sizes"]
    two = scorers["two_stage"]
    teacher_rsum = scorers["teacher"]["metrics"]["rsum"]
    lines = [
        f"# aladin-fast demo report ({results['mode']})",
        "",
        f"Reproduce: `{results['command']}`. A real run: both models were trained for this report on "
        f"SyntheticScenes ({sizes['train_images']} training scenes) and evaluated on {gallery['images']} unseen "
        f"test images / {gallery['captions']} captions with the standard protocol (5 captions per image; "
        f"R@K in percent, ranks 1-based, rsum = sum of the six recalls).",
        "",
        "| scorer | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | t2i medr | ms / query |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in scorers.items():
        m = result["metrics"]
        label = SCORER_LABELS[name] + (f" (rerank_k={result['rerank_k']})" if name == "two_stage" else "")
        lines.append(f"| {label} | {m['i2t_r1']:.1f} | {m['i2t_r5']:.1f} | {m['i2t_r10']:.1f} | {m['t2i_r1']:.1f} | "
                     f"{m['t2i_r5']:.1f} | {m['t2i_r10']:.1f} | {m['rsum']:.1f} | {m['t2i_medr']:.0f} | "
                     f"{result['latency']['single_ms']:.3f} |")
    chance = results["chance"]
    lines += [
        f"| chance | {chance['i2t_r1']:.1f} | {chance['i2t_r5']:.1f} | {chance['i2t_r10']:.1f} | {chance['t2i_r1']:.1f} | "
        f"{chance['t2i_r5']:.1f} | {chance['t2i_r10']:.1f} | {chance['rsum']:.1f} | | |",
        "",
        f"**Two-stage** (student kNN over a faiss index, fused teacher rerank of the top {two['rerank_k']}) keeps "
        f"{share_text(two['metrics']['rsum'] / teacher_rsum if teacher_rsum else None)} of the exhaustive "
        f"teacher's rsum and is **{speedup_text(results['speedup_two_stage_vs_teacher'])} per query** "
        f"({two['latency']['single_ms']:.3f} ms vs {scorers['teacher']['latency']['single_ms']:.3f} ms, median of single "
        f"text->image queries; batched: {speedup_text(results['speedup_two_stage_vs_teacher_batched'])}).",
        "",
        "Latency notes: queries are pre-encoded (encoding one caption with both models costs "
        f"{results['encode_query_ms']['single_ms']:.3f} ms and is paid by every scorer); the exhaustive teacher scores "
        "gallery tokens already in memory, the two-stage retriever reads its candidates from the feature store, so the "
        "speed-up is conservative and grows with the gallery (the teacher is linear in it, the rerank is not). "
        "Ranks past rerank_k (medr, meanr) of the two-stage retriever are the student's.",
        "",
        "## rerank_k sweep",
        "",
        "| rerank_k | ms / query | rsum | % of teacher rsum | t2i R@1 | i2t R@1 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["rerank_sweep"]:
        m = entry["metrics"]
        lines.append(f"| {entry['rerank_k']} | {entry['latency']['single_ms']:.3f} | {m['rsum']:.1f} | "
                     f"{share_text(entry['rsum_fraction_of_teacher'])} | {m['t2i_r1']:.1f} | {m['i2t_r1']:.1f} |")
    timings = results["timings"]
    lines += [
        "",
        "## Plots",
        "",
        f"![recall@K]({PLOTS['recall']})",
        "",
        f"![latency vs rerank_k]({PLOTS['sweep']})",
        "",
        f"![training curves]({PLOTS['training']})",
        "",
        "## Run",
        "",
        f"- time: {timings['total_seconds']:.0f} s total; teacher training {timings.get('train_teacher_seconds', 0):.0f} s, "
        f"student {timings.get('train_student_seconds', 0):.0f} s, teacher full_scores "
        f"{scorers['teacher']['latency']['full_scores_seconds']:.1f} s",
        f"- device: {results['config']['device']}, torch threads {results['config']['torch_threads']}",
        f"- machine: {machine.get('platform')}; CUDA: {machine.get('cuda')}; CPU kernel: {str(machine.get('backend.cpu')).split(';')[0]}",
        f"- versions: aladin_fast {machine.get('aladin_fast')}, torch {machine.get('torch')}, "
        f"python {machine.get('python')}, faiss {machine.get('faiss')}",
        f"- models: teacher D={sizes['teacher_dim']} ({sizes['teacher_epochs']} epochs), student D={sizes['student_dim']} "
        f"({sizes['student_epochs']} epochs); checkpoint `{results['checkpoint']}`",
        "",
        "Everything above is in `results.json` (metrics, latencies, config, machine, training history).",
        "",
    ]
    return "\n".join(lines)


def write_report(results: Dict[str, Any], out: str) -> Dict[str, str]:
    """Write the three plots and ``report.md`` into ``out``; returns ``{name: path}``."""
    os.makedirs(out, exist_ok=True)
    paths = {name: os.path.join(out, file) for name, file in PLOTS.items()}
    plot_recall(results, paths["recall"])
    plot_rerank_sweep(results, paths["sweep"])
    plot_training(results.get("history", []), paths["training"])
    paths["report"] = os.path.join(out, "report.md")
    write_text_atomic(paths["report"], _markdown(results))
    return paths
