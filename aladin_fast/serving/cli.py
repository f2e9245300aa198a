"""``python -m aladin_fast serve --retriever DIR [--host 127.0.0.1 --port 8000] [options]``.

:func:`main` takes the arguments after ``serve``; :func:`add_arguments` lets a
parent parser (``aladin_fast.cli``) register the same options on its
``serve`` sub-command and then call :func:`run` with the parsed namespace.
The retrievers are loaded before the socket opens, so a bad directory fails
fast with exit code 2 and a message naming it.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--host``, ``--port``, ``--log-level`` and every :class:`ServingConfig` option."""
    from .config import add_config_arguments

    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_config_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    from ..cli import program

    parser = argparse.ArgumentParser(
        prog=program("serve"),
        description="HTTP search / rerank service over saved Retrievers, with dynamic batching.")
    add_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the retrievers named in ``args`` and serve until SIGINT/SIGTERM; returns the exit code (130
    after SIGINT; after SIGTERM uvicorn re-raises it once shut down: the process ends by that signal)."""
    try:
        from .config import config_from_arguments
        from .engine import load_gallery
        from .server import run_server
    except ImportError as err:  # fastapi / uvicorn are the "serve" extra
        print(f"aladin_fast serve: missing dependency ({err}); install the extra: pip install 'aladin-fast[serve]'",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_arguments(args)
        gallery = load_gallery(config.retriever_paths, generation=1, device=config.resolved_device(),
                               verify=config.verify, warmup=config.warmup)
    except (ValueError, OSError) as err:  # ManifestError is a ValueError
        print(f"aladin_fast serve: --retriever: {err}", file=sys.stderr)
        return 2
    logging.getLogger("aladin_fast.serving").info(
        "serving %s on http://%s:%d (batching: max_batch_size=%d, max_wait_ms=%g)",
        {direction: retriever.count for direction, retriever in gallery.retrievers.items()}, args.host, args.port,
        config.max_batch_size, config.max_wait_ms)
    try:
        run_server(config, args.host, args.port, gallery=gallery, log_level=args.log_level)
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it caught once its graceful shutdown is done
        logging.getLogger("aladin_fast.serving").info("stopped by SIGINT")
        return 130  # 128 + SIGINT, as a shell reports it (without the traceback)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: ``main(["--retriever", "gallery/", "--port", "8000"])``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
