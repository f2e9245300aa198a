"""Training as a long-running job: resources across stages, checkpoint contents and portability, interruptions
(Ctrl-C, SIGTERM, a full disk) and what a run does after them.

Bugs found and fixed (each has a test below that fails on the code before the fix):

1. A checkpoint written after a stage had finished still held that stage's AdamW and schedule state, which
   resume ignores (the docs say None): on a 256-d teacher, 26.3 of the 46.1 MB checkpoint written when the
   teacher finished, and 13.1 of 32.8 MB at the end of the run.
2. A checkpoint trained with one alignment backend did not load on another: ``resume`` / ``load_teacher`` into
   a ``backend="reference"`` (or ``"auto"``) trainer of a ``backend="cpu"`` checkpoint raised "teacher hparams
   differ", and ``load_models`` rebuilt a ``backend="triton"`` (GPU-trained) teacher that failed on a CPU
   ("backend='triton' cannot run").
3. The frozen teacher's token cache (``cache_teacher_tokens``: the whole training set's tokens) stayed alive
   through every later stage (a baseline after the student trained with it in memory), and a student stage
   begun again (``fit()`` after ``fit(max_epochs=...)``) held the old cache while encoding the new one.
4. ``fit()`` again after an exception mid-epoch (Ctrl-C, a non-finite loss, a failed write) re-ran the
   interrupted epoch from its start on top of the part already trained: 21 steps instead of 16, the first
   batches trained and logged twice, weights 4.5e-3 away from an uninterrupted run's. It now goes on with the
   epoch's next batch (bitwise equal to the uninterrupted run without dropout).
5. A full disk while checkpointing surfaced as torch's ``RuntimeError: [enforce fail at inline_container.cc]
   unexpected pos 704 vs 598`` (or a bare ``OSError: [Errno 28]`` without a file name); it is now an
   ``OSError`` (ENOSPC) naming the checkpoint and saying the previous one is kept. And ``fit()`` again (disk
   space freed) never wrote the failed checkpoint when the run had finished: the file stayed an epoch behind.
   It is now written first.
6. SIGTERM (preemption; torchrun stopping its workers) killed ``train`` where it stood: a checkpoint being
   written left its temporary file (as large as a checkpoint) in ``output_dir``, exit status -15. ``train`` now
   stops as for Ctrl-C: the temporary file is removed, the previous checkpoint stays, exit 143 with a message
   naming the checkpoint to resume from.

Checked and found fine (no test here unless said, or covered elsewhere): RSS, live tensors, open files and
threads stay flat over 40 epochs per stage with evaluation every epoch (teacher -> cached student -> baseline;
a shorter version is the slow test at the end; the op layer's layout caches fill up to their 64 entries); no
tensor with an autograd graph outlives a step; history records hold plain floats; evaluation does not perturb
training (same weights with and without validation data, any ``eval_every``); bf16 autocast on CPU gives finite
gradients in every stage, and the fused op's bf16 gradients equal the reference backend's bit for bit (their
distance to fp32, 7-16 % on a teacher step, is the encoders' bf16); batch size 1, a dataset smaller than one
batch, one-word and 320-word captions, one-region and zero-region images, empty captions, one image with all
its captions in a batch all train with finite weights; runs with one seed are bit-identical at a fixed thread
count. Not bit-identical across 1 and 2 torch threads: torch's CPU LayerNorm backward (gamma / beta
gradients) and, for some lengths, its attention differ in the last bits (not this package's code).
"""
from __future__ import annotations

import errno
import gc
import io
import json
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch

from aladin_fast.training import Trainer, TrainConfig, load_checkpoint, load_models
from aladin_fast.training import trainer as trainer_module
from test_training import TINY, assert_same_parameters, parameters, tiny_scenes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLOCKS = ("seconds", "cpu_seconds", "wall_start", "wall_end", "cache_seconds")
CACHED = dict(cache_teacher_tokens=True, student_pooling="max", student_project_tokens=True)


def strip_clocks(history):
    return [{k: v for k, v in record.items() if k not in CLOCKS} for record in history]


def checkpoint_path(folder):
    return os.path.join(str(folder), "checkpoint.pt")


