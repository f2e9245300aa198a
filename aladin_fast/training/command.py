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

SIGTERM (a scheduler's preemption, torchrun stopping its workers) stops the
run like Ctrl-C: a checkpoint being written is abandoned (the previous one
stays, no temporary file is left) and the command exits with 143, naming the
checkpoint to ``--resume`` from.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
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


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM (a BaseException: no ``except Exception`` on the way swallows it)."""


def _raise_terminated(signum, frame):
    raise _Terminated()


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
    # SIGTERM killed the process where it stood: a checkpoint being written left its temporary file (as large as
    # a checkpoint) in output_dir; raised as an exception, the atomic write removes it and the exit is clean
    handle_sigterm = threading.current_thread() is threading.main_thread()  # (signal handlers: main thread only)
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handle_sigterm else None
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
    except _Terminated:
        if context.is_main:
            checkpoint = os.path.join(config.output_dir, "checkpoint.pt") if config.output_dir else None
            kept = (f"continue with --resume {checkpoint}" if checkpoint and os.path.isfile(checkpoint)
                    else "no checkpoint was written")
            print(f"{program('train')}: stopped by SIGTERM; {kept}", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if handle_sigterm:  # (None: a handler not installed from Python; the default is the best we can restore)
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
