"""Trainer: config, checkpoints and resume, DDP on CPU (gloo, 2 processes), and learning on SyntheticScenes."""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aladin_fast.data import SyntheticScenes, Vocabulary
from aladin_fast.training import FORMAT_VERSION, Trainer, TrainConfig, load_checkpoint, load_models, save_checkpoint
from aladin_fast.training import trainer as trainer_module
from aladin_fast.training.command import main as command_main

TINY = dict(teacher_dim=16, teacher_layers=1, teacher_heads=2, teacher_ff_dim=32, student_dim=8, student_heads=2,
            batch_size=8, teacher_epochs=2, student_epochs=1, dropout=0.0, warmup_steps=2, progress=False,
            lr=1e-3, num_prototypes=8, context_top_k=4)


def tiny_scenes(count=24, seed=0):
    return SyntheticScenes(count, seed=seed, regions=20, feature_dim=32)


def parameters(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_same_parameters(a, b, atol=0.0, skip_key_bias=False):
    assert a.keys() == b.keys()
    for name in a:
        left, right = a[name], b[name]
        if skip_key_bias and name.endswith("self_attn.in_proj_bias"):
            # the attention key bias has an exactly-zero gradient (softmax is shift invariant), so Adam
            # turns rounding noise into full-size steps of arbitrary sign: compare the query/value parts only
            width = left.numel() // 3
            left, right = torch.cat([left[:width], left[2 * width:]]), torch.cat([right[:width], right[2 * width:]])
        assert torch.allclose(left, right, atol=atol, rtol=0), f"{name}: max difference {(left - right).abs().max()}"


# ------------------------------------------------------------------- config
def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    with pytest.raises(ValueError, match="stages"):
        TrainConfig(stages=("teacher", "teacher")).validate()
    with pytest.raises(ValueError, match="teacher_heads"):
        TrainConfig(teacher_dim=10, teacher_heads=4).validate()
    with pytest.raises(ValueError, match="concept_weight"):
        TrainConfig(concept_weight=1.0).validate()  # frozen shared backbone: nothing to align
    with pytest.raises(ValueError, match=r"unknown TrainConfig field\(s\) \['epochs'\]"):
        TrainConfig.from_dict({"epochs": 3})
    with pytest.raises(ValueError, match="data_root"):
        TrainConfig(data="precomp").validate()


def test_config_files_and_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nteacher_dim = 64\nteacher_heads = 4\nstages = ["teacher"]\nfreeze_teacher = false\n')
    config = TrainConfig.from_file(str(toml), {"lr": 1e-3})
    assert (config.teacher_dim, config.stages, config.freeze_teacher, config.lr) == (64, ("teacher",), False, 1e-3)
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps(config.to_dict()))
    assert TrainConfig.from_file(str(as_json)) == config
    with pytest.raises(ValueError, match="must end in"):
        TrainConfig.from_file(__file__)


# ----------------------------------------------------------- checkpointing
def test_checkpoint_atomic_and_versioned(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"config": {"a": 1}, "history": []})
    assert load_checkpoint(path)["version"] == FORMAT_VERSION

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"config": {"a": 2}})
    monkeypatch.undo()
    assert load_checkpoint(path)["config"] == {"a": 1}  # the old checkpoint survives a failed write
    assert os.listdir(tmp_path) == ["c.pt"]  # no temporary file left behind
    payload = torch.load(path, weights_only=True)
    payload["version"] = FORMAT_VERSION + 1
    torch.save(payload, path)
    with pytest.raises(ValueError, match="format version"):
        load_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))