# ====================================================================== 1. checkpoint contents
def test_a_finished_stage_leaves_no_optimizer_state_in_checkpoints(tmp_path):
    config = TrainConfig(**TINY, stages=("teacher", "student"), output_dir=str(tmp_path))
    trainer = Trainer(config, tiny_scenes(), None)
    trainer.fit(max_epochs=1)  # inside the teacher stage: its optimiser is needed to resume exactly
    inside = load_checkpoint(checkpoint_path(tmp_path))
    assert inside["optimizer"] is not None and inside["scheduler"] is not None
    inside_bytes = os.path.getsize(checkpoint_path(tmp_path))
    trainer.fit(max_epochs=1)  # the teacher's last epoch: the stage is finished
    finished = load_checkpoint(checkpoint_path(tmp_path))
    assert finished["progress"]["completed_stages"] == ["teacher"]
    assert finished["optimizer"] is None and finished["scheduler"] is None
    # the file lost AdamW's two moments per teacher weight (it gained a few history records)
    teacher_bytes = sum(v.numel() * v.element_size() for v in trainer.teacher.parameters())
    assert os.path.getsize(checkpoint_path(tmp_path)) < inside_bytes - 1.8 * teacher_bytes
    trainer.fit()
    final = load_checkpoint(checkpoint_path(tmp_path))
    assert final["progress"]["completed_stages"] == ["teacher", "student"] and final["optimizer"] is None
    # resuming the finished run trains nothing and keeps the weights
    resumed = Trainer(config, tiny_scenes(), None).resume(checkpoint_path(tmp_path))
    resumed.fit()
    assert resumed.progress["global_step"] == trainer.progress["global_step"]
    assert_same_parameters(parameters(trainer.student), parameters(resumed.student))


# ====================================================================== 2. backends
def test_a_checkpoint_loads_on_another_backend(tmp_path):
    config = TrainConfig(**TINY, stages=("teacher",), backend="cpu", output_dir=str(tmp_path))
    trained = Trainer(config, tiny_scenes(), None)
    trained.fit(max_epochs=1)
    path = checkpoint_path(tmp_path)
    for backend in ("reference", "auto"):
        other = config.replace(backend=backend, output_dir=None)
        resumed = Trainer(other, tiny_scenes(), None).resume(path)
        assert resumed.teacher.backend == backend  # the weights load; this trainer's backend runs them
        assert_same_parameters(parameters(trained.teacher), parameters(resumed.teacher))
        resumed.fit()
        assert resumed.progress["completed_stages"] == ["teacher"]
        loaded = Trainer(other.replace(stages=("student",)), tiny_scenes(), None).load_teacher(path)
        assert_same_parameters(parameters(trained.teacher), parameters(loaded.teacher))
    with pytest.raises(ValueError, match="teacher hparams"):  # the weights' shapes still have to match
        Trainer(config.replace(teacher_dim=32, output_dir=None), tiny_scenes(), None).resume(path)


def test_load_models_of_a_gpu_trained_teacher_scores_on_the_cpu(tmp_path):
    config = TrainConfig(**TINY, stages=("teacher",), backend="triton")  # as trained on a GPU
    trainer = Trainer(config, tiny_scenes(6), None)
    path = str(tmp_path / "gpu.pt")
    trainer.save_checkpoint(path)
    teacher, _, vocabulary = load_models(path)
    assert teacher.backend == "auto"
    batch = trainer.collate([0, 5, 10])
    scores = teacher(batch.regions, batch.image_lengths, batch.captions, batch.caption_lengths).scores
    reference, _, _ = load_models(path, backend="reference")
    expected = reference(batch.regions, batch.image_lengths, batch.captions, batch.caption_lengths).scores
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    kept, _, _ = load_models(path, backend=None)  # the backend it was trained with, on request
    assert kept.backend == "triton"


