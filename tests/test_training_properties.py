"""Property-based and adversarial tests of the training package (aladin_fast.training), against these oracles:

* data order: one epoch of the trainer's loader visits every training caption exactly once (with
  ``one_caption_per_image``: every image once, with one of its own captions), in batches of ``batch_size`` and a
  last partial one, for any dataset size, captions per image and batch size (larger than the dataset too); each
  batch's image indices and region features are those of its captions' images (the 5-captions grouping);
* training in pieces equals one uninterrupted ``fit()``: ``fit(max_epochs=k)`` followed by either ``fit()`` again
  on the same trainer or a new trainer resumed from the checkpoint (any ``checkpoint_every``), at every epoch
  boundary, stage boundaries included, with dropout, the baseline stage, cached teacher tokens, a separate
  backbone with SelfAlign losses, joint training and the constant schedule: bitwise-equal weights, equal
  histories, and ``metrics.jsonl`` equal to the history as strict JSON;
* bad arguments raise errors that name them (library) or are usage errors without a traceback (command line).

Bugs found and fixed (each has a deterministic regression test below that fails on the old code):

1. ``fit(max_epochs=k)`` then ``fit()`` on the same trainer rebuilt the stage's optimiser and schedule: Adam's
   moments were lost and the learning rate went back to warm-up (weights differed from one ``fit()``).
2. ``fit(max_epochs=k)`` stopping at an epoch that ``checkpoint_every`` does not divide wrote no checkpoint: the
   time-boxed job's epochs could not be resumed.
3. ``fit(max_epochs=-1)`` (and ``--max-epochs -1``) silently trained nothing; ``fit(max_epochs=1.5)`` trained 2.
4. ``train --resume`` with a missing, foreign or mismatched checkpoint was a traceback, not a usage error.
5. ``Trainer.load_teacher`` checked neither the vocabulary nor the hparams: a checkpoint trained with another
   vocabulary of the same size loaded silently (every word embedding on the wrong word).
6. ``seed`` >= 2**64 - 1e6 passed ``validate()`` and then failed in ``torch.manual_seed`` ("Overflow when
   unpacking long long", not naming the field).
7. ``score_matrix`` / ``evaluate`` with ``max_images`` <= 0 or a non-int, or ``block`` <= 0: torch / Python errors
   not naming the argument (``max_images=-1`` a negative-dimension error, ``0`` silently meant all images).
8. A resumed run appended to ``metrics.jsonl`` after the lines the crashed run had written since its last
   checkpoint: those records appeared twice (the resumed run writes them again).
9. Under DDP every rank resumed with rank 0's random generators (the checkpoint kept only rank 0's), so their
   dropout masks became identical and the resumed run differed from the uninterrupted one.

Default run: a derandomized sample; ``pytest -m slow`` runs more examples.
"""
from __future__ import annotations

import functools
import json
import math
import os
import stat
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aladin_fast.data import Vocabulary
from aladin_fast.training import PairSource, Trainer, TrainConfig, load_checkpoint, load_models, save_checkpoint
from aladin_fast.training.command import main as command_main
from test_data_cli_properties import _run_cli
from test_training import TINY, assert_same_parameters, parameters, tiny_scenes

_COMMON = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DEFAULT = settings(max_examples=30, derandomize=True, **_COMMON)
PIECEWISE = settings(max_examples=3, derandomize=True, **_COMMON)
THOROUGH = settings(max_examples=40, **_COMMON)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLOCKS = ("seconds", "cpu_seconds", "wall_start", "wall_end", "cache_seconds")


def strip_clocks(history):
    return [{k: v for k, v in record.items() if k not in CLOCKS} for record in history]


def strict_json_lines(path):
    """The records of a JSON-lines file; NaN / Infinity (non-strict JSON) fail."""
    def refuse(constant):
        raise AssertionError(f"{path}: non-strict JSON constant {constant}")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line, parse_constant=refuse) for line in handle]


# ============================================================================ data order
def _source(num_images, captions_per_image, feature_dim=3):
    """Image i has every region feature equal to i; caption j names its image and its number."""
    def image_batch(indices):
        regions = torch.tensor(indices, dtype=torch.float32)[:, None, None].expand(len(indices), 2, feature_dim)
        return regions.clone(), torch.full((len(indices),), 2, dtype=torch.int64)
    captions = [f"image{j // captions_per_image} caption{j % captions_per_image}"
                for j in range(num_images * captions_per_image)]
    return PairSource(num_images, captions, image_batch, feature_dim, captions_per_image)


