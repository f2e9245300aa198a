"""CPU all-pairs forward: alignment_scores over every (caption, image) pair.

Shapes: ``shapes.ALL_PAIRS_SHAPES`` (a 128 x 128 training batch, W=32 R=36 D=1024 / 768),
the CPU slice of the full-gallery problem (``GALLERY_SHAPES``) and the late-interaction
peers' headline problem (``LATE_INTERACTION_SHAPES``: one 32-token query against
300-token documents, D=128 -- MaxSim, which is MrSw without masks, so fast-maxsim
computes exactly the same scores). Providers and checks as in test_bench_cpu_rerank.py.
"""
import pytest

from providers import PROVIDERS, run_forward_case
from shapes import ALL_PAIRS_SHAPES, GALLERY_SHAPES, LATE_INTERACTION_SHAPES, shapes_for

pytest.importorskip("aladin_fast._C")
SHAPES = shapes_for("cpu", ALL_PAIRS_SHAPES, GALLERY_SHAPES, LATE_INTERACTION_SHAPES)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_all_pairs(benchmark, shape_name, provider):
    scores = run_forward_case(benchmark, SHAPES[shape_name], provider, op="alignment_scores")
    assert scores.dtype.is_floating_point
