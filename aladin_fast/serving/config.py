"""Serving configuration: batching knobs and input limits, in one validated dataclass.

:class:`ServingConfig` is built by the command line (:mod:`aladin_fast.serving.cli`)
or directly by code embedding the server (tests, the load test)::

    config = ServingConfig(retriever_paths=["gallery/"], max_batch_size=64, max_wait_ms=2.0)
    app = create_app(config)

Dynamic batching is disabled with ``max_batch_size=1`` (every request is its
own fused call; with ``workers=1`` requests are then served one at a time).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import List, Optional

__all__ = ["ServingConfig", "add_config_arguments", "config_from_arguments"]

MIB = 1 << 20


@dataclass
class ServingConfig:
    """Everything the service can be told at start-up.

    Args:
        retriever_paths: saved :class:`~aladin_fast.retrieval.Retriever`
            directories, at most one per direction (``text_to_image``,
            ``image_to_text``); the first one's direction is the default.
        device: where queries are scored: ``"auto"`` (CUDA when available),
            ``"cpu"`` or ``"cuda"``; also the student index device.
        verify: check SHA-256 checksums when (re)loading a retriever.
        max_batch_size: requests merged into one fused call (1 = no batching).
        max_wait_ms: how long the oldest waiting request may wait for others.
        workers: fused calls running at once per queue (worker threads).
        max_queue: waiting requests per queue before new ones get 503.
        max_query_tokens: tokens (words or regions) per query, the ``L`` of ``query_tokens``.
        max_candidates: candidates per ``/rerank`` request.
        max_candidate_tokens: tokens per candidate in ``candidate_tokens``.
        max_k / max_rerank_k: upper bounds of ``k`` and ``rerank_k`` in ``/search``.
        max_body_bytes: request bodies larger than this get 413, refused while they are read (a
            declared ``Content-Length`` over the limit is refused before any of the body is read).
        max_header_bytes: a request head (request line and headers) larger than this gets 431
            (field ``headers``) and its connection is closed; nothing more of it is kept.
        header_timeout_s: a connection must send a complete request head within this many seconds of
            opening, or of its previous response; otherwise it is closed (with 408, field
            ``headers``, when part of a request had arrived). Bounds what connections that send
            nothing, or a header a byte at a time, can hold (slowloris).
        body_timeout_s: the whole request body must arrive within this many seconds of the head;
            otherwise 408 (field ``body``, ``Connection: close``).
        keep_alive_timeout_s: an idle keep-alive connection is closed this long after its last
            response (uvicorn's ``timeout_keep_alive``).
        max_connections: while more connections than this are open, requests get 503
            ``overloaded`` (``Retry-After: 1``) before their body is read (``GET /health`` and
            ``GET /metrics`` are still answered); ``None``: no limit but the process's file
            descriptors. Bounds the memory of bodies being received to about ``max_connections *
            max_body_bytes``.
        admin_token: when set, ``/admin/*`` needs ``Authorization: Bearer <token>``.
        warmup: run one query on a (re)loaded retriever before it serves traffic.
        graceful_timeout_s: on shutdown, how long in-flight requests may take to finish; those
            still unanswered then get 503 ``shutting_down`` (never a bare 500).
        drain_period_s: on shutdown, how long the server keeps answering before it stops
            accepting connections: ``GET /health`` says ``"draining"`` (HTTP 503) so that a load
            balancer stops routing to it, while new ``/search``, ``/rerank`` and
            ``/admin/reload`` requests get 503 ``shutting_down`` and requests already accepted
            go on. Then in-flight requests get ``graceful_timeout_s`` to finish. Default 0 (no
            window); set it to at least the load balancer's health-check interval.
    """

    retriever_paths: List[str] = field(default_factory=list)
    device: str = "auto"
    verify: bool = True
    max_batch_size: int = 32
    max_wait_ms: float = 2.0
    workers: int = 1
    max_queue: int = 1024
    max_query_tokens: int = 256
    max_candidates: int = 1000
    max_candidate_tokens: int = 256
    max_k: int = 1000
    max_rerank_k: int = 1000
    max_body_bytes: int = 32 * MIB
    max_header_bytes: int = 64 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_timeout_s: float = 5.0
    max_connections: Optional[int] = 1024
    admin_token: Optional[str] = None
    warmup: bool = True
    graceful_timeout_s: float = 30.0
    drain_period_s: float = 0.0

    def __post_init__(self):
        if isinstance(self.retriever_paths, str):
            self.retriever_paths = [self.retriever_paths]
        self.retriever_paths = [str(path) for path in self.retriever_paths]
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for name in ("max_batch_size", "workers", "max_queue", "max_query_tokens", "max_candidates",
                     "max_candidate_tokens", "max_k", "max_rerank_k", "max_body_bytes", "max_header_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("max_wait_ms", "graceful_timeout_s", "drain_period_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:  # NaN too
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not math.isfinite(self.drain_period_s):  # an endless drain would never shut down
            raise ValueError(f"drain_period_s must be finite, got {self.drain_period_s!r}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s"):
            value = getattr(self, name)  # a limit of 0 closes every connection, inf is no limit: both refused
            if (not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.max_connections is not None and (not isinstance(self.max_connections, int)
                                                 or isinstance(self.max_connections, bool)
                                                 or self.max_connections < 1):
            raise ValueError(f"max_connections must be an int >= 1 or None, got {self.max_connections!r}")

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    def resolved_device(self) -> str:
        """``"cuda"`` or ``"cpu"`` (``"auto"`` resolved at run time)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def public(self) -> dict:
        """The settings shown by ``GET /info`` (the admin token is never shown)."""
        out = {item.name: getattr(self, item.name) for item in fields(self)}
        out["admin_token"] = "set" if self.admin_token else None
        return out


def _connections(text: str) -> Optional[int]:
    """``--max-connections`` value: an int, or ``none`` for no limit."""
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'none', got {text!r}") from None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--option`` per :class:`ServingConfig` field to ``parser``."""
    defaults = ServingConfig()
    parser.add_argument("--retriever", dest="retriever_paths", action="append", required=True, metavar="DIR",
                        help="saved Retriever directory (repeat for a second direction)")
    parser.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"))
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip SHA-256 checks when (re)loading retrievers")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help="requests per fused call; 1 disables dynamic batching")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="longest wait of the oldest request for a batch to fill")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="fused calls at once per queue")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests before 503")
    parser.add_argument("--max-query-tokens", type=int, default=defaults.max_query_tokens)
    parser.add_argument("--max-candidates", type=int, default=defaults.max_candidates)
    parser.add_argument("--max-candidate-tokens", type=int, default=defaults.max_candidate_tokens)
    parser.add_argument("--max-k", type=int, default=defaults.max_k)
    parser.add_argument("--max-rerank-k", type=int, default=defaults.max_rerank_k)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help="larger request bodies get 413 (refused while they arrive)")
    parser.add_argument("--max-header-bytes", type=int, default=defaults.max_header_bytes,
                        help="larger request heads (request line and headers) get 431 and the connection closes")
    parser.add_argument("--header-timeout", dest="header_timeout_s", type=float, default=defaults.header_timeout_s,
                        help="seconds a connection has to send a complete request head (then it is closed)")
    parser.add_argument("--body-timeout", dest="body_timeout_s", type=float, default=defaults.body_timeout_s,
                        help="seconds a request body has to arrive in full (then 408)")
    parser.add_argument("--keep-alive-timeout", dest="keep_alive_timeout_s", type=float,
                        default=defaults.keep_alive_timeout_s, help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--max-connections", type=_connections, default=defaults.max_connections,
                        help="open connections beyond which requests get 503 overloaded ('none': no limit; "
                             f"default {defaults.max_connections})")
    parser.add_argument("--admin-token", default=None, help="require 'Authorization: Bearer TOKEN' on /admin/*")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--graceful-timeout", dest="graceful_timeout_s", type=float,
                        default=defaults.graceful_timeout_s,
                        help="seconds in-flight requests get on shutdown (then 503 shutting_down)")
    parser.add_argument("--drain-period", dest="drain_period_s", type=float, default=defaults.drain_period_s,
                        help="seconds, on shutdown, that /health answers 'draining' (503) and new requests get 503 "
                             "before the server stops accepting connections (default 0)")


def config_from_arguments(args: argparse.Namespace) -> ServingConfig:
    """:class:`ServingConfig` from parsed :func:`add_config_arguments` options (ValueError names the field)."""
    names = {item.name for item in fields(ServingConfig)}
    return ServingConfig(**{name: value for name, value in vars(args).items() if name in names})
