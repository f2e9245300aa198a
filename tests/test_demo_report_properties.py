"""The user-facing commands end to end: the demo's report against its results.json, re-runs and interrupted
runs into the same folder, reproducibility, ``info``'s truthfulness, and command-line usage errors.

Three tiny demo runs (the sizes of tests/test_demo.py) are shared through module-scoped fixtures.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil

import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("matplotlib")

from aladin_fast import cli as top_cli  # noqa: E402
from aladin_fast.demo import run_demo  # noqa: E402
from aladin_fast.report import PLOTS, _markdown  # noqa: E402

from test_demo import TINY  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OUTPUTS = ["results.json", "report.md", *PLOTS.values()]


def _demo(out, seed=0):
    with contextlib.redirect_stdout(io.StringIO()):
        return run_demo(quick=True, seed=seed, out=str(out), sizes_override=TINY, progress=False)


def _stale_larger_run(out):
    """The files a previous, larger demo run left in ``out``."""
    (out / "training").mkdir(parents=True, exist_ok=True)
    stale = {"kind": "train", "stage": "teacher", "epoch": 99, "step": 9999, "loss": 1.0, "stale": True}
    (out / "training" / "metrics.jsonl").write_text(json.dumps(stale) + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({"stale": True, "gallery": {"images": 2000}}), encoding="utf-8")
    (out / "report.md").write_text("# stale report of 2000 images\n", encoding="utf-8")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run (seed 0) into a folder holding a previous larger run's files."""
    out = tmp_path_factory.mktemp("demo")
    _stale_larger_run(out)
    results = _demo(out)
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return out, results, saved


def _metrics(results):
    return ({name: scorer["metrics"] for name, scorer in results["scorers"].items()},
            [(entry["rerank_k"], entry["metrics"]) for entry in results["rerank_sweep"]],
            results["kernel_check"]["max_abs_error"])


def _cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _row(report, label):
    rows = [line for line in report.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, (label, rows)
    return _cells(rows[0])[1:]


def _close(text, value, decimals):
    """``text`` is ``value`` printed with ``decimals`` (half a unit of the last digit, plus float slack)."""
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-9


# ------------------------------------------------------------------ report.md == results.json
def test_report_numbers_equal_results_json(demo):
    out, results, saved = demo
    report = (out / "report.md").read_text(encoding="utf-8")
    assert saved["kind"] == "aladin_fast.demo" and "stale" not in saved
    assert _metrics(saved) == _metrics(json.loads(json.dumps(results, default=float)))
    scorers = saved["scorers"]
    labels = {"teacher": "teacher (exhaustive)", "student": "student (cosine)",
              "two_stage": f"two-stage (rerank_k={scorers['two_stage']['rerank_k']})"}
    columns = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "t2i_medr"]
    header = next(line for line in report.splitlines() if line.startswith("| scorer |"))
    table = [line for line in report.split(header)[1].splitlines()[2:] if line.startswith("|")][:4]
    assert [_cells(line)[0] for line in table] == [*labels.values(), "chance"]  # the rows, in order
    for name, label in labels.items():
        cells, metrics = _row(report, label), scorers[name]["metrics"]
        for cell, column in zip(cells, columns):
            assert _close(cell, metrics[column], 0 if column.endswith("medr") else 1), (name, column, cell)
        assert _close(cells[-1], scorers[name]["latency"]["single_ms"], 3)
        # recomputed: rsum is the sum of the six recalls, R@K non-decreasing and equal to the curve
        assert metrics["rsum"] == pytest.approx(sum(metrics[c] for c in columns[:6]))
    chance = _row(report, "chance")
    for cell, column in zip(chance, columns[:7]):
        assert _close(cell, saved["chance"][column], 1)
    # the sweep table: one row per entry, in order; the percentage recomputed from the raw rsums
    teacher_rsum = scorers["teacher"]["metrics"]["rsum"]
    sweep_lines = report.split("## rerank_k sweep")[1].split("## Plots")[0].strip().splitlines()[2:]
    assert len(sweep_lines) == len(saved["rerank_sweep"])
    for line, entry in zip(sweep_lines, saved["rerank_sweep"]):
        k, ms, rsum, percent, t2i_r1, i2t_r1 = _cells(line)
        assert int(k) == entry["rerank_k"]
        assert _close(ms, entry["latency"]["single_ms"], 3) and _close(rsum, entry["metrics"]["rsum"], 1)
        assert entry["rsum_fraction_of_teacher"] == pytest.approx(entry["metrics"]["rsum"] / teacher_rsum)
        assert _close(percent.rstrip("%"), 100 * entry["metrics"]["rsum"] / teacher_rsum, 0)
        assert _close(t2i_r1, entry["metrics"]["t2i_r1"], 1) and _close(i2t_r1, entry["metrics"]["i2t_r1"], 1)
    # the headline sentence: share of the teacher's rsum and the speed-ups, recomputed from the raw latencies
    two = scorers["two_stage"]
    speedup = scorers["teacher"]["latency"]["single_ms"] / two["latency"]["single_ms"]
    batched = scorers["teacher"]["latency"]["batched_ms"] / two["latency"]["batched_ms"]
    assert saved["speedup_two_stage_vs_teacher"] == pytest.approx(speedup)
    assert saved["speedup_two_stage_vs_teacher_batched"] == pytest.approx(batched)
    headline = re.search(r"keeps (\d+)% of the exhaustive teacher's rsum and is \*\*([\d.]+)x (faster|slower) per "
                         r"query\*\* \(([\d.]+) ms vs ([\d.]+) ms, .*?batched: ([\d.]+)x (faster|slower)\)",
                         " ".join(report.split()))
    assert headline, report
    share, value, word, ms_two, ms_teacher, batched_value, batched_word = headline.groups()
    assert _close(share, 100 * two["metrics"]["rsum"] / teacher_rsum, 0)
    for text, direction, ratio in ((value, word, speedup), (batched_value, batched_word, batched)):
        assert direction == ("faster" if ratio >= 1 else "slower")
        assert _close(text, ratio if ratio >= 1 else 1 / ratio, 1)
    assert _close(ms_two, two["latency"]["single_ms"], 3)
    assert _close(ms_teacher, scorers["teacher"]["latency"]["single_ms"], 3)
    encode = re.search(r"costs ([\d.]+) ms", report)
    assert encode and _close(encode.group(1), saved["encode_query_ms"]["single_ms"], 3)
    sizes = saved["config"]["sizes"]
    assert f"({sizes['train_images']} training scenes)" in report
    assert f"{saved['gallery']['images']} unseen test images / {saved['gallery']['captions']} captions" in report
    assert f"teacher D={sizes['teacher_dim']} ({sizes['teacher_epochs']} epochs)" in report
    assert f"checkpoint `{saved['checkpoint']}`" in report
    assert f"device: {saved['config']['device']}, torch threads {saved['config']['torch_threads']}" in report


