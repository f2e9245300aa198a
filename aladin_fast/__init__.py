"""aladin-fast: fused word-region alignment kernels for image-text retrieval.

Public functional API::

    aladin_fast.alignment_scores(text, images, ...)   # [Nt, Ni]
    aladin_fast.paired_scores(text, images, ...)      # [N]
    aladin_fast.rerank_scores(text, images, candidates, ...)  # [Nt, K]
    aladin_fast.full_scores(text, images, ..., chunk=1024, topk=None)  # streamed gallery scoring
    aladin_fast.reference                              # the plain-PyTorch spec
    aladin_fast.info()                                 # versions and backends
"""
from . import nn, reference
from ._version import __version__
from .info import info
from .ops import alignment_scores, full_scores, paired_scores, rerank_scores
from .ops.backends import warn_if_not_installed

warn_if_not_installed()
del warn_if_not_installed

__all__ = ["alignment_scores", "paired_scores", "rerank_scores", "full_scores", "reference", "nn", "info", "__version__"]
