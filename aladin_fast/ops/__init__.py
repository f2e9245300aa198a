"""Op layer: validation, backend dispatch and (later) autograd registration."""
from .alignment import alignment_scores, paired_scores, rerank_scores
from .backends import BACKENDS, resolve_backend

__all__ = ["alignment_scores", "paired_scores", "rerank_scores", "BACKENDS", "resolve_backend"]
