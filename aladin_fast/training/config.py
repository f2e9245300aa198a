"""Training configuration: one flat dataclass, loadable from TOML / JSON / YAML files and flags.

Every field has a default that trains the paper-sized models (D = 1024 teacher,
D_s = 768 student); tests and the CPU demo shrink them. Fields are grouped by
prefix: data, ``teacher_*``, ``student_*``, ``baseline_*``, optimisation,
losses, run control.
:meth:`TrainConfig.validate` checks every field and names the bad one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["TUNED_STUDENT", "TrainConfig", "load_config_file", "add_config_arguments", "config_from_arguments"]

STAGES = ("teacher", "student", "baseline")
DEFAULT_STAGES = ("teacher", "student")
BASELINE_LOSSES = ("hinge", "infonce")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("auto", "bf16", "off")
DATA_KINDS = ("synthetic", "precomp")

# The student recipe tuned on a saved teacher (docs/training.md) and used by the training acceptance run and the
# demo: no transformer layer in the heads, every frozen-teacher token projected to student_dim and max-pooled,
# ListNet only, towards a sharpened teacher (scores / 0.1) with student cosines x 20, lr 4e-3, on the teacher's
# tokens cached once (no teacher encoders per step). TrainConfig fields; TrainConfig(**TUNED_STUDENT, ...).
TUNED_STUDENT = dict(
    student_dim=512, student_layers=0, student_pooling="max", student_project_tokens=True,
    student_hinge_weight=0.0, distill_temperature=20.0, distill_teacher_temperature=0.1, student_lr=4e-3,
    cache_teacher_tokens=True,
)


@dataclass
class TrainConfig:
    """Everything a training run needs (see the module docstring for the groups).

    Data: ``data`` is ``"synthetic"`` (:class:`~aladin_fast.data.SyntheticScenes`
    with ``synthetic_*`` sizes) or ``"precomp"`` (:class:`~aladin_fast.data.PrecompDataset`
    under ``data_root``); the :class:`~aladin_fast.training.Trainer` also accepts
    dataset objects directly, and then these fields are ignored.
    """

    # data (used by build_datasets / the command line)
    data: str = "synthetic"
    data_root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "dev"
    synthetic_train_images: int = 10000
    synthetic_val_images: int = 1000
    synthetic_feature_dim: int = 2048
    synthetic_seed: int = 0
    vocabulary_min_count: int = 1

    # teacher (TERAN-style)
    teacher_dim: int = 1024
    teacher_layers: int = 2
    teacher_text_layers: Optional[int] = None
    teacher_heads: int = 8
    teacher_ff_dim: Optional[int] = None
    aggregation: str = "MrSw"
    padding: str = "neg_inf"
    backend: str = "auto"

    # student (ALADIN-style)
    student_dim: int = 768
    student_layers: int = 1
    student_heads: int = 8
    student_backbone: str = "shared"
    student_backbone_layers: int = 1
    student_pooling: str = "first"  # "first" (ALADIN first-token head), "mean" or "max"
    # mean / max pooling only: project every token to student_dim before pooling (VSE-infinity style), with a
    # linear layer (student_projection_hidden None) or an MLP of that hidden width
    student_project_tokens: bool = False
    student_projection_hidden: Optional[int] = None
    freeze_teacher: bool = True
    # student stage with a frozen shared-backbone teacher: encode every training image and caption once with the
    # teacher when the stage starts (counted in its time) and train the heads on those tokens (no region
    # features and no teacher encoders per step); the training set's tokens must fit in device memory
    cache_teacher_tokens: bool = False

    # global-embedding baseline (stage "baseline"): a Student with its own encoders (as wide and deep as
    # the teacher's) and pooling heads, trained directly on the pairs with no teacher
    baseline_dim: Optional[int] = None  # embedding size (default: student_dim)
    baseline_layers: Optional[int] = None  # encoder layers (default: teacher_layers)
    baseline_head_layers: Optional[int] = None  # transformer layers of each pooling head (default: student_layers)
    baseline_pooling: str = "first"  # "first" (ALADIN first token), "mean" or "max" (VSE-style)
    baseline_project_tokens: bool = False  # as student_project_tokens
    baseline_projection_hidden: Optional[int] = None  # as student_projection_hidden
    baseline_loss: str = "hinge"  # "hinge" (VSE++, as the teacher) or "infonce"
    baseline_temperature: float = 0.05  # of "infonce"
    baseline_lr: Optional[float] = None  # default: lr

    # stages and optimisation
    stages: Tuple[str, ...] = DEFAULT_STAGES
    teacher_epochs: int = 10
    student_epochs: int = 10
    baseline_epochs: int = 10
    # wall-clock budgets: a stage with one trains until its training steps have used this many seconds
    # (its epochs are then unbounded, the cosine schedule follows elapsed time, evaluation is not counted)
    teacher_seconds: Optional[float] = None
    student_seconds: Optional[float] = None
    baseline_seconds: Optional[float] = None
    batch_size: int = 128
    one_caption_per_image: bool = False  # an epoch visits each image once with a random caption (5x shorter)
    lr: float = 2e-4
    student_lr: Optional[float] = None
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 2.0
    dropout: float = 0.1

    # losses
    margin: float = 0.2
    hardest_negative: bool = True
    hinge_warmup_epochs: int = 1  # first epochs of each stage sum over all negatives (hardest-only collapses from scratch)
    hinge_reduction: str = "sum"
    student_hinge_weight: float = 1.0
    distill_weight: float = 1.0
    distill_temperature: float = 6.0  # ListNet: multiplies the student's cosines
    distill_teacher_temperature: float = 1.0  # ListNet: divides the teacher's scores (< 1 sharpens the target)
    teacher_hinge_weight: float = 1.0  # student stage with freeze_teacher=False (joint training)
    concept_weight: float = 0.0
    teacher_concept_weight: float = 0.0
    context_weight: float = 0.0
    num_prototypes: int = 1024
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    concept_temperature: float = 0.1
    context_top_k: int = 512
    context_temperature: float = 0.7
    gather_negatives: bool = False

    # run control
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    num_workers: int = 0
    output_dir: Optional[str] = None
    checkpoint_every: int = 1
    eval_every: int = 1
    eval_max_images: Optional[int] = None
    log_every: int = 10
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Check every field; raise ``ValueError`` naming the first bad one. Returns ``self``."""
        if not isinstance(self.stages, (list, tuple)) or not all(isinstance(s, str) for s in self.stages):
            raise ValueError(f"stages must be a non-empty list of {STAGES} without repeats, got {self.stages!r}")
        self.stages = tuple(self.stages)
        for item in fields(self):  # types first: a "false" string is truthy, a string dropout cannot be compared
            value, kind = getattr(self, item.name), str(item.type)
            optional = kind.startswith("Optional[") and value is None
            if kind == "Optional[str]" and isinstance(value, os.PathLike):  # data_root, output_dir
                value = os.fspath(value)
                setattr(self, item.name, value)
            if kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{item.name} must be a bool (true / false), got {value!r}")
            if kind in ("str", "Optional[str]") and not optional and not isinstance(value, str):
                raise ValueError(f"{item.name} must be a {'string or None' if kind != 'str' else 'string'}, got {value!r}")
            if kind in ("float", "Optional[float]") and not optional and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{item.name} must be a number{' or None' if kind != 'float' else ''}, got {value!r}")
        choices = {"data": DATA_KINDS, "schedule": SCHEDULES, "amp": AMP_MODES,
                   "student_backbone": ("shared", "separate"), "hinge_reduction": ("sum", "mean"),
                   "aggregation": ("MrSw", "MrAVGw", "MwSr", "symm", "sum", "mean"),
                   "padding": ("neg_inf", "zero"), "backend": ("auto", "cpu", "triton", "reference"),
                   "baseline_loss": BASELINE_LOSSES, "baseline_pooling": ("first", "mean", "max"),
                   "student_pooling": ("first", "mean", "max")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.stages or any(stage not in STAGES for stage in self.stages) or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must be a non-empty subset of {STAGES} without repeats, got {self.stages!r}")
        positive_ints = ("teacher_dim", "teacher_heads", "student_dim", "student_heads", "batch_size",
                         "num_prototypes", "sinkhorn_iterations", "context_top_k", "checkpoint_every",
                         "eval_every", "log_every", "synthetic_train_images", "synthetic_val_images",
                         "synthetic_feature_dim", "vocabulary_min_count")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("teacher_layers", "student_layers", "student_backbone_layers", "teacher_epochs", "hinge_warmup_epochs",
                     "student_epochs", "baseline_epochs", "warmup_steps", "num_workers", "seed", "synthetic_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.seed >= 2**63:  # torch.manual_seed(seed + per-rank offset) overflows 64 bits beyond
            raise ValueError(f"seed must be below 2**63, got {self.seed!r}")
        for name in ("teacher_text_layers", "teacher_ff_dim", "eval_max_images", "baseline_dim", "baseline_layers",
                     "baseline_head_layers", "student_projection_hidden", "baseline_projection_hidden"):
            value = getattr(self, name)
            least = 0 if name in ("teacher_text_layers", "baseline_layers", "baseline_head_layers") else 1
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise ValueError(f"{name} must be None or a {'non-negative' if least == 0 else 'positive'} int, got {value!r}")
        for name in ("lr", "distill_temperature", "distill_teacher_temperature", "sinkhorn_epsilon", "concept_temperature", "context_temperature",
                     "baseline_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        # finite: an infinite lr failed at the second step, an infinite time budget trained forever (None = no budget)
        for name in ("student_lr", "baseline_lr", "teacher_seconds", "student_seconds", "baseline_seconds"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not 0 < value < math.inf):
                raise ValueError(f"{name} must be None or a positive finite number, got {value!r}")
        for name in ("weight_decay", "grad_clip", "margin", "student_hinge_weight", "distill_weight",
                     "teacher_hinge_weight", "concept_weight", "teacher_concept_weight", "context_weight"):
            value = getattr(self, name)
            finite = name != "grad_clip"  # grad_clip = inf: clip nothing, like 0
            if not isinstance(value, (int, float)) or not (0 <= value < math.inf or (not finite and value == math.inf)):
                raise ValueError(f"{name} must be a non-negative{' finite' if finite else ''} number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.teacher_dim % self.teacher_heads:
            raise ValueError(f"teacher_heads must divide teacher_dim={self.teacher_dim}, got {self.teacher_heads}")
        token_dim = self.teacher_dim  # the student heads read tokens of the teacher's width
        if token_dim % self.student_heads:
            raise ValueError(f"student_heads must divide the token width {token_dim}, got {self.student_heads}")
        if self.concept_weight > 0 and self.student_backbone == "shared" and self.freeze_teacher:
            raise ValueError(
                "concept_weight > 0 needs trainable tokens in the student stage: use student_backbone='separate' "
                "or freeze_teacher=False (with a frozen shared backbone only the prototypes would learn)"
            )
        for model in ("student", "baseline"):
            if getattr(self, f"{model}_project_tokens") and getattr(self, f"{model}_pooling") == "first":
                raise ValueError(f"{model}_project_tokens needs {model}_pooling 'mean' or 'max', "
                                 f"got {getattr(self, f'{model}_pooling')!r}")
        for name in ("student_project_tokens", "baseline_project_tokens", "cache_teacher_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.cache_teacher_tokens and not (self.freeze_teacher and self.student_backbone == "shared"):
            raise ValueError("cache_teacher_tokens needs freeze_teacher=True and student_backbone='shared' "
                             f"(got freeze_teacher={self.freeze_teacher!r}, student_backbone={self.student_backbone!r})")
        if self.data == "precomp" and not self.data_root:
            raise ValueError("data_root is required when data='precomp'")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device must be 'auto' or a torch device (cpu, cuda, cuda:N), got {self.device!r}") from None
        return self

    def stage_epochs(self, stage: str) -> int:
        """Configured epochs of ``stage`` ("teacher", "student" or "baseline")."""
        return getattr(self, f"{stage}_epochs")

    def stage_seconds(self, stage: str) -> Optional[float]:
        """Wall-clock training budget of ``stage`` in seconds (None: train for its epochs)."""
        return getattr(self, f"{stage}_seconds")

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-serialisable dict (tuples become lists)."""
        out = asdict(self)
        out["stages"] = list(self.stages)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("stages"), list):
            values["stages"] = tuple(values["stages"])
        return cls(**values).validate()

    @classmethod
    def from_file(cls, path: str, overrides: Optional[Mapping[str, Any]] = None) -> "TrainConfig":
        """Load a ``.toml``, ``.json`` or ``.yaml`` file (a ``[train]`` table is accepted too), then apply ``overrides``."""
        values = load_config_file(path)
        values.update(overrides or {})
        return cls.from_dict(values)

    def replace(self, **changes) -> "TrainConfig":
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes).validate()


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a config file into a dict; the format follows the extension (.toml, .json, .yaml / .yml)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    if extension == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10 (python_requires >= 3.10): the same parser as the tomli package
            import tomli as tomllib

        with open(path, "rb") as handle:
            try:
                values = tomllib.load(handle)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"config file {path} is not valid TOML: {error}") from None
    elif extension == ".json":
        with open(path, encoding="utf-8") as handle:
            try:
                values = json.load(handle)
            except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    elif extension in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError(f"reading {path} needs PyYAML (pip install pyyaml), or use a .toml / .json config") from None
        with open(path, encoding="utf-8") as handle:
            try:
                values = yaml.safe_load(handle) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                raise ValueError(f"config file {path} is not valid YAML: {error}") from None
    else:
        raise ValueError(f"config file must end in .toml, .json, .yaml or .yml, got {path!r}")
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table/mapping at the top level")
    if set(values) == {"train"} and isinstance(values["train"], dict):
        values = values["train"]
    return values


class _GivenNone:
    """A flag's parsed value for "none": an explicit None, unlike the flag's default None (not given)."""

    def __repr__(self) -> str:
        return "None"


GIVEN_NONE = _GivenNone()
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _flag_type(field_type: Any, default: Any):
    """Parser of one flag's text; errors are ``argparse.ArgumentTypeError`` (a usage error, not a traceback)."""
    text = str(field_type)

    def number(kind):
        def parse(value: str):
            if value.lower() == "none":
                return GIVEN_NONE  # None for an Optional field; validate() names any other field
            try:
                return kind(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'} or none, "
                                                 f"got {value!r}") from None
        return parse

    if "bool" in text:
        def boolean(value: str) -> bool:
            if value.lower() not in _BOOLEANS:
                raise argparse.ArgumentTypeError(f"expected one of {'/'.join(_BOOLEANS)}, got {value!r}")
            return _BOOLEANS[value.lower()]
        return boolean
    if "Tuple" in text:
        return lambda value: tuple(part for part in value.split(",") if part)
    if "int" in text:
        return number(int)
    if "float" in text:
        return number(float)
    return lambda value: GIVEN_NONE if value.lower() == "none" and default is None else value


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--field-name VALUE`` flag per :class:`TrainConfig` field (default: not given).

    ``none`` sets an Optional field to None (over a config file's value too).
    """
    group = parser.add_argument_group("training configuration (override the config file)")
    for item in fields(TrainConfig):
        default = item.default if item.default is not dataclasses.MISSING else None
        group.add_argument(
            f"--{item.name.replace('_', '-')}", dest=item.name, default=None, metavar="VALUE",
            type=_flag_type(item.type, default), help=f"(default: {default!r})",
        )


def config_from_arguments(args: argparse.Namespace, config_path: Optional[str] = None) -> TrainConfig:
    """Config file (if any) overridden by the flags that were given."""
    overrides = {item.name: None if getattr(args, item.name) is GIVEN_NONE else getattr(args, item.name)
                 for item in fields(TrainConfig) if getattr(args, item.name, None) is not None}
    if config_path:
        return TrainConfig.from_file(config_path, overrides)
    return TrainConfig.from_dict(overrides)