def _check_epoch(trainer, source, epoch, one_per_image, batch_size):
    trainer._sampler.set_epoch(epoch)
    trainer._dataset.set_epoch(epoch)
    seen, sizes = [], []
    for batch in trainer._loader:
        captions = batch.caption_indices.tolist()
        assert batch.image_indices.tolist() == [j // source.captions_per_image for j in captions]
        assert torch.equal(batch.regions[:, 0, 0], batch.image_indices.float())  # the captions' own images
        decoded = [trainer.tokenizer.decode(row[:n].tolist()) for row, n in zip(batch.captions, batch.caption_lengths)]
        assert decoded == [source.captions[j] for j in captions]
        seen += captions
        sizes.append(len(batch))
    expected = source.num_images if one_per_image else source.num_captions
    assert sizes == [batch_size] * (expected // batch_size) + ([expected % batch_size] if expected % batch_size else [])
    if one_per_image:
        assert sorted(j // source.captions_per_image for j in seen) == list(range(source.num_images))
    else:
        assert sorted(seen) == list(range(source.num_captions))
    return seen


@DEFAULT
@given(num_images=st.integers(1, 9), captions_per_image=st.integers(1, 5), batch_size=st.integers(1, 50),
       one_per_image=st.booleans(), seed=st.integers(0, 2**31), epochs=st.integers(1, 3))
def test_every_epoch_visits_every_caption_once(num_images, captions_per_image, batch_size, one_per_image, seed, epochs):
    source = _source(num_images, captions_per_image)
    config = TrainConfig(**{**TINY, "batch_size": batch_size}, one_caption_per_image=one_per_image, seed=seed,
                         stages=("teacher",))
    trainer = Trainer(config, source, None)
    trainer._make_loader()
    orders = [_check_epoch(trainer, source, epoch, one_per_image, batch_size) for epoch in range(epochs)]
    # the order is a function of (seed, epoch): replayed by a new trainer (what resume relies on)
    again = Trainer(config, source, None)
    again._make_loader()
    assert _check_epoch(again, source, epochs - 1, one_per_image, batch_size) == orders[-1]


# ============================================================ training in pieces == one fit
VARIANTS = {
    "plain": dict(),
    "dropout": dict(dropout=0.2, one_caption_per_image=True),
    "baseline": dict(stages=("teacher", "baseline", "student"), baseline_epochs=1, student_epochs=1),
    "cache": dict(cache_teacher_tokens=True, student_pooling="max", student_project_tokens=True),
    "separate": dict(student_backbone="separate", concept_weight=0.1, teacher_concept_weight=0.1, context_weight=0.5),
    "joint": dict(freeze_teacher=False, schedule="constant", hinge_warmup_epochs=0),
}
PIECES = dict(TINY, batch_size=16, teacher_epochs=2, student_epochs=2, log_every=3)


def _config(variant, **changes):
    return TrainConfig(**{**PIECES, **VARIANTS[variant]}, **changes)


def _data():
    return tiny_scenes(12), tiny_scenes(6, seed=1)


def _models(trainer):
    return {name: parameters(getattr(trainer, name)) for name in ("teacher", "student", "baseline")
            if getattr(trainer, name) is not None}


@functools.lru_cache(maxsize=None)
def _uninterrupted(variant):
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(_config(variant, output_dir=folder), *_data())
        trainer.fit()
        assert strip_clocks(strict_json_lines(os.path.join(folder, "metrics.jsonl"))) == strip_clocks(trainer.history)
    return _models(trainer), strip_clocks(trainer.history)


def _total_epochs(config):
    return sum(config.stage_epochs(stage) for stage in config.stages)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@PIECEWISE
@given(checkpoint_every=st.integers(1, 3), data=st.data())
def test_fit_in_pieces_equals_one_fit(variant, checkpoint_every, data):
    """fit(max_epochs=k) pieces that end at any epoch boundaries, each continued in process or by a new trainer
    resumed from the checkpoint."""
    models, history = _uninterrupted(variant)
    with tempfile.TemporaryDirectory() as folder:
        config = _config(variant, output_dir=folder, checkpoint_every=checkpoint_every)
        total = _total_epochs(config)
        stops = data.draw(st.lists(st.integers(1, total - 1), min_size=1, unique=True).map(sorted), label="stops")
        trainer, done = Trainer(config, *_data()), 0
        for stop in stops:
            trainer.fit(max_epochs=stop - done)
            done = stop
            if data.draw(st.booleans(), label="resume from the checkpoint (else fit() again in process)"):
                path = os.path.join(folder, "checkpoint.pt")
                assert load_checkpoint(path)["progress"]["global_step"] == trainer.progress["global_step"]
                trainer = Trainer(config, *_data()).resume(path)
        trainer.fit()
        for name, state in models.items():
            assert_same_parameters(state, _models(trainer)[name])
        assert strip_clocks(trainer.history) == history
        assert strip_clocks(strict_json_lines(os.path.join(folder, "metrics.jsonl"))) == history


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@THOROUGH
@given(checkpoint_every=st.integers(1, 3), data=st.data())
def test_fit_in_pieces_equals_one_fit_thorough(variant, checkpoint_every, data):
    test_fit_in_pieces_equals_one_fit.hypothesis.inner_test(variant, checkpoint_every, data)


# ============================================================================ regressions
def test_fit_again_on_the_same_trainer_keeps_optimizer_and_schedule():
    """Bug 1: the second fit() rebuilt AdamW and the schedule (learning rate back in warm-up, moments lost)."""
    config = TrainConfig(**TINY, stages=("teacher",))
    straight = Trainer(config, tiny_scenes(12), None)
    straight.fit()
    pieces = Trainer(config, tiny_scenes(12), None)
    pieces.fit(max_epochs=1)
    pieces.fit()
    assert [r["lr"] for r in pieces.history if r["kind"] == "train"] == \
        [r["lr"] for r in straight.history if r["kind"] == "train"]
    assert_same_parameters(parameters(straight.teacher), parameters(pieces.teacher))


def test_max_epochs_stop_writes_a_checkpoint_whatever_checkpoint_every(tmp_path):
    """Bug 2: with checkpoint_every=2, fit(max_epochs=1) left no checkpoint to resume from."""
    config = TrainConfig(**TINY, stages=("teacher",), checkpoint_every=2, output_dir=str(tmp_path))
    straight = Trainer(config.replace(output_dir=None), tiny_scenes(12), None)
    straight.fit()
    Trainer(config, tiny_scenes(12), None).fit(max_epochs=1)
    path = str(tmp_path / "checkpoint.pt")
    assert os.path.isfile(path) and load_checkpoint(path)["progress"]["epoch"] == 1
    resumed = Trainer(config, tiny_scenes(12), None).resume(path)
    resumed.fit()
    assert_same_parameters(parameters(straight.teacher), parameters(resumed.teacher))


def test_max_epochs_must_be_a_non_negative_int(tmp_path, monkeypatch):
    """Bug 3: fit(max_epochs=-1) and --max-epochs -1 trained nothing without a word; 1.5 trained two epochs."""
    trainer = Trainer(TrainConfig(**TINY, stages=("teacher",)), tiny_scenes(6), None)
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(ValueError, match="max_epochs"):
            trainer.fit(max_epochs=bad)
    assert trainer.progress["global_step"] == 0
    trainer.fit(max_epochs=0)  # nothing to do is fine
    assert trainer.progress["global_step"] == 0

    def refuse(config):
        raise AssertionError("a bad command line reached build_datasets")
    monkeypatch.setattr("aladin_fast.training.data.build_datasets", refuse)
    code, err, _ = _run_cli(command_main, ["train", "--max-epochs", "-1"])
    assert code == 2 and "--max-epochs" in err and "Traceback" not in err


def test_command_line_resume_errors_are_usage_errors(tmp_path):
    """Bug 4: a missing / foreign / mismatched --resume checkpoint was a traceback after building the data."""
    (tmp_path / "run.toml").write_text(
        "synthetic_train_images = 6\nsynthetic_val_images = 4\nsynthetic_feature_dim = 16\nteacher_dim = 8\n"
        "teacher_heads = 2\nstudent_dim = 8\nstudent_heads = 2\nbatch_size = 8\nprogress = false\n")
    other = Trainer(TrainConfig(**TINY), tiny_scenes(6), None)  # another vocabulary and teacher width
    other.save_checkpoint(str(tmp_path / "other.pt"))
    for resume, message in ((tmp_path / "missing.pt", "checkpoint not found"),
                            (tmp_path / "run.toml", "cannot read checkpoint"),
                            (tmp_path / "other.pt", "different vocabulary|hparams")):
        code, err, _ = _run_cli(command_main, ["train", "--config", str(tmp_path / "run.toml"), "--resume", str(resume)])
        assert code == 2 and "Traceback" not in err, err
        assert "--resume" in err and any(part in err for part in message.split("|")), err


def test_load_teacher_refuses_another_vocabulary_or_teacher(tmp_path):
    """Bug 5: a checkpoint of another vocabulary of the same size loaded silently into the teacher."""
    config = TrainConfig(**TINY, stages=("teacher",))
    source = Trainer(config, tiny_scenes(6), None)
    path = str(tmp_path / "teacher.pt")
    source.save_checkpoint(path)
    words = source.tokenizer.itos[4:]
    shuffled = Vocabulary(words[1:] + words[:1])  # same size, every word on another id
    target = Trainer(config.replace(stages=("student",)), tiny_scenes(6), None, tokenizer=shuffled)
    before = parameters(target.teacher)
    with pytest.raises(ValueError, match="different vocabulary"):
        target.load_teacher(path)
    assert_same_parameters(before, parameters(target.teacher))
    wider = Trainer(config.replace(teacher_dim=32), tiny_scenes(6), None)
    with pytest.raises(ValueError, match="teacher hparams"):
        wider.load_teacher(path)
    same = Trainer(config.replace(stages=("student",)), tiny_scenes(6), None).load_teacher(path)
    assert_same_parameters(parameters(source.teacher), parameters(same.teacher))


def test_seed_is_validated_to_fit_torch_generators():
    """Bug 6: seed=2**64 passed validate() and failed in torch.manual_seed without naming the field."""
    for seed in (2**63, 2**64 - 1, 2**64):
        with pytest.raises(ValueError, match="^seed"):
            TrainConfig(seed=seed).validate()
    trainer = Trainer(TrainConfig(**TINY, stages=("teacher",), seed=2**63 - 1), tiny_scenes(6), None)
    trainer.fit(max_epochs=1)  # the largest valid seed trains
    assert trainer.progress["global_step"] > 0


def test_score_matrix_names_bad_max_images_and_block():
    """Bug 7: max_images=-1 was a negative-dimension RuntimeError, 0 silently meant all images, 2.5 a TypeError;
    block=0 a range() error."""
    trainer = Trainer(TrainConfig(**TINY), tiny_scenes(6), tiny_scenes(4, seed=1))
    for bad in (-1, 0, 2.5, True, "2"):
        with pytest.raises(ValueError, match="^max_images"):
            trainer.score_matrix(max_images=bad)
        with pytest.raises(ValueError, match="^max_images"):
            trainer.evaluate(max_images=bad)
    for bad in (0, -3, 1.0, None):
        with pytest.raises(ValueError, match="^block"):
            trainer.score_matrix(block=bad)
    assert trainer.score_matrix(max_images=2, block=1).shape == (2, 10)


def test_resume_after_a_crash_mid_epoch_does_not_duplicate_metrics(tmp_path):
    """Bug 8: the records written between the last checkpoint and a crash appeared twice in metrics.jsonl."""
    config = TrainConfig(**{**TINY, "log_every": 2}, stages=("teacher",), output_dir=str(tmp_path))
    straight = Trainer(config.replace(output_dir=None), tiny_scenes(12), None)
    straight.fit()
    crashing = Trainer(config, tiny_scenes(12), None)
    step = crashing.train_step

    def preempted(batch):
        if crashing.progress["global_step"] == 11:  # epoch 2, after its record of step 10
            raise KeyboardInterrupt("preempted")
        return step(batch)
    crashing.train_step = preempted
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    assert [r["step"] for r in strict_json_lines(tmp_path / "metrics.jsonl")][-1] == 10
    resumed = Trainer(config, tiny_scenes(12), None).resume(str(tmp_path / "checkpoint.pt"))
    resumed.fit()
    lines = strict_json_lines(tmp_path / "metrics.jsonl")
    assert strip_clocks(lines) == strip_clocks(straight.history) == strip_clocks(resumed.history)
    # a file the checkpoint's records are not in (another run's) is left as it is
    (tmp_path / "metrics.jsonl").write_text('{"kind": "other"}\n')
    Trainer(config, tiny_scenes(12), None).resume(str(tmp_path / "checkpoint.pt"))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"kind": "other"}\n'


DDP_CONFIG = dict(TINY, dropout=0.3, stages=("teacher",), teacher_epochs=2, batch_size=4)


def _ddp_resume_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        straight = Trainer(TrainConfig(**DDP_CONFIG), tiny_scenes(6), None)
        straight.fit()
        config = TrainConfig(**DDP_CONFIG, output_dir=os.path.join(out_dir, "run"))
        Trainer(config, tiny_scenes(6), None).fit(max_epochs=1)
        resumed = Trainer(config, tiny_scenes(6), None).resume(os.path.join(out_dir, "run", "checkpoint.pt"))
        resumed.fit()
        torch.save({"straight": straight.teacher.state_dict(), "resumed": resumed.teacher.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_resume_restores_each_ranks_generators(tmp_path):
    """Bug 9: every rank resumed with rank 0's generators, so the ranks' dropout masks became identical."""
    init_file = os.path.join(tempfile.mkdtemp(), "rendezvous")
    mp.spawn(_ddp_resume_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    runs = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert_same_parameters(runs[0]["straight"], runs[1]["straight"])
    assert_same_parameters(runs[0]["straight"], runs[0]["resumed"])
    assert len(load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["rank_rng"]) == 2


@pytest.mark.parametrize("field", ["lr", "student_lr", "weight_decay", "margin", "distill_weight", "teacher_seconds"])
def test_regression_infinite_rates_weights_and_budgets_are_refused(field):
    """An infinite lr failed only at the second step (FloatingPointError) and an infinite time budget trained
    forever; validate() now names the field. grad_clip = inf stays valid (it clips nothing)."""
    with pytest.raises(ValueError, match=rf"{field} must be .*finite number"):
        TrainConfig(**{**TINY, field: math.inf}).validate()
    TrainConfig(**{**TINY, "grad_clip": math.inf}).validate()


def test_a_time_boxed_stage_cut_short_writes_strict_json(tmp_path):
    """A timed stage stopped by max_epochs writes no stage record, and what is written is strict JSON."""
    config = TrainConfig(**TINY, stages=("teacher",), teacher_seconds=1e6, output_dir=str(tmp_path))
    trainer = Trainer(config, tiny_scenes(6), None)
    trainer.fit(max_epochs=1)
    assert strict_json_lines(tmp_path / "metrics.jsonl") and trainer.progress["completed_stages"] == []


def test_regression_checkpoints_follow_the_umask_not_0600(tmp_path):
    """save_checkpoint wrote through mkstemp, so every checkpoint was 0600 (unreadable to the rest of a team),
    unlike a plain torch.save; it now gets the mode any new file gets."""
    previous = os.umask(0o022)
    try:
        save_checkpoint(str(tmp_path / "c.pt"), {"history": []})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "c.pt").st_mode) == 0o644
    assert os.listdir(tmp_path) == ["c.pt"]


def test_regression_load_models_gives_no_student_before_its_stage(tmp_path):
    """A teacher-only run's checkpoint holds the Trainer's student at its initial weights; load_models returned
    it as if it were the distilled model (evaluate / retrieval would then report a random student)."""
    config = TrainConfig(**TINY, stages=("teacher", "student"), output_dir=str(tmp_path))
    trainer = Trainer(config, tiny_scenes(6), None)
    trainer.fit(max_epochs=1)  # inside the teacher stage
    path = str(tmp_path / "checkpoint.pt")
    assert load_checkpoint(path).get("student") is not None
    teacher, student, _ = load_models(path)
    assert teacher is not None and student is None
    trainer.fit()  # the student stage runs: now it is the trained one
    teacher, student, _ = load_models(path)
    assert_same_parameters(parameters(student), parameters(trainer.student))