# ====================================================================== 3. the teacher-token cache
def test_the_teacher_token_cache_is_released_when_it_is_no_longer_used():
    config = TrainConfig(**{**TINY, "teacher_epochs": 1, "student_epochs": 2}, baseline_epochs=1,
                         stages=("teacher", "student", "baseline"), **CACHED)
    trainer = Trainer(config, tiny_scenes(), None)
    built = []
    real_cache = trainer_module.TeacherTokenCache

    def recording_cache(*args, **kwargs):
        # every earlier cache must be gone before a new one is encoded (the peak would be two caches)
        gc.collect()
        assert all(ref() is None for ref in built), "the previous token cache is still alive"
        cache = real_cache(*args, **kwargs)
        built.append(weakref.ref(cache.caption_tokens))
        return cache

    trainer_module.TeacherTokenCache = recording_cache
    try:
        trainer.fit(max_epochs=2)  # the teacher, then one of the student's two epochs
        assert len(built) == 1 and built[0]() is not None
        trainer.fit(max_epochs=1)  # the student stage begun again: a new cache, the old one released first
        assert len(built) == 2
        step = trainer.train_step
        during_baseline = []

        def baseline_step(batch):
            gc.collect()
            during_baseline.append(built[-1]() is None)
            return step(batch)
        trainer.train_step = baseline_step
        trainer.fit()  # the baseline stage: it has no use for the student's cache
    finally:
        trainer_module.TeacherTokenCache = real_cache
    assert during_baseline and all(during_baseline), "the token cache stayed alive through the baseline stage"


# ====================================================================== 4. fit() again after an interruption
def _interrupt_at(trainer, step_number, exception=KeyboardInterrupt):
    """Make the trainer's ``step_number``-th step (1-based) raise before it trains."""
    step = trainer.train_step

    def interrupted(batch):
        if trainer.progress["global_step"] == step_number - 1:
            trainer.train_step = step
            raise exception("interrupted")
        return step(batch)
    trainer.train_step = interrupted


@pytest.mark.parametrize("variant", ["teacher", "cached_student"])
def test_fit_again_after_an_interrupt_goes_on_with_the_next_batch(variant, tmp_path):
    extra = CACHED if variant == "cached_student" else {}
    config = TrainConfig(**{**TINY, "log_every": 1}, **extra, output_dir=str(tmp_path / "straight"))
    straight = Trainer(config, tiny_scenes(), None)
    straight.fit()  # teacher 2 epochs x 15 steps, student 1 epoch x 15 steps
    config = config.replace(output_dir=str(tmp_path / "interrupted"))
    trainer = Trainer(config, tiny_scenes(), None)
    stop = 7 if variant == "teacher" else 35  # mid-epoch: the teacher's first epoch, the student's
    _interrupt_at(trainer, stop)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.progress["global_step"] == stop - 1
    trainer.fit()
    assert trainer.progress["global_step"] == straight.progress["global_step"] == 45
    assert_same_parameters(parameters(straight.teacher), parameters(trainer.teacher))
    assert_same_parameters(parameters(straight.student), parameters(trainer.student))
    assert strip_clocks(trainer.history) == strip_clocks(straight.history)
    lines = [json.loads(line) for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert strip_clocks(lines) == strip_clocks(straight.history)  # each step logged once


def test_resume_after_an_interrupt_replays_the_checkpoints_epoch(tmp_path):
    """The other way back: the checkpoint holds the epoch's start, so its whole epoch is trained again (a guard
    for fix 4: ``resume`` must forget the interrupted epoch's position; this one passed before the fix too)."""
    config = TrainConfig(**TINY, stages=("teacher",), output_dir=str(tmp_path))
    straight = Trainer(config.replace(output_dir=None), tiny_scenes(), None)
    straight.fit()
    trainer = Trainer(config, tiny_scenes(), None)
    _interrupt_at(trainer, 20)  # in the second epoch, after the first epoch's checkpoint
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    trainer.resume(checkpoint_path(tmp_path))  # this trainer, back to the checkpoint
    trainer.fit()
    assert trainer.progress["global_step"] == straight.progress["global_step"]
    assert_same_parameters(parameters(straight.teacher), parameters(trainer.teacher))


# ====================================================================== 5. a full disk
class _FullDisk(io.RawIOBase):
    """A file handle on a disk with ``room`` bytes left."""

    def __init__(self, handle, room):
        super().__init__()
        self.handle, self.room = handle, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def flush(self):
        self.handle.flush()


def test_a_full_disk_while_checkpointing_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    config = TrainConfig(**TINY, stages=("teacher",), output_dir=str(tmp_path))
    trainer = Trainer(config, tiny_scenes(), None)
    trainer.fit(max_epochs=1)
    before = load_checkpoint(checkpoint_path(tmp_path))
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda payload, handle: save(payload, _FullDisk(handle, 4096)))
    with pytest.raises(OSError) as caught:
        trainer.fit(max_epochs=1)
    monkeypatch.undo()
    error = caught.value
    assert error.errno == errno.ENOSPC
    assert checkpoint_path(tmp_path) in str(error) and "previous checkpoint there is kept" in str(error)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "metrics.jsonl"]  # no temporary file left
    after = load_checkpoint(checkpoint_path(tmp_path))
    assert after["progress"] == before["progress"]
    # with room again, fit() writes the checkpoint it owes first, though the run is finished (it wrote nothing)
    assert trainer.progress["completed_stages"] == ["teacher"]
    trainer.fit()
    written = load_checkpoint(checkpoint_path(tmp_path))
    assert written["progress"]["epoch"] == 2 and written["progress"]["completed_stages"] == ["teacher"]
    assert written["history"] == trainer.history


