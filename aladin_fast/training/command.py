"""Command line of the trainer: ``train`` with a config file and/or one flag per config field.

Examples::

    python -m aladin_fast.training train --config run.toml
    python -m aladin_fast.training train --data synthetic --synthetic-train-images 2000 \\
        --teacher-dim 256 --output-dir runs/small
    torchrun --nproc_per_node 2 -m aladin_fast.training train --config run.toml
    python -m aladin_fast.training train --config run.toml --resume runs/small/checkpoint.pt
    # the global-embedding baseline (no teacher), for 270 s of training steps instead of epochs
    python -m aladin_fast train --stages baseline --baseline-seconds 270 --output-dir runs/baseline

The config file is TOML, JSON or YAML (PyYAML needed) with :class:`TrainConfig`
fields at the top level or in a ``[train]`` table; flags override it. Metrics
go to ``{output_dir}/metrics.jsonl`` and the final metrics are printed as JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from ..cli import program
from .config import add_config_arguments, config_from_arguments

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program(),
                                     description="train an aladin-fast teacher, distil a student, "
                                                 "or train the global-embedding baseline")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run the configured training stages")
    train.add_argument("--config", default=None, help="TOML / JSON / YAML file of TrainConfig fields")
    train.add_argument("--resume", default=None, help="checkpoint to resume from")
    train.add_argument("--max-epochs", type=int, default=None, help="stop after this many epochs (resume later)")
    add_config_arguments(train)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:  # a bad config file / field value is a usage error (exit 2 with the message), not a traceback
        config = config_from_arguments(args, args.config)
    except (ValueError, OSError, ImportError) as error:
        parser.error(str(error))
    if args.max_epochs is not None and args.max_epochs < 0:  # fit() would silently train nothing
        parser.error(f"argument --max-epochs: must be a non-negative int, got {args.max_epochs}")
    from .data import build_datasets
    from .distributed import destroy_distributed, init_distributed
    from .trainer import Trainer

    if config.device != "auto":
        from ..evaluate import resolve_device

        try:  # "cuda" on a machine without CUDA was an AssertionError traceback from torch
            resolve_device(config.device)
        except ValueError as error:
            parser.error(str(error))
    try:  # the data fields name files: a missing or malformed split is a usage error too
        train, val = build_datasets(config)
    except (ValueError, OSError) as error:
        parser.error(f"data: {error}")
    context = init_distributed(device=config.device)
    try:
        trainer = Trainer(config, train, val)
        if args.resume:
            try:  # a missing, foreign or mismatched checkpoint is a usage error too
                trainer.resume(args.resume)
            except (ValueError, OSError) as error:
                parser.error(f"--resume: {error}")
        trainer.fit(max_epochs=args.max_epochs)
        if context.is_main:
            evaluations = [record for record in trainer.history if record.get("kind") == "eval"]
            print(json.dumps(evaluations[-1] if evaluations else {"history": len(trainer.history)}, indent=1))
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