def test_resume_is_deterministic(tmp_path):
    config = TrainConfig(**TINY, one_caption_per_image=True, student_backbone="separate", concept_weight=0.1,
                         context_weight=0.5)
    train, val = tiny_scenes(), tiny_scenes(8, seed=1)
    straight = Trainer(config, train, val)
    straight.fit()
    interrupted = Trainer(config.replace(output_dir=str(tmp_path)), train, val)
    interrupted.fit(max_epochs=1)  # stop inside the teacher stage
    path = str(tmp_path / "checkpoint.pt")
    assert load_checkpoint(path)["progress"]["epoch"] == 1
    resumed = Trainer(config.replace(output_dir=str(tmp_path)), train, val).resume(path)
    resumed.fit()
    assert_same_parameters(parameters(straight.teacher), parameters(resumed.teacher))
    assert_same_parameters(parameters(straight.student), parameters(resumed.student))
    clocks = ("seconds", "cpu_seconds", "wall_start", "wall_end")
    strip = lambda history: [{k: v for k, v in r.items() if k not in clocks} for r in history]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    kinds = {(r["kind"], r["stage"]) for r in straight.history}
    assert kinds == {(kind, stage) for kind in ("train", "eval", "stage") for stage in ("teacher", "student")}
    teacher_stage = [r for r in resumed.history if r["kind"] == "stage"][0]
    assert (teacher_stage["epochs"], teacher_stage["steps"]) == (2, 6)  # stage totals across the resume
    assert {"hinge", "listnet", "concept", "context", "lr"} <= set(straight.history[-3])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["kind"] == "eval"
    teacher, student, vocabulary = load_models(path)
    assert isinstance(vocabulary, Vocabulary) and vocabulary == resumed.tokenizer
    assert_same_parameters(parameters(teacher), parameters(resumed.teacher))
    assert not teacher.training and student.backbone == "separate"


def test_plain_logs_without_tqdm(monkeypatch, caplog):
    monkeypatch.setattr(trainer_module, "tqdm", None)
    config = TrainConfig(**{**TINY, "teacher_epochs": 1, "progress": True, "log_every": 1}, stages=("teacher",))
    with caplog.at_level(logging.INFO, logger="aladin_fast.training"):
        Trainer(config, tiny_scenes(16), tiny_scenes(8, seed=1)).fit()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("teacher epoch 1 step") for m in messages)
    assert any("rsum" in m for m in messages)


def test_command_line(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        "synthetic_train_images = 16\nsynthetic_val_images = 8\nsynthetic_feature_dim = 32\n"
        "teacher_epochs = 1\nstudent_epochs = 1\n"
    )
    flags = ["--teacher-dim", "16", "--teacher-heads", "2", "--student-dim", "8", "--student-heads", "2",
             "--batch-size", "8", "--progress", "false", "--output-dir", str(tmp_path / "run")]
    assert command_main(["train", "--config", str(config), *flags]) == 0
    final = json.loads(capsys.readouterr().out)
    assert final["kind"] == "eval" and final["stage"] == "student" and "rsum" in final
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


# -------------------------------------------------------------- distributed
STEP_BATCHES = [list(range(0, 40, 5)), list(range(1, 80, 10))]  # caption indices, 8 per step (4 per rank)


