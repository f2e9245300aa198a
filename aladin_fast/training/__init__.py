"""Training: the teacher / student trainer, its config, checkpoints and distributed helpers.

::

    from aladin_fast.training import Trainer, TrainConfig
    trainer = Trainer(TrainConfig(...), train_data, val_data)
    trainer.fit()

Command line: ``python -m aladin_fast.training train --config run.toml [--field value ...]``
(``torchrun --nproc_per_node N -m aladin_fast.training train ...`` for DDP).
"""
from .checkpoint import FORMAT_VERSION, load_checkpoint, load_models, save_checkpoint
from .config import TUNED_STUDENT, TrainConfig
from .data import PairSource, TrainBatch, as_source, build_datasets
from .distributed import DistributedContext, all_gather_with_grad, destroy_distributed, init_distributed
from .trainer import TeacherTokenCache, Trainer, seed_everything

__all__ = [
    "Trainer", "TrainConfig", "TUNED_STUDENT", "TeacherTokenCache", "seed_everything",
    "save_checkpoint", "load_checkpoint", "load_models", "FORMAT_VERSION",
    "PairSource", "TrainBatch", "as_source", "build_datasets",
    "DistributedContext", "init_distributed", "destroy_distributed", "all_gather_with_grad",
]
