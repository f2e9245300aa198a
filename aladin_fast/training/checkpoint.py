"""Checkpoints: one versioned file with models, vocabulary, config, optimiser and progress.

A checkpoint is a ``torch.save`` dict (loaded back with ``weights_only=True``:
only tensors and plain Python containers inside, no pickled classes)::

    format      "aladin_fast.training.checkpoint"
    version     FORMAT_VERSION (an older or newer file raises on load)
    config      TrainConfig.to_dict()
    vocabulary  list of words (ids 4, 5, ...) of the Vocabulary, or None
    teacher     {"hparams": ..., "state_dict": ...}
    student     {"hparams": ..., "state_dict": ...} or None
    baseline    {"hparams": ..., "state_dict": ...} or None (a Student with its own encoders)
    extras      {name: state_dict} (e.g. SelfAlign prototypes)
    progress    {"stage", "epoch", "global_step", "completed_stages", "stage_seconds", "stage_cpu_seconds",
                "stage_first_step", "stage_wall_start", "stage_cache_seconds"} (the last five: the stage in
                progress: training and CPU seconds so far, first step, wall-clock start, token-cache seconds)
    optimizer / scheduler   state of the stage in progress (or None)
    rng         torch / CUDA / Python / NumPy generator states
    rank_rng    under DDP: every rank's generator states, in rank order (else None)
    history     the training curve (list of dicts)

Writes are atomic: the file is written to a temporary name in the same
folder, flushed and fsynced, then ``os.replace``d over the target, so a crash
leaves either the old checkpoint or the new one, never half of one. A write
that fails (a full disk) raises ``OSError`` naming the checkpoint and keeps
the previous one.

The teacher's ``backend`` in its hparams is how it ran, not part of its
weights: :func:`load_models` picks the loading device's own (``"auto"``)
unless told otherwise, and a Trainer resumes a checkpoint trained on another
backend.
"""
from __future__ import annotations

import errno
import os
import random
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from .._io import write_atomic
from ..data.vocab import Vocabulary
from ..models import Student, Teacher

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "load_models",
    "rng_state",
    "set_rng_state",
]

FORMAT_NAME = "aladin_fast.training.checkpoint"
FORMAT_VERSION = 1


# execution settings kept with a model's hparams that do not shape its weights
RUNTIME_HPARAMS = ("backend",)


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """Write ``payload`` (without ``format`` / ``version``; they are added) atomically to ``path``.

    Raises:
        OSError: the write failed (e.g. ``ENOSPC``, a full disk): the message names ``path`` and the file there,
            if any, is still the previous checkpoint.
    """
    payload = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **payload}
    try:
        write_atomic(path, lambda handle: torch.save(payload, handle))
    except (OSError, RuntimeError) as error:
        # torch.save turns a failed write into "[enforce fail at inline_container.cc] unexpected pos ..." (or the
        # bare OSError of the final flush surfaces, without the file's name): say which file, why, and what is kept
        cause = error
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is None:
            raise
        kept = "the previous checkpoint there is kept" if os.path.exists(path) else "no checkpoint was written"
        reason = cause.strerror or str(cause)
        code = cause.errno if cause.errno is not None else errno.EIO
        raise OSError(code, f"cannot write checkpoint {path}: {reason}; {kept}") from error


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read and check a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a checkpoint of this format, or another format version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not an {FORMAT_NAME} file (missing or wrong 'format')")
    if payload.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {payload.get('version')!r}; this aladin_fast reads "
            f"version {FORMAT_VERSION}"
        )
    return payload


def model_state(model: Optional[torch.nn.Module]) -> Optional[Dict[str, Any]]:
    """``{"hparams", "state_dict"}`` of a Teacher / Student (None passes through)."""
    if model is None:
        return None
    return {"hparams": dict(model.hparams), "state_dict": model.state_dict()}


def architecture(hparams: Dict[str, Any]) -> Dict[str, Any]:
    """``hparams`` without the execution settings (:data:`RUNTIME_HPARAMS`): what must match to load the weights."""
    return {name: value for name, value in dict(hparams).items() if name not in RUNTIME_HPARAMS}


def build_model(kind: str, state: Optional[Dict[str, Any]], backend: Optional[str] = None):
    """Rebuild a ``"teacher"``, ``"student"`` or ``"baseline"`` from :func:`model_state` output (None passes through).

    ``backend`` (a teacher's alignment backend) replaces the saved one unless None.
    """
    if state is None:
        return None
    hparams = dict(state["hparams"])
    if kind == "teacher" and backend is not None:
        hparams["backend"] = backend
    model = (Teacher if kind == "teacher" else Student)(**hparams)
    model.load_state_dict(state["state_dict"])
    return model


def load_models(path: str, map_location: Any = "cpu", backend: Optional[str] = "auto"
                ) -> Tuple[Teacher, Optional[Student], Optional[Vocabulary]]:
    """``(teacher, student or None, vocabulary or None)`` from a checkpoint, in eval mode.

    ``backend`` is the teacher's alignment backend: ``"auto"`` (default) picks the one of the device its tokens
    are on, so a checkpoint trained with ``backend="triton"`` on a GPU scores on a CPU (and one trained with
    ``"cpu"`` on a GPU); None keeps the backend it was trained with.

    The student is None when the checkpoint has none, or when it comes from a Trainer whose student stage
    has not begun (a teacher-only or baseline run: its student weights were never trained).

    For inference and building a retriever: ``student.encode_images(regions,
    lengths, teacher=teacher)`` for a shared backbone.
    """
    payload = load_checkpoint(path, map_location)
    teacher = build_model("teacher", payload["teacher"], backend)
    progress = payload.get("progress")
    # a Trainer checkpoint holds a student from the start; before its stage has begun it is untrained weights,
    # which would evaluate and serve as if they were the distilled model
    student_started = not isinstance(progress, dict) or "student" in progress.get("completed_stages", ()) \
        or progress.get("stage") == "student"
    student = build_model("student", payload.get("student")) if student_started else None
    words = payload.get("vocabulary")
    vocabulary = Vocabulary(words) if words is not None else None
    for model in (teacher, student):
        if model is not None:
            model.eval()
    return teacher, student, vocabulary


def rng_state() -> Dict[str, Any]:
    """Every random generator's state in checkpoint-safe types (tensors, ints, lists)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].cpu().numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
