"""Retrieval models built on the fused alignment op.

* :class:`Teacher` — TERAN-style word-region alignment model, scored by
  :func:`aladin_fast.alignment_scores` (MrSw by default).
* :class:`Student` — ALADIN-style global embeddings (first-token transformer
  heads), on the teacher's tokens or on its own encoders.
* :mod:`.encoders` — the region / caption encoders and input checks they share.
"""
from .encoders import CaptionEncoder, RegionEncoder, TokenTransformer
from .student import PoolingHead, Student
from .teacher import Teacher, TeacherOutput

__all__ = ["Teacher", "TeacherOutput", "Student", "PoolingHead", "RegionEncoder", "CaptionEncoder", "TokenTransformer"]
