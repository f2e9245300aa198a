"""Command line: ``python -m aladin_fast {info,demo,train,acceptance,evaluate,index,search,serve}``."""
from __future__ import annotations

import argparse
import os
import sys

from .info import MissingDependencyError


def program(command: str = "") -> str:
    """The command as the user typed it, for usage lines and errors: ``aladin-fast`` (the console script),
    ``python -m aladin_fast.training`` (that module run directly) or ``python -m aladin_fast``, then ``command``."""
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(script) == "aladin-fast":
        name = "aladin-fast"
    elif os.path.basename(script) == "__main__.py" and os.path.basename(os.path.dirname(script)) == "training":
        name = "python -m aladin_fast.training"
    else:
        name = "python -m aladin_fast"
    return f"{name} {command}" if command else name


def _device(text: str) -> str:
    """``--device``: checked when parsed (a bad one was a RuntimeError / ValueError traceback from the demo)."""
    from .evaluate import resolve_device

    try:
        resolve_device(text)
    except (RuntimeError, ValueError) as error:
        detail = str(error).removeprefix(f"--device {text}: ") if isinstance(error, ValueError) \
            else "expected auto, cpu, cuda or cuda:N"
        raise argparse.ArgumentTypeError(f"{detail} (got {text!r})") from None
    return text


def _int_at_least(minimum: int):
    """An argparse type: an int >= ``minimum`` (0: "non-negative", 1: "positive"), else a usage error."""
    what = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_seed = _int_at_least(0)  # ``--seed``: the synthetic data's numpy seeds


def _out_dir(text: str) -> str:
    """``demo --out``: a folder that can be created and written (a file there, or a read-only place, was an
    OSError traceback from the demo)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    try:
        os.makedirs(text, exist_ok=True)
        probe = os.path.join(text, f".aladin_fast_write_probe.{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write a report into {text!r}: "
                                         f"{error.strerror or error}") from None
    return text


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program(), description="aladin-fast: fused image-text alignment kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print versions and which backends can run")
    demo = commands.add_parser("demo", help="train, distil, index, search and evaluate on synthetic data; "
                                             "writes a report")
    demo.add_argument("--quick", action="store_true", help="smaller sizes (about a minute on 2 CPU cores)")
    demo.add_argument("--seed", type=_seed, default=0)
    demo.add_argument("--out", type=_out_dir, default=None, help="report directory (default: reports/demo-<timestamp>)")
    demo.add_argument("--device", type=_device, default="auto", help="auto (CUDA when available), cpu, cuda[:N]")
    commands.add_parser("evaluate", help="evaluate a checkpoint on precomputed features (see `evaluate --help`)",
                        add_help=False)
    commands.add_parser("train", help="train a teacher and distil a student (see `train --help`)", add_help=False)
    commands.add_parser("acceptance", add_help=False,
                        help="teacher vs global baseline at equal training time, distilled student (see `acceptance --help`)")
    from .retrieval.cli import add_index_arguments, add_search_arguments

    add_index_arguments(commands.add_parser("index", help="build a retriever directory from .npy features"))
    add_search_arguments(commands.add_parser("search", help="two-stage search with a saved retriever"))
    serve = commands.add_parser("serve", help="HTTP search/rerank service over a saved retriever")
    from .serving.cli import add_arguments

    add_arguments(serve)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except MissingDependencyError as error:  # an optional extra (faiss, matplotlib): what to install, no traceback
        print(f"{program(argv[0] if argv else '')}: {error}", file=sys.stderr)
        return 2


def _run(argv) -> int:
    if argv[:1] == ["train"]:  # the training command owns its (many) flags
        from .training.command import main as train_main

        return train_main(argv)
    if argv[:1] == ["acceptance"]:
        from .acceptance import main as acceptance_main

        return acceptance_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from .evaluate import build_parser as evaluate_parser, evaluate_main

        try:
            return evaluate_main(argv)
        except ValueError as error:  # the command's flag checks ("--max-images must be ...") raise ValueError
            if not str(error).startswith("--"):
                raise
            evaluate_parser().error(str(error))  # a usage error: exit 2 naming the flag, not a traceback
        except FileNotFoundError as error:  # "checkpoint not found: PATH", a missing --data split
            evaluate_parser().error(str(error))
    args = _build_parser().parse_args(argv)
    if args.command == "info":
        from .info import info

        info()
        return 0
    if args.command == "demo":
        from .demo import run_demo

        run_demo(quick=args.quick, seed=args.seed, out=args.out, device=args.device)
        return 0
    if args.command in ("index", "search"):
        from .retrieval.cli import run_index, run_search

        return run_index(args) if args.command == "index" else run_search(args)
    if args.command == "serve":
        from .serving.cli import run

        return run(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