def _ddp_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        config = TrainConfig(**TINY, gather_negatives=True, output_dir=os.path.join(out_dir, "fit"))
        trainer = Trainer(config, tiny_scenes(), None)
        for stage in ("teacher", "student"):
            trainer.begin_stage(stage)
            for indices in STEP_BATCHES:
                trainer.train_step(trainer.collate(indices[4 * rank:4 * (rank + 1)]))
        torch.save({"teacher": trainer.teacher.state_dict(), "student": trainer.student.state_dict()},
                   os.path.join(out_dir, f"steps{rank}.pt"))
        fitted = Trainer(config, tiny_scenes(), tiny_scenes(8, seed=1))
        fitted.fit()
        torch.save({"teacher": fitted.teacher.state_dict(), "student": fitted.student.state_dict(),
                    "history": len(fitted.history)}, os.path.join(out_dir, f"fit{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    init_file = os.path.join(tempfile.mkdtemp(), "rendezvous")
    mp.spawn(_ddp_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    steps = [torch.load(tmp_path / f"steps{r}.pt") for r in range(2)]
    for part in ("teacher", "student"):
        assert_same_parameters(steps[0][part], steps[1][part])  # DDP keeps the ranks bit-identical
    # ... and equal to one process taking the same steps on the combined 8-caption batches
    single = Trainer(TrainConfig(**TINY, gather_negatives=True), tiny_scenes(), None)
    for stage in ("teacher", "student"):
        single.begin_stage(stage)
        for indices in STEP_BATCHES:
            single.train_step(single.collate(indices))
    assert_same_parameters(steps[0]["teacher"], parameters(single.teacher), atol=2e-6, skip_key_bias=True)
    assert_same_parameters(steps[0]["student"], parameters(single.student), atol=2e-6, skip_key_bias=True)
    fits = [torch.load(tmp_path / f"fit{r}.pt") for r in range(2)]
    for part in ("teacher", "student"):
        assert_same_parameters(fits[0][part], fits[1][part])
    assert fits[0]["history"] > 0 and fits[1]["history"] == 0  # only rank 0 records
    assert (tmp_path / "fit" / "checkpoint.pt").is_file()


# ------------------------------------------------------------------ learning
def test_teacher_learns_and_student_recovers_it():
    """600 / 100 synthetic scenes, D = 128: the teacher beats chance clearly, the student keeps a good share."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy cores: one thread avoids OpenMP oversubscription stalls
    try:
        train = SyntheticScenes(600, seed=0, feature_dim=256)
        test = SyntheticScenes(100, seed=1, feature_dim=256)
        config = TrainConfig(
            teacher_dim=128, teacher_layers=1, teacher_heads=4, teacher_ff_dim=256, student_dim=128,
            student_heads=4, batch_size=64, one_caption_per_image=True, hardest_negative=False, lr=1e-3,
            warmup_steps=10, teacher_epochs=6, student_epochs=6, dropout=0.0, eval_every=6, progress=False,
        )
        started = time.perf_counter()
        trainer = Trainer(config, train, test)
        trainer.fit()
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    teacher = trainer.evaluate(model="teacher")
    student = trainer.evaluate(model="student")
    print(f"\nteacher {teacher}\nstudent {student}\n{seconds:.0f} s")
    chance_rsum = 2 * (1 + 5 + 10)  # about 32 with 100 images
    assert teacher["rsum"] > 3.5 * chance_rsum, teacher
    assert teacher["i2t_r1"] > 5 and teacher["t2i_r1"] > 4, teacher
    assert student["rsum"] > 0.4 * teacher["rsum"] and student["rsum"] > 2 * chance_rsum, (student, teacher)


# ------------------------------------------------- baseline and time budgets
@pytest.mark.parametrize("loss", ["hinge", "infonce"])
def test_baseline_stage_trains_without_teacher(loss):
    config = TrainConfig(**{**TINY, "lr": 3e-3}, stages=("baseline",), baseline_epochs=2, baseline_loss=loss)
    trainer = Trainer(config, tiny_scenes(), tiny_scenes(8, seed=1))
    teacher_before = parameters(trainer.teacher)
    baseline_before = parameters(trainer.baseline)
    trainer.fit()
    assert trainer.baseline.backbone == "separate" and trainer.baseline.token_dim == config.teacher_dim
    assert_same_parameters(parameters(trainer.teacher), teacher_before)  # the teacher takes no part
    changed = parameters(trainer.baseline)
    assert any(not torch.equal(changed[k], baseline_before[k]) for k in changed)
    losses = [r for r in trainer.history if r["kind"] == "train"]
    assert losses and all(r["stage"] == "baseline" and ("infonce" if loss == "infonce" else "hinge") in r for r in losses)
    evaluation = [r for r in trainer.history if r["kind"] == "eval"][-1]
    assert evaluation["model"] == "baseline" and evaluation["rsum"] >= 0
    assert set(trainer.evaluate(model="baseline")) >= {"i2t_r1", "t2i_r1", "rsum"}
    with pytest.raises(ValueError, match="no baseline"):
        Trainer(TrainConfig(**TINY), tiny_scenes(), tiny_scenes(8, seed=1)).evaluate(model="baseline")


def test_baseline_checkpoint_round_trip(tmp_path):
    config = TrainConfig(**TINY, stages=("teacher", "baseline"), baseline_epochs=1, output_dir=str(tmp_path))
    trainer = Trainer(config, tiny_scenes(), None)
    trainer.fit()
    payload = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert payload["baseline"]["hparams"]["backbone"] == "separate"
    restored = Trainer(config, tiny_scenes(), None).resume(str(tmp_path / "checkpoint.pt"))
    assert_same_parameters(parameters(restored.baseline), parameters(trainer.baseline))
    assert restored.progress["completed_stages"] == ["teacher", "baseline"]


def test_time_budget_stops_the_stage_and_drives_the_schedule():
    config = TrainConfig(**{**TINY, "teacher_epochs": 1, "warmup_steps": 1}, stages=("teacher",), teacher_seconds=1.0)
    trainer = Trainer(config, tiny_scenes(), None)
    started = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - started
    stage = [r for r in trainer.history if r["kind"] == "stage"]
    assert len(stage) == 1 and stage[0]["stage"] == "teacher" and stage[0]["budget_seconds"] == 1.0
    assert 1.0 <= stage[0]["seconds"] < 1.0 + 5.0 and stage[0]["seconds"] <= wall
    assert stage[0]["steps"] == trainer.progress["global_step"] > 0 and stage[0]["cpu_seconds"] > 0
    # epochs are not bounded by teacher_epochs=1 (24 captions / batch 8 = 3 steps an epoch) ...
    assert stage[0]["epochs"] >= 1
    # ... and the cosine schedule follows the clock: at the end the learning rate is near its floor
    last_lr = trainer._optimizer.param_groups[0]["lr"]
    assert last_lr < 0.2 * config.lr, last_lr
    assert trainer.progress["completed_stages"] == ["teacher"]


def test_student_on_cached_teacher_tokens_matches_the_uncached_run(monkeypatch):
    """cache_teacher_tokens: the same student as encoding the frozen teacher every step, without region features."""
    config = TrainConfig(**{**TINY, "student_epochs": 2}, stages=("teacher", "student"), one_caption_per_image=True,
                         student_pooling="max", student_project_tokens=True, student_hinge_weight=0.5,
                         distill_teacher_temperature=0.5)
    plain = Trainer(config, tiny_scenes(), None)
    plain.fit()
    cached = Trainer(config.replace(cache_teacher_tokens=True), tiny_scenes(), None)
    cached.fit(max_epochs=2)  # the teacher stage only (same random state as the plain run's)
    assert cached.progress["completed_stages"] == ["teacher"]
    fetched = []
    image_batch = cached.train_source.image_batch
    monkeypatch.setattr(cached.train_source, "image_batch", lambda indices: fetched.append(len(indices))
                        or image_batch(indices))
    cached.fit()
    # the cache encodes the training images once (in blocks); the steps themselves fetch no region features
    assert sum(fetched) == cached.train_source.num_images
    cache = cached._cache
    batch = cached.collate([0, 7, 13, 22])
    with torch.no_grad():
        image_tokens, image_lengths = cached.teacher.encode_images(batch.regions, batch.image_lengths)
        caption_tokens, caption_lengths = cached.teacher.encode_captions(batch.captions, batch.caption_lengths)
    looked_up = cache.lookup(batch.image_indices, batch.caption_indices)
    for got, want in zip(looked_up, (image_tokens, image_lengths, caption_tokens, caption_lengths)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_same_parameters(parameters(plain.teacher), parameters(cached.teacher))
    assert_same_parameters(parameters(plain.student), parameters(cached.student), atol=1e-4, skip_key_bias=True)
    stage = [r for r in cached.history if r["kind"] == "stage" and r["stage"] == "student"][0]
    assert stage["cache_seconds"] > 0 and stage["seconds"] >= stage["cache_seconds"]
    losses = [r for r in cached.history if r["kind"] == "train" and r["stage"] == "student"]
    assert losses and {"listnet", "hinge"} <= set(losses[-1])
    with pytest.raises(ValueError, match="cache_teacher_tokens"):
        TrainConfig(cache_teacher_tokens=True, student_backbone="separate").validate()
    with pytest.raises(ValueError, match="student_project_tokens"):
        TrainConfig(student_project_tokens=True).validate()  # first-token pooling has one token
    with pytest.raises(ValueError, match="distill_teacher_temperature"):
        TrainConfig(distill_teacher_temperature=0).validate()


def test_teacher_token_cache_pads_blocks_of_different_widths():
    """Precomputed features come padded per block (to its longest image): the cache pads them to one width."""
    from aladin_fast.training import PairSource, TeacherTokenCache

    scenes = tiny_scenes(6)
    trainer = Trainer(TrainConfig(**TINY, stages=("teacher",)), scenes, None)

    def ragged_batch(indices):  # pad each block only to its own longest image
        regions, lengths = scenes.region_features(indices), scenes.image_lengths[indices]
        return regions[:, : int(lengths.max())], lengths

    source = PairSource(6, scenes.captions, ragged_batch, scenes.feature_dim)
    cache = TeacherTokenCache(trainer.teacher, source, trainer.tokenizer, trainer.device, trainer._autocast,
                              image_block=4, caption_block=7)
    assert cache.image_tokens.shape[:2] == (6, int(scenes.image_lengths.max()))
    assert cache.caption_tokens.shape[0] == 30 and cache.nbytes > 0
    images = torch.tensor([5, 0, 2])
    tokens, lengths, _, _ = cache.lookup(images, images * 5)
    regions, region_lengths = source.image_batch(images.tolist())
    with torch.no_grad():
        expected, _ = trainer.teacher.eval().encode_images(regions, region_lengths)
    valid = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    assert torch.equal(lengths, region_lengths) and tokens[~valid].abs().max() == 0
    torch.testing.assert_close(tokens[:, : expected.shape[1]][valid[:, : expected.shape[1]]],
                               expected[valid[:, : expected.shape[1]]], atol=1e-5, rtol=1e-5)


def test_budget_fields_are_validated():
    with pytest.raises(ValueError, match="teacher_seconds"):
        TrainConfig(teacher_seconds=0).validate()
    with pytest.raises(ValueError, match="baseline_loss"):
        TrainConfig(baseline_loss="triplet").validate()
    with pytest.raises(ValueError, match="stages"):
        TrainConfig(stages=("teacher", "extra")).validate()


def test_acceptance_tiny(tmp_path):
    from aladin_fast.acceptance import main as acceptance_main
    from aladin_fast.acceptance import run_acceptance

    sizes = dict(train_images=24, test_images=12, feature_dim=32, regions=20, teacher_dim=16, teacher_heads=2,
                 teacher_ff_dim=32, student_dim=8, student_heads=2, batch_size=8, warmup_steps=1,
                 seconds=0.5, student_seconds=0.5)
    results = run_acceptance(out=str(tmp_path), sizes_override=sizes)
    assert set(results["metrics"]) == {"teacher", "baseline", "student"}
    for stage in ("teacher", "baseline", "student"):
        record = results["stages"][stage]
        assert record["seconds"] >= 0.5 and record["steps"] > 0 and "mean_1min" in record["load"]
    assert set(results["oracles"]) == {"oracle words MrSw (bag of words)", "oracle phrases MrSw (binding)",
                                       "oracle global mean-pooled cosine", "oracle global max-pooled cosine"}
    assert isinstance(results["verdict"]["teacher_clearly_beats_baseline"], bool)
    assert results["machine"]["torch"] == torch.__version__
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["metrics"]["teacher"]["rsum"] == pytest.approx(results["metrics"]["teacher"]["rsum"])
    report = (tmp_path / "report.md").read_text()
    assert "global-embedding baseline" in report and "Verdict" in report and "load average" in report
    code = acceptance_main(["--seconds", "0.3", "--student-seconds", "0.3", "--train-images", "24", "--test-images", "8",
                            "--no-checks", "--out", str(tmp_path / "cli")])
    assert code in (0, 1) and (tmp_path / "cli" / "results.json").is_file()


def test_non_finite_loss_stops_before_the_update():
    """A NaN in a batch raises FloatingPointError naming the terms, before backward / step: the weights, the
    optimiser state and the step count stay as they were."""
    import dataclasses

    trainer = Trainer(TrainConfig(**TINY), tiny_scenes(), None)
    trainer.begin_stage("teacher")
    good = trainer.collate([0, 5, 10, 15])  # captions of four images: each pair has negatives
    assert len(set(good.image_indices.tolist())) == 4
    trainer.train_step(good)
    before = {name: value.clone() for name, value in parameters(trainer.teacher).items()}
    step = trainer.progress["global_step"]
    bad = dataclasses.replace(good, regions=good.regions.clone().fill_(float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite loss at step .*weights were not updated"):
        trainer.train_step(bad)
    assert trainer.progress["global_step"] == step
    assert_same_parameters(before, parameters(trainer.teacher), atol=0)
    trainer.train_step(good)  # training goes on from the last finite weights
    assert all(value.isfinite().all() for value in parameters(trainer.teacher).values())
