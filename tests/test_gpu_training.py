"""The trainer on a real CUDA GPU with bf16 autocast: teacher (Triton alignment op, forward and backward),
student distillation, global baseline, and a checkpoint save / resume round trip on the device.

Skipped without CUDA (this project's CI has none). Tiny models and data, so the run is dominated by the
Triton kernels' first compilation (well under a minute on an H100 / H200):
``pytest -q tests/test_gpu_training.py``.
"""
from __future__ import annotations

import math

import pytest
import torch

from aladin_fast.data import SyntheticScenes
from aladin_fast.training import Trainer, TrainConfig, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# D = 32 (tl.dot wants blocks of at least 16), R = 20 regions, 32 scenes: a few ms a step once compiled
GPU_TINY = dict(teacher_dim=32, teacher_layers=1, teacher_heads=2, teacher_ff_dim=64, student_dim=16, student_heads=2,
                batch_size=16, dropout=0.0, warmup_steps=1, progress=False, lr=3e-3, hardest_negative=False,
                one_caption_per_image=True, device="cuda", amp="bf16", backend="auto", eval_every=1_000_000,
                checkpoint_every=1_000_000)


def scenes(count=32, seed=0):
    return SyntheticScenes(count, seed=seed, regions=20, feature_dim=32)


def parameters(module):
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before, after):
    return [name for name in before if not torch.equal(before[name], after[name])]


def fixed_batch_losses(trainer: Trainer, stage: str, steps: int):
    """Loss values of ``steps`` optimisation steps of ``stage`` on one fixed batch (it must be learnt)."""
    trainer.begin_stage(stage)
    batch = trainer.collate(range(0, 5 * trainer.config.batch_size, 5))  # caption 0 of the first images
    return [trainer.train_step(batch) for _ in range(steps)]


def test_bf16_autocast_teacher_student_and_baseline_learn_on_cuda():
    # student and baseline as in the acceptance run: projected max-pooling heads, the student's on the frozen
    # teacher's cached tokens
    config = TrainConfig(**GPU_TINY, stages=("teacher", "baseline", "student"), teacher_epochs=6, student_epochs=3,
                         baseline_epochs=2, student_layers=0, student_pooling="max", student_project_tokens=True,
                         student_hinge_weight=0.0, distill_temperature=20.0, distill_teacher_temperature=0.1,
                         cache_teacher_tokens=True, baseline_pooling="max", baseline_head_layers=0,
                         baseline_project_tokens=True, baseline_loss="infonce", baseline_temperature=0.1)
    trainer = Trainer(config, scenes(), scenes(16, seed=1))
    assert trainer.device.type == "cuda" and next(trainer.teacher.parameters()).is_cuda
    assert isinstance(trainer._autocast(), torch.autocast)

    # under autocast the encoders' GEMMs run in bf16; the unit tokens they hand to the Triton op are bf16 or
    # float32 (normalize may be autocast to float32), finite either way
    with trainer._autocast():
        regions, lengths = trainer.train_source.image_batch(range(4))
        tokens, _ = trainer.teacher.encode_images(regions.cuda(), lengths.cuda())
    assert tokens.is_cuda and tokens.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(tokens).all()

    # a fixed batch of each stage is learnt: finite losses that go clearly down, weights that move
    teacher_before = parameters(trainer.teacher)
    teacher_steps = fixed_batch_losses(trainer, "teacher", 25)
    assert all(math.isfinite(v) for step in teacher_steps for v in step.values())
    assert teacher_steps[-1]["loss"] < 0.7 * teacher_steps[0]["loss"], [s["loss"] for s in teacher_steps]
    assert changed(teacher_before, parameters(trainer.teacher))

    teacher_frozen, student_before = parameters(trainer.teacher), parameters(trainer.student)
    student_steps = fixed_batch_losses(trainer, "student", 25)
    assert all(math.isfinite(v) for step in student_steps for v in step.values())
    assert "listnet" in student_steps[0] and "hinge" not in student_steps[0]
    assert student_steps[-1]["loss"] < student_steps[0]["loss"], [s["loss"] for s in student_steps]
    assert changed(student_before, parameters(trainer.student))
    assert not changed(teacher_frozen, parameters(trainer.teacher))  # the teacher stays frozen while distilling
    cache = trainer._cache  # built on the GPU when the student stage began
    assert cache is not None and cache.image_tokens.is_cuda and cache.caption_tokens.is_cuda

    baseline_before = parameters(trainer.baseline)
    baseline_steps = fixed_batch_losses(trainer, "baseline", 25)
    assert all(math.isfinite(v) for step in baseline_steps for v in step.values())
    assert baseline_steps[-1]["loss"] < baseline_steps[0]["loss"], [s["loss"] for s in baseline_steps]
    assert changed(baseline_before, parameters(trainer.baseline))

    # the whole schedule through fit(): every stage's logged losses finite, and every model evaluates on CUDA
    fresh = Trainer(config, scenes(), scenes(16, seed=1))
    fresh.fit()
    train_records = [r for r in fresh.history if r["kind"] == "train"]
    assert {r["stage"] for r in train_records} == {"teacher", "baseline", "student"}
    student_stage = [r for r in fresh.history if r["kind"] == "stage" and r["stage"] == "student"][0]
    assert student_stage["cache_seconds"] > 0
    assert all(math.isfinite(r["loss"]) for r in train_records)
    first, last = (next(r["loss"] for r in seq if r["stage"] == "teacher") for seq in (train_records,
                                                                                      train_records[::-1]))
    assert last < first, (first, last)
    for model in ("teacher", "student", "baseline"):
        metrics = fresh.evaluate(model=model)
        assert all(math.isfinite(metrics[k]) for k in ("i2t_r1", "t2i_r1", "rsum")), (model, metrics)


