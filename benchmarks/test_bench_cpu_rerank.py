"""CPU rerank: K gathered candidates per query, the fused C++ kernel vs torch and fast-maxsim.

Shapes: ``shapes.RERANK_SHAPES`` (1 and 64 queries x K = 100 / 1,000 candidates out of
a 5,000-image gallery, W=32 R=36 D=1024; W=20 R=36 D=768 K=5000, 10 FLOP/byte in fp32; and a
W=4 keyword query, K=5000, 2 FLOP/byte: bandwidth-bound here).
Providers: ``providers.PROVIDERS``. Every case checks its scores against a float64
oracle and against every other provider of the same shape before it is timed.

Run for real with ``make bench`` (writes benchmarks/results/<machine>.json and plots);
with ``--benchmark-disable`` (the default test run) each case runs once on a small
version of its shape.
"""
import pytest

from providers import PROVIDERS, run_forward_case
from shapes import RERANK_SHAPES, shapes_for

pytest.importorskip("aladin_fast._C")
SHAPES = shapes_for("cpu", RERANK_SHAPES)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_rerank(benchmark, shape_name, provider):
    scores = run_forward_case(benchmark, SHAPES[shape_name], provider, op="rerank_scores")
    assert scores.dtype.is_floating_point
