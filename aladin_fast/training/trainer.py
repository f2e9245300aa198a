"""The trainer: TERAN-style teacher on the fused MrSw op, then ALADIN-style student distillation.

Stages (``config.stages``):

1. ``"teacher"`` — encode regions and words, score every caption of the batch
   against every image with :func:`aladin_fast.alignment_scores` (forward and
   backward through the fused op), VSE++ hinge with hardest negatives
   (+ optional SelfAlign concept loss on the teacher's tokens).
2. ``"student"`` — the teacher (frozen by default) scores the batch; the
   student's embeddings are trained with hinge + ListNet distillation towards
   the teacher's in-batch score distribution (+ optional SelfAlign concept and
   context losses). With ``cache_teacher_tokens`` the frozen teacher's tokens
   of the whole training set are encoded once when the stage starts
   (:class:`TeacherTokenCache`) and every step reads them by index.
3. ``"baseline"`` (optional) — a global-embedding model trained directly on
   the pairs with no teacher (VSE++ hinge or InfoNCE): a
   :class:`~aladin_fast.models.Student` with its own encoders, as wide and deep
   as the teacher's, kept in ``trainer.baseline``. It is what the teacher's
   word-region alignment has to beat.

A stage trains for its epochs, or, with ``{stage}_seconds`` set, for a
wall-clock budget of training steps (the cosine schedule then follows elapsed
time instead of steps), which is how teacher and baseline get equal compute.

Everything else a run needs is here too: deterministic seeding, AdamW with
warm-up and cosine decay, gradient clipping, bf16 autocast on CUDA, DDP
(``torchrun``; see :mod:`.distributed`), atomic checkpoints with resume
(:mod:`.checkpoint`), tqdm progress when installed (plain log lines
otherwise), periodic R@K evaluation, and a training curve kept in
``trainer.history`` (list of dicts) and appended to ``metrics.jsonl``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data import Tokenizer, Vocabulary
from ..eval import retrieval_metrics
from ..losses import ConceptAlignmentLoss, context_alignment_loss, hinge_loss, infonce_loss, listnet_loss
from ..models import Student, Teacher
from . import checkpoint as ckpt
from .config import STAGES, TrainConfig
from .data import CaptionIndexDataset, PairCollator, TrainBatch, as_source, build_vocabulary, encode_captions
from .distributed import all_gather_no_grad, all_gather_object, all_gather_with_grad, barrier, current_context, reduce_mean

try:  # optional: progress bars
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - exercised only without tqdm
    tqdm = None

__all__ = ["Trainer", "TeacherTokenCache", "seed_everything"]

logger = logging.getLogger("aladin_fast.training")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


class _TeacherStage(nn.Module):
    """Trainable part of the teacher stage (what DDP wraps): tokens of both modalities."""

    def __init__(self, teacher: Teacher, concept: Optional[ConceptAlignmentLoss]):
        super().__init__()
        self.teacher, self.concept = teacher, concept

    def forward(self, regions, image_lengths, captions, caption_lengths):
        image_tokens, image_lengths = self.teacher.encode_images(regions, image_lengths)
        caption_tokens, caption_lengths = self.teacher.encode_captions(captions, caption_lengths)
        return image_tokens, image_lengths, caption_tokens, caption_lengths


class _StudentStage(nn.Module):
    """Student stage: teacher tokens (frozen or trainable) and the student's tokens and embeddings."""

    def __init__(self, student: Student, teacher: Teacher, freeze_teacher: bool, needs_teacher: bool,
                 concept: Optional[ConceptAlignmentLoss], cache: Optional["TeacherTokenCache"] = None):
        super().__init__()
        self.student, self.teacher, self.concept = student, teacher, concept
        self.freeze_teacher, self.needs_teacher = freeze_teacher, needs_teacher
        self.cache = cache
        self.teacher.requires_grad_(not freeze_teacher)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_teacher:
            self.teacher.eval()  # a frozen teacher gives its deterministic scores
        return self

    def forward(self, regions, image_lengths, captions, caption_lengths, image_indices=None, caption_indices=None):
        teacher_tokens = (None, image_lengths, None, caption_lengths)
        if self.cache is not None:  # the frozen teacher's tokens of these training images and captions
            teacher_tokens = self.cache.lookup(image_indices, caption_indices)
        elif self.needs_teacher:
            with torch.no_grad() if self.freeze_teacher else contextlib.nullcontext():
                teacher_tokens = (*self.teacher.encode_images(regions, image_lengths),
                                  *self.teacher.encode_captions(captions, caption_lengths))
        if self.student.backbone == "shared":
            image_tokens, caption_tokens = teacher_tokens[0], teacher_tokens[2]
        else:
            image_tokens, _ = self.student.image_tokens(regions, image_lengths)
            caption_tokens, _ = self.student.caption_tokens(captions, caption_lengths)
        image_embeddings = self.student.embed_image_tokens(image_tokens, teacher_tokens[1])
        caption_embeddings = self.student.embed_caption_tokens(caption_tokens, teacher_tokens[3])
        return (*teacher_tokens, image_tokens, caption_tokens, image_embeddings, caption_embeddings)


