"""Serving: an HTTP search / rerank service over saved Retrievers, with dynamic batching.

::

    python -m aladin_fast serve --retriever gallery/ --port 8000 --max-batch-size 32 --max-wait-ms 2

    curl -s localhost:8000/search -d '{"query_embedding": [...], "query_tokens": [[...], ...], "k": 10}'

Layout (one concern per module):

- :mod:`.config`  -- :class:`ServingConfig`: batching knobs and input limits;
- :mod:`.schema`  -- request bodies -> validated queries, errors naming the field;
- :mod:`.engine`  -- gallery snapshots and the fused batch calls (no HTTP);
- :mod:`.batcher` -- :class:`DynamicBatcher`, the asyncio request merger;
- :mod:`.metrics` -- Prometheus counters / gauges / histograms, exposition by hand;
- :mod:`.app`     -- the FastAPI app (endpoints, body limits, reload);
- :mod:`.connections` -- limits on a connection's request head (size, time) and the connection count;
- :mod:`.server`  -- uvicorn in the foreground or in a :class:`ServerThread`;
- :mod:`.cli`     -- ``main(argv)`` for ``python -m aladin_fast serve``.

fastapi and uvicorn (the ``serve`` extra) are imported only by ``.app``,
``.server`` and ``.cli``'s :func:`run`; the rest imports without them.
"""
from .batcher import BatcherClosedError, DynamicBatcher, QueueFullError
from .config import ServingConfig
from .engine import Gallery, load_gallery, run_rerank_batch, run_search_batch
from .metrics import MetricsRegistry
from .schema import RequestError, decode_tensor, encode_tensor

__all__ = [
    "ServingConfig", "DynamicBatcher", "QueueFullError", "BatcherClosedError", "Gallery", "load_gallery",
    "run_search_batch", "run_rerank_batch", "MetricsRegistry", "RequestError", "decode_tensor", "encode_tensor",
    "create_app", "ServerThread", "run_server",
]


def __getattr__(name):
    if name == "create_app":  # lazy: fastapi is an optional dependency
        from .app import create_app

        return create_app
    if name in ("ServerThread", "run_server"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'aladin_fast.serving' has no attribute {name!r}")