def test_checkpoint_round_trip_and_resume_on_cuda(tmp_path):
    config = TrainConfig(**{**GPU_TINY, "checkpoint_every": 1}, stages=("teacher", "student"), teacher_epochs=2,
                         student_epochs=2, output_dir=str(tmp_path))
    straight = Trainer(config.replace(output_dir=None), scenes(), None)
    straight.fit()

    interrupted = Trainer(config, scenes(), None)
    interrupted.fit(max_epochs=1)  # stops inside the teacher stage, after its checkpoint
    path = str(tmp_path / "checkpoint.pt")
    payload = load_checkpoint(path)  # loads onto the CPU by default
    assert payload["progress"]["stage"] == "teacher" and payload["progress"]["epoch"] == 1
    assert payload["optimizer"] is not None

    resumed = Trainer(config, scenes(), None).resume(path)
    saved = parameters(interrupted.teacher)
    for name, value in parameters(resumed.teacher).items():
        assert value.is_cuda and torch.equal(value, saved[name]), name  # exact round trip, back on the GPU
    resumed.fit()
    moments = [t for s in resumed._optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
    assert moments and all(t.is_cuda for t in moments)  # the student stage's AdamW state lives on the GPU
    assert resumed.progress["completed_stages"] == ["teacher", "student"]
    stages = lambda trainer: [(r["stage"], r["epochs"], r["steps"]) for r in trainer.history  # noqa: E731
                              if r["kind"] == "stage"]
    assert stages(resumed) == stages(straight) == [("teacher", 2, 4), ("student", 2, 4)]
    assert changed(saved, parameters(resumed.teacher))  # the teacher's second epoch ran after the resume
    # bf16 GEMMs are not promised bit-identical, and Adam turns rounding noise in near-zero gradients (the
    # attention key bias has an exactly-zero one) into full steps: compare the rest, loosely
    reference = parameters(straight.teacher)
    for name, value in parameters(resumed.teacher).items():
        if not name.endswith("in_proj_bias"):
            assert torch.allclose(value.float(), reference[name].float(), atol=2e-2, rtol=0), name
    metrics = resumed.evaluate(scenes(16, seed=1), model="student")
    assert math.isfinite(metrics["rsum"])