class TeacherTokenCache:
    """The frozen teacher's tokens of every training image and caption, encoded once (``cache_teacher_tokens``).

    ``image_tokens [N, R, D]`` / ``image_lengths [N]`` and ``caption_tokens
    [N_captions, L, D]`` / ``caption_lengths [N_captions]`` on the training
    device, in the dtype the teacher's encoders return (float32, or bf16 if
    autocast leaves their unit tokens in bf16). Exact
    for a frozen teacher in eval mode: training images have fixed features
    (no augmentation), so the tokens a step would compute are the cached ones.
    """

    def __init__(self, teacher: Teacher, source, tokenizer: Tokenizer, device: torch.device, autocast,
                 image_block: int = 256, caption_block: int = 1024):
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad(), autocast():
                image_parts = []
                for start in range(0, source.num_images, image_block):
                    regions, lengths = source.image_batch(range(start, min(start + image_block, source.num_images)))
                    image_parts.append(teacher.encode_images(regions.to(device), lengths.to(device)))
                ids, lengths = encode_captions(tokenizer, source.captions)
                caption_parts = [teacher.encode_captions(ids[start:start + caption_block].to(device),
                                                         lengths[start:start + caption_block].to(device))
                                 for start in range(0, ids.shape[0], caption_block)]
        finally:
            teacher.train(was_training)
        # blocks may be padded to different widths (precomputed features, captions): pad to the widest
        self.image_tokens, self.image_lengths = self._concatenate(image_parts)
        self.caption_tokens, self.caption_lengths = self._concatenate(caption_parts)

    @staticmethod
    def _concatenate(parts):
        width = max((tokens.shape[1] for tokens, _ in parts), default=0)
        return (torch.cat([F.pad(tokens, (0, 0, 0, width - tokens.shape[1])) for tokens, _ in parts]),
                torch.cat([lengths for _, lengths in parts]))

    def lookup(self, image_indices: torch.Tensor, caption_indices: torch.Tensor):
        """``(image_tokens, image_lengths, caption_tokens, caption_lengths)`` of a batch (captions cut to its longest)."""
        if image_indices is None or caption_indices is None:
            raise ValueError("a student stage with cached teacher tokens needs the batch's image and caption indices")
        caption_lengths = self.caption_lengths[caption_indices]
        width = int(caption_lengths.max()) if caption_lengths.numel() else 0
        return (self.image_tokens[image_indices], self.image_lengths[image_indices],
                self.caption_tokens[caption_indices, :width], caption_lengths)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.image_tokens, self.image_lengths,
                                                          self.caption_tokens, self.caption_lengths))


class _BaselineStage(nn.Module):
    """Baseline stage: a separate-backbone student's global embeddings, no teacher."""

    def __init__(self, baseline: Student):
        super().__init__()
        self.baseline = baseline

    def forward(self, regions, image_lengths, captions, caption_lengths):
        return self.baseline.encode_images(regions, image_lengths), self.baseline.encode_captions(captions, caption_lengths)


class _StageClock:
    """Seconds spent in a stage's training steps (data loading included, evaluation and checkpoints not)."""

    def __init__(self, budget: Optional[float], spent: float = 0.0):
        self.budget, self.spent, self._since = budget, spent, None
        self.cpu_spent, self._cpu_since = 0.0, None  # process CPU seconds (all threads) in the same intervals

    def start(self) -> None:
        self._since, self._cpu_since = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        if self._since is not None:
            self.spent += time.perf_counter() - self._since
            self.cpu_spent += time.process_time() - self._cpu_since
            self._since = self._cpu_since = None

    @property
    def elapsed(self) -> float:
        return self.spent + (time.perf_counter() - self._since if self._since is not None else 0.0)

    @property
    def expired(self) -> bool:
        return self.budget is not None and self.elapsed >= self.budget

    @property
    def fraction(self) -> float:
        """Share of the budget used, in [0, 1] (0 without a budget)."""
        return 0.0 if self.budget is None else min(1.0, self.elapsed / self.budget)


