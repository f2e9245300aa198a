"""Benchmark shapes in one place, shared by the CPU suites, the GPU suites and tests.

Plain Python (no torch): import it as ``shapes`` inside ``benchmarks/`` (its
conftest puts the folder on ``sys.path``), as ``benchmarks.shapes`` from the
repository root, or by path from anywhere.

Every problem is "Nt captions of W words against images of R regions, D
features": all pairs (``candidates=None``: K = gallery) or K gathered
candidates per caption out of a gallery. A shape lists the devices it is meant
for; the CPU gets scaled-down versions of the GPU-sized problems, and
:meth:`Shape.smoke` gives the tiny version a ``--benchmark-disable`` run uses.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class Shape:
    name: str
    suite: str  # "training" | "all_pairs" | "rerank" | "gallery" | "late_interaction"
    queries: int  # Nt captions (or query documents)
    words: int  # W tokens per caption
    regions: int  # R tokens per image (or document)
    dim: int  # D
    gallery: int  # Ni images in the gallery
    candidates: Optional[int] = None  # K gathered per caption; None = all pairs
    devices: tuple = ("cpu", "gpu")
    note: str = ""

    @property
    def k(self) -> int:
        """Scores per caption."""
        return self.gallery if self.candidates is None else self.candidates

    @property
    def pairs(self) -> int:
        return self.queries * self.k

    @property
    def flops(self) -> float:
        """Forward FLOPs: every word-region dot product, 2 W R D per pair."""
        return 2.0 * self.pairs * self.words * self.regions * self.dim

    def expected_images_read(self) -> float:
        """Distinct gallery images the problem touches (K distinct random ids per caption)."""
        if self.candidates is None:
            return float(self.gallery)
        untouched = (1.0 - self.candidates / self.gallery) ** self.queries
        return self.gallery * (1.0 - untouched)

    def min_bytes(self, element_size: int, images_read: Optional[float] = None) -> float:
        """Bytes moved if every input token is read exactly once (the roofline's traffic)."""
        images = self.expected_images_read() if images_read is None else images_read
        return float((self.queries * self.words + images * self.regions) * self.dim * element_size)

    def intensity(self, element_size: int, images_read: Optional[float] = None) -> float:
        """Arithmetic intensity in FLOP per byte."""
        return self.flops / self.min_bytes(element_size, images_read)

    def smoke(self) -> "Shape":
        """A small version that keeps W, R, D (so every code path still runs) for smoke tests."""
        if self.suite == "training":
            return replace(self, queries=min(self.queries, SMOKE_BATCH), gallery=min(self.gallery, SMOKE_BATCH))
        gallery = min(self.gallery, 96)
        candidates = None if self.candidates is None else min(self.candidates, 48, gallery)
        return replace(self, queries=min(self.queries, 3), gallery=gallery, candidates=candidates)

    def scaled(self, **changes) -> "Shape":
        return replace(self, **changes)


def _named(*shapes: Shape) -> dict:
    return {shape.name: shape for shape in shapes}


SMOKE_BATCH = 32  # training batch (Nt = Ni) of a --benchmark-disable run

# (a) a training step: fwd + bwd of the teacher score over all pairs of a batch
TRAINING_SHAPES = _named(
    Shape("train_B128_W32_R36_D1024", "training", 128, 32, 36, 1024, 128),
    Shape("train_B128_W32_R36_D768", "training", 128, 32, 36, 768, 128),
)

# (a') the same batch, forward only (alignment_scores all pairs)
ALL_PAIRS_SHAPES = _named(
    Shape("allpairs_B128_W32_R36_D1024", "all_pairs", 128, 32, 36, 1024, 128),
    Shape("allpairs_B128_W32_R36_D768", "all_pairs", 128, 32, 36, 768, 128),
)

# (b) serving-time rerank: K gathered candidates per query out of a 5,000-image gallery
RERANK_SHAPES = _named(
    Shape("rerank_Q1_K100_W32_R36_D1024", "rerank", 1, 32, 36, 1024, 5000, 100),
    Shape("rerank_Q1_K1000_W32_R36_D1024", "rerank", 1, 32, 36, 1024, 5000, 1000,
          note="compute-bound on CPU: ~W/2 FLOP/byte in fp32"),
    Shape("rerank_Q64_K100_W32_R36_D1024", "rerank", 64, 32, 36, 1024, 5000, 100,
          note="a dynamic batch of 64 queries; candidates overlap, each image is read once"),
    Shape("rerank_Q64_K1000_W32_R36_D1024", "rerank", 64, 32, 36, 1024, 5000, 1000, devices=("gpu",),
          note="151 GFLOP a call (2.5 s at the CPU's peak, 10 s per torch baseline): GPU only"),
    Shape("rerank_Q1_K5000_W20_R36_D768", "rerank", 1, 20, 36, 768, 5000, 5000,
          note="10 FLOP/byte in fp32, 20 in bf16: bandwidth-bound only where the FMA peak exceeds ~10x the "
               "read bandwidth (compute-bound on the 2-vCPU AVX2 box: 80 GFLOP/s vs 22-25 GB/s); W=20 "
               "fills 20 of 24 AVX2 lanes words-in-lanes, so the kernel's DOT layout takes it"),
    Shape("rerank_Q1_K5000_W4_R36_D768", "rerank", 1, 4, 36, 768, 5000, 5000, devices=("cpu",),
          note="a short keyword query: 2 FLOP/byte in fp32, 4 in bf16 -- bandwidth-bound on the 2-vCPU AVX2 "
               "box, where a bf16 gallery halves the bytes (the kernel reads bf16 rows directly for W <= 12)"),
)

# (c) exhaustive gallery scoring (full_scores / alignment_scores over a whole gallery)
GALLERY_SHAPES = _named(
    Shape("gallery_T25000_I5000_W20_R36_D1024", "gallery", 25000, 20, 36, 1024, 5000, devices=("gpu",),
          note="the full 25k-caption x 5k-image test set: 184 TFLOP"),
    Shape("gallery_T100_I1000_W20_R36_D1024", "gallery", 100, 20, 36, 1024, 1000, devices=("cpu",),
          note="CPU-sized slice of the full gallery (147 GFLOP)"),
)

# the late-interaction peers' headline problem (ColBERT-style MaxSim = MrSw without masks):
# one query of 32 tokens against documents of 300 tokens, D = 128
LATE_INTERACTION_SHAPES = _named(
    Shape("maxsim_Lq32_Ld300_D128_N10000", "late_interaction", 1, 32, 300, 128, 10000, devices=("gpu",)),
    Shape("maxsim_Lq32_Ld300_D128_N3000", "late_interaction", 1, 32, 300, 128, 3000, devices=("cpu",),
          note="CPU-sized: 3,000 documents (460 MB fp32) instead of 10,000"),
)

ALL_SHAPES = {
    **TRAINING_SHAPES, **ALL_PAIRS_SHAPES, **RERANK_SHAPES, **GALLERY_SHAPES, **LATE_INTERACTION_SHAPES,
}


def shapes_for(device: str, *groups: dict) -> dict:
    """The shapes of ``groups`` (default: all) meant for ``device`` ("cpu" or "gpu")."""
    pool = {}
    for group in groups or (ALL_SHAPES,):
        pool.update(group)
    return {name: shape for name, shape in pool.items() if device in shape.devices}


# the machine's reference GEMM, measured in the same run
GEMM_SIZE = 2048