def test_plots_are_valid_pngs(demo):
    out, _, _ = demo
    for file in PLOTS.values():
        data = (out / file).read_bytes()
        assert data.startswith(PNG_MAGIC) and data[12:16] == b"IHDR" and data.rstrip().endswith(b"IEND\xaeB`\x82")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 300 and height >= 300, (file, width, height)


def test_regression_speedup_below_one_is_written_as_slower(demo):
    """Was: a two-stage retriever 50x slower than the teacher (a tiny gallery) was reported as "**0.0x faster per
    query**" (the ratio printed with one decimal, and always called faster)."""
    _, results, _ = demo
    results = json.loads(json.dumps(results, default=float))
    results.update(speedup_two_stage_vs_teacher=0.02, speedup_two_stage_vs_teacher_batched=4.0)
    text = " ".join(_markdown(results).split())
    assert "**50.0x slower per query**" in text and "batched: 4.0x faster" in text
    assert not re.search(r"(?<![\d.])0\.0x", text)


# ------------------------------------------------------------------ re-runs, interruptions, reproducibility
def test_regression_rerun_into_the_same_folder_keeps_no_stale_records(demo):
    """Was: the trainer appends to training/metrics.jsonl, so a demo re-run into a folder holding a previous
    (larger) run mixed that run's records into this one's training log."""
    out, results, _ = demo
    lines = (out / "training" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert not any(record.get("stale") for record in records)
    assert records == json.loads(json.dumps(results["history"], default=float))


@pytest.fixture(scope="module")
def second_run(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("again")
    return out, _demo(out, seed=0)


def test_same_seed_same_metrics(demo, second_run):
    _, first, _ = demo
    _, second = second_run
    assert _metrics(first) == _metrics(second)  # bitwise: one thread, same data, same seeds
    untimed = [{k: v for k, v in r.items() if "seconds" not in k and not k.startswith("wall_")}
               for r in first["history"]]
    assert untimed == [{k: v for k, v in r.items() if "seconds" not in k and not k.startswith("wall_")}
                       for r in second["history"]]


def test_regression_interrupted_run_leaves_no_previous_report(demo, tmp_path, monkeypatch):
    """Was: a run failing after results.json (here: in the report step) left the previous run's report.md and
    plots beside the new results.json -- a complete-looking report of another run (another seed)."""
    out, first, _ = demo
    for name in OUTPUTS:
        shutil.copy(out / name, tmp_path / name)

    def broken(results, folder):
        raise RuntimeError("simulated failure in the report step")

    monkeypatch.setattr("aladin_fast.report.write_report", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        _demo(tmp_path, seed=1)
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))  # complete, strict JSON
    assert saved["config"]["seed"] == 1
    assert _metrics(saved) != _metrics(json.loads(json.dumps(first, default=float)))  # another seed differs
    left = sorted(name for name in OUTPUTS if (tmp_path / name).exists())
    assert left == ["results.json"], left
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


# ------------------------------------------------------------------ info
def _cpu_call_works():
    words, regions = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
    from aladin_fast import alignment_scores

    try:
        alignment_scores(words, regions, torch.tensor([3, 2]), torch.tensor([5, 4, 3, 2]), backend="cpu")
    except (ValueError, RuntimeError):
        return False
    return True


@pytest.mark.parametrize("isa, layout", [(None, None), ("scalar", None), ("SCALAR", None), ("auto", None),
                                         ("bogus", None), ("avx512", None), (None, "dot"), (None, "sideways")])
def test_regression_info_reports_the_cpu_kernel_that_runs(isa, layout, monkeypatch):
    """Was: ``info`` printed "built: ISA <best>" whatever ALADIN_FAST_ISA / ALADIN_FAST_CPU_LAYOUT said: the
    scalar code ran under a claimed avx2, or every backend='cpu' call failed while info said built."""
    from aladin_fast.info import info
    from aladin_fast.ops.backends import _cpu_extension

    module = _cpu_extension()[0]
    if module is None:
        pytest.skip("C++ extension not built")
    for name, value in (("ALADIN_FAST_ISA", isa), ("ALADIN_FAST_CPU_LAYOUT", layout)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    status = info(file=io.StringIO())["backend.cpu"]
    works = _cpu_call_works()
    assert status.startswith("built:") == works, (status, works)
    if works:
        expected = module.best_isa() if isa in (None, "auto") else isa.lower()
        assert status.startswith(f"built: ISA {expected}"), status
    else:
        assert "ALADIN_FAST_ISA" in status or "ALADIN_FAST_CPU_LAYOUT" in status, status


# ------------------------------------------------------------------ command line
def _cli(argv, capsys):
    try:
        code = top_cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refuse(**kwargs):
    raise AssertionError(f"a bad command line started the run: {kwargs}")


@pytest.mark.parametrize("flags, option", [
    (["--seed", "-1"], "--seed"), (["--threads", "-2"], "--threads"), (["--threads", "0"], "--threads"),
    (["--device", "bogus"], "--device"), (["--seconds", "-1"], "--seconds"), (["--seconds", "nan"], "--seconds"),
    (["--student-seconds", "0"], "--student-seconds"), (["--train-images", "0"], "--train-images"),
    (["--test-images", "-3"], "--test-images"), (["--baseline-lr", "-1"], "--baseline-lr"),
])
def test_regression_acceptance_bad_arguments_exit_2(flags, option, capsys, monkeypatch):
    """Was: each a traceback (from numpy, torch.set_num_threads, torch.device, TrainConfig), ``--threads 0``
    silently ignored, and ``--train-images 0`` only after minutes of oracle checks."""
    monkeypatch.setattr("aladin_fast.acceptance.run_acceptance",
                        lambda *args, **kwargs: _refuse(args=args, **kwargs))
    code, _, err = _cli(["acceptance", *flags], capsys)
    assert code == 2 and f"argument {option}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("flags, option", [
    (["--rerank-k", "0"], "--rerank-k"), (["--max-images", "0"], "--max-images"),
    (["--latency-queries", "-1"], "--latency-queries"), (["--device", "bogus"], "--device"),
    (["--device", "meta"], "--device"), (["--out", "."], "--out"), ([], "checkpoint not found"),
])
def test_regression_evaluate_bad_arguments_exit_2(flags, option, tmp_path, capsys):
    """Was: ValueError / RuntimeError / FileNotFoundError tracebacks from ``python -m aladin_fast evaluate``."""
    argv = ["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path), *flags]
    code, _, err = _cli(argv, capsys)
    assert code == 2 and option in err and "usage" in err, err


@pytest.mark.parametrize("flags, message", [
    (["--out", "{file}"], "--out"), (["--out", "{file}/below"], "--out"), (["--device", "meta"], "--device"),
])
def test_regression_demo_bad_out_or_device_exit_2(flags, message, tmp_path, capsys, monkeypatch):
    """Was: an OSError traceback (a file as --out, a folder below a file); ``--device meta`` started the demo."""
    monkeypatch.setattr("aladin_fast.demo.run_demo", _refuse)
    (tmp_path / "file").write_text("x", encoding="utf-8")
    flags = [flag.format(file=tmp_path / "file") for flag in flags]
    code, _, err = _cli(["demo", "--quick", *flags], capsys)
    assert code == 2 and f"argument {message}" in err and "Traceback" not in err, err


def test_demo_out_folder_created_and_passed_on(tmp_path, capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr("aladin_fast.demo.run_demo", lambda **kwargs: seen.update(kwargs))
    target = tmp_path / "a" / "b"
    code, _, _ = _cli(["demo", "--quick", "--seed", "3", "--out", str(target), "--device", "cpu"], capsys)
    assert code == 0 and seen == dict(quick=True, seed=3, out=str(target), device="cpu")
    assert target.is_dir() and os.listdir(target) == []  # the write probe leaves nothing


@pytest.mark.parametrize("command", ["info", "demo", "evaluate", "train", "acceptance", "index", "search", "serve"])
def test_every_subcommand_has_help(command, capsys):
    code, out, err = _cli([command, "--help"], capsys)
    assert code == 0 and "usage" in out.lower() and "--help" in out and not err, (command, err)


def test_info_command_values_are_true(capsys):
    code, out, _ = _cli(["info"], capsys)
    assert code == 0
    printed = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in out.splitlines() if line.strip())
    assert printed["torch"] == torch.__version__ and printed["torch_threads"] == str(torch.get_num_threads())
    assert (printed["cuda"] == "not available") == (not torch.cuda.is_available())
    assert printed["backend.cpu"].startswith("built:") == _cpu_call_works()


def test_regression_acceptance_report_failure_leaves_no_previous_report(tmp_path, monkeypatch):
    """Was: results.json was replaced by this run's, then the report step failed and the previous run's report.md
    stayed beside it (another run's table and verdict, looking complete). A failing results.json write still
    keeps the previous pair (tests/test_evaluate_properties.py)."""
    from aladin_fast.acceptance import run_acceptance

    sizes = dict(train_images=16, test_images=8, feature_dim=32, regions=20, teacher_dim=8, teacher_heads=2,
                 teacher_ff_dim=16, student_dim=8, student_heads=2, batch_size=8, warmup_steps=1,
                 seconds=0.05, student_seconds=0.05)
    (tmp_path / "results.json").write_text('{"previous": true}\n', encoding="utf-8")
    (tmp_path / "report.md").write_text("# Training acceptance (previous run)\n", encoding="utf-8")

    def broken(results):
        raise RuntimeError("simulated failure in the report step")

    monkeypatch.setattr("aladin_fast.acceptance.report_markdown", broken)
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(RuntimeError, match="simulated failure"):
        run_acceptance(out=str(tmp_path), sizes_override=sizes, checks=False)
    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert "previous" not in saved and set(saved["metrics"]) == {"teacher", "baseline", "student"}
    assert not (tmp_path / "report.md").exists()


def test_regression_undefined_share_of_the_teacher_is_not_zero_percent(demo):
    """Was: with a teacher rsum of 0 the sweep's ``rsum_fraction_of_teacher`` is None (undefined) and the report
    printed it as "0%", and the headline divided by max(0, 1e-9): "keeps 1000000000000%" of the teacher's rsum."""
    _, results, _ = demo
    results = json.loads(json.dumps(results, default=float))
    results["scorers"]["teacher"]["metrics"]["rsum"] = 0.0
    results["scorers"]["two_stage"]["metrics"]["rsum"] = 12.5
    for entry in results["rerank_sweep"]:
        entry["rsum_fraction_of_teacher"] = None
    text = _markdown(results)
    assert "keeps n/a of the exhaustive teacher's rsum" in " ".join(text.split())
    sweep_lines = text.split("## rerank_k sweep")[1].split("## Plots")[0].strip().splitlines()[2:]
    assert len(sweep_lines) == len(results["rerank_sweep"])
    assert all(_cells(line)[3] == "n/a" for line in sweep_lines), sweep_lines
