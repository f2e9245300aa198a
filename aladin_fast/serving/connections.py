"""Connection limits that uvicorn lacks: the size and the arrival time of a request's head, open connections.

uvicorn's httptools protocol (the one the ``serve`` extra installs) keeps every byte of a request's
head -- request line and headers -- until the head ends, with neither a size nor a time limit, and
arms no timer on a new connection. One client streaming an endless header grew the server by 2.4 GB
in 8 s, and connections that send nothing stayed open for ever: a few hundred of them used up the
file descriptors, after which every new client was reset. :func:`protocol_class` returns uvicorn's
protocol class with these limits added:

- ``max_header_bytes``: a head (request line and headers) larger than this is answered 431 (the
  error schema, field ``headers``, ``Connection: close``) and the connection closed; nothing more of
  it is kept (it is measured by the reads that carry it: refused at most one read past the limit);
- ``header_timeout_s``: a connection must deliver a complete head within this many seconds of
  opening, or of its previous response; it is closed otherwise, with a 408 (field ``headers``)
  when part of a request had arrived. A request whose head is complete is the app's business
  (``body_timeout_s``, the batch), never cut off here;
- the open connections are counted (``ServingState.open_connections``, the gauge
  ``aladin_open_connections``): the app answers 503 ``overloaded`` beyond ``max_connections``.

Connections closed by these limits are counted in ``aladin_connections_closed_total{reason}``
(``header_timeout``, ``header_too_large``). Without httptools uvicorn falls back to h11, which
gets the timer and the count here and the size limit from h11 itself
(``h11_max_incomplete_event_size``, see :func:`~aladin_fast.serving.server.uvicorn_config`).
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from .config import ServingConfig

__all__ = ["protocol_class", "raw_error_response"]

logger = logging.getLogger("aladin_fast.serving")
_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


def raw_error_response(status: int, field: Optional[str], message: str, kind: str = "invalid_request") -> bytes:
    """A complete HTTP/1.1 response in the app's error schema, written straight to a transport
    (for answers given before any request reached the app); it closes the connection."""
    body = json.dumps({"error": {"type": kind, "field": field, "message": message}}).encode()
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode("ascii") + body


def _uvicorn_version() -> str:
    import uvicorn

    return getattr(uvicorn, "__version__", "?")


def _base_protocol():
    """uvicorn's choice for ``http="auto"``: httptools when installed, h11 otherwise."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # pragma: no cover - the serve extra installs httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


class _Limits:
    """What every connection of one server shares: the limits and the state to report to."""

    def __init__(self, config: ServingConfig, state=None):
        self.max_header_bytes = config.max_header_bytes
        self.header_timeout_s = config.header_timeout_s
        self.state = state  # ServingState or None (an app that is not ours)

    def opened(self) -> None:
        if self.state is not None:
            self.state.connection_opened()

    def closed(self) -> None:
        if self.state is not None:
            self.state.connection_closed()

    def refused(self, reason: str) -> None:
        if self.state is not None:
            self.state.metrics.connections_closed.inc(reason=reason)


def protocol_class(config: ServingConfig, state=None) -> type:
    """uvicorn's HTTP protocol class with ``config``'s head limits and, when ``state`` (a
    :class:`~aladin_fast.serving.app.ServingState`) is given, the connection count reported to it.
    Pass it as ``uvicorn.Config(http=...)``."""
    base = _base_protocol()
    limits = _Limits(config, state)
    parses_head_here = hasattr(base, "on_header")  # httptools: the head arrives through callbacks
    # the uvicorn hooks the limits stand on (uvicorn 0.29-0.54); a release without them serves unlimited, saying so
    hooks = ("connection_made", "connection_lost", "data_received", "on_response_complete") + (
        ("on_message_begin", "on_headers_complete") if parses_head_here else ())
    missing = [name for name in hooks if not callable(getattr(base, name, None))]
    if missing:
        logger.warning("uvicorn %s's %s has no %s: the head size / time limits are off (max_header_bytes, "
                       "header_timeout_s)", _uvicorn_version(), base.__name__, ", ".join(missing))
        return base

    class LimitedProtocol(base):
        def connection_made(self, transport) -> None:
            self._head_timer = None
            self._head_bytes = 0
            self._head_started = False  # part of a request's head has arrived, not all of it
            self._heads_begun = 0
            self._refused = False
            super().connection_made(transport)
            limits.opened()
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            limits.closed()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:  # answered and closing: keep nothing more
                return
            if not parses_head_here:
                return super().data_received(data)
            # httptools gathers a header's name and value in Python bytes until the line ends (one endless header
            # is never handed to a callback): the head is measured here, by the reads that carry it. A read in which
            # a head begins is not counted (it may hold the previous message's end): a head is refused at most one
            # read (256 KiB) past the limit, never early
            head, begun = self._head_started, self._heads_begun
            super().data_received(data)
            if (head and self._head_started and begun == self._heads_begun and not self._refused
                    and not self.transport.is_closing()):  # not after uvicorn's own 400 for a bad request
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_header_bytes:
                    self._refuse(431, f"request head (URL and headers) exceeds max_header_bytes="
                                      f"{limits.max_header_bytes}", "header_too_large")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():  # the next head has header_timeout_s from now
                self._arm_head_timer()

        # ------------------------------------------------------------------ head timer
        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(limits.header_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return  # a request is being handled: its body and its answer are the app's business
            if self._head_started:
                self._refuse(408, f"request head not received within header_timeout_s="
                                  f"{limits.header_timeout_s:g} s", "header_timeout")
            else:  # an idle connection: nothing to answer
                limits.refused("header_timeout")
                self.transport.close()

        def _refuse(self, status: int, message: str, reason: str) -> None:
            self._refused = True
            self._cancel_head_timer()
            limits.refused(reason)
            self.transport.write(raw_error_response(status, "headers", message))
            self.transport.close()

        # ------------------------------------------------------ where a head begins and ends (httptools)
        if parses_head_here:
            def on_message_begin(self) -> None:
                self._head_bytes, self._head_started = 0, True
                self._heads_begun += 1
                super().on_message_begin()

            def on_headers_complete(self) -> None:
                self._head_started = False
                super().on_headers_complete()

    LimitedProtocol.__name__ = LimitedProtocol.__qualname__ = f"Limited{base.__name__}"
    return LimitedProtocol
