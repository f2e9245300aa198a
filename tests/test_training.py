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
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert strip(resumed.history) == strip(straight.history)
    kinds = {(r["kind"], r["stage"]) for r in straight.history}
    assert kinds == {("train", "teacher"), ("eval", "teacher"), ("train", "student"), ("eval", "student")}
    assert {"hinge", "listnet", "concept", "context", "lr"} <= set(straight.history[-2])
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