# ====================================================================== 6. SIGTERM
_SIGTERM_RUN = r"""
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
from aladin_fast.training.command import main

save, saves = torch.save, []

def preempted_save(payload, handle):
    saves.append(1)
    if len(saves) == 2:  # in the middle of the second checkpoint: part of it is written, then SIGTERM
        handle.write(b"partial checkpoint")
        handle.flush()
        os.kill(os.getpid(), signal.SIGTERM)
    save(payload, handle)

torch.save = preempted_save
torch.set_num_threads(1)
sys.exit(main(["train", "--stages", "teacher", "--synthetic-train-images", "6", "--synthetic-val-images", "4",
               "--synthetic-feature-dim", "16", "--teacher-dim", "8", "--teacher-heads", "2", "--batch-size", "8",
               "--teacher-epochs", "3", "--progress", "false", "--output-dir", {out!r}]))
"""


def test_sigterm_while_checkpointing_exits_cleanly_and_keeps_the_previous_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    script = _SIGTERM_RUN.format(tests=os.path.dirname(os.path.abspath(__file__)), out=out)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, (done.returncode, done.stderr[-2000:])
    assert "stopped by SIGTERM" in done.stderr and f"--resume {checkpoint_path(out)}" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "metrics.jsonl"]  # the temporary file was removed
    assert load_checkpoint(checkpoint_path(out))["progress"]["epoch"] == 1


# ====================================================================== resources over many epochs (slow)
def _live_tensors():
    from aladin_fast import _inputs

    # the op layer's layout caches are bounded (64 small entries each) and fill as new padded widths appear
    _inputs._cached_padded_layout.cache_clear()
    _inputs._cached_padded_sequence_ids.cache_clear()
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated reduce_op object warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors), \
        sum(1 for t in tensors if t.grad_fn is not None)


@pytest.mark.slow
def test_resources_stay_flat_over_many_epochs_and_stages(tmp_path):
    """Teacher -> cached student -> baseline, evaluation and a checkpoint every epoch: live tensors, open files
    and threads are the same after the 5th and the 15th epoch of each stage, no autograd graph outlives a step,
    and checkpoints grow by the history records only."""
    import threading

    epochs = 15
    config = TrainConfig(**{**TINY, "teacher_epochs": epochs, "student_epochs": epochs}, baseline_epochs=epochs,
                         stages=("teacher", "student", "baseline"), output_dir=str(tmp_path), **CACHED)
    trainer = Trainer(config, tiny_scenes(), tiny_scenes(8, seed=1))
    seen = {}
    for epoch in range(3 * epochs):
        trainer.fit(max_epochs=1)
        within = epoch % epochs + 1
        if within in (5, epochs):
            seen.setdefault(trainer.progress["stage"], []).append(
                (_live_tensors(), len(os.listdir("/proc/self/fd")), threading.active_count(),
                 os.path.getsize(checkpoint_path(tmp_path)), len(json.dumps(trainer.history))))
    for stage, (early, late) in seen.items():
        assert early[0] == late[0] and early[0][2] == 0, (stage, early[0], late[0])  # tensors; graphs alive
        assert early[1:3] == late[1:3], (stage, early, late)  # open files, threads
        assert late[3] - early[3] < 2 * (late[4] - early[4]) + 4096, (stage, early, late)  # only history grows