class Trainer:
    """Train a :class:`~aladin_fast.models.Teacher` and distil a :class:`~aladin_fast.models.Student`.

    Args:
        config: a :class:`TrainConfig` (validated here).
        train_data: ``SyntheticScenes``, ``PrecompDataset`` (with caption text)
            or :class:`~aladin_fast.training.data.PairSource`.
        val_data: same kinds, for periodic evaluation (optional).
        tokenizer: caption tokenizer; default: a :class:`~aladin_fast.data.Vocabulary`
            built from the training captions (saved in checkpoints).

    Usage::

        trainer = Trainer(TrainConfig(teacher_dim=128, ...), SyntheticScenes(600), SyntheticScenes(100, seed=1))
        trainer.fit()                      # the configured stages (teacher, then student)
        trainer.evaluate(model="student")  # {"i2t_r1": ..., "rsum": ...}

    ``trainer.baseline`` is the global-embedding baseline when ``"baseline"``
    is one of ``config.stages`` (else None).

    Under ``torchrun`` (process group initialised, e.g. by
    :func:`~aladin_fast.training.init_distributed`) the stage models are
    wrapped in DDP, ``batch_size`` is per process, and only rank 0 logs,
    evaluates and writes checkpoints.
    """

    def __init__(self, config: TrainConfig, train_data, val_data=None, tokenizer: Optional[Tokenizer] = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config.validate()
        self.context = current_context(config.device)
        self.device = self.context.device
        self.train_source = as_source(train_data)
        self.val_source = as_source(val_data) if val_data is not None else None
        self.tokenizer = tokenizer if tokenizer is not None else build_vocabulary(self.train_source, config.vocabulary_min_count)
        if not isinstance(self.tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must implement encode/decode/pad_id/__len__, got {type(self.tokenizer).__name__}")
        seed_everything(config.seed)
        self.teacher = Teacher(
            len(self.tokenizer), self.train_source.feature_dim, config.teacher_dim, config.teacher_layers,
            config.teacher_heads, config.teacher_ff_dim, config.dropout, config.teacher_text_layers,
            config.aggregation, config.padding, config.backend, self.tokenizer.pad_id,
        ).to(self.device)
        self.student = Student(
            config.student_dim, config.teacher_dim, config.student_layers, config.student_heads, None, config.dropout,
            config.student_backbone, len(self.tokenizer), self.train_source.feature_dim,
            config.student_backbone_layers, self.tokenizer.pad_id, config.student_pooling,
            config.student_project_tokens, config.student_projection_hidden,
        ).to(self.device)
        self.baseline: Optional[Student] = None
        if "baseline" in config.stages:
            self.baseline = Student(
                config.baseline_dim or config.student_dim, config.teacher_dim,
                config.student_layers if config.baseline_head_layers is None else config.baseline_head_layers,
                config.student_heads, config.teacher_ff_dim, config.dropout, "separate", len(self.tokenizer),
                self.train_source.feature_dim,
                config.teacher_layers if config.baseline_layers is None else config.baseline_layers,
                self.tokenizer.pad_id, config.baseline_pooling, config.baseline_project_tokens,
                config.baseline_projection_hidden,
            ).to(self.device)
        self.concept: Dict[str, ConceptAlignmentLoss] = {}
        for stage, weight in (("teacher", config.teacher_concept_weight), ("student", config.concept_weight)):
            if weight > 0:
                self.concept[stage] = ConceptAlignmentLoss(
                    config.teacher_dim, config.num_prototypes, config.sinkhorn_epsilon, config.sinkhorn_iterations,
                    config.concept_temperature,
                ).to(self.device)
        # different dropout masks per rank; same model init everywhere (seeded above, DDP broadcasts anyway)
        torch.manual_seed(config.seed + 1_000_003 * (self.context.rank + 1))
        self.history: List[Dict[str, Any]] = []
        self.progress = {"stage": None, "epoch": 0, "global_step": 0, "completed_stages": []}
        self.stage: Optional[str] = None
        self._stage_module: Optional[nn.Module] = None  # the stage module, DDP-wrapped when distributed
        self._module: Optional[nn.Module] = None  # the unwrapped stage module
        self._optimizer = self._scheduler = None
        self._pending_state: Optional[Dict[str, Any]] = None
        self._loader = self._sampler = self._dataset = None
        self._epoch = 0  # epoch within the current stage (selects the hinge warm-up)
        self._clock = _StageClock(None)
        self._cache: Optional[TeacherTokenCache] = None
        self._cache_seconds = (0.0, 0.0)  # (wall, CPU) seconds the last cache build took
        self._partial_epoch: Optional[tuple] = None  # (stage, epoch, batches trained) of an interrupted epoch
        self._checkpoint_due = False  # an epoch's checkpoint could not be written (fit() writes it first)

    # ------------------------------------------------------------- plumbing
    def _autocast(self):
        if self.config.amp == "off" or (self.config.amp == "auto" and self.device.type != "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _make_loader(self):
        dataset = CaptionIndexDataset(self.train_source.num_images, self.train_source.captions_per_image,
                                      self.config.one_caption_per_image, self.config.seed)
        self._dataset = dataset
        self._sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=self.context.world_size, rank=self.context.rank, shuffle=True,
            seed=self.config.seed, drop_last=False,
        )
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.config.batch_size, sampler=self._sampler,
            collate_fn=PairCollator(self.train_source, self.tokenizer), num_workers=self.config.num_workers,
        )
        return self._loader

    def collate(self, caption_indices) -> TrainBatch:
        """A :class:`TrainBatch` of the given training caption indices (for custom loops and tests)."""
        return PairCollator(self.train_source, self.tokenizer)(caption_indices)

    def begin_stage(self, stage: str) -> None:
        """Build the stage's trainable module (DDP-wrapped when distributed), optimiser and schedule."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if stage == "baseline" and self.baseline is None:
            raise ValueError("stage 'baseline' needs 'baseline' in config.stages (the model is built for it)")
        config = self.config
        # let go of the previous stage's module, optimiser and teacher-token cache first: the cache (the whole
        # training set's tokens) stayed alive through every later stage, and a student stage begun again
        # (fit() after fit(max_epochs=...)) held the old cache while encoding the new one (twice the memory)
        self._stage_module = self._module = self._cache = None
        self._optimizer = self._scheduler = None
        if stage == "teacher":
            self.teacher.requires_grad_(True)
            module = _TeacherStage(self.teacher, self.concept.get("teacher"))
            lr = config.lr
        elif stage == "student":
            needs_teacher = config.distill_weight > 0 or not config.freeze_teacher or config.student_backbone == "shared"
            self._cache = None
            if config.cache_teacher_tokens:
                wall, cpu = time.perf_counter(), time.process_time()
                self._cache = TeacherTokenCache(self.teacher, self.train_source, self.tokenizer, self.device,
                                                self._autocast)
                self._cache_seconds = (time.perf_counter() - wall, time.process_time() - cpu)
                logger.info("cached the teacher's tokens of %d images and %d captions: %.0f MB in %.1f s",
                            self.train_source.num_images, self.train_source.num_captions, self._cache.nbytes / 2**20,
                            self._cache_seconds[0])
            module = _StudentStage(self.student, self.teacher, config.freeze_teacher, needs_teacher,
                                   self.concept.get("student"), self._cache)
            lr = config.student_lr or config.lr
        else:
            module = _BaselineStage(self.baseline)
            lr = config.baseline_lr or config.lr
        epochs, seconds = config.stage_epochs(stage), config.stage_seconds(stage)
        if self._loader is None:
            self._make_loader()
        # cached teacher tokens replace the region features: the loader need not fetch (render) them
        self._loader.collate_fn.fetch_regions = not (stage == "student" and self._cache is not None)
        module.train()
        self.stage, self._module, self._epoch = stage, module, 0
        clock = self._clock = _StageClock(seconds)
        if self.context.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._stage_module = DistributedDataParallel(module, device_ids=device_ids)
        else:
            self._stage_module = module
        parameters = [p for p in module.parameters() if p.requires_grad]
        self._optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
        total = max(1, epochs * len(self._loader))
        # a time-boxed stage does not know its step count: its warm-up is the configured one
        warmup = config.warmup_steps if seconds is not None else min(config.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if config.schedule == "constant":
                return 1.0
            if clock.budget is not None:  # time-boxed stage: the schedule follows the clock
                progress = clock.fraction
            else:
                progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        self._scheduler = torch.optim.lr_scheduler.LambdaLR(self._optimizer, factor)

    def _gather(self, tensor, with_grad: bool):
        if tensor is None or not (self.config.gather_negatives and self.context.distributed):
            return tensor
        return all_gather_with_grad(tensor) if with_grad else all_gather_no_grad(tensor)

    # ----------------------------------------------------------------- losses
    def _losses(self, batch: TrainBatch) -> Dict[str, torch.Tensor]:
        config, gather = self.config, self._gather
        indices = {}
        if self.stage == "student" and self._cache is not None:
            indices = dict(image_indices=batch.image_indices, caption_indices=batch.caption_indices)
        with self._autocast():
            outputs = self._stage_module(batch.regions, batch.image_lengths, batch.captions, batch.caption_lengths,
                                         **indices)
        image_ids = gather(batch.image_indices, False)
        positives = image_ids[:, None] == image_ids[None, :]  # captions of one image are not negatives
        hardest = config.hardest_negative and self._epoch >= config.hinge_warmup_epochs
        hinge = dict(margin=config.margin, hardest_negative=hardest, reduction=config.hinge_reduction)
        parts: Dict[str, torch.Tensor] = {}
        if self.stage == "baseline":
            image_embeddings, caption_embeddings = outputs
            scores = Student.scores(gather(caption_embeddings, True), gather(image_embeddings, True))
            if config.baseline_loss == "infonce":
                parts["infonce"] = infonce_loss(scores, config.baseline_temperature, positive_mask=positives)
            else:
                parts["hinge"] = hinge_loss(scores, positive_mask=positives, **hinge)
            return parts
        if self.stage == "teacher":
            image_tokens, image_lengths, caption_tokens, caption_lengths = (
                gather(outputs[0], True), gather(outputs[1], False), gather(outputs[2], True), gather(outputs[3], False))
            scores = self.teacher.score(caption_tokens, caption_lengths, image_tokens, image_lengths)
            parts["hinge"] = hinge_loss(scores, positive_mask=positives, **hinge)
            if "teacher" in self.concept:
                parts["concept"] = config.teacher_concept_weight * self.concept["teacher"](
                    caption_tokens, caption_lengths, image_tokens, image_lengths)
            return parts
        t_image, image_lengths, t_caption, caption_lengths, s_image, s_caption, image_embeddings, caption_embeddings = outputs
        joint = not config.freeze_teacher
        image_lengths, caption_lengths = gather(image_lengths, False), gather(caption_lengths, False)
        student_scores = Student.scores(gather(caption_embeddings, True), gather(image_embeddings, True))
        if config.student_hinge_weight > 0:
            parts["hinge"] = config.student_hinge_weight * hinge_loss(student_scores, positive_mask=positives, **hinge)
        if config.distill_weight > 0 or joint:
            t_image, t_caption = gather(t_image, joint), gather(t_caption, joint)
            with contextlib.nullcontext() if joint else torch.no_grad():
                teacher_scores = self.teacher.score(t_caption, caption_lengths, t_image, image_lengths)
            if config.distill_weight > 0:
                parts["listnet"] = config.distill_weight * listnet_loss(
                    student_scores, teacher_scores, config.distill_temperature, config.distill_teacher_temperature)
            if joint and config.teacher_hinge_weight > 0:
                parts["teacher_hinge"] = config.teacher_hinge_weight * hinge_loss(
                    teacher_scores, positive_mask=positives, **hinge)
        if "student" in self.concept:
            parts["concept"] = config.concept_weight * self.concept["student"](
                gather(s_caption, True), caption_lengths, gather(s_image, True), image_lengths)
        if config.context_weight > 0:
            parts["context"] = config.context_weight * context_alignment_loss(
                student_scores, config.context_top_k, config.context_temperature, positives)
        return parts

    def train_step(self, batch: TrainBatch) -> Dict[str, float]:
        """One optimisation step of the current stage on ``batch``; returns the loss terms as floats."""
        if self._stage_module is None:
            raise RuntimeError(f"call begin_stage(one of {STAGES}) (or fit()) before train_step")
        batch = batch.to(self.device)
        parts = self._losses(batch)
        loss = sum(parts.values())
        values = {"loss": float(loss.detach())}
        values.update({name: float(value.detach()) for name, value in parts.items()})
        if not all(math.isfinite(v) for v in values.values()):
            # checked before the update: the model keeps its last finite weights (and the step is not counted)
            raise FloatingPointError(f"non-finite loss at step {self.progress['global_step'] + 1}: {values}; "
                                     "the weights were not updated")
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self._optimizer.param_groups for p in g["params"]],
                                           self.config.grad_clip)
        self._optimizer.step()
        self._scheduler.step()
        self.progress["global_step"] += 1
        return values

    # ------------------------------------------------------------- main loop
    def fit(self, max_epochs: Optional[int] = None) -> List[Dict[str, Any]]:
        """Run the configured stages (resuming where a loaded checkpoint stopped).

        Args:
            max_epochs: stop after this many epochs in this call (a time-boxed
                job; with ``output_dir`` a checkpoint is written there); a later
                ``resume`` + ``fit``, or ``fit`` again on this trainer, continues identically.

        Returns:
            ``self.history``.
        """
        if max_epochs is not None and (not isinstance(max_epochs, int) or isinstance(max_epochs, bool) or max_epochs < 0):
            raise ValueError(f"max_epochs must be None or a non-negative int, got {max_epochs!r}")
        budget = math.inf if max_epochs is None else max_epochs
        if self._checkpoint_due and self.config.output_dir:
            # the last fit() failed to write its epoch's checkpoint (a full disk): the file there is older than
            # this trainer, and a finished run would never write it again
            self._save_due_checkpoint()
        if self._loader is None:
            self._make_loader()
        for stage in self.config.stages:
            if stage in self.progress["completed_stages"]:
                continue
            if budget <= 0:  # do not begin (build, cache for) a stage that will not train
                break
            budget = self._run_stage(stage, budget)
            if budget <= 0 and stage not in self.progress["completed_stages"]:
                break
        return self.history

    def _run_stage(self, stage: str, budget: float) -> float:
        config = self.config
        timed = config.stage_seconds(stage) is not None
        epochs = math.inf if timed else config.stage_epochs(stage)
        same_stage = self.progress["stage"] == stage
        if same_stage and self._pending_state is None and self.stage == stage and self._optimizer is not None:
            # fit() again on this trainer after fit(max_epochs=...): the stage goes on with its optimiser and schedule
            self._pending_state = {"optimizer": self._optimizer.state_dict(), "scheduler": self._scheduler.state_dict()}
        resuming = same_stage and self._pending_state is not None
        start_epoch = self.progress["epoch"] if same_stage else 0
        self.begin_stage(stage)
        if not same_stage:  # a fresh stage: its totals start here (a resumed one keeps the checkpoint's)
            self.progress.update(stage_seconds=0.0, stage_cpu_seconds=0.0, stage_first_step=self.progress["global_step"],
                                 stage_wall_start=time.time(), stage_cache_seconds=0.0)
        self._clock.spent = self.progress.get("stage_seconds", 0.0)
        self._clock.cpu_spent = self.progress.get("stage_cpu_seconds", 0.0)
        if stage == "student" and self._cache is not None:  # building the cache is part of the stage's time
            self._clock.spent += self._cache_seconds[0]
            self._clock.cpu_spent += self._cache_seconds[1]
            self.progress["stage_cache_seconds"] = self.progress.get("stage_cache_seconds", 0.0) + self._cache_seconds[0]
        if resuming:
            self._optimizer.load_state_dict(self._pending_state["optimizer"])
            self._scheduler.load_state_dict(self._pending_state["scheduler"])
        self._pending_state = None
        self.progress.update(stage=stage, epoch=start_epoch)
        epoch = start_epoch
        while epoch < epochs and not (timed and self._expired()):
            if budget <= 0:
                return budget
            self._train_epoch(stage, epoch)
            budget -= 1
            epoch += 1
            self.progress.update(epoch=epoch, stage_seconds=self._clock.spent, stage_cpu_seconds=self._clock.cpu_spent)
            last = epoch == epochs or (timed and self._expired())
            if last:
                self.progress["completed_stages"] = [*self.progress["completed_stages"], stage]
                self._record_stage(stage)
            if self.val_source is not None and (epoch % config.eval_every == 0 or last):
                self._record_evaluation(stage, epoch - 1)
            # the epoch budget of this fit() is spent: checkpoint, so that resume + fit() goes on from here
            if config.output_dir and (epoch % config.checkpoint_every == 0 or last or budget <= 0):
                self._save_due_checkpoint()
        if stage not in self.progress["completed_stages"]:  # zero epochs configured
            self.progress["completed_stages"] = [*self.progress["completed_stages"], stage]
            self._record_stage(stage)
        return budget

    def _save_due_checkpoint(self) -> None:
        self._checkpoint_due = True  # until written
        self.save_checkpoint(os.path.join(self.config.output_dir, "checkpoint.pt"))
        self._checkpoint_due = False

    def _record_stage(self, stage: str) -> None:
        """A ``{"kind": "stage"}`` record of a finished stage: epochs, steps, training and CPU seconds, wall times.

        Totals over the whole stage, across resumes; ``seconds`` / ``cpu_seconds``
        count training steps only (data loading included, evaluation not).
        """
        progress = self.progress
        self._record({"kind": "stage", "stage": stage, "epochs": progress["epoch"],
                      "steps": progress["global_step"] - progress.get("stage_first_step", 0),
                      "step": progress["global_step"], "seconds": self._clock.spent, "cpu_seconds": self._clock.cpu_spent,
                      "budget_seconds": self._clock.budget, "wall_start": progress.get("stage_wall_start"),
                      "wall_end": time.time(),
                      **({"cache_seconds": progress.get("stage_cache_seconds", 0.0)} if stage == "student"
                         and self.config.cache_teacher_tokens else {})})

    def _expired(self) -> bool:
        """Whether the stage's time budget is spent (on any rank: ranks stop at the same step)."""
        expired = self._clock.expired
        if self.context.distributed:
            expired = reduce_mean([float(expired)])[0] > 0
        return expired

    def _train_epoch(self, stage: str, epoch: int) -> None:
        config, main = self.config, self.context.is_main
        self._sampler.set_epoch(epoch)
        self._dataset.set_epoch(epoch)
        self._epoch = epoch
        self._module.train()
        # fit() again after an exception (Ctrl-C, a non-finite loss, a failed write) left this epoch part-trained:
        # go on with its next batch. Re-running the epoch from its start trained its first batches twice (and
        # logged them twice), so the result depended on when the run was interrupted
        done = self._partial_epoch[2] if self._partial_epoch and self._partial_epoch[:2] == (stage, epoch) else 0
        loader, total = self._loader, len(self._loader)
        if done:
            remaining = list(self._sampler)[done * config.batch_size:]  # the loader's batches are these in order
            loader = torch.utils.data.DataLoader(self._dataset, batch_size=config.batch_size, sampler=remaining,
                                                 collate_fn=self._loader.collate_fn, num_workers=config.num_workers)
        bar = None
        if main and config.progress and tqdm is not None:
            bar = tqdm(total=total, initial=done, desc=f"{stage} epoch {epoch + 1}", leave=False, dynamic_ncols=True)
        sums: Dict[str, float] = {}
        count, started = 0, time.perf_counter()
        timed = self._clock.budget is not None
        self._clock.start()
        try:
            for index, batch in enumerate(loader, start=done):
                values = self.train_step(batch)
                self._partial_epoch = (stage, epoch, index + 1)
                stop = timed and self._expired()
                for name, value in values.items():
                    sums[name] = sums.get(name, 0.0) + value
                count += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.3f}")
                # a record every log_every steps of the epoch (counted from its start) and at its end
                if (index + 1) % config.log_every == 0 or index + 1 == total or stop:
                    names = sorted(sums)
                    means = reduce_mean([sums[n] / count for n in names])
                    record = {"kind": "train", "stage": stage, "epoch": epoch + 1, "step": self.progress["global_step"],
                              "lr": self._optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started,
                              **dict(zip(names, means))}
                    self._record(record)
                    if bar is None and main:
                        logger.info("%s epoch %d step %d loss %.4f", stage, epoch + 1, record["step"], record["loss"])
                    sums, count = {}, 0
                if stop:
                    break
            self._partial_epoch = None
        finally:  # also when interrupted: the steps taken count in the stage's seconds, and no bar is left open
            self._clock.stop()
            self.progress.update(stage_seconds=self._clock.spent, stage_cpu_seconds=self._clock.cpu_spent)
            if bar is not None:
                bar.close()

    def _record(self, record: Dict[str, Any]) -> None:
        if not self.context.is_main:
            return
        self.history.append(record)
        if self.config.output_dir:
            os.makedirs(self.config.output_dir, exist_ok=True)
            with open(os.path.join(self.config.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _record_evaluation(self, stage: str, epoch: int) -> None:
        if self.context.is_main:
            metrics = self.evaluate(model=stage)
            self._record({"kind": "eval", "stage": stage, "model": stage, "epoch": epoch + 1,
                          "step": self.progress["global_step"], **metrics})
            logger.info("%s epoch %d: rsum %.1f (i2t R@1 %.1f, t2i R@1 %.1f)", stage, epoch + 1, metrics["rsum"],
                        metrics["i2t_r1"], metrics["t2i_r1"])
        barrier()

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def score_matrix(self, data=None, model: str = "teacher", max_images: Optional[int] = None,
                     block: int = 256) -> torch.Tensor:
        """All-pairs scores ``[N_images, N_captions]`` float32 (CPU) of ``model`` on ``data`` (default: validation).

        ``model`` is ``"teacher"``, ``"student"`` or ``"baseline"``. Images are
        fetched and encoded ``block`` at a time; the teacher scores caption
        blocks against all image tokens with the fused op, the global models by
        cosine.
        """
        if model not in STAGES:
            raise ValueError(f"model must be one of {STAGES}, got {model!r}")
        if model == "baseline" and self.baseline is None:
            raise ValueError("this trainer has no baseline: add 'baseline' to config.stages")
        for name, value in (("max_images", max_images), ("block", block)):
            if (value is not None or name == "block") and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be {'None or ' if name == 'max_images' else ''}a positive int, got {value!r}")
        source = as_source(data) if data is not None else self.val_source
        if source is None:
            raise ValueError("data is required: this trainer has no validation data")
        count = min(source.num_images, max_images or self.config.eval_max_images or source.num_images)
        ids, lengths = encode_captions(self.tokenizer, source.captions[: count * source.captions_per_image])
        models = [m for m in (self.teacher, self.student, self.baseline) if m is not None]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        try:
            with self._autocast():
                image_parts = []
                for start in range(0, count, block):
                    regions, region_lengths = source.image_batch(range(start, min(start + block, count)))
                    regions, region_lengths = regions.to(self.device), region_lengths.to(self.device)
                    if model == "teacher":
                        image_parts.append(self.teacher.encode_images(regions, region_lengths))
                    elif model == "student":
                        image_parts.append(self.student.encode_images(regions, region_lengths, teacher=self.teacher))
                    else:
                        image_parts.append(self.baseline.encode_images(regions, region_lengths))
                out = torch.empty(count, ids.shape[0], dtype=torch.float32)
                if model == "teacher":
                    image_tokens = torch.cat([p[0].float() for p in image_parts])
                    image_lengths = torch.cat([p[1] for p in image_parts])
                else:
                    image_embeddings = torch.cat(image_parts)
                for start in range(0, ids.shape[0], 4 * block):
                    caption_ids = ids[start:start + 4 * block].to(self.device)
                    caption_lengths = lengths[start:start + 4 * block].to(self.device)
                    if model == "teacher":
                        tokens, token_lengths = self.teacher.encode_captions(caption_ids, caption_lengths)
                        scores = self.teacher.score(tokens.float(), token_lengths, image_tokens, image_lengths)
                    else:
                        if model == "student":
                            embeddings = self.student.encode_captions(caption_ids, caption_lengths, teacher=self.teacher)
                        else:
                            embeddings = self.baseline.encode_captions(caption_ids, caption_lengths)
                        scores = Student.scores(embeddings, image_embeddings)
                    out[:, start:start + caption_ids.shape[0]] = scores.T.float().cpu()
            return out
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)

    def evaluate(self, data=None, model: str = "teacher", max_images: Optional[int] = None) -> Dict[str, float]:
        """Retrieval metrics (R@1/5/10 both directions, medr, meanr, rsum) of ``model`` on ``data``."""
        source = as_source(data) if data is not None else self.val_source
        if source is None:
            raise ValueError("data is required: this trainer has no validation data")
        return retrieval_metrics(self.score_matrix(source, model, max_images), source.captions_per_image)

    # ------------------------------------------------------------ checkpoints
    def state(self) -> Dict[str, Any]:
        """The checkpoint payload (see :mod:`aladin_fast.training.checkpoint`)."""
        words = self.tokenizer.itos[4:] if isinstance(self.tokenizer, Vocabulary) else None
        in_progress = self._optimizer is not None and self.progress["stage"] not in self.progress["completed_stages"]
        return {
            "config": self.config.to_dict(),
            "vocabulary": words,
            "teacher": ckpt.model_state(self.teacher),
            "student": ckpt.model_state(self.student),
            "baseline": ckpt.model_state(self.baseline),
            "extras": {f"concept_{stage}": module.state_dict() for stage, module in self.concept.items()},
            "progress": dict(self.progress),
            # only a stage in progress needs them (resume ignores a finished stage's): a finished teacher's AdamW
            # moments were twice the teacher's size in every later checkpoint
            "optimizer": self._optimizer.state_dict() if in_progress else None,
            "scheduler": self._scheduler.state_dict() if in_progress else None,
            "rng": ckpt.rng_state(),
            "history": list(self.history),
        }

    def save_checkpoint(self, path: str) -> None:
        """Write a checkpoint atomically (rank 0 only; other ranks wait at a barrier).

        Under DDP it keeps every rank's random generators (``rank_rng``): their dropout masks differ.
        """
        rank_rng = all_gather_object(ckpt.rng_state()) if self.context.distributed else None
        if self.context.is_main:
            ckpt.save_checkpoint(path, {**self.state(), "rank_rng": rank_rng})
        barrier()

    def resume(self, path: str) -> "Trainer":
        """Load models, optimiser, schedule, RNG, progress and history from ``path``; :meth:`fit` continues.

        ``metrics.jsonl`` in ``output_dir`` is cut after the checkpoint's last record (if it holds it), so that it
        ends up as an uninterrupted run's.
        """
        payload = ckpt.load_checkpoint(path, map_location=self.device)
        for name, model in self._loadable(payload, path, ("teacher", "student", "baseline")):
            model.load_state_dict(payload[name]["state_dict"])
        for stage, module in self.concept.items():
            state = payload.get("extras", {}).get(f"concept_{stage}")
            if state is not None:
                module.load_state_dict(state)
        self.progress = dict(payload["progress"])
        self.progress["completed_stages"] = list(self.progress["completed_stages"])
        self._partial_epoch = None  # the checkpoint's epoch starts afresh
        self._checkpoint_due = False
        self.history = list(payload.get("history", []))
        self._drop_records_after_checkpoint()
        if payload.get("optimizer") is not None and self.progress["stage"] not in self.progress["completed_stages"]:
            self._pending_state = {"optimizer": payload["optimizer"], "scheduler": payload["scheduler"]}
        rank_rng = payload.get("rank_rng")  # each rank's own generators (DDP), if saved at this world size
        if rank_rng is not None and len(rank_rng) == self.context.world_size:
            ckpt.set_rng_state(rank_rng[self.context.rank])
        else:
            ckpt.set_rng_state(payload["rng"])
        return self

    def _drop_records_after_checkpoint(self) -> None:
        """Cut ``metrics.jsonl`` after the checkpoint's last record: the lines a run wrote after its last checkpoint
        (a crash or preemption mid-epoch) are written again by the resumed run."""
        if not (self.context.is_main and self.config.output_dir and self.history):
            return
        path = os.path.join(self.config.output_dir, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        with open(path, "rb+") as handle:
            lines = handle.readlines()
            last = (json.dumps(self.history[-1]) + "\n").encode("utf-8")
            if last in lines:  # else another run's file: leave it as it is
                handle.truncate(sum(map(len, lines[: len(lines) - lines[::-1].index(last)])))

    def load_teacher(self, path: str) -> "Trainer":
        """Take the teacher weights of a checkpoint (e.g. to run only the student stage).

        The checkpoint's vocabulary and teacher hparams must be this trainer's (as for :meth:`resume`).
        """
        payload = ckpt.load_checkpoint(path, map_location=self.device)
        if payload.get("teacher") is None:
            raise ValueError(f"checkpoint {path} holds no teacher")
        for name, model in self._loadable(payload, path, ("teacher",)):
            model.load_state_dict(payload[name]["state_dict"])
        return self

    def _loadable(self, payload: Dict[str, Any], path: str, names) -> List[Any]:
        """``(name, model)`` of ``names`` that the checkpoint holds; ValueError if its vocabulary or hparams differ
        (the alignment backend aside: it is how this machine runs the model, not part of the weights)."""
        words = payload.get("vocabulary")
        if words is not None and isinstance(self.tokenizer, Vocabulary) and self.tokenizer.itos[4:] != list(words):
            raise ValueError(f"checkpoint {path} was trained with a different vocabulary ({len(words) + 4} tokens "
                             f"vs {len(self.tokenizer)}); pass tokenizer=Vocabulary(words) from the checkpoint")
        models = {"teacher": self.teacher, "student": self.student, "baseline": self.baseline}
        loadable = []
        for name in names:
            model = models[name]
            if model is not None and payload.get(name) is not None:
                if ckpt.architecture(payload[name]["hparams"]) != ckpt.architecture(model.hparams):
                    raise ValueError(f"checkpoint {path}: {name} hparams {payload[name]['hparams']} differ from this "
                                     f"config's {model.hparams}")
                loadable.append((name, model))
        return loadable
