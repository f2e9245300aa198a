"""The end-to-end demo at tiny sizes: results.json, plots, metric consistency, and the evaluate command."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("matplotlib")

from aladin_fast.data import SyntheticScenes, save_precomp  # noqa: E402
from aladin_fast.demo import run_demo  # noqa: E402
from aladin_fast.eval import METRIC_NAMES  # noqa: E402
from aladin_fast.evaluate import evaluate_main  # noqa: E402
from aladin_fast.report import PLOTS  # noqa: E402

TEST_IMAGES = 16
TINY = dict(
    train_images=48, test_images=TEST_IMAGES, feature_dim=32, regions=20, teacher_dim=16, teacher_heads=2,
    teacher_ff_dim=32, student_dim=16, student_heads=2, batch_size=16, teacher_epochs=2, student_epochs=2,
    warmup_steps=2, eval_every=1, eval_max_images=8, latency_queries=5,
    rerank_ks=(2, 5, 10_000),  # 10_000 >= every gallery: the full shortlist
    rerank_k=5,
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(quick=True, seed=0, out=str(out), sizes_override=TINY, progress=False)
    with open(out / "results.json", encoding="utf-8") as handle:
        return out, json.load(handle)


def test_results_hold_all_three_scorers(demo):
    out, results = demo
    assert set(results["scorers"]) == {"teacher", "student", "two_stage"}
    for result in results["scorers"].values():
        assert set(METRIC_NAMES) <= set(result["metrics"])
        assert result["latency"]["single_ms"] > 0
        assert all(0 <= value <= 100 for value in result["recall_curve"]["t2i"].values())
    assert results["scorers"]["two_stage"]["rerank_k"] == 5
    assert [entry["rerank_k"] for entry in results["rerank_sweep"]] == [2, 5, 10_000]
    assert results["speedup_two_stage_vs_teacher"] > 0
    assert results["gallery"] == {"images": TEST_IMAGES, "captions": 5 * TEST_IMAGES}
    assert {"torch", "platform", "aladin_fast"} <= set(results["machine"])
    assert results["config"]["sizes"]["train_images"] == 48
    kinds = {(record["kind"], record["stage"]) for record in results["history"]}
    assert {("train", "teacher"), ("eval", "teacher"), ("train", "student"), ("eval", "student")} <= kinds


def test_plots_and_report_written(demo):
    out, _ = demo
    for file in PLOTS.values():
        data = (out / file).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, file
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "two-stage" in report and all(file in report for file in PLOTS.values())


def test_metrics_are_consistent(demo):
    _, results = demo
    scorers, sweep = results["scorers"], results["rerank_sweep"]
    teacher = scorers["teacher"]["metrics"]
    full = sweep[-1]
    assert full["shortlist_t2i"] == TEST_IMAGES and full["shortlist_i2t"] == 5 * TEST_IMAGES
    # the whole gallery reranked = the exhaustive teacher ranking (same op, same tokens)
    for name in METRIC_NAMES:
        assert full["metrics"][name] == pytest.approx(teacher[name]), name
    assert full["rsum_fraction_of_teacher"] == pytest.approx(1.0)
    # the headline entry is the sweep's rerank_k = 5 entry
    assert scorers["two_stage"]["metrics"] == sweep[1]["metrics"]
    for result in [*scorers.values(), *sweep]:
        m = result["metrics"]
        assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
        for d in ("i2t", "t2i"):
            assert m[f"{d}_r1"] <= m[f"{d}_r5"] <= m[f"{d}_r10"]
            assert m[f"{d}_r1"] == pytest.approx(result["recall_curve"][d]["1"])
    # ranks within the shortlist are the teacher's, ranks beyond it the student's: R@1 of a
    # shortlist of 2 can only be a hit the student put in its top 2
    student = scorers["student"]["recall_curve"]["t2i"]
    assert sweep[0]["metrics"]["t2i_r1"] <= student["2"] + 1e-9


def test_evaluate_command_on_precomp_data(demo, tmp_path, capsys):
    out, results = demo
    scenes = SyntheticScenes(12, seed=7, regions=20, feature_dim=32)
    save_precomp(tmp_path / "data", "test", scenes.image_features.astype(np.float32), scenes.captions)
    target = tmp_path / "eval.json"
    code = evaluate_main(["--checkpoint", results["checkpoint"], "--data", str(tmp_path / "data"), "--split", "test",
                          "--rerank-k", "3,100", "--latency-queries", "4", "--out", str(target)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(target.read_text(encoding="utf-8"))
    assert printed["scorers"].keys() == saved["scorers"].keys() == {"teacher", "student", "two_stage"}
    assert saved["gallery"] == {"images": 12, "captions": 60}
    assert saved["scorers"]["two_stage"]["rerank_k"] == 100  # the first value >= 20
    for name in METRIC_NAMES:  # 100 >= both galleries: the teacher's ranking
        assert saved["scorers"]["two_stage"]["metrics"][name] == pytest.approx(saved["scorers"]["teacher"]["metrics"][name])
    assert os.path.isfile(results["checkpoint"])


def test_evaluate_command_rejects_mismatched_features(demo, tmp_path):
    _, results = demo
    scenes = SyntheticScenes(4, seed=3, regions=20, feature_dim=8)
    save_precomp(tmp_path / "data", "test", scenes.image_features.astype(np.float32), scenes.captions)
    with pytest.raises(ValueError, match="feature_dim=32"):
        evaluate_main(["--checkpoint", results["checkpoint"], "--data", str(tmp_path / "data")])
