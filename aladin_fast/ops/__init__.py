"""Op layer: validation, backend dispatch and (later) autograd registration."""
from .alignment import alignment_scores, paired_scores, rerank_scores
from .backends import BACKENDS, resolve_backend
from .streaming import full_scores

__all__ = ["alignment_scores", "paired_scores", "rerank_scores", "full_scores", "BACKENDS", "resolve_backend"]
